"""launcher.catalog.ollama against a real local server shaped like the Ollama registry, and
launcher.catalog.ollama_local against a stub of Ollama's /api/tags and /api/show (and a real Ollama when one answers).

The registry serves real GGUF files of the test corpus (a quant ladder of tiny llama models) behind 307 redirects
to a blob store that honours Range, and counts requests per path and body bytes per blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from ollama_registry_server import RegistryServer

from launcher import http
from launcher.catalog import cache
from launcher.catalog import ollama as ol
from launcher.catalog import ollama_local as oll
from launcher.catalog.types import Candidate
from launcher.errors import BackendError, CatalogError
from launcher.gguf import read_header
from launcher.ollama_host import ollama_base_url
from launcher.paths import cache_dir

# captured at import: the autouse fixture in conftest.py clears OLLAMA_HOST for every test
_REAL_OLLAMA_HOST = os.environ.get("OLLAMA_HOST")

TINY = "library/tiny"
TINY_TAGS = {"1b-q4_K_M": "Q4_K_M", "1b-q8_0": "Q8_0", "1b-fp16": "F16", "1b-q6_K": "Q6_K"}
N_SIZE_PROBES = 1 + 16 + 4 * 16  # the size tag, 16 quant suffixes, 4 variants x 16


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_WAIT_S", 0.0)


@pytest.fixture
def ladder(corpus) -> dict[str, Path]:
    return {m.quant: m.path for m in corpus if m.family_name == "tiny-llama"}


@pytest.fixture
def qwen_ladder(corpus) -> dict[str, Path]:
    return {m.quant: m.path for m in corpus if m.family_name == "tiny-qwen2"}


@pytest.fixture
def registry(ladder, qwen_ladder, monkeypatch: pytest.MonkeyPatch) -> Iterator[RegistryServer]:
    srv = RegistryServer()
    monkeypatch.setenv("FITQUANT_OLLAMA_REGISTRY", srv.url)
    for tag, quant in TINY_TAGS.items():
        srv.add_tag(TINY, tag, ladder[quant], file_type=quant)
    srv.alias(TINY, "1b", "1b-q4_K_M")
    srv.alias(TINY, "latest", "1b-q4_K_M")
    # an older family: the variant sits between size and quant
    srv.add_tag("library/old", "8b-instruct-q4_K_M", qwen_ladder["Q4_K_M"], file_type="Q4_K_M", model_type="8.0B")
    srv.add_tag("library/old", "8b-text-q4_0", qwen_ladder["Q4_0"], file_type="Q4_0", model_type="8.0B")
    srv.alias("library/old", "8b", "8b-instruct-q4_K_M")
    srv.alias("library/old", "latest", "8b-instruct-q4_K_M")
    srv.add_tag("someone/tiny", "1b-q8_0", ladder["Q8_0"], file_type="Q8_0")
    yield srv
    srv.close()


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def by_tag(cands: list[Candidate]) -> dict[str, Candidate]:
    return {str(c.ollama_model).split(":", 1)[1]: c for c in cands}


def error_line(name: str, **kwargs: Any) -> str:
    with pytest.raises(CatalogError) as info:
        ol.list_candidates(name, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"ollama registry: model {name!r}")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Names


class TestOllamaRegistry_Names:
    @pytest.mark.parametrize(
        ("name", "host", "namespace", "model", "tag"),
        [
            ("qwen3", None, "library", "qwen3", None),
            ("qwen3:14b", None, "library", "qwen3", "14b"),
            ("qwen3:14b-q4_K_M", None, "library", "qwen3", "14b-q4_K_M"),
            ("someone/model:tag", None, "someone", "model", "tag"),
            ("registry.ollama.ai/library/qwen3:8b", None, "library", "qwen3", "8b"),
            ("hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M", "hf.co", "unsloth", "Qwen3-8B-GGUF", "Q4_K_M"),
            ("localhost:5000/ns/m:t", "localhost:5000", "ns", "m", "t"),
            ("localhost:5000/ns/m", "localhost:5000", "ns", "m", None),
        ],
    )
    def test_parse_name(self, name: str, host, namespace: str, model: str, tag) -> None:
        parsed = ol.parse_name(name)
        assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == (host, namespace, model, tag)

    @pytest.mark.parametrize("name", ["", "qwen3:", "a/b/c/d", "q:bad tag", "../x", "/x", "x/", "q:a/b"])
    def test_parse_name_refuses_what_ollama_refuses(self, name: str) -> None:
        with pytest.raises(CatalogError, match=r"^ollama registry: invalid model name .* \(expected"):
            ol.parse_name(name)

    def test_ollama_names_of_tags(self) -> None:
        assert ol.parse_name("qwen3").with_tag("8b-q8_0") == "qwen3:8b-q8_0"
        assert ol.parse_name("someone/m").with_tag("t") == "someone/m:t"
        assert ol.parse_name("hf.co/u/r").with_tag("Q4_K_M") == "hf.co/u/r:Q4_K_M"

    @pytest.mark.parametrize(
        ("size_label", "model_type", "first", "contains"),
        [
            ("14B", "14.8B", "14b", {"14.8b", "15b"}),
            (None, "8.0B", "8b", set()),
            (None, "268.10M", "268.1m", {"268m", "270m", "0.3b"}),
            ("30B-A3B", "30.5B", "30b-a3b", {"30.5b", "30b", "31b"}),
            ("8x7B", None, "8x7b", set()),
        ],
    )
    def test_size_candidates(self, size_label, model_type, first: str, contains: set[str]) -> None:
        sizes = ol.size_candidates(size_label, model_type)
        assert sizes[0] == first
        assert contains <= set(sizes)
        assert len(sizes) == len(set(sizes)) <= 6

    def test_size_candidates_of_nothing(self) -> None:
        assert ol.size_candidates(None, None) == []
        assert ol.size_candidates("not a size", "junk") == []

    def test_which_tags_expand(self) -> None:
        for tag in ("14b", "0.6b", "30b-a3b", "8x7b", "e2b", "270m", "8b-instruct", "12b-it"):
            assert ol._is_size_tag(tag), tag
        for tag in ("14b-q4_K_M", "latest", "27b-it-qat", "instruct", "q8_0", "20b-cloud"):
            assert not ol._is_size_tag(tag), tag
        assert len(ol._expansion("14b")) == N_SIZE_PROBES
        assert ol._expansion("8b-instruct") == ["8b-instruct"] + [f"8b-instruct-{q}" for q in ol.QUANT_SUFFIXES]

    def test_registry_url_default_and_override(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("FITQUANT_OLLAMA_REGISTRY", raising=False)
        assert ol._registry_base(None) == "https://registry.ollama.ai"
        monkeypatch.setenv("FITQUANT_OLLAMA_REGISTRY", "http://mirror.example:8080/")
        assert ol._registry_base(None) == "http://mirror.example:8080"
        assert ol._registry_base("hf.co") == "https://hf.co"
        monkeypatch.setenv("FITQUANT_OLLAMA_REGISTRY", "mirror.example")
        with pytest.raises(CatalogError, match=r"FITQUANT_OLLAMA_REGISTRY='mirror\.example' is not an http"):
            ol._registry_base(None)


# ---------------------------------------------------------------------------------------------------------------
# Listing


class TestOllamaRegistry_Listing:
    def test_explicit_tag_is_one_manifest(self, registry: RegistryServer, ladder) -> None:
        (c,) = ol.list_candidates("tiny:1b-q8_0")
        path = ladder["Q8_0"]
        digest = digest_of(path)
        assert (c.model, c.source, c.quant, c.ollama_model) == ("tiny:1b-q8_0", "ollama", "Q8_0", "tiny:1b-q8_0")
        (f,) = c.files
        assert (f.name, f.size_bytes, f.sha256) == (digest, path.stat().st_size, digest.split(":")[1])
        assert f.url == f"{registry.url}/v2/library/tiny/blobs/{digest}"
        assert c.header is not None and c.header.architecture == "llama"
        assert c.header.metadata == read_header(path).metadata
        assert c.projector is None and c.notes == ()
        assert registry.manifest_requests(TINY) == {"1b-q8_0": 1}
        accept = registry.seen_headers["/v2/library/tiny/manifests/1b-q8_0"]["Accept"]
        assert accept == "application/vnd.docker.distribution.manifest.v2+json"

    def test_the_registry_url_comes_from_the_environment(self, registry: RegistryServer) -> None:
        ol.list_candidates("tiny:1b-q8_0")
        assert registry.requests["/v2/library/tiny/manifests/1b-q8_0"] == 1

    def test_bare_name_finds_exactly_the_existing_tags(self, registry: RegistryServer) -> None:
        cands = ol.list_candidates("tiny")
        tags = by_tag(cands)
        assert set(tags) == set(TINY_TAGS)
        assert {t: c.quant for t, c in tags.items()} == TINY_TAGS
        assert [c.quant for c in cands] == ["F16", "Q8_0", "Q6_K", "Q4_K_M"]  # best first
        assert tags["1b-q4_K_M"].notes == ("also tagged latest, 1b",)
        assert all(c.header is not None and c.model == "tiny" for c in cands)
        asked = registry.manifest_requests(TINY)
        assert all(n == 1 for n in asked.values()), asked
        assert {"latest", "1b", *TINY_TAGS} <= set(asked)

    def test_size_tag_expands_and_merges_aliases(self, registry: RegistryServer) -> None:
        cands = ol.list_candidates("tiny:1b")
        tags = by_tag(cands)
        assert set(tags) == set(TINY_TAGS)
        assert tags["1b-q4_K_M"].notes == ("also tagged 1b",)
        assert len(registry.manifest_requests(TINY)) == N_SIZE_PROBES

    def test_older_family_variants(self, registry: RegistryServer) -> None:
        cands = ol.list_candidates("old")
        assert {c.ollama_model: c.quant for c in cands} == {
            "old:8b-instruct-q4_K_M": "Q4_K_M",
            "old:8b-text-q4_0": "Q4_0",
        }
        instruct = by_tag(cands)["8b-instruct-q4_K_M"]
        assert instruct.notes == ("also tagged latest, 8b",)

    def test_namespaced_model(self, registry: RegistryServer) -> None:
        (c,) = ol.list_candidates("someone/tiny:1b-q8_0")
        assert c.ollama_model == "someone/tiny:1b-q8_0"
        assert c.files[0].url is not None and "/v2/someone/tiny/blobs/" in c.files[0].url

    def test_a_fresh_listing_asks_nothing(self, registry: RegistryServer) -> None:
        first = ol.list_candidates("tiny:1b")
        registry.reset_counts()
        second = ol.list_candidates("tiny:1b")
        assert [(c.ollama_model, c.quant, c.files, c.notes) for c in second] == [
            (c.ollama_model, c.quant, c.files, c.notes) for c in first
        ]
        assert all(c.header is not None for c in second)
        assert sum(registry.requests.values()) == 0

    def test_second_expansion_asks_only_the_tags_that_exist(self, registry: RegistryServer, monkeypatch) -> None:
        first = ol.list_candidates("tiny:1b")
        monkeypatch.setattr(cache, "LISTING_TTL_S", 0.0)  # the kept listing is stale: ask the registry again
        registry.reset_counts()
        second = ol.list_candidates("tiny:1b")
        assert [c.ollama_model for c in second] == [c.ollama_model for c in first]
        assert registry.manifest_requests(TINY) == {t: 1 for t in ["1b", *TINY_TAGS]}
        # config blobs are content-addressed and kept, headers are kept by digest: no blob is asked again
        assert [p for p in registry.requests if "/blobs/" in p or p.startswith("/store/")] == []
        assert sum(registry.served.values()) == 0
        assert all(c.header is not None for c in second)
        store = json.loads((cache_dir() / "catalog" / "ollama-tags.json").read_text())
        assert len(store["missing"]) == N_SIZE_PROBES - 1 - len(TINY_TAGS)

    def test_forgotten_404s_are_asked_again(self, registry: RegistryServer, monkeypatch) -> None:
        ol.list_candidates("tiny:1b")
        monkeypatch.setattr(cache, "LISTING_TTL_S", 0.0)
        path = cache_dir() / "catalog" / "ollama-tags.json"
        store = json.loads(path.read_text())
        store["missing"] = {k: v - 2 * ol.NEGATIVE_TTL_S for k, v in store["missing"].items()}
        path.write_text(json.dumps(store))
        registry.reset_counts()
        ol.list_candidates("tiny:1b")
        assert len(registry.manifest_requests(TINY)) == N_SIZE_PROBES

    def test_refresh_asks_every_tag(self, registry: RegistryServer) -> None:
        ol.list_candidates("tiny:1b")
        registry.reset_counts()
        ol.list_candidates("tiny:1b", refresh=True)
        assert len(registry.manifest_requests(TINY)) == N_SIZE_PROBES

    def test_a_corrupt_tag_cache_is_ignored_and_replaced(self, registry: RegistryServer) -> None:
        path = cache_dir() / "catalog" / "ollama-tags.json"
        path.parent.mkdir(parents=True)
        path.write_text('{"version": 1, "missing": {"x": "not a time"')
        assert len(ol.list_candidates("tiny:1b")) == len(TINY_TAGS)
        assert json.loads(path.read_text())["version"] == 1
        assert not list(path.parent.glob(".ollama-tags.*"))  # no temporary file left behind

    def test_a_named_tag_is_asked_even_when_it_was_404_before(self, registry: RegistryServer) -> None:
        ol.list_candidates("tiny:1b")
        registry.reset_counts()
        text = error_line("tiny:1b-q5_K_M")
        assert "not found" in text
        assert registry.manifest_requests(TINY) == {"1b-q5_K_M": 1}

    def test_header_bytes_served_per_quant(self, registry: RegistryServer) -> None:
        cands = ol.list_candidates("tiny")
        for c in cands:
            assert c.header is not None
            served = registry.served[c.files[0].name]
            assert 0 < served <= c.header.data_offset + 1024 * 1024, (c.quant, served)
            assert served < c.size_bytes
        registry.reset_counts()
        assert len(ol.list_candidates("tiny", refresh=True)) == len(cands)
        assert sum(registry.served.values()) == 0  # headers are kept by digest

    def test_probes_run_concurrently(self, registry: RegistryServer, monkeypatch) -> None:
        monkeypatch.setattr(cache, "LISTING_TTL_S", 0.0)
        registry.latency_s = 0.05
        t0 = time.perf_counter()
        assert len(ol.list_candidates("tiny:1b")) == len(TINY_TAGS)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ol.list_candidates("tiny:1b")
        warm = time.perf_counter() - t0
        # one at a time, 81 manifests alone would take 81 x 50 ms = 4 s
        assert cold < 2.0, cold
        assert warm < 1.0, warm

    def test_projector_layer(self, registry: RegistryServer, ladder, corpus) -> None:
        mmproj = next(m.path for m in corpus if m.family_name == "tiny-gemma3" and m.quant == "F16")
        registry.add_tag("library/vision", "1b-q4_K_M", ladder["Q4_K_M"], file_type="Q4_K_M", projector=mmproj)
        (c,) = ol.list_candidates("vision:1b-q4_K_M")
        assert c.projector is not None
        assert (c.projector.name, c.projector.size_bytes) == (digest_of(mmproj), mmproj.stat().st_size)
        assert c.projector.url == f"{registry.url}/v2/library/vision/blobs/{digest_of(mmproj)}"
        assert c.size_bytes == ladder["Q4_K_M"].stat().st_size  # weights only: the projector is separate

    def test_label_from_tag_then_header(self, registry: RegistryServer, ladder) -> None:
        registry.add_tag(TINY, "1b-q4_0", ladder["Q4_0"], config={"model_type": "1.0B"})
        registry.add_tag(TINY, "special", ladder["Q2_K"])
        assert [c.quant for c in ol.list_candidates("tiny:1b-q4_0")] == ["Q4_0"]
        (special,) = ol.list_candidates("tiny:special")
        assert special.quant == "Q2_K"
        assert special.notes == ()

    def test_config_file_type_is_normalised(self, registry: RegistryServer, ladder) -> None:
        registry.add_tag(TINY, "odd", ladder["Q4_K_M"], file_type="q4_k_m")
        assert [c.quant for c in ol.list_candidates("tiny:odd")] == ["Q4_K_M"]

    def test_config_requires_becomes_a_note(self, registry: RegistryServer, ladder) -> None:
        registry.add_tag(TINY, "new", ladder["Q8_0"], file_type="Q8_0", config={"requires": "0.12.0"})
        (c,) = ol.list_candidates("tiny:new")
        assert c.notes == ("needs Ollama 0.12.0 or newer",)

    def test_latest_of_unknown_size_is_listed_alone_with_a_note(self, registry: RegistryServer, ladder) -> None:
        registry.add_tag("library/nosize", "latest", ladder["Q8_0"], file_type="Q8_0", model_type="")
        (c,) = ol.list_candidates("nosize")
        assert c.quant == "Q8_0"
        assert c.notes == ("could not tell which size 'latest' is; name one (nosize:<size>) to list its other quants",)

    def test_one_unreadable_header_is_a_note(self, registry: RegistryServer, ladder) -> None:
        registry.fault(f"/store/{digest_of(ladder['Q8_0'])}", 500, forever=True)
        tags = by_tag(ol.list_candidates("tiny:1b"))
        assert tags["1b-q8_0"].header is None
        (note,) = tags["1b-q8_0"].notes
        assert note.startswith("header not read: ") and "HTTP 500" in note and "after 3 attempts" in note
        assert all(c.header is not None for t, c in tags.items() if t != "1b-q8_0")

    def test_offline_uses_the_kept_listing_and_headers(self, registry: RegistryServer) -> None:
        online = ol.list_candidates("tiny:1b")
        registry.close()
        offline = ol.list_candidates("tiny:1b", offline=True)
        assert [(c.ollama_model, c.quant, c.files) for c in offline] == [
            (c.ollama_model, c.quant, c.files) for c in online
        ]
        for c, o in zip(offline, online, strict=True):
            assert c.header is not None and o.header is not None and c.header.metadata == o.header.metadata
            assert c.notes[0].startswith("offline: using cached listing from ")
            assert c.notes[1:] == o.notes

    def test_offline_without_cached_headers(self, registry: RegistryServer) -> None:
        ol.list_candidates("tiny:1b-q8_0")
        shutil.rmtree(cache_dir() / "catalog" / "headers")
        (c,) = ol.list_candidates("tiny:1b-q8_0", offline=True)
        assert c.header is None
        assert c.notes[1:] == ("offline: header not cached",)

    def test_registry_down_falls_back_to_the_kept_listing(self, registry: RegistryServer, monkeypatch) -> None:
        ol.list_candidates("tiny:1b")
        monkeypatch.setattr(cache, "LISTING_TTL_S", 0.0)
        registry.close()
        cands = ol.list_candidates("tiny:1b")
        assert {c.quant for c in cands} == set(TINY_TAGS.values())
        assert all(c.header is not None and c.notes[0].startswith("offline: using cached listing from ") for c in cands)

    def test_offline_without_a_kept_listing(self, registry: RegistryServer) -> None:
        assert error_line("tiny:1b", offline=True) == (
            "ollama registry: model 'tiny:1b': offline, and it has not been listed before (list it once online)"
        )
        assert sum(registry.requests.values()) == 0

    def test_an_injected_client_is_used_and_left_open(self, registry: RegistryServer) -> None:
        with httpx.Client() as client:
            (c,) = ol.list_candidates("tiny:1b-q8_0", client=client)
            assert c.header is not None
            assert not client.is_closed


# ---------------------------------------------------------------------------------------------------------------
# Failures: one line naming the model and the cause


class TestOllamaRegistry_Failures:
    def test_unknown_model(self, registry: RegistryServer) -> None:
        assert error_line("nope") == (
            f"ollama registry: model 'nope': not found at {registry.url} "
            "(no tag 'latest'; see https://ollama.com/library/nope/tags)"
        )

    def test_unknown_tag(self, registry: RegistryServer) -> None:
        assert error_line("tiny:9b-q4_K_M") == (
            f"ollama registry: model 'tiny:9b-q4_K_M': not found at {registry.url} "
            "(no tag '9b-q4_K_M'; see https://ollama.com/library/tiny/tags)"
        )

    def test_unknown_size(self, registry: RegistryServer) -> None:
        assert error_line("tiny:9b") == (
            f"ollama registry: model 'tiny:9b': not found at {registry.url} "
            f"(none of the {N_SIZE_PROBES} tags tried for '9b' exists; see https://ollama.com/library/tiny/tags)"
        )
        registry.reset_counts()
        error_line("tiny:9b")  # the second time only the size tag itself is asked
        assert registry.manifest_requests(TINY) == {"9b": 1}

    def test_5xx_is_retried_then_reported(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q8_0")
        registry.fault(path, 500, forever=True)
        assert error_line("tiny:1b-q8_0") == (
            f"ollama registry: model 'tiny:1b-q8_0': HTTP 500 Internal Server Error from {registry.url}{path} "
            "(after 3 attempts)"
        )
        assert registry.requests[path] == 3

    def test_a_passing_5xx_is_retried_away(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q8_0")
        registry.fault(path, 503, "drop")
        (c,) = ol.list_candidates("tiny:1b-q8_0")
        assert c.quant == "Q8_0"
        assert registry.requests[path] == 3

    def test_401_says_the_registry_wants_authentication(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q8_0")
        registry.fault(path, 401, forever=True)
        assert error_line("tiny:1b-q8_0") == (
            "ollama registry: model 'tiny:1b-q8_0': the registry wants authentication "
            f"(HTTP 401 Unauthorized from {registry.url}{path}); fitquant reads public models only: "
            "pull it with 'ollama pull' and use the local Ollama's copy"
        )
        assert registry.requests[path] == 1

    def test_truncated_body(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q8_0")
        registry.fault(path, "truncate", forever=True)
        text = error_line("tiny:1b-q8_0")
        assert text.startswith(
            f"ollama registry: model 'tiny:1b-q8_0': the answer from {registry.url}{path} was cut short "
            "(RemoteProtocolError: "
        )
        assert text.endswith(") (after 3 attempts)")

    def test_redirect_loop(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q8_0")
        registry.fault(path, "loop", forever=True)
        assert error_line("tiny:1b-q8_0") == (
            f"ollama registry: model 'tiny:1b-q8_0': too many redirects from {registry.url}{path} (a redirect loop?)"
        )

    def test_network_down(self, registry: RegistryServer) -> None:
        url = registry.url
        registry.close()
        assert error_line("tiny:1b-q8_0") == (
            f"ollama registry: model 'tiny:1b-q8_0': cannot connect to {url} ([Errno 111] Connection refused) "
            "(after 3 attempts)"
        )

    def test_a_failing_probe_fails_the_listing_and_names_its_tag(self, registry: RegistryServer) -> None:
        path = registry.manifest_path(TINY, "1b-q5_K_M")
        registry.fault(path, 502, forever=True)
        assert error_line("tiny:1b") == (
            f"ollama registry: model 'tiny:1b' (tag '1b-q5_K_M'): HTTP 502 Bad Gateway from {registry.url}{path} "
            "(after 3 attempts)"
        )

    def test_malformed_manifest(self, registry: RegistryServer) -> None:
        registry.manifests[(TINY, "html")] = b"<html>a proxy's error page</html>"
        path = registry.manifest_path(TINY, "html")
        assert error_line("tiny:html") == (
            f"ollama registry: model 'tiny:html': the manifest from {registry.url}{path} is not JSON"
        )
        bad = {"schemaVersion": 2, "layers": [{"mediaType": ol.MEDIA_MODEL, "digest": "sha256:../../x", "size": 1}]}
        registry.manifests[(TINY, "bad")] = json.dumps(bad).encode()
        assert "has a malformed digest 'sha256:../../x'" in error_line("tiny:bad")

    def test_manifest_without_a_model_layer(self, registry: RegistryServer) -> None:
        registry.add_tag(TINY, "20b-cloud", None, file_type="MXFP4")
        assert error_line("tiny:20b-cloud") == (
            "ollama registry: model 'tiny:20b-cloud': no GGUF model layer in its manifest "
            "(a hosted-only '-cloud' tag, or a format fitquant cannot read)"
        )

    def test_unreadable_header_of_the_only_candidate(self, registry: RegistryServer, ladder) -> None:
        digest = digest_of(ladder["Q8_0"])
        registry.fault(f"/v2/library/tiny/blobs/{digest}", "loop", forever=True)
        text = error_line("tiny:1b-q8_0")
        assert text.startswith("ollama registry: model 'tiny:1b-q8_0': cannot read the GGUF header: ")
        assert "too many redirects" in text

    def test_truncated_blob_of_the_only_candidate(self, registry: RegistryServer, ladder) -> None:
        registry.fault(f"/store/{digest_of(ladder['Q8_0'])}", "truncate", forever=True)
        text = error_line("tiny:1b-q8_0")
        assert text.startswith("ollama registry: model 'tiny:1b-q8_0': cannot read the GGUF header: ")
        assert text.endswith("(after 3 attempts)")

    def test_non_gguf_model_blob(self, registry: RegistryServer) -> None:
        registry.add_tag(TINY, "weird", b"safetensors, not GGUF" * 100, file_type="Q4_K_M")
        text = error_line("tiny:weird")
        assert text.startswith("ollama registry: model 'tiny:weird': cannot read the GGUF header: ")
        assert "magic" in text


# ---------------------------------------------------------------------------------------------------------------
# A local Ollama


class LocalOllama:
    """A stub of a running Ollama: GET /, /api/version, /api/tags and POST /api/show in the documented shapes."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}  # name -> {"tags": entry, "show": response}
        self.status: dict[str, tuple[int, dict[str, Any]]] = {}
        self.requests: list[tuple[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stub.requests.append((self.path, None))
                if self.path in stub.status:
                    self.answer(*stub.status[self.path])
                elif self.path == "/":
                    self.answer(200, "Ollama is running")
                elif self.path == "/api/version":
                    self.answer(200, {"version": "0.33.0"})
                elif self.path == "/api/tags":
                    self.answer(200, {"models": [m["tags"] for m in stub.models.values()]})
                else:
                    self.answer(404, "404 page not found")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                stub.requests.append((self.path, body))
                if self.path in stub.status:
                    self.answer(*stub.status[self.path])
                    return
                name = body.get("model", "")
                full = name if ":" in name else f"{name}:latest"
                model = stub.models.get(full)
                if self.path != "/api/show":
                    self.answer(404, "404 page not found")
                elif model is None:
                    self.answer(404, {"error": f"model '{name}' not found"})
                else:
                    self.answer(200, model["show"])

            def answer(self, status: int, doc: Any) -> None:
                data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(doc, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(
        self,
        name: str,
        gguf: Path,
        models_dir: Path,
        *,
        quant: str | None,
        on_disk: bool = True,
        manifest: bool = True,
        projector: Path | None = None,
        remote_host: str | None = None,
    ) -> str:
        """Pull `gguf` as `name`: its blob (and manifest file) under models_dir when on_disk. Returns the digest."""
        hexd = hashlib.sha256(gguf.read_bytes()).hexdigest()
        blob = models_dir / "blobs" / f"sha256-{hexd}"
        layers = [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{hexd}", "size": gguf.stat().st_size}
        ]
        if projector is not None:
            phex = hashlib.sha256(projector.read_bytes()).hexdigest()
            layers.append(
                {
                    "mediaType": "application/vnd.ollama.image.projector",
                    "digest": f"sha256:{phex}",
                    "size": projector.stat().st_size,
                }
            )
            if on_disk:
                (models_dir / "blobs").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(projector, models_dir / "blobs" / f"sha256-{phex}")
        if on_disk:
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(gguf, blob)
            if manifest:
                model, tag = name.split(":")
                mpath = models_dir / "manifests" / "registry.ollama.ai" / "library" / model / tag
                mpath.parent.mkdir(parents=True, exist_ok=True)
                doc = {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "layers": layers,
                }
                mpath.write_text(json.dumps(doc))
        header = read_header(gguf)
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": header.architecture,
            "families": [header.architecture],
            "parameter_size": "1.0B",
        }
        if quant is not None:
            details["quantization_level"] = quant
        tags_entry: dict[str, Any] = {
            "name": name,
            "model": name,
            "modified_at": "2026-11-27T10:00:00.000000000Z",
            "size": gguf.stat().st_size + 4321,
            "digest": hashlib.sha256(name.encode()).hexdigest(),  # the manifest's digest, not the blob's
            "details": details,
        }
        show: dict[str, Any] = {
            "license": "MIT License",
            "modelfile": (
                '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
                f"# FROM {name}\n\nFROM {blob}\n"
                'TEMPLATE """{{ .Prompt }}"""\nPARAMETER stop </s>\nLICENSE """MIT License"""\n'
            ),
            "parameters": 'stop                           "</s>"',
            "template": "{{ .Prompt }}",
            "details": details,
            "model_info": {
                "general.architecture": header.architecture,
                "general.file_type": header.get("general.file_type"),
                "general.parameter_count": header.n_params,
                f"{header.architecture}.block_count": header.arch_get("block_count"),
                f"{header.architecture}.context_length": header.arch_get("context_length"),
                "tokenizer.ggml.tokens": [],
            },
            "capabilities": ["completion"],
            "modified_at": "2026-11-27T10:00:00.000000000Z",
        }
        if projector is not None:
            show["projector_info"] = {"general.architecture": "clip"}
        if remote_host is not None:
            tags_entry.update(remote_model=name, remote_host=remote_host)
            show.update(remote_model=name, remote_host=remote_host)
        self.models[name] = {"tags": tags_entry, "show": show}
        return f"sha256:{hexd}"


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ollama-models"
    path.mkdir()
    monkeypatch.setenv("OLLAMA_MODELS", str(path))
    return path


@pytest.fixture
def local() -> Iterator[LocalOllama]:
    stub = LocalOllama()
    yield stub
    stub.close()


class TestOllamaLocal:
    def test_host_is_read_as_the_official_client_reads_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # the parser is launcher.ollama_host (tests/test_ollama_host.py); here: the catalog uses it
        assert oll.DEFAULT_HOST == "http://127.0.0.1:11434"
        monkeypatch.setenv("OLLAMA_HOST", "ftp://x")
        with pytest.raises(BackendError) as info:
            oll.list_candidates(None)
        assert str(info.value) == (
            "OLLAMA_HOST 'ftp://x' has scheme 'ftp'; use http:// or https:// (e.g. OLLAMA_HOST=http://127.0.0.1:11434)"
        )

    def test_named_model_with_its_blob_on_this_machine(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        digest = local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M")
        (c,) = oll.list_candidates("tiny:1b", host=local.host)
        assert (c.model, c.source, c.quant, c.ollama_model) == ("tiny:1b", "ollama-local", "Q4_K_M", "tiny:1b")
        (f,) = c.files
        blob = models_dir / "blobs" / digest.replace(":", "-")
        assert (f.name, f.size_bytes, f.sha256, f.local_path, f.url) == (
            digest,
            ladder["Q4_K_M"].stat().st_size,
            digest.split(":")[1],
            str(blob),
            None,
        )
        assert c.header is not None and c.header.metadata == read_header(ladder["Q4_K_M"]).metadata
        assert c.notes == ()
        assert ("/api/show", {"model": "tiny:1b"}) in local.requests

    def test_short_name_means_latest(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        local.add("tiny:latest", ladder["Q8_0"], models_dir, quant="Q8_0")
        (c,) = oll.list_candidates("tiny", host=local.host)
        assert (c.model, c.ollama_model, c.quant) == ("tiny", "tiny:latest", "Q8_0")
        assert c.header is not None

    def test_all_models_without_cloud_ones(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M")
        local.add("tiny:1b-q8_0", ladder["Q8_0"], models_dir, quant="Q8_0")
        local.add(
            "big:120b-cloud",
            ladder["F16"],
            models_dir,
            quant="MXFP4",
            on_disk=False,
            remote_host="https://ollama.com:443",
        )
        cands = oll.list_candidates(None, host=local.host)
        assert [(c.model, c.quant) for c in cands] == [("tiny:1b", "Q4_K_M"), ("tiny:1b-q8_0", "Q8_0")]
        assert all(c.header is not None for c in cands)

    def test_ollama_host_is_honoured(self, local: LocalOllama, models_dir: Path, ladder, monkeypatch) -> None:
        local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M")
        monkeypatch.setenv("OLLAMA_HOST", local.host)
        assert [c.quant for c in oll.list_candidates("tiny:1b")] == ["Q4_K_M"]

    def test_blob_found_from_the_modelfile_without_a_manifest(
        self, local: LocalOllama, models_dir: Path, ladder
    ) -> None:
        digest = local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M", manifest=False)
        (c,) = oll.list_candidates("tiny:1b", host=local.host)
        assert c.files[0].sha256 == digest.split(":")[1]
        assert c.files[0].size_bytes == ladder["Q4_K_M"].stat().st_size
        assert c.header is not None

    def test_blob_elsewhere_leaves_the_header_out(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        digest = local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M", on_disk=False)
        (c,) = oll.list_candidates("tiny:1b", host=local.host)
        assert c.header is None
        assert c.files[0].sha256 == digest.split(":")[1]
        assert c.files[0].local_path is None
        assert c.files[0].size_bytes == ladder["Q4_K_M"].stat().st_size + 4321
        assert c.notes == (
            f"header not read: blob {digest} is not on this machine (is the server at {local.url} remote?)",
            "size is that of all the model's layers (/api/tags)",
        )

    def test_projector_from_the_manifest(self, local: LocalOllama, models_dir: Path, ladder, corpus) -> None:
        mmproj = next(m.path for m in corpus if m.family_name == "tiny-gemma3" and m.quant == "F16")
        local.add("vision:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M", projector=mmproj)
        (c,) = oll.list_candidates("vision:1b", host=local.host)
        assert c.projector is not None
        assert c.projector.size_bytes == mmproj.stat().st_size
        assert c.projector.local_path is not None and Path(c.projector.local_path).is_file()

    def test_label_from_model_info_when_details_lack_it(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        local.add("tiny:1b", ladder["Q6_K"], models_dir, quant=None)
        assert [c.quant for c in oll.list_candidates("tiny:1b", host=local.host)] == ["Q6_K"]

    def test_unknown_model(self, local: LocalOllama, models_dir: Path) -> None:
        with pytest.raises(CatalogError) as info:
            oll.list_candidates("nope", host=local.host)
        assert str(info.value) == f"ollama: model 'nope' not found on {local.url} (pull it with 'ollama pull nope')"

    def test_cloud_model_by_name(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        local.add(
            "big:120b-cloud",
            ladder["F16"],
            models_dir,
            quant="MXFP4",
            on_disk=False,
            remote_host="https://ollama.com:443",
        )
        with pytest.raises(CatalogError) as info:
            oll.list_candidates("big:120b-cloud", host=local.host)
        assert str(info.value) == (
            f"ollama: model 'big:120b-cloud' on {local.url} is a cloud model (runs on https://ollama.com:443), "
            "not on this machine"
        )

    def test_no_server(self) -> None:
        with socket_port() as port:
            pass  # the port is free again: nothing listens there
        with pytest.raises(CatalogError) as info:
            oll.list_candidates("tiny", host=f"127.0.0.1:{port}")
        assert str(info.value) == (
            f"ollama: no server at http://127.0.0.1:{port} (start it with 'ollama serve' or set OLLAMA_HOST)"
        )

    def test_server_error_is_one_line(self, local: LocalOllama, models_dir: Path, ladder) -> None:
        local.add("tiny:1b", ladder["Q4_K_M"], models_dir, quant="Q4_K_M")
        local.status["/api/show"] = (500, {"error": "failed to read\nthe manifest"})
        with pytest.raises(CatalogError) as info:
            oll.list_candidates("tiny:1b", host=local.host)
        assert str(info.value) == (
            f"ollama: /api/show on {local.url}: HTTP 500 Internal Server Error: failed to read the manifest"
        )

    def test_real_ollama(self) -> None:
        host = ollama_base_url(_REAL_OLLAMA_HOST)
        try:
            version = httpx.get(f"{host}/api/version", timeout=2.0).json().get("version")
        except (httpx.HTTPError, ValueError) as exc:
            pytest.skip(f"no Ollama answers at {host} ({type(exc).__name__}); start one or set OLLAMA_HOST to run this")
        cands = oll.list_candidates(None, host=host)
        if not cands:
            pytest.skip(f"the Ollama {version} at {host} has no local models (ollama pull one to run this)")
        for c in cands:
            assert c.source == "ollama-local" and c.ollama_model and c.quant
            assert c.files[0].size_bytes > 0
            if c.files[0].local_path is not None:
                assert c.header is not None, c.notes
        (again,) = oll.list_candidates(cands[0].ollama_model, host=host)
        assert (again.quant, again.files[0].sha256) == (cands[0].quant, cands[0].files[0].sha256)


class socket_port:
    """A free TCP port on 127.0.0.1 (bound while inside the block)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
