"""The post-optimizer-step hook: one named call after every applied step (OLMo-core style).

nGPT's defining constraint, weights on the unit sphere, is restored here and only here: the
hook renormalises the matrices where DeepSpeed keeps them (fp32 masters and compute weights)
and then runs any `on_step` callback (tests, instruments). The method is chosen and validated
once, when the hook is built:

- `collective` (default, collective.py): one all-reduce of per-row partial sums of squares
  over the data-parallel group, then a local rescale. Works at ZeRO 0-3, bf16 included.
- `naive` (naive.py): gathers each full fp32 master, normalises, scatters back. The reference
  the tests compare the collective method against; it cannot reach the masters at ZeRO 0 in
  bf16/fp16, so that combination is refused.

May import letngpt's config, model (the unit-norm rule) and parallel (the all-reduce); never train.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from letngpt.config import ConfigError, RunConfig
from letngpt.renorm.collective import collective_renormalize_
from letngpt.renorm.naive import renormalize_engine_weights_

__all__ = ["PostStepHook", "collective_renormalize_", "renormalize_engine_weights_"]

METHODS: dict[str, Callable] = {"collective": collective_renormalize_, "naive": renormalize_engine_weights_}


class PostStepHook:
    """Called once after each optimizer step: `hook(engine, step, applied)`. Renormalises after
    an applied step (a skipped one changed nothing), then calls `on_step(engine, step)`."""

    def __init__(self, run: RunConfig, dtype: torch.dtype, on_step: Callable[[object, int], None] | None = None):
        method = run.train.renorm
        if method not in METHODS:
            raise ConfigError(f"renorm ({method!r}) must be one of {', '.join(METHODS)}")
        if method == "naive" and run.model.use_ngpt and run.train.zero_stage == 0 and dtype != torch.float32:
            raise ConfigError("renorm=naive cannot reach the fp32 masters at ZeRO 0 with bf16/fp16; "
                              "use renorm=collective")
        self.method = method
        self.renormalize = METHODS[method]
        self.on_step = on_step
        self.bytes_last_step = 0  # what the renormalisation sent (collective: 4 bytes per row)
        self.callback_seconds = 0.0  # time spent in on_step, which step timings leave out

    def __call__(self, engine, step: int, applied: bool) -> None:
        if applied:
            self.bytes_last_step = self.renormalize(engine) or 0
        self.callback_seconds = 0.0
        if self.on_step is not None:
            start = time.perf_counter()
            self.on_step(engine, step)
            self.callback_seconds = time.perf_counter() - start
