"""The MLflow tracking layer: a local store with no server, resume into the same run, and that a missing or
dying server never breaks (or stalls) training."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import ROOT

from letngpt.parallel.distributed import free_port
from letngpt.train import tracking
from letngpt.train.tracking import Tracker, flatten, git_commit

PARAMS = {"config": {"model": {"n_layer": 2, "n_embd": 64}, "lr": 3e-3}, "ds": {"zero": {"stage": 2}}}
FLAT = {"config.model.n_layer": "2", "config.model.n_embd": "64", "config.lr": "0.003", "ds.zero.stage": "2"}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, cache_dir, tmp_path):
    """No user tracking URI, no writes to the real ~/.cache or the repo, and HTTP_ENV undone afterwards."""
    for key in ("MLFLOW_TRACKING_URI", *tracking.HTTP_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    monkeypatch.chdir(tmp_path)


def client_for(out_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out_dir}/mlflow.db")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "letngpt.train.tracking" and r.levelno >= logging.WARNING]


def test_local_store_round_trip(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker(out, run_name="tiny")
    run_id = tracker.start(params=PARAMS, tags={"preset": "tiny", "world_size": 4})
    assert run_id and tracker.run_id == run_id and tracker.active
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 5.0 - step, "lr": 1e-3, "skipped": None}, step)
    (out / "summary.json").write_text("{}")
    tracker.log_artifact(out / "summary.json")
    tracker.set_tags({"git_commit": "abc123"})
    tracker.end()
    assert not tracker.active and tracker.run_id == run_id

    run = client_for(out).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == FLAT
    assert {"preset": "tiny", "world_size": "4", "git_commit": "abc123"}.items() <= run.data.tags.items()
    history = client_for(out).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 5.0 - s) for s in range(1, 6)]
    assert "skipped" not in run.data.metrics
    assert [a.path for a in client_for(out).list_artifacts(run_id)] == ["summary.json"]
    assert (out / "mlartifacts").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_continues_the_same_run(tmp_path, caplog):
    out = tmp_path / "run"
    first = Tracker(out)
    run_id = first.start(params=PARAMS)
    for step in range(1, 6):
        first.log_metrics({"train/loss": float(step)}, step)
    first.end("KILLED")

    second = Tracker(out)
    assert second.start(run_id=run_id, params=PARAMS) == run_id  # identical params: no error
    assert client_for(out).get_run(run_id).info.status == "RUNNING"
    second.log_params({"config": {"lr": 1.0, "new_key": "x"}, "ds": {"zero": {"stage": 3}}})
    second.log_params({"config": {"lr": 2.0}})
    for step in range(6, 9):
        second.log_metrics({"train/loss": float(step), "val/loss": math.nan}, step)
    second.end()
    assert second.run_id == run_id

    client = client_for(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**FLAT, "config.new_key": "x"}  # changed values keep their first value
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 9))
    assert math.isnan(run.data.metrics["val/loss"])
    assert len(client.search_runs([run.info.experiment_id])) == 1
    changed = [w for w in warnings_of(caplog) if "cannot change" in w]
    assert len(changed) == 1 and "config.lr" in changed[0] and "ds.zero.stage" in changed[0]


def test_resuming_an_unknown_run_starts_a_new_one(tmp_path, caplog):
    tracker = Tracker(tmp_path)
    run_id = tracker.start(run_id="0123456789abcdef0123456789abcdef")
    assert run_id and run_id != "0123456789abcdef0123456789abcdef" and tracker.active
    tracker.end()
    assert any("starting a new run" in w for w in warnings_of(caplog))


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(tmp_path, enabled=False)
    assert tracker.start(params=PARAMS, tags={"a": 1}) is None
    tracker.log_params(PARAMS)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_artifact(__file__)
    tracker.set_tags({"a": "b"})
    tracker.end()
    assert tracker.run_id is None and not tracker.active
    assert list(tmp_path.iterdir()) == []


def test_disabled_tracker_never_imports_mlflow(tmp_path):
    code = ("import sys; from letngpt.train.tracking import Tracker; t = Tracker('out', enabled=False); "
            "t.start(params={'a': 1}); t.log_metrics({'x': 1.0}, 1); t.end(); "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unreachable_server_disables_tracking_quickly(tmp_path, caplog):
    tracker = Tracker(tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
    t0 = time.time()
    assert tracker.start(params=PARAMS, tags={"a": 1}) is None
    assert time.time() - t0 < 10
    assert not tracker.active and tracker.run_id is None
    tracker.log_params(PARAMS)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_artifact(__file__)
    tracker.set_tags({"a": "b"})
    tracker.end()
    assert time.time() - t0 < 10
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def hanging_server():
    """Answers /health, then never answers an API call: a server wedged behind a live socket."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait(30)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_hanging_server_costs_one_bounded_wait(tmp_path, monkeypatch, caplog, hanging_server):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the caps are setdefault: the launcher may tighten them
    tracker = Tracker(tmp_path, tracking_uri=hanging_server)
    t0 = time.time()
    assert tracker.start(params=PARAMS) is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.end()
    assert time.time() - t0 < 10
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "start failed" in warnings[0], warnings


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    assert Tracker(tmp_path).uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert Tracker(tmp_path).uri == "http://env:5000"
    assert Tracker(tmp_path, tracking_uri="http://arg:5000").uri == "http://arg:5000"


def test_server_dying_mid_run(tmp_path, monkeypatch, caplog):
    tracker = Tracker(tmp_path)
    run_id = tracker.start(params=PARAMS)
    tracker.log_metrics({"loss": 1.0}, 1)
    calls = []

    def dead_server(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("connection refused")

    monkeypatch.setattr(tracker.client, "log_batch", dead_server)
    tracker.log_metrics({"loss": 2.0}, 2)  # must not raise
    assert not tracker.active and tracker.run_id == run_id
    t0 = time.time()
    for step in range(3, 100):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.log_params({"more": 1})
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(__file__)
    tracker.end()
    assert time.time() - t0 < 0.5
    assert len(calls) == 1
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "ConnectionError" in warnings[0], warnings
    assert [m.step for m in client_for(tmp_path).get_metric_history(run_id, "loss")] == [1]


def test_new_stores_are_seeded_from_the_cache(tmp_path, cache_dir):
    for name in ("a", "b"):
        tracker = Tracker(tmp_path / name)
        assert tracker.start()
        tracker.end()
    assert list((cache_dir / "letngpt").glob("mlflow-*-empty.db"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "mlflow.db").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["mlflow.db"]  # no temporary copy left behind
    for name in ("a", "b"):
        client = client_for(tmp_path / name)
        assert len(client.search_runs([client.get_experiment_by_name("letngpt").experiment_id])) == 1



@pytest.mark.parametrize("cache", ["shared", "unwritable"])
def test_new_stores_hold_no_stray_default_experiment(tmp_path, monkeypatch, cache):
    """MLflow's "Default" (id 0) would point at the template maker's ./mlruns/0: it is retired
    into the run's own folder, whether the store is a template copy or built in place."""
    from mlflow.entities import ViewType

    if cache == "unwritable":
        (tmp_path / "not-a-folder").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    names = ("a", "b") if cache == "shared" else ("a",)  # a built store costs its migrations (seconds)
    for name in names:  # each from another working directory than the one before
        (tmp_path / f"cwd-{name}").mkdir()
        monkeypatch.chdir(tmp_path / f"cwd-{name}")
        tracker = Tracker(tmp_path / name)
        assert tracker.start()
        tracker.end()
    for name in names:
        client = client_for(tmp_path / name)
        assert [e.name for e in client.search_experiments()] == ["letngpt"]
        everything = {e.name: e for e in client.search_experiments(view_type=ViewType.ALL)}
        assert set(everything) == {"letngpt", "Default"}, everything  # MLflow recreates a missing one
        default = everything["Default"]
        assert default.lifecycle_stage == "deleted"
        assert Path(default.artifact_location).is_relative_to(tmp_path / name), default.artifact_location
    assert not list(tmp_path.rglob("mlruns")), "something was written to a working directory's mlruns/"


def test_flatten():
    assert flatten({}) == {}
    assert flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "f": {}}) == {
        "a": "1", "b.c": "[1, 2]", "b.d.e": "None", "f": "{}"}
    assert flatten({"x": {"y": 1}}, "cfg.") == {"cfg.x.y": "1"}


def test_git_commit():
    sha = git_commit()
    assert sha is None or (isinstance(sha, str) and 4 <= len(sha) <= 40)


def test_resume_drops_the_values_of_redone_steps(tmp_path):
    """A launch crashed after logging steps 1-7 with its last checkpoint at 5: resuming at 5 removes
    the later values (and val at 5, evaluated again before step 6), so each step keeps one value, and
    the run's latest values are the newest that remain."""
    out = tmp_path / "run"
    first = Tracker(out)
    run_id = first.start()
    for step in range(1, 8):
        first.log_metrics({"train/loss": float(step)}, step)
    for step in (0, 5):
        first.log_metrics({"val/loss": 10.0 + step}, step)
    first.end("FAILED")
    second = Tracker(out)
    second.start(run_id=run_id)
    second.drop_metrics_after(5)
    history = {key: sorted((m.step, m.value) for m in client_for(out).get_metric_history(run_id, key))
               for key in ("train/loss", "val/loss")}
    assert history == {"train/loss": [(s, float(s)) for s in range(1, 6)], "val/loss": [(0, 10.0)]}
    assert client_for(out).get_run(run_id).data.metrics == {"train/loss": 5.0, "val/loss": 10.0}
    second.log_metrics({"val/loss": 3.0}, 5)
    second.log_metrics({"train/loss": 0.5}, 6)
    second.end()
    assert client_for(out).get_run(run_id).data.metrics == {"train/loss": 0.5, "val/loss": 3.0}
    assert len(client_for(out).get_metric_history(run_id, "train/loss")) == 6


def test_a_read_only_store_costs_one_warning_line(tmp_path, caplog, capfd):
    """Opened read-only (as a store without write permission is), MLflow's SQL layer logs each error
    with its traceback: the tracker says it once, in one line."""
    out = tmp_path / "run"
    Tracker(out).start()  # the store exists
    uri = f"sqlite:///file:{out / 'mlflow.db'}?mode=ro&uri=true"
    tracker = Tracker(out, tracking_uri=uri)
    with caplog.at_level(logging.WARNING):
        assert tracker.start(params=PARAMS) is None and not tracker.active
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.end("FAILED")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err + caplog.text
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["letngpt.train.tracking"]
    (line,) = warnings_of(caplog)
    assert "readonly database" in line and "\n" not in line
