"""Measuring functions shared by bench/throughput.py, bench/gpu_check.py and the tests.

Everything here needs only torch and this repository (no DeepSpeed, MLflow or tiktoken), and
runs on CPU or on one CUDA GPU.

What a "training step" is here: forward + backward, then torch AdamW step + zero_grad, then
`letngpt.normalize_weights_` for nGPT variants (the trainer's order). The three phases are
timed separately with `time.perf_counter`, with `torch.cuda.synchronize()` at every phase
boundary on GPU, so each phase's time is real GPU time and the renormalisation's share of
the step can be read off directly. (Gradient clipping is off unless asked for.)

Precision: fp32 on CPU; on GPU the default is bf16 WEIGHTS (the model cast to bfloat16, as
DeepSpeed's bf16 mode computes), with fused torch AdamW updating those bf16 weights directly.
Autocast was not used: under autocast nGPT's fp32 `s_qk` promotes q/k back to fp32, which
takes the flash-attn path away and measures a model nobody trains. Note that DeepSpeed also
keeps fp32 master weights and fp32 Adam moments (16 bytes/param with ZeRO-1 on one GPU); the
plain optimizer here keeps bf16 ones (8 bytes/param), so memory here is a lower bound.

Memory: each variant is measured alone in a fresh subprocess (`python -m bench.memprobe`), so
no other variant's tensors or allocator cache are counted and an out-of-memory error in one
variant cannot take the others down. On GPU the figure is `torch.cuda.max_memory_allocated`
(plus `max_memory_reserved`); on CPU it is the growth of the process's peak resident set
(VmHWM from /proc/self/status) over its resident set after importing torch and letngpt and
running one step of a throwaway micro model (which starts thread pools and the allocator),
i.e. weights + gradients + optimizer state + activations + allocator slack, as the OS sees it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import letngpt
from letngpt.config import ModelConfig
from letngpt.flops import flops_per_token, peak_tflops
from letngpt.kernels import attend, flash_attn_func
from letngpt.model import LinearEnsembleAttention, apply_rope, rope_tables, unit
from letngpt.presets import get_config

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# sizes and variants


@dataclass(frozen=True)
class Size:
    """A benchmark size. GPT and nGPT use `n_head` heads, LET-nGPT `let_n_head` (same n_embd)."""

    n_layer: int
    n_embd: int
    n_head: int
    let_n_head: int
    block_size: int
    vocab_size: int
    batch_size: int


def preset_size(tag: str) -> Size:
    """The 24-layer presets' architecture and micro batch at `tag` ('1k' or '4k') context."""
    gpt, let = get_config(f"GPT_{tag}ctx_10k_lr30e-4"), get_config(f"LETNGPT_{tag}ctx_10k_lr30e-4")
    m = gpt.model
    return Size(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, let_n_head=let.model.n_head,
                block_size=m.block_size, vocab_size=m.vocab_size, batch_size=gpt.train.batch_size)


# CPU sizes use a small vocabulary: with the real 50304 the lm_head and the loss would be most
# of the step and hide the differences between the variants.
CPU_SIZES = {
    # The tiny_* presets' architecture (all of them use 4 heads), byte-sized vocabulary.
    "tiny": Size(n_layer=4, n_embd=128, n_head=4, let_n_head=4, block_size=128, vocab_size=256, batch_size=8),
    # The big presets' head convention (LET-nGPT has half the heads) at a CPU-affordable width.
    "small": Size(n_layer=6, n_embd=256, n_head=8, let_n_head=4, block_size=256, vocab_size=512, batch_size=8),
}
SIZE_NAMES = ("tiny", "small", "1k", "4k")


def get_size(name: str) -> Size:
    if name in CPU_SIZES:
        return CPU_SIZES[name]
    if name in ("1k", "4k"):
        return preset_size(name)
    raise ValueError(f"unknown size {name!r}; one of {', '.join(SIZE_NAMES)}")


@dataclass
class Variant:
    name: str
    cfg: ModelConfig


def variant_configs(size: Size, maps: Sequence[int] = (1, 3, 5), attn_backend: str = "auto") -> list[Variant]:
    """GPT, nGPT (n_head heads) and LET-nGPT with each M in `maps` (let_n_head heads)."""
    base = dict(vocab_size=size.vocab_size, block_size=size.block_size, n_layer=size.n_layer,
                n_embd=size.n_embd, attn_backend=attn_backend)
    out = [Variant("GPT", ModelConfig(**base, n_head=size.n_head, num_maps=1, use_ngpt=False)),
           Variant("nGPT", ModelConfig(**base, n_head=size.n_head, num_maps=1, use_ngpt=True))]
    for m in maps:
        out.append(Variant(f"LET-nGPT M={m}", ModelConfig(**base, n_head=size.let_n_head, num_maps=m, use_ngpt=True)))
    return out


# ------------------------------------------------------------------------------------------
# device, dtype, threads


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise SystemExit(f"--dtype {name!r}: one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def default_threads_affinity() -> int:
    """The CPUs this process may run on (affinity aware where the OS tells us)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else the CPUs this process may run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return default_threads_affinity()


def busy_warning(env: dict) -> str | None:
    """A warning when other work competes for the CPUs: timings then mostly measure the
    contention (OpenMP threads wait on descheduled peers), not the model."""
    load, cpus = env.get("loadavg_1m"), env.get("cpus") or 1
    if env.get("device", "").startswith("cpu") and load is not None and load > 0.75 * cpus:
        return (f"WARNING: 1-minute load average {load:.1f} on {cpus} CPUs before the run: other work competes "
                f"for the cores, so absolute times are unreliable (ratios less so); rerun on a quiet machine, "
                f"or with --threads 1")
    return None


def setup_threads(threads: int, device: torch.device) -> int:
    """CPU: torch.set_num_threads(threads or default_threads()), the same for every variant.
    GPU: left at torch's default (the host threads only launch kernels)."""
    if device.type == "cpu":
        torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    """What a reader of the JSON needs to reproduce or judge the numbers."""
    fa = flash_attn_func()
    flash_version = None
    if fa is not None:
        try:
            import flash_attn

            flash_version = getattr(flash_attn, "__version__", "unknown")
        except Exception:  # importable function but odd package: still record that it exists
            flash_version = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "cpus": default_threads_affinity(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "flash_attn": flash_version,
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------------------
# one training step, timed by phase


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """As the trainer: decay matrices only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepRunner:
    """A model, its AdamW and one fixed random batch; `step()` runs and times one training step."""

    def __init__(self, name: str, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 *, seed: int = 0, lr: float = 1e-4, grad_clip: float = 0.0) -> None:
        self.name, self.cfg, self.device, self.dtype = name, cfg, device, dtype
        self.batch_size, self.grad_clip = batch_size, grad_clip
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the device: a 24-layer model inits in ms there
            model = letngpt.build_model(cfg)
        self.model = model.to(device=device, dtype=dtype).train()
        if cfg.use_ngpt and dtype != torch.float32:
            letngpt.normalize_weights_(self.model)  # back onto the sphere after the cast
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer_impl = "fused" if fused else "default (foreach)"
        weight_decay = 0.0 if cfg.use_ngpt else 0.1  # the presets' recipes
        self.opt = torch.optim.AdamW(_param_groups(self.model, weight_decay), lr=lr, betas=(0.9, 0.95), **fused)
        gen = torch.Generator().manual_seed(seed)
        data = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=gen).to(device)
        self.x, self.y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        self.tokens_per_step = batch_size * cfg.block_size
        self.params = sum(p.numel() for p in self.model.parameters())
        self._loss: torch.Tensor | None = None

    def step(self) -> dict[str, float]:
        dev = self.device
        sync(dev)
        t0 = time.perf_counter()
        _, loss = self.model(self.x, self.y)
        loss.backward()
        sync(dev)
        t1 = time.perf_counter()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(dev)
        t2 = time.perf_counter()
        if self.cfg.use_ngpt:
            letngpt.normalize_weights_(self.model)
            sync(dev)
            t3 = time.perf_counter()
        else:  # GPT has no renormalisation: its share is 0, not timer noise
            t3 = t2
        self._loss = loss.detach()
        return {"fwdbwd": t1 - t0, "optim": t2 - t1, "renorm": t3 - t2, "total": t3 - t0}

    def last_loss(self) -> float:
        return float("nan") if self._loss is None else float(self._loss)

    def time_renorm(self, reps: int = 10) -> float | None:
        """Seconds per normalize_weights_ call, back to back (None for GPT: nothing to do)."""
        if not self.cfg.use_ngpt:
            return None
        letngpt.normalize_weights_(self.model)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            letngpt.normalize_weights_(self.model)
        sync(self.device)
        return (time.perf_counter() - t0) / reps


def peak_for(device: torch.device, override: float = 0.0) -> float | None:
    """Dense bf16 peak TFLOP/s of the device (None on CPU unless given)."""
    if override:
        return override
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


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
            r.model = r.opt = None  # drop the tensors before the allocator is asked again
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
                runners.append(StepRunner(v.name, v.cfg, batch_size, device, dtype, grad_clip=grad_clip))
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


# ------------------------------------------------------------------------------------------
# memory, one fresh process per variant


def proc_status_mb(field: str) -> float | None:
    """VmRSS / VmHWM (peak RSS) of this process in MiB, from /proc/self/status (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return None


def probe_memory(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 steps: int = 2) -> dict:
    """Build one variant and run `steps` training steps in THIS process; report peak memory.
    Meant for a fresh process (bench.memprobe): the numbers include nothing else."""
    out: dict = {"kind": "cuda max_memory_allocated" if device.type == "cuda"
                 else "CPU peak RSS (VmHWM) growth over RSS after imports and a throwaway micro step"}
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Start the runtime first (thread pools, allocator, autograd engine: ~tens of MB that any
        # model would pay) with a throwaway micro model, so the growth below is the variant's own.
        warm = StepRunner("warm", ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=32),
                          1, device, dtype)
        warm.step()
        del warm
    base = proc_status_mb("VmRSS")
    runner = StepRunner("probe", cfg, batch_size, device, dtype)
    for _ in range(steps):
        runner.step()
    sync(device)
    hwm = proc_status_mb("VmHWM")
    out.update(base_rss_mb=base, peak_rss_mb=hwm,
               rss_growth_mb=None if base is None or hwm is None else hwm - base)
    if device.type == "cuda":
        out.update(peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                   peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
        out["peak_mb"] = out["peak_allocated_mb"]
    else:
        out["peak_mb"] = out["rss_growth_mb"]
    return out


def subprocess_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def memory_in_subprocess(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype, *,
                         steps: int = 2, threads: int | None = None, timeout: float = 600) -> dict:
    """probe_memory in a fresh `python -m bench.memprobe` process; {'error': ...} if it fails."""
    request = {"config": dataclasses.asdict(cfg), "batch_size": batch_size, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "steps": steps, "threads": threads}
    cmd = [sys.executable, "-m", "bench.memprobe", json.dumps(request)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"memory probe exited {proc.returncode}: {' | '.join(tail)[-400:]}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------
# attention: one fused call for all maps vs a loop over maps; flash-attn vs SDPA


class LoopEnsembleAttention(nn.Module):
    """The same computation as a LinearEnsembleAttention, with its parameters, but one
    attention call per map: head h's map m attends with (q_hm, k_hm) over the shared v_h,
    and the M results are mixed afterwards. No v.repeat_interleave, M kernel launches."""

    def __init__(self, fused: LinearEnsembleAttention) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.fused
        B, T, _ = x.shape
        m, hd = a.num_maps, a.head_dim
        q = a.query(x).view(B, T, -1, hd)
        k = a.key(x).view(B, T, -1, hd)
        v = a.value(x).view(B, T, -1, hd)  # [B, T, heads, hd]
        if a.use_ngpt:  # normalise -> scale -> rotate, as the model does
            s_qk = a.s_qk().view(-1, hd)
            q, k = s_qk * unit(q), s_qk * unit(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.view(B, T, -1, m, hd), k.view(B, T, -1, m, hd)  # rows are laid out [head, map, hd]
        if m == 1:
            y = attend(q[:, :, :, 0], k[:, :, :, 0], v, scale=a.softmax_scale, backend=a.backend)
        else:
            w = a.ensemble_weights().to(v.dtype)
            y = None
            for i in range(m):
                yi = w[i] * attend(q[:, :, :, i], k[:, :, :, i], v, scale=a.softmax_scale, backend=a.backend)
                y = yi if y is None else y + yi
            y = a.head_norm(y)
        return a.proj(y.reshape(B, T, -1))


def build_attention(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    random_mix: bool = False) -> LinearEnsembleAttention:
    torch.manual_seed(seed)
    with torch.device(device):
        attn = LinearEnsembleAttention(cfg)
    if random_mix and cfg.num_maps > 1:  # away from the symmetric init, for equality tests
        with torch.no_grad():
            attn.ensemble_logits.normal_()
    return attn.to(device=device, dtype=dtype)


def attention_inputs(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [B, T, d] (requires grad), rope cos/sin, and a fixed upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, cfg.block_size, cfg.n_embd)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base, device)
    return x, cos, sin, grad


def _fwd_bwd(module: nn.Module, x, cos, sin, grad) -> torch.Tensor:
    x.grad = None
    module.zero_grad(set_to_none=True)
    y = module(x, cos, sin)
    y.backward(grad)
    return y


def _time_fwd_bwd(module: nn.Module, inputs, device: torch.device) -> float:
    x, cos, sin, grad = inputs
    x.grad = None
    module.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    module(x, cos, sin).backward(grad)
    sync(device)
    return time.perf_counter() - t0


def bench_attention(cfgs: Sequence[ModelConfig], batch_size: int, device: torch.device, dtype: torch.dtype, *,
                    reps: int = 20, warmup: int = 3) -> list[dict]:
    """Forward+backward of one attention module (projections included), fused vs per-map loop,
    alternating the two each repetition; plus the largest output difference between them."""
    rows = []
    for cfg in cfgs:
        fused = build_attention(cfg, device, dtype)
        loop = LoopEnsembleAttention(fused)
        inputs = attention_inputs(cfg, batch_size, device, dtype)
        x, cos, sin, _ = inputs
        with torch.no_grad():
            diff = (fused(x, cos, sin).float() - loop(x, cos, sin).float()).abs().max().item()
        for _ in range(warmup):
            _time_fwd_bwd(fused, inputs, device)
            _time_fwd_bwd(loop, inputs, device)
        tf, tl = [], []
        for i in range(reps):
            pair = ((fused, tf), (loop, tl)) if i % 2 == 0 else ((loop, tl), (fused, tf))
            for module, acc in pair:
                acc.append(_time_fwd_bwd(module, inputs, device))
        f_ms, l_ms = statistics.median(tf) * 1e3, statistics.median(tl) * 1e3
        rows.append({"maps": cfg.num_maps, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
                     "use_ngpt": cfg.use_ngpt, "batch_size": batch_size, "seq_len": cfg.block_size,
                     "fused_ms": f_ms, "loop_ms": l_ms, "loop_over_fused": l_ms / f_ms, "max_abs_diff": diff})
        del fused, loop, inputs
    return rows


FLASH_ABSENT = "flash-attn: not available"


def kernel_agreement(flash_fn: Callable, batch_size: int, seq_len: int, n_head: int, head_dim: int,
                     device: torch.device, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """Causal attention forward and backward from `flash_fn` (flash_attn_func's signature) and
    from PyTorch SDPA, both in `dtype`, each compared with an fp32 SDPA reference on the same
    inputs. They agree when flash's largest error is within twice SDPA's own (bf16) error,
    or within 1e-2 absolute; the raw errors are in the result either way."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len, n_head, head_dim)
    q, k, v, g = (torch.randn(shape, generator=gen).to(device) for _ in range(4))
    scale = 1.0 / math.sqrt(head_dim)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=scale)
        return o.transpose(1, 2)

    def run(fn, dt):
        ins = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(g.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in ins]

    ref = run(sdpa, torch.float32)
    low_sdpa = run(sdpa, dtype)
    low_flash = run(lambda a, b, c: flash_fn(a, b, c, softmax_scale=scale, causal=True), dtype)
    names = ("out", "dq", "dk", "dv")
    res: dict = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "tensors": {}}
    agree = True
    for name, r, s, fl in zip(names, ref, low_sdpa, low_flash, strict=True):
        e_s, e_f = (s - r).abs().max().item(), (fl - r).abs().max().item()
        e_fs = (fl - s).abs().max().item()
        ok = e_f <= max(2 * e_s, 1e-2)
        agree &= ok
        res["tensors"][name] = {"sdpa_err_vs_fp32": e_s, "flash_err_vs_fp32": e_f, "flash_vs_sdpa": e_fs, "ok": ok}
    res["agree"] = agree
    return res


def flash_vs_sdpa(cfgs: Sequence[ModelConfig], batch_size: int, device: torch.device, *,
                  reps: int = 10, warmup: int = 3, flash_fn: Callable | None = None) -> dict:
    """Where flash-attn is importable and a CUDA device is present: kernel-level agreement in bf16
    and attention-module fwd+bwd time with backend 'flash' vs 'sdpa'. Else a note saying so.
    `flash_fn` replaces flash_attn_func (tests use it to exercise the comparison on CPU)."""
    fn = flash_fn or flash_attn_func()
    if fn is None:
        return {"available": False, "note": FLASH_ABSENT}
    if device.type != "cuda" and flash_fn is None:
        return {"available": False, "note": FLASH_ABSENT + " (needs a CUDA device)"}
    out: dict = {"available": True, "agreement": [], "modules": []}
    for cfg in cfgs:
        out["agreement"].append(kernel_agreement(fn, batch_size, cfg.block_size, cfg.n_head * cfg.num_maps,
                                                 cfg.head_dim, device))
    if flash_fn is not None:  # a stand-in kernel cannot be selected through the model's backend switch
        return out
    for cfg in cfgs:
        module = build_attention(cfg, device, torch.bfloat16)
        inputs = attention_inputs(cfg, batch_size, device, torch.bfloat16)
        t = {"flash": [], "sdpa": []}
        for i in range(warmup + reps):
            for backend in (("flash", "sdpa") if i % 2 == 0 else ("sdpa", "flash")):
                module.backend = backend
                dt = _time_fwd_bwd(module, inputs, device)
                if i >= warmup:
                    t[backend].append(dt)
        fl, sd = statistics.median(t["flash"]) * 1e3, statistics.median(t["sdpa"]) * 1e3
        out["modules"].append({"maps": cfg.num_maps, "n_head": cfg.n_head, "seq_len": cfg.block_size,
                               "batch_size": batch_size, "flash_ms": fl, "sdpa_ms": sd, "sdpa_over_flash": sd / fl})
    return out


# ------------------------------------------------------------------------------------------
# output


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, obj) -> Path:
    """JSON with NaN/inf written as null (strict JSON readers reject NaN)."""

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    tmp.replace(path)
    return path
