"""Under torchrun with 2 ranks: --compile and --activation_checkpointing against the eager, stored
run, through letngpt.train.engine.build_engine (the trainer's path), from identical weights and batches.

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

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.model import build_model
from letngpt.parallel.distributed import init_distributed, shutdown
from letngpt.parallel.layout import build_layout
from letngpt.renorm.collective import collective_renormalize_
from letngpt.train.compile import blocks_compiled, compile_counts
from letngpt.train.engine import build_engine

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


def run_steps(cfg: ModelConfig, train: TrainConfig, steps: int, tp: int = 1) -> dict:
    train = dataclasses.replace(train, tp=tp)
    layout = build_layout(RunConfig(model=cfg, train=train), dist.get_world_size(), dist.get_rank())
    torch.manual_seed(0)
    engine, _, _ = build_engine(layout.shard(build_model(cfg)), train, layout, torch.float32)
    losses, deviations = [], []
    dp_rank = layout.dp_rank
    for step in range(steps):
        x, y = batch(step, dp_rank)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        collective_renormalize_(engine, layout.dp_group)
        losses.append(float(loss))
        deviations.append(sphere_deviation(engine) if cfg.use_ngpt else 0.0)
    return {"losses": losses, "sphere": deviations, "compiled": blocks_compiled(engine.module)}


def eager_and_compiled(cfg: ModelConfig, stage: int, tp: int = 1) -> dict:
    """5 steps eager, then 5 compiled from the same weights; the compiled run's dynamo counts (this
    process's recompilations and graph breaks during it)."""
    runs = {}
    for compiled in (False, True):
        train = TrainConfig(zero_stage=stage, batch_size=BATCH, gradient_accumulation_steps=2 // tp,
                            learning_rate=3e-3, dtype="float32", device="cpu", compile=compiled, tp=tp)
        before = compile_counts()
        runs["compiled" if compiled else "eager"] = run_steps(cfg, train, 5, tp=tp)
        after = compile_counts()
        runs["compiled" if compiled else "eager"].update(
            recompiles=after["recompiles"] - before["recompiles"],
            graph_breaks=after["graph_breaks"] - before["graph_breaks"],
            recompile_reasons=after["recompile_reasons"][before["recompiles"]:])
    return runs


def compile_checks() -> dict:
    """Eager then compiled, per variant and stage. ZeRO 1 reuses ZeRO 0's compiled graphs (same model
    code; parameters are graph inputs), so the 6 compiled runs cost 3 compilations. LET-nGPT also at
    ZeRO 2 and 3 (data parallel over the 2 ranks); TP=2 runs in tp_compile_checks, after the TP groups exist."""
    out = {}
    for name, (use_ngpt, maps) in VARIANTS.items():
        for stage in (0, 1, 2, 3) if name == "LETNGPT" else (0, 1):
            out[f"{name}/zero{stage}"] = eager_and_compiled(model_config(use_ngpt, maps), stage)
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


def checkpointing_checks() -> dict:
    from letngpt.parallel.tensor_parallel import initialize_tp, parallelize_tp

    cfg = model_config(True, 3)
    torch.manual_seed(0)
    full = build_model(cfg)
    out = {"tp1": grads_with_and_without(full)}
    for on in (False, True):  # ZeRO 3 gathers the weights again when a block is recomputed
        train = TrainConfig(zero_stage=3, batch_size=BATCH, gradient_accumulation_steps=2, learning_rate=3e-3,
                            dtype="float32", device="cpu", activation_checkpointing=on)
        out[f"zero3_engine_{'on' if on else 'off'}"] = run_steps(cfg, train, 3)
    initialize_tp(2)
    out["tp2"] = grads_with_and_without(parallelize_tp(full, 2))
    for on in (False, True):
        train = TrainConfig(zero_stage=1, batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=3e-3,
                            dtype="float32", device="cpu", activation_checkpointing=on)
        out[f"tp2_engine_{'on' if on else 'off'}"] = run_steps(cfg, train, 3, tp=2)
    return out


def main() -> None:
    init_distributed("cpu")
    torch.set_num_threads(1)
    report = {"compile": compile_checks(), "checkpointing": checkpointing_checks()}
    report["compile"]["LETNGPT/tp2_zero1"] = eager_and_compiled(model_config(True, 3), 1, tp=2)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
