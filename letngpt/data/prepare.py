r"""Tokenize a corpus into nanoGPT-style `train.bin` / `val.bin` (uint16 token ids) + `meta.json`.

    python -m letngpt.data.prepare --source input.txt --out_dir data/mytext
    python -m letngpt.data.prepare --source 'corpus/**/*.txt' --out_dir data/corpus --doc_sep '\n\n\n'
    python -m letngpt.data.prepare --source tinyshakespeare            # -> data/tinyshakespeare
    python -m letngpt.data.prepare --source tinyshakespeare --tokenizer char  # -> data/tinyshakespeare_char
    python -m letngpt.data.prepare --source openwebtext --num_proc 16  # -> data/openwebtext (letngpt[data])

Policies (also recorded in meta.json):
- Sources: a file, a folder (every *.txt below it, sorted by path) or a glob (sorted). The words
  `tinyshakespeare` and `openwebtext` name the built-in sources (write ./openwebtext for a folder).
- Documents: each file is one document unless --doc_sep is given, which splits every file on that
  string (empty pieces dropped). Each document is encoded with `encode_ordinary` (special-token
  text is plain text) and followed by the EOT token.
- Split (local text): documents are concatenated in order; the first (1 - val_fraction) of the
  TOKENS is train, the tail is val (nanoGPT's shakespeare style). openwebtext: nanoGPT's split.
- Encoding: files are read as strict UTF-8; invalid UTF-8 is an error naming the file and the byte
  offset. `--errors replace` substitutes U+FFFD instead.
- `--tokenizer char` (nanoGPT's shakespeare_char): the vocabulary is the corpus's distinct characters,
  sorted, listed in meta.json as `chars` (sampling decodes with it); documents are concatenated with
  no separator and there is no EOT token.
- Token ids are stored as uint16, so the tokenizer's ids must fit (n_vocab <= 65536).
- Size: train and val must each hold one window of `--block_size` (default 1024) + 1 tokens, else
  the corpus is refused here rather than at the start of training.
- Atomic output: each .bin is written as `<name>.tmp`, fsynced and renamed; meta.json is written
  last (atomically), so a folder with meta.json is complete and one without it is not prepared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from glob import glob
from pathlib import Path

import numpy as np
from tqdm import tqdm

from letngpt.data import DataError
from letngpt.data.tokenizer import REPO_ROOT, CharTokenizer, get_encoding
from letngpt.fsutil import atomic_write_text, fsync_path

log = logging.getLogger("letngpt.data")

TOKEN_DTYPE = np.uint16
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHARED_SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_NUM_PROC = min(8, os.cpu_count() or 1)
TAIL_SPLIT = "val = the last {:.4g}% of the token stream (documents in order, EOT after each)"
# The built-in Tiny Shakespeare folders and their tokenizers: prepared on first use.
BUILTIN = {"data/tinyshakespeare": "gpt2", "data/tinyshakespeare_char": "char"}


def find_text_files(source: str | Path) -> list[Path]:
    """A file, every *.txt under a folder, or a glob's matches; sorted, so the order is reproducible."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"empty corpus: no *.txt files under {source}")
        return files
    if any(c in str(source) for c in "*?["):
        files = sorted(Path(f) for f in glob(str(source), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"no files match {str(source)!r}")
        return files
    raise DataError(f"no such file or folder: {source}")


def read_text(path: Path, errors: str = "strict") -> str:
    """Strict UTF-8 by default: silently mangled text would train the model on garbage."""
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {e.start} "
                        "(pass --errors replace to substitute U+FFFD)") from None


def split_documents(text: str, doc_sep: str | None) -> list[str]:
    return [d for d in (text.split(doc_sep) if doc_sep else [text]) if d]


_enc = None  # per-process encoding (Pool initializer)


def _init_worker(name: str) -> None:
    global _enc
    _enc = get_encoding(name)


def _encode(doc: str, enc=None) -> np.ndarray:
    enc = enc or _enc
    ids = enc.encode_ordinary(doc)
    ids.append(enc.eot_token)
    return np.array(ids, dtype=TOKEN_DTYPE)


def check_uint16(enc) -> None:
    if enc.n_vocab - 1 > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"tokenizer {enc.name} has {enc.n_vocab} tokens; ids above 65535 do not fit uint16")


def tokenize(docs: list[str], enc_name: str, num_proc: int = 1) -> list[np.ndarray]:
    """One uint16 array per document (its tokens + EOT). Documents are encoded whole, so the tokens
    equal `enc.encode_ordinary(doc)` exactly; the parallelism is across documents."""
    bar = dict(total=len(docs), unit="doc", desc="tokenizing", disable=not sys.stderr.isatty())
    if num_proc <= 1 or len(docs) < 2:
        enc = get_encoding(enc_name)
        return [_encode(d, enc) for d in tqdm(docs, **bar)]
    num_proc = min(num_proc, len(docs))
    with mp.Pool(num_proc, initializer=_init_worker, initargs=(enc_name,)) as pool:
        chunksize = max(1, len(docs) // (num_proc * 8))
        return list(tqdm(pool.imap(_encode, docs, chunksize=chunksize), **bar))


def write_tokens(path: Path, chunks: Iterable[np.ndarray], total: int) -> str:
    """Write `total` token ids from `chunks` to `path` as uint16 and return the file's sha256.

    Like nanoGPT the file is a preallocated np.memmap filled chunk by chunk (memory stays bounded
    for huge corpora). It is written as `<path>.tmp`, fsynced and renamed into place."""
    if total <= 0:
        raise DataError(f"nothing to write to {path.name} (0 tokens)")
    tmp = path.with_name(path.name + ".tmp")
    sha, n = hashlib.sha256(), 0
    try:
        arr = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="w+", shape=(total,))
        for chunk in chunks:
            chunk = np.asarray(chunk).ravel()
            if chunk.size and (chunk.min() < 0 or chunk.max() > np.iinfo(TOKEN_DTYPE).max):
                raise DataError(f"{path.name}: token id out of uint16 range ({chunk.min()}..{chunk.max()})")
            if n + chunk.size > total:
                raise DataError(f"{path.name}: more tokens than the {total} announced")
            chunk = chunk.astype(TOKEN_DTYPE, copy=False)
            arr[n:n + chunk.size] = chunk
            sha.update(chunk.tobytes())
            n += chunk.size
        if n != total:
            raise DataError(f"{path.name}: got {n} tokens, expected {total}")
        arr.flush()
        del arr
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return sha.hexdigest()


def write_dataset(out_dir: str | Path, splits: dict[str, tuple[Iterable[np.ndarray], int]],
                  meta: dict) -> dict:
    """Write `<split>.bin` for each (chunks, total) in `splits`, then meta.json LAST. An older
    meta.json is removed first, so a crash midway leaves the folder visibly not prepared."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    sums = {}
    for split, (chunks, total) in splits.items():
        sums[f"{split}.bin"] = write_tokens(out / f"{split}.bin", chunks, total)
        meta[f"{split}_tokens"] = int(total)
    meta["sha256"] = sums
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def base_meta(enc, requested: str, source: dict, split_policy: str) -> dict:
    return {"tokenizer": enc.name, "tokenizer_requested": requested, "vocab_size": enc.n_vocab,
            "eot_token": enc.eot_token, "dtype": np.dtype(TOKEN_DTYPE).name, "source": source,
            "split": split_policy}


def prepare_text(source: str | Path, out_dir: str | Path, *, tokenizer: str = "gpt2",
                 val_fraction: float = 0.1, doc_sep: str | None = None, errors: str = "strict",
                 num_proc: int | None = None, block_size: int = 0) -> dict:
    """Local text -> out_dir/{train,val}.bin + meta.json (see the module docstring for the policies).
    With `block_size`, a corpus whose train or val split cannot fill one window of that context is
    refused before anything is written."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = find_text_files(source)
    docs = [d for f in files for d in split_documents(read_text(f, errors), doc_sep)]
    if not docs:
        raise DataError(f"empty corpus: no text in {source}")
    source_info = {"type": "text", "path": str(source), "files": len(files), "documents": len(docs),
                   "doc_sep": doc_sep, "errors": errors}
    if tokenizer == "char":
        tokens, meta = char_tokens(docs, source_info, val_fraction)
    else:
        enc = get_encoding(tokenizer)
        check_uint16(enc)
        tokens = np.concatenate(tokenize(docs, enc.name, num_proc or DEFAULT_NUM_PROC))
        meta = base_meta(enc, tokenizer, source_info, TAIL_SPLIT.format(100 * val_fraction))
    n = len(tokens)
    if n < 2:
        raise DataError(f"corpus {source} has {n} token(s); need at least 2 to split into train and val")
    n_train = min(max(int(n * (1 - val_fraction)), 1), n - 1)
    check_fits_block(source, n_train, n - n_train, block_size)
    meta["val_fraction"] = val_fraction
    splits = {"train": ([tokens[:n_train]], n_train), "val": ([tokens[n_train:]], n - n_train)}
    return write_dataset(out_dir, splits, meta)


def check_fits_block(source: str | Path, n_train: int, n_val: int, block_size: int) -> None:
    """DataError unless train and val each hold one training window (block_size + 1 tokens)."""
    if block_size > 0 and min(n_train, n_val) < block_size + 1:
        raise DataError(f"corpus {source} is too small: {n_train} train and {n_val} val tokens, but a model with "
                        f"block_size {block_size} needs {block_size + 1} in each; add text, raise --val_fraction, "
                        f"or pass the --block_size you will train with")


def char_tokens(docs: list[str], source_info: dict, val_fraction: float) -> tuple[np.ndarray, dict]:
    """Character ids of the concatenated documents and the meta.json fields of a char dataset."""
    text = "".join(docs)
    tok = CharTokenizer.from_text(text)
    if tok.n_vocab - 1 > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"{tok.n_vocab} distinct characters; ids above 65535 do not fit uint16")
    meta = {"tokenizer": "char", "tokenizer_requested": "char", "vocab_size": tok.n_vocab, "eot_token": None,
            "chars": tok.chars, "dtype": np.dtype(TOKEN_DTYPE).name, "source": source_info,
            "split": f"val = the last {100 * val_fraction:.4g}% of the characters (nanoGPT's shakespeare_char)"}
    return np.array(tok.encode(text), dtype=TOKEN_DTYPE), meta


def prepare_openwebtext(out_dir: str | Path, *, tokenizer: str = "gpt2", num_proc: int | None = None) -> dict:
    """nanoGPT's openwebtext recipe (~9B train tokens): HF datasets download, 0.05% val split,
    parallel tokenization, then each split is written shard by shard into its memmap."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("--source openwebtext needs Hugging Face datasets: pip install 'letngpt[data]'") \
            from None
    num_proc = num_proc or DEFAULT_NUM_PROC
    enc = get_encoding(tokenizer)
    check_uint16(enc)

    def process(example: dict) -> dict:
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    dataset = load_dataset("openwebtext", num_proc=num_proc)
    split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")
    tokenized = split.map(process, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)

    def shards(dset, n_shards: int = 1024):
        n_shards = max(1, min(n_shards, len(dset)))
        for i in tqdm(range(n_shards), desc="writing", disable=not sys.stderr.isatty()):
            batch = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
            yield np.concatenate(list(batch["ids"]))

    splits = {name: (shards(tokenized[name]), sum(tokenized[name]["len"])) for name in ("train", "val")}
    source_info = {"type": "huggingface", "dataset": "openwebtext",
                   "documents": {name: len(tokenized[name]) for name in ("train", "val")}}
    policy = "val = a random 0.05% of the documents (train_test_split seed 2357)"
    meta = base_meta(enc, tokenizer, source_info, policy)
    return write_dataset(out_dir, splits, meta)


def _shakespeare_text(tmp: Path) -> Path:
    """$LETNGPT_SHAKESPEARE, else the shared copy next to the repo, else a download into `tmp`."""
    env = os.environ.get("LETNGPT_SHAKESPEARE")
    if env and not Path(env).is_file():
        log.warning("LETNGPT_SHAKESPEARE=%s is not a file; ignoring it", env)
    for path in ([Path(env)] if env else []) + [SHARED_SHAKESPEARE]:
        if path.is_file():
            return path
    dest = tmp / "input.txt"
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            dest.write_bytes(r.read())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot download Tiny Shakespeare ({e}); put input.txt at {SHARED_SHAKESPEARE} "
                        "or set LETNGPT_SHAKESPEARE to its path") from None
    return dest


def ensure_builtin(data_dir: str | Path) -> bool:
    """Prepare `data_dir` if it is one of the BUILTIN folders and not prepared yet; False if it is not one."""
    tokenizer = BUILTIN.get(str(data_dir).rstrip("/"))
    if tokenizer is None:
        return False
    ensure_tinyshakespeare(data_dir, tokenizer=tokenizer)
    return True


def ensure_tinyshakespeare(data_dir: str | Path = "data/tinyshakespeare", tokenizer: str = "gpt2") -> Path:
    """Prepare Tiny Shakespeare (GPT-2 tokens, or characters) into `data_dir` unless it is already prepared.

    Safe under concurrent calls (e.g. several ranks): each call prepares into its own temp folder
    beside `data_dir`, then renames the .bin files and meta.json (last) into place. The output is
    deterministic, so a second finisher only replaces files with identical bytes."""
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").exists():
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.", dir=data_dir.parent))
    try:
        text = _shakespeare_text(tmp)
        prepare_text(text, tmp, tokenizer=tokenizer, val_fraction=0.1, num_proc=1)
        data_dir.mkdir(exist_ok=True)
        if not (data_dir / "meta.json").exists():  # another process may have finished meanwhile
            for name in ("train.bin", "val.bin", "meta.json"):
                os.replace(tmp / name, data_dir / name)
            fsync_path(data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="letngpt-prepare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--source", required=True,
                   help="text file, folder (*.txt below it), glob, 'tinyshakespeare' (gpt2 or char) "
                        "or 'openwebtext'")
    p.add_argument("--out_dir", help="output folder (default data/<source> for the built-in sources)")
    p.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding (default gpt2), or char")
    p.add_argument("--val_fraction", type=float, default=0.1, help="tail of the token stream held out")
    p.add_argument("--doc_sep", help=r"split files into documents on this string (\n, \t unescaped)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="bad UTF-8 policy")
    p.add_argument("--num_proc", type=int, default=DEFAULT_NUM_PROC, help="tokenizer processes")
    p.add_argument("--block_size", type=int, default=1024,
                   help="the context you will train with: train and val must each hold block_size + 1 tokens "
                        "(default 1024, GPT-2's; 0 skips the check)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: errors only
    try:
        if args.source == "tinyshakespeare":
            if args.tokenizer not in ("gpt2", "char"):
                raise DataError(f"--source tinyshakespeare takes --tokenizer gpt2 or char, not {args.tokenizer!r}")
            default = "data/tinyshakespeare" + ("_char" if args.tokenizer == "char" else "")
            out = ensure_tinyshakespeare(args.out_dir or default, tokenizer=args.tokenizer)
            meta = json.loads((out / "meta.json").read_text())
        elif args.source == "openwebtext":
            if args.tokenizer == "char":
                raise DataError("--tokenizer char is for local text and tinyshakespeare, not openwebtext")
            out = Path(args.out_dir or "data/openwebtext")
            meta = prepare_openwebtext(out, tokenizer=args.tokenizer, num_proc=args.num_proc)
        else:
            if not args.out_dir:
                raise DataError("--out_dir is required for a local text source")
            out = Path(args.out_dir)
            doc_sep = args.doc_sep.replace("\\n", "\n").replace("\\t", "\t") if args.doc_sep else None
            meta = prepare_text(args.source, out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                                doc_sep=doc_sep, errors=args.errors, num_proc=args.num_proc,
                                block_size=args.block_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens ({meta['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
