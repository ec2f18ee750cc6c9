"""Run train.py's job under torchrun with a per-step check of the nGPT sphere constraint on
what DeepSpeed actually keeps: the full fp32 master weights and the compute weights.
Writes <out_dir>/checks_rank<R>.json with the worst deviation from unit norm per step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from step_observer import after_every_step

from letngpt.cli import parse
from letngpt.parallel.distributed import shutdown
from letngpt.train.trainer import train


def gathered(engine, p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 master, compute weight), both full, gathered across ranks where ZeRO splits them."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(p)
    if hasattr(p, "ds_id"):
        with deepspeed.zero.GatheredParameters([p]):
            compute = p.detach().clone()
    else:
        compute = p.detach().clone()
    return (compute if master is None else master).float(), compute.float()


def main() -> None:
    run = parse(sys.argv[1:]).run
    worst: list[dict] = []

    def check(engine, step: int) -> None:
        params = dict(engine.module.named_parameters())
        dev_master = dev_compute = 0.0
        for name, dim in engine.module.unit_norm_axes().items():
            master, compute = gathered(engine, params[name])
            dev_master = max(dev_master, float((master.norm(dim=dim) - 1).abs().max()))
            dev_compute = max(dev_compute, float((compute.norm(dim=dim) - 1).abs().max()))
        worst.append({"step": step, "master": dev_master, "compute": dev_compute})

    after_every_step(check)
    summary = train(run)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(run.train.out_dir) / f"checks_rank{rank}.json"
    out.write_text(json.dumps({"checks": worst, "summary": summary}))
    shutdown()


if __name__ == "__main__":
    main()
