"""Raw byte splits, `x.gguf.part1of2`, as mradermacher publishes its largest quants: one GGUF cut into pieces (not
gguf-split's `-00001-of-00002.gguf`, whose shards are GGUFs each). Read as one file, locally and over HTTP, also
when the header runs on into part 2; listed as one quant with the summed size; planned; fetched through
huggingface_hub (or fitquant's own downloader) and joined into one file, each part checked against its sha256; a
missing part or a part with the wrong bytes refused in one line that names it.

The model is a small llama GGUF written here (tests/gguf_factory.py llama_gguf: a real header, zero weights), served
by the Hub-shaped test server (tests/hf_server.py) on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_factory import QT, llama_gguf
from hf_server import HFServer, ServedFile, isolate_hub

from launcher import catalog, fetch
from launcher.catalog import huggingface as hf
from launcher.catalog import local
from launcher.catalog import url as url_source
from launcher.catalog.huggingface import resolve_url
from launcher.cli import main
from launcher.errors import CatalogError, FetchError, GGUFFormatError
from launcher.gguf import PartName, parse_header, parse_part, part_locations, read_header, read_prefix
from launcher.paths import cache_dir

REPO = "someone/Tiny-Llama-GGUF"
JOINED = "Tiny-Llama.Q8_0.gguf"
PART1, PART2 = f"{JOINED}.part1of2", f"{JOINED}.part2of2"


def model_bytes(ggml_type: int = QT.Q8_0) -> bytes:
    """A whole llama GGUF (about 1.4 MiB for Q8_0): its header and zero tensor data."""
    head, size = llama_gguf(ggml_type, n_layer=2, n_embd=256, n_ff=512, n_vocab=2048, n_head=4, n_head_kv=2)
    return head + bytes(size - len(head))


MODEL = model_bytes()
EXPECTED = parse_header(MODEL)
CUT = len(MODEL) // 2  # the usual case: the header is in part 1
TINY_CUT = EXPECTED.data_offset // 2  # part 1 ends inside the header: it runs on into part 2


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def write_parts(folder: Path, cut: int = CUT, data: bytes = MODEL) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / PART1, folder / PART2]
    paths[0].write_bytes(data[:cut])
    paths[1].write_bytes(data[cut:])
    return paths


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HFServer]:
    isolate_hub(monkeypatch, tmp_path)
    with HFServer(cdn_host="localhost") as srv:  # LFS files redirect to another origin, as to the Hub's CDN
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        yield srv


def add_repo(srv: HFServer, cut: int = CUT, **extra: bytes) -> dict[str, bytes]:
    content = {PART1: MODEL[:cut], PART2: MODEL[cut:], **extra}
    srv.add_repo(REPO, content)
    return content


def joined_files() -> list[Path]:
    return [p for p in (cache_dir() / "joined").rglob("*") if p.is_file()] if (cache_dir() / "joined").exists() else []


# ---------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("x.Q8_0.gguf.part1of2", PartName("x.Q8_0.gguf", 1, 2)),
        ("Q8_0/x.Q8_0.gguf.part3of3", PartName("x.Q8_0.gguf", 3, 3)),
        ("X.GGUF.part12of120", PartName("X.GGUF", 12, 120)),
        ("x.gguf.part3of2", None),  # past the count
        ("x.gguf.part1of1", None),  # one part is no split
        ("x.gguf.part01of02", None),  # not how they are published
        ("x.gguf.part1of1000", None),  # more than 999 parts
        ("x.bin.part1of2", None),
        ("x-00001-of-00002.gguf", None),  # gguf-split: a GGUF each
        ("x.gguf", None),
    ],
)
def test_part_names(name: str, parsed: PartName | None) -> None:
    assert parse_part(name) == parsed


def test_part_locations_of_a_path_and_a_url() -> None:
    assert part_locations("/m/x.gguf.part2of3") == ["/m/x.gguf.part1of3", "/m/x.gguf.part2of3", "/m/x.gguf.part3of3"]
    assert part_locations("https://h/r/resolve/main/x.gguf.part1of2?download=1") == [
        "https://h/r/resolve/main/x.gguf.part1of2?download=1",
        "https://h/r/resolve/main/x.gguf.part2of2?download=1",
    ]
    assert part_locations("/m/x-00001-of-00002.gguf") == ["/m/x-00001-of-00002.gguf"]


# ---------------------------------------------------------------------------------------------------------------
# The header: one file made of the parts


@pytest.mark.parametrize("cut", [CUT, TINY_CUT], ids=["header-in-part-1", "header-across-parts"])
def test_local_parts_read_as_one_file(tmp_path: Path, cut: int) -> None:
    whole = tmp_path / JOINED
    whole.write_bytes(MODEL)
    expected = read_header(whole)
    p1, p2 = write_parts(tmp_path / "parts", cut)
    for given in (p1, p2):  # any part names the split
        header = read_header(given)
        assert (header.metadata, header.tensors, header.data_offset) == (
            expected.metadata,
            expected.tensors,
            expected.data_offset,
        )
        assert (header.source, header.shards, header.file_size) == (str(p1), (str(p1),), len(MODEL))
        assert header.part_sizes == (cut, len(MODEL) - cut) and header.shard_sizes == (len(MODEL),)
    assert read_prefix(p1, expected.data_offset) == MODEL[: expected.data_offset]


def test_local_missing_part_is_named(tmp_path: Path) -> None:
    p1, p2 = write_parts(tmp_path)
    p2.unlink()
    with pytest.raises(GGUFFormatError) as err:
        read_header(p1)
    assert str(err.value) == f"{p2}: part 2 of 2: open: No such file or directory (missing part)"


def test_a_short_part_is_a_truncated_file(tmp_path: Path) -> None:
    p1, p2 = write_parts(tmp_path)
    p2.write_bytes(MODEL[CUT:-4096])
    with pytest.raises(GGUFFormatError) as err:
        read_header(p1)
    assert "past the end of the file" in str(err.value) and "the file is truncated" in str(err.value)


@pytest.mark.parametrize("cut", [CUT, TINY_CUT], ids=["header-in-part-1", "header-across-parts"])
def test_parts_read_over_http_with_ranges(hub: HFServer, cut: int) -> None:
    add_repo(hub, cut)
    url1 = resolve_url(hub.endpoint, REPO, "main", PART1)
    header = read_header(url1)
    assert (header.tensors, header.file_size, header.part_sizes) == (
        EXPECTED.tensors,
        len(MODEL),
        (cut, len(MODEL) - cut),
    )
    assert header.source == url1 and header.shards == (url1,)
    # only header bytes: part 2 is asked for its size (one byte) unless the header runs on into it
    assert hub.served[(REPO, PART1)] < 2 * 1024**2 / 2 and hub.served[(REPO, PART2)] <= max(1, 128 * 1024)
    if cut == CUT:
        assert hub.served[(REPO, PART2)] == 1


def test_a_missing_part_over_http_is_named(hub: HFServer) -> None:
    hub.add_repo(REPO, {PART1: MODEL[:CUT]})
    url2 = resolve_url(hub.endpoint, REPO, "main", PART2)
    with pytest.raises(GGUFFormatError) as err:
        read_header(resolve_url(hub.endpoint, REPO, "main", PART1))
    message = str(err.value)
    assert message.startswith(f"{url2}: part 2 of 2: read bytes 0-0: ") and "404" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------------
# The catalog: one quant with the summed size


def test_hub_lists_a_raw_split_as_one_quant(hub: HFServer) -> None:
    q4 = model_bytes(QT.Q4_K)
    content = add_repo(hub, **{"Tiny-Llama.Q4_K_M.gguf": q4})
    found = hf.list_candidates(REPO)
    assert [(c.quant, c.size_bytes, c.raw_split) for c in found] == [
        ("Q8_0", len(MODEL), True),
        ("Q4_K_M", len(q4), False),
    ]
    c = found[0]
    assert [(f.name, f.size_bytes, f.sha256) for f in c.files] == [
        (PART1, CUT, sha(content[PART1])),
        (PART2, len(MODEL) - CUT, sha(content[PART2])),
    ]
    assert c.header is not None and c.header.file_size == len(MODEL)
    assert c.header.tensors == EXPECTED.tensors
    assert c.ollama_model is None  # Ollama cannot pull the parts
    assert "raw byte split in 2 parts: joined into one GGUF file when fetched" in c.notes
    again = hf.list_candidates(REPO, refresh=True)  # the header from the cache, placed at part 1
    assert again[0].header is not None and again[0].header.shards == (c.files[0].url,)
    assert again[0].header.part_sizes == c.header.part_sizes
    assert [x.quant for x in hf.list_candidates(REPO, quant=JOINED)] == ["Q8_0"]  # by the joined file's name


def test_hub_leaves_out_a_split_that_lacks_a_part(hub: HFServer) -> None:
    hub.add_repo(REPO, {PART1: MODEL[:CUT]})
    with pytest.raises(CatalogError) as err:
        hf.list_candidates(REPO)
    assert str(err.value) == f"{REPO}: {JOINED}: raw split of 2 parts lacks {PART2}; left out"


def test_hub_file_url_of_a_part_is_that_quant(hub: HFServer) -> None:
    add_repo(hub, **{"Tiny-Llama.Q4_K_M.gguf": model_bytes(QT.Q4_K)})
    (c,) = catalog.list_candidates(f"{hub.endpoint}/{REPO}/resolve/main/{PART2}")
    assert (c.quant, c.raw_split, len(c.files)) == ("Q8_0", True, 2)


def test_plan_on_the_repository_takes_the_split_as_one_quant(hub: HFServer) -> None:
    add_repo(hub, **{"Tiny-Llama.Q4_K_M.gguf": model_bytes(QT.Q4_K)})
    code, out, err = run("plan", REPO, "--ctx", "4k", "--vram", "8GiB", "--no-engine", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [o["quant"] for o in plan["candidates"]] == ["Q8_0", "Q4_K_M"]
    chosen = plan["chosen"]
    assert (chosen["quant"], plan["mode"]) == ("Q8_0", "gpu")
    assert [(f["name"], f["size_bytes"]) for f in chosen["files"]] == [(PART1, CUT), (PART2, len(MODEL) - CUT)]


def test_the_engines_header_only_copy_of_a_split_is_one_file(hub: HFServer) -> None:
    from launcher.measure.confirm import sparse_copy

    add_repo(hub, TINY_CUT)
    (c,) = hf.list_candidates(REPO)
    copy = sparse_copy(c)  # what llama.cpp's dry run loads before anything is downloaded
    assert copy.stat().st_size == len(MODEL)
    with open(copy, "rb") as f:
        assert f.read(EXPECTED.data_offset) == MODEL[: EXPECTED.data_offset]


def test_local_folder_and_part_list_a_raw_split(tmp_path: Path) -> None:
    p1, _ = write_parts(tmp_path)
    for given in (tmp_path, p1):
        (c,) = local.list_candidates(given)
        assert (c.quant, c.raw_split, c.size_bytes, [f.local_path for f in c.files]) == (
            "Q8_0",
            True,
            len(MODEL),
            [str(tmp_path / PART1), str(tmp_path / PART2)],
        )
    (tmp_path / PART2).unlink()
    with pytest.raises(CatalogError) as err:
        local.list_candidates(p1)
    assert str(err.value) == f"{p1}: raw split of 2 parts lacks {PART2}"


# ---------------------------------------------------------------------------------------------------------------
# Fetch: every part, each checked, joined into one file


def test_fetch_downloads_every_part_checks_each_and_joins_them(hub: HFServer, tmp_path: Path) -> None:
    add_repo(hub)
    (c,) = hf.list_candidates(REPO)
    hub.reset_counters()
    out = fetch.fetch_candidate(c, progress=False)
    (joined,) = out.files
    path = Path(joined.local_path or "")
    assert path.read_bytes() == MODEL and not out.raw_split
    assert (joined.name, joined.size_bytes, joined.sha256) == (JOINED, len(MODEL), None)
    assert path.name == JOINED and path.parent.parent == cache_dir() / "joined"
    assert not path.with_name(JOINED + ".joining").exists()
    assert hub.served[(REPO, PART1)] == CUT and hub.served[(REPO, PART2)] == len(MODEL) - CUT
    heads = [p for m, p in hub.methods if m == "HEAD"]
    assert len(heads) == 2 and all("/resolve/main/" in p for p in heads)  # both through huggingface_hub
    parts = list((tmp_path / "hf-home" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots").rglob("*.part*"))
    assert sorted(p.name for p in parts) == [PART1, PART2]  # the parts stay in the Hugging Face cache

    hub.reset_counters()
    again = fetch.fetch_candidate(c, progress=False)
    assert again.files == out.files and hub.requests == []  # joined already, from these very parts
    assert fetch.fetch_candidate(out, progress=False).files == out.files  # the joined candidate is local


def test_fetch_refuses_a_part_whose_bytes_do_not_match_its_hash(hub: HFServer) -> None:
    content = add_repo(hub)
    (c,) = hf.list_candidates(REPO)
    other = b"\x01" * len(content[PART2])  # same size, other bytes: not what the listing said
    hub.repos[REPO].files[PART2] = ServedFile(other)
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    assert str(err.value) == (
        f"{REPO} (Q8_0): {PART2} (part 2 of 2): sha256 mismatch: expected {sha(content[PART2])}, got {sha(other)}; "
        "the download was removed"
    )
    assert joined_files() == []  # never joined


def test_fetch_refuses_a_split_that_lacks_a_part(hub: HFServer) -> None:
    add_repo(hub)
    (c,) = hf.list_candidates(REPO)
    hub.reset_counters()
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(replace(c, files=c.files[:1]), progress=False)
    assert str(err.value) == f"{REPO} (Q8_0): {PART2} is missing: a raw split is joined from every part"
    assert hub.paths("/blobs/") == []

    del hub.repos[REPO].files[PART2]  # gone from the repository since it was listed
    with pytest.raises(FetchError) as err:
        fetch.fetch_candidate(c, progress=False)
    message = str(err.value)
    assert message.startswith(f"{REPO} (Q8_0): cannot download {PART2} (part 2 of 2): the file is no longer in ")
    assert "\n" not in message and joined_files() == []


def test_fetch_counts_the_joined_file_in_the_disk_space(hub: HFServer) -> None:
    add_repo(hub)
    (c,) = hf.list_candidates(REPO)
    enough_for_the_parts = len(MODEL) + fetch.DISK_MARGIN_BYTES
    hub.reset_counters()
    with pytest.raises(FetchError, match=r"not enough disk space in .*: need "):
        fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: enough_for_the_parts)
    assert hub.paths("/blobs/") == []
    out = fetch.fetch_candidate(c, progress=False, free_bytes=lambda p: enough_for_the_parts + len(MODEL))
    assert Path(out.files[0].local_path or "").read_bytes() == MODEL


def test_fetch_joins_local_parts_once(tmp_path: Path) -> None:
    write_parts(tmp_path / "models")
    (c,) = local.list_candidates(tmp_path / "models")
    out = fetch.fetch_candidate(c, progress=False)
    path = Path(out.files[0].local_path or "")
    assert path.read_bytes() == MODEL
    mtime = path.stat().st_mtime_ns
    assert fetch.fetch_candidate(c, progress=False).files == out.files and path.stat().st_mtime_ns == mtime
    (tmp_path / "models" / PART2).write_bytes(bytes(len(MODEL) - CUT - 1) + b"x")  # a part changed: join again
    os.utime(tmp_path / "models" / PART2, ns=(mtime + 10**9, mtime + 10**9))
    changed = fetch.fetch_candidate(local.list_candidates(tmp_path / "models")[0], progress=False)
    assert Path(changed.files[0].local_path or "").read_bytes()[-1:] == b"x"


def test_a_plain_url_of_a_part_is_listed_and_fetched(hub: HFServer, monkeypatch: pytest.MonkeyPatch) -> None:
    add_repo(hub)
    monkeypatch.delenv("HF_ENDPOINT")  # a URL on some other server: fitquant's own downloader
    url1 = resolve_url(hub.endpoint, REPO, "main", PART1)
    (c,) = url_source.list_candidates(url1)
    assert (c.source, c.quant, c.raw_split, c.size_bytes) == ("url", "Q8_0", True, len(MODEL))
    assert [(f.name, f.size_bytes, f.url) for f in c.files] == [
        (PART1, CUT, url1),
        (PART2, len(MODEL) - CUT, resolve_url(hub.endpoint, REPO, "main", PART2)),
    ]
    out = fetch.fetch_candidate(c, progress=False)
    assert Path(out.files[0].local_path or "").read_bytes() == MODEL
