"""nGPT's renormalisation, the named stage after every applied optimizer step (OLMo-core's
post-optimizer-step shape): weights back on the unit sphere where DeepSpeed keeps them (fp32 masters
and compute weights). letngpt.train.trainer.train_step calls it; nothing else in training does.

- `collective` (default, collective.py): one all-reduce of per-row partial sums of squares
  over the data-parallel group, then a local rescale. Works at ZeRO 0-3, bf16 included.
- `naive` (naive.py): gathers each full fp32 master, normalises, scatters back. The reference
  the tests compare the collective method against; it cannot reach the masters at ZeRO 0 in
  bf16/fp16, so that combination is refused.

May import letngpt's config, model (the unit-norm rule) and parallel (the all-reduce); never train.
"""

from __future__ import annotations

import torch

from letngpt.config import ConfigError, RunConfig
from letngpt.renorm.collective import collective_renormalize_
from letngpt.renorm.naive import renormalize_engine_weights_

__all__ = ["Renormalizer", "collective_renormalize_", "renormalize_engine_weights_"]


class Renormalizer:
    """`renormalize(engine)` after every applied optimizer step, on every rank (collective over the
    DP group). The method was validated with the config (TrainConfig.renorm); what depends on the
    resolved dtype is checked here, once."""

    def __init__(self, run: RunConfig, dtype: torch.dtype, dp_group) -> None:
        self.method = run.train.renorm
        if self.method == "naive" and run.model.use_ngpt and run.train.zero_stage == 0 and dtype != torch.float32:
            raise ConfigError("renorm=naive cannot reach the fp32 masters at ZeRO 0 with bf16/fp16; "
                              "use renorm=collective")
        self.dp_group = dp_group
        self.bytes_last_step = 0  # what the last call sent (collective: 4 bytes per normalised row)

    def __call__(self, engine) -> None:
        if self.method == "collective":
            self.bytes_last_step = collective_renormalize_(engine, self.dp_group)
        else:
            renormalize_engine_weights_(engine)
