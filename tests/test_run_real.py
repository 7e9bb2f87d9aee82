"""The run path against real llama.cpp servers (CPU here): what each server does by default is in the plan, so
predicted and measured agree per device and kind; a request the server rejects ends the run without a step
down; a warm-up fill the server did not process is caught by the server's own count; a server exposed without
a key is warned about. Every test checks by pid that no server is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import corpus as corpus_mod
import jsonschema
import pytest
from processes import built_llama_server, gone

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "run.schema.json").read_text())
MiB = 1024**2


def _env(tmp_path: Path, server: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "FITQUANT_LLAMA_SERVER")}
    if server == "llama-server":
        env["FITQUANT_LLAMA_SERVER"] = str(built_llama_server())
    else:  # no llama-server anywhere: llama-cpp-python's server
        empty = tmp_path / "no-builds"
        empty.mkdir(exist_ok=True)
        env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
        env["FITQUANT_LLAMA_CPP_BUILDS"] = str(empty)
    return env


def _fitquant(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)  # fmt: skip


def _first_json(stdout: str) -> dict[str, Any]:
    line = json.loads(stdout.splitlines()[0])
    jsonschema.validate(line, SCHEMA)
    assert isinstance(line, dict)
    return line


@pytest.mark.parametrize("server", ["llama-server", "llama-cpp-python"])
def test_what_each_server_does_by_default_is_predicted(server: str, tmp_path: Path, gemma3_270m_path: Path) -> None:
    """Gemma 3 (sliding-window layers) on the CPU: llama-cpp-python's full-size SWA cache and llama.cpp's
    CPU_REPACK buffer were missing from the plan (kv 14.3 MiB predicted, 38.3 MiB measured): every device and
    kind now agrees within max(5%, 16 MiB), and the KV cache and weights to a tenth of a MiB."""
    done = _fitquant(["run", str(gemma3_270m_path), "--ctx", "4096", "--no-engine", "--json", "--ram", "8GiB",
                      "--max-tokens", "8"], _env(tmp_path, server), stdin="Say hello.")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = _first_json(done.stdout)
    assert result["backend"]["server"] == server
    cpu = next(d for d in result["placement"]["devices"] if d["name"] == "CPU")
    for kind in ("model", "kv", "compute", "output"):
        predicted, measured = cpu["predicted"][kind], cpu[f"{kind}_bytes"]
        assert abs(predicted - measured) <= max(0.05 * measured, 16 * MiB), (kind, predicted, measured)
    assert abs(cpu["predicted"]["kv"] - cpu["kv_bytes"]) < 0.1 * MiB
    assert abs(cpu["predicted"]["model"] - cpu["model_bytes"]) < 0.1 * MiB
    assert "mismatch" not in done.stderr
    assert gone(result["pid"])


def _no_byte_tokens_model(folder: Path) -> Path:
    """A tiny llama whose vocabulary has no byte tokens: llama.cpp's tokenizer throws (unordered_map::at) on any
    character outside it, so the server is up but cannot encode most prompts."""
    n_layer, n_head, head, n_ff = 2, 4, 64, 512
    vocab = dict(corpus_mod.VOCAB)
    keep = [i for i, kind in enumerate(vocab["tokenizer.ggml.token_type"]) if kind != 6]  # 6: BYTE
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        vocab[key] = [vocab[key][i] for i in keep]
    n_vocab = len(keep)
    kv = corpus_mod._base_kv("llama", n_layer=n_layer, n_head=n_head, n_head_kv=n_head, n_ff=n_ff, name="nobytes")
    kv.update(vocab)
    kv["llama.rope.dimension_count"] = head
    kv["llama.vocab_size"] = n_vocab
    t = corpus_mod._T()
    t("token_embd.weight", corpus_mod.N_EMBD, n_vocab)
    t("output_norm.weight", corpus_mod.N_EMBD)
    t("output.weight", corpus_mod.N_EMBD, n_vocab)
    for i in range(n_layer):
        t(f"blk.{i}.attn_norm.weight", corpus_mod.N_EMBD)
        corpus_mod._attn(t, i, n_head=n_head, n_head_kv=n_head, head=head)
        t(f"blk.{i}.ffn_norm.weight", corpus_mod.N_EMBD)
        corpus_mod._dense_ffn(t, i, n_ff=n_ff)
    path = folder / "nobytes-F16.gguf"
    corpus_mod.write_f16(corpus_mod.Family("nobytes", "llama", kv, t.done(), quants=("F16",)), path)
    return path


def test_a_server_that_rejects_the_warm_up_is_not_stepped_down(tmp_path: Path) -> None:
    model = _no_byte_tokens_model(tmp_path)
    done = _fitquant(["run", str(model), "--ctx", "1024", "--no-engine", "--json", "--ram", "8GiB",
                      "--max-attempts", "3"], _env(tmp_path, "llama-server"), stdin="Say hello.")  # fmt: skip
    assert done.returncode == 1, done.stderr
    failure = _first_json(done.stdout)
    assert failure["ok"] is False and failure["error"]["type"] == "RunFailed", failure
    assert [a["outcome"] for a in failure["attempts"]] == ["rejected"], failure
    assert "answered 4" in failure["attempts"][0]["detail"] or "answered 5" in failure["attempts"][0]["detail"]
    assert "NoFitError" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("RunFailed: ")


def test_a_warm_up_fill_the_server_did_not_process_is_caught(tmp_path: Path, gemma3_270m_path: Path) -> None:
    """llama-server with Jinja on takes `--chat-template gemma` as the template's text: every prompt becomes a few
    tokens. The full warm-up reads the server's own prompt count and refuses to call that a filled context."""
    from launcher.backends.base import Instance
    from launcher.backends.process import free_port, spawn, stop_process
    from launcher.chat import count_tokens
    from launcher.errors import BackendError
    from launcher.run import warm_up
    from launcher.verify import placement_from_log

    port = free_port()
    log = tmp_path / "server.log"
    argv = [str(built_llama_server()), "-m", str(gemma3_270m_path), "-c", "2048", "--port", str(port),
            "--chat-template", "gemma", "--jinja", "-lv", "4"]  # fmt: skip
    proc = spawn(argv, log_path=log)
    try:
        instance = Instance("llamacpp", "llama-server", None, f"http://127.0.0.1:{port}/v1", "m", proc.pid, log,
                            proc, port=port)  # fmt: skip
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert count_tokens(instance, "hello hello") == 2
        placement = placement_from_log(log.read_text())
        from launcher import read_model_facts
        from launcher.estimate import Settings, estimate
        from launcher.plan import Option

        facts = read_model_facts(str(gemma3_270m_path))
        estimated = estimate(facts, Settings(n_ctx=2048))
        option = Option(None, facts, 2048, 0, False, estimated, {}, True, "", 0.0, True)  # type: ignore[arg-type]
        with pytest.raises(BackendError) as failed:
            warm_up(instance, placement, option, "full", timeout_s=120)
        assert getattr(failed.value, "outcome", None) == "rejected"
        assert "prompt tokens of the" in str(failed.value)
    finally:
        stop_process(proc)
    assert gone(proc.pid)


def test_a_server_on_every_address_without_a_key_is_warned_about(tmp_path: Path, gemma3_270m_path: Path) -> None:
    done = _fitquant(["run", str(gemma3_270m_path), "--ctx", "1024", "--no-engine", "--json", "--ram", "8GiB",
                      "--warmup", "none", "--host", "0.0.0.0", "--max-tokens", "4"],
                     _env(tmp_path, "llama-server"), stdin="hi")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = _first_json(done.stdout)
    assert "WARNING: the server listens on 0.0.0.0 without an API key" in done.stderr
    assert "WARNING: the server listens on 0.0.0.0 without an API key" in Path(result["log_path"]).read_text()
    assert gone(result["pid"])


def test_the_api_key_reaches_the_server_and_nothing_else_does(tmp_path: Path, gemma3_270m_path: Path) -> None:
    """The server's environment is minimal (no HF_TOKEN), but its API key is there: a request without it is
    refused, one with it answers."""
    import httpx

    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    env = {**_env(tmp_path, "llama-server"), "HF_TOKEN": "hf_never_for_servers"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(gemma3_270m_path), "--ctx", "1024",
                             "--no-engine", "--serve", "--json", "--warmup", "short", "--ram", "8GiB",
                             "--api-key-file", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        result = json.loads(line)
        models = result["endpoint"] + "/models"
        assert httpx.get(models, timeout=10).status_code == 401
        assert httpx.get(models, headers={"Authorization": "Bearer s3cret-key"}, timeout=10).status_code == 200
        environ = Path(f"/proc/{result['pid']}/environ").read_bytes().split(b"\0")
        assert b"LLAMA_API_KEY=s3cret-key" in environ
        assert not any(v.startswith(b"HF_TOKEN=") for v in environ)
        assert "s3cret-key" not in json.dumps(result)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert gone(result["pid"])


def test_the_next_plan_is_calibrated_by_the_speed_measured_here(tmp_path: Path) -> None:
    """The warm-up's measured decode speed goes into the machine record; the next plan of the same build on this
    machine scales its predictions by the measured ratio and says so."""
    from launcher.embedded import embedded_model_path

    env = _env(tmp_path, "llama-server")
    model = str(embedded_model_path())
    done = _fitquant(["run", model, "--ctx", "2048", "--no-engine", "--json", "--max-tokens", "4"], env, stdin="hi")
    assert done.returncode == 0, done.stderr
    speed = _first_json(done.stdout)["speed"]
    assert speed["measured_tg_per_s"] and speed["predicted_tg_per_s"] and speed["tg_ratio"]
    assert "decode_samples" not in _first_json(done.stdout)["warmup"]  # a short warm-up times one decode
    planned = _fitquant(["plan", model, "--ctx", "2048", "--no-engine", "--json"], env)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert any(n.startswith("calibrated by 1 verified run of this model") for n in plan["notes"]), plan["notes"]
    calibrated = plan["chosen"]["speed"]["tg_per_s"]
    assert calibrated == pytest.approx(speed["predicted_tg_per_s"] * speed["tg_ratio"], rel=0.02)
    # the next run puts that calibrated prediction beside what it measures (the ratios stay the model's own)
    again = _fitquant(["run", model, "--ctx", "2048", "--no-engine", "--json", "--max-tokens", "4"], env, stdin="hi")
    assert again.returncode == 0, again.stderr
    second = _first_json(again.stdout)["speed"]
    assert second["calibrated_tg_per_s"] == pytest.approx(calibrated, abs=0.1), second
    assert second["predicted_tg_per_s"] == speed["predicted_tg_per_s"]
    assert second["calibration"].startswith("calibrated by 1 verified run of this model"), second


def test_a_full_warmup_calibrates_prefill_and_attention_too(tmp_path: Path) -> None:
    """`--warmup full` decodes after the fill too: two decodes at different depths separate reading the weights from
    attention (its own efficiency on a CPU), and the fill's prefill gives the prefill ratio; the next plan says all
    three."""
    from launcher.embedded import embedded_model_path

    env = _env(tmp_path, "llama-server")
    model = str(embedded_model_path())
    args = ["run", model, "--ctx", "2048", "--no-engine", "--json", "--warmup", "full", "--max-tokens", "4"]
    done = _fitquant(args, env, stdin="hi")
    assert done.returncode == 0, done.stderr
    speed = _first_json(done.stdout)["speed"]
    assert speed["measured_tg_per_s_at_fill"] < speed["measured_tg_per_s"]  # attention over ~1900 positions
    assert speed["predicted_tg_per_s_at_fill"] < speed["predicted_tg_per_s"]
    assert speed["predicted_pp_per_s_fill"] and speed["measured_pp_per_s"] and speed["attention_ratio"], speed
    # the matmuls' ratio is what the fill leaves once attention is priced, kept only where that is a fair share of
    # it (launcher.speed.MIN_PREFILL_SHARE): on this model's q8_0 cache attention takes most of a fill, near the edge
    assert speed["pp_ratio"] is None or speed["pp_ratio"] > 0, speed
    # a prompt of 512 tokens at an empty context first: prefill mostly matmuls, which the prefill ratio comes from
    assert speed["measured_pp_per_s_shallow"] > 0, speed
    assert speed["predicted_pp_per_s_shallow"] > speed["predicted_pp_per_s_fill"], speed  # no attention at depth
    warmup = _first_json(done.stdout)["warmup"]
    assert warmup["shallow_prompt_tokens"] >= 500
    # each rate the fastest of three (a busy spell of the machine only slows one): the short decode, the decode
    # after the fill (the same prompt again, answered from the prompt cache) and the shallow prefill (a word each)
    for key, samples in (("measured_tg_per_s", "decode_samples"), ("measured_tg_per_s_at_fill", "decode_samples_at_fill"),
                         ("measured_pp_per_s_shallow", "prefill_samples_shallow")):  # fmt: skip
        assert len(warmup[samples]) == 3 and speed[key] == max(warmup[samples]), (key, warmup)
    # a few words prompted after the fill, the rest from the server's prompt cache: prefill at depth
    assert speed["measured_pp_per_s_at_fill"] and speed["predicted_pp_per_s_at_fill"], speed
    planned = _fitquant(["plan", model, "--ctx", "2048", "--no-engine", "--json"], env)
    assert planned.returncode == 0, planned.stderr
    notes = json.loads(planned.stdout)["notes"]
    assert any(n.startswith("calibrated by 1 verified run of this model") and "attention ×" in n
               and ("prefill ×" in n) == bool(speed["pp_ratio"]) for n in notes), notes  # fmt: skip
