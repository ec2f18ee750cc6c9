"""The trainer's own path for the workers: the layout, model, engine, guard and renormaliser as train()
builds them (letngpt.parallel.layout.build_layout, letngpt.train.trainer.build_step_parts), and one optimizer
step as step_once takes it (letngpt.train.trainer.train_step, whose last stage is the renormalisation)."""

from __future__ import annotations

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.parallel.distributed import DistInfo
from letngpt.parallel.layout import build_layout
from letngpt.train.trainer import MicroBatch, StepParts, build_step_parts, train_step


def build(model: ModelConfig, train: TrainConfig, info: DistInfo) -> StepParts:
    """Over every rank of the world; initial weights from train.seed, TP-sharded when train.tp > 1."""
    run = RunConfig(model=model, train=train)
    return build_step_parts(run, info, build_layout(run, info.world_size, info.rank))


def step(parts: StepParts, micro_batch: MicroBatch, number: int) -> tuple[float, bool]:
    """Optimizer step `number` (from 1) over this rank's micro batches, renormalisation included.
    Returns (mean micro-batch loss on this rank, applied)."""
    loss_sum, _, applied = train_step(parts.engine, parts.optimizer, parts.guard, parts.renorm, micro_batch,
                                      parts.layout.accum, step=number, logging_step=False)
    return float(loss_sum) / parts.layout.accum, applied
