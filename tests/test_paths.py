"""launcher.paths' safe names and private files, and the state files written with them (the machine record,
instances): names from the network stay inside fitquant's folders, files are 0600 in 0700 folders, a planted
symlink is never written through, and no credential of a model URL is stored or shown. Real files only."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT

from launcher import instances, record
from launcher.catalog.types import Candidate, CandidateFile
from launcher.fit import fit
from launcher.gguf import parse_header
from launcher.hardware import describe_machine
from launcher.paths import (
    MAX_NAME_BYTES,
    append_private,
    inside,
    private_dir,
    safe_basename,
    safe_relpath,
    state_dir,
    write_private,
)
from launcher.plan import Policy
from tests.gguf_factory import llama_gguf

SECRET_URL = "http://user:pw-secret@127.0.0.1:9/models/x-Q4_K_M.gguf?token=abc-secret&sig=s3"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("..%2F..%2F..%2F.bash_login", "bash_login"),
        ("../../x.gguf", "x.gguf"),
        ("..\\..\\x.gguf", "x.gguf"),
        ("%2e%2e", "download"),
        ("..", "download"),
        ("", "download"),
        ("a\x00b\nc.gguf", "a_b_c.gguf"),
        ("Qwen3-14B-Q4_K_M-00001-of-00003.gguf", "Qwen3-14B-Q4_K_M-00001-of-00003.gguf"),
        ("sha256:" + "ab" * 32, "sha256:" + "ab" * 32),
    ],
)
def test_paths_safe_basename_is_one_name_without_dots_or_separators(name: str, safe: str) -> None:
    assert safe_basename(name) == safe


def test_paths_safe_basename_shortens_long_names_and_keeps_shards_siblings() -> None:
    stem = "m" * 300
    one, two = (safe_basename(f"{stem}-0000{i}-of-00002.gguf") for i in (1, 2))
    assert len(one.encode()) <= MAX_NAME_BYTES and one.endswith("-00001-of-00002.gguf")
    assert one.removesuffix("-00001-of-00002.gguf") == two.removesuffix("-00002-of-00002.gguf")
    assert safe_basename("n" * 300 + ".gguf") != safe_basename("o" * 300 + ".gguf")


def test_paths_safe_relpath_refuses_what_leaves_the_folder() -> None:
    assert safe_relpath("sub/x.gguf") and safe_relpath("refs/pr/1")
    for bad in ("../x.gguf", "a/../../x", "/etc/passwd", "a//b", "a\\b", "./x", "a/\x00", ""):
        assert not safe_relpath(bad), bad


def test_paths_inside_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    assert inside(folder, "x.gguf") == folder / "x.gguf"
    with pytest.raises(ValueError, match="outside"):
        inside(folder, "../x.gguf")
    (folder / "link").symlink_to(folder / "elsewhere")  # inside, but a link all the same
    with pytest.raises(ValueError, match="symbolic link"):
        inside(folder, "link")
    (folder / "out").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        inside(folder, "out/x")


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)  # what most systems use: the 0700/0600 must come from fitquant, not the umask
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.usefixtures("umask_022")
def test_paths_private_files_are_0600_in_0700_folders_and_never_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "state" / "a" / "b" / "doc.json"
    write_private(target, "{}")
    assert mode(target) == 0o600 and mode(target.parent) == 0o700 and mode(target.parent.parent) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("mine")
    planted = target.with_name("planted.json")
    planted.symlink_to(victim)
    write_private(planted, "new")  # the link is replaced, its target untouched
    assert victim.read_text() == "mine" and not planted.is_symlink() and planted.read_text() == "new"
    log = target.with_name("log.jsonl")
    log.symlink_to(victim)
    with pytest.raises(OSError):
        append_private(log, "line\n")
    assert victim.read_text() == "mine"
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    private_dir(old)
    assert mode(old) == 0o700
    state_dir().mkdir(parents=True, mode=0o755)  # as an older fitquant left it
    private_dir(state_dir() / "machines")
    assert mode(state_dir()) == 0o700 and mode(state_dir() / "machines") == 0o700


@pytest.mark.usefixtures("umask_022")
def test_record_has_no_credentials_and_is_private() -> None:
    key = record.model_key(SECRET_URL)
    assert key == "http://127.0.0.1:9/models/x-Q4_K_M.gguf"
    machine = describe_machine(vram=[24 * 2**30])
    path = record.append(machine, {"model": key, "quant": "Q4_K_M"})
    text = path.read_text() + path.with_suffix(".json").read_text()
    assert "pw-secret" not in text and "abc-secret" not in text and "user" not in text
    for p in (path, path.with_suffix(".json")):
        assert mode(p) == 0o600
    assert mode(path.parent) == 0o700 and mode(state_dir()) == 0o700


@pytest.mark.usefixtures("umask_022")
def test_instances_are_private() -> None:
    fields = {f: None for f in instances.RunningInstance.__dataclass_fields__}
    fields.update(name="x-q4", model="x", quant="Q4_K_M", n_ctx=4096, backend="llama.cpp", server="llama-server",
                  owner_pid=os.getpid(), endpoint="http://127.0.0.1:1", verdict="gpu", started=0.0)  # fmt: skip
    fields = {k: v for k, v in fields.items() if v is not None or k in ("pid", "log_path")}
    path = instances.save(instances.RunningInstance(**fields))
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert json.loads(path.read_text())["name"] == "x-q4"


def test_plan_json_shows_no_credentials_of_the_model_url() -> None:
    head, size = llama_gguf(QT.Q4_K, n_layer=4)
    shown = record.model_key(SECRET_URL)  # the catalog keeps URLs as redact_url shows them
    c = Candidate(shown, "url", "Q4_K_M", (CandidateFile("x-Q4_K_M.gguf", size, url=shown),), header=parse_header(head))
    machine = describe_machine(vram=[24 * 2**30])
    plan = fit(SECRET_URL, Policy(n_ctx=2048), machine=machine, candidates=[c], confirm=False)
    text = json.dumps(plan.to_json())
    assert "pw-secret" not in text and "abc-secret" not in text and "127.0.0.1:9/models" in text


def test_hf_listing_entries_that_would_leave_the_repository_are_dropped() -> None:
    from launcher.catalog.huggingface import _entries

    page = [
        {"type": "file", "path": name, "size": 10, "oid": "0" * 40}
        for name in ("../../x.gguf", "/abs.gguf", "a/../../b.gguf", "ok/x-Q4_K_M.gguf")
    ]
    assert [e.path for e in _entries(page)] == ["ok/x-Q4_K_M.gguf"]
