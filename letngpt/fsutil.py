"""Crash-safe file writes shared by data preparation, checkpoints and summaries, and the free
space that a failed write reports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a per-process temp file, fsync, rename over `path`, fsync the folder: readers see
    the old content or the new, never half of it, even across a crash."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def free_space(path: Path) -> str:
    """Free space on `path`'s file system (or its nearest existing parent's), human-readable."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f"{free:.0f} B" if unit == "B" else f"{free:.1f} {unit}"
