"""launcher.catalog.cache.fetch_listing: the one policy for listings (fresh, fetched, stale when the network fails)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from launcher.catalog import cache
from launcher.errors import CatalogError


class Down(Exception):
    """The network failed."""


def fetch_ok(value: list[str]) -> Any:
    calls: list[int] = []

    def fetch() -> tuple[list[str], Any]:
        calls.append(1)
        return value, {"v": value}

    fetch.calls = calls  # type: ignore[attr-defined]
    return fetch


def fetch_down() -> tuple[list[str], Any]:
    raise Down("no network")


def decode(data: Any) -> list[str] | None:
    return data.get("v") if isinstance(data, dict) else None


def listing(fetch: Any, **kw: Any) -> cache.Listed[list[str]]:
    return cache.fetch_listing(
        "src", "key", decode=decode, fetch=fetch, unreachable=Down, never_listed="m: never listed", **kw
    )


def test_cache_fetches_and_keeps_then_uses_the_fresh_listing() -> None:
    first = fetch_ok(["a"])
    got = listing(first)
    assert (got.value, got.stale_since, got.note) == (["a"], None, None)
    again = fetch_ok(["b"])
    assert listing(again).value == ["a"] and again.calls == []  # fresh: the server is not asked
    assert listing(again, refresh=True).value == ["b"] and again.calls == [1]


def test_cache_falls_back_to_a_stale_listing_with_a_note() -> None:
    fetched_at = time.time() - 2 * cache.LISTING_TTL_S
    cache.store_listing("src", "key", {"v": ["old"]}, fetched_at=fetched_at)
    got = listing(fetch_down)
    assert (got.value, got.stale_since) == (["old"], fetched_at)
    assert got.note == f"offline: using cached listing from {cache.describe_time(fetched_at)}"
    assert got.note == cache.stale_note(fetched_at)


def test_cache_without_a_listing_the_failure_propagates() -> None:
    with pytest.raises(Down):
        listing(fetch_down)
    cache.store_listing("src", "key", "corrupt", fetched_at=0.0)  # unusable: as if missing
    with pytest.raises(Down):
        listing(fetch_down)


def test_cache_offline_uses_only_the_kept_listing() -> None:
    with pytest.raises(CatalogError, match=r"^m: never listed$"):
        listing(fetch_down, offline=True)
    cache.store_listing("src", "key", {"v": ["kept"]})
    got = listing(fetch_down, offline=True)
    assert got.value == ["kept"] and got.stale_since is not None  # offline always says how old the listing is
