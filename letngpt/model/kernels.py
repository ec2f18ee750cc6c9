"""Attention kernel dispatch: flash-attn where it can run, PyTorch SDPA everywhere else.

Kept out of model.py so the model reads as mathematics; this file is the only place that
knows which fused kernels exist.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def flash_attn_func():
    """flash-attn's function, or None when the package is not installed (CPU machines, CI)."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # ImportError, or a CUDA/ABI mismatch raising at import time
        return None
    return fn


@torch.compiler.assume_constant_result
def flash_available() -> bool:
    """Whether flash-attn imports, decided outside torch.compile's trace: an import failing inside
    a traced function is a graph break, which would split the compiled model at every attention."""
    return flash_attn_func() is not None


def flash_usable(q: torch.Tensor) -> bool:
    return flash_available() and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention on [batch, time, heads, head_dim] tensors (flash-attn's layout)."""
    if backend == "flash" and not flash_usable(q):
        raise RuntimeError("attn_backend='flash' needs flash-attn installed and CUDA bf16/fp16 tensors; "
                           "use attn_backend=auto or sdpa")
    if backend in ("auto", "flash") and flash_usable(q):
        return flash_attn_func()(q, k, v, softmax_scale=scale, causal=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return out.transpose(1, 2)


def flash_attn_version() -> str | None:
    """The installed flash-attn's version ("unknown" where the package does not say), or None."""
    if flash_attn_func() is None:
        return None
    import flash_attn

    return getattr(flash_attn, "__version__", "unknown")


def flash_compiles(version: str | None) -> bool:
    """flash-attn registers its kernels as torch custom ops from 2.7 on; before, torch.compile breaks the
    graph at every attention call."""
    try:
        major, minor = (int(part) for part in (version or "").split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 7)


def attention_choice(backend: str, device: torch.device, dtype: torch.dtype, compiling: bool = False) -> str:
    """One line for the start of a run: the attention kernel it will use and why. attn_backend=flash where
    flash-attn cannot run is refused here, before any weights are built, rather than at the first forward."""
    version = flash_attn_version()
    obstacles = [why for bad, why in ((version is None, "flash-attn is not installed"),
                                      (device.type != "cuda", f"the device is {device.type}, not CUDA"),
                                      (dtype not in (torch.bfloat16, torch.float16),
                                       f"the dtype is {str(dtype).removeprefix('torch.')}, not bf16/fp16"))
                 if bad]
    if backend == "flash" and obstacles:
        from letngpt.config import ConfigError

        raise ConfigError(f"attn_backend=flash cannot run: {'; '.join(obstacles)}; use attn_backend=auto or sdpa")
    if backend != "sdpa" and not obstacles:
        line = f"attention: flash-attn {version} (attn_backend={backend}; installed, CUDA, {dtype})"
        if compiling and not flash_compiles(version):
            line += f"; WARNING: flash-attn {version} < 2.7 breaks the compiled graph at every attention call"
        return line
    why = "attn_backend=sdpa" if backend == "sdpa" else "; ".join(obstacles)
    return (f"attention: PyTorch SDPA, not flash-attn ({why}); PyTorch picks SDPA's flash, memory-efficient or "
            f"math kernel per call")
