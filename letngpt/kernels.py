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
