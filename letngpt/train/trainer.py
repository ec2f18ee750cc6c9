"""The training loop: from config to summary.json in named steps.

Resumability rests on three facts: the batch for (step, micro step, rank) is a pure
function (letngpt.data.loader), DeepSpeed restores model and optimizer, and everything
else we need (step, tracking run id) rides in the checkpoint's state.

Safety rests on four more: one run per out_dir (runlock), no optimizer step from a non-finite
loss or gradient (guard), no checkpoint from non-finite weights, and resume only from a
checkpoint whose files match their manifest (checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from letngpt.config import ConfigError, RunConfig
from letngpt.data.loader import TokenData, eval_batches, get_batch
from letngpt.data.verify import check_token_ids
from letngpt.errors import DivergedError
from letngpt.fsutil import atomic_write_text
from letngpt.model import build_model
from letngpt.model.kernels import attention_choice
from letngpt.parallel.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    init_distributed,
    on_rank0,
)
from letngpt.parallel.layout import ParallelLayout, build_layout
from letngpt.renorm import Renormalizer
from letngpt.train import checkpoint
from letngpt.train.compile import compile_notice
from letngpt.train.engine import build_engine, resolve_dtype, set_lr
from letngpt.train.guard import NonFiniteGuard, finite_or_none, skip_optimizer_step, weights_finite
from letngpt.train.metrics import (
    MetricsWriter,
    StepTimer,
    Throughput,
    drop_redone_records,
    memory_mb,
    mfu,
    model_stats,
    plain_grad_norm,
)
from letngpt.train.runlock import OutDirLock
from letngpt.train.schedule import lr_at
from letngpt.train.tracking import Tracker, git_commit, slurm_ids

log = logging.getLogger("letngpt")
# Fields that may change between a checkpoint and the run resuming it without changing the weights' shapes.
RUNTIME_MODEL_FIELDS = {"attn_backend"}


class StopFlag:
    """SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and Ctrl-C (SIGINT) ask for a
    clean stop: finish the step, checkpoint, exit 0. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C")
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to abort at once")
        self.reason = signal.Signals(signum).name


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def check_out_dir(out_dir: Path) -> None:
    """ConfigError in one line unless out_dir can be created and written (rank 0 calls it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        ckpt = checkpoint.checkpoint_dir(out_dir)
        if ckpt.exists() and not os.access(ckpt, os.W_OK):
            raise PermissionError(13, "checkpoints/ is read-only")
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable ({e.strerror or e})") from None


def prepare_data(run: RunConfig, info: DistInfo) -> tuple[TokenData, TokenData]:
    """The default dataset is prepared on first use; every id must fit the model (rank 0 checks)."""
    data_dir = run.train.data_dir

    def check() -> None:
        if not (Path(data_dir) / "meta.json").exists():
            from letngpt.data.prepare import ensure_builtin  # data/tinyshakespeare (gpt2) and data/tinyshakespeare_char

            if ensure_builtin(data_dir):
                log.info("prepared Tiny Shakespeare in %s", data_dir)
        check_token_ids(data_dir, run.model.vocab_size)

    on_rank0(check, is_main=info.is_main)
    block = run.model.block_size  # a split without one window fails here, not at the first batch
    return TokenData(data_dir, "train", block), TokenData(data_dir, "val", block)


def check_same_architecture(saved: dict, run: RunConfig, tag: str) -> None:
    """Resuming needs the weights' shapes; training hyperparameters may change (and are listed)."""
    old_model, old_train = saved.get("config", {}).get("model", {}), saved.get("config", {}).get("train", {})
    new_model, new_train = dataclasses.asdict(run.model), dataclasses.asdict(run.train)
    differ = [f"{k}: {old_model.get(k)} -> {v}" for k, v in new_model.items()
              if k not in RUNTIME_MODEL_FIELDS and k in old_model and old_model[k] != v]
    if differ:
        raise ConfigError(f"checkpoint {tag} has another architecture ({'; '.join(differ)}); resume with the "
                          f"checkpoint's architecture or start a new --out_dir")
    changed = [f"{k}={old_train.get(k)}->{v}" for k, v in new_train.items() if k in old_train and old_train[k] != v]
    if changed:
        log.info("resuming %s with changed training settings: %s", tag, ", ".join(changed))


def plan_resume(run: RunConfig, out_dir: Path, info: DistInfo) -> tuple[str | None, dict | None]:
    """Collective. The checkpoint to resume from (newest that verifies) and its state, or none."""
    train_cfg = run.train
    has_any = bool(checkpoint.step_tags(checkpoint.checkpoint_dir(out_dir)))
    if train_cfg.init_from == "scratch" and has_any:
        raise ConfigError(f"init_from=scratch but {out_dir} already holds checkpoints; "
                          "use --init_from=resume or another --out_dir")
    tag, skipped = checkpoint.find_verified(out_dir) if has_any else (None, [])
    # Saves that never finished, with nothing older: set aside, and start as if they were absent.
    fresh_start = tag is None and train_cfg.init_from == "auto" and checkpoint.only_incomplete(skipped)
    if tag is None and not fresh_start and (train_cfg.init_from == "resume" or skipped):
        detail = f": {'; '.join(skipped)}" if skipped else ""
        raise ConfigError(f"init_from={train_cfg.init_from} but {out_dir} holds no complete checkpoint that "
                          f"verifies{detail}")
    if skipped:
        on_rank0(lambda: checkpoint.set_aside(out_dir, skipped, tag), is_main=info.is_main)
    if tag is None:
        if fresh_start:
            log.warning("%s holds only unfinished saves (set aside); starting from scratch", out_dir)
        return None, None
    saved = checkpoint.read_state(out_dir, tag)
    check_same_architecture(saved, run, tag)
    return tag, saved


def maybe_reshard(out_dir: Path, tag: str | None, saved: dict | None, run: RunConfig, dp_size: int,
                  is_main: bool) -> tuple[str | None, bool]:
    """A checkpoint saved at another data-parallel size goes through DeepSpeed's universal format."""
    train_cfg = run.train
    if not saved or saved.get("dp_size", dp_size) == dp_size:
        return tag, False
    if train_cfg.zero_stage not in (1, 2) or train_cfg.tp != 1 or saved.get("tp", 1) != 1:
        raise ConfigError(f"checkpoint {tag} was saved at data-parallel size {saved['dp_size']}; resuming at "
                          f"{dp_size} works at ZeRO 1 or 2 without tensor parallelism")
    log.info("checkpoint %s has data-parallel size %d, this run %d: converting to a universal checkpoint",
             tag, saved["dp_size"], dp_size)
    return checkpoint.convert_to_universal(out_dir, tag, is_main=is_main), True


class AlreadyFinished(Exception):
    """The newest checkpoint is at or past max_iters: nothing to train, nothing to rewrite."""

    def __init__(self, step: int) -> None:
        super().__init__(f"already finished at step {step}")
        self.step = step


@dataclass
class Job:
    """Everything the loop touches, built once by `build_job`."""

    run: RunConfig
    info: DistInfo
    layout: ParallelLayout
    out_dir: Path
    engine: object
    optimizer: torch.optim.Optimizer
    guard: NonFiniteGuard
    tracker: Tracker
    train_data: TokenData
    val_data: TokenData
    renorm: Renormalizer  # the stage after every applied optimizer step (nGPT's sphere)
    step: int = 0
    wall_before: float = 0.0
    launch_start: float = field(default_factory=time.time)
    timer: StepTimer = field(default_factory=lambda: StepTimer())  # looked up at run time (tests script it)
    throughput: Throughput | None = None  # means over the logging window / the launch
    last: dict = field(default_factory=dict)
    val_loss: float | None = None

    def __post_init__(self) -> None:
        self.throughput = Throughput(self.tokens_per_step)

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.batch_size * self.run.model.block_size * self.layout.accum * self.layout.dp_size


@dataclass
class StepParts:
    """What `train_step` needs, built as every run builds it (`build_step_parts`); bench/ and the tests'
    workers build theirs with the same function, so they run the step users run."""

    layout: ParallelLayout
    engine: object
    ds_config: dict
    optimizer: torch.optim.Optimizer
    guard: NonFiniteGuard
    renorm: Renormalizer  # train_step's last stage


def build_step_parts(run: RunConfig, info: DistInfo, layout: ParallelLayout, reshard: bool = False) -> StepParts:
    """The renormaliser (first: it refuses renorm=naive at ZeRO 0 in bf16 before an engine exists), the
    model inside its DeepSpeed engine, and the non-finite guard."""
    renorm = Renormalizer(run, resolve_dtype(run.train, info.device), layout.dp_group)
    engine, ds_config, optimizer = build_model_engine(run, info, layout, reshard)
    guard = NonFiniteGuard(engine.module, info.device, run.train.max_nonfinite_steps)
    return StepParts(layout=layout, engine=engine, ds_config=ds_config, optimizer=optimizer, guard=guard, renorm=renorm)


def build_model_engine(run: RunConfig, info: DistInfo, layout: ParallelLayout, reshard: bool = False):
    """The model (this rank's TP shard of it) inside its DeepSpeed engine: (engine, ds config, optimizer)."""
    train_cfg = run.train
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = layout.shard(build_model(run.model))  # the full model on every rank: TP shards are cut from it
    dtype = resolve_dtype(train_cfg, info.device)
    return build_engine(model.to(info.device), train_cfg, layout, dtype, load_universal=reshard)


def start_tracker(run: RunConfig, info: DistInfo, layout: ParallelLayout, out_dir: Path, ds_config: dict,
                  state: dict | None) -> Tracker:
    train_cfg = run.train
    tracker = Tracker(out_dir, enabled=info.is_main, tracking_uri=train_cfg.tracking_uri or None,
                      experiment=train_cfg.experiment, run_name=run.name)
    tracker.start(run_id=state.get("tracking_run_id") if state else None,
                  params={"config": run.to_dict(), "ds": ds_config},
                  tags={"preset": run.name, "world_size": info.world_size, "dp_size": layout.dp_size, "tp": layout.tp,
                        "device": info.device.type, "git_commit": git_commit() or "unknown", **slurm_ids(),
                        **({"mlflow.parentRunId": train_cfg.parent_run_id} if train_cfg.parent_run_id else {})})
    if state:
        tracker.drop_metrics_after(state["step"])  # values of steps this launch redoes
    return tracker


def log_what_runs(run: RunConfig, device: torch.device) -> None:
    """Rank 0's first lines: the attention kernel and why, and what --compile will do to the first step
    (every rank decides alike, so attn_backend=flash where it cannot run stops every rank)."""
    train_cfg = run.train
    dtype = resolve_dtype(train_cfg, device)
    log.info("%s", attention_choice(run.model.attn_backend, device, dtype, train_cfg.compile))
    if train_cfg.compile:
        log.info("%s", compile_notice(run.model.n_layer, device, train_cfg.zero_stage))


def build_job(run: RunConfig, info: DistInfo, layout: ParallelLayout, out_dir: Path) -> Job:
    """Data, resume plan, model, engine, tracker: everything before the first step."""
    train_cfg = run.train
    train_data, val_data = prepare_data(run, info)
    tag, saved = plan_resume(run, out_dir, info)
    if saved and saved["step"] >= train_cfg.max_iters:
        raise AlreadyFinished(saved["step"])
    load_tag, reshard = maybe_reshard(out_dir, tag, saved, run, layout.dp_size, info.is_main)
    log_what_runs(run, info.device)
    parts = build_step_parts(run, info, layout, reshard)
    engine, ds_config = parts.engine, parts.ds_config
    state = None
    if load_tag:
        load_tag, state = checkpoint.load_newest(engine, out_dir, load_tag)
        log.info("resumed from %s at step %d", load_tag, state["step"])
    elif info.is_main:
        (out_dir / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2))
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    tracker = start_tracker(run, info, layout, out_dir, ds_config, state)
    return Job(run=run, info=info, layout=layout, out_dir=out_dir, engine=engine, optimizer=parts.optimizer,
               guard=parts.guard, tracker=tracker, train_data=train_data, val_data=val_data, renorm=parts.renorm,
               step=state["step"] if state else 0, wall_before=state.get("wall_time", 0.0) if state else 0.0)


def progress_bar(is_main: bool, start: int, total: int):
    """A tqdm bar on rank 0 when a person is watching (stderr is a terminal); logs otherwise."""
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


@torch.no_grad()
def evaluate(engine, data: TokenData, run: RunConfig, dp_rank: int, dp_size: int, device) -> float:
    """Mean loss over the fixed evaluation set, whose windows do not depend on the layout."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)  # sum of per-window mean losses, number of windows
    for x, y, n in eval_batches(data, seed=run.train.seed, eval_iters=run.train.eval_iters, dp_rank=dp_rank,
                                dp_size=dp_size, micro_batch=run.train.batch_size, block_size=run.model.block_size):
        _, loss = engine(x.to(device), y.to(device))
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    engine.train()
    # Over the whole world: TP peers hold the same share, which scales both sums alike.
    loss_sum, windows = all_reduce_sum(total, device).tolist()
    return loss_sum / windows


def run_eval(job: Job, writer: MetricsWriter) -> None:
    job.val_loss = evaluate(job.engine, job.val_data, job.run, job.layout.dp_rank, job.layout.dp_size,
                            job.info.device)
    writer.write("val", job.step, {"val/loss": job.val_loss}, f"step {job.step}: val loss {job.val_loss:.4f}")


MicroBatch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def train_step(engine, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, renormalize: Renormalizer,
               micro_batch: MicroBatch, accum: int, *, step: int,
               logging_step: bool) -> tuple[torch.Tensor, float | None, bool]:
    """Optimizer step number `step`, in four stages: forward/backward over `accum` micro batches
    (`micro_batch(i)` gives micro batch i on the device); the non-finite decision, taken by the guard
    on all ranks together; the optimizer step (DeepSpeed applies it at the last micro batch; a bad one
    is skipped); the renormalisation, after every applied step. Returns (summed loss, local grad norm
    on logging steps, applied). It needs only the engine, its torch optimizer, the guard and the
    renormaliser, so bench/ and the tests run this very step."""
    losses, local_grad_norm, skipped = [], None, False
    for micro in range(accum):
        x, y = micro_batch(micro)
        _, loss = engine(x, y)
        guard.watch_loss(loss)
        engine.backward(loss)
        losses.append(loss.detach().float())  # summed on device: no host sync per micro step
        if micro == accum - 1:
            if logging_step:
                local_grad_norm = plain_grad_norm(engine)  # DeepSpeed reports none at ZeRO 0 in fp32
            skipped = guard.step_is_bad(step)
        with skip_optimizer_step(optimizer) if skipped else contextlib.nullcontext():
            engine.step()  # counts the micro batch; applies the update at the last one
    applied = not skipped and engine.was_step_applied()
    if applied:
        renormalize(engine)
    return torch.stack(losses).sum(), local_grad_norm, applied


def job_micro_batch(job: Job, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro batch `micro` of this rank for the job's next step, on the device."""
    train_cfg, device = job.run.train, job.info.device
    x, y = get_batch(job.train_data, seed=train_cfg.seed, step=job.step, micro_step=micro, dp_rank=job.layout.dp_rank,
                     dp_size=job.layout.dp_size, micro_batch=train_cfg.batch_size, block_size=job.run.model.block_size,
                     grad_accum=job.layout.accum)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def eta_seconds(job: Job, mean_step_s: float) -> float:
    """Time to max_iters at the steady step time (the window's until the launch has one)."""
    steady = job.throughput.overall()
    step_s = job.tokens_per_step / steady if steady else mean_step_s
    return max(job.run.train.max_iters - job.step, 0) * step_s


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def log_step(job: Job, writer: MetricsWriter, lr: float, loss_sum: torch.Tensor, local_grad_norm,
             skipped: bool) -> None:
    """One line (and one metrics record): step, loss, lr, grad norm, tokens/s over the window, MFU
    on GPU, peak memory, tokens seen and an ETA."""
    info, train_cfg = job.info, job.run.train
    train_loss = all_reduce_mean(loss_sum.item() / job.layout.accum, info.device)
    grad_norm = job.engine.get_global_grad_norm()
    grad_norm = local_grad_norm if grad_norm is None else grad_norm
    tok_s, step_time = job.throughput.window()
    eta = eta_seconds(job, step_time)
    job.last = {"train/loss": finite_or_none(train_loss), "lr": lr, "grad_norm": finite_or_none(grad_norm or 0.0),
                "tokens_per_s": tok_s, "step_time_s": step_time, "memory_mb": memory_mb(info.device),
                "tokens_seen": float(job.step * job.tokens_per_step), "eta_s": eta,
                "renorm_bytes": float(job.renorm.bytes_last_step), "skipped_steps": float(job.guard.skipped)}
    util = mfu(job.run.model, tok_s, info.world_size, info.device, train_cfg.peak_tflops)
    if util is not None:
        job.last["mfu"] = util
    line = (f"step {job.step}/{train_cfg.max_iters}: loss {train_loss:.4f} lr {lr:.2e} "
            f"grad {float(grad_norm or 0.0):.3f} | "
            f"{tok_s:.0f} tok/s {step_time:.3f}s/step{f' mfu {util:.1%}' if util is not None else ''} | "
            f"peak mem {job.last['memory_mb']:.0f} MB | {job.last['tokens_seen'] / 1e6:.2f}M tokens | "
            f"eta {format_duration(eta)}{' (skipped: non-finite)' if skipped else ''}")
    writer.write("train", job.step, job.last, line)


def should_stop(job: Job, stop: StopFlag, start_step: int) -> str | None:
    """Collective: the reason to stop after this step (signal, time limit, launch budget), or None."""
    train_cfg = job.run.train
    reason = stop.reason
    elapsed = time.time() - job.launch_start
    limit = train_cfg.time_limit_seconds
    if limit and elapsed + 2 * job.timer.mean + job.timer.save_time > limit:
        reason = reason or "time_limit_seconds"
    if train_cfg.max_iters_per_launch and job.step - start_step >= train_cfg.max_iters_per_launch:
        reason = reason or "max_iters_per_launch"
    if all_reduce_max(reason is not None, job.info.device) == 0:
        return None
    return stop.reason or reason or "stop requested by another rank"


def save_checkpoint(job: Job) -> None:
    """Collective. Only finite weights are ever saved; the previous good checkpoint stays."""
    train_cfg = job.run.train
    if not weights_finite(job.engine.module):
        raise DivergedError(f"the weights became non-finite by step {job.step}; no checkpoint written (the last "
                            f"good one stays). Lower --learning_rate and resume")
    save_start = time.time()
    checkpoint.save(job.engine, job.out_dir, job.step, {
        "step": job.step, "tracking_run_id": job.tracker.run_id, "config": job.run.to_dict(),
        "dp_size": job.layout.dp_size, "tp": train_cfg.tp, "zero_stage": job.engine.zero_optimization_stage(),
        "wall_time": job.wall_before + time.time() - job.launch_start,
    }, keep=train_cfg.keep_checkpoints, is_main=job.info.is_main)
    job.timer.save_time = time.time() - save_start


def step_once(job: Job, writer: MetricsWriter, stop: StopFlag, start_step: int) -> str | None:
    """Evaluate when due, train one step, log, checkpoint when due.
    Returns the reason to stop (after a checkpoint), or None to go on."""
    train_cfg = job.run.train
    if job.step % train_cfg.eval_interval == 0:
        run_eval(job, writer)
    lr = lr_at(job.step, train_cfg)
    set_lr(job.engine, lr)
    job.timer.start()
    logging_step = (job.step + 1) % train_cfg.log_interval == 0 or job.step + 1 == train_cfg.max_iters
    loss_sum, local_grad_norm, applied = train_step(job.engine, job.optimizer, job.guard, job.renorm,
                                                    partial(job_micro_batch, job), job.layout.accum,
                                                    step=job.step + 1, logging_step=logging_step)
    job.step += 1
    job.throughput.add(job.timer.stop(job.info.device))
    if logging_step:
        log_step(job, writer, lr, loss_sum, local_grad_norm, not applied)
    if job.step % train_cfg.track_interval == 0:
        writer.write("model", job.step, model_stats(job.engine))
    reason = should_stop(job, stop, start_step)
    if reason or job.step % train_cfg.checkpoint_interval == 0 or job.step == train_cfg.max_iters:
        save_checkpoint(job)
    return reason


def open_metrics(job: Job) -> MetricsWriter:
    """The run's writer; metrics.jsonl first loses the records of steps this launch redoes (a
    crash after the last checkpoint), so every step keeps one record."""
    path = job.out_dir / "metrics.jsonl"
    if not job.info.is_main:
        return MetricsWriter(None, job.tracker)
    dropped = drop_redone_records(path, job.step)
    if dropped:
        log.info("metrics.jsonl: dropped %d records after step %d, which this launch logs again", dropped, job.step)
    return MetricsWriter(path, job.tracker)


def loop(job: Job, stop: StopFlag) -> str:
    """Steps until max_iters or a clean stop; returns the stop reason."""
    train_cfg, start_step = job.run.train, job.step
    bar = progress_bar(job.info.is_main, job.step, train_cfg.max_iters)
    writer = open_metrics(job)
    try:
        while job.step < train_cfg.max_iters:
            reason = step_once(job, writer, stop, start_step)
            if bar is not None:
                bar.update(1)
            if reason:
                log.info("stopping at step %d (%s); checkpoint saved", job.step, reason)
                return reason
        run_eval(job, writer)  # the loop ends before evaluating its last step
        return "max_iters"
    finally:
        if bar is not None:
            bar.close()
        writer.close()


def write_summary(job: Job, stop_reason: str) -> dict:
    nonfinite = ["train_loss"] if job.last and job.last.get("train/loss") is None else []
    val = finite_or_none(job.val_loss)
    if job.val_loss is not None and val is None:
        nonfinite.append("val_loss")
    steady_tok_s = job.throughput.overall()  # this launch, first steps excluded
    run, info = job.run, job.info
    steady_mfu = None
    if steady_tok_s:
        steady_mfu = mfu(run.model, steady_tok_s, info.world_size, info.device, run.train.peak_tflops)
    summary = {
        "final_step": job.step, "stop_reason": stop_reason, "train_loss": job.last.get("train/loss"),
        "val_loss": val, "tokens_per_s": steady_tok_s, "mfu": steady_mfu,
        "skipped_steps": job.guard.skipped,
        "wall_time_s": job.wall_before + time.time() - job.launch_start, "tracking_run_id": job.tracker.run_id,
        "preset": job.run.name, "world_size": job.info.world_size, "tp": job.run.train.tp, "dp": job.layout.dp_size,
        **slurm_ids(),
    }
    if nonfinite:
        summary["nonfinite"] = {"fields": nonfinite, "reason": "not finite (the step was skipped); written as null"}
    if job.info.is_main:
        atomic_write_text(job.out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
        for name in ("run_config.json", "ds_config.json", "summary.json"):
            if (job.out_dir / name).exists():
                job.tracker.log_artifact(job.out_dir / name)
    return summary


def train(run: RunConfig) -> dict:
    """Run (or resume) a job to completion or a clean stop; returns the summary."""
    stop = StopFlag()  # first: a SIGUSR1 that arrives during start-up must not be lost
    info = init_distributed(run.train.device)
    setup_logging(info.is_main)
    layout = build_layout(run, info.world_size, info.rank)
    out_dir = Path(run.train.out_dir)
    on_rank0(lambda: check_out_dir(out_dir), is_main=info.is_main)
    lock = OutDirLock(out_dir)
    on_rank0(lock.acquire, is_main=info.is_main)
    try:
        return _train_locked(run, info, layout, out_dir, stop)
    finally:
        if info.is_main:
            lock.release()


def finished_summary(out_dir: Path, step: int, max_iters: int) -> dict:
    """A relaunch of a finished run: its summary.json and tracking run stay as they are."""
    log.info("already finished at step %d (max_iters %d); nothing to do (a larger --max_iters trains on)",
             step, max_iters)
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"final_step": step, "stop_reason": "already_finished"}


def _train_locked(run: RunConfig, info: DistInfo, layout: ParallelLayout, out_dir: Path, stop: StopFlag) -> dict:
    try:
        job = build_job(run, info, layout, out_dir)
    except AlreadyFinished as done:
        return finished_summary(out_dir, done.step, run.train.max_iters)
    try:
        reason = loop(job, stop)
        summary = write_summary(job, reason)
    except BaseException as e:
        # A crash (or an abort) leaves the tracking run FAILED with the reason, never RUNNING.
        job.tracker.set_tags({"letngpt.failure": f"{type(e).__name__}: {e}".splitlines()[0][:500]})
        job.tracker.end("FAILED")
        raise
    finally:
        job.guard.remove()
    job.tracker.end("FINISHED" if job.step >= run.train.max_iters else "KILLED")  # KILLED: to be resumed
    return summary
