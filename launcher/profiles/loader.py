"""Reading and writing profile files: the bounded YAML loader, the one-line errors, the search path, the API
key a profile names, and `profile init`'s text. YAML is read with pyyaml's safe loader, whose composition
is bounded (aliases, expanded size) before anything is constructed."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from launcher.defaults import DEFAULT_KV_TYPE, DEFAULT_RESERVE_BYTES
from launcher.errors import ProfileError
from launcher.paths import config_dir
from launcher.profiles.schema import _NAME, Path_, Profile, _error_line, _locate
from launcher.units import GiB, MiB, format_bytes

if TYPE_CHECKING:
    from launcher.hardware.types import HardwareSnapshot

MAX_PROFILE_BYTES = 1 * MiB  # a profile is a few dozen lines; anything this large is not one
MAX_ALIASES = 100  # YAML aliases (*name) a profile may use
MAX_VALUES = 10_000  # values the document may expand to, aliases followed: refuses a "billion laughs"
MAX_DEPTH = 50  # nested mappings and lists: a profile needs 4; composing recurses, so this keeps off RecursionError
_SECRET_KEYS = {"apikey", "apikeys", "key", "token", "apitoken", "secret", "password", "bearer"}


# ---------------------------------------------------------------------------------------------- reading


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing while composing: too many aliases, a document that expands to too many
    values (a "billion laughs"), nesting deeper than MAX_DEPTH, a recursive alias, or a key given twice."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(line, f"nests more than {MAX_DEPTH} levels deep; a profile needs a few")
            return self._compose_bounded(parent, index)
        finally:
            self.depth -= 1

    def _compose_bounded(self, parent: Node | None, index: Any) -> Node:
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
    if kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == _NAME:
        text = "must be a simple name (letters, digits and . _ : @ / + -)"
    elif kind == "string_pattern_mismatch":  # EnvName's
        text = "must be an environment variable name (letters, digits and _, not first a digit)"
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


# ---------------------------------------------------------------------------------------------- the API key


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
        chip = _table_chip(metal[0].name)
        if chip:
            lines.append(f"chip: {_quoted(chip)}  # the chip and its GPU bin: the speed figures plans predict from")
        else:
            lines.append(f"# {metal[0].name} is not in the speed table: its plans predict no speed")
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
        "# The models this machine runs, loaded on demand behind `fitquant serve`'s one endpoint: model, context,",
        "# min_quant, vision, alias, port (of its own server, on 127.0.0.1), pin, preload, ttl, embeddings.",
        "models: []",
        "#  - model: qwen3:14b",
        "#    context: 32k",
        "#    alias: qwen3",
        "#    pin: true  # loaded at start, never evicted (preload: true loads it at start, evictable)",
        "#  - model: qwen3:4b",
        "#    ttl: 10m  # unloaded after 10 minutes idle",
        "",
        "listen: 127.0.0.1:8080  # fitquant serve's one endpoint (HOST:PORT; [::1]:8080 for IPv6)",
        "# An API key is never stored here: name an environment variable or a file that holds it. A listen address",
        "# beyond this machine needs one (or insecure: true).",
        "# api_key_env: FITQUANT_API_KEY",
        "# api_key_file: ~/.config/fitquant/api-key",
        "",
        "# Other fitquant endpoints: requests for models they list, and this machine does not, go there.",
        "# peers:",
        "#   - http://192.168.1.21:8080",
        "",
        "# router:  # loading, queueing and stopping (these are the defaults)",
        "#   min_residency: 30s  # a model loaded less than this long ago is not evicted",
        "#   max_queue: 64  # requests waiting for a load, all models together",
        "#   max_wait: 10m  # a queued request is answered 503 after this",
        "#   swap_after: 10s  # a loaded model takes new requests at most this long while another waits for memory",
        "#   drain: 30s  # on stop: how long requests in flight may finish",
        "#   max_body: 8MiB  # larger request bodies are answered 413",
        "#   body_timeout: 30s  # a body that has not arrived by then is answered 408",
    ]
    return "\n".join(lines) + "\n"


def _table_chip(name: str) -> str | None:
    """A probed Mac GPU's name ('Apple M2 Max (38-core GPU)') as a profile's `chip` gives it, if the speed table
    has that chip and bin; else None."""
    from launcher.speed import table_gpu

    chip = name.removeprefix("Apple ")
    try:
        return chip if table_gpu(chip) == name else None
    except ValueError:
        return None


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
