"""Candidates from a Hugging Face repository: the tree listing for files, sizes and sha256; headers by range reads.

- Listing: `GET {endpoint}/api/models/{repo}/tree/{revision}?recursive=true&expand=false`, following the
  `Link: <...>; rel="next"` pages, as `huggingface_hub.HfApi.list_repo_tree` does; entries are read with
  huggingface_hub's own `RepoFile`. The requests are made here, through httpx, rather than by `list_repo_tree`:
  huggingface_hub sends them without a timeout and retries them up to five times over ~23 s, and a catalog
  must give up in seconds with one line. Endpoint: `endpoint=`, else `HF_ENDPOINT`, else huggingface.co.
  Token: `huggingface_hub.get_token()` (`HF_TOKEN`, else the saved login); it is never shown in a message.
- Grouping: `.gguf` files; split sets (`x-00001-of-00003.gguf`, also in per-quant folders) are one candidate;
  `mmproj` files are the vision companion of every candidate (`projector`), not quants; `mtp-` and imatrix
  files are left out. Labels come from names (`labels.quant_label`), else from the header's file type.
- Headers: `launcher.gguf.read_header` on `{endpoint}/{repo}/resolve/{revision}/{path}` (it follows the
  redirect to the blob store and reads only header bytes; given shard 1 it reads the whole split set), 8 at a
  time, through one connection pool. Headers are cached by LFS sha256 (`catalog.cache`), listings for
  `LISTING_TTL_S`: listing a repository again within that time makes no request at all, and after it only
  the tree is fetched again. With the network down (or `offline=True`, or `HF_HUB_OFFLINE=1`) a cached
  listing of any age is used, with a note on every candidate.

Every failure is one CatalogError line that starts with the model as given: unknown repository or
revision, gated repository without a token, no GGUF files, network down, 5xx, truncated answers and redirect
loops (the last three after `_ATTEMPTS` tries with exponential backoff).
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin

from launcher.catalog import cache, labels
from launcher.catalog.local import pick_projector
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.gguf import GGUFHeader, read_header

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_ENDPOINT", "hf_endpoint", "list_candidates", "resolve_url"]

DEFAULT_ENDPOINT = "https://huggingface.co"
SOURCE = "huggingface"

# Network policy (module-level so tests can shorten the waits).
_ATTEMPTS = 3
_WAIT_S = 0.5  # exponential backoff between attempts: 0.5 s, 1 s
_WAIT_MAX_S = 4.0
_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0
_WORKERS = 8  # headers read at once
_MAX_PAGES = 1000  # a tree of a million files is not a model repository

_TOKEN_URL = "https://huggingface.co/settings/tokens"
_HTTP_STATUS_RE = re.compile(r"\bHTTP (\d{3})\b")


def hf_endpoint(endpoint: str | None = None) -> str:
    """The Hub to ask: `endpoint`, else `HF_ENDPOINT`, else https://huggingface.co (no trailing slash)."""
    value = endpoint or os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    return value.rstrip("/")


def resolve_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    """The download URL of `path`, as huggingface_hub's `hf_hub_url` builds it (path and revision percent-encoded)."""
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token(model: str) -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception as exc:  # huggingface_hub's token lookup (OIDC exchange, token file) is its own edge
        raise CatalogError(f"{model}: cannot get the Hugging Face token: {type(exc).__name__}") from None


# ---------------------------------------------------------------------------------------------------------------
# The tree listing (HTTP)


class _Transient(Exception):
    """Worth another attempt: network error, timeout, 408/429/5xx, a truncated or unreadable answer."""


class _Fatal(Exception):
    """Not worth another attempt: a redirect loop, an answer of the wrong shape, an unexpected status."""


class _Refused(Exception):
    """401/403/404 from the Hub: `status` and its `X-Error-Code` (RepoNotFound, GatedRepo, RevisionNotFound...)."""

    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(status, code)
        self.status = status
        self.code = code


class _Unreachable(CatalogError):
    """The listing failed for a reason a cached listing can stand in for (network down, 5xx, truncated)."""


@dataclass(frozen=True)
class _Entry:
    path: str
    size: int
    sha256: str | None  # LFS sha256
    oid: str | None  # git blob id


def _entries(page: Any) -> list[_Entry]:
    from huggingface_hub.hf_api import RepoFile

    if not isinstance(page, list):
        raise _Fatal(f"the tree listing is a JSON {type(page).__name__}, not a list")
    out = []
    for item in page:
        if not isinstance(item, dict) or item.get("type") != "file":
            continue
        try:
            f = RepoFile(**item)  # type: ignore[no-untyped-call]
            size = int(f.lfs.size if f.lfs is not None else f.size)
            sha256 = str(f.lfs.sha256) if f.lfs is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise _Fatal(f"unexpected tree entry {str(item)[:80]!r} ({type(exc).__name__}: {exc})") from None
        if not isinstance(f.path, str) or size < 0:
            raise _Fatal(f"unexpected tree entry {str(item)[:80]!r}")
        out.append(_Entry(f.path, size, sha256, str(f.blob_id) if f.blob_id else None))
    return out


def _get_page(
    client: httpx.Client, url: str, params: dict[str, str] | None, headers: dict[str, str]
) -> tuple[Any, str | None]:
    import httpx

    try:
        response = client.get(url, params=params, headers=headers, timeout=_timeout(), follow_redirects=True)
    except httpx.TooManyRedirects:
        raise _Fatal("too many redirects (a redirect loop?)") from None
    except httpx.TransportError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    status = response.status_code
    if status == 200:
        try:
            page = response.json()
        except ValueError:
            raise _Transient("the tree listing is not valid JSON (a truncated answer?)") from None
        next_url = response.links.get("next", {}).get("url")
        return page, urljoin(str(response.url), next_url) if next_url else None
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status in (401, 403, 404):
        raise _Refused(status, response.headers.get("X-Error-Code"))
    if status in (408, 429) or status >= 500:
        raise _Transient(reason)
    raise _Fatal(reason)


def _timeout() -> httpx.Timeout:
    import httpx

    return httpx.Timeout(_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)


def _retrying() -> Any:
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    return Retrying(
        stop=stop_after_attempt(_ATTEMPTS),
        wait=wait_exponential(multiplier=_WAIT_S, max=_WAIT_MAX_S),
        retry=retry_if_exception_type(_Transient),
        reraise=True,
    )


def _fetch_tree(
    client: httpx.Client, endpoint: str, repo_id: str, revision: str, headers: dict[str, str], model: str, token: bool
) -> list[_Entry]:
    url: str | None = f"{endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    entries: list[_Entry] = []
    seen: set[str] = set()
    where = f"cannot list the repository at {endpoint}"
    while url is not None:
        if url in seen or len(seen) >= _MAX_PAGES:
            raise CatalogError(f"{model}: {where}: the tree listing pages do not end")
        seen.add(url)
        attempts = 0
        try:
            for attempt in _retrying():
                with attempt:
                    attempts += 1
                    page, next_url = _get_page(client, url, params, headers)
                    found = _entries(page)
        except _Transient as exc:
            tries = f" (after {attempts} attempts)" if attempts > 1 else ""
            raise _Unreachable(f"{model}: {where}: {exc}{tries}") from None
        except _Fatal as exc:
            raise CatalogError(f"{model}: {where}: {exc}") from None
        except _Refused as exc:
            raise CatalogError(f"{model}: {_refusal(exc, endpoint, revision, token)}") from None
        entries.extend(found)
        url, params = next_url, None
    return entries


def _refusal(exc: _Refused, endpoint: str, revision: str, token: bool) -> str:
    http = f"HTTP {exc.status}"
    if exc.code == "RevisionNotFound":
        return f"no revision {revision!r} in this repository ({http})"
    if exc.code == "EntryNotFound":
        return f"a listed file is missing from the repository ({http})"
    if exc.code == "RepoNotFound" or (exc.status == 404 and exc.code != "GatedRepo"):
        hint = "" if token else " (a private repository needs HF_TOKEN)"
        return f"no such repository on {endpoint} ({http}); check the name{hint}"
    return _denied(http, token)


def _denied(http: str, token: bool) -> str:
    if token:
        return (
            f"access denied with the token in HF_TOKEN ({http}): the repository is gated or private; "
            "request access on its page, or use a token that has it"
        )
    return f"the repository is gated or private ({http}): set HF_TOKEN to a token that has access ({_TOKEN_URL})"


class _Http:
    """The HTTP client of one listing: the caller's, else one opened on first use (a listing served from the
    cache opens none: creating a client costs ~20 ms of TLS setup) and closed with the listing."""

    def __init__(self, client: httpx.Client | None, token: str | None) -> None:
        self.given = client
        self.token = token
        self.own: httpx.Client | None = None

    def get(self) -> httpx.Client:
        if self.given is not None:
            return self.given
        if self.own is None:
            import httpx

            headers = {"User-Agent": "fitquant"}
            if self.token:
                # httpx drops it on redirects to another host, and launcher.gguf never sends it to one
                headers["Authorization"] = f"Bearer {self.token}"
            limits = httpx.Limits(max_connections=2 * _WORKERS, max_keepalive_connections=2 * _WORKERS)
            self.own = httpx.Client(follow_redirects=True, timeout=_timeout(), headers=headers, limits=limits)
        return self.own

    def __enter__(self) -> _Http:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.own is not None:
            self.own.close()


# ---------------------------------------------------------------------------------------------------------------
# Listing -> groups of files


@dataclass
class _Group:
    files: list[_Entry]  # in shard order
    label: str | None  # from the name; None until the header names it

    @property
    def hashes(self) -> list[str] | None:
        hashes = [f.sha256 or f.oid for f in self.files]
        return None if any(h is None for h in hashes) else [h for h in hashes if h is not None]


def _group(entries: list[_Entry]) -> tuple[list[_Group], list[_Entry], list[str]]:
    """GGUF entries -> candidate groups, projector entries, notes about incomplete split sets."""
    ggufs = [e for e in entries if e.path.lower().endswith(".gguf")]
    projectors = [e for e in ggufs if labels.is_projector_name(e.path)]
    sets: dict[tuple[str, str, int], dict[int, _Entry]] = {}
    groups: list[_Group] = []
    for e in ggufs:
        if e in projectors or labels.is_sidecar_name(e.path):
            continue
        shard = labels.parse_shard(e.path)
        if shard is None:
            groups.append(_Group([e], labels.quant_label(e.path)))
        else:
            folder = e.path.rpartition("/")[0]
            sets.setdefault((folder, shard.prefix, shard.total), {})[shard.index] = e
    notes = []
    for (folder, prefix, total), members in sets.items():
        first_name = labels.ShardName(prefix, 1, total).name(1)
        first_path = f"{folder}/{first_name}" if folder else first_name
        missing = [i for i in range(1, total + 1) if i not in members]
        if missing:
            notes.append(
                f"{first_path}: split set of {total} files lacks {len(missing)} (shard {missing[0]} first); left out"
            )
            continue
        files = [members[i] for i in range(1, total + 1)]
        groups.append(_Group(files, labels.quant_label(first_path)))
    groups.sort(key=lambda g: g.files[0].path)
    return groups, projectors, notes


def _select(groups: list[_Group], quant: str, model: str) -> list[_Group]:
    """The groups a `:QUANT` filter keeps: by label, else by file name; unnamed groups wait for their header."""
    want = labels.normalize_label(quant)
    kept = [g for g in groups if g.label is not None and g.label.upper() == want]
    if not kept:
        kept = [g for g in groups if any(f.path.rpartition("/")[2].upper() == want for f in g.files)]
    kept += [g for g in groups if g.label is None]
    if not kept:
        have = ", ".join(sorted({g.label for g in groups if g.label})) or "none"
        raise CatalogError(f"{model}: no quant {quant} in this repository; available: {have}")
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Headers


def _cause(exc: GGUFFormatError) -> str:
    """The message of a header error without the URL it starts with (the caller names the file)."""
    text = str(exc)
    if exc.source and text.startswith(exc.source):
        text = text[len(exc.source) :]
        text = re.sub(r"^ at byte \d+", "", text).removeprefix(": ")
    return text


def _header_failure(path: str, exc: GGUFFormatError, token: bool) -> str:
    cause = _cause(exc)
    m = _HTTP_STATUS_RE.search(cause)
    if m and m[1] in ("401", "403"):
        return _denied(f"HTTP {m[1]}", token)
    return f"cannot read the GGUF header of {path}: {cause}"


def _read_headers(
    groups: list[_Group], urls: dict[int, list[str]], http: _Http, offline: bool
) -> dict[int, GGUFHeader | GGUFFormatError | None]:
    """Headers by group index: from the cache, else read (8 at a time, once per content hash); None when offline."""
    out: dict[int, GGUFHeader | GGUFFormatError | None] = {}
    to_read: dict[str, list[int]] = {}  # cache key (or a private key) -> groups with that content
    for i, g in enumerate(groups):
        hashes = g.hashes
        key = cache.header_key(hashes) if hashes else f"uncached-{i}"
        if hashes:
            header = cache.load_header(key, source=urls[i][0], shards=urls[i])
            if header is not None:
                out[i] = header
                continue
        if offline:
            out[i] = None
            continue
        to_read.setdefault(key, []).append(i)
    if not to_read:
        return out
    client = http.get()

    def read(key: str) -> GGUFHeader | GGUFFormatError:
        first = to_read[key][0]
        try:
            header = read_header(urls[first][0], client=client)
        except GGUFFormatError as exc:
            return exc
        if not key.startswith("uncached-"):
            cache.store_header(key, header)
        return header

    keys = list(to_read)
    with ThreadPoolExecutor(max_workers=min(_WORKERS, len(keys)), thread_name_prefix="fitquant-hf") as pool:
        for key, result in zip(keys, pool.map(read, keys), strict=True):
            for i in to_read[key]:
                if isinstance(result, GGUFHeader) and i != to_read[key][0]:
                    # the same content under another name: the same header, at its own URLs
                    out[i] = replace(result, source=urls[i][0], shards=tuple(urls[i]))
                else:
                    out[i] = result
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _listing(
    model: str, endpoint: str, repo_id: str, revision: str, *, http: _Http, headers: dict[str, str],
    token: bool, refresh: bool, offline: bool,
) -> tuple[list[_Entry], str | None]:  # fmt: skip
    """The repository's file entries, and a note when they come from a stale cache."""
    key = f"{endpoint}|{repo_id}|{revision}"
    cached = cache.load_listing(SOURCE, key)
    entries = None
    if cached is not None:
        try:
            entries = [_Entry(str(p), int(s), h, o) for p, s, h, o in cached.data]
        except (TypeError, ValueError):
            cached = entries = None  # corrupt: ignore it, the next listing overwrites it
    if offline:
        if cached is None or entries is None:
            raise CatalogError(f"{model}: offline, and this repository has not been listed before")
        return entries, f"offline: using cached listing from {cache.describe_time(cached.fetched_at)}"
    if cached is not None and entries is not None and not refresh and cached.is_fresh():
        return entries, None
    try:
        fetched = _fetch_tree(http.get(), endpoint, repo_id, revision, headers, model, token)
    except _Unreachable as exc:
        if cached is None or entries is None:
            raise CatalogError(str(exc)) from None
        return entries, f"offline: using cached listing from {cache.describe_time(cached.fetched_at)}"
    cache.store_listing(SOURCE, key, [[e.path, e.size, e.sha256, e.oid] for e in fetched], fetched_at=time.time())
    return fetched, None


def list_candidates(
    repo_id: str,
    *,
    model: str | None = None,
    quant: str | None = None,
    revision: str = "main",
    client: httpx.Client | None = None,
    endpoint: str | None = None,
    refresh: bool = False,
    offline: bool = False,
) -> list[Candidate]:
    """One Candidate per quant of Hugging Face repository `repo_id` ("user/repo"), largest first, with headers.

    `quant` keeps one label (case-insensitive; a file name also works). `refresh` re-fetches the listing even
    if the cached one is fresh (headers stay cached: they are keyed by content). `offline` (or HF_HUB_OFFLINE)
    uses only the cache. `model` is the reference to name in messages (default: `repo_id`).
    """
    model = model or repo_id
    endpoint = hf_endpoint(endpoint)
    offline = offline or _offline_env()
    token = None if offline else _token(model)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with _Http(client, token) as http:
        entries, stale_note = _listing(
            model, endpoint, repo_id, revision, http=http, headers=headers, token=bool(token),
            refresh=refresh, offline=offline,
        )  # fmt: skip
        groups, projectors, notes = _group(entries)
        if not groups:
            raise CatalogError(f"{model}: {_no_gguf(entries, projectors, notes)}")
        if quant is not None:
            groups = _select(groups, quant, model)
        urls = {i: [resolve_url(endpoint, repo_id, revision, f.path) for f in g.files] for i, g in enumerate(groups)}
        headers_by_group = _read_headers(groups, urls, http, offline)
    if stale_note:
        notes.insert(0, stale_note)

    projector_entry = pick_projector([e.path for e in projectors])
    projector = next((_file(e, endpoint, repo_id, revision) for e in projectors if e.path == projector_entry), None)
    found: list[Candidate] = []
    failures: list[str] = []
    for i, g in enumerate(groups):
        result = headers_by_group.get(i)
        header = result if isinstance(result, GGUFHeader) else None
        extra: list[str] = []
        if isinstance(result, GGUFFormatError):
            failures.append(_header_failure(g.files[0].path, result, bool(token)))
            extra.append(f"header unreadable: {failures[-1]}")
        elif result is None:
            extra.append("offline: header not cached")
        if header is not None and labels.is_projector_header(header):
            if projector is None:
                projector = _file(g.files[0], endpoint, repo_id, revision)
            continue
        label = g.label or (labels.label_from_file_type(header.get("general.file_type")) if header else None)
        single = len(g.files) == 1
        found.append(
            Candidate(
                model=model,
                source=SOURCE,
                quant=label or "unknown",
                files=tuple(_file(f, endpoint, repo_id, revision) for f in g.files),
                header=header,
                ollama_model=f"hf.co/{repo_id}:{label}" if label and single and revision == "main" else None,
                notes=(*notes, *extra),
            )
        )
    if failures and all(c.header is None for c in found):
        raise CatalogError(f"{model}: {failures[0]}")
    if projector is not None:
        found = [replace(c, projector=projector) for c in found]
    if quant is not None:
        want = labels.normalize_label(quant)
        named = [
            c
            for c in found
            if c.quant.upper() == want or any(f.name.rpartition("/")[2].upper() == want for f in c.files)
        ]
        if not named:
            have = ", ".join(sorted({c.quant for c in found})) or "none"
            raise CatalogError(f"{model}: no quant {quant} in this repository; available: {have}")
        found = named
    found.sort(key=lambda c: (-c.size_bytes, c.quant, c.files[0].name))
    return found


def _file(e: _Entry, endpoint: str, repo_id: str, revision: str) -> CandidateFile:
    return CandidateFile(
        name=e.path, size_bytes=e.size, url=resolve_url(endpoint, repo_id, revision, e.path), sha256=e.sha256
    )


def _no_gguf(entries: list[_Entry], projectors: list[_Entry], notes: list[str]) -> str:
    if notes:
        return notes[0]
    if projectors:
        return "the repository holds only vision projectors (mmproj), no model GGUF files"
    if not entries:
        return "the repository is empty: no GGUF files"
    shown = ", ".join(e.path for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (
        f"no GGUF files in this repository ({len(entries)} files: {shown}); "
        "fitquant needs GGUF files, as in the -GGUF repositories"
    )
