"""The router's Prometheus metrics (`GET /metrics`), one private registry per router.

    metrics = RouterMetrics()
    metrics.request("chat", "/v1/chat/completions", 200, 1.25)
    body, content_type = metrics.render()

Contract with the caller: every label value is one of the profile's model aliases or a fixed word (routes, status
codes, the outcome/reason/phase words below). RouterMetrics does not check model names: the router passes
"unknown" for a model it does not serve, so a client cannot create unbounded series. The fixed words are checked
(a misspelt one is a bug in the router, not a new series).
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from launcher.attempts import Outcome

PHASES = ("prefill", "decode")
# how a load ended: each outcome of the run path's last attempt (launcher.attempts), or "failed" for an error
# before any attempt
LOAD_OUTCOMES: tuple[str, ...] = (*get_args(Outcome), "failed")
EVICTION_REASONS = ("memory", "ttl", "keep_alive", "admin", "reload")

# Requests to a model server run from milliseconds (an embedding) to minutes (a long generation); loads and
# verification from about a second (a small model, warm page cache) to several minutes (a cold 70B read from disk).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
VERIFY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class RouterMetrics:
    """The counters, gauges and histograms one router exposes, in a registry of its own (never the global one:
    several routers may live in one process, as in the tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "fitquant_requests", "Requests answered, by model alias, route and HTTP status.",
            ["model", "route", "status"], registry=r,
        )  # fmt: skip
        self._request_seconds = Histogram(
            "fitquant_request_duration_seconds", "Time from a request's arrival to the end of its answer.",
            ["model", "route"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._tokens_per_second = Gauge(
            "fitquant_tokens_per_second", "The last measured speed, by model alias and phase (prefill or decode).",
            ["model", "phase"], registry=r,
        )  # fmt: skip
        self._loads = Counter(
            "fitquant_loads", f"Model loads, by outcome: {', '.join(LOAD_OUTCOMES)}.", ["model", "outcome"],
            registry=r,
        )  # fmt: skip
        self._load_seconds = Histogram(
            "fitquant_load_duration_seconds", "Time to start a model server until it answers.", ["model"],
            buckets=LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self._verify_seconds = Histogram(
            "fitquant_verify_duration_seconds", "Time to verify where a loaded model landed.", ["model"],
            buckets=VERIFY_BUCKETS, registry=r,
        )  # fmt: skip
        self._evictions = Counter(
            "fitquant_evictions", "Models stopped, by reason: memory, ttl, keep_alive, admin or reload.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self._queue_depth = Gauge(
            "fitquant_queue_depth", "Requests waiting for a model to load.", ["model"], registry=r
        )
        self._in_flight = Gauge(
            "fitquant_requests_in_flight", "Requests running on a model now.", ["model"], registry=r
        )
        self._loaded = Gauge("fitquant_model_loaded", "1 while a model is loaded and verified, else 0.", ["model"],
                             registry=r)  # fmt: skip

    def request(self, model: str, route: str, status: int | str, seconds: float) -> None:
        """Count one answered request and observe how long it took."""
        self._requests.labels(model, route, str(status)).inc()
        self._request_seconds.labels(model, route).observe(seconds)

    def tokens(self, model: str, phase: str, per_second: float) -> None:
        """Record the last measured speed of `model` in `phase` ("prefill" or "decode")."""
        self._tokens_per_second.labels(model, _checked(phase, PHASES, "phase")).set(per_second)

    def load(self, model: str, outcome: str, load_seconds: float, verify_seconds: float | None = None) -> None:
        """Count one load by outcome (LOAD_OUTCOMES: "verified", "oom", "spill", ..., "failed") and observe how
        long it took; `verify_seconds` None (a load that never reached verification) observes no verify time."""
        self._loads.labels(model, _checked(outcome, LOAD_OUTCOMES, "load outcome")).inc()
        self._load_seconds.labels(model).observe(load_seconds)
        if verify_seconds is not None:
            self._verify_seconds.labels(model).observe(verify_seconds)

    def eviction(self, model: str, reason: str) -> None:
        """Count one model stopped, by reason ("memory", "ttl", "keep_alive", "admin", "reload")."""
        self._evictions.labels(model, _checked(reason, EVICTION_REASONS, "eviction reason")).inc()

    def queue_depth(self, model: str, n: int) -> None:
        """Set how many requests wait for `model` to load."""
        self._queue_depth.labels(model).set(n)

    def in_flight(self, model: str, n: int) -> None:
        """Set how many requests run on `model` now."""
        self._in_flight.labels(model).set(n)

    def loaded(self, model: str, is_loaded: bool) -> None:
        """Set whether `model` is loaded (1) or not (0)."""
        self._loaded.labels(model).set(1 if is_loaded else 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of this router's metrics and its content type, for `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _checked(word: str, allowed: tuple[str, ...], what: str) -> str:
    if word not in allowed:
        raise ValueError(f"{what} {word!r} is not one of {', '.join(allowed)}")
    return word
