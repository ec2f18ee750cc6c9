"""One run per out_dir: a lock file naming its holder (host, pid, SLURM job, start time).

Two launches on one out_dir would write the same checkpoints and metrics over each other. Rank 0
takes `out_dir/run.lock` exclusively before anything is written, and removes it at exit. A lock
left by a run that died is taken over with a warning when that can be known for sure: its pid is
dead on this host, or it belongs to this same SLURM job (a requeued job restarts with the job id
it had). A live pid whose process started at another time than the holder's is a reused pid:
the holder is gone too. Anything else (a live holder, a lock without readable contents) is refused
with a message naming the holder, how to check it and the exact command that removes the lock.
The lock is written whole or not at all (temp file + hard link), never empty.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import time
from pathlib import Path

from letngpt.errors import LockError
from letngpt.fsutil import free_space

log = logging.getLogger("letngpt")
LOCK_FILE = "run.lock"


def _process_start(pid: int) -> str | None:
    """A process's identity beyond its pid: this boot's id and the process's start time in clock
    ticks since boot (/proc/PID/stat field 22). A pid reused by another program gives another
    value; None where /proc cannot tell (not Linux, or the process is gone)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # the command name, in (), may hold spaces


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
    pid = holder.get("pid")
    if holder.get("host") != me["host"] or not isinstance(pid, int):
        return None
    if not _pid_alive(pid):
        return f"its process {pid} on this host is gone"
    started = holder.get("process_start")
    if started and _process_start(pid) not in (None, started):
        return f"its process {pid} on this host is gone (the pid now belongs to another program)"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def refusal(path: Path, holder: dict) -> str:
    """The one-line refusal: who holds the lock, how to check that it is gone, the exact command
    that removes it."""
    rm = f"rm {shlex.quote(str(path.resolve()))}"
    if not holder:
        return (f"{path} is empty or unreadable (written by an older letngpt, or cut short by a full disk), so "
                f"letngpt cannot tell whether a run still uses {path.parent}; if none does, remove it: {rm}")
    pid, host = holder.get("pid"), holder.get("host")
    check = f"`ps -o pid,lstart,args -p {pid}` on {host}"
    if holder.get("slurm_job_id"):
        check += f" or `squeue -j {holder['slurm_job_id']}`"
    return (f"{path.parent} is in use by another run ({describe(holder)}); wait for it or use another --out_dir. "
            f"If that run is gone (check with {check}: no letngpt process means gone), remove the lock: {rm}")


def _link_or_create(tmp: Path, path: Path) -> None:
    """Hard-link `tmp` to `path` (FileExistsError when it exists); on a file system without hard
    links, create `path` exclusively and copy the contents in (not atomic, the best there is)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(tmp.read_bytes())
        except OSError:
            path.unlink(missing_ok=True)
            raise


class OutDirLock:
    """Held by rank 0 for the whole run; `acquire` raises LockError when another run holds it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.me = _me()
        self.held = False

    def _create(self) -> bool:
        """Write the holder to a temp file, then hard-link it to run.lock (atomic, and it fails when
        the lock exists): the lock is whole or absent, never empty, even on a full disk."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            _link_or_create(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockError(f"cannot write {self.path} ({e.strerror or e}; {free_space(self.path.parent)} free "
                            f"there): free space in {self.path.parent} and launch again") from None
        finally:
            tmp.unlink(missing_ok=True)
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
            reason = stale_reason(holder, self.me) if holder else None
            if reason is None:
                raise LockError(refusal(self.path, holder))
            log.warning("taking over the stale lock %s (%s): %s", self.path, describe(holder), reason)
            self.path.unlink(missing_ok=True)
        raise LockError(f"could not take {self.path}: other launches keep racing for it")

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover by a requeued job leaves theirs alone)."""
        holder = self._read_holder()
        if self.held and (holder.get("pid"), holder.get("host")) == (self.me["pid"], self.me["host"]):
            self.path.unlink(missing_ok=True)
        self.held = False
