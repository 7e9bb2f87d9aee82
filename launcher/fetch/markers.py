"""Verification markers and disk space: what is known to be complete, and whether the rest fits.

A finished file gets a `.verified` marker (sha256, size, mtime; written privately, never through a symlink), so
the next run reuses it without hashing many GB again. Before any byte is downloaded, what is still missing is
compared with the free space of each target file system plus DISK_MARGIN_BYTES.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.errors import FetchError
from launcher.fetch.job import CHUNK_BYTES, Job, hf_repo_folder
from launcher.paths import cache_dir, write_private

DISK_MARGIN_BYTES = 256 * 2**20  # kept free on a file system after the downloads


def marker(path: Path) -> Path:
    """`<file>.verified` beside a file in fitquant's cache; elsewhere (the Hugging Face cache, which fitquant does
    not write into) `cache_dir()/verified/<hash of the path>.verified`."""
    root = cache_dir()
    try:
        path.relative_to(root)
    except ValueError:
        return root / "verified" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.verified"
    return path.with_name(path.name + ".verified")


def marked(path: Path, sha256: str) -> bool:
    """Whether `path` was verified to hash to `sha256` and has not changed since (same size and mtime)."""
    try:
        st = path.stat()
        doc = json.loads(marker(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(doc == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def mark(path: Path, sha256: str | None) -> None:
    try:
        st = path.stat()
        doc = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        write_private(marker(path), json.dumps(doc))
    except OSError:
        pass  # without a marker the next run hashes the file again: slower, never wrong


def unmark(path: Path) -> None:
    with contextlib.suppress(OSError):
        marker(path).unlink()


def hash_file(path: Path, hasher: Any | None = None) -> Any:
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h


def check(path: Path, sha256: str) -> str | None:
    """None when `path` hashes to `sha256` (marking it verified), else the sha256 it has."""
    if marked(path, sha256):
        return None
    got = hash_file(path).hexdigest()
    if got != sha256:
        return str(got)
    mark(path, sha256)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Disk space


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return path


def check_space(jobs: list[Job], shown: str, free_bytes: Callable[[Path], int]) -> None:
    """Refuse, before any byte is downloaded, when a file system lacks room for what is missing plus the margin."""
    groups: dict[Any, tuple[Path, Path, int]] = {}  # device -> (shown dir, existing dir, bytes)
    for j in jobs:
        if j.done or j.missing <= 0:
            continue
        folder = j.path.parent if j.kind in ("http", "join") and j.path is not None else hf_repo_folder(j) / "blobs"
        anchor = _existing(folder)
        try:
            key: Any = anchor.stat().st_dev
        except OSError:
            key = str(anchor)
        shown_dir, anchor0, total = groups.get(key, (folder, anchor, 0))
        groups[key] = (shown_dir, anchor0, total + j.missing)
    for folder, anchor, missing in groups.values():
        try:
            free = int(free_bytes(anchor))
        except OSError:
            continue  # unknown free space: the download itself will say if the disk fills
        need = missing + DISK_MARGIN_BYTES
        if need > free:
            raise FetchError(
                f"{shown}: not enough disk space in {folder}: need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            )


def disk_free(path: Path) -> int:
    import shutil

    return shutil.disk_usage(path).free
