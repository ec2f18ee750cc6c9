"""The training system end to end: real processes, real DeepSpeed, gloo on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, check_ok, read_metrics, run_train, start_train, subprocess_env, tiny, wait_for_step

from letngpt.parallel.distributed import free_port
from letngpt.train import checkpoint


@pytest.fixture(scope="module")
def reference_run(byte_data, tmp_path_factory) -> Path:
    """One process, ZeRO 0, 15 steps: the losses every other layout must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    check_ok(run_train(tiny(byte_data, out, "--max_iters=15", "--zero_stage=0")))
    return out


def test_single_process_run(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["final_step"] == 15 and summary["world_size"] == 1 and summary["stop_reason"] == "max_iters"
    losses = [m["train/loss"] for m in read_metrics(reference_run)]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.3
    last = read_metrics(reference_run)[-1]  # the log line's fields: tokens seen (4 x 64 x 2 a step), ETA, memory
    assert last["tokens_seen"] == 15 * 4 * 64 * 2 and last["eta_s"] == 0 and last["memory_mb"] > 0
    assert read_metrics(reference_run)[4]["eta_s"] > 0
    vals = read_metrics(reference_run, "val")  # the same writer: val records beside the train ones
    assert [v["step"] for v in vals] == [0, 10, 15] and vals[-1]["val/loss"] == summary["val_loss"]
    assert {r["step"] for r in read_metrics(reference_run, "model")} == {5, 10, 15}  # track_interval 5
    assert checkpoint.latest_tag(reference_run) == "step_00000015"
    assert summary["val_loss"] < 5.4 and summary["tokens_per_s"] > 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_rank_zero_stages_keep_masters_on_the_sphere(stage, byte_data, reference_run, tmp_path):
    proc = run_train(tiny(byte_data, tmp_path, "--max_iters=15", f"--zero_stage={stage}"), nproc=2,
                     script="tests/workers/train_with_checks.py")
    check_ok(proc)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"checks_rank{rank}.json").read_text())
        assert [c["step"] for c in report["checks"]] == list(range(1, 16))
        for c in report["checks"]:  # after EVERY step, on what DeepSpeed keeps
            assert c["master"] < 1e-5 and c["compute"] < 1e-5, (rank, c)
    assert report["summary"]["world_size"] == 2
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.3  # it learns
    # The global batch does not depend on the layout: 2 ranks x 1 micro step see what 1 rank x 2 saw.
    ref = [m["train/loss"] for m in read_metrics(reference_run)]
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) < 1e-4


def test_resume_is_exact(byte_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--max_iters=20", "--zero_stage=1", "--checkpoint_interval=1000"]
    check_ok(run_train(tiny(byte_data, straight, *common), nproc=2))
    check_ok(run_train(tiny(byte_data, split, *common, "--max_iters_per_launch=10"), nproc=2))
    assert json.loads((split / "summary.json").read_text())["stop_reason"] == "max_iters_per_launch"
    assert checkpoint.latest_tag(split) == "step_00000010"
    check_ok(run_train(tiny(byte_data, split, *common, "--init_from=resume"), nproc=2))
    a = [(m["step"], m["train/loss"]) for m in read_metrics(straight)]
    b = [(m["step"], m["train/loss"]) for m in read_metrics(split)]
    assert [s for s, _ in b] == list(range(1, 21))
    assert a == b  # bit-identical fp32 losses


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_zero_then_resumes(sig, byte_data, tmp_path):
    proc = start_train(tiny(byte_data, tmp_path, "--max_iters=100000"))
    try:
        wait_for_step(tmp_path, 3, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    state = checkpoint.read_state(tmp_path)
    stopped_at = state["step"]
    assert stopped_at >= 3
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"] == sig.name
    check_ok(run_train(tiny(byte_data, tmp_path, f"--max_iters={stopped_at + 3}")))
    steps = [m["step"] for m in read_metrics(tmp_path)]
    assert steps == list(range(1, stopped_at + 4))  # continued, not restarted


def test_time_limit_stops_cleanly(byte_data, tmp_path):
    proc = run_train(tiny(byte_data, tmp_path, "--max_iters=100000", "--time_limit_seconds=4"))
    check_ok(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "time_limit_seconds" and summary["final_step"] > 0
    assert checkpoint.read_state(tmp_path)["step"] == summary["final_step"]


def test_keeps_the_last_k_checkpoints(byte_data, tmp_path):
    check_ok(run_train(tiny(byte_data, tmp_path, "--max_iters=7", "--checkpoint_interval=2",
                            "--keep_checkpoints=2")))
    tags = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step_*"))
    assert tags == ["step_00000006", "step_00000007"]


def test_refuses_to_overwrite_or_resume_nothing(byte_data, reference_run, tmp_path):
    proc = run_train(tiny(byte_data, reference_run, "--max_iters=15", "--init_from=scratch"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: init_from=scratch but")
    assert checkpoint.latest_tag(reference_run) == "step_00000015"  # untouched
    proc = run_train(tiny(byte_data, tmp_path, "--init_from=resume"))
    assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr


def test_bad_data_dir_is_one_line_error(tmp_path):
    proc = run_train(tiny(tmp_path / "missing", tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data folder") and "Traceback" not in proc.stderr


def test_incomplete_checkpoint_is_ignored(byte_data, reference_run, tmp_path):
    """A job killed mid-save leaves a folder without our state file; the marker still wins."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (checkpoint.checkpoint_dir(out) / "step_00000020").mkdir()  # half-written leftover
    assert checkpoint.latest_tag(out) == "step_00000015"
    check_ok(run_train(tiny(byte_data, out, "--max_iters=17")))
    assert checkpoint.latest_tag(out) == "step_00000017"


def test_sample_from_checkpoint(reference_run):
    import torch

    from letngpt.tools.sample import generate, load_model

    model, state = load_model(reference_run)
    assert state["step"] == 15
    prompt = torch.tensor([[72, 105]])
    out = generate(model, prompt, max_new_tokens=12, temperature=0.8, top_k=20,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 14) and torch.equal(out[:, :2], prompt)
    assert int(out.max()) < 256


def test_sample_cli_with_gpt2_tokens_from_zero3_checkpoint(shakespeare_gpt2, tmp_path):
    args = ["--config=tiny_LETNGPT", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
            "--batch_size=2", "--gradient_accumulation_steps=2", "--max_iters=2", "--eval_iters=1",
            f"--data_dir={shakespeare_gpt2}", f"--out_dir={tmp_path}", "--zero_stage=3"]
    check_ok(run_train(args, nproc=2))
    proc = subprocess.run([sys.executable, "-m", "letngpt.tools.sample", "--ckpt", str(tmp_path), "--prompt", "ROMEO:",
                           "--max_new_tokens", "9", "--print_token_count"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    check_ok(proc)
    assert any(line.startswith("ROMEO:") for line in proc.stdout.splitlines())  # DeepSpeed also logs here
    assert proc.stdout.strip().splitlines()[-1] == "generated 9 tokens"


def test_mlflow_holds_params_and_loss_history(reference_run):
    from mlflow import MlflowClient

    run_id = json.loads((reference_run / "summary.json").read_text())["tracking_run_id"]
    client = MlflowClient(f"sqlite:///{reference_run}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.model.num_maps"] == "3" and run.data.params["ds.zero_optimization.stage"] == "0"
    assert run.data.tags["preset"] == "tiny_LETNGPT"
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 16))
    ours = [m["train/loss"] for m in read_metrics(reference_run)]
    assert [m.value for m in history] == pytest.approx(ours)
    assert any(k.startswith("ensemble/layer0/w") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"run_config.json", "summary.json"} <= artifacts


def test_unreachable_tracking_server_does_not_stop_training(byte_data, tmp_path):
    port = free_port()  # nothing listens there
    proc = run_train(tiny(byte_data, tmp_path, "--max_iters=3", f"--tracking_uri=http://127.0.0.1:{port}"))
    check_ok(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_step"] == 3 and summary["tracking_run_id"] is None
    assert "tracking" in proc.stdout + proc.stderr  # the one warning


@pytest.mark.parametrize(("stage", "before", "after"), [(1, 2, 1), (2, 1, 2)])
def test_resume_at_another_data_parallel_size(stage, before, after, byte_data, reference_run, tmp_path):
    """ZeRO-1/2 checkpoints go through DeepSpeed's universal format when the DP size changes;
    the global batch is layout-invariant, so the losses continue as if nothing happened."""
    common = ["--max_iters=12", f"--zero_stage={stage}"]
    check_ok(run_train(tiny(byte_data, tmp_path, *common, "--max_iters_per_launch=6"), nproc=before))
    check_ok(run_train(tiny(byte_data, tmp_path, *common), nproc=after))
    state = checkpoint.read_state(tmp_path)
    assert (state["step"], state["dp_size"]) == (12, after)
    assert (checkpoint.checkpoint_dir(tmp_path) / "step_00000006_universal" / "zero").is_dir()
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    ref = [m["train/loss"] for m in read_metrics(reference_run)][:12]
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) < 1e-5


def test_deepspeed_launcher(byte_data, reference_run, tmp_path):
    """`deepspeed train.py` (it passes --local_rank=N) gives the same run as torchrun and python."""
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(ROOT / "train.py"),
                           *tiny(byte_data, tmp_path, "--max_iters=4")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    check_ok(proc)
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    ref = [m["train/loss"] for m in read_metrics(reference_run)][:4]
    assert max(abs(a - b) for a, b in zip(losses, ref, strict=True)) < 1e-5


def test_old_checkpoint_with_removed_parameter_fails_clearly(tmp_path):
    """A checkpoint that still holds the removed ensemble scale cannot resume (its optimizer state
    has one more tensor per layer): the error must say so, not DeepSpeed's size mismatch."""
    import torch

    from letngpt.config import ConfigError

    folder = checkpoint.checkpoint_dir(tmp_path) / checkpoint.tag_for(2)
    folder.mkdir(parents=True)
    torch.save({"module": {"wte.weight": torch.zeros(2, 2), "blocks.0.attn.ensemble_scale": torch.ones(1)},
                "param_shapes": [{"blocks.1.attn.ensemble_scale": torch.Size([1])}]},
               folder / "mp_rank_00_model_states.pt")
    assert checkpoint.removed_params(folder) == ["blocks.0.attn.ensemble_scale", "blocks.1.attn.ensemble_scale"]

    class Engine:  # what DeepSpeed does with such a checkpoint at ZeRO 0
        def load_checkpoint(self, *args, **kwargs):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size")

    with pytest.raises(ConfigError, match="predates the removal of blocks.0.attn.ensemble_scale"):
        checkpoint.load(Engine(), tmp_path, tag=checkpoint.tag_for(2))
    (folder / "mp_rank_00_model_states.pt").unlink()  # a checkpoint without it re-raises DeepSpeed's error
    with pytest.raises(ValueError, match="parameter group"):
        checkpoint.load(Engine(), tmp_path, tag=checkpoint.tag_for(2))


def test_val_loss_does_not_depend_on_the_layout(byte_data, tmp_path):
    """The same weights (the seeded initial model; max_iters=0 evaluates it) score the same val
    loss on 1 rank, on 2 data-parallel ranks at ZeRO 3 (forward passes are collective there, and
    9 windows split 5/4 leave rank 1 a stand-in pass) and with TP=2."""
    layouts = {"dp1": ([], 1), "dp2_zero3": (["--zero_stage=3"], 2), "tp2": (["--tp=2"], 2)}
    val = {}
    for name, (extra, nproc) in layouts.items():
        out = tmp_path / name
        check_ok(run_train(tiny(byte_data, out, "--max_iters=0", "--batch_size=3", "--eval_iters=3", *extra),
                           nproc=nproc))
        val[name] = json.loads((out / "summary.json").read_text())["val_loss"]
    assert 4.0 < val["dp1"] < 7.0, val  # about ln(256) = 5.5 at init: a real loss was computed
    assert abs(val["dp2_zero3"] - val["dp1"]) < 1e-5 and abs(val["tp2"] - val["dp1"]) < 1e-5, val
