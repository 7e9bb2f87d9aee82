"""The profile schema: pydantic models that forbid unknown keys, the value parsers behind them (sizes, contexts,
quants), and the cross-field checks, each naming its field. Also where an error's field and line are found,
so every module reports in the same `profile FILE line N: 'field' ...` form."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from launcher.defaults import DEFAULT_KV_TYPE, DEFAULT_RESERVE_BYTES, MAX_HOST_NAME_CHARS, MAX_ORIGIN_CHARS
from launcher.errors import BackendError, ProfileError
from launcher.units import MAX_BYTES, MAX_CONTEXT, MiB, OutOfRange, parse_bytes, parse_context, parse_duration
from launcher.units import shown_value as _shown

Path_ = tuple[str | int, ...]  # a field's place: ("models", 2, "port")


# ---------------------------------------------------------------------------------------------- value types


def _field_error(path: Path_, message: str) -> PydanticCustomError:
    """An error that names its field (and so its line) from wherever it is raised: a cross-field check, or a
    parser of a mapping whose entries each have their own line."""
    return PydanticCustomError("profile", "{message}", {"message": message, "path": path})


# Each parser raises ValueError with text that reads after the field's name: "'reserve' must be a size ...".


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a size like 1GiB or 512MiB, got {_shown(value)}")
    if isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"must not be negative, got {_shown(value)}")
    try:
        size = parse_bytes(value) if isinstance(value, str) else value
    except OutOfRange:
        raise ValueError(f"must be at most 1 PiB, got {_shown(value)}") from None
    except ValueError:
        raise ValueError(f"must be a size like 1GiB or 512MiB, got {_shown(value)}") from None
    if size < 0:
        raise ValueError(f"must not be negative, got {_shown(value)}")
    if size > MAX_BYTES:
        raise ValueError(f"must be at most 1 PiB, got {_shown(value)}")
    return size


def _positive_size(value: Any) -> int:
    size = _size(value)
    if size == 0:
        raise ValueError(f"must be more than 0, got {_shown(value)}")
    return size


def _reserve(value: Any) -> int | dict[str, int]:
    if not isinstance(value, dict):
        return _size(value)
    sizes = {}
    for device, size in value.items():
        try:
            sizes[str(device)] = _size(size)
        except ValueError as exc:
            raise _field_error(("reserve", str(device)), str(exc)) from None  # name the device's own line
    return sizes


def _bandwidth(value: Any) -> float:
    from launcher.speed import parse_bandwidth

    return parse_bandwidth(value)


def _flops(value: Any) -> float:
    from launcher.speed import parse_flops

    return parse_flops(value)


def _context(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a context length like 32768 or 32k, got {_shown(value)}")
    try:
        return parse_context(value)
    except OutOfRange:
        raise ValueError(f"must be at most {MAX_CONTEXT} tokens (16M), got {_shown(value)}") from None
    except ValueError:
        raise ValueError(f"must be a context length like 32768 or 32k (more than 0), got {_shown(value)}") from None


def _kv_type(value: Any) -> Any:
    from launcher.estimate import KV_CACHE_TYPES

    if isinstance(value, str) and value.lower() in KV_CACHE_TYPES:
        return value.lower()
    raise ValueError(f"must be a KV cache type ({', '.join(KV_CACHE_TYPES)}), got {value!r}")


def _quant(value: Any) -> Any:
    from launcher.plan import quality_floor_label

    if not isinstance(value, str):
        return value  # the str type reports it
    try:
        return quality_floor_label(value)
    except ValueError:
        raise ValueError(f"must be a quant fitquant knows, like Q4_K_M or Q8_0, got {value!r}") from None


def _on_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `on` / `off` as true / false
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _host_port(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT like 192.168.1.20:50052, got {value!r}")
    return value


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a duration like 30s or 10m, got {_shown(value)}")
    if (isinstance(value, str) and value.strip().startswith("-")) or (not isinstance(value, str) and value < 0):
        raise ValueError(f"must not be negative, got {_shown(value)}")
    try:
        return parse_duration(value)
    except OutOfRange:
        raise ValueError(f"must be at most 10 years, got {_shown(value)}") from None
    except ValueError:
        raise ValueError(f"must be a duration like 30s or 10m, got {_shown(value)}") from None


def _listen(value: Any) -> Any:
    host, port = _split_host_port(value) if isinstance(value, str) else (None, None)
    if host is None or port is None:
        raise ValueError(f"must be HOST:PORT like 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080, got {_shown(value)}")
    return value


def _split_host_port(value: str) -> tuple[str | None, int | None]:
    """('::1', 8080) from '[::1]:8080', ('0.0.0.0', 8080) from '0.0.0.0:8080'; None for a part that is not one."""
    import ipaddress

    host, _, port_text = value.rpartition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536 else None
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError:
            return None, port
    # a host name or IPv4 address: no colon (a bare IPv6 address needs its brackets), no spaces or slashes
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        return None, port
    return host, port


# the profile's `origins:` (launcher.service.browsers): a web page's origin as a browser writes it
# (scheme://host[:port], no path), or a pattern of one, `*` matching any part
ORIGIN_PATTERN = re.compile(r"\*|[a-z][a-z0-9+.-]*://[^/\s?#]*", re.I)
# the profile's `hosts:`: a host name as a Host header gives it (without the port), or a pattern of one
HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", re.I)


def _origin(value: Any) -> Any:
    if not isinstance(value, str) or len(value) > MAX_ORIGIN_CHARS or not ORIGIN_PATTERN.fullmatch(value):
        raise ValueError("must be a web page's origin like https://chat.example.com or http://localhost:3000 "
                         f"(scheme://host[:port], no path; * matches any part), got {_shown(value)}")  # fmt: skip
    if value.count("*") > 2:  # each * more multiplies the work of matching every page's request
        raise ValueError(f"may hold at most two *, as in http://*.example.com:*, got {_shown(value)}")
    return value


def _host_name(value: Any) -> Any:
    if not isinstance(value, str) or len(value) > MAX_HOST_NAME_CHARS or not HOST_PATTERN.fullmatch(value):
        raise ValueError("must be a host name like llm.home.arpa or *.home.arpa (no scheme, no port), "
                         f"got {_shown(value)}")  # fmt: skip
    return value


def _peer(value: Any) -> Any:
    if isinstance(value, str):
        return {"url": value}  # `- http://host:8080` for `- url: http://host:8080`
    if not isinstance(value, dict):
        raise ValueError(f"must be a URL like http://192.168.1.20:8080 or a mapping with url:, got {_shown(value)}")
    return value


def _peer_url(value: Any) -> Any:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        return value
    if "@" in value:  # user:password@host; checked first, as the other errors show the value
        raise ValueError("must not hold credentials; name the peer's key with api_key_env")
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # brackets that hold no IPv6 address, a port that is no number or beyond 65535
        valid = False
    if not valid:
        raise ValueError(f"must be an http(s) URL like http://192.168.1.20:8080, got {_shown(value)}")
    if "?" in value or "#" in value:
        raise ValueError(f"must be a plain base URL without ?query or #fragment, got {_shown(value)}")
    return value.rstrip("/")


def _ollama_host(value: Any) -> Any:
    from launcher.ollama_host import ollama_base_url

    if isinstance(value, str):
        try:
            ollama_base_url(value)
        except BackendError:
            raise ValueError(
                f"must be an Ollama address like 127.0.0.1:11434 or http://host:11434, got {value!r}"
            ) from None
    return value


def _number_or_text(example: str, minimum: int = 0, number: str = "integer") -> WithJsonSchema:
    # the JSON schema (docs/profile.schema.json) of a value YAML gives as a number or as text with a unit
    return WithJsonSchema({"anyOf": [{"type": number, "minimum": minimum}, {"type": "string"}],
                           "examples": [example]})  # fmt: skip


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$"
Size = Annotated[int, BeforeValidator(_size), _number_or_text("1GiB")]
PositiveSize = Annotated[int, BeforeValidator(_positive_size), _number_or_text("8GiB", 1)]
Context = Annotated[int, BeforeValidator(_context), _number_or_text("32k", 1)]
KvType = Annotated[str, BeforeValidator(_kv_type)]
Quant = Annotated[str, BeforeValidator(_quant)]
Text = Annotated[str, Field(min_length=1)]
Name = Annotated[str, Field(pattern=_NAME)]
HostPort = Annotated[str, BeforeValidator(_host_port)]
OllamaHost = Annotated[str, BeforeValidator(_ollama_host)]
# bytes/s, from "936GB/s"
Bandwidth = Annotated[float, BeforeValidator(_bandwidth), _number_or_text("936GB/s", number="number")]
# dense FP16 FLOPS, from "142TFLOPS"
Flops = Annotated[float, BeforeValidator(_flops), _number_or_text("142TFLOPS", number="number")]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# seconds, from "30s", "10m", "1h30m", "500ms" (Go's units, as Ollama's keep_alive), or a number of seconds
Duration = Annotated[float, BeforeValidator(_duration), _number_or_text("10m", number="number")]
Listen = Annotated[str, BeforeValidator(_listen)]
PeerUrl = Annotated[str, BeforeValidator(_peer_url)]
Origin = Annotated[str, BeforeValidator(_origin)]
HostName = Annotated[str, BeforeValidator(_host_name)]

ProfileDeviceKind = Literal["cuda", "rocm", "metal", "vulkan", "cpu", "rpc"]


class _Strict(BaseModel):
    # strict: YAML gives real ints and bools, so "4" for a number is a mistake to report, not to coerce
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------------------- the schema


class DeviceSpec(_Strict):
    """A device of a described machine. `memory` is what it can hold: a GPU's VRAM (a Metal GPU's working
    set), or for `kind: cpu` the host RAM a model may use. `bandwidth` and `flops` override the speed figures
    fitquant would take from NVML or its table by name (a cpu device: the host's measured bandwidth and FP32
    FLOPS)."""

    name: Text
    kind: ProfileDeviceKind
    memory: PositiveSize
    bandwidth: Bandwidth | None = None
    flops: Flops | None = None

    @model_serializer(mode="wrap")
    def _unset_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a device shown as it was written: speed figures only where the profile gives them
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in ("bandwidth", "flops")}


class Defaults(_Strict):
    """Settings every model of the profile gets unless its entry says otherwise."""

    kv: KvType = DEFAULT_KV_TYPE
    flash_attn: Annotated[
        Literal["on", "off", "auto"] | None,
        BeforeValidator(_on_off),
        WithJsonSchema({"anyOf": [{"enum": ["on", "off", "auto"]}, {"type": "boolean"}, {"type": "null"}]}),
    ] = None  # None: by kv
    parallel: int = Field(default=1, ge=1, le=256)
    min_quant: Quant | None = None  # None: the floor for the model's size
    warmup: Literal["short", "full", "none"] = "short"


class ModelEntry(_Strict):
    """A model the machine runs, served as `alias` (default: the reference) through the router; its own server
    listens on 127.0.0.1:`port` (default: a free port). `pin`: loaded at start and never evicted; `preload`: loaded
    at start, evicted like any other; `ttl`: unloaded after this long idle (None: only when another model needs
    the memory); `embeddings`: its server also answers /v1/embeddings."""

    model: Text
    context: Context | None = None  # tokens; None: DEFAULT_PLAN_CONTEXT
    min_quant: Quant | None = None
    vision: bool = False
    alias: Name | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    pin: bool = False
    preload: bool = False
    ttl: Duration | None = None  # seconds
    embeddings: bool = False

    @property
    def name(self) -> str:
        return self.alias or self.model


class Peer(_Strict):
    """Another fitquant endpoint: requests for the models it lists (and this machine does not serve) go there,
    with the key in `api_key_env` when it needs one. A plain URL is short for `{url: URL}`."""

    url: PeerUrl
    api_key_env: EnvName | None = None


_PeerOrUrl = Annotated[
    Peer,
    BeforeValidator(_peer),
    WithJsonSchema({"anyOf": [{"type": "string", "examples": ["http://192.168.1.21:8080"]}, Peer.model_json_schema()]}),
]


class RouterSettings(_Strict):
    """How `fitquant serve`'s router admits, queues, swaps and stops. Durations are seconds (YAML takes 30s, 10m)."""

    min_residency: Duration = 30.0  # a model loaded less than this long ago is not evicted (no thrashing)
    max_queue: int = Field(default=64, ge=1, le=10000)  # requests waiting for a load, all models together
    max_wait: Duration = 600.0  # a queued request is answered 503 after this
    # a loaded model keeps taking new requests at most this long while another model waits for its memory: the
    # bound that keeps a busy model from starving a queued one
    swap_after: Duration = 10.0
    drain: Duration = 30.0  # on SIGTERM: how long in-flight requests may finish
    max_body: PositiveSize = 8 * MiB  # larger request bodies are answered 413
    body_timeout: Duration = 30.0  # a request body that has not arrived after this is answered 408 (a slow client)


class Profile(_Strict):
    """A machine and what it runs. Sizes are bytes, contexts tokens (YAML takes 12GiB and 32k)."""

    machine: Name
    devices: list[DeviceSpec] | None = None  # None: probe this machine
    ram: PositiveSize | None = None
    unified: PositiveSize | None = None
    chip: Text | None = None  # with unified: the Mac's chip and GPU bin as the speed table names it
    reserve: Annotated[Size | dict[str, Size], BeforeValidator(_reserve)] = DEFAULT_RESERVE_BYTES
    backend: Literal["auto", "llamacpp", "ollama"] = "auto"
    llama_server: Text | None = None
    ollama_host: OllamaHost | None = None
    rpc: list[HostPort] = Field(default_factory=list)
    defaults: Defaults = Field(default_factory=Defaults)
    models: list[ModelEntry] = Field(default_factory=list)
    listen: Listen = "127.0.0.1:8080"  # fitquant serve's one endpoint; model servers bind 127.0.0.1
    insecure: bool = False  # allows a listen address beyond loopback without an API key
    # web pages allowed besides local ones and apps' (launcher.service.browsers); and, on a loopback listen, names
    # a request may call the server by besides localhost, an address and this machine's name (a reverse proxy's)
    origins: list[Origin] = Field(default_factory=list)
    hosts: list[HostName] = Field(default_factory=list)
    api_key_env: EnvName | None = None
    api_key_file: Text | None = None
    peers: list[_PeerOrUrl] = Field(default_factory=list)
    router: RouterSettings = Field(default_factory=RouterSettings)

    _source: str = PrivateAttr(default="<profile>")
    _lines: dict[Path_, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_host(cls, data: Any) -> Any:
        if isinstance(data, dict) and "host" in data:  # the key of the one-server-per-port serve
            raise _field_error(("host",), "is replaced by 'listen' (HOST:PORT of fitquant serve's one endpoint); "
                               "model servers bind 127.0.0.1")  # fmt: skip
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        self._check_machine()
        self._check_runtime()
        self._check_models()
        self._check_peers()
        return self

    def _check_machine(self) -> None:
        devices = self.devices or []
        cpus = [i for i, d in enumerate(devices) if d.kind == "cpu"]
        if self.unified is not None and (self.ram is not None or devices):
            raise _field_error(("unified",), "describes a Mac's whole memory; give it alone, without ram or devices")
        if self.chip is not None:
            if self.unified is None:
                raise _field_error(("chip",), "names a Mac's chip and GPU bin; give it with unified (a GPU under "
                                   "devices: is named by its own name)")  # fmt: skip
            from launcher.speed import table_gpu

            try:
                table_gpu(self.chip)
            except ValueError as exc:
                raise _field_error(("chip",), f"is not one chip of the speed table: {exc}") from None
        if len(cpus) > 1:
            raise _field_error(("devices", cpus[1], "kind"), "cpu is the host's RAM; describe it once")
        if cpus and self.ram is not None:
            raise _field_error(("ram",), f"repeats devices[{cpus[0]}] (kind cpu, the host's RAM); give one of them")
        if self.devices is not None and not devices and self.ram is None:
            raise _field_error(("devices",), "is empty; list the devices, or give ram for a machine without a GPU")
        seen: dict[str, int] = {}
        for i, device in enumerate(devices):
            if device.name in seen:
                raise _field_error(
                    ("devices", i, "name"), f"{device.name!r} already names devices[{seen[device.name]}]"
                )
            seen[device.name] = i
        if isinstance(self.reserve, dict) and self.devices is not None:
            known = {"default", "CPU", *seen, *(f"GPU{i}" for i in range(len(devices) - len(cpus)))}
            for key in self.reserve:
                if key not in known:
                    raise _field_error(("reserve", key), f"names no device; use {', '.join(sorted(known))}")

    def _check_runtime(self) -> None:
        if self.llama_server is not None and self.backend == "ollama":
            raise _field_error(("llama_server",), "is a llama.cpp setting; the backend is ollama")
        if self.ollama_host is not None and self.backend == "llamacpp":
            raise _field_error(("ollama_host",), "is an Ollama setting; the backend is llamacpp")
        if self.rpc and self.backend == "ollama":
            raise _field_error(("rpc",), "RPC servers are a llama.cpp feature; the backend is ollama")
        if self.api_key_env is not None and self.api_key_file is not None:
            raise _field_error(("api_key_file",), "give api_key_env or api_key_file, not both")
        from launcher.estimate import default_flash_attn

        if self.defaults.flash_attn == "off" and default_flash_attn(self.defaults.kv) == "on":
            raise _field_error(("defaults", "flash_attn"), "is off, but a quantized V cache needs flash attention "
                               "(llama.cpp refuses it otherwise); use kv: f16")  # fmt: skip

    def _check_models(self) -> None:
        ports: dict[int, int] = {}
        names: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            if entry.ttl is not None and entry.pin:
                raise _field_error(
                    ("models", i, "ttl"), "is set, but a pinned model is never unloaded; drop ttl or pin"
                )
            if entry.port is not None and entry.port == self.listen_port:
                raise _field_error(("models", i, "port"), f"{entry.port} is the port of listen ({self.listen}); "
                                   "give the model's own server another port, or leave port out")  # fmt: skip
            if entry.port is not None:
                if entry.port in ports:
                    raise _field_error(
                        ("models", i, "port"), f"{entry.port} is already the port of models[{ports[entry.port]}]"
                    )
                ports[entry.port] = i
            if entry.name in names:
                field = "alias" if entry.alias else "model"
                raise _field_error(
                    ("models", i, field),
                    f"{entry.name!r} already names models[{names[entry.name]}]; give each model its own alias",
                )
            names[entry.name] = i

    def _check_peers(self) -> None:
        seen: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if peer.url in seen:
                raise _field_error(("peers", i), f"{peer.url!r} is already peers[{seen[peer.url]}]")
            seen[peer.url] = i

    @property
    def listen_host(self) -> str:
        """The host of `listen`, without IPv6 brackets: '127.0.0.1', '0.0.0.0', '::1'."""
        host, _ = _split_host_port(self.listen)
        assert host is not None  # checked when the profile was read
        return host

    @property
    def listen_port(self) -> int:
        """The port of `listen`."""
        _, port = _split_host_port(self.listen)
        assert port is not None
        return port

    @property
    def loopback(self) -> bool:
        """Whether `listen` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
        import ipaddress

        host = self.listen_host
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # a host name may resolve to any address

    @property
    def source(self) -> str:
        """The file the profile came from, as given (or '<profile>')."""
        return self._source

    def line_of(self, path: Path_) -> int | None:
        """The line of a field in the profile's file (None for a profile not read from text)."""
        return _locate(path, self._lines)[1]

    def error(self, path: Path_, message: str) -> ProfileError:
        """A ProfileError naming this profile's file, the field's line and the field."""
        clean, line = _locate(path, self._lines)
        return ProfileError(_error_line(self._source, line, clean, message))

    def find_model(self, ref: str | None) -> ModelEntry | None:
        """The entry whose alias or model reference is `ref`."""
        if ref is None:
            return None
        return next((m for m in self.models if ref in (m.alias, m.model)), None)

    def reserve_of(self, budget: str, device_name: str | None = None) -> int:
        """Bytes to keep free on one device: its own entry (by GPUn / CPU, or by name), else the default."""
        if not isinstance(self.reserve, dict):
            return self.reserve
        for key in (budget, device_name):
            if key is not None and key in self.reserve:
                return self.reserve[key]
        return self.reserve.get("default", DEFAULT_RESERVE_BYTES)


def profile_json_schema() -> dict[str, Any]:
    """The JSON schema of a profile file (committed as docs/profile.schema.json, for editors: a YAML language
    server takes it). The checks that need code (sizes' bounds, durations' units, cross-field rules) are the
    loader's; the schema accepts their shapes."""
    schema = {k: v for k, v in Profile.model_json_schema().items() if k != "title"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://fitquant.dev/schema/profile.schema.json",
        "title": "fitquant profile",
        **schema,
    }


# ---------------------------------------------------------------------------------------------- error places


def _locate(loc: Sequence[Any], lines: Mapping[Path_, int]) -> tuple[Path_, int | None]:
    """A validation location as the profile's own path, and its line. Parts the file does not have (pydantic's
    union branch names) are dropped, but a missing last field is kept: it is what the error is about."""
    path: Path_ = ()
    line = lines.get((), None)
    for i, part in enumerate(loc):
        key = part if isinstance(part, int) else str(part)
        if (*path, key) in lines:
            path = (*path, key)
            line = lines[path]
        elif i == len(loc) - 1:
            path = (*path, key)
    return path, line


def _field_name(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _error_line(source: str, line: int | None, path: Path_, message: str) -> str:
    where = f"profile {source}" + (f" line {line}" if line is not None else "")
    return f"{where}: '{_field_name(path)}' {message}" if path else f"{where}: {message}"
