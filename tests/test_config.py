"""Configuration: validation messages, presets, and the original launchers' command lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import letngpt
from letngpt.cli import parse
from letngpt.config import ConfigError, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

PRESETS = [
    "GPT_1kctx_10k_lr30e-4", "nGPT_1kctx_10k_lr30e-4", "GPT_4kctx_10k_lr30e-4", "nGPT_4kctx_10k_lr30e-4",
    "LETNGPT_1kctx_10k_lr30e-4", "LETNGPT_4kctx_10k_lr30e-4", "LETNGPT_1kctx_10k_lr30e-4_maps5",
    "LETTransformer_1kctx_10k_lr30e-4", "LETTransformer_4kctx_10k_lr30e-4",
]


def test_bad_fields_name_themselves():
    with pytest.raises(ConfigError, match=r"^n_embd \(1000\) must be divisible by n_head \(16\)$"):
        ModelConfig(n_embd=1000, n_head=16)
    with pytest.raises(ConfigError, match="num_maps"):
        ModelConfig(num_maps=0)
    with pytest.raises(ConfigError, match="attn_backend"):
        ModelConfig(attn_backend="triton")
    with pytest.raises(ConfigError, match="zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(learning_rate=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig(init_from="gpt2")


def test_all_named_presets_exist_with_their_recipes():
    names = letngpt.list_configs()
    for name in PRESETS:
        assert name in names
        run = letngpt.get_config(name)
        m, t = run.model, run.train
        assert (m.n_layer, m.n_embd, m.vocab_size) == (24, 1024, 50304)
        assert t.learning_rate == 30e-4 and t.min_lr == 0 and t.lr_decay_iters == 10000 == t.max_iters
        assert (t.beta1, t.beta2, t.grad_clip) == (0.9, 0.95, 1.0)
        ctx = 1024 if "_1kctx" in name else 4096
        assert m.block_size == ctx
        assert (t.batch_size, t.gradient_accumulation_steps) == ((8, 64) if ctx == 1024 else (2, 256))
        if name.startswith(("nGPT", "LETNGPT")):
            assert m.use_ngpt and t.weight_decay == 0 and t.warmup_iters == 0
        else:
            assert not m.use_ngpt and t.weight_decay == 0.1 and t.warmup_iters == 2000
        if name.startswith("LET"):
            assert m.n_head == 8 and m.num_maps == (5 if name.endswith("maps5") else 3)
        else:
            assert m.n_head == 16 and m.num_maps == 1
    for variant in ("GPT", "nGPT", "LETNGPT", "LETTransformer"):
        assert f"tiny_{variant}" in names


def test_get_config_returns_independent_copies():
    a = letngpt.get_config("tiny_GPT")
    a.model.n_layer = 99
    assert letngpt.get_config("tiny_GPT").model.n_layer != 99
    with pytest.raises(ConfigError, match="unknown config"):
        letngpt.get_config("nope")


# The original nGPT / LET-nGPT launcher lines, verbatim apart from shell variables.
LAUNCHER_LINES = {
    "GPT_1kctx_10k_lr30e-4": "--init_from='scratch' --use_nGPT=0 --learning_rate=30e-4 --weight_decay=0.1 "
    "--warmup_iters=2000 --n_layer=24 --n_head=16 --n_embd=1024 --block_size=1024 --compile=False "
    "--batch_size=8 --gradient_accumulation_steps=64 --eval_iters=1000 --max_iters=10000 "
    "--lr_decay_iters=10000 --time_limit_seconds=103700 --max_iters_per_launch=14000",
    "nGPT_4kctx_10k_lr30e-4": "--init_from='scratch' --use_nGPT=1 --learning_rate=30e-4 --weight_decay=0.0 "
    "--warmup_iters=0 --n_layer=24 --n_head=16 --n_embd=1024 --block_size=4096 --compile=False "
    "--batch_size=2 --gradient_accumulation_steps=256 --eval_iters=1000 --max_iters=10000 "
    "--lr_decay_iters=10000 --time_limit_seconds=103700 --max_iters_per_launch=14000",
    "LETNGPT_1kctx_10k_lr30e-4": "--init_from=scratch --use_ngpt=1 --learning_rate=30e-4 --weight_decay=0.0 "
    "--warmup_iters=0 --n_layer=24 --n_head=8 --n_embd=1024 --num_maps=3 --block_size=1024 --compile=False "
    "--batch_size=8 --gradient_accumulation_steps=64 --eval_iters=1000 --max_iters=10000 --min_lr=0.0 "
    "--lr_decay_iters=10000 --eval_interval=1000 --time_limit_seconds=103700 --max_iters_per_launch=14000",
}


@pytest.mark.parametrize("name", list(LAUNCHER_LINES))
def test_original_launcher_lines_parse(name):
    run = parse(["--config", name, *LAUNCHER_LINES[name].split()]).run
    preset = letngpt.get_config(name)
    assert run.model == preset.model  # the launcher restates the preset's architecture
    t = run.train
    assert t.init_from == "scratch" and t.compile is False and t.eval_iters == 1000
    assert t.time_limit_seconds == 103700 and t.max_iters_per_launch == 14000
    assert t.learning_rate == 30e-4 and t.max_iters == 10000
    assert (t.batch_size, t.gradient_accumulation_steps) == (preset.train.batch_size,
                                                            preset.train.gradient_accumulation_steps)
    assert run.train.out_dir == f"out/{name}"


def test_overrides_and_errors():
    run = parse(["--n_layer=3", "--compile", "--use_nGPT", "0", "--out_dir=x", "--tp=2"]).run
    assert run.name == "tiny_LETNGPT" and run.model.n_layer == 3 and run.train.compile
    assert not run.model.use_ngpt and run.train.out_dir == "x" and run.train.tp == 2
    with pytest.raises(ConfigError, match=r"unknown option --n_layers"):
        parse(["--n_layers=3"])
    with pytest.raises(ConfigError, match=r"--batch_size: cannot parse 'eight' as int"):
        parse(["--batch_size=eight"])
    with pytest.raises(ConfigError, match=r"--n_layer: cannot parse '2.5' as int"):
        parse(["--n_layer=2.5"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse(["n_layer=3"])


def run_train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_list_configs_cli():
    out = run_train_py("--list-configs")
    assert out.returncode == 0
    assert out.stdout.split() == letngpt.list_configs()


def test_bad_flag_is_a_one_line_error():
    out = run_train_py("--n_embd=1000", "--n_head=16")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: n_embd (1000) must be divisible by n_head (16)"
    out = run_train_py("--bogus=1")
    assert out.returncode == 2 and out.stderr.strip() == "error: unknown option --bogus"
