"""Experiment tracking over MLflow, for rank 0 of a training run.

Tracking is a side channel: whatever happens to the store (unreachable, killed mid-run, slow), training
must go on. So every MLflow call goes through one guard that, on the first error, logs one warning and
turns tracking off for the rest of the run, and MLflow's HTTP retries/timeouts are capped so that one
call cannot block for minutes. mlflow is imported only when a tracker starts, so ranks that do not track
never pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("letngpt.train.tracking")

# MLflow's defaults (7 retries with exponential backoff, 120 s timeout, honour Retry-After) can stall a
# call for minutes. setdefault: whoever launches the job may still choose otherwise.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # one retry rides out a blip; a dead server costs two tries
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",  # seconds per try
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",  # a 429/503 could otherwise ask us to sleep
}
PROBE_TIMEOUT_S = 3.0
SQL_STORES = ("sqlite:", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores, by URI scheme


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    """Short sha of the checkout this package runs from, or None; never raises, never waits > 2 s."""
    try:
        proc = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


# SLURM's job variables -> the names a run records them under (summary.json and MLflow tags).
SLURM_IDS = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
             "slurm_array_task_id": "SLURM_ARRAY_TASK_ID"}


def slurm_ids() -> dict[str, str]:
    """The SLURM job this process runs in ({} outside SLURM), so that a run, its log and `sacct` can be
    found from each other (a requeued job keeps its id; letngpt.compare checks a sweep's runs by it)."""
    return {name: os.environ[var] for name, var in SLURM_IDS.items() if os.environ.get(var)}


def _reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether anything answers at the server. Any HTTP status counts (auth or a proxy may refuse
    /health), and so does a TLS error (MLflow may trust a CA urllib does not): MLflow's own calls decide."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except Exception as exc:
        return isinstance(getattr(exc, "reason", exc), ssl.SSLError)


def _migrated_store(dest: Path) -> None:
    """An empty, migrated store at `dest`: a copy of a per-user template (one per MLflow version: a new
    store runs its schema migrations, which cost seconds), or built in place without a writable cache."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "letngpt"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".db")
            os.close(fd)
            mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # runs the migrations
            os.replace(tmp, template)
        shutil.copyfile(template, dest)
    except OSError as exc:
        log.debug("no MLflow store template (%s); building %s", exc, dest)
        mlflow.MlflowClient(f"sqlite:///{dest}").search_experiments(max_results=1)


def _retire_default_experiment(db: Path, home: Path) -> None:
    """MLflow puts an experiment "Default" (id 0) in every new store, its artifacts in the creating
    process's ./mlruns/0: in a copied template, somebody else's folder. We never use it, and MLflow
    recreates it when missing, so it stays, deleted, with its artifacts inside the run's own folder:
    the store lists only letngpt's experiment and points nowhere foreign (`mlflow gc` included)."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE experiments SET artifact_location = ?, lifecycle_stage = 'deleted' "
                     "WHERE experiment_id = 0", (str(home / "mlartifacts" / "0"),))


def _seed_sqlite(db: Path) -> None:
    """Put an empty, migrated store without a stray "Default" experiment at `db` unless one exists.
    Best effort: on any failure MLflow builds the store itself when the tracker opens it."""
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists():
        return
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")  # not mkstemp: the store keeps umask permissions
    try:
        _migrated_store(tmp)
        _retire_default_experiment(tmp, db.parent.resolve())
        os.replace(tmp, db)
    except Exception as exc:
        log.debug("could not prepare the MLflow store %s (%s); MLflow will build it itself", db, exc)
    finally:
        tmp.unlink(missing_ok=True)


def _flat(exc: BaseException, limit: int) -> str:
    """An exception's message on one line (SQLAlchemy's span several), cut at `limit` characters."""
    return " ".join(str(exc).split())[:limit]


@contextlib.contextmanager
def quiet_mlflow_store():
    """MLflow's SQL store logs every database error with its full traceback (90 lines for a
    read-only store) before raising it; the tracker reports each failure itself, in one line."""
    store_log = logging.getLogger("mlflow.store.db.utils")
    was = store_log.disabled
    store_log.disabled = True
    try:
        yield
    finally:
        store_log.disabled = was


def _delete_metrics_after(uri: str, run_id: str, step: int) -> int:
    """Delete run `run_id`'s metric values after `step` (val/* values from `step` on) from an MLflow
    SQL store, and rebuild its latest values from what remains. Returns the number deleted."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    history, latest = SqlMetric.__table__, SqlLatestMetric.__table__

    def superseded(table):
        is_val = table.c.key.like("val/%")
        return sa.and_(table.c.run_uuid == run_id,
                       sa.or_(table.c.step > step, sa.and_(is_val, table.c.step == step)))

    engine = sa.create_engine(uri)
    try:
        with engine.begin() as conn:
            dropped = conn.execute(history.delete().where(superseded(history))).rowcount
            keys = [row.key for row in conn.execute(sa.select(latest.c.key).where(superseded(latest)))]
            conn.execute(latest.delete().where(superseded(latest)))
            for key in keys:  # the newest remaining value of each key becomes its latest again
                row = conn.execute(sa.select(history).where(history.c.run_uuid == run_id, history.c.key == key)
                                   .order_by(history.c.step.desc(), history.c.timestamp.desc()).limit(1)).first()
                if row is not None:
                    conn.execute(latest.insert().values(**row._mapping))
    finally:
        engine.dispose()
    return dropped


class Tracker:
    """One MLflow run, new or resumed. Every method is safe to call in any state and never raises."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tracking_uri: str | None = None,
                 experiment: str = "letngpt", run_name: str | None = None):
        self.out_dir = Path(out_dir).resolve()
        self.enabled = enabled
        self.experiment = experiment
        self.run_name = run_name
        # No server needed by default: an embedded store next to the run's checkpoints.
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.out_dir}/mlflow.db"
        self.client: Any = None  # an mlflow.MlflowClient while tracking is live, else None
        self._run_id: str | None = None
        self._params: dict[str, str] = {}  # already on the run: MLflow forbids changing them
        self._warned_changed = False

    @property
    def run_id(self) -> str | None:
        """Kept after a failure too, so a resumed launch continues the same run."""
        return self._run_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def start(self, *, run_id: str | None = None, params: dict | None = None,
              tags: dict | None = None) -> str | None:
        """Start a new run, or resume `run_id` (a resumed training run continues its MLflow run)."""
        if not self.enabled or self.active:
            return self._run_id
        if self.uri.startswith(("http://", "https://")) and not _reachable(self.uri):
            log.warning("MLflow server %s is unreachable; tracking disabled for this run", self.uri)
            return None
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        try:
            with quiet_mlflow_store():
                self._open(run_id)
        except Exception as exc:
            self._disable("start", exc)
            return None
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)
        return self._run_id

    def _open(self, run_id: str | None) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        artifacts = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the store, not in the working directory
            db = Path(self.uri.removeprefix("sqlite:///").split("?")[0].removeprefix("file:")).resolve()
            artifacts = str(db.parent / "mlartifacts")
            _seed_sqlite(db)
        client = mlflow.MlflowClient(self.uri)
        run = None
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is not in %s; starting a new run", run_id, self.uri)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            self._params = dict(run.data.params)
        else:
            run = client.create_run(self._experiment_id(client, artifacts), run_name=self.run_name)
        self.client, self._run_id = client, run.info.run_id

    def _experiment_id(self, client: Any, artifacts: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return client.create_experiment(self.experiment, artifact_location=artifacts)
            except MlflowException:  # another job created it first
                exp = client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _disable(self, what: str, exc: BaseException) -> None:
        log.warning("MLflow %s failed (%s: %s); tracking disabled for the rest of this run",
                    what, type(exc).__name__, _flat(exc, 300))
        self.client = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """client.<method>(...), guarded: the first failure warns once and turns tracking off."""
        if self.client is None:
            return False
        try:
            with quiet_mlflow_store():
                getattr(self.client, method)(*args, **kwargs)
            return True
        except Exception as exc:
            self._disable(method, exc)
            return False

    def drop_metrics_after(self, step: int) -> None:
        """On resume: remove the values the crashed launch logged after `step` (and its val values
        at `step`), which this launch logs again, so each step keeps one value. Done in the store's
        SQL tables (MLflow has no API to delete metric values) when the URI is a database; a server
        keeps both values, the later one per step counting (the run is tagged to say so)."""
        if not self.active:
            return
        if not self.uri.startswith(SQL_STORES):  # a server, a file store: no way to delete
            self.set_tags({"letngpt.superseded_after_step": step})
            return
        try:
            dropped = _delete_metrics_after(self.uri, self._run_id, step)
        except Exception as exc:  # tracking itself may still work: warn, keep both values, go on
            log.warning("MLflow: could not drop the values logged after step %d (%s: %s); the later value of "
                        "each step counts", step, type(exc).__name__, _flat(exc, 200))
            self.set_tags({"letngpt.superseded_after_step": step})
            return
        if dropped:
            log.info("MLflow: dropped %d metric values logged after step %d by the launch being redone", dropped, step)

    def _log_batch(self, kind: str, items: list, limit: int) -> None:
        """One request per `limit` entities (MLflow's per-batch limits)."""
        for i in range(0, len(items), limit):
            if not self._call("log_batch", self._run_id, **{kind: items[i:i + limit]}):
                return

    def log_params(self, params: dict) -> None:
        """Log new keys; a key already logged keeps its first value (one warning if it changed)."""
        if not self.active:
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        flat = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(params).items()}
        changed = sorted(k for k, v in flat.items() if self._params.get(k, v) != v)
        if changed and not self._warned_changed:
            self._warned_changed = True
            log.warning("MLflow params cannot change; keeping the first values of %d param(s): %s",
                        len(changed), ", ".join(changed[:10]))
        new = {k: v for k, v in flat.items() if k not in self._params}
        self._params.update(new)
        self._log_batch("params", [Param(k, v) for k, v in new.items()], MAX_PARAMS_TAGS_PER_BATCH)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Drops None and non-numbers; keeps NaN/inf (MLflow stores them)."""
        if not self.active:
            return
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                batch.append(Metric(key, float(value), now, int(step)))
            except (TypeError, ValueError):
                continue
        self._log_batch("metrics", batch, MAX_METRICS_PER_BATCH)

    def log_artifact(self, path: str | Path) -> None:
        if not self.active:
            return
        if not Path(path).is_file():
            log.warning("not an artifact file: %s", path)
            return
        self._call("log_artifact", self._run_id, str(path))

    def set_tags(self, tags: dict) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        batch = [RunTag(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        self._log_batch("tags", batch, MAX_PARAMS_TAGS_PER_BATCH)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run ("FINISHED", "FAILED", or "KILLED" for one to be resumed); idempotent."""
        if self.active:
            self._call("set_terminated", self._run_id, status)
        self.client = None
