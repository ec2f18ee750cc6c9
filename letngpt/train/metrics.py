"""Measurements for the log line (step time, memory, MFU, the model's learned scalars) and the
one writer that sends them to stdout, metrics.jsonl and MLflow."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch

from letngpt.config import ModelConfig
from letngpt.model.flops import flops_per_token, peak_tflops
from letngpt.parallel.distributed import all_reduce_

log = logging.getLogger("letngpt")


class StepTimer:
    """Wall time per optimizer step (synchronising CUDA so the number is real), with a
    running mean used to stop before a time limit."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self.mean = 0.0
        self.save_time = 0.0
        self._n = 0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - self._t0
        self._n += 1
        self.mean += (dt - self.mean) / self._n
        return dt


class Throughput:
    """tokens/s as means over many steps, never one step's figure.

    window(): the mean over the steps since the previous call (the logging window).
    overall(): the mean over this launch's steps after its first `warmup` (allocator growth,
    kernel autotuning, first-touch of data pages and DeepSpeed's first-step set-up make them
    slow at every start and resume); None when the launch ran no steps beyond those.
    Both are total tokens / total time, so slow steps weigh as much as they cost.
    """

    def __init__(self, tokens_per_step: int, warmup: int = 3) -> None:
        self.tokens_per_step, self.warmup = tokens_per_step, warmup
        self.steps = 0
        self._window_time, self._window_steps = 0.0, 0
        self._steady_time, self._steady_steps = 0.0, 0

    def add(self, step_time: float) -> None:
        self.steps += 1
        self._window_time += step_time
        self._window_steps += 1
        if self.steps > self.warmup:
            self._steady_time += step_time
            self._steady_steps += 1

    def window(self) -> tuple[float, float]:
        """(tokens/s, mean step time in s) over the window, which then starts afresh."""
        mean_step = self._window_time / max(self._window_steps, 1)
        self._window_time, self._window_steps = 0.0, 0
        return self.tokens_per_step / mean_step if mean_step > 0 else 0.0, mean_step

    def overall(self) -> float | None:
        if not self._steady_steps or self._steady_time <= 0:
            return None
        return self.tokens_per_step * self._steady_steps / self._steady_time


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_UNKNOWN_PEAKS: set[str] = set()  # GPU names already reported as missing from the peak table


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """--peak_tflops if given, else the table's dense bf16 peak for this GPU; None on CPU. A GPU the
    table does not know (H800, H20, a MIG slice) is said once per process (rank 0 only) rather than
    measured against a wrong peak."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    if peak is None and name not in _UNKNOWN_PEAKS:
        _UNKNOWN_PEAKS.add(name)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.warning("MFU: unknown peak for %s; pass --peak_tflops", name)
    return peak


def mfu(cfg: ModelConfig, tokens_per_s: float, world_size: int, device: torch.device,
        peak_override: float = 0.0) -> float | None:
    """Model FLOPs utilisation (causal attention counted as half: letngpt.model.flops), or None where the
    peak is unknown (CPU or an unlisted GPU without --peak_tflops)."""
    peak = device_peak_tflops(device, peak_override)
    if not peak:
        return None
    return flops_per_token(cfg) * tokens_per_s / (peak * 1e12 * world_size)


@torch.no_grad()
def plain_grad_norm(engine) -> float | None:
    """Global gradient norm where DeepSpeed keeps none (ZeRO 0 without mixed precision):
    the gradients sit, already all-reduced, on the module's parameters before the step."""
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    mpu = engine.mpu
    tp_rank = mpu.get_model_parallel_rank() if mpu else 0
    # Summed where the gradients are and all-reduced there: NCCL reduces GPU tensors only.
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for p in engine.module.parameters():
        # Under TP: shards count on every rank, replicated tensors once (on TP rank 0).
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            total += p.grad.detach().double().pow(2).sum()
    if mpu and mpu.get_model_parallel_world_size() > 1:
        total = all_reduce_(total, engine.device, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


@torch.no_grad()
def model_stats(engine) -> dict[str, float]:
    """Each layer's ensemble weights w_m and mean |alpha|, from the model's own methods (the
    forward pass uses the same ones). Collective at ZeRO 3, where each block's small vectors are
    gathered for the call (every rank calls it)."""
    import contextlib

    import deepspeed

    stats: dict[str, float] = {}
    for i, block in enumerate(engine.module.blocks):
        vectors = [p for p in block.parameters() if p.dim() < 2]
        partitioned = any(hasattr(p, "ds_id") for p in vectors)
        gather = deepspeed.zero.GatheredParameters(vectors) if partitioned else contextlib.nullcontext()
        with gather, torch.no_grad():
            if block.attn.num_maps > 1:
                for m, w in enumerate(block.attn.ensemble_weights().float().tolist()):
                    stats[f"ensemble/layer{i}/w{m}"] = w
            if hasattr(block, "attn_alpha"):
                for name in ("attn_alpha", "mlp_alpha"):
                    stats[f"{name}/layer{i}/mean_abs"] = float(getattr(block, name)().float().abs().mean())
    return stats


class MetricsWriter:
    """Where every number of a run goes, train and val alike: the log line (rank 0's stdout),
    `metrics.jsonl` (strict JSON, one record a line with its `kind`: train, val or model) and the
    tracking run. Readers (compare, tests, dashboards) read the file or MLflow, never stdout."""

    def __init__(self, path: Path | None, tracker) -> None:
        self.tracker = tracker
        self._file = open(path, "a") if path is not None else None

    def write(self, kind: str, step: int, metrics: dict[str, float | None], line: str | None = None) -> None:
        from letngpt.train.guard import finite_or_none

        if line is not None:
            log.info(line)
        clean = {k: finite_or_none(v) for k, v in metrics.items()}
        self.tracker.log_metrics({k: v for k, v in clean.items() if v is not None}, step)
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "kind": kind, **clean}, allow_nan=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: str | Path, kind: str = "train") -> list[dict]:
    """The complete records of one kind from a metrics.jsonl (a last line still being written is
    skipped; files from before records had a kind hold train records only)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    rows = [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
    return [r for r in rows if r.get("kind", "train") == kind]


def redone_on_resume(kind: str, step: int, resume_step: int) -> bool:
    """Whether a record belongs to the steps a launch resuming at `resume_step` logs again: train and
    model records after it, and val records at it too (evaluation at a step precedes the next step)."""
    return step > resume_step or (kind == "val" and step == resume_step)


def drop_redone_records(path: str | Path, resume_step: int) -> int:
    """Rewrite a metrics.jsonl (atomically) without the records a launch resuming at `resume_step`
    writes again, and without a torn last line, so every (kind, step) has one record. Returns how
    many records were dropped."""
    from letngpt.fsutil import atomic_write_text

    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().split("\n")
    complete = [line for line in lines[:-1] if line.strip()]  # a last piece without "\n" was torn by a kill
    kept = [line for line in complete
            if not redone_on_resume((row := json.loads(line)).get("kind", "train"), int(row["step"]), resume_step)]
    dropped = len(complete) - len(kept) + (1 if lines[-1].strip() else 0)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
