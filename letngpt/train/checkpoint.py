"""Checkpoints: DeepSpeed's sharded state plus ours, verified before anything relies on them.

Layout under <out_dir>/checkpoints/:
    step_00000100/                     DeepSpeed files (model, per-rank optimizer shards)
    step_00000100/letngpt_state.json   our state (step, tracking run id, config), readable by humans
    step_00000100/manifest.json        every file's size and CRC-32, written LAST
    latest_complete                    the tag of the newest complete checkpoint

Order of a save: every rank's shards -> barrier -> state -> manifest -> marker -> prune. A folder
without a manifest is a save that did not finish. On resume the newest checkpoint whose files
all match their manifest (and that then loads) is used; each one passed over is named with the
reason. Pruning keeps the newest `keep` complete checkpoints and never the one just verified.
Checksums are computed and checked in stripes across ranks, so a big checkpoint costs each rank
1/world of a read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from letngpt.config import ConfigError
from letngpt.errors import CheckpointError
from letngpt.fsutil import atomic_write_text, free_space
from letngpt.model.model import REMOVED_PARAMS  # the one compatibility shim lives with the model

log = logging.getLogger("letngpt")
MARKER = "latest_complete"
STATE_FILE = "letngpt_state.json"
MANIFEST = "manifest.json"
FORMAT = 2  # state files of checkpoints that carry a manifest say so; older ones lack the key
INCOMPLETE = "no manifest (the save did not finish)"
KEEP_SKIPPED = 2  # set-aside checkpoints kept for a person to inspect; older ones are deleted
_TAG = re.compile(r"^step_(\d{8,})$")
_SKIPPED = re.compile(r"^step_(\d{8,})\.skipped$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(out_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    root = checkpoint_dir(out_dir)
    marker = root / MARKER
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not _TAG.match(tag) or not (root / tag / STATE_FILE).is_file():
        raise RuntimeError(f"checkpoint marker {marker} names {tag!r}, which is missing or incomplete")
    return tag


def read_state(out_dir: str | Path, tag: str | None = None) -> dict | None:
    tag = tag or latest_tag(out_dir)
    if tag is None:
        return None
    return json.loads((checkpoint_dir(out_dir) / tag / STATE_FILE).read_text())


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj):
    """Every rank's `obj`, in rank order (just [obj] for one process)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def crc32(path: Path, chunk: int = 1 << 24) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return value


def _files(folder: Path) -> list[str]:
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*")
                  if f.is_file() and f.name != MANIFEST and ".tmp" not in f.name)


def write_manifest(folder: Path) -> None:
    """Collective: each rank checksums its stripe of the files; rank 0 writes the manifest."""
    rank, world = _world()
    names = _files(folder)
    mine = {n: {"size": (folder / n).stat().st_size, "crc32": crc32(folder / n)} for n in names[rank::world]}
    entries = {k: v for part in _gather(mine) for k, v in part.items()}
    if rank == 0:
        atomic_write_text(folder / MANIFEST, json.dumps({"files": entries}, indent=1, sort_keys=True))


def save(engine, out_dir: str | Path, step: int, state: dict, *, keep: int, is_main: bool) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. A save that fails (a full
    disk, most often) removes its partial folder and raises CheckpointError on every rank; the
    previous checkpoint and the marker are untouched, so the next launch resumes from them."""
    root = checkpoint_dir(out_dir)
    tag = tag_for(step)
    state = {**state, "checkpoint_format": FORMAT}
    error = _attempt(engine.save_checkpoint, str(root), tag=tag, client_state={"letngpt": state}, save_latest=False)
    _fail_together(out_dir, tag, error, is_main)  # also the barrier: every rank's shard is on disk
    state_text = json.dumps(state, indent=2, sort_keys=True)
    error = _attempt(atomic_write_text, root / tag / STATE_FILE, state_text) if is_main else None
    _fail_together(out_dir, tag, error, is_main)
    error = _attempt(write_manifest, root / tag)
    if is_main and error is None:
        error = _attempt(atomic_write_text, root / MARKER, tag)
    _fail_together(out_dir, tag, error, is_main)
    if is_main:
        prune(root, keep=keep, protect=tag)
    _barrier()
    return root / tag


def _attempt(fn, *args, **kwargs) -> BaseException | None:
    """Run one part of a save; the error it raised, or None. torch reports a full disk as a
    RuntimeError ("file write failed"), Python as OSError(ENOSPC)."""
    try:
        fn(*args, **kwargs)
    except (OSError, RuntimeError) as e:
        return e
    return None


def _fail_together(out_dir: str | Path, tag: str, error: BaseException | None, is_main: bool) -> None:
    """Collective. When any rank's part of the save failed: rank 0 removes the partial folder, and
    every rank raises one CheckpointError naming the out_dir, the cause and the free space."""
    errors = [e for e in _gather(None if error is None else _one_line(error)) if e]
    if not errors:
        return
    root = checkpoint_dir(out_dir)
    if is_main:
        shutil.rmtree(root / tag, ignore_errors=True)  # a partial save: no use to anyone, and it holds space
    _barrier()
    previous = (root / MARKER).read_text().strip() if (root / MARKER).is_file() else None
    keep = f"{previous} stays the newest checkpoint" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"could not write checkpoint {tag} in {Path(out_dir).resolve()} ({errors[0]}); "
                          f"{free_space(root)} free there; the partial {tag} was removed and {keep}. "
                          "Free space and launch again: the run resumes by itself")


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(error.errno)
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def is_complete(folder: Path) -> bool:
    """A manifest (or, for checkpoints from before manifests, a state file without the format key)."""
    if (folder / MANIFEST).is_file():
        return True
    try:
        return "checkpoint_format" not in json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False


def step_tags(root: Path) -> list[str]:
    """Every step_* folder, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)),
                  key=lambda tag: int(_TAG.match(tag).group(1)))


def prune(root: Path, *, keep: int, protect: str) -> None:
    """Delete all but the newest `keep` complete checkpoints, never the protected one (the one
    just written and verified), and half-written leftovers older than it."""
    tags = step_tags(root)
    complete = [tag for tag in tags if is_complete(root / tag)]
    protect_step = int(_TAG.match(protect).group(1))
    for tag in complete[:-keep]:
        if tag != protect:
            shutil.rmtree(root / tag, ignore_errors=True)
    for tag in tags:
        if tag not in complete and int(_TAG.match(tag).group(1)) < protect_step:
            shutil.rmtree(root / tag, ignore_errors=True)
    for universal in root.glob("step_*_universal"):  # conversions outlive nothing they came from
        if not (root / universal.name.removesuffix("_universal")).is_dir():
            shutil.rmtree(universal, ignore_errors=True)


def _check_files(folder: Path, entries: dict, names: list[str]) -> str | None:
    for name in names:
        path, want = folder / name, entries[name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)"
        if crc32(path) != want["crc32"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def verify(folder: Path) -> str | None:
    """Collective. None when the checkpoint verifies, else the reason (the same on every rank)."""
    rank, world = _world()
    reason = None
    if not is_complete(folder):
        reason = INCOMPLETE
    elif not (folder / STATE_FILE).is_file():
        reason = f"{STATE_FILE} is missing"
    elif not (folder / MANIFEST).is_file():
        reason = None  # written before manifests existed: is_complete said so
    else:
        try:
            entries = json.loads((folder / MANIFEST).read_text())["files"]
            json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"unreadable manifest or state ({type(e).__name__})"
        else:
            reason = _check_files(folder, entries, sorted(entries)[rank::world])
    reasons = [r for r in _gather(reason) if r]
    return reasons[0] if reasons else None


def find_verified(out_dir: str | Path, before: int | None = None) -> tuple[str | None, list[str]]:
    """Collective. The newest checkpoint (older than step `before`, if given) that verifies, and
    'tag: reason' for each newer one passed over."""
    return newest_verified(checkpoint_dir(out_dir), before)


def newest_verified(root: Path, before: int | None = None) -> tuple[str | None, list[str]]:
    """find_verified for a checkpoints folder `root` (sampling reads one without a run around it)."""
    skipped = []
    for tag in reversed(step_tags(root)):
        if before is not None and int(_TAG.match(tag).group(1)) >= before:
            continue
        reason = verify(root / tag)
        if reason is None:
            if not (root / tag / MANIFEST).is_file():
                log.warning("checkpoint %s has no manifest (written by an older letngpt); not verified", tag)
            return tag, skipped
        log.warning("skipping checkpoint %s: %s", tag, reason)
        skipped.append(f"{tag}: {reason}")
    return None, skipped


def only_incomplete(skipped: list[str]) -> bool:
    """Whether every checkpoint passed over is a save that never finished (not a corrupt one)."""
    return bool(skipped) and all(entry.endswith(f": {INCOMPLETE}") for entry in skipped)


def set_aside(out_dir: str | Path, skipped: list[str], resume_tag: str | None) -> None:
    """Rank 0: move checkpoints that failed verification to `<tag>.skipped` (kept for a person to
    inspect or delete, out of the way of later saves at the same step), keep only the newest
    KEEP_SKIPPED of those, and point the marker at the checkpoint actually resumed (or remove it
    when there is none)."""
    root = checkpoint_dir(out_dir)
    for entry in skipped:
        tag = entry.split(":", 1)[0]
        if (root / tag).is_dir():
            target = root / f"{tag}.skipped"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(root / tag, target)
            log.warning("moved the unusable checkpoint %s to %s (the newest %d set-aside checkpoints are kept, "
                        "older ones deleted)", tag, target.name, KEEP_SKIPPED)
    set_aside_folders = sorted((p for p in root.iterdir() if _SKIPPED.match(p.name)),
                               key=lambda p: int(_SKIPPED.match(p.name).group(1)))
    for old in set_aside_folders[:-KEEP_SKIPPED]:
        shutil.rmtree(old, ignore_errors=True)
        log.warning("deleted the old set-aside checkpoint %s", old.name)
    if resume_tag is None:
        (root / MARKER).unlink(missing_ok=True)
    else:
        atomic_write_text(root / MARKER, resume_tag)


def load_newest(engine, out_dir: str | Path, first: str) -> tuple[str, dict]:
    """Collective. Load `first` (already verified), falling back to older verified checkpoints
    when DeepSpeed cannot load one on some rank. Returns (tag, our state)."""
    tag, skipped = first, []
    while tag is not None:
        try:
            state, error = load(engine, out_dir, tag), None
        except ConfigError:
            raise  # a checkpoint this version cannot resume from at all: say so, do not fall back
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the previous one
            state, error = None, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        errors = [e for e in _gather(error) if e]
        if not errors:
            return tag, state
        log.warning("checkpoint %s verified but did not load (%s); trying an older one", tag, errors[0])
        skipped.append(f"{tag}: did not load ({errors[0]})")
        tag, more = find_verified(out_dir, before=int(_TAG.match(tag).group(1)))
        skipped += more
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(out_dir)} verifies and loads: " + "; ".join(skipped))


def load(engine, out_dir: str | Path, tag: str | None = None) -> dict | None:
    """Load a checkpoint (default: the newest complete one) into the engine; returns our
    state, or None when there is no checkpoint."""
    tag = tag or latest_tag(out_dir)
    if tag is None:
        return None
    try:
        path, client_state = engine.load_checkpoint(str(checkpoint_dir(out_dir)), tag=tag)
    except Exception as e:  # DeepSpeed's own message names neither the cause nor the way out
        stale = removed_params(checkpoint_dir(out_dir) / tag)
        if stale:
            raise ConfigError(
                f"checkpoint {tag} predates the removal of {stale[0]} ({len(stale)} such tensors): its "
                "weights still load for sampling and evaluation (the parameter is dropped, it was inert), "
                "but training cannot resume from it because its optimizer state holds one more tensor per "
                "layer. Start from scratch in another --out_dir, or resume with the version that wrote it."
            ) from e
        saved_stage = _saved_zero_stage(out_dir, tag)
        if saved_stage is not None and saved_stage != engine.zero_optimization_stage():
            raise ConfigError(
                f"checkpoint {tag} was saved at ZeRO stage {saved_stage} and this run uses stage "
                f"{engine.zero_optimization_stage()}; their optimizer files differ. Resume with "
                f"--zero_stage={saved_stage}, or start a new --out_dir") from e
        raise
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir(out_dir) / tag}")
    return client_state["letngpt"]


def _saved_zero_stage(out_dir: str | Path, tag: str) -> int | None:
    """The ZeRO stage a checkpoint's state records, or None (no state, or a state from before the key)."""
    try:
        return (read_state(out_dir, tag) or {}).get("zero_stage")
    except (OSError, ValueError):
        return None


def removed_params(folder: Path) -> list[str]:
    """Names of parameters in the checkpoint at `folder` that this version no longer has.

    Read from the model-states file (module keys at ZeRO 0-2, param_shapes at ZeRO 1-3;
    memory-mapped, so nothing large is read) or a universal checkpoint's per-parameter folders.
    """
    names = [p.name for p in (folder / "zero").iterdir()] if (folder / "zero").is_dir() else []
    states = folder / "mp_rank_00_model_states.pt"
    if states.is_file():
        saved = torch.load(states, map_location="cpu", mmap=True, weights_only=False)
        names += list(saved.get("module") or {})
        for group in saved.get("param_shapes") or []:
            names += list(group)
    return sorted({n for n in names if n.rsplit(".", 1)[-1] in REMOVED_PARAMS})


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def convert_to_universal(out_dir: str | Path, tag: str, *, is_main: bool) -> str:
    """DeepSpeed universal checkpoint of `tag` (collective: rank 0 converts, all wait), so a
    ZeRO-1/2 run can resume at another data-parallel size. Returns the universal tag."""
    root = checkpoint_dir(out_dir)
    target = universal_tag(tag)
    if is_main and not (root / target / "zero").is_dir():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = root / f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(argparse.Namespace(  # the CLI's arguments, defaults as in DeepSpeed 0.19
            input_folder=str(root / tag), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True))
        shutil.rmtree(root / target, ignore_errors=True)
        os.replace(tmp, root / target)  # complete, or absent
        (root / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's marker; ours is latest_complete
    _barrier()
    return target
