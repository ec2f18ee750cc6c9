"""tiktoken, made to work offline.

tiktoken downloads its BPE files on first use and caches them under $TIKTOKEN_CACHE_DIR
(file name = sha1 of the download URL). Offline, a missing file means a network attempt that
can be slow to fail, so we look in the cache ourselves first:

- `gpt2` is stored as two files (vocab.bpe + encoder.json); `r50k_base` as one file whose
  ranks are byte-identical to gpt2's. If the gpt2 files are not cached but r50k_base is, we
  load r50k_base directly (one log line) instead of trying the network.
- If $TIKTOKEN_CACHE_DIR is unset and `<repo>/../shared/data/tiktoken` exists, we point
  tiktoken there (one log line).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import tiktoken

from letngpt.data import DataError

log = logging.getLogger("letngpt.data")

REPO_ROOT = Path(__file__).resolve().parents[2]  # parent of the `letngpt` package folder
SHARED_CACHE = REPO_ROOT.parent / "shared" / "data" / "tiktoken"
_BLOB = "https://openaipublic.blob.core.windows.net/"
# The URLs tiktoken_ext.openai_public downloads; their sha1 is the cache file name.
_FILES = {
    "gpt2": [_BLOB + "gpt-2/encodings/main/vocab.bpe", _BLOB + "gpt-2/encodings/main/encoder.json"],
    "r50k_base": [_BLOB + "encodings/r50k_base.tiktoken"],
}
_FALLBACK = {"gpt2": "r50k_base"}  # identical ranks, special tokens and regex


def cache_dir() -> str | None:
    """The folder tiktoken caches in (same rules as tiktoken/load.py); None = caching disabled."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def is_cached(name: str) -> bool:
    """True when every BPE file of encoding `name` is in the cache (loading needs no network)."""
    folder = cache_dir()
    urls = _FILES.get(name)
    if folder is None or urls is None:
        return False
    return all(os.path.exists(os.path.join(folder, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


def _use_shared_cache(name: str) -> None:
    """Point tiktoken at the repo's shared offline cache when the user set no cache and needs one."""
    unset = "TIKTOKEN_CACHE_DIR" not in os.environ and "DATA_GYM_CACHE_DIR" not in os.environ
    wanted = [name] + ([_FALLBACK[name]] if name in _FALLBACK else [])
    if unset and SHARED_CACHE.is_dir() and name in _FILES and not any(is_cached(n) for n in wanted):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_CACHE)
        log.info("TIKTOKEN_CACHE_DIR unset; using the shared tiktoken cache %s", SHARED_CACHE)


def _load(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network errors, hash mismatches, unreadable cache
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load tokenizer {name!r} ({type(e).__name__}: {first}); "
                        f"offline machines set TIKTOKEN_CACHE_DIR to a tiktoken cache") from e


def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """The tiktoken encoding `name`; for `gpt2`, possibly its identical twin `r50k_base`
    (check `.name` for the one actually loaded)."""
    if name not in tiktoken.list_encoding_names():
        known = ", ".join(tiktoken.list_encoding_names())
        raise DataError(f"unknown tokenizer {name!r}; choose one of {known}")
    _use_shared_cache(name)
    fallback = _FALLBACK.get(name)
    if fallback and not is_cached(name) and is_cached(fallback):
        log.info("tokenizer %s: BPE files not in tiktoken cache %s; using %s (identical ranks)",
                 name, cache_dir(), fallback)
        return _load(fallback)
    try:
        return _load(name)
    except DataError as e:
        if not fallback:
            raise
        log.info("tokenizer %s failed to load (%s); falling back to %s (identical ranks)", name, e, fallback)
        try:
            return _load(fallback)
        except DataError:
            raise e from None


class CharTokenizer:
    """nanoGPT's shakespeare_char vocabulary: every distinct character of the corpus, sorted, one id
    each. No EOT token (the corpus is one stream). Unknown characters are an error, never a silent
    substitute: a prompt the model cannot read should say so."""

    name = "char"

    def __init__(self, chars: list[str] | str) -> None:
        chars = list(chars)
        if not chars:
            raise DataError("char vocabulary is empty (empty corpus?)")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise DataError("char vocabulary must list distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.n_vocab = len(chars)
        self.eot_token = None

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise DataError("empty corpus: no characters to build a vocabulary from")
        return cls(sorted(set(text)))

    @classmethod
    def from_meta(cls, meta: dict) -> CharTokenizer:
        if not isinstance(meta.get("chars"), list):
            raise DataError("meta.json of a char dataset has no 'chars' vocabulary list")
        return cls(meta["chars"])

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the {self.n_vocab}-character vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the {self.n_vocab}-character vocabulary")
        return "".join(self.chars[i] for i in ids)
