"""One CPU process: the gradient DeepSpeed accumulates over 32 bf16 micro batches, per ZeRO stage,
against the same stage's own bf16 micro gradients summed in fp64.

For each stage, an engine built as the trainer builds it (tests/workers/production.py: build_layout,
build_model_engine; the shipped recipe letngpt/train/ds_configs/zero{stage}.json) with bf16 weights
and ONE micro batch per step gives each micro batch's gradient (read before an lr = 0 step, so the
weights never move); /32 is exact, and their fp64 sum is the reference. A second engine with
32 micro batches per step accumulates the same batches; its full gradient is read at the boundary
with safe_get_full_grad. The micro gradients come from DeepSpeed itself because ZeRO 3's hooks
change the order in which autograd sums bf16 gradients, so a plain model's differ in the last bit.
Writes, per stage, the worst |ds - ref| in units of the allowed error: bf16's rounding of the
final value, 2^-8 |ref|, plus fp32 summation's, 32 * 2^-24 * sum |g_i|; and the same figure for a
bf16 running sum of the micro gradients, which must exceed 1 for the test to mean anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from production import build

from letngpt.config import ModelConfig, TrainConfig
from letngpt.parallel.distributed import DistInfo, init_distributed, shutdown
from letngpt.train.engine import set_lr

MODEL = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, num_maps=3, use_ngpt=True)
ACCUM, MICRO = 32, 2
BF16_ROUNDING = 2.0**-8  # round-to-nearest into bf16 (8 significant bits) moves x by at most 2^-8 |x|


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(MODEL.vocab_size, (MICRO, MODEL.block_size + 1), generator=gen) for _ in range(ACCUM)]


def engine_for(stage: int, accum: int, info: DistInfo):
    """The trainer's engine, same initial weights (seed 0) every time. The steps below stay by hand:
    the gradients are read between the last backward and the optimizer step, inside train_step."""
    train = TrainConfig(zero_stage=stage, batch_size=MICRO, gradient_accumulation_steps=accum, device="cpu",
                        dtype="bfloat16", seed=0)
    built = build(MODEL, train, info)
    return built.engine, built.ds_config


def full_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {name: safe_get_full_grad(p).detach().double() for name, p in engine.module.named_parameters()}


def micro_gradients(stage: int, info: DistInfo) -> list[dict[str, torch.Tensor]]:
    """Each micro batch's gradient of loss / ACCUM, as this stage computes it in bf16."""
    engine, _ = engine_for(stage, 1, info)
    set_lr(engine, 0.0)  # AdamW at lr 0 (weight decay included) leaves every weight as it was
    grads = []
    for x in batches():
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        grads.append({n: g / ACCUM for n, g in full_grads(engine).items()})  # / 2^5: exact
        engine.step()
    return grads


def worst(got: dict, exact: dict, abs_sum: dict) -> float:
    """max |got - exact| / (2^-8 |exact| + ACCUM 2^-24 sum |g_i|) over every element."""
    return max(float(((got[n] - e).abs() / (BF16_ROUNDING * e.abs() + ACCUM * 2.0**-24 * abs_sum[n])
                      .clamp_min(1e-45)).max()) for n, e in exact.items())


def run_stage(stage: int, info: DistInfo) -> dict:
    micro = micro_gradients(stage, info)
    exact = {n: sum(g[n] for g in micro) for n in micro[0]}
    abs_sum = {n: sum(g[n].abs() for g in micro) for n in micro[0]}
    in_bf16 = {n: sum((g[n].to(torch.bfloat16) for g in micro[1:]), micro[0][n].to(torch.bfloat16)).double()
               for n in micro[0]}
    engine, ds_config = engine_for(stage, ACCUM, info)
    for x in batches():
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
    got = full_grads(engine)
    return {"stage": stage, "optimizer": type(engine.optimizer).__name__, "data_types": ds_config.get("data_types"),
            "worst": worst(got, exact, abs_sum), "worst_bf16_sum": worst(in_bf16, exact, abs_sum),
            "max_abs_diff": max(float((got[n] - e).abs().max()) for n, e in exact.items()),
            "grad_norm": float(sum(e.pow(2).sum() for e in exact.values()).sqrt())}


def main() -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results = [run_stage(int(s), info) for s in sys.argv[2].split(",")]
    Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
