"""Candidates from a Hugging Face repository: the tree listing for files, sizes and sha256; headers by range reads.

- Listing: `GET {endpoint}/api/models/{repo}/tree/{revision}?recursive=true&expand=false`, following the
  `Link: <...>; rel="next"` pages, as `huggingface_hub.HfApi.list_repo_tree` does; entries are read with
  huggingface_hub's own `RepoFile`. The requests are made here, through `launcher.http`, not by `list_repo_tree`:
  huggingface_hub sends them without a timeout and retries them up to five times over ~23 s, and a catalog
  must give up in seconds with one line. Endpoint: `endpoint=`, else `HF_ENDPOINT`, else huggingface.co.
  Token: `huggingface_hub.get_token()` (`HF_TOKEN`, else the saved login), sent to the endpoint's host only
  (`launcher.http.hf_auth`), never to the blob store a file redirects to; it is never shown in a message.
- Grouping: `.gguf` files; split sets (`x-00001-of-00003.gguf`, also in per-quant folders) are one candidate;
  so are raw byte splits (`x.Q8_0.gguf.part1of2`, as mradermacher publishes its largest quants: one GGUF cut
  into pieces, `Candidate.raw_split`), with the summed size; a split set or raw split that lacks a file is left
  out with a note naming it. `mmproj` files are the vision companion of every candidate (`projector`), not
  quants; `mtp-` and imatrix files are left out. Labels come from names (`labels.quant_label`), else from the
  header's file type.
- Headers: `launcher.gguf.read_header` on `{endpoint}/{repo}/resolve/{revision}/{path}` (it follows the
  redirect to the blob store and reads only header bytes; given shard 1 it reads the whole split set), 8 at a
  time, through one connection pool. Headers are cached by LFS sha256 (`catalog.cache`), listings for
  `LISTING_TTL_S`: listing a repository again within that time makes no request at all, and after it only
  the tree is fetched again. With the network down (or `offline=True`, or `HF_HUB_OFFLINE=1`) a cached
  listing of any age is used, with a note on every candidate.

Every failure is one CatalogError line that starts with the model as given: unknown repository or
revision, gated repository without a token, no GGUF files, network down, 5xx, truncated answers and redirect
loops (the last three after `launcher.http`'s retries with exponential backoff).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin

from launcher.catalog import cache, labels
from launcher.catalog.local import pick_projector
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.gguf import GGUFHeader, parse_part, read_header
from launcher.http import DEFAULT_HF_ENDPOINT as DEFAULT_ENDPOINT
from launcher.http import BearerAuth, HttpFailure, call, hf_auth, hf_endpoint, make_client, status_failure, timeout
from launcher.quants import file_type_label, same_label

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_ENDPOINT", "hf_endpoint", "list_candidates", "resolve_url"]

SOURCE = "huggingface"

# Timeouts and retries: launcher.http.
_WORKERS = 8  # headers read at once
_MAX_PAGES = 1000  # a tree of a million files is not a model repository

_TOKEN_URL = "https://huggingface.co/settings/tokens"
_HTTP_STATUS_RE = re.compile(r"\bHTTP (\d{3})\b")


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


class _Fatal(HttpFailure):
    """An answer of the wrong shape: not worth another attempt."""

    def __init__(self, text: str) -> None:
        super().__init__(text, kind="body", transient=False)


class _Refused(HttpFailure):
    """401/403/404 from the Hub: `status` and its `X-Error-Code` (RepoNotFound, GatedRepo, RevisionNotFound...)."""

    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(f"HTTP {status}", kind="status", transient=False)
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

    from launcher.paths import safe_relpath

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
        if not safe_relpath(f.path):
            continue  # "../x.gguf", "/x": a name that would leave the repository's folder never becomes a file
        out.append(_Entry(f.path, size, sha256, str(f.blob_id) if f.blob_id else None))
    return out


def _get_page(
    client: httpx.Client, url: str, params: dict[str, str] | None, headers: dict[str, str]
) -> tuple[list[_Entry], str | None]:
    """One page of the tree listing: its entries and the next page's URL; one attempt (HttpFailure)."""
    response = client.get(url, params=params, headers=headers, timeout=timeout(), follow_redirects=True)
    status = response.status_code
    if status == 200:
        try:
            page = response.json()
        except ValueError:
            raise HttpFailure(
                "the tree listing is not valid JSON (a truncated answer?)", kind="body", transient=True
            ) from None
        next_url = response.links.get("next", {}).get("url")
        return _entries(page), urljoin(str(response.url), next_url) if next_url else None
    if status in (401, 403, 404):
        raise _Refused(status, response.headers.get("X-Error-Code"))
    raise status_failure(response)


def _fetch_tree(
    client: httpx.Client, endpoint: str, repo_id: str, revision: str, headers: dict[str, str], model: str, token: bool
) -> list[_Entry]:
    url: str | None = f"{endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    entries: list[_Entry] = []
    seen: set[str] = set()
    where = f"cannot list the repository at {endpoint}"

    def error(failure: HttpFailure) -> CatalogError:
        if isinstance(failure, _Refused):
            return CatalogError(f"{model}: {_refusal(failure, endpoint, revision, token)}")
        if failure.transient:
            return _Unreachable(f"{model}: {where}: {failure.text}{failure.tries}")
        return CatalogError(f"{model}: {where}: {failure.text}")

    while url is not None:
        if url in seen or len(seen) >= _MAX_PAGES:
            raise CatalogError(f"{model}: {where}: the tree listing pages do not end")
        seen.add(url)
        found, next_url = call(partial(_get_page, client, url, params, headers), error=error)
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

    def __init__(self, client: httpx.Client | None, token: str | None, endpoint: str) -> None:
        self.given = client
        # the token goes to the Hub's host only: neither httpx nor launcher.gguf sends it on to a blob store
        self.auth: BearerAuth | None = hf_auth(token, endpoint=endpoint) if token else None
        self.own: httpx.Client | None = None

    def get(self) -> httpx.Client:
        if self.given is not None:
            return self.given
        if self.own is None:
            self.own = make_client(auth=self.auth, max_connections=2 * _WORKERS)
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
    files: list[_Entry]  # in shard (or part) order
    label: str | None  # from the name; None until the header names it
    raw: bool = False  # a raw byte split: the files joined are one GGUF

    @property
    def hashes(self) -> list[str] | None:
        hashes = [f.sha256 or f.oid for f in self.files]
        return None if any(h is None for h in hashes) else [h for h in hashes if h is not None]


def _group(entries: list[_Entry]) -> tuple[list[_Group], list[_Entry], list[str]]:
    """GGUF entries -> candidate groups, projector entries, notes about incomplete split sets and raw splits."""
    ggufs = [e for e in entries if e.path.lower().endswith(".gguf")]
    projectors = [e for e in ggufs if labels.is_projector_name(e.path)]
    sets: dict[tuple[str, str, int], dict[int, _Entry]] = {}
    raw: dict[tuple[str, str, int], dict[int, _Entry]] = {}
    groups: list[_Group] = []
    for e in entries:
        part = parse_part(e.path)
        if part is not None and not labels.is_projector_name(part.joined) and not labels.is_sidecar_name(part.joined):
            raw.setdefault((e.path.rpartition("/")[0], part.joined, part.total), {})[part.index] = e
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
    for (folder, joined, total), members in raw.items():
        joined_path = f"{folder}/{joined}" if folder else joined
        missing = [i for i in range(1, total + 1) if i not in members]
        if missing:
            notes.append(f"{joined_path}: {labels.raw_split_lacks(joined, missing, total)}; left out")
            continue
        files = [members[i] for i in range(1, total + 1)]
        groups.append(_Group(files, labels.quant_label(joined_path), raw=True))
    groups.sort(key=lambda g: g.files[0].path)
    return groups, projectors, notes


def _select(groups: list[_Group], quant: str, model: str) -> list[_Group]:
    """The groups a `:QUANT` filter keeps: by label, else by file name; unnamed groups wait for their header."""
    name = quant.strip().upper()
    kept = [g for g in groups if g.label is not None and same_label(g.label, quant)]
    if not kept:
        kept = [g for g in groups if name in _file_names([f.path for f in g.files])]
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
            header = cache.load_header(key, source=urls[i][0], shards=_header_shards(g, urls[i]))
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
            header = read_header(urls[first][0], client=client, auth=http.auth)
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
                    out[i] = replace(result, source=urls[i][0], shards=tuple(_header_shards(groups[i], urls[i])))
                else:
                    out[i] = result
    return out


def _header_shards(g: _Group, urls: list[str]) -> list[str]:
    """Where a group's header says its files are: every shard, or part 1 alone for a raw split (one file)."""
    return urls[:1] if g.raw else urls


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _listing(
    model: str, endpoint: str, repo_id: str, revision: str, *, http: _Http, headers: dict[str, str],
    token: bool, refresh: bool, offline: bool,
) -> tuple[list[_Entry], str | None]:  # fmt: skip
    """The repository's file entries, and a note when they come from a stale cache."""

    def decode(data: Any) -> list[_Entry] | None:
        try:
            return [_Entry(str(p), int(s), h, o) for p, s, h, o in data]
        except (TypeError, ValueError):
            return None  # corrupt: ignore it, the next listing overwrites it

    def fetch() -> tuple[list[_Entry], Any]:
        fetched = _fetch_tree(http.get(), endpoint, repo_id, revision, headers, model, token)
        return fetched, [[e.path, e.size, e.sha256, e.oid] for e in fetched]

    listed = cache.fetch_listing(
        SOURCE,
        f"{endpoint}|{repo_id}|{revision}",
        decode=decode,
        fetch=fetch,
        unreachable=_Unreachable,
        never_listed=f"{model}: offline, and this repository has not been listed before",
        refresh=refresh,
        offline=offline,
    )
    return listed.value, listed.note


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
    with _Http(client, token, endpoint) as http:
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
        label = g.label or (file_type_label(header.get("general.file_type")) if header else None)
        single = len(g.files) == 1
        if g.raw:
            extra.append(f"raw byte split in {len(g.files)} parts: joined into one GGUF file when fetched")
        found.append(
            Candidate(
                model=model,
                source=SOURCE,
                quant=label or "unknown",
                files=tuple(_file(f, endpoint, repo_id, revision) for f in g.files),
                header=header,
                ollama_model=f"hf.co/{repo_id}:{label}" if label and single and revision == "main" else None,
                notes=(*notes, *extra),
                raw_split=g.raw,
            )
        )
    if failures and all(c.header is None for c in found):
        raise CatalogError(f"{model}: {failures[0]}")
    if projector is not None:
        found = [replace(c, projector=projector) for c in found]
    if quant is not None:
        found = _named(found, quant, model)
    found.sort(key=lambda c: (-c.size_bytes, c.quant, c.files[0].name))
    return found


def _named(found: list[Candidate], quant: str, model: str) -> list[Candidate]:
    """The candidates `quant` names: by label (any spelling) or by file name; CatalogError when none."""
    name = quant.strip().upper()
    named = [c for c in found if same_label(c.quant, quant) or name in _file_names([f.name for f in c.files])]
    if not named:
        have = ", ".join(sorted({c.quant for c in found})) or "none"
        raise CatalogError(f"{model}: no quant {quant} in this repository; available: {have}")
    return named


def _file_names(paths: list[str]) -> set[str]:
    """The upper-cased file names a `:NAME` filter matches: each file's, and the name a raw split's parts join into."""
    names = {p.rpartition("/")[2].upper() for p in paths}
    part = parse_part(paths[0]) if paths else None
    return names | {part.joined.upper()} if part is not None else names


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
