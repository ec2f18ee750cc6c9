"""Shared fixtures: a small byte-level dataset and launchers for real multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from letngpt.parallel.distributed import WORLD_ENV_VARS

# Tiny models run fastest on one thread, and a second process on the 2 cores (a worker rank,
# another job) makes a multi-threaded pool spin: one test took 300 s instead of 10 s that way.
# Subprocesses get OMP_NUM_THREADS=1 from subprocess_env below.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"

# A model small enough that a 2-rank DeepSpeed step takes milliseconds on CPU.
TINY = ["--vocab_size=256", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_interval=10", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=3e-3", "--lr_decay_iters=200", "--checkpoint_interval=1000", "--track_interval=5"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               TIKTOKEN_CACHE_DIR=os.environ.get("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken")))
    for key in (*WORLD_ENV_VARS, "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_train(args: list[str], *, nproc: int = 1, script: str = "train.py", timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` for one process, `torchrun --nproc_per_node N` for several."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """TINY's arguments on a dataset and out_dir, plus extras (later flags win)."""
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", *extra]


def start_train(args: list[str], *, nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    """`python train.py ARGS` (torchrun for nproc > 1) in the background, stdout and stderr together in
    one text pipe, or in the file `log` (nobody has to read it while the test waits). With a log
    file the trainer gets a process group of its own, so a test can kill all its ranks at once."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "train.py"), *args]
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


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


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare as raw bytes (vocab 256): learnable, and no 50k-wide lm_head to pay for."""
    from letngpt.data.prepare import write_dataset

    text = SHAKESPEARE.read_bytes()[:300_000]
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    n_train = int(len(tokens) * 0.9)
    out = tmp_path_factory.mktemp("bytes")
    meta = {"tokenizer": "bytes", "vocab_size": 256, "dtype": "uint16", "source": {"type": "test bytes"}}
    write_dataset(out, {"train": ([tokens[:n_train]], n_train), "val": ([tokens[n_train:]], len(tokens) - n_train)},
                  meta)
    return out


@pytest.fixture(scope="session")
def shakespeare_gpt2(tmp_path_factory) -> Path:
    """Tiny Shakespeare tokenised with the GPT-2 encoding, as the default run prepares it."""
    from letngpt.data.prepare import ensure_tinyshakespeare

    return ensure_tinyshakespeare(tmp_path_factory.mktemp("shakespeare") / "tinyshakespeare")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is a failed test: nothing may skip itself into green."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true, so this test must run, but it skipped: {reason}"
