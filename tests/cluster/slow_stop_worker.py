"""A stand-in for train.py whose "checkpoint" takes longer than torchrun's default 30 s
shutdown grace: on SIGUSR1 / SIGTERM it records the signal, saves for --save_seconds, then
exits 0; signals during its first --startup_seconds are ignored, as they are before train.py
installs its handlers. It takes train.py's command line and ignores what it does not need.

    LETNGPT_SCRIPT=tests/cluster/slow_stop_worker.py sbatch slurm/train_4k.sh --save_seconds=33

tests/test_slurm.py runs it through the whole chain (batch trap, srun, torchrun) and checks
that a USR1 sent during start-up is repeated by the launcher, and that every rank finishes
saving: torchrun must not SIGKILL a worker that is still checkpointing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    out, save_s = Path(opts["out_dir"]), float(opts.get("save_seconds", "33"))
    rank = os.environ.get("RANK", "?")
    out.mkdir(parents=True, exist_ok=True)
    # Like train.py, which installs its handlers only after imports, model and checkpoint
    # loading: a USR1 before that is ignored (the launcher starts torchrun with USR1 ignored).
    (out / f"starting.{rank}").write_text(str(os.getpid()))
    time.sleep(float(opts.get("startup_seconds", "0")))
    got: list[str] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
    (out / f"started.{rank}").write_text(f"{os.getpid()} {os.environ.get('SLURMD_NODENAME', '')}\n")
    print(f"rank {rank} waiting for a stop signal", flush=True)
    deadline = time.time() + 300
    while not got and time.time() < deadline:
        time.sleep(0.05)
    if not got:
        return 3
    print(f"rank {rank} got {got[0]}: saving for {save_s:.0f} s", flush=True)
    end = time.time() + save_s
    while time.time() < end:  # further signals must not cut the save short
        time.sleep(0.1)
    (out / f"saved.{rank}").write_text(",".join(got))
    print(f"rank {rank} saved; exit 0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
