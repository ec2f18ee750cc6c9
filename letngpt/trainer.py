"""The training loop: one readable function from config to summary.json.

Resumability rests on three facts: the batch for (step, micro step, rank) is a pure
function (letngpt.data.loader), DeepSpeed restores model and optimizer, and everything
else we need (step, tracking run id) rides in the checkpoint's state.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .config import ConfigError, RunConfig
from .data.loader import TokenData, check_vocab, eval_batches, get_batch
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, all_reduce_sum, init_distributed
from .engine import build_engine, lr_at, per_rank_accumulation, resolve_dtype, set_lr
from .fsutil import atomic_write_text
from .metrics import StepTimer, memory_mb, mfu, model_stats, plain_grad_norm
from .model import build_model
from .parallel.renorm import collective_renormalize_
from .renorm import renormalize_engine_weights_
from .tracking import Tracker, git_commit

log = logging.getLogger("letngpt")
DEFAULT_DATA = "data/tinyshakespeare"


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a clean stop:
    finish the step, checkpoint, exit 0."""

    def __init__(self) -> None:
        self.reason: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def prepare_data(data_dir: str, info: DistInfo) -> None:
    """The default dataset is prepared on first use (rank 0; the others wait)."""
    if info.is_main and not (Path(data_dir) / "meta.json").exists():
        from .data.prepare import ensure_builtin  # data/tinyshakespeare (gpt2) and data/tinyshakespeare_char

        if ensure_builtin(data_dir):
            log.info("prepared Tiny Shakespeare in %s", data_dir)
    if info.world_size > 1:
        dist.barrier()


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


def train(run: RunConfig, on_step: Callable[[object, int], None] | None = None) -> dict:
    """Run (or resume) a job to completion or a clean stop; returns the summary.
    `on_step(engine, step)` is called after every optimizer step (tests, instruments)."""
    t = run.train
    stop = StopFlag()  # first: a SIGUSR1 that arrives during start-up must not be lost
    info = init_distributed(t.device)
    setup_logging(info.is_main)
    if info.world_size % t.tp:
        raise ConfigError(f"tp ({t.tp}) must divide the number of processes ({info.world_size})")
    mpu = None
    dp_rank, dp_size = info.rank, info.world_size
    if t.tp > 1:  # ranks t.tp apart form the data-parallel groups; TP ranks are adjacent
        from .parallel.tensor_parallel import MegatronMPU, check_tp_layout, initialize_tp

        check_tp_layout(run.model, t.tp)
        initialize_tp(t.tp)
        mpu = MegatronMPU()
        dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    accum = per_rank_accumulation(t, dp_size)
    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(t.data_dir, info)
    train_data, val_data = TokenData(t.data_dir, "train"), TokenData(t.data_dir, "val")
    check_vocab(t.data_dir, run.model.vocab_size)

    tag = checkpoint.latest_tag(out_dir)
    if t.init_from == "scratch" and tag is not None:
        raise ConfigError(f"init_from=scratch but {out_dir} already holds checkpoint {tag}; "
                          "use --init_from=resume or another --out_dir")
    if t.init_from == "resume" and tag is None:
        raise ConfigError(f"init_from=resume but {out_dir} holds no complete checkpoint")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(run.model)  # the full model on every rank: TP shards are cut from it
    if t.tp > 1:
        from .parallel.tensor_parallel import parallelize_tp

        model = parallelize_tp(model, t.tp)
    model = model.to(info.device)
    dtype = resolve_dtype(t, info.device)
    if t.renorm == "naive" and run.model.use_ngpt and t.zero_stage == 0 and dtype != torch.float32:
        raise ConfigError("renorm=naive cannot reach the fp32 masters at ZeRO 0 with bf16/fp16; use renorm=collective")
    saved = checkpoint.read_state(out_dir, tag) if tag else None
    load_tag, reshard = tag, bool(saved) and saved.get("dp_size", dp_size) != dp_size
    if reshard:  # a different data-parallel size: go through DeepSpeed's universal checkpoint
        if t.zero_stage not in (1, 2) or t.tp != 1 or saved.get("tp", 1) != 1:
            raise ConfigError(f"checkpoint {tag} was saved at data-parallel size {saved['dp_size']}; resuming at "
                              f"{dp_size} works at ZeRO 1 or 2 without tensor parallelism")
        log.info("checkpoint %s has data-parallel size %d, this run %d: converting to a universal checkpoint",
                 tag, saved["dp_size"], dp_size)
        load_tag = checkpoint.convert_to_universal(out_dir, tag, is_main=info.is_main)
    engine, ds_config = build_engine(model, t, dp_size, dtype, mpu=mpu, load_universal=reshard)
    state = checkpoint.load(engine, out_dir, tag=load_tag) if tag else None
    step = state["step"] if state else 0
    wall_before = state.get("wall_time", 0.0) if state else 0.0
    if state:
        log.info("resumed from %s at step %d", tag, step)
    elif info.is_main:
        (out_dir / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2))
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    tracker = Tracker(out_dir, enabled=info.is_main, tracking_uri=t.tracking_uri or None,
                      experiment=t.experiment, run_name=run.name)
    tracker.start(run_id=state.get("tracking_run_id") if state else None,
                  params={"config": run.to_dict(), "ds": ds_config},
                  tags={"preset": run.name, "world_size": info.world_size, "dp_size": dp_size, "tp": t.tp,
                        "device": info.device.type, "git_commit": git_commit() or "unknown",
                        **({"mlflow.parentRunId": t.parent_run_id} if t.parent_run_id else {})})

    renormalize = collective_renormalize_ if t.renorm == "collective" else renormalize_engine_weights_
    renorm_bytes = 0
    tokens_per_step = t.batch_size * run.model.block_size * accum * dp_size
    timer = StepTimer()
    launch_start, start_step = time.time(), step
    metrics_file = open(out_dir / "metrics.jsonl", "a") if info.is_main else None
    last: dict = {}
    val_loss = None
    stop_reason = "max_iters"
    bar = progress_bar(info.is_main, step, t.max_iters)
    while step < t.max_iters:
        if step % t.eval_interval == 0:
            val_loss = evaluate(engine, val_data, run, dp_rank, dp_size, info.device)
            log.info("step %d: val loss %.4f", step, val_loss)
            tracker.log_metrics({"val/loss": val_loss}, step)
        lr = lr_at(step, t)
        set_lr(engine, lr)
        timer.start()
        logging_step = (step + 1) % t.log_interval == 0 or step + 1 == t.max_iters
        loss_sum = torch.zeros((), device=info.device)  # summed on device: no host sync per micro step
        for micro in range(accum):
            x, y = get_batch(train_data, seed=t.seed, step=step, micro_step=micro, dp_rank=dp_rank,
                             dp_size=dp_size, micro_batch=t.batch_size, block_size=run.model.block_size,
                             grad_accum=accum)
            _, loss = engine(x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True))
            engine.backward(loss)
            if micro == accum - 1 and logging_step:
                local_grad_norm = plain_grad_norm(engine)  # DeepSpeed reports none at ZeRO 0 in fp32
            engine.step()
            loss_sum += loss.detach().float()
        if engine.was_step_applied():
            renorm_bytes = renormalize(engine)
        step += 1
        step_time = timer.stop(info.device)
        if on_step is not None:
            on_step(engine, step)
        if bar is not None:
            bar.update(1)

        if logging_step:
            train_loss = all_reduce_mean(loss_sum.item() / accum, info.device)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = local_grad_norm if grad_norm is None else grad_norm
            tok_s = tokens_per_step / step_time
            last = {"train/loss": train_loss, "lr": lr, "grad_norm": float(grad_norm or 0.0),
                    "tokens_per_s": tok_s, "step_time_s": step_time, "memory_mb": memory_mb(info.device),
                    "renorm_bytes": float(renorm_bytes or 0)}
            util = mfu(run.model, tok_s, info.world_size, info.device, t.peak_tflops)
            if util is not None:
                last["mfu"] = util
            log.info("step %d: loss %.4f lr %.2e grad %.3f %.0f tok/s %.3fs/step%s", step, train_loss, lr,
                     last["grad_norm"], tok_s, step_time, f" mfu {util:.1%}" if util is not None else "")
            tracker.log_metrics(last, step)
            if metrics_file:
                metrics_file.write(json.dumps({"step": step, **last}) + "\n")
                metrics_file.flush()
        if step % t.track_interval == 0:
            tracker.log_metrics(model_stats(engine), step)

        elapsed = time.time() - launch_start
        want_stop = stop.reason is not None
        if t.time_limit_seconds and elapsed + 2 * timer.mean + timer.save_time > t.time_limit_seconds:
            want_stop, stop_reason = True, "time_limit_seconds"
        if t.max_iters_per_launch and step - start_step >= t.max_iters_per_launch:
            want_stop, stop_reason = True, "max_iters_per_launch"
        stopping = all_reduce_max(want_stop, info.device) > 0
        if stopping and stop.reason:
            stop_reason = stop.reason
        if stopping or step % t.checkpoint_interval == 0 or step == t.max_iters:
            save_start = time.time()
            checkpoint.save(engine, out_dir, step, {
                "step": step, "tracking_run_id": tracker.run_id, "config": run.to_dict(),
                "dp_size": dp_size, "tp": t.tp, "zero_stage": engine.zero_optimization_stage(),
                "wall_time": wall_before + time.time() - launch_start,
            }, keep=t.keep_checkpoints, is_main=info.is_main)
            timer.save_time = time.time() - save_start
        if stopping:
            log.info("stopping at step %d (%s); checkpoint saved", step, stop_reason)
            break

    if bar is not None:
        bar.close()
    if step >= t.max_iters:  # the loop exits before evaluating its last step
        val_loss = evaluate(engine, val_data, run, dp_rank, dp_size, info.device)
        log.info("step %d: val loss %.4f", step, val_loss)
        tracker.log_metrics({"val/loss": val_loss}, step)
    summary = {
        "final_step": step, "stop_reason": stop_reason, "train_loss": last.get("train/loss"),
        "val_loss": val_loss, "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
        "wall_time_s": wall_before + time.time() - launch_start, "tracking_run_id": tracker.run_id,
        "preset": run.name, "world_size": info.world_size, "tp": t.tp, "dp": dp_size,
    }
    if info.is_main:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        for name in ("run_config.json", "ds_config.json", "summary.json"):
            if (out_dir / name).exists():
                tracker.log_artifact(out_dir / name)
        metrics_file.close()
    tracker.end("FINISHED" if step >= t.max_iters else "KILLED")  # KILLED: to be resumed
    return summary
