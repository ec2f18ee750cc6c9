"""A check after every optimizer step of a real training run (train.py's path), for the workers that
inspect the state a step leaves: the trainer has no callback hook, so this wraps its `train_step`,
whose last stage is the renormalisation. `step` is the number of the step just taken (1-based)."""

from __future__ import annotations

from collections.abc import Callable

import letngpt.train.trainer as trainer


def after_every_step(check: Callable[[object, int], None]) -> None:
    """Call `check(engine, step)` after each train_step of this process's training run."""
    real = trainer.train_step

    def observed(engine, *args, step: int, **kwargs):
        result = real(engine, *args, step=step, **kwargs)
        check(engine, step)
        return result

    trainer.train_step = observed
