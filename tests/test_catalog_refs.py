"""URL forms of MODEL: a plain http(s) URL to a GGUF (one candidate, read by Range), and a Hugging Face file URL
copied from a browser (`/resolve/` or `/blob/`, on huggingface.co or the HF_ENDPOINT host), which means that
repository at that revision, filtered to that file's quant. Real servers on 127.0.0.1: tests/hf_server.py (a
Hub) and tests/test_gguf_http.py's FakeHub (Range requests, via tests/http_range.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from gguf_factory import QT, write_gguf
from hf_server import LADDER_12, HFServer, isolate_hub, ladder_files
from test_gguf_http import FakeHub

from launcher import catalog
from launcher.catalog import ModelReference, parse_reference
from launcher.cli import main
from launcher.errors import CatalogError
from launcher.gguf import read_header

REPO = "org/Tiny-Llama-GGUF"


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    isolate_hub(monkeypatch, tmp_path)


@pytest.fixture
def files(tmp_path) -> Iterator[FakeHub]:
    """tests/test_gguf_http.py's Range server: the files of `files.root` at /blob/<name>."""
    root = tmp_path / "srv"
    root.mkdir()
    server = FakeHub(root)
    yield server
    server.close()


def blob(server: FakeHub, name: str) -> str:
    return server.url(f"/blob/{name}")


@pytest.fixture
def hub(monkeypatch, corpus) -> Iterator[HFServer]:
    with HFServer(page_size=5) as srv:
        srv.add_repo(REPO, {**ladder_files(corpus, LADDER_12), "README.md": b"# Tiny"}, revisions=("main", "v1"))
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        yield srv


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


TENSORS = [("token_embd.weight", (512, 1024), QT.F16), ("blk.0.attn_q.weight", (4, 64), QT.Q8_0)]  # 1 MiB


# ---------------------------------------------------------------------------------------------------------------
# Reference forms


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("http://host/x.gguf", ModelReference("url", "http://host/x.gguf")),
        ("HTTPS://host:8080/a/b/x-Q4_K_M.gguf?x=1", ModelReference("url", "HTTPS://host:8080/a/b/x-Q4_K_M.gguf?x=1")),
        (
            "https://huggingface.co/user/repo/resolve/main/x-Q4_K_M.gguf",
            ModelReference("huggingface", "user/repo", quant="Q4_K_M", revision="main"),
        ),
        (
            "https://huggingface.co/user/repo/blob/main/x-UD-Q4_K_XL.gguf?download=true",
            ModelReference("huggingface", "user/repo", quant="UD-Q4_K_XL", revision="main"),
        ),
        (
            "https://hf.co/user/repo/resolve/refs%2Fpr%2F1/Q8_0/x-00001-of-00002.gguf",
            ModelReference("huggingface", "user/repo", quant="Q8_0", revision="refs/pr/1"),
        ),
        (
            "hf.co/user/repo/resolve/v1.0/sub%20dir/x-IQ4_XS.gguf",
            ModelReference("huggingface", "user/repo", quant="IQ4_XS", revision="v1.0"),
        ),
        (  # no label in the name: the file name is the filter
            "https://huggingface.co/user/repo/resolve/main/model.gguf",
            ModelReference("huggingface", "user/repo", quant="model.gguf", revision="main"),
        ),
        ("https://huggingface.co/user/repo", ModelReference("huggingface", "user/repo")),
    ],
)
def test_refs_url_forms(ref, parsed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_reference(ref) == parsed


def test_refs_the_hf_endpoint_host_is_the_hub(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert parse_reference("http://127.0.0.1:9/user/repo/resolve/v2/x-Q6_K.gguf") == ModelReference(
        "huggingface", "user/repo", quant="Q6_K", revision="v2"
    )
    assert parse_reference("http://127.0.0.1:9/user/repo:Q4_K_M") == ModelReference(
        "huggingface", "user/repo", quant="Q4_K_M"
    )
    # another port, another host: a plain URL
    assert parse_reference("http://127.0.0.1:10/user/repo/resolve/v2/x-Q6_K.gguf").kind == "url"
    # huggingface.co stays the Hub when HF_ENDPOINT names a mirror
    assert parse_reference("https://huggingface.co/u/r/resolve/main/x-Q8_0.gguf").kind == "huggingface"


def test_refs_a_hub_file_that_is_no_gguf_is_refused():
    with pytest.raises(CatalogError) as err:
        parse_reference("https://huggingface.co/user/repo/blob/main/README.md")
    assert str(err.value) == (
        "https://huggingface.co/user/repo/blob/main/README.md: README.md is not a GGUF file; "
        "give the URL of a .gguf file or the repository"
    )


# ---------------------------------------------------------------------------------------------------------------
# A plain URL: one candidate, read by Range


def test_refs_plain_url_is_one_candidate_read_by_range(files, tmp_path):
    (path,) = write_gguf(files.root / "Tiny-Q8_0.gguf", tensors=TENSORS)
    url = blob(files, "Tiny-Q8_0.gguf")
    (c,) = catalog.list_candidates(url)
    local = read_header(path)
    assert (c.model, c.source, c.quant, c.ollama_model, c.projector, c.notes) == (url, "url", "Q8_0", None, None, ())
    (f,) = c.files
    assert (f.name, f.size_bytes, f.url, f.local_path, f.sha256) == (
        "Tiny-Q8_0.gguf",
        path.stat().st_size,
        url,
        None,
        None,
    )
    assert c.header is not None
    assert (c.header.metadata, c.header.tensors) == (local.metadata, local.tensors)
    assert files.served < path.stat().st_size  # only header bytes (the file is mostly tensor data)


def test_refs_plain_url_without_a_label_takes_the_file_type(files):
    write_gguf(files.root / "model.gguf", values=[("general.file_type", 7, None)], tensors=TENSORS)
    (c,) = catalog.list_candidates(blob(files, "model.gguf?token=secret"))
    assert c.quant == "Q8_0"
    assert c.files[0].url == blob(files, "model.gguf")  # no query string: no credentials in a candidate


def test_refs_plain_url_to_any_shard_gives_the_split_set(files):
    paths = write_gguf(
        files.root / "m-Q8_0.gguf", tensors=[(f"t{i}", (2, 32), QT.F32) for i in range(3)], split_max_tensors=1
    )
    (c,) = catalog.list_candidates(blob(files, "m-Q8_0-00002-of-00003.gguf"))
    assert c.quant == "Q8_0"
    assert [(f.name, f.size_bytes, f.url) for f in c.files] == [
        (p.name, p.stat().st_size, blob(files, p.name)) for p in paths
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing-Q4_K_M.gguf", "{url}: {url}: read bytes 0-65535: HTTP 404 Not Found"),
        ("mmproj-F16.gguf", "{url}: mmproj-F16.gguf is a vision projector (mmproj), not a model"),
    ],
)
def test_refs_plain_url_errors_are_one_line(files, name, message):
    url = blob(files, name)
    with pytest.raises(CatalogError) as err:
        catalog.list_candidates(url)
    assert str(err.value) == message.format(url=url)


def test_refs_plain_url_offline_is_refused(files):
    url = blob(files, "x.gguf")
    with pytest.raises(CatalogError) as err:
        catalog.list_candidates(url, offline=True)
    assert str(err.value) == f"{url}: offline, and a GGUF URL is read from the network"
    assert files.requests == []


def test_refs_cli_quants_and_plan_accept_a_plain_url(files, corpus):
    model = next(m for m in corpus if m.family_name == "tiny-qwen3" and m.quant == "Q8_0")
    shutil.copy(model.path, files.root / model.path.name)
    url = blob(files, model.path.name)
    code, out, err = run("quants", url, "--json")
    assert code == 0, err
    (row,) = json.loads(out)["candidates"]
    assert (row["quant"], row["source"], row["architecture"]) == ("Q8_0", "url", "qwen3")
    assert row["files"] == [
        {
            "name": model.path.name,
            "size_bytes": model.path.stat().st_size,
            "url": url,
            "sha256": None,
            "local_path": None,
        }
    ]
    code, out, err = run("plan", url, "--ctx", "4k", "--ram", "64GiB", "--no-engine", "--json")
    assert code == 0, err
    assert url in out and "Q8_0" in out


# ---------------------------------------------------------------------------------------------------------------
# A Hugging Face file URL: that repository, revision and quant


def _same(a: list, b: list) -> None:
    assert [(c.source, c.quant, c.files, c.header is not None, c.ollama_model) for c in a] == [
        (c.source, c.quant, c.files, c.header is not None, c.ollama_model) for c in b
    ]


def test_refs_hub_file_url_is_that_quant_of_the_repository(hub):
    by_name = catalog.list_candidates(f"hf.co/{REPO}:Q4_K_M")
    for form in ("resolve", "blob"):
        found = catalog.list_candidates(f"{hub.endpoint}/{REPO}/{form}/main/Tiny-Llama-Q4_K_M.gguf")
        _same(found, by_name)
        assert [c.quant for c in found] == ["Q4_K_M"]


def test_refs_hub_file_url_on_huggingface_co_lists_from_hf_endpoint(hub):
    (c,) = catalog.list_candidates(f"https://huggingface.co/{REPO}/blob/main/Tiny-Llama-Q6_K.gguf?download=true")
    assert (c.source, c.quant, c.files[0].url) == (
        "huggingface",
        "Q6_K",
        f"{hub.endpoint}/{REPO}/resolve/main/Tiny-Llama-Q6_K.gguf",
    )


def test_refs_hub_file_url_keeps_its_revision(hub):
    (c,) = catalog.list_candidates(f"{hub.endpoint}/{REPO}/resolve/v1/Tiny-Llama-Q8_0.gguf")
    assert c.files[0].url == f"{hub.endpoint}/{REPO}/resolve/v1/Tiny-Llama-Q8_0.gguf"
    assert c.ollama_model is None  # Ollama pulls hf.co/user/repo:QUANT from main only


def test_refs_hub_file_url_to_a_missing_file(hub):
    url = f"{hub.endpoint}/{REPO}/resolve/main/Tiny-Llama-IQ1_S.gguf"
    with pytest.raises(CatalogError) as err:
        catalog.list_candidates(url)
    assert str(err.value).startswith(f"{url}: no quant IQ1_S in this repository; available: F16, IQ4_XS, ")


def test_refs_cli_quants_and_plan_accept_a_hub_file_url(hub):
    url = f"https://huggingface.co/{REPO}/resolve/main/Tiny-Llama-Q5_K_M.gguf"
    code, out, err = run("quants", url, "--json")
    assert code == 0, err
    (row,) = json.loads(out)["candidates"]
    assert (row["quant"], row["source"], row["ollama_model"]) == ("Q5_K_M", "huggingface", f"hf.co/{REPO}:Q5_K_M")
    code, out, err = run("plan", url, "--ctx", "4k", "--ram", "64GiB", "--no-engine", "--json")
    assert code == 0, err
    assert "Q5_K_M" in out


def test_refs_inspect_and_estimate_read_a_hub_file_page_url_as_the_file(hub):
    resolve = f"{hub.endpoint}/{REPO}/resolve/main/Tiny-Llama-Q4_K_M.gguf"
    assert catalog.file_url(f"{hub.endpoint}/{REPO}/blob/main/Tiny-Llama-Q4_K_M.gguf") == resolve
    assert catalog.file_url("http://example.com/blob/main/x.gguf") == "http://example.com/blob/main/x.gguf"
    for command in (["inspect", "--json"], ["estimate", "--json", "--ctx", "4k"]):
        expected = run(*command, resolve)
        assert expected[0] == 0, expected[2]
        assert run(*command, f"https://huggingface.co/{REPO}/blob/main/Tiny-Llama-Q4_K_M.gguf") == expected
