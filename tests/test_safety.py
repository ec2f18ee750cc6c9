"""When training goes wrong, good weights survive: the non-finite guard, verified checkpoints
with fallback, one run per out_dir, Ctrl-C, FAILED tracking runs, and one-line errors for bad
data, DeepSpeed configs, architectures and out_dirs. Real processes, real DeepSpeed, gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, check_ok, read_metrics, run_train, start_train, subprocess_env, tiny, wait_for_step

from letngpt.errors import LockError
from letngpt.train import checkpoint
from letngpt.train.runlock import LOCK_FILE, OutDirLock, stale_reason

pytestmark = pytest.mark.slow


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the last stderr line is `error: ...` holding every needle."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    return last


def step_tags(out: Path) -> list[str]:
    return checkpoint.step_tags(checkpoint.checkpoint_dir(out))


@pytest.fixture(scope="module")
def good_run(byte_data, tmp_path_factory) -> Path:
    """20 steps at ZeRO 1, checkpoints at 10 and 20: the good weights the tests try to lose."""
    out = tmp_path_factory.mktemp("good")
    check_ok(run_train(tiny(byte_data, out, "--max_iters=20", "--checkpoint_interval=10", "--zero_stage=1")))
    assert step_tags(out) == ["step_00000010", "step_00000020"]
    return out


def copy_run(good_run: Path, dst: Path) -> Path:
    shutil.copytree(good_run, dst)
    return dst


# --- the non-finite guard ------------------------------------------------------------------

def finite_checkpoints(out: Path) -> list[str]:
    """The step tags on disk, after checking that every float tensor each one holds is finite."""
    import torch

    tags = step_tags(out)
    for tag in tags:
        for f in (checkpoint.checkpoint_dir(out) / tag).glob("*model_states.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)["module"]
            bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            assert not bad, f"{tag} holds non-finite {bad}"
    return tags


def test_diverging_run_stops_without_writing_nonfinite_weights(byte_data, tmp_path):
    proc = run_train(tiny(byte_data, tmp_path, "--max_iters=30", "--learning_rate=1e6", "--checkpoint_interval=1",
                          "--max_nonfinite_steps=3"))
    one_line_error(proc, "3 consecutive steps", "non-finite", "without writing a checkpoint")
    tags = finite_checkpoints(tmp_path)  # whatever was saved before the guard stopped the run is finite
    assert checkpoint.latest_tag(tmp_path) in (tags[-1] if tags else None,)
    assert not (tmp_path / "summary.json").exists()
    skipped = [m for m in read_metrics(tmp_path) if m["train/loss"] is None or m["grad_norm"] is None]
    assert skipped  # the bad steps were logged, as strict JSON (read_metrics uses json.loads on each line)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_resuming_with_a_diverging_lr_keeps_the_good_checkpoint(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    proc = run_train(tiny(byte_data, out, "--max_iters=40", "--learning_rate=1e6", "--checkpoint_interval=100",
                          "--zero_stage=1"))
    one_line_error(proc, "non-finite")
    assert finite_checkpoints(out) == ["step_00000010", "step_00000020"]
    assert checkpoint.latest_tag(out) == "step_00000020"
    assert checkpoint.verify(checkpoint.checkpoint_dir(out) / "step_00000020") is None


@pytest.mark.parametrize("stage", [0, 1])
def test_nan_on_one_rank_skips_the_step_on_every_rank(stage, byte_data, tmp_path):
    """Rank 1 alone sees a NaN loss at step 4: on BOTH ranks the fp32 masters and Adam's state
    do not move at step 4, and step 5 trains again."""
    proc = run_train(["1", "4", *tiny(byte_data, tmp_path, "--max_iters=6", f"--zero_stage={stage}")], nproc=2,
                     script="tests/workers/nan_injection.py")
    check_ok(proc)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"nan_rank{rank}.json").read_text())
        bad, after = report["records"]
        assert bad["step"] == 4 and bad["bad"] and bad["max_change"] == 0.0, bad
        assert bad["adam_after"] == bad["adam_before"], bad
        assert after["step"] == 5 and after["max_change"] > 0 and after["adam_after"] != after["adam_before"]
        assert report["summary"]["skipped_steps"] == 1 and report["summary"]["final_step"] == 6
    assert "optimizer step skipped" in proc.stdout


@pytest.mark.parametrize("stage, optimizer", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"),
                                              (3, "DeepSpeedZeroOptimizer_Stage3")])
def test_bf16_nan_gradient_skips_the_step_on_every_rank(stage, optimizer, byte_data, tmp_path):
    """bf16, as GPUs run it: rank 1 alone gets a NaN gradient (its loss stays finite) at step 4. On
    BOTH ranks the fp32 masters, the bf16 weights, Adam's moments and step count do not move at
    step 4, and step 5 trains again to finite weights and moments. (DeepSpeed's bf16 optimizers also
    skip a step whose gradient norm is not finite: with the guard's skip disabled this test still
    passes. The guard's part here is the collective decision, its count and its log line.)"""
    args = tiny(byte_data, tmp_path, "--max_iters=6", f"--zero_stage={stage}", "--dtype=bfloat16")
    proc = run_train(["1", "4", "grad", *args], nproc=2, script="tests/workers/nan_injection.py", timeout=600)
    check_ok(proc)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"nan_rank{rank}.json").read_text())
        assert (report["optimizer"], report["dtype"]) == (optimizer, "torch.bfloat16")
        bad, after = report["records"]
        assert bad["step"] == 4 and bad["bad"], bad
        assert bad["max_change"] == bad["weights_change"] == bad["moments_change"] == 0.0, bad
        assert bad["adam_after"] == bad["adam_before"] and bad["finite"], bad
        assert after["step"] == 5 and after["finite"], after
        assert min(after["max_change"], after["weights_change"], after["moments_change"]) > 0, after
        assert after["adam_after"] != after["adam_before"], after
        assert report["summary"]["skipped_steps"] == 1 and report["summary"]["final_step"] == 6
    assert "optimizer step skipped" in proc.stdout


def test_summary_is_strict_json_with_null_for_nonfinite(byte_data, tmp_path):
    """A NaN on the last (logged) step is skipped; the run finishes and says so in valid JSON."""
    proc = run_train(["0", "3", *tiny(byte_data, tmp_path, "--max_iters=3")], nproc=1,
                     script="tests/workers/nan_injection.py")
    check_ok(proc)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)
    assert summary["train_loss"] is None and summary["nonfinite"]["fields"] == ["train_loss"]
    assert summary["skipped_steps"] == 1
    assert read_metrics(tmp_path)[-1]["train/loss"] is None


# --- verified checkpoints with fallback -------------------------------------------------------

def test_truncated_newest_checkpoint_falls_back_to_the_previous(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    newest = checkpoint.checkpoint_dir(out) / "step_00000020"
    victim = max(newest.glob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_train(tiny(byte_data, out, "--max_iters=22", "--checkpoint_interval=10", "--zero_stage=1"))
    check_ok(proc)
    assert "skipping checkpoint step_00000020" in proc.stdout and "truncated" in proc.stdout
    assert "resumed from step_00000010 at step 10" in proc.stdout
    assert (checkpoint.checkpoint_dir(out) / "step_00000020.skipped").is_dir()  # kept aside, not deleted
    assert json.loads((out / "summary.json").read_text())["final_step"] == 22
    assert checkpoint.verify(checkpoint.checkpoint_dir(out) / "step_00000020") is None  # written again, good


def test_missing_state_file_falls_back(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    (checkpoint.checkpoint_dir(out) / "step_00000020" / checkpoint.STATE_FILE).unlink()
    proc = run_train(tiny(byte_data, out, "--max_iters=12", "--zero_stage=1"))
    check_ok(proc)
    assert "skipping checkpoint step_00000020: letngpt_state.json is missing" in proc.stdout
    assert "resumed from step_00000010" in proc.stdout


def test_corrupt_bytes_of_the_same_size_are_caught(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    for tag in ("step_00000010", "step_00000020"):  # every checkpoint bad: one line naming both
        victim = max((checkpoint.checkpoint_dir(out) / tag).glob("*.pt"), key=lambda p: p.stat().st_size)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    proc = run_train(tiny(byte_data, out, "--max_iters=22", "--zero_stage=1"))
    one_line_error(proc, "no complete checkpoint that verifies", "step_00000020", "step_00000010", "checksum")
    assert step_tags(out) == ["step_00000010", "step_00000020"]  # nothing deleted


def test_pruning_keeps_the_checkpoint_just_verified(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        folder = root / checkpoint.tag_for(step)
        folder.mkdir(parents=True)
        (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "checkpoint_format": 2}))
        (folder / checkpoint.MANIFEST).write_text(json.dumps({"files": {}}))
    (root / checkpoint.tag_for(25)).mkdir()  # a save that never finished
    checkpoint.prune(root, keep=1, protect="step_00000030")
    assert checkpoint.step_tags(root) == ["step_00000030"]
    checkpoint.prune(root, keep=1, protect="step_00000030")  # idempotent
    assert checkpoint.step_tags(root) == ["step_00000030"]


# --- one run per out_dir ---------------------------------------------------------------------

def test_second_launch_on_the_same_out_dir_is_refused_then_a_stale_lock_is_taken(byte_data, tmp_path):
    first = start_train(tiny(byte_data, tmp_path, "--max_iters=100000"))
    try:
        wait_for_step(tmp_path, 2, first)
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = run_train(tiny(byte_data, tmp_path, "--max_iters=5"))
        one_line_error(second, "in use by another run", f"pid {first.pid}")
        steps = [m["step"] for m in read_metrics(tmp_path)]
        assert len(steps) == len(set(steps))  # the second run wrote nothing
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock stays behind
        first.communicate()
    assert (tmp_path / LOCK_FILE).exists()
    third = run_train(tiny(byte_data, tmp_path, "--max_iters=3", "--init_from=scratch", f"--out_dir={tmp_path}"))
    assert "taking over the stale lock" in third.stdout + third.stderr
    assert not (tmp_path / LOCK_FILE).exists()  # released at exit


def test_lock_rules(tmp_path):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "77"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert stale_reason({"host": me["host"], "pid": dead.pid, "slurm_job_id": ""}, me)  # dead on this host
    assert stale_reason({"host": "other-node", "pid": 1, "slurm_job_id": "77"}, me)  # this job, requeued
    assert stale_reason({"host": "other-node", "pid": dead.pid, "slurm_job_id": "78"}, me) is None
    assert stale_reason({"host": me["host"], "pid": os.getppid(), "slurm_job_id": ""}, me) is None  # alive
    lock = OutDirLock(tmp_path)
    lock.acquire()
    other = OutDirLock(tmp_path)
    other.me = {**other.me, "host": "elsewhere", "pid": 12345}  # a live run on another node
    with pytest.raises(LockError, match="in use by another run"):
        other.acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# --- Ctrl-C and tracking status ---------------------------------------------------------------

def test_ctrl_c_checkpoints_and_exits_zero(byte_data, tmp_path):
    proc = start_train(tiny(byte_data, tmp_path, "--max_iters=100000"))
    try:
        wait_for_step(tmp_path, 3, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "KeyboardInterrupt" not in out, out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "SIGINT"
    assert checkpoint.read_state(tmp_path)["step"] == summary["final_step"] >= 3
    assert mlflow_status(tmp_path)[0] == "KILLED"  # a clean stop stays resumable


def test_second_ctrl_c_aborts_at_once():
    from letngpt.train.trainer import StopFlag

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    try:
        flag = StopFlag()
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1), previous, strict=True):
            signal.signal(sig, handler)


def mlflow_status(out: Path) -> tuple[str, dict]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return runs[0].info.status, runs[0].data.tags


def test_a_crash_marks_the_tracking_run_failed(byte_data, tmp_path):
    proc = run_train(["0", "1,2,3", *tiny(byte_data, tmp_path, "--max_iters=10", "--max_nonfinite_steps=3")],
                     script="tests/workers/nan_injection.py")
    assert proc.returncode != 0
    status, tags = mlflow_status(tmp_path)
    assert status == "FAILED" and "DivergedError" in tags["letngpt.failure"]


# --- one-line errors for bad inputs -----------------------------------------------------------

def test_token_ids_outside_the_model_vocab(byte_data, shakespeare_gpt2, tmp_path):
    lying = tmp_path / "lying"  # GPT-2 ids under a meta.json that claims a 256-token vocabulary
    shutil.copytree(shakespeare_gpt2, lying)
    meta = json.loads((lying / "meta.json").read_text())
    (lying / "meta.json").write_text(json.dumps({**meta, "vocab_size": 256}))
    one_line_error(run_train(tiny(lying, tmp_path / "a")), "train.bin holds token id", "vocab_size 256")

    replaced = tmp_path / "replaced"  # same size, every id 0xFFFF: only the checksum can tell
    shutil.copytree(byte_data, replaced)
    size = (replaced / "train.bin").stat().st_size
    (replaced / "train.bin").write_bytes(b"\xff" * size)
    one_line_error(run_train(tiny(replaced, tmp_path / "b")), "does not match the sha256 in meta.json")


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"zero_optimization": {"stage": 7}}', "stage"),
    ('{"zero_optimization": {"stage": 1, "no_such_knob": 1}}', "no_such_knob"),
])
def test_bad_ds_config(content, needle, byte_data, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(content)
    one_line_error(run_train(tiny(byte_data, tmp_path / "out", f"--ds_config={cfg}", "--max_iters=2")), needle)


def test_resume_with_another_architecture(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    one_line_error(run_train(tiny(byte_data, out, "--max_iters=22", "--n_layer=3", "--zero_stage=1")),
                   "another architecture", "n_layer: 2 -> 3")
    proc = run_train(tiny(byte_data, out, "--max_iters=21", "--learning_rate=1e-3", "--zero_stage=1"))
    check_ok(proc)
    assert "changed training settings" in proc.stdout and "learning_rate=0.003->0.001" in proc.stdout


def test_out_dir_that_cannot_be_written(byte_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(run_train(tiny(byte_data, blocker / "out", "--max_iters=2")), "is not writable")
    one_line_error(run_train(tiny(byte_data, blocker, "--max_iters=2")), "is not writable")


# --- recovery without a person (issue 23) ------------------------------------------------------

def mlflow_run(out: Path):
    """The only MLflow run of a run folder's store, and its client."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_disk_full_during_a_save_then_the_next_launch_resumes(byte_data, tmp_path):
    """The save at step 4 hits a full disk: one line naming the out_dir and the free space, exit 2;
    step 2 and the marker intact, the partial step 4 gone, the lock released. The next launch
    resumes from step 2 by itself."""
    args = tiny(byte_data, tmp_path, "--max_iters=6", "--checkpoint_interval=2", "--eval_interval=3")
    proc = run_train(["4", *args], script="tests/workers/disk_full.py")
    one_line_error(proc, "could not write checkpoint step_00000004", str(tmp_path.resolve()), "free there",
                   "step_00000002 stays")
    assert step_tags(tmp_path) == ["step_00000002"] and checkpoint.latest_tag(tmp_path) == "step_00000002"
    assert checkpoint.verify(checkpoint.checkpoint_dir(tmp_path) / "step_00000002") is None
    assert not (tmp_path / LOCK_FILE).exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]  # steps 3 and 4 are lost with the save

    check_ok(proc := run_train(args))
    assert "resumed from step_00000002 at step 2" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "summary.json").read_text())["final_step"] == 6
    assert mlflow_run(tmp_path)[1].info.status == "FINISHED"


def test_kill_9_then_resume_keeps_one_record_per_step(byte_data, tmp_path):
    """Killed after logging steps 4 and 5 with the last checkpoint at 3: the resumed launch redoes
    them (and val at 3), and metrics.jsonl and MLflow hold each step once."""
    args = tiny(byte_data, tmp_path, "--max_iters=6", "--checkpoint_interval=3", "--eval_interval=3")
    proc = run_train(["6", *args], script="tests/workers/kill_at_step.py")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5] and step_tags(tmp_path) == ["step_00000003"]
    check_ok(proc := run_train(args))
    assert "resumed from step_00000003 at step 3" in proc.stdout
    for kind, steps in (("train", [1, 2, 3, 4, 5, 6]), ("val", [0, 3, 6])):
        assert [m["step"] for m in read_metrics(tmp_path, kind)] == steps, kind
    client, run = mlflow_run(tmp_path)
    for key, steps in (("train/loss", [1, 2, 3, 4, 5, 6]), ("val/loss", [0, 3, 6])):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == steps, key


def test_relaunching_a_finished_run_changes_nothing(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    files = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    client, before = mlflow_run(out)
    history = client.get_metric_history(before.info.run_id, "train/loss")
    proc = run_train(tiny(byte_data, out, "--max_iters=20", "--checkpoint_interval=10", "--zero_stage=1"))
    check_ok(proc)
    assert "already finished at step 20 (max_iters 20); nothing to do" in proc.stdout
    assert {name: (out / name).read_bytes() for name in files} == files
    client, after = mlflow_run(out)
    assert (after.info.status, after.info.end_time, after.data.metrics) == \
           (before.info.status, before.info.end_time, before.data.metrics)
    assert len(client.get_metric_history(after.info.run_id, "train/loss")) == len(history)
    assert step_tags(out) == ["step_00000010", "step_00000020"] and not (out / LOCK_FILE).exists()


def test_sampling_takes_the_newest_checkpoint_that_verifies(byte_data, good_run, tmp_path, capsys):
    from letngpt.tools import sample

    out = copy_run(good_run, tmp_path / "run")
    newest = checkpoint.checkpoint_dir(out) / "step_00000020"
    victim = max(newest.glob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "letngpt.tools.sample", "--ckpt", str(out), "--max_new_tokens", "3",
                           "--print_token_count"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    check_ok(proc)
    assert "warning: skipping checkpoint step_00000020:" in proc.stderr and "checksum" in proc.stderr
    assert "generated 3 tokens" in proc.stdout
    _, state = sample.load_model(out)
    assert state["step"] == 10
    assert (newest / victim.name).exists()  # sampling moves nothing: a run may be training there

    assert sample.main(["--ckpt", str(newest)]) == 2  # named explicitly: it must verify
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint") and "does not verify" in err[-1] and "Traceback" not in "".join(err)

    (checkpoint.checkpoint_dir(out) / checkpoint.MARKER).write_text("step_00000030")  # names a missing step
    assert sample.load_model(out)[1]["step"] == 10


def test_unfinished_saves_with_nothing_older_are_set_aside(byte_data, tmp_path):
    """A second Ctrl-C during the stop save left step 5 without a manifest, and nothing older: the
    next auto launch sets it aside and starts from scratch; init_from=resume still refuses."""
    import torch

    from letngpt.cli import parse
    from letngpt.parallel.distributed import DistInfo
    from letngpt.train.trainer import plan_resume

    root = checkpoint.checkpoint_dir(tmp_path)
    (root / "step_00000005").mkdir(parents=True)
    (root / "step_00000005" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    resume = parse(tiny(byte_data, tmp_path, "--init_from=resume")).run
    with pytest.raises(Exception, match="holds no complete checkpoint that verifies"):
        plan_resume(resume, tmp_path, info)
    assert plan_resume(parse(tiny(byte_data, tmp_path)).run, tmp_path, info) == (None, None)
    assert not (root / "step_00000005").exists() and (root / "step_00000005.skipped").is_dir()


def test_resuming_at_another_zero_stage_says_so(byte_data, good_run, tmp_path):
    out = copy_run(good_run, tmp_path / "run")
    proc = run_train(tiny(byte_data, out, "--max_iters=22", "--zero_stage=0"))
    one_line_error(proc, "saved at ZeRO stage 1", "this run uses stage 0", "--zero_stage=1")
    assert step_tags(out) == ["step_00000010", "step_00000020"]


def test_set_aside_checkpoints_are_pruned_to_the_newest_few(tmp_path, caplog):
    root = checkpoint.checkpoint_dir(tmp_path)
    for step in (1, 2, 3):
        (root / f"{checkpoint.tag_for(step)}.skipped").mkdir(parents=True)
    (root / checkpoint.tag_for(4)).mkdir()
    (root / checkpoint.tag_for(9)).mkdir()
    with caplog.at_level("WARNING", logger="letngpt"):
        checkpoint.set_aside(tmp_path, ["step_00000004: no manifest"], "step_00000009")
    kept = sorted(p.name for p in root.iterdir() if p.name.endswith(".skipped"))
    assert kept == ["step_00000003.skipped", "step_00000004.skipped"] and checkpoint.KEEP_SKIPPED == 2
    assert "newest 2 set-aside checkpoints are kept" in caplog.text
    assert (root / checkpoint.MARKER).read_text() == "step_00000009"


# --- locks a person would have had to delete ---------------------------------------------------

def test_an_empty_or_unreadable_lock_names_the_command_that_removes_it(tmp_path):
    for content in ("", "{not json"):
        (tmp_path / LOCK_FILE).write_text(content)
        with pytest.raises(LockError) as caught:
            OutDirLock(tmp_path).acquire()
        assert f"rm {(tmp_path / LOCK_FILE).resolve()}" in str(caught.value) and "\n" not in str(caught.value)
        assert (tmp_path / LOCK_FILE).read_text() == content  # refused, not deleted


def test_a_live_holder_is_refused_with_the_commands_to_check_and_remove_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job_id": "99",
                                                  "started": "2026-01-01T00:00:00+0000"}))
    with pytest.raises(LockError) as caught:
        OutDirLock(tmp_path).acquire()
    message = str(caught.value)
    assert "in use by another run" in message and "`ps -o pid,lstart,args -p 4242` on node7" in message
    assert "`squeue -j 99`" in message and f"rm {(tmp_path / LOCK_FILE).resolve()}" in message


def test_a_reused_pid_is_known_for_a_stale_lock(tmp_path):
    """The holder's pid now belongs to another program (this test's parent): its process start
    differs from the one the lock recorded, so the lock is taken over; an old lock without the
    record is refused (nothing tells the two apart)."""
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": "", "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(LockError, match=f"ps -o pid,lstart,args -p {os.getppid()}"):
        OutDirLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({**holder, "process_start": "another-boot:1"}))
    lock = OutDirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_full_disk_leaves_no_lock_behind(tmp_path, monkeypatch):
    import errno

    from letngpt.train import runlock

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlock.json, "dump", full)
    with pytest.raises(LockError, match="No space left on device.*free there"):
        OutDirLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []  # no empty run.lock that would refuse every later launch
    monkeypatch.undo()
    lock = OutDirLock(tmp_path)
    lock.acquire()  # space freed: the next launch takes it
    lock.release()


def test_a_full_disk_anywhere_else_is_one_line_too(tmp_path, monkeypatch, capsys):
    """metrics.jsonl or summary.json hitting a full disk: the same one line (out_dir, free space)."""
    import errno

    import letngpt.train.trainer
    from letngpt.cli import main

    def full(run):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(letngpt.train.trainer, "train", full)
    assert main(["--config", "tiny_LETNGPT", f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: No space left on device while writing under {tmp_path}")
    assert "free there" in err
