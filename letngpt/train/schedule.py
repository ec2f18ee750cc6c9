"""The learning-rate schedule: linear warmup, then cosine decay to min_lr (nanoGPT's).

A pure function of the step, so a resumed run continues exactly where it stopped and the
trainer sets the rate itself before each step (DeepSpeed's own scheduler is not used). nGPT
presets use no warmup; when only --max_iters is given, lr_decay_iters follows it (letngpt.cli).
"""

from __future__ import annotations

import math

from letngpt.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr over lr_decay_iters."""
    if step < train.warmup_iters:
        return train.learning_rate * (step + 1) / (train.warmup_iters + 1)
    if step >= train.lr_decay_iters:
        return train.min_lr
    span = max(1, train.lr_decay_iters - train.warmup_iters)
    ratio = (step - train.warmup_iters) / span
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train.learning_rate - train.min_lr)
