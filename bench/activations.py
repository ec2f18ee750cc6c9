"""Bytes autograd saves for backward per block, with unit() as it is and as it was (issue 22, item 4).

    python -m bench.activations                                 # 1k-like block (d 1024), T 1024, bf16, CPU
    python -m bench.activations --n_embd 256 --block_size 256 --out out/bench/activations.json

Before, `unit()` took the norm of an fp32 copy of its bf16 input, and autograd kept that copy for
backward: 4 bytes per element for each of the 8 tensors an nGPT block normalises (q, k, and per
residual update h, the update and their mix). Now the norm accumulates in fp32 inside the kernel
and nothing but the bf16 input and the [..., 1] norm is kept. The count is exact, not a memory
probe: every tensor autograd saves is seen by `torch.autograd.graph.saved_tensors_hooks`, and each
storage is counted once (views and tensors saved twice share one) and parameters not at all.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn as nn

from bench.output import format_table, write_json
from letngpt.config import ModelConfig
from letngpt.model import model as model_lib


def unit_with_fp32_copy(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """unit() before issue 22: the norm of an fp32 copy of x (the copy autograd keeps)."""
    return x / x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=dim, keepdim=True).clamp_min(eps).to(x.dtype)


@contextlib.contextmanager
def old_unit() -> Iterator[None]:
    """Run the model with the pre-issue-22 unit() (the module global every call site uses)."""
    with mock.patch.object(model_lib, "unit", unit_with_fp32_copy):
        yield


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs its forward (parameters
    excluded: they exist whether or not backward will need them)."""
    skip = {p.untyped_storage().data_ptr() for p in params.parameters()} if params is not None else set()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # kept alive until counted, so no saved storage is freed and its address reused
    total = sum(storages.values())
    del out
    return total


def block_and_input(cfg: ModelConfig, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """One Block of `cfg` in `dtype`, a unit-norm input [batch, T, d] and the RoPE tables."""
    torch.manual_seed(seed)
    block = model_lib.Block(cfg).to(device=device, dtype=dtype)
    h = model_lib.unit(torch.randn(batch, cfg.block_size, cfg.n_embd, device=device)).to(dtype).requires_grad_()
    cos, sin = model_lib.rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base, device)
    return block, h, cos, sin


def fp32_copy_bytes(cfg: ModelConfig, batch: int) -> int:
    """What the old unit() kept in fp32 per nGPT block: q and k (every map), and 3 tensors of
    [B, T, d] per residual update (h, the update, their mix)."""
    tokens = batch * cfg.block_size
    return 4 * tokens * (2 * cfg.n_head * cfg.num_maps * cfg.head_dim + 6 * cfg.n_embd) if cfg.use_ngpt else 0


def measure(cfg: ModelConfig, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    block, h, cos, sin = block_and_input(cfg, batch, dtype, device)
    after = saved_activation_bytes(lambda: block(h, cos, sin), block)
    with old_unit():
        before = saved_activation_bytes(lambda: block(h, cos, sin), block)
    return {"before_bytes": before, "after_bytes": after, "saved_fraction": 1 - after / before,
            "fp32_copies_bytes": fp32_copy_bytes(cfg, batch)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--let_n_head", type=int, default=8)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    dtype, device = getattr(torch, a.dtype), torch.device(a.device)
    variants = {"GPT": dict(use_ngpt=False, num_maps=1, n_head=a.n_head),
                "nGPT": dict(use_ngpt=True, num_maps=1, n_head=a.n_head),
                "LET-nGPT M=3": dict(use_ngpt=True, num_maps=3, n_head=a.let_n_head)}
    results = []
    for name, kw in variants.items():
        cfg = ModelConfig(vocab_size=256, block_size=a.block_size, n_layer=1, n_embd=a.n_embd, **kw)
        results.append({"variant": name, **measure(cfg, a.batch_size, dtype, device)})
    mb = 2 ** 20
    print(f"\nsaved activations per block, {a.dtype}, batch {a.batch_size} x T {a.block_size}, d {a.n_embd}, "
          f"{device}\n")
    print(format_table(("variant", "before MiB", "after MiB", "saved", "old fp32 copies MiB"),
                       [(r["variant"], f"{r['before_bytes'] / mb:.1f}", f"{r['after_bytes'] / mb:.1f}",
                         f"{r['saved_fraction']:.1%}", f"{r['fp32_copies_bytes'] / mb:.1f}") for r in results]))
    if a.out:
        write_json(a.out, {"args": vars(a), "results": results})
    return results


if __name__ == "__main__":
    main()
