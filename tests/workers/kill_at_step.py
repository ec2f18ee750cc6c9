"""train.py's job killed with SIGKILL (kill -9: no clean-up at all) right after optimizer step K,
before that step is logged or checkpointed. Usage: kill_at_step.py K TRAIN_ARGS..."""

from __future__ import annotations

import os
import signal
import sys

from step_observer import after_every_step

from letngpt.cli import parse
from letngpt.train.trainer import train


def main() -> None:
    kill_step = int(sys.argv[1])

    def on_step(engine, step: int) -> None:
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    after_every_step(on_step)
    train(parse(sys.argv[2:]).run)


if __name__ == "__main__":
    main()
