"""The trainer's own path for the workers: the layout, model, engine, guard and renormaliser as train()
builds them (letngpt.train.trainer.build_step_parts, via bench.steps.trainer_parts), and one optimizer step
as step_once takes it (letngpt.train.trainer.train_step, whose last stage is the renormalisation)."""

from __future__ import annotations

from bench.steps import trainer_parts
from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.parallel.distributed import DistInfo
from letngpt.train.trainer import MicroBatch, StepParts, train_step


def build(model: ModelConfig, train: TrainConfig, info: DistInfo) -> StepParts:
    """Over every rank of the world; initial weights from train.seed, TP-sharded when train.tp > 1."""
    return trainer_parts(RunConfig(model=model, train=train), info)


def step(parts: StepParts, micro_batch: MicroBatch, number: int) -> tuple[float, bool]:
    """Optimizer step `number` (from 1) over this rank's micro batches, renormalisation included.
    Returns (mean micro-batch loss on this rank, applied)."""
    loss_sum, _, applied = train_step(parts.engine, parts.optimizer, parts.guard, parts.renorm, micro_batch,
                                      parts.layout.accum, step=number, logging_step=False)
    return float(loss_sum) / parts.layout.accum, applied
