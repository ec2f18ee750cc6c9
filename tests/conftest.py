"""Fixtures (the datasets) and hooks; everything else the tests share is in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHAKESPEARE

# Tiny models run fastest on one thread, and a second process on the 2 cores (a worker rank,
# another job) makes a multi-threaded pool spin: one test took 300 s instead of 10 s that way.
# Subprocesses get OMP_NUM_THREADS=1 from helpers.subprocess_env.
torch.set_num_threads(1)


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
