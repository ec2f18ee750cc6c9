"""Token ids the model can embed: checked once per file version, before a run starts.

meta.json says which tokenizer and vocabulary wrote a folder, but a folder can lie (a vocab-256
meta.json beside GPT-2 ids) and a .bin can be replaced or corrupted without changing its size.
Either would end in an IndexError deep inside a rank, minutes into the run. So the first run on a
file reads it once, checks its sha256 against meta.json and finds its largest id; the result is
remembered in `<split>.bin.verified.json`, keyed by the file's inode, size, mtime and ctime (an
in-place edit that restores size and mtime still changes ctime), so later runs (and every run on a
10 GB OpenWebText split) pay nothing. A read-only data folder is simply checked again each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from letngpt.data import DataError
from letngpt.data.loader import TOKEN_DTYPE, check_vocab, read_meta, token_count

log = logging.getLogger("letngpt")
CHUNK_TOKENS = 1 << 24


def scan(path: Path) -> tuple[str, int]:
    """(sha256 of the file, largest token id) in one pass of bounded memory."""
    sha, max_id = hashlib.sha256(), -1
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r") if token_count(path) else np.zeros(0, TOKEN_DTYPE)
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[start:start + CHUNK_TOKENS])
        sha.update(chunk.tobytes())
        max_id = max(max_id, int(chunk.max()))
    return sha.hexdigest(), max_id


def _stamp_key(path: Path) -> dict:
    """What the cache trusts: the same file (inode; not the device, which differs between the nodes
    mounting one NFS share) not written since (size, mtime and ctime). Any write or replacement
    changes ctime, and unlike mtime no user tool can set it back."""
    st = path.stat()
    return {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def max_token_id(path: Path, expected_sha256: str | None) -> int:
    """The file's largest id, verified against meta.json's sha256 when it has one."""
    stamp = path.with_name(path.name + ".verified.json")
    key = _stamp_key(path)
    try:
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key and saved.get("sha256") == expected_sha256:
            return int(saved["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.info("verifying %s (once per file version)", path)
    digest, max_id = scan(path)
    if expected_sha256 and digest != expected_sha256:
        raise DataError(f"{path} does not match the sha256 in meta.json (replaced or corrupt); re-prepare the folder")
    try:
        stamp.write_text(json.dumps({"key": key, "sha256": expected_sha256, "max_id": max_id}))
    except OSError:
        pass  # a read-only folder: check again next time
    return max_id


def check_token_ids(data_dir: str | Path, model_vocab_size: int) -> None:
    """DataError (one line) unless every id in train.bin and val.bin is < the model's vocab_size."""
    check_vocab(data_dir, model_vocab_size)
    sums = read_meta(data_dir).get("sha256") or {}
    for split in ("train", "val"):
        path = Path(data_dir) / f"{split}.bin"
        max_id = max_token_id(path, sums.get(f"{split}.bin") if isinstance(sums, dict) else None)
        if max_id >= model_vocab_size:
            raise DataError(f"{path} holds token id {max_id}, outside the model's vocab_size {model_vocab_size} "
                            f"(wrong tokenizer for this model, or a corrupt file)")
