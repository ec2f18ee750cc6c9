"""What a sweep costs, printed before anything is submitted: runs per stage, and the GPU-hours and wall time
of each run and of the whole sweep at the nodes and GPUs each run gets.

The figures are letngpt.tools.plan's model (step time = the step's FLOPs at the GPU's peak x MFU, plus the TP, ZeRO
and renormalisation communication, not overlapped), times the steps of each run; evaluation, checkpoints,
start-up and queueing are not in them. The nodes and GPUs per node are read from the run's sbatch options
(`-N/--nodes`, `--gpus-per-node`, `--gres=gpu:N`, `-G/--gpus`), or from --nproc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from letngpt.config import RunConfig
from letngpt.tools.plan import Cluster, PlanError, capacity


@dataclass(frozen=True)
class Resources:
    """What one run of a preset is given: nodes, and processes (GPUs) per node; None when not known."""

    nodes: int
    per_node: int | None


def _count(value: str) -> int:
    """The last number of `2`, `h100:8` or `2-4` (a node range: its minimum, what SLURM may give)."""
    numbers = re.findall(r"\d+", value.split("-")[0] if re.fullmatch(r"\d+-\d+", value) else value)
    return int(numbers[-1]) if numbers else 0


def sbatch_resources(args: list[str], nproc: int | None) -> Resources:
    """Nodes and GPUs per node from sbatch options (the last occurrence wins, as in sbatch); --nproc (processes
    per node) takes the place of GPUs per node when given."""
    opts: dict[str, str] = {}
    names = {"-N": "nodes", "--nodes": "nodes", "--gpus-per-node": "gpn", "--gres": "gres", "-G": "gpus",
             "--gpus": "gpus"}
    for i, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name in names:
            if not sep:
                value = args[i + 1] if i + 1 < len(args) else ""
            opts[names[name]] = value
        elif re.fullmatch(r"-[NG]\d+", arg):  # -N2, -G8
            opts[names[arg[:2]]] = arg[2:]
    nodes = max(1, _count(opts.get("nodes", "1")))
    per_node: int | None = None
    if "gpn" in opts:
        per_node = _count(opts["gpn"])
    elif "gres" in opts and "gpu" in opts["gres"]:
        per_node = _count(next(g for g in opts["gres"].split(",") if g.startswith("gpu")))
    elif "gpus" in opts:
        per_node = max(1, _count(opts["gpus"]) // nodes)
    return Resources(nodes, nproc if nproc else (per_node or None))


@dataclass
class RunCost:
    """One preset at its resources: seconds per optimizer step and GPUs, by letngpt.tools.plan."""

    preset: str
    res: Resources
    step_s: float | None
    note: str = ""

    @property
    def gpus(self) -> int | None:
        return self.res.nodes * self.res.per_node if self.res.per_node else None

    def hours(self, steps: int) -> float | None:
        return self.step_s * steps / 3600 if self.step_s is not None else None

    def gpu_hours(self, steps: int) -> float | None:
        h = self.hours(steps)
        return h * self.gpus if h is not None and self.gpus else None


def run_cost(preset: str, run: RunConfig, res: Resources, gpu: str, mfu: float) -> RunCost:
    """letngpt.tools.plan's step time for `run` on `res`; a PlanError (a layout that cannot run) propagates."""
    if not res.per_node:
        return RunCost(preset, res, None, "GPUs per node unknown: give --sbatch_args='--gpus-per-node=N' or --nproc")
    train_cfg = run.train
    try:
        p = capacity(run, Cluster(res.nodes, res.per_node, train_cfg.tp, train_cfg.zero_stage, gpu, mfu))
    except PlanError as e:
        raise PlanError(f"{preset} on {res.nodes} node(s) x {res.per_node} GPUs: {e}") from None
    return RunCost(preset, res, p["step_s"], "" if p["fits"] else "DOES NOT FIT in GPU memory (estimate)")


def stages(presets: list[str], grids: dict[str, list[float]], seeds: int, grid_seeds: int, budgets: list[int],
           budget_seeds: int, max_iters: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(stage name, [(preset, steps, runs)]): the lr grid on the grid seeds, then each preset's best lr on the
    other seeds at the full budget and on the budget seeds at every smaller budget."""
    grid = [(p, max_iters, len(grids[p]) * grid_seeds) for p in presets]
    more = [(p, max_iters, seeds - grid_seeds) for p in presets if seeds > grid_seeds]
    more += [(p, b, budget_seeds) for p in presets for b in budgets]
    named = [("stage 1, the lr grid", grid), ("stage 2, the best lr on the other seeds and budgets", more)]
    return [(name, rows) for name, rows in named if rows]


def _h(value: float | None, unit: str = "h") -> str:
    if value is None:
        return "n/a" if unit == "h" else f"n/a {unit}"
    return f"{value:,.1f} {unit}" if value >= 10 else f"{value:.3g} {unit}"


def estimate(costs: dict[str, RunCost], staged: list[tuple[str, list[tuple[str, int, int]]]], gpu: str,
             mfu: float) -> tuple[str, dict]:
    """The printed plan and its figures: per preset a full run's hours and GPU-hours, per stage its runs,
    GPU-hours and longest run, for the sweep its GPU-hours and wall time run one at a time or a stage at once."""
    lines = [f"plan (ESTIMATES, letngpt.tools.plan's model: {gpu} at MFU {mfu:.0%}, compute + communication, no evals, "
             "checkpoints, start-up or queueing):"]
    for c in costs.values():
        where = f"{c.res.nodes} node(s) x {c.res.per_node or '?'} GPUs"
        step = f"{c.step_s:.3g} s/step" if c.step_s is not None else "n/a"
        lines.append(f"  {c.preset}: {where}, {step}{'; ' + c.note if c.note else ''}")
    total: float | None = 0.0
    serial: float | None = 0.0
    critical: float | None = 0.0
    for name, rows in staged:
        runs = sum(n for _, _, n in rows)
        gpu_h = _sum([costs[p].gpu_hours(steps) * n if costs[p].gpu_hours(steps) is not None else None
                      for p, steps, n in rows])
        wall = _sum([costs[p].hours(steps) * n if costs[p].hours(steps) is not None else None for p, steps, n in rows])
        longest = _max([costs[p].hours(steps) for p, steps, n in rows if n])
        detail = ", ".join(f"{p} {n} x {steps} steps ({_h(costs[p].hours(steps))}, "
                           f"{_h(costs[p].gpu_hours(steps), 'GPU-h')} each)" for p, steps, n in rows if n)
        lines.append(f"{name}: {runs} runs, {_h(gpu_h, 'GPU-h')}, longest run {_h(longest)}: {detail}")
        total, serial, critical = _sum([total, gpu_h]), _sum([serial, wall]), _sum([critical, longest])
    runs = sum(n for _, rows in staged for _, _, n in rows)
    lines.append(f"sweep: {runs} runs, {_h(total, 'GPU-hours')}; wall time {_h(critical)} if each stage's runs "
                 f"run at once, {_h(serial)} one run at a time")
    return "\n".join(lines), {"runs": runs, "gpu_hours": total, "wall_h_parallel": critical, "wall_h_serial": serial}


def _sum(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def _max(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else max(values)  # type: ignore[type-var]
