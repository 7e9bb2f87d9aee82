"""The GGUF header parser: bytes in (through a `ByteSource` or a prefix), `GGUFHeader` out; never tensor data.

One parser, `_parse`, runs over a `_Reader`: a forward-only window on the header bytes that asks its source for
more as it goes. `parse_header` gives it a byte prefix; `parse_source` gives it any `ByteSource` (a local file or
HTTP ranges: `launcher.gguf.sources`), reading in growing chunks. It knows nothing about files, URLs or tokens.

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

Type names and sizes come from the `gguf` package's constants (llama.cpp's gguf-py, the top-level `gguf`, not
this package), loaded without numpy by `launcher.gguf_py` and re-exported here as `gguf_constants`
(`gguf_constants.LlamaFileType`); its enums are IntEnums, so they compare equal to the `gguf` package's. Types
newer than the installed `gguf` knows come from `launcher.quants.newer_ggml_types` (llama.cpp's ggml.c type
traits): `GGML_TYPE_SIZES` and `GGML_TYPE_NAMES` hold both. A type id neither knows is refused, naming the id
and the tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from launcher.errors import GGUFFormatError
from launcher.gguf_py import gguf_constants
from launcher.quants import newer_ggml_types

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "GGML_TYPE_NAMES",
    "GGML_TYPE_SIZES",
    "ByteSource",
    "GGMLQuantizationType",
    "GGUFHeader",
    "GGUFValueType",
    "ParsedHeader",
    "SkippedArray",
    "TensorInfo",
    "gguf_constants",
    "parse_header",
    "parse_source",
]

GGMLQuantizationType = gguf_constants.GGMLQuantizationType
GGUFValueType = gguf_constants.GGUFValueType


def _type_tables() -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """ggml type id -> (block size, bytes per block), and -> name: the gguf package's, then the newer types it lacks."""
    sizes = {int(k): v for k, v in gguf_constants.GGML_QUANT_SIZES.items()}
    names = {int(m): str(m.name) for m in GGMLQuantizationType}
    for t in newer_ggml_types().values():
        sizes.setdefault(t.id, (t.block_size, t.type_size))
        names.setdefault(t.id, t.name)
    return sizes, names


GGML_TYPE_SIZES, GGML_TYPE_NAMES = _type_tables()

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
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF header: metadata from the first shard, tensor infos from every shard (a raw split is one file)."""

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
    # a raw byte split (x.gguf.part1of2, ...; `source` is part 1): each part's size, in order; () for a whole file
    part_sizes: tuple[int | None, ...] = ()

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
        return str(self.raw_string("string"), "utf-8", "replace")


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
class ParsedHeader:
    """What one file's header holds (one shard of a split set): `parse_source`'s answer."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


# ---------------------------------------------------------------------------------------------------------------
# The parser, step by step


def _parse(r: _Reader, *, max_array_len: int, file_size: int | None, shard: int = 0) -> ParsedHeader:
    try:
        version, n_tensors, n_kv = _read_preamble(r)
        metadata, alignment = _read_metadata(r, n_kv, max_array_len)
        tensors = _read_tensor_infos(r, n_tensors, alignment, shard)
        data_offset = _check_data_offsets(r, tensors, alignment, file_size)
        return ParsedHeader(version, metadata, tensors, alignment, data_offset)
    except GGUFFormatError:
        raise
    except (struct.error, ValueError, OverflowError, IndexError, RecursionError, MemoryError) as exc:
        # A safety net: every case above should have been caught by a check with a better message.
        raise GGUFFormatError(
            f"{r.prefix}{r.step}: internal parser error ({type(exc).__name__}: {exc})", source=r.source, offset=r.pos
        ) from None


def _read_preamble(r: _Reader) -> tuple[int, int, int]:
    """Magic, version and the two counts: (version, n_tensors, n_kv), the counts bounded by what remains."""
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

    n_tensors = _read_count(r, "tensor", "tensor infos", _MIN_TENSOR_INFO_BYTES)
    n_kv = _read_count(r, "metadata", "metadata pairs", _MIN_KV_BYTES)
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining():
        r.step = "read counts"
        r.check(1, n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES, "metadata and tensor infos", 8)
    return version, n_tensors, n_kv


def _read_count(r: _Reader, noun: str, items: str, min_bytes: int) -> int:
    """A u64 count of `items`, each at least `min_bytes` long: non-negative as int64 and fitting what remains."""
    r.step = f"read {noun} count"
    at = r.pos
    n = r.u64()
    if n > _INT64_MAX:
        r.fail(f"{noun} count {n} is negative as int64", at)
    r.check(n, min_bytes, f"{n} {items}", at)
    return n


def _read_metadata(r: _Reader, n_kv: int, max_array_len: int) -> tuple[dict[str, Any], int]:
    """The `n_kv` key-value pairs, and the alignment they declare (checked) or the default."""
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
    return metadata, alignment


def _read_tensor_infos(r: _Reader, n_tensors: int, alignment: int, shard: int) -> list[TensorInfo]:
    """The `n_tensors` tensor infos: unique names, data offsets packed in header order."""
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    expected_offset = 0
    for t in range(n_tensors):
        r.step = f"read tensor info {t}"
        name = _read_tensor_name(r, names)
        r.step = f"read tensor {name!r}"
        shape, n_elements = _read_shape(r)
        ggml_type, n_bytes = _read_tensor_type(r, shape, n_elements)

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
    return tensors


def _read_tensor_name(r: _Reader, names: set[str]) -> str:
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
    return name


def _read_shape(r: _Reader) -> tuple[tuple[int, ...], int]:
    """(shape, number of elements): at most GGML_MAX_DIMS non-negative dims whose product fits in int64."""
    at = r.pos
    n_dims = r.u32()
    if n_dims > _MAX_DIMS:
        r.fail(f"{n_dims} dimensions, GGML_MAX_DIMS is {_MAX_DIMS}", at)
    i = r.need(8 * n_dims)
    shape: tuple[int, ...] = struct.unpack_from(f"<{n_dims}q", r.buf, i)
    r.pos += 8 * n_dims
    n_elements = 1
    for j, ne in enumerate(shape):
        if ne < 0:
            r.fail(f"dimension {j} is {ne + 2**64}, negative as int64", at + 4 + 8 * j)
        # the overflow test of gguf.cpp, in its order (a leading zero dim makes the product 0)
        if j and ne > 1 and _INT64_MAX // ne < n_elements:
            r.fail(f"shape {shape} has more than INT64_MAX elements", at)
        n_elements = n_elements * ne if j else ne
    return shape, n_elements


def _read_tensor_type(r: _Reader, shape: tuple[int, ...], n_elements: int) -> tuple[int, int]:
    """(ggml type, bytes of data): a known type whose block size divides the row, a size that fits in 64 bits."""
    at = r.pos
    ggml_type = r.u32()
    sizes = GGML_TYPE_SIZES.get(ggml_type)
    if sizes is None:
        if ggml_type in _RETIRED_TYPES:
            r.fail(f"ggml type {ggml_type} ({_RETIRED_TYPES[ggml_type]}) is retired; re-quantize the model", at)
        r.fail(
            f"unknown ggml type {ggml_type}: newer than the installed gguf package ({_gguf_version()}) and fitquant "
            "know; upgrade both (pip install -U gguf fitquant)",
            at,
        )
    block, type_size = sizes
    row = shape[0] if shape else 1
    if row % block:
        r.fail(f"row of {row} elements is not a multiple of {GGML_TYPE_NAMES[ggml_type]}'s block size {block}", at)
    if n_elements // block > _SIZE_MAX // type_size:
        r.fail(f"size in bytes of shape {shape} does not fit in 64 bits", at)
    return ggml_type, n_elements * type_size // block


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:
        return "gguf"


def _check_data_offsets(r: _Reader, tensors: list[TensorInfo], alignment: int, file_size: int | None) -> int:
    """Where tensor data starts (padded to the alignment when there are tensors); every tensor inside the file."""
    r.step = "read tensor data"
    data_offset = r.pos
    if tensors:
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
    return data_offset


# ---------------------------------------------------------------------------------------------------------------
# Entry points


class ByteSource(Protocol):
    """Where header bytes come from: `fetch(offset, n)` gives up to `n` bytes (fewer only at the end); `size` is
    the total size once known (after the first fetch for HTTP), else None."""

    @property
    def size(self) -> int | None: ...

    def fetch(self, offset: int, n: int) -> bytes: ...


def parse_header(
    data: bytes | bytearray | memoryview, *, source: str = "<bytes>", max_array_len: int = 4096
) -> GGUFHeader:
    """Parse a complete GGUF header from `data`, a prefix of a file (tensor data may be missing).

    Raises GGUFFormatError ("... truncated ...") if `data` ends before the header does.
    """
    from launcher.http import redact_url

    buf: bytes | memoryview = data if isinstance(data, bytes) else memoryview(data).cast("B")
    shown = redact_url(source)
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


def parse_source(
    source: ByteSource,
    *,
    shown: str,
    first_chunk: int,
    chunk_max: int,
    max_array_len: int = 4096,
    max_header_bytes: int = 256 * 1024**2,
    shard: int = 0,
    label: str = "",
) -> ParsedHeader:
    """Parse the header `source` holds, fetching `first_chunk` bytes, then twice as many each time up to `chunk_max`.

    `shown` names the source in messages, `label` prefixes them ("shard 2 of 3: "); tensors get `shard`. No header
    byte is read at or past `max_header_bytes`. Raises GGUFFormatError.
    """
    first = source.fetch(0, min(first_chunk, max_header_bytes))
    size = source.size
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
        fetch=source.fetch,
        chunk=min(first_chunk * 2, chunk_max),
        chunk_max=chunk_max,
        prefix=label,
    )
    return _parse(r, max_array_len=max_array_len, file_size=size, shard=shard)
