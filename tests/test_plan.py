"""The capacity planner (letngpt.tools.plan) against what DeepSpeed really allocates and sends on CPU ranks,
against autograd's own count of saved activations, and its command line's errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import run_train

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.presets import get_config
from letngpt.tools.plan import (
    PERSISTENCE_THRESHOLD,
    Cluster,
    activation_bytes_per_token,
    check,
    communication,
    local_params,
    main,
    model_states,
    saved_bytes,
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "report.json"
    proc = run_train([str(out)], nproc=2, script="tests/workers/plan_checks.py")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


def small_run(report: dict) -> RunConfig:
    train = TrainConfig(batch_size=report["batch_size"], gradient_accumulation_steps=report["accum"])
    return RunConfig(model=ModelConfig(**report["config"]), train=train)


def test_bf16_zero1_gradient_buffer_is_whole_on_every_rank(measured):
    """bf16 at ZeRO 1 accumulates gradients in a FULL fp32 buffer on every rank (BF16_Optimizer); only
    the fp32 masters and moments are partitioned. The planner counts both within 5%."""
    cfg, dp = ModelConfig(**measured["config"]), measured["world"]
    params = local_params(cfg, 1)
    got = measured["bf16_stage1"]
    assert got["optimizer"] == "BF16_Optimizer" and dp == 2
    predicted = model_states(params, 0, dp, 1, weight_bytes=2)
    assert abs(predicted["parameters"] - got["param_bytes"]) <= 0.05 * got["param_bytes"]
    predicted_fp32_grads = predicted["gradients"] - 2 * params  # beside the bf16 gradients themselves
    assert abs(predicted_fp32_grads - got["fp32_grad_bytes"]) <= 0.05 * got["fp32_grad_bytes"]
    assert abs(4 * params // dp - got["master_bytes"]) <= 0.05 * got["master_bytes"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memory_model_matches_what_deepspeed_allocates(measured, stage):
    """fp32 on CPU: parameter + optimizer-state bytes per rank within 5% (the issue's bound)."""
    cfg, dp = ModelConfig(**measured["config"]), measured["world"]
    params = local_params(cfg, 1)
    got = measured["stages"][str(stage)]
    predicted = model_states(params, 0, dp, stage, weight_bytes=4)
    assert abs(predicted["parameters"] - got["param_bytes"]) <= 0.05 * got["param_bytes"]
    actual_opt = got["master_bytes"] + got["moment_bytes"]
    assert abs(predicted["optimizer"] - actual_opt) <= 0.05 * actual_opt


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_communication_model_matches_counted_bytes(measured, stage):
    """ZeRO's collectives in one optimizer step (2 micro batches per rank) and the renormalisation's
    all-reduce, against the payloads letngpt.parallel.comm_counter.CommCounter (bench/renorm.py's counter) counted."""
    run = small_run(measured)
    params = local_params(run.model, 1)
    persistent = sum(n for n in _sizes(run.model) if n <= PERSISTENCE_THRESHOLD)
    assert 0 < persistent < params  # the config exercises both kinds of ZeRO 3 weights
    cluster = Cluster(nodes=1, gpus_per_node=measured["world"], tp=1, zero_stage=stage)
    comm = communication(run, cluster, check(run, cluster), params, persistent, wb=4)
    got = measured["stages"][str(stage)]
    assert abs(comm["zero"]["payload"] - got["step_comm_bytes"]) <= 0.01 * got["step_comm_bytes"]
    assert comm["renorm"]["payload"] == got["renorm_bytes"] > 0


def _sizes(cfg: ModelConfig) -> list[int]:
    import torch

    from letngpt.model import build_model

    with torch.device("meta"):
        return [p.numel() for p in build_model(cfg).parameters()]


def test_tp_local_parameter_count_matches_megatron_shards(measured):
    assert local_params(ModelConfig(**measured["config"]), 2) == measured["tp2_local_params"]


def test_activation_model_extrapolates_to_other_lengths_and_depths():
    """The planner measures one block and the head at 32 tokens; a 3-block model at 96 tokens, counted
    directly, must agree within 5%."""
    cfg = ModelConfig(vocab_size=512, block_size=96, n_layer=3, n_head=4, n_embd=128, num_maps=3)
    per = activation_bytes_per_token(cfg)
    predicted = 96 * (3 * sum(per["block"].values()) + sum(per["rest"].values()))
    actual = sum(saved_bytes(cfg, tokens=96).values())
    assert abs(predicted - actual) <= 0.05 * actual


def test_example_command_prints_every_figure(capsys):
    argv = ["--config", "LETNGPT_4kctx_10k_lr30e-4", "--nodes", "4", "--gpus_per_node", "8", "--tp", "2",
            "--zero_stage", "1", "--activation_checkpointing"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("parameters", "gradients", "optimizer states", "activations", "fits", "FLOPs", "TP all-reduces",
                   "ZeRO collectives", "renorm all-reduce", "MFU 40% (assumed", "450 GB/s (NVLink)",
                   "50 GB/s per GPU (400 Gb/s IB)", "tokens/s", "time to 10,000 steps", "ESTIMATES"):
        assert needle in out, needle


@pytest.mark.parametrize("argv, message", [
    (["--config", "LETNGPT_1kctx_10k_lr30e-4", "--gpus_per_node", "6", "--tp", "3"],
     "error: n_head (8) must be divisible by tp (3)"),
    (["--config", "GPT_1kctx_10k_lr30e-4", "--nodes", "3", "--gpus_per_node", "1", "--tp", "2"],
     "error: tp (2) must divide the number of processes (3)"),
    (["--config", "GPT_1kctx_10k_lr30e-4", "--nodes", "16"],
     "error: gradient_accumulation_steps (64) must be divisible by the data-parallel size (128"),
    # (LETNGPT_4kctx fits one A100-40GB at ZeRO 0 since unit() stopped keeping fp32 copies: 39.8 GiB.)
    (["--config", "LETNGPT_1kctx_10k_lr30e-4_maps5", "--gpus_per_node", "1", "--zero_stage", "0", "--gpu",
      "A100-40GB"], "error: does not fit: needs"),
    (["--config", "GPT_1kctx_10k_lr30e-4", "--gpu", "TPU"], "error: unknown --gpu 'TPU'"),
    (["--config", "GPT_1kctx_10k_lr30e-4", "--mfu_from", "/nonexistent/summary.json"],
     "error: --mfu_from /nonexistent/summary.json: not a gpu_check summary.json"),
])
def test_bad_combinations_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_checkpointing_and_zero3_shrink_the_estimate():
    run = get_config("LETNGPT_4kctx_10k_lr30e-4")
    base = Cluster(nodes=4, gpus_per_node=8, tp=2, zero_stage=1)
    from letngpt.tools.plan import capacity

    plain, ckpt = capacity(run, base), capacity(run, dataclasses.replace(base, activation_checkpointing=True))
    assert ckpt["activations"]["total"] < plain["activations"]["total"] / 5
    assert ckpt["flops_per_step"] == pytest.approx(plain["flops_per_step"] * 4 / 3)
    z3 = capacity(run, dataclasses.replace(base, zero_stage=3))
    assert z3["model_states"]["parameters"] == plain["model_states"]["parameters"] // 16
    assert z3["model_states"]["source"].startswith("deepspeed estimate_zero3")


def test_mfu_from_the_gpu_check_summary(tmp_path, capsys):
    """The MFU bench/gpu_check.sh measured replaces the assumed one, and says so."""
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"presets": {"GPT_1kctx_10k_lr30e-4": {"mfu": 0.25}}}))
    assert main(["--config", "GPT_1kctx_10k_lr30e-4", "--mfu_from", str(summary)]) == 0
    assert f"MFU 25% (measured, {summary})" in capsys.readouterr().out
    assert main(["--config", "nGPT_1kctx_10k_lr30e-4", "--mfu_from", str(summary)]) == 2
    assert "no measured MFU for nGPT_1kctx_10k_lr30e-4 (measured: GPT_1kctx_10k_lr30e-4)" in capsys.readouterr().err


def test_planner_counts_causal_attention_as_half():
    """The planner's FLOPs are letngpt.model.flops' (causal attention counted as half, as FlashAttention and
    Megatron-LM count it), written here from the formula: 6 FLOPs per matmul weight and token, plus
    3 x (q.k and p.v) x 2 FLOPs per multiply-add x t/2 keys x d x M maps per layer."""
    from letngpt.tools.plan import capacity

    run = get_config("LETNGPT_4kctx_10k_lr30e-4")
    m, t = run.model, run.train
    d, L, T, M, hidden = m.n_embd, m.n_layer, m.block_size, m.num_maps, m.hidden_dim
    matmul = L * ((2 * M + 2) * d * d + 3 * d * hidden) + m.vocab_size * d
    causal = 6 * matmul + 3 * 2 * 2 * (T / 2) * d * M * L
    tokens = t.batch_size * T * t.gradient_accumulation_steps
    p = capacity(run, Cluster(nodes=4, gpus_per_node=8, tp=2, zero_stage=1))
    assert p["flops_per_step"] == pytest.approx(causal * tokens, rel=1e-12)
    full = 6 * matmul + 3 * 2 * 2 * T * d * M * L
    assert 1.3 < full / causal < 1.4  # what counting the masked half overstated MFU by (issue 22: ~1.35x)
