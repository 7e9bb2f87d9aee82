"""launcher.fetch against real HTTP servers on 127.0.0.1: the Ollama registry shape (redirects to a blob store,
Range, cut-off streams) for fitquant's own downloader, the Hugging Face shape for huggingface_hub.hf_hub_download.
Real files, real sockets, no mocks of httpx."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_server import HFServer, isolate_hub
from ollama_registry_server import RegistryServer

from launcher import fetch
from launcher.catalog.huggingface import resolve_url
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import FetchError
from launcher.fetch.huggingface import hf_cache_dir
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


HOLD_LOCK = """
import fcntl, sys, time
fd = open(sys.argv[1], "w")
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_download_another_process_holds_but_does_not_advance_is_given_up(registry: RegistryServer) -> None:
    pytest.importorskip("fcntl")
    data = blob("model")
    c = ollama_candidate(registry, data)
    lock = target_of(data).with_name(target_of(data).name + ".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FetchError, match=r"another fitquant process .*wrote nothing for 1 s"):
            fetch.fetch_candidate(c, progress=False, wait_stalled_s=1.0)
    finally:
        holder.kill()
        holder.wait()
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
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_cache_dir() == tmp_path / "cache"
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


# ---------------------------------------------------------------------------------------------------------------
# Names from the network stay inside the cache; a planted symlink is never written through


class FileServer:
    """Plain files on 127.0.0.1 (HTTP/1.0: a body without Content-Length ends when the connection closes).
    `mode`: "ok" (Content-Length, Range honoured), "cut" (200, no Content-Length, CUT bytes, hang up; Range
    ignored), "no-length" (the whole body, no Content-Length), "slow" (Content-Length, in pieces, slowly)."""

    def __init__(self, data: bytes) -> None:
        from local_server import start_server

        self.data, self.mode, self.gets = data, "ok", 0
        self.httpd = start_server(self._get)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _get(self, h) -> None:  # type: ignore[no-untyped-def]
        self.gets += 1
        data, start = self.data, 0
        if self.mode == "ok" and h.headers.get("Range", "").startswith("bytes="):
            start = int(h.headers["Range"][6:].split("-", 1)[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        if self.mode in ("ok", "slow"):
            h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        body = data[start:CUT] if self.mode == "cut" else data[start:]
        if self.mode == "slow":
            for i in range(0, len(body), 20_000):
                h.wfile.write(body[i : i + 20_000])
                h.wfile.flush()
                time.sleep(0.2)
            return
        h.wfile.write(body)

    def close(self) -> None:
        from local_server import stop_server

        stop_server(self.httpd)


@pytest.fixture
def files() -> Iterator[FileServer]:
    srv = FileServer(blob("plain"))
    try:
        yield srv
    finally:
        srv.close()


def plain(url: str, size: int) -> Candidate:
    f = CandidateFile(name=url.rsplit("/", 1)[1], size_bytes=size, url=url)
    return Candidate(model=url, source="url", quant="Q8_0", files=(f,))


def outside_cache(root: Path, name: str) -> list[Path]:
    return [p for p in root.rglob(f"*{name}*") if cache_dir() not in p.parents]


def test_a_url_whose_name_decodes_to_a_path_is_written_inside_the_cache(
    files: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = f"{files.url}/d/..%2F..%2F..%2F..%2F.planted"
    out = fetch.fetch_candidate(plain(url, SIZE), progress=False)
    path = Path(out.files[0].local_path or "")
    assert path.name == "planted" and path.parent.parent == cache_dir() / "downloads"
    assert path.read_bytes() == files.data and outside_cache(tmp_path, "planted") == []


def test_download_targets_are_safe_names_inside_the_cache() -> None:
    for url in ("https://h/d/..%2F..%2Fx.gguf", "https://h/d/%2e%2e", "https://h/d/..\\..\\x", "https://h/d/%00"):
        for split in (False, True):
            target = fetch.download_target(url, None, split=split)
            assert target.parent.parent == cache_dir() / "downloads" and not target.name.startswith("."), url
    with pytest.raises(FetchError, match="not a sha256"):
        fetch.download_target("https://h/b/x", "../../x")


def test_a_symlink_planted_in_the_cache_is_not_written_through(files: FileServer, tmp_path: Path) -> None:
    url = f"{files.url}/m/x.gguf"
    target = fetch.download_target(url, None)
    target.parent.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    target.with_name(target.name + ".partial").symlink_to(victim)
    with pytest.raises(FetchError, match="cannot write"):
        fetch.fetch_candidate(plain(url, SIZE), progress=False)
    assert victim.read_bytes() == b"mine"
    target.with_name(target.name + ".partial").unlink()
    target.symlink_to(victim)  # a "finished" file that is someone else's
    with pytest.raises(FetchError, match=r"x\.gguf: refused as a download target: 'x\.gguf' would lie outside"):
        fetch.fetch_candidate(plain(url, SIZE), progress=False)
    assert victim.read_bytes() == b"mine"


def test_hf_names_that_leave_the_repository_folder_are_refused(hub: HFServer, tmp_path: Path) -> None:
    data = blob("evil", 1000)
    for path, revision in (("../../x.gguf", "main"), ("x.gguf", "../../../../evil")):
        url = resolve_url(hub.endpoint, REPO, revision, path)
        f = CandidateFile(name=path, size_bytes=len(data), url=url, sha256=sha(data))
        with pytest.raises(FetchError, match="would leave the repository's folder; refused"):
            fetch.fetch_candidate(Candidate(REPO, "huggingface", "Q4_K_M", (f,)), progress=False)
    assert hub.requests == [] and outside_cache(tmp_path, "evil") == []


def test_the_state_and_cache_files_are_private(registry: RegistryServer) -> None:
    data = blob("model")
    fetch.fetch_candidate(ollama_candidate(registry, data), progress=False)
    marker = target_of(data).with_name(target_of(data).name + ".verified")
    assert oct(marker.stat().st_mode & 0o777) == "0o600" and oct(marker.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(target_of(data).stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------------------------------------------------------
# A short download is never used


def test_a_body_cut_short_without_content_length_is_kept_for_resume_not_used(files: FileServer) -> None:
    files.mode = "cut"
    c = plain(f"{files.url}/m/x.gguf", SIZE)
    target = fetch.download_target(c.files[0].url or "", None)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    message = str(err.value)
    assert f"ended after {CUT} of {SIZE} bytes" in message and "run again to resume" in message
    assert not target.exists() and not target.with_name(target.name + ".verified").exists()
    assert target.with_name(target.name + ".partial").stat().st_size == CUT
    files.mode = "ok"
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == files.data


def test_a_short_file_an_older_fitquant_accepted_is_resumed(files: FileServer) -> None:
    c = plain(f"{files.url}/m/x.gguf", SIZE)
    target = fetch.download_target(c.files[0].url or "", None)
    target.parent.mkdir(parents=True)
    target.write_bytes(files.data[:CUT])
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == files.data


def test_a_download_of_unknown_size_without_a_hash_is_not_used(files: FileServer) -> None:
    files.mode = "no-length"
    c = plain(f"{files.url}/m/x.gguf", 0)
    target = fetch.download_target(c.files[0].url or "", None)
    with pytest.raises(FetchError, match="cannot be told from a complete one; not used"):
        fetch.fetch_candidate(c, progress=False)
    assert not target.exists()
    files.mode = "ok"  # the server now says the size: the partial it holds is confirmed (416)
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == files.data


# ---------------------------------------------------------------------------------------------------------------
# A second fitquant waits for the first one's download

FETCH_ONE = """
import sys
from launcher import fetch
from launcher.catalog.types import Candidate, CandidateFile
url, size = sys.argv[1], int(sys.argv[2])
f = CandidateFile(name=url.rsplit("/", 1)[1], size_bytes=size, url=url)
c = Candidate(model=url, source="url", quant="Q8_0", files=(f,))
print(fetch.fetch_candidate(c, progress=False).files[0].local_path, flush=True)
"""


def test_a_second_fetch_waits_for_the_download_another_process_is_making(files: FileServer) -> None:
    files.mode = "slow"  # about 3 s for the whole file
    c = plain(f"{files.url}/m/x.gguf", SIZE)
    partial = fetch.download_target(c.files[0].url or "", None).with_name("x.gguf.partial")
    root = Path(__file__).resolve().parent.parent
    first = subprocess.Popen(
        [sys.executable, "-c", FETCH_ONE, c.files[0].url or "", str(SIZE)], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not partial.exists():  # the first process holds the lock and is writing
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        out = fetch.fetch_candidate(c, progress=False, wait_stalled_s=30)
        path = Path(out.files[0].local_path or "")
        assert path.read_bytes() == files.data
        stdout, _ = first.communicate(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0 and stdout.strip() == str(path) and files.gets == 1


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face errors keep their cause


class _NotAHub:
    """Answers 200 to every HEAD and GET, with none of the headers a Hugging Face Hub sends."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", "5")
                self.end_headers()

            def do_GET(self) -> None:
                self.do_HEAD()
                self.wfile.write(b"hello")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def hf_candidate(endpoint: str) -> Candidate:
    data = blob("x", 1000)
    f = CandidateFile(
        name="x.gguf", size_bytes=1000, url=resolve_url(endpoint, REPO, "main", "x.gguf"), sha256=sha(data)
    )
    return Candidate(REPO, "huggingface", "Q4_K_M", (f,))


def test_hf_an_endpoint_that_is_not_a_hub_is_named_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    srv = _NotAHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(FetchError) as err:
            fetch.fetch_candidate(hf_candidate(srv.url), progress=False)
    finally:
        srv.close()
    message = str(err.value)
    assert f"{srv.url} answered but is not a Hugging Face Hub (check HF_ENDPOINT)" in message, message
    assert "X-Repo-Commit" in message and "offline" not in message and "\n" not in message


def test_hf_an_endpoint_that_refuses_connections_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hf_server import refused_endpoint

    isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    endpoint = refused_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(FetchError, match=r"cannot be reached \(\w+.*\) and the file is not in the Hugging Face cache"):
        fetch.fetch_candidate(hf_candidate(endpoint), progress=False)
