"""Under torchrun with 2 ranks: --compile and --activation_checkpointing against the eager, stored
run, through the trainer's own layout, engine builder, train_step and renormalisation (production.py),
from identical weights and batches.

1. compile: GPT, nGPT and LET-nGPT M=3 at ZeRO 0 and 1 (data parallel over the 2 ranks), LET-nGPT also
   at ZeRO 2, 3 and at TP=2 ZeRO 1, 5 steps each, eager then compiled: losses, and after every step the
   worst |norm - 1| of the nGPT matrices' fp32 masters and compute weights (renormalisation still
   applied); each compiled run's recompilations and graph breaks (dynamo's counters).
2. activation checkpointing, LET-nGPT M=3: loss and every gradient of one forward/backward with and
   without it, at TP=1 (the plain model) and TP=2 (megatron-core layers); then 3 engine steps with
   and without it at ZeRO 3 (DP=2) and at TP=2 ZeRO 1.
Writes the report to the JSON file given as argv[1] (rank 0)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from production import build, step

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.model import build_model
from letngpt.parallel.distributed import DistInfo, init_distributed, shutdown
from letngpt.parallel.layout import build_layout
from letngpt.train.compile import blocks_compiled, compile_counts

VARIANTS = {"GPT": (False, 1), "nGPT": (True, 1), "LETNGPT": (True, 3)}
BATCH, CTX, VOCAB = 4, 32, 256


def model_config(use_ngpt: bool, maps: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, block_size=CTX, n_layer=2, n_head=2, n_embd=64, num_maps=maps,
                       use_ngpt=use_ngpt)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(VOCAB, (BATCH, CTX + 1), generator=torch.Generator().manual_seed(1000 * step + rank))
    return x[:, :-1], x[:, 1:]


def sphere_deviation(engine) -> float:
    """Worst |row norm - 1| over the nGPT matrices, fp32 masters and compute weights (gathered at ZeRO 3)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params, worst = dict(engine.module.named_parameters()), 0.0
    for name, dim in engine.module.unit_norm_axes().items():
        p = params[name]
        master = safe_get_full_fp32_param(p)
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            compute = p.detach().clone()
        for w in (compute, compute if master is None else master):
            worst = max(worst, float((w.float().norm(dim=dim) - 1).abs().max()))
    return worst


def run_steps(cfg: ModelConfig, train: TrainConfig, steps: int, info: DistInfo) -> dict:
    """`steps` optimizer steps of one micro batch per rank, as the trainer takes them (seed 0)."""
    built = build(cfg, train, info)
    assert built.layout.accum == 1
    losses, deviations = [], []
    for n in range(steps):
        loss, applied = step(built, lambda _micro, n=n: batch(n, built.layout.dp_rank), n + 1)
        assert applied
        losses.append(loss)
        deviations.append(sphere_deviation(built.engine) if cfg.use_ngpt else 0.0)
    return {"losses": losses, "sphere": deviations, "compiled": blocks_compiled(built.engine.module)}


def eager_and_compiled(cfg: ModelConfig, stage: int, info: DistInfo, tp: int = 1) -> dict:
    """5 steps eager, then 5 compiled from the same weights; the compiled run's dynamo counts (this
    process's recompilations and graph breaks during it)."""
    runs = {}
    for compiled in (False, True):
        train = TrainConfig(zero_stage=stage, batch_size=BATCH, gradient_accumulation_steps=2 // tp,
                            learning_rate=3e-3, dtype="float32", device="cpu", compile=compiled, tp=tp, seed=0)
        before = compile_counts()
        runs["compiled" if compiled else "eager"] = run_steps(cfg, train, 5, info)
        after = compile_counts()
        runs["compiled" if compiled else "eager"].update(
            recompiles=after["recompiles"] - before["recompiles"],
            graph_breaks=after["graph_breaks"] - before["graph_breaks"],
            recompile_reasons=after["recompile_reasons"][before["recompiles"]:])
    return runs


def compile_checks(info: DistInfo) -> dict:
    """Eager then compiled, per variant and stage. ZeRO 1 reuses ZeRO 0's compiled graphs (same model
    code; parameters are graph inputs), so the 6 compiled runs cost 3 compilations. LET-nGPT also at
    ZeRO 2 and 3 (data parallel over the 2 ranks); TP=2 runs in tp_compile_checks, after the TP groups exist."""
    out = {}
    for name, (use_ngpt, maps) in VARIANTS.items():
        for stage in (0, 1, 2, 3) if name == "LETNGPT" else (0, 1):
            out[f"{name}/zero{stage}"] = eager_and_compiled(model_config(use_ngpt, maps), stage, info)
    return out


def grads_with_and_without(model: torch.nn.Module) -> dict:
    """Max |difference| of the loss and of every gradient, checkpointing on vs off."""
    x, y = batch(0, 0)
    results = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        model.checkpoint_blocks = on
        _, loss = model(x, y)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    return {"loss": abs(loss0 - loss1), "grad": max(float((g0[n] - g1[n]).abs().max()) for n in g0),
            "n_grads": len(g0)}


def checkpointing_checks(info: DistInfo) -> dict:
    cfg = model_config(True, 3)
    # The gradient comparison needs every parameter's gradient of one forward/backward, which an engine
    # step (ZeRO partitions, then zeroes them) does not leave behind: a plain model, as train() builds it.
    torch.manual_seed(0)
    full = build_model(cfg)
    out = {"tp1": grads_with_and_without(full)}
    for on in (False, True):  # ZeRO 3 gathers the weights again when a block is recomputed
        train = TrainConfig(zero_stage=3, batch_size=BATCH, gradient_accumulation_steps=2, learning_rate=3e-3,
                            dtype="float32", device="cpu", activation_checkpointing=on, seed=0)
        out[f"zero3_engine_{'on' if on else 'off'}"] = run_steps(cfg, train, 3, info)
    tp2 = TrainConfig(zero_stage=1, batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=3e-3,
                      dtype="float32", device="cpu", tp=2, seed=0)
    layout = build_layout(RunConfig(model=cfg, train=tp2), info.world_size, info.rank)
    out["tp2"] = grads_with_and_without(layout.shard(full))
    for on in (False, True):
        train = dataclasses.replace(tp2, activation_checkpointing=on)
        out[f"tp2_engine_{'on' if on else 'off'}"] = run_steps(cfg, train, 3, info)
    return out


def main() -> None:
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    report = {"compile": compile_checks(info), "checkpointing": checkpointing_checks(info)}
    # TP last: DeepSpeed keeps the first TP engine's mpu globally
    report["compile"]["LETNGPT/tp2_zero1"] = eager_and_compiled(model_config(True, 3), 1, info, tp=2)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
