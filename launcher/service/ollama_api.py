"""Ollama's HTTP API over llama.cpp's OpenAI-compatible server: pure translation, both ways.

The router answers Ollama routes (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/tags`,
`/api/ps`, `/api/show`, `/api/version`) for models that run on llama-server or llama-cpp-python's server. This
module turns an Ollama request body into the upstream request (`Upstream`: path, body, the options llama.cpp cannot
honour per request) and the upstream answer (whole, or SSE chunk by chunk) into exactly what Ollama answers, so the
official `ollama` client, Open WebUI and Continue work unchanged. No I/O here: the router sends, times and streams.

Bad input raises `ValueError` with a one-line message that names the field (the router answers 400 with
`error_body(str(exc))`); an upstream answer of the wrong shape raises `UpstreamShapeError` (a ValueError; 502).
Field names follow ollama's api/types.go and server/routes.go, and llama.cpp's tools/server/README.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from launcher.catalog.types import Candidate

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
INFILL_PATH = "/infill"  # llama-server's fill-in-the-middle endpoint (native, not OpenAI)
EMBEDDINGS_PATH = "/v1/embeddings"

DONE: Literal["[DONE]"] = "[DONE]"  # the OpenAI stream's last `data:` payload

# Options a llama.cpp server fixes when it loads the model (ollama's api.Runner) and cannot change per request.
LOAD_TIME_OPTIONS = frozenset(
    {
        "numa",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
    }
)
# Per-request sampling options: ollama name -> (llama.cpp name, kind). llama-server's OpenAI routes accept the
# native names (top_k, min_p, repeat_penalty, ...) as extra body fields, /infill takes them all natively.
_SAMPLING: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "number"),
    "top_p": ("top_p", "number"),
    "top_k": ("top_k", "int"),
    "min_p": ("min_p", "number"),
    "typical_p": ("typical_p", "number"),
    "seed": ("seed", "int"),
    "repeat_penalty": ("repeat_penalty", "number"),
    "repeat_last_n": ("repeat_last_n", "int"),
    "presence_penalty": ("presence_penalty", "number"),
    "frequency_penalty": ("frequency_penalty", "number"),
    "mirostat": ("mirostat", "int"),
    "mirostat_tau": ("mirostat_tau", "number"),
    "mirostat_eta": ("mirostat_eta", "number"),
    "num_keep": ("n_keep", "int"),
}
# Ollama's own stop reasons: it has no "tool_calls" (a tool-call turn ends with "stop").
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop"}
# llama-server's native `stop_type` (/infill, /completion): "eos" and "word" stop, "limit" is n_predict
_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length", "none": "stop"}
# Ollama reports a model kept forever (keep_alive < 0) as expiring ~292 years on (now + max Go duration); a
# fixed far date says the same without reading the clock here.
NEVER_EXPIRES = "2318-01-01T00:00:00Z"


class UpstreamShapeError(ValueError):
    """Raised when the model server's answer is not the shape llama.cpp documents (the router answers 502)."""


@dataclass(frozen=True)
class Upstream:
    """One request to the model server: where, what, whether it streams, and the options it cannot honour."""

    path: str  # CHAT_PATH, COMPLETIONS_PATH, INFILL_PATH or EMBEDDINGS_PATH
    body: dict[str, Any]
    stream: bool = False
    ignored: tuple[str, ...] = ()  # option / field names accepted but not applied (num_ctx, think, ...)
    dimensions: int | None = None  # /api/embed `dimensions`: embed_response truncates and renormalises


# ---------------------------------------------------------------------------------------------------------------
# Field checks: every message names the field


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _opt_str(body: Mapping[str, Any], key: str, name: str | None = None) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name or key} must be a string, not {_kind(value)}")
    return value


def _opt_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {_kind(value)}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, not {_kind(value)}")
    return value


def _integer(value: Any, name: str) -> int:
    # JSON has one number type: 40.0 is an integer, 0.5 is not (ollama's Options.FromMap truncates; we refuse)
    number = _number(value, name)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"{name} must be an integer, not {number}")
        return int(number)
    return number


def _strings(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{name} must be an array of strings")
    return list(value)


# ---------------------------------------------------------------------------------------------------------------
# Requests


def _sampling(body: Mapping[str, Any], *, native: bool) -> tuple[dict[str, Any], list[str]]:
    """`options` -> llama.cpp sampling fields (OpenAI names where OpenAI has one, unless `native`) + ignored names."""
    raw = body.get("options")
    if raw is None:
        return {}, []
    options = _object(raw, "options")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in options.items():
        name = f"options.{key}"
        if value is None:
            continue
        if key in _SAMPLING:
            target, kind = _SAMPLING[key]
            out[target] = _integer(value, name) if kind == "int" else _number(value, name)
        elif key == "num_predict":
            n = _integer(value, name)
            # -1 (infinite) and -2 (fill the context) both mean no limit for the request: llama.cpp's default
            if n >= 0:
                out["n_predict" if native else "max_tokens"] = n
        elif key == "stop":
            out["stop"] = _strings(value, name)
        else:
            # load-time options (num_ctx, num_gpu, ...) and ones llama.cpp dropped (tfs_z, penalize_newline)
            ignored.append(key)
    return out, ignored


def _format(body: Mapping[str, Any]) -> dict[str, Any]:
    value = body.get("format")
    if value is None or value == "":
        return {}
    if value == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(value, dict):
        # a JSON schema: llama-server turns it into a grammar
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}}
    raise ValueError('format must be "json" or a JSON schema object')


_IMAGE_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
    (b"BM", "image/bmp"),
)


def _image_url(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a base64 string")
    if value.startswith("data:image/"):  # already a data URI (a client speaking OpenAI): keep it
        return {"type": "image_url", "image_url": {"url": value}}
    try:
        head = base64.b64decode(value[:32] + "=" * (-len(value[:32]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not base64 image data") from None
    mime = next((m for magic, m in _IMAGE_MAGIC if head.startswith(magic)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{value}"}}


def _content(text: str, images: Any, name: str) -> str | list[dict[str, Any]]:
    if images is None or images == []:
        return text
    if not isinstance(images, list):
        raise ValueError(f"{name}.images must be an array of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [_image_url(image, f"{name}.images[{i}]") for i, image in enumerate(images)]
    return parts


def _tool_calls_out(calls: Any, name: str, index: int) -> list[dict[str, Any]]:
    """Ollama tool calls (object arguments) -> OpenAI tool calls (JSON string arguments, an id each)."""
    if not isinstance(calls, list):
        raise ValueError(f"{name}.tool_calls must be an array")
    out = []
    for j, call in enumerate(calls):
        where = f"{name}.tool_calls[{j}]"
        function = _object(_object(call, where).get("function"), f"{where}.function")
        fname = function.get("name")
        if not isinstance(fname, str) or not fname:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # already a JSON string (a client speaking OpenAI): keep it
            text = arguments
        else:
            text = json.dumps(_object(arguments, f"{where}.function.arguments"), ensure_ascii=False)
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"call_{index}_{j}"
        out.append({"id": call_id, "type": "function", "function": {"name": fname, "arguments": text}})
    return out


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"messages must be an array, not {_kind(value)}")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of the last assistant turn's tool calls not yet answered
    for i, raw in enumerate(value):
        name = f"messages[{i}]"
        message = _object(raw, name)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{name}.role must be a non-empty string")
        text = _opt_str(message, "content", f"{name}.content")
        item: dict[str, Any] = {"role": role, "content": _content(text, message.get("images"), name)}
        thinking = _opt_str(message, "thinking", f"{name}.thinking")
        if thinking and role == "assistant":
            item["reasoning_content"] = thinking  # llama-server feeds it back to templates that keep reasoning
        if message.get("tool_calls"):
            item["tool_calls"] = calls = _tool_calls_out(message["tool_calls"], name, i)
            pending = [(c["id"], c["function"]["name"]) for c in calls]
        if role == "tool":
            # Ollama names the tool (tool_name), OpenAI points at the call (tool_call_id): match by name, in order
            tool_name = _opt_str(message, "tool_name", f"{name}.tool_name")
            given = _opt_str(message, "tool_call_id", f"{name}.tool_call_id")
            match = next((p for p in pending if p[1] == tool_name), pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
            item["tool_call_id"] = given or (match[0] if match else f"call_{i}")
            if tool_name:
                item["name"] = tool_name
        out.append(item)
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError("tools must be an array")
    for j, tool in enumerate(value):
        function = _object(_object(tool, f"tools[{j}]").get("function"), f"tools[{j}].function")
        if not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{j}].function.name must be a string")
    # Ollama's tool shape is OpenAI's: {"type": "function", "function": {name, description, parameters}}
    return [{"type": "function", **{k: v for k, v in tool.items() if k != "type"}} for tool in value]


def _streaming(body: dict[str, Any], stream: bool) -> None:
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}  # the last chunk carries the counts Ollama reports


def _model(body: Mapping[str, Any]) -> dict[str, Any]:
    model = body.get("model")
    return {"model": model} if isinstance(model, str) else {}


def chat_request(body: Any) -> Upstream | None:
    """An Ollama /api/chat body -> the OpenAI chat.completions request, or None for a load / unload call.

    None means the messages are empty: Ollama only loads the model (and unloads it with keep_alive 0); answer
    with `load_response(..., chat=True)`.
    """
    body = _object(body, "request body")
    messages = _messages(body.get("messages") if body.get("messages") is not None else [])
    if not messages:
        return None
    stream = _opt_bool(body, "stream", True)  # Ollama streams unless told not to
    sampling, ignored = _sampling(body, native=False)
    out: dict[str, Any] = {**_model(body), "messages": messages, **sampling, **_format(body)}
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    for key in ("think", "logprobs", "top_logprobs"):
        if body.get(key) is not None:
            ignored.append(key)
    _streaming(out, stream)
    return Upstream(CHAT_PATH, out, stream=stream, ignored=tuple(ignored))


def generate_request(body: Any) -> Upstream | None:
    """An Ollama /api/generate body -> the upstream request, or None for a load / unload call (empty prompt).

    `raw` goes to /v1/completions as is; `suffix` to llama-server's /infill (fill-in-the-middle); anything else
    to /v1/chat/completions as `system` (if any) then the user `prompt` (+ images). `template` and `context`
    cannot be applied by llama.cpp and are listed as ignored.
    """
    body = _object(body, "request body")
    prompt = _opt_str(body, "prompt")
    suffix = _opt_str(body, "suffix")
    system = _opt_str(body, "system")
    template = _opt_str(body, "template")
    raw = _opt_bool(body, "raw", False)
    context = body.get("context")
    images = body.get("images")
    if context is not None and not isinstance(context, list):
        raise ValueError("context must be an array of token ids")
    if not prompt and not suffix:
        return None
    stream = _opt_bool(body, "stream", True)
    ignored: list[str] = []
    for key in ("think", "logprobs", "top_logprobs"):
        if body.get(key) is not None:
            ignored.append(key)
    if raw and (template or system or context):
        # ollama's own answer to this combination (server/routes.go)
        raise ValueError("raw mode does not support template, system, or context")
    ignored += [key for key, given in (("template", template), ("context", context)) if given]
    if suffix:
        sampling, dropped = _sampling(body, native=True)
        ignored += dropped + [key for key, given in (("system", system), ("images", images)) if given]
        if body.get("format"):
            ignored.append("format")
        out: dict[str, Any] = {"input_prefix": prompt, "input_suffix": suffix, **sampling, "stream": stream}
        return Upstream(INFILL_PATH, out, stream=stream, ignored=tuple(ignored))
    sampling, dropped = _sampling(body, native=False)
    ignored += dropped
    if raw:
        if images:
            ignored.append("images")
        out = {**_model(body), "prompt": prompt, **sampling, **_format(body)}
        _streaming(out, stream)
        return Upstream(COMPLETIONS_PATH, out, stream=stream, ignored=tuple(ignored))
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": _content(prompt, images, "request")})
    out = {**_model(body), "messages": messages, **sampling, **_format(body)}
    _streaming(out, stream)
    return Upstream(CHAT_PATH, out, stream=stream, ignored=tuple(ignored))


def embed_request(body: Any) -> Upstream | None:
    """An Ollama /api/embed body (`input`: a string or an array of strings) -> the /v1/embeddings request.

    None when the input is empty: Ollama loads the model and answers no embeddings (`embed_response` of
    `{"data": []}`). `dimensions` is applied by `embed_response`; `truncate` cannot be (llama-server refuses an
    input longer than its batch instead).
    """
    body = _object(body, "request body")
    value = body.get("input")
    if value is None or value == "" or value == []:
        return None
    inputs = _strings(value, "input")
    ignored = [key for key in ("truncate",) if body.get(key) is not None]
    _opt_bool(body, "truncate", True)
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = _integer(dimensions, "dimensions")
        if dimensions < 1:
            raise ValueError("dimensions must be a positive integer")
    _, dropped = _sampling(body, native=False)
    out = {**_model(body), "input": value if isinstance(value, str) else inputs}
    return Upstream(EMBEDDINGS_PATH, out, ignored=tuple(ignored + dropped), dimensions=dimensions)


def embeddings_request(body: Any) -> Upstream | None:
    """A legacy /api/embeddings body (`prompt`) -> the /v1/embeddings request; None for an empty prompt (the
    router loads the model and answers `{"embedding": []}`, as Ollama does)."""
    body = _object(body, "request body")
    prompt = _opt_str(body, "prompt")
    if not prompt:
        return None
    _, dropped = _sampling(body, native=False)
    return Upstream(EMBEDDINGS_PATH, {**_model(body), "input": prompt}, ignored=tuple(dropped))


# ---------------------------------------------------------------------------------------------------------------
# Responses


def rfc3339(ns: int) -> str:
    """Unix nanoseconds as RFC 3339 in UTC with a Z, nanoseconds trimmed as Go's RFC3339Nano does."""
    seconds, rest = divmod(int(ns), 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{rest:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UpstreamShapeError(f"upstream {name} must be an object, not {_kind(value)}")
    return value


def _first_choice(answer: Mapping[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UpstreamShapeError("upstream answer has no choices")
    return _dict(choices[0], "choices[0]")


def _done_reason(finish: Any) -> str:
    return _DONE_REASONS.get(finish, "stop") if isinstance(finish, str) else "stop"


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ms_ns(value: Any) -> int | None:
    return round(value * 1e6) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(
    usage: Any, timings: Any, native: Mapping[str, Any] | None, *, started_ns: int, now_ns: int, load_ns: int
) -> dict[str, Any]:
    """Ollama's counts and durations (ns): llama-server's `timings` when present, else `usage` and wall time.

    `prompt_eval_count` is the prompt tokens evaluated (llama-server's prompt_n: a cached prefix is not
    evaluated again), so that count over duration is the real prefill speed.
    """
    total = max(0, now_ns - started_ns)
    out: dict[str, Any] = {"total_duration": total, "load_duration": max(0, load_ns)}
    if isinstance(timings, dict) and "predicted_n" in timings:
        out["prompt_eval_count"] = _count(timings.get("prompt_n"))
        out["prompt_eval_duration"] = _ms_ns(timings.get("prompt_ms"))
        out["eval_count"] = _count(timings.get("predicted_n"))
        out["eval_duration"] = _ms_ns(timings.get("predicted_ms"))
    elif isinstance(usage, dict):
        out["prompt_eval_count"] = _count(usage.get("prompt_tokens"))
        out["eval_count"] = _count(usage.get("completion_tokens"))
        out["eval_duration"] = max(0, total - max(0, load_ns))  # no split known: the whole wall time is eval
    elif native is not None:
        out["prompt_eval_count"] = _count(native.get("tokens_evaluated"))
        out["eval_count"] = _count(native.get("tokens_predicted"))
    return {k: v for k, v in out.items() if v is not None}


def _tool_calls_in(calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls (JSON string arguments) -> Ollama's (object arguments, an index each)."""
    if not isinstance(calls, list):
        raise UpstreamShapeError("upstream tool_calls must be an array")
    out = []
    for j, call in enumerate(calls):
        function = _dict(_dict(call, f"tool_calls[{j}]").get("function"), f"tool_calls[{j}].function")
        arguments: Any = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise UpstreamShapeError(
                    f"upstream tool_calls[{j}] arguments are not JSON: {arguments[:80]!r}"
                ) from None
        if not isinstance(arguments, dict):
            raise UpstreamShapeError(f"upstream tool_calls[{j}] arguments are not a JSON object")
        item: dict[str, Any] = {
            "function": {"index": j, "name": str(function.get("name") or ""), "arguments": arguments}
        }
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def _message(openai_message: Mapping[str, Any]) -> dict[str, Any]:
    content = openai_message.get("content")
    message: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else ""}
    reasoning = openai_message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        message["thinking"] = reasoning
    if openai_message.get("tool_calls"):
        message["tool_calls"] = _tool_calls_in(openai_message["tool_calls"])
    return message


def chat_response(openai: Any, *, model: str, started_ns: int, now_ns: int, load_ns: int = 0) -> dict[str, Any]:
    """A whole OpenAI chat completion -> Ollama's /api/chat answer (stream false)."""
    answer = _dict(openai, "answer")
    choice = _first_choice(answer)
    message = _message(_dict(choice.get("message"), "choices[0].message"))
    metrics = _metrics(
        answer.get("usage"), answer.get("timings"), None, started_ns=started_ns, now_ns=now_ns, load_ns=load_ns
    )
    return {
        "model": model,
        "created_at": rfc3339(now_ns),
        "message": message,
        "done": True,
        "done_reason": _done_reason(choice.get("finish_reason")),
        **metrics,
    }


def generate_response(openai: Any, *, model: str, started_ns: int, now_ns: int, load_ns: int = 0) -> dict[str, Any]:
    """A whole chat completion, text completion or llama-server /infill answer -> Ollama's /api/generate answer."""
    answer = _dict(openai, "answer")
    native: dict[str, Any] | None = None
    thinking = ""
    if "choices" in answer:
        choice = _first_choice(answer)
        if isinstance(choice.get("message"), dict):
            message = _message(choice["message"])
            text, thinking = message["content"], message.get("thinking", "")
        else:
            text = choice.get("text") if isinstance(choice.get("text"), str) else ""
        reason = _done_reason(choice.get("finish_reason"))
    elif isinstance(answer.get("content"), str):  # llama-server native (/infill, /completion)
        native = answer
        text = answer["content"]
        reason = _STOP_TYPES.get(str(answer.get("stop_type")), "stop")
    else:
        raise UpstreamShapeError("upstream answer has neither choices nor content")
    out: dict[str, Any] = {"model": model, "created_at": rfc3339(now_ns), "response": text}
    if thinking:
        out["thinking"] = thinking
    metrics = _metrics(
        answer.get("usage"), answer.get("timings"), native, started_ns=started_ns, now_ns=now_ns, load_ns=load_ns
    )
    return {**out, "done": True, "done_reason": reason, **metrics}


def _vectors(answer: Mapping[str, Any]) -> list[list[float]]:
    data = answer.get("data")
    if not isinstance(data, list):
        raise UpstreamShapeError("upstream embeddings answer has no data array")
    items = sorted((_dict(d, "data[]") for d in data), key=lambda d: d.get("index", 0))
    vectors = []
    for item in items:
        vector = item.get("embedding")
        if not isinstance(vector, list) or not all(isinstance(x, (int, float)) for x in vector):
            raise UpstreamShapeError("upstream embedding is not an array of numbers (is --pooling none set?)")
        vectors.append(vector)
    return vectors


def _truncate(vector: list[float], dimensions: int) -> list[float]:
    # ollama's `dimensions`: keep the first n values, then L2-normalise again (server/routes.go EmbedHandler)
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut))
    return [x / norm for x in cut] if norm > 0 else cut


def embed_response(
    openai: Any, *, model: str, started_ns: int, now_ns: int, load_ns: int = 0, dimensions: int | None = None
) -> dict[str, Any]:
    """An OpenAI embeddings answer -> Ollama's /api/embed answer (vectors in input order)."""
    answer = _dict(openai, "answer")
    vectors = _vectors(answer)
    if dimensions is not None:
        vectors = [_truncate(v, dimensions) for v in vectors]
    out: dict[str, Any] = {
        "model": model,
        "embeddings": vectors,
        "total_duration": max(0, now_ns - started_ns),
        "load_duration": max(0, load_ns),
    }
    usage = answer.get("usage")
    if isinstance(usage, dict) and _count(usage.get("prompt_tokens")) is not None:
        out["prompt_eval_count"] = _count(usage.get("prompt_tokens"))
    return out


def embeddings_response(openai: Any, *, model: str) -> dict[str, Any]:
    """An OpenAI embeddings answer -> the legacy /api/embeddings answer `{"embedding": [...]}` (`model` is kept
    for the signature's symmetry; the legacy answer does not carry it)."""
    vectors = _vectors(_dict(openai, "answer"))
    return {"embedding": vectors[0] if vectors else []}


def load_response(model: str, *, unloaded: bool, now_ns: int, chat: bool = False) -> dict[str, Any]:
    """Ollama's answer to a load (empty prompt / messages) or unload (the same with keep_alive 0) call."""
    out: dict[str, Any] = {"model": model, "created_at": rfc3339(now_ns)}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return {**out, "done": True, "done_reason": "unload" if unloaded else "load"}


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def parse_sse(buffer: bytes) -> tuple[list[dict[str, Any] | Literal["[DONE]"]], bytes]:
    """Split an SSE byte stream into the JSON payloads of its complete events, and the unconsumed rest.

    Events end with a blank line; lines end with \\r\\n, \\n or \\r; `data:` lines of one event join with \\n;
    comment lines (`:`) and other fields (event, id, retry) are skipped. Feed the rest back with the next bytes.
    A payload that is not JSON raises UpstreamShapeError.
    """
    events: list[dict[str, Any] | Literal["[DONE]"]] = []
    consumed = 0
    start = 0
    data: list[bytes] = []
    for match in _LINE_END.finditer(buffer):
        if match.group() == b"\r" and match.end() == len(buffer):
            break  # maybe the first half of \r\n: wait for the next bytes
        line = buffer[start : match.start()]
        start = match.end()
        if not line:
            if data:
                events.append(_payload(b"\n".join(data)))
            data = []
            consumed = start
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return events, buffer[consumed:]


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _payload(data: bytes) -> dict[str, Any] | Literal["[DONE]"]:
    if data.strip() == b"[DONE]":
        return DONE
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpstreamShapeError(f"upstream SSE data is not JSON: {data[:80]!r}") from None
    return _dict(value, "SSE data")


class _Stream:
    """What both streams share: the final counts, the stop reason, and errors passed on as Ollama does."""

    def __init__(self, model: str, *, started_ns: int, load_ns: int = 0) -> None:
        self.model = model
        self.started_ns = started_ns
        self.load_ns = load_ns
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.native: dict[str, Any] | None = None  # the last llama-server native chunk (/infill)
        self.last_ns = started_ns
        self.failed = False  # an upstream error was passed on: send no finish() after it

    def _stamp(self, chunk: Mapping[str, Any], now_ns: int | None) -> str:
        if now_ns is None:
            created = chunk.get("created")
            now_ns = int(created * 1_000_000_000) if isinstance(created, (int, float)) else self.last_ns
        self.last_ns = max(self.last_ns, now_ns)
        return rfc3339(now_ns)

    def _common(self, chunk: Any) -> dict[str, Any] | None:
        """Record usage / timings; None for the [DONE] marker, an Ollama error line for an upstream error."""
        if chunk == DONE:
            return None
        chunk = _dict(chunk, "SSE chunk")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        return chunk

    def feed(self, chunk: dict[str, Any] | str, now_ns: int | None = None) -> list[dict[str, Any]]:
        """One SSE payload (a dict, or "[DONE]") -> zero or more Ollama stream objects."""
        parsed = self._common(chunk)
        if parsed is None:
            return []
        if (error := _error(parsed)) is not None:
            self.failed = True
            return [error]
        return self._objects(parsed, self._stamp(parsed, now_ns))

    def _objects(self, parsed: dict[str, Any], stamp: str) -> list[dict[str, Any]]:
        """The stream objects of one parsed chunk (each stream says how)."""
        raise NotImplementedError

    def _final(self, now_ns: int) -> dict[str, Any]:
        metrics = _metrics(
            self.usage, self.timings, self.native, started_ns=self.started_ns, now_ns=now_ns, load_ns=self.load_ns
        )
        return {"done": True, "done_reason": self.finish_reason or "stop", **metrics}


def _sub(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _error(chunk: Mapping[str, Any]) -> dict[str, Any] | None:
    error = chunk.get("error")
    if error is None:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    return error_body(str(message or "the model server failed"))


class ChatStream(_Stream):
    """OpenAI chat.completion.chunk objects in, Ollama /api/chat NDJSON objects out.

    `feed(chunk)` returns one object per content / thinking delta (`done: false`); tool calls, which OpenAI
    streams in fragments, come out whole once their turn ends; an upstream error comes out as `{"error": ...}`
    (the ollama client raises it). `finish(now_ns)` gives the last object (`done: true`, counts, durations).
    """

    def __init__(self, model: str, *, started_ns: int, load_ns: int = 0) -> None:
        super().__init__(model, started_ns=started_ns, load_ns=load_ns)
        self._calls: dict[int, dict[str, Any]] = {}

    def _line(self, stamp: str, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "created_at": stamp, "message": message, "done": False}

    def _objects(self, parsed: dict[str, Any], stamp: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for choice in parsed.get("choices") or []:
            choice = _dict(choice, "choices[]")
            delta = _sub(choice, "delta")
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                out.append(self._line(stamp, {"role": "assistant", "content": "", "thinking": reasoning}))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(self._line(stamp, {"role": "assistant", "content": content}))
            for fragment in delta.get("tool_calls") or []:
                self._add_call(_dict(fragment, "delta.tool_calls[]"))
            if choice.get("finish_reason"):
                self.finish_reason = _done_reason(choice["finish_reason"])
                out += self._flush_calls(stamp)
        return out

    def _add_call(self, fragment: Mapping[str, Any]) -> None:
        index = fragment.get("index", len(self._calls))
        call = self._calls.setdefault(int(index), {"id": None, "name": "", "arguments": ""})
        if isinstance(fragment.get("id"), str):
            call["id"] = fragment["id"]
        function = _sub(fragment, "function")
        if isinstance(function.get("name"), str):
            call["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["arguments"] += function["arguments"]

    def _flush_calls(self, stamp: str) -> list[dict[str, Any]]:
        if not self._calls:
            return []
        calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(self._calls.items())
        ]
        self._calls = {}
        for call in calls:
            if call["id"] is None:
                del call["id"]
        return [self._line(stamp, {"role": "assistant", "content": "", "tool_calls": _tool_calls_in(calls)})]

    def finish(self, now_ns: int) -> dict[str, Any]:
        """The last Ollama object: done, done_reason and the counts and durations of the last usage / timings."""
        pending = self._flush_calls(rfc3339(now_ns))  # a stream cut before its finish_reason still hands them on
        final = {"model": self.model, "created_at": rfc3339(now_ns), "message": {"role": "assistant", "content": ""}}
        if pending:
            final["message"] = pending[0]["message"]
        return {**final, **self._final(now_ns)}


class GenerateStream(_Stream):
    """Chat chunks, text-completion chunks or llama-server /infill chunks in, Ollama /api/generate objects out."""

    def _line(self, stamp: str, text: str, thinking: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": stamp, "response": text}
        if thinking:
            out["thinking"] = thinking
        return {**out, "done": False}

    def _objects(self, parsed: dict[str, Any], stamp: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if "choices" not in parsed and isinstance(parsed.get("content"), str):  # llama-server native
            self.native = parsed
            if parsed["content"]:
                out.append(self._line(stamp, parsed["content"]))
            if parsed.get("stop") is True:
                self.finish_reason = _STOP_TYPES.get(str(parsed.get("stop_type")), "stop")
            return out
        for choice in parsed.get("choices") or []:
            choice = _dict(choice, "choices[]")
            delta = _sub(choice, "delta")
            text = delta.get("content") if "delta" in choice else choice.get("text")
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                out.append(self._line(stamp, "", reasoning))
            if isinstance(text, str) and text:
                out.append(self._line(stamp, text))
            if choice.get("finish_reason"):
                self.finish_reason = _done_reason(choice["finish_reason"])
        return out

    def finish(self, now_ns: int) -> dict[str, Any]:
        """The last Ollama object: done, done_reason and the counts and durations of the last usage / timings."""
        return {"model": self.model, "created_at": rfc3339(now_ns), "response": "", **self._final(now_ns)}


# ---------------------------------------------------------------------------------------------------------------
# Listing: /api/version, /api/tags, /api/ps, /api/show


@dataclass(frozen=True)
class Loaded:
    """A model that is running now."""

    size_bytes: int  # everything it holds (weights, KV, compute buffers), all devices together
    vram_bytes: int  # the part of it on GPUs
    expires_at: int | None  # unix seconds it unloads when idle; None: never (pinned, keep_alive < 0)
    context_length: int


@dataclass(frozen=True)
class ModelInfo:
    """What Ollama's listing routes say about one profile model."""

    name: str  # the alias clients call it by
    model: str  # the model reference it comes from (qwen3:14b, unsloth/Qwen3-14B-GGUF:Q4_K_M, a path)
    size_bytes: int  # file size (shards and vision projector together)
    digest: str  # sha256 hex
    family: str | None
    families: tuple[str, ...]
    parameter_size: str | None  # "134.52M", "7.6B", as ollama formats it
    parameter_count: int | None
    quantization_level: str | None  # "Q4_K_M"
    context_length: int  # the context the model server runs with (what clients must fit in)
    template: str | None  # the GGUF chat template (Jinja)
    capabilities: tuple[str, ...]  # "completion", "embedding", "vision", "tools", "insert"
    modified_at: int | None = None  # unix seconds; None: unknown
    format: str = "gguf"
    loaded: Loaded | None = None
    # scalar GGUF metadata for /api/show's model_info (token arrays are never read, so never sent)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def version_response(version: str) -> dict[str, Any]:
    """/api/version."""
    return {"version": version}


def _details(info: ModelInfo) -> dict[str, Any]:
    # Ollama always sends strings here ("" when unknown): clients compare and lower-case them
    return {
        "parent_model": "",
        "format": info.format,
        "family": info.family or "",
        "families": list(info.families) or None,
        "parameter_size": info.parameter_size or "",
        "quantization_level": info.quantization_level or "",
    }


def _entry(info: ModelInfo) -> dict[str, Any]:
    return {"name": info.name, "model": info.name, "size": info.size_bytes, "digest": info.digest}


def tags_response(models: Iterable[ModelInfo]) -> dict[str, Any]:
    """/api/tags: every model the profile serves, loaded or not."""
    out = []
    for info in models:
        entry = _entry(info)
        if info.modified_at is not None:
            entry["modified_at"] = rfc3339(info.modified_at * 1_000_000_000)
        out.append({**entry, "details": _details(info)})
    return {"models": out}


def ps_response(models: Iterable[ModelInfo]) -> dict[str, Any]:
    """/api/ps: the loaded models, with what they hold and when they unload."""
    out = []
    for info in models:
        if info.loaded is None:
            continue
        loaded = info.loaded
        expires = NEVER_EXPIRES if loaded.expires_at is None else rfc3339(loaded.expires_at * 1_000_000_000)
        out.append(
            {
                **_entry(info),
                "size": loaded.size_bytes,
                "details": _details(info),
                "expires_at": expires,
                "size_vram": loaded.vram_bytes,
                "context_length": loaded.context_length,
            }
        )
    return {"models": out}


def _parameters_text(info: ModelInfo) -> str:
    # ollama's layout ("%-30s %s"), one line per parameter; Continue reads num_ctx from it
    return f"{'num_ctx':<30} {info.context_length}"


def show_response(info: ModelInfo, *, verbose: bool = False) -> dict[str, Any]:
    """/api/show: modelfile and parameters text, template, details, model_info (architecture, parameter count,
    context length) and capabilities. `verbose` changes nothing here: token arrays are never read."""
    arch = info.family
    model_info: dict[str, Any] = {k: v for k, v in info.metadata.items() if _json_scalar(v)}
    if arch:
        model_info["general.architecture"] = arch
        model_info[f"{arch}.context_length"] = info.context_length
    if info.parameter_count is not None:
        model_info["general.parameter_count"] = info.parameter_count
    template = info.template or ""
    modelfile = [
        f"# served by fitquant as {info.name}",
        f"FROM {info.model}",
        *([f'TEMPLATE """{template}"""'] if template else []),
        f"PARAMETER num_ctx {info.context_length}",
    ]
    out: dict[str, Any] = {
        "license": str(info.metadata.get("general.license") or ""),
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": _parameters_text(info),
        "template": template,
        "details": _details(info),
        "model_info": model_info,
        "capabilities": list(info.capabilities),
    }
    if info.modified_at is not None:
        out["modified_at"] = rfc3339(info.modified_at * 1_000_000_000)
    return out


def _json_scalar(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return not isinstance(value, float) or math.isfinite(value)
    return isinstance(value, list) and len(value) <= 64 and all(isinstance(v, (str, int, bool)) for v in value)


def human_parameters(n: int) -> str:
    """A parameter count as ollama writes it (format.HumanNumber): 134515008 -> "134.52M", 7.6e9 -> "7.6B"."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            number = n / scale
            return f"{number:.0f}{unit}" if number == math.floor(number) else f"{number:.{decimals}f}{unit}"
    return str(n)


def model_info_from(
    alias: str,
    candidate: Candidate,
    n_ctx: int,
    *,
    embeddings: bool,
    modified_at: int | None = None,
    loaded: Loaded | None = None,
) -> ModelInfo:
    """The listing facts of one profile model from its catalog candidate (header, files, projector)."""
    header = candidate.header
    metadata = dict(header.metadata) if header is not None else {}
    arch = header.architecture if header is not None else None
    n_params = header.n_params if header is not None and header.n_params else None
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    families: tuple[str, ...] = (arch,) if arch else ()
    if candidate.projector is not None:
        families += ("clip",)  # ollama lists the vision projector's family beside the model's
    capabilities: list[str] = ["embedding"] if embeddings else ["completion"]
    if not embeddings:
        if candidate.projector is not None:
            capabilities.append("vision")
        if template and "tools" in template:
            capabilities.append("tools")
        if all(f"tokenizer.ggml.fim_{t}_token_id" in metadata for t in ("pre", "suf", "mid")):
            capabilities.append("insert")  # llama-server's /infill needs the FIM tokens
    size = candidate.size_bytes + (candidate.projector.size_bytes if candidate.projector is not None else 0)
    # no published content hash (a local file): a stable stand-in from the alias and the quant, so a client
    # that compares digests sees the same model until the profile changes it
    digest = candidate.content_hash or hashlib.sha256(f"{alias}\0{candidate.quant}".encode()).hexdigest()
    return ModelInfo(
        name=alias,
        model=candidate.model,
        size_bytes=size,
        digest=digest,
        family=arch,
        families=families,
        parameter_size=human_parameters(n_params) if n_params else None,
        parameter_count=n_params,
        quantization_level=candidate.quant or None,
        context_length=n_ctx,
        template=template,
        capabilities=tuple(capabilities),
        modified_at=modified_at,
        loaded=loaded,
        metadata={k: v for k, v in metadata.items() if _json_scalar(v) and not k.startswith("tokenizer.ggml.")},
    )


# ---------------------------------------------------------------------------------------------------------------
# Errors and the routes fitquant does not offer

NOT_IMPLEMENTED = ("pull", "push", "create", "delete", "copy")  # Ollama's model management: 501


def not_implemented(route: str) -> tuple[int, dict[str, Any]]:
    """501 and Ollama's error body for the model-management routes (pull, push, create, delete, copy)."""
    name = route.rstrip("/").rsplit("/", 1)[-1]
    if name not in NOT_IMPLEMENTED:
        raise ValueError(f"route must be one of {', '.join(NOT_IMPLEMENTED)}, not {route!r}")
    return 501, error_body(
        f"/api/{name} is not available: fitquant serve runs the models its profile names; "
        "add the model to the profile and reload (systemctl reload fitquant)"
    )


def ndjson_line(obj: Mapping[str, Any]) -> bytes:
    """One object of an Ollama stream as its NDJSON line (compact, UTF-8, newline-terminated)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_body(message: str) -> dict[str, Any]:
    """Ollama's error shape, on one line."""
    return {"error": " ".join(str(message).split()) or "error"}
