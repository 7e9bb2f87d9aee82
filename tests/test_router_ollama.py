"""The router in front of an Ollama server (`backend: ollama`): a real `fitquant serve` whose model is created and
loaded in the Ollama API stub (tests/ollama_api_server.py), and, where OLLAMA_HOST answers, a real Ollama. The
router's OpenAI and Ollama routes reach the Ollama server under Ollama's name for the model (fitquant/...) and
every answer, streamed or not, comes back under the profile's alias."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ollama_api_server import OllamaApiServer
from router_fixtures import ServeProcess, free_port
from test_backend_ollama import tiny_candidate

pytestmark = pytest.mark.slow

# read before conftest's autouse fixture takes OLLAMA_HOST out of each test's environment
REAL_OLLAMA = os.environ.get("OLLAMA_HOST")
MESSAGES = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[OllamaApiServer]:
    server = OllamaApiServer(models_dir=tmp_path / "ollama-models").start()
    yield server
    server.close()


def _profile(path: Path, *, host: str, model: str, extra: str = "") -> Path:
    path.write_text(f"""machine: ollama-box
backend: ollama
ollama_host: {host}
listen: 127.0.0.1:{free_port()}
{extra}models:
  - {{model: {model}, context: 2048, alias: tiny}}
""")
    return path


def _sse(response: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def _ndjson(response: httpx.Response) -> list[Any]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def _sent(stub: OllamaApiServer, path: str) -> list[Any]:
    return [body for method, p, body in list(stub.requests) if method == "POST" and p == path]


def test_the_routers_routes_reach_an_ollama_server_under_its_name_and_answer_under_the_alias(
    tmp_path: Path, stub: OllamaApiServer
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    tiny = tiny_candidate(folder)
    profile = _profile(
        tmp_path / "ollama.yaml", host=stub.url, model=tiny.files[0].local_path or "", extra="ram: 8GiB\n"
    )
    with ServeProcess(profile, home=tmp_path / "fitquant-home") as serve:
        serve.wait_healthy(timeout=60)
        url = serve.url
        # loaded on the first request, through the run path: created in Ollama, loaded, verified
        answer = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny"
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from the stub."
        serve.wait_for(r"ready model=tiny quant=Q4_K_M ctx=2048 .*verdict=cpu-only")
        [served] = list(stub.loaded)  # Ollama's name for the model: fitquant's, with its options
        assert served.startswith("fitquant/tiny:") and served != "tiny"
        assert _sent(stub, "/v1/chat/completions")[-1]["model"] == served

        # OpenAI streaming: every chunk under the alias
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": MESSAGES, "stream": True}) as stream:  # fmt: skip
            assert stream.status_code == 200
            chunks = _sse(stream)
        assert _sent(stub, "/v1/chat/completions")[-1]["model"] == served
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello from the stub."
        assert {c["model"] for c in chunks} == {"tiny"}, "a streamed chunk leaked Ollama's name for the model"

        # Ollama's own routes pass through natively, renamed both ways
        with httpx.stream("POST", url + "/api/chat", json={"model": "tiny", "messages": MESSAGES}, timeout=60) as s:
            assert s.status_code == 200
            lines = _ndjson(s)
        assert _sent(stub, "/api/chat")[-1]["model"] == served
        assert "".join(line["message"]["content"] for line in lines) == "Hello from the stub."
        assert lines[-1]["done"] is True and {line["model"] for line in lines} == {"tiny"}
        generated = httpx.post(url + "/api/generate", json={"model": "tiny", "prompt": "Hi", "stream": False},
                               timeout=60)  # fmt: skip
        assert generated.status_code == 200, generated.text
        assert generated.json()["model"] == "tiny" and generated.json()["response"] == "Hello from the stub."
        assert _sent(stub, "/api/generate")[-1]["model"] == served

        # the listings name the alias
        assert [m["name"] for m in httpx.get(url + "/api/ps", timeout=10).json()["models"]] == ["tiny"]
        assert [m["name"] for m in httpx.get(url + "/api/tags", timeout=10).json()["models"]] == ["tiny"]
        # keep_alive 0 unloads it from the Ollama server
        unloaded = httpx.post(url + "/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=60)
        assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload"
        assert stub.loaded == {}
        assert serve.model_row("tiny")["state"] == "unloaded"
        assert serve.stop() == 0


def _real_ollama() -> str:
    """The base URL of the Ollama server OLLAMA_HOST names, or skip when there is none answering."""
    if not REAL_OLLAMA:
        pytest.skip("OLLAMA_HOST is not set: no real Ollama to test against")
    base = REAL_OLLAMA if "://" in REAL_OLLAMA else f"http://{REAL_OLLAMA}"
    try:
        httpx.get(base.rstrip("/") + "/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.skip(f"no Ollama answers at {base}: {type(exc).__name__}")
    return base.rstrip("/")


def test_the_router_in_front_of_a_real_ollama(tmp_path: Path) -> None:
    base = _real_ollama()
    models = httpx.get(base + "/api/tags", timeout=10).json().get("models") or []
    if not models:
        pytest.skip(f"the Ollama at {base} has no model pulled")
    smallest = min(models, key=lambda m: m.get("size") or 0)["name"]
    profile = _profile(tmp_path / "real.yaml", host=base, model=f"ollama://{smallest}")
    with ServeProcess(profile, home=tmp_path / "fitquant-home") as serve:
        serve.wait_healthy(timeout=120)
        answer = httpx.post(serve.url + "/v1/chat/completions", timeout=600,
                            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 8})  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny"
        with httpx.stream("POST", serve.url + "/api/chat", timeout=600,
                          json={"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 8}}) as s:  # fmt: skip
            assert s.status_code == 200
            lines = _ndjson(s)
        assert lines[-1]["done"] is True and {line["model"] for line in lines} == {"tiny"}
        assert serve.stop() == 0
