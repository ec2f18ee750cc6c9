"""MLflow on PostgreSQL, for real: a PostgreSQL server (Debian's `postgresql`, installed by
.ci/install_system.sh) started in a temporary folder on 127.0.0.1, a real `mlflow server` on it
(docker/compose.yml's --backend-store-uri, aimed at it), a 2-rank training that logs to it while the database is
restarted under it, and everything read back through the server and straight from PostgreSQL.

Debian keeps initdb/pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH. PostgreSQL refuses to
run as root, so under root its programs run as the `postgres` user (runuser) in a folder it owns.
Without PostgreSQL this test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import last_step, read_metrics, require, start_train, wait_for_step
from test_docker import backend_uri, compose_json
from test_mlflow_server import DISABLED, TRAIN_TIMEOUT_S, answers, free_port, start_server, train_args

pytestmark = pytest.mark.slow

PG_TIMEOUT_S = 60
ITERS = 30


def pg_bindir() -> Path | None:
    """The newest Debian versioned bin folder holding initdb, else wherever PATH has it."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                   if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the PostgreSQL test needs Linux"
    if pg_bindir() is None:
        return "PostgreSQL is not installed (no initdb): run .ci/install_system.sh (apt: postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root but runuser (util-linux) is missing: PostgreSQL refuses to run as root"
    try:
        import psycopg  # noqa: F401  (MLflow's PostgreSQL store needs psycopg 3)
    except ImportError:
        return "psycopg is not installed: pip install -e '.[dev]'"
    return None


@dataclass
class Postgres:
    """One PostgreSQL server in `root` (data/, socket/, postgres.log), owned by `user`."""
    root: Path
    bindir: Path
    port: int
    password: str
    user: str | None  # the OS user it runs as when we are root, else None (ourselves)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PG_TIMEOUT_S + 30)
        if check and proc.returncode != 0:
            pytest.fail(f"pg_ctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}\n{self.log()}",
                        pytrace=False)
        return proc

    def pid(self) -> int | None:
        pidfile = self.root / "data" / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        log = self.root / "postgres.log"
        return "--- postgres log ---\n" + (log.read_text(errors="replace")[-4000:] if log.exists() else "(none)")

    def start(self) -> None:
        """Listens on 127.0.0.1 only, its socket in our folder; fsync off: a test, not a store."""
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root / 'socket'} "
                "-c fsync=off -c full_page_writes=off")
        self.pg_ctl("start", "-w", "-t", str(PG_TIMEOUT_S), "-l", str(self.root / "postgres.log"), "-o", opts)

    def restart(self) -> None:
        """A fast restart (every client connection is cut), with the same options. -l again: without
        it the new postmaster would write to (and hold open) our stdout pipe."""
        self.pg_ctl("restart", "-m", "fast", "-w", "-t", str(PG_TIMEOUT_S), "-l", str(self.root / "postgres.log"))

    def stop(self) -> None:
        if self.pid() is not None:
            self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "30", check=False)
        pid = self.pid()
        if pid is not None:  # pg_ctl could not stop it: the postmaster takes its children along
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def init_postgres(root: Path) -> Postgres:
    """initdb with a password-protected superuser `mlflow` (scram, as a shared server would use)."""
    user = "postgres" if os.geteuid() == 0 else None
    for sub in ("data", "socket"):
        (root / sub).mkdir()
    pwfile = root / "pwfile"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if user:
        shutil.chown(root, user)
        for path in (root / "data", root / "socket", pwfile):
            shutil.chown(path, user)
    pg = Postgres(root, pg_bindir(), free_port(), password, user)
    cmd = [str(pg.bindir / "initdb"), "-D", str(root / "data"), "-U", "mlflow", f"--pwfile={pwfile}",
           "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"]
    proc = subprocess.run(["runuser", "-u", user, "--", *cmd] if user else cmd, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"initdb -> {proc.returncode}\n{proc.stdout}{proc.stderr}", pytrace=False)
    pwfile.unlink()
    return pg


@pytest.fixture
def postgres():
    require(postgres_unavailable(), "the PostgreSQL test")
    # Not under pytest's 0700 basetemp (root's): the postgres user must reach its folder.
    root = Path(tempfile.mkdtemp(prefix="letngpt-pg-", dir="/tmp"))
    root.chmod(0o755)
    pg = init_postgres(root)
    try:
        pg.start()
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=pg.port, user="mlflow", password=pg.password,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def compose_backend_uri(pg: Postgres, tmp_path: Path) -> str:
    """docker/compose.yml's --backend-store-uri, with our password, aimed at our server."""
    services = compose_json(tmp_path, POSTGRES_PASSWORD=pg.password)["services"]
    uri = backend_uri(services["mlflow"])
    assert uri == f"postgresql+psycopg://mlflow:{pg.password}@postgres:5432/mlflow", uri
    return uri.replace("@postgres:5432/", f"@127.0.0.1:{pg.port}/")


@pytest.fixture
def pg_mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on compose.yml's PostgreSQL store, proxied artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow_pg")
    server = start_server(root, backend_uri=compose_backend_uri(postgres, root))
    try:
        yield server
    finally:
        server.stop()


def rows(pg: Postgres, query: str, *params: object) -> list[tuple]:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=pg.port, user="mlflow", password=pg.password, dbname="mlflow",
                         connect_timeout=10) as conn:
        return conn.execute(query, params).fetchall()


def test_two_ranks_track_to_postgres_through_a_database_restart(postgres, pg_mlflow_server, byte_data, tmp_path,
                                                                   monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # this process's client: no minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, url, train_log = tmp_path / "run", pg_mlflow_server.url, tmp_path / "train.log"
    trainer = start_train(train_args(byte_data, out, url, f"--max_iters={ITERS}"), nproc=2, log=train_log)

    def logs() -> str:
        return (f"--- training ---\n{train_log.read_text(errors='replace')[-5000:]}\n"
                f"--- mlflow server ---\n{pg_mlflow_server.log_text()}\n{postgres.log()}")

    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        wait_for_step(out, 5, trainer, TRAIN_TIMEOUT_S, logs=logs)
        pid_before = postgres.pid()
        postgres.restart()
        step_at_restart = last_step(out)
        assert postgres.pid() not in (None, pid_before), "the database did not restart"
        assert step_at_restart < ITERS, "training finished during the restart; nothing was tested"
        returncode = trainer.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
    context = f"database restarted at step {step_at_restart}\n{logs()}"
    output = train_log.read_text(errors="replace")
    assert returncode == 0, context
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == ITERS and summary["stop_reason"] == "max_iters", f"{summary}\n{context}"
    assert output.count(DISABLED) <= 1 and "is unreachable" not in output, context  # at most one warning
    assert not (out / "mlflow.db").exists(), context  # no fallback to a local store

    # Read back through the server (which must have reconnected to the restarted database) ...
    assert answers(url), context
    client = MlflowClient(url)
    run = client.get_run(summary["tracking_run_id"])
    local = [(m["step"], m["train/loss"]) for m in read_metrics(out)]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    if DISABLED in output:  # the one allowed warning: what was logged until then is stored
        assert run.info.status == "RUNNING" and len(history) >= 5 and history == local[:len(history)], context
    else:
        assert run.info.status == "FINISHED", context
        assert history == local, context
        val = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss"))
        assert val[0] == 0 and val[-1] == ITERS, f"{val}\n{context}"
    experiments = client.search_experiments()
    assert client.get_experiment(run.info.experiment_id).name == "letngpt"
    # No experiment that points outside the server's artifact store (a stray "Default").
    assert all(e.artifact_location.startswith("mlflow-artifacts:") for e in experiments), experiments

    # ... and straight from PostgreSQL: the rows are there, not in some other store.
    stored = rows(postgres, "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step",
                  run.info.run_id, "train/loss")
    assert [(int(s), float(v)) for s, v in stored] == history, context
    assert rows(postgres, "SELECT name FROM experiments WHERE experiment_id = %s", int(run.info.experiment_id)) \
        == [("letngpt",)]
