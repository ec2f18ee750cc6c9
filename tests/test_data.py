"""Data layer: tokenizer fallback, prepare (round trip, meta, errors, atomicity), loader validation
and the sampling contract the trainer's resume exactness rests on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from letngpt.data import DataError, prepare, tokenizer
from letngpt.data.loader import TokenData, check_vocab, eval_batches, eval_offsets, gather, get_batch, global_offsets
from letngpt.data.prepare import ensure_tinyshakespeare, main, prepare_text, write_dataset, write_tokens
from letngpt.data.tokenizer import get_encoding

SHARED_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared/data", Path("/work/shared/data")]
EOT = "<|endoftext|>"


def shared(name: str) -> Path:
    """A file of the shared offline data folder; its absence is a FAILURE, not a skip."""
    for folder in SHARED_CANDIDATES:
        if (folder / name).exists():
            return folder / name
    raise AssertionError(f"shared data {name} missing (looked in {[str(c) for c in SHARED_CANDIDATES]})")


@pytest.fixture(autouse=True)
def tiktoken_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared("tiktoken")))
    monkeypatch.delenv("LETNGPT_SHAKESPEARE", raising=False)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(capsys, args: list, match: str) -> None:
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def test_gpt2_falls_back_to_r50k_base_from_cache(caplog):
    assert tokenizer.is_cached("r50k_base") and not tokenizer.is_cached("gpt2")
    with caplog.at_level(logging.INFO, logger="letngpt.data"):
        enc = get_encoding("gpt2")
    assert enc.name == "r50k_base" and enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids
    assert sum("r50k_base" in r.getMessage() for r in caplog.records) == 1


def test_unknown_tokenizer_is_one_line_value_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'") as e:
        get_encoding("nope")
    assert "\n" not in str(e.value)


def test_shared_cache_used_when_no_cache_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # an empty default cache
    monkeypatch.setattr(tokenizer, "SHARED_CACHE", shared("tiktoken"))
    assert get_encoding("gpt2").name == "r50k_base"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(shared("tiktoken"))


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of .txt files (one nested, one ignored non-.txt) and its documents in sorted order."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = {"a.txt": "First Citizen:\nBefore we proceed any further, hear me speak.\n",
            "b.txt": "Ünïcödé ✓ and <|endoftext|> as plain text.\n\nSecond paragraph.",
            "sub/c.txt": "  leading spaces, trailing newline\n"}
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "notes.md").write_text("not a .txt file")
    return root, [docs[k] for k in sorted(docs)]


def test_round_trip_meta_and_checksums(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    meta = prepare_text(root, out, val_fraction=0.25, num_proc=2)
    enc = get_encoding("gpt2")
    train, val = read_bin(out / "train.bin"), read_bin(out / "val.bin")
    stream = np.concatenate([train, val])
    expected = [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]
    assert stream.tolist() == expected
    assert enc.decode(stream.tolist()) == "".join(d + EOT for d in docs)
    assert len(train) == int(len(stream) * 0.75) and len(val) == len(stream) - len(train)  # val = the tail

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["tokenizer"] == "r50k_base" and meta["tokenizer_requested"] == "gpt2"
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == 50256 and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["source"]["files"] == 3 and meta["source"]["documents"] == 3
    assert "last 25%" in meta["split"] and meta["val_fraction"] == 0.25 and meta["created"]
    for name in ("train.bin", "val.bin"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no .tmp left


def test_cli_glob_and_doc_sep(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("one\n\n\ntwo\n\n\n")
    (tmp_path / "y.txt").write_text("three")
    rc, out, _ = run_cli(capsys, "--source", tmp_path / "*.txt", "--out_dir", tmp_path / "out",
                         "--doc_sep", r"\n\n\n", "--num_proc", 1, "--block_size", 0)
    assert rc == 0 and "train" in out
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["source"]["documents"] == 3 and meta["source"]["files"] == 2
    tokens = np.concatenate([read_bin(tmp_path / "out/train.bin"), read_bin(tmp_path / "out/val.bin")])
    assert get_encoding("gpt2").decode(tokens.tolist()) == f"one{EOT}two{EOT}three{EOT}"


def test_invalid_utf8_names_file_and_offset(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 at byte offset 6"):
        prepare_text(bad, tmp_path / "out")
    assert_cli_error(capsys, ["--source", bad, "--out_dir", tmp_path / "out"], "byte offset 6")
    assert not (tmp_path / "out").exists()
    meta = prepare_text(bad, tmp_path / "out", errors="replace", num_proc=1)
    tokens = np.concatenate([read_bin(tmp_path / "out/train.bin"), read_bin(tmp_path / "out/val.bin")])
    assert get_encoding("gpt2").decode(tokens.tolist()) == "hello \ufffd world" + EOT
    assert meta["source"]["errors"] == "replace"


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file or folder"),
    ("empty_folder", "no *.txt files"),
    ("empty_files", "empty corpus"),
    ("no_glob_match", "no files match"),
])
def test_bad_sources(tmp_path, capsys, case, match):
    source = {"missing": tmp_path / "nope.txt", "empty_folder": tmp_path / "empty",
              "empty_files": tmp_path / "blank", "no_glob_match": tmp_path / "*.nothing"}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank/a.txt").write_text("")
    with pytest.raises(DataError, match=re.escape(match)):
        prepare_text(source, tmp_path / "out")
    assert_cli_error(capsys, ["--source", source, "--out_dir", tmp_path / "out"], match)


def test_vocab_beyond_uint16_is_refused(tmp_path, capsys, monkeypatch):
    big = tiktoken.Encoding(name="big", pat_str=r"\S+|\s+",
                            mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 70000})
    monkeypatch.setattr(prepare, "get_encoding", lambda name: big)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="uint16"):
        prepare_text(tmp_path / "a.txt", tmp_path / "out")
    assert_cli_error(capsys, ["--source", tmp_path / "a.txt", "--out_dir", tmp_path / "out"], "70001 tokens")


def test_cli_usage_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("text")
    assert_cli_error(capsys, ["--source", tmp_path / "a.txt"], "--out_dir is required")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    assert_cli_error(capsys, ["--source", "openwebtext", "--out_dir", tmp_path / "owt"], "letngpt[data]")


def test_write_tokens_checks_counts_and_range(tmp_path):
    path = tmp_path / "x.bin"
    chunks = [np.arange(10, dtype=np.int64), np.arange(5, dtype=np.int64)]  # e.g. HF shards
    digest = write_tokens(path, iter(chunks), total=15)
    assert read_bin(path).tolist() == list(range(10)) + list(range(5))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    cases = [(chunks, 14, "more tokens"), (chunks, 16, "got 15"), ([np.array([70000])], 1, "range")]
    for bad, total, match in cases:
        with pytest.raises(DataError, match=match):
            write_tokens(tmp_path / "y.bin", bad, total)
        assert not list(tmp_path.glob("y.bin*"))  # neither the file nor its .tmp


def test_interrupted_prepare_leaves_folder_not_prepared(corpus, tmp_path):
    out = tmp_path / "out"
    prepare_text(corpus[0], out, num_proc=1)
    TokenData(out, "train")  # complete

    def crashing():
        yield np.arange(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, {"train": (crashing(), 100)}, {"vocab_size": 50257})
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp*"))
    with pytest.raises(DataError, match="not prepared"):
        TokenData(out, "train")


@pytest.fixture
def prepared(corpus, tmp_path) -> Path:
    out = tmp_path / "prepared"
    prepare_text(corpus[0], out, num_proc=1)
    return out


def test_token_data_opens_and_checks_vocab(prepared):
    data = TokenData(prepared, "val", block_size=4)
    assert len(data) == json.loads((prepared / "meta.json").read_text())["val_tokens"]
    assert check_vocab(prepared, 50304) == 50257
    with pytest.raises(DataError, match=r"^data vocab 50257 \(from meta.json\) exceeds model vocab_size 512"):
        check_vocab(prepared, 512)


@pytest.mark.parametrize("damage, match", [
    ("no_meta", "not prepared"),
    ("no_folder", "does not exist"),
    ("no_bin", "missing"),
    ("odd_size", "not a whole number of uint16 tokens"),
    ("count_mismatch", "meta.json says"),
    ("too_short", "fewer than block_size"),
])
def test_token_data_rejects_bad_folders(prepared, damage, match):
    meta_path, train = prepared / "meta.json", prepared / "train.bin"
    folder, block_size = prepared, None
    if damage == "no_meta":
        meta_path.unlink()
    elif damage == "no_folder":
        folder = prepared / "nothing"
    elif damage == "no_bin":
        train.unlink()
    elif damage == "odd_size":
        train.write_bytes(train.read_bytes() + b"\0")
    elif damage == "count_mismatch":
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "train_tokens": meta["train_tokens"] + 1}))
    else:
        block_size = 10**6
    with pytest.raises(DataError, match=match) as e:
        TokenData(folder, "train", block_size=block_size)
    assert "\n" not in str(e.value)


N_TRAIN, BLOCK, MB = 20_000, 16, 3


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """Tokens 0, 1, 2, ...: a window's first token IS its offset, and y must be x + 1."""
    out = tmp_path / "synthetic"
    write_dataset(out, {"train": ([np.arange(N_TRAIN)], N_TRAIN), "val": ([np.arange(5000)], 5000)},
                  {"tokenizer": "synthetic", "vocab_size": 65536, "dtype": "uint16"})
    return out


def batch(data: TokenData, step: int, micro: int, rank: int, dp: int, accum: int, seed: int = 1337):
    return get_batch(data, seed=seed, step=step, micro_step=micro, dp_rank=rank, dp_size=dp,
                     micro_batch=MB, block_size=BLOCK, grad_accum=accum)


def test_batches_are_pure_and_shifted(synthetic):
    data = TokenData(synthetic, "train")
    x, y = batch(data, step=7, micro=1, rank=1, dp=2, accum=2)
    assert x.shape == y.shape == (MB, BLOCK) and x.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y, x + 1)
    batch(data, step=3, micro=0, rank=0, dp=2, accum=2)  # other calls in between change nothing
    for x2, y2 in [batch(data, 7, 1, 1, 2, 2), batch(TokenData(synthetic, "train"), 7, 1, 1, 2, 2)]:
        assert torch.equal(x, x2) and torch.equal(y, y2)  # (a): resume exactness
    assert not torch.equal(x, batch(data, 8, 1, 1, 2, 2)[0])
    assert not torch.equal(x, batch(data, 7, 1, 1, 2, 2, seed=1)[0])
    assert not torch.equal(x, batch(TokenData(synthetic, "val"), 7, 1, 1, 2, 2)[0])
    offsets = global_offsets(data, seed=1337, index=7, size=10_000, block_size=BLOCK)
    assert offsets.min() >= 0 and offsets.max() <= N_TRAIN - BLOCK - 1


def test_ranks_get_disjoint_slots(synthetic):
    data = TokenData(synthetic, "train")
    dp, accum = 4, 2
    slots = {(m, r): batch(data, 5, m, r, dp, accum)[0][:, 0].tolist()
             for m in range(accum) for r in range(dp)}
    offsets = global_offsets(data, seed=1337, index=5, size=MB * dp * accum, block_size=BLOCK).tolist()
    assert sorted(sum(slots.values(), [])) == sorted(offsets)  # each slot used exactly once
    for m in range(accum):  # (b): at one (step, micro step) every rank has its own samples
        assert len({tuple(slots[m, r]) for r in range(dp)}) == dp


def test_global_batch_is_layout_invariant(synthetic):
    data = TokenData(synthetic, "train")
    for step in (0, 1, 99):
        windows = []
        for dp, accum in [(1, 4), (2, 2), (4, 1)]:  # (c): same global batch, different layouts
            xs = [batch(data, step, m, r, dp, accum)[0] for m in range(accum) for r in range(dp)]
            windows.append(sorted(tuple(row) for row in torch.cat(xs).tolist()))
        assert windows[0] == windows[1] == windows[2]
        assert len(windows[0]) == MB * 4


def eval_windows(val: TokenData, dp: int, *, seed: int = 1337, eval_iters: int = 3) -> list[list[tuple]]:
    """Per rank: the windows its eval batches really hold (stand-ins dropped)."""
    per_rank = []
    for rank in range(dp):
        rows = []
        for x, y, n in eval_batches(val, seed=seed, eval_iters=eval_iters, micro_batch=MB, block_size=BLOCK,
                                    dp_rank=rank, dp_size=dp):
            assert torch.equal(y, x + 1) and 0 <= n <= len(x) <= MB
            rows.append([tuple(r) for r in x[:n].tolist()])
        per_rank.append(rows)
    return per_rank


def test_eval_set_does_not_depend_on_the_layout(synthetic):
    """One fixed set of eval_iters * micro_batch windows, split by the ranks: same windows at any
    DP size, every window once, and the same number of forward passes on every rank."""
    val = TokenData(synthetic, "val")
    offsets = eval_offsets(val, seed=1337, eval_iters=3, micro_batch=MB, block_size=BLOCK)
    expected = sorted(tuple(r) for r in gather(val, offsets, BLOCK)[0].tolist())
    assert len(expected) == 3 * MB
    for dp in (1, 2, 3, 4, 7, 3 * MB + 1):  # 7 and 3*MB+1 do not divide 3 * MB: uneven shares, idle ranks
        per_rank = eval_windows(val, dp)
        assert len({len(batches) for batches in per_rank}) == 1, dp  # equal pass counts (ZeRO 3)
        seen = sorted(w for batches in per_rank for rows in batches for w in rows)
        assert seen == expected, dp
    assert eval_windows(val, 2) == eval_windows(val, 2)  # the same set at every evaluation
    assert eval_windows(val, 1, seed=1) != eval_windows(val, 1)
    assert eval_windows(val, 1, eval_iters=2)[0] == eval_windows(val, 1)[0][:2]  # a prefix: more iters, more windows
    train_x = batch(val, 0, 0, 0, 1, 1)[0]  # training draws from its own stream
    assert [tuple(r) for r in train_x.tolist()] != eval_windows(val, 1)[0][0]


def test_sampling_edges_and_argument_errors(synthetic):
    data = TokenData(synthetic, "val")
    x, y = get_batch(data, seed=0, step=0, micro_step=0, dp_rank=0, dp_size=1, micro_batch=2,
                     block_size=4999, grad_accum=1)  # exactly block_size + 1 tokens: one window
    assert x[:, 0].tolist() == [0, 0] and y[0, -1] == 4999
    with pytest.raises(DataError, match="fewer than block_size"):
        get_batch(data, seed=0, step=0, micro_step=0, dp_rank=0, dp_size=1, micro_batch=1, block_size=5000,
                  grad_accum=1)
    args = dict(seed=0, step=0, micro_step=0, dp_rank=0, dp_size=2, micro_batch=1, block_size=4, grad_accum=2)
    for kwargs in [dict(dp_rank=2), dict(micro_step=2), dict(seed=-1)]:
        with pytest.raises(ValueError):
            get_batch(data, **{**args, **kwargs})


def test_ensure_tinyshakespeare_from_shared_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "SHARED_SHAKESPEARE", shared("tinyshakespeare.txt"))
    data_dir = tmp_path / "data" / "tinyshakespeare"
    errors = []

    def call():
        try:
            ensure_tinyshakespeare(data_dir)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]  # two "ranks" at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["train_tokens"] > 300_000 and meta["val_tokens"] > 30_000
    for name in ("train.bin", "val.bin"):
        assert meta["sha256"][name] == hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tinyshakespeare"]  # temp dirs gone
    mtime = (data_dir / "meta.json").stat().st_mtime_ns
    assert ensure_tinyshakespeare(str(data_dir)) == data_dir  # already prepared: nothing rewritten
    assert (data_dir / "meta.json").stat().st_mtime_ns == mtime
    TokenData(data_dir, "train", block_size=128)


def test_ensure_tinyshakespeare_env_and_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "SHARED_SHAKESPEARE", tmp_path / "absent.txt")
    monkeypatch.setattr(prepare, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # refused at once
    with pytest.raises(DataError, match="cannot download Tiny Shakespeare.*absent.txt") as e:
        ensure_tinyshakespeare(tmp_path / "ts")
    assert "\n" not in str(e.value) and not (tmp_path / "ts" / "meta.json").exists()
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question.\n" * 20)
    monkeypatch.setenv("LETNGPT_SHAKESPEARE", str(small))
    meta = json.loads((ensure_tinyshakespeare(tmp_path / "ts") / "meta.json").read_text())
    assert meta["source"]["path"] == str(small)


# --- character-level datasets (nanoGPT's shakespeare_char) ---------------------------------------------------


def test_char_dataset_round_trip_and_meta(tmp_path, capsys):
    from letngpt.data.tokenizer import CharTokenizer

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / "in.txt").write_text(text)
    assert main(["--source", str(tmp_path / "in.txt"), "--out_dir", str(tmp_path / "c"), "--tokenizer", "char",
                 "--block_size", "8"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(text)) and meta["vocab_size"] == len(set(text))
    tok = CharTokenizer.from_meta(meta)
    ids = np.concatenate([TokenData(tmp_path / "c", s).tokens() for s in ("train", "val")]).tolist()
    assert tok.decode(ids) == text  # no EOT, no separator: the split is a cut of the character stream
    assert len(TokenData(tmp_path / "c", "val")) == len(text) - int(len(text) * 0.9)
    assert tok.encode("hear me") == [meta["chars"].index(c) for c in "hear me"]


def test_char_tokenizer_bad_inputs(tmp_path, capsys):
    from letngpt.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abc\n")
    with pytest.raises(DataError, match="'z' is not in the 4-character vocabulary"):
        tok.encode("abz")
    with pytest.raises(DataError, match="outside"):
        tok.decode([0, 4])
    with pytest.raises(DataError, match="chars"):
        CharTokenizer.from_meta({"tokenizer": "char"})
    (tmp_path / "empty.txt").write_text("")
    assert main(["--source", str(tmp_path / "empty.txt"), "--out_dir", str(tmp_path / "e"), "--tokenizer", "char"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: empty corpus") and err.count("\n") == 1
    (tmp_path / "one.txt").write_text("a")
    assert main(["--source", str(tmp_path / "one.txt"), "--out_dir", str(tmp_path / "o"), "--tokenizer", "char"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "e" / "meta.json").exists() and not (tmp_path / "o" / "meta.json").exists()


def test_tinyshakespeare_char_matches_nanogpt(tmp_path, monkeypatch):
    monkeypatch.setenv("LETNGPT_SHAKESPEARE", str(shared("tinyshakespeare.txt")))
    meta = json.loads((ensure_tinyshakespeare(tmp_path / "sc", tokenizer="char") / "meta.json").read_text())
    # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens.
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1003854, 111540)


def test_sampling_decodes_chars_and_rejects_unknown_prompt_chars(tmp_path, monkeypatch, capsys):
    import letngpt
    from letngpt.tools import sample

    (tmp_path / "in.txt").write_text("to be or not to be\n" * 10)
    assert main(["--source", str(tmp_path / "in.txt"), "--out_dir", str(tmp_path / "c"), "--tokenizer", "char",
                 "--block_size", "8"]) == 0
    capsys.readouterr()
    cfg = letngpt.ModelConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)
    state = {"config": {"train": {"data_dir": str(tmp_path / "c")}}}
    monkeypatch.setattr(sample, "load_model", lambda path, device: (letngpt.build_model(cfg).eval(), state))
    assert sample.main(["--ckpt", "x", "--prompt", "to be", "--max_new_tokens", "5"]) == 0
    printed = capsys.readouterr().out[:-1]  # print's newline
    assert printed.startswith("to be") and len(printed) == 10 and set(printed) <= set("to ber n\n")
    assert sample.main(["--ckpt", "x", "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: character 'R' is not in the 8-character vocabulary") and err.count("\n") == 1


def test_builtin_folders_prepare_on_first_use(tmp_path, monkeypatch):
    """`python train.py --config char_GPT` in a fresh checkout prepares data/tinyshakespeare_char itself."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LETNGPT_SHAKESPEARE", str(shared("tinyshakespeare.txt")))
    assert not prepare.ensure_builtin("data/mytext") and not (tmp_path / "data").exists()
    assert prepare.ensure_builtin("data/tinyshakespeare_char/")
    assert json.loads((tmp_path / "data/tinyshakespeare_char/meta.json").read_text())["tokenizer"] == "char"


# --- bad data found by a hostile pass (issue 23) ---------------------------------------------


def test_a_train_bin_with_an_odd_number_of_bytes_is_one_line(synthetic):
    from letngpt.data.verify import check_token_ids

    with open(synthetic / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: a copy cut short
    with pytest.raises(DataError, match=r"train.bin: \d+ bytes is not a whole number of uint16 tokens"):
        check_token_ids(synthetic, 65536)


def test_the_token_id_cache_sees_an_in_place_edit_that_keeps_size_and_mtime(synthetic):
    """The cache may skip the scan only for the file it scanned: an edit that restores the size and
    the mtime (cp --preserve, a tool that resets timestamps) still changes ctime."""
    import time

    from letngpt.data.verify import check_token_ids

    check_token_ids(synthetic, 65536)  # scanned once, cached
    path = synthetic / "val.bin"
    before = path.stat()
    time.sleep(0.05)  # the kernel's timestamps tick in milliseconds
    with open(path, "r+b") as f:  # same size, one id changed
        f.write(np.array([7], dtype=np.uint16).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError, match="does not match the sha256 in meta.json"):
        check_token_ids(synthetic, 65536)


def test_prepare_refuses_a_corpus_too_small_for_one_block(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 10)  # 190 characters: val holds 19
    args = ["--source", tmp_path / "in.txt", "--out_dir", tmp_path / "c", "--tokenizer", "char"]
    assert_cli_error(capsys, args, "is too small: 171 train and 19 val tokens, but a model with block_size 1024")
    assert_cli_error(capsys, [*args, "--block_size", "64"], "needs 65 in each")
    assert not (tmp_path / "c" / "meta.json").exists()
    assert run_cli(capsys, *args, "--block_size", "16")[0] == 0
