"""Deterministic batches from a prepared folder (train.bin / val.bin / meta.json, see prepare.py).

Resume exactness rests on one design: a batch is a PURE function of (seed, split, step,
micro_step, dp_rank). For each (seed, split, step) a numpy Generator seeded with
[seed, split id, stream, step] draws the offsets of the whole GLOBAL batch,
micro_batch * dp_size * grad_accum windows, uniformly over every valid start (with replacement,
like nanoGPT). Rank r at micro step m takes slots [(m * dp_size + r) * micro_batch, +micro_batch).
Hence:
- a resumed run sees exactly the batches an uninterrupted run would have seen;
- within a step, ranks and micro steps never share a slot;
- the global batch depends only on its size, not on its layout: dp 2 x accum 2 sees the same
  windows as dp 1 x accum 4 or dp 4 x accum 1.
Evaluation uses its own stream and a fixed set of eval_iters * micro_batch windows (eval_offsets)
that the ranks split between them, so every evaluation of a run sees the same validation windows,
val losses are comparable across steps, and a checkpoint scores the same at any DP/TP layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from letngpt.data import DataError

TOKEN_DTYPE = np.uint16
SPLIT_IDS = {"train": 0, "val": 1}
TRAIN_STREAM, EVAL_STREAM = 0, 1
PREPARE_HINT = "prepare it with `python -m letngpt.data.prepare --source ... --out_dir ...`"


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared folder. prepare writes it last, so without it the folder is not
    prepared (possibly an interrupted prepare), whatever .bin files it holds."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; {PREPARE_HINT}")
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(f"data folder {folder} is not prepared (no meta.json); {PREPARE_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object")
    return meta


def token_count(path: Path) -> int:
    """Tokens in a .bin file; DataError when its size is not a whole number of them (truncated)."""
    size, itemsize = path.stat().st_size, np.dtype(TOKEN_DTYPE).itemsize
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated?); "
                        f"re-prepare {path.parent}")
    return size // itemsize


class TokenData:
    """One split of a prepared folder, validated on open (size, token count, dtype)."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int | None = None) -> None:
        if split not in SPLIT_IDS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_IDS)}")
        self.data_dir, self.split = Path(data_dir), split
        self.meta = read_meta(data_dir)
        if self.meta.get("dtype", "uint16") != "uint16":
            raise DataError(f"{self.data_dir}/meta.json: dtype {self.meta.get('dtype')!r}, expected uint16")
        self.path = self.data_dir / f"{split}.bin"
        if not self.path.is_file():
            raise DataError(f"{self.path} is missing although meta.json exists; re-prepare {self.data_dir}")
        self.n_tokens = token_count(self.path)
        expected = self.meta.get(f"{split}_tokens")
        if expected != self.n_tokens:
            raise DataError(f"{self.path} holds {self.n_tokens} tokens but meta.json says {expected}")
        if block_size is not None:
            self.check_block_size(block_size)

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def check_block_size(self, block_size: int) -> None:
        if self.n_tokens < block_size + 1:
            raise DataError(f"{self.path}: {self.n_tokens} tokens, fewer than block_size + 1 "
                            f"({block_size + 1})")

    def tokens(self) -> np.memmap:
        """A fresh read-only memmap per call: nanoGPT found that a long-lived one leaks memory."""
        return np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")


def check_vocab(data_dir: str | Path, model_vocab_size: int) -> int:
    """The data's vocab size; DataError when the model cannot embed every token id."""
    vocab = read_meta(data_dir).get("vocab_size")
    if not isinstance(vocab, int):
        raise DataError(f"{Path(data_dir) / 'meta.json'}: vocab_size missing or not an integer")
    if vocab > model_vocab_size:
        raise DataError(f"data vocab {vocab} (from meta.json) exceeds model vocab_size {model_vocab_size}")
    return vocab


def _check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def global_offsets(data: TokenData, *, seed: int, index: int, size: int, block_size: int,
                   stream: int = TRAIN_STREAM) -> np.ndarray:
    """The `size` window starts of one global batch, drawn in [0, n_tokens - block_size - 1]."""
    _check_nonneg(seed=seed, index=index)
    if size < 1 or block_size < 1:
        raise ValueError(f"batch size ({size}) and block_size ({block_size}) must be >= 1")
    data.check_block_size(block_size)
    rng = np.random.default_rng([seed, SPLIT_IDS[data.split], stream, index])
    return rng.integers(0, data.n_tokens - block_size, size=size)


def gather(data: TokenData, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = windows of block_size tokens, y = the same windows shifted by one; int64 on the CPU."""
    tokens = data.tokens()
    buf = torch.from_numpy(np.stack([tokens[o:o + block_size + 1] for o in offsets]).astype(np.int64))
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")


def get_batch(data: TokenData, *, seed: int, step: int, micro_step: int, dp_rank: int, dp_size: int,
              micro_batch: int, block_size: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training micro batch (x, y) of shape [micro_batch, block_size] for this rank and micro step
    (grad_accum = this rank's micro steps per optimizer step)."""
    _check_rank(dp_rank, dp_size)
    if not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro_step {micro_step} outside [0, grad_accum={grad_accum})")
    offsets = global_offsets(data, seed=seed, index=step, size=micro_batch * dp_size * grad_accum,
                             block_size=block_size)
    start = (micro_step * dp_size + dp_rank) * micro_batch
    return gather(data, offsets[start:start + micro_batch], block_size)


def eval_offsets(data: TokenData, *, seed: int, eval_iters: int, micro_batch: int,
                 block_size: int) -> np.ndarray:
    """The evaluation set: eval_iters * micro_batch window starts, a function of the seed and
    these sizes only, never of the parallel layout, so a checkpoint's val loss is the same at any
    DP/TP size (and an eval reads the same number of tokens at 64 GPUs as at one)."""
    if eval_iters < 1:
        raise ValueError(f"eval_iters must be >= 1, got {eval_iters}")
    return np.concatenate([global_offsets(data, seed=seed, index=i, size=micro_batch, block_size=block_size,
                                          stream=EVAL_STREAM) for i in range(eval_iters)])


def eval_batches(data: TokenData, *, seed: int, eval_iters: int, micro_batch: int, block_size: int,
                 dp_rank: int, dp_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's share of the evaluation set as (x, y, n_windows) batches of <= micro_batch.

    The ranks split the set into contiguous, near-equal shares; summing loss * n_windows and
    n_windows over ranks gives the exact mean over the set. Every rank yields the same number
    of batches, because a forward pass can be collective (ZeRO 3 gathers parameters in it): a
    rank whose share is used up yields a stand-in window with n_windows = 0, to be ignored.
    """
    _check_rank(dp_rank, dp_size)
    shares = np.array_split(eval_offsets(data, seed=seed, eval_iters=eval_iters, micro_batch=micro_batch,
                                         block_size=block_size), dp_size)
    mine = shares[dp_rank]
    for start in range(0, len(shares[0]), micro_batch):  # shares[0] is the largest
        part = mine[start:start + micro_batch]
        x, y = gather(data, part if len(part) else shares[0][:1], block_size)
        yield x, y, len(part)
