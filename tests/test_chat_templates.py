"""Chat templates on both llama.cpp servers: every template fitquant names (llama.cpp's built-in "gemma" and "phi3"
for GGUFs without one) and a model's own (SmolLM2's), checked by what the server says it did: a known message, and
the prompt token count the server reports equal to the count of the prompt the template should make, tokenized
by the model's own vocabulary (llama.cpp, in process). SmolLM2 must also answer the question.

Before the fix, llama-server (Jinja on by default) took `--chat-template gemma` as the template's text: every chat
became a 3-token prompt without the user's message; llama-cpp-python's server has no "phi3" format at all."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from processes import built_llama_server

from launcher.backends.llamacpp import PYTHON_SERVER_JINJA, ServerProgram, builtin_template, chat_template_argv
from launcher.chat import ChatReply, parse_reply

QUESTION = "What is the capital of France? Answer in one word."
SERVERS = ["llama-server", "llama-cpp-python"]


# ---------------------------------------------------------------------------------------------------------------
# the flags (pure, plus the one file written for llama-cpp-python)


def test_llama_server_names_a_builtin_template_with_jinja_off() -> None:
    jinja_build = ServerProgram("llama-server", ("llama-server",), "b7000", frozenset({"--jinja", "--no-jinja"}))
    assert chat_template_argv("gemma", jinja_build) == ["--no-jinja", "--chat-template", "gemma"]
    old_build = ServerProgram("llama-server", ("llama-server",), "b4000", frozenset({"--chat-template"}))
    assert chat_template_argv("phi3", old_build) == ["--chat-template", "phi3"]


def test_llama_cpp_python_gets_its_own_gemma_format_and_a_jinja_phi3() -> None:
    program = ServerProgram("llama-cpp-python", (sys.executable, "-m", "llama_cpp.server"), "0.3.30")
    assert chat_template_argv("gemma", program) == ["--chat_format", "gemma"]
    argv = chat_template_argv("phi3", program)
    assert argv[:3] == ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path"]
    assert json.loads(Path(argv[3]).read_text()) == PYTHON_SERVER_JINJA["phi3"]
    assert chat_template_argv("phi3", program) == argv  # written once, same place


def test_phi3_jinja_renders_llama_cpp_s_builtin_phi3_prompt() -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox")
    config = PYTHON_SERVER_JINJA["phi3"]
    # as llama-cpp-python's hf-tokenizer-config formatter renders it: an empty assistant message appended
    template = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        config["chat_template"]
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ""},
    ]
    text = template.render(messages=messages, bos_token="<s>", eos_token="<|endoftext|>")
    # src/llama-chat.cpp LLM_CHAT_TEMPLATE_PHI_3: "<|role|>\n" content "<|end|>\n" per message, then "<|assistant|>\n"
    assert text == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n"
    )


def test_reply_counts_from_each_server_s_body() -> None:
    llama_server = {
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Paris."}}],
        "usage": {"completion_tokens": 3, "prompt_tokens": 41, "total_tokens": 44},
        "timings": {"prompt_n": 41, "prompt_ms": 12.5, "predicted_n": 3, "predicted_per_second": 90.1},
    }
    assert parse_reply(llama_server, ollama=False) == ChatReply(
        "Paris.", 41, 3, {"prompt_n": 41.0, "prompt_ms": 12.5, "predicted_n": 3.0, "predicted_per_second": 90.1}
    )
    python_server = {"choices": [{"message": {"content": "Paris"}}], "usage": {"prompt_tokens": 27}}
    assert parse_reply(python_server, ollama=False) == ChatReply("Paris", 27, None, {})
    timings_only = {"choices": [{"message": {"content": "x"}}], "timings": {"prompt_n": 9, "predicted_n": 2}}
    assert parse_reply(timings_only, ollama=False).prompt_tokens == 9
    ollama = {"message": {"role": "assistant", "content": "Paris"}, "done": True, "prompt_eval_count": 30,
              "eval_count": 2, "prompt_eval_duration": 1000, "eval_duration": 2000}  # fmt: skip
    assert parse_reply(ollama, ollama=True) == ChatReply(
        "Paris", 30, 2, {"prompt_eval_duration": 1000.0, "eval_duration": 2000.0}
    )


def test_reply_on_ollama_sends_the_load_options_and_reads_its_counts(tmp_path: Path) -> None:
    from ollama_api_server import OllamaApiServer

    from launcher.backends.base import Instance
    from launcher.chat import reply

    stub = OllamaApiServer(models_dir=tmp_path / "ollama-models").start()
    try:
        stub.add_model("tiny:latest")
        instance = Instance("ollama", "ollama", None, stub.url + "/v1", "tiny:latest", None,
                            extra={"options": {"num_ctx": 2048}, "keep_alive": -1})  # fmt: skip
        got = reply(instance, [{"role": "user", "content": QUESTION}], max_tokens=3, temperature=0.0)
        body = stub.bodies("/api/chat")[-1]
    finally:
        stub.close()
    assert body["stream"] is False and body["keep_alive"] == -1
    assert body["options"] == {"num_ctx": 2048, "num_predict": 3, "temperature": 0.0}  # the model is not reloaded
    assert got.prompt_tokens == len(QUESTION.split()) + 4 and got.completion_tokens == 3 and got.text


# ---------------------------------------------------------------------------------------------------------------
# real servers, real models


def _ask(model: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_tokens: int) -> ChatReply:
    """Plan `model` for a described CPU machine, start it on `server` through fitquant's backend, ask QUESTION."""
    from launcher.backends.base import LaunchRequest
    from launcher.backends.llamacpp import LlamaCppBackend
    from launcher.chat import reply
    from launcher.fit import fit
    from launcher.hardware import describe_machine
    from launcher.plan import Policy

    if server == "llama-server":
        backend = LlamaCppBackend(str(built_llama_server()))
    else:
        pytest.importorskip("llama_cpp.server")
        empty = tmp_path / "no-builds"
        empty.mkdir()
        monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
        monkeypatch.setenv("FITQUANT_LLAMA_CPP_BUILDS", str(empty))
        monkeypatch.delenv("FITQUANT_LLAMA_SERVER", raising=False)
        backend = LlamaCppBackend()
    assert backend.program.kind == server
    plan = fit(str(model), Policy(n_ctx=1024), machine=describe_machine(ram=8 * 2**30), confirm=False)
    assert plan.chosen is not None
    instance = backend.start(plan, plan.chosen, LaunchRequest(ready_timeout_s=300), log_dir=tmp_path / "logs")
    try:
        backend.wait_ready(instance, 300)
        messages = [{"role": "user", "content": QUESTION}]
        return reply(instance, messages, max_tokens=max_tokens, temperature=0.0, timeout_s=300)
    finally:
        backend.stop(instance)


def _count(model: Path, text: str) -> int:
    """Tokens of `text` as a server tokenizes a formatted prompt: specials parsed, BOS where the vocab adds one."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer phi3 with random weights and no chat template (tests/corpus.py): token counts only."""
    import corpus

    path = tmp_path_factory.mktemp("phi3") / "tiny-phi3-F16.gguf"
    corpus.write_f16(corpus.fam_phi3(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_gemma_template_formats_the_users_message(
    server: str, gemma3_270m_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.gguf import read_header

    assert builtin_template(str(gemma3_270m_path)) == "gemma"
    # the plan's header where it has one: the file is not read again (a path that does not exist proves it)
    assert builtin_template(str(tmp_path / "absent.gguf"), read_header(gemma3_270m_path)) == "gemma"
    assert builtin_template(str(tmp_path / "absent.gguf")) is None
    got = _ask(gemma3_270m_path, server, tmp_path, monkeypatch, max_tokens=4)
    # src/llama-chat.cpp LLM_CHAT_TEMPLATE_GEMMA
    expected = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    assert got.prompt_tokens == _count(gemma3_270m_path, expected), got
    assert got.prompt_tokens > _count(gemma3_270m_path, QUESTION) + 4


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_phi3_template_formats_the_users_message(
    server: str, tiny_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert builtin_template(str(tiny_phi3)) == "phi3"
    got = _ask(tiny_phi3, server, tmp_path, monkeypatch, max_tokens=2)
    expected = f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n"  # LLM_CHAT_TEMPLATE_PHI_3
    assert got.prompt_tokens == _count(tiny_phi3, expected), got
    assert got.prompt_tokens > _count(tiny_phi3, QUESTION) + 4


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_smollm2_own_template_formats_and_it_answers(
    server: str, smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from launcher.gguf import read_header

    assert builtin_template(str(smollm2)) is None  # its own template: fitquant names none
    template = str(read_header(smollm2).get("tokenizer.chat_template"))
    expected = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(
            messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True, bos_token="", eos_token=""
        )
    )
    assert QUESTION in expected and "<|im_start|>assistant" in expected
    got = _ask(smollm2, server, tmp_path, monkeypatch, max_tokens=48)
    assert got.prompt_tokens == _count(smollm2, expected), got
    assert "Paris" in got.text, got
