"""Talk to a running model: OpenAI-compatible chat completions (llama-server, llama-cpp-python's server),
or Ollama's /api/chat with the options the model was loaded with (so a request never reloads it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError

if TYPE_CHECKING:
    from launcher.backends.base import Instance


class ChatError(BackendError):
    """A chat request failed: the server answered an error, or the connection broke."""


def complete(
    instance: Instance,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None = None,
    timeout_s: float = 600.0,
) -> Iterator[str]:
    """Stream the reply to `messages`, piece by piece."""
    import httpx

    if instance.backend == "ollama":
        url = instance.endpoint.removesuffix("/v1") + "/api/chat"
        options: dict[str, Any] = dict(instance.extra.get("options", {}))
        if max_tokens is not None:
            options["num_predict"] = max_tokens
        body: dict[str, Any] = {"model": instance.model_name, "messages": messages, "stream": True, "options": options}
        if "keep_alive" in instance.extra:
            body["keep_alive"] = instance.extra["keep_alive"]
    else:
        url = instance.endpoint + "/chat/completions"
        body = {"model": instance.model_name, "messages": messages, "stream": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    try:
        with (
            httpx.Client(timeout=timeout, trust_env=False) as client,
            client.stream("POST", url, json=body, headers=instance.headers()) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise ChatError(f"{url} answered {response.status_code}: {_error_text(response.text)}")
            for line in response.iter_lines():
                piece = _piece(line, ollama=instance.backend == "ollama")
                if piece:
                    yield piece
    except httpx.TimeoutException:
        raise ChatError(f"{url} timed out after {timeout_s:.0f} s") from None
    except httpx.HTTPError as exc:
        raise ChatError(f"{url}: {type(exc).__name__}: {exc}") from None


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
        r = httpx.post(url, json=body, headers=instance.headers(), timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise ChatError(f"{url}: {type(exc).__name__}: {exc}") from None
    if r.status_code >= 400:
        raise ChatError(f"{url} answered {r.status_code}: {_error_text(r.text)}")
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
