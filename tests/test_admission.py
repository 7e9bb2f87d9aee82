"""Admission: which models the router evicts, waits on or refuses for, checked against brute force."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.service.admission import (
    EXHAUSTIVE_LIMIT,
    Admission,
    Resident,
    admit,
    evictable,
    expired,
    next_group,
)
from launcher.units import GiB, MiB

NOW = 1000.0
BUDGETS = ("GPU0", "GPU1", "CPU")


def resident(
    name: str,
    gpu0: float = 0,
    *,
    used: float = 0.0,
    loaded: float = 0.0,
    in_flight: int = 0,
    pinned: bool = False,
    busy: bool = False,
    **other: float,
) -> Resident:
    """A resident holding `gpu0` GiB on GPU0 (and GiB on any other budget named by keyword), loaded long ago."""
    cost = {"GPU0": int(gpu0 * GiB), **{budget: int(gib * GiB) for budget, gib in other.items()}}
    return Resident(name, {b: v for b, v in cost.items() if v}, used, loaded, in_flight, pinned, busy)


def gib(**budgets: float) -> dict[str, int]:
    return {budget: int(value * GiB) for budget, value in budgets.items()}


def decide(need: dict[str, int], free: dict[str, int], residents: list[Resident], **kw: object) -> Admission:
    return admit("chat", need, free, residents, now=NOW, min_residency_s=60, **kw)  # type: ignore[arg-type]


# --- load ---------------------------------------------------------------------------------------------------------


def test_admission_loads_when_it_fits():
    got = decide(gib(GPU0=4, CPU=1), gib(GPU0=4, CPU=2), [resident("a", 10)])
    assert (got.action, got.victims, got.blockers, dict(got.shortfall)) == ("load", (), (), {})
    assert got.reason == "chat fits: 1.0 GiB of 2.0 GiB free on CPU, 4.0 GiB of 4.0 GiB free on GPU0"


def test_admission_budget_missing_from_free_has_nothing_free():
    got = decide(gib(GPU0=1, GPU1=1), gib(GPU0=8), [resident("a", GPU1=2)])
    assert (got.action, got.victims, dict(got.shortfall)) == ("evict", ("a",), gib(GPU1=1))


# --- evict --------------------------------------------------------------------------------------------------------


def test_admission_evicts_the_least_recently_used_that_covers():
    residents = [resident("new", 3, used=900), resident("old", 3, used=100), resident("mid", 3, used=500)]
    got = decide(gib(GPU0=4), gib(GPU0=2), residents)
    assert (got.action, got.victims, dict(got.shortfall)) == ("evict", ("old",), gib(GPU0=2))
    assert (
        got.reason == "chat needs 2.0 GiB more on GPU0 (4.0 GiB needed, 2.0 GiB free): evicting old (3.0 GiB on GPU0)"
    )


def test_admission_fewest_models_beats_least_recently_used():
    # two old small ones would cover it, but one recent big one is fewer models stopped
    residents = [resident("old1", 1, used=10), resident("old2", 1, used=20), resident("big", 3, used=900)]
    got = decide(gib(GPU0=2), {}, residents)
    assert got.victims == ("big",)


def test_admission_lru_compares_the_most_recent_use_first_then_the_next():
    # no single model covers 3 GiB; {a, c} and {b, c} share their most recent use (300), then 10 beats 20
    residents = [
        resident("a", 1, used=10),
        resident("b", 1, used=20),
        resident("c", 2, used=300),
        resident("d", 2, used=400),
    ]
    assert decide(gib(GPU0=3), {}, residents).victims == ("a", "c")
    # {a, d} holds the oldest model, but its most recent use (400) is later than {b, c}'s (300)
    residents = [
        resident("a", 1.5, used=10),
        resident("b", 2, used=20),
        resident("c", 2, used=300),
        resident("d", 2.5, used=400),
    ]
    assert decide(gib(GPU0=4), {}, residents).victims == ("b", "c")


def test_admission_same_recency_frees_fewer_bytes():
    residents = [resident("large", 8, used=5), resident("small", 3, used=5)]
    assert decide(gib(GPU0=3), {}, residents).victims == ("small",)


def test_admission_victims_are_listed_least_recently_used_first():
    residents = [resident("x", 2, used=700), resident("y", 2, used=30), resident("z", 2, used=400)]
    got = decide(gib(GPU0=6), {}, residents)
    assert got.victims == ("y", "z", "x")


def test_admission_multi_device_one_set_covers_every_budget():
    # a covers GPU0 only, b GPU1 only, c CPU only; ab holds both GPUs; the need is short on all three budgets
    residents = [
        resident("a", 4, used=1),
        resident("b", 0, used=2, GPU1=4),
        resident("c", 0, used=3, CPU=4),
        resident("ab", 2, used=800, GPU1=2, CPU=1),
        resident("cpu_big", 0, used=4, CPU=16),
    ]
    got = decide(gib(GPU0=2, GPU1=2, CPU=1), gib(GPU0=0.5, GPU1=1, CPU=0), residents)
    assert (got.action, got.victims) == ("evict", ("ab",))
    assert dict(got.shortfall) == gib(GPU0=1.5, GPU1=1, CPU=1)
    assert got.reason == (
        "chat needs 1.0 GiB more on CPU (1.0 GiB needed, 0 B free) and 1.5 GiB more on GPU0 (2.0 GiB needed,"
        " 512.0 MiB free) and 1.0 GiB more on GPU1 (2.0 GiB needed, 1.0 GiB free):"
        " evicting ab (1.0 GiB on CPU, 2.0 GiB on GPU0, 2.0 GiB on GPU1)"
    )
    # without ab, three single-budget models are needed: a, b and the older of the CPU holders
    got = decide(gib(GPU0=2, GPU1=2, CPU=1), gib(GPU0=0.5, GPU1=1, CPU=0), residents[:3] + residents[4:])
    assert got.victims == ("a", "b", "c")


@pytest.mark.parametrize(
    "blocked",
    [
        resident("r", 8, pinned=True),
        resident("r", 8, busy=True),
        resident("r", 8, in_flight=1),
        resident("r", 8, loaded=NOW - 59),  # younger than the 60 s minimum residency
    ],
    ids=["pinned", "busy", "in-flight", "young"],
)
def test_admission_never_evicts_pinned_busy_in_flight_or_young(blocked):
    got = decide(gib(GPU0=4), {}, [blocked, resident("small", 2), resident("other", 2, used=5)])
    assert got.action == "evict"
    assert got.victims == ("small", "other")
    assert not evictable(blocked, now=NOW, min_residency_s=60)


def test_admission_min_residency_is_inclusive():
    r = resident("r", 8, loaded=NOW - 60)
    assert evictable(r, now=NOW, min_residency_s=60)
    assert decide(gib(GPU0=4), {}, [r]).victims == ("r",)


# --- wait ---------------------------------------------------------------------------------------------------------


def test_admission_waits_for_a_model_in_flight():
    residents = [resident("busy_chat", 6, in_flight=2), resident("idle", 1), resident("pin", 20, pinned=True)]
    got = decide(gib(GPU0=5), gib(GPU0=1), residents)
    assert (got.action, got.victims, got.blockers) == ("wait", (), ("busy_chat",))
    assert dict(got.shortfall) == gib(GPU0=4)
    assert got.reason == (
        "chat needs 4.0 GiB more on GPU0 (5.0 GiB needed, 1.0 GiB free): waiting for busy_chat (2 requests in flight)"
    )


def test_admission_waits_for_a_young_model_and_a_loading_one():
    residents = [resident("young", 2, loaded=NOW - 12, used=NOW - 12), resident("loading", 2, busy=True, used=5)]
    got = decide(gib(GPU0=4), {}, residents)
    assert (got.action, got.blockers) == ("wait", ("loading", "young"))
    assert got.reason == (
        "chat needs 4.0 GiB more on GPU0 (4.0 GiB needed, 0 B free): waiting for loading (loading or stopping),"
        " young (loaded 12 s ago, min residency 60 s)"
    )


def test_admission_wait_names_only_the_blockers_of_the_smallest_set():
    # covering 4 GiB: {idle 2, flight 2} (one blocker) beats {flight 2, young 2} (two); 'far' is never needed
    residents = [
        resident("idle", 2, used=1),
        resident("flight", 2, in_flight=1, used=2),
        resident("young", 2, loaded=NOW - 1, used=3),
        resident("far", 1, in_flight=1, used=4),
    ]
    got = decide(gib(GPU0=4), {}, residents)
    assert (got.action, got.blockers) == ("wait", ("flight",))


def test_admission_wait_prefers_fewer_models_over_not_waiting_on_more():
    # one big model in flight covers it alone; three idle small ones would too, but the set is bigger
    residents = [resident("s1", 1), resident("s2", 1), resident("s3", 1), resident("big", 3, in_flight=1)]
    # the three idle ones cover it, so this is an eviction, not a wait: evict beats wait whatever the sizes
    assert decide(gib(GPU0=3), {}, residents).victims == ("s1", "s2", "s3")
    got = decide(gib(GPU0=3.5), {}, residents)
    assert (got.action, got.blockers) == ("wait", ("big",))


# --- refuse -------------------------------------------------------------------------------------------------------


def test_admission_refuses_when_pinned_models_hold_the_memory():
    residents = [resident("coder", 4, pinned=True), resident("a", 1.1)]
    got = decide({"GPU0": int(5.2 * GiB)}, gib(GPU0=1), residents)
    assert (got.action, got.victims, got.blockers) == ("refuse", (), ())
    assert got.reason == (
        "chat needs 3.1 GiB more on GPU0 than can be freed: 5.2 GiB needed, 1.0 GiB free,"
        " pinned coder holds 4.0 GiB, a holds 1.1 GiB"
    )


def test_admission_refusal_names_only_the_budgets_that_cannot_be_freed():
    residents = [resident("coder", 4, pinned=True, CPU=1), resident("a", 1, CPU=8)]
    got = decide(gib(GPU0=3, CPU=4), gib(GPU0=0, CPU=0), residents)
    assert got.action == "refuse"
    assert dict(got.shortfall) == gib(GPU0=3, CPU=4)
    assert got.reason == (
        "chat needs 2.0 GiB more on GPU0 than can be freed: 3.0 GiB needed, 0 B free, pinned coder holds 4.0 GiB,"
        " a holds 1.0 GiB"
    )


def test_admission_refuses_in_flight_models_do_not_count_as_freeable_when_pinned():
    got = decide(gib(GPU0=2), {}, [resident("p", 8, pinned=True, in_flight=3)])
    assert (
        got.reason
        == "chat needs 2.0 GiB more on GPU0 than can be freed: 2.0 GiB needed, 0 B free, pinned p holds 8.0 GiB"
    )


def test_admission_refusal_on_several_budgets_is_one_line():
    got = decide(gib(GPU0=2, GPU1=3), {}, [])
    assert got.reason == (
        "chat needs 2.0 GiB more on GPU0 than can be freed: 2.0 GiB needed, 0 B free;"
        " and 3.0 GiB more on GPU1 than can be freed: 3.0 GiB needed, 0 B free"
    )
    assert "\n" not in got.reason


def test_admission_refuses_a_model_bigger_than_the_empty_machine():
    # evicting 'a' would cover the shortfall as `free` reports it, but the model is bigger than GPU0 itself
    got = decide(gib(GPU0=30), gib(GPU0=6), [resident("a", 24)], total=gib(GPU0=22.5, CPU=64))
    assert (got.action, got.victims) == ("refuse", ())
    assert got.reason == "chat cannot fit even with no model loaded: 30.0 GiB needed on GPU0, 22.5 GiB usable"
    # the same with room on the empty machine is an eviction
    assert decide(gib(GPU0=30), gib(GPU0=6), [resident("a", 24)], total=gib(GPU0=31)).victims == ("a",)


def test_admission_budget_missing_from_total_is_of_unknown_size():
    # total names only the GPU: the CPU shortfall is judged by `free` and the residents alone
    got = decide(gib(GPU0=1, CPU=4), gib(GPU0=1), [resident("a", 0, CPU=8)], total=gib(GPU0=8))
    assert (got.action, got.victims) == ("evict", ("a",))


def test_admission_total_is_not_consulted_when_it_fits():
    assert decide(gib(GPU0=1), gib(GPU0=2), [], total=gib(GPU0=0.5)).action == "load"


# --- many residents: greedy cover ---------------------------------------------------------------------------------


def _covers(chosen: list[Resident], short: dict[str, int]) -> bool:
    return all(sum(r.cost.get(b, 0) for r in chosen) >= n for b, n in short.items())


def test_admission_many_residents_greedy_cover_is_valid_and_pruned():
    n = EXHAUSTIVE_LIMIT + 6
    # old ones are small, recent ones large: a greedy LRU pass takes many old ones, then pruning drops the
    # members the cover no longer needs once a larger one is in
    residents = [resident(f"m{i:02d}", 0.5 + (i % 5), used=float(i), GPU1=(i % 3)) for i in range(n)]
    residents.append(resident("pin", 50, pinned=True))
    residents.append(resident("flight", 50, in_flight=1))
    need, free = gib(GPU0=9, GPU1=3), gib(GPU0=1, GPU1=0)
    got = decide(need, free, residents)
    assert got.action == "evict"
    by_name = {r.name: r for r in residents}
    chosen = [by_name[v] for v in got.victims]
    short = dict(got.shortfall)
    assert short == gib(GPU0=8, GPU1=3)
    assert _covers(chosen, short)
    assert all(evictable(r, now=NOW, min_residency_s=60) for r in chosen)
    assert all(not _covers([c for c in chosen if c is not r], short) for r in chosen), "not pruned"
    assert [r.last_used for r in chosen] == sorted(r.last_used for r in chosen)


def test_admission_many_residents_greedy_wait_prefers_what_can_go_now():
    residents = [resident(f"m{i:02d}", 1, used=float(i)) for i in range(EXHAUSTIVE_LIMIT + 2)]
    residents.append(resident("flight", 4, in_flight=1, used=0))
    got = decide(gib(GPU0=EXHAUSTIVE_LIMIT + 3), {}, residents)
    assert (got.action, got.blockers) == ("wait", ("flight",))


# --- against brute force ------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int], list[Resident], float]:
    count = draw(st.integers(0, 8))  # brute force below tries all 2**8 subsets
    blocking = draw(st.booleans())  # half the scenarios: every resident could go, so evictions of many are common
    residents = []
    for i in range(count):
        cost = {b: draw(st.integers(0, 8)) * 256 * MiB for b in draw(st.sets(st.sampled_from(BUDGETS), min_size=1))}
        residents.append(
            Resident(
                name=f"r{i}",
                cost=cost,
                last_used=float(draw(st.integers(0, 8))),  # few values: ties in recency happen
                loaded_at=float(draw(st.integers(0, 100))) if blocking else 0.0,
                in_flight=draw(st.sampled_from([0, 0, 0, 1, 3])) if blocking else 0,
                pinned=blocking and draw(st.booleans()) and draw(st.booleans()),
                busy=blocking and draw(st.booleans()) and draw(st.booleans()),
            )
        )
    free = {b: draw(st.integers(0, 4)) * 256 * MiB for b in draw(st.sets(st.sampled_from(BUDGETS)))}
    # need: what is free plus up to a bit more than the residents hold, so every outcome is common
    need = {}
    for b in draw(st.sets(st.sampled_from(BUDGETS), min_size=1)):
        held = sum(r.cost.get(b, 0) for r in residents) // (256 * MiB)
        need[b] = max(0, free.get(b, 0) + draw(st.integers(-1, held + 1)) * 256 * MiB)
    min_residency = float(draw(st.sampled_from([0, 30, 60])))
    return need, free, residents, min_residency


def _subsets(items: list[Resident]) -> list[list[Resident]]:
    return [list(c) for size in range(len(items) + 1) for c in combinations(items, size)]


def _recency(chosen: list[Resident]) -> tuple[float, ...]:
    return tuple(sorted((r.last_used for r in chosen), reverse=True))


@settings(max_examples=600, deadline=None)
@given(scenarios())
def test_admission_matches_brute_force(scenario):
    need, free, residents, min_residency = scenario
    now = 100.0
    got = admit("m", need, free, residents, now=now, min_residency_s=min_residency)
    short = {b: n - free.get(b, 0) for b, n in need.items() if n - free.get(b, 0) > 0}
    assert dict(got.shortfall) == (short if got.action != "load" else {})
    assert got.reason and "\n" not in got.reason
    unpinned = [r for r in residents if not r.pinned]
    can_go = [r for r in unpinned if not r.busy and r.in_flight == 0 and now - r.loaded_at >= min_residency]
    evict_sets = [s for s in _subsets(can_go) if _covers(s, short)]
    if not short:
        assert (got.action, got.victims, got.blockers) == ("load", (), ())
    elif not _covers(unpinned, short):
        assert (got.action, got.victims, got.blockers) == ("refuse", (), ())
    elif evict_sets:
        assert got.action == "evict" and not got.blockers
        by_name = {r.name: r for r in residents}
        chosen = [by_name[v] for v in got.victims]
        assert all(r in can_go for r in chosen)  # never pinned, busy, in flight or young
        assert _covers(chosen, short)
        assert len(set(got.victims)) == len(got.victims)
        smallest = min(len(s) for s in evict_sets)
        assert len(chosen) == smallest
        rivals = [s for s in evict_sets if len(s) == smallest]
        assert _recency(chosen) == min(_recency(s) for s in rivals)  # least recently used
        best_bytes = min(sum(sum(r.cost.values()) for r in s) for s in rivals if _recency(s) == _recency(chosen))
        assert sum(sum(r.cost.values()) for r in chosen) == best_bytes
        assert [r.last_used for r in chosen] == sorted(r.last_used for r in chosen)
    else:
        assert got.action == "wait" and not got.victims and got.blockers
        blocked = [r for r in unpinned if r not in can_go]
        assert all(r.name in {b.name for b in blocked} for r in residents if r.name in got.blockers)
        wait_sets = [s for s in _subsets(unpinned) if _covers(s, short)]
        smallest = min(len(s) for s in wait_sets)
        fewest = min(sum(r in blocked for r in s) for s in wait_sets if len(s) == smallest)
        assert len(got.blockers) == fewest
        # a smallest covering set has exactly these blockers, the rest of it can go now
        assert any(len(s) == smallest and {r.name for r in s if r in blocked} == set(got.blockers) for s in wait_sets)


# --- expiry and queue order ---------------------------------------------------------------------------------------


def test_admission_expired_only_idle_unpinned_past_their_ttl():
    residents = [
        resident("old", 1, used=NOW - 301),
        resident("edge", 1, used=NOW - 300),  # exactly the ttl: expired
        resident("fresh", 1, used=NOW - 299),
        resident("flight", 1, used=NOW - 999, in_flight=1),
        resident("pinned", 1, used=NOW - 999, pinned=True),
        resident("busy", 1, used=NOW - 999, busy=True),
        resident("forever", 1, used=NOW - 999),
        resident("no_entry", 1, used=NOW - 999),
        resident("zero", 1, used=NOW),
    ]
    ttl = {r.name: 300.0 for r in residents} | {"forever": None, "zero": 0.0}
    del ttl["no_entry"]
    assert expired(residents, ttl, NOW) == ["old", "edge", "zero"]
    assert expired([], ttl, NOW) == []


def test_admission_next_group_serves_the_oldest_waiter_first():
    assert next_group([]) is None
    assert next_group([("a", 5.0), ("b", 1.0), ("a", 3.0), ("b", 7.0)]) == "b"
    assert next_group([("a", 2.0), ("b", 2.0)]) == "a"  # a tie goes to the one queued first


def test_admission_next_group_groups_requests_by_model():
    # A B A B arriving: serving the chosen group's requests and asking again gives A A B B
    queue = [("A", 1.0), ("B", 2.0), ("A", 3.0), ("B", 4.0)]
    served = []
    while queue:
        model = next_group(queue)
        served += [m for m, _ in queue if m == model]
        queue = [(m, t) for m, t in queue if m != model]
    assert served == ["A", "A", "B", "B"]
