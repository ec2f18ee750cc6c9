"""Run train.py's job with a NaN loss injected on ONE rank at chosen steps, and record what
the optimizer did around them. Usage: nan_injection.py BAD_RANK BAD_STEPS(comma list) ARGS...

Writes <out_dir>/nan_rank<R>.json: for each bad step, the largest change of any fp32 master
and the Adam step counts across it (both must show nothing happened), and the same for the
step after it (which must train again).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from letngpt.cli import parse
from letngpt.distributed import shutdown
from letngpt.model import LETnGPT
from letngpt.trainer import train


def masters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().clone()
    return out


def adam_steps(engine) -> list[float]:
    return sorted(float(s["step"]) for s in engine.client_optimizer.state.values() if "step" in s)


def main() -> None:
    bad_rank, bad_steps = int(sys.argv[1]), {int(s) for s in sys.argv[2].split(",")}
    run = parse(sys.argv[3:]).run
    rank = int(os.environ.get("RANK", "0"))
    state = {"next": 1, "before": None}
    records: list[dict] = []
    original_loss = LETnGPT.loss

    def loss(self, logits, targets):  # NaN on one rank only, at the chosen steps
        value = original_loss(self, logits, targets)
        if self.training and rank == bad_rank and state["next"] in bad_steps:
            value = value * float("nan")
        return value

    LETnGPT.loss = loss

    def on_step(engine, step: int) -> None:
        now = (masters(engine), adam_steps(engine))
        if state["before"] is not None and (step in bad_steps or step - 1 in bad_steps):
            before = state["before"]
            change = max((now[0][k] - before[0][k]).abs().max().item() for k in now[0])
            records.append({"step": step, "bad": step in bad_steps, "max_change": change,
                            "adam_before": before[1][:3], "adam_after": now[1][:3]})
        state["before"], state["next"] = now, step + 1

    summary = train(run, on_step=on_step)
    out = Path(run.train.out_dir) / f"nan_rank{rank}.json"
    out.write_text(json.dumps({"records": records, "summary": summary}))
    shutdown()


if __name__ == "__main__":
    main()
