"""The arithmetic of a tuned, multi-seed, budget-based comparison, free of training and MLflow.

A sweep trains every (preset, learning rate) on one or more seeds at the full step budget, picks each
preset's best learning rate on the mean final validation loss, and (optionally) trains that learning rate
again at smaller step budgets, each with its own full cosine schedule (the preset's warmup is kept, not
scaled: 100 of a 250-step char schedule for GPT). The nGPT paper measures "steps to reach a loss" that
way. A point read off one long schedule differs from a separate run at that budget, but not in one
direction: on the char sweep (docs/sweeps/char_tinyshakespeare) it was higher for GPT, LET-nGPT and
LET-Transformer at 250, 500 and 1000 steps, lower for nGPT and matched LET-nGPT at 250 and 500 (11 cells
one way, 4 the other), so the report gives both readings. Within a seed every preset sees the same
batches and evaluation windows, so presets are compared by per-seed paired differences against the
baseline. Everything here is a pure function of command-line text and finished runs, so the numbers a
report claims are unit-tested on synthetic curves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from letngpt.compare.curves import Result
from letngpt.config import ConfigError, ModelConfig

DEFAULT_SEED = 1337  # TrainConfig's: seed count N means 1337, 1338, ...
NOT_RUN = "not run yet"  # the error of a planned run that has no finished folder (compare --report_only)


@dataclass(frozen=True)
class Spec:
    """One training run of a sweep. `steps` is its budget: max_iters = lr_decay_iters = steps (warmup_iters
    stays the preset's)."""

    preset: str
    lr: float
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.preset}_lr{self.lr:g}_seed{self.seed}_it{self.steps}"


@dataclass
class Group:
    """The seeds of one (preset, lr, steps): mean and standard deviation of the final loss and the curve."""

    preset: str
    lr: float
    steps: int
    runs: list[Result]

    @property
    def ok_runs(self) -> list[Result]:
        return [r for r in self.runs if r.ok and math.isfinite(r.final_val_loss)]

    @property
    def ok(self) -> bool:
        return bool(self.ok_runs) and len(self.ok_runs) == len(self.runs)

    @property
    def final_mean(self) -> float | None:
        return statistics.fmean(r.final_val_loss for r in self.ok_runs) if self.ok else None

    @property
    def final_std(self) -> float | None:
        """Sample standard deviation over seeds (0 for one seed)."""
        if not self.ok:
            return None
        finals = [r.final_val_loss for r in self.ok_runs]
        return statistics.stdev(finals) if len(finals) > 1 else 0.0

    def mean_curve(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """(steps, mean loss, std loss, mean training time) over the eval steps every seed has."""
        runs = self.ok_runs
        if not runs:
            return [], [], [], []
        common = sorted(set.intersection(*(set(r.steps) for r in runs)))
        losses = np.array([[dict(zip(r.steps, r.losses, strict=True))[s] for s in common] for r in runs])
        times = np.array([[dict(zip(r.steps, r.times or [math.nan] * len(r.steps), strict=True))[s] for s in common]
                          for r in runs])
        std = losses.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
        return common, losses.mean(axis=0).tolist(), std.tolist(), times.mean(axis=0).tolist()

    def mean_of(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.ok_runs if getattr(r, attr) is not None]
        return statistics.fmean(values) if values else None


# --- the command line ---------------------------------------------------------------------------------------


def parse_numbers(text: str, what: str, cast: type = float) -> list:
    """Comma-separated numbers, or a one-line ConfigError naming the option and the bad item."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [cast(float(x)) if cast is int and float(x).is_integer() else cast(x) for x in items]
    except ValueError:
        raise ConfigError(f"{what} ({text!r}) must be comma-separated {cast.__name__} values") from None
    if not values:
        raise ConfigError(f"{what} ({text!r}) lists nothing")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} ({text!r}) lists a value twice")
    return values


def parse_seeds(text: str) -> list[int]:
    """`3` = three seeds from 1337 (1337, 1338, 1339); `1,2,7` = those seeds; `42,` = the one seed 42."""
    if "," not in text:
        count = parse_numbers(text, "--seeds", int)[0]
        if count < 1:
            raise ConfigError(f"--seeds ({text!r}) must be a count >= 1 or a comma-separated list of seeds")
        return [DEFAULT_SEED + i for i in range(count)]
    seeds = parse_numbers(text, "--seeds", int)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds ({text!r}) must be >= 0")
    return seeds


def parse_lr_grids(values: Sequence[str], presets: Sequence[str]) -> dict[str, list[float]]:
    """`--lrs` values: `PRESET=lr,lr,...` sets that preset's grid; a bare `lr,lr` applies to every preset
    without a grid of its own. Presets with neither are absent (they run at their preset's rate)."""
    default: list[float] | None = None
    grids: dict[str, list[float]] = {}
    for value in values:
        name, sep, text = value.rpartition("=") if "=" in value else ("", "", value)
        what = f"--lrs {name}" if sep else "--lrs"
        lrs = parse_numbers(text, what)
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ConfigError(f"{what} ({text!r}): learning rates must be finite and > 0")
        if not sep:
            if default is not None:
                raise ConfigError("--lrs: give one bare grid (for every preset) at most")
            default = lrs
        elif name not in presets:
            raise ConfigError(f"--lrs {name}=...: {name!r} is not one of --presets")
        elif name in grids:
            raise ConfigError(f"--lrs {name}=... is given twice")
        else:
            grids[name] = lrs
    return {p: grids.get(p, default) for p in presets if grids.get(p, default) is not None}


def parse_budgets(text: str, max_iters: int) -> list[int]:
    """Step budgets below the full one (which the main runs already are), ascending."""
    if not text:
        return []
    budgets = parse_numbers(text, "--budgets", int)
    if any(b < 1 or b > max_iters for b in budgets):
        raise ConfigError(f"--budgets ({text!r}) must lie in 1..max_iters ({max_iters})")
    return sorted(b for b in budgets if b != max_iters)


# --- choosing and measuring ---------------------------------------------------------------------------------


def group_results(results: Sequence[Result], specs: Sequence[Spec]) -> list[Group]:
    """Runs grouped by (preset, lr, steps) in first-seen order; `results[i]` belongs to `specs[i]`."""
    groups: dict[tuple, Group] = {}
    for r, s in zip(results, specs, strict=True):
        key = (s.preset, s.lr, s.steps)
        groups.setdefault(key, Group(s.preset, s.lr, s.steps, [])).runs.append(r)
    return list(groups.values())


def choose_best(groups: Sequence[Group], steps: int, seeds: Sequence[int] | None = None) -> dict[str, dict]:
    """Per preset: the lr with the lowest mean final loss at `steps` (over `seeds` when given, so every
    grid point is judged on the same seeds), and where it sits in the grid. Failed grid points lose;
    points not run yet are left out (a preset with none run gets its grid's middle, marked not ok)."""
    best: dict[str, dict] = {}
    for preset in dict.fromkeys(g.preset for g in groups):
        planned = sorted(g.lr for g in groups if g.preset == preset and g.steps == steps)
        grid = [g for g in groups if g.preset == preset and g.steps == steps
                and any(r.error != NOT_RUN for r in g.runs)]  # a partial sweep judges what has run
        if not grid:
            best[preset] = {"lr": planned[(len(planned) - 1) // 2], "grid": [], "edge": "", "ok": False}
            continue
        scored = []
        for g in grid:
            runs = [r for r in g.runs if seeds is None or r.seed in seeds]
            sub = Group(g.preset, g.lr, g.steps, runs)
            scored.append((sub.final_mean if sub.ok else math.inf, g.lr))
        loss, lr = min(scored)
        lrs = sorted(lr_ for _, lr_ in scored)
        edge = ""
        if len(lrs) > 1 and math.isfinite(loss):
            edge = "lowest in grid" if lr == lrs[0] else "highest in grid" if lr == lrs[-1] else ""
        best[preset] = {"lr": lr, "grid": lrs, "edge": edge, "ok": math.isfinite(loss)}
    return best


def budget_steps_to_target(budgets: Sequence[float], losses: Sequence[float | None],
                           target: float) -> tuple[float | None, str]:
    """Steps at which final loss (one full schedule per budget) reaches `target`: linear interpolation of
    loss against log(steps) between the budgets that bracket it. Returns (steps, text); steps is None
    with text "< B" when even the smallest budget B beats the target and "> B" when the largest misses it
    (nothing is extrapolated)."""
    points = sorted((b, loss) for b, loss in zip(budgets, losses, strict=True) if loss is not None)
    if not points:
        return None, "n/a"
    for i, (b, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return (float(b), f"{b:g}") if loss == target or len(points) == 1 else (None, f"< {b:g}")
            b0, l0 = points[i - 1]
            frac = (l0 - target) / (l0 - loss)
            steps = math.exp(math.log(b0) + frac * (math.log(b) - math.log(b0)))
            return steps, f"{steps:.0f}"
    return None, f"> {points[-1][0]:g}"


def model_costs(cfg: ModelConfig, tokens_per_step: int) -> dict[str, float]:
    """Non-embedding parameters (all but wte, lm_head and nGPT's logit scale s_z), training FLOPs per
    token counting every attention map (letngpt.model.flops) and the tokens one optimizer step consumes. The
    attention convention is recorded with them: reports computed before causal attention counted as half
    (docs/sweeps) carry none and say so."""
    import torch

    from letngpt.model import build_model
    from letngpt.model.flops import flops_per_token

    with torch.device("meta"):  # shapes only: the 1k presets would otherwise allocate 400M weights
        model = build_model(cfg)
    embedding = ("wte.", "lm_head.", "s_z.")
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(embedding))
    return {"non_embedding_params": params, "flops_per_token": flops_per_token(cfg),
            "tokens_per_step": tokens_per_step, "attention_flops": "causal_half"}


# --- paired statistics --------------------------------------------------------------------------------------


def t_quantile(dof: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t with `dof` degrees of freedom (scipy, via mlflow)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def paired_difference(variant: Group, baseline: Group) -> dict:
    """Final val loss of `variant` minus `baseline`, seed by seed, over the seeds both finished: within a
    seed both saw the same batches and evaluation windows, so the seed's own luck cancels and only the
    difference between the models is left. Mean, sample std and the 95% t-interval of the mean
    (mean +- t(0.975, n - 1) * std / sqrt(n)); std and interval are None below two seeds."""
    base = {r.seed: r.final_val_loss for r in baseline.ok_runs}
    diffs = [r.final_val_loss - base[r.seed] for r in variant.ok_runs if r.seed in base]
    out: dict = {"paired_seeds": len(diffs), "paired_diff_mean": statistics.fmean(diffs) if diffs else None,
                 "paired_diff_std": None, "paired_ci95_low": None, "paired_ci95_high": None}
    if len(diffs) >= 2:
        std = statistics.stdev(diffs)
        half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
        mean = out["paired_diff_mean"]
        out.update(paired_diff_std=std, paired_ci95_low=mean - half, paired_ci95_high=mean + half)
    return out


def paired_words(preset: str, baseline: str, paired: dict) -> str:
    """One sentence on a paired difference, saying plainly when its interval contains 0."""
    n, mean = paired["paired_seeds"], paired["paired_diff_mean"]
    if mean is None:
        return f"{preset} - {baseline}: no seed on which both finished"
    if paired["paired_diff_std"] is None:
        return f"{preset} - {baseline}: {mean:+.4f} on {n} seed (no interval below two seeds)"
    low, high = paired["paired_ci95_low"], paired["paired_ci95_high"]
    text = (f"{preset} - {baseline}: {mean:+.4f} +- {paired['paired_diff_std']:.4f} (mean +- sample std of "
            f"{n} per-seed differences), 95% t-interval [{low:+.4f}, {high:+.4f}]")
    if low <= 0 <= high:
        return text + ": it contains 0, so these seeds do not resolve a difference"
    return text + f": {preset} is {'lower' if high < 0 else 'higher'} than {baseline} on these seeds"


def lr_margin(groups: Sequence[Group], preset: str, steps: int, best_lr: float) -> dict:
    """How firmly the grid picked `best_lr`: its margin over the runner-up (mean final loss over the seeds
    every grid point ran, as choose_best judged it) against the seed noise of such a margin, the
    standard error of a difference of two k-seed means, std * sqrt(2 / k), with std the sample std
    over the seeds at the best lr (conservative: shared batches cancel part of it)."""
    grid = [g for g in groups if g.preset == preset and g.steps == steps and any(r.error != NOT_RUN for r in g.runs)]
    out: dict = {"lr_runner_up": None, "lr_margin": None, "lr_seed_noise": None, "lr_grid_seeds": 0,
                 "lr_margin_note": ""}
    if len(grid) < 2:
        return out
    seeds = set.intersection(*({r.seed for r in g.runs if r.error != NOT_RUN} for g in grid))
    score = {}
    for g in grid:
        mean = Group(g.preset, g.lr, g.steps, [r for r in g.runs if r.seed in seeds]).final_mean
        score[g.lr] = math.inf if mean is None else mean
    best = next((g for g in grid if g.lr == best_lr), None)
    if not seeds or best is None or not math.isfinite(score[best_lr]):
        return out
    second, runner = min((v, lr) for lr, v in score.items() if lr != best_lr)
    if not math.isfinite(second):
        return out
    out.update(lr_runner_up=runner, lr_margin=second - score[best_lr], lr_grid_seeds=len(seeds))
    if best.ok and len(best.runs) >= 2:
        out["lr_seed_noise"] = best.final_std * math.sqrt(2 / len(seeds))
        if out["lr_margin"] < out["lr_seed_noise"]:
            out["lr_margin_note"] = (
                f"margin {out['lr_margin']:.4f} over lr {runner:g} is below the seed noise "
                f"{out['lr_seed_noise']:.4f}: not resolved on {len(seeds)} grid seed(s), rerun with "
                f"--grid_seeds > {len(seeds)}")
    return out
