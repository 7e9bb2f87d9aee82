"""The catalog's on-disk cache, under `cache_dir()/catalog/`: parsed headers and repository listings.

- Headers are keyed by content hash (a Hugging Face LFS sha256, an Ollama blob digest; `header_key` combines
  the hashes of a split set's shards). Content does not change under its hash, so they never expire. They are
  stored as JSON (metadata values, tensor infos), never pickled, and come back equal to what was parsed.
- Listings (any JSON value a source wants to keep: a repository tree, a tag's manifest, a negative answer)
  are keyed by (source, key) and carry the time they were fetched. `fetch_listing` is the one policy every
  source follows: a fresh listing (`LISTING_TTL_S`) is used without asking the server unless `refresh`; `offline`
  uses only the cache; when the network fails, a stale listing stands in, with a note saying how old it is
  (`stale_note`).

Writes go to a temporary file renamed into place, so readers never see half an entry. An entry that cannot be
read or does not have the expected shape is treated as missing (and overwritten by the next store); a cache
that cannot be written is skipped. Nothing here raises for the cache's sake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from launcher.errors import CatalogError
from launcher.gguf import GGUFHeader, SkippedArray, TensorInfo
from launcher.paths import cache_dir

__all__ = [
    "LISTING_TTL_S",
    "CachedListing",
    "Listed",
    "catalog_cache_dir",
    "describe_time",
    "fetch_listing",
    "header_key",
    "load_header",
    "load_listing",
    "stale_note",
    "store_header",
    "store_listing",
]

T = TypeVar("T")

LISTING_TTL_S = 600.0  # a repository listing younger than this is used without asking the server
_FORMAT = 1  # bump when the stored shape changes: older entries are then ignored
_HEX = set("0123456789abcdef")


def catalog_cache_dir() -> Path:
    """`cache_dir()/catalog`, where headers and listings live."""
    return cache_dir() / "catalog"


def header_key(hashes: Sequence[str]) -> str:
    """The cache key of a header: the content hash of a single file, or a hash over a split set's shard hashes."""
    cleaned = [h.removeprefix("sha256:").lower() for h in hashes]
    if len(cleaned) == 1 and len(cleaned[0]) == 64 and set(cleaned[0]) <= _HEX:
        return cleaned[0]
    return hashlib.sha256("\n".join(cleaned).encode()).hexdigest()


def _header_path(key: str) -> Path:
    safe = hashlib.sha256(key.encode()).hexdigest() if not (len(key) == 64 and set(key) <= _HEX) else key
    return catalog_cache_dir() / "headers" / safe[:2] / f"{safe}.json"


def _listing_path(source: str, key: str) -> Path:
    digest = hashlib.sha256(f"{source}\n{key}".encode()).hexdigest()
    return catalog_cache_dir() / "listings" / f"{digest}.json"


def _write_atomic(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, TypeError, ValueError):
        pass  # a cache that cannot be written is no cache, not an error


def _read(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Headers


def _encode(value: Any) -> Any:
    if isinstance(value, SkippedArray):
        return {"skipped": [value.element_type, value.count]}  # metadata holds no dicts: unambiguous
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        etype, count = value["skipped"]
        if not (isinstance(etype, int) and isinstance(count, int)):
            raise TypeError("bad skipped array")
        return SkippedArray(etype, count)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if value is None:
        raise TypeError("null metadata value")
    return value


_PLACED = ("source", "shards")  # where a header is now: the caller gives them when it loads one
_STRUCTURED = ("metadata", "tensors")


def _header_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(GGUFHeader)]


def _tensor_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TensorInfo)]


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _ints(value: Any) -> Any:
    """A stored scalar field back: ints, None, and tuples of them (lists in JSON); anything else is corrupt."""
    if isinstance(value, list):
        return tuple(_ints(v) for v in value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a header field")


def store_header(key: str, header: GGUFHeader) -> None:
    """Keep `header` under `key` (see `header_key`); its `source` and `shards` are not kept (see `load_header`)."""
    tensor_fields = _tensor_fields()
    entry = {
        "format": _FORMAT,
        "key": key,
        "fields": _header_fields(),
        "tensor_fields": tensor_fields,
        "values": {
            name: _plain(getattr(header, name))
            for name in _header_fields()
            if name not in _PLACED and name not in _STRUCTURED
        },
        "metadata": {k: _encode(v) for k, v in header.metadata.items()},
        "tensors": [[_plain(getattr(t, name)) for name in tensor_fields] for t in header.tensors],
    }
    _write_atomic(_header_path(key), entry)


def load_header(key: str, *, source: str, shards: Sequence[str] | None = None) -> GGUFHeader | None:
    """The header stored under `key`, placed at `source` / `shards` (where it is now); None if missing or corrupt.

    An entry written when GGUFHeader or TensorInfo had other fields counts as missing.
    """
    entry = _read(_header_path(key))
    try:
        if not isinstance(entry, dict) or entry.get("format") != _FORMAT or entry.get("key") != key:
            return None
        tensor_fields = _tensor_fields()
        if entry["fields"] != _header_fields() or entry["tensor_fields"] != tensor_fields:
            return None
        metadata = {str(k): _decode(v) for k, v in entry["metadata"].items()}
        tensors = []
        for row in entry["tensors"]:
            if len(row) != len(tensor_fields) or not isinstance(row[0], str):
                return None
            tensors.append(TensorInfo(row[0], *(_ints(v) for v in row[1:])))
        values = {name: _ints(value) for name, value in entry["values"].items()}
        return GGUFHeader(
            **values,
            source=source,
            shards=tuple(shards) if shards else (source,),
            metadata=metadata,
            tensors=tuple(tensors),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Listings


@dataclass(frozen=True)
class CachedListing:
    """A stored listing: the JSON value a source kept, and when it was fetched (seconds since the epoch)."""

    data: Any
    fetched_at: float

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at

    def is_fresh(self, ttl_s: float | None = None, now: float | None = None) -> bool:
        """Younger than `ttl_s` (default `LISTING_TTL_S`), and not from the future."""
        return 0 <= self.age_s(now) < (LISTING_TTL_S if ttl_s is None else ttl_s)


def store_listing(source: str, key: str, data: Any, *, fetched_at: float | None = None) -> None:
    """Keep `data` (JSON-serialisable) as the listing of `key` ("endpoint|repo|revision") from `source`."""
    entry = {
        "format": _FORMAT,
        "source": source,
        "key": key,
        "fetched_at": time.time() if fetched_at is None else fetched_at,
        "data": data,
    }
    _write_atomic(_listing_path(source, key), entry)


def load_listing(source: str, key: str) -> CachedListing | None:
    """The listing stored for (`source`, `key`), fresh or not, or None if missing or corrupt."""
    entry = _read(_listing_path(source, key))
    if not isinstance(entry, dict) or entry.get("format") != _FORMAT:
        return None
    if entry.get("source") != source or entry.get("key") != key or "data" not in entry:
        return None
    fetched_at = entry.get("fetched_at")
    if not isinstance(fetched_at, (int, float)) or isinstance(fetched_at, bool):
        return None
    return CachedListing(entry["data"], float(fetched_at))


def describe_time(timestamp: float) -> str:
    """A listing's time for a note: "2026-05-01 14:03" (local time)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def stale_note(fetched_at: float) -> str:
    """The note on a listing used because the network was not: "offline: using cached listing from <time>"."""
    return f"offline: using cached listing from {describe_time(fetched_at)}"


@dataclass(frozen=True)
class Listed(Generic[T]):
    """A listing to use: fetched now, or kept (fresh); or kept and stale, because the network failed or `offline`."""

    value: T
    stale_since: float | None = None  # when the stale listing used instead of the network was fetched

    @property
    def note(self) -> str | None:
        """`stale_note` of a stale listing; None otherwise."""
        return None if self.stale_since is None else stale_note(self.stale_since)


def fetch_listing(
    source: str,
    key: str,
    *,
    decode: Callable[[Any], T | None],
    fetch: Callable[[], tuple[T, Any]],
    unreachable: type[Exception],
    never_listed: str,
    refresh: bool = False,
    offline: bool = False,
) -> Listed[T]:
    """The listing of (`source`, `key`): kept and fresh, else fetched (and kept), else kept and stale.

    `decode` turns stored data into the value (None: unusable, as if missing); `fetch()` gives (value, data to
    store) or raises `unreachable` when the network fails, which a kept listing stands in for (else it propagates).
    `offline` uses only the kept listing and raises CatalogError(`never_listed`) without one.
    """
    kept = load_listing(source, key)
    value = decode(kept.data) if kept is not None else None
    if offline:
        if kept is None or value is None:
            raise CatalogError(never_listed)
        return Listed(value, kept.fetched_at)
    if kept is not None and value is not None and not refresh and kept.is_fresh():
        return Listed(value)
    try:
        fetched, data = fetch()
    except unreachable:
        if kept is None or value is None:
            raise
        return Listed(value, kept.fetched_at)
    store_listing(source, key, data)
    return Listed(fetched)
