"""Profile `peers:` for real: two `fitquant serve` processes on two ports, A serving Gemma 3 270M and B the embedded
SmolLM2 with A (and a peer that is down) in its `peers:`. B lists A's models, forwards a request for A's model to A
(streams too, SSE and NDJSON), answers 404 for a model neither serves, skips the peer that is down, and keeps
answering for its own model once A is gone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from router_fixtures import ServeProcess, free_port

pytestmark = pytest.mark.slow


def _requests_for(serve: ServeProcess, model: str) -> int:
    """How many requests `serve` answered for `model` (its /metrics, every route and status)."""
    text = httpx.get(serve.url + "/metrics", timeout=10).text
    found = re.findall(rf'^fitquant_requests_total\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text, re.M)
    return int(sum(float(n) for n in found))


def test_a_peer_serves_the_models_this_router_does_not(tmp_path: Path, gemma3_270m_path: Path, smollm2: Path) -> None:
    port_a, port_b, dead = free_port(), free_port(), free_port()
    a = tmp_path / "a.yaml"
    a.write_text(f"""machine: box-a
backend: llamacpp
ram: 2GiB
reserve: 0
listen: 127.0.0.1:{port_a}
models:
  - {{model: {gemma3_270m_path}, context: 1024, alias: gemma}}
""")
    b = tmp_path / "b.yaml"
    b.write_text(f"""machine: box-b
backend: llamacpp
ram: 2GiB
reserve: 0
listen: 127.0.0.1:{port_b}
peers: [http://127.0.0.1:{dead}, http://127.0.0.1:{port_a}]
models:
  - {{model: {smollm2}, context: 1024, alias: smol}}
""")
    peer_a = f"http://127.0.0.1:{port_a}"
    with ServeProcess(a, home=tmp_path / "home-a") as serve_a, ServeProcess(b, home=tmp_path / "home-b") as serve_b:
        serve_a.wait_healthy()
        serve_b.wait_healthy()
        # B lists its own model and A's; the peer that is down is skipped
        rows = {r["id"]: r for r in httpx.get(serve_b.url + "/v1/models", timeout=30).json()["data"]}
        assert sorted(rows) == ["gemma", "smol"]
        assert rows["smol"]["owned_by"] == "fitquant"
        assert rows["gemma"]["owned_by"] == f"peer {peer_a}"
        serve_b.wait_for(rf"peer-down peer=http://127\.0\.0\.1:{dead} .*action=skipped", timeout=10)
        # A lists its own only (a peer's list is never a peer's peers')
        assert [r["id"] for r in httpx.get(serve_a.url + "/v1/models", timeout=10).json()["data"]] == ["gemma"]

        # a chat for A's model sent to B is answered by A (which loads it on demand)
        body = {"model": "gemma", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        answer = httpx.post(serve_b.url + "/v1/chat/completions", json=body, timeout=180)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        serve_a.wait_for(r"ready model=gemma ")
        serve_b.wait_for(rf"forwarded model=gemma peer={re.escape(peer_a)} route=chat/completions")
        answered = _requests_for(serve_a, "gemma")
        assert answered >= 1  # (exactly 1 once a proxied request is counted once: test_serve.py)
        assert not serve_b.events("loading"), "B loaded nothing of its own"

        # streaming passes through the peer too: SSE ...
        chunks = []
        with httpx.stream("POST", serve_b.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as stream:  # fmt: skip
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]" and len(chunks) >= 3, chunks
        assert all(json.loads(c)["object"] == "chat.completion.chunk" for c in chunks[:-1])
        # ... and Ollama's NDJSON
        lines = []
        with httpx.stream("POST", serve_b.url + "/api/chat", json={"model": "gemma", "messages": body["messages"],
                          "options": {"num_predict": 4}}, timeout=120) as stream:  # fmt: skip
            assert stream.status_code == 200
            lines = [json.loads(line) for line in stream.iter_lines() if line.strip()]
        assert lines[-1]["done"] is True and all(line["model"] == "gemma" for line in lines)
        assert _requests_for(serve_a, "gemma") == answered + 2  # streams are counted once each

        # a model neither serves
        nope = httpx.post(serve_b.url + "/v1/chat/completions", json={**body, "model": "nope"}, timeout=30)
        assert nope.status_code == 404
        assert nope.json()["error"]["code"] == "model_not_found"
        assert "'nope' is not served here" in nope.json()["error"]["message"]

        # A goes away: B still answers for its own model
        assert serve_a.stop() == 0
        own = httpx.post(serve_b.url + "/v1/chat/completions", json={**body, "model": "smol"}, timeout=180)
        assert own.status_code == 200, own.text
        assert "smol" in [r["id"] for r in httpx.get(serve_b.url + "/v1/models", timeout=30).json()["data"]]
        # a request for A's model is a one-line error naming the peer, not a hang
        gone = httpx.post(serve_b.url + "/v1/chat/completions", json=body, timeout=30)
        assert gone.status_code == 502, gone.text
        assert gone.json()["error"]["message"].startswith(f"peer {peer_a} serving gemma did not answer")
        assert serve_b.stop() == 0
