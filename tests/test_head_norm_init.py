"""The ensemble head norm's initial gain (ModelConfig.head_norm_init, issue 25).

LET-Transformer's per-head RMS norm sets every head's output to RMS `gain` at init, whatever its inputs;
a plain head's output is an average of value rows and starts much quieter. These tests pin down what the
gain does and does not change: LET-nGPT normalises each block's output after the projection, so a gain
shared by all heads cancels there and nothing about LET-nGPT depends on the setting.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import letngpt
from letngpt.config import ConfigError, ModelConfig, RunConfig, load_config_file
from letngpt.presets import get_config, list_configs


def cfg_for(use_ngpt: bool, num_maps: int = 3, **kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=4, n_head=4, n_embd=64, num_maps=num_maps, use_ngpt=use_ngpt)
    return ModelConfig(**{**base, **kw})


def logits_of(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("use_ngpt", [True, False])
def test_a_common_factor_on_every_head_norm_gain_cancels_in_letngpt_only(use_ngpt):
    """Multiply every head norm's gain (all layers, all dimensions) by one constant: LET-nGPT's logits do not
    move (its attention output is unit-normalised before the residual step), LET-Transformer's do."""
    torch.manual_seed(0)
    model = letngpt.build_model(cfg_for(use_ngpt)).double()
    with torch.no_grad():  # gains away from their init, different per layer and dimension
        for block in model.blocks:
            block.attn.head_norm.weight.uniform_(0.2, 1.5)
    idx = torch.randint(0, 97, (2, 32))
    before = logits_of(model, idx)
    for factor in (0.1, 3.7):
        scaled = letngpt.build_model(cfg_for(use_ngpt)).double()
        scaled.load_state_dict(model.state_dict())
        with torch.no_grad():
            for block in scaled.blocks:
                block.attn.head_norm.weight.mul_(factor)
        change = (logits_of(scaled, idx) - before).abs().max().item()
        if use_ngpt:
            assert change < 1e-9, (factor, change)
        else:
            assert change > 1e-3, (factor, change)


def test_difft_rule_is_the_diff_transformers_depth_schedule():
    """1 - lambda_init(l) with lambda_init(l) = 0.8 - 0.6 exp(-0.3 l), l = 0-based layer (Ye et al. 2024)."""
    model = letngpt.build_model(cfg_for(False, head_norm_init="difft", n_layer=6))
    expected = [0.2 + 0.6 * math.exp(-0.3 * layer) for layer in range(6)]  # 1 - (0.8 - 0.6 e^{-0.3 l})
    assert expected[0] == pytest.approx(0.8) and expected[1] == pytest.approx(0.6445, abs=1e-4)
    for layer, block in enumerate(model.blocks):
        weight = block.attn.head_norm.weight.detach()
        assert torch.allclose(weight, torch.full_like(weight, expected[layer]), atol=1e-7), layer


@pytest.mark.parametrize("setting, gain", [("0.1", 0.1), ("1", 1.0), ("0.35", 0.35)])
def test_a_number_is_every_layers_gain_and_the_head_output_rms(setting, gain):
    """The gain is exactly the RMS of each head's output per token at init (the norm sees to that)."""
    torch.manual_seed(0)
    cfg = cfg_for(False, head_norm_init=setting)
    model = letngpt.build_model(cfg)
    outputs = {}
    for layer, block in enumerate(model.blocks):
        assert torch.equal(block.attn.head_norm.weight.detach(), torch.full((cfg.head_dim,), gain))
        block.attn.proj.register_forward_pre_hook(lambda mod, args, layer=layer: outputs.__setitem__(layer, args[0]))
    logits_of(model, torch.randint(0, 97, (2, 32)))
    for y in outputs.values():
        rms = y.view(2, 32, cfg.n_head, cfg.head_dim).pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, gain), rtol=1e-4)


def test_letngpt_ignores_the_setting():
    """LET-nGPT starts at gain 1 whatever head_norm_init says: same weights, same logits."""
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    default = letngpt.build_model(cfg_for(True, head_norm_init="1"))
    torch.manual_seed(0)
    quiet = letngpt.build_model(cfg_for(True, head_norm_init="0.1"))
    for a, b in zip(default.state_dict().values(), quiet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(logits_of(default, idx), logits_of(quiet, idx))


def test_checkpoints_from_the_old_init_load_unchanged():
    """The gain was already a parameter: a state dict saved with gain 1 loads into a model built with
    another init and computes exactly what it computed before."""
    torch.manual_seed(0)
    old = letngpt.build_model(cfg_for(False, head_norm_init="1"))
    new = letngpt.build_model(cfg_for(False, head_norm_init="0.1"))
    new.load_state_dict(old.state_dict())
    idx = torch.randint(0, 97, (2, 32))
    assert torch.equal(logits_of(old, idx), logits_of(new, idx))


def test_every_lettransformer_preset_takes_the_measured_rule_at_its_depth():
    """The 1k/4k presets (24 layers, GPT-2 tokens) start their head norms by the rule swept on GPT-2 tokens
    (tiny, 4 layers), as does the unswept char_gpu recipe; char_LETTransformer takes its own sweep's best
    (test_compare checks both swept points); the LET-nGPT presets keep gain 1."""
    measured = get_config("tiny_LETTransformer").model
    names = [n for n in list_configs() if "LETTransformer" in n]
    assert {"LETTransformer_1kctx_10k_lr30e-4", "LETTransformer_4kctx_10k_lr30e-4", "char_LETTransformer"} <= set(names)
    for name in names:
        cfg = get_config(name).model
        if name != "char_LETTransformer":
            assert cfg.head_norm_init == measured.head_norm_init, name
    for name in (n for n in list_configs() if "LETNGPT" in n):
        cfg = get_config(name).model
        assert all(cfg.head_norm_gain(layer) == 1.0 for layer in range(cfg.n_layer)), name


@pytest.mark.parametrize("bad", ["0", "-0.5", "nan", "inf", "loud", ""])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="head_norm_init") as err:
        cfg_for(False, head_norm_init=bad)
    assert "\n" not in str(err.value)


def test_config_files_take_a_number_or_a_rule(tmp_path):
    """A JSON/YAML number means the number; run_config.json round-trips either form."""
    for value, expected in ((0.1, "0.1"), ("difft", "difft"), (2, "2")):
        path = tmp_path / "run.json"
        path.write_text(json.dumps({"model": {"head_norm_init": value}}))
        run = load_config_file(path)
        assert run.model.head_norm_init == expected
        assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))).model.head_norm_init == expected
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("model:\n  head_norm_init: 0.25\n")
    assert load_config_file(yaml_path).model.head_norm_init == "0.25"


def mean_sum_of_squared_softmax(context: int, samples: int, generator: torch.Generator) -> float:
    """(1/T) sum_t E[sum_j p_tj^2] for p_t = softmax of t+1 i.i.d. N(0, 1) scores: the mean square of a causal
    head's output per coordinate when its value rows are independent with unit mean square."""
    total = 0.0
    for t in range(context):
        p = torch.randn(samples, t + 1, generator=generator, dtype=torch.float64).softmax(-1)
        total += p.pow(2).sum(-1).mean().item()
    return total / context


def test_a_plain_heads_output_rms_at_init_follows_the_derivation():
    """Why the gain should start well below 1. In the pre-norm GPT, layer 0's attention input has RMS 1 per
    token and q, k, v = x W with W ~ N(0, 1/d): q and k entries have unit variance, so a score q.k/sqrt(hd) is
    ~N(0, 1), and v rows of distinct tokens are independent with unit mean square. A plain head's output
    y_t = sum_j p_tj v_j then has mean square E[sum_j p_tj^2]: about 0.28^2 over a 128-token context
    (1/sqrt(T) scaling; uniform attention would give sqrt(H_T / T) = 0.21), where an ensemble head starts
    at RMS `gain` exactly."""
    torch.manual_seed(0)
    T, batch = 128, 16
    cfg = ModelConfig(vocab_size=4096, block_size=T, n_layer=1, n_head=4, n_embd=128, num_maps=1, use_ngpt=False)
    model = letngpt.build_model(cfg)
    captured = {}
    model.blocks[0].attn.proj.register_forward_pre_hook(lambda mod, args: captured.__setitem__("y", args[0]))
    idx = torch.stack([torch.randperm(cfg.vocab_size)[:T] for _ in range(batch)])  # distinct tokens per sequence
    logits_of(model, idx)
    measured = captured["y"].pow(2).mean().sqrt().item()
    predicted = math.sqrt(mean_sum_of_squared_softmax(T, 400, torch.Generator().manual_seed(0)))
    assert 0.25 < predicted < 0.31
    assert measured == pytest.approx(predicted, rel=0.1)
