"""Machine profiles: a small YAML file per machine, what it is and what it runs.

    machine: home-server               # the machine's name
    devices:                           # optional: describe the machine instead of probing it
      - {name: RTX 3090, kind: cuda, memory: 24GiB}
    ram: 64GiB                         # optional: the host's RAM (with devices)
    unified: 32GiB                     # optional, alone: an Apple Silicon Mac's unified memory
    reserve: 1GiB                      # kept free on every device, or {default: 1GiB, GPU0: 2GiB}
    backend: auto                      # auto | llamacpp | ollama
    llama_server: /opt/llama.cpp/bin/llama-server   # or ollama_host: 127.0.0.1:11434
    rpc: [192.168.1.20:50052]          # llama.cpp RPC servers whose devices join this machine
    defaults: {kv: q8_0, flash_attn: on, parallel: 1, min_quant: Q4_K_M, warmup: short}
    models:
      - {model: qwen3:14b, context: 32k, min_quant: Q4_K_M, vision: false, alias: qwen3, port: 8080}
    host: 127.0.0.1                    # the address servers bind
    api_key_env: FITQUANT_API_KEY      # or api_key_file: a file holding the key; never the key itself

`parse_profile(text)` checks text against the schema; `load_profile(path)` reads a file; `find_profile(ref)`
follows the search path (a path, then ./profiles/NAME.yaml, then the user config directory). Every error is
one `ProfileError` line naming the file, the line and the field. YAML is read with pyyaml's safe loader,
whose composition is bounded (aliases, expanded size) before anything is constructed.

`profile_plan(profile, model)` turns a profile into what the planner takes: the machine (the profile's
devices, or the probe), the Policy (the profile's defaults and model entry) and the port. fitquant never
writes into a profile a person wrote: verified results live in the machine's record (launcher.record).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from launcher.defaults import DEFAULT_KV_TYPE, DEFAULT_PLAN_CONTEXT, DEFAULT_RESERVE_BYTES
from launcher.errors import BackendError, ProfileError
from launcher.paths import config_dir
from launcher.units import GiB, MiB, format_bytes, parse_bytes, parse_context

if TYPE_CHECKING:
    from launcher.hardware.types import HardwareSnapshot
    from launcher.plan import Policy

__all__ = [
    "Defaults",
    "DeviceSpec",
    "ModelEntry",
    "Profile",
    "ProfilePlan",
    "default_profile_name",
    "find_profile",
    "load_profile",
    "parse_profile",
    "profile_api_key",
    "profile_hardware",
    "profile_machine",
    "profile_plan",
    "profile_policy",
    "profile_records",
    "profile_text",
    "user_profile_path",
    "write_profile",
]

MAX_PROFILE_BYTES = 1 * MiB  # a profile is a few dozen lines; anything this large is not one
MAX_ALIASES = 100  # YAML aliases (*name) a profile may use
MAX_VALUES = 10_000  # values the document may expand to, aliases followed: refuses a "billion laughs"

Path_ = tuple[str | int, ...]  # a field's place: ("models", 2, "port")


# ---------------------------------------------------------------------------------------------- value types


def _field_error(path: Path_, message: str) -> PydanticCustomError:
    """An error that names its field (and so its line) from wherever it is raised: a cross-field check, or a
    parser of a mapping whose entries each have their own line."""
    return PydanticCustomError("profile", "{message}", {"message": message, "path": path})


# Each parser raises ValueError with text that reads after the field's name: "'reserve' must be a size ...".


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a size like 1GiB or 512MiB, got {value!r}")
    if isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"must not be negative, got {value!r}")
    try:
        size = parse_bytes(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"must be a size like 1GiB or 512MiB, got {value!r}") from None
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return size


def _positive_size(value: Any) -> int:
    size = _size(value)
    if size == 0:
        raise ValueError(f"must be more than 0, got {value!r}")
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


def _context(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a context length like 32768 or 32k, got {value!r}")
    try:
        return parse_context(value)
    except ValueError:
        raise ValueError(f"must be a context length like 32768 or 32k (more than 0), got {value!r}") from None


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


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$"
Size = Annotated[int, BeforeValidator(_size)]
PositiveSize = Annotated[int, BeforeValidator(_positive_size)]
Context = Annotated[int, BeforeValidator(_context)]
KvType = Annotated[str, BeforeValidator(_kv_type)]
Quant = Annotated[str, BeforeValidator(_quant)]
Text = Annotated[str, Field(min_length=1)]
Name = Annotated[str, Field(pattern=_NAME)]
HostPort = Annotated[str, BeforeValidator(_host_port)]
OllamaHost = Annotated[str, BeforeValidator(_ollama_host)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

ProfileDeviceKind = Literal["cuda", "rocm", "metal", "vulkan", "cpu", "rpc"]


class _Strict(BaseModel):
    # strict: YAML gives real ints and bools, so "4" for a number is a mistake to report, not to coerce
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------------------- the schema


class DeviceSpec(_Strict):
    """A device of a described machine. `memory` is what it can hold: a GPU's VRAM (a Metal GPU's working
    set), or for `kind: cpu` the host RAM a model may use."""

    name: Text
    kind: ProfileDeviceKind
    memory: PositiveSize


class Defaults(_Strict):
    """Settings every model of the profile gets unless its entry says otherwise."""

    kv: KvType = DEFAULT_KV_TYPE
    flash_attn: Annotated[Literal["on", "off", "auto"] | None, BeforeValidator(_on_off)] = None  # None: by kv
    parallel: int = Field(default=1, ge=1, le=256)
    min_quant: Quant | None = None  # None: the floor for the model's size
    warmup: Literal["short", "full", "none"] = "short"


class ModelEntry(_Strict):
    """A model the machine runs, served as `alias` (default: the reference) on `port`."""

    model: Text
    context: Context | None = None  # tokens; None: DEFAULT_PLAN_CONTEXT
    min_quant: Quant | None = None
    vision: bool = False
    alias: Name | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def name(self) -> str:
        return self.alias or self.model


_SECRET_KEYS = {"apikey", "apikeys", "key", "token", "apitoken", "secret", "password", "bearer"}


class Profile(_Strict):
    """A machine and what it runs. Sizes are bytes, contexts tokens (YAML takes 12GiB and 32k)."""

    machine: Name
    devices: list[DeviceSpec] | None = None  # None: probe this machine
    ram: PositiveSize | None = None
    unified: PositiveSize | None = None
    reserve: Annotated[int | dict[str, int], BeforeValidator(_reserve)] = DEFAULT_RESERVE_BYTES
    backend: Literal["auto", "llamacpp", "ollama"] = "auto"
    llama_server: Text | None = None
    ollama_host: OllamaHost | None = None
    rpc: list[HostPort] = Field(default_factory=list)
    defaults: Defaults = Field(default_factory=Defaults)
    models: list[ModelEntry] = Field(default_factory=list)
    host: Text = "127.0.0.1"
    api_key_env: EnvName | None = None
    api_key_file: Text | None = None

    _source: str = PrivateAttr(default="<profile>")
    _lines: dict[Path_, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        self._check_machine()
        self._check_runtime()
        self._check_models()
        return self

    def _check_machine(self) -> None:
        devices = self.devices or []
        cpus = [i for i, d in enumerate(devices) if d.kind == "cpu"]
        if self.unified is not None and (self.ram is not None or devices):
            raise _field_error(("unified",), "describes a Mac's whole memory; give it alone, without ram or devices")
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


# ---------------------------------------------------------------------------------------------- reading


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing while composing: too many aliases, a document that expands to too many
    values (a "billion laughs"), a recursive alias, or a key given twice."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            line = event.start_mark.line + 1
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(line, f"uses more than {MAX_ALIASES} YAML aliases; a profile needs few, if any")
            anchored = self.anchors.get(event.anchor)
            if anchored is not None and id(anchored) not in self.sizes:
                raise _Refused(line, f"the alias *{event.anchor} refers to itself")
        node = super().compose_node(parent, index)
        if id(node) not in self.sizes:  # a new node (an alias returns one already sized)
            if isinstance(node, MappingNode):
                size = 1 + sum(self.sizes[id(k)] + self.sizes[id(v)] for k, v in node.value)
            elif isinstance(node, SequenceNode):
                size = 1 + sum(self.sizes[id(item)] for item in node.value)
            else:
                size = 1
            if size > MAX_VALUES:
                raise _Refused(node.start_mark.line + 1, f"expands to more than {MAX_VALUES} values (YAML aliases)")
            self.sizes[id(node)] = size
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[str, int] = {}
        for key, _value in node.value:
            if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in first:
                    raise _Refused(line, f"'{key.value}' is given twice (first on line {first[key.value]})")
                first[key.value] = line
        return node


def _node_lines(node: Node, path: Path_ = (), out: dict[Path_, int] | None = None) -> dict[Path_, int]:
    """Where each field is: path -> 1-based line (a mapping entry at its key, a list item at the item)."""
    out = {} if out is None else out
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode):
                out.setdefault((*path, key.value), key.start_mark.line + 1)
                _node_lines(value, (*path, key.value), out)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault((*path, i), item.start_mark.line + 1)
            _node_lines(item, (*path, i), out)
    return out


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


_SHOULD = re.compile(r"^(Input|String|List|Value|Dictionary|Object) should (be|have) ")


def _message(error: Mapping[str, Any], known: Sequence[str]) -> str:
    kind, text, value = error["type"], str(error["msg"]), error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return f"is not a profile setting here; known: {', '.join(known)}" if known else "is not a profile setting"
    if kind == "value_error":
        return text.removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping (key: value lines)"
    text = _SHOULD.sub(r"must \2 ", text)
    if kind == "string_pattern_mismatch":
        text = "must be a simple name (letters, digits and . _ : @ / + -)"
    if isinstance(value, (str, int, float)) or value is None:
        text += f", got {value!r}"
    if isinstance(value, bool) and kind == "string_type":
        text += " (YAML reads a bare yes/no/on/off as true/false: quote it)"
    return text


def _known_keys(path: Path_) -> list[str]:
    """The settings the mapping at `path` takes (for an unknown key's message)."""
    model: type[BaseModel] = Profile
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = next((t for t in _inner_types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)),
                     None) if field else None  # fmt: skip
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _inner_types(annotation: Any) -> list[Any]:
    out = [annotation]
    for arg in get_args(annotation):
        out += _inner_types(arg)
    return out


def _secret_key(data: Any, path: Path_ = ()) -> Path_ | None:
    """The path of a key that would hold a literal API key, if any (never a value: it is not printed)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower().replace("_", "").replace("-", "") in _SECRET_KEYS:
                return (*path, str(key))
            found = _secret_key(value, (*path, str(key)))
            if found:
                return found
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found = _secret_key(item, (*path, i))
            if found:
                return found
    return None


def _compose(text: str) -> tuple[Node | None, Any]:
    """The document's node tree (bounded) and the data the safe loader builds from it."""
    loader = _BoundedLoader(text)  # the reader refuses control characters here already
    try:
        node = loader.get_single_node()
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def parse_profile(text: str, *, source: str = "<profile>") -> Profile:
    """A Profile from YAML text; `source` names it in errors. Raises ProfileError (one line: file, line, field)."""
    try:
        node, data = _compose(text)
    except _Refused as refused:
        raise ProfileError(_error_line(source, refused.line, (), str(refused))) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(str(exc.problem or exc.context or "unreadable").split())
        raise ProfileError(_error_line(source, line, (), f"not valid YAML: {problem}")) from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProfileError(_error_line(source, None, (), f"not valid YAML: {first}")) from None
    if node is None or data is None:
        raise ProfileError(_error_line(source, None, (), "is empty; a profile needs at least 'machine: NAME'"))
    if not isinstance(data, dict):
        shown = "a list" if isinstance(data, list) else "a single value"
        raise ProfileError(_error_line(source, 1, (), f"is {shown}, not a profile (key: value lines: machine: NAME)"))
    lines = _node_lines(node)
    lines[()] = node.start_mark.line + 1
    secret = _secret_key(data)
    if secret is not None:
        message = ("would hold an API key, and a profile never does: name an environment variable "
                   "(api_key_env: FITQUANT_API_KEY) or a file (api_key_file: PATH)")  # fmt: skip
        raise ProfileError(_error_line(source, lines.get(secret), secret, message))
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(source, exc, lines) from None
    profile._source, profile._lines = source, lines
    return profile


def _validation_error(source: str, exc: ValidationError, lines: Mapping[Path_, int]) -> ProfileError:
    """The first problem in file order, in one line; how many more there are."""
    found = []
    for error in exc.errors(include_url=False):
        loc = error.get("ctx", {}).get("path", error["loc"]) if error["type"] == "profile" else error["loc"]
        path, line = _locate(loc, lines)
        message = str(error["msg"]) if error["type"] == "profile" else _message(error, _known_keys(path))
        found.append((line or 0, _error_line(source, line, path, message)))
    found.sort(key=lambda item: item[0])
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return ProfileError(found[0][1] + more)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and check a profile file. Raises ProfileError: missing, a directory, unreadable, not YAML, invalid."""
    shown = os.fspath(path)
    file = Path(path).expanduser()
    if file.is_dir():
        raise ProfileError(f"profile {shown}: is a directory, not a profile file")
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(f"profile {shown}: no such file") from None
    except PermissionError:
        raise ProfileError(f"profile {shown}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise ProfileError(f"profile {shown}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile {shown}: larger than {format_bytes(MAX_PROFILE_BYTES)}; not a profile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {shown}: not a text file (byte {exc.start} is not UTF-8)") from None
    return parse_profile(text, source=shown)


# ---------------------------------------------------------------------------------------------- search path


def user_profile_path(name: str) -> Path:
    """Where `profile init NAME` writes and the search path looks last: the user config directory."""
    return config_dir() / "profiles" / f"{name}.yaml"


def default_profile_name() -> str:
    """This machine's host name, as a profile name."""
    import socket

    name = re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("-.")
    return name or "this-machine"


def find_profile(ref: str | os.PathLike[str], *, cwd: Path | None = None) -> Path:
    """The file a profile reference names: a path (anything with a slash or a .yaml/.yml ending, or an
    existing file), else ./profiles/NAME.yaml, else the user config directory. Raises ProfileError."""
    text = os.fspath(ref)
    here = Path.cwd() if cwd is None else cwd
    is_path = "/" in text or os.sep in text or text.endswith((".yaml", ".yml")) or (here / text).is_file()
    if is_path:
        return Path(text)
    if not re.match(_NAME, text):
        raise ProfileError(f"profile {text!r}: not a profile name or path")
    places = [Path("profiles") / f"{text}.yaml", user_profile_path(text)]
    for place in places:
        if (here / place if not place.is_absolute() else place).exists():
            return place
    raise ProfileError(f"profile {text}: none found in {places[0]} or {places[1]}; "
                       f"`fitquant profile init {text}` writes one for this machine")  # fmt: skip


# ---------------------------------------------------------------------------------------------- for the planner


def profile_hardware(profile: Profile) -> HardwareSnapshot | None:
    """The machine the profile describes (devices, ram, unified), or None when it leaves that to the probe."""
    from launcher.hardware import describe_machine
    from launcher.hardware.types import DeviceKind

    if profile.devices is None and profile.ram is None and profile.unified is None:
        return None
    devices = profile.devices or []
    gpus = [(i, d) for i, d in enumerate(devices) if d.kind != "cpu"]
    for i, device in gpus:
        if device.kind not in get_args(DeviceKind):
            raise profile.error(("devices", i, "kind"), f"{device.kind} devices are not planned by this fitquant "
                                f"yet (it plans {', '.join(get_args(DeviceKind))})")  # fmt: skip
    ram = profile.ram if profile.ram is not None else next((d.memory for d in devices if d.kind == "cpu"), None)
    try:
        machine = describe_machine(vram=[d.memory for _, d in gpus] or None, ram=ram, unified=profile.unified)
    except ValueError as exc:
        raise profile.error(("devices",), str(exc)) from None
    if not gpus:
        return machine
    named = tuple(
        described.model_copy(
            update={
                "kind": spec.kind,
                "name": spec.name,
                "unified": spec.kind == "metal",
                "integrated": spec.kind == "metal",
            }
        )
        for described, (_, spec) in zip(machine.devices, gpus, strict=True)
    )
    return machine.model_copy(update={"devices": named})


def profile_machine(
    profile: Profile, machine: HardwareSnapshot | None = None, *, reserve_bytes: int | None = None
) -> tuple[HardwareSnapshot, int]:
    """The machine to plan for (given, else the profile's, else probed) and the reserve for its Policy.

    A per-device reserve is kept by lowering that device's free memory by what it keeps beyond the smallest
    reserve, which the Policy then keeps everywhere: each device ends with free less its own reserve usable.
    `reserve_bytes` (a caller's explicit choice) replaces the profile's reserve on every device.
    """
    machine = _machine_of(profile, machine)
    if reserve_bytes is not None:
        return machine, reserve_bytes
    kept, reserve, _notes = _keep_reserves(profile, machine)
    return kept, reserve


def _machine_of(profile: Profile, machine: HardwareSnapshot | None) -> HardwareSnapshot:
    if machine is None:
        machine = profile_hardware(profile)
    if machine is None:
        from launcher.hardware import detect_hardware

        machine = detect_hardware()
    return machine


def _keep_reserves(profile: Profile, machine: HardwareSnapshot) -> tuple[HardwareSnapshot, int, list[str]]:
    """See profile_machine; also the notes saying which devices keep more free than the Policy's reserve."""
    if not isinstance(profile.reserve, dict):
        return machine, profile.reserve, []
    gpus = [d for d in machine.devices if d.free_bytes is not None]
    if not gpus:
        return machine, profile.reserve_of("CPU"), []
    known = {"default", "CPU", *(f"GPU{d.index}" for d in gpus), *(d.name for d in gpus)}
    for key in profile.reserve:
        if key not in known:
            raise profile.error(("reserve", key), f"names no device of this machine; use {', '.join(sorted(known))}")
    reserves = {d.index: profile.reserve_of(f"GPU{d.index}", d.name) for d in gpus}
    common = min(reserves.values())
    devices, notes = [], []
    for device in machine.devices:
        extra = reserves.get(device.index, common) - common
        if extra and device.free_bytes is not None:
            device = device.model_copy(update={"free_bytes": max(0, device.free_bytes - extra)})
            notes.append(f"GPU{device.index} keeps {format_bytes(common + extra)} free (profile reserve): "
                         f"its free memory is counted {format_bytes(extra)} lower")  # fmt: skip
        devices.append(device)
    kept = machine.model_copy(update={"devices": tuple(devices), "notes": (*machine.notes, *notes)})
    return kept, common, notes


def profile_policy(profile: Profile, entry: ModelEntry | None = None, *, reserve_bytes: int | None = None,
                   **overrides: Any) -> Policy:  # fmt: skip
    """The Policy for one model of the profile: the profile's defaults, then the entry's context, floor and
    vision, then `overrides` (Policy fields a caller set explicitly, e.g. command-line flags) win."""
    from launcher.plan import Policy

    d = profile.defaults
    values: dict[str, Any] = {
        "n_ctx": (entry.context if entry else None) or DEFAULT_PLAN_CONTEXT,
        "type_k": d.kv,
        "type_v": d.kv,
        "flash_attn": d.flash_attn,
        "n_parallel": d.parallel,
        "reserve_bytes": profile.reserve_of("CPU") if reserve_bytes is None else reserve_bytes,
        "min_quant": (entry.min_quant if entry else None) or d.min_quant,
        "vision": entry.vision if entry else False,
    }
    if "type_v" in overrides and "flash_attn" not in overrides:
        values["flash_attn"] = None  # decided again for the new V type
    values.update(overrides)
    return Policy(**values)


@dataclass(frozen=True)
class ProfilePlan:
    """What the planner takes for one model on a profile's machine."""

    model: str | None  # the model reference (an entry's alias resolved); None: the embedded default
    entry: ModelEntry | None  # the profile's entry for it, if any
    policy: Policy
    machine: HardwareSnapshot
    port: int | None  # the entry's port, if any
    notes: tuple[str, ...] = ()  # what the profile changed about the machine (a per-device reserve), for people


def profile_plan(
    profile: Profile,
    model: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    machine: HardwareSnapshot | None = None,
) -> ProfilePlan:
    """Plan inputs for `model` (a reference, or an entry's alias) on the profile's machine.

    `overrides` are Policy fields the caller set explicitly; they win over the profile (a `reserve_bytes`
    there replaces the profile's reserve on every device). `machine` replaces the profile's devices and
    the probe. `fit(plan.model, plan.policy, machine=plan.machine)` then answers for that machine.
    """
    given = dict(overrides or {})
    entry = profile.find_model(model)
    machine = _machine_of(profile, machine)
    notes: list[str] = []
    if "reserve_bytes" in given:
        reserve = int(given.pop("reserve_bytes"))
    else:
        machine, reserve, notes = _keep_reserves(profile, machine)
    policy = profile_policy(profile, entry, reserve_bytes=reserve, **given)
    port = entry.port if entry else None
    return ProfilePlan(entry.model if entry else model, entry, policy, machine, port, tuple(notes))


def profile_api_key(profile: Profile, *, env: Mapping[str, str] | None = None) -> str | None:
    """The API key servers require: from the environment variable or the file the profile names (a relative
    file is taken from the profile's folder); None when the profile names neither. Raises ProfileError."""
    env = os.environ if env is None else env
    if profile.api_key_env is not None:
        key = env.get(profile.api_key_env, "").strip()
        if not key:
            raise profile.error(("api_key_env",), f"names {profile.api_key_env}, which is not set or empty")
        return key
    if profile.api_key_file is None:
        return None
    file = Path(profile.api_key_file).expanduser()
    if not file.is_absolute() and profile.source != "<profile>":
        file = Path(profile.source).parent / file
    try:
        key = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise profile.error(("api_key_file",), f"{file} cannot be read ({why})") from None
    if not key:
        raise profile.error(("api_key_file",), f"{file} is empty")
    return key


# ---------------------------------------------------------------------------------------------- records


def profile_records(profile: Profile, machine: HardwareSnapshot) -> list[dict[str, Any]]:
    """The verified results of the profile's models in `machine`'s record (all of them when the profile lists
    no model), oldest first: what ran, when, predicted and measured bytes per device."""
    from launcher.record import entries

    wanted = {m.model for m in profile.models}
    return [e for e in entries(machine) if not wanted or e.get("model") in wanted]


# ---------------------------------------------------------------------------------------------- writing


def _size_text(n_bytes: int) -> str:
    """A size as a profile writes it: exact, in the largest whole binary unit."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB)):
        if n_bytes % scale == 0:
            return f"{n_bytes // scale}{unit}"
    return str(n_bytes)


def profile_text(name: str, machine: HardwareSnapshot) -> str:
    """A commented profile for `machine` (as probed) named `name`, ready to edit."""
    lines = [
        f"# fitquant profile for {name}, written by `fitquant profile init` from this machine's hardware.",
        "# Edit freely: fitquant never writes into this file again (verified runs go to its state directory).",
        "# `fitquant profile validate FILE` checks it; `fitquant plan --profile FILE MODEL` plans for it from",
        "# any computer.",
        f"machine: {name}",
        "",
    ]
    gpus = [d for d in machine.devices if d.total_bytes]
    ram = machine.ram_total_bytes // MiB * MiB if machine.ram_total_bytes else None  # whole MiB, rounded down
    metal = [d for d in gpus if d.kind == "metal"]
    if metal and ram:
        lines += ["# Unified memory (Apple Silicon): the GPU may use macOS's default working set of it.",
                  f"unified: {_size_text(ram)}"]  # fmt: skip
    elif gpus or ram:
        lines.append("# The devices found here. With them, a plan uses these sizes instead of probing, all free.")
        lines.append("# Delete `devices` and `ram` to probe the machine (its free memory now) at every start.")
        lines.append("devices:" if gpus else "devices: []  # no GPU found")
        for d in gpus:
            assert d.total_bytes is not None
            memory = _size_text(d.total_bytes // MiB * MiB)
            lines += [f"  - name: {_quoted(d.name)}", f"    kind: {d.kind}", f"    memory: {memory}"]
        if ram:
            lines.append(f"ram: {_size_text(ram)}")
    lines += [
        "",
        "# Kept free on every device (a size, or per device: {default: 1GiB, GPU0: 2GiB}).",
        f"reserve: {_size_text(DEFAULT_RESERVE_BYTES)}",
        "",
        "backend: auto  # auto (llama.cpp when llama-server is found, else Ollama), llamacpp or ollama",
        "# llama_server: /path/to/llama-server",
        "# ollama_host: 127.0.0.1:11434",
        "# rpc: [192.168.1.20:50052]  # llama.cpp RPC servers whose devices join this machine",
        "",
        "defaults:",
        f"  kv: {DEFAULT_KV_TYPE}  # KV cache type; a quantized one needs flash attention",
        '  # flash_attn: "on"  # on, off or auto (default: on for a quantized KV cache, else auto)',
        "  parallel: 1  # slots sharing the context",
        "  warmup: short  # short, full (fills the context once) or none",
        "  # min_quant: Q4_K_M  # quality floor (default: by the model's size)",
        "",
        "# The models this machine runs: model, context, min_quant, vision, alias, port.",
        "models: []",
        "#  - model: qwen3:14b",
        "#    context: 32k",
        "#    alias: qwen3",
        "#    port: 8080",
        "",
        "host: 127.0.0.1  # the address servers bind",
        "# An API key is never stored here: name an environment variable or a file that holds it.",
        "# api_key_env: FITQUANT_API_KEY",
        "# api_key_file: ~/.config/fitquant/api-key",
    ]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return yaml.safe_dump(text, default_style='"').strip()


def write_profile(path: str | os.PathLike[str], text: str, *, force: bool = False,
                  write: Callable[[int, bytes], int] = os.write) -> Path:  # fmt: skip
    """Write a profile atomically: checked first, then a temporary file in the same folder, synced, renamed
    over `path`. An existing file is kept unless `force`; on any error it is left as it was. `write` is the
    system call that writes the bytes (a seam for tests that make a write fail midway)."""
    target = Path(path).expanduser()
    parse_profile(text, source=os.fspath(path))  # never write a profile that would not load
    if target.is_dir():
        raise ProfileError(f"profile {os.fspath(path)}: is a directory, not a profile file")
    if target.exists() and not force:
        raise ProfileError(f"profile {os.fspath(path)}: exists already; --force replaces it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ProfileError(f"profile {os.fspath(path)}: cannot be written ({exc.strerror or exc})") from None
    try:
        try:
            data = text.encode("utf-8")
            while data:
                data = data[write(fd, data) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ProfileError(f"profile {os.fspath(path)}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
