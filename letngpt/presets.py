"""Named run presets.

The `*_10k_lr30e-4` presets reproduce the original nGPT / LET-nGPT launchers: 24 layers,
n_embd 1024, lr 30e-4 with cosine decay to 0 over 10k iterations, a global batch of 512
sequences (micro batch 8 x 64 accumulation at 1k context, 2 x 256 at 4k, sized for 64
GPUs), AdamW (0.9, 0.95), clip 1.0. nGPT variants use no weight decay and no warmup, as
the paper prescribes; GPT and LET-Transformer use weight decay 0.1 and 2000 warmup steps.

The `tiny_*` presets are the same four architectures at laptop scale, for CPU work.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ConfigError, ModelConfig, RunConfig, TrainConfig


def _big(ctx: int, *, use_ngpt: bool, num_maps: int, n_head: int) -> RunConfig:
    model = ModelConfig(vocab_size=50304, block_size=ctx, n_layer=24, n_head=n_head, n_embd=1024,
                        num_maps=num_maps, use_ngpt=use_ngpt)
    micro, accum = (8, 64) if ctx == 1024 else (2, 256)
    train = TrainConfig(
        learning_rate=30e-4, min_lr=0.0, max_iters=10000, lr_decay_iters=10000,
        weight_decay=0.0 if use_ngpt else 0.1, warmup_iters=0 if use_ngpt else 2000,
        batch_size=micro, gradient_accumulation_steps=accum, grad_clip=1.0, beta1=0.9, beta2=0.95,
        eval_interval=1000, eval_iters=200, log_interval=10, checkpoint_interval=1000,
        data_dir="data/openwebtext", zero_stage=1,
    )
    return RunConfig(model=model, train=train)


def _tiny(*, use_ngpt: bool, num_maps: int) -> RunConfig:
    """Small enough that `python train.py` finishes in minutes on two CPU cores."""
    model = ModelConfig(vocab_size=50304, block_size=128, n_layer=4, n_head=4, n_embd=128,
                        num_maps=num_maps, use_ngpt=use_ngpt)
    # Same recipe split as the big presets, with a learning rate suited to the size.
    train = TrainConfig(
        learning_rate=3e-3 if use_ngpt else 1e-3, min_lr=0.0, max_iters=200, lr_decay_iters=200,
        weight_decay=0.0 if use_ngpt else 0.1, warmup_iters=0 if use_ngpt else 20,
        batch_size=8, gradient_accumulation_steps=1, grad_clip=1.0,
        eval_interval=50, eval_iters=5, log_interval=10, checkpoint_interval=100,
        data_dir="data/tinyshakespeare", zero_stage=0,
    )
    return RunConfig(model=model, train=train)


_PRESETS: dict[str, Callable[[], RunConfig]] = {}
for _ctx, _tag in ((1024, "1k"), (4096, "4k")):
    _PRESETS[f"GPT_{_tag}ctx_10k_lr30e-4"] = (
        lambda c=_ctx: _big(c, use_ngpt=False, num_maps=1, n_head=16))
    _PRESETS[f"nGPT_{_tag}ctx_10k_lr30e-4"] = (
        lambda c=_ctx: _big(c, use_ngpt=True, num_maps=1, n_head=16))
    _PRESETS[f"LETNGPT_{_tag}ctx_10k_lr30e-4"] = (
        lambda c=_ctx: _big(c, use_ngpt=True, num_maps=3, n_head=8))
    _PRESETS[f"LETTransformer_{_tag}ctx_10k_lr30e-4"] = (
        lambda c=_ctx: _big(c, use_ngpt=False, num_maps=3, n_head=8))
_PRESETS["LETNGPT_1kctx_10k_lr30e-4_maps5"] = lambda: _big(1024, use_ngpt=True, num_maps=5, n_head=8)
_PRESETS["tiny_GPT"] = lambda: _tiny(use_ngpt=False, num_maps=1)
_PRESETS["tiny_nGPT"] = lambda: _tiny(use_ngpt=True, num_maps=1)
_PRESETS["tiny_LETNGPT"] = lambda: _tiny(use_ngpt=True, num_maps=3)
_PRESETS["tiny_LETNGPT_maps5"] = lambda: _tiny(use_ngpt=True, num_maps=5)
_PRESETS["tiny_LETTransformer"] = lambda: _tiny(use_ngpt=False, num_maps=3)

DEFAULT_PRESET = "tiny_LETNGPT"


def list_configs() -> list[str]:
    return list(_PRESETS)


def get_config(name: str) -> RunConfig:
    """A fresh copy of the named preset (mutating it never changes the registry)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown config {name!r}; `python train.py --list-configs` lists them")
    run = _PRESETS[name]()
    run.name = name
    return run
