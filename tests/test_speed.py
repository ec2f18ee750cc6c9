"""--compile and --activation_checkpointing (issue 13): same numbers as eager / no checkpointing,
renormalisation still applied, activation memory really reduced, bad combinations refused.

One 2-rank torchrun (tests/workers/speed_checks.py) does every multi-process check, so DeepSpeed
is imported and each variant compiled once (ZeRO 1 reuses ZeRO 0's graphs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_train, subprocess_env

from letngpt.config import ConfigError, ModelConfig, TrainConfig
from letngpt.model import build_model
from letngpt.train.engine import check_compile

# fp32, 5 steps from identical weights and batches: compiled kernels reorder float sums (~1e-7
# relative); the bound is 1e-5 on the losses. Observed: <= 2e-6.
COMPILE_LOSS_TOL = 1e-5
# Recomputing a block runs the very same kernels on the very same inputs: bit-identical in
# practice; the bound is 1e-6.
CHECKPOINT_TOL = 1e-6


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("speed")
    out = tmp / "report.json"
    # Its own inductor cache: the test must pass from a cold cache, as on a fresh CI machine.
    env = subprocess_env(TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), TORCHINDUCTOR_COMPILE_THREADS="1")
    proc = run_train([str(out)], nproc=2, script="tests/workers/speed_checks.py", timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


# Every compiled run of the worker: each variant at ZeRO 0 and 1, LET-nGPT also at ZeRO 2, 3 and TP=2 (issue 22).
COMPILED_RUNS = [f"{v}/zero{s}" for v in ("GPT", "nGPT", "LETNGPT") for s in (0, 1)] + [
    "LETNGPT/zero2", "LETNGPT/zero3", "LETNGPT/tp2_zero1"]


@pytest.mark.parametrize("run", COMPILED_RUNS)
def test_compiled_losses_match_eager(report, run):
    runs = report["compile"][run]
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled["compiled"] and not eager["compiled"]
    assert len(eager["losses"]) == len(compiled["losses"]) == 5
    assert eager["losses"][0] != eager["losses"][-1]  # the model trains: a constant would match trivially
    assert max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"], strict=True)) < COMPILE_LOSS_TOL


@pytest.mark.parametrize("variant", ["nGPT", "LETNGPT"])
def test_compiled_runs_stay_on_the_sphere(report, variant):
    for run in COMPILED_RUNS:
        if run.startswith(f"{variant}/"):
            assert max(report["compile"][run]["compiled"]["sphere"]) < 1e-5


@pytest.mark.parametrize("run", [r for r in COMPILED_RUNS if r != "LETNGPT/zero3"])
def test_compiled_runs_keep_one_graph_per_block(report, run):
    """No graph break in any compiled run, and at most one recompilation (a new layout's first step may
    need one; the first run of each variant compiles, which is no recompilation). Not at ZeRO 3, where
    DeepSpeed's parameter hooks, compiler-disabled by DeepSpeed, break every block (33 recompilations and
    39 graph breaks in this run; the trainer says so at start, see compile_notice); its losses match above."""
    compiled = report["compile"][run]["compiled"]
    assert compiled["graph_breaks"] == 0
    assert compiled["recompiles"] <= 1, compiled["recompile_reasons"]


@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_checkpointing_gives_the_same_loss_and_gradients(report, tp):
    r = report["checkpointing"][tp]
    assert r["n_grads"] > 20  # every parameter of the model was compared
    assert r["loss"] <= CHECKPOINT_TOL and r["grad"] <= CHECKPOINT_TOL


@pytest.mark.parametrize("setup", ["tp2", "zero3"])
def test_checkpointing_in_engine_steps(report, setup):
    """3 DeepSpeed steps with and without it: TP=2 at ZeRO 1, and ZeRO 3 over 2 data-parallel ranks
    (which gathers the weights again for the recomputation)."""
    on, off = report["checkpointing"][f"{setup}_engine_on"], report["checkpointing"][f"{setup}_engine_off"]
    assert len(on["losses"]) == 3 and on["losses"][0] != on["losses"][-1]
    assert max(abs(a - b) for a, b in zip(on["losses"], off["losses"], strict=True)) <= CHECKPOINT_TOL
    assert max(on["sphere"]) < 1e-5


def saved_activation_bytes(checkpointing: bool, n_layer: int) -> int:
    """Bytes autograd keeps for backward after one forward (saved-tensor hooks see every one)."""
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=n_layer, n_head=2, n_embd=32, num_maps=3)
    model = build_model(cfg)
    model.checkpoint_blocks = checkpointing
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:  # weights are not activations
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    idx = torch.randint(64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(seen.values())


def test_checkpointing_keeps_one_tensor_per_block():
    """Without checkpointing the saved activations grow by a whole block's worth per layer; with it,
    by one [B, T, d] block input per layer (2 * 32 * 32 fp32 = 8 KiB)."""
    plain = saved_activation_bytes(False, 4) - saved_activation_bytes(False, 2)
    ckpt = saved_activation_bytes(True, 4) - saved_activation_bytes(True, 2)
    assert ckpt == 2 * (2 * 32 * 32 * 4)
    assert plain > 10 * ckpt


def test_compile_without_a_cpp_compiler_is_one_line_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ConfigError, match=r"^--compile=true on CPU needs a C\+\+ compiler"):
        check_compile(TrainConfig(compile=True), torch.device("cpu"))
    check_compile(TrainConfig(compile=False), torch.device("cpu"))  # off: nothing to check


def test_compile_on_cuda_checks_the_c_compiler_for_triton(monkeypatch):
    """Triton builds its launchers with $CC (else gcc / clang); the check needs no GPU, only the device type."""
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    with pytest.raises(ConfigError, match=r"^--compile=true on CUDA needs a C compiler for Triton .*/nonexistent/gcc"):
        check_compile(TrainConfig(compile=True), torch.device("cuda"))
    monkeypatch.setenv("CC", "/bin/true")  # a compiler that exists: the check passes
    check_compile(TrainConfig(compile=True), torch.device("cuda"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_without_python_headers_is_one_line_error(monkeypatch, tmp_path, device):
    import sysconfig

    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "include": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        check_compile(TrainConfig(compile=True), torch.device(device))
    assert str(err.value).startswith(f"--compile=true on {device.upper()} needs Python's headers ({tmp_path}/Python.h")
    assert "\n" not in str(err.value)


def test_compile_flag_error_exits_2_from_the_launcher(byte_data, tmp_path):
    env = subprocess_env(CXX="/nonexistent/g++")
    proc = run_train([*TINY, f"--data_dir={byte_data}", f"--out_dir={tmp_path}", "--max_iters=1", "--compile=true"],
                     env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --compile=true on CPU needs a C++ compiler")


def test_original_launcher_spelling_still_parses():
    from letngpt.cli import parse

    run = parse(["--config", "tiny_GPT", "--compile=False", "--activation_checkpointing"]).run
    assert run.train.compile is False and run.train.activation_checkpointing is True
    assert os.fspath(Path(run.train.out_dir)) == "out/tiny_GPT"
