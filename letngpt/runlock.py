"""One run per out_dir: a lock file naming its holder (host, pid, SLURM job, start time).

Two launches on one out_dir would write the same checkpoints and metrics over each other. Rank 0
takes `out_dir/run.lock` with O_EXCL before anything is written, and removes it at exit. A lock
left by a run that died is taken over with a warning when that can be known for sure: its pid is
dead on this host, or it belongs to this same SLURM job (a requeued job restarts with the job id
it had). Anything else is refused with a message naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import LockError

log = logging.getLogger("letngpt")
LOCK_FILE = "run.lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why the holder's lock may be taken over, or None when it must be respected."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it belongs to this SLURM job ({me['slurm_job_id']}), requeued"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class OutDirLock:
    """Held by rank 0 for the whole run; `acquire` raises LockError when another run holds it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.me = _me()
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        for _ in range(3):  # a race with another taker: at most a couple of rounds
            if self._create():
                self.held = True
                return
            holder = self._read_holder()
            reason = stale_reason(holder, self.me)
            if reason is None:
                raise LockError(f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it, "
                                f"use another --out_dir, or delete {self.path} if that run is surely gone")
            log.warning("taking over the stale lock %s (%s): %s", self.path, describe(holder), reason)
            self.path.unlink(missing_ok=True)
        raise LockError(f"could not take {self.path}: other launches keep racing for it")

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover by a requeued job leaves theirs alone)."""
        holder = self._read_holder()
        if self.held and (holder.get("pid"), holder.get("host")) == (self.me["pid"], self.me["host"]):
            self.path.unlink(missing_ok=True)
        self.held = False
