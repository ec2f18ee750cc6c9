"""Training throughput of GPT, nGPT and LET-nGPT (M = 1, 3, 5) side by side, with ratios to GPT.

    python -m bench.throughput                       # CPU: tiny size, about a minute on 2 cores
    python -m bench.throughput --size 1k             # GPU: the 24-layer 1k presets, micro batch 8, bf16
    python -m bench.throughput --size small --steps 20 --out out/bench/small.json
    python -m bench.throughput --n_layer 2 --n_embd 64 --n_head 4 --block_size 64 --vocab_size 256 --batch_size 4

Measures, in one run: the time of the trainer's training step (bench.steps.StepRunner: forward +
backward, DeepSpeed's optimizer step, the post-step renormalisation for nGPT variants) with its
phases, tokens/s, the ratios to GPT and to nGPT,
model TFLOP/s (letngpt.model.flops.flops_per_token, which counts every map) and MFU on GPU, the
renormalisation's share of the step (also timed alone), peak memory per variant (one fresh
process each), fused one-call multi-map attention vs a per-map loop (attention module,
forward + backward), and flash-attn vs SDPA where both exist. Writes a JSON file and prints
tables. Variants are interleaved step by step (see bench.steps.measure_variants).

Sizes: `tiny` (the tiny_* presets: 4 x 128, 4 heads for every variant, context 128, batch 8) and
`small` (6 x 256, 8 heads / 4 for LET-nGPT, context 256) use small vocabularies (256 / 512) so
that the lm_head does not dominate a CPU step; `1k` and `4k` are the 24-layer presets exactly
(vocab 50304, 16 heads for GPT/nGPT, 8 for LET-nGPT, micro batch 8 / 2). `auto` is tiny on CPU,
1k on GPU. Any of --n_layer ... --batch_size overrides the chosen size's field.

Threads: on CPU torch.set_num_threads(--threads); the default is $OMP_NUM_THREADS when set, else
the CPUs this process may use (os.sched_getaffinity). The same count is used for every variant and
for the memory-probe processes, and is recorded in the JSON; the numbers are for that count.
(On a machine shared with other jobs, fewer threads than cores often gives steadier numbers:
OpenMP barriers degrade badly when their threads are descheduled.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from bench.attention import FLASH_ABSENT, bench_attention, flash_vs_sdpa
from bench.env import busy_warning, environment, resolve_device, resolve_dtype, setup_threads
from bench.memory import memory_in_subprocess
from bench.output import fmt, format_table, write_json
from bench.sizes import SIZE_NAMES, Variant, get_size, variant_configs
from bench.steps import add_ratios, measure_variants, peak_for
from letngpt.model.kernels import flash_attn_func

SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "let_n_head", "block_size", "vocab_size", "batch_size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="auto", choices=("auto", *SIZE_NAMES))
    for name in SIZE_FIELDS:
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--maps", default="1,3,5", help="LET-nGPT map counts M, comma separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", help="auto (bf16 weights on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: $OMP_NUM_THREADS, else all CPUs this process may use)")
    p.add_argument("--sequential", action="store_true",
                   help="one variant at a time (less memory) instead of interleaving steps")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip gradients in the step (0: no clipping)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak for MFU (0: look the GPU up)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory probes")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--attn-reps", type=int, default=20, help="repetitions of the attention-module timings")
    p.add_argument("--compile", action="store_true",
                   help="add a torch.compile'd twin of GPT, nGPT and each LET-nGPT; print compiled/eager ratios")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="add a block-checkpointed twin of each variant; print step and peak-memory ratios")
    p.add_argument("--out", default=None, help="JSON path (default out/bench/throughput_<size>_<device>.json)")
    return p.parse_args(argv)


def build_size(args: argparse.Namespace, device) -> tuple[str, object]:
    name = args.size if args.size != "auto" else ("1k" if device.type == "cuda" else "tiny")
    size = get_size(name)
    overrides = {f: getattr(args, f) for f in SIZE_FIELDS if getattr(args, f) is not None}
    if "n_head" in overrides and "let_n_head" not in overrides:
        # keep the size's convention: LET-nGPT has half the heads where the size halves them
        halve = size.let_n_head < size.n_head
        overrides["let_n_head"] = max(1, overrides["n_head"] // 2) if halve else overrides["n_head"]
    if overrides:
        size = dataclasses.replace(size, **overrides)
        name = f"{name}+custom"
    return name, size


def all_variants(size, maps: list[int], flash_in_model: bool, args: argparse.Namespace) -> list[Variant]:
    """The size's variants; SDPA twins of nGPT and LET-nGPT M=3 where the model picks flash-attn by
    itself; the compiled / checkpointed twins that the flags ask for."""
    variants = variant_configs(size, maps)
    if flash_in_model:
        for v in list(variants):
            if v.name in ("nGPT", "LET-nGPT M=3"):
                variants.append(Variant(f"{v.name} [sdpa]", dataclasses.replace(v.cfg, attn_backend="sdpa")))
    return variants + twins(variants, args)


def probe_memory_of(variants: list[Variant], results: list[dict], batch_size: int, device: torch.device,
                    dtype: torch.dtype, steps: int, threads: int) -> None:
    """Each eager variant's peak memory, in a fresh process (a compiled twin's is not measured)."""
    for v, r in zip(variants, results, strict=True):
        if not v.compile:
            r["memory"] = memory_in_subprocess(v.cfg, batch_size, device, dtype, steps=steps,
                                               threads=threads if device.type == "cpu" else None,
                                               checkpointing=v.checkpointing)


def measure(args: argparse.Namespace, log=print) -> dict:
    t_start = time.monotonic()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = setup_threads(args.threads, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for fp32 runs
        torch.backends.cudnn.allow_tf32 = True
    size_name, size = build_size(args, device)
    maps = [int(m) for m in str(args.maps).split(",") if m.strip()]
    flash_in_model = flash_attn_func() is not None and device.type == "cuda" and dtype != torch.float32
    variants = all_variants(size, maps, flash_in_model, args)
    peak = peak_for(device, args.peak_tflops)
    env = environment(device, dtype, threads)
    log(f"# throughput: {size_name} {dataclasses.asdict(size)}")
    log(f"# {env['device_name']} ({device}), {env['dtype']}, {threads} threads, "
        f"{args.steps} timed + {args.warmup} warm-up steps, {'sequential' if args.sequential else 'interleaved'}")
    warning = busy_warning(env)
    if warning:
        log(warning)

    results = measure_variants(variants, size.batch_size, device, dtype, steps=args.steps, warmup=args.warmup,
                               interleave=not args.sequential, peak=peak, grad_clip=args.grad_clip, log=log)
    add_ratios(results)
    for v, r in zip(variants, results, strict=True):
        r["attention_kernel"] = "flash-attn" if flash_in_model and v.cfg.attn_backend == "auto" else "sdpa"
    if args.memory:
        probe_memory_of(variants, results, size.batch_size, device, dtype, args.memory_steps, threads)
    twin_ratios(results)
    attn_cfgs = [v.cfg for v in variants if v.name.startswith("LET-nGPT M=") and "[" not in v.name]
    attention = bench_attention(attn_cfgs, size.batch_size, device, dtype, reps=args.attn_reps)
    flash_cfgs = [v.cfg for v in variants if v.name in ("nGPT", "LET-nGPT M=3")]
    flash = flash_vs_sdpa(flash_cfgs, size.batch_size, device, reps=args.attn_reps)

    report = {
        "benchmark": "throughput",
        "environment": env,
        "size": {"name": size_name, **dataclasses.asdict(size)},
        "settings": {"steps": args.steps, "warmup": args.warmup, "interleaved": not args.sequential,
                     "grad_clip": args.grad_clip, "maps": maps, "memory_steps": args.memory_steps,
                     "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
                     "step": "letngpt.train.trainer.train_step on a DeepSpeed engine (its last stage: the "
                             "renormalisation)",
                     "tokens_per_s": "batch_size*seq_len / median step time",
                     "memory": "one fresh process per variant; GPU: torch.cuda.max_memory_allocated; "
                               "CPU: peak RSS (VmHWM) minus RSS after imports and a micro warm-up step"},
        "variants": results,
        "attention": attention,
        "flash_vs_sdpa": flash,
        "wall_s": time.monotonic() - t_start,
        "warning": warning,
    }
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        report["environment"]["loadavg_1m_after"] = os.getloadavg()[0]
    out = Path(args.out or f"out/bench/throughput_{size_name.replace('+', '_')}_{device.type}.json")
    write_json(out, report)
    report["json_path"] = str(out)
    return report


def twins(variants: list[Variant], args: argparse.Namespace) -> list[Variant]:
    """`NAME [compiled]` / `NAME [ckpt]` for each plain variant, measured in the same interleaved rounds."""
    out = []
    for v in [v for v in variants if "[" not in v.name]:
        if args.compile:
            out.append(Variant(f"{v.name} [compiled]", v.cfg, compile=True))
        if args.activation_checkpointing:
            out.append(Variant(f"{v.name} [ckpt]", v.cfg, checkpointing=True))
    return out


def twin_ratios(results: list[dict]) -> None:
    """For each twin: its step time and peak memory over its plain variant's (`vs_plain_step`, `vs_plain_memory`),
    and tokens/s ratio; measured in one run, side by side."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        if " [" not in r["name"] or r["name"].endswith("[sdpa]"):
            continue
        base = by_name.get(r["name"].split(" [")[0], {})
        if "step_ms_median" in base and "step_ms_median" in r:
            r["vs_plain_step"] = r["step_ms_median"] / base["step_ms_median"]
            r["vs_plain_tokens"] = r["tokens_per_s"] / base["tokens_per_s"]
        mem, base_mem = r.get("memory", {}).get("peak_mb"), base.get("memory", {}).get("peak_mb")
        if mem and base_mem and r["name"].endswith("[ckpt]"):
            r["vs_plain_memory"] = mem / base_mem


def twin_table(report: dict) -> str | None:
    rows = [[r["name"], fmt(r.get("step_ms_median")), fmt(r.get("vs_plain_step"), ".2f"),
             fmt(r.get("vs_plain_tokens"), ".2f"), fmt(r.get("memory", {}).get("peak_mb"), ",.0f"),
             fmt(r.get("vs_plain_memory"), ".2f")]
            for r in report["variants"] if "vs_plain_step" in r or "vs_plain_memory" in r]
    if not rows:
        return None
    return ("compiled / checkpointed twins vs the plain (eager) variant, same run:\n"
            + format_table(["variant", "step ms", "step x plain", "tokens/s x plain", "peak MB", "memory x plain"],
                           rows))


def tables(report: dict) -> str:
    rows = []
    for r in report["variants"]:
        cfg = r["config"]
        if "step_ms_median" not in r:
            rows.append([r["name"], cfg["n_head"], cfg["num_maps"], "-", r.get("error", "no timed steps")[:40]]
                        + ["-"] * 10)
            continue
        mem = r.get("memory", {})
        rows.append([
            r["name"], cfg["n_head"], cfg["num_maps"], fmt(r["params"] / 1e6, ".2f"),
            fmt(r["step_ms_median"]), fmt(r["tokens_per_s"], ",.0f"), fmt(r["step_vs_GPT"], ".2f"),
            fmt(r["step_vs_nGPT"], ".2f"), fmt(r["fwdbwd_ms"]), fmt(r["optim_ms"]), fmt(r["renorm_ms"], ".2f"),
            fmt(100 * r["renorm_share"], ".1f"), fmt(r["achieved_tflops"], ".3f"),
            fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"),
            fmt(mem.get("peak_mb"), ",.0f", none="err" if "error" in mem else "-"),
        ])
    head = ["variant", "heads", "M", "params M", "step ms", "tokens/s", "x GPT", "x nGPT", "fwd+bwd", "optim",
            "renorm", "renorm %", "TFLOP/s", "MFU %", "peak MB"]
    s = report["settings"]
    parts = [format_table(head, rows),
             f"step ms: median of {s['steps']} {'interleaved' if s['interleaved'] else 'sequential'} steps "
             f"(phases: medians); x GPT / x nGPT: step time ratio; renorm %: median renormalisation "
             f"time over "
             f"median step time; TFLOP/s: model FLOPs (letngpt.model.flops, all maps) per second; "
             f"peak MB: {s['memory']}."]
    twin = twin_table(report)
    if twin:
        parts.append(twin)
    att = report["attention"]
    if att:
        arows = [[a["maps"], a["n_head"], fmt(a["fused_ms"], ".2f"), fmt(a["loop_ms"], ".2f"),
                  fmt(a["loop_over_fused"], ".2f"), fmt(a["max_abs_diff"], ".1e")] for a in att]
        parts.append("attention module, forward+backward (B={}, T={}):\n".format(att[0]["batch_size"],
                                                                               att[0]["seq_len"])
                     + format_table(["M", "heads", "fused ms", "loop ms", "loop/fused", "max |diff|"], arows))
    fl = report["flash_vs_sdpa"]
    if not fl.get("available"):
        parts.append(fl.get("note", FLASH_ABSENT))
    else:
        agree = all(a["agree"] for a in fl["agreement"])
        frows = [[m["maps"], m["n_head"], fmt(m["flash_ms"], ".2f"), fmt(m["sdpa_ms"], ".2f"),
                  fmt(m["sdpa_over_flash"], ".2f")] for m in fl["modules"]]
        parts.append(f"flash-attn vs SDPA (bf16 outputs and grads agree: {agree}):\n"
                     + format_table(["M", "heads", "flash ms", "sdpa ms", "sdpa/flash"], frows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = measure(args)
    print()
    print(tables(report))
    if report.get("warning"):
        print("\n" + report["warning"])
    print(f"\nJSON: {report['json_path']}  ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
