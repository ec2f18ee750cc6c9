"""One training step timed by phase (forward+backward, optimizer, renormalisation), and
variants measured side by side in interleaved rounds."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench.env import free_memory, is_oom, sync
from bench.sizes import Variant
from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.model.flops import flops_per_token
from letngpt.parallel.distributed import DistInfo, init_distributed
from letngpt.parallel.layout import build_layout
from letngpt.train.metrics import device_peak_tflops
from letngpt.train.trainer import StepParts, build_step_parts, train_step

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def trainer_parts(run: RunConfig, info: DistInfo, world: int | None = None, rank: int | None = None) -> StepParts:
    """The trainer's StepParts (letngpt.train.trainer.build_step_parts: layout, renormaliser, engine,
    guard) over `world` ranks (default: all of them); initial weights from run.train.seed."""
    layout = build_layout(run, info.world_size if world is None else world, info.rank if rank is None else rank)
    return build_step_parts(run, info, layout)


class StepRunner:
    """The trainer's own step on one fixed random batch: the model and DeepSpeed engine built by
    `trainer.build_step_parts` (a world of one, ZeRO and dtype as a one-process training run
    has them), the non-finite guard and `trainer.train_step`, whose last stage is the renormalisation.
    `step()` runs and times one step by phase: forward+backward, optimizer (DeepSpeed's step,
    found by wrapping `engine.step`), renormalisation (found by wrapping the renormaliser)."""

    def __init__(self, name: str, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 *, seed: int = 0, lr: float = 1e-4, grad_clip: float = 0.0, compile: bool = False,
                 checkpointing: bool = False, tp: int = 1, linears_outside_graph: bool = False) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        train = TrainConfig(batch_size=batch_size, gradient_accumulation_steps=1, learning_rate=lr, seed=seed,
                            grad_clip=grad_clip, weight_decay=0.0 if cfg.use_ngpt else 0.1,  # the presets' recipes
                            dtype=DTYPE_NAMES[dtype], device=str(device), compile=compile,
                            activation_checkpointing=checkpointing, tp=tp)
        run = RunConfig(model=cfg, train=train, name=name)
        info = init_distributed(str(device))
        # A world of one, or of `tp` ranks that all see the same batch (bench.tp_compile).
        parts = trainer_parts(run, info, *((None, None) if tp > 1 else (1, 0)))
        self.engine, self.opt, self.guard, self.renorm = parts.engine, parts.optimizer, parts.guard, parts.renorm
        self.model = self.engine.module
        if linears_outside_graph:
            megatron_forward_outside_graph_(self.model)
        self.optimizer_impl = "fused AdamW" if self.opt.defaults.get("fused") else "AdamW (foreach)"
        self.optimizer_impl += f", DeepSpeed ZeRO {self.engine.zero_optimization_stage()}"
        gen = torch.Generator().manual_seed(seed)
        data = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=gen).to(device)
        self.x, self.y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        self.tokens_per_step = batch_size * cfg.block_size
        self.params = sum(p.numel() for p in self.model.parameters())
        self.steps_done = 0
        self._loss: torch.Tensor | None = None
        self.last_applied = True
        self._backward_done = 0.0
        engine_step = self.engine.step

        def timed_engine_step(*args, **kwargs):  # the forward+backward / optimizer boundary
            sync(device)
            self._backward_done = time.perf_counter()
            return engine_step(*args, **kwargs)

        self.engine.step = timed_engine_step
        self._optimizer_done = 0.0

    def timed_renorm(self, engine) -> None:
        """The renormalisation stage of train_step, its start marked (the optimizer / renorm boundary)."""
        sync(self.device)
        self._optimizer_done = time.perf_counter()
        self.renorm(engine)

    def step(self) -> dict[str, float]:
        sync(self.device)
        t0 = time.perf_counter()
        loss, _, applied = train_step(self.engine, self.opt, self.guard, self.timed_renorm,
                                      lambda micro: (self.x, self.y), 1, step=self.steps_done + 1, logging_step=False)
        sync(self.device)
        t3 = time.perf_counter()
        self.steps_done += 1
        self.last_applied = applied  # False: the non-finite guard skipped the step (and the renormalisation)
        t2 = self._optimizer_done if applied and self.cfg.use_ngpt else t3  # GPT has no renormalisation: 0
        self._loss = loss
        t1 = self._backward_done
        return {"fwdbwd": t1 - t0, "optim": t2 - t1, "renorm": t3 - t2, "total": t3 - t0}

    def last_loss(self) -> float:
        return float("nan") if self._loss is None else float(self._loss)

    def time_renorm(self, reps: int = 10) -> float | None:
        """Seconds per renormalisation of the engine (train_step's last stage), back to back
        (None for GPT: nothing to do)."""
        if not self.cfg.use_ngpt:
            return None
        self.renorm(self.engine)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            self.renorm(self.engine)
        sync(self.device)
        return (time.perf_counter() - t0) / reps

    def close(self) -> None:
        """Drop the engine and its tensors (after an out-of-memory error, before the next model)."""
        self.guard.remove()
        self.engine = self.model = self.opt = None


def megatron_forward_outside_graph_(model: torch.nn.Module) -> None:
    """Keep every TP linear's megatron forward out of torch.compile's graph (torch.compiler.disable), so a
    compiled block fuses only what lies between the linears: the alternative letngpt's traced forward
    (letngpt.parallel.tensor_parallel) was measured against."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            base = ColumnParallelLinear if isinstance(module, ColumnParallelLinear) else RowParallelLinear
            module.forward = torch.compiler.disable(functools.partial(lambda m, b, x: b.forward(m, x)[0], module, base))


def peak_for(device: torch.device, override: float = 0.0) -> float | None:
    """Dense bf16 peak TFLOP/s of the device (None on CPU or an unlisted GPU unless given)."""
    return device_peak_tflops(device, override)


def summarize_steps(steps: list[dict[str, float]], cfg: ModelConfig, tokens_per_step: int,
                    peak: float | None) -> dict:
    """Step-time statistics (ms), tokens/s from the MEDIAN step, model FLOP/s and MFU."""
    total = [s["total"] for s in steps]
    med = statistics.median(total)
    fpt = flops_per_token(cfg, cfg.block_size)
    tps = tokens_per_step / med
    achieved = fpt * tps / 1e12
    return {
        "steps_timed": len(steps),
        "step_ms_median": med * 1e3,
        "step_ms_mean": statistics.fmean(total) * 1e3,
        "step_ms_min": min(total) * 1e3,
        "step_ms_max": max(total) * 1e3,
        "fwdbwd_ms": statistics.median(s["fwdbwd"] for s in steps) * 1e3,
        "optim_ms": statistics.median(s["optim"] for s in steps) * 1e3,
        "renorm_ms": statistics.median(s["renorm"] for s in steps) * 1e3,
        # median renorm phase / median step: robust to a single descheduled step (shared CPUs);
        # the plain fraction of all timed time is renorm_share_total
        "renorm_share": statistics.median(s["renorm"] for s in steps) / med,
        "renorm_share_total": sum(s["renorm"] for s in steps) / sum(total),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tps,
        "tokens_per_s_mean": tokens_per_step * len(total) / sum(total),
        "flops_per_token": fpt,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def _run_round(order: list[StepRunner], runners: list[StepRunner], times: dict[str, list] | None,
               results: dict[str, dict], device: torch.device, log: Callable[[str], None]) -> None:
    """One step of each runner in `order`; record into `times` unless None. A runner that runs
    out of memory is removed from `runners` and its error recorded."""
    for r in order:
        try:
            t = r.step()
        except Exception as e:
            if not is_oom(e):
                raise
            results[r.name]["error"] = f"out of memory in a training step: {str(e)[:300]}"
            log(f"{r.name}: out of memory in a step; dropped")
            runners.remove(r)
            r.close()  # drop the tensors before the allocator is asked again
            free_memory(device)
            continue
        if times is not None:
            times[r.name].append(t)


def measure_variants(variants: Sequence[Variant], batch_size: int, device: torch.device, dtype: torch.dtype, *,
                     steps: int, warmup: int, interleave: bool = True, peak: float | None = None,
                     grad_clip: float = 0.0, renorm_reps: int = 5, deadline: float | None = None,
                     log: Callable[[str], None] = print) -> list[dict]:
    """Time every variant's training step.

    interleave=True builds all models first and then, round by round, runs one step of each
    variant (rotating which goes first), so slow drifts of the machine (thermal, other jobs,
    clocks) hit every variant alike. interleave=False measures one variant at a time with
    only its own model in memory (for sizes whose models do not all fit at once).
    A variant that runs out of memory is recorded as failed; the others carry on.
    `deadline` (time.monotonic) stops the timed rounds early, keeping what was measured.
    """
    results = {v.name: {"name": v.name, "config": dataclasses.asdict(v.cfg)} for v in variants}
    groups = [list(variants)] if interleave else [[v] for v in variants]
    for group in groups:
        runners: list[StepRunner] = []
        for v in group:
            try:
                runners.append(StepRunner(v.name, v.cfg, batch_size, device, dtype, grad_clip=grad_clip,
                                          compile=v.compile, checkpointing=v.checkpointing, tp=v.tp,
                                          linears_outside_graph=v.linears_outside_graph))
            except Exception as e:  # OOM while building: record, go on without it
                if not is_oom(e):
                    raise
                results[v.name]["error"] = f"out of memory building the model: {str(e)[:300]}"
                log(f"{v.name}: out of memory while building; skipped")
                free_memory(device)
        times: dict[str, list[dict]] = {r.name: [] for r in runners}

        for _ in range(warmup):
            _run_round(list(runners), runners, None, results, device, log)
        for i in range(steps):
            if deadline is not None and time.monotonic() > deadline and i > 0:
                log(f"time budget reached after {i} timed rounds")
                break
            k = i % max(1, len(runners))
            _run_round(runners[k:] + runners[:k], runners, times, results, device, log)
        for r in runners:
            res = results[r.name]
            res.update(params=r.params, batch_size=batch_size, seq_len=r.cfg.block_size,
                       optimizer=r.optimizer_impl, final_loss=r.last_loss())
            if times[r.name]:
                res.update(summarize_steps(times[r.name], r.cfg, r.tokens_per_step, peak))
                iso = r.time_renorm(renorm_reps) if renorm_reps else None
                res["renorm_ms_isolated"] = None if iso is None else iso * 1e3
        del runners
        free_memory(device)
    return [results[v.name] for v in variants]


def add_ratios(results: list[dict], refs: Sequence[str] = ("GPT", "nGPT")) -> None:
    """step_vs_<ref> = step time / ref's step time; tokens_vs_<ref> = tokens/s / ref's (median steps)."""
    by_name = {r["name"]: r for r in results}
    for ref in refs:
        base = by_name.get(ref)
        ok = base is not None and "step_ms_median" in base
        for r in results:
            if ok and "step_ms_median" in r:
                r[f"step_vs_{ref}"] = r["step_ms_median"] / base["step_ms_median"]
                r[f"tokens_vs_{ref}"] = r["tokens_per_s"] / base["tokens_per_s"]
            else:
                r[f"step_vs_{ref}"] = r[f"tokens_vs_{ref}"] = None
