"""The performance instruments in bench/: they compute what they claim and write readable
reports. Performance figures themselves are never asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, subprocess_env

from bench import attention, env, gpu_check, sizes, steps, throughput
from letngpt.config import ModelConfig
from letngpt.presets import get_config

CPU = torch.device("cpu")
MICRO = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--vocab_size", "64",
         "--batch_size", "2", "--steps", "2", "--warmup", "1", "--attn-reps", "2", "--memory-steps", "1",
         "--device", "cpu", "--threads", "1", "--maps", "3"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The instruments call torch.set_num_threads; leave the test process as it was."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _fwd_bwd_all(fused, module, cfg, dtype):
    x, cos, sin, grad = attention.attention_inputs(cfg, 3, CPU, dtype, seed=2)
    fused.zero_grad(set_to_none=True)
    y = module(x, cos, sin)
    y.backward(grad)
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in fused.named_parameters()}


@pytest.mark.parametrize("use_ngpt", [False, True])
@pytest.mark.parametrize("maps", [1, 3, 5])
def test_loop_attention_equals_fused(use_ngpt, maps):
    """The benchmark's per-map loop computes exactly what the fused module computes: outputs and
    input gradients in fp32 to 1e-5; every parameter gradient in fp64 to 1e-10."""
    cfg = ModelConfig(vocab_size=64, block_size=24, n_layer=1, n_head=4, n_embd=64, num_maps=maps,
                      use_ngpt=use_ngpt, attn_backend="sdpa")
    fused = attention.build_attention(cfg, CPU, torch.float32, seed=1, random_mix=True)
    loop = attention.LoopEnsembleAttention(fused)
    y_f, gx_f, _ = _fwd_bwd_all(fused, fused, cfg, torch.float32)
    y_l, gx_l, _ = _fwd_bwd_all(fused, loop, cfg, torch.float32)
    torch.testing.assert_close(y_l, y_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_l, gx_f, atol=1e-5, rtol=1e-5)

    fused64 = fused.double()
    loop64 = attention.LoopEnsembleAttention(fused64)
    _, _, gp_f = _fwd_bwd_all(fused64, fused64, cfg, torch.float64)
    _, _, gp_l = _fwd_bwd_all(fused64, loop64, cfg, torch.float64)
    assert gp_l.keys() == gp_f.keys()
    for name in gp_f:
        torch.testing.assert_close(gp_l[name], gp_f[name], atol=1e-10, rtol=1e-10, msg=name)
    if maps > 1:  # the test is not vacuous: the maps are mixed with distinct weights
        assert fused.ensemble_weights().unique().numel() == maps


def test_sizes_follow_the_presets():
    v = {x.name: x.cfg for x in sizes.variant_configs(sizes.get_size("1k"))}
    assert v["GPT"] == get_config("GPT_1kctx_10k_lr30e-4").model
    assert v["nGPT"] == get_config("nGPT_1kctx_10k_lr30e-4").model
    assert v["LET-nGPT M=3"] == get_config("LETNGPT_1kctx_10k_lr30e-4").model
    assert v["LET-nGPT M=5"] == get_config("LETNGPT_1kctx_10k_lr30e-4_maps5").model
    assert v["LET-nGPT M=1"].n_head == 8 and v["LET-nGPT M=1"].n_embd == 1024
    v4 = {x.name: x.cfg for x in sizes.variant_configs(sizes.get_size("4k"))}
    assert v4["LET-nGPT M=3"] == get_config("LETNGPT_4kctx_10k_lr30e-4").model
    assert sizes.get_size("4k").batch_size == 2 and sizes.get_size("1k").batch_size == 8
    tiny = {x.name: x.cfg for x in sizes.variant_configs(sizes.get_size("tiny"))}
    preset = get_config("tiny_LETNGPT").model
    assert (tiny["LET-nGPT M=3"].n_head, tiny["LET-nGPT M=3"].n_embd) == (preset.n_head, preset.n_embd)
    assert tiny["GPT"].vocab_size == 256  # CPU sizes keep the lm_head small


def test_step_runner_is_the_trainers_step():
    """bench times the trainer's own step: a DeepSpeed engine that applies every step (a fixed batch's
    loss falls), the renormalisation stage that puts nGPT's matrices back on the unit sphere, and the
    forward+backward / optimizer / renormalisation phases that add up to the step."""
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, use_ngpt=True)
    runner = steps.StepRunner("nGPT", cfg, 2, CPU, torch.float32, lr=1e-2)
    assert type(runner.engine).__name__ == "DeepSpeedEngine" and runner.engine.gradient_accumulation_steps() == 1
    losses, phases = [], []
    for _ in range(4):
        phases.append(runner.step())
        losses.append(runner.last_loss())
        assert runner.engine.was_step_applied()
    assert losses[-1] < losses[0] - 1e-3, losses
    assert runner.steps_done == 4 and runner.engine.global_steps == 4
    params = dict(runner.model.named_parameters())
    for name, dim in runner.model.unit_norm_axes().items():
        norms = params[name].detach().double().norm(dim=dim)
        assert (norms - 1).abs().max() < 1e-5, name
    for t in phases:
        assert min(t["fwdbwd"], t["optim"], t["renorm"]) > 0
        assert abs(t["fwdbwd"] + t["optim"] + t["renorm"] - t["total"]) < 1e-9
    runner.close()
    assert runner.engine is None


def test_busy_machine_warning():
    assert env.busy_warning({"device": "cpu", "loadavg_1m": 5.0, "cpus": 2}).startswith("WARNING")
    assert env.busy_warning({"device": "cpu", "loadavg_1m": 0.2, "cpus": 2}) is None
    assert env.busy_warning({"device": "cuda", "loadavg_1m": 50.0, "cpus": 2}) is None


def test_throughput_micro_writes_json_and_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    probes = []
    real_probe = throughput.memory_in_subprocess

    def one_real_probe(cfg, *a, **k):  # a fresh process per variant costs seconds: probe GPT for real only
        probes.append(cfg)
        if len(probes) == 1:
            return real_probe(cfg, *a, **k)
        return {"kind": "stub", "peak_mb": 1.0, "peak_rss_mb": 1.0, "rss_growth_mb": 1.0}

    monkeypatch.setattr(throughput, "memory_in_subprocess", one_real_probe)
    report = throughput.main(MICRO + ["--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["variants"]]
    assert names == ["GPT", "nGPT", "LET-nGPT M=3"]  # (the default M = 1, 3, 5: test_sizes_follow_the_presets)
    for r in data["variants"]:
        for key in ("step_ms_median", "tokens_per_s", "fwdbwd_ms", "optim_ms", "achieved_tflops",
                    "flops_per_token", "params", "step_vs_GPT", "step_vs_nGPT"):
            assert positive(r[key]), (r["name"], key, r[key])
        assert r["steps_timed"] == 2
        assert 0 <= r["renorm_share"] < 1
        assert r["mfu"] is None  # no peak on CPU
        assert positive(r["memory"]["peak_rss_mb"]), r["memory"]
        assert r["memory"]["rss_growth_mb"] is not None and "error" not in r["memory"]
        assert math.isfinite(r["final_loss"])
        ngpt = r["config"]["use_ngpt"]
        assert (r["renorm_ms"] > 0) == ngpt and (r["renorm_ms_isolated"] is not None) == ngpt
    assert len(probes) == 3 and data["variants"][0]["memory"]["kind"].startswith("CPU peak RSS")
    gpt = data["variants"][0]
    assert gpt["step_vs_GPT"] == 1.0 and gpt["renorm_share"] == 0.0
    let3 = data["variants"][2]
    assert let3["flops_per_token"] > data["variants"][1]["flops_per_token"]  # maps are counted
    assert [a["maps"] for a in data["attention"]] == [3]
    for a in data["attention"]:
        assert positive(a["fused_ms"]) and positive(a["loop_ms"]) and a["max_abs_diff"] < 1e-5
    assert data["flash_vs_sdpa"]["available"] is (data["flash_vs_sdpa"].get("agreement") is not None)
    assert data["environment"]["threads"] == 1
    # the table: every variant and the attention rows are printed
    for name in names:
        assert name in printed
    assert "loop/fused" in printed and "flash-attn" in printed
    assert report["json_path"] == str(out)


def test_kernel_agreement_logic_with_a_stand_in_flash():
    """The flash-vs-SDPA comparison, exercised on CPU with SDPA standing in for flash-attn."""
    def fake_flash(q, k, v, softmax_scale, causal):
        return attention.attend(q, k, v, scale=softmax_scale, backend="sdpa")

    res = attention.kernel_agreement(fake_flash, 2, 32, 4, 16, CPU)
    assert res["agree"] and set(res["tensors"]) == {"out", "dq", "dk", "dv"}
    assert all(t["flash_vs_sdpa"] == 0.0 for t in res["tensors"].values())

    def wrong_flash(q, k, v, softmax_scale, causal):  # non-causal: must be caught
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), scale=softmax_scale)
        return o.transpose(1, 2)

    assert not attention.kernel_agreement(wrong_flash, 2, 32, 4, 16, CPU)["agree"]
    if attention.flash_attn_func() is None:
        note = attention.flash_vs_sdpa([], 1, CPU)["note"]
        assert note == "flash-attn: not available"


def test_gpu_check_dry_run_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert gpu_check.main(["all", "--dry-run", "--out", str(tmp_path), "--steps", "2", "--warmup", "1",
                           "--budget", "120", "--modes", "ckpt"]) == 0  # compiling is tested in test_speed.py
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["presets"]) == {*gpu_check.PRESETS, "LETNGPT_4kctx_10k_lr30e-4+ckpt"}
    (twin,) = summary["twins"]
    assert twin["twin"] == "LETNGPT_4kctx_10k_lr30e-4+ckpt" and positive(twin["step_ratio"])
    assert summary["presets"]["LETNGPT_4kctx_10k_lr30e-4+ckpt"]["mode"] == "ckpt"
    for name, r in summary["presets"].items():
        assert r["status"] == "ok", (name, r)
        assert positive(r["tokens_per_s"]) and positive(r["step_ms_median"]) and r["steps_timed"] == 2
        assert r["peak_mb"] is not None
        assert json.loads((tmp_path / f"preset_{name}.json").read_text())["preset"] == name.split("+")[0]
    assert summary["presets"]["LETNGPT_4kctx_10k_lr30e-4"]["batch_size"] == 2
    assert summary["presets"]["GPT_1kctx_10k_lr30e-4"]["batch_size"] == 8
    assert summary["presets"]["nGPT_1kctx_10k_lr30e-4"]["renorm_share"] > 0
    assert positive(summary["let_over_ngpt_step_1k"])
    flash = json.loads((tmp_path / "flash.json").read_text())
    assert flash["status"] == "ok" and not flash["available"]
    # issue 22: which SDPA kernel ran (the profiler's op names), and the guard's skip in every eager preset
    assert len(flash["sdpa_kernels"]) == 2 and all(k and set(k) <= {"flash", "efficient", "cudnn", "math"}
                                                   for k in flash["sdpa_kernels"].values())
    for name in gpu_check.PRESETS:
        nonfinite = summary["presets"][name]["nonfinite"]
        assert nonfinite["ok"] and nonfinite["skipped"] and nonfinite["masters_change_on_nan"] == 0.0, nonfinite
        assert nonfinite["masters_change_after"] > 0 and nonfinite["adam_steps_unchanged"]
    assert "SDPA kernels that ran: M=1" in printed and printed.count("the next one applied: ok") == 4
    assert "flash-attn: not available" in printed and "LETNGPT_4kctx_10k_lr30e-4" in printed
    assert (tmp_path / "summary.txt").read_text().strip().splitlines()[-1] in printed


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_dry_run(tmp_path):
    """The shell driver end to end (its stages, time caps, stages.jsonl) on tiny CPU models."""
    presets = ["nGPT_1kctx_10k_lr30e-4", "LETNGPT_4kctx_10k_lr30e-4"]  # two of four: a process each costs seconds
    # subprocess_env: without the world of one that an in-process StepRunner left in os.environ
    env = subprocess_env(GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="1", GPU_CHECK_WARMUP="0",
                         GPU_CHECK_PRESETS=",".join(presets), PYTHON=sys.executable,
                         GPU_CHECK_MODES="ckpt")  # the compiled twin's stage costs a compilation; see test_speed.py
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "o")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "o"
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    twin = "LETNGPT_4kctx_10k_lr30e-4+ckpt"
    assert [s["stage"] for s in stages] == ["flash"] + [f"preset:{p}" for p in (*presets, twin)]
    assert all(s["rc"] == 0 for s in stages)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["presets"]) == [*presets, twin]
    assert all(r["status"] == "ok" and positive(r["tokens_per_s"]) for r in summary["presets"].values())
    assert "import letngpt pulled in: nothing heavy" in (out / "log.txt").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_check: total")


def test_out_of_memory_in_one_variant_spares_the_others(tmp_path, monkeypatch):
    """An OOM in one variant's step (measure_variants) or in one preset (gpu_check) is recorded
    as that variant's error; the rest are measured and the JSON is still written."""
    size = sizes.Size(n_layer=1, n_embd=32, n_head=2, let_n_head=2, block_size=16, vocab_size=64, batch_size=2)
    variants = sizes.variant_configs(size, maps=(3,))
    real_step = steps.StepRunner.step

    def flaky_step(self):
        if self.cfg.num_maps == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real_step(self)

    monkeypatch.setattr(steps.StepRunner, "step", flaky_step)
    res = steps.measure_variants(variants, 2, CPU, torch.float32, steps=2, warmup=1, log=lambda s: None)
    assert [("error" in r) for r in res] == [False, False, True]
    assert all(positive(r["step_ms_median"]) for r in res[:2]) and "step_ms_median" not in res[2]
    steps.add_ratios(res)
    assert res[2]["step_vs_GPT"] is None and res[1]["step_vs_GPT"] > 0
    assert "LET-nGPT M=3" in throughput.tables({"variants": res, "settings": {"steps": 2, "interleaved": True,
                                                                              "memory": "-"},
                                                "attention": [], "flash_vs_sdpa": {"available": False}})

    class NoMemory:
        def __init__(self, *a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_check, "StepRunner", NoMemory)
    r = gpu_check.stage_preset("GPT_1kctx_10k_lr30e-4", tmp_path, True, time.monotonic() + 30, 2, 1)
    assert r["status"] == "oom"
    assert json.loads((tmp_path / "preset_GPT_1kctx_10k_lr30e-4.json").read_text())["status"] == "oom"
    (tmp_path / "stages.jsonl").write_text(json.dumps({"stage": "preset:nGPT_1kctx_10k_lr30e-4", "rc": 124}) + "\n")
    summary = gpu_check.stage_summary(tmp_path)
    assert summary["presets"]["GPT_1kctx_10k_lr30e-4"]["status"] == "oom"
    assert summary["presets"]["nGPT_1kctx_10k_lr30e-4"]["status"] == "timed out"  # killed before any JSON
    assert set(summary["presets"]) == {"GPT_1kctx_10k_lr30e-4", "nGPT_1kctx_10k_lr30e-4"}


def test_throughput_checkpointed_twins_report_ratios(tmp_path, capsys, monkeypatch):
    """--activation_checkpointing adds a `[ckpt]` twin per variant, measured in the same rounds, whose step
    time and peak memory are divided by its plain variant's; the probe is told to checkpoint."""
    asked = []

    def probe(cfg, *a, checkpointing=False, **k):  # stub: the plumbing and arithmetic are under test here
        asked.append(checkpointing)
        return {"kind": "stub", "peak_mb": 40.0 if checkpointing else 100.0}

    monkeypatch.setattr(throughput, "memory_in_subprocess", probe)
    throughput.main(MICRO + ["--maps", "3", "--activation_checkpointing", "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    data = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["variants"]}
    assert sorted(asked) == [False] * 3 + [True] * 3
    for name in ("GPT", "nGPT", "LET-nGPT M=3"):
        twin = data[f"{name} [ckpt]"]
        assert twin["vs_plain_memory"] == 0.4
        assert twin["vs_plain_step"] == pytest.approx(twin["step_ms_median"] / data[name]["step_ms_median"])
        assert twin["final_loss"] == pytest.approx(data[name]["final_loss"], abs=1e-6)  # same model, same steps
    assert "compiled / checkpointed twins vs the plain (eager) variant" in printed
