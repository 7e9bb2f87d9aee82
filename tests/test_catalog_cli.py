"""`fitquant quants` and the catalog entry point: reference forms, JSON contract, table, exact error lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hf_server import LADDER_12, HFServer, isolate_hub, ladder_files, refused_endpoint

from launcher import catalog
from launcher.catalog import ModelReference, parse_reference
from launcher.cli import main
from launcher.errors import CatalogError

REPO = "org/Tiny-Llama-GGUF"
CANDIDATE_KEYS = {
    "quant", "size_bytes", "bits_per_weight", "quality_rank", "kld", "kld_source", "files", "projector", "source",
    "ollama_model", "architecture", "n_params", "notes",
}  # fmt: skip
FILE_KEYS = {"name", "size_bytes", "url", "sha256", "local_path"}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    isolate_hub(monkeypatch, tmp_path)


@pytest.fixture
def hub(monkeypatch, corpus):
    with HFServer(page_size=5) as srv:
        srv.add_repo(REPO, {**ladder_files(corpus, LADDER_12), "README.md": b"# Tiny"})
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        yield srv


# ---------------------------------------------------------------------------------------------------------------
# Reference forms


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        (None, ModelReference("embedded", "")),
        ("  ", ModelReference("embedded", "")),
        ("qwen3:14b", ModelReference("ollama", "qwen3:14b")),
        ("qwen3:14b-q8_0", ModelReference("ollama", "qwen3:14b-q8_0")),
        ("gemma3", ModelReference("ollama", "gemma3")),
        ("registry.ollama.ai/library/qwen3:8b", ModelReference("ollama", "registry.ollama.ai/library/qwen3:8b")),
        ("ollama://qwen3:14b", ModelReference("ollama-local", "qwen3:14b")),
        ("ollama://gemma3", ModelReference("ollama-local", "gemma3")),
        ("unsloth/Qwen3-14B-GGUF", ModelReference("huggingface", "unsloth/Qwen3-14B-GGUF")),
        (
            "unsloth/Qwen3-14B-GGUF:UD-Q4_K_XL",
            ModelReference("huggingface", "unsloth/Qwen3-14B-GGUF", quant="UD-Q4_K_XL"),
        ),
        (
            "hf.co/unsloth/Qwen3-14B-GGUF:Q4_K_M",
            ModelReference("huggingface", "unsloth/Qwen3-14B-GGUF", quant="Q4_K_M"),
        ),
        ("huggingface.co/bartowski/x-GGUF", ModelReference("huggingface", "bartowski/x-GGUF")),
        ("https://huggingface.co/bartowski/x-GGUF/", ModelReference("huggingface", "bartowski/x-GGUF")),
        ("org/repo@v1.0:q8_0", ModelReference("huggingface", "org/repo", quant="q8_0", revision="v1.0")),
        ("./model.gguf", ModelReference("local", "./model.gguf")),
        ("model.gguf", ModelReference("local", "model.gguf")),
        ("/models/", ModelReference("local", "/models/")),
    ],
)
def test_references_resolve_to_their_source(ref, parsed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_reference(ref) == parsed


def test_references_prefer_an_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").mkdir()
    (tmp_path / "gemma3").mkdir()
    assert parse_reference("org/repo") == ModelReference("local", "org/repo")
    assert parse_reference("gemma3") == ModelReference("local", "gemma3")
    assert parse_reference("org/repo:Q4_K_M") == ModelReference("local", "org/repo", quant="Q4_K_M")
    assert parse_reference("org/other") == ModelReference("huggingface", "org/other")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            "hf.co/just-a-name",
            "hf.co/just-a-name: not a Hugging Face repository; write user/repo[:QUANT], e.g. unsloth/Qwen3-14B-GGUF:Q4_K_M",
        ),
        (
            "hf.co/a/b/c",
            "hf.co/a/b/c: not a Hugging Face repository; write user/repo[:QUANT], e.g. unsloth/Qwen3-14B-GGUF:Q4_K_M",
        ),
        ("ollama://", "ollama://: not an Ollama model name; write ollama://name[:tag], e.g. ollama://qwen3:14b"),
        (
            "a/b/c",
            "a/b/c: not a GGUF file or folder here, a Hugging Face repository (user/repo) or an Ollama model (name:tag)",
        ),
        (
            "what is this",
            "what is this: not a GGUF file or folder here, a Hugging Face repository (user/repo) or an Ollama model (name:tag)",
        ),
    ],
)
def test_references_that_fit_no_form(ref, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CatalogError) as err:
        parse_reference(ref)
    assert str(err.value) == message


def test_references_dispatch_to_the_ollama_sources(monkeypatch):
    from launcher.catalog import ollama, ollama_local

    calls = []
    monkeypatch.setattr(
        ollama, "list_candidates", lambda name, **kw: calls.append(("registry", name, sorted(kw))) or []
    )
    monkeypatch.setattr(
        ollama_local, "list_candidates", lambda name, **kw: calls.append(("local", name, sorted(kw))) or []
    )
    assert catalog.list_candidates("qwen3:14b", refresh=True) == []
    assert catalog.list_candidates("ollama://qwen3:14b") == []
    assert calls == [
        ("registry", "qwen3:14b", ["client", "offline", "refresh"]),
        ("local", "qwen3:14b", ["client"]),
    ]


# ---------------------------------------------------------------------------------------------------------------
# fitquant quants


def test_cli_quants_json_contract(hub):
    code, out, _ = run("quants", REPO, "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["schema_version"], data["model"]) == (1, REPO)
    rows = data["candidates"]
    assert sorted(r["quant"] for r in rows) == sorted(LADDER_12)
    ranks = [r["quality_rank"] for r in rows]
    assert ranks == sorted(ranks, reverse=True)  # best quality first
    assert rows[0]["quant"] == "F16" and rows[-1]["quant"] == "Q2_K"
    for r in rows:
        assert set(r) == CANDIDATE_KEYS
        (f,) = r["files"]
        assert set(f) == FILE_KEYS
        assert f["name"] == f"Tiny-Llama-{r['quant']}.gguf" and f["size_bytes"] == r["size_bytes"]
        assert f["url"] == f"{hub.endpoint}/{REPO}/resolve/main/{f['name']}" and len(f["sha256"]) == 64
        assert (r["source"], r["ollama_model"], r["architecture"]) == (
            "huggingface",
            f"hf.co/{REPO}:{r['quant']}",
            "llama",
        )
        assert r["n_params"] > 0 and r["bits_per_weight"] > 2 and r["projector"] is None and r["notes"] == []
    q4 = next(r for r in rows if r["quant"] == "Q4_K_M")
    assert q4["kld"] == pytest.approx(0.031273) and "LLaMA-3-8B" in q4["kld_source"]


def test_cli_quants_table(hub):
    code, out, _ = run("quants", f"hf.co/{REPO}")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].strip() == f"hf.co/{REPO}"
    assert "quant" in lines[2] and "bits/weight" in lines[2] and "quality" in lines[2] and "KLD" in lines[2]
    body = [line for line in lines if "huggingface" in line]
    assert [line.split()[1] for line in body][:3] == ["F16", "Q8_0", "Q6_K"]
    assert len(body) == 12


def test_cli_quants_refresh_and_offline(hub):
    assert run("quants", REPO, "--json")[0] == 0
    hub.reset_counters()
    code, out, _ = run("quants", REPO, "--json", "--offline")
    assert code == 0 and hub.requests == []
    assert all(r["notes"][0].startswith("offline: using cached listing from ") for r in json.loads(out)["candidates"])
    assert run("quants", REPO, "--json", "--refresh")[0] == 0
    assert hub.paths("/api/") and hub.blob_bytes == 0


def test_cli_quants_local_folder_with_a_filter(corpus, tmp_path):
    for m in corpus:
        if m.family_name == "tiny-qwen3":
            shutil.copy(m.path, tmp_path / m.path.name)
    code, out, _ = run("quants", f"{tmp_path}:q8_0", "--json")
    assert code == 0
    (row,) = json.loads(out)["candidates"]
    assert (row["quant"], row["source"], row["architecture"]) == ("Q8_0", "local", "qwen3")
    (f,) = row["files"]
    assert (f["local_path"], f["url"], f["sha256"]) == (str(tmp_path / "tiny-qwen3-Q8_0.gguf"), None, None)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["nobody/nothing"],
            "CatalogError: nobody/nothing: no such repository on {endpoint} (HTTP 404); check the name (a private repository needs HF_TOKEN)",
        ),
        (
            [f"{REPO}:Q9_K"],
            f"CatalogError: {REPO}:Q9_K: no quant Q9_K in this repository; available: F16, IQ4_XS, Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, UD-Q4_K_XL",
        ),
        (
            ["org/NoGGUF"],
            "CatalogError: org/NoGGUF: no GGUF files in this repository (1 files: model.safetensors); fitquant needs GGUF files, as in the -GGUF repositories",
        ),
        (["./missing.gguf"], "CatalogError: ./missing.gguf: no such file or folder"),
        ([f"{REPO}", "--offline"], f"CatalogError: {REPO}: offline, and this repository has not been listed before"),
    ],
)
def test_cli_quants_errors_are_one_line(hub, args, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.add_repo("org/NoGGUF", {"model.safetensors": b"\0" * 4096})
    code, out, err = run("quants", *args)
    assert code == 1 and out == ""
    assert err.strip() == line.format(endpoint=hub.endpoint)


def test_cli_quants_network_down_is_one_line(monkeypatch):
    endpoint = refused_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code, _, err = run("quants", REPO)
    assert code == 1
    assert err.strip() == (
        f"CatalogError: {REPO}: cannot list the repository at {endpoint}: ConnectError: [Errno 111] Connection refused "
        "(after 3 attempts)"
    )


def test_cli_quants_embedded_default(corpus, monkeypatch):
    import launcher.embedded

    m = next(m for m in corpus if m.family_name == "tiny-gemma3" and m.quant == "Q4_K_M")
    monkeypatch.setattr(launcher.embedded, "embedded_model_path", lambda: Path(m.path))
    code, out, _ = run("quants", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] is None and [r["quant"] for r in data["candidates"]] == ["Q4_K_M"]


def test_ollama_registry_headers_come_from_the_catalog_cache(corpus, monkeypatch):
    from ollama_registry_server import RegistryServer

    monkeypatch.setattr("launcher.http.RETRY_WAIT_S", 0.0)
    q8 = next(m.path for m in corpus if m.family_name == "tiny-llama" and m.quant == "Q8_0")
    srv = RegistryServer()
    try:
        monkeypatch.setenv("FITQUANT_OLLAMA_REGISTRY", srv.url)
        srv.add_tag("library/tiny", "1b-q8_0", q8, file_type="Q8_0")
        (first,) = catalog.list_candidates("tiny:1b-q8_0")
        assert first.header is not None and sum(srv.served.values()) > 0
        srv.reset_counts()
        (again,) = catalog.list_candidates("tiny:1b-q8_0")
        assert sum(srv.served.values()) == 0  # the model blob's header came from the cache, by digest
        assert again.header is not None and again.header.tensors == first.header.tensors
        (offline,) = catalog.list_candidates("tiny:1b-q8_0", offline=True)
        assert offline.header is not None and offline.header.tensors == first.header.tensors
    finally:
        srv.close()
