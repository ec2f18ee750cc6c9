"""The arithmetic of one convergence curve, kept free of training and MLflow (letngpt.compare.sweep aggregates
runs, letngpt.compare.report writes the files).

Everything here is a pure function of validation curves, so the numbers a report claims (steps to reach
the baseline's loss, the ratio to the baseline) can be unit-tested on synthetic curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    """One training run of the comparison: its validation curve and speed, or why it failed.
    `times[i]` is the training time (sum of step times) after `steps[i]` steps."""

    preset: str
    lr: float
    steps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    run_id: str | None = None
    error: str | None = None
    seed: int | None = None  # set by sweeps (letngpt.compare.sweep), which run every lr on several seeds
    budget: int | None = None  # the run's step budget (max_iters), set by sweeps

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.losses)

    @property
    def final_val_loss(self) -> float | None:
        return self.losses[-1] if self.ok else None


def steps_to_target(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First step at which the curve reaches `target` (loss <= target), linearly interpolated between the
    eval point that reached it and the one before; None if it never does. Evals are sparse, so reading
    off the eval step alone would overstate the steps by up to one eval interval."""
    for i, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        if not loss <= target:  # also skips NaN
            continue
        if i == 0 or not math.isfinite(losses[i - 1]):
            return float(step)
        s0, l0 = steps[i - 1], losses[i - 1]
        return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
    return None


def step_ratio(baseline_steps: float | None, steps: float | None) -> float | None:
    """Baseline steps / variant steps: > 1 means the variant needs fewer steps than the baseline."""
    if baseline_steps is None or steps is None:
        return None
    if steps == 0:
        return 1.0 if baseline_steps == 0 else math.inf
    return baseline_steps / steps


def training_time_at(logged: Sequence[tuple[float, float]], at_steps: Sequence[float]) -> list[float]:
    """Training seconds after each of `at_steps`, from (step, step_time_s) rows of metrics.jsonl.
    A logged step time stands for every step since the previous logged one, so the result is exact when
    every step is logged and an estimate otherwise; evaluation and checkpoint time are not counted."""
    if not logged:
        return [math.nan] * len(at_steps)
    rows = sorted(logged)
    xs, ys, prev, total = [0.0], [0.0], 0.0, 0.0
    for step, dt in rows:
        total += dt * (step - prev)
        xs.append(float(step))
        ys.append(total)
        prev = step
    return [float(v) for v in np.interp(at_steps, xs, ys)]


def pick_baseline(presets: Sequence[str]) -> str | None:
    """The plain-GPT preset: a name containing "GPT" but neither "nGPT" nor "LET"."""
    for name in presets:
        if "GPT" in name and "nGPT" not in name and "LET" not in name.upper():
            return name
    return None
