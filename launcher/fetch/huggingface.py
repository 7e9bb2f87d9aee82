"""Hugging Face files: through `huggingface_hub.hf_hub_download`, into the standard Hugging Face cache.

The library checks sizes, not hashes, so each file is hashed here against the LFS sha256 of the listing; a
mismatch deletes the blob and its snapshot link. A file already cached with that sha256 as its blob name is
verified once and then used without any request. A file path or revision that would leave the repository's cache
folder (`..`, an absolute path) is refused before huggingface_hub sees it. Failures keep their cause: an endpoint
that answers but is not a Hub says so, and only a connection that fails, with no cached copy, says "offline?".
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from launcher.catalog.types import CandidateFile
from launcher.errors import FetchError, FitquantError
from launcher.fetch.job import Job, hf_repo_folder, mismatch, published_sha
from launcher.fetch.markers import check, unmark
from launcher.http import hf_endpoint, redact_url, scrub
from launcher.paths import safe_relpath

_HF_FILE_RE = re.compile(r"^(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_URL_RE = re.compile(r"https?://[^\s'\"<>)]+")
_TOKEN_URL = "https://huggingface.co/settings/tokens"
# what an endpoint that answers, but not as the Hub does, makes huggingface_hub say (its FileMetadataError)
_NOT_A_HUB_RE = re.compile(r"X-Repo-Commit", re.IGNORECASE)
_UNREACHABLE_NAMES = ("ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "OfflineModeIsEnabled")


def hf_parts(url: str) -> tuple[str, str, str, str] | None:
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


def hf_cache_dir() -> Path:
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


def hf_job(shown: str, f: CandidateFile, what: str) -> Job:
    parts = hf_parts(f.url or "")
    if parts is None:
        raise FetchError(f"{shown}: {what}: {redact_url(f.url or '')} is not a Hugging Face file URL")
    endpoint, repo_id, revision, filename = parts
    # huggingface_hub joins both to its cache folder (snapshots/<rev>/<path>, refs/<rev>): neither may leave it
    if not safe_relpath(filename):
        raise FetchError(f"{shown}: {what}: the file path {filename!r} would leave the repository's folder; refused")
    if not safe_relpath(revision):
        raise FetchError(f"{shown}: {what}: the revision {revision!r} would leave the repository's folder; refused")
    return Job(
        f, what, "hf", endpoint=endpoint, repo_id=repo_id, revision=revision, filename=filename,
        hf_cache=hf_cache_dir(), sha256=published_sha(f),
    )  # fmt: skip


def _hf_cached(job: Job) -> Path | None:
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


def hf_plan(jobs: list[Job], *, one_folder: bool = True) -> None:
    """Mark Hugging Face files that are already cached and verified; count the bytes of the others. With
    `one_folder` (a split set, whose shards llama.cpp finds beside shard 1), all shards or none are cached."""
    hf = [j for j in jobs if j.kind == "hf"]
    for j in hf:
        cached = _hf_cached(j)
        if cached is not None and j.sha256 is not None:
            try:
                ok = check(cached.resolve(strict=True), j.sha256) is None
            except OSError:
                ok = False  # unreadable: hf_hub_download decides what to do with it
            else:
                if not ok:
                    _hf_discard(cached)  # a corrupt blob: download it again
            if ok:
                j.path = cached
                continue
        blob = hf_repo_folder(j) / "blobs" / j.sha256 if j.sha256 else None
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
    unmark(real)
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


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc`'s causes, nearest first (`raise ... from`, else the exception being handled), without loops."""
    out: list[BaseException] = []
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen and len(out) < 10:
        out.append(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return out


def _not_a_hub(exc: BaseException) -> bool:
    return type(exc).__name__ == "FileMetadataError" or bool(_NOT_A_HUB_RE.search(str(exc)))


def _unreachable(exc: BaseException) -> bool:
    names = {k.__name__ for k in type(exc).__mro__}
    return any(n in names for n in _UNREACHABLE_NAMES) or isinstance(exc, (ConnectionError, TimeoutError))


def hf_failure(exc: Exception, job: Job, token: str | None) -> str:
    """One line that names the real cause of a huggingface_hub failure (kept through its wrapping exceptions)."""
    from huggingface_hub import errors

    secrets = [token] if token else []
    endpoint = redact_url(job.endpoint)
    where = f"{job.repo_id} on {endpoint}"
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
    chain = [exc, *_causes(exc)]
    bad = next((e for e in chain if _not_a_hub(e)), None)
    if bad is not None:  # it answered, without the headers every Hub sends
        return (
            f"{endpoint} answered but is not a Hugging Face Hub (check HF_ENDPOINT): "
            f"{type(bad).__name__}: {_one_line(bad, secrets)}"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        causes = chain[1:]
        down = next((e for e in causes if _unreachable(e)), None)
        if down is not None or not causes:
            why = f" ({type(down).__name__}: {_one_line(down, secrets)})" if down is not None else ""
            return f"{where} cannot be reached{why} and the file is not in the Hugging Face cache (offline?)"
        cause = causes[0]
        return f"download from {where} failed: {type(cause).__name__}: {_one_line(cause, secrets)}"
    if isinstance(exc, errors.HfHubHTTPError):
        return f"the Hub answered {http} for {where}"
    return f"download from {where} failed: {type(exc).__name__}: {_one_line(exc, secrets)}"


def hf_download(job: Job, shown: str, progress: bool) -> Path:
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
        raise FetchError(f"{shown}: cannot download {job.what}: {hf_failure(exc, job, token)}") from None
    path = Path(str(found))
    if job.sha256 is not None:
        try:
            got = check(path.resolve(strict=True), job.sha256)
        except OSError as exc:
            raise FetchError(f"{shown}: {job.what}: cannot read {path}: {exc.strerror or exc}") from None
        if got is not None:
            _hf_discard(path)
            raise mismatch(shown, job.what, job.sha256, got)
    return path
