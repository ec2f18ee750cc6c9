"""Named run presets.

The `*_10k_lr30e-4` presets reproduce the original nGPT / LET-nGPT launchers: 24 layers,
n_embd 1024, lr 30e-4 with cosine decay to 0 over 10k iterations, a global batch of 512
sequences (micro batch 8 x 64 accumulation at 1k context, 2 x 256 at 4k, sized for 64
GPUs), AdamW (0.9, 0.95), clip 1.0. nGPT variants use no weight decay and no warmup, as
the paper prescribes; GPT and LET-Transformer use weight decay 0.1 and 2000 warmup steps.

The `tiny_*` presets are the same four architectures at laptop scale, for CPU work.

The `char_*` presets mirror nanoGPT's shakespeare_char recipes on the character-level Tiny
Shakespeare (`python -m letngpt.data.prepare --source tinyshakespeare --tokenizer char`, vocab 65):
`char_*` its CPU recipe (4 layers x 4 heads x 128, context 64, batch 12, 2000 iterations, lr 1e-3
decaying to 1e-4, 100 warmup, beta2 0.99, wd 0.1; nanoGPT reports val ~1.88) and `char_gpu_*` its
GPU recipe (6 x 6 x 384, context 256, batch 64, 5000 iterations; val 1.47 with dropout 0.2, which
this model does not have). nGPT variants again drop weight decay and warmup.

LET-Transformer presets start the ensemble head norm's gain at the best point of issue 25's sweep on
their data (before it, gain 1 made ensemble heads several times louder than plain ones and cost
LET-Transformer 0.38 of BPE val loss): ModelConfig's default `head_norm_init` 0.1, BPE's best, for the
GPT-2-token presets (tiny, and the 1k/4k ones: a constant is the same rule at any depth) and for the
unswept char_gpu recipe; CHAR_HEAD_NORM_INIT 0.3, the character-level sweep's best (0.1 is within its
seed noise there), for `char_LETTransformer`.

`*_matched` LET presets keep M = 3 maps but shrink the SwiGLU hidden width so that the
non-embedding parameter count is within 1% of nGPT's: M maps cost (2M + 2) d^2 attention weights
per layer against nGPT's 4 d^2, and 3 d * hidden in the MLP pays for the difference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from letngpt.config import ConfigError, ModelConfig, RunConfig, TrainConfig


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


def matched_hidden(n_embd: int, num_maps: int, multiple: int = 8) -> int:
    """SwiGLU hidden width that gives an M-map block nGPT's 16 d^2 weights (4 d^2 attention + 12 d^2
    MLP): 3 d * hidden = (16 - (2M + 2)) d^2, rounded to `multiple` (kernel-friendly shapes)."""
    if num_maps > 6:
        raise ConfigError(f"num_maps ({num_maps}) > 6: the attention alone outweighs nGPT's block")
    exact = (14 - 2 * num_maps) * n_embd / 3
    return max(multiple, round(exact / multiple) * multiple)


def _matched(make: Callable[[], RunConfig], multiple: int = 8) -> RunConfig:
    run = make()
    run.model.mlp_hidden = matched_hidden(run.model.n_embd, run.model.num_maps, multiple)
    return run


# Char-level CPU recipe: each family's best rate in the sweep's grid (docs/sweeps/char_tinyshakespeare,
# seed 1337, 2000 steps; GPT family 3e-4..1e-2, nGPT family 1e-3..3e-2, every best inside its grid).
# nGPT's logit scale and eigen learning rates move at lr * sqrt(d), so its best rate is 3-10x GPT's.
# LET-Transformer: rate and head-norm gain are the best of issue 25's gain x lr grid
# (docs/sweeps/char_tinyshakespeare_head_norm).
CHAR_HEAD_NORM_INIT = "0.3"
CHAR_LR = {"GPT": 1e-3, "nGPT": 3e-3, "LETNGPT": 1e-2, "LETNGPT_matched": 3e-3, "LETTransformer": 3e-3}
# The GPU recipe (d = 384, 5000 steps) has not been swept: GPT's is nanoGPT's; nGPT's PROVISIONAL.
CHAR_GPU_LR = {"GPT": 1e-3, "nGPT": 1e-2, "LETNGPT": 1e-2, "LETNGPT_matched": 1e-2, "LETTransformer": 3e-3}


# Learning rates of the tiny (GPT-2 token) presets: the best of the BPE sweep's grid
# (docs/sweeps/bpe_tinyshakespeare: seed 1337, 200 steps; GPT family 1e-3..1e-2 (LET-Transformer
# to 3e-2), nGPT family 6e-3..6e-2, every best inside its grid). LET-Transformer's is the best of
# issue 25's gain x lr grid at its default head-norm gain (docs/sweeps/bpe_tinyshakespeare_head_norm).
TINY_LR = {"GPT": 3e-3, "nGPT": 2e-2, "LETNGPT": 2e-2, "LETNGPT_matched": 2e-2, "LETTransformer": 1e-2}


def _tiny(*, use_ngpt: bool, num_maps: int, lr: float) -> RunConfig:
    """Small enough that `python train.py` finishes in minutes on two CPU cores."""
    model = ModelConfig(vocab_size=50304, block_size=128, n_layer=4, n_head=4, n_embd=128,
                        num_maps=num_maps, use_ngpt=use_ngpt)
    # Same recipe split as the big presets, with a learning rate suited to the size.
    train = TrainConfig(
        learning_rate=lr, min_lr=0.0, max_iters=200, lr_decay_iters=200,
        weight_decay=0.0 if use_ngpt else 0.1, warmup_iters=0 if use_ngpt else 20,
        batch_size=8, gradient_accumulation_steps=1, grad_clip=1.0,
        eval_interval=50, eval_iters=5, log_interval=10, checkpoint_interval=100,
        data_dir="data/tinyshakespeare", zero_stage=0,
    )
    return RunConfig(model=model, train=train)


def _char(*, use_ngpt: bool, num_maps: int, lr: float, gpu: bool = False) -> RunConfig:
    """nanoGPT's config/train_shakespeare_char.py; CPU: the overrides its README gives for a laptop
    (block 64, batch 12, 4 x 4 x 128, 2000 iterations, eval_iters 20); dropout is not modelled."""
    layers, width, ctx, batch, iters, evals = (6, 384, 256, 64, 5000, 200) if gpu else (4, 128, 64, 12, 2000, 20)
    model = ModelConfig(vocab_size=65, block_size=ctx, n_layer=layers, n_head=layers, n_embd=width,
                        num_maps=num_maps, use_ngpt=use_ngpt)
    if not gpu:  # only the CPU recipe was swept; LET-nGPT and the one-map families ignore the gain
        model.head_norm_init = CHAR_HEAD_NORM_INIT
    train = TrainConfig(
        learning_rate=lr, min_lr=lr / 10, max_iters=iters, lr_decay_iters=iters,
        weight_decay=0.0 if use_ngpt else 0.1, warmup_iters=0 if use_ngpt else 100,
        batch_size=batch, gradient_accumulation_steps=1, grad_clip=1.0, beta1=0.9, beta2=0.99,
        eval_interval=250, eval_iters=evals, log_interval=10, checkpoint_interval=iters,
        data_dir="data/tinyshakespeare_char", zero_stage=0,
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
_PRESETS["LETNGPT_1kctx_10k_lr30e-4_matched"] = lambda: _matched(
    lambda: _big(1024, use_ngpt=True, num_maps=3, n_head=8), multiple=64)
# The swept families: every architecture, plus LET-nGPT matched, at its own family's learning rate.
_ARCHS = {"GPT": (False, 1), "nGPT": (True, 1), "LETNGPT": (True, 3), "LETTransformer": (False, 3)}
_FAMILIES: dict[str, tuple[Callable[..., RunConfig], dict[str, float]]] = {
    "tiny": (_tiny, TINY_LR),
    "char": (functools.partial(_char, gpu=False), CHAR_LR),
    "char_gpu": (functools.partial(_char, gpu=True), CHAR_GPU_LR),
}
for _prefix, (_make, _lr) in _FAMILIES.items():
    for _arch, (_ngpt, _maps) in _ARCHS.items():
        _PRESETS[f"{_prefix}_{_arch}"] = (
            lambda f=_make, n=_ngpt, m=_maps, lr=_lr[_arch]: f(use_ngpt=n, num_maps=m, lr=lr))
    _PRESETS[f"{_prefix}_LETNGPT_matched"] = (
        lambda f=_make, lr=_lr["LETNGPT_matched"]: _matched(lambda: f(use_ngpt=True, num_maps=3, lr=lr)))
# Not swept: 5 maps take the 3-map LET-nGPT's rate.
_PRESETS["tiny_LETNGPT_maps5"] = lambda: _tiny(use_ngpt=True, num_maps=5, lr=TINY_LR["LETNGPT"])

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
