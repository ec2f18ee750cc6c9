"""Peak memory per variant, each measured alone in a fresh process (python -m bench.memprobe)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.env import sync
from bench.steps import StepRunner
from letngpt.config import ModelConfig
from letngpt.parallel.distributed import WORLD_ENV_VARS

ROOT = Path(__file__).resolve().parents[1]


def proc_status_mb(field: str) -> float | None:
    """VmRSS / VmHWM (peak RSS) of this process in MiB, from /proc/self/status (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return None


def probe_memory(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 steps: int = 2, checkpointing: bool = False) -> dict:
    """Build one variant and run `steps` training steps in THIS process; report peak memory.
    Meant for a fresh process (bench.memprobe): the numbers include nothing else."""
    out: dict = {"kind": "cuda max_memory_allocated" if device.type == "cuda"
                 else "CPU peak RSS (VmHWM) growth over RSS after imports and a throwaway micro step"}
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Start the runtime first (thread pools, allocator, autograd engine: ~tens of MB that any
        # model would pay) with a throwaway micro model, so the growth below is the variant's own.
        warm = StepRunner("warm", ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=32),
                          1, device, dtype)
        warm.step()
        del warm
    base = proc_status_mb("VmRSS")
    runner = StepRunner("probe", cfg, batch_size, device, dtype, checkpointing=checkpointing)
    for _ in range(steps):
        runner.step()
    sync(device)
    hwm = proc_status_mb("VmHWM")
    out.update(base_rss_mb=base, peak_rss_mb=hwm,
               rss_growth_mb=None if base is None or hwm is None else hwm - base)
    if device.type == "cuda":
        out.update(peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                   peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
        out["peak_mb"] = out["peak_allocated_mb"]
    else:
        out["peak_mb"] = out["rss_growth_mb"]
    return out


def subprocess_env(threads: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WORLD_ENV_VARS}  # a world of its own
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def memory_in_subprocess(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype, *,
                         steps: int = 2, threads: int | None = None, timeout: float = 600,
                         checkpointing: bool = False) -> dict:
    """probe_memory in a fresh `python -m bench.memprobe` process; {'error': ...} if it fails."""
    request = {"config": dataclasses.asdict(cfg), "batch_size": batch_size, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "steps": steps, "threads": threads,
               "checkpointing": checkpointing}
    cmd = [sys.executable, "-m", "bench.memprobe", json.dumps(request)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"memory probe exited {proc.returncode}: {' | '.join(tail)[-400:]}"}
    return json.loads(lines[-1])
