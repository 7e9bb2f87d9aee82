"""Read GGUF headers (metadata and tensor infos, never tensor data) from bytes, local files and http(s) URLs.

One parser, `_parse`, runs over a `_Reader`: a forward-only window on the header bytes that asks its source
for more as it goes. `parse_header` gives it a byte prefix; `read_header` gives it a local file (read in
growing chunks) or a URL (HTTP Range requests of at most 1 MiB, redirects followed, retried), and expands
split sets (`name-00001-of-00003.gguf`).

Header bytes are hostile. Every count and length is checked against the bytes that can remain before anything
is allocated, arrays nest at most `_MAX_ARRAY_DEPTH` deep, arrays longer than `max_array_len` are walked or
seeked past and kept as `SkippedArray`, and the only exception that escapes is `GGUFFormatError`, whose message
starts with the step ("read tensor count: ...") and which names the file and the byte offset.

The checks follow llama.cpp's reader, `gguf_init_from_reader` in ggml/src/gguf.cpp: versions 2 and 3 (1 and
byte-swapped files rejected), non-empty unique UTF-8 keys, `general.alignment` a u32 power of two, tensor names
shorter than GGML_MAX_NAME (64) bytes and unique, at most GGML_MAX_DIMS (4) non-negative dims whose product
fits in int64, a known ggml type whose block size divides the row, and data offsets that pack the tensors in
order, each padded to the alignment. Unlike gguf.cpp (which rejects them) arrays of arrays are read, as
gguf-py writes them. String values that are not valid UTF-8 are decoded with U+FFFD replacements (gguf.cpp does
not check them); keys and tensor names must be valid UTF-8.

Type names and sizes come from the `gguf` package's constants; its `constants.py` is loaded on its own because
`import gguf` pulls in numpy (~80 ms). That module is `gguf_constants` here, for other modules to reuse
(`gguf_constants.LlamaFileType`); its enums are IntEnums, so they compare equal to the `gguf` package's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from launcher.errors import GGUFFormatError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import httpx

__all__ = ["GGUFHeader", "SkippedArray", "TensorInfo", "parse_header", "read_header"]


def _load_constants() -> Any:
    """Return gguf's constants module without executing `gguf/__init__.py` unless it already ran."""
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("gguf")
        origin = spec.origin if spec is not None else None
        if origin is None:
            raise ImportError("gguf package not found")
        path = os.path.join(os.path.dirname(origin), "constants.py")
        cspec = importlib.util.spec_from_file_location("launcher._gguf_constants", path)
        if cspec is None or cspec.loader is None:
            raise ImportError(path)
        module = importlib.util.module_from_spec(cspec)
        cspec.loader.exec_module(module)
        return module
    except (ImportError, OSError, SyntaxError):
        import gguf.constants

        return gguf.constants


gguf_constants = _load_constants()
GGMLQuantizationType = gguf_constants.GGMLQuantizationType
GGUFValueType = gguf_constants.GGUFValueType
_QUANT_SIZES: dict[int, tuple[int, int]] = {int(k): v for k, v in gguf_constants.GGML_QUANT_SIZES.items()}

_MAGIC = b"GGUF"
_MAGIC_SWAPPED = b"FUGG"  # newest gguf-py writes this for big-endian files
_MAX_VERSION = 3
_DEFAULT_ALIGNMENT = int(gguf_constants.GGUF_DEFAULT_ALIGNMENT)  # 32
_MAX_DIMS = 4  # GGML_MAX_DIMS, ggml/include/ggml.h
_MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter than this
_INT64_MAX = 2**63 - 1
_SIZE_MAX = 2**64 - 1
_MAX_ARRAY_DEPTH = 8
# Fewest bytes a KV pair (8 B key length + 1 B key + 4 B type + 1 B value) and a tensor info
# (8 B name length + 4 B n_dims + 4 B type + 8 B offset) can take; bounds the counts before the loops.
_MIN_KV_BYTES = 14
_MIN_TENSOR_INFO_BYTES = 24
# Retired ggml type ids (still named in the error so the user knows the file is outdated, not corrupt).
_RETIRED_TYPES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}

_T_STRING = 8
_T_ARRAY = 9
_T_UINT32 = 4
# GGUF value type -> (struct code, size) for the fixed-width types.
_FIXED: dict[int, tuple[str, int]] = {
    0: ("B", 1),
    1: ("b", 1),
    2: ("H", 2),
    3: ("h", 2),
    4: ("I", 4),
    5: ("i", 4),
    6: ("f", 4),
    7: ("?", 1),
    10: ("Q", 8),
    11: ("q", 8),
    12: ("d", 8),
}
_SCALAR = {t: struct.Struct("<" + code) for t, (code, _) in _FIXED.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_SHARD_RE = re.compile(r"^(.*?)-(\d{5})-of-(\d{5})\.gguf$")

# Remote reads: first request, growth cap (each Range request asks for at most this), retry policy.
_HTTP_FIRST_CHUNK = 64 * 1024
_HTTP_CHUNK_MAX = 1024 * 1024
_HTTP_ATTEMPTS = 3
_HTTP_WAIT_S = 0.5  # exponential backoff: 0.5 s, 1 s (module-level so tests can shorten it)
_HTTP_WAIT_MAX_S = 4.0
_HTTP_STOP_AFTER_S = 15.0  # no new attempt after this: with the timeouts below, a dead server fails in ~21 s
_HTTP_TIMEOUT_S = 10.0
_HTTP_CONNECT_TIMEOUT_S = 5.0
_FILE_FIRST_CHUNK = 256 * 1024
_FILE_CHUNK_MAX = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class SkippedArray:
    """An array longer than `max_array_len` (e.g. tokenizer.ggml.tokens): its element type and length only."""

    element_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry; `shape[0]` is the row (innermost) dimension, as in GGUF."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int
    n_bytes: int
    shard: int = 0

    @property
    def type_name(self) -> str:
        """The ggml type's name: "Q4_K", "F32", "MXFP4"."""
        return str(GGMLQuantizationType(self.ggml_type).name)


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF header: metadata from the first shard, tensor infos from every shard."""

    source: str
    version: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    alignment: int
    data_offset: int
    file_size: int | None
    shards: tuple[str, ...]
    # per shard: where its tensor data starts (its header size) and its file size when known
    shard_data_offsets: tuple[int, ...] = ()
    shard_sizes: tuple[int | None, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key`, or `default`."""
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        """`general.architecture`, or None when missing or not a string."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """The value of `{architecture}.{suffix}` (e.g. "context_length"), or `default`."""
        arch = self.architecture
        if arch is None:
            return default
        return self.metadata.get(f"{arch}.{suffix}", default)

    @cached_property
    def _tensor_index(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor called `name`, or None."""
        return self._tensor_index.get(name)

    @property
    def tensor_bytes_total(self) -> int:
        """Bytes of tensor data over all shards (without alignment padding)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        """Number of parameters: the sum of every tensor's element count."""
        return sum(t.n_elements for t in self.tensors)


# ---------------------------------------------------------------------------------------------------------------
# The byte window


class _Reader:
    """A forward-only window over header bytes: `buf` holds file bytes [base, base + len(buf))."""

    __slots__ = (
        "base",
        "buf",
        "chunk",
        "chunk_max",
        "chunk_min",
        "end_desc",
        "fetch",
        "limit",
        "over_max",
        "pos",
        "prefix",
        "source",
        "step",
    )

    def __init__(
        self,
        source: str,
        buf: bytes | memoryview,
        *,
        limit: int,
        end_desc: str,
        fetch: Callable[[int, int], bytes] | None = None,
        over_max: bool = False,
        chunk: int = 0,
        chunk_max: int = 0,
        prefix: str = "",
    ) -> None:
        self.source = source
        self.prefix = prefix  # "shard 2 of 3: " for split sets
        self.buf = buf
        self.base = 0
        self.pos = 0
        self.limit = limit  # no header byte may lie at or after this offset
        self.end_desc = end_desc  # what `limit` is, for messages
        self.over_max = over_max  # True when `limit` is max_header_bytes rather than the end of the bytes
        self.fetch = fetch
        self.chunk = chunk  # how much to read ahead next time; doubles up to chunk_max
        self.chunk_min = chunk
        self.chunk_max = chunk_max
        self.step = "read header"

    def fail(self, message: str, offset: int | None = None) -> NoReturn:
        raise GGUFFormatError(
            f"{self.prefix}{self.step}: {message}", source=self.source, offset=self.pos if offset is None else offset
        )

    def remaining(self) -> int:
        return max(self.limit - self.pos, 0)

    def short(self, need: int, what: str = "", rem: int | None = None) -> NoReturn:
        """Fail at `pos`: `need` bytes from there do not fit in the `rem` that remain (default: from pos)."""
        rem = self.remaining() if rem is None else rem
        what = f" for {what}" if what else ""
        if self.over_max:
            self.fail(f"header too large: need {need} bytes{what}, only {rem} more allowed by {self.end_desc}")
        self.fail(f"truncated: need {need} bytes{what}, only {rem} remain before {self.end_desc}")

    def check(self, count: int, min_size: int, what: str, offset: int) -> None:
        """Reject `count` items of at least `min_size` bytes each if they cannot fit in what remains."""
        need = count * min_size
        rem = self.limit - self.pos
        if need > rem:
            self.pos = offset
            self.short(need, what, rem)

    def need(self, n: int) -> int:
        """Make bytes [pos, pos + n) available and return the index of `pos` in `buf`."""
        i = self.pos - self.base
        if i + n <= len(self.buf):
            return i
        return self._fill(n)

    def _fill(self, n: int) -> int:
        end = self.pos + n
        if end > self.limit or self.fetch is None:
            self.short(n)
        buf_end = self.base + len(self.buf)
        if self.pos < buf_end:
            keep = bytes(self.buf[self.pos - self.base :])
            start = buf_end
        else:  # the parser skipped past the window (a long fixed-width array): leave a gap
            keep = b""
            start = self.pos
        want = min(max(end, start + self.chunk), self.limit) - start
        data = self.fetch(start, want)
        self.chunk = min(self.chunk * 2, self.chunk_max)
        self.buf = keep + data if keep else data
        self.base = self.pos
        if len(self.buf) < n:  # the source ended before the size it announced, or its size was unknown
            self.limit = self.base + len(self.buf)
            self.end_desc = f"the end of the file (byte {self.limit})"
            self.over_max = False
            self.short(n)
        return 0

    def u32(self) -> int:
        i = self.need(4)
        self.pos += 4
        return int(_U32.unpack_from(self.buf, i)[0])

    def u64(self) -> int:
        i = self.need(8)
        self.pos += 8
        return int(_U64.unpack_from(self.buf, i)[0])

    def raw_string(self, what: str) -> bytes:
        at = self.pos
        n = self.u64()
        if n > self.limit - self.pos:
            self.pos = at
            self.short(n, f"{what} of length {n}", self.limit - at - 8)
        i = self.need(n)
        self.pos += n
        return bytes(self.buf[i : i + n])

    def text(self) -> str:
        at = self.pos
        n = self.u64()
        if n > self.limit - self.pos:
            self.pos = at
            self.short(n, f"string of length {n}", self.limit - at - 8)
        i = self.need(n)
        self.pos += n
        return str(self.buf[i : i + n], "utf-8", "replace")


def _strings(r: _Reader, count: int, keep: bool) -> list[str] | None:
    """Read (keep) or walk past `count` strings; the hot loop for tokenizer vocabularies."""
    out: list[str] | None = [] if keep else None
    unpack = _U64.unpack_from
    buf, base = r.buf, r.base
    p, end, lim = r.pos - base, len(buf), r.limit - base
    for _ in range(count):
        if p + 8 > end:
            r.pos = base + p
            r.need(8)
            buf, base = r.buf, r.base
            p, end, lim = r.pos - base, len(buf), r.limit - base
        n = unpack(buf, p)[0]
        if n > lim - p - 8:
            r.pos = base + p
            r.short(n, f"string of length {n}", lim - p - 8)
        p += 8
        if p + n > end:
            r.pos = base + p
            r.need(n)
            buf, base = r.buf, r.base
            p, end, lim = r.pos - base, len(buf), r.limit - base
        if out is not None:
            out.append(str(buf[p : p + n], "utf-8", "replace"))
        p += n
    r.pos = base + p
    return out


def _type_name(vtype: int) -> str:
    try:
        return str(GGUFValueType(vtype).name)
    except ValueError:
        return f"type {vtype}"


def _array(r: _Reader, depth: int, max_array_len: int) -> list[Any] | SkippedArray:
    at = r.pos
    if depth > _MAX_ARRAY_DEPTH:
        r.fail(f"arrays nested deeper than {_MAX_ARRAY_DEPTH} levels", at)
    etype = r.u32()
    count = r.u64()
    fixed = _FIXED.get(etype)
    if fixed is not None:
        min_size = fixed[1]
    elif etype == _T_STRING:
        min_size = 8
    elif etype == _T_ARRAY:
        min_size = 12
    else:
        r.fail(f"array has unknown element type {etype}", at)
    r.check(count, min_size, f"array of {count} {_type_name(etype)}", at)
    keep = count <= max_array_len
    if fixed is not None:
        n = count * min_size
        if not keep:
            # within limit (checked): seek past it; the next read fetches from there, with a short
            # read-ahead again, since the next KV may well be another long array to skip
            r.pos += n
            r.chunk = r.chunk_min
            return SkippedArray(etype, count)
        i = r.need(n)
        r.pos += n
        return list(struct.unpack_from(f"<{count}{fixed[0]}", r.buf, i))
    if etype == _T_STRING:
        out = _strings(r, count, keep)
        return out if out is not None else SkippedArray(etype, count)
    if not keep:
        for _ in range(count):
            _array(r, depth + 1, -1)  # walk: every inner array is skipped too
        return SkippedArray(etype, count)
    return [_array(r, depth + 1, max_array_len) for _ in range(count)]


def _value(r: _Reader, vtype: int, max_array_len: int) -> Any:
    s = _SCALAR.get(vtype)
    if s is not None:
        i = r.need(s.size)
        r.pos += s.size
        return s.unpack_from(r.buf, i)[0]
    if vtype == _T_STRING:
        return r.text()
    if vtype == _T_ARRAY:
        return _array(r, 1, max_array_len)
    r.fail(f"unknown value type {vtype}", r.pos - 4)


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


@dataclass
class _Parsed:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


def _parse(r: _Reader, *, max_array_len: int, file_size: int | None, shard: int = 0) -> _Parsed:
    try:
        return _parse_inner(r, max_array_len=max_array_len, file_size=file_size, shard=shard)
    except GGUFFormatError:
        raise
    except (struct.error, ValueError, OverflowError, IndexError, RecursionError, MemoryError) as exc:
        # A safety net: every case above should have been caught by a check with a better message.
        raise GGUFFormatError(
            f"{r.prefix}{r.step}: internal parser error ({type(exc).__name__}: {exc})", source=r.source, offset=r.pos
        ) from None


def _parse_inner(r: _Reader, *, max_array_len: int, file_size: int | None, shard: int) -> _Parsed:
    r.step = "read magic"
    i = r.need(4)
    magic = bytes(r.buf[i : i + 4])
    if magic == _MAGIC_SWAPPED:
        r.fail("big-endian GGUF files are not supported (magic b'FUGG')", 0)
    if magic != _MAGIC:
        r.fail(f"not a GGUF file: magic is {magic!r}, expected b'GGUF'", 0)
    r.pos = 4

    r.step = "read version"
    version = r.u32()
    if version == 0:
        r.fail("bad GGUF version 0", 4)
    if version & 0xFFFF == 0:
        r.fail(f"version field is {version:#x}: a big-endian (byte-swapped) GGUF file, not supported", 4)
    if version == 1:
        r.fail("GGUF version 1 is no longer supported; convert the model again with current llama.cpp", 4)
    if version > _MAX_VERSION:
        r.fail(f"GGUF version {version} is newer than this reader supports (2 to {_MAX_VERSION})", 4)

    r.step = "read tensor count"
    at = r.pos
    n_tensors = r.u64()
    if n_tensors > _INT64_MAX:
        r.fail(f"tensor count {n_tensors} is negative as int64", at)
    r.check(n_tensors, _MIN_TENSOR_INFO_BYTES, f"{n_tensors} tensor infos", at)

    r.step = "read metadata count"
    at = r.pos
    n_kv = r.u64()
    if n_kv > _INT64_MAX:
        r.fail(f"metadata count {n_kv} is negative as int64", at)
    r.check(n_kv, _MIN_KV_BYTES, f"{n_kv} metadata pairs", at)
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining():
        r.step = "read counts"
        r.check(1, n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES, "metadata and tensor infos", 8)

    metadata: dict[str, Any] = {}
    align_type, align_at = _T_UINT32, 0
    for k in range(n_kv):
        r.step = f"read key {k}"
        at = r.pos
        raw = r.raw_string("key")
        if not raw:
            r.fail("key is empty", at)
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            r.fail(f"key {raw[:60]!r} is not valid UTF-8", at)
        if key in metadata:
            r.fail(f"duplicate key {_show(key)}", at)
        r.step = f"read value of {_show(key)}"
        vtype = r.u32()
        if key == "general.alignment":
            align_type, align_at = vtype, r.pos
        metadata[key] = _value(r, vtype, max_array_len)

    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        r.step = "read general.alignment"
        if align_type != _T_UINT32:
            r.fail(f"general.alignment must be a UINT32, not {_type_name(align_type)}", align_at)
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            r.fail(f"general.alignment {alignment} is not a power of two", align_at)

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    expected_offset = 0
    for t in range(n_tensors):
        r.step = f"read tensor info {t}"
        at = r.pos
        raw = r.raw_string("tensor name")
        if len(raw) >= _MAX_NAME:
            r.fail(f"tensor name is {len(raw)} bytes long; GGML_MAX_NAME allows at most {_MAX_NAME - 1}", at)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            r.fail(f"tensor name {raw!r} is not valid UTF-8", at)
        if name in names:
            r.fail(f"duplicate tensor name {name!r}", at)
        names.add(name)
        r.step = f"read tensor {name!r}"

        at = r.pos
        n_dims = r.u32()
        if n_dims > _MAX_DIMS:
            r.fail(f"{n_dims} dimensions, GGML_MAX_DIMS is {_MAX_DIMS}", at)
        i = r.need(8 * n_dims)
        shape = struct.unpack_from(f"<{n_dims}q", r.buf, i)
        r.pos += 8 * n_dims
        n_elements = 1
        for j, ne in enumerate(shape):
            if ne < 0:
                r.fail(f"dimension {j} is {ne + 2**64}, negative as int64", at + 4 + 8 * j)
            # the overflow test of gguf.cpp, in its order (a leading zero dim makes the product 0)
            if j and ne > 1 and _INT64_MAX // ne < n_elements:
                r.fail(f"shape {shape} has more than INT64_MAX elements", at)
            n_elements = n_elements * ne if j else ne

        at = r.pos
        ggml_type = r.u32()
        sizes = _QUANT_SIZES.get(ggml_type)
        if sizes is None:
            if ggml_type in _RETIRED_TYPES:
                r.fail(f"ggml type {ggml_type} ({_RETIRED_TYPES[ggml_type]}) is retired; re-quantize the model", at)
            r.fail(f"unknown ggml type {ggml_type} (not in this gguf package's GGMLQuantizationType)", at)
        block, type_size = sizes
        row = shape[0] if shape else 1
        if row % block:
            name_t = GGMLQuantizationType(ggml_type).name
            r.fail(f"row of {row} elements is not a multiple of {name_t}'s block size {block}", at)
        if n_elements // block > _SIZE_MAX // type_size:
            r.fail(f"size in bytes of shape {shape} does not fit in 64 bits", at)
        n_bytes = n_elements * type_size // block

        at = r.pos
        offset = r.u64()
        if offset != expected_offset:
            if offset % alignment:
                r.fail(f"data offset {offset} is not a multiple of the alignment {alignment}", at)
            r.fail(
                f"data offset {offset}, expected {expected_offset} "
                f"(tensor data must follow in header order, each padded to {alignment} bytes)",
                at,
            )
        expected_offset += -(-n_bytes // alignment) * alignment
        if expected_offset > _SIZE_MAX:
            r.fail("tensor data size overflows 64 bits", at)
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes, shard))

    r.step = "read tensor data"
    data_offset = r.pos
    if n_tensors:
        data_offset = -(-r.pos // alignment) * alignment
    if file_size is not None:
        if data_offset > file_size:
            r.fail(f"tensor data would start at byte {data_offset}, past the end of the file ({file_size})")
        for ti in tensors:
            end = data_offset + ti.offset + ti.n_bytes
            if end > file_size:
                r.fail(
                    f"tensor {ti.name!r} ends at byte {end}, past the end of the file ({file_size} bytes): "
                    "the file is truncated",
                    min(data_offset + ti.offset, file_size),
                )
    return _Parsed(version, metadata, tensors, alignment, data_offset)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def _redact(source: str) -> str:
    """`source` without query string, fragment or user info: safe to show."""
    if not _is_url(source):
        return source
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(source)
    except ValueError:
        return source.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def parse_header(
    data: bytes | bytearray | memoryview, *, source: str = "<bytes>", max_array_len: int = 4096
) -> GGUFHeader:
    """Parse a complete GGUF header from `data`, a prefix of a file (tensor data may be missing).

    Raises GGUFFormatError ("... truncated ...") if `data` ends before the header does.
    """
    buf: bytes | memoryview = data if isinstance(data, bytes) else memoryview(data).cast("B")
    shown = _redact(source)
    r = _Reader(shown, buf, limit=len(buf), end_desc=f"the end of the data (byte {len(buf)})")
    p = _parse(r, max_array_len=max_array_len, file_size=None)
    return GGUFHeader(
        source=shown,
        version=p.version,
        metadata=p.metadata,
        tensors=tuple(p.tensors),
        alignment=p.alignment,
        data_offset=p.data_offset,
        file_size=None,
        shards=(shown,),
    )


def read_header(
    source: str | os.PathLike[str],
    *,
    client: httpx.Client | None = None,
    max_array_len: int = 4096,
    max_header_bytes: int = 256 * 1024**2,
) -> GGUFHeader:
    """Read the GGUF header of a local file or an http(s) URL, reading only header bytes.

    Split sets (`name-00001-of-00003.gguf`, any shard given) are read whole: metadata from shard 1, tensors
    from all. URLs are read with Range requests (redirects followed, network errors retried) through `client`
    or a private httpx.Client; HF_TOKEN is sent only to the Hugging Face endpoint (HF_ENDPOINT).
    """
    loc = os.fsdecode(source)
    remote = _is_url(loc)
    locations = _shard_locations(loc, remote)
    own_client = None
    if remote and client is None:
        import httpx

        timeout = httpx.Timeout(_HTTP_TIMEOUT_S, connect=_HTTP_CONNECT_TIMEOUT_S)
        own_client = client = httpx.Client(follow_redirects=True, timeout=timeout)
    try:
        return _read_set(locations, remote, client, max_array_len, max_header_bytes)
    finally:
        if own_client is not None:
            own_client.close()


def _shard_locations(loc: str, remote: bool) -> list[str]:
    if remote:
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(loc)
        except ValueError as exc:
            raise GGUFFormatError(f"read header: invalid URL ({exc})", source=_redact(loc)) from None
        head, _, name = parts.path.rpartition("/")
    else:
        head, name = os.path.split(loc)
    m = _SHARD_RE.match(name)
    if m is None:
        return [loc]
    prefix, idx, total = m[1], int(m[2]), int(m[3])
    if total == 0 or idx == 0 or idx > total:
        raise GGUFFormatError(f"read split set: shard number {idx} of {total} is invalid", source=_redact(loc))
    names = [f"{prefix}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    if remote:
        return [urlunsplit(parts._replace(path=f"{head}/{n}")) for n in names]
    return [os.path.join(head, n) for n in names]


def _read_set(locations: list[str], remote: bool, client: Any, max_array_len: int, max_header_bytes: int) -> GGUFHeader:
    shown = [_redact(x) for x in locations]
    n = len(locations)
    label = f"shard 1 of {n}: " if n > 1 else ""
    first, first_size = _read_one(locations[0], remote, client, max_array_len, max_header_bytes, 0, label)
    meta = first.metadata
    split_count = meta.get("split.count")
    if split_count is not None and (not isinstance(split_count, int) or isinstance(split_count, bool)):
        raise GGUFFormatError(f"read split set: split.count is {split_count!r}, not an integer", source=shown[0])
    if n > 1 and split_count is None:
        raise GGUFFormatError(
            f"read split set: the file name says {n} shards but split.count is missing", source=shown[0]
        )
    if n > 1 and split_count != n:
        raise GGUFFormatError(
            f"read split set: split.count is {split_count} but the file name says {n} shards", source=shown[0]
        )
    if n == 1 and split_count is not None and split_count > 1:
        raise GGUFFormatError(
            f"read split set: split.count is {split_count} but the file name does not end in "
            f"-00001-of-{split_count:05d}.gguf",
            source=shown[0],
        )
    if n > 1 and meta.get("split.no", 0) != 0:
        raise GGUFFormatError(f"read split set: split.no is {meta['split.no']}, expected 0", source=shown[0])

    tensors = list(first.tensors)
    sizes: list[int | None] = [first_size]
    offsets = [first.data_offset]
    seen = {t.name for t in tensors}
    for i in range(1, n):
        label = f"shard {i + 1} of {n}: "
        part, size = _read_one(locations[i], remote, client, max_array_len, max_header_bytes, i, label)
        no = part.metadata.get("split.no")
        if no != i:
            raise GGUFFormatError(f"read split set: split.no is {no!r}, expected {i}", source=shown[i])
        count = part.metadata.get("split.count", n)
        if count != n:
            raise GGUFFormatError(f"read split set: split.count is {count!r}, expected {n}", source=shown[i])
        for t in part.tensors:
            if t.name in seen:
                raise GGUFFormatError(f"read split set: tensor {t.name!r} is also in an earlier shard", source=shown[i])
            seen.add(t.name)
        tensors.extend(part.tensors)
        sizes.append(size)
        offsets.append(part.data_offset)
    expected = meta.get("split.tensors.count")
    if n > 1 and expected is not None and expected != len(tensors):
        raise GGUFFormatError(
            f"read split set: split.tensors.count is {expected} but the shards hold {len(tensors)} tensors",
            source=shown[0],
        )
    total = None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
    return GGUFHeader(
        source=shown[0],
        version=first.version,
        metadata=meta,
        tensors=tuple(tensors),
        alignment=first.alignment,
        data_offset=first.data_offset,
        file_size=total,
        shards=tuple(shown),
        shard_data_offsets=tuple(offsets),
        shard_sizes=tuple(sizes),
    )


def read_prefix(source: str | os.PathLike[str], n_bytes: int, *, client: httpx.Client | None = None) -> bytes:
    """The first `n_bytes` of a local file or an http(s) URL (Range requests): a header without tensor data.

    Raises GGUFFormatError when the source cannot be read or is shorter than `n_bytes`.
    """
    loc = os.fspath(source)
    shown = _redact(loc)
    if _is_url(loc):
        import httpx as _httpx

        own = client is None
        timeout = _httpx.Timeout(_HTTP_TIMEOUT_S, connect=_HTTP_CONNECT_TIMEOUT_S)
        http = client or _httpx.Client(follow_redirects=True, timeout=timeout)
        src: _FileSource | _HttpSource = _HttpSource(loc, http, shown, "")
    else:
        own, http = False, None
        src = _FileSource(loc, shown, "")
    try:
        data = src.fetch(0, n_bytes)
    finally:
        src.close()
        if own and http is not None:
            http.close()
    if len(data) < n_bytes:
        raise GGUFFormatError(f"read header bytes: got {len(data)} of {n_bytes}", source=shown)
    return data


def _read_one(
    loc: str, remote: bool, client: Any, max_array_len: int, max_header_bytes: int, shard: int, label: str
) -> tuple[_Parsed, int | None]:
    shown = _redact(loc)
    src: _FileSource | _HttpSource
    if remote:
        src = _HttpSource(loc, client, shown, label)
        first_chunk, chunk_max = _HTTP_FIRST_CHUNK, _HTTP_CHUNK_MAX
    else:
        src = _FileSource(loc, shown, label)
        first_chunk, chunk_max = _FILE_FIRST_CHUNK, _FILE_CHUNK_MAX
    try:
        first = src.fetch(0, min(first_chunk, max_header_bytes))
        size = src.size
        if size is not None and size <= max_header_bytes:
            limit, end_desc, over_max = size, f"the end of the file ({size} bytes)", False
        else:
            limit, end_desc, over_max = max_header_bytes, f"max_header_bytes={max_header_bytes}", True
        r = _Reader(
            shown,
            first,
            limit=limit,
            end_desc=end_desc,
            over_max=over_max,
            fetch=src.fetch,
            chunk=min(first_chunk * 2, chunk_max),
            chunk_max=chunk_max,
            prefix=label,
        )
        return _parse(r, max_array_len=max_array_len, file_size=size, shard=shard), size
    finally:
        src.close()


class _FileSource:
    def __init__(self, path: str, shown: str, label: str) -> None:
        self.shown = shown
        self.label = label
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
            self.size: int | None = os.fstat(self.file.fileno()).st_size
        except OSError as exc:
            missing = " (missing shard)" if label and isinstance(exc, FileNotFoundError) else ""
            raise GGUFFormatError(f"{label}open: {exc.strerror or exc}{missing}", source=shown) from None

    def fetch(self, offset: int, n: int) -> bytes:
        try:
            self.file.seek(offset)
            return self.file.read(n)
        except OSError as exc:
            raise GGUFFormatError(
                f"{self.label}read: {exc.strerror or exc}", source=self.shown, offset=offset
            ) from None

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class _Transient(Exception):
    """A failure worth retrying (network error, 408/429/5xx, short body)."""


class _Fatal(Exception):
    """A failure not worth retrying (404, redirect loop, a server that answers the wrong range)."""


def _hf_auth(url: str) -> dict[str, str]:
    from urllib.parse import urlsplit

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        return {}
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    if urlsplit(url).hostname != urlsplit(endpoint).hostname:
        return {}
    return {"Authorization": f"Bearer {token}"}


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)


class _HttpSource:
    """Reads byte ranges of one URL; switches to reading one streamed body if the server ignores Range."""

    def __init__(self, url: str, client: httpx.Client, shown: str, label: str) -> None:
        from urllib.parse import urlsplit

        self.label = label
        self.url = url  # becomes the redirected URL after the first answer
        self.given_url = url
        self.client = client
        self.shown = shown
        self.size: int | None = None
        self.host = urlsplit(url).hostname
        self.auth = {} if "authorization" in client.headers else _hf_auth(url)
        self.stream: httpx.Response | None = None
        self.stream_iter: Iterator[bytes] | None = None
        self.stream_pos = 0
        self.stream_buf = b""

    def fetch(self, offset: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            start = offset + len(out)
            if self.stream is not None:
                out += self._stream_read(start, n - len(out))
                break
            want = min(n - len(out), _HTTP_CHUNK_MAX)
            part = self._range(start, want)
            if part is None:  # the server ignored Range; read on from its streamed body
                continue
            out += part
            if len(part) < want:
                break
        return bytes(out)

    def _range(self, start: int, length: int) -> bytes | None:
        import httpx
        from tenacity import (
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            stop_after_delay,
            wait_exponential,
        )

        retrying = Retrying(
            stop=stop_after_attempt(_HTTP_ATTEMPTS) | stop_after_delay(_HTTP_STOP_AFTER_S),
            wait=wait_exponential(multiplier=_HTTP_WAIT_S, max=_HTTP_WAIT_MAX_S),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        what = f"{self.label}read bytes {start}-{start + length - 1}"
        try:
            for attempt in retrying:
                with attempt:
                    return self._range_once(start, length)
        except _Transient as exc:
            n = attempt.retry_state.attempt_number
            tries = f" (after {n} attempts)" if n > 1 else ""
            raise GGUFFormatError(f"{what}: {self._scrub(str(exc))}{tries}", source=self.shown) from None
        except _Fatal as exc:
            raise GGUFFormatError(f"{what}: {self._scrub(str(exc))}", source=self.shown) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise GGUFFormatError(f"{what}: {type(exc).__name__}: {self._scrub(str(exc))}", source=self.shown) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _scrub(self, text: str) -> str:
        for secret in (self.url, self.given_url, *self.auth.values()):
            if secret:
                text = text.replace(secret, _redact(secret) if _is_url(secret) else "***")
        token = os.environ.get("HF_TOKEN", "").strip()
        return text.replace(token, "***") if token else text

    def _range_once(self, start: int, length: int) -> bytes | None:
        import httpx

        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        request = self.client.build_request("GET", self.url, headers=headers)
        if request.url.host == self.host:
            request.headers.update(self.auth)
        else:  # a redirected (CDN) URL: never send it the origin's credentials
            request.headers.pop("Authorization", None)
        try:
            response = self.client.send(request, stream=True, follow_redirects=True)
        except httpx.TooManyRedirects:
            raise _Fatal("too many redirects (a redirect loop?)") from None
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        keep_open = False
        try:
            status = response.status_code
            if status in (200, 206):
                self.url = str(response.url)  # reuse the redirected URL for the next chunks
            if status == 206:
                return self._read_partial(response, start, length)
            if status == 200:
                length_header = response.headers.get("Content-Length", "")
                self.size = int(length_header) if length_header.isdigit() else None
                self.stream, self.stream_iter = response, response.iter_bytes()
                self.stream_pos, self.stream_buf = 0, b""
                keep_open = True
                return None
            if status == 416:
                m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if m and m[3] != "*":
                    self.size = int(m[3])
                return b""
            reason = f"HTTP {status} {response.reason_phrase}".rstrip()
            if status in (408, 429) or status >= 500:
                raise _Transient(reason)
            raise _Fatal(reason)
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        finally:
            if not keep_open:
                response.close()

    def _read_partial(self, response: httpx.Response, start: int, length: int) -> bytes:
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if m is None or m[1] is None:
            raise _Fatal(f"206 response without a valid Content-Range ({response.headers.get('Content-Range')!r})")
        first, last = int(m[1]), int(m[2])
        if first != start or last < first:
            raise _Fatal(f"server sent bytes {first}-{last} for a request of bytes {start}-{start + length - 1}")
        if m[3] != "*":
            self.size = int(m[3])
        expected = min(last - first + 1, length)
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= expected:
                break
        if len(data) < expected:
            raise _Transient(f"body ended after {len(data)} of {expected} bytes")
        return bytes(data[:expected])

    def _stream_read(self, offset: int, n: int) -> bytes:
        import httpx

        assert self.stream_iter is not None
        if offset < self.stream_pos:
            raise GGUFFormatError(
                f"{self.label}read bytes from {offset}: the stream is already past them", source=self.shown
            )
        buf = bytearray(self.stream_buf)
        try:
            while self.stream_pos + len(buf) < offset + n:
                chunk = next(self.stream_iter, None)
                if chunk is None:
                    break
                buf += chunk
                # drop what lies before `offset` as it arrives, so memory stays bounded
                if self.stream_pos + len(buf) <= offset:
                    self.stream_pos += len(buf)
                    buf.clear()
        except httpx.HTTPError as exc:
            raise GGUFFormatError(
                f"{self.label}read bytes from {offset}: {type(exc).__name__}: {self._scrub(str(exc))}",
                source=self.shown,
            ) from None
        lo = max(offset - self.stream_pos, 0)
        data = bytes(buf[lo : lo + n])
        consumed = lo + len(data)
        self.stream_pos += consumed
        self.stream_buf = bytes(buf[consumed:])
        return data

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
