"""launcher.catalog.huggingface and launcher.catalog.cache against a real Hub-shaped server (tests/hf_server.py).

The repositories hold real GGUF files of the test corpus (a quant ladder); the server counts every request and
every body byte it sends, so "reads only headers" and "the second listing reads nothing" are measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gguf_factory import QT, big_vocab_file, write_gguf
from hf_server import LADDER_12, HFServer, ServedFile, isolate_hub, ladder_files, refused_endpoint

from launcher import catalog
from launcher import gguf as lg
from launcher.catalog import cache
from launcher.catalog import huggingface as hf
from launcher.errors import CatalogError
from launcher.gguf import SkippedArray, read_header

MiB = 1024**2
REPO = "org/Tiny-Llama-GGUF"


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    isolate_hub(monkeypatch, tmp_path)


@pytest.fixture
def server(monkeypatch):
    with HFServer(page_size=4) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        yield srv


@pytest.fixture
def repo12(server, corpus) -> dict[str, ServedFile]:
    files = ladder_files(corpus, LADDER_12)
    server.add_repo(REPO, {**files, "README.md": b"# Tiny Llama\n", ".gitattributes": b"*.gguf filter=lfs\n"})
    return files


def _header_size(f: ServedFile) -> int:
    return read_header(f.source).data_offset


def _fail(fn, *args, **kwargs) -> str:
    with pytest.raises(CatalogError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Listing


def test_hf_lists_every_quant_reading_only_headers(server, repo12):
    found = hf.list_candidates(REPO)
    assert sorted(c.quant for c in found) == sorted(LADDER_12)
    assert [c.size_bytes for c in found] == sorted((c.size_bytes for c in found), reverse=True)
    for c in found:
        name = f"Tiny-Llama-{c.quant}.gguf"
        served = repo12[name]
        (f,) = c.files
        assert (f.name, f.size_bytes, f.sha256) == (name, served.size, served.sha256)
        assert f.url == f"{server.endpoint}/{REPO}/resolve/main/{name}" and f.local_path is None
        assert (c.source, c.model, c.ollama_model, c.projector, c.notes) == (
            "huggingface",
            REPO,
            f"hf.co/{REPO}:{c.quant}",
            None,
            (),
        )
        ref = read_header(served.source)
        assert c.header is not None
        assert (c.header.metadata, c.header.tensors, c.header.data_offset) == (
            ref.metadata,
            ref.tensors,
            ref.data_offset,
        )
        assert c.header.file_size == served.size and c.header.source == f.url
        # the issue's bound: header bytes plus at most one read-ahead chunk (1 MiB), per quant
        assert 0 < server.served[(REPO, name)] <= _header_size(served) + MiB
    # the tree came in pages of 4 entries, followed through Link headers
    tree = server.paths(f"/api/models/{REPO}/tree/main")
    assert len(tree) == math.ceil(14 / 4) and sum("cursor=" in p for p in tree) == len(tree) - 1


def test_hf_second_listing_reads_nothing_and_a_refresh_reads_only_the_tree(server, repo12):
    first = hf.list_candidates(REPO)
    server.reset_counters()
    again = hf.list_candidates(REPO)
    assert server.requests == [] and server.blob_bytes == 0
    assert [(c.quant, c.files, c.header) for c in again] == [(c.quant, c.files, c.header) for c in first]
    refreshed = hf.list_candidates(REPO, refresh=True)
    assert server.blob_bytes == 0 and all(p.startswith("/api/models/") for p in server.paths())
    assert [c.header for c in refreshed] == [c.header for c in first]


def test_hf_reads_headers_concurrently(server, repo12):
    server.latency_s = 0.05
    hf.list_candidates(REPO)
    assert server.max_in_flight >= 4


def test_hf_same_content_under_two_names_is_read_once(server, corpus):
    (f,) = ladder_files(corpus, ["Q4_K_M"]).values()
    server.add_repo(REPO, {"A-Q4_K_M.gguf": f, "B-Q4_K_S.gguf": f})
    found = hf.list_candidates(REPO)
    assert sorted(c.quant for c in found) == ["Q4_K_M", "Q4_K_S"]
    assert sum(1 for p in server.paths() if "/resolve/" in p) == 1
    assert {c.header.source for c in found if c.header} == {c.files[0].url for c in found}


def test_hf_split_sets_in_per_quant_folders_and_the_projector(server, corpus, tmp_path):
    shards = write_gguf(
        tmp_path / "Big-Q8_0.gguf",
        values=[("general.file_type", 7, None)],
        tensors=[("token_embd.weight", (4, 256), QT.Q8_0), ("blk.0.attn_q.weight", (4, 256), QT.Q8_0),
                 ("output_norm.weight", (256,), QT.F32)],
        split_max_tensors=1,
    )  # fmt: skip
    unnamed = write_gguf(tmp_path / "weights.gguf", values=[("general.file_type", 15, None)],
                         tensors=[("token_embd.weight", (4, 256), QT.Q4_K)], split_max_tensors=1)  # fmt: skip
    (proj16,) = write_gguf(tmp_path / "p16.gguf", arch="clip", values=[("general.type", "mmproj", None)])
    (proj32,) = write_gguf(tmp_path / "p32.gguf", arch="clip", values=[("general.type", "mmproj", None)])
    single = ladder_files(corpus, ["Q4_K_M"])
    files = {
        **{f"Q8_0/{p.name}": p for p in shards},
        **{f"UD-Q4_K_XL/{p.name}": p for p in unnamed},  # the folder names the quant
        **single,
        "mmproj-F32.gguf": proj32,
        "mmproj-F16.gguf": proj16,
        "imatrix/imatrix_unsloth.gguf": b"GGUF not a model",
    }
    server.add_repo(REPO, files)
    found = {c.quant: c for c in hf.list_candidates(REPO)}
    assert sorted(found) == ["Q4_K_M", "Q8_0", "UD-Q4_K_XL"]
    q8 = found["Q8_0"]
    assert [f.name for f in q8.files] == [f"Q8_0/{p.name}" for p in shards]
    assert q8.size_bytes == sum(p.stat().st_size for p in shards)
    assert q8.header is not None and [t.name for t in q8.header.tensors] == [
        "token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"
    ]  # fmt: skip
    assert q8.header.shards == tuple(f.url for f in q8.files)
    assert q8.ollama_model is None  # Ollama does not pull split GGUFs
    assert all(c.projector is not None and c.projector.name == "mmproj-F16.gguf" for c in found.values())
    assert found["Q4_K_M"].projector.sha256 == ServedFile(proj16).sha256


def test_hf_unnamed_file_is_labelled_by_its_header(server, corpus):
    (f,) = ladder_files(corpus, ["Q6_K"]).values()
    server.add_repo(REPO, {"model.gguf": f})
    (c,) = hf.list_candidates(REPO)
    assert c.quant == "Q6_K"


def test_hf_quant_filter_reads_one_header(server, repo12):
    (c,) = hf.list_candidates(REPO, quant="q4_k_m")
    assert c.quant == "Q4_K_M"
    assert list(server.served) == [(REPO, "Tiny-Llama-Q4_K_M.gguf")]
    (c,) = hf.list_candidates(REPO, quant="Tiny-Llama-UD-Q4_K_XL.gguf")
    assert c.quant == "UD-Q4_K_XL"
    assert _fail(hf.list_candidates, REPO, quant="Q9_K") == (
        f"{REPO}: no quant Q9_K in this repository; available: F16, IQ4_XS, Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q4_K_S, "
        "Q5_K_M, Q5_K_S, Q6_K, Q8_0, UD-Q4_K_XL"
    )


def test_hf_references_through_list_candidates(server, repo12):
    for ref in (f"hf.co/{REPO}:Q4_K_M", f"huggingface.co/{REPO}:q4_k_m", f"{REPO}@main:Q4_K_M",
                f"https://huggingface.co/{REPO}:Q4_K_M"):  # fmt: skip
        (c,) = catalog.list_candidates(ref)
        assert (c.quant, c.model) == ("Q4_K_M", ref)
    assert len(catalog.list_candidates(f"hf.co/{REPO}")) == 12


def test_hf_revision_is_in_the_urls_and_the_cache_key(server, corpus):
    server.add_repo(REPO, ladder_files(corpus, ["Q8_0", "Q2_K"]), revisions=("main", "v1.0"))
    found = catalog.list_candidates(f"{REPO}@v1.0")
    assert all("/resolve/v1.0/" in c.files[0].url for c in found)
    assert all(c.ollama_model is None for c in found)
    server.reset_counters()
    catalog.list_candidates(REPO)
    assert server.paths("/api/") == [f"/api/models/{REPO}/tree/main?recursive=true&expand=false"]
    assert server.blob_bytes == 0  # same content: headers come from the cache


# ---------------------------------------------------------------------------------------------------------------
# Offline and the cache


def test_hf_network_down_uses_the_cached_listing_with_a_note(corpus, monkeypatch):
    srv = HFServer()
    srv.add_repo(REPO, ladder_files(corpus, LADDER_12))
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    first = hf.list_candidates(REPO)
    srv.close()  # the port now refuses connections
    monkeypatch.setattr(cache, "LISTING_TTL_S", 0.0)
    found = hf.list_candidates(REPO)
    assert len(found) == 12 and all(c.header is not None for c in found)
    (listing,) = (cache.catalog_cache_dir() / "listings").iterdir()
    when = cache.describe_time(json.loads(listing.read_text())["fetched_at"])
    assert all(c.notes == (f"offline: using cached listing from {when}",) for c in found)
    assert [c.header for c in found] == [c.header for c in first]


def test_hf_offline_uses_only_the_cache(server, repo12, monkeypatch):
    assert _fail(hf.list_candidates, REPO, offline=True) == (
        f"{REPO}: offline, and this repository has not been listed before"
    )
    assert server.requests == []
    hf.list_candidates(REPO)
    server.reset_counters()
    found = hf.list_candidates(REPO, offline=True)
    assert server.requests == [] and len(found) == 12
    assert all(c.notes[0].startswith("offline: using cached listing from ") for c in found)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(catalog.list_candidates(REPO)) == 12 and server.requests == []


def test_hf_corrupt_cache_entries_are_ignored_and_rewritten(server, repo12):
    hf.list_candidates(REPO)
    entries = list(cache.catalog_cache_dir().rglob("*.json"))
    assert len(entries) == 13  # 12 headers and one listing
    for i, path in enumerate(entries):
        path.write_text(["{not json", '{"format": 1, "key": "x"}', "[]", '{"format": 1, "metadata": 3}'][i % 4])
    server.reset_counters()
    assert len(hf.list_candidates(REPO)) == 12
    assert server.blob_bytes > 0  # headers read again
    server.reset_counters()
    assert len(hf.list_candidates(REPO)) == 12
    assert server.requests == []  # and stored again


def test_cache_round_trips_headers_exactly(tmp_path):
    big_vocab_file(tmp_path / "big.gguf", n_tokens=5000, tensor_bytes=1 << 16)
    (nested,) = write_gguf(
        tmp_path / "nested.gguf",
        values=[("a.floats", [1.5, float("inf"), -0.0], None), ("a.flag", True, None), ("a.u64", 2**63 + 5, lg.GGUFValueType.UINT64),
                ("a.text", "héllo", None), ("a.one", 1.0, None)],
        tensors=[("t", (2, 32), QT.Q8_0)],
    )  # fmt: skip
    for path in (tmp_path / "big.gguf", nested):
        header = read_header(path)
        cache.store_header("k" + path.name, header)
        back = cache.load_header("k" + path.name, source=header.source, shards=header.shards)
        assert back == header
    big = cache.load_header("kbig.gguf", source="s")
    assert big is not None and big.get("tokenizer.ggml.tokens") == SkippedArray(lg.GGUFValueType.STRING, 5000)
    assert cache.load_header("missing", source="s") is None


def test_cache_listing_freshness(monkeypatch):
    cache.store_listing("src", "key", {"x": [1, 2]}, fetched_at=1000.0)
    got = cache.load_listing("src", "key")
    assert got is not None and got.data == {"x": [1, 2]} and got.fetched_at == 1000.0
    assert got.is_fresh(now=1000.0 + cache.LISTING_TTL_S - 1)
    assert not got.is_fresh(now=1000.0 + cache.LISTING_TTL_S)
    assert not got.is_fresh(now=999.0)  # a clock that went back does not make a listing fresh forever
    assert cache.load_listing("src", "other") is None and cache.load_listing("other", "key") is None
    assert not list(cache.catalog_cache_dir().rglob("*.tmp"))


def test_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FITQUANT_HOME", str(blocker))  # cache_dir() is under a file: every write fails
    cache.store_listing("src", "key", [1])
    assert cache.load_listing("src", "key") is None


# ---------------------------------------------------------------------------------------------------------------
# Failures: one line naming the model and the cause, after bounded retries


def test_hf_unknown_repository(server):
    assert _fail(hf.list_candidates, "nobody/nothing") == (
        f"nobody/nothing: no such repository on {server.endpoint} (HTTP 404); check the name "
        "(a private repository needs HF_TOKEN)"
    )


def test_hf_unknown_revision(server, repo12):
    assert _fail(catalog.list_candidates, f"{REPO}@v9") == (
        f"{REPO}@v9: no revision 'v9' in this repository (HTTP 404)"
    )


def test_hf_repository_without_gguf_files(server):
    server.add_repo("org/Tiny-Llama", {"config.json": b"{}", "model.safetensors": b"\0" * 2048, "README.md": b"#"})
    assert _fail(catalog.list_candidates, "org/Tiny-Llama") == (
        "org/Tiny-Llama: no GGUF files in this repository (3 files: README.md, config.json, model.safetensors); "
        "fitquant needs GGUF files, as in the -GGUF repositories"
    )


def test_hf_repository_with_only_a_projector(server, tmp_path):
    (proj,) = write_gguf(tmp_path / "p.gguf", arch="clip", values=[("general.type", "mmproj", None)])
    server.add_repo("org/Vision", {"mmproj-F16.gguf": proj})
    assert _fail(hf.list_candidates, "org/Vision") == (
        "org/Vision: the repository holds only vision projectors (mmproj), no model GGUF files"
    )


def test_hf_gated_repository_needs_a_token(server, repo12, monkeypatch):
    server.repos[REPO].gated = "files"  # the Hub lists gated repositories but refuses their files
    expected = (
        f"{REPO}: the repository is gated or private (HTTP 401): set HF_TOKEN to a token that has access "
        "(https://huggingface.co/settings/tokens)"
    )
    assert _fail(hf.list_candidates, REPO) == expected
    server.repos[REPO].gated = "all"
    assert _fail(hf.list_candidates, REPO, refresh=True) == expected

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_456")
    message = _fail(hf.list_candidates, REPO, refresh=True)
    assert message == (
        f"{REPO}: access denied with the token in HF_TOKEN (HTTP 401): the repository is gated or private; "
        "request access on its page, or use a token that has it"
    )
    assert "hf_wrong_token_456" not in message

    monkeypatch.setenv("HF_TOKEN", server.token)
    server.reset_counters()
    assert len(hf.list_candidates(REPO, refresh=True)) == 12
    assert all(had_token for path, had_token in server.requests if not path.startswith("/blobs/"))


def test_hf_network_down():
    endpoint = refused_endpoint()
    assert _fail(hf.list_candidates, REPO, endpoint=endpoint) == (
        f"{REPO}: cannot list the repository at {endpoint}: ConnectError: [Errno 111] Connection refused "
        "(after 3 attempts)"
    )


def test_hf_server_errors_are_retried_then_reported(server, repo12):
    server.fail("/tree/", "status", status=503)
    assert _fail(hf.list_candidates, REPO) == (
        f"{REPO}: cannot list the repository at {server.endpoint}: HTTP 503 Service Unavailable (after 3 attempts)"
    )
    assert len(server.paths("/api/")) == 3


def test_hf_transient_failures_are_retried(server, repo12):
    # one header read, so that the failures below fall on its attempts (3): 500, then a truncated body
    server.fail("/tree/", "status", status=502, times=1)
    server.fail("/tree/", "drop", times=1)
    server.fail("/resolve/", "status", status=500, times=1)
    server.fail("/blobs/", "truncate", times=1)
    (c,) = hf.list_candidates(REPO, quant="Q8_0")
    assert c.header is not None and c.notes == ()
    assert all(f.times == 0 for f in server.failures)
    server.fail("/blobs/", "drop", times=1)  # and a connection dropped before any answer
    assert len(hf.list_candidates(REPO, quant="Q6_K")) == 1 and server.failures[-1].times == 0


def test_hf_truncated_listing(server, repo12):
    server.fail("/tree/", "truncate")
    message = _fail(hf.list_candidates, REPO)
    assert message.startswith(f"{REPO}: cannot list the repository at {server.endpoint}: RemoteProtocolError: ")
    assert message.endswith(" (after 3 attempts)")


def test_hf_truncated_header_reads(server, repo12):
    server.fail("/blobs/", "truncate")
    message = _fail(hf.list_candidates, REPO)
    assert message.startswith(f"{REPO}: cannot read the GGUF header of Tiny-Llama-")
    assert ": read bytes 0-65535: RemoteProtocolError: " in message
    assert message.endswith(" (after 3 attempts)")


def test_hf_redirect_loop(server, repo12):
    server.fail("/resolve/", "loop")
    assert _fail(hf.list_candidates, REPO, quant="Q8_0") == (
        f"{REPO}: cannot read the GGUF header of Tiny-Llama-Q8_0.gguf: read bytes 0-65535: "
        "too many redirects (a redirect loop?)"
    )
    server.fail("/tree/", "loop")
    assert _fail(hf.list_candidates, REPO, refresh=True) == (
        f"{REPO}: cannot list the repository at {server.endpoint}: too many redirects (a redirect loop?)"
    )


def test_hf_one_unreadable_header_leaves_a_note(server, repo12):
    server.fail("/resolve/main/Tiny-Llama-Q2_K.gguf", "status", status=503)
    found = {c.quant: c for c in hf.list_candidates(REPO)}
    assert found["Q2_K"].header is None
    assert found["Q2_K"].notes == (
        "header unreadable: cannot read the GGUF header of Tiny-Llama-Q2_K.gguf: read bytes 0-65535: "
        "HTTP 503 Service Unavailable (after 3 attempts)",
    )
    assert sum(c.header is not None for c in found.values()) == 11
    server.failures.clear()
    server.reset_counters()
    again = {c.quant: c for c in hf.list_candidates(REPO)}  # the missing header is read now; the others are cached
    assert again["Q2_K"].header is not None and list(server.served) == [(REPO, "Tiny-Llama-Q2_K.gguf")]


def test_hf_large_header_reads_stay_within_one_chunk_of_the_header(server, gemma3_270m_path):
    served = ServedFile(Path(gemma3_270m_path))
    server.add_repo("google/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": served})
    (c,) = hf.list_candidates("google/gemma-3-270m-GGUF")
    header_bytes = read_header(gemma3_270m_path).data_offset
    assert header_bytes > 2 * MiB  # a 262k-token vocabulary: many range reads
    # long fixed-width arrays (scores, token types) are seeked past, so fewer bytes than the header may do
    assert header_bytes / 2 < server.blob_bytes <= header_bytes + MiB
    assert c.quant == "Q4_K_M" and c.header is not None and c.header.architecture == "gemma3"
