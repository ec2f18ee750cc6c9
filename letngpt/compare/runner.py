"""Convergence comparison: does LET-nGPT reach a given loss in fewer steps, FLOPs and time than nGPT and GPT?

    python -m letngpt.compare                                      # 4 tiny presets on Tiny Shakespeare
    python -m letngpt.compare --data_dir data/tinyshakespeare_char --max_iters 2000 --eval_interval 250 \
        --presets char_GPT,char_nGPT,char_LETNGPT --lrs char_GPT=1e-3,3e-3,1e-2 --lrs 3e-3,1e-2,3e-2 \
        --seeds 3 --grid_seeds 1 --budgets 250,500,1000 --jobs 2 --out out/char

A sweep: every (preset, learning rate) of the grid trains on the first --grid_seeds seeds at the full
budget; each preset's best lr (lowest mean final val loss) then trains on every seed, and at each of
--budgets steps as a separate run with its own full cosine schedule (letngpt.compare.sweep has the rules). Each
run is its own `train.py` process (torchrun when --nproc > 1; --jobs at a time, each with --threads torch
threads) in OUT/runs/<preset>_lr<lr>_seed<seed>_it<steps>, logged as an MLflow child run under one parent
run. A finished run whose flags match is reused, so rerunning an interrupted command finishes it.

The report folder gets results.md/.csv (one row per preset: best lr, mean +- std, parameters, FLOPs,
steps to the baseline's loss), grid.csv and runs.csv (every group and run), val_loss.png (mean +- std
band against steps, time and budget), val_loss_flops.png and results.json; the table is printed last.
A failed run is reported and the others still run; the exit code is 1 if any failed, 2 for a bad
command line.

On a SLURM cluster (`--launcher slurm`, letngpt.compare.slurm) every run is one `sbatch slurm/launch.sh`
job with --sbatch_args; the plan (runs per stage, GPU-hours and wall time from letngpt.tools.plan's model,
letngpt.compare.cost) is printed first, and --dry_run prints it with the sbatch command lines and submits
nothing. Stages span invocations: the command submits what it can and exits (run it again later: it
collects the finished runs, resubmits failed ones up to --max_retries and submits the next stage), or
with --wait polls until the sweep is done. All runs log under one MLflow parent run (OUT/parent_run.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from letngpt.cli import parse, split_args
from letngpt.compare.cost import estimate, run_cost, sbatch_resources, stages
from letngpt.compare.curves import Result, pick_baseline, training_time_at
from letngpt.compare.report import write_sweep_report
from letngpt.compare.slurm import SlurmLauncher, Submission, parse_sbatch_args, read_record, require_slurm
from letngpt.compare.sweep import (
    NOT_RUN,
    Spec,
    choose_best,
    group_results,
    model_costs,
    parse_budgets,
    parse_lr_grids,
    parse_seeds,
)
from letngpt.config import ConfigError, RunConfig, canonical_key
from letngpt.data import DataError
from letngpt.presets import get_config
from letngpt.tools.plan import GPUS
from letngpt.train.metrics import read_records
from letngpt.train.tracking import Tracker, git_commit

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "train.py"
EXPERIMENT = "letngpt-compare"
DEFAULT_DATA = "data/tinyshakespeare"
DEFAULT_PRESETS = "tiny_GPT,tiny_nGPT,tiny_LETNGPT,tiny_LETTransformer"
# Before the user's pass-through flags, which may override them: every step's time is logged (the wall-time
# axis sums them) and only the last checkpoint is kept (the comparison never resumes from older ones).
DEFAULT_FLAGS = ["--log_interval=1", "--keep_checkpoints=1"]
# Set by the comparison itself so every variant gets the same budget and lands in the same place.
CONTROLLED = {"config", "out_dir", "data_dir", "tracking_uri", "experiment", "parent_run_id", "max_iters",
              "lr_decay_iters", "eval_interval", "eval_iters", "init_from", "seed"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and everything after `--` as pass-through train.py flags."""
    extras: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extras = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m letngpt.compare", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=DEFAULT_DATA, help="prepared dataset (built-in ones are prepared if missing)")
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated presets")
    p.add_argument("--max_iters", type=int, default=200, help="full step budget, the same for every run")
    p.add_argument("--lrs", action="append", default=[], metavar="[PRESET=]LR,LR,...",
                   help="learning-rate grid; PRESET=... for one preset (repeatable), a bare list for the rest "
                        "(default: the preset's rate)")
    p.add_argument("--seeds", default="1", help="a count N (seeds 1337..1337+N-1) or a list 1,2,3 ('42,' = 42)")
    p.add_argument("--grid_seeds", type=int, default=None,
                   help="run the lr grid on the first K seeds only, then the best lr on all (default: all)")
    p.add_argument("--budgets", default="", help="smaller step budgets, e.g. 250,500,1000: separate runs at the best "
                                                  "lr, each with its own full schedule, for steps-to-target (warmup "
                                                  "stays the preset's, not scaled)")
    p.add_argument("--budget_seeds", type=int, default=None, help="seeds per budget run (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: sequential)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: report the finished runs in OUT/runs (a snapshot of a running sweep)")
    p.add_argument("--out", default="out/compare", help="report folder; runs in OUT/runs/ (finished ones reused)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (torchrun when > 1; default 1); slurm: per node (default: its GPUs)")
    p.add_argument("--eval_interval", type=int, default=None, help="default: max_iters // 10")
    p.add_argument("--eval_iters", type=int, default=None, help="validation batches per eval (default: preset's)")
    p.add_argument("--baseline", default=None, help="preset whose final val loss is the target (default: the GPT)")
    p.add_argument("--tracking_uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db")
    p.add_argument("--launcher", default="local", help="local (subprocesses here) or slurm (one sbatch job per run)")
    p.add_argument("--sbatch_args", action="append", default=[], metavar="[PRESET=]ARGS",
                   help="slurm: sbatch options for every job, e.g. --sbatch_args='-N 2 --gpus-per-node=8 -p gpu'; "
                        "PRESET='...' for one preset's jobs (repeatable; the later options win)")
    p.add_argument("--max_retries", type=int, default=2, help="slurm: resubmit a failed run this many times")
    p.add_argument("--wait", action="store_true", help="slurm: poll until every stage has finished, then report "
                                                       "(default: submit what can run now, report, exit)")
    p.add_argument("--poll", type=float, default=60.0, help="slurm --wait: seconds between squeue polls")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--gpu", default="H100-80GB", help=f"the plan's GPU ({', '.join(GPUS)})")
    p.add_argument("--mfu", type=float, default=0.40, help="the plan's model FLOPs utilisation (assumed)")
    return p.parse_args(argv), extras


@dataclass
class SweepDesign:
    """What a sweep will run, validated before anything trains."""

    presets: list[str]
    grids: dict[str, list[float]]  # lrs per preset (the preset's own rate when not swept)
    swept: set[str]  # presets whose lr comes from --lrs
    seeds: list[int]
    grid_seeds: int
    budgets: list[int]
    budget_seeds: int
    baseline: str | None
    configs: dict[str, RunConfig] = field(default_factory=dict)  # preset + pass-through flags, full budget
    sbatch: dict[str, list[str]] = field(default_factory=dict)  # preset -> its jobs' sbatch options (slurm)


def check(ns: argparse.Namespace, extras: list[str]) -> SweepDesign:
    """Validate everything before training anything: presets, flags, grids, seeds, budgets. Raises
    ConfigError with a one-line message."""
    presets = [p.strip() for p in ns.presets.split(",") if p.strip()]
    if not presets or len(set(presets)) != len(presets):
        raise ConfigError(f"--presets ({ns.presets!r}) must name distinct presets")
    if min(ns.max_iters, ns.nproc or 1, ns.jobs, 1 if ns.threads is None else ns.threads) < 1:
        raise ConfigError("--max_iters, --nproc, --jobs and --threads must be >= 1")
    if ns.launcher not in ("local", "slurm"):
        raise ConfigError(f"--launcher {ns.launcher!r}: one of local, slurm")
    if ns.max_retries < 0 or ns.poll <= 0 or ns.gpu not in GPUS or not 0 < ns.mfu <= 1:
        raise ConfigError(f"--max_retries must be >= 0, --poll > 0, --mfu in (0, 1] and --gpu one of {', '.join(GPUS)}")
    if ns.launcher == "local" and (ns.sbatch_args or ns.wait):
        raise ConfigError("--sbatch_args and --wait need --launcher slurm")
    for preset in presets:
        get_config(preset)  # a clear error for an unknown name
    grids = parse_lr_grids(ns.lrs, presets)
    seeds, budgets = parse_seeds(ns.seeds), parse_budgets(ns.budgets, ns.max_iters)
    grid_seeds = len(seeds) if ns.grid_seeds is None else ns.grid_seeds
    budget_seeds = len(seeds) if ns.budget_seeds is None else ns.budget_seeds
    if not 1 <= grid_seeds <= len(seeds) or not 1 <= budget_seeds <= len(seeds):
        raise ConfigError(f"--grid_seeds and --budget_seeds must lie in 1..{len(seeds)} (the number of --seeds)")
    _, overrides, action = split_args(extras)
    clash = sorted({canonical_key(k) for k in overrides} & (CONTROLLED | ({"learning_rate"} if grids else set())))
    if action != "train" or clash:
        raise ConfigError(f"pass-through flags may not set {', '.join(clash) or action}: use compare's own options")
    design = SweepDesign(presets, {}, set(grids), seeds, grid_seeds, budgets, budget_seeds, None)
    for preset in presets:
        design.configs[preset] = parse(run_flags(Spec(preset, 0.0, seeds[0], ns.max_iters), design, ns, extras)).run
        design.grids[preset] = grids.get(preset) or [design.configs[preset].train.learning_rate]
        for lr in design.grids[preset]:  # each run's full configuration is valid, at every budget
            for steps in [ns.max_iters, *budgets]:
                parse(run_flags(Spec(preset, lr, seeds[0], steps), design, ns, extras))
    design.sbatch = parse_sbatch_args(ns.sbatch_args, presets)
    design.baseline = ns.baseline or pick_baseline(presets)
    if ns.baseline and ns.baseline not in presets:
        raise ConfigError(f"--baseline {ns.baseline!r} is not one of --presets")
    return design


def run_flags(spec: Spec, design: SweepDesign, ns: argparse.Namespace, extras: list[str]) -> list[str]:
    """train.py flags of one run: the same data, evaluation and schedule shape for every variant. A swept
    lr keeps the preset's min_lr / lr ratio (nanoGPT's lr / 10) unless the pass-through flags set min_lr."""
    flags = [f"--config={spec.preset}", *DEFAULT_FLAGS, *extras, *budget_flags(ns, spec.steps),
             f"--seed={spec.seed}"]
    if spec.preset in design.swept and spec.lr > 0:
        flags.append(f"--learning_rate={spec.lr!r}")
        base = design.configs.get(spec.preset)
        if base and base.train.min_lr and "min_lr" not in {canonical_key(k) for k in split_args(extras)[1]}:
            ratio = round(base.train.min_lr / base.train.learning_rate, 9)  # 0.1, not 0.10000000000000002
            flags.append(f"--min_lr={float(f'{spec.lr * ratio:.12g}')!r}")
    return flags


def eval_interval(ns: argparse.Namespace, steps: int | None = None) -> int:
    """Full-budget runs evaluate every --eval_interval steps; shorter budget runs only at start and end."""
    if steps is not None and steps != ns.max_iters:
        return steps
    return ns.eval_interval or max(1, ns.max_iters // 10)


def budget_flags(ns: argparse.Namespace, steps: int) -> list[str]:
    """Same steps, same cosine schedule length, same evaluation for every variant."""
    flags = [f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--eval_interval={eval_interval(ns, steps)}"]
    return flags + ([f"--eval_iters={ns.eval_iters}"] if ns.eval_iters else [])


def train_command(spec: Spec, design: SweepDesign, run_dir: Path, ns: argparse.Namespace, extras: list[str],
                  data_dir: Path, uri: str, parent_id: str | None) -> list[str]:
    launcher = [sys.executable]
    if (ns.nproc or 1) > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}"]
    return [*launcher, str(TRAIN_PY), *job_flags(spec, design, ns, extras, data_dir, run_dir, uri, parent_id),
            "--init_from=scratch"]


def job_flags(spec: Spec, design: SweepDesign, ns: argparse.Namespace, extras: list[str], data_dir: Path, run_dir: Path,
              uri: str, parent_id: str | None) -> list[str]:
    """train.py flags of one run, wherever it runs (a SLURM job resumes its own checkpoint: no --init_from)."""
    return [*run_flags(spec, design, ns, extras), f"--data_dir={data_dir}", f"--out_dir={run_dir}",
            f"--tracking_uri={uri}", f"--experiment={EXPERIMENT}",
            *([f"--parent_run_id={parent_id}"] if parent_id else [])]


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


# The files whose content decides what a run computes; their hash is stored with each run, and a reused run
# trained with other code gets a warning (delete its folder to retrain it).
NUMERICS = ["model.py", "engine.py", "schedule.py", "renorm/collective.py", "renorm/naive.py", "kernels.py",
            "data/loader.py"]


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in NUMERICS:
        path = ROOT / "letngpt" / name
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()[:12]


def same_flags(a: str, b: str) -> bool:
    """Two run keys name the same run: the same flags with the same values, numbers equal to 1e-9
    (a min_lr written as 0.00030000000000000003 by one version and 0.0003 by another is one run)."""
    def parsed(key: str) -> dict[str, str]:
        return dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in shlex.split(key))

    fa, fb = parsed(a), parsed(b)
    if fa.keys() != fb.keys():
        return False
    for k, va in fa.items():
        if va == fb[k]:
            continue
        try:
            if not math.isclose(float(va), float(fb[k]), rel_tol=1e-9):
                return False
        except ValueError:
            return False
    return True


def reuse(run_dir: Path, key: str, steps: int) -> bool:
    """True when run_dir holds a finished run of this command (resuming an interrupted sweep)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return same_flags((run_dir / "spec.txt").read_text(), key) and summary.get("final_step") == steps
    except (OSError, ValueError):
        return False


def run_key(spec: Spec, design: SweepDesign, ns: argparse.Namespace, extras: list[str], data_dir: Path) -> str:
    """What identifies a run's result: its flags and data (a finished run with the same key is reused)."""
    return shlex.join(run_flags(spec, design, ns, extras) + [f"--data_dir={data_dir}"]) + "\n"


def describe(spec: Spec) -> str:
    return f"{spec.preset} lr {spec.lr:g} seed {spec.seed} {spec.steps} steps"


def stale_code(run_dir: Path) -> str:
    made_with = (run_dir / "code.txt").read_text().strip() if (run_dir / "code.txt").exists() else "unknown"
    return "" if made_with == code_fingerprint() else f"; WARNING: trained with other model code ({made_with})"


def run_variant(spec: Spec, design: SweepDesign, ns: argparse.Namespace, extras: list[str], data_dir: Path, out: Path,
                uri: str, parent_id: str | None) -> Result:
    """Train one Spec from scratch in OUT/runs/<name> (or reuse its finished run) and collect its curve."""
    run_dir = out / "runs" / spec.name
    cmd = train_command(spec, design, run_dir, ns, extras, data_dir, uri, parent_id)
    key, label = run_key(spec, design, ns, extras, data_dir), describe(spec)
    start, returncode = time.time(), 0
    if reuse(run_dir, key, spec.steps):
        print(f"reusing {label} ({run_dir}){stale_code(run_dir)}", flush=True)
    elif ns.report_only or ns.dry_run:
        if ns.dry_run:
            print(shlex.join(cmd), flush=True)
        return Result(preset=spec.preset, lr=spec.lr, seed=spec.seed, budget=spec.steps, error=NOT_RUN)
    else:
        if run_dir.exists():  # unfinished or different: this one starts from scratch
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        print(f"training {label} (log: {run_dir / 'stdout.log'})", flush=True)
        threads = ns.threads or max(1, (os.cpu_count() or 1) // ns.jobs)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        with open(run_dir / "stdout.log", "w") as out_f, open(run_dir / "stderr.log", "w") as err_f:
            returncode = subprocess.run(cmd, cwd=Path.cwd(), env=env, stdout=out_f, stderr=err_f).returncode
        if returncode == 0:
            (run_dir / "code.txt").write_text(code_fingerprint() + "\n")
            (run_dir / "spec.txt").write_text(key)  # last: only a finished run is ever reused
    result = collect(run_dir, uri, returncode, Result(preset=spec.preset, lr=spec.lr, seed=spec.seed,
                                                      budget=spec.steps))
    if result.error:
        print(f"FAILED {label} after {time.time() - start:.0f}s:\n{result.error}", file=sys.stderr, flush=True)
    else:
        print(f"done {label}: final val loss {result.losses[-1]:.4f} in {time.time() - start:.0f}s", flush=True)
    return result


def collect(run_dir: Path, uri: str, returncode: int, result: Result) -> Result:
    """Fill `result` from a run folder: val curve, training time per eval step, speed; or the error."""
    stdout = (run_dir / "stdout.log").read_text(errors="replace")
    stderr = (run_dir / "stderr.log").read_text(errors="replace") if (run_dir / "stderr.log").exists() else ""
    summary_file = run_dir / "summary.json"
    if returncode != 0 or not summary_file.exists():
        result.error = f"exit code {returncode}\n" + tail(stderr or stdout)
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
        result.error = "finished, but no val/loss point in MLflow or in metrics.jsonl"
    elif not math.isfinite(result.losses[-1]):
        result.error = f"diverged: final val loss {result.losses[-1]}"
    return result


def run_all(specs: list[Spec], train_one: Callable[[Spec], Result], jobs: int) -> list[Result]:
    """Every spec, `jobs` at a time (threads waiting on training processes), results in spec order."""
    if jobs <= 1 or len(specs) <= 1:
        return [train_one(s) for s in specs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(train_one, specs))


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"


def log_to_parent(tracker: Tracker, report: dict, design: SweepDesign, extra: list[Path]) -> None:
    """The table as parent-run metrics (`<preset>/<column>`) and params, the report files as artifacts."""
    metrics: dict[str, float | None] = {"target_val_loss": report["target"]}
    for row in report["rows"]:
        for key in ("final_val_mean", "final_val_std", "steps_to_target_curve", "step_ratio_vs_baseline",
                    "time_to_target_s", "tokens_per_s", "wall_time_s", "lr", "paired_diff_mean", "paired_diff_std",
                    "paired_ci95_low", "paired_ci95_high"):
            metrics[f"{row['preset']}/{key}"] = row.get(key)
    tracker.log_metrics(metrics, step=0)
    tracker.log_params({"best_lr": {r["preset"]: r["lr"] for r in report["rows"]}})
    for path in [*report["paths"].values(), *extra]:
        tracker.log_artifact(path)


def prepare(ns: argparse.Namespace) -> Path:
    """The data folder; the built-in Tiny Shakespeare folders are prepared when missing."""
    data_dir = Path(ns.data_dir)
    if not (data_dir / "meta.json").exists():
        from letngpt.data.prepare import ensure_builtin

        print(f"preparing {data_dir}", flush=True)
        if not ensure_builtin(ns.data_dir):
            raise ConfigError(f"--data_dir {ns.data_dir} is not a prepared dataset (no meta.json)")
    return data_dir.resolve()


def grid_order(spec: Spec, design: SweepDesign) -> tuple[int, int, int]:
    """Middle of every preset's grid first, then outwards, presets interleaved: an interrupted sweep has
    compared every preset at one lr before it refines any."""
    grid = sorted(design.grids[spec.preset])
    return abs(grid.index(spec.lr) - (len(grid) - 1) // 2), design.presets.index(spec.preset), grid.index(spec.lr)


def planned(design: SweepDesign, ns: argparse.Namespace, results: dict[Spec, Result]) -> tuple[list[Spec], dict]:
    """The runs the sweep has planned so far, and the best lr per preset: the lr grid on the grid seeds; then,
    for each preset whose grid has finished (or failed) in `results`, its best lr on the other seeds and the
    budget runs."""
    grid_seeds = design.seeds[:design.grid_seeds]
    specs = [Spec(p, lr, s, ns.max_iters) for p in design.presets for lr in design.grids[p] for s in grid_seeds]
    specs.sort(key=lambda spec: grid_order(spec, design))
    grid = [results.get(s) or pending(s) for s in specs]
    best = choose_best(group_results(grid, specs), ns.max_iters, grid_seeds)
    unfinished = {s.preset for s, r in zip(specs, grid, strict=True) if r.error == NOT_RUN}
    ready = [p for p in design.presets if p not in unfinished]
    more = [Spec(p, best[p]["lr"], s, ns.max_iters) for p in ready for s in design.seeds[design.grid_seeds:]]
    more += [Spec(p, best[p]["lr"], s, b) for b in design.budgets for p in ready
             for s in design.seeds[:design.budget_seeds]]
    return specs + more, best


def pending(spec: Spec) -> Result:
    return Result(preset=spec.preset, lr=spec.lr, seed=spec.seed, budget=spec.steps, error=NOT_RUN)


class Launcher(Protocol):
    """Runs a sweep's runs: `launch(specs)` returns each one's Result, NOT_RUN for those still queued or running
    (or, with --report_only / --dry_run, not run); `wait`: whether sweep polls until none is left."""

    wait: bool
    poll_s: float

    def launch(self, specs: list[Spec]) -> list[Result]: ...


@dataclass
class LocalLauncher:
    """Every run a subprocess here, `jobs` at a time; launch() returns when they have all ended."""

    train_one: Callable[[Spec], Result]
    jobs: int
    wait: bool = False
    poll_s: float = 0.0

    def launch(self, specs: list[Spec]) -> list[Result]:
        return run_all(specs, self.train_one, self.jobs)


def sweep(design: SweepDesign, ns: argparse.Namespace, launcher: Launcher) -> tuple[list[Spec], list[Result], dict]:
    """Run each stage as soon as it is planned: the grid, then each preset's best lr on the other seeds and
    budgets. A launcher that leaves runs queued returns after one pass unless it waits (slurm --wait)."""
    results: dict[Spec, Result] = {}
    while True:
        specs, best = planned(design, ns, results)
        todo = [s for s in specs if results.get(s, pending(s)).error == NOT_RUN]
        if not todo:
            break
        results.update(zip(todo, launcher.launch(todo), strict=True))
        if any(results[s].error == NOT_RUN for s in todo):
            if not launcher.wait:
                break
            time.sleep(launcher.poll_s)
    specs, best = planned(design, ns, results)
    return specs, [results.get(s) or pending(s) for s in specs], best


PARENT_FILE = "parent_run.json"  # the MLflow parent run of a SLURM sweep, kept across invocations


def stored_parent(out: Path, uri: str) -> str | None:
    try:
        record = json.loads((out / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get("parent_run_id") if record.get("tracking_uri") == uri else None


def finished_run(sub: Submission, uri: str) -> Result | None:
    """The collected Result when sub.run_dir holds this run finished, else None. A SLURM job's run is marked
    finished (spec.txt, code.txt: what reuse() reads) the first time its summary says max_iters."""
    if not reuse(sub.run_dir, sub.key, sub.spec.steps):
        record = read_record(sub.run_dir)
        try:
            summary = json.loads((sub.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        if (not record or not same_flags(record.get("key", ""), sub.key) or summary.get("stop_reason") != "max_iters"
                or summary.get("final_step") != sub.spec.steps):
            return None
        (sub.run_dir / "code.txt").write_text(f"{record.get('code', 'unknown')}\n")
        (sub.run_dir / "spec.txt").write_text(sub.key)
    spec = sub.spec
    result = collect(sub.run_dir, uri, 0, Result(preset=spec.preset, lr=spec.lr, seed=spec.seed, budget=spec.steps))
    if result.error:
        print(f"FAILED {sub.label}:\n{result.error}", file=sys.stderr, flush=True)
    else:
        print(f"done {sub.label}: final val loss {result.losses[-1]:.4f}{stale_code(sub.run_dir)}", flush=True)
    return result


def make_launcher(design: SweepDesign, ns: argparse.Namespace, extras: list[str], data_dir: Path, out: Path, uri: str,
                  parent_id: str | None) -> Launcher:
    """The local launcher (today's subprocesses) or the SLURM one (letngpt.compare.slurm), same runs either way."""
    if ns.launcher == "local":
        return LocalLauncher(lambda spec: run_variant(spec, design, ns, extras, data_dir, out, uri, parent_id), ns.jobs)

    def submission(spec: Spec) -> Submission:
        run_dir = out / "runs" / spec.name
        return Submission(spec, run_dir, run_key(spec, design, ns, extras, data_dir),
                          job_flags(spec, design, ns, extras, data_dir, run_dir, uri, parent_id), describe(spec),
                          code_fingerprint())

    env = {**os.environ, "LETNGPT_ROOT": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if ns.nproc:
        env["LETNGPT_NPROC_PER_NODE"] = str(ns.nproc)
    if ns.threads:
        env["OMP_NUM_THREADS"] = str(ns.threads)
    return SlurmLauncher(submission, design.sbatch, env, max_retries=ns.max_retries, wait=ns.wait, poll_s=ns.poll,
                         finished=lambda sub: finished_run(sub, uri), same_run=same_flags, dry_run=ns.dry_run,
                         report_only=ns.report_only)


def cost_plan(design: SweepDesign, ns: argparse.Namespace) -> str:
    """Runs per stage, GPU-hours and wall time (letngpt.compare.cost); a layout that cannot run is a PlanError."""
    costs = {p: run_cost(p, design.configs[p], sbatch_resources(design.sbatch.get(p, []), ns.nproc or
                                                             (None if ns.launcher == "slurm" else 1)), ns.gpu, ns.mfu)
             for p in design.presets}
    staged = stages(design.presets, design.grids, len(design.seeds), design.grid_seeds, design.budgets,
                    design.budget_seeds, ns.max_iters)
    return estimate(costs, staged, ns.gpu, ns.mfu)[0]


def start_parent(ns: argparse.Namespace, design: SweepDesign, out: Path, uri: str, data_dir: Path, extras: list[str],
                 command: str) -> tuple[Tracker, str | None]:
    """The sweep's MLflow parent run; a SLURM sweep keeps one across invocations (OUT/parent_run.json)."""
    tracker = Tracker(out, tracking_uri=uri, experiment=EXPERIMENT, run_name=f"compare {','.join(design.presets)}",
                      enabled=not ns.report_only)
    parent_id = tracker.start(
        run_id=stored_parent(out, uri) if ns.launcher == "slurm" else None,
        params={"presets": ",".join(design.presets), "max_iters": ns.max_iters, "lrs": " ".join(ns.lrs) or "preset",
                "seeds": ns.seeds, "budgets": ns.budgets or "none", "baseline": design.baseline,
                "data_dir": str(data_dir), "nproc": ns.nproc or 1, "jobs": ns.jobs, "extra_flags": shlex.join(extras),
                "eval_interval": eval_interval(ns), "eval_iters": ns.eval_iters or "preset",
                "launcher": ns.launcher},
        tags={"kind": "compare", "command": command, "git_commit": git_commit() or "unknown"})
    if ns.launcher == "slurm" and parent_id:
        (out / PARENT_FILE).write_text(json.dumps({"parent_run_id": parent_id, "tracking_uri": uri}) + "\n")
    print(f"MLflow: {uri}, experiment {EXPERIMENT}, parent run {parent_id}", flush=True)
    return tracker, parent_id


def setup(argv: list[str]) -> tuple[argparse.Namespace, list[str], SweepDesign, Path]:
    """Everything checked before anything runs: options, data, SLURM's tools; the plan printed (slurm or
    --dry_run). Raises ConfigError / DataError (one line, exit 2)."""
    ns, extras = parse_args(argv)
    design = check(ns, extras)
    data_dir = prepare(ns)
    if not TRAIN_PY.exists():
        raise ConfigError(f"{TRAIN_PY} not found: run from a letngpt checkout")
    if ns.launcher == "slurm" and not ns.dry_run:
        require_slurm()
    if ns.launcher == "slurm" or ns.dry_run:
        print(cost_plan(design, ns), flush=True)
    return ns, extras, design, data_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns, extras, design, data_dir = setup(argv)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(ns.out).resolve()
    uri = ns.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out}/mlflow.db"
    if ns.dry_run:  # one pass that prints what it would run now
        print("dry run: the commands of what would run now (later stages follow from the grid's results); "
              "PARENT_RUN_ID stands for the MLflow parent run created at submission", flush=True)
        parent = stored_parent(out, uri) or "PARENT_RUN_ID"
        sweep(design, ns, make_launcher(design, ns, extras, data_dir, out, uri, parent))
        return 0
    try:
        launcher = make_launcher(design, ns, extras, data_dir, out, uri, None)
        if isinstance(launcher, SlurmLauncher) and not ns.report_only:
            launcher.check(design.presets)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "letngpt.compare", *(a for a in argv if a != "--report_only")])
    tracker, parent_id = start_parent(ns, design, out, uri, data_dir, extras, command)
    started = time.time()
    try:
        swept = sweep(design, ns, make_launcher(design, ns, extras, data_dir, out, uri, parent_id))
    except ConfigError as e:  # sbatch refused a job, squeue failed: what was submitted is recorded
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ns.launcher != "slurm":
            raise
        print("interrupted: the submitted jobs go on; run the same command again to collect them", file=sys.stderr)
        return 130
    where = (f"one SLURM job per run (sbatch {shlex.join(design.sbatch[design.presets[0]])})" if ns.launcher == "slurm"
             else f"{ns.nproc or 1} process(es) per run, {ns.jobs} run(s) at a time, on {machine()}")
    header = (f"# Convergence comparison\n\n`{command}`\n\nData `{data_dir}`, {ns.max_iters} steps per full run, "
              f"seeds {' '.join(map(str, design.seeds))}, {where}, {time.strftime('%Y-%m-%d')}; this invocation took "
              f"{time.time() - started:.0f} s.")
    report, done = finish(design, ns, out, swept, header, data_dir.name,
                          {"command": command, "parent_run_id": parent_id, "tracking_uri": uri})
    log_to_parent(tracker, report, design, [out / "results.json"])
    return conclude(tracker, report, done, len(swept[0]) - len(done))


def conclude(tracker: Tracker, report: dict, done: list[Result], waiting: int) -> int:
    """Close the parent run (a sweep with runs still queued keeps it RUNNING), print the table; exit code."""
    failed = [r for r in done if not r.ok]
    if not waiting:
        tracker.end("FAILED" if failed else "FINISHED")
    print(f"\nreport: {report['paths']['md']}, {report['paths']['png']} and {report['paths']['flops_png']}")
    if waiting:
        print(f"{waiting} run(s) queued, running or not planned yet: run the same command again later to collect "
              "them and submit the next stage (or add --wait)")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.preset} lr {r.lr:g} seed {r.seed}" for r in failed))
    print(report["table"], flush=True)
    return 1 if failed else 0


def finish(design: SweepDesign, ns: argparse.Namespace, out: Path, swept: tuple[list[Spec], list[Result], dict],
           header: str, data_name: str, ids: dict) -> tuple[dict, list[Result]]:
    """Group the finished runs, write the report files (letngpt.compare.report) and results.json; returns the
    report and the finished runs (--report_only leaves the others out, listed as not run yet)."""
    specs, results, best = swept
    done = [(s, r) for s, r in zip(specs, results, strict=True) if r.error != NOT_RUN]
    missing = [s.name for s, r in zip(specs, results, strict=True) if r.error == NOT_RUN]
    trained = sum(r.wall_time_s or 0.0 for _, r in done)
    header += f" Training loops of the {len(done)} finished runs: {trained / 3600:.2f} h in all (sum of wall times)."
    if missing:
        header += (f"\n\n**Partial sweep: {len(done)} of {len(specs)} planned runs finished** (rerun the "
                   f"command without --report_only to finish it; the seed and budget runs of a preset are planned "
                   f"once its lr grid has finished). Not run yet: {', '.join(missing)}.")
    groups = group_results([r for _, r in done], [s for s, _ in done])
    costs = {p: model_costs(c.model, c.train.batch_size * c.model.block_size * c.train.gradient_accumulation_steps)
             for p, c in design.configs.items()}
    report = write_sweep_report(groups, best, costs, design.baseline, ns.max_iters, out, header,
                                f"{data_name}: {ns.max_iters} steps, {', '.join(design.presets)}")
    details = {**ids, "experiment": EXPERIMENT, "baseline": design.baseline, "target_val_loss": report["target"],
               "best": best, "costs": costs,
               "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["rows"]],
               "grid": report["grid"], "runs": [vars(r) for _, r in done], "not_run_yet": missing}
    (out / "results.json").write_text(json.dumps(details, indent=2))
    return report, [r for _, r in done]


if __name__ == "__main__":
    sys.exit(main())
