#!/usr/bin/env python3
"""What `fitquant serve`'s router costs (issue 20 "Benchmarks"): added latency, streamed tokens/s, and a swap.

One `fitquant serve` runs as a child on a profile with two models (SmolLM2 135M and Gemma 3 270M) and a described
`ram:` that holds only one of them, so asking for the other evicts the first. Every baseline is the same
llama-server called (or started) directly, measured in this process, interleaved with the router's runs:

1. latency: the same tiny request (max_tokens 1, temperature 0) through the router, to the model's own server (its
   endpoint from GET /running) and to it again (an A/A control), in every order in turn, one warm httpx.Client for the
   router and one for the server; added at p50: the median of the per-round differences; added at p99: the
   router's p99 minus the direct p99 (a per-round difference's p99 also holds both requests' own noise: printed
   beside it, with the control's, which a path that adds nothing would show);
2. streaming: the same streamed request (`ignore_eos`, so the token count is fixed), tokens/s counted over the
   SSE content chunks from the first token to the last, through the router, direct, direct again (an A/A
   control) and through a bare byte relay (uvloop, no HTTP parsed: the least any Python relay pays here), back to
   back in each round in every order in turn; the ratio is the median of the rounds' ratios, the control's and the
   bare relay's likewise, each with a bootstrap interval over the rounds; beside them the router's and the bare
   relay's CPU time per chunk relayed (over each request, and from its first token on: the relaying alone) and the
   router's share of one core while streaming (on a machine whose cores the model's server keeps busy, that time is
   what a relay takes from decoding);
3. swap: a streamed request for the unloaded model (evict, load, verify with fitquant's warm-up request, first
   token) against the argv the router's server ran (read from its pid) started directly: until /health is 200,
   then the same request's first token.

    .venv/bin/python scripts/bench_router.py [--runs N] [--stream-runs K] [--swap-runs S] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Name one colour."}]
# llama-server (cpp-httplib) may close a kept-alive connection right after a streamed answer without saying
# so, and the next request sent on it fails ("Server disconnected without sending a response"); streamed runs use
# a connection each, through the router too, which costs nothing in tokens/s (counted from the first token on)
CLOSE = {"Connection": "close"}
# the same poll interval as fitquant's own readiness wait (launcher.backends.process.poll_until)
POLL_S = 0.05


class Serve:
    """`fitquant serve` as a child in its own process group; its stderr events kept with the time they came."""

    def __init__(self, profile: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "serve", "--profile", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.pids: set[int] = set()  # every model server it said it started
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))
                if m := re.search(r"^fitquant: ready .*\bpid=(\d+)", line):
                    self.pids.add(int(m.group(1)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, *, since: int = 0, timeout: float = 300) -> tuple[float, re.Match[str]]:
        """The time and match of the first line from index `since` on that matches `pattern`."""
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._changed:
            while True:
                for at, line in self.lines[since:]:
                    if m := regex.search(line):
                        return at, m
                since = len(self.lines)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    said = "\n".join(line for _, line in self.lines[-30:])
                    raise SystemExit(f"fitquant serve said no line matching {pattern!r}:\n{said}")
                self._changed.wait(timeout=0.5)

    def stop(self) -> None:
        """SIGTERM (serve stops its model servers), then SIGKILL its group and any model server left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # only if serve failed to (each server leads its own group)


def chat(model: str, *, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body |= {"stream": True, "ignore_eos": True}  # llama-server: the count is max_tokens, whatever it says
    return body


def one_request(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    with failing(client, url):
        r = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise SystemExit(f"POST {url} answered {r.status_code}: {r.text[:300]}")
    return elapsed


def streamed(client: httpx.Client, url: str, body: dict[str, Any], started: float | None = None, *,
             fresh: bool = False, relay: Any = None) -> dict[str, float]:  # fmt: skip
    """Send a streamed chat request; the times (from `started`) of its first and last content chunk, and their
    count. `fresh`: on a connection of its own, closed after it. `relay` (a psutil.Process): its CPU seconds from
    the first content chunk to the end of the answer (`relay_cpu_s`: the relaying alone, no request handling)."""
    started = time.perf_counter() if started is None else started
    times: list[float] = []
    cpu_first = 0.0
    with failing(client, url), client.stream("POST", url, json=body, headers=CLOSE if fresh else None) as r:
        if r.status_code != 200:
            raise SystemExit(f"POST {url} answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"POST {url} failed mid-stream: {event['error']}")
            choices = event.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times.append(time.perf_counter())
                if relay is not None and len(times) == 1:
                    cpu_first = sum(relay.cpu_times()[:2])
    if len(times) < 2:
        raise SystemExit(f"POST {url} streamed {len(times)} content chunks; expected more")
    out = {"first_s": times[0] - started, "last_s": times[-1] - started, "chunks": len(times),
           "tokens_per_s": (len(times) - 1) / (times[-1] - times[0])}  # fmt: skip
    if relay is not None:
        out["relay_cpu_s"] = sum(relay.cpu_times()[:2]) - cpu_first
    return out


@contextlib.contextmanager
def failing(client: httpx.Client, url: str) -> Iterator[None]:
    import httpx

    try:
        yield
    except httpx.HTTPError as exc:
        raise SystemExit(f"POST {client.base_url.join(url)} failed: {type(exc).__name__}: {exc}") from None


# every order of a round's three runs in turn: each goes first, second and last equally often and follows each of
# the others equally often (a run right after one through the router may find the router still finishing it; with
# plain rotation the direct run followed the router's twice as often as the control did, and the A/A control read
# 1.02 with an interval that left out 1)
ORDERS = tuple(itertools.permutations(range(3)))


def in_order(i: int, runs: list[Any]) -> list[Any]:
    """Round `i`'s runs in its order (every order of them in turn, cycled)."""
    orders = ORDERS if len(runs) == 3 else tuple(itertools.permutations(range(len(runs))))
    return [runs[k] for k in orders[i % len(orders)]]


# A bare byte relay in front of the model's server: asyncio on uvloop as the router, the bytes passed on both ways as
# they come and no HTTP parsed (HTTP/1.1's chunked stream goes through as it is). What it costs per streamed chunk is
# the least any relay written in Python pays on this machine, measured beside the router's in the same rounds.
BARE_RELAY = """
import asyncio, sys, uvloop

UPSTREAM = int(sys.argv[1])


class Up(asyncio.Protocol):
    def __init__(self, down):
        self.down = down

    def data_received(self, data):
        self.down.write(data)

    def connection_lost(self, exc):
        self.down.close()


class Down(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.up, self.early = transport, None, []
        asyncio.ensure_future(self.connect())

    async def connect(self):
        try:
            up, _ = await asyncio.get_running_loop().create_connection(
                lambda: Up(self.transport), "127.0.0.1", UPSTREAM)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            up.close()
            return
        self.up = up
        for data in self.early:
            up.write(data)

    def data_received(self, data):
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc):
        if self.up is not None:
            self.up.close()


async def main():
    server = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


uvloop.run(main())
"""


@contextlib.contextmanager
def bare_relay(url: str, pids: list[int]) -> Iterator[tuple[str, Any]]:
    """BARE_RELAY in front of `url`'s server: the same URL through it, and its psutil.Process (stopped after)."""
    from urllib.parse import urlsplit

    import psutil

    parts = urlsplit(url)
    proc = subprocess.Popen([sys.executable, "-c", BARE_RELAY, str(parts.port)], stdout=subprocess.PIPE, text=True)
    pids.append(proc.pid)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline() or 0)
        if not port:
            raise SystemExit("bench_router: the bare relay did not start")
        yield f"http://127.0.0.1:{port}{parts.path}", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median_interval(values: list[float], level: float = 0.9, draws: int = 2000) -> tuple[float, float]:
    """The median's percentile-bootstrap interval over rounds (resampled with replacement, a fixed seed): how far the
    machine's own noise moves it with this many rounds."""
    import random

    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int((1 - level) / 2 * draws)], medians[int((1 + level) / 2 * draws) - 1]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest rank (p99 of 200 samples is the second largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def running(client: httpx.Client, base: str, alias: str) -> dict[str, Any]:
    r = client.get(base + "/running")
    r.raise_for_status()
    row: dict[str, Any] = next(m for m in r.json()["models"] if m["model"] == alias)
    return row


def direct_start(argv: list[str], env: dict[str, str], body: dict[str, Any], pids: list[int]) -> dict[str, float]:
    """Start the same llama-server argv on a free port: seconds until /health is 200, then until the first token
    of `body` streamed, from the start; and from SIGTERM until it exited (what an eviction waits for)."""
    import httpx

    from launcher.backends.process import free_port

    argv = list(argv)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {env['LLAMA_API_KEY']}"} if env.get("LLAMA_API_KEY") else {}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)  # fmt: skip
    pids.append(proc.pid)
    try:
        with httpx.Client(timeout=120, headers=headers, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited with {proc.returncode}: {argv}")
                try:
                    if client.get(base + "/health", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(POLL_S)
            ready_s = time.perf_counter() - started
            first = streamed(client, base + "/v1/chat/completions", body, started=started)
    finally:
        stopping = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return {"ready_s": ready_s, "first_token_s": first["first_s"], "exit_s": time.perf_counter() - stopping}


def write_profile(path: Path, port: int, small: Path, large: Path, ctx: int) -> None:
    # `ram` holds one model at a time (SmolLM2 plans at about 130 MiB, Gemma 3 270M at about 300 MiB at 2k), so
    # asking for the other one evicts; min_residency 0 lets a model just loaded be evicted at once
    path.write_text(f"""machine: bench-router
backend: llamacpp
ram: 360MiB
reserve: 0
listen: 127.0.0.1:{port}
router: {{min_residency: 0s}}
models:
  - {{model: {small}, context: {ctx}, alias: small}}
  - {{model: {large}, context: {ctx}, alias: gemma}}
""")


def measure(args: argparse.Namespace, serve: Serve, base: str, pids: list[int]) -> dict[str, Any]:
    import httpx
    import psutil

    out: dict[str, Any] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    # idle connections dropped well before the servers' own keep-alive ends (uvicorn's and httpx's are both 5 s):
    # a request sent on a connection the server is closing that moment fails with "Server disconnected"
    limits = httpx.Limits(keepalive_expiry=2.0)
    router = httpx.Client(base_url=base, timeout=300, trust_env=False, limits=limits)
    direct = httpx.Client(timeout=300, trust_env=False, limits=limits)
    try:
        # 1. latency, on the small model (what the router adds does not depend on the model)
        for _ in range(3):  # loads it, and warms both clients and the server's prompt cache
            one_request(router, "/v1/chat/completions", chat("small", max_tokens=1, stream=False))
        row = running(router, base, "small")
        url = row["endpoint"] + "/chat/completions"
        # the model's private server takes only its own key, which only the router (and its process) holds
        key = psutil.Process(row["pid"]).environ().get("LLAMA_API_KEY")
        if key:
            direct.headers["Authorization"] = f"Bearer {key}"
        body = chat("small", max_tokens=1, stream=False)
        one_request(direct, url, body)
        via: list[float] = []
        own: list[float] = []
        again: list[float] = []  # the A/A control: the same direct request a second time in each round
        for i in range(args.runs):  # interleaved, in every order in turn (ORDERS)
            trio = [("r", router, "/v1/chat/completions"), ("d", direct, url), ("a", direct, url)]
            for kind, client, target in in_order(i, trio):
                {"r": via, "d": own, "a": again}[kind].append(one_request(client, target, body))
        diff = [a - b for a, b in zip(via, own, strict=True)]
        control = [a - b for a, b in zip(again, own, strict=True)]
        out["latency"] = {
            "runs": args.runs,
            "router_p50_ms": quantile(via, 0.5) * 1e3, "router_p99_ms": quantile(via, 0.99) * 1e3,
            "direct_p50_ms": quantile(own, 0.5) * 1e3, "direct_p99_ms": quantile(own, 0.99) * 1e3,
            # what the router adds: the median of the per-round differences; at p99, the difference of the two
            # paths' own p99s. A per-round difference's p99 measures both requests' noise too: the A/A control (the
            # direct request against itself, a path that adds nothing) shows how much of it that is.
            "added_p50_ms": quantile(diff, 0.5) * 1e3,
            "added_p99_ms": (quantile(via, 0.99) - quantile(own, 0.99)) * 1e3,
            "pair_diff_p99_ms": quantile(diff, 0.99) * 1e3,
            "control_pair_diff_p99_ms": quantile(control, 0.99) * 1e3,
        }  # fmt: skip

        # 2. streamed tokens/s, same model, same request: through the router, direct, direct again (the A/A
        # control) and through a bare byte relay (what any relay pays here), four runs a round, back to back
        body = chat("small", max_tokens=args.tokens, stream=True)
        tps: dict[str, list[float]] = {"r": [], "d": [], "a": [], "b": []}
        chunks: set[int] = set()
        cpu = {"r": 0.0, "b": 0.0}
        streaming_cpu = {"r": 0.0, "b": 0.0}  # from each answer's first content chunk to its end
        relayed = {"r": 0, "b": 0}
        with bare_relay(url, pids) as (bare_url, bare_proc):
            procs = {"r": psutil.Process(serve.proc.pid), "b": bare_proc}
            for i in range(args.stream_runs):  # in every order in turn
                runs = [("r", router, "/v1/chat/completions"), ("d", direct, url), ("a", direct, url),
                        ("b", direct, bare_url)]  # fmt: skip
                for kind, client, target in in_order(i, runs):
                    cpu_before = sum(procs[kind].cpu_times()[:2]) if kind in procs else 0.0
                    s = streamed(client, target, body, fresh=True, relay=procs.get(kind))
                    tps[kind].append(s["tokens_per_s"])
                    chunks.add(int(s["chunks"]))
                    if kind in procs:
                        cpu[kind] += sum(procs[kind].cpu_times()[:2]) - cpu_before
                        streaming_cpu[kind] += s["relay_cpu_s"]
                        relayed[kind] += int(s["chunks"])
        # a relay's CPU time over its own streams (the request, the relay, and the few ms a second it spends idle,
        # which it spends during the other runs as well) per chunk it relayed: on 2 cores that time is taken from
        # the model's server, which is what lowers tokens/s through a relay
        cpu_per_chunk = cpu["r"] / relayed["r"]
        # the ratio of each round's runs, back to back, then their median: a slow spell of the machine (other
        # processes, the server's own variation run to run) falls on every run of a round, not on one path's median
        ratios = [r / d for r, d in zip(tps["r"], tps["d"], strict=True)]
        controls = [a / d for a, d in zip(tps["a"], tps["d"], strict=True)]
        bares = [b / d for b, d in zip(tps["b"], tps["d"], strict=True)]
        out["stream"] = {"runs": args.stream_runs, "tokens": args.tokens, "content_chunks": sorted(chunks),
                         "router_tokens_per_s": statistics.median(tps["r"]),
                         "direct_tokens_per_s": statistics.median(tps["d"]), "ratio": statistics.median(ratios),
                         "ratio_interval": median_interval(ratios), "control_ratio": statistics.median(controls),
                         "control_interval": median_interval(controls),
                         "router_cpu_per_chunk_us": cpu_per_chunk * 1e6,
                         # the router's CPU time per second of streaming: what it takes from a server using every core
                         "router_core_share": cpu_per_chunk * statistics.median(tps["r"]),
                         "bare_ratio": statistics.median(bares), "bare_interval": median_interval(bares),
                         "bare_cpu_per_chunk_us": cpu["b"] / relayed["b"] * 1e6,
                         # the same from each answer's first content chunk on: the relaying, without the request
                         "router_streaming_cpu_per_chunk_us": streaming_cpu["r"] / relayed["r"] * 1e6,
                         "bare_streaming_cpu_per_chunk_us": streaming_cpu["b"] / relayed["b"] * 1e6}  # fmt: skip

        # 3. swap: gemma is not loaded; asking for it evicts the small model, loads, verifies, answers
        body = chat("gemma", max_tokens=4, stream=True)
        swaps: list[dict[str, float]] = []
        for i in range(args.swap_runs):
            if i:  # the small model back in (evicting gemma), so the next request for gemma is a swap again
                one_request(router, "/v1/chat/completions", chat("small", max_tokens=1, stream=False))
            since = len(serve.lines)
            started = time.perf_counter()
            first = streamed(router, "/v1/chat/completions", body, started=started)["first_s"]
            serve.wait_for(r"^fitquant: unloading model=small ", since=since, timeout=5)  # it was a swap
            at_load, _ = serve.wait_for(r"^fitquant: loading model=gemma ", since=since, timeout=5)
            at_ready, m = serve.wait_for(r"^fitquant: ready model=gemma .*\bload_s=([\d.]+)(?: warmup_s=([\d.]+))?",
                                         since=since, timeout=5)  # fmt: skip
            row = running(router, base, "gemma")
            server = psutil.Process(row["pid"])
            own_start = direct_start(server.cmdline(), server.environ(), body, pids)
            swaps.append({
                "router_first_token_s": first,
                "evict_s": at_load - started,  # from the request to the load's start: the eviction
                "load_verify_s": float(m.group(1)),  # start, wait ready, verify placement, warm-up request
                "warmup_s": float(m.group(2) or 0.0),
                "after_ready_s": first - (at_ready - started),  # the answer once the model is ready
                "direct_ready_s": own_start["ready_s"],
                "direct_first_token_s": own_start["first_token_s"],
                "direct_exit_s": own_start["exit_s"],
            })  # fmt: skip
        out["swap"] = {"runs": args.swap_runs,
                       **{k: statistics.median(s[k] for s in swaps) for k in swaps[0]}}  # fmt: skip
        out["swap"]["added_s"] = out["swap"]["router_first_token_s"] - out["swap"]["direct_first_token_s"]
    finally:
        router.close()
        direct.close()
    out["load_after"] = os.getloadavg()[0]
    return out


def rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, PASS/FAIL/'') for the table."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lat, st, sw = m["latency"], m["stream"], m["swap"]
    return [
        ("request latency via router, p50 / p99", f"{lat['router_p50_ms']:.2f} / {lat['router_p99_ms']:.2f} ms", "",
         ""),
        ("request latency direct, p50 / p99", f"{lat['direct_p50_ms']:.2f} / {lat['direct_p99_ms']:.2f} ms", "", ""),
        ("latency added by router, p50", f"{lat['added_p50_ms']:.2f} ms", "< 2 ms", verdict(lat["added_p50_ms"] < 2)),
        ("latency added by router, p99", f"{lat['added_p99_ms']:.2f} ms", "< 10 ms",
         verdict(lat["added_p99_ms"] < 10)),
        ("  per-round difference, p99", f"{lat['pair_diff_p99_ms']:.2f} ms", "", ""),
        ("  A/A control (direct vs direct), p99", f"{lat['control_pair_diff_p99_ms']:.2f} ms", "", ""),
        ("streamed tokens/s via router", f"{st['router_tokens_per_s']:.1f}", "", ""),
        ("streamed tokens/s direct", f"{st['direct_tokens_per_s']:.1f}", "", ""),
        ("streamed tokens/s, router / direct", f"{st['ratio']:.3f}", ">= 0.99", verdict(st["ratio"] >= 0.99)),
        ("  the same as a ratio of the medians", f"{st['router_tokens_per_s'] / st['direct_tokens_per_s']:.3f}", "",
         ""),
        ("  90% interval of that median over rounds", "{:.3f} to {:.3f}".format(*st["ratio_interval"]), "", ""),
        ("  A/A control (direct / direct)", f"{st['control_ratio']:.3f}", "", ""),
        ("  90% interval of the control's median", "{:.3f} to {:.3f}".format(*st["control_interval"]), "", ""),
        ("  router CPU per relayed chunk", f"{st['router_cpu_per_chunk_us']:.0f} us", "", ""),
        ("  router CPU while streaming, of one core", f"{st['router_core_share'] * 100:.1f} %", "", ""),
        ("  a bare byte relay (no HTTP) / direct", f"{st['bare_ratio']:.3f}", "", ""),
        ("  90% interval of the bare relay's median", "{:.3f} to {:.3f}".format(*st["bare_interval"]), "", ""),
        ("  bare relay CPU per relayed chunk", f"{st['bare_cpu_per_chunk_us']:.0f} us", "", ""),
        ("  the same from the first token on, router / bare",
         f"{st['router_streaming_cpu_per_chunk_us']:.0f} / {st['bare_streaming_cpu_per_chunk_us']:.0f} us", "", ""),
        ("swap via router: request to first token", f"{sw['router_first_token_s']:.3f} s", "", ""),
        ("  of which: eviction of the other model", f"{sw['evict_s']:.3f} s", "", ""),
        ("  of which: load + verify (incl. warm-up)", f"{sw['load_verify_s']:.3f} s", "", ""),
        ("    incl. fitquant's verify warm-up request", f"{sw['warmup_s']:.3f} s", "", ""),
        ("  of which: ready to first token", f"{sw['after_ready_s']:.3f} s", "", ""),
        ("same argv direct: start to /health 200", f"{sw['direct_ready_s']:.3f} s", "", ""),
        ("same argv direct: start to first token", f"{sw['direct_first_token_s']:.3f} s", "", ""),
        ("same argv direct: SIGTERM to exit", f"{sw['direct_exit_s']:.3f} s", "", ""),
        ("swap added over direct start", f"{sw['added_s']:.3f} s", "< 1 s", verdict(sw["added_s"] < 1)),
    ]  # fmt: skip


def render(m: dict[str, Any]) -> str:
    table = rows(m)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    heads = ("figure", "value", "target", "result")
    widths = [max(w, len(h)) for w, h in zip(widths, heads, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lat, st, sw = m["latency"], m["stream"], m["swap"]
    lines.append("")
    lines.append(
        "latency added at p99: the router's p99 minus the direct p99; a per-round difference's p99 holds "
        "both requests' own noise, as the A/A control (a path that adds nothing) shows"
    )
    lines.append(f"latency: {lat['runs']} rounds, max_tokens 1, small model; streaming: {st['runs']} runs each, "
                 f"{st['tokens']} tokens (content chunks seen: {st['content_chunks']}), medians (the ratio: of the "
                 "rounds' ratios); "
                 f"swap: {sw['runs']} runs, medians")  # fmt: skip
    lines.append("streaming: the interval is a bootstrap over rounds (how far this machine's noise moves the "
                 "median); the router's CPU share is what it takes from a server keeping every core busy")  # fmt: skip
    lines.append(f"machine: {m['cpus']} CPUs, load average {m['load_before']:.2f} before, {m['load_after']:.2f} after "
                 "(other processes' load shows in every figure)")  # fmt: skip
    lines.append("the swap's extra time is the eviction (SIGTERM, wait for exit), fitquant's verify (placement from "
                 "the server's log) and its warm-up request, and the proxied first token")  # fmt: skip
    return "\n".join(lines)


@contextlib.contextmanager
def serving(args: argparse.Namespace) -> Iterator[tuple[Serve, str]]:
    import httpx

    from launcher.backends.builds import find_built
    from launcher.backends.process import free_port

    server = args.llama_server or find_built("llama-server")
    if server is None:
        raise SystemExit("llama-server is not built: scripts/build-llama-cpp builds it (or pass --llama-server)")
    small, large = args.small_model, args.swap_model
    if small is None or large is None:
        from launcher.embedded import embedded_model_path, gemma_model_path

        small, large = small or embedded_model_path(), large or gemma_model_path()
    home = Path(tempfile.mkdtemp(prefix="fitquant-bench-router-"))
    port = free_port()
    profile = home / "bench.yaml"
    write_profile(profile, port, Path(small), Path(large), args.ctx)
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "CUDA_VISIBLE_DEVICES")}
    env |= {"FITQUANT_HOME": str(home / "home"), "FITQUANT_LLAMA_SERVER": str(server)}
    base = f"http://127.0.0.1:{port}"
    serve = None
    try:
        serve = Serve(profile, env)
        serve.wait_for(r"^fitquant: listening ", timeout=120)
        deadline = time.monotonic() + 120
        while httpx.get(base + "/health", trust_env=False).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("fitquant serve did not turn healthy in 120 s")
            time.sleep(POLL_S)
        yield serve, base
    except BaseException:
        if serve is not None:
            print("fitquant serve said last:", *(line for _, line in serve.lines[-12:]), sep="\n", file=sys.stderr)
        raise
    finally:
        if serve is not None:
            serve.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a p99 over 1000 rounds is the 10th worst, steadier than 200's 2nd worst; 160 streamed rounds put the ratio's
    # interval about 1% wide on this project's 2-core machine (about 20 minutes in all)
    parser.add_argument("--runs", type=int, default=1000, help="latency: rounds (router, direct, direct again)")
    parser.add_argument(
        "--stream-runs", type=int, default=160, help="streaming: rounds (router, direct, direct again, bare relay)"
    )
    parser.add_argument("--swap-runs", type=int, default=3, help="swaps, each against a direct start")
    parser.add_argument("--tokens", type=int, default=128, help="streaming: tokens per run")
    parser.add_argument("--ctx", type=int, default=2048, help="context of both models")
    parser.add_argument("--llama-server", help="run this llama-server (default: the built one)")
    parser.add_argument("--small-model", help="GGUF measured for latency and streaming (default: embedded SmolLM2)")
    parser.add_argument("--swap-model", help="GGUF the swap loads (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if min(args.runs, args.stream_runs, args.swap_runs) < 1 or args.tokens < 2:
        parser.error("--runs, --stream-runs and --swap-runs must be at least 1, --tokens at least 2")
    pids: list[int] = []  # every process started, checked gone by tests/test_bench_router.py
    with serving(args) as (serve, base):
        try:
            figures = measure(args, serve, base, pids)
        finally:
            pids += [serve.proc.pid, *serve.pids]
    if args.json:
        figures["rows"] = [{"figure": f, "value": v, "target": t or None, "result": r or None}
                           for f, v, t, r in rows(figures)]  # fmt: skip
        figures["pids"] = sorted(pids)
        print(json.dumps(figures, indent=2))
    else:
        print(render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
