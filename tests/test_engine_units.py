"""Unit tests of the engine's small pieces, each against its formula: the learning-rate
schedule, the DeepSpeed config merge, the optimizer groups, the ZeRO-0 gradient norm and the
per-layer model statistics."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from letngpt.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from letngpt.model import build_model
from letngpt.parallel.layout import ParallelLayout, build_layout
from letngpt.train.engine import build_ds_config, param_groups
from letngpt.train.metrics import model_stats, plain_grad_norm
from letngpt.train.schedule import lr_at


def test_lr_schedule_warmup_cosine_floor():
    t = TrainConfig(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert lr_at(0, t) == pytest.approx(1e-2 * 1 / 11)  # linear warmup, never exactly 0
    assert lr_at(9, t) == pytest.approx(1e-2 * 10 / 11)
    assert lr_at(10, t) == pytest.approx(1e-2)  # the peak where the decay starts
    assert lr_at(60, t) == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-3)  # halfway
    assert lr_at(110, t) == lr_at(150, t) == 1e-3  # the floor after the decay
    no_warmup = TrainConfig(learning_rate=3e-3, warmup_iters=0, lr_decay_iters=100, max_iters=100)
    assert lr_at(0, no_warmup) == pytest.approx(3e-3)
    lrs = [lr_at(s, no_warmup) for s in range(100)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True)) and lrs[-1] > 0  # monotone to min_lr 0


def dp_layout(train: TrainConfig, dp: int) -> ParallelLayout:
    """The layout of `dp` data-parallel ranks (no TP needs no process group), as the trainer builds it."""
    return build_layout(RunConfig(train=train), world=dp, rank=0)


def test_ds_config_merge(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"},
                                "train_batch_size": 999}))
    t = TrainConfig(batch_size=4, gradient_accumulation_steps=8, grad_clip=0.5, ds_config=str(user), zero_stage=1)
    cfg = build_ds_config(t, dp_layout(t, 2), torch.bfloat16)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        4, 4, 4 * 4 * 2)  # the run's numbers win: accumulation is per rank, the total over 2 ranks
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True} and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the file's stage stays
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours: torch AdamW and lr_at
    three = TrainConfig(zero_stage=3, gradient_accumulation_steps=2)
    shipped = build_ds_config(three, dp_layout(three, 1), torch.float32)
    assert shipped["zero_optimization"]["stage"] == 3 and shipped["bf16"] == {"enabled": False}
    user.write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        build_ds_config(t, dp_layout(t, 2), torch.float32)
    with pytest.raises(ConfigError, match="no such file"):
        missing = TrainConfig(ds_config=str(tmp_path / "nope.json"))
        build_ds_config(missing, dp_layout(missing, 1), torch.float32)


def tiny_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def test_param_groups_decay_matrices_only():
    model = tiny_model(num_maps=3, use_ngpt=True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)


def fake_engine(model, stage: int = 0, bf16: bool = False):
    return SimpleNamespace(module=model, mpu=None, device=torch.device("cpu"), zero_optimization_stage=lambda: stage,
                           bfloat16_enabled=lambda: bf16, fp16_enabled=lambda: False)


def test_plain_grad_norm_is_the_global_l2_norm():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    assert plain_grad_norm(fake_engine(model)) == pytest.approx(expected, rel=1e-12)
    assert plain_grad_norm(fake_engine(model, stage=1)) is None  # DeepSpeed reports its own there
    assert plain_grad_norm(fake_engine(model, bf16=True)) is None


def test_model_stats_are_the_models_own_values():
    model = tiny_model(num_maps=3, use_ngpt=True)
    with torch.no_grad():
        model.blocks[1].attn.ensemble_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.blocks[0].mlp_alpha.weight.fill_(-0.02)
    stats = model_stats(fake_engine(model))
    assert [stats[f"ensemble/layer1/w{m}"] for m in range(3)] == pytest.approx([math.tanh(x) for x in (0.5, -1, 2)])
    multiplier = model.blocks[0].mlp_alpha.multiplier
    assert stats["mlp_alpha/layer0/mean_abs"] == pytest.approx(0.02 * multiplier)
    assert set(stats) == {f"{k}/layer{i}/{s}" for i in range(2) for k, s in
                          [("ensemble", "w0"), ("ensemble", "w1"), ("ensemble", "w2"),
                           ("attn_alpha", "mean_abs"), ("mlp_alpha", "mean_abs")]}
    gpt = model_stats(fake_engine(tiny_model(num_maps=1, use_ngpt=False)))
    assert gpt == {}  # plain attention, no alphas: nothing to log
