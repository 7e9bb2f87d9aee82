"""Getting a candidate's files onto this machine: every shard, in order, and the vision projector when asked.

`fetch_candidate(candidate)` returns a copy of the candidate whose files all have `local_path` set to a complete
file that matches its published sha256 (where there is one). How, by where a file comes from:

- Already here (`local`, `ollama-local`, or `local_path` set and existing): used as it is. A missing file of a
  local candidate is an error that names it (llama.cpp needs every shard of a split set).
- Hugging Face (`huggingface`): `huggingface_hub.hf_hub_download` into the standard Hugging Face cache (HF_HOME,
  HF_HUB_CACHE; the endpoint is the one in the file's URL, i.e. HF_ENDPOINT when it was listed). It shows its own
  progress bars. The library checks sizes, not hashes, so the file is hashed here against the LFS sha256 of the
  listing; a mismatch deletes the blob and its snapshot link. A file already in the cache with that sha256 as
  its blob name is verified once (a `.verified` marker in fitquant's cache) and then used without any request.
  A split set ends up in one snapshot folder, under its own names, so llama.cpp finds shard 2.. beside shard 1.
- Ollama registry blobs and plain http(s) URLs: downloaded here, to `cache_dir()/blobs/sha256-<hex>` (content
  with a published sha256), else (no hash, or a split set, whose shards llama.cpp finds by name) to
  `cache_dir()/downloads/<hash of the URL's folder>/<file name>`. Bytes go to `<target>.partial`, hashed while
  they are written; a partial left by an earlier run is hashed first and resumed with `Range: bytes=N-` (a 200
  answer starts over, a 416 means it was complete). Redirects are followed (the registry sends to its blob store).
  Transient failures are retried by `launcher.http`'s policy, again as long as each round brings more bytes; a
  download that still ends early keeps its `.partial` and says that running again resumes it. A complete file is
  checked against its sha256: a mismatch deletes it ("sha256 mismatch: expected X, got Y; the download was
  removed"), a match is renamed into place atomically. A finished file gets a `.verified` marker (sha256, size,
  mtime), so the next run reuses it without hashing many GB again or asking the network anything.

A raw byte split (`Candidate.raw_split`: `x.Q8_0.gguf.part1of2`, ... as mradermacher publishes its largest quants)
needs every part: a missing one is an error that names it. Each part is fetched as above (from Hugging Face through
huggingface_hub, checked against its own sha256), then the parts are joined, in order, into one file in fitquant's
cache, `cache_dir()/joined/<key of the parts>/<name>` (written to `<name>.joining` and renamed into place once
complete and of the summed size; a `.verified` marker holds the key). The key is made of the parts' published
sha256 (else their path, size and mtime once here), so a joined file is only ever used for the very parts it was
made from, and only ever made from parts that passed their hash: a joined file of listed parts is reused without
any request. The parts stay in their caches. The candidate returned has that one file.

Before any byte is downloaded, what is still missing (size less what partials already hold, and a joined file
still to make) is compared with the free space of each target file system (`shutil.disk_usage`, or the
`free_bytes` given) plus DISK_MARGIN_BYTES: "not enough disk space in DIR: need X GiB, Y GiB free", and nothing
is downloaded.

Every failure is one FetchError line naming the candidate and the file; URLs are shown without query strings or
credentials, and no token ever appears. Progress bars (rich, on stderr: bytes, speed, ETA) only when `progress`
and stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import FetchError, FitquantError
from launcher.http import HttpFailure, hf_auth, hf_endpoint, make_client, redact_url, retrying, scrub, status_failure
from launcher.http import timeout as http_timeout
from launcher.paths import cache_dir

if TYPE_CHECKING:
    import httpx

__all__ = [
    "CHUNK_BYTES",
    "DISK_MARGIN_BYTES",
    "MAX_ROUNDS",
    "READ_TIMEOUT_S",
    "download_target",
    "fetch_candidate",
]

CHUNK_BYTES = 1 << 20  # files are read (and hashed) in 1 MiB pieces
DISK_MARGIN_BYTES = 256 * 2**20  # kept free on a file system after the downloads
READ_TIMEOUT_S = 30.0  # a stream that sends nothing for this long is cut off (and resumed by a retry)
MAX_ROUNDS = 1000  # rounds of retries that each brought more bytes: a bound, not a limit a real download meets

_LOCAL_SOURCES = ("local", "ollama-local")
_HF_SOURCE = "huggingface"
_HF_FILE_RE = re.compile(r"^(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_URL_RE = re.compile(r"https?://[^\s'\"<>)]+")
_TOKEN_URL = "https://huggingface.co/settings/tokens"


# ---------------------------------------------------------------------------------------------------------------
# What to do with each file


@dataclass
class _Job:
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


def _shown(c: Candidate) -> str:
    return f"{c.model} ({c.quant})"


def _what(f: CandidateFile, index: int, count: int, projector: bool, raw: bool = False) -> str:
    if projector:
        return f"{f.name} (vision projector)"
    return f"{f.name} ({'part' if raw else 'shard'} {index + 1} of {count})" if count > 1 else f.name


def _sha(f: CandidateFile) -> str | None:
    value = (f.sha256 or "").strip().lower().removeprefix("sha256:")
    return value if _SHA256_RE.match(value) else None


def _plan(c: Candidate, vision: bool) -> list[_Job]:
    """One job per file (shards in order, then the projector when `vision`), checked for what is local."""
    shown = _shown(c)
    if not c.files:
        raise FetchError(f"{shown}: the candidate has no files")
    files = [(f, _what(f, i, len(c.files), False, c.raw_split), True) for i, f in enumerate(c.files)]
    if vision and c.projector is not None:
        files.append((c.projector, _what(c.projector, 0, 1, True), False))
    split = len(c.files) > 1
    if c.raw_split:
        _check_parts(c, shown)
    jobs: list[_Job] = []
    for f, what, shard in files:
        local = Path(f.local_path).expanduser() if f.local_path else None
        if local is not None and local.is_file():
            jobs.append(_Job(f, what, "local", shard=shard, path=local, done=True, result=local))
            continue
        if c.source in _LOCAL_SOURCES or not f.url:
            if local is not None:
                need = " llama.cpp needs every shard of a split set." if split and shard else ""
                if c.raw_split and shard:
                    need = " A raw split is joined from every part."
                raise FetchError(f"{shown}: {what} is missing: {local} does not exist.{need}")
            raise FetchError(f"{shown}: {what} has no URL to download it from and is not on this machine")
        if c.source == _HF_SOURCE:
            job = _hf_job(shown, f, what)
            job.shard = shard
            jobs.append(job)
        else:
            sha = _sha(f)
            target = download_target(f.url, sha, split=split and shard)
            jobs.append(_Job(f, what, "http", shard=shard, auth=c.source == "url", path=target, url=f.url, sha256=sha))
    return jobs


def download_target(url: str, sha256: str | None, *, split: bool = False) -> Path:
    """Where fitquant's own downloader puts the file at `url`: `cache_dir()/blobs/sha256-<hex>` for content with a
    published sha256, else (or for a shard of a split set, which llama.cpp finds by its name)
    `cache_dir()/downloads/<sha256 of the URL's folder, 16 hex>/<file name>`."""
    if sha256 and not split:
        return cache_dir() / "blobs" / f"sha256-{sha256}"
    shown = redact_url(url)
    folder, _, name = shown.rpartition("/")
    name = unquote(name).replace("\\", "_").strip() or "download"
    if name in (".", ".."):
        name = "download"
    key = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / key / name


# ---------------------------------------------------------------------------------------------------------------
# Verification markers


def _marker(path: Path) -> Path:
    """`<file>.verified` beside a file in fitquant's cache; elsewhere (the Hugging Face cache, which fitquant does
    not write into) `cache_dir()/verified/<hash of the path>.verified`."""
    root = cache_dir()
    try:
        path.relative_to(root)
    except ValueError:
        return root / "verified" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.verified"
    return path.with_name(path.name + ".verified")


def _marked(path: Path, sha256: str) -> bool:
    """Whether `path` was verified to hash to `sha256` and has not changed since (same size and mtime)."""
    try:
        st = path.stat()
        doc = json.loads(_marker(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return doc == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mark(path: Path, sha256: str | None) -> None:
    marker = _marker(path)
    try:
        st = path.stat()
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        doc = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, marker)
    except OSError:
        pass  # without a marker the next run hashes the file again: slower, never wrong


def _unmark(path: Path) -> None:
    with contextlib.suppress(OSError):
        _marker(path).unlink()


def _hash_file(path: Path, hasher: Any | None = None) -> Any:
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h


def _check(path: Path, sha256: str) -> str | None:
    """None when `path` hashes to `sha256` (marking it verified), else the sha256 it has."""
    if _marked(path, sha256):
        return None
    got = _hash_file(path).hexdigest()
    if got != sha256:
        return str(got)
    _mark(path, sha256)
    return None


def _mismatch(shown: str, what: str, expected: str, got: str) -> FetchError:
    return FetchError(f"{shown}: {what}: sha256 mismatch: expected {expected}, got {got}; the download was removed")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face


def _hf_parts(url: str) -> tuple[str, str, str, str] | None:
    """(endpoint, repo_id, revision, path) of a `{endpoint}/{repo}/resolve/{rev}/{path}` URL, else None."""
    endpoint = hf_endpoint()
    text = url.split("?", 1)[0].split("#", 1)[0]
    if text.startswith(endpoint + "/"):
        base, rest = endpoint, text[len(endpoint) + 1 :]
    else:
        try:
            parts = urlsplit(text)
        except ValueError:
            return None
        base, rest = f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")
    m = _HF_FILE_RE.match(rest)
    if m is None:
        return None
    return base, m["repo"], unquote(m["rev"]), unquote(m["path"])


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(name, "").strip()
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    home = os.environ.get("HF_HOME", "").strip()
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_repo_folder(job: _Job) -> Path:
    assert job.hf_cache is not None
    return job.hf_cache / ("models--" + job.repo_id.replace("/", "--"))


def _hf_job(shown: str, f: CandidateFile, what: str) -> _Job:
    parts = _hf_parts(f.url or "")
    if parts is None:
        raise FetchError(f"{shown}: {what}: {redact_url(f.url or '')} is not a Hugging Face file URL")
    endpoint, repo_id, revision, filename = parts
    return _Job(
        f, what, "hf", endpoint=endpoint, repo_id=repo_id, revision=revision, filename=filename,
        hf_cache=_hf_cache_dir(), sha256=_sha(f),
    )  # fmt: skip


def _hf_cached(job: _Job) -> Path | None:
    """The snapshot file of `job` already in the Hugging Face cache with the listed content (its blob is named by
    the LFS sha256, as the Hub's ETag names it), else None. Only for files with a sha256: without one, only the
    Hub can say whether the cached file is still the listed one."""
    if job.sha256 is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(job.repo_id, job.filename, cache_dir=job.hf_cache, revision=job.revision)
    except Exception:  # huggingface_hub's own cache reading: a cache it cannot read is a cache miss
        return None
    if not isinstance(found, str):
        return None
    path = Path(found)
    try:
        real = path.resolve(strict=True)
    except OSError:
        return None
    return path if real.name == job.sha256 else None


def _hf_plan(jobs: list[_Job], *, one_folder: bool = True) -> None:
    """Mark Hugging Face files that are already cached and verified; count the bytes of the others. With
    `one_folder` (a split set, whose shards llama.cpp finds beside shard 1), all shards or none are cached."""
    hf = [j for j in jobs if j.kind == "hf"]
    for j in hf:
        cached = _hf_cached(j)
        if cached is not None and j.sha256 is not None:
            try:
                ok = _check(cached.resolve(strict=True), j.sha256) is None
            except OSError:
                ok = False  # unreadable: hf_hub_download decides what to do with it
            else:
                if not ok:
                    _hf_discard(cached)  # a corrupt blob: download it again
            if ok:
                j.path = cached
                continue
        blob = _hf_repo_folder(j) / "blobs" / j.sha256 if j.sha256 else None
        j.missing = 0 if blob is not None and blob.is_file() else j.file.size_bytes
    shards = [j for j in hf if j.shard]
    if one_folder and len(shards) > 1 and any(j.path is None for j in shards):
        for j in shards:  # the whole set through hf_hub_download, so that it lands in one snapshot folder
            j.path = None
    for j in hf:
        if j.path is not None:
            j.done, j.result = True, j.path


def _hf_discard(path: Path) -> None:
    """Delete a snapshot file and the blob it links to (and its verification marker)."""
    try:
        real = path.resolve()
    except OSError:
        real = path
    _unmark(real)
    for p in (real, path):
        with contextlib.suppress(OSError):
            p.unlink()


def _hf_token(shown: str) -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception as exc:  # huggingface_hub's token lookup (OIDC exchange, token file) is its own edge
        raise FetchError(f"{shown}: cannot get the Hugging Face token: {type(exc).__name__}") from None


@contextlib.contextmanager
def _hf_progress(progress: bool) -> Iterator[dict[str, Any]]:
    """Keyword arguments for hf_hub_download that silence its bars when `progress` is False (tqdm_class where the
    library takes one, else its global switch, put back afterwards)."""
    if progress:
        yield {}
        return
    import inspect

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import tqdm as hf_tqdm

    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:

        class _Quiet(hf_tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        yield {"tqdm_class": _Quiet}
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield {}
    finally:
        if not was_disabled:
            enable_progress_bars()


def _one_line(exc: BaseException, secrets: list[str]) -> str:
    """The first line of an exception's text, URLs without query strings, no token."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = _URL_RE.sub(lambda m: redact_url(m[0]), text)
    text = scrub(text, secrets=secrets)
    return text[:300]


def _hf_failure(exc: Exception, job: _Job, token: str | None) -> str:
    from huggingface_hub import errors

    where = f"{job.repo_id} on {redact_url(job.endpoint)}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    http = f"HTTP {status}" if isinstance(status, int) else "refused"
    if isinstance(exc, errors.GatedRepoError) or (isinstance(exc, errors.HfHubHTTPError) and status in (401, 403)):
        if token:
            return (
                f"access to {where} denied with the token in HF_TOKEN ({http}): the repository is gated or private; "
                "request access on its page, or use a token that has it"
            )
        return f"{where} is gated or private ({http}): set HF_TOKEN to a token that has access ({_TOKEN_URL})"
    if isinstance(exc, errors.RepositoryNotFoundError):
        hint = "" if token else " (a private repository needs HF_TOKEN)"
        return f"no repository {where} ({http}){hint}"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"no revision {job.revision!r} in {where} ({http})"
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(exc, errors.LocalEntryNotFoundError):
        return f"the file is no longer in {where} at {job.revision!r}; list the model again (--refresh)"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return f"{where} cannot be reached and the file is not in the Hugging Face cache (offline?)"
    if isinstance(exc, errors.HfHubHTTPError):
        return f"the Hub answered {http} for {where}"
    secrets = [token] if token else []
    return f"download from {where} failed: {type(exc).__name__}: {_one_line(exc, secrets)}"


def _hf_download(job: _Job, shown: str, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    token = _hf_token(shown)
    try:
        with _hf_progress(progress) as extra:
            found = hf_hub_download(
                job.repo_id,
                job.filename,
                revision=job.revision,
                cache_dir=str(job.hf_cache),
                endpoint=job.endpoint,
                token=token,
                **extra,
            )
    except FitquantError:
        raise
    except Exception as exc:  # huggingface_hub (and its HTTP client) raise their own types: this is their edge
        raise FetchError(f"{shown}: cannot download {job.what}: {_hf_failure(exc, job, token)}") from None
    path = Path(str(found))
    if job.sha256 is not None:
        try:
            got = _check(path.resolve(strict=True), job.sha256)
        except OSError as exc:
            raise FetchError(f"{shown}: {job.what}: cannot read {path}: {exc.strerror or exc}") from None
        if got is not None:
            _hf_discard(path)
            raise _mismatch(shown, job.what, job.sha256, got)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Our own downloader (Ollama registry blobs, plain URLs)


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _http_plan(job: _Job, shown: str) -> None:
    """A finished target is reused (verified once); a corrupt one is removed. Counts the bytes still missing."""
    assert job.path is not None
    target = job.path
    if target.is_file():
        if job.sha256 is None:
            job.done, job.result = True, target  # it is renamed into place only once complete
            return
        try:
            got = _check(target, job.sha256)
        except OSError as exc:
            raise FetchError(f"{shown}: {job.what}: cannot read {target}: {exc.strerror or exc}") from None
        if got is None:
            job.done, job.result = True, target
            return
        _unmark(target)
        with contextlib.suppress(OSError):
            target.unlink()  # not what it should be: download it again
    job.missing = max(job.file.size_bytes - _size(_partial(target)), 0)


@dataclass
class _State:
    """The bytes of the partial file hashed so far (kept across attempts, so a retry does not hash them again)."""

    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0
    total: int | None = None  # the file's size as the server said

    def restart(self) -> None:
        self.hasher, self.hashed = hashlib.sha256(), 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None for what it does not say."""
    m = _CONTENT_RANGE_RE.match((value or "").strip())
    if m is None:
        return None, None
    first = int(m[1]) if m[1] is not None else None
    total = int(m[3]) if m[3] != "*" else None
    return first, total


class _Bar:
    """A rich progress bar on stderr (bytes, speed, ETA), or nothing."""

    def __init__(self, enabled: bool, label: str, total: int | None, done: int) -> None:
        self.progress: Any = None
        self.task: Any = None
        if not enabled:
            return
        self.progress = download_progress()
        self.task = self.progress.add_task(label, total=total or None, completed=done)
        self.progress.start()

    def update(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _attempt(client: httpx.Client, job: _Job, partial: Path, state: _State, bar: _Bar) -> None:
    """One GET of what is missing, appended to `partial` and hashed; raises HttpFailure (inside translate())."""
    have = _size(partial)
    if have != state.hashed:  # what is on disk is what counts: hash it (once per run)
        state.restart()
        if have:
            _hash_file(partial, state.hasher)
            state.hashed = have
    size = job.file.size_bytes
    if job.sha256 is not None and size and have >= size:
        if have == size:
            return  # complete: the caller checks the hash
        partial.unlink()  # longer than the file: not it
        state.restart()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    auth = hf_auth() if job.auth else None
    with client.stream(
        "GET", job.url, headers=headers, auth=auth, timeout=http_timeout(READ_TIMEOUT_S), follow_redirects=True
    ) as response:
        status = response.status_code
        if status == 416 and have:
            _, total = _content_range(response.headers.get("Content-Range"))
            if total == have:
                state.total = total
                return  # the partial holds the whole file
            partial.unlink()
            state.restart()
            raise HttpFailure("the server refused to resume (HTTP 416); starting over", kind="status", transient=True)
        if status == 206 and have:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != have:
                partial.unlink()
                state.restart()
                raise HttpFailure(
                    f"the server resumed at byte {first}, not {have}; starting over", kind="body", transient=True
                )
            mode = "ab"
        elif status == 200:
            first, total = 0, None
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and "Content-Encoding" not in response.headers:
                total = int(length)
            mode = "wb"  # a whole answer: from the start (also when the server ignored the Range)
            state.restart()
            have = 0
        else:
            raise status_failure(response)
        if total is not None and job.sha256 is not None and size and total != size:
            raise HttpFailure(
                f"the server has {total} bytes, the listing said {size}: not the listed file",
                kind="body",
                transient=False,
            )
        state.total = total
        bar.update(have)
        with open(partial, mode) as out:
            # pieces as they arrive: a chunker would hold back (and lose, on a cut) up to CHUNK_BYTES
            for chunk in response.iter_bytes():
                out.write(chunk)
                state.hasher.update(chunk)
                state.hashed += len(chunk)
                bar.update(state.hashed)
        if total is not None and state.hashed < total:
            raise HttpFailure(
                f"the answer ended after {state.hashed} of {total} bytes", kind="cut_short", transient=True
            )


def _http_download(job: _Job, client: httpx.Client, shown: str, progress: bool) -> Path:
    assert job.path is not None
    target = job.path
    partial = _partial(target)
    where = redact_url(job.url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {target.parent}: {exc.strerror or exc}") from None
    state = _State()
    with _lock(target, shown, job.what):
        bar = _Bar(progress, _label(job), job.file.size_bytes or None, _size(partial))
        try:
            _rounds(client, job, partial, state, bar, shown, where)
        finally:
            bar.close()
        if job.sha256 is not None:
            got = state.hasher.hexdigest()
            if got != job.sha256:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise _mismatch(shown, job.what, job.sha256, got)
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise FetchError(f"{shown}: cannot move {partial} into place: {exc.strerror or exc}") from None
        _mark(target, job.sha256)
    return target


def _label(job: _Job) -> str:
    name = job.file.name.rsplit("/", 1)[-1]
    if name.startswith("sha256:"):
        name = name[:19] + "…"
    return name if len(name) <= 48 else "…" + name[-47:]


def _rounds(client: httpx.Client, job: _Job, partial: Path, state: _State, bar: _Bar, shown: str, where: str) -> None:
    """`_attempt` under launcher.http's retry policy, again while each round brings more bytes (bounded)."""
    rounds = 0
    while True:
        before = _size(partial)
        try:
            retrying(lambda: _attempt(client, job, partial, state, bar))
            return
        except HttpFailure as failure:
            got = _size(partial)
            rounds += 1
            if failure.transient and got > before and rounds < MAX_ROUNDS:
                continue
            raise FetchError(_http_failure(shown, job, where, failure, got, state)) from None
        except OSError as exc:
            raise FetchError(f"{shown}: {job.what}: cannot write {partial}: {exc.strerror or exc}") from None


def _http_failure(shown: str, job: _Job, where: str, failure: HttpFailure, got: int, state: _State) -> str:
    text = f"{shown}: cannot download {job.what} from {where}: {failure.text}{failure.tries}"
    if got > 0 and failure.transient:
        total = state.total or job.file.size_bytes
        of = f" of {_gib(total)}" if total else ""
        text += f"; {_gib(got)}{of} kept in {_partial(job.path or Path())}: run again to resume"
    return text


@contextlib.contextmanager
def _lock(target: Path, shown: str, what: str) -> Iterator[None]:
    """An exclusive lock on `<target>.lock` (where fcntl exists), so two runs never write one partial file."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    path = target.with_name(target.name + ".lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FetchError(
                f"{shown}: {what} is being downloaded by another fitquant process ({path}); wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------------------------------
# Raw byte splits: the parts joined into one file


def _check_parts(c: Candidate, shown: str) -> None:
    """A raw split's files are parts 1 to N of one name, in order; else FetchError naming the first part missing."""
    from launcher.gguf import parse_part

    first = parse_part(c.files[0].name)
    if first is None:
        raise FetchError(f"{shown}: {c.files[0].name} is not a part of a raw split (name.gguf.part1of2, ...)")
    have = [f.name.rpartition("/")[2] for f in c.files]
    wanted = [first.name(i) for i in range(1, first.total + 1)]
    for name in wanted:
        if name not in have:
            raise FetchError(f"{shown}: {name} is missing: a raw split is joined from every part")
    if have != wanted:
        raise FetchError(f"{shown}: the parts of {first.joined} are not listed once each, in order: {', '.join(have)}")


def _join_job(c: Candidate, parts: list[_Job]) -> _Job:
    """The joined file of a raw split: named and sized after its parts, placed (and done) when their key is known."""
    from launcher.gguf import parse_part

    first = c.files[0].name
    part = parse_part(first)
    assert part is not None  # _check_parts
    folder = first.rpartition("/")[0]
    name = f"{folder}/{part.joined}" if folder else part.joined
    joined = CandidateFile(name=name, size_bytes=sum(f.size_bytes for f in c.files))
    job = _Job(joined, f"{part.joined} (joined from {len(parts)} parts)", "join")
    _join_place(job, parts)
    return job


def _join_place(job: _Job, parts: list[_Job]) -> None:
    """Set where the joined file goes (by the key of its parts) and whether it is there already, verified; before
    the key is known, a stand-in path in the same folder (for the disk-space check)."""
    job.join_key = _parts_key(parts)
    leaf = job.file.name.rpartition("/")[2]
    if job.join_key is None:
        job.path, job.missing = cache_dir() / "joined" / leaf, job.file.size_bytes
        return
    job.path = cache_dir() / "joined" / job.join_key / leaf
    if _marked(job.path, job.join_key):
        job.done, job.result, job.missing = True, job.path, 0
    else:
        job.missing = job.file.size_bytes


def _parts_key(parts: list[_Job]) -> str | None:
    """What the joined file is made of: each part's published sha256, else its path, size and mtime once it is
    here; None while a part without a hash is not here yet."""
    ids = []
    for j in parts:
        sha = _sha(j.file)
        if sha is None:
            if j.result is None:
                return None
            try:
                st = j.result.stat()
            except OSError:
                return None
            sha = f"{j.result.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        ids.append(sha)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


def _join(job: _Job, parts: list[Path], shown: str, progress: bool) -> Path:
    """Concatenate `parts` (each verified) into the job's file: written to `<name>.joining`, renamed into place once
    complete and of the summed size, then marked with the parts' key."""
    assert job.path is not None and job.join_key is not None
    target = job.path
    joining = target.with_name(target.name + ".joining")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {target.parent}: {exc.strerror or exc}") from None
    with _lock(target, shown, job.what):
        if _marked(target, job.join_key):
            return target  # another run joined them meanwhile
        bar = _Bar(progress, f"join {_label(job)}", job.file.size_bytes or None, 0)
        written = 0
        try:
            with open(joining, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while chunk := src.read(CHUNK_BYTES):
                            out.write(chunk)
                            written += len(chunk)
                            bar.update(written)
            if written != job.file.size_bytes:
                raise FetchError(
                    f"{shown}: {job.what}: the parts hold {written} bytes, {job.file.size_bytes} were listed; "
                    "nothing was joined"
                )
            os.replace(joining, target)
        except OSError as exc:
            raise FetchError(f"{shown}: cannot join the parts into {target}: {exc.strerror or exc}") from None
        finally:
            bar.close()
            with contextlib.suppress(OSError):
                joining.unlink()  # what is left of a failed join (after the rename there is nothing)
        _mark(target, job.join_key)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Disk space


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return path


def _check_space(jobs: list[_Job], shown: str, free_bytes: Callable[[Path], int]) -> None:
    """Refuse, before any byte is downloaded, when a file system lacks room for what is missing plus the margin."""
    groups: dict[Any, tuple[Path, Path, int]] = {}  # device -> (shown dir, existing dir, bytes)
    for j in jobs:
        if j.done or j.missing <= 0:
            continue
        folder = j.path.parent if j.kind in ("http", "join") and j.path is not None else _hf_repo_folder(j) / "blobs"
        anchor = _existing(folder)
        try:
            key: Any = anchor.stat().st_dev
        except OSError:
            key = str(anchor)
        shown_dir, anchor0, total = groups.get(key, (folder, anchor, 0))
        groups[key] = (shown_dir, anchor0, total + j.missing)
    for folder, anchor, missing in groups.values():
        try:
            free = int(free_bytes(anchor))
        except OSError:
            continue  # unknown free space: the download itself will say if the disk fills
        need = missing + DISK_MARGIN_BYTES
        if need > free:
            raise FetchError(
                f"{shown}: not enough disk space in {folder}: need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            )


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def fetch_candidate(
    candidate: Candidate,
    *,
    vision: bool = False,
    progress: bool = True,
    client: httpx.Client | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> Candidate:
    """A copy of `candidate` whose every file (every shard, in order) and, with `vision`, the projector, has
    `local_path` set to a complete file verified against its published sha256. Downloads what is missing (see the
    module docstring); `client` is used for fitquant's own downloads (Hugging Face files go through
    huggingface_hub); `free_bytes(dir)` gives the free space of a folder (default: shutil.disk_usage). Raises
    FetchError (one line)."""
    shown = _shown(candidate)
    jobs = _plan(candidate, vision)
    parts = [j for j in jobs if j.shard] if candidate.raw_split else []
    join = _join_job(candidate, parts) if parts else None
    if join is not None and join.done:
        jobs = [j for j in jobs if not j.shard]  # joined already, from these very parts: they are not needed
    _hf_plan(jobs, one_folder=join is None)
    for j in jobs:
        if j.kind == "http":
            _http_plan(j, shown)
    _check_space([*jobs, join] if join is not None else jobs, shown, free_bytes or _disk_free)
    show_bars = progress and _is_terminal()
    own: httpx.Client | None = None
    try:
        for j in jobs:
            if j.done:
                continue
            if j.kind == "hf":
                j.result = _hf_download(j, shown, progress)
            else:
                if client is None and own is None:
                    own = make_client()
                http_client = client if client is not None else own
                assert http_client is not None
                j.result = _http_download(j, http_client, shown, show_bars)
    finally:
        if own is not None:
            own.close()
    if join is not None and not join.done:
        _join_place(join, parts)  # every part is here and verified now: their key is known
        join.result = join.result or _join(join, [j.result for j in parts if j.result is not None], shown, show_bars)
    return _result(candidate, jobs, join, shown)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _result(c: Candidate, jobs: list[_Job], join: _Job | None, shown: str) -> Candidate:
    projector = c.projector
    projector_job = next((j for j in jobs if not j.shard), None)
    if projector_job is not None and c.projector is not None:
        p = projector_job.result
        projector = c.projector if c.projector.local_path == str(p) else replace(c.projector, local_path=str(p))
    if join is not None:
        joined = replace(join.file, local_path=str(join.result))
        return replace(c, files=(joined,), projector=projector, raw_split=False)
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


def download_progress(console: Any = None, *, description: str = "[bold]{task.description}") -> Any:
    """The one download bar (bytes, speed, time left) on stderr, for files and for Ollama's pull stream."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console if console is not None else Console(stderr=True),
    )
