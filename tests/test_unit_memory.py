"""unit() in bf16 keeps no fp32 copy of its input for backward (issue 22, item 4), and computes
what it computed before within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from bench.activations import block_and_input, old_unit, saved_activation_bytes
from letngpt.config import ModelConfig
from letngpt.model import unit


def test_saved_bytes_instrument_counts_each_storage_once_and_no_parameters():
    lin = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.randn(4, 8, requires_grad=True)
    assert saved_activation_bytes(lambda: x * y) == 2 * 4 * 8 * 4  # mul saves both inputs
    assert saved_activation_bytes(lambda: (x * x.view(8, 4).view(4, 8))) == 4 * 8 * 4  # one storage
    assert saved_activation_bytes(lambda: lin(x), lin) == 4 * 8 * 4  # the weight is not counted


def ngpt_cfg(num_maps: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=64, num_maps=num_maps, use_ngpt=True)


@pytest.mark.parametrize("num_maps", [1, 3])
def test_bf16_block_saves_no_fp32_copies(num_maps):
    cfg, batch = ngpt_cfg(num_maps), 2
    block, h, cos, sin = block_and_input(cfg, batch, torch.bfloat16, torch.device("cpu"))
    after = saved_activation_bytes(lambda: block(h, cos, sin), block)
    with old_unit():
        before = saved_activation_bytes(lambda: block(h, cos, sin), block)
    # The old unit() kept one fp32 copy of each input it normalised: q and k ([B, T, H*M*hd]) and
    # h, the update and their mix for each of the two residual updates ([B, T, d]).
    tokens = batch * cfg.block_size
    fp32_copies = 4 * tokens * (2 * cfg.n_head * num_maps * cfg.head_dim + 6 * cfg.n_embd)
    assert before - after >= fp32_copies
    assert after < 0.8 * before


@pytest.mark.parametrize("num_maps", [1, 3])
def test_bf16_block_outputs_and_grads_match_the_old_unit(num_maps):
    cfg = ngpt_cfg(num_maps)
    results = []
    for old in (False, True):
        block, h, cos, sin = block_and_input(cfg, 2, torch.bfloat16, torch.device("cpu"))
        with old_unit() if old else torch.enable_grad():
            out = block(h, cos, sin)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach().float(), h.grad.float(), *(p.grad.float() for p in block.parameters())])
    for new, old in zip(*results, strict=True):
        scale = old.abs().max().clamp_min(1e-6)
        assert (new - old).abs().max() <= 2 ** -6 * scale  # a few bf16 ulps of the tensor's largest entry


def test_unit_matches_the_formula_in_fp64_and_keeps_dtype():
    x = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(unit(x, dim=0), x / x.pow(2).sum(0, keepdim=True).sqrt(), rtol=0, atol=1e-15)
    xb = torch.randn(3, 16).to(torch.bfloat16)
    assert unit(xb).dtype == torch.bfloat16
    norms = unit(xb).float().norm(dim=-1)
    assert (norms - 1).abs().max() < 2e-2  # bf16 rounding of each entry
    assert unit(torch.zeros(2, 4)).abs().max() == 0  # the clamp: no NaN for a zero row
