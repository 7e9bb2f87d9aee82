"""Admission: may a model load now, and which resident models must go first (pure; the router does the I/O).

    decision = admit("chat", need={"GPU0": 5 * GiB}, free={"GPU0": 1 * GiB}, residents=pool_view,
                     now=time.monotonic(), min_residency_s=30)
    decision.action     # "load" | "evict" (stop decision.victims first) | "wait" (on decision.blockers) | "refuse"

A resident is evictable when it is unpinned, not loading or stopping, has no request in flight and has been loaded
for at least the minimum residency. The victims are the fewest evictable residents that cover the shortfall on
every budget at once, least recently used preferred. `wait` means the memory exists but is held by models that
cannot go yet (busy, in flight, too young); `refuse` means it cannot be freed at all (pinned models hold it, or the
model is bigger than the machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from launcher.units import format_bytes

# Up to this many candidate residents the smallest cover is found by trying every set (2**14 subsets at most,
# well under a millisecond each); beyond it a greedy cover, then pruned.
EXHAUSTIVE_LIMIT = 14


@dataclass(frozen=True)
class Resident:
    """A model that holds memory now (loaded, or being loaded/stopped), as admission sees it."""

    name: str
    cost: Mapping[str, int]  # bytes it holds per budget ("GPU0", "GPU1", "CPU")
    last_used: float  # monotonic s: end of its last request (or its load)
    loaded_at: float  # monotonic s
    in_flight: int  # requests running on it now
    pinned: bool
    busy: bool = False  # loading or stopping: never a victim, and its memory is not free


@dataclass(frozen=True)
class Admission:
    """What the router does about one load: load now, evict `victims` first, wait on `blockers`, or refuse."""

    action: Literal["load", "evict", "wait", "refuse"]
    victims: tuple[str, ...] = ()  # evict: stop these first, least recently used first
    # wait: the models (in flight, younger than min residency, or busy) whose memory is needed; the caller waits
    # until one of them changes, then asks again
    blockers: tuple[str, ...] = ()
    shortfall: Mapping[str, int] = field(default_factory=dict)  # bytes short per budget before evicting
    reason: str = ""  # one line for logs and the 503


def evictable(resident: Resident, *, now: float, min_residency_s: float) -> bool:
    """Whether `resident` may be stopped now to make room: unpinned, idle, not busy, resident long enough."""
    return (
        not resident.pinned
        and not resident.busy
        and resident.in_flight == 0
        and now - resident.loaded_at >= min_residency_s
    )


def shortfall_of(need: Mapping[str, int], free: Mapping[str, int]) -> dict[str, int]:
    """Bytes short per budget: need - free where positive (a budget missing from `free` has 0 free)."""
    short = {budget: amount - free.get(budget, 0) for budget, amount in need.items()}
    return {budget: amount for budget, amount in short.items() if amount > 0}


def admit(
    name: str,
    need: Mapping[str, int],
    free: Mapping[str, int],
    residents: Sequence[Resident],
    *,
    now: float,
    min_residency_s: float,
    total: Mapping[str, int] | None = None,
) -> Admission:
    """Decide whether `name` (needing `need` bytes per budget) loads now, after evictions, later, or never.

    `free` is each budget's free bytes now, already less the reserve and what residents hold. `total`, each
    budget's usable size with nothing loaded, lets a refusal say that the model cannot fit even then.
    """
    short = shortfall_of(need, free)
    if not short:
        return Admission("load", reason=f"{name} fits: {_fits_text(need, free)}")
    if total is not None:
        # a budget `total` does not name is of unknown size: only `free` speaks for it
        too_big = [b for b in sorted(short) if b in total and need[b] > total[b]]
        if too_big:
            return Admission("refuse", shortfall=short, reason=_too_big_reason(name, too_big, need, total))
    unpinned = [r for r in residents if not r.pinned and _helps(r, short)]
    if not _covers(unpinned, short):
        return Admission("refuse", shortfall=short, reason=_refuse_reason(name, short, need, free, residents))
    free_now = [r for r in unpinned if evictable(r, now=now, min_residency_s=min_residency_s)]
    chosen = _smallest_cover(free_now, short)
    if chosen is not None:
        victims = _by_lru(chosen)
        described = ", ".join(f"{r.name} ({_holds_text(r, short)})" for r in victims)
        return Admission(
            "evict",
            victims=tuple(r.name for r in victims),
            shortfall=short,
            reason=f"{name} needs {_short_text(short, need, free)}: evicting {described}",
        )
    blocked = {r.name for r in unpinned} - {r.name for r in free_now}
    chosen = _smallest_cover(unpinned, short, blocked=blocked)
    assert chosen is not None  # every unpinned resident together covers it (checked above)
    blockers = [r for r in _by_lru(chosen) if r.name in blocked]
    described = ", ".join(f"{r.name} ({_why_blocked(r, now, min_residency_s)})" for r in blockers)
    return Admission(
        "wait",
        blockers=tuple(r.name for r in blockers),
        shortfall=short,
        reason=f"{name} needs {_short_text(short, need, free)}: waiting for {described}",
    )


def expired(residents: Sequence[Resident], ttl_s: Mapping[str, float | None], now: float) -> list[str]:
    """Idle, unpinned, not busy residents unused for at least their ttl (None or absent: never), LRU first."""
    out = []
    for resident in _by_lru(residents):
        ttl = ttl_s.get(resident.name)
        if ttl is None or resident.pinned or resident.busy or resident.in_flight:
            continue
        if now - resident.last_used >= ttl:
            out.append(resident.name)
    return out


def next_group(waiting: Sequence[tuple[str, float]]) -> str | None:
    """The model to load next among queued requests (model, enqueued at): the one whose oldest waiter is oldest.

    Requests are served grouped by model (A B A B arriving is served A A B B), so each load serves every request
    queued for it; on a tie the model queued first in `waiting` wins.
    """
    best: tuple[str, float] | None = None
    for model, enqueued in waiting:
        if best is None or enqueued < best[1]:
            best = (model, enqueued)
    return None if best is None else best[0]


def _helps(resident: Resident, short: Mapping[str, int]) -> bool:
    return any(resident.cost.get(budget, 0) > 0 for budget in short)


def _covers(chosen: Iterable[Resident], short: Mapping[str, int]) -> bool:
    chosen = list(chosen)
    return all(sum(r.cost.get(budget, 0) for r in chosen) >= amount for budget, amount in short.items())


def _by_lru(residents: Iterable[Resident]) -> list[Resident]:
    return sorted(residents, key=lambda r: (r.last_used, r.name))


def _preference(chosen: Sequence[Resident], blocked: set[str]) -> tuple[object, ...]:
    # fewer models, then fewer that must be waited for, then the least recently used (compare the most recent
    # use in each set, then the next, ...), then fewer bytes freed, then names (a stable answer)
    recency = tuple(sorted((r.last_used for r in chosen), reverse=True))
    freed = sum(sum(r.cost.values()) for r in chosen)
    names = tuple(sorted(r.name for r in chosen))
    return (len(chosen), sum(r.name in blocked for r in chosen), recency, freed, names)


def _smallest_cover(
    candidates: Sequence[Resident], short: Mapping[str, int], *, blocked: set[str] | None = None
) -> list[Resident] | None:
    """The preferred set of `candidates` covering `short` on every budget, or None if even all of them do not."""
    blocked = blocked or set()
    if not _covers(candidates, short):
        return None
    if len(candidates) > EXHAUSTIVE_LIMIT:
        return _greedy_cover(candidates, short, blocked)
    for size in range(1, len(candidates) + 1):
        covering = [list(c) for c in combinations(candidates, size) if _covers(c, short)]
        if covering:
            return min(covering, key=lambda c: _preference(c, blocked))
    return None  # unreachable: the full set covers


def _greedy_cover(candidates: Sequence[Resident], short: Mapping[str, int], blocked: set[str]) -> list[Resident]:
    # take the ones that can go now before the ones to wait for, least recently used first, until covered; then
    # drop members the cover does not need, the last taken (most recent, or blocked) first
    order = sorted(candidates, key=lambda r: (r.name in blocked, r.last_used, r.name))
    chosen: list[Resident] = []
    for resident in order:
        chosen.append(resident)
        if _covers(chosen, short):
            break
    for resident in reversed(list(chosen)):
        rest = [r for r in chosen if r is not resident]
        if _covers(rest, short):
            chosen = rest
    return chosen


def _fits_text(need: Mapping[str, int], free: Mapping[str, int]) -> str:
    parts = [f"{format_bytes(n)} of {format_bytes(free.get(b, 0))} free on {b}" for b, n in sorted(need.items())]
    return ", ".join(parts) if parts else "needs no memory"


def _short_text(short: Mapping[str, int], need: Mapping[str, int], free: Mapping[str, int]) -> str:
    return " and ".join(
        f"{format_bytes(amount)} more on {b} ({format_bytes(need[b])} needed, {format_bytes(free.get(b, 0))} free)"
        for b, amount in sorted(short.items())
    )


def _holds_text(resident: Resident, short: Mapping[str, int]) -> str:
    held = [f"{format_bytes(resident.cost[b])} on {b}" for b in sorted(short) if resident.cost.get(b, 0) > 0]
    return ", ".join(held)


def _why_blocked(resident: Resident, now: float, min_residency_s: float) -> str:
    if resident.busy:
        return "loading or stopping"
    if resident.in_flight:
        return f"{resident.in_flight} request{'s' if resident.in_flight != 1 else ''} in flight"
    return f"loaded {now - resident.loaded_at:.0f} s ago, min residency {min_residency_s:.0f} s"


def _refuse_reason(
    name: str,
    short: Mapping[str, int],
    need: Mapping[str, int],
    free: Mapping[str, int],
    residents: Sequence[Resident],
) -> str:
    clauses = []
    for budget, amount in sorted(short.items()):
        freeable = sum(r.cost.get(budget, 0) for r in residents if not r.pinned)
        if freeable >= amount:
            continue
        holders = sorted((r for r in residents if r.cost.get(budget, 0) > 0), key=lambda r: (not r.pinned, r.name))
        held = [f"{'pinned ' if r.pinned else ''}{r.name} holds {format_bytes(r.cost[budget])}" for r in holders]
        figures = [f"{format_bytes(need[budget])} needed", f"{format_bytes(free.get(budget, 0))} free", *held]
        clauses.append(f"{format_bytes(amount - freeable)} more on {budget} than can be freed: {', '.join(figures)}")
    return f"{name} needs {'; and '.join(clauses)}"


def _too_big_reason(name: str, budgets: Sequence[str], need: Mapping[str, int], total: Mapping[str, int]) -> str:
    parts = [f"{format_bytes(need[b])} needed on {b}, {format_bytes(total[b])} usable" for b in budgets]
    return f"{name} cannot fit even with no model loaded: {'; '.join(parts)}"
