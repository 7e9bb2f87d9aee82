"""The llama.cpp backend: llama-server (or llama-cpp-python's server) started with the plan's settings exactly.

Which server: --llama-server PATH, then FITQUANT_LLAMA_SERVER, then PATH, then the build that
scripts/build-llama-cpp cached; else llama-cpp-python's OpenAI-compatible server. Its --help and --version
are probed: a flag the plan needs that the build lacks is refused in one line, one it can do without is
dropped. The log (at the verbosity that prints offload and buffer lines) goes to a file per instance, and
launcher.verify reads the placement from it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.backends.base import AttemptFailed, Instance, LaunchRequest, ServerMemory
from launcher.backends.process import tail
from launcher.errors import BackendError

if TYPE_CHECKING:
    from launcher.catalog.types import Candidate
    from launcher.estimate import GPU
    from launcher.gguf import GGUFHeader
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Budget, Option, Plan
    from launcher.verify import Placement

# MoE expert tensors kept in host memory (llama.cpp's --cpu-moe pattern)
CPU_MOE_OVERRIDE = r"blk\.\d+\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"


def model_argument(candidate: Candidate) -> list[str]:
    """-m with the first shard (llama.cpp finds the others beside it), or where llama-server can fetch it."""
    first = candidate.files[0] if candidate.files else None
    if first is not None and first.local_path:
        return ["-m", first.local_path]
    if candidate.raw_split and first is not None:
        # llama.cpp cannot read `.partXofY` pieces (nor fetch them); `fitquant run` downloads and joins them
        return ["-m", re.sub(r"\.part\d+of\d+$", "", first.name)]
    if candidate.source == "huggingface" and candidate.ollama_model:
        # hf.co/user/repo:QUANT -> llama-server -hf user/repo:QUANT (downloads every shard)
        return ["-hf", candidate.ollama_model.removeprefix("hf.co/")]
    if first is not None and first.url:
        return ["-mu", first.url]
    return ["-m", candidate.model]


# llama.cpp's built-in chat templates (src/llama-chat.cpp LLM_CHAT_TEMPLATES) for architectures whose GGUFs are
# often published without `tokenizer.chat_template`; without one the server falls back to ChatML, which these
# models do not know (they answer with the template's own markers, endlessly).
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "phi3": "phi3"}


def builtin_template(model_path: str, header: GGUFHeader | None = None) -> str | None:
    """The built-in template to name when the GGUF carries none and its architecture has one, else None. `header`:
    the file's header where the plan already read it (a big vocabulary's takes a tenth of a second to read again)."""
    from launcher.gguf import read_header

    if header is None:
        try:
            header = read_header(model_path)
        except Exception:  # the server reports an unreadable model itself, with its own words
            return None
    if header.get("tokenizer.chat_template"):
        return None
    return BUILTIN_TEMPLATES.get(header.architecture or "")


# llama-cpp-python's server formats chats with its own registry (llama_cpp/llama_chat_format.py), which has
# "gemma" but no "phi3": that one goes to its Jinja formatter (--chat_format hf-tokenizer-config) as the text below,
# the prompt llama.cpp's built-in "phi3" makes (src/llama-chat.cpp, LLM_CHAT_TEMPLATE_PHI_3). That formatter adds
# an empty assistant message for the reply to come, rendered as the bare "<|assistant|>" line, and tokenizes the
# text as it is (no BOS of its own), so the text starts with the BOS that llama-server adds.
PYTHON_SERVER_JINJA = {
    "phi3": {
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and loop.last and not m['content'] %}"
            "{{ '<|assistant|>\n' }}{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            "{% endif %}{% endfor %}"
        ),
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
    },
}


def chat_template_argv(template: str, program: ServerProgram) -> list[str]:
    """The flags that make `program` format chats with llama.cpp's built-in template `template`."""
    if program.kind == "llama-cpp-python":
        config = PYTHON_SERVER_JINJA.get(template)
        if config is None:
            return ["--chat_format", template]
        import json

        from launcher.paths import cache_dir

        path = cache_dir() / "chat-templates" / f"{template}.tokenizer_config.json"
        text = json.dumps(config, indent=1)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
            partial.write_text(text)
            os.replace(partial, path)
        return ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(path)]
    # With Jinja on (llama-server's default since 2025) --chat-template's value is Jinja *text*, not a name:
    # "gemma" became a 3-token prompt that drops every message. --no-jinja makes it the built-in template's name;
    # builds without that flag have Jinja off by default.
    return (["--no-jinja"] if program.has("--no-jinja") else []) + ["--chat-template", template]


def layer_split(budgets: Sequence[Budget], option: Option | None = None) -> list[GPU]:
    from launcher.plan import layer_split as split

    return split(budgets, option.split if option is not None else None)


def device_argv(plan: Plan, option: Option) -> list[str]:
    """--device and --tensor-split for the option's placement: the devices in order (the last takes the output
    layer) and their shares; -ts alone for the proportional split over every GPU."""
    from launcher.plan import llama_device_names

    gpus = layer_split(plan.budgets, option)
    argv = []
    if option.split is not None:
        names = llama_device_names(plan.budgets)
        argv += ["-dev", ",".join(names[g.name] for g in gpus)]
    if len(gpus) > 1:
        argv += ["-ts", ",".join(str(g.split_weight) for g in gpus)]
    return argv


def server_argv(
    plan: Plan,
    option: Option | None = None,
    *,
    port: int = 8080,
    host: str = "127.0.0.1",
    program: str = "llama-server",
) -> list[str]:
    """The llama-server command line for `option` (default: the plan's choice); fit off: the plan did the fitting."""
    c = option or plan.chosen
    if c is None:
        raise ValueError("the plan has no chosen configuration")
    p = plan.policy
    argv = [program, *model_argument(c.candidate)]
    argv += ["-c", str(c.n_ctx), "-ngl", str(c.n_gpu_layers), "-ctk", p.type_k, "-ctv", p.type_v]
    argv += ["-fa", "on" if c.estimate.flash_attn else "off", "--fit", "off", "-np", str(p.n_parallel)]
    if c.estimate.settings.kv_unified:
        argv.append("--kv-unified")
    argv += device_argv(plan, c)
    if c.cpu_moe:
        argv += ["-ot", CPU_MOE_OVERRIDE]
    if p.vision and c.candidate.projector is not None:
        proj = c.candidate.projector
        argv += ["--mmproj", proj.local_path or proj.url or proj.name]
    argv += ["--host", host, "--port", str(port)]
    return argv


# ---------------------------------------------------------------------------------------------------------
# Running it


@dataclass(frozen=True)
class ServerProgram:
    """Which llama.cpp server runs the plan, and what its build accepts."""

    kind: str  # "llama-server" | "llama-cpp-python"
    argv0: tuple[str, ...]  # the command prefix: (path,) or (python, "-m", "llama_cpp.server")
    version: str | None
    flags: frozenset[str] = frozenset()  # every flag its --help names (llama-server only)
    flash_attn_takes_value: bool = True  # builds before 2025-08 take a bare -fa
    found_by: str = ""  # how it was found: "--llama-server", "FITQUANT_LLAMA_SERVER", "PATH", "build cache", ...

    def has(self, *names: str) -> bool:
        return any(n in self.flags for n in names)


_FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
_VERSION = re.compile(r"version:\s*(?P<v>\S+)(?:\s*\((?P<rest>[^)]*)\))?")


def probe_server(path: str, *, found_by: str) -> ServerProgram:
    """Run `path --version` and `--help`; refuse, in one line, a program that is not llama-server."""
    out = []
    for arg in ("--version", "--help"):
        try:
            done = subprocess.run([path, arg], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{path} ({found_by}) cannot be run: {exc}") from None
        out.append((done.stdout + done.stderr).decode("utf-8", "replace"))
    version_text, help_text = out
    m = _VERSION.search(version_text)
    flags = frozenset(_FLAG.findall(help_text))
    if m is None or (not {"--ctx-size", "--n-gpu-layers"} <= flags and not {"-c", "-ngl"} <= flags):
        raise BackendError(
            f"{path} ({found_by}) is not llama-server: its --version and --help print nothing llama-server prints; "
            "pass the path of llama.cpp's llama-server, or build one with scripts/build-llama-cpp"
        )
    version = m.group("v") + (f" ({m.group('rest')})" if m.group("rest") else "")
    takes_value = bool(re.search(r"--flash-attn\s+\[?on\|off", help_text))
    return ServerProgram("llama-server", (path,), version, flags, takes_value, found_by)


def find_server(explicit: str | None = None, *, env: Mapping[str, str] | None = None) -> ServerProgram:
    """llama-server by --llama-server, then FITQUANT_LLAMA_SERVER, then PATH, then scripts/build-llama-cpp's
    cache; else llama-cpp-python's OpenAI-compatible server. BackendError when there is neither."""
    env = os.environ if env is None else env
    for value, found_by in ((explicit, "--llama-server"), (env.get("FITQUANT_LLAMA_SERVER"), "FITQUANT_LLAMA_SERVER")):
        if value:
            path = shutil.which(value) or value
            if not os.path.isfile(path):
                raise BackendError(f"{found_by} {value}: no such program")
            return probe_server(path, found_by=found_by)
    on_path = shutil.which("llama-server", path=env.get("PATH"))
    if on_path:
        return probe_server(on_path, found_by="PATH")
    from launcher.backends.builds import find_built

    built = find_built("llama-server")
    if built is not None:
        return probe_server(str(built), found_by="scripts/build-llama-cpp")
    if importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None:
        from importlib.metadata import version

        return ServerProgram(
            "llama-cpp-python", (sys.executable, "-m", "llama_cpp.server"), version("llama-cpp-python"),
            found_by="llama-cpp-python[server]",
        )  # fmt: skip
    raise BackendError(
        "no llama.cpp server here: install one (pip install 'fitquant[llamacpp]' for llama-cpp-python's server, "
        "or scripts/build-llama-cpp for llama-server), or pass --llama-server PATH"
    )


def adapt_argv(argv: list[str], program: ServerProgram, *, rpc: Sequence[str] = ()) -> list[str]:
    """The plan's llama-server argv for this build: flags it lacks dropped where harmless, refused where the
    plan depends on them; the log verbosity that prints offload and buffer lines; the RPC servers."""
    out = list(program.argv0) + argv[1:]
    if not program.flags:
        return out

    def need(flag: str, why: str, *aliases: str) -> None:
        if not program.has(flag, *aliases):
            raise BackendError(
                f"llama-server {program.version} ({program.argv0[0]}) is too old for this plan: it has no {flag} "
                f"({why}); use a newer build (scripts/build-llama-cpp)"
            )

    if "--fit" in out and not program.has("--fit", "-fit"):
        i = out.index("--fit")
        del out[i : i + 2]  # builds before --fit never re-fit on their own
    if "-fa" in out:
        i = out.index("-fa")
        if not program.flash_attn_takes_value:  # builds before 2025-08 take a bare -fa for "on"
            out[i : i + 2] = ["-fa"] if out[i + 1] == "on" else []
    need("-ctk", "the KV cache type", "--cache-type-k")
    if "-ot" in out:
        need("-ot", "MoE experts kept on the CPU", "--override-tensor")
    if "--kv-unified" in out:
        need("--kv-unified", "one KV cache shared by the slots", "-kvu")
    if "-dev" in out:
        need("-dev", "the devices the plan places the layers on, in its order", "--device")
    if rpc:
        need("--rpc", "RPC devices; build with -DGGML_RPC=ON (scripts/build-llama-cpp does)")
        out = with_rpc(out, rpc)
    if program.has("-lv", "--log-verbosity"):
        out += ["-lv", "4"]  # offload, buffer and fit lines are printed at this verbosity (PR #23021)
    return out


def with_rpc(argv: list[str], rpc: Sequence[str]) -> list[str]:
    """`argv` with `--rpc HOST:PORT,...` before its --device: llama.cpp registers the RPC devices while it parses
    --rpc, and --device looks their names (RPC0, RPC1) up as it parses."""
    at = argv.index("-dev") if "-dev" in argv else len(argv)
    return [*argv[:at], "--rpc", ",".join(rpc), *argv[at:]]


def python_server_argv(plan: Plan, option: Option, program: ServerProgram, *, host: str, port: int) -> list[str]:
    """llama-cpp-python's server for the same configuration; refuses what it cannot do."""
    import gguf

    p = plan.policy
    refuse = []
    if p.n_parallel > 1:
        refuse.append(f"{p.n_parallel} parallel slots")
    if option.cpu_moe:
        refuse.append("MoE experts kept on the CPU")
    if refuse:
        raise BackendError(
            f"llama-cpp-python's server cannot run this plan ({', '.join(refuse)}); use llama-server "
            "(--llama-server PATH, or scripts/build-llama-cpp)"
        )
    first = option.candidate.files[0] if option.candidate.files else None
    if first is None or not first.local_path:
        raise BackendError(f"{option.quant} is not on this machine yet; fetch it first")

    def ggml_type(name: str) -> str:
        return str(int(gguf.GGMLQuantizationType[name.upper()]))

    argv = [*program.argv0, "--model", first.local_path, "--n_ctx", str(option.n_ctx)]
    argv += ["--n_gpu_layers", str(option.n_gpu_layers), "--flash_attn", str(bool(option.estimate.flash_attn))]
    argv += ["--type_k", ggml_type(p.type_k), "--type_v", ggml_type(p.type_v)]
    argv += ["--n_ubatch", str(p.n_ubatch), "--host", host, "--port", str(port)]
    if option.split is not None:
        # no device selection there: the placement is -ts with zeros for the devices left out, in their own order
        weight = dict(zip(option.split.devices, option.split.weights, strict=True))
        order = [b.name for b in plan.budgets if b.name != "CPU"]
        if [n for n in order if n in weight] != list(option.split.devices):
            raise BackendError(
                f"llama-cpp-python's server cannot order the devices as this plan does ({option.split.how}); "
                "use llama-server (--llama-server PATH, or scripts/build-llama-cpp)"
            )
        argv += ["--tensor_split", *[str(weight.get(n, 0)) for n in order]]
    elif len(gpus := layer_split(plan.budgets)) > 1:
        argv += ["--tensor_split", *[str(g.split_weight) for g in gpus]]
    if p.vision and option.candidate.projector is not None and option.candidate.projector.local_path:
        argv += ["--clip_model_path", option.candidate.projector.local_path]
    return argv


class LlamaCppBackend:
    """llama-server (or llama-cpp-python's server) started with the plan's settings, verified from its log."""

    name = "llamacpp"

    def __init__(self, server: str | None = None, *, env: Mapping[str, str] | None = None) -> None:
        self._explicit = server
        self._env = os.environ if env is None else env
        self._program: ServerProgram | None = None

    @property
    def program(self) -> ServerProgram:
        if self._program is None:
            self._program = find_server(self._explicit, env=self._env)
        return self._program

    def launch_form(self, plan: Plan, *, host: str = "127.0.0.1", port: int = 8080) -> list[str]:
        return server_argv(plan, port=port, host=host)

    def server_memory(self) -> ServerMemory:
        """llama-server: one logits row per slot and a SWA cache of the window (tools/server sets swa_full off);
        llama-cpp-python's server: logits for every prompt token and llama.cpp's library default, a full-size SWA
        cache (its settings expose no swa_full). Both repack host weights for the CPU (llama.cpp's extra buffer
        types are on by default: use_extra_bufts)."""
        python_server = self.unavailable() is None and self.program.kind == "llama-cpp-python"
        return ServerMemory(all_logits=python_server, swa_full=python_server, cpu_repack=True)

    def fa_quants(self) -> str | None:
        """The FlashAttention K-V pairs of this server's build when fitquant built it (build.json: a CUDA build's
        GGML_CUDA_FA_QUANTS); None when unknown (another build: its first load's log tells, and the record keeps it)."""
        from launcher.backends.builds import read_build

        if self.unavailable() is not None or self.program.kind != "llama-server":
            return None
        build = read_build(Path(self.program.argv0[0]).resolve().parent.parent)
        return build.fa_quants if build is not None else None

    def unavailable(self) -> str | None:
        try:
            self.program  # noqa: B018 (finding it is the check)
        except BackendError as exc:
            return str(exc)
        return None

    def fetch(self, candidate: Candidate, *, vision: bool = False, progress: bool = True) -> Candidate:
        from launcher.fetch import fetch_candidate

        return fetch_candidate(candidate, vision=vision, progress=progress)

    def argv(self, plan: Plan, option: Option, request: LaunchRequest, port: int) -> list[str]:
        program = self.program
        if program.kind == "llama-cpp-python":
            if request.rpc:
                raise BackendError("llama-cpp-python's server takes no RPC devices; use llama-server for --rpc")
            argv = python_server_argv(plan, option, program, host=request.host, port=port)
            if request.embeddings:
                argv += ["--embedding", "True"]
            if request.alias:
                argv += ["--model_alias", request.alias]
        else:
            argv = adapt_argv(server_argv(plan, option, port=port, host=request.host), program, rpc=request.rpc)
            if request.embeddings:
                # mean pooling gives a causal chat model sentence embeddings; this server still answers chat
                argv += ["--embeddings", "--pooling", "mean"]
            if request.alias:
                argv += ["--alias", request.alias]
        first = option.candidate.files[0] if option.candidate.files else None
        template = (
            builtin_template(first.local_path, option.candidate.header)
            if first is not None and first.local_path
            else None
        )
        if template:
            argv += chat_template_argv(template, program)
        return argv

    def start(self, plan: Plan, option: Option, request: LaunchRequest, *, log_dir: Path) -> Instance:
        from launcher.backends.process import free_port, port_in_use, spawn

        port = request.port
        if port is None:
            port = free_port(request.host)
        elif port_in_use(request.host, port):
            raise BackendError(f"port {port} on {request.host} is in use; choose another with --port")
        argv = self.argv(plan, option, request, port)
        # the key through the environment, never argv (argv is visible to every user in `ps`); spawn gives the
        # server a minimal environment (no HF_TOKEN, no other secret), plus what is passed in extra_env
        key_name = "LLAMA_API_KEY" if self.program.kind == "llama-server" else "API_KEY"
        key_env = {key_name: request.api_key} if request.api_key else None
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{_slug(option.quant)}-{port}-{int(time.time() * 1000)}.log"
        proc = spawn(argv, log_path=log_path, env=self._env, extra_env=key_env)
        first = option.candidate.files[0] if option.candidate.files else None
        model_name = first.local_path if first is not None and first.local_path else option.candidate.model
        model_name = request.alias or model_name
        return Instance(
            backend=self.name,
            server=self.program.kind,
            version=self.program.version,
            endpoint=f"http://{_url_host(request.host)}:{port}/v1",
            model_name=model_name or option.quant,
            pid=proc.pid,
            log_path=log_path,
            process=proc,
            host=request.host,
            port=port,
            api_key=request.api_key,
            extra={"argv": argv},
        )

    def wait_ready(self, instance: Instance, timeout_s: float) -> None:
        """Poll /health (llama-server) or /v1/models (llama-cpp-python) until 200; the child exiting ends it."""
        import httpx

        from launcher.backends.process import poll_until
        from launcher.http import make_client

        base = instance.endpoint.removesuffix("/v1")
        path = "/health" if instance.server == "llama-server" else "/v1/models"
        proc = instance.process

        def probe(client: httpx.Client) -> str | None:
            if proc is not None and proc.poll() is not None:
                raise _failed_start(instance, proc.returncode)
            try:
                r = client.get(base + path, headers=instance.headers())
            except httpx.TransportError as exc:
                return str(exc)
            return None if r.status_code == 200 else f"{path} answered {r.status_code}"

        # one client for the whole wait (a loopback poll every 50 ms: no client or pool made per poll)
        with make_client(timeout_s=2.0, connect_timeout_s=2.0, trust_env=False) as client:
            why = poll_until(lambda: probe(client), timeout_s=timeout_s)
        if why is not None:
            raise AttemptFailed(
                "timeout",
                f"{instance.server} was not ready after {timeout_s:.0f} s ({why})",
                log_tail=tail(instance.log_path),
            )

    def placement(self, instance: Instance, option: Option) -> Placement:
        from launcher.verify import (
            attach_nvml,
            attach_prediction,
            nvml_used_by_pid,
            placement_from_log,
            visible_nvml_indices,
        )

        text = ""
        for _ in range(20):  # the server may still be flushing its log when /health turns 200
            text = instance.log_path.read_text("utf-8", "replace") if instance.log_path else ""
            if "layers to GPU" in text:
                break
            time.sleep(0.1)
        placement = placement_from_log(text, token_embd_bytes=option.facts.input_bytes)
        attach_prediction(placement, option.estimate.devices, type_k=option.estimate.settings.type_k)
        if instance.pid is not None:  # NVML index -> the server's rank (its CUDA_VISIBLE_DEVICES order)
            attach_nvml(placement, nvml_used_by_pid(instance.pid), visible=visible_nvml_indices(self._env))
        return placement

    def stop(self, instance: Instance) -> None:
        from launcher.backends.process import stop_pid, stop_process

        if instance.process is not None:
            stop_process(instance.process)
        elif instance.pid is not None:
            stop_pid(instance.pid)


def _failed_start(instance: Instance, returncode: int | None) -> AttemptFailed:
    """Why the server exited during load: out of memory, or a crash (a signal, or another error)."""
    from launcher.verify import oom_line

    lines = tail(instance.log_path, 40)
    # the first out-of-memory line is the cause (which device, how many bytes); the later ones are its echoes
    oom = oom_line(lines)
    died_by_signal = returncode is not None and returncode < 0
    how = f"killed by {_signal_name(-(returncode or 0))}" if died_by_signal else f"exit status {returncode}"
    if oom is not None:
        return AttemptFailed("oom", f"{instance.server} ran out of memory while loading ({how}): {_clean(oom)}",
                             log_tail=lines[-12:])  # fmt: skip
    error = next((line for line in reversed(lines) if _ERROR.search(line)), None)
    detail = f"{instance.server} exited while loading ({how})" + (f": {_clean(error)}" if error else "")
    return AttemptFailed("crash", detail, log_tail=lines[-12:])


_ERROR = re.compile(r"\berror\b|\bfailed\b|abort|exception|terminate", re.IGNORECASE)


def _clean(line: str) -> str:
    line = re.sub(r"^\s*(?:\d+\.\d+\.\d+\.\d+\s+)?[EWIDF]\s+", "", line.strip())
    return line[:300]


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


_LISTED_DEVICE = re.compile(
    r"^\s*(?P<name>\w+):\s*(?P<desc>.*?)\s*\((?P<total>\d+)\s*MiB,\s*(?P<free>\d+)\s*MiB free\)"
)


def list_devices(program: ServerProgram, rpc: Sequence[str] = ()) -> list[tuple[str, str, int, int]]:
    """`llama-server [--rpc …] --list-devices`: (name, description, total bytes, free bytes) per device."""
    if program.kind != "llama-server":
        raise BackendError("listing RPC devices needs llama-server (llama-cpp-python's server has no --rpc)")
    # --rpc first: llama.cpp lists the devices while it parses --list-devices, RPC ones only once registered
    argv = [*program.argv0, *(["--rpc", ",".join(rpc)] if rpc else []), "--list-devices"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{program.argv0[0]} --list-devices failed: {exc}") from None
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        m = _LISTED_DEVICE.match(line)
        if m:
            out.append((m["name"], m["desc"], int(m["total"]) * 2**20, int(m["free"]) * 2**20))
    return out


def server_gpu_devices(program: ServerProgram) -> tuple[str, ...]:
    """The GPU devices this server can offload to: llama-server's `--list-devices` (none for a CPU-only build);
    for llama-cpp-python, ("GPU",) when its `llama_supports_gpu_offload()` says so (PyPI's wheel is CPU-only)."""
    if program.kind == "llama-server":
        return tuple(name for name, *_ in list_devices(program) if not name.startswith("RPC"))
    code = "import llama_cpp, sys; sys.stdout.write(str(int(llama_cpp.llama_supports_gpu_offload())))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"llama-cpp-python cannot be probed for GPU offload: {exc}") from None
    return ("GPU",) if done.stdout.strip() == b"1" else ()


GPU_SERVER_HOWTO = (
    "build one with scripts/build-llama-cpp --cuda|--rocm|--metal|--vulkan, pass --llama-server PATH to a llama.cpp "
    "release build for this GPU, or install Ollama"
)


def gpu_reach_problem(program: ServerProgram, gpus: Sequence[str]) -> str | None:
    """Why `program` cannot run a plan on this machine's GPUs (`gpus`, as people name them), or None when it can
    (or there is no GPU to reach)."""
    if not gpus or server_gpu_devices(program):
        return None
    what = (
        f"llama-server {program.version} ({program.argv0[0]})"
        if program.kind == "llama-server"
        else f"llama-cpp-python {program.version}"
    )
    return f"{what} is CPU-only: it cannot offload to {', '.join(gpus)}; {GPU_SERVER_HOWTO}"


def rpc_devices(program: ServerProgram, rpc: Sequence[str]) -> HardwareSnapshot:
    """This machine with the RPC servers' devices as its GPUs, sized as llama-server reports them."""
    from launcher.hardware import detect_hardware
    from launcher.hardware.types import Device

    listed = [d for d in list_devices(program, rpc) if d[0].startswith("RPC")]
    if len(listed) < len(rpc):
        raise BackendError(
            f"llama-server lists {len(listed)} RPC device(s) for --rpc {','.join(rpc)}; is every ggml-rpc-server "
            "running and reachable?"
        )
    local = detect_hardware()
    devices = [
        Device(
            kind="rpc", index=i, name=f"{name} ({desc})", total_bytes=total, free_bytes=free, used_bytes=total - free
        )
        for i, (name, desc, total, free) in enumerate(listed)
    ]
    notes = (*local.notes, "RPC devices as llama-server lists them (--vram describes them instead)")
    return local.model_copy(update={"devices": tuple(devices), "notes": notes})
