"""Device, dtype and thread set-up for benchmarks, and the environment a result records."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from letngpt.model.kernels import flash_attn_func


def resolve_device(name: str = "auto") -> torch.device:
    """The trainer's device rule (letngpt.parallel.distributed.resolve_device), as a CLI error."""
    from letngpt.parallel.distributed import resolve_device as trainer_device

    try:
        return trainer_device(name, local_rank=0)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The trainer's dtype rule (letngpt.train.engine.resolve_dtype), with the short names bf16/fp32."""
    from letngpt.config import TrainConfig
    from letngpt.train.engine import resolve_dtype as trainer_dtype

    if name != "auto" and name not in DTYPE_NAMES:
        raise SystemExit(f"--dtype {name!r}: one of auto, {', '.join(DTYPE_NAMES)}")
    return trainer_dtype(TrainConfig(dtype=DTYPE_NAMES.get(name, "auto")), device)


def default_threads_affinity() -> int:
    """The CPUs this process may run on (affinity aware where the OS tells us)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else the CPUs this process may run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return default_threads_affinity()


def busy_warning(env: dict) -> str | None:
    """A warning when other work competes for the CPUs: timings then mostly measure the
    contention (OpenMP threads wait on descheduled peers), not the model."""
    load, cpus = env.get("loadavg_1m"), env.get("cpus") or 1
    if env.get("device", "").startswith("cpu") and load is not None and load > 0.75 * cpus:
        return (f"WARNING: 1-minute load average {load:.1f} on {cpus} CPUs before the run: other work competes "
                f"for the cores, so absolute times are unreliable (ratios less so); rerun on a quiet machine, "
                f"or with --threads 1")
    return None


def setup_threads(threads: int, device: torch.device) -> int:
    """CPU: torch.set_num_threads(threads or default_threads()), the same for every variant.
    GPU: left at torch's default (the host threads only launch kernels)."""
    if device.type == "cpu":
        torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    """What a reader of the JSON needs to reproduce or judge the numbers."""
    fa = flash_attn_func()
    flash_version = None
    if fa is not None:
        try:
            import flash_attn

            flash_version = getattr(flash_attn, "__version__", "unknown")
        except Exception:  # importable function but odd package: still record that it exists
            flash_version = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "cpus": default_threads_affinity(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "flash_attn": flash_version,
        "argv": sys.argv,
    }
