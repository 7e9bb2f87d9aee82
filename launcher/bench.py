"""`fitquant bench [NAME]`: prefill and decode tokens/s of a running model at a few depths, measured through its
server with the server's own timings, beside what fitquant predicts for it (launcher.speed), as llama-bench prints
them.

Each depth is `reps` requests (llama-bench's -r; their mean and standard deviation, as llama-bench prints them) whose
prompt is about that many tokens (counted with the server's tokenizer where it has one) and which generate a fixed
number of tokens: llama-server's `timings` give prefill (`prompt_per_second`) and
decode (`predicted_per_second`), Ollama's its `prompt_eval_*` and `eval_*` durations. A fresh word at the start of
every prompt keeps the server's prompt cache from answering for it, and llama.cpp's servers are asked not to use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError

if TYPE_CHECKING:
    from launcher.backends.base import Instance
    from launcher.instances import RunningInstance
    from launcher.plan import Option, Plan

DEFAULT_DEPTHS = (0, 512, 2048)
DEFAULT_TOKENS = 64
DEFAULT_REPS = 3  # requests per depth: one request's rate wanders by 5-6% on a busy machine
BENCH_SCHEMA_VERSION = 1


@dataclass
class BenchRow:
    depth: int  # prompt tokens before the generated ones (0: a prompt of a few tokens)
    prompt_tokens: int | None  # what the server says it processed
    generated_tokens: int | None
    measured_pp_per_s: float | None
    measured_tg_per_s: float | None
    predicted_pp_per_s: float | None = None
    predicted_tg_per_s: float | None = None
    reps: int = 1  # requests measured at this depth: the rates are their mean
    measured_pp_per_s_sd: float | None = None  # the rates' standard deviation over the reps (None for one)
    measured_tg_per_s_sd: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class BenchResult:
    name: str
    model: str
    quant: str
    n_ctx: int
    server: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": BENCH_SCHEMA_VERSION, "name": self.name, "model": self.model, "quant": self.quant,
                "n_ctx": self.n_ctx, "server": self.server, "rows": [r.to_json() for r in self.rows],
                "notes": list(self.notes)}  # fmt: skip


def find_instance(name: str | None) -> RunningInstance:
    """The running model `name` names (its instance name, or the model it runs), or the only one running."""
    from launcher import instances

    running = instances.running()
    if name is None:
        if len(running) == 1:
            return running[0]
        if not running:
            raise BackendError("nothing is running; start a model with `fitquant run MODEL --serve` first")
        raise BackendError(f"{len(running)} models are running; name one: {', '.join(i.name for i in running)}")
    hits = [i for i in running if name in (i.name, i.model)]
    if len(hits) != 1:
        known = ", ".join(i.name for i in running) or "nothing is running"
        why = "no running model is called" if not hits else "several running models are called"
        raise BackendError(f"{why} {name!r} ({known}); `fitquant ps` lists them")
    return hits[0]


def as_instance(running: RunningInstance, api_key: str | None) -> Instance:
    """`running` as an instance to send requests to: with the user's key, else the one its record keeps (a
    router's private server, whose key is fitquant's own)."""
    from launcher.backends.base import Instance

    return Instance(backend=running.backend, server=running.server, version=None, endpoint=running.endpoint,
                    model_name=running.model_name or running.model, pid=running.pid,
                    api_key=api_key or running.api_key)  # fmt: skip


def measure(instance: Instance, depth: int, tokens: int, *, run: int, timeout_s: float = 600.0) -> BenchRow:
    """One request at `depth`: prefill and decode tokens/s from the server's own timings."""
    from launcher.chat import ChatError, reply
    from launcher.run import filler
    from launcher.speed import measured_speed

    ollama = instance.backend == "ollama"
    head = f"bench{run}d{depth}"  # a word no earlier prompt began with: the prompt cache cannot answer for it
    prompt = head + " " + filler(instance, depth, timeout_s=timeout_s)[0] if depth > 0 else head
    extra = None if ollama else {"cache_prompt": False, "ignore_eos": True}
    try:
        answer = reply(instance, [{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0,
                       timeout_s=timeout_s, extra=extra)  # fmt: skip
    except ChatError as exc:
        raise BackendError(f"{instance.endpoint}: {exc}") from None
    speed = measured_speed(answer, ollama=ollama)
    return BenchRow(depth, answer.prompt_tokens, answer.completion_tokens, _round(speed.pp_per_s),
                    _round(speed.tg_per_s))  # fmt: skip


def predicted_option(running: RunningInstance) -> tuple[Option | None, str | None]:
    """The plan's option for what runs (same model, quant and context), to predict from, calibrated as `run`'s plan
    is by this machine's verified runs of its backend's build; None and why not."""
    from launcher.backends import load_backend
    from launcher.errors import FitquantError
    from launcher.fit import fit
    from launcher.plan import Policy
    from launcher.run import backend_build

    reference = running.reference if running.reference is not None else running.model
    build: tuple[str, str | None] | None = (running.backend, running.version) if running.version else None
    if build is None:  # a record from before instances kept their build: the backend's default build
        try:
            build = backend_build(load_backend(running.backend))
        except FitquantError:
            build = None  # predicted uncalibrated
    try:
        plan: Plan | None = fit(reference or None, Policy(n_ctx=running.n_ctx), confirm=False, build=build)
    except FitquantError as exc:
        plan = getattr(exc, "plan", None)
        if plan is None:
            return None, f"no prediction: {exc}"
    assert plan is not None
    option = next((o for o in plan.candidates if o.quant == running.quant), None)
    return (option, None) if option is not None else (None, f"no prediction: {running.quant} is not a quant of it")


def measure_reps(instance: Instance, depth: int, tokens: int, reps: int, *, first_run: int) -> BenchRow:
    """`reps` requests at `depth` (runs numbered from `first_run`: each prompt new to the cache), as one row: the
    mean of each rate and its standard deviation, as llama-bench reports its repetitions."""
    from statistics import fmean, stdev

    rows = [measure(instance, depth, tokens, run=first_run + i) for i in range(reps)]

    def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
        known = [v for v in values if v is not None]
        if len(known) < len(values) or not known:  # a rate one request lacked: not averaged over fewer
            return None, None
        return _round(fmean(known)), _round(stdev(known)) if len(known) > 1 else None

    pp, pp_sd = mean_sd([r.measured_pp_per_s for r in rows])
    tg, tg_sd = mean_sd([r.measured_tg_per_s for r in rows])
    return BenchRow(depth, rows[0].prompt_tokens, rows[0].generated_tokens, pp, tg, reps=reps,
                    measured_pp_per_s_sd=pp_sd, measured_tg_per_s_sd=tg_sd)  # fmt: skip


def bench(running: RunningInstance, *, depths: tuple[int, ...] = DEFAULT_DEPTHS, tokens: int = DEFAULT_TOKENS,
          reps: int = DEFAULT_REPS, api_key: str | None = None, predict: bool = True) -> BenchResult:  # fmt: skip
    """Measure `running` at each depth, `reps` requests each (one warm-up request first, not counted), and put the
    prediction beside it."""
    from launcher.hardware import detect_hardware
    from launcher.speed import machine_speeds
    from launcher.speed import predict as predict_speed

    slot = max(16, running.n_ctx - tokens - 64)
    result = BenchResult(running.name, running.model, running.quant, running.n_ctx, running.server)
    usable = [d for d in depths if d <= slot]
    if len(usable) < len(depths):
        result.notes.append(f"depths above {slot} tokens skipped: the context is {running.n_ctx}")
    instance = as_instance(running, api_key)
    measure(instance, 0, 4, run=0)  # the first request pays for warming caches
    option, why = predicted_option(running) if predict else (None, None)
    devices = machine_speeds(detect_hardware(), [option]) if option is not None else {}
    if why:
        result.notes.append(why)
    if option is not None and option.calibration is not None:
        result.notes.append(f"predicted: {option.calibration.note()}")
    factors = option.calibration if option is not None else None
    for n, depth in enumerate(usable):
        row = measure_reps(instance, depth, tokens, reps, first_run=1 + n * reps)
        if option is not None:
            # the prompt fills the context from empty to `depth`; the tokens after it decode at that depth
            filling = predict_speed(option, devices, 0, n_prompt=max(1, row.prompt_tokens or depth),
                                    calibration=factors)  # fmt: skip
            row.predicted_pp_per_s = _round(filling.pp_per_s)
            row.predicted_tg_per_s = _round(predict_speed(option, devices, depth, calibration=factors).tg_per_s)
        result.rows.append(row)
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
