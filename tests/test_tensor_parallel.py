"""Tensor parallelism (megatron-core layers on gloo): exact equivalence with TP=1, and
TP x DP training with DeepSpeed keeping every weight on the sphere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import check_ok, read_metrics, run_train, subprocess_env, tiny

# 20 fp32 steps of Adam from identical weights and batches; the only difference is the order
# of floating-point sums (TP's row-parallel all-reduce, DP's gradient average), about 1e-7
# relative per reduction. Adam normalises updates, so such noise grows only slowly; observed
# differences are ~1e-6 on losses near 5. 1e-4 leaves margin yet catches any real error
# (a wrong shard or a missing gradient reduction moves the loss by 1e-2 or more within steps).
LOSS_TOL = 1e-4


# Replicated parameters per layer (TP keeps them whole on every rank): GPT 2 norm gains; nGPT 2 alphas;
# with M > 1 also r_m and the head-norm gain. Plus GPT's final norm.
REPLICATED = {"GPT": 2 * 2 + 1, "nGPT": 2 * 2, "LETNGPT": 2 * 4, "LETNGPT_maps5": 2 * 4, "LETTransformer": 2 * 4 + 1}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1_for_every_variant(tp, tmp_path):
    out = tmp_path / "report.json"
    check_ok(run_train([str(out)], nproc=tp, script="tests/workers/tp_equivalence.py"))
    for rank in range(tp):  # every rank's own copies, not only rank 0's
        report = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert report["tp"] == tp and report["rank"] == rank and len(report["report"]) == 5
        for variant, r in report["report"].items():
            assert r["weights"] == 0.0, variant  # layout-invariant start: the shards ARE the TP=1 weights
            assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["grad"] < 1e-5, (variant, rank, r)
            assert r["replicated"] == REPLICATED[variant], (variant, r)
            assert r["replicated_weights"] == 0.0 and r["replicated_grad"] < 1e-5, (variant, rank, r)


@pytest.fixture(scope="module")
def single_process(byte_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("tp1")
    check_ok(run_train(tiny(byte_data, out, "--max_iters=20", "--zero_stage=0")))
    return [m["train/loss"] for m in read_metrics(out)]


def test_torchrun_tp2_matches_one_process(byte_data, single_process, tmp_path):
    check_ok(run_train(tiny(byte_data, tmp_path, "--max_iters=20", "--tp=2"), nproc=2))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["tp"], summary["dp"]) == (2, 1)
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    assert max(abs(a - b) for a, b in zip(losses, single_process, strict=True)) < LOSS_TOL


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tp2_dp2_matches_and_stays_on_the_sphere(stage, byte_data, single_process, tmp_path):
    proc = run_train(tiny(byte_data, tmp_path, "--max_iters=20", "--tp=2", f"--zero_stage={stage}"), nproc=4,
                     script="tests/workers/train_with_checks.py")
    check_ok(proc)
    for rank in range(4):
        checks = json.loads((tmp_path / f"checks_rank{rank}.json").read_text())["checks"]
        assert len(checks) == 20
        assert max(c["master"] for c in checks) < 1e-5 and max(c["compute"] for c in checks) < 1e-5
    summary = json.loads((tmp_path / f"checks_rank{rank}.json").read_text())["summary"]
    assert (summary["tp"], summary["dp"], summary["world_size"]) == (2, 2, 4)
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    assert max(abs(a - b) for a, b in zip(losses, single_process, strict=True)) < LOSS_TOL


def test_tp2_dp2_resume_is_exact(byte_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--max_iters=12", "--tp=2", "--zero_stage=1"]
    check_ok(run_train(tiny(byte_data, straight, *common), nproc=4))
    check_ok(run_train(tiny(byte_data, split, *common, "--max_iters_per_launch=6"), nproc=4))
    check_ok(run_train(tiny(byte_data, split, *common), nproc=4))
    assert sorted(p.name for p in (split / "checkpoints" / "step_00000012").glob("mp_rank_*")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    a = [(m["step"], m["train/loss"]) for m in read_metrics(straight)]
    b = [(m["step"], m["train/loss"]) for m in read_metrics(split)]
    assert a == b and len(a) == 12


def test_tp_must_divide_heads(byte_data, tmp_path):
    proc = run_train(tiny(byte_data, tmp_path, "--n_head=1", "--tp=2", "--max_iters=1"), nproc=2)
    assert proc.returncode != 0
    assert "error: n_head (1) must be divisible by tp (2)" in proc.stderr


def test_compiled_tp2_compiles_each_block_once(byte_data, tmp_path):
    """Issue 22: a 4-layer TP=2 --compile run (ZeRO 1, an evaluation at step 2) recompiles at most twice per
    rank (evaluation's no_grad is one) and breaks no graph. Before the fix: 135 "Recompiling" log lines,
    graph breaks in every attention and MLP (a Column/Row class per layer, megatron's async all-reduce).
    Rank 0 also says at start which attention kernel runs and that the first step compiles. ~2 min on CPU."""
    env = subprocess_env(TORCH_LOGS="recompiles,graph_breaks", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
                         TORCHINDUCTOR_COMPILE_THREADS="1")
    proc = run_train(tiny(byte_data, tmp_path / "out", "--n_layer=4", "--tp=2", "--zero_stage=1", "--compile",
                          "--max_iters=3", "--eval_interval=2", "--eval_iters=1"), nproc=2, env=env, timeout=900)
    check_ok(proc)
    logs = proc.stdout + proc.stderr
    for rank in (0, 1):
        recompiles = re.findall(rf"^\[rank{rank}\]:.*Recompiling function", logs, flags=re.M)
        assert 1 <= len(recompiles) <= 2, logs[-5000:]  # at least eval's: proof that the log is on
    assert "Graph break" not in logs, [line for line in logs.splitlines() if "Graph break" in line][:5]
    assert "attention: PyTorch SDPA, not flash-attn (flash-attn is not installed; the device is cpu" in proc.stdout
    assert "--compile: each of the 4 blocks runs torch.compile'd" in proc.stdout
    assert len(read_metrics(tmp_path / "out")) == 3
