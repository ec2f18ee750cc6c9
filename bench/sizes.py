"""Model sizes and the variants a benchmark compares (GPT, nGPT, LET-nGPT with M maps each)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from letngpt.config import ModelConfig
from letngpt.presets import get_config


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
    compile: bool = False  # torch.compile the blocks (letngpt.train.compile), as --compile does in the trainer
    checkpointing: bool = False  # recompute each block in backward (--activation_checkpointing)
    tp: int = 1  # tensor-parallel size (bench.tp_compile runs under torchrun with world = tp)
    linears_outside_graph: bool = False  # TP linears behind torch.compiler.disable (bench.tp_compile)


def variant_configs(size: Size, maps: Sequence[int] = (1, 3, 5), attn_backend: str = "auto") -> list[Variant]:
    """GPT, nGPT (n_head heads) and LET-nGPT with each M in `maps` (let_n_head heads)."""
    base = dict(vocab_size=size.vocab_size, block_size=size.block_size, n_layer=size.n_layer,
                n_embd=size.n_embd, attn_backend=attn_backend)
    out = [Variant("GPT", ModelConfig(**base, n_head=size.n_head, num_maps=1, use_ngpt=False)),
           Variant("nGPT", ModelConfig(**base, n_head=size.n_head, num_maps=1, use_ngpt=True))]
    for m in maps:
        out.append(Variant(f"LET-nGPT M={m}", ModelConfig(**base, n_head=size.let_n_head, num_maps=m, use_ngpt=True)))
    return out
