"""fitquant run, ps and stop: start the best quant, prove where it landed, chat with it or serve it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from launcher.cli import options
from launcher.defaults import DEFAULT_PLAN_CONTEXT

if TYPE_CHECKING:
    from launcher.backends.base import LaunchRequest
    from launcher.run import Attempt, RunResult


def _rpc_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    items = tuple(part.strip() for part in value.split(","))
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{item!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    return items


def _say(text: str) -> None:
    """Progress and verification for people: stderr, so that stdout stays the answer (or the JSON)."""
    click.echo(text, err=True)


@click.command()
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", callback=options.context, default=str(DEFAULT_PLAN_CONTEXT), show_default=True,
              help="Target context in tokens: 32768, 32k, 128K.")  # fmt: skip
@options.kv_options
@options.parallel_option("Parallel sequences (slots); the context is shared between them.")
@options.gpu_options
@options.gpu_name_option
@options.ram_option
@options.reserve_option
@click.option("--min-quant", callback=options.quality_floor, help="Quality floor, e.g. Q4_K_M (default: by size).")
@click.option("--strict", is_flag=True, help="Accept nothing but a full fit at the target context.")
@click.option("--min-speed", "min_speed", type=click.FloatRange(min=0, min_open=True, max=1e6), metavar="T",
              help="The best quant predicted to decode T tokens/s or more at the target context.")  # fmt: skip
@click.option("--prefer", type=click.Choice(["quality", "speed"]), default="quality", show_default=True,
              help="quality: the best quant that fits; speed: the fastest above the quality floor.")  # fmt: skip
@click.option("--vision/--no-vision", default=False, help="Load the vision projector (mmproj) when there is one.")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="Confirm the plan with a llama.cpp dry run before starting it.")  # fmt: skip
@click.option("--backend", "backend_name", default="auto", show_default=True,
              help="auto, llamacpp, ollama, or a backend another package registers.")  # fmt: skip
@click.option("--llama-server", "llama_server", metavar="PATH",
              help="llama-server to run (default: FITQUANT_LLAMA_SERVER, PATH, scripts/build-llama-cpp).")  # fmt: skip
@click.option("--rpc", callback=_rpc_list, metavar="HOST:PORT[,HOST:PORT]",
              help="llama.cpp RPC servers whose devices join this machine, planned like GPUs.")  # fmt: skip
@click.option("--serve", is_flag=True, help="Serve in the foreground until SIGTERM instead of chatting.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the server binds.")
@click.option("--port", type=click.IntRange(1, 65535), help="Server port (default: a free one).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the API key clients must send (or FITQUANT_API_KEY); never printed.")  # fmt: skip
@click.option("--warmup", type=click.Choice(["short", "full", "none"]), default="short", show_default=True,
              help="short: one completion; full: also fill the context once.")  # fmt: skip
@click.option("--max-attempts", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Configurations to try before giving up.")  # fmt: skip
@click.option("--max-tokens", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
              help="Longest reply to a piped prompt or a chat message, in tokens.")  # fmt: skip
@click.option("--temperature", type=click.FloatRange(0, 2), default=None,
              help="Sampling temperature of replies (0: the most likely reply; default: the server's).")  # fmt: skip
@click.option("--ready-timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True,
              help="Seconds to wait for a server to load the model.")  # fmt: skip
@options.json_option("Print one JSON object (docs/run.schema.json) once the model is verified and ready.")
def run(
    model: str | None,
    n_ctx: int,
    kv: str,
    kv_k: str | None,
    kv_v: str | None,
    n_parallel: int,
    vram: list[int] | None,
    ram: int | None,
    unified: int | None,
    gpu_name: list[str] | None,
    reserve: int,
    min_quant: str | None,
    strict: bool,
    min_speed: float | None,
    prefer: str,
    vision: bool,
    engine: bool,
    backend_name: str,
    llama_server: str | None,
    rpc: tuple[str, ...],
    serve: bool,
    host: str,
    port: int | None,
    api_key_file: Path | None,
    warmup: str,
    max_attempts: int,
    max_tokens: int,
    temperature: float | None,
    ready_timeout: float,
    as_json: bool,
) -> None:
    """Start the best quant of MODEL that fits, verify where it landed, step down if it spilled, then chat.

    With stdin not a terminal, answers the piped prompt and exits. With --serve, serves until SIGTERM.
    MODEL: as for `fitquant plan`; nothing for the embedded default model.
    """
    from launcher.backends.base import LaunchRequest
    from launcher.errors import FitquantError
    from launcher.http import redact_url
    from launcher.plan import Policy
    from launcher.run import RunSpec, backend_and_machine, failure_json, read_api_key, start, stop

    _stop_on_sigterm()
    shown = redact_url(model) if model else "the embedded default model"
    try:
        request = LaunchRequest(host=host, port=port, api_key=read_api_key(api_key_file), rpc=rpc,
                                ready_timeout_s=ready_timeout)  # fmt: skip
        try:
            backend, machine, _ = backend_and_machine(backend_name, llama_server=llama_server, rpc=rpc, vram=vram,
                                                      ram=ram, unified=unified, gpu_names=gpu_name)  # fmt: skip
        except ValueError as exc:  # a described machine that cannot be: --vram and --unified together, ...
            raise click.UsageError(str(exc)) from None
        policy = Policy(n_ctx=n_ctx, type_k=kv_k or kv, type_v=kv_v or kv, n_parallel=n_parallel,
                        reserve_bytes=reserve, min_quant=min_quant, strict=strict, vision=vision,
                        min_tg_per_s=min_speed, prefer=prefer)  # fmt: skip
        spec = RunSpec(model, policy, request, confirm=engine, max_attempts=max_attempts, warmup=warmup)  # type: ignore[arg-type]
        result = start(
            spec, backend=backend, machine=machine, progress=sys.stderr.isatty(), on_plan=_plan_lines,
            on_attempt=_attempt_line,
            on_start=lambda o: _say(f"starting {o.quant} at {o.n_ctx} tokens, {o.n_gpu_layers} layers on the GPU ..."),
        )  # fmt: skip
    except FitquantError as exc:
        if as_json:  # scripts read one JSON line whatever happened; the error line follows on stderr
            click.echo(json.dumps(failure_json(shown, exc)))
        raise
    try:
        _serve_or_chat(result, request, serve=serve, as_json=as_json, max_tokens=max_tokens, temperature=temperature)
    finally:
        stop(result, backend)


def _plan_lines(plan: Any) -> None:
    _say(_plan_line(plan))
    for note in plan.notes:
        _say(f"  note: {note}")


def _serve_or_chat(
    result: RunResult,
    request: LaunchRequest,
    *,
    serve: bool,
    as_json: bool,
    max_tokens: int,
    temperature: float | None,
) -> None:
    from launcher.cli.render import render_placement
    from launcher.run import exposure_warning

    inst = result.instance
    render_placement(result.placement, err=True)
    if result.speed:
        _say(_speed_line(result.speed, result.warmup.get("filled_tokens")))
    _say(f"OpenAI-compatible endpoint: {inst.endpoint} (model {inst.model_name!r})")
    warning = exposure_warning(request)
    if warning:
        _say(warning)
    if as_json:
        click.echo(json.dumps(result.to_json()))  # one line: readers take the first line, the answer follows
        sys.stdout.flush()
    if serve:
        _say(f"serving {result.instance_name}; stop with Ctrl-C, SIGTERM or `fitquant stop {result.instance_name}`")
        _wait_while_running(result)
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if prompt:
            _answer(result, [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=temperature)
    elif not as_json:
        _chat(result, max_tokens=max_tokens, temperature=temperature)


def _answer(
    result: RunResult, messages: list[dict[str, str]], *, max_tokens: int, temperature: float | None = None
) -> str:
    from launcher.chat import complete

    pieces = []
    for piece in complete(result.instance, messages, max_tokens=max_tokens, temperature=temperature):
        pieces.append(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    return "".join(pieces)


def _chat(result: RunResult, *, max_tokens: int, temperature: float | None) -> None:
    """An interactive chat: streaming replies; Ctrl-D or /bye ends it (and the server with it)."""
    _say("chat: type a message; /bye or Ctrl-D ends it and stops the server")
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        if line.strip() in ("/bye", "/exit", "/quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _answer(result, messages, max_tokens=max_tokens, temperature=temperature)
        messages.append({"role": "assistant", "content": reply})


def _wait_while_running(result: RunResult) -> None:
    """Block until a signal ends fitquant, or the server dies (an error)."""
    import time

    from launcher.errors import BackendError

    proc = result.instance.process
    while True:
        if proc is not None and proc.poll() is not None:
            raise BackendError(f"{result.instance.server} exited (status {proc.returncode}) while serving; "
                               f"its log: {result.instance.log_path}")  # fmt: skip
        time.sleep(0.5)


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, `fitquant stop`) unwinds like Ctrl-C, so every `finally` stops its server. SIGINT does too
    where whatever started fitquant ignored it: a script's background job (`fitquant run --serve &`) inherits SIGINT
    ignored, and Python then leaves it so; `kill -INT` must still stop the server."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler)


def _speed_line(speed: dict[str, Any], filled: int | None = None) -> str:
    """Measured beside predicted tokens/s, each against the prediction for what was measured: decode at a short
    prompt; with a full warm-up (`filled` tokens), decode after the fill and the fill's own prefill (every depth from
    0, not a 512-token prompt); then the finding when a GPU load runs far below its prediction."""

    def rate(value: float | None) -> str:
        return "?" if value is None else f"{value:,.1f}"

    def pair(measured: str, predicted: str) -> str:
        # the plan's prediction: calibrated by this machine's earlier runs where it was, the model's own beside it
        calibrated = speed.get(predicted.replace("predicted_", "calibrated_", 1))
        shown = f"{rate(speed.get(measured))} measured, "
        if calibrated is None:
            return shown + f"{rate(speed.get(predicted))} predicted"
        return shown + f"{rate(calibrated)} predicted ({rate(speed.get(predicted))} uncalibrated)"

    line = f"speed: decode {pair('measured_tg_per_s', 'predicted_tg_per_s')} tokens/s"
    if filled and speed.get("measured_pp_per_s") is not None:
        deep = pair("measured_tg_per_s_at_fill", "predicted_tg_per_s_at_fill")
        line += f"; after the {filled:,}-token fill: decode {deep}; the fill's prefill "
        line += pair("measured_pp_per_s", "predicted_pp_per_s_fill")
    elif speed.get("predicted_pp_per_s") is not None:
        prefill = speed.get("calibrated_pp_per_s") or speed["predicted_pp_per_s"]
        line += f"; prefill {rate(prefill)} predicted (--warmup full measures it)"
    return line + (f" — {speed['finding']}" if speed.get("finding") else "")


def _plan_line(plan: Any) -> str:
    from launcher.units import format_bytes

    c = plan.chosen
    p = plan.policy
    where = "system RAM" if not any(b.name != "CPU" for b in plan.budgets) else f"{c.n_gpu_layers} layers on the GPU"
    kv = p.type_k if p.type_k == p.type_v else f"{p.type_k}/{p.type_v}"
    fa = ", flash attention" if c.estimate.flash_attn else ""
    return (f"plan: {c.quant} at {c.n_ctx} tokens, {where}, {format_bytes(c.total_bytes)} predicted "
            f"({kv} KV cache{fa}) — {plan.reason}")  # fmt: skip


def _attempt_line(attempt: Attempt) -> None:
    mark = "ok" if attempt.outcome == "verified" else attempt.outcome
    _say(f"attempt {attempt.quant} at {attempt.n_ctx} tokens: {mark}: {attempt.detail}")


@click.command()
@options.json_option()
def ps(as_json: bool) -> None:
    """List the models fitquant started and that still run."""
    from launcher import instances
    from launcher.cli.render import print_json

    running = instances.running()
    if as_json:
        print_json({"schema_version": 1, "instances": [i.to_json() for i in running]})
        return
    if not running:
        click.echo("nothing running")
        return
    from rich.console import Console
    from rich.table import Table

    rows = [{"NAME": i.name, "MODEL": i.model, "QUANT": i.quant, "CONTEXT": str(i.n_ctx), "BACKEND": i.server,
             "PID": str(i.pid or "-"), "ENDPOINT": i.via or i.endpoint, "VERDICT": _verdict(i), "T/S": _speed(i),
             "UPTIME": _uptime(i.uptime_s)}
            for i in running]  # fmt: skip
    console = Console()
    columns, model_width = _ps_layout(rows, console.width)
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(_shortened(row[c], model_width) if c == "MODEL" else row[c] for c in columns))
    # the name and the endpoint are what people copy: whole on one line, even wider than the terminal
    console.width = max(console.width, _ps_width(columns, rows, model_width))
    console.print(table)


# Columns by how readily they go when the terminal is narrow: MODEL shrinks to _PS_MODEL_MIN (with …) first, then
# these go in this order, then MODEL. NAME and ENDPOINT never go and are never cut.
_PS_COLUMNS = ("NAME", "MODEL", "QUANT", "CONTEXT", "BACKEND", "PID", "ENDPOINT", "VERDICT", "T/S", "UPTIME")
_PS_DROPPED_FIRST = ("BACKEND", "PID", "UPTIME", "T/S", "VERDICT", "CONTEXT", "QUANT", "MODEL")


def _speed(instance: Any) -> str:
    """Decode tokens/s measured at warm-up, with the prediction: "94 (pred 80)"; "-" when not measured."""
    measured, predicted = instance.measured_tg_per_s, instance.predicted_tg_per_s
    if measured is None:
        return "-" if predicted is None else f"- (pred {predicted:.0f})"
    return f"{measured:.0f}" + (f" (pred {predicted:.0f})" if predicted is not None else "")


def _verdict(instance: Any) -> str:
    slow = bool(instance.speed_finding) and "slow" in instance.speed_finding
    return f"{instance.verdict}, slow" if slow else instance.verdict


_PS_MODEL_MIN = 12


def _ps_width(columns: list[str], rows: list[dict[str, str]], model_width: int) -> int:
    """The table's width: each column as wide as its widest cell (MODEL at most `model_width`), two spaces apart."""
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    widths = [max(len(c), min(w, model_width)) if c == "MODEL" else w for c, w in zip(columns, widths, strict=True)]
    return sum(widths) + 2 * (len(columns) - 1)


def _ps_layout(rows: list[dict[str, str]], width: int) -> tuple[list[str], int]:
    """The columns that fit `width` and the MODEL column's width (see _PS_DROPPED_FIRST)."""
    columns = list(_PS_COLUMNS)
    full = max(len(r["MODEL"]) for r in rows)
    for dropped in (None, *_PS_DROPPED_FIRST):
        if dropped is not None:
            columns.remove(dropped)
        if "MODEL" not in columns:
            return columns, 0
        spare = width - _ps_width(columns, rows, 0) + len("MODEL")  # what MODEL may take beyond the rest
        if spare >= min(full, _PS_MODEL_MIN):
            return columns, min(full, spare)
    return columns, 0


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _uptime(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


@click.command()
@click.argument("name", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop everything fitquant started.")
def stop(name: str | None, stop_all: bool) -> None:
    """Stop a model fitquant started (by NAME or model, as `fitquant ps` shows), or --all."""
    from launcher import instances
    from launcher.backends.process import stop_pid
    from launcher.errors import BackendError

    if not name and not stop_all:
        raise click.UsageError("name an instance (fitquant ps lists them) or pass --all")
    # a pid is signalled only while its process is still the one recorded (start time, program): a record left
    # by a reboot or a SIGKILL may name a pid that another program has now
    running, stale = instances.scan()
    for record in stale:
        if stop_all or name in (record.instance.name, record.instance.model):
            click.echo(f"removed the stale record {record.instance.name} ({record.why}); signalled nothing")
    chosen = running if stop_all else [i for i in running if name in (i.name, i.model)]
    if not chosen:
        if stop_all or any(name in (r.instance.name, r.instance.model) for r in stale):
            if not stale:
                click.echo("nothing running")
            return
        raise BackendError(f"nothing running is named {name!r}; `fitquant ps` lists what runs")
    for i in chosen:
        if i.owner_pid != os.getpid():
            stop_pid(i.owner_pid, expected=i.owner_identity, timeout_s=30)  # its `finally` stops the server in order
        if i.pid is not None:
            stop_pid(i.pid, expected=i.server_identity)
        instances.remove(i.name)
        click.echo(f"stopped {i.name}")


def _depths(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    from launcher.units import parse_context

    depths = []
    for part in value.split(","):
        part = part.strip()
        try:
            depths.append(0 if part == "0" else parse_context(part))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a depth in tokens like 0, 512 or 4k") from None
    return tuple(sorted(set(depths)))


@click.command()
@click.argument("name", required=False)
@click.option("--depth", "depths", default="0,512,2048", show_default=True, callback=_depths, metavar="N,N,...",
              help="Prompt tokens before the generated ones, one request each.")  # fmt: skip
@click.option("--tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Tokens generated per request.")  # fmt: skip
@click.option("--reps", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Requests per depth: their mean and standard deviation, as llama-bench's -r.")  # fmt: skip
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The key the server requires (else FITQUANT_API_KEY).")  # fmt: skip
@click.option("--predict/--no-predict", default=True, show_default=True,
              help="Plan the model again to put fitquant's prediction beside each measure.")  # fmt: skip
@options.json_option()
def bench(name: str | None, depths: tuple[int, ...], tokens: int, reps: int, api_key_file: Path | None,
          predict: bool, as_json: bool) -> None:  # fmt: skip
    """Prefill and decode tokens/s of a running model at a few depths, predicted beside measured.

    NAME: a model `fitquant ps` lists (the only one running when left out).
    """
    from launcher.bench import bench as run_bench
    from launcher.bench import find_instance
    from launcher.cli.render import print_json
    from launcher.run import read_api_key

    result = run_bench(find_instance(name), depths=depths, tokens=tokens, reps=reps,
                       api_key=read_api_key(api_key_file), predict=predict)  # fmt: skip
    if as_json:
        print_json(result.to_json())
        return
    from rich.console import Console
    from rich.table import Table

    def cell(value: float | None, sd: float | None = None) -> str:
        return "-" if value is None else f"{value:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")

    def ratio(measured: float | None, predicted: float | None) -> str:
        return "-" if not measured or not predicted else f"{measured / predicted:.2f}"

    table = Table(title=f"{result.name}: {result.quant} at {result.n_ctx} tokens on {result.server}",
                  title_justify="left")  # fmt: skip
    for column in ("depth", "pp t/s", "predicted", "ratio", "tg t/s", "predicted", "ratio"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(str(row.depth), cell(row.measured_pp_per_s, row.measured_pp_per_s_sd),
                      cell(row.predicted_pp_per_s), ratio(row.measured_pp_per_s, row.predicted_pp_per_s),
                      cell(row.measured_tg_per_s, row.measured_tg_per_s_sd),
                      cell(row.predicted_tg_per_s), ratio(row.measured_tg_per_s, row.predicted_tg_per_s))  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"pp: prefill of the prompt at that depth; tg: decode of {tokens} tokens after it (the server's "
                  f"own timings, the mean ± standard deviation of {reps} requests); ratio: measured / "
                  "predicted")  # fmt: skip
    for note in result.notes:
        console.print(f"note: {note}")
