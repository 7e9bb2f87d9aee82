"""The router for real (issue 20, "Tests"): `fitquant serve` as a child process serving the embedded SmolLM2
(smol) and Gemma 3 270M (gemma) on the built llama-server, under a described RAM that holds one of them at a time,
driven over HTTP by the official `openai` and `ollama` clients, httpx and raw sockets.

One serve process is shared by the tests that leave it running (`served`, module scope); the SIGTERM, queue-bound and
auth tests start their own. Every test checks answers by content (smol knows Paris; gemma continues
"1, 2, 3, 4, 5,"), the log by its event lines, and that no model server is left behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from processes import built_llama_server, gone
from router_fixtures import ServeProcess, free_port, two_model_profile

pytestmark = pytest.mark.slow

CAPITAL_Q = "What is the capital of France? Answer in one word."
CAPITAL_A = "The capital of France is Paris."
COUNT_PROMPT = "1, 2, 3, 4, 5,"  # gemma 3 270M at temperature 0: " 6, 7, 8, 9,"
FAILURES = ("crashed", "load-failed", "loader-error", "stream-failed", "refused", "memory-not-freed")


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smol_path() -> Path:
    from launcher.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None or not Path(path).exists():
        pytest.skip("the embedded SmolLM2 is not installed")
    return Path(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_path: Path, gemma3_270m_path: Path) -> Iterator[ServeProcess]:
    """One serve for the module's tests that keep it running; at the end: SIGTERM exits 0, no server left."""
    root = tmp_path_factory.mktemp("router")
    profile = two_model_profile(root, smol=smol_path, gemma=gemma3_270m_path,
                                router="{min_residency: 0s, body_timeout: 3s}")  # fmt: skip
    serve = ServeProcess(profile, home=root / "home").start()
    try:
        serve.wait_healthy()
        yield serve
        assert serve.stop() == 0, serve.log()
        assert serve.kill() == [], "a model server outlived serve"
    finally:
        serve.kill()


def _chat(url: str, model: str, content: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
    return httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=240)


def _count(url: str) -> httpx.Response:
    body = {"model": "gemma", "temperature": 0, "max_tokens": 8, "prompt": COUNT_PROMPT}
    return httpx.post(url + "/v1/completions", json=body, timeout=240)


def _n_embd(path: Path) -> int:
    from launcher.gguf import read_header

    return int(read_header(path).arch_get("embedding_length"))


def _failures(serve: ServeProcess, after: int = 0) -> list[str]:
    return [e.line for e in serve.events(after=after) if e.name in FAILURES]


# --------------------------------------------------------------------------------------------------- 1. swaps
def test_alternating_two_models_that_do_not_fit_together_swaps_each_load_verified_and_logged(
    served: ServeProcess,
) -> None:
    start = served.mark()
    first = _chat(served.url, "smol", CAPITAL_Q)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == CAPITAL_A
    smol_pid = served.model_row("smol")["pid"]

    second = _count(served.url)
    assert second.status_code == 200, second.text
    assert second.json()["model"] == "gemma"
    assert second.json()["choices"][0]["text"].startswith(" 6, 7, 8"), second.json()
    gemma_row = served.model_row("gemma")
    assert served.model_row("smol")["state"] == "unloaded"
    assert gone(smol_pid), "the evicted smol server still runs"

    third = _chat(served.url, "smol", CAPITAL_Q)
    assert third.status_code == 200, third.text
    assert third.json()["choices"][0]["message"]["content"] == CAPITAL_A
    assert gone(gemma_row["pid"]), "the evicted gemma server still runs"

    # the log tells the story: each eviction names what it made room for, each load ends verified on the CPU
    served.wait_for(r'unloading model=smol reason="evicted for gemma', after=start, timeout=5)
    served.wait_for(r'unloading model=gemma reason="evicted for smol', after=start, timeout=5)
    readies = [e for e in served.events("ready", after=start)]
    assert [e.fields["model"] for e in readies][-2:] == ["gemma", "smol"], served.log()
    assert all(e.fields["verdict"] == "cpu-only" for e in readies)
    loads = [e.fields["model"] for e in served.events("loading", after=start)]
    assert loads[-2:] == ["gemma", "smol"], served.log()
    assert not _failures(served, start)

    # /running: smol ready with its measured cost, gemma unloaded, the budget's free bytes consistent
    running = served.running()
    rows = {m["model"]: m for m in running["models"]}
    smol, gemma = rows["smol"], rows["gemma"]
    assert smol["state"] == "ready" and smol["verdict"] == "cpu-only" and smol["pid"] not in (None, smol_pid)
    assert smol["cost_bytes"]["CPU"] > 0 and smol["measured"] and smol["in_flight"] == 0
    assert gemma["state"] == "unloaded" and gemma["pid"] is None
    assert gemma_row["cost_bytes"]["CPU"] > 0 and gemma_row["verdict"] == "cpu-only"
    usable = running["usable_bytes"]["CPU"]
    assert smol["cost_bytes"]["CPU"] + gemma_row["cost_bytes"]["CPU"] > usable, "the budget must not hold both"
    assert running["free_bytes"]["CPU"] == usable - smol["cost_bytes"]["CPU"]


# --------------------------------------------------------------------------------------------------- 2. openai
def test_the_official_openai_client_chats_streams_embeds_and_lists_every_model(
    served: ServeProcess, smol_path: Path
) -> None:
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=240)
    messages: Any = [{"role": "user", "content": CAPITAL_Q}]
    chat = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=16)
    assert chat.choices[0].message.content == CAPITAL_A
    assert chat.model == "smol"

    stream = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=16,
                                            stream=True)  # fmt: skip
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3, deltas  # token by token, not one buffered blob
    assert "".join(deltas) == CAPITAL_A

    vectors = client.embeddings.create(model="smol", input=["Paris is in France.", "The sky is blue."])
    assert len(vectors.data) == 2
    assert {len(v.embedding) for v in vectors.data} == {_n_embd(smol_path)}
    assert vectors.data[0].embedding != vectors.data[1].embedding

    # both aliases are listed whether loaded or not (gemma is not loaded now)
    assert served.model_row("gemma")["state"] == "unloaded"
    assert sorted(m.id for m in client.models.list()) == ["gemma", "smol"]

    # gemma through the client: deterministic at temperature 0, answered under its alias
    answers = [client.chat.completions.create(model="gemma", messages=messages, temperature=0, max_tokens=12)
               for _ in range(2)]  # fmt: skip
    assert answers[0].model == "gemma" and answers[0].choices[0].message.content
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


# --------------------------------------------------------------------------------------------------- 3. ollama
def test_the_official_ollama_client_chats_generates_lists_shows_embeds_and_keep_alive_0_unloads(
    served: ServeProcess, smol_path: Path
) -> None:
    import ollama

    client = ollama.Client(host=served.url, timeout=240)
    options = {"temperature": 0, "num_predict": 16}
    messages = [{"role": "user", "content": CAPITAL_Q}]
    reply = client.chat(model="smol", messages=messages, options=options)
    assert reply.message.content == CAPITAL_A and reply.done

    # as Ollama lists its own models, a client may name an untagged one NAME:latest
    parts = list(client.chat(model="smol:latest", messages=messages, options=options, stream=True))
    assert len(parts) > 3 and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == CAPITAL_A

    generated = client.generate(model="gemma", prompt=COUNT_PROMPT, raw=True, options={**options, "num_predict": 8})
    assert generated.response.startswith(" 6, 7, 8"), generated.response
    assert generated.model == "gemma" and generated.done

    assert sorted(m.model for m in client.list().models if m.model) == ["gemma", "smol"]
    assert [m.model for m in client.ps().models] == ["gemma"]  # smol was evicted for gemma

    show = client.show("gemma")
    info = dict(show.modelinfo or {})
    assert info[f"{info['general.architecture']}.context_length"] == 2048
    assert "completion" in (show.capabilities or [])
    assert "embedding" in (client.show("smol").capabilities or [])

    embedded = client.embed(model="smol", input=["Paris is in France."])
    assert len(embedded.embeddings) == 1 and len(embedded.embeddings[0]) == _n_embd(smol_path)

    # keep_alive 0: answered, then unloaded at once
    last = client.generate(model="smol", prompt="Say hi.", options=options, keep_alive=0)
    assert last.done and last.response
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.ps().models == []
    served.wait_for(r'unloading model=smol reason="idle past its keep_alive"', timeout=5)
    # as in Ollama, a request without keep_alive goes back to the default (the profile's ttl: none, stay loaded);
    # keep_alive 0 must not stick to the model and unload it after every later request
    again = _chat(served.url, "smol", CAPITAL_Q)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == CAPITAL_A
    time.sleep(1.5)  # three of serve's upkeep rounds (every 0.5 s), each of which unloads a model past its expiry
    assert [m.model for m in client.ps().models] == ["smol"], served.log()


# --------------------------------------------------------------------------------------------------- 4. load
def _one(url: str, i: int, n_embd: int) -> tuple[int, str, str | None]:
    """Request `i` of the mix: (status, what was checked, Retry-After); raises on an answer of the wrong shape."""
    kind = i % 5
    with httpx.Client(base_url=url, timeout=240) as http:
        if kind == 0:  # smol chat
            r = http.post("/v1/chat/completions", json={"model": "smol", "temperature": 0, "max_tokens": 16,
                          "messages": [{"role": "user", "content": CAPITAL_Q}]})  # fmt: skip
            if r.status_code == 200:
                assert r.json()["choices"][0]["message"]["content"] == CAPITAL_A
            return r.status_code, "chat", r.headers.get("retry-after")
        if kind == 1:  # gemma completion, streamed (SSE)
            body = {"model": "gemma", "temperature": 0, "max_tokens": 8, "prompt": COUNT_PROMPT, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, "stream", r.headers.get("retry-after")
                data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert data[-1] == "[DONE]", data
            text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
            assert text.startswith(" 6, 7, 8"), text
            return 200, "stream", None
        if kind == 2:  # smol embeddings
            r = http.post("/v1/embeddings", json={"model": "smol", "input": "Paris"})
            if r.status_code == 200:
                assert len(r.json()["data"][0]["embedding"]) == n_embd
            return r.status_code, "embeddings", r.headers.get("retry-after")
        if kind == 3:  # gemma through Ollama's chat, not streamed
            r = http.post("/api/chat", json={"model": "gemma", "stream": False, "options": {"temperature": 0,
                          "num_predict": 8}, "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
            if r.status_code == 200:
                assert r.json()["done"] and r.json()["model"] == "gemma"
            return r.status_code, "ollama-chat", r.headers.get("retry-after")
        body = {"model": "smol", "options": {"temperature": 0, "num_predict": 16},
                "messages": [{"role": "user", "content": CAPITAL_Q}]}  # fmt: skip
        with http.stream("POST", "/api/chat", json=body) as r:  # smol through Ollama's chat, streamed (NDJSON)
            if r.status_code != 200:
                r.read()
                return r.status_code, "ollama-stream", r.headers.get("retry-after")
            lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        assert lines[-1]["done"] is True and not any("error" in x for x in lines), lines
        assert "".join(x["message"]["content"] for x in lines) == CAPITAL_A
        return 200, "ollama-stream", None


def test_fifty_concurrent_mixed_requests_on_two_swapping_models_are_all_answered_or_refused_503(
    served: ServeProcess, smol_path: Path
) -> None:
    n_embd = _n_embd(smol_path)
    start = served.mark()
    began = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=50)
    try:
        futures = [pool.submit(_one, served.url, i, n_embd) for i in range(50)]
        _done, pending = concurrent.futures.wait(futures, timeout=240)
        assert not pending, f"{len(pending)} of 50 requests still hang after 240 s"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    outcomes = [f.result() for f in futures]  # an exception (lost connection, wrong answer) fails here
    took = time.monotonic() - began
    statuses = [status for status, _, _ in outcomes]
    assert set(statuses) <= {200, 503}, outcomes
    assert all(retry is not None and int(retry) >= 1 for status, _, retry in outcomes if status == 503), outcomes
    assert statuses.count(200) >= 25, outcomes  # the queue (64) holds all 50: refusals are the exception
    # the models swapped back and forth, each load verified, nothing failed
    assert served.events("unloading", after=start), served.log()
    assert all(e.fields["verdict"] == "cpu-only" for e in served.events("ready", after=start))
    assert not _failures(served, start)
    for row in served.running()["models"]:
        assert row["in_flight"] == 0 and row["queued"] == 0, row
    print(f"50 mixed requests: {statuses.count(200)} answered, {statuses.count(503)} refused, {took:.1f} s")


def test_requests_beyond_the_queue_bound_are_refused_503_with_retry_after_while_the_model_loads(
    tmp_path: Path, smol_path: Path, gemma3_270m_path: Path
) -> None:
    profile = two_model_profile(tmp_path, smol=smol_path, gemma=gemma3_270m_path,
                                router="{min_residency: 0s, max_queue: 4}")  # fmt: skip
    with ServeProcess(profile, home=tmp_path / "home") as serve:
        serve.wait_healthy()
        # twelve at once for a model that is not loaded: four wait for its load, the rest are told to come back
        with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda _: _count(serve.url), range(12)))
        statuses = sorted(r.status_code for r in answers)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 4, statuses
        for r in answers:
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"].startswith(" 6, 7, 8"), r.text
            else:
                assert int(r.headers["retry-after"]) >= 1, r.headers
                assert "router.max_queue" in r.json()["error"]["message"], r.text
        assert [e.fields["model"] for e in serve.events("loading")] == ["gemma"], serve.log()
        assert all(row["queued"] == 0 and row["in_flight"] == 0 for row in serve.running()["models"])
        assert serve.stop() == 0
        assert serve.kill() == [], "a model server outlived serve"


# --------------------------------------------------------------------------------------------------- 5. crash
def test_a_model_server_killed_mid_stream_fails_that_stream_and_the_next_request_reloads_it(
    served: ServeProcess,
) -> None:
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=240)
    client.models.list()
    first = _chat(served.url, "smol", CAPITAL_Q)
    assert first.status_code == 200, first.text
    pid = served.model_row("smol")["pid"]
    start = served.mark()
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0, max_tokens=400, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    got = 0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 3:
                    os.kill(pid, signal.SIGKILL)
    assert got >= 3
    served.wait_for(r"crashed model=smol ", after=start, timeout=15)
    again = _chat(served.url, "smol", CAPITAL_Q)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == CAPITAL_A
    ready = served.wait_for(r"ready model=smol .*pid=(\d+) verdict=cpu-only", after=start, timeout=5)
    assert int(ready.group(1)) != pid and served.model_row("smol")["pid"] == int(ready.group(1))


# --------------------------------------------------------------------------------------------------- 6. drain
def test_sigterm_mid_stream_drains_the_stream_exits_0_and_leaves_no_server(
    tmp_path: Path, smol_path: Path, gemma3_270m_path: Path
) -> None:
    # a long drain: two busy cores may stretch 64 tokens to many seconds, and the point is that they all arrive
    profile = two_model_profile(tmp_path, smol=smol_path, gemma=gemma3_270m_path,
                                router="{min_residency: 0s, drain: 120s}")  # fmt: skip
    with ServeProcess(profile, home=tmp_path / "home") as serve:
        serve.wait_healthy()
        body = {"model": "smol", "temperature": 0, "max_tokens": 64, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}  # fmt: skip
        payloads, signalled, after_stopping = [], None, 0
        with httpx.stream("POST", serve.url + "/v1/chat/completions", json=body, timeout=150) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payloads.append(line[6:])
                if signalled is not None and serve.events("stopping", after=signalled):
                    after_stopping += 1  # this chunk came after serve began to stop: the drain let it through
                if len(payloads) == 3:
                    pid = serve.model_row("smol")["pid"]
                    serve.send_signal(signal.SIGTERM)
                    signalled = serve.mark()
        assert signalled is not None
        serve.wait_for(r"fitquant: stopping reason=signal", after=signalled, timeout=10)
        assert after_stopping >= 5, f"only {after_stopping} chunks came after the stop began"
        assert payloads[-1] == "[DONE]", payloads[-3:]
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 56
        assert serve.stop() == 0, serve.log()
        assert gone(pid) and serve.kill() == [], "SIGTERM left a model server behind"
        serve.wait_for(r'unloading model=smol reason="fitquant serve is stopping"', after=signalled, timeout=5)
        serve.wait_for(r"fitquant: stopped", after=signalled, timeout=5)
        assert not _failures(serve)


def test_serve_whose_log_reader_is_gone_keeps_answering_and_stops_cleanly_on_sigterm(
    tmp_path: Path, smol_path: Path
) -> None:
    # `fitquant serve | something` where something exits, or a supervisor that dropped its pipe: every log line
    # then fails to write (EPIPE). Before, the first such line raised inside the request or the stop, and serve hung
    # in its stop with the HTTP server still up.
    profile = tmp_path / "one.yaml"
    port = free_port()
    profile.write_text(f"machine: smoke\nram: 360MiB\nreserve: 0\nlisten: 127.0.0.1:{port}\n"
                       f"models:\n  - {{model: {smol_path}, alias: smol, context: 2048, pin: true}}\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "CUDA_VISIBLE_DEVICES", "NOTIFY_SOCKET")}
    env |= {"FITQUANT_HOME": str(tmp_path / "home"), "FITQUANT_LLAMA_SERVER": str(built_llama_server())}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "serve", "--profile", str(profile)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not turn healthy"
            time.sleep(0.1)
        servers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert proc.stderr is not None
        proc.stderr.close()  # the log's reader goes away
        answer = _chat(url, "smol", CAPITAL_Q)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == CAPITAL_A
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert servers and all(gone(pid) for pid in servers), "a model server outlived serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------------------------------- 7. auth
GET_ROUTES = ["/v1/models", "/running", "/metrics", "/api/tags", "/api/ps", "/", "/api/version"]
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat", "/api/generate",
               "/api/embed", "/api/embeddings", "/api/show", "/models/load", "/models/unload", "/api/pull"]  # fmt: skip


def test_with_an_api_key_every_route_but_health_answers_401_without_it_and_the_key_is_never_logged(
    tmp_path: Path, smol_path: Path, gemma3_270m_path: Path
) -> None:
    key = "sk-fitquant-test-0123456789abcdef"
    profile = two_model_profile(tmp_path, smol=smol_path, gemma=gemma3_270m_path, extra="api_key_env: FQ_ROUTER_KEY\n")
    with ServeProcess(profile, home=tmp_path / "home", env={"FQ_ROUTER_KEY": key}) as serve:
        serve.wait_healthy()
        with httpx.Client(base_url=serve.url, timeout=240) as http:
            assert http.get("/health").status_code == 200
            body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": key}):
                for path in GET_ROUTES:
                    r = http.get(path, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
                for path in POST_ROUTES:
                    r = http.post(path, json=body, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
            assert http.get("/v1/models").headers["www-authenticate"] == "Bearer"
            assert "error" in http.get("/v1/models").json() and "error" in http.get("/api/tags").json()

            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                for path in GET_ROUTES:
                    r = http.get(path, headers=headers)
                    assert r.status_code == 200, (path, headers, r.status_code, r.text)
                r = http.post("/v1/chat/completions", headers=headers, json={"model": "smol", "temperature": 0,
                              "max_tokens": 16, "messages": [{"role": "user", "content": CAPITAL_Q}]})  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == CAPITAL_A
        assert serve.stop() == 0
        assert serve.kill() == [], "a model server outlived serve"
    assert key not in serve.log()
    assert 'auth="api key"' in serve.log()


# --------------------------------------------------------------------------------------------------- 8. hostile
def test_hostile_requests_get_a_4xx_in_the_routes_shape_and_serve_stays_healthy(served: ServeProcess) -> None:
    start = served.mark()
    with httpx.Client(base_url=served.url, timeout=60) as http:
        # an unknown model: 404 in OpenAI's shape on /v1, Ollama's on /api
        r = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        r = http.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and isinstance(r.json()["error"], str), r.text
        # a model name 100 KB long: 404, and the answer does not echo it back whole
        r = http.post("/v1/chat/completions", json={"model": "x" * 100_000, "messages": []})
        assert r.status_code == 404 and len(r.text) < 300, r.text[:300]
        r = http.post("/api/show", json={"model": "../" * 1000})
        assert r.status_code == 404 and len(r.text) < 300, r.text[:300]
        # a keep_alive that is no duration, or of the wrong type
        for keep in ("soon", [5], {"s": 1}):
            r = http.post("/api/generate", json={"model": "smol", "prompt": "", "keep_alive": keep})
            assert r.status_code == 400 and r.json()["error"].startswith("keep_alive: "), r.text
        # not JSON, a JSON array, no model
        for path in ("/v1/chat/completions", "/api/generate"):
            r = http.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "not JSON" in r.text, r.text
            r = http.post(path, json=[{"model": "smol"}])
            assert r.status_code == 400 and "JSON object" in r.text, r.text
            r = http.post(path, json={"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
            assert r.status_code == 400 and "names no model" in r.text, r.text
        # 10 MB, announced by Content-Length and sent chunked without one
        big = b'{"model": "smol", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
        r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 1 << 20):
                yield big[i : i + (1 << 20)]

        try:
            r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413, r.text
        except httpx.WriteError:
            pass  # the router answered 413 and closed before the client finished sending: also a refusal
        # Ollama's model management: 501; a GET on a POST route: 405; an unknown route: 404
        for verb in ("pull", "create", "push", "copy"):
            r = http.post(f"/api/{verb}", json={"model": "smol"})
            assert r.status_code == 501 and "profile" in r.json()["error"], r.text
        assert http.request("DELETE", "/api/delete", json={"model": "smol"}).status_code == 501
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get("/api/chat").status_code == 405
        assert http.get("/v2/nothing").status_code == 404
        assert http.get("/health").status_code == 200
    assert served.proc is not None and served.proc.poll() is None
    assert not _failures(served, start)


def test_a_client_that_stalls_mid_body_gets_408_within_the_body_timeout(served: ServeProcess) -> None:
    BODY_TIMEOUT_S = 3.0  # the module's profile sets router.body_timeout: 3s

    host, port = served.address.split(":")
    began = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"model": ')  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    took = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert BODY_TIMEOUT_S - 1 <= took <= BODY_TIMEOUT_S + 10, took
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200


def test_a_client_that_leaves_while_its_model_waits_to_load_leaves_the_queue(served: ServeProcess) -> None:
    """One load at a time: a request for smol waits while gemma loads. Its client gives up; the request leaves the
    queue at once, and smol is not loaded for nobody once gemma is ready."""
    import threading

    for alias in ("smol", "gemma"):
        assert httpx.post(served.url + "/models/unload", json={"model": alias}, timeout=60).status_code == 200
    start = served.mark()
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(_count(served.url)))
    worker.start()
    served.wait_for(r"^fitquant: loading model=gemma ", after=start, timeout=60)
    body = {"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": CAPITAL_Q}]}
    with pytest.raises(httpx.ReadTimeout):  # the client leaves while smol waits behind gemma's load
        httpx.post(served.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 3
    while served.model_row("smol")["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.model_row("smol")["queued"] == 0
    worker.join(timeout=180)
    assert answers and answers[0].status_code == 200, answers
    time.sleep(1.5)  # the loader has looked at the queue again since gemma became ready
    assert [e.fields["model"] for e in served.events("loading", after=start)] == ["gemma"], served.log()
    assert served.model_row("smol")["state"] == "unloaded"
    assert not _failures(served, start)
