"""Checkpoints: DeepSpeed's sharded state plus ours, with a marker that is only ever
written after every rank has finished saving.

Layout under <out_dir>/checkpoints/:
    step_00000100/            DeepSpeed files (model, per-rank optimizer shards)
    step_00000100/letngpt_state.json   our state (step, tracking run id, config), readable by humans
    latest_complete           the tag of the newest COMPLETE checkpoint

A job killed mid-save leaves a half-written step_* folder, but `latest_complete` still
names the previous checkpoint, and pruning never deletes the one it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError
from .fsutil import atomic_write_text

MARKER = "latest_complete"
STATE_FILE = "letngpt_state.json"
_TAG = re.compile(r"^step_(\d{8,})$")
# Parameters older versions had and this one dropped: the ensemble scale s of w_m = tanh(r_m) * s
# (inert, because the head norm removes any overall scale of the mix).
REMOVED_PARAMS = ("ensemble_scale",)


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


def save(engine, out_dir: str | Path, step: int, state: dict, *, keep: int, is_main: bool) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoint_dir(out_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"letngpt": state}, save_latest=False)
    _barrier()  # every rank's shard is on disk
    if is_main:
        atomic_write_text(root / tag / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
        atomic_write_text(root / MARKER, tag)
        prune(root, keep=keep, protect=tag)
    _barrier()
    return root / tag


def prune(root: Path, *, keep: int, protect: str) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the protected one)."""
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)),
                  key=lambda t: int(_TAG.match(t).group(1)))
    complete = [t for t in tags if (root / t / STATE_FILE).is_file()]
    protect_step = int(_TAG.match(protect).group(1))
    for tag in complete[:-keep]:
        if tag != protect:
            shutil.rmtree(root / tag, ignore_errors=True)
    for tag in tags:  # half-written leftovers older than the marker are garbage
        if tag not in complete and int(_TAG.match(tag).group(1)) < protect_step:
            shutil.rmtree(root / tag, ignore_errors=True)
    for universal in root.glob("step_*_universal"):  # conversions outlive nothing they came from
        if not (root / universal.name.removesuffix("_universal")).is_dir():
            shutil.rmtree(universal, ignore_errors=True)


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
        raise
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir(out_dir) / tag}")
    return client_state["letngpt"]


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
