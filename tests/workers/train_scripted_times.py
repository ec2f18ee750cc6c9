"""Run train.py's job with scripted step times: step k "takes" 0.1 * k seconds, whatever the clock
says, so the test can check which steps the logged and summarised throughput average over.
Writes <out_dir>/scripted.json with the scripted times and the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import letngpt.train.trainer as trainer
from letngpt.cli import parse
from letngpt.parallel.distributed import shutdown
from letngpt.train.metrics import StepTimer

SCRIPTED: list[float] = []


class ScriptedTimer(StepTimer):
    def stop(self, device) -> float:
        super().stop(device)
        SCRIPTED.append(0.1 * (len(SCRIPTED) + 1))
        return SCRIPTED[-1]


def main() -> None:
    run = parse(sys.argv[1:]).run
    trainer.StepTimer = ScriptedTimer
    summary = trainer.train(run)
    out = Path(run.train.out_dir) / "scripted.json"
    out.write_text(json.dumps({"step_times": SCRIPTED, "summary": summary}))
    shutdown()


if __name__ == "__main__":
    main()
