"""launcher.fetch against real HTTP servers on 127.0.0.1: the Ollama registry shape (redirects to a blob store,
Range, cut-off streams) for fitquant's own downloader, the Hugging Face shape for huggingface_hub.hf_hub_download.
Real files, real sockets, no mocks of httpx."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_server import HFServer, isolate_hub
from ollama_registry_server import RegistryServer

from launcher import fetch
from launcher.catalog.huggingface import resolve_url
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import FetchError
from launcher.paths import cache_dir

SIZE = 300_000
CUT = 100_000
TOKEN = "secret-token"


def blob(seed: str, size: int = SIZE) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return out[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    srv = RegistryServer()
    try:
        yield srv
    finally:
        srv.close()


def ollama_candidate(srv: RegistryServer, data: bytes, *, projector: bytes | None = None) -> Candidate:
    def layer(body: bytes) -> CandidateFile:
        digest = srv.add_blob(body)["digest"]
        url = f"{srv.url}/v2/library/tiny/blobs/{digest}"
        return CandidateFile(name=digest, size_bytes=len(body), url=url, sha256=digest.split(":", 1)[1])

    return Candidate(
        model="tiny:1b",
        source="ollama",
        quant="Q4_K_M",
        files=(layer(data),),
        projector=layer(projector) if projector is not None else None,
        ollama_model="tiny:1b-q4_K_M",
    )


def store_path(data: bytes) -> str:
    return f"/store/sha256:{sha(data)}"


def target_of(data: bytes) -> Path:
    return cache_dir() / "blobs" / f"sha256-{sha(data)}"


def partial_of(data: bytes) -> Path:
    return target_of(data).with_name(f"sha256-{sha(data)}.partial")


def cut_then_fail(srv: RegistryServer, data: bytes) -> None:
    """The first answer sends CUT bytes and hangs up; the next ones hang up at once (until the faults are cleared)."""
    srv.fault(store_path(data), ("cut", CUT), *["drop"] * 12)


# ---------------------------------------------------------------------------------------------------------------
# Fitquant's own downloader: Ollama registry blobs


def test_registry_blob_is_downloaded_through_the_redirect_and_verified(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    out = fetch.fetch_candidate(c, progress=True)  # stderr is not a terminal here: no bar
    path = Path(out.files[0].local_path or "")
    assert path == target_of(data) and path.read_bytes() == data
    assert out.files[0].sha256 == c.files[0].sha256 and out.model == c.model and out.quant == c.quant
    digest = c.files[0].name
    assert registry.requests[f"/v2/library/tiny/blobs/{digest}"] == 1  # answered 307
    assert registry.requests[f"/store/{digest}"] == 1  # followed to the blob store
    assert not partial_of(data).exists()
    assert path.with_name(path.name + ".verified").is_file()


def test_a_cut_off_download_keeps_its_partial_and_the_next_run_resumes_it(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    cut_then_fail(registry, data)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    message = str(err.value)
    assert "tiny:1b (Q4_K_M)" in message and "run again to resume" in message and "\n" not in message
    assert partial_of(data).stat().st_size == CUT and not target_of(data).exists()

    registry.faults.clear()
    registry.reset_counts()
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == data
    assert (store_path(data), f"bytes={CUT}-") in registry.ranges
    assert registry.served[f"sha256:{sha(data)}"] == SIZE - CUT  # only what was missing
    assert not partial_of(data).exists()


def test_retries_resume_within_one_run(registry: RegistryServer) -> None:
    data = blob("model")
    registry.fault(store_path(data), ("cut", CUT), "drop", ("cut", CUT))
    out = fetch.fetch_candidate(ollama_candidate(registry, data), progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == data
    ranges = [r for p, r in registry.ranges if p == store_path(data)]
    assert ranges == [None, f"bytes={CUT}-", f"bytes={CUT}-", f"bytes={2 * CUT}-"]


def test_resumed_bytes_that_do_not_match_the_hash_are_rejected_and_removed(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    cut_then_fail(registry, data)
    with pytest.raises(FetchError):
        fetch.fetch_candidate(c, progress=False)
    assert partial_of(data).stat().st_size == CUT

    registry.faults.clear()
    other = blob("another model")
    registry.blobs[f"sha256:{sha(data)}"] = other  # the same name, other bytes the second time
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    mixed = sha(data[:CUT] + other[CUT:])
    assert str(err.value) == (
        f"tiny:1b (Q4_K_M): {c.files[0].name}: sha256 mismatch: expected {sha(data)}, got {mixed}; "
        "the download was removed"
    )
    assert not partial_of(data).exists() and not target_of(data).exists()
    assert (store_path(data), f"bytes={CUT}-") in registry.ranges


def test_a_server_that_ignores_range_starts_over(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    cut_then_fail(registry, data)
    with pytest.raises(FetchError):
        fetch.fetch_candidate(c, progress=False)
    registry.faults.clear()
    registry.reset_counts()
    registry.ignore_range = True  # 200 with the whole blob
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == data
    assert (store_path(data), f"bytes={CUT}-") in registry.ranges
    assert registry.served[f"sha256:{sha(data)}"] == SIZE


def test_not_enough_disk_space_refuses_before_any_request(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    asked: list[Path] = []

    def free(path: Path) -> int:
        asked.append(path)
        return fetch.DISK_MARGIN_BYTES + SIZE - 1

    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False, free_bytes=free)
    assert f"not enough disk space in {cache_dir() / 'blobs'}: need " in str(err.value)
    assert str(err.value).endswith(" GiB free")
    assert registry.requests == {}  # not a single GET
    assert not partial_of(data).exists() and not target_of(data).exists()
    assert asked and all(p.exists() for p in asked)

    # exactly enough: the download goes ahead
    out = fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: fetch.DISK_MARGIN_BYTES + SIZE)
    assert Path(out.files[0].local_path or "").read_bytes() == data


def test_disk_space_counts_what_the_partial_already_holds(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    cut_then_fail(registry, data)
    with pytest.raises(FetchError):
        fetch.fetch_candidate(c, progress=False)
    registry.faults.clear()
    with pytest.raises(FetchError, match="not enough disk space"):
        fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: fetch.DISK_MARGIN_BYTES + SIZE - CUT - 1)
    out = fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: fetch.DISK_MARGIN_BYTES + SIZE - CUT)
    assert Path(out.files[0].local_path or "").read_bytes() == data


def test_disk_space_sums_every_file(registry: RegistryServer) -> None:
    data, proj = blob("model"), blob("projector", 50_000)
    c = ollama_candidate(registry, data, projector=proj)
    with pytest.raises(FetchError, match="not enough disk space"):
        fetch.fetch_candidate(c, vision=True, progress=False, free_bytes=lambda p: fetch.DISK_MARGIN_BYTES + SIZE)
    assert registry.requests == {}


def test_a_verified_blob_is_reused_without_any_request(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    first = fetch.fetch_candidate(c, progress=False)
    registry.reset_counts()
    second = fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: 0)  # nothing to download: no check
    assert second.files == first.files
    assert registry.requests == {}


def test_a_blob_changed_on_disk_is_hashed_again_and_replaced(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    path = Path(fetch.fetch_candidate(c, progress=False).files[0].local_path or "")
    path.write_bytes(blob("corrupt"))  # same size, other bytes, another mtime: the marker no longer holds
    registry.reset_counts()
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == data
    assert registry.served[f"sha256:{sha(data)}"] == SIZE


def test_a_blob_present_without_a_marker_is_verified_once(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    target = target_of(data)
    target.parent.mkdir(parents=True)
    target.write_bytes(data)  # e.g. copied in by hand
    out = fetch.fetch_candidate(c, progress=False)
    assert out.files[0].local_path == str(target) and registry.requests == {}
    assert target.with_name(target.name + ".verified").is_file()


def test_the_projector_only_with_vision(registry: RegistryServer) -> None:
    data, proj = blob("model"), blob("projector", 50_000)
    c = ollama_candidate(registry, data, projector=proj)
    without = fetch.fetch_candidate(c, progress=False)
    assert without.projector == c.projector and without.projector is not None
    assert without.projector.local_path is None and registry.served[f"sha256:{sha(proj)}"] == 0
    with_vision = fetch.fetch_candidate(c, vision=True, progress=False)
    assert with_vision.projector is not None
    assert Path(with_vision.projector.local_path or "").read_bytes() == proj


def test_an_error_status_is_one_line_with_the_url_and_no_partial(registry: RegistryServer) -> None:
    data = blob("model")
    c = ollama_candidate(registry, data)
    registry.fault(store_path(data), 404, forever=True)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    message = str(err.value)
    assert "HTTP 404" in message and f"{registry.url}/v2/library/tiny/blobs/" in message and "\n" not in message
    assert "resume" not in message and not partial_of(data).exists()


def test_a_download_in_progress_elsewhere_is_refused(registry: RegistryServer) -> None:
    fcntl = pytest.importorskip("fcntl")
    data = blob("model")
    c = ollama_candidate(registry, data)
    lock = target_of(data).with_name(target_of(data).name + ".lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FetchError, match="another fitquant process"):
            fetch.fetch_candidate(c, progress=False)
    assert Path(fetch.fetch_candidate(c, progress=False).files[0].local_path or "").read_bytes() == data


# ---------------------------------------------------------------------------------------------------------------
# Plain URLs (no published hash)


def url_candidate(srv: RegistryServer, data: bytes) -> Candidate:
    digest = srv.add_blob(data)["digest"]
    f = CandidateFile(name=digest, size_bytes=len(data), url=f"{srv.url}/store/{digest}")
    return Candidate(model=f.url or "", source="url", quant="Q8_0", files=(f,))


def test_a_plain_url_is_downloaded_under_downloads(registry: RegistryServer) -> None:
    data = blob("plain")
    c = url_candidate(registry, data)
    out = fetch.fetch_candidate(c, progress=False)
    path = Path(out.files[0].local_path or "")
    assert path == fetch.download_target(c.files[0].url or "", None) and path.read_bytes() == data
    assert path.parent.parent == cache_dir() / "downloads"
    registry.reset_counts()
    assert fetch.fetch_candidate(c, progress=False).files == out.files and registry.requests == {}


def test_a_complete_partial_of_a_plain_url_is_confirmed_by_416(registry: RegistryServer) -> None:
    data = blob("plain")
    c = url_candidate(registry, data)
    target = fetch.download_target(c.files[0].url or "", None)
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".partial").write_bytes(data)
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == data
    assert registry.ranges == [(store_path(data), f"bytes={SIZE}-")]  # answered 416: it was all there


def test_shards_of_a_split_url_set_share_one_folder_under_their_names() -> None:
    one = fetch.download_target("https://example.com/m/x-00001-of-00002.gguf", None)
    two = fetch.download_target("https://example.com/m/x-00002-of-00002.gguf", None)
    assert one.parent == two.parent and (one.name, two.name) == ("x-00001-of-00002.gguf", "x-00002-of-00002.gguf")
    hashed = fetch.download_target("https://example.com/m/x-00001-of-00002.gguf", "ab" * 32, split=True)
    assert hashed == one
    assert fetch.download_target("https://example.com/b/x", "ab" * 32) == cache_dir() / "blobs" / f"sha256-{'ab' * 32}"
    other = fetch.download_target("https://example.com/n/x-00001-of-00002.gguf?sig=1", None)
    assert other.parent != one.parent and "sig" not in str(other)


def test_no_token_in_messages_even_where_it_is_sent(registry: RegistryServer, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", registry.url)  # the token goes to this host: it is sent
    data = blob("plain")
    c = url_candidate(registry, data)
    registry.fault(store_path(data), 401, forever=True)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert registry.seen_headers[store_path(data)].get("Authorization") == f"Bearer {TOKEN}"
    assert "HTTP 401" in str(err.value) and TOKEN not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Local files and candidates that cannot be fetched


def test_local_files_are_returned_as_they_are(tmp_path: Path, registry: RegistryServer) -> None:
    shards = [tmp_path / f"m-Q4_K_M-0000{i}-of-00002.gguf" for i in (1, 2)]
    for s in shards:
        s.write_bytes(b"GGUF")
    files = tuple(CandidateFile(name=s.name, size_bytes=4, local_path=str(s)) for s in shards)
    c = Candidate(model=str(tmp_path), source="local", quant="Q4_K_M", files=files)
    assert fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: 0) == c


def test_a_missing_shard_of_a_local_split_set_is_named(tmp_path: Path) -> None:
    shards = [tmp_path / f"m-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for s in (shards[0], shards[2]):
        s.write_bytes(b"GGUF")
    files = tuple(CandidateFile(name=s.name, size_bytes=4, local_path=str(s)) for s in shards)
    c = Candidate(model=str(tmp_path), source="local", quant="Q4_K_M", files=files)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert "m-Q4_K_M-00002-of-00003.gguf (shard 2 of 3) is missing" in str(err.value)
    assert str(shards[1]) in str(err.value) and "every shard" in str(err.value)


def test_an_ollama_local_blob_that_is_gone(tmp_path: Path) -> None:
    f = CandidateFile(name="sha256:" + "0" * 64, size_bytes=4, local_path=str(tmp_path / "gone"), sha256="0" * 64)
    c = Candidate(model="ollama://tiny", source="ollama-local", quant="Q4_0", files=(f,))
    with pytest.raises(FetchError, match="does not exist"):
        fetch.fetch_candidate(c, progress=False)


def test_a_file_with_no_url_and_no_local_path(registry: RegistryServer) -> None:
    f = CandidateFile(name="mystery.gguf", size_bytes=10)
    c = Candidate(model="someone/something", source="huggingface", quant="Q4_K_M", files=(f,))
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert str(err.value) == (
        "someone/something (Q4_K_M): mystery.gguf has no URL to download it from and is not on this machine"
    )


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: the real huggingface_hub.hf_hub_download against the local Hub


REPO = "org/Tiny-GGUF"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HFServer]:
    isolate_hub(monkeypatch, tmp_path)
    with HFServer(cdn_host="localhost") as srv:  # LFS files redirect to another origin, as to the Hub's CDN
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        yield srv


def hf_file(srv: HFServer, path: str, data: bytes, *, sha256: str | None = None) -> CandidateFile:
    url = resolve_url(srv.endpoint, REPO, "main", path)
    return CandidateFile(name=path, size_bytes=len(data), url=url, sha256=sha256 or sha(data))


def split_repo(srv: HFServer, **repo: object) -> tuple[Candidate, dict[str, bytes]]:
    content = {
        "Q4_K_M/Tiny-Q4_K_M-00001-of-00002.gguf": blob("shard1"),
        "Q4_K_M/Tiny-Q4_K_M-00002-of-00002.gguf": blob("shard2", 200_000),
        "mmproj-F16.gguf": blob("mmproj", 40_000),
    }
    srv.add_repo(REPO, content, **repo)  # type: ignore[arg-type]
    shards = tuple(hf_file(srv, p, d) for p, d in content.items() if "mmproj" not in p)
    c = Candidate(
        model=REPO,
        source="huggingface",
        quant="Q4_K_M",
        files=shards,
        projector=hf_file(srv, "mmproj-F16.gguf", content["mmproj-F16.gguf"]),
    )
    return c, content


def test_hf_split_set_and_projector_through_hf_hub_download(hub: HFServer, tmp_path: Path) -> None:
    c, content = split_repo(hub)
    out = fetch.fetch_candidate(c, vision=True, progress=False)
    paths = [Path(f.local_path or "") for f in out.files]
    assert [p.read_bytes() for p in paths] == [content[f.name] for f in c.files]
    assert paths[0].parent == paths[1].parent  # one snapshot folder: llama.cpp finds shard 2 beside shard 1
    assert [p.name for p in paths] == ["Tiny-Q4_K_M-00001-of-00002.gguf", "Tiny-Q4_K_M-00002-of-00002.gguf"]
    hub_cache = tmp_path / "hf-home" / "hub" / "models--org--Tiny-GGUF"
    assert all(str(p).startswith(str(hub_cache / "snapshots")) for p in paths)  # the standard HF cache
    assert out.projector is not None and Path(out.projector.local_path or "").read_bytes() == content["mmproj-F16.gguf"]
    heads = [p for m, p in hub.methods if m == "HEAD"]
    assert len(heads) == 3 and all("/resolve/main/" in p for p in heads)
    assert all(not token for p, token in hub.requests if p.startswith("/blobs/"))

    hub.reset_counters()
    again = fetch.fetch_candidate(c, vision=True, progress=False)
    assert again.files == out.files and again.projector == out.projector
    assert hub.requests == []  # cached and verified: not even a HEAD


def test_hf_projector_is_left_alone_without_vision(hub: HFServer) -> None:
    c, _ = split_repo(hub)
    out = fetch.fetch_candidate(c, progress=False)
    assert out.projector == c.projector
    assert hub.served[(REPO, "mmproj-F16.gguf")] == 0


def test_hf_file_that_does_not_match_its_hash_is_removed(hub: HFServer, tmp_path: Path) -> None:
    data = blob("model")
    hub.add_repo(REPO, {"Tiny-Q8_0.gguf": data})
    listed = sha(b"what the listing said")
    f = hf_file(hub, "Tiny-Q8_0.gguf", data, sha256=listed)
    c = Candidate(model=REPO, source="huggingface", quant="Q8_0", files=(f,))
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert str(err.value) == (
        f"{REPO} (Q8_0): Tiny-Q8_0.gguf: sha256 mismatch: expected {listed}, got {sha(data)}; the download was removed"
    )
    left = [p for p in (tmp_path / "hf-home" / "hub").rglob("*") if p.is_file() or p.is_symlink()]
    assert not [p for p in left if p.name in ("Tiny-Q8_0.gguf", sha(data))]


def test_hf_gated_repository_error_has_no_token(hub: HFServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # not the server's token: access denied
    c, _ = split_repo(hub, gated="files")
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    message = str(err.value)
    assert "gated or private" in message and "HF_TOKEN" in message
    assert TOKEN not in message and "\n" not in message
    assert any(token for p, token in hub.requests if "/resolve/" in p)  # it was sent, to the Hub only


def test_hf_gated_repository_downloads_with_the_right_token(hub: HFServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.token)
    c, content = split_repo(hub, gated="files")
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[1].local_path or "").read_bytes() == content[c.files[1].name]
    assert all(not token for p, token in hub.requests if p.startswith("/blobs/"))  # never to the "CDN"


def test_hf_missing_file_is_one_line(hub: HFServer) -> None:
    hub.add_repo(REPO, {"other.gguf": b"x"})
    f = hf_file(hub, "Tiny-Q8_0.gguf", b"data")
    c = Candidate(model=REPO, source="huggingface", quant="Q8_0", files=(f,))
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert "no longer in" in str(err.value) and "\n" not in str(err.value)


def test_hf_not_enough_disk_space_asks_nothing(hub: HFServer) -> None:
    c, _ = split_repo(hub)
    with pytest.raises(FetchError, match=r"not enough disk space in .*models--org--Tiny-GGUF.*: need "):
        fetch.fetch_candidate(c, vision=True, progress=False, free_bytes=lambda p: fetch.DISK_MARGIN_BYTES)
    assert [p for p, _ in hub.requests if "/resolve/" in p or p.startswith("/blobs/")] == []


def test_hf_cache_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert fetch._hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert fetch._hf_cache_dir() == tmp_path / "cache"
    assert os.environ["HF_HOME"]  # untouched


def test_hf_cached_blob_changed_on_disk_is_downloaded_again(hub: HFServer) -> None:
    c, content = split_repo(hub)
    out = fetch.fetch_candidate(c, progress=False)
    first = Path(out.files[0].local_path or "")
    first.resolve().write_bytes(blob("corrupt"))  # the blob behind the snapshot link, same size
    hub.reset_counters()
    again = fetch.fetch_candidate(c, progress=False)
    assert Path(again.files[0].local_path or "").read_bytes() == content[c.files[0].name]
    assert hub.served[(REPO, c.files[0].name)] == len(content[c.files[0].name])
    assert hub.served[(REPO, c.files[1].name)] == 0  # shard 2 was fine: only its HEAD
