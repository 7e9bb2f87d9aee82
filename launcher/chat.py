"""Talk to a running model: OpenAI-compatible chat completions (llama-server, llama-cpp-python's server),
or Ollama's /api/chat with the options the model was loaded with (so a request never reloads it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError
from launcher.http import make_client

if TYPE_CHECKING:
    from launcher.backends.base import Instance


class ChatError(BackendError):
    """A chat request failed: the server answered an error (its HTTP `status`), or the connection broke (None)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def complete(
    instance: Instance,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout_s: float = 600.0,
) -> Iterator[str]:
    """Stream the reply to `messages`, piece by piece. `temperature` 0: the model's most likely reply (None: the
    server's default sampling)."""
    import httpx

    url, body = _request(instance, messages, max_tokens=max_tokens, temperature=temperature, stream=True)
    try:
        with (
            make_client(timeout_s=timeout_s, connect_timeout_s=10.0, trust_env=False) as client,
            client.stream("POST", url, json=body, headers=instance.headers()) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise ChatError(
                    f"{url} answered {response.status_code}: {_error_text(response.text)}", status=response.status_code
                )
            for line in response.iter_lines():
                piece = _piece(line, ollama=instance.backend == "ollama")
                if piece:
                    yield piece
    except httpx.TimeoutException:
        raise ChatError(f"{url} timed out after {timeout_s:.0f} s") from None
    except httpx.HTTPError as exc:
        raise ChatError(f"{url}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class ChatReply:
    """A whole reply, with what the server says it did: tokens of the formatted prompt (after the chat template)
    and of the reply; `timings` is llama-server's own block (prompt_n, prompt_ms, predicted_n, predicted_per_second,
    ...) or Ollama's durations, empty where the server sends none. None: the server did not say."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    timings: dict[str, float] = field(default_factory=dict)


def reply(
    instance: Instance,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    timeout_s: float = 600.0,
    extra: dict[str, Any] | None = None,
) -> ChatReply:
    """The reply to `messages` in one piece, with the server's token counts (not streamed: the counts come with
    the whole reply on every server: `usage` on OpenAI routes, `prompt_eval_count` on Ollama's /api/chat).
    `temperature` 0 makes the reply the model's most likely one; None leaves the server's default. `extra` adds
    fields to the request body as they are."""
    import httpx

    ollama = instance.backend == "ollama"
    url, body = _request(instance, messages, max_tokens=max_tokens, temperature=temperature, stream=False)
    body.update(extra or {})  # server-specific fields (llama-server: cache_prompt, ignore_eos)
    try:
        with make_client(timeout_s=timeout_s, connect_timeout_s=10.0, trust_env=False) as client:
            r = client.post(url, json=body, headers=instance.headers())
    except httpx.TimeoutException:
        raise ChatError(f"{url} timed out after {timeout_s:.0f} s") from None
    except httpx.HTTPError as exc:
        raise ChatError(f"{url}: {type(exc).__name__}: {exc}") from None
    if r.status_code >= 400:
        raise ChatError(f"{url} answered {r.status_code}: {_error_text(r.text)}", status=r.status_code)
    try:
        data = r.json()
    except ValueError:
        raise ChatError(f"{url} answered something that is not JSON: {r.text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ChatError(f"{url} answered {type(data).__name__}, not a JSON object")
    return parse_reply(data, ollama=ollama)


def _request(
    instance: Instance,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None,
    temperature: float | None,
    stream: bool,
) -> tuple[str, dict[str, Any]]:
    """The URL and body of a chat request: Ollama's /api/chat with the options the model was loaded with (so a
    request never reloads it), else the OpenAI route."""
    if instance.backend == "ollama":
        options: dict[str, Any] = dict(instance.extra.get("options", {}))
        if max_tokens is not None:
            options["num_predict"] = max_tokens
        if temperature is not None:
            options["temperature"] = temperature
        body: dict[str, Any] = {"model": instance.model_name, "messages": messages, "stream": stream}
        body["options"] = options
        if "keep_alive" in instance.extra:
            body["keep_alive"] = instance.extra["keep_alive"]
        return instance.endpoint.removesuffix("/v1") + "/api/chat", body
    body = {"model": instance.model_name, "messages": messages, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return instance.endpoint + "/chat/completions", body


def parse_reply(data: dict[str, Any], *, ollama: bool) -> ChatReply:
    """A ChatReply from a non-streamed reply body (pure)."""
    if "error" in data:
        raise ChatError(_error_text(json.dumps(data)))
    if ollama:
        message = data.get("message") or {}
        timings = {k: float(v) for k, v in data.items() if k.endswith("_duration") and isinstance(v, (int, float))}
        return ChatReply(str(message.get("content") or ""), _count(data.get("prompt_eval_count")),
                         _count(data.get("eval_count")), timings)  # fmt: skip
    choices = data.get("choices") or [{}]
    message = choices[0].get("message") or {}
    text = str(message.get("content") or message.get("reasoning_content") or choices[0].get("text") or "")
    usage = data.get("usage") or {}
    raw = data.get("timings") or {}
    timings = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}
    # llama-server puts both in the reply; prompt_n counts only what was evaluated (a cached prefix is not), so
    # usage comes first
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None and "prompt_n" in timings:
        prompt = _count(raw.get("prompt_n"))
    completion = _count(usage.get("completion_tokens"))
    if completion is None and "predicted_n" in timings:
        completion = _count(raw.get("predicted_n"))
    return ChatReply(text, prompt, completion, timings)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def count_tokens(instance: Instance, text: str, *, timeout_s: float = 60.0) -> int | None:
    """How many tokens the server's tokenizer makes of `text` (llama-server /tokenize, llama-cpp-python
    /extras/tokenize); None where the server has no such endpoint (Ollama)."""
    import httpx

    if instance.backend == "ollama":
        return None
    base = instance.endpoint.removesuffix("/v1")
    url, body = (
        (base + "/tokenize", {"content": text, "add_special": False})
        if instance.server == "llama-server"
        else (base + "/extras/tokenize", {"input": text})
    )
    try:
        with make_client(timeout_s=timeout_s, connect_timeout_s=timeout_s, trust_env=False) as client:
            r = client.post(url, json=body, headers=instance.headers())
    except httpx.HTTPError as exc:
        raise ChatError(f"{url}: {type(exc).__name__}: {exc}") from None
    if r.status_code >= 400:
        raise ChatError(f"{url} answered {r.status_code}: {_error_text(r.text)}", status=r.status_code)
    tokens = r.json().get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


def _piece(line: str, *, ollama: bool) -> str | None:
    line = line.strip()
    if not line:
        return None
    if not ollama:
        if not line.startswith("data:"):
            return None
        line = line[5:].strip()
        if line == "[DONE]":
            return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        raise ChatError(_error_text(json.dumps(data)))
    if ollama:
        message = data.get("message") or {}
        return str(message.get("content") or "") or None
    choices = data.get("choices") or []
    if not choices:
        return None
    delta = choices[0].get("delta") or choices[0].get("message") or {}
    text = delta.get("content") or delta.get("reasoning_content") or choices[0].get("text") or ""
    return str(text) or None


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error or body)[:300]
