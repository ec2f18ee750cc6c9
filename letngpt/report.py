"""The arithmetic and the files of a convergence comparison, kept free of training and MLflow.

Everything here is a pure function of validation curves, so the numbers a report claims (steps to reach
the baseline's loss, the ratio to the baseline) can be unit-tested on synthetic curves.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NOT_REACHED = "not reached"
COLUMNS = ["preset", "lr", "final_val_loss", "steps_to_target", "step_ratio_vs_baseline", "time_to_target_s",
           "tokens_per_s", "wall_time_s"]
HEADERS = ["preset", "lr", "final val loss", "steps to baseline loss", "baseline steps / steps",
           "train time to baseline loss (s)", "tokens/s", "wall time (s)"]


@dataclass
class Result:
    """One training run of the comparison: its validation curve and speed, or why it failed.
    `times[i]` is the training time (sum of step times) after `steps[i]` steps."""

    preset: str
    lr: float
    steps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    run_id: str | None = None
    error: str | None = None
    seed: int | None = None  # set by sweeps (letngpt.sweep), which run every lr on several seeds
    budget: int | None = None  # the run's step budget (max_iters), set by sweeps

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.losses)

    @property
    def final_val_loss(self) -> float | None:
        return self.losses[-1] if self.ok else None


def steps_to_target(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First step at which the curve reaches `target` (loss <= target), linearly interpolated between the
    eval point that reached it and the one before; None if it never does. Evals are sparse, so reading
    off the eval step alone would overstate the steps by up to one eval interval."""
    for i, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        if not loss <= target:  # also skips NaN
            continue
        if i == 0 or not math.isfinite(losses[i - 1]):
            return float(step)
        s0, l0 = steps[i - 1], losses[i - 1]
        return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
    return None


def step_ratio(baseline_steps: float | None, steps: float | None) -> float | None:
    """Baseline steps / variant steps: > 1 means the variant needs fewer steps than the baseline."""
    if baseline_steps is None or steps is None:
        return None
    if steps == 0:
        return 1.0 if baseline_steps == 0 else math.inf
    return baseline_steps / steps


def training_time_at(logged: Sequence[tuple[float, float]], at_steps: Sequence[float]) -> list[float]:
    """Training seconds after each of `at_steps`, from (step, step_time_s) rows of metrics.jsonl.
    A logged step time stands for every step since the previous logged one, so the result is exact when
    every step is logged and an estimate otherwise; evaluation and checkpoint time are not counted."""
    if not logged:
        return [math.nan] * len(at_steps)
    rows = sorted(logged)
    xs, ys, prev, total = [0.0], [0.0], 0.0, 0.0
    for step, dt in rows:
        total += dt * (step - prev)
        xs.append(float(step))
        ys.append(total)
        prev = step
    return [float(v) for v in np.interp(at_steps, xs, ys)]


def pick_baseline(presets: Sequence[str]) -> str | None:
    """The plain-GPT preset: a name containing "GPT" but neither "nGPT" nor "LET"."""
    for name in presets:
        if "GPT" in name and "nGPT" not in name and "LET" not in name.upper():
            return name
    return None


def select_best(results: Sequence[Result]) -> list[Result]:
    """Per preset (in first-seen order), the run with the lowest final val loss; a preset whose runs all
    failed is represented by its first failure so the report still shows it."""
    best: dict[str, Result] = {}
    for r in results:
        cur = best.get(r.preset)
        if cur is None or (r.ok and (not cur.ok or r.final_val_loss < cur.final_val_loss)):
            best[r.preset] = r
    return list(best.values())


def build_table(best: Sequence[Result], baseline: str | None) -> tuple[list[dict], float | None]:
    """Rows of the report (COLUMNS as keys; None where a number does not exist) and the target loss: the
    baseline's final val loss. The baseline's own steps use the same rule as every other variant."""
    base = next((r for r in best if r.preset == baseline and r.ok), None)
    target = base.final_val_loss if base else None
    base_steps = steps_to_target(base.steps, base.losses, target) if base else None
    rows = []
    for r in best:
        steps = steps_to_target(r.steps, r.losses, target) if r.ok and target is not None else None
        time_to = None
        if steps is not None and r.times:
            time_to = float(np.interp(steps, r.steps, r.times))
        rows.append({"preset": r.preset, "lr": r.lr, "final_val_loss": r.final_val_loss, "steps_to_target": steps,
                     "step_ratio_vs_baseline": step_ratio(base_steps, steps), "time_to_target_s": time_to,
                     "tokens_per_s": r.tokens_per_s, "wall_time_s": r.wall_time_s,
                     "reached": steps is not None, "failed": not r.ok, "has_target": target is not None})
    return rows, target


def _cell(row: dict, key: str, *, markdown: bool) -> str:
    value = row[key]
    if row["failed"] and key not in ("preset", "lr"):
        return "failed" if key == "final_val_loss" else ""
    if key == "steps_to_target" and value is None:
        if row["has_target"]:
            return NOT_REACHED
        return "n/a" if markdown else ""
    if value is None:
        return "n/a" if markdown else ""
    if isinstance(value, str):
        return value
    if not markdown:
        return f"{value:g}" if key == "lr" else repr(float(value))
    if key in ("time_to_target_s", "wall_time_s"):  # seconds: tiny smoke runs take milliseconds
        return f"{value:.1f}" if value >= 10 else f"{value:.3f}"
    formats = {"lr": "{:g}", "final_val_loss": "{:.4f}", "steps_to_target": "{:.1f}",
               "step_ratio_vs_baseline": "{:.2f}", "tokens_per_s": "{:.0f}"}
    return formats[key].format(value)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(_cell(r, k, markdown=True) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r, k, markdown=False) for k in COLUMNS])


def write_sweep_csv(results: Sequence[Result], path: Path) -> None:
    """Every (preset, lr) run, for learning-rate sweeps."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["preset", "lr", "final_val_loss", "run_id", "error"])
        for r in results:
            loss = "" if r.final_val_loss is None else repr(r.final_val_loss)
            error = (r.error or "").strip().splitlines()
            w.writerow([r.preset, f"{r.lr:g}", loss, r.run_id or "", error[-1] if error else ""])


def plot_curves(best: Sequence[Result], path: Path, target: float | None = None, title: str = "") -> None:
    """Validation loss against steps and against training time, one line per variant. Uses the Agg canvas
    directly, so it neither needs a display nor changes the caller's pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax_steps, ax_time = fig.subplots(1, 2, sharey=True)
    for r in best:
        if not r.ok:
            continue
        label = f"{r.preset} (lr {r.lr:g})"
        ax_steps.plot(r.steps, r.losses, marker="o", markersize=3, label=label)
        if r.times and all(math.isfinite(t) for t in r.times):
            ax_time.plot(r.times, r.losses, marker="o", markersize=3, label=label)
    for ax in (ax_steps, ax_time):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="baseline final val loss")
        ax.grid(True, alpha=0.3)
    ax_steps.set_xlabel("optimizer steps")
    ax_steps.set_ylabel("validation loss")
    ax_time.set_xlabel("training time (s): sum of step times, without evals and checkpoints")
    ax_steps.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def write_report(results: Sequence[Result], out: Path, baseline: str | None, header: str = "",
                 title: str = "") -> dict:
    """val_loss.png, results.csv, results.md and sweep.csv in `out`; returns rows, target and paths."""
    out.mkdir(parents=True, exist_ok=True)
    best = select_best(results)
    rows, target = build_table(best, baseline)
    paths = {"png": out / "val_loss.png", "csv": out / "results.csv", "md": out / "results.md",
             "sweep": out / "sweep.csv"}
    plot_curves(best, paths["png"], target, title=title)
    write_csv(rows, paths["csv"])
    write_sweep_csv(results, paths["sweep"])
    table = markdown_table(rows)
    target_text = f"{target:.4f}" if target is not None else "n/a (no successful baseline)"
    notes = [
        f"Baseline: `{baseline}`; target = its final val loss = {target_text}.",
        "Steps to baseline loss: first eval where val loss <= target, linearly interpolated between evals; the "
        "baseline uses the same rule. Ratio > 1: fewer steps than the baseline.",
        "Train time: sum of optimizer step times (no evals/checkpoints). tokens/s: median over logged steps. "
        "Wall time: the trainer's training loop with evals and checkpoint saves, without start-up.",
    ]
    if len(best) < len(results):
        notes.append("Each preset shows its best learning rate by final val loss; sweep.csv lists every run.")
    failures = [f"### {r.preset} lr {r.lr:g} failed\n\n```\n{r.error}\n```" for r in results if r.error]
    body = [header.strip(), table, "\n".join(f"- {n}" for n in notes), *failures]
    paths["md"].write_text("\n\n".join(b for b in body if b) + "\n")
    return {"rows": rows, "target": target, "table": table, "paths": paths, "best": best}
