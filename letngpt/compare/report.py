"""The files of a sweep (letngpt.compare.sweep): the table per preset at its best learning rate, the lr grid and
budget tables, every run, and two plots (loss against steps and time; loss against training FLOPs).

Definitions (also printed under the table):
- target: the baseline's mean final val loss at the full budget, at its best learning rate;
- steps to target (one schedule): where the mean curve of the full-budget runs first reaches the target,
  linearly interpolated between evals (the old reading, kept for comparison);
- steps to target (budget runs): final loss of SEPARATE runs at each budget, interpolated against
  log(steps) (letngpt.compare.sweep.budget_steps_to_target); "< B"/"> B" when the target lies outside the budgets;
- paired differences: each preset's final val loss minus the baseline's on the same seed, with a 95%
  t-interval (letngpt.compare.sweep.paired_difference).

`python -m letngpt.compare.report FOLDER` rewrites a finished sweep's files from its results.json alone (no run
folders needed); `--against nGPT` prints every preset's paired differences against another preset instead.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from letngpt.compare.curves import step_ratio, steps_to_target
from letngpt.compare.sweep import Group, budget_steps_to_target, lr_margin, paired_difference, paired_words

COLUMNS = ["preset", "lr", "lr_grid", "lr_note", "seeds", "final_val_mean", "final_val_std",
           "non_embedding_params", "flops_per_token", "total_flops", "steps_to_target_curve",
           "steps_to_target_budgets", "step_ratio_vs_baseline", "flops_to_target", "time_to_target_s",
           "tokens_per_s", "wall_time_s", "paired_diff_mean", "paired_diff_std", "paired_ci95_low",
           "paired_ci95_high", "lr_margin", "lr_seed_noise"]
HEADERS = ["preset", "best lr", "lr grid (run)", "best at grid edge?", "seeds", "final val (mean)", "std",
           "non-emb params", "train FLOPs/token", "total train FLOPs", "steps to target (one schedule)",
           "steps to target (budget runs)", "baseline steps / steps", "train FLOPs to target",
           "train time to target (s)", "tokens/s", "wall time (s)", "paired diff vs baseline (mean)",
           "paired diff (std)", "paired 95% low", "paired 95% high", "lr margin over runner-up",
           "seed noise of that margin"]


def _fmt(value, key: str) -> str:
    if value is None or value == "":
        return "n/a" if key not in ("lr_note",) else ""
    if isinstance(value, str):
        return value
    if key in ("non_embedding_params",):
        return f"{value / 1e6:.3f}M"
    if key in ("flops_per_token", "total_flops", "flops_to_target"):
        return f"{value:.3g}"
    if key in ("final_val_mean", "final_val_std", "paired_diff_std", "lr_margin", "lr_seed_noise"):
        return f"{value:.4f}"
    if key.startswith("paired_"):
        return f"{value:+.4f}"
    if key in ("lr",):
        return f"{value:g}"
    if key in ("step_ratio_vs_baseline",):
        return f"{value:.2f}"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3g}"


def preset_row(best: Group, best_info: dict, costs: dict, budget_groups: Sequence[Group], target: float | None,
               max_iters: int) -> dict:
    """One table row: `best` is the preset's full-budget group at its best lr."""
    steps, losses, _, times = best.mean_curve()
    curve_steps = steps_to_target(steps, losses, target) if target is not None and best.ok else None
    budgets = [g.steps for g in budget_groups] + [max_iters]
    finals = [g.final_mean for g in budget_groups] + [best.final_mean]
    budget_steps, budget_text = (None, "n/a")
    if target is not None and budget_groups:
        budget_steps, budget_text = budget_steps_to_target(budgets, finals, target)
    reach = budget_steps if budget_groups else curve_steps
    time_per_step = times[-1] / steps[-1] if steps and steps[-1] and math.isfinite(times[-1]) else None
    flops_step = costs["flops_per_token"] * costs["tokens_per_step"]
    return {
        "preset": best.preset, "lr": best.lr, "lr_grid": " ".join(f"{x:g}" for x in best_info["grid"]),
        "lr_note": best_info["edge"], "seeds": len(best.runs), "final_val_mean": best.final_mean,
        "final_val_std": best.final_std, "non_embedding_params": costs["non_embedding_params"],
        "flops_per_token": costs["flops_per_token"], "total_flops": flops_step * max_iters,
        "steps_to_target_curve": curve_steps, "steps_to_target_budgets": budget_text if budget_groups else None,
        "_reach": reach, "step_ratio_vs_baseline": None,
        "flops_to_target": reach * flops_step if reach is not None else None,
        "time_to_target_s": reach * time_per_step if reach is not None and time_per_step else None,
        "tokens_per_s": best.mean_of("tokens_per_s"), "wall_time_s": best.mean_of("wall_time_s"),
    }


def add_ratios(rows: list[dict], baseline: str | None) -> None:
    """Baseline steps / variant steps (budget-based when budgets ran): > 1 = fewer steps than the baseline."""
    base = next((r for r in rows if r["preset"] == baseline), None)
    for r in rows:
        if base:
            r["step_ratio_vs_baseline"] = step_ratio(base["_reach"], r["_reach"])


def markdown(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_fmt(r.get(k), k) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def grid_rows(groups: Sequence[Group]) -> list[dict]:
    """Every (preset, lr, steps): mean +- std over its seeds, for the lr-sweep and budget tables."""
    return [{"preset": g.preset, "lr": g.lr, "steps": g.steps, "seeds": " ".join(str(r.seed) for r in g.runs),
             "final_val_mean": g.final_mean, "final_val_std": g.final_std,
             "failed": sum(1 for r in g.runs if r not in g.ok_runs), "wall_time_s": g.mean_of("wall_time_s")}
            for g in groups]


GRID_COLUMNS = ["preset", "lr", "steps", "seeds", "final_val_mean", "final_val_std", "failed", "wall_time_s"]


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])
                        for k in columns])


def _band(ax, x, mean, std, label: str) -> None:
    line = ax.plot(x, mean, marker="o", markersize=2, label=label)[0]
    lo = [m - s for m, s in zip(mean, std, strict=True)]
    hi = [m + s for m, s in zip(mean, std, strict=True)]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)


def plot(best: Sequence[Group], budgets: dict[str, list[Group]], costs: dict[str, dict], target: float | None,
         paths: dict[str, Path], title: str) -> None:
    """val_loss.png: mean +- std against steps, training time and (with budgets) budget; val_loss_flops.png:
    against training FLOPs. The Agg canvas: no display needed, the caller's pyplot backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 3 if any(budgets.values()) else 2
    fig, fig_f = Figure(figsize=(6 * panels, 4.8), dpi=110), Figure(figsize=(7, 4.8), dpi=110)
    FigureCanvasAgg(fig), FigureCanvasAgg(fig_f)
    axes, ax_f = fig.subplots(1, panels, sharey=True), fig_f.subplots()
    shown: list[float] = []  # the y range leaves out step 0 (~ln(vocab)), which would squash the rest
    for g in best:
        steps, mean, std, times = g.mean_curve()
        if not steps:
            continue
        shown += [m for s, m in zip(steps, mean, strict=True) if s > 0] or mean
        label = f"{g.preset} (lr {g.lr:g}, {len(g.ok_runs)} seeds)"
        _band(axes[0], steps, mean, std, label)
        if all(math.isfinite(seconds) for seconds in times):
            _band(axes[1], times, mean, std, label)
        c = costs[g.preset]
        at = [i for i, s in enumerate(steps) if s > 0]  # log axis: step 0 has no place on it
        _band(ax_f, [steps[i] * c["flops_per_token"] * c["tokens_per_step"] for i in at], [mean[i] for i in at],
              [std[i] for i in at], label)
        if panels == 3 and budgets.get(g.preset):
            pts = sorted((b.steps, b.final_mean, b.final_std) for b in [*budgets[g.preset], g] if b.ok)
            shown += [p[1] + p[2] for p in pts]
            axes[2].errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o",
                             capsize=3, label=g.preset)
    labels = ["optimizer steps", "training time (s, sum of step times)", "step budget (separate runs)"]
    for ax, xlabel in zip([*axes, ax_f], [*labels[:panels], "training FLOPs"], strict=True):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target (baseline final)")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    if shown:
        pad = 0.05 * (max(shown) - min(shown)) or 0.05
        for ax in (axes[0], ax_f):  # axes share y
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
    if panels == 3:
        axes[2].set_xscale("log")
    ax_f.set_xscale("log")
    axes[0].set_ylabel("validation loss (mean +- std over seeds)")
    ax_f.set_ylabel("validation loss")
    axes[0].legend(fontsize=7)
    ax_f.legend(fontsize=7)
    for f, width in ((fig, 60 * panels), (fig_f, 80)):
        f.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=9)
        f.tight_layout()
    fig.savefig(paths["png"])
    fig_f.savefig(paths["flops_png"])


FLOPS_NOTE = ("Non-embedding params: all but the token embedding, lm_head and nGPT's logit scale. Train FLOPs: "
              "6 x matmul weights + attention (every map counted{how}), per token (letngpt.model.flops); total = x "
              "tokens.")
# How a sweep's FLOPs were counted (sweep.model_costs records it); sweeps made before issue 22 record none.
ATTENTION_COUNTS = {"causal_half": ", causal attention as half", None: ""}

NOTES = [
    "Each preset at its best learning rate (lowest mean final val loss over the grid seeds); `lowest/highest "
    "in grid` flags a best lr at the edge of its grid (the optimum may lie beyond it).",
    "target = the baseline's mean final val loss. Steps to target (one schedule): where the mean val curve "
    "first reaches it, interpolated between evals. Steps to target (budget runs): final val loss of separate "
    "runs, one full cosine schedule per budget, interpolated against log(steps); '< B' / '> B': outside the "
    "budgets run (not extrapolated). The ratio and FLOPs/time to target use the budget runs when there are any.",
    FLOPS_NOTE,
    "Train time to target: steps to target x the mean training time per step (no evals/checkpoints). Wall "
    "time: the trainer's loop with evals and checkpoint saves, mean over seeds.",
    "Paired diff: the preset's final val loss minus the baseline's on the same seed (same batches and "
    "evaluation windows), mean and sample std over the seeds both ran, and the 95% t-interval of the mean "
    "(mean +- t(0.975, n-1) std / sqrt(n)); negative = lower loss than the baseline.",
    "lr margin: the runner-up lr's mean final loss minus the best's, over the grid seeds k; its seed noise: "
    "the sample std over seeds at the best lr x sqrt(2 / k), the standard error of such a difference.",
]


def notes(costs: dict[str, dict]) -> str:
    """The report's footnotes; the FLOPs one says how this sweep's costs counted attention."""
    conventions = {c.get("attention_flops") for c in costs.values()}
    how = ATTENTION_COUNTS.get(conventions.pop(), "") if len(conventions) == 1 else " (mixed conventions)"
    return "\n".join(f"- {n.format(how=how) if n is FLOPS_NOTE else n}" for n in NOTES)


def stats_words(rows: Sequence[dict]) -> str:
    """The paired differences against the baseline and the learning-rate picks, in words."""
    paired = "\n".join(f"- {r['paired_note']}." for r in rows if r.get("paired_note"))
    picks = "\n".join(f"- {r['preset']}, lr {r['lr']:g}: {r['lr_margin_note']}." for r in rows
                      if r.get("lr_margin_note"))
    parts = ["## Paired differences against the baseline (final val loss, same seeds)", paired] if paired else []
    if picks:
        parts += ["## Learning-rate picks within the seed noise", picks]
    return "\n\n".join(parts)


def write_sweep_report(groups: Sequence[Group], best: dict[str, dict], costs: dict[str, dict],
                       baseline: str | None, max_iters: int, out: Path, header: str, title: str) -> dict:
    """results.md/.csv (one row per preset), grid.csv (every preset/lr/budget), runs.csv (every run) and
    the two plots; returns rows, target, the markdown table and the paths."""
    out.mkdir(parents=True, exist_ok=True)
    full = {(g.preset, g.lr): g for g in groups if g.steps == max_iters}
    best_groups = [full[(p, info["lr"])] for p, info in best.items() if (p, info["lr"]) in full]  # partial sweeps
    budgets = {g.preset: sorted((b for b in groups if b.preset == g.preset and b.lr == g.lr and b.steps < max_iters),
                                key=lambda b: b.steps) for g in best_groups}
    base = next((g for g in best_groups if g.preset == baseline and g.ok), None)
    target = base.final_mean if base else None
    rows = [preset_row(g, best[g.preset], costs[g.preset], budgets[g.preset], target, max_iters)
            for g in best_groups]
    add_ratios(rows, baseline)
    for row, g in zip(rows, best_groups, strict=True):
        row.update(lr_margin(groups, g.preset, max_iters, g.lr))
        if base is not None and g is not base:
            row.update(paired_difference(g, base))
            row["paired_note"] = paired_words(g.preset, baseline, row)
    paths = {"png": out / "val_loss.png", "flops_png": out / "val_loss_flops.png", "csv": out / "results.csv",
             "md": out / "results.md", "grid": out / "grid.csv", "runs": out / "runs.csv"}
    plot(best_groups, budgets, costs, target, paths, title)
    write_csv(rows, COLUMNS, paths["csv"])
    grid = grid_rows(groups)
    write_csv(grid, GRID_COLUMNS, paths["grid"])
    runs = [{"preset": g.preset, "lr": g.lr, "steps": g.steps, "seed": r.seed,
             "final_val_loss": r.final_val_loss if r.ok else None, "wall_time_s": r.wall_time_s,
             "tokens_per_s": r.tokens_per_s, "error": ((r.error or "").strip().splitlines() or [""])[-1]}
            for g in groups for r in g.runs]
    write_csv(runs, ["preset", "lr", "steps", "seed", "final_val_loss", "wall_time_s", "tokens_per_s", "error"],
              paths["runs"])
    table = markdown(rows, COLUMNS, HEADERS)
    target_text = f"{target:.4f}" if target is not None else "n/a (no successful baseline)"
    grid_md = markdown(grid, GRID_COLUMNS, ["preset", "lr", "steps", "seeds", "final val (mean)", "std",
                                            "failed runs", "wall time (s)"])
    failures = [f"### {g.preset} lr {g.lr:g} seed {r.seed} ({g.steps} steps) failed\n\n```\n{r.error}\n```"
                for g in groups for r in g.runs if r.error]
    body = [header.strip(), f"Baseline `{baseline}`; target = its mean final val loss = {target_text}.", table,
            notes(costs), stats_words(rows), "## Every (preset, lr, budget)", grid_md,
            *failures]
    paths["md"].write_text("\n\n".join(b for b in body if b) + "\n")
    return {"rows": rows, "target": target, "table": table, "paths": paths, "grid": grid}


def load_sweep(folder: Path) -> tuple[dict, list[Group]]:
    """A finished sweep's results.json and its runs grouped by (preset, lr, steps), in the order it ran them."""
    import json

    from letngpt.compare.curves import Result
    from letngpt.compare.sweep import Spec, group_results

    details = json.loads((folder / "results.json").read_text())
    runs = [Result(**r) for r in details["runs"]]
    return details, group_results(runs, [Spec(r.preset, r.lr, r.seed, r.budget) for r in runs])


def rebuild(folder: Path) -> dict:
    """Rewrite a sweep's report files from its own results.json (every run's val curve, the lr picks, the
    costs), without the run folders: how docs/sweeps' committed reports take a new column. The header
    (command, machine, date) is the old results.md's; results.json gains the new row keys."""
    import json
    import shlex

    details, groups = load_sweep(folder)
    max_iters = max(g.steps for g in groups)
    header = (folder / "results.md").read_text().split("\n\nBaseline `")[0]
    argv = shlex.split(details["command"])
    data_name = Path(argv[argv.index("--data_dir") + 1]).name if "--data_dir" in argv else folder.name
    report = write_sweep_report(groups, details["best"], details["costs"], details["baseline"], max_iters, folder,
                                header, f"{data_name}: {max_iters} steps, {', '.join(details['best'])}")
    details["rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["rows"]]
    details["grid"] = report["grid"]
    (folder / "results.json").write_text(json.dumps(details, indent=2))
    return report


def paired_against(folder: Path, reference: str) -> list[str]:
    """Every preset at its best lr against `reference` (a preset, or its suffix: `nGPT` finds `char_nGPT`) at
    its best lr, paired by seed, at every step budget both ran: the comparisons a report's baseline column
    does not make (LET-nGPT vs nGPT)."""
    details, groups = load_sweep(folder)
    best = {p: info["lr"] for p, info in details["best"].items()}
    reference = next((p for p in best if p == reference or p.endswith(f"_{reference}")), reference)
    if reference not in best:
        raise ValueError(f"--against {reference!r}: no such preset in {folder} (presets: {', '.join(best)})")
    at = {(g.preset, g.steps): g for g in groups if g.lr == best[g.preset]}
    return [f"{steps} steps: {paired_words(preset, reference, paired_difference(g, at[(reference, steps)]))}"
            for (preset, steps), g in sorted(at.items(), key=lambda kv: kv[0][1])
            if preset != reference and (reference, steps) in at]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m letngpt.compare.report", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="sweep report folders holding results.json")
    p.add_argument("--against", default=None, metavar="PRESET",
                   help="print paired differences against PRESET at every budget instead of rewriting the files")
    ns = p.parse_args(argv)
    for folder in ns.folders:
        try:
            if not (folder / "results.json").exists():
                raise ValueError(f"{folder}: no results.json (not a sweep report folder)")
            print("\n".join(paired_against(folder, ns.against)) if ns.against else rebuild(folder)["paths"]["md"])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
