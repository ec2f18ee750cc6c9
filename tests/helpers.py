"""What the tests share besides fixtures: paths, the tiny model's flags, the project's subprocess
environment, one way to launch a script on N processes, and readers of a run's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from letngpt.parallel.distributed import WORLD_ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"

# A model small enough that a 2-rank DeepSpeed step takes milliseconds on CPU.
TINY = ["--vocab_size=256", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_interval=10", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=3e-3", "--lr_decay_iters=200", "--checkpoint_interval=1000", "--track_interval=5"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child: one thread (a second process on 2 cores makes a thread pool
    spin), this checkout's code, the shared tokenizer cache, and no world or tracking server
    inherited from the test process."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               TIKTOKEN_CACHE_DIR=os.environ.get("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken")))
    for key in (*WORLD_ENV_VARS, "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def launch(script: str, nproc: int = 1, args: Sequence[str] = (), *, env: dict | None = None,
           **popen: object) -> subprocess.Popen:
    """Start `script` (relative to the repository root) on `nproc` processes: the plain interpreter
    for one, `torchrun --standalone` (gloo on CPU) for several; in the root, with `env` (default:
    subprocess_env()). Keyword arguments go to Popen (pipes, start_new_session...)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*launcher, str(ROOT / script), *args], cwd=ROOT, env=env or subprocess_env(), **popen)


def run_train(args: list[str], *, nproc: int = 1, script: str = "train.py", timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`launch` to the end, as subprocess.run would: output captured, the launcher killed after `timeout`."""
    proc = launch(script, nproc, args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """TINY's arguments on a dataset and out_dir, plus extras (later flags win)."""
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", *extra]


def start_train(args: list[str], *, nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    """`train.py ARGS` launched in the background, stdout and stderr together in one text pipe, or in
    the file `log` (nobody has to read it while the test waits). With a log file the trainer gets a
    process group of its own, so a test can kill all its ranks at once."""
    if log is None:
        return launch("train.py", nproc, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as f:
        return launch("train.py", nproc, args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def last_step(out: Path) -> int:
    """The highest step in a running trainer's metrics.jsonl (complete lines only; 0 before any)."""
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    lines = metrics.read_text().split("\n")[:-1]  # the last piece may be a line still being written
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120,
                  logs: Callable[[], str] | None = None) -> None:
    """Block until a running trainer has logged `step` to metrics.jsonl. Fails (with `logs()`, else the
    trainer's piped stdout) when the trainer exits first or `timeout` seconds pass."""
    def output() -> str:
        if logs is not None:
            return logs()
        return proc.stdout.read()[-3000:] if proc.stdout is not None else ""

    deadline = time.monotonic() + timeout
    while last_step(out) < step:
        if proc.poll() is not None:
            pytest.fail(f"trainer exited with {proc.returncode} before step {step}\n{output()}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"no step {step} within {timeout:.0f} s\n{output()}", pytrace=False)
        time.sleep(0.1)


def require(unavailable: str | None, what: str) -> None:
    """Skip a test whose machine lacks a system piece (SLURM, PostgreSQL, a tool): `unavailable` says
    why, None means present. Under CI=true it fails instead: CI installs them, so absence is a bug."""
    if unavailable is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true, so {what} must run, but: {unavailable}", pytrace=False)
    pytest.skip(unavailable)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def read_metrics(out_dir: Path, kind: str = "train") -> list[dict]:
    """The run's metrics.jsonl records of one kind (train, val or model), each line strict JSON."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]
