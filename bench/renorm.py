"""Collective vs naive renormalisation under DeepSpeed ZeRO: time as a share of a training step,
and bytes communicated, from ONE run on CPU ranks (gloo).

    torchrun --standalone --nproc_per_node 2 -m bench.renorm            # ZeRO 1, 2, 3; ~1 min on 2 cores
    torchrun --standalone --nproc_per_node 2 -m bench.renorm --stages 3 --n_layer 8 --out out/bench/renorm.json

The engine is the trainer's (bench.steps.trainer_parts) and each timed step is the trainer's
train_step with its renormalisation stage left empty: forward + backward + engine.step() (the "step");
then that stage on its own, the trainer's collective method (letngpt.renorm.Renormalizer over
collective_renormalize_), then the naive one (letngpt.renorm: gather every
full fp32 matrix, normalise, write back), each phase between barriers so that it is timed as the
slowest rank sees it. Both methods leave the same weights, so running both every step changes
nothing but time. Bytes are counted by wrapping torch.distributed's collectives (and DeepSpeed's
cached all-gather / reduce-scatter) during each method: the payload of each call (the reduced
tensor, the gathered output, the broadcast tensor), per rank. Medians over the timed steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from letngpt.parallel.comm_counter import CommCounter
from letngpt.parallel.distributed import DistInfo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma separated")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--num_maps", type=int, default=3)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: bf16 weights and fp32 masters, as on GPUs (the naive method is skipped at ZeRO 0)")
    p.add_argument("--out", default="", help="optional JSON path (written by rank 0)")
    return p.parse_args(argv)


def _timed(fn) -> tuple[float, object]:
    dist.barrier()
    t0 = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - t0, result


# Ops that only make a new view of a tensor: no kernel on any device.
VIEW_OPS = {"aten::view", "aten::narrow", "aten::slice", "aten::select", "aten::alias", "aten::unsqueeze",
            "aten::squeeze", "aten::unbind", "aten::as_strided", "aten::detach", "aten::expand", "aten::t",
            "aten::transpose", "aten::permute", "aten::_unsafe_view", "aten::view_as", "aten::split",
            "aten::split_with_sizes", "aten::chunk"}


def count_ops(fn) -> dict:
    """Ops one call of `fn` launches, from torch.profiler: top-level aten / c10d ops on the host that
    compute (each is at least one kernel launch on a GPU; views and no-op `.to()`s are left out, and
    ops called inside another are not counted again) and, on CUDA, the device kernels themselves."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    host = [e for e in events if e.cpu_parent is None and e.device_type.name == "CPU"
            and e.name.split("::")[0] in ("aten", "c10d") and e.name not in VIEW_OPS
            and not (e.name in ("aten::to", "aten::contiguous") and not e.cpu_children)]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    return {"host_ops": len(host), "cuda_kernels": len(kernels) if torch.cuda.is_available() else None}


def bench_stage(stage: int, args: argparse.Namespace, info: DistInfo) -> dict:
    from bench.steps import trainer_parts
    from letngpt.config import ModelConfig, RunConfig, TrainConfig
    from letngpt.renorm.naive import renormalize_engine_weights_
    from letngpt.train.trainer import train_step

    cfg = ModelConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                      n_embd=args.n_embd, n_head=args.n_head, num_maps=args.num_maps, use_ngpt=True)
    train = TrainConfig(zero_stage=stage, batch_size=args.batch_size, gradient_accumulation_steps=info.world_size,
                        learning_rate=1e-3, dtype=args.dtype, device="cpu", seed=0)
    parts = trainer_parts(RunConfig(model=cfg, train=train), info)
    engine = parts.engine
    naive = stage > 0 or args.dtype == "float32"  # it cannot reach DeepSpeed's bf16 masters at ZeRO 0
    gen = torch.Generator().manual_seed(dist.get_rank())
    numbers = itertools.count(1)

    def step():
        x = torch.randint(cfg.vocab_size, (args.batch_size, cfg.block_size + 1), generator=gen)
        # the renormalisation stage is left empty here: both methods are timed on their own below
        train_step(engine, parts.optimizer, parts.guard, lambda _engine: None, lambda _micro: (x[:, :-1], x[:, 1:]),
                   parts.layout.accum, step=next(numbers), logging_step=False)

    def counted(method):
        with CommCounter() as c:
            method(engine)
        return c.bytes

    rows = {"step": [], "collective": [], "naive": []}
    nbytes = {}
    for i in range(args.warmup + args.steps):
        t_step, _ = _timed(step)
        t_coll, nbytes["collective"] = _timed(lambda: counted(parts.renorm))  # the trainer's: collective
        t_naive, nbytes["naive"] = _timed(lambda: counted(renormalize_engine_weights_)) if naive else (float("nan"), 0)
        if i >= args.warmup:
            for key, t in (("step", t_step), ("collective", t_coll), ("naive", t_naive)):
                rows[key].append(t)
    dist.barrier()
    ops = count_ops(lambda: parts.renorm(engine))
    dist.barrier()
    med = {k: statistics.median(v) for k, v in rows.items()}
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    return {"stage": stage, "step_s": med["step"], "collective_s": med["collective"], "naive_s": med["naive"],
            "collective_frac": med["collective"] / med["step"], "naive_frac": med["naive"] / med["step"],
            "time_ratio_naive_over_collective": med["naive"] / med["collective"],
            "collective_bytes": nbytes["collective"], "naive_bytes": nbytes["naive"],
            "bytes_ratio_naive_over_collective": nbytes["naive"] / max(1, nbytes["collective"]),
            "n_params": n_params, "n_matrices": len(engine.module.unit_norm_axes()),
            "collective_host_ops": ops["host_ops"], "collective_cuda_kernels": ops["cuda_kernels"]}


def table(results: list[dict]) -> str:
    head = ("ZeRO", "step ms", "coll ms", "coll %step", "naive ms", "naive %step", "naive/coll time",
            "coll bytes", "naive bytes", "naive/coll bytes", "matrices", "coll ops")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        lines.append(" | ".join([
            str(r["stage"]), f"{r['step_s'] * 1e3:.1f}", f"{r['collective_s'] * 1e3:.2f}",
            f"{r['collective_frac']:.2%}", f"{r['naive_s'] * 1e3:.2f}", f"{r['naive_frac']:.2%}",
            f"{r['time_ratio_naive_over_collective']:.1f}x", f"{r['collective_bytes']:,}", f"{r['naive_bytes']:,}",
            f"{r['bytes_ratio_naive_over_collective']:.0f}x", str(r["n_matrices"]), str(r["collective_host_ops"])]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from letngpt.parallel.distributed import init_distributed

    args = parse_args(argv)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results = [bench_stage(int(s), args, info) for s in args.stages.split(",")]
    if info.is_main:
        model = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "num_maps", "vocab_size",
                                                 "block_size", "batch_size")}
        print(f"\nrenormalisation, {info.world_size} CPU ranks (gloo, {args.dtype}), "
              f"{results[0]['n_params']:,} params, "
              f"{model}, median of {args.steps} steps\n")
        print(table(results))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"world_size": info.world_size, "model": model,
                                                  "results": results}, indent=2))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
