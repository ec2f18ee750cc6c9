"""The DeepSpeed engine: the ZeRO recipe merged with the run's batch and precision, the optimizer's
parameter groups, the checks before DeepSpeed sees the config, and torch.compile of the blocks."""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn as nn

from letngpt.config import ConfigError, TrainConfig
from letngpt.parallel.layout import ParallelLayout

# The default ZeRO recipes ship inside the package (a wheel has no repository around it);
# the top-level ds_configs/ is a link to this folder, so there is one copy to edit.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, train.dtype)


def build_ds_config(train: TrainConfig, layout: ParallelLayout, dtype: torch.dtype,
                    load_universal: bool = False) -> dict:
    """A ds_configs/ file (the ZeRO recipe) merged with what the run decides: batch sizes,
    accumulation (the layout's share per DP rank), clipping and precision. The run's values win, so
    one file serves every preset."""
    path = Path(train.ds_config) if train.ds_config else DS_CONFIG_DIR / f"zero{train.zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"ds_config: no such file {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"ds_config: {path} must hold a JSON object, not a {type(cfg).__name__}")
    accum = layout.accum
    cfg.update(
        train_micro_batch_size_per_gpu=train.batch_size,
        gradient_accumulation_steps=accum,
        train_batch_size=train.batch_size * accum * layout.dp_size,
        gradient_clipping=train.grad_clip,
        zero_allow_untested_optimizer=True,
    )
    cfg.setdefault("zero_optimization", {}).setdefault("stage", train.zero_stage)
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {"enabled": dtype == torch.float16, "initial_scale_power": 16}
    cfg.pop("optimizer", None)  # we pass our own torch AdamW (no C++ op to compile)
    cfg.pop("scheduler", None)  # the schedule is ours: letngpt.train.schedule.lr_at
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    _check_accumulation_dtype(cfg, dtype, accum)
    return cfg


def _check_accumulation_dtype(cfg: dict, dtype: torch.dtype, accum: int) -> None:
    """Gradients must not be summed over micro batches in an 8-bit (bf16) or 11-bit (fp16) mantissa.

    At ZeRO 1-3 the recipes set data_types.grad_accum_dtype = fp32 (ZeRO 1 then runs DeepSpeed's
    BF16_Optimizer). At ZeRO 0, DeepSpeed 0.19 accumulates in the model dtype and rejects fp32
    ("unsupported mix"), so a 16-bit ZeRO 0 run may not accumulate at all: one micro batch per
    rank and step is exact, more are refused, pointing to ZeRO 1.
    """
    if dtype == torch.float32 or cfg["zero_optimization"]["stage"] != 0:
        return
    if accum > 1:
        raise ConfigError(f"ZeRO 0 in {dtype} would sum {accum} micro batches per rank in {dtype} (DeepSpeed has no "
                          "fp32 gradient accumulation at ZeRO 0); use --zero_stage=1, which accumulates in fp32 "
                          "(on one GPU it adds only an fp32 gradient buffer), or one micro batch per rank")
    cfg.get("data_types", {}).pop("grad_accum_dtype", None)  # nothing to accumulate; DeepSpeed would refuse it


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; vectors (norm gains, nGPT scalings, ensemble weights) never."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_compile(train: TrainConfig, device: torch.device) -> None:
    """--compile=true where it cannot work stops here in one line, not deep inside the first forward.

    ZeRO 0-3, tensor parallelism and activation checkpointing all compile (tests/test_speed.py); what
    remains is the toolchain inductor builds its kernels with at run time: on CPU C++ (a C++ compiler), on
    CUDA Triton, which builds each kernel's launcher with a C compiler ($CC, else gcc or clang). Both
    include Python's headers (Python.h), which a bare Python install or slim image may lack."""
    if not train.compile or device.type not in ("cpu", "cuda"):
        return
    where, kind, var, names = (("CPU", "C++", "CXX", ["g++", "c++", "clang++"]) if device.type == "cpu"
                               else ("CUDA", "C", "CC", ["gcc", "clang", "cc"]))
    compilers = [os.environ[var]] if os.environ.get(var) else names
    if not any(shutil.which(c) for c in compilers):
        builder = "inductor" if device.type == "cpu" else "Triton (inductor's GPU kernels)"
        raise ConfigError(f"--compile=true on {where} needs a {kind} compiler for {builder} "
                          f"({' or '.join(compilers)} not found); install one or use --compile=false")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        raise ConfigError(f"--compile=true on {where} needs Python's headers ({headers} not found; install the "
                          f"python{sys.version_info.major}.{sys.version_info.minor}-dev package or equivalent) "
                          "or use --compile=false")


def compile_engine(engine, train: TrainConfig) -> None:
    """--compile=true: the module inside the DeepSpeed engine gets its blocks compiled (letngpt.train.compile:
    regional compilation, one graph for all blocks), so DeepSpeed's forward / backward / step wrappers,
    ZeRO's hooks and the renormalisation stay eager around it. Works at ZeRO 0-3 and with megatron's TP
    layers, whose autograd Functions dynamo traces with their collectives (tests/test_speed.py)."""
    if train.compile:
        from letngpt.train.compile import compile_blocks

        compile_blocks(engine.module)


def build_engine(model: nn.Module, train: TrainConfig, layout: ParallelLayout, dtype: torch.dtype,
                 load_universal: bool = False):
    """DeepSpeed's engine around `model` (this rank's shard, on its device) with torch's AdamW; returns
    (engine, the merged ds config, the optimizer)."""
    import deepspeed

    check_compile(train, next(model.parameters()).device)
    model.checkpoint_blocks = train.activation_checkpointing  # the model's only knob for it
    ds_config = build_ds_config(train, layout, dtype, load_universal)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.learning_rate,
                                  betas=(train.beta1, train.beta2), eps=1e-8, **fused)
    validate_ds_config(ds_config, train.ds_config or f"zero{train.zero_stage}.json", layout.mpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=layout.mpu)
    compile_engine(engine, train)
    return engine, ds_config, optimizer


def validate_ds_config(cfg: dict, name: str, mpu=None) -> None:
    """DeepSpeed's own config model judges the merged config; its first complaint becomes one line
    (a pydantic report or an assertion deep in deepspeed.initialize otherwise)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(cfg, mpu=mpu)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or e.title
        raise ConfigError(f"ds_config {name}: {e.title}.{where}: {first['msg']} (got {first.get('input')!r})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        detail = str(e).splitlines()[0] if str(e) else repr(e)
        raise ConfigError(f"ds_config {name}: {type(e).__name__}: {detail}") from None


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
