"""Getting a candidate's files onto this machine: every shard, in order, and the vision projector when asked.

`fetch_candidate(candidate)` returns a copy of the candidate whose files all have `local_path` set to a complete
file that matches its published sha256 (where there is one). How, by where a file comes from:

- Already here (`local`, `ollama-local`, or `local_path` set and existing): used as it is. A missing file of a
  local candidate is an error that names it (llama.cpp needs every shard of a split set).
- Hugging Face (`huggingface`): `huggingface_hub.hf_hub_download` into the standard Hugging Face cache
  (`launcher.fetch.huggingface`), each file hashed against the listing's LFS sha256.
- Ollama registry blobs and plain http(s) URLs: fitquant's own resumable, verified downloader
  (`launcher.fetch.download`), into `cache_dir()/blobs` or `cache_dir()/downloads`.
- A raw byte split (`Candidate.raw_split`): every part fetched as above, then joined into one file in fitquant's
  cache (`launcher.fetch.split`). The candidate returned has that one file.

Every name that comes from a URL, a listing or a manifest becomes a safe base name inside fitquant's folders
(`launcher.paths.safe_basename`, `inside`); files are written 0600 and never through a symlink. A download that
ends short of its known size is kept for resume and never used; a file another fitquant is downloading is waited
for (`wait_stalled_s` bounds the wait while it makes no progress). Before any byte is downloaded, what is still
missing is compared with the free space of each target file system plus DISK_MARGIN_BYTES
(`launcher.fetch.markers`), and nothing is downloaded when it does not fit.

Every failure is one FetchError line naming the candidate and the file; URLs are shown without query strings or
credentials, and no token ever appears. Progress bars (rich, on stderr: bytes, speed, ETA) only when `progress`
and stderr is a terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.catalog.types import Candidate
from launcher.errors import FetchError
from launcher.fetch.download import (
    MAX_ROUNDS,
    READ_TIMEOUT_S,
    WAIT_STALLED_S,
    download_progress,
    download_target,
    http_download,
    http_plan,
    is_terminal,
    target_for,
)
from launcher.fetch.huggingface import hf_download, hf_job, hf_plan
from launcher.fetch.job import CHUNK_BYTES, Job, describe, published_sha, shown_name
from launcher.fetch.markers import DISK_MARGIN_BYTES, check_space, disk_free
from launcher.fetch.split import check_parts, join, join_job, join_place
from launcher.http import make_client

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CHUNK_BYTES",
    "DISK_MARGIN_BYTES",
    "MAX_ROUNDS",
    "READ_TIMEOUT_S",
    "WAIT_STALLED_S",
    "download_progress",
    "download_target",
    "fetch_candidate",
]

_LOCAL_SOURCES = ("local", "ollama-local")
_HF_SOURCE = "huggingface"


def _plan(c: Candidate, vision: bool) -> list[Job]:
    """One job per file (shards in order, then the projector when `vision`), checked for what is local."""
    shown = shown_name(c)
    if not c.files:
        raise FetchError(f"{shown}: the candidate has no files")
    files = [(f, describe(f, i, len(c.files), False, c.raw_split), True) for i, f in enumerate(c.files)]
    if vision and c.projector is not None:
        files.append((c.projector, describe(c.projector, 0, 1, True), False))
    split = len(c.files) > 1
    if c.raw_split:
        check_parts(c, shown)
    jobs: list[Job] = []
    for f, what, shard in files:
        local = Path(f.local_path).expanduser() if f.local_path else None
        if local is not None and local.is_file():
            jobs.append(Job(f, what, "local", shard=shard, path=local, done=True, result=local))
            continue
        if c.source in _LOCAL_SOURCES or not f.url:
            if local is not None:
                need = " llama.cpp needs every shard of a split set." if split and shard else ""
                if c.raw_split and shard:
                    need = " A raw split is joined from every part."
                raise FetchError(f"{shown}: {what} is missing: {local} does not exist.{need}")
            raise FetchError(f"{shown}: {what} has no URL to download it from and is not on this machine")
        if c.source == _HF_SOURCE:
            job = hf_job(shown, f, what)
            job.shard = shard
            jobs.append(job)
        else:
            sha = published_sha(f)
            try:
                target = target_for(f.url, sha, split=split and shard)
            except ValueError as exc:
                raise FetchError(f"{shown}: {what}: refused as a download target: {exc}") from None
            jobs.append(Job(f, what, "http", shard=shard, auth=c.source == "url", path=target, url=f.url, sha256=sha))
    return jobs


def fetch_candidate(
    candidate: Candidate,
    *,
    vision: bool = False,
    progress: bool = True,
    client: httpx.Client | None = None,
    free_bytes: Callable[[Path], int] | None = None,
    wait_stalled_s: float = WAIT_STALLED_S,
) -> Candidate:
    """A copy of `candidate` whose every file (every shard, in order) and, with `vision`, the projector, has
    `local_path` set to a complete file verified against its published sha256. Downloads what is missing (see the
    module docstring); `client` is used for fitquant's own downloads (Hugging Face files go through
    huggingface_hub); `free_bytes(dir)` gives the free space of a folder (default: shutil.disk_usage);
    `wait_stalled_s` bounds a wait for another fitquant's download that stopped growing. Raises FetchError."""
    shown = shown_name(candidate)
    jobs = _plan(candidate, vision)
    parts = [j for j in jobs if j.shard] if candidate.raw_split else []
    joined = join_job(candidate, parts) if parts else None
    if joined is not None and joined.done:
        jobs = [j for j in jobs if not j.shard]  # joined already, from these very parts: they are not needed
    hf_plan(jobs, one_folder=joined is None)
    for j in jobs:
        if j.kind == "http":
            http_plan(j, shown)
    check_space([*jobs, joined] if joined is not None else jobs, shown, free_bytes or disk_free)
    show_bars = progress and is_terminal()
    own: httpx.Client | None = None
    try:
        for j in jobs:
            if j.done:
                continue
            if j.kind == "hf":
                j.result = hf_download(j, shown, progress)
            else:
                if client is None and own is None:
                    own = make_client()
                http_client = client if client is not None else own
                assert http_client is not None
                j.result = http_download(j, http_client, shown, show_bars, stalled_s=wait_stalled_s)
    finally:
        if own is not None:
            own.close()
    if joined is not None and not joined.done:
        join_place(joined, parts)  # every part is here and verified now: their key is known
        if joined.result is None:
            sources = [j.result for j in parts if j.result is not None]
            joined.result = join(joined, sources, shown, show_bars, stalled_s=wait_stalled_s)
    return _result(candidate, jobs, joined, shown)


def _result(c: Candidate, jobs: list[Job], joined: Job | None, shown: str) -> Candidate:
    projector = c.projector
    projector_job = next((j for j in jobs if not j.shard), None)
    if projector_job is not None and c.projector is not None:
        p = projector_job.result
        projector = c.projector if c.projector.local_path == str(p) else replace(c.projector, local_path=str(p))
    if joined is not None:
        one = replace(joined.file, local_path=str(joined.result))
        return replace(c, files=(one,), projector=projector, raw_split=False)
    paths = [j.result for j in jobs if j.shard]
    files = tuple(
        f if f.local_path and Path(f.local_path).expanduser() == p else replace(f, local_path=str(p))
        for f, p in zip(c.files, paths, strict=True)
    )
    if len(files) > 1:
        folders = {Path(f.local_path or "").parent for f in files}
        if len(folders) > 1:
            raise FetchError(
                f"{shown}: the shards are in different folders ({', '.join(sorted(map(str, folders)))}); llama.cpp "
                "loads a split set from one folder (the repository changed during the download?); run again"
            )
    return replace(c, files=files, projector=projector)
