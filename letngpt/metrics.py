"""Measurements for the log line: step time, memory, MFU, and the model's learned scalars."""

from __future__ import annotations

import resource
import time

import torch

from .config import ModelConfig
from .flops import flops_per_token, peak_tflops


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


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def mfu(cfg: ModelConfig, tokens_per_s: float, world_size: int, device: torch.device,
        peak_override: float = 0.0) -> float | None:
    """Model FLOPs utilisation, or None where the peak is unknown (CPU without --peak_tflops)."""
    peak = peak_override or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
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
    total = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        # Under TP: shards count on every rank, replicated tensors once (on TP rank 0).
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            total += p.grad.detach().double().pow(2).sum().cpu()
    if mpu and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


@torch.no_grad()
def model_stats(engine) -> dict[str, float]:
    """Each layer's ensemble weights and mean |alpha|, read from the fp32 masters.
    Collective under ZeRO (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p: torch.nn.Parameter) -> torch.Tensor:
        master = safe_get_full_fp32_param(p)
        return (master if master is not None else p).detach().float()

    stats: dict[str, float] = {}
    for i, block in enumerate(engine.module.blocks):
        attn = block.attn
        if attn.num_maps > 1:
            weights = torch.tanh(full(attn.ensemble_logits))  # w_m; the head norm removes any overall scale
            for m, w in enumerate(weights.tolist()):
                stats[f"ensemble/layer{i}/w{m}"] = w
        if hasattr(block, "attn_alpha"):
            for name in ("attn_alpha", "mlp_alpha"):
                vec = getattr(block, name)
                stats[f"{name}/layer{i}/mean_abs"] = float((full(vec.weight) * vec.multiplier).abs().mean())
    return stats
