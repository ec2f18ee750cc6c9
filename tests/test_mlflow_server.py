"""Tracking against a real `mlflow server` on 127.0.0.1: a 2-rank training logs its run over HTTP
and everything is read back through the REST API, and a training whose server is SIGKILLed
mid-run warns once and still finishes, checkpoint and summary included.

Each server runs in its own session so that teardown can kill it together with its uvicorn
worker. Its sqlite store starts from the tracker's migrated template when one can be made (a new
store runs its schema migrations, ~10 s on two cores), and MLflow's background job runner (a
handful of huey consumer processes, for GenAI jobs we never submit) is switched off so that it does
not compete with the trainers for the CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import TINY, last_step, read_metrics, run_train, start_train, wait_for_step

from letngpt.parallel.distributed import free_port
from letngpt.train import checkpoint

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).parent / "mlflow"
START_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 240
DISABLED = "tracking disabled for the rest of this run"  # the tracker's one warning after a failed call


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    root: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else "(no server log)"

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGTERM to the whole session, SIGKILL after 20 s; a last SIGKILL for stray workers."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)
        self.proc.wait()


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def seed_store(db: Path) -> None:
    """An already-migrated store from the tracker's template; without one the server builds it."""
    try:
        from letngpt.train.tracking import _seed_sqlite
    except ImportError:
        return
    _seed_sqlite(db)


def start_server(root: Path, backend_uri: str | None = None) -> Server:
    """`mlflow server` with proxied artifacts under root, once /health answers. Its store is
    backend_uri (tests/test_mlflow_postgres.py: PostgreSQL), else a sqlite file under root."""
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    if backend_uri is None:
        db = root / "mlflow.db"
        seed_store(db)
        backend_uri = f"sqlite:///{db}"
    for attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = root / f"server{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", backend_uri, "--serve-artifacts",
                 "--artifacts-destination", str(root / "artifacts")],
                cwd=root, env=server_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(proc, url, root, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if answers(url):
                return server
            if proc.poll() is not None:
                server.stop()
                text = server.log_text()
                if "address already in use" in text.lower() and attempt < 2:
                    break  # lost the port to someone else between probe and bind: another one
                pytest.fail(f"mlflow server exited with {proc.returncode} before /health answered\n{text}",
                            pytrace=False)
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"mlflow server did not answer /health in {START_TIMEOUT_S} s\n{server.log_text()}",
                            pytrace=False)
            time.sleep(0.25)
    pytest.fail("no free port for the mlflow server after 3 tries", pytrace=False)


@contextlib.contextmanager
def running_server(root: Path) -> Iterator[Server]:
    server = start_server(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server


@pytest.fixture
def fresh_server(tmp_path_factory):
    """A server of the test's own, for a test that kills it."""
    with running_server(tmp_path_factory.mktemp("mlflow_fresh")) as server:
        yield server


@pytest.fixture
def client_env(monkeypatch):
    """This process's MLflow client: no minutes of retries when something is wrong."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def train_args(data: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", f"--tracking_uri={url}", *extra]


def test_two_rank_run_is_tracked_over_http(mlflow_server, client_env, byte_data, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    url = mlflow_server.url
    proc = run_train(train_args(byte_data, out, url, "--max_iters=8"), nproc=2)
    if proc.returncode != 0:
        pytest.fail(f"training exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n"
                    f"--- server log ---\n{mlflow_server.log_text()}", pytrace=False)
    output = proc.stdout + proc.stderr
    assert DISABLED not in output and "is unreachable; tracking disabled" not in output, output[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    run_id = summary["tracking_run_id"]
    assert run_id, summary
    assert not (out / "mlflow.db").exists()  # nothing fell back to a local store

    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "letngpt"

    params = run.data.params
    ds_config = json.loads((out / "ds_config.json").read_text())
    assert params["config.model.num_maps"] == "3"
    assert params["config.train.max_iters"] == "8"
    assert params["config.train.tracking_uri"] == url
    assert params["ds.zero_optimization.stage"] == str(ds_config["zero_optimization"]["stage"])

    tags = run.data.tags
    assert tags["preset"] == summary["preset"] == "tiny_LETNGPT"
    assert tags["world_size"] == "2" and tags["dp_size"] == "2" and tags["tp"] == "1"
    assert tags["mlflow.runName"] == "tiny_LETNGPT"

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert [step for step, _ in history] == list(range(1, 9))
    assert history == [(m["step"], m["train/loss"]) for m in read_metrics(out)]
    val = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/loss"))
    assert [step for step, _ in val] == [0, 8] and val[-1][1] == summary["val_loss"]

    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a client path
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"run_config.json", "ds_config.json", "summary.json"} <= listed, listed
    download = tmp_path / "download"
    download.mkdir()
    for name in ("summary.json", "run_config.json"):
        got = Path(client.download_artifacts(run_id, name, str(download)))
        assert got.read_bytes() == (out / name).read_bytes(), name
    assert list((mlflow_server.root / "artifacts").rglob("summary.json")), "artifact not in the server's folder"


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's sqlite store
def test_training_survives_its_server_being_killed(fresh_server, client_env, byte_data, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    url = fresh_server.url
    train_log = tmp_path / "train.log"
    trainer = start_train(train_args(byte_data, out, url, "--max_iters=60", "--log_interval=1"), nproc=2,
                          log=train_log)

    def logs() -> str:
        return (f"--- training ---\n{train_log.read_text(errors='replace')[-6000:]}\n"
                f"--- server ---\n{fresh_server.log_text()}")

    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        wait_for_step(out, 5, trainer, TRAIN_TIMEOUT_S, logs=logs)

        # Kill at once: the sooner, the more of the run is left to prove that training goes on.
        fresh_server.signal_group(signal.SIGKILL)
        step_at_kill = last_step(out)
        fresh_server.proc.wait(timeout=30)
        gone = time.monotonic() + 30
        while answers(url):  # the uvicorn worker dies with its session
            assert time.monotonic() < gone, "the killed server still answers /health"
            time.sleep(0.2)
        assert step_at_kill < 60, "training finished before the server was killed; nothing was tested"

        try:
            returncode = trainer.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"training did not finish within {TRAIN_TIMEOUT_S} s of its start after the server "
                        f"was killed at step {step_at_kill}\n{logs()}", pytrace=False)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()

    output = train_log.read_text(errors="replace")
    assert returncode == 0, logs()
    context = f"server killed at step {step_at_kill}\n{logs()}"

    # What the server had stored when it died: its sqlite file, read directly.
    store = MlflowClient(f"sqlite:///{fresh_server.root / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("letngpt").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "RUNNING", f"{runs}\n{context}"  # nobody closed it
    run_id = runs[0].info.run_id
    stored = sorted((m.step, m.value) for m in store.get_metric_history(run_id, "train/loss"))
    assert len(stored) >= 5 and [s for s, _ in stored] == list(range(1, len(stored) + 1)), f"{stored}\n{context}"
    assert stored == [(m["step"], m["train/loss"]) for m in read_metrics(out)][:len(stored)], context

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 60 and summary["stop_reason"] == "max_iters", f"{summary}\n{context}"
    assert summary["tracking_run_id"] == run_id, context  # kept after tracking went off
    assert (checkpoint.checkpoint_dir(out) / checkpoint.MARKER).is_file(), context
    assert checkpoint.latest_tag(out) == "step_00000060", context
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 61)), context
    assert output.count(DISABLED) == 1, context  # one warning, then silence
    assert "is unreachable; tracking disabled" not in output, context
    assert not (out / "mlflow.db").exists(), context  # no fallback to a local store

