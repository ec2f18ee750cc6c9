"""Run train.py's job with a NaN injected on ONE rank at chosen steps, and record what the
optimizer did around them. Usage: nan_injection.py BAD_RANK BAD_STEPS(comma list) [grad] ARGS...
Without `grad` the loss is NaN; with it the loss stays finite and only the gradients are NaN (an
identity on the logits whose backward multiplies by NaN).

Writes <out_dir>/nan_rank<R>.json: for each bad step, the largest change of any fp32 master, of
this rank's compute weights (its partition at ZeRO 3) and of Adam's moments, and the Adam step
counts across it (all must show nothing happened), and the same for the step after it (which must
train again, to finite weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from step_observer import after_every_step

from letngpt.cli import parse
from letngpt.model import LETnGPT
from letngpt.parallel.distributed import shutdown
from letngpt.train.trainer import train


def masters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().clone()
    return out


def adam_steps(engine) -> list[float]:
    return sorted(float(s["step"]) for s in engine.client_optimizer.state.values() if "step" in s)


def adam_moments(engine) -> list[torch.Tensor]:
    """This rank's Adam moments (over its fp32 partitions under ZeRO), flattened, in the state's order
    (ZeRO 3 empties the param groups between steps, so they cannot be the index)."""
    return [s[k].detach().float().flatten().clone() for s in engine.client_optimizer.state.values()
            for k in ("exp_avg", "exp_avg_sq") if k in s]


def local_weights(engine) -> dict[str, torch.Tensor]:
    """The compute weights this rank holds (bf16 in bf16 runs; the partition at ZeRO 3)."""
    return {name: getattr(p, "ds_tensor", p).detach().float().clone() for name, p in engine.module.named_parameters()}


def max_change(now: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max().item() for a, b in zip(now, before, strict=True) if a.numel()), default=0.0)


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def main() -> None:
    bad_rank, bad_steps = int(sys.argv[1]), {int(s) for s in sys.argv[2].split(",")}
    nan_grad = sys.argv[3] == "grad"
    run = parse(sys.argv[4 if nan_grad else 3:]).run
    rank = int(os.environ.get("RANK", "0"))
    state = {"next": 1, "before": None}
    records: list[dict] = []
    original_loss = LETnGPT.loss

    def loss(self, logits, targets):  # NaN on one rank only, at the chosen steps
        bad = self.training and rank == bad_rank and state["next"] in bad_steps
        if bad and nan_grad:
            return original_loss(self, NaNGrad.apply(logits), targets)
        value = original_loss(self, logits, targets)
        return value * float("nan") if bad else value

    LETnGPT.loss = loss

    def on_step(engine, step: int) -> None:
        now = (masters(engine), adam_steps(engine), local_weights(engine), adam_moments(engine))
        if state["before"] is not None and (step in bad_steps or step - 1 in bad_steps):
            before = state["before"]
            records.append({"step": step, "bad": step in bad_steps,
                            "max_change": max_change(list(now[0].values()), list(before[0].values())),
                            "weights_change": max_change(list(now[2].values()), list(before[2].values())),
                            "moments_change": max_change(now[3], before[3]),
                            "finite": all(bool(torch.isfinite(t).all()) for t in (*now[0].values(), *now[3])),
                            "adam_before": before[1][:3], "adam_after": now[1][:3]})
        state["before"], state["next"] = now, step + 1
        state["optimizer"] = type(engine.optimizer).__name__
        state["dtype"] = str(next(engine.module.parameters()).dtype)

    after_every_step(on_step)
    summary = train(run)
    out = Path(run.train.out_dir) / f"nan_rank{rank}.json"
    out.write_text(json.dumps({"records": records, "summary": summary, "optimizer": state.get("optimizer"),
                               "dtype": state.get("dtype")}))
    shutdown()


if __name__ == "__main__":
    main()
