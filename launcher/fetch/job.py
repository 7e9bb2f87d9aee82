"""One file of a candidate and how it gets here: the job every part of launcher.fetch works on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import FetchError

CHUNK_BYTES = 1 << 20  # files are read (and hashed) in 1 MiB pieces

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Job:
    """One file of the candidate and how it gets here."""

    file: CandidateFile
    what: str  # how messages name it: "x-00002-of-00003.gguf (shard 2 of 3)"
    kind: str  # "local" | "hf" | "http" | "join" (a raw split's parts joined into one file)
    shard: bool = False  # one of the candidate's files (not the projector)
    auth: bool = False  # send HF_TOKEN (to the Hub's host only): a plain URL may be on the Hub
    path: Path | None = None  # local: the file; http: the target; hf: the cached snapshot file, when usable
    # Hugging Face
    endpoint: str = ""
    repo_id: str = ""
    revision: str = ""
    filename: str = ""
    hf_cache: Path | None = None
    # http
    url: str = ""
    sha256: str | None = None
    join_key: str | None = None  # a joined raw split: the key of its parts (None until every part says)
    missing: int = 0  # bytes still to download (for the disk-space check)
    done: bool = False  # already complete and verified
    result: Path | None = None


def shown_name(c: Candidate) -> str:
    return f"{c.model} ({c.quant})"


def describe(f: CandidateFile, index: int, count: int, projector: bool, raw: bool = False) -> str:
    if projector:
        return f"{f.name} (vision projector)"
    return f"{f.name} ({'part' if raw else 'shard'} {index + 1} of {count})" if count > 1 else f.name


def published_sha(f: CandidateFile) -> str | None:
    """The file's published sha256 as 64 lowercase hex digits, else None (a malformed one is no hash)."""
    value = (f.sha256 or "").strip().lower().removeprefix("sha256:")
    return value if _SHA256_RE.match(value) else None


def hf_repo_folder(job: Job) -> Path:
    assert job.hf_cache is not None
    return job.hf_cache / ("models--" + job.repo_id.replace("/", "--"))


def mismatch(shown: str, what: str, expected: str, got: str) -> FetchError:
    return FetchError(f"{shown}: {what}: sha256 mismatch: expected {expected}, got {got}; the download was removed")


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def bar_label(job: Job) -> str:
    name = job.file.name.rsplit("/", 1)[-1]
    if name.startswith("sha256:"):
        name = name[:19] + "…"
    return name if len(name) <= 48 else "…" + name[-47:]
