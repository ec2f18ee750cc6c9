"""The non-finite guard: a NaN or Inf loss or gradient on any rank skips the optimizer step
on every rank (Megatron's --check-for-nan-in-loss-and-grad, done before the step).

How it sees every gradient whatever the ZeRO stage: a tensor hook on each parameter runs on the
gradient autograd produces, before DeepSpeed's own hooks reduce, partition or accumulate it, so
the same check works at ZeRO 0-3 and with tensor-parallel shards. Each hook ORs a flag that
stays on the device (no host sync per parameter); the step boundary all-reduces it once.

How a step is skipped without touching the weights or the optimizer state: DeepSpeed's
`engine.step()` still runs (its gradient buffers are cleared and its counters advance
consistently), but the wrapped torch optimizer's own `step` is a no-op for that call. The fp32
masters, Adam moments and step count stay as they were.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from letngpt.errors import DivergedError
from letngpt.parallel.distributed import all_reduce_max

log = logging.getLogger("letngpt")


class NonFiniteGuard:
    """Watches losses and gradients; decides collectively whether a step may be applied."""

    def __init__(self, model: nn.Module, device: torch.device, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._handles = [p.register_hook(self._watch_grad) for p in model.parameters() if p.requires_grad]

    def _watch_grad(self, grad: torch.Tensor) -> None:
        self._bad |= ~torch.isfinite(grad).all()

    def watch_loss(self, loss: torch.Tensor) -> None:
        self._bad |= ~torch.isfinite(loss.detach()).all()

    def step_is_bad(self, step: int) -> bool:
        """Collective, once per optimizer step, before it is applied. Raises DivergedError after
        `max_consecutive` bad steps in a row (nothing is saved: the caller only checkpoints good
        weights)."""
        bad = all_reduce_max(bool(self._bad), self._bad.device) > 0
        self._bad.zero_()
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss or gradient on some rank; optimizer step skipped "
                    "(%d in a row, %d in this launch)", step, self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise DivergedError(f"{self.consecutive} consecutive steps had a non-finite loss or gradient (last at "
                                f"step {step}); stopped without writing a checkpoint. Lower --learning_rate or "
                                f"--grad_clip and resume from the last checkpoint")
        return True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def skip_optimizer_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, `optimizer.step()` does nothing (DeepSpeed's wrappers still run)."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step  # the class's step again


def weights_finite(model: nn.Module) -> bool:
    """Collective: every rank's local parameters (its partition at ZeRO 3, its shard under TP)
    are finite. A checkpoint is only ever written after this says yes."""
    bad = torch.zeros((), dtype=torch.bool, device=next(model.parameters()).device)
    for p in model.parameters():
        local = getattr(p, "ds_tensor", p)  # ZeRO 3 keeps this rank's partition here
        if local.numel():
            bad |= ~torch.isfinite(local.detach()).all()
    return all_reduce_max(bool(bad), bad.device) == 0


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: non-finite numbers are written as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
