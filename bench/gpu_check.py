"""The Python half of bench/gpu_check.sh: one stage per call, each writing JSON into --out.

    python -m bench.gpu_check flash   --out DIR [--budget S]       # flash-attn vs SDPA (bf16) or its absence
    python -m bench.gpu_check preset NAME --out DIR [--budget S]   # tokens/s, MFU, peak memory, renorm share
    python -m bench.gpu_check preset NAME --mode compiled|ckpt ... # the same, torch.compile'd / checkpointed
    python -m bench.gpu_check summary --out DIR                    # summary.json + the table (printed)
    python -m bench.gpu_check all     --out DIR                    # all of the above in this process

Needs torch, DeepSpeed and this repository (no MLflow, tiktoken, network; gpu_check.sh brings
DeepSpeed from .whl/ where it is missing). Each preset runs as in training, on one GPU: the
trainer's own step (bench.steps.StepRunner: DeepSpeed bf16 at ZeRO 1, fused AdamW, train_step's
renormalisation for nGPT variants) at the preset's micro batch (8 at 1k, 2 at 4k); `--warmup` untimed
steps, then up to `--steps` timed ones while the stage's time budget lasts (measured from the
start of the process, so imports and model building count against it).

--dry-run (or GPU_CHECK_DRY_RUN=1) swaps every preset for a tiny model of the same kind (2 layers,
n_embd 64, a quarter of the heads, vocab 256, 1/16 of the context, same micro batch, same maps)
on CPU in fp32, so that the whole pipeline can be tested where no GPU exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# The clock starts before the heavy imports below: their time counts against the budget. Hence
# imports after code, for this file only:
# ruff: noqa: E402
_START = time.monotonic()

import torch

from bench.attention import FLASH_ABSENT, flash_vs_sdpa
from bench.env import environment, free_memory, is_oom, setup_threads, sync
from bench.gpu_probes import nonfinite_skip, sdpa_kernels
from bench.memory import proc_status_mb
from bench.output import fmt, format_table, write_json
from bench.steps import StepRunner, peak_for, summarize_steps
from letngpt.config import ModelConfig
from letngpt.model.kernels import flash_attn_func
from letngpt.presets import get_config
from letngpt.train.compile import compile_counts

PRESETS = ("GPT_1kctx_10k_lr30e-4", "nGPT_1kctx_10k_lr30e-4", "LETNGPT_1kctx_10k_lr30e-4",
           "LETNGPT_4kctx_10k_lr30e-4")
DRY_ENV = "GPU_CHECK_DRY_RUN"
# The issue's targets (benchmarks, not tests): reported, never asserted.
TARGET_MFU, TARGET_RENORM_SHARE, TARGET_LET_OVER_NGPT = 0.45, 0.02, 1.5


def is_dry(args: argparse.Namespace) -> bool:
    return bool(args.dry_run) or os.environ.get(DRY_ENV, "") not in ("", "0")


def preset_setup(name: str, dry: bool) -> tuple[ModelConfig, int, torch.device, torch.dtype]:
    run = get_config(name)
    cfg, batch = run.model, run.train.batch_size
    if dry:
        cfg = dataclasses.replace(cfg, vocab_size=256, n_layer=2, n_embd=64, n_head=max(2, cfg.n_head // 4),
                                  block_size=cfg.block_size // 16)
        return cfg, batch, torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run for the CPU rehearsal)")
    return cfg, batch, torch.device("cuda"), torch.bfloat16


# ------------------------------------------------------------------------------------------
# stages


def stage_flash(out: Path, dry: bool) -> dict:
    """flash-attn vs SDPA in bf16 (kernel agreement, then module timings), or a note of absence."""
    t_stage = time.monotonic()
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"deepspeed", "mlflow", "tiktoken"})
    print(f"import letngpt pulled in: {', '.join(heavy) if heavy else 'nothing heavy'}", flush=True)
    res: dict = {"stage": "flash", "environment": environment(device, torch.bfloat16, torch.get_num_threads()),
                 "status": "started", "heavy_imports": heavy}
    write_json(out / "flash.json", res)
    try:
        # On a CPU (dry run, or no GPU) the configs are the tiny stand-ins; flash cannot run there anyway.
        setups = [preset_setup(n, dry or device.type == "cpu") for n in ("nGPT_1kctx_10k_lr30e-4",
                                                                          "LETNGPT_1kctx_10k_lr30e-4")]
        cfgs, batch = [s[0] for s in setups], setups[0][1]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        res["sdpa_kernels"] = {f"M={c.num_maps} hd={c.head_dim}": sdpa_kernels(c, batch, device, dtype) for c in cfgs}
        print(f"SDPA kernels that ran ({dtype}): {res['sdpa_kernels']}", flush=True)
        res.update(flash_vs_sdpa(cfgs, batch, device, reps=10))
        res["status"] = "ok"
    except Exception as e:  # a flash-attn that imports but cannot run here is a finding, not a crash
        res.update(available=flash_attn_func() is not None, status="error", error=f"{type(e).__name__}: {e}"[:500])
    res["seconds"], res["process_seconds"] = time.monotonic() - t_stage, time.monotonic() - _START
    write_json(out / "flash.json", res)
    print(res.get("note") or f"flash-attn vs SDPA: {res.get('status')}, agree="
          f"{all(a['agree'] for a in res.get('agreement', [])) if res.get('agreement') else None}", flush=True)
    return res


MODES = {"": (False, False), "compiled": (True, False), "ckpt": (False, True)}


def result_name(name: str, mode: str = "") -> str:
    """preset_<name>.json for eager, preset_<name>+compiled.json, preset_<name>+ckpt.json for the twins."""
    return f"{name}+{mode}" if mode else name


def run_steps(res: dict, name: str, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype,
              mode: str, warmup: int, steps: int, stop_at: float) -> tuple[StepRunner | None, list[dict]]:
    """Build the preset's StepRunner, run its warm-up and timed steps until `stop_at` (monotonic);
    the status (ok, partial, oom, error) goes into `res`."""
    times: list[dict] = []
    runner = None
    try:
        compile_, ckpt = MODES[mode]
        runner = StepRunner(name, cfg, batch, device, dtype, compile=compile_, checkpointing=ckpt)
        res["params"] = runner.params
        t0 = time.monotonic()
        for _ in range(warmup):
            runner.step()
            if time.monotonic() > stop_at:
                break
        res["warmup_s"] = time.monotonic() - t0
        while len(times) < steps and time.monotonic() < stop_at:
            times.append(runner.step())
        res["status"] = "ok" if len(times) >= steps else ("partial" if times else "no timed steps (time budget)")
    except Exception as e:
        if not is_oom(e):
            res.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        else:
            res.update(status="oom", error=str(e)[:500])
    return runner, times


def time_renorm_alone(res: dict, runner: StepRunner, timed: bool) -> None:
    """The renormalisation timed alone, back to back, and its share of the median step."""
    try:
        iso = runner.time_renorm(10)
        res["renorm_ms_isolated"] = None if iso is None else iso * 1e3
        if iso is not None and timed:
            res["renorm_share_isolated"] = iso * 1e3 / res["step_ms_median"]
    except Exception as e:  # keep what was measured
        res["renorm_error"] = str(e)[:300]


def check_nonfinite(res: dict, runner: StepRunner) -> None:
    """After the timing: a NaN-loss step must be skipped by the guard, the next one applied."""
    try:
        res["nonfinite"] = nonfinite_skip(runner)
    except Exception as e:  # a finding, not a crash of the stage
        res["nonfinite"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


def record_memory(res: dict, device: torch.device, base_rss: float | None) -> None:
    """Peak memory of the stage: CUDA's allocator peak, or on CPU the peak RSS growth."""
    try:
        sync(device)
    except Exception as e:  # a broken CUDA context: report what there is
        res["sync_error"] = str(e)[:300]
    if device.type == "cuda":
        res["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        res["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        res["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        hwm = proc_status_mb("VmHWM")
        res["peak_mb"] = None if hwm is None or base_rss is None else hwm - base_rss
        res["memory_kind"] = "CPU peak RSS growth over RSS before the model"


def stage_preset(name: str, out: Path, dry: bool, deadline: float, steps: int, warmup: int, mode: str = "") -> dict:
    """One preset: warm-up, timed steps (until `deadline`, a time.monotonic() value, comes near),
    isolated renorm timing, peak memory. mode "compiled": torch.compile'd model (the warm-up steps
    include the compilation, reported as warmup_s); "ckpt": activation checkpointing per block."""
    path = out / f"preset_{result_name(name, mode)}.json"
    t_stage = time.monotonic()
    reserve = 5.0 if not dry else 0.5  # seconds kept for the renorm timing and the JSON
    res: dict = {"stage": "preset", "preset": name, "mode": mode or "eager", "dry_run": dry, "status": "started"}
    try:
        cfg, batch, device, dtype = preset_setup(name, dry)
    except Exception as e:
        res.update(status="error", error=str(e))
        write_json(path, res)
        return res
    setup_threads(0, device)
    res.update(environment=environment(device, dtype, torch.get_num_threads()), config=dataclasses.asdict(cfg),
               batch_size=batch, seq_len=cfg.block_size)
    write_json(path, res)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = proc_status_mb("VmRSS")
    runner, times = run_steps(res, name, cfg, batch, device, dtype, mode, warmup, steps, deadline - reserve)
    if times:
        res.update(summarize_steps(times, cfg, batch * cfg.block_size, peak_for(device)))
        res["final_loss"] = runner.last_loss()
    if runner is not None and runner.model is not None and res["status"] != "oom":
        time_renorm_alone(res, runner, bool(times))
        if mode == "compiled":
            res["dynamo"] = compile_counts()  # recompilations and graph breaks of this stage's process
        elif not mode and time.monotonic() < deadline - reserve:
            check_nonfinite(res, runner)
    record_memory(res, device, base_rss)
    res["seconds"], res["process_seconds"] = time.monotonic() - t_stage, time.monotonic() - _START
    write_json(path, res)
    del runner
    free_memory(device)
    print(f"{result_name(name, mode)}: {res['status']}"
          + (f", {res['tokens_per_s']:,.0f} tokens/s, step {res['step_ms_median']:.1f} ms" if times else ""),
          flush=True)
    return res


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def twin_ratios(presets: dict) -> list[dict]:
    """Compiled / checkpointed runs over the same preset's eager run: step time, tokens/s, peak memory."""
    out = []
    for name, r in presets.items():
        if "+" not in name:
            continue
        base = presets.get(name.split("+")[0], {})

        def ratio(key: str, r=r, base=base) -> float | None:
            return r[key] / base[key] if r.get(key) and base.get(key) else None

        out.append({"twin": name, "step_ratio": ratio("step_ms_median"), "tokens_ratio": ratio("tokens_per_s"),
                    "memory_ratio": ratio("peak_mb")})
    return out


def read_stages(out: Path) -> list[dict]:
    """The shell's stages.jsonl: one record (stage, rc, seconds) per stage it ran."""
    stages = []
    if (out / "stages.jsonl").exists():
        for line in (out / "stages.jsonl").read_text().splitlines():
            try:
                stages.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return stages


def collect_presets(out: Path, rc_of: dict[str, dict]) -> dict[str, dict]:
    """Every preset (and twin) this run attempted, from its JSON, with the shell's verdict on a stage
    that died (timed out, non-zero exit) where its JSON did not get to say."""
    # the presets this run attempted (a JSON file or a shell stage record); all of them if none did
    names = [n for n in PRESETS if (out / f"preset_{n}.json").exists() or f"preset:{n}" in rc_of] or list(PRESETS)
    twins = [result_name(n, m) for n in PRESETS for m in MODES if m]
    names += [t for t in twins if (out / f"preset_{t}.json").exists() or f"preset:{t}" in rc_of]
    presets = {}
    for name in names:
        r = _load(out / f"preset_{name}.json") or {"preset": name, "status": "missing"}
        shell = rc_of.get(f"preset:{name}")
        if shell and shell.get("rc") not in (0, None):
            rc = shell["rc"]
            r["shell_rc"] = rc
            if r.get("status") in ("started", "missing", None) or "step_ms_median" not in r:
                r["status"] = "timed out" if rc in (124, 137) else f"exit {rc}"
        presets[name] = r
    return presets


def check_targets(presets: dict[str, dict]) -> tuple[dict[str, bool], float | None]:
    """The issue's targets, met or not: MFU at 1k, the renormalisation's share, LETNGPT over nGPT at 1k."""
    ngpt = presets.get("nGPT_1kctx_10k_lr30e-4", {})
    let1k = presets.get("LETNGPT_1kctx_10k_lr30e-4", {})
    targets = {}
    for name, r in presets.items():
        if name.endswith("1kctx_10k_lr30e-4") and r.get("mfu") is not None:
            targets[f"mfu>=45% {name}"] = r["mfu"] >= TARGET_MFU
        if r.get("config", {}).get("use_ngpt") and r.get("renorm_share") is not None:
            targets[f"renorm<2% {name}"] = r["renorm_share"] < TARGET_RENORM_SHARE
    let_over = None
    if "step_ms_median" in ngpt and "step_ms_median" in let1k:
        let_over = let1k["step_ms_median"] / ngpt["step_ms_median"]
        targets["LETNGPT 1k step < 1.5x nGPT 1k"] = let_over < TARGET_LET_OVER_NGPT
    return targets, let_over


def flash_line(flash: dict | None) -> str:
    if flash is None:
        return "flash-attn check: missing (see log)"
    if not flash.get("available"):
        return flash.get("note", FLASH_ABSENT)
    if flash.get("status") != "ok":
        return f"flash-attn check: {flash.get('status')}: {flash.get('error', '')[:200]}"
    ok = all(a["agree"] for a in flash.get("agreement", []))
    mods = ", ".join(f"M={m['maps']}: sdpa/flash {m['sdpa_over_flash']:.2f}x" for m in flash.get("modules", []))
    return f"flash-attn vs SDPA (bf16): agree={ok}; {mods}"


def probe_lines(flash: dict | None, presets: dict[str, dict]) -> list[str]:
    """Which SDPA kernels ran, each compiled stage's recompilations / graph breaks, the non-finite skips."""
    lines = []
    if flash and flash.get("sdpa_kernels"):
        lines.append("SDPA kernels that ran: " + "; ".join(f"{k}: {'+'.join(v) or 'unrecognised'}"
                                                           for k, v in flash["sdpa_kernels"].items()))
    for name, r in presets.items():
        d = r.get("dynamo")
        if d:
            lines.append(f"{name}: {d['recompiles']} recompilations, {d['graph_breaks']} graph breaks, "
                         f"{d['graphs']} graphs")
        nf = r.get("nonfinite")
        if nf:
            verdict = "ok" if nf.get("ok") else f"FAILED {nf}"
            lines.append(f"{name}: a NaN-loss step ({nf.get('dtype')}, ZeRO {nf.get('zero_stage')}) skipped with "
                         f"masters and Adam unchanged, the next one applied: {verdict}")
    return lines


def summary_text(summary: dict) -> str:
    """The table and the lines around it, as printed last by gpu_check.sh."""
    presets, env, let_over, targets = (summary["presets"], summary["environment"], summary["let_over_ngpt_step_1k"],
                                       summary["targets_met"])
    rows = []
    for name, r in presets.items():
        rows.append([name, r.get("status", "?"), fmt(r.get("step_ms_median")), fmt(r.get("tokens_per_s"), ",.0f"),
                     fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"),
                     fmt(None if r.get("peak_mb") is None else r["peak_mb"] / 1024, ".2f"),
                     fmt(None if r.get("renorm_share") is None else 100 * r["renorm_share"], ".2f"),
                     fmt(r.get("renorm_ms_isolated"), ".2f"), fmt(r.get("steps_timed"), "d")])
    lines = []
    if any(r.get("dry_run") for r in presets.values()):
        lines.append("DRY RUN: tiny stand-in models on CPU; these numbers say nothing about the presets")
    if env:
        lines.append(f"# {env['device_name']}, torch {env['torch']}, cuda {env['cuda']}, {env['dtype']}, {env['date']}")
    lines.append(flash_line(summary["flash"]))
    lines.extend(probe_lines(summary["flash"], presets))
    lines.append(format_table(["preset", "status", "step ms", "tokens/s", "MFU %", "peak GiB", "renorm %",
                               "renorm ms", "steps"], rows))
    for t in summary["twins"]:
        lines.append(f"{t['twin']}: step x{fmt(t['step_ratio'], '.2f')}, tokens/s x{fmt(t['tokens_ratio'], '.2f')}, "
                     f"peak memory x{fmt(t['memory_ratio'], '.2f')} vs eager (same run)")
    if let_over is not None:
        lines.append(f"LETNGPT/nGPT step time at 1k: {let_over:.2f}x (target < {TARGET_LET_OVER_NGPT})")
    if targets:
        lines.append("targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    return "\n".join(lines)


def stage_summary(out: Path) -> dict:
    """Collect every stage's JSON (and the shell's stages.jsonl) into summary.json; print the table."""
    stages = read_stages(out)
    presets = collect_presets(out, {s.get("stage"): s for s in stages})
    targets, let_over = check_targets(presets)
    env = next((r["environment"] for r in presets.values() if "environment" in r), None)
    summary = {"environment": env, "flash": _load(out / "flash.json"), "presets": presets, "stages": stages,
               "let_over_ngpt_step_1k": let_over, "targets_met": targets, "twins": twin_ratios(presets)}
    write_json(out / "summary.json", summary)
    text = summary_text(summary)
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return summary


# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check stages (see bench/gpu_check.sh)")
    p.add_argument("stage", choices=("flash", "preset", "summary", "all"))
    p.add_argument("preset", nargs="?", default=None, help="preset name for the 'preset' stage")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--budget", type=float, default=90.0, help="seconds this process may take (soft)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; dry run 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; dry run 1)")
    p.add_argument("--mode", choices=[m for m in MODES if m], default="",
                   help="preset stage: compiled (torch.compile) or ckpt (activation checkpointing) instead of eager")
    p.add_argument("--modes", default="compiled,ckpt",
                   help="'all': the twins to run after the eager presets (compiled: the 1k ones; ckpt: the 4k one)")
    p.add_argument("--dry-run", action="store_true", help=f"tiny CPU models instead of the presets (or ${DRY_ENV}=1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = is_dry(args)
    steps = args.steps if args.steps is not None else (3 if dry else 30)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    if args.stage == "flash":
        stage_flash(out, dry)
    elif args.stage == "preset":
        if args.preset not in PRESETS:
            raise SystemExit(f"preset must be one of {', '.join(PRESETS)}")
        # the budget counts from the start of this process: imports and CUDA start-up included
        stage_preset(args.preset, out, dry, _START + args.budget, steps, warmup, args.mode)
    elif args.stage == "summary":
        stage_summary(out)
    else:  # all, in this process; each preset gets an equal share of the budget that is left
        end = time.monotonic() + args.budget
        stage_flash(out, dry)
        jobs = [(name, "") for name in PRESETS] + [(n, m) for n in PRESETS for m in args.modes.split(",")
                                                    if m and (m == "compiled") == ("_1kctx_" in n)]
        for i, (name, mode) in enumerate(jobs):
            share = (end - time.monotonic()) / (len(jobs) - i)
            stage_preset(name, out, dry, time.monotonic() + share, steps, warmup, mode)
        stage_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
