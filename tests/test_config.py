"""Configuration: validation messages, presets, and the original launchers' command lines."""

from __future__ import annotations

import subprocess

import pytest
from helpers import run_train

import letngpt
from letngpt.cli import parse
from letngpt.config import ConfigError, ModelConfig, TrainConfig

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
    return run_train(list(args), timeout=120)


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


def test_help_lists_every_field_with_type_value_and_meaning():
    import dataclasses

    from letngpt.config import field_docs

    out = run_train_py("--config", "tiny_nGPT", "--help")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    run = letngpt.get_config("tiny_nGPT")
    for cls, values in ((ModelConfig, run.model), (TrainConfig, run.train)):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no comment for --help"
            line = next((x for x in lines if x.split()[:1] == [f"--{f.name}"]), None)
            assert line is not None, f"--{f.name} missing from --help"
            assert f"= {getattr(values, f.name)!r}" in line and docs[f.name] in line, line


def test_config_files_json_and_yaml_with_overrides(tmp_path):
    yml = tmp_path / "exp.yaml"
    yml.write_text("name: my_exp\nmodel:\n  n_layer: 2\n  use_ngpt: false\ntrain:\n  learning_rate: 3e-4\n"
                   "  out_dir: runs/my_exp\n")
    cmd = parse(["--config", str(yml), "--n_embd=64", "--n_head=2"])
    assert (cmd.run.name, cmd.run.model.n_layer, cmd.run.model.use_ngpt, cmd.run.model.n_embd) == ("my_exp", 2,
                                                                                                   False, 64)
    assert cmd.run.train.learning_rate == 3e-4 and cmd.run.train.out_dir == "runs/my_exp"  # the file's out_dir
    for text, needle in [("model:\n  n_layers: 2\n", "unknown option --n_layers"),
                         ("modle:\n  n_layer: 2\n", "unknown key 'modle'"),
                         ("- 1\n- 2\n", "must hold a mapping"),
                         ("model:\n  n_layer: two\n", "cannot parse 'two' as int"),
                         ("train:\n  compile: 3\n", "compile must be bool"),
                         ("model: [\n", "not valid YAML")]:
        yml.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            parse(["--config", str(yml)])
    with pytest.raises(ConfigError, match="no such file"):
        parse(["--config", str(tmp_path / "missing.json")])


def test_run_config_json_replays_the_run(tmp_path):
    import json

    original = parse(["--config", "tiny_GPT", "--n_layer=3", "--learning_rate=2e-3", f"--out_dir={tmp_path / 'x'}"])
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(original.run.to_dict(), indent=2))  # what every run writes
    replay = parse(["--config", str(path)])
    assert replay.run.to_dict() == original.run.to_dict()
    assert parse(["--config", str(path), "--out_dir=elsewhere"]).run.train.out_dir == "elsewhere"


def test_lr_schedule_follows_max_iters_unless_told():
    preset = letngpt.get_config("tiny_LETNGPT")
    assert parse([]).run.train.lr_decay_iters == preset.train.lr_decay_iters and parse([]).notes == []
    short = parse(["--max_iters=30"])
    assert short.run.train.lr_decay_iters == 30 and "lr_decay_iters follows --max_iters" in short.notes[0]
    assert parse(["--max_iters=30", "--lr_decay_iters=100"]).run.train.lr_decay_iters == 100
