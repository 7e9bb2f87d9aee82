"""The router's Prometheus metrics: what render() exposes, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from launcher.service.metrics import LOAD_BUCKETS, REQUEST_BUCKETS, RouterMetrics


def samples(metrics: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of render()'s text: (sample name, sorted labels) -> value."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def families(metrics: RouterMetrics) -> dict[str, str]:
    """Each metric family's name and type, less the `_created` timestamps prometheus_client adds to counters."""
    body, _ = metrics.render()
    found = {family.name: family.type for family in text_string_to_metric_families(body.decode("utf-8"))}
    return {name: kind for name, kind in found.items() if not name.endswith("_created")}


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_router_metrics_render_is_prometheus_text():
    body, content_type = RouterMetrics().render()
    assert isinstance(body, bytes)
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain; version=")


def test_router_metrics_families_and_types():
    metrics = RouterMetrics()
    metrics.request("chat", "/v1/chat/completions", 200, 0.3)
    metrics.tokens("chat", "decode", 41.5)
    metrics.load("chat", "verified", 12.0, 0.4)
    metrics.eviction("chat", "memory")
    metrics.queue_depth("chat", 0)
    metrics.in_flight("chat", 0)
    metrics.loaded("chat", True)
    assert families(metrics) == {
        "fitquant_requests": "counter",
        "fitquant_request_duration_seconds": "histogram",
        "fitquant_tokens_per_second": "gauge",
        "fitquant_loads": "counter",
        "fitquant_load_duration_seconds": "histogram",
        "fitquant_verify_duration_seconds": "histogram",
        "fitquant_evictions": "counter",
        "fitquant_queue_depth": "gauge",
        "fitquant_requests_in_flight": "gauge",
        "fitquant_model_loaded": "gauge",
    }


def test_router_metrics_requests_count_by_model_route_status_and_time_them():
    metrics = RouterMetrics()
    metrics.request("chat", "/v1/chat/completions", 200, 0.2)
    metrics.request("chat", "/v1/chat/completions", 200, 3.0)
    metrics.request("chat", "/v1/chat/completions", "503", 0.001)
    metrics.request("embed", "/api/embed", 200, 0.05)
    got = samples(metrics)
    chat = {"model": "chat", "route": "/v1/chat/completions"}
    assert got[("fitquant_requests_total", labels(**chat, status="200"))] == 2
    assert got[("fitquant_requests_total", labels(**chat, status="503"))] == 1
    assert got[("fitquant_requests_total", labels(model="embed", route="/api/embed", status="200"))] == 1
    assert got[("fitquant_request_duration_seconds_count", labels(**chat))] == 3
    assert got[("fitquant_request_duration_seconds_sum", labels(**chat))] == pytest.approx(3.201)
    assert got[("fitquant_request_duration_seconds_bucket", labels(**chat, le="0.25"))] == 2
    assert got[("fitquant_request_duration_seconds_bucket", labels(**chat, le="2.5"))] == 2
    assert got[("fitquant_request_duration_seconds_bucket", labels(**chat, le="5.0"))] == 3
    assert got[("fitquant_request_duration_seconds_bucket", labels(**chat, le="+Inf"))] == 3
    buckets = {dict(k[1])["le"] for k in got if k[0] == "fitquant_request_duration_seconds_bucket"}
    assert buckets == {str(b) for b in REQUEST_BUCKETS} | {"+Inf"}


def test_router_metrics_tokens_per_second_keeps_the_last_measure():
    metrics = RouterMetrics()
    metrics.tokens("chat", "decode", 40.0)
    metrics.tokens("chat", "decode", 38.5)
    metrics.tokens("chat", "prefill", 1200.0)
    got = samples(metrics)
    assert got[("fitquant_tokens_per_second", labels(model="chat", phase="decode"))] == 38.5
    assert got[("fitquant_tokens_per_second", labels(model="chat", phase="prefill"))] == 1200.0


def test_router_metrics_loads_by_outcome_with_durations():
    metrics = RouterMetrics()
    metrics.load("chat", "verified", 14.0, 0.8)
    metrics.load("chat", "spill", 9.0, 0.5)
    metrics.load("chat", "verified", 3.0, 0.2)
    metrics.load("chat", "failed", 30.0, None)  # never reached verification: no verify time
    metrics.load("chat", "timeout", 600.0)
    got = samples(metrics)
    assert got[("fitquant_loads_total", labels(model="chat", outcome="verified"))] == 2
    assert got[("fitquant_loads_total", labels(model="chat", outcome="spill"))] == 1
    assert ("fitquant_loads_total", labels(model="chat", outcome="oom")) not in got
    assert got[("fitquant_loads_total", labels(model="chat", outcome="failed"))] == 1
    assert got[("fitquant_loads_total", labels(model="chat", outcome="timeout"))] == 1
    assert got[("fitquant_load_duration_seconds_count", labels(model="chat"))] == 5
    assert got[("fitquant_load_duration_seconds_sum", labels(model="chat"))] == pytest.approx(656.0)
    assert got[("fitquant_load_duration_seconds_bucket", labels(model="chat", le="5.0"))] == 1
    assert got[("fitquant_load_duration_seconds_bucket", labels(model="chat", le="10.0"))] == 2
    assert got[("fitquant_load_duration_seconds_bucket", labels(model="chat", le="300.0"))] == 4
    assert got[("fitquant_verify_duration_seconds_count", labels(model="chat"))] == 3
    assert got[("fitquant_verify_duration_seconds_sum", labels(model="chat"))] == pytest.approx(1.5)
    assert got[("fitquant_verify_duration_seconds_bucket", labels(model="chat", le="0.25"))] == 1
    assert {dict(k[1])["le"] for k in got if k[0] == "fitquant_load_duration_seconds_bucket"} == {
        str(b) for b in LOAD_BUCKETS
    } | {"+Inf"}


def test_router_metrics_evictions_by_reason():
    metrics = RouterMetrics()
    for reason in ("memory", "memory", "ttl", "keep_alive", "admin", "reload"):
        metrics.eviction("chat", reason)
    got = samples(metrics)
    assert got[("fitquant_evictions_total", labels(model="chat", reason="memory"))] == 2
    for reason in ("ttl", "keep_alive", "admin", "reload"):
        assert got[("fitquant_evictions_total", labels(model="chat", reason=reason))] == 1


def test_router_metrics_gauges_follow_the_last_value():
    metrics = RouterMetrics()
    metrics.queue_depth("chat", 3)
    metrics.in_flight("chat", 2)
    metrics.loaded("chat", True)
    metrics.loaded("coder", True)
    metrics.queue_depth("chat", 1)
    metrics.in_flight("chat", 0)
    metrics.loaded("coder", False)
    got = samples(metrics)
    assert got[("fitquant_queue_depth", labels(model="chat"))] == 1
    assert got[("fitquant_requests_in_flight", labels(model="chat"))] == 0
    assert got[("fitquant_model_loaded", labels(model="chat"))] == 1
    assert got[("fitquant_model_loaded", labels(model="coder"))] == 0


def test_router_metrics_two_instances_share_nothing():
    first, second = RouterMetrics(), RouterMetrics()  # a second one must not clash ("Duplicated timeseries")
    first.request("chat", "/api/chat", 200, 1.0)
    first.loaded("chat", True)
    second.request("chat", "/api/chat", 200, 1.0)
    second.request("chat", "/api/chat", 200, 1.0)
    assert samples(first)[("fitquant_requests_total", labels(model="chat", route="/api/chat", status="200"))] == 1
    assert samples(second)[("fitquant_requests_total", labels(model="chat", route="/api/chat", status="200"))] == 2
    assert ("fitquant_model_loaded", labels(model="chat")) not in samples(second)


def test_router_metrics_never_touch_the_global_registry():
    RouterMetrics().request("chat", "/api/chat", 200, 1.0)
    assert REGISTRY.get_sample_value("fitquant_requests_total", {"model": "chat", "route": "/api/chat",
                                                                 "status": "200"}) is None  # fmt: skip
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("fitquant_")]


def test_router_metrics_model_names_are_the_callers_contract():
    # RouterMetrics takes any model label as given: bounding them (aliases, or "unknown") is the router's job
    metrics = RouterMetrics()
    metrics.request("unknown", "/v1/chat/completions", 404, 0.01)
    metrics.request('odd "name"\n', "/v1/chat/completions", 404, 0.01)
    got = samples(metrics)
    assert got[("fitquant_requests_total", labels(model="unknown", route="/v1/chat/completions", status="404"))] == 1
    assert (
        got[("fitquant_requests_total", labels(model='odd "name"\n', route="/v1/chat/completions", status="404"))] == 1
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.tokens("chat", "generate", 1.0), "phase 'generate' is not one of prefill, decode"),
        (
            lambda m: m.load("chat", "ok", 1.0, 1.0),
            "load outcome 'ok' is not one of verified, oom, spill, crash, timeout, rejected, failed",
        ),
        (
            lambda m: m.eviction("chat", "lru"),
            "eviction reason 'lru' is not one of memory, ttl, keep_alive, admin, reload",
        ),
    ],
)
def test_router_metrics_fixed_words_are_checked(call, message):
    metrics = RouterMetrics()
    with pytest.raises(ValueError) as info:
        call(metrics)
    assert str(info.value) == message
    assert not [
        k for k in samples(metrics) if k[0].startswith(("fitquant_loads", "fitquant_evictions", "fitquant_tok"))
    ]


def test_router_metrics_count_every_way_the_run_path_ends_a_load():
    # the pool passes the last attempt's outcome: every Outcome the run path can report is a valid label
    from typing import get_args

    from launcher.attempts import Outcome

    metrics = RouterMetrics()
    for outcome in get_args(Outcome):
        metrics.load("chat", outcome, 1.0, None)
    got = samples(metrics)
    assert {dict(k[1])["outcome"] for k in got if k[0] == "fitquant_loads_total"} == set(get_args(Outcome))
