"""Convergence comparison: does LET-nGPT reach a given loss in fewer steps (and less time) than nGPT and GPT?

    python -m letngpt.compare                                      # 4 tiny presets on Tiny Shakespeare
    python -m letngpt.compare --max_iters 60 --lrs 1e-3,3e-3 --out out/cmp -- --batch_size=4

Each (preset, learning rate) is trained by its own `train.py` process (torchrun when --nproc > 1) with the
same step budget, data and schedule length, and logged as an MLflow child run under one parent run. The
report folder gets val_loss.png, results.csv/.md (see letngpt.report for the definitions), sweep.csv and
results.json; the markdown table is printed last. A failed run is reported and the others still run; the
exit code is 1 if any failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .cli import parse, split_args
from .config import ConfigError, canonical_key
from .metrics import read_records
from .presets import get_config
from .report import Result, pick_baseline, training_time_at, write_report
from .tracking import Tracker, git_commit

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
EXPERIMENT = "letngpt-compare"
DEFAULT_DATA = "data/tinyshakespeare"
DEFAULT_PRESETS = "tiny_GPT,tiny_nGPT,tiny_LETNGPT,tiny_LETTransformer"
# Before the user's pass-through flags, which may override them: every step's time is logged (the wall-time
# axis sums them) and only the last checkpoint is kept (the comparison never resumes from older ones).
DEFAULT_FLAGS = ["--log_interval=1", "--keep_checkpoints=1"]
# Set by the comparison itself so every variant gets the same budget and lands in the same place.
CONTROLLED = {"config", "out_dir", "data_dir", "tracking_uri", "experiment", "parent_run_id", "max_iters",
              "lr_decay_iters", "eval_interval", "eval_iters", "init_from"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and everything after `--` as pass-through train.py flags."""
    extras: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extras = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m letngpt.compare", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=DEFAULT_DATA, help="prepared dataset (the default is prepared if missing)")
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated presets")
    p.add_argument("--max_iters", type=int, default=200, help="step budget, the same for every run")
    p.add_argument("--lrs", default="", help="learning rates to sweep per preset, e.g. 1e-3,3e-3 (default: preset's)")
    p.add_argument("--out", default="out/compare", help="report folder; runs go to OUT/runs/")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--eval_interval", type=int, default=None, help="default: max_iters // 10")
    p.add_argument("--eval_iters", type=int, default=None, help="validation batches per eval (default: preset's)")
    p.add_argument("--baseline", default=None, help="preset whose final val loss is the target (default: the GPT)")
    p.add_argument("--tracking_uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db")
    return p.parse_args(argv), extras


def check(ns: argparse.Namespace, extras: list[str]) -> tuple[list[str], dict[str, list[float]], str | None]:
    """Validate everything before training anything: presets, flags, lrs. Returns presets, lrs per preset
    and the baseline. Raises ConfigError with a one-line message."""
    presets = [p.strip() for p in ns.presets.split(",") if p.strip()]
    if not presets or len(set(presets)) != len(presets):
        raise ConfigError(f"--presets ({ns.presets!r}) must name distinct presets")
    if ns.max_iters < 1 or ns.nproc < 1:
        raise ConfigError("--max_iters and --nproc must be >= 1")
    _, overrides, action = split_args(extras)
    clash = sorted({canonical_key(k) for k in overrides} & (CONTROLLED | ({"learning_rate"} if ns.lrs else set())))
    if action != "train" or clash:
        raise ConfigError(f"pass-through flags may not set {', '.join(clash) or action}: use compare's own options")
    try:
        sweep = [float(x) for x in ns.lrs.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lrs ({ns.lrs!r}) must be comma-separated numbers") from None
    if any(lr <= 0 for lr in sweep):
        raise ConfigError(f"--lrs ({ns.lrs!r}) must be > 0")
    lrs = {}
    for preset in presets:
        get_config(preset)  # a clear error for an unknown name
        flags = [f"--config={preset}", *DEFAULT_FLAGS, *extras, *budget_flags(ns)]
        lrs[preset] = sweep or [parse(flags).run.train.learning_rate]
        for lr in sweep:  # each run's full configuration is valid
            parse([*flags, f"--learning_rate={lr!r}"])
    baseline = ns.baseline or pick_baseline(presets)
    if ns.baseline and ns.baseline not in presets:
        raise ConfigError(f"--baseline {ns.baseline!r} is not one of --presets")
    return presets, lrs, baseline


def eval_interval(ns: argparse.Namespace) -> int:
    return ns.eval_interval or max(1, ns.max_iters // 10)


def budget_flags(ns: argparse.Namespace) -> list[str]:
    """Same steps, same cosine schedule length, same evaluation for every variant."""
    flags = [f"--max_iters={ns.max_iters}", f"--lr_decay_iters={ns.max_iters}", f"--eval_interval={eval_interval(ns)}"]
    return flags + ([f"--eval_iters={ns.eval_iters}"] if ns.eval_iters else [])


def train_command(preset: str, lr: float | None, run_dir: Path, ns: argparse.Namespace, extras: list[str],
                  data_dir: Path, uri: str, parent_id: str | None) -> list[str]:
    launcher = [sys.executable]
    if ns.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}"]
    return [*launcher, str(TRAIN_PY), f"--config={preset}", *DEFAULT_FLAGS, *extras, *budget_flags(ns),
            f"--data_dir={data_dir}", f"--out_dir={run_dir}", "--init_from=scratch", f"--tracking_uri={uri}",
            f"--experiment={EXPERIMENT}", *([f"--parent_run_id={parent_id}"] if parent_id else []),
            *([f"--learning_rate={lr!r}"] if lr is not None else [])]


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def val_curve(uri: str, run_id: str | None, metrics_file: Path) -> dict[int, float]:
    """step -> val loss from the run's MLflow history (what users look at); the run's metrics.jsonl val
    records are the fallback when the store could not be read (tracking disabled mid-run, for instance)."""
    points: dict[int, float] = {}
    if run_id:
        try:
            from mlflow import MlflowClient

            for m in sorted(MlflowClient(uri).get_metric_history(run_id, "val/loss"), key=lambda m: m.timestamp):
                points[int(m.step)] = float(m.value)
        except Exception as exc:
            print(f"warning: cannot read val/loss of run {run_id} from {uri} ({exc}); using {metrics_file}",
                  file=sys.stderr)
    if not points:
        points = {int(r["step"]): float(r["val/loss"]) for r in read_records(metrics_file, "val")
                  if r.get("val/loss") is not None}
    return dict(sorted(points.items()))


def run_variant(preset: str, lr: float, sweep: bool, ns: argparse.Namespace, extras: list[str], data_dir: Path,
                out: Path, uri: str, parent_id: str | None) -> Result:
    """Train one (preset, lr) from scratch in OUT/runs/<preset>_lr<lr> and collect its curve and speed."""
    run_dir = out / "runs" / f"{preset}_lr{lr:g}"
    if run_dir.exists():  # a previous comparison's run: this one starts from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = train_command(preset, lr if sweep else None, run_dir, ns, extras, data_dir, uri, parent_id)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    stdout_log, stderr_log = run_dir / "stdout.log", run_dir / "stderr.log"
    print(f"training {preset} lr {lr:g} (log: {stdout_log})", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(stdout_log, "w") as out_f, open(stderr_log, "w") as err_f:  # files: `tail -f` shows progress
        returncode = subprocess.run(cmd, cwd=Path.cwd(), env=env, stdout=out_f, stderr=err_f).returncode
    stdout, stderr = stdout_log.read_text(errors="replace"), stderr_log.read_text(errors="replace")
    result = Result(preset=preset, lr=lr)
    summary_file = run_dir / "summary.json"
    if returncode != 0 or not summary_file.exists():
        result.error = f"exit code {returncode}\n" + tail(stderr or stdout)
        print(f"FAILED {preset} lr {lr:g} after {time.time() - start:.0f}s:\n{result.error}", file=sys.stderr)
        return result
    summary = json.loads(summary_file.read_text())
    result.run_id, result.wall_time_s = summary.get("tracking_run_id"), summary.get("wall_time_s")
    curve = val_curve(uri, result.run_id, run_dir / "metrics.jsonl")
    result.steps, result.losses = [float(s) for s in curve], list(curve.values())
    rows = read_records(run_dir / "metrics.jsonl", "train")
    result.times = training_time_at([(r["step"], r["step_time_s"]) for r in rows], result.steps)
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    result.tokens_per_s = statistics.median(speeds) if speeds else summary.get("tokens_per_s")
    if not result.losses:
        result.error = "finished, but no val/loss point in MLflow or in the log"
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(f"done {preset} lr {lr:g}: final val loss {final} in {time.time() - start:.0f}s", flush=True)
    return result


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"


def log_to_parent(tracker: Tracker, report: dict, best_lrs: dict[str, float], extra: list[Path]) -> None:
    """The table as parent-run metrics (`<preset>/<column>`) and params, the report files as artifacts."""
    metrics: dict[str, float | None] = {"target_val_loss": report["target"]}
    for row in report["rows"]:
        for key in ("final_val_loss", "steps_to_target", "step_ratio_vs_baseline", "time_to_target_s",
                    "tokens_per_s", "wall_time_s"):
            metrics[f"{row['preset']}/{key}"] = row[key]
    tracker.log_metrics(metrics, step=0)
    tracker.log_params({"best_lr": best_lrs})
    for path in [*report["paths"].values(), *extra]:
        tracker.log_artifact(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns, extras = parse_args(argv)
    try:
        presets, lrs, baseline = check(ns, extras)
        data_dir = Path(ns.data_dir)
        if not (data_dir / "meta.json").exists():
            if ns.data_dir.rstrip("/") != DEFAULT_DATA:
                raise ConfigError(f"--data_dir {ns.data_dir} is not a prepared dataset (no meta.json)")
            from .data.prepare import ensure_tinyshakespeare

            print(f"preparing Tiny Shakespeare in {data_dir}", flush=True)
            ensure_tinyshakespeare(data_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not TRAIN_PY.exists():
        print(f"error: {TRAIN_PY} not found: run from a letngpt checkout", file=sys.stderr)
        return 2
    data_dir, out = data_dir.resolve(), Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = ns.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out}/mlflow.db"
    command = shlex.join(["python", "-m", "letngpt.compare", *argv])
    tracker = Tracker(out, tracking_uri=uri, experiment=EXPERIMENT, run_name=f"compare {','.join(presets)}")
    parent_id = tracker.start(
        params={"presets": ",".join(presets), "max_iters": ns.max_iters, "lrs": ns.lrs or "preset",
                "baseline": baseline, "data_dir": str(data_dir), "nproc": ns.nproc, "extra_flags": shlex.join(extras),
                "eval_interval": eval_interval(ns), "eval_iters": ns.eval_iters or "preset"},
        tags={"kind": "compare", "command": command, "git_commit": git_commit() or "unknown"})
    print(f"MLflow: {uri}, experiment {EXPERIMENT}, parent run {parent_id}", flush=True)

    results = [run_variant(p, lr, bool(ns.lrs), ns, extras, data_dir, out, uri, parent_id)
               for p in presets for lr in lrs[p]]
    header = (f"# Convergence comparison\n\n`{command}`\n\nData `{data_dir}`, {ns.max_iters} steps per run, "
              f"{ns.nproc} process(es) per run, on {machine()}, {time.strftime('%Y-%m-%d')}.")
    report = write_report(results, out, baseline, header=header,
                          title=f"{data_dir.name}: {ns.max_iters} steps, {', '.join(presets)}")
    best_lrs = {r.preset: r.lr for r in report["best"]}
    details = {"parent_run_id": parent_id, "tracking_uri": uri, "experiment": EXPERIMENT, "baseline": baseline,
               "target_val_loss": report["target"], "rows": report["rows"],
               "runs": [vars(r) for r in results]}
    (out / "results.json").write_text(json.dumps(details, indent=2))
    log_to_parent(tracker, report, best_lrs, [out / "results.json"])
    failed = [r for r in results if not r.ok]
    tracker.end("FAILED" if failed else "FINISHED")
    print(f"\nreport: {report['paths']['md']} and {report['paths']['png']}")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.preset} lr {r.lr:g}" for r in failed))
    print(report["table"], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
