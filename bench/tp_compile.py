"""--compile under tensor parallelism: compiled / eager step time at TP = world size, side by side.

    torchrun --standalone --nproc_per_node 2 -m bench.tp_compile             # CPU: tiny LET-nGPT M=3, TP=2
    torchrun --standalone --nproc_per_node 2 -m bench.tp_compile --size 1k   # GPUs: the 24-layer 1k preset

Three variants of LET-nGPT (M = 3), all at TP = world size, ZeRO 1, measured in interleaved rounds
(bench.steps.measure_variants) on the trainer's own step:
  eager                                megatron's Column/RowParallelLinear forward, as letngpt runs it eagerly
  compiled                             blocks compiled: letngpt's traced forward of the TP linears, one graph
                                       per block with its collectives inside
  compiled [megatron outside graph]    megatron's forward behind torch.compiler.disable: the blocks compile
                                       the norms, RoPE and attention between the linears, which run eagerly
The last is the alternative letngpt's traced forward was chosen over (issue 22). Also reported: dynamo's
recompilations and graph breaks (by reason) over the whole run. Writes JSON (rank 0) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.env import environment, resolve_dtype
from bench.output import fmt, format_table, write_json
from bench.sizes import SIZE_NAMES, Variant, get_size, variant_configs
from bench.steps import measure_variants
from letngpt.parallel.distributed import init_distributed
from letngpt.train.compile import compile_counts

VARIANTS = {  # name: (compile, TP linears outside the graph)
    "eager": (False, False),
    "compiled": (True, False),
    "compiled [megatron outside graph]": (True, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="auto", choices=("auto", *SIZE_NAMES), help="auto: tiny on CPU, 1k on GPU")
    p.add_argument("--n_layer", type=int, default=None, help="override the size's depth")
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the compilation happens here)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default out/bench/tp_compile_<device>.json)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    info = init_distributed(args.device)
    device = info.device
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    size = get_size(args.size if args.size != "auto" else ("1k" if device.type == "cuda" else "tiny"))
    if args.n_layer:
        size = dataclasses.replace(size, n_layer=args.n_layer)
    cfg = next(v.cfg for v in variant_configs(size, [3]) if v.name == "LET-nGPT M=3")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    variants = [Variant(n, cfg, compile=VARIANTS[n][0], tp=info.world_size,
                        linears_outside_graph=VARIANTS[n][1])
                for n in names]
    t0 = time.monotonic()
    results = measure_variants(variants, size.batch_size, device, dtype, steps=args.steps, warmup=args.warmup,
                               renorm_reps=0, log=lambda s: print(s) if info.rank == 0 else None)
    eager = {r["name"]: r for r in results}.get("eager", {})
    for r in results:
        if "step_ms_median" in r and "step_ms_median" in eager:
            r["vs_eager_step"] = r["step_ms_median"] / eager["step_ms_median"]
    return {"benchmark": "tp_compile", "environment": environment(device, dtype, torch.get_num_threads()),
            "tp": info.world_size, "size": dataclasses.asdict(size), "variants": results,
            "dynamo": compile_counts(), "settings": {"steps": args.steps, "warmup": args.warmup, "zero_stage": 1},
            "wall_s": time.monotonic() - t0, "rank": info.rank, "device_type": device.type}


def table(report: dict) -> str:
    rows = [[r["name"], fmt(r.get("step_ms_median")), fmt(r.get("fwdbwd_ms")), fmt(r.get("vs_eager_step"), ".2f"),
             fmt(r.get("final_loss"), ".4f")] for r in report["variants"]]
    d = report["dynamo"]
    reasons: dict[str, int] = {}
    for k, n in d["graph_break_reasons"].items():  # dynamo's reasons run over lines: the first one names it
        reasons[k.splitlines()[0][:80]] = reasons.get(k.splitlines()[0][:80], 0) + n
    breaks = "; ".join(f"{n} x {k}" for k, n in reasons.items()) or "none"
    return (f"LET-nGPT M=3 at TP={report['tp']}, {report['environment']['device_name']}, "
            f"{report['environment']['dtype']}, median of {report['settings']['steps']} interleaved steps\n"
            + format_table(["variant", "step ms", "fwd+bwd ms", "step x eager", "loss"], rows)
            + f"\ndynamo over all variants on rank 0: {d['recompiles']} recompilations, {d['graph_breaks']} graph "
              f"breaks ({breaks})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    if report["rank"] == 0:
        out = Path(args.out or f"out/bench/tp_compile_{report['device_type']}.json")
        write_json(out, report)
        print()
        print(table(report))
        print(f"\nJSON: {out}  ({report['wall_s']:.0f} s)")
    dist.barrier()
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
