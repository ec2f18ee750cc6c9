"""`python -m letngpt.compare --launcher slurm`: the sweep as SLURM jobs of slurm/launch.sh.

On the real two-node test cluster of tests/test_slurm.py (slurmctld + two slurmd on loopback):
- --dry_run prints the plan with GPU-hours and the sbatch lines, and submits nothing;
- sbatch's own refusal of --sbatch_args is one line, exit 2, before anything is submitted;
- a char-level sweep of 2 presets x 2 seeds in two stages: submitted, one job cancelled mid-run, the same
  command again with --wait resubmits it and the next stage and reports; a third run submits nothing; the
  report equals, run for run, that of --launcher local.
Without a cluster: the state machine's decisions (queued, retry, failed with the log's tail), the option
parsing, the cost arithmetic and the other bad inputs.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, SHAKESPEARE
from test_slurm import cluster  # noqa: F401  (the module-scoped cluster fixture)

from letngpt.compare.cost import Resources, RunCost, estimate, sbatch_resources, stages
from letngpt.compare.runner import main as compare_main
from letngpt.compare.slurm import RECORD, SlurmLauncher, Submission, parse_sbatch_args
from letngpt.compare.sweep import NOT_RUN, Spec
from letngpt.config import ConfigError

SMALL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2", "--device=cpu"]
PRESETS = ["char_GPT", "char_nGPT"]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    """Character-level Tiny Shakespeare (its first 100k characters)."""
    from letngpt.data.prepare import prepare_text

    tmp = tmp_path_factory.mktemp("char")
    (tmp / "text.txt").write_bytes(SHAKESPEARE.read_bytes()[:100_000])
    prepare_text(tmp / "text.txt", tmp / "data", tokenizer="char")
    return tmp / "data"


def sweep_argv(data: Path, out: Path, *extra: str, train: tuple[str, ...] = ()) -> list[str]:
    """2 presets x 2 seeds, 6 steps: the grid (one lr each) on seed 1337, then seed 1338 at the best lr."""
    return ["--data_dir", str(data), "--presets", ",".join(PRESETS), "--max_iters", "6", "--eval_interval", "3",
            "--eval_iters", "1", "--seeds", "2", "--grid_seeds", "1", "--threads", "1", "--out", str(out), *extra,
            "--", *SMALL, *train]


SLURM = ["--launcher", "slurm", "--nproc", "1", "--poll", "1", "--sbatch_args=--nodes=1 --time=30"]


def compare(argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "letngpt.compare", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def jobs_known(cluster) -> list[str]:  # noqa: F811
    return cluster.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()


# --- on the cluster ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_submits_nothing(cluster, char_data, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    before = jobs_known(cluster)
    proc = compare(sweep_argv(char_data, out, "--launcher", "slurm", "--dry_run", "--lrs", "char_GPT=1e-3,3e-3",
                              "--sbatch_args=-N 2 --gpus-per-node=2 -p debug", "--sbatch_args",
                              "char_nGPT=--time=45", train=("--gradient_accumulation_steps=4",)),
                   cluster.env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "stage 1, the lr grid: 3 runs" in text and "stage 2, the best lr on the other seeds and budgets: 2 runs" \
        in text, text
    assert re.search(r"sweep: 5 runs, [\d.e+-]+ GPU-hours", text) and "2 node(s) x 2 GPUs" in text, text
    lines = [line for line in text.splitlines() if " sbatch --parsable " in line]
    assert len(lines) == 3, text  # the grid; stage 2 waits for its results
    for line in lines:
        assert line.startswith(f"LETNGPT_ROOT={ROOT} sbatch --parsable --job-name=letngpt-char_"), line
        assert f" -N 2 --gpus-per-node=2 -p debug {ROOT}/slurm/launch.sh --config=char_" in line \
            or " -p debug --time=45 " in line, line
        assert "--parent_run_id=PARENT_RUN_ID" in line and "--max_iters=6" in line
    assert sum("--time=45" in line for line in lines) == 1  # char_nGPT's own option
    assert not out.exists() and jobs_known(cluster) == before
    assert cluster.run("squeue", "-h").stdout.strip() == ""


@pytest.mark.slow
def test_sbatch_refusing_the_options_is_one_line_and_submits_nothing(cluster, char_data, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    before = jobs_known(cluster)
    proc = compare(sweep_argv(char_data, out, "--launcher", "slurm", "--sbatch_args=--partition=nope"),
                   cluster.env(), timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: sbatch rejects --partition=nope: ") and "invalid partition specified: nope" in err
    assert len(err.splitlines()) == 1, err
    assert not (out / "runs").exists() and jobs_known(cluster) == before


def results(out: Path) -> dict[tuple, list[float]]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {(r["preset"], r["lr"], r["seed"], r["budget"]): r["losses"] for r in runs}


def record(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / name / RECORD).read_text())


@pytest.mark.slow
def test_slurm_sweep_survives_a_cancel_and_equals_the_local_sweep(cluster, char_data, tmp_path):  # noqa: F811
    out, local_out = tmp_path / "slurm", tmp_path / "local"
    env = cluster.env()  # the project's PYTHONPATH, OMP_NUM_THREADS=1 and SLURM_CONF; sbatch passes it on
    # The same sweep with the local launcher, meanwhile (its runs are the reference).
    local_cmd = [sys.executable, "-m", "letngpt.compare", *sweep_argv(char_data, local_out, "--jobs", "2")]
    local = subprocess.Popen(local_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        argv = sweep_argv(char_data, out, *SLURM)
        first = subprocess.Popen([sys.executable, "-m", "letngpt.compare", *argv], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # submits the grid
        victim = "char_nGPT_lr0.003_seed1337_it6"
        log = out / "runs" / victim / "stdout.log"
        end = time.time() + 300
        while not (log.exists() and "command: srun" in log.read_text()):  # its trainer is starting: cancel it
            assert time.time() < end and first.poll() in (None, 0), f"no job started\n{cluster.daemon_logs()}"
            time.sleep(0.1)
        job = record(out, victim)["jobs"][0]
        cluster.run("scancel", job)
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stdout + stderr
        assert stdout.count("submitted job ") == 2 and "2 run(s) queued, running or not planned" in stdout
        assert cluster.wait_job(job, {"CANCELLED", "COMPLETED", "FAILED"}, 120, log)["JobState"] == "CANCELLED"

        second = compare(sweep_argv(char_data, out, *SLURM, "--wait"), env)  # the cancelled run, then stage 2
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"job {job} of char_nGPT lr 0.003 seed 1337 6 steps ended (CANCELLED) without finishing: " \
               "resubmitting (retry 1 of 2)" in second.stdout, second.stdout
        assert second.stdout.count("submitted job ") == 3, second.stdout
        assert len(record(out, victim)["jobs"]) == 2

        parent = json.loads((out / "parent_run.json").read_text())["parent_run_id"]
        details = json.loads((out / "results.json").read_text())
        assert details["parent_run_id"] == parent and details["not_run_yet"] == []
        children = {}
        for run_dir in sorted((out / "runs").iterdir()):
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["slurm_job_id"] == record(out, run_dir.name)["jobs"][-1], run_dir
            children[summary["tracking_run_id"]] = summary["slurm_job_id"]
        assert len(children) == 4

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{out}/mlflow.db")
        for run_id, job_id in children.items():  # every run under the one parent, with its job
            tags = client.get_run(run_id).data.tags
            assert tags["mlflow.parentRunId"] == parent and tags["slurm_job_id"] == job_id, tags
        assert client.get_run(parent).info.status == "FINISHED"

        known, report = jobs_known(cluster), results(out)
        third = compare(argv, env, timeout=300)  # nothing left to submit
        assert third.returncode == 0, third.stdout + third.stderr
        assert "submitted job" not in third.stdout and "queued, running" not in third.stdout, third.stdout
        assert jobs_known(cluster) == known
        assert results(out) == report  # rewritten from the same runs
    finally:
        try:
            local_log = local.communicate(timeout=600)[0]
        finally:
            local.kill()
    assert local.returncode == 0, local_log[-3000:]
    ours, reference = results(out), results(local_out)
    assert sorted(ours) == sorted(reference) and len(ours) == 4
    for key, losses in reference.items():
        assert len(ours[key]) == len(losses) == 3 and max(abs(a - b) for a, b in zip(ours[key], losses,
                                                                                      strict=True)) <= 1e-6, key
    rows = {r["preset"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for r in json.loads((local_out / "results.json").read_text())["rows"]:
        assert math.isclose(rows[r["preset"]]["final_val_mean"], r["final_val_mean"], abs_tol=1e-6)
        assert math.isclose(rows[r["preset"]]["final_val_std"], r["final_val_std"], abs_tol=1e-6)


# --- without a cluster -------------------------------------------------------------------------------------


def submission(tmp_path: Path, spec: Spec) -> Submission:
    return Submission(spec, tmp_path / spec.name, "--config=char_GPT --seed=1\n", ["--config=char_GPT"], spec.name,
                      "abc")


class Recorder(SlurmLauncher):
    """The launcher with SLURM's answers given: squeue's states, and sbatch recorded instead of run."""

    def __init__(self, tmp_path: Path, states: dict[str, str], max_retries: int = 2, report_only: bool = False):
        super().__init__(lambda spec: submission(tmp_path, spec), {"char_GPT": ["-N", "1"]}, {},
                         max_retries=max_retries, wait=False, poll_s=1, finished=lambda sub: None,
                         same_run=lambda a, b: a == b, report_only=report_only)
        self.given, self.sent = states, []

    def states(self, job_ids):
        return {j: self.given[j] for j in job_ids if j in self.given}

    def submit(self, sub, jobs):
        self.sent.append((sub.spec.name, list(jobs)))


def write_record(tmp_path: Path, spec: Spec, jobs: list[str], key: str = "--config=char_GPT --seed=1\n") -> None:
    run_dir = tmp_path / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORD).write_text(json.dumps({"key": key, "jobs": jobs}))
    (run_dir / "stdout.log").write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: boom\n")


def test_runs_queued_or_running_are_never_resubmitted_and_failed_ones_are_retried(tmp_path):
    specs = [Spec("char_GPT", 1e-3, seed, 6) for seed in range(5)]
    write_record(tmp_path, specs[1], ["11"])  # queued
    write_record(tmp_path, specs[2], ["12"])  # requeued by launch.sh after USR1: pending again, same id
    write_record(tmp_path, specs[3], ["13"])  # cancelled: retried
    write_record(tmp_path, specs[4], ["14", "15"], key="--config=char_GPT --seed=99\n")  # other flags: starts over
    states = {"11": "PENDING", "12": "REQUEUED", "13": "CANCELLED", "15": "COMPLETED"}
    launcher = Recorder(tmp_path, states)
    results = launcher.launch(specs)
    assert [r.error for r in results] == [NOT_RUN] * 5
    assert launcher.sent == [(specs[0].name, []), (specs[3].name, ["13"]), (specs[4].name, [])]
    launcher = Recorder(tmp_path, states, report_only=True)  # --report_only: a snapshot, nothing submitted
    assert [r.error for r in launcher.launch(specs)] == [NOT_RUN] * 5 and launcher.sent == []


def test_a_run_out_of_retries_is_reported_failed_with_its_log_tail(tmp_path):
    spec = Spec("char_GPT", 1e-3, 1, 6)
    write_record(tmp_path, spec, ["21", "22", "23"])
    launcher = Recorder(tmp_path, {"23": "FAILED"})
    (result,) = launcher.launch([spec])
    assert launcher.sent == [] and result.error.startswith("SLURM job(s) 21, 22, 23 ended without finishing (last: "
                                                           "FAILED); 3 attempts, --max_retries 2")
    assert result.error.endswith("line 99\nTraceback: boom") and "line 70" not in result.error
    launcher = Recorder(tmp_path, {}, max_retries=3)  # gone from squeue (MinJobAge), one retry left
    launcher.launch([spec])
    assert launcher.sent == [(spec.name, ["21", "22", "23"])]


def test_sbatch_options_common_and_per_preset():
    opts = parse_sbatch_args(["-N 2 --gpus-per-node=8 -A lab", "char_nGPT=-N 4 --time=2:00:00", "--qos=high"],
                             PRESETS)
    assert opts == {"char_GPT": ["-N", "2", "--gpus-per-node=8", "-A", "lab", "--qos=high"],
                    "char_nGPT": ["-N", "2", "--gpus-per-node=8", "-A", "lab", "--qos=high", "-N", "4",
                                  "--time=2:00:00"]}
    for bad, message in ((["char_GTP=-N 4"], "not one of --presets"), (["-J 'open"], "--sbatch_args")):
        with pytest.raises(ConfigError, match=message):
            parse_sbatch_args(bad, PRESETS)
    assert sbatch_resources(opts["char_nGPT"], None) == Resources(4, 8)  # the last -N wins, as in sbatch
    assert sbatch_resources(["--nodes=2-4", "--gres=gpu:h100:8"], None) == Resources(2, 8)
    assert sbatch_resources(["-N2", "-G", "16"], None) == Resources(2, 8)
    assert sbatch_resources(["-N", "3"], None) == Resources(3, None) and sbatch_resources([], 2) == Resources(1, 2)


def test_cost_per_stage_and_sweep_from_step_times():
    # 2 s/step on 2 x 8 GPUs and 1 s/step on 1 x 4; lr grid 3 and 2 points on 1 of 3 seeds, budgets 50, 100.
    costs = {"a": RunCost("a", Resources(2, 8), 2.0), "b": RunCost("b", Resources(1, 4), 1.0)}
    staged = stages(["a", "b"], {"a": [1, 2, 3], "b": [1, 2]}, 3, 1, [50, 100], 3, 900)
    assert staged == [("stage 1, the lr grid", [("a", 900, 3), ("b", 900, 2)]),
                      ("stage 2, the best lr on the other seeds and budgets",
                       [("a", 900, 2), ("b", 900, 2), ("a", 50, 3), ("a", 100, 3), ("b", 50, 3), ("b", 100, 3)])]
    text, figures = estimate(costs, staged, "H100-80GB", 0.4)
    a_h, b_h = 2.0 / 3600, 1.0 / 3600  # hours per step
    gpu_h = 16 * a_h * (5 * 900 + 3 * 150) + 4 * b_h * (4 * 900 + 3 * 150)
    assert figures["runs"] == 5 + 16 and figures["gpu_hours"] == pytest.approx(gpu_h)
    assert figures["wall_h_serial"] == pytest.approx(a_h * (5 * 900 + 3 * 150) + b_h * (4 * 900 + 3 * 150))
    assert figures["wall_h_parallel"] == pytest.approx(a_h * 900 * 2)  # the longest run of each stage
    assert f"sweep: 21 runs, {gpu_h:.3g} GPU-hours" in text
    unknown = {"a": RunCost("a", Resources(1, None), None, "GPUs per node unknown"), "b": costs["b"]}
    text, figures = estimate(unknown, staged, "H100-80GB", 0.4)
    assert figures["gpu_hours"] is None and "sweep: 21 runs, n/a GPU-hours" in text and "unknown" in text


def fake_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    return data


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "pbs"], "--launcher 'pbs': one of local, slurm"),
    (["--launcher", "slurm", "--max_retries", "-1"], "--max_retries"),
    (["--sbatch_args=-N 2"], "need --launcher slurm"),
    (["--launcher", "slurm", "--sbatch_args", "nope=-N 2"], "'nope' is not one of --presets"),
])
def test_bad_launcher_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert compare_main(["--data_dir", str(fake_data(tmp_path)), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "o").exists()


def test_slurm_launcher_without_sbatch_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no squeue
    assert compare_main(["--data_dir", str(fake_data(tmp_path)), "--out", str(tmp_path / "o"), "--presets",
                         "char_GPT", "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --launcher slurm: sbatch and squeue not found on PATH (run on a SLURM login node)\n"
    assert not (tmp_path / "o").exists()
