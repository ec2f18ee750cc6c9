"""The SLURM launcher of letngpt.compare: every run of a sweep is one `sbatch slurm/launch.sh` job.

slurm/launch.sh is the project's tested path (multi-node torchrun rendezvous, the USR1 -> checkpoint ->
requeue chain before the time limit), so a sweep's run survives preemption and the time limit exactly as a
hand-submitted job does. SLURM is the scheduler; this module only submits, and reads the state back:

- a run's folder holds `slurm.json`: its flags (the run's identity) and every job id submitted for it;
- a run is FINISHED when its summary.json says max_iters (then it is reused like a local run), QUEUED or
  RUNNING while squeue lists its last job in a state that is not terminal (a requeued job keeps its id);
- otherwise its last job ended without finishing: it is resubmitted (resuming from its last complete
  checkpoint: launch.sh passes --init_from=auto) until it has had 1 + max_retries jobs, then reported
  failed with its log's tail.

Nothing is ever submitted for a run that is finished, queued or running, so the same command can be run
again at any time: it collects what finished, resubmits what failed and submits the next stage.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from letngpt.compare.curves import Result
from letngpt.compare.sweep import NOT_RUN, Spec
from letngpt.config import ConfigError
from letngpt.fsutil import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "slurm" / "launch.sh"
RECORD = "slurm.json"
# Job states after which a job never runs again (squeue -t all); any other state counts as queued/running.
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
            "OUT_OF_MEMORY", "REVOKED"}
# What every job needs from sbatch for launch.sh's contract: one task per node, USR1 before the time limit,
# requeueable, and one log per run folder appended across requeues and retries. --sbatch_args come after.
BASE_OPTIONS = ["--ntasks-per-node=1", "--signal=B:USR1@600", "--requeue", "--open-mode=append"]


class SlurmError(ConfigError):
    """sbatch or squeue missing or refusing: one line, exit code 2."""


def one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "(no message)"


def parse_sbatch_args(values: Sequence[str], presets: Sequence[str]) -> dict[str, list[str]]:
    """`--sbatch_args "ARGS"` for every job, `--sbatch_args PRESET="ARGS"` for that preset's jobs only (after
    the common ones, so they win: sbatch takes an option's last occurrence). Returns preset -> options."""
    common: list[str] = []
    own: dict[str, list[str]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        try:
            if sep and not name.startswith("-") and " " not in name:
                if name not in presets:
                    raise ConfigError(f"--sbatch_args {name}=...: {name!r} is not one of --presets")
                own.setdefault(name, []).extend(shlex.split(rest))
            else:
                common.extend(shlex.split(value))
        except ValueError as e:
            raise ConfigError(f"--sbatch_args {value!r}: {e}") from None
    return {p: common + own.get(p, []) for p in presets}


def require_slurm() -> None:
    """sbatch and squeue on PATH, or a one-line SlurmError."""
    missing = [tool for tool in ("sbatch", "squeue") if shutil.which(tool) is None]
    if missing:
        raise SlurmError(f"--launcher slurm: {' and '.join(missing)} not found on PATH (run on a SLURM login node)")


@dataclass
class Submission:
    """One run as a job: its folder, identity (the flags compare reuses runs by), train.py flags and the
    fingerprint of the model code it trains with."""

    spec: Spec
    run_dir: Path
    key: str
    train_args: list[str]
    label: str
    code: str

    def pending(self) -> Result:
        return Result(preset=self.spec.preset, lr=self.spec.lr, seed=self.spec.seed, budget=self.spec.steps,
                      error=NOT_RUN)


def read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


class SlurmLauncher:
    """Submits and tracks the runs of a sweep; `run(subs)` is one pass (letngpt.compare.runner.sweep polls)."""

    def __init__(self, submission: Callable[[Spec], Submission], options: dict[str, list[str]], env: dict[str, str],
                 *, max_retries: int, wait: bool, poll_s: float, finished: Callable[[Submission], Result | None],
                 same_run: Callable[[str, str], bool], dry_run: bool = False, report_only: bool = False):
        """`submission`: a Spec as a job; `finished`: the Result of a finished run in its folder, else None;
        `same_run`: whether two run keys name the same run; `options`: sbatch options per preset; dry_run:
        print the sbatch lines instead; report_only: submit nothing, say nothing."""
        self.submission, self.options, self.env, self.max_retries = submission, options, env, max_retries
        self.wait, self.poll_s, self.dry_run, self.report_only = wait, poll_s, dry_run, report_only
        self.finished, self.same_run = finished, same_run
        self.submitted: list[str] = []  # job ids submitted by this invocation
        self._said: dict[str, str] = {}  # run name -> last status printed (print changes only)

    def command(self, sub: Submission) -> list[str]:
        return ["sbatch", "--parsable", f"--job-name=letngpt-{sub.spec.name}",
                f"--output={sub.run_dir / 'stdout.log'}", *BASE_OPTIONS, *self.options[sub.spec.preset],
                str(LAUNCH), *sub.train_args]

    def check(self, presets: Sequence[str]) -> None:
        """`sbatch --test-only` with each preset's options: a rejection stops the sweep before any job is
        submitted, with sbatch's own message."""
        for preset in dict.fromkeys(tuple(self.options[p]) for p in presets):
            cmd = ["sbatch", "--test-only", *BASE_OPTIONS, *preset, str(LAUNCH)]
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise SlurmError(f"sbatch rejects {shlex.join(preset) or 'the default options'}: "
                                 f"{one_line(proc.stderr or proc.stdout)}")

    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """job id -> SLURM state for the jobs SLURM still knows (finished ones age out after MinJobAge)."""
        if not job_ids:
            return {}
        cmd = ["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(dict.fromkeys(job_ids))]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # none of them known any more: all ended
                return {}
            raise SlurmError(f"squeue failed ({one_line(proc.stderr)}): not submitting anything")
        return dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)

    def launch(self, specs: Sequence[Spec]) -> list[Result]:
        """One pass: a finished run's Result, a failed run's error, and NOT_RUN for what is queued, running
        or just submitted."""
        subs = [self.submission(spec) for spec in specs]
        records = {sub.spec.name: read_record(sub.run_dir) for sub in subs}
        states = self.states([r["jobs"][-1] for r in records.values() if r and r.get("jobs")])
        return [self._step(sub, records[sub.spec.name], states) for sub in subs]

    def _say(self, sub: Submission, status: str, text: str) -> None:
        if self._said.get(sub.spec.name) != status:
            self._said[sub.spec.name] = status
            print(text, flush=True)

    def _step(self, sub: Submission, record: dict | None, states: dict[str, str]) -> Result:
        done = self.finished(sub)
        if done is not None:
            return done
        jobs = list(record.get("jobs", [])) if record else []
        state = states.get(jobs[-1], "") if jobs else ""
        if jobs and state and state not in TERMINAL:
            if not self.same_run(record.get("key", ""), sub.key):
                self._say(sub, "other", f"warning: {sub.run_dir} holds job {jobs[-1]} ({state}) with other flags; "
                                        "waiting for it to end (scancel it to go on now)")
            else:
                self._say(sub, state, f"{state.lower()}: {sub.label} (job {jobs[-1]})")
            return sub.pending()
        if record and not self.same_run(record.get("key", ""), sub.key):
            jobs = []  # another run's folder (other flags): starts over
        if len(jobs) > self.max_retries:
            result = sub.pending()
            log = sub.run_dir / "stdout.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no log)"
            result.error = (f"SLURM job(s) {', '.join(jobs)} ended without finishing (last: "
                            f"{state or 'no longer known to SLURM'}); {len(jobs)} attempts, --max_retries "
                            f"{self.max_retries}; log {log}:\n{tail}")
            return result
        if self.report_only:
            return sub.pending()
        if jobs:
            self._say(sub, "retry", f"job {jobs[-1]} of {sub.label} ended ({state or 'gone from squeue'}) without "
                                    f"finishing: resubmitting (retry {len(jobs)} of {self.max_retries})")
        self.submit(sub, jobs)
        return sub.pending()

    def submit(self, sub: Submission, jobs: list[str]) -> None:
        """sbatch one run; a fresh run (no earlier job) starts in an empty folder, a retry keeps its checkpoints."""
        cmd = self.command(sub)
        if self.dry_run:
            extra = {k: v for k, v in self.env.items() if os.environ.get(k) != v}
            print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(extra.items())), shlex.join(cmd)]))
            return
        if not jobs and sub.run_dir.exists():
            shutil.rmtree(sub.run_dir)
        sub.run_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch refused {sub.label}: {one_line(proc.stderr or proc.stdout)}")
        job = proc.stdout.strip().split(";")[0]
        record = {"key": sub.key, "code": sub.code, "jobs": [*jobs, job], "command": shlex.join(cmd)}
        # Whole or not at all: a torn record would read as "never submitted" and resubmit a running job.
        atomic_write_text(sub.run_dir / RECORD, json.dumps(record, indent=2) + "\n")
        self.submitted.append(job)
        self._say(sub, "submitted", f"submitted job {job}: {sub.label} (log: {sub.run_dir / 'stdout.log'})")
