"""Every tensor collective in letngpt runs on the process group's device (issue 22, item 3).

NCCL reduces GPU tensors only: a CPU tensor handed to it is an error, while gloo (every test
here) accepts it silently. So the tests stand a "meta" device in for the GPU: the model, its
gradients and the engine's device are meta, a fake two-rank world records the tensor each
collective receives, and a tensor that was moved to the CPU on the way (or cannot leave it)
fails the test. A source audit keeps every all-reduce routed through letngpt.parallel.distributed.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT

from letngpt.config import ModelConfig
from letngpt.model import build_model
from letngpt.parallel import distributed
from letngpt.renorm import collective
from letngpt.train.metrics import plain_grad_norm

META = torch.device("meta")


class Handed(Exception):
    """Raised by the fake collective once it has recorded its tensor (meta holds no values)."""


@pytest.fixture
def seen(monkeypatch) -> list[tuple[torch.device, torch.dtype]]:
    """A fake world of two ranks whose all_reduce records (device, dtype) and stops the caller."""
    calls: list[tuple[torch.device, torch.dtype]] = []

    def all_reduce(t, op=None, group=None, async_op=False):
        calls.append((t.device, t.dtype))
        raise Handed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_plain_grad_norm_reduces_on_the_gradients_device(seen):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)).to(META)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    mpu = SimpleNamespace(get_model_parallel_rank=lambda: 0, get_model_parallel_world_size=lambda: 2,
                          get_model_parallel_group=lambda: None)
    engine = SimpleNamespace(module=model, mpu=mpu, device=META, zero_optimization_stage=lambda: 0,
                             bfloat16_enabled=lambda: False, fp16_enabled=lambda: False)
    with pytest.raises(Handed):
        plain_grad_norm(engine)
    assert seen == [(META, torch.float64)]  # NCCL reduces float64 on the GPU; never a CPU tensor


@pytest.mark.parametrize("call", [
    lambda: distributed.all_reduce_max(True, META),
    lambda: distributed.all_reduce_mean(1.5, META),
    lambda: distributed.all_reduce_sum(torch.zeros(2, dtype=torch.float64), META),
    lambda: collective._all_reduce_norms(torch.ones(3, device=META), None),
], ids=["max", "mean", "sum", "renorm_norms"])
def test_helpers_hand_the_collective_a_device_tensor(seen, call):
    with pytest.raises(Handed):
        call()
    assert len(seen) == 1 and seen[0][0] == META


def test_every_all_reduce_goes_through_the_helper():
    """The audit, kept: letngpt calls torch.distributed's all_reduce in one place only."""
    pattern = re.compile(r"\b(?:dist|torch\.distributed)\.all_reduce\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "letngpt").rglob("*.py"))
                 if path.name != "distributed.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
