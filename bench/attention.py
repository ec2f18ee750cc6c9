"""Attention alone: one fused call for all maps vs a loop over maps; flash-attn vs SDPA."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.env import sync
from letngpt.config import ModelConfig
from letngpt.model.kernels import attend, flash_attn_func
from letngpt.model.model import LinearEnsembleAttention, apply_rope, rope_tables, unit


class LoopEnsembleAttention(nn.Module):
    """The same computation as a LinearEnsembleAttention, with its parameters, but one
    attention call per map: head h's map m attends with (q_hm, k_hm) over the shared v_h,
    and the M results are mixed afterwards. No v.repeat_interleave, M kernel launches."""

    def __init__(self, fused: LinearEnsembleAttention) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.fused
        B, T, _ = x.shape
        m, hd = a.num_maps, a.head_dim
        q = a.query(x).view(B, T, -1, hd)
        k = a.key(x).view(B, T, -1, hd)
        v = a.value(x).view(B, T, -1, hd)  # [B, T, heads, hd]
        if a.use_ngpt:  # normalise -> scale -> rotate, as the model does
            s_qk = a.s_qk().view(-1, hd)
            q, k = s_qk * unit(q), s_qk * unit(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.view(B, T, -1, m, hd), k.view(B, T, -1, m, hd)  # rows are laid out [head, map, hd]
        if m == 1:
            y = attend(q[:, :, :, 0], k[:, :, :, 0], v, scale=a.softmax_scale, backend=a.backend)
        else:
            w = a.ensemble_weights().to(v.dtype)
            y = None
            for i in range(m):
                yi = w[i] * attend(q[:, :, :, i], k[:, :, :, i], v, scale=a.softmax_scale, backend=a.backend)
                y = yi if y is None else y + yi
            y = a.head_norm(y)
        return a.proj(y.reshape(B, T, -1))


def build_attention(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    random_mix: bool = False) -> LinearEnsembleAttention:
    torch.manual_seed(seed)
    with torch.device(device):
        attn = LinearEnsembleAttention(cfg)
    if random_mix and cfg.num_maps > 1:  # away from the symmetric init, for equality tests
        with torch.no_grad():
            attn.ensemble_logits.normal_()
    return attn.to(device=device, dtype=dtype)


def attention_inputs(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [B, T, d] (requires grad), rope cos/sin, and a fixed upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, cfg.block_size, cfg.n_embd)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base, device)
    return x, cos, sin, grad


def _time_fwd_bwd(module: nn.Module, inputs, device: torch.device) -> float:
    x, cos, sin, grad = inputs
    x.grad = None
    module.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    module(x, cos, sin).backward(grad)
    sync(device)
    return time.perf_counter() - t0


def bench_attention(cfgs: Sequence[ModelConfig], batch_size: int, device: torch.device, dtype: torch.dtype, *,
                    reps: int = 20, warmup: int = 3) -> list[dict]:
    """Forward+backward of one attention module (projections included), fused vs per-map loop,
    alternating the two each repetition; plus the largest output difference between them."""
    rows = []
    for cfg in cfgs:
        fused = build_attention(cfg, device, dtype)
        loop = LoopEnsembleAttention(fused)
        inputs = attention_inputs(cfg, batch_size, device, dtype)
        x, cos, sin, _ = inputs
        with torch.no_grad():
            diff = (fused(x, cos, sin).float() - loop(x, cos, sin).float()).abs().max().item()
        for _ in range(warmup):
            _time_fwd_bwd(fused, inputs, device)
            _time_fwd_bwd(loop, inputs, device)
        tf, tl = [], []
        for i in range(reps):
            pair = ((fused, tf), (loop, tl)) if i % 2 == 0 else ((loop, tl), (fused, tf))
            for module, acc in pair:
                acc.append(_time_fwd_bwd(module, inputs, device))
        f_ms, l_ms = statistics.median(tf) * 1e3, statistics.median(tl) * 1e3
        rows.append({"maps": cfg.num_maps, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
                     "use_ngpt": cfg.use_ngpt, "batch_size": batch_size, "seq_len": cfg.block_size,
                     "fused_ms": f_ms, "loop_ms": l_ms, "loop_over_fused": l_ms / f_ms, "max_abs_diff": diff})
        del fused, loop, inputs
    return rows


FLASH_ABSENT = "flash-attn: not available"


def kernel_agreement(flash_fn: Callable, batch_size: int, seq_len: int, n_head: int, head_dim: int,
                     device: torch.device, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """Causal attention forward and backward from `flash_fn` (flash_attn_func's signature) and
    from PyTorch SDPA, both in `dtype`, each compared with an fp32 SDPA reference on the same
    inputs. They agree when flash's largest error is within twice SDPA's own (bf16) error,
    or within 1e-2 absolute; the raw errors are in the result either way."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len, n_head, head_dim)
    q, k, v, g = (torch.randn(shape, generator=gen).to(device) for _ in range(4))
    scale = 1.0 / math.sqrt(head_dim)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=scale)
        return o.transpose(1, 2)

    def outputs(fn, dt):
        ins = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(g.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in ins]

    ref = outputs(sdpa, torch.float32)
    low_sdpa = outputs(sdpa, dtype)
    low_flash = outputs(lambda a, b, c: flash_fn(a, b, c, softmax_scale=scale, causal=True), dtype)
    names = ("out", "dq", "dk", "dv")
    res: dict = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "tensors": {}}
    agree = True
    for name, r, s, fl in zip(names, ref, low_sdpa, low_flash, strict=True):
        e_s, e_f = (s - r).abs().max().item(), (fl - r).abs().max().item()
        e_fs = (fl - s).abs().max().item()
        ok = e_f <= max(2 * e_s, 1e-2)
        agree &= ok
        res["tensors"][name] = {"sdpa_err_vs_fp32": e_s, "flash_err_vs_fp32": e_f, "flash_vs_sdpa": e_fs, "ok": ok}
    res["agree"] = agree
    return res


def flash_vs_sdpa(cfgs: Sequence[ModelConfig], batch_size: int, device: torch.device, *,
                  reps: int = 10, warmup: int = 3, flash_fn: Callable | None = None) -> dict:
    """Where flash-attn is importable and a CUDA device is present: kernel-level agreement in bf16
    and attention-module fwd+bwd time with backend 'flash' vs 'sdpa'. Else a note saying so.
    `flash_fn` replaces flash_attn_func (tests use it to exercise the comparison on CPU)."""
    fn = flash_fn or flash_attn_func()
    if fn is None:
        return {"available": False, "note": FLASH_ABSENT}
    if device.type != "cuda" and flash_fn is None:
        return {"available": False, "note": FLASH_ABSENT + " (needs a CUDA device)"}
    out: dict = {"available": True, "agreement": [], "modules": []}
    for cfg in cfgs:
        out["agreement"].append(kernel_agreement(fn, batch_size, cfg.block_size, cfg.n_head * cfg.num_maps,
                                                 cfg.head_dim, device))
    if flash_fn is not None:  # a stand-in kernel cannot be selected through the model's backend switch
        return out
    for cfg in cfgs:
        module = build_attention(cfg, device, torch.bfloat16)
        inputs = attention_inputs(cfg, batch_size, device, torch.bfloat16)
        t = {"flash": [], "sdpa": []}
        for i in range(warmup + reps):
            for backend in (("flash", "sdpa") if i % 2 == 0 else ("sdpa", "flash")):
                module.backend = backend
                dt = _time_fwd_bwd(module, inputs, device)
                if i >= warmup:
                    t[backend].append(dt)
        fl, sd = statistics.median(t["flash"]) * 1e3, statistics.median(t["sdpa"]) * 1e3
        out["modules"].append({"maps": cfg.num_maps, "n_head": cfg.n_head, "seq_len": cfg.block_size,
                               "batch_size": batch_size, "flash_ms": fl, "sdpa_ms": sd, "sdpa_over_flash": sd / fl})
    return out
