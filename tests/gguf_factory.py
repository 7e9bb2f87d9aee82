"""Small GGUF files for tests: valid ones written with gguf.GGUFWriter, malformed ones assembled by hand.

The hand builders (`u32`, `u64`, `gstr`, `kv`, `tensor_info`, `gguf_bytes`) write the GGUF v3 layout of
ggml-org/ggml docs/gguf.md byte for byte, so a test can put any wrong value in any field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

_PACK = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<?",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(s: str | bytes) -> bytes:
    """A gguf_string: u64 length + bytes."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def value(vtype: int, v: Any) -> bytes:
    """The payload of a value of type `vtype` (no type tag). Arrays: v = (element_type, items)."""
    if vtype == VT.STRING:
        return gstr(v)
    if vtype == VT.ARRAY:
        etype, items = v
        return u32(etype) + u64(len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack(_PACK[VT(vtype)], v)


def kv(key: str | bytes, vtype: int, v: Any) -> bytes:
    """One metadata pair: key, u32 type, payload."""
    return gstr(key) + u32(vtype) + value(vtype, v)


def tensor_info(name: str | bytes, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One tensor info; `dims` in GGUF order (dims[0] is the row)."""
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def gguf_bytes(
    kvs: Iterable[bytes] = (),
    tensors: Iterable[bytes] = (),
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    magic: bytes = b"GGUF",
    alignment: int = 32,
    data: bytes | int = b"",
) -> bytes:
    """A whole file: header, padding to `alignment` (when there are tensors), then `data` (or that many zeros)."""
    kvs, tensors = list(kvs), list(tensors)
    head = magic + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    if tensors:
        head += b"\0" * (-len(head) % alignment)
    return head + (bytes(data) if isinstance(data, int) else data)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    values: Sequence[tuple[str, Any, int | None]] = (),
    tensors: Sequence[tuple[str, tuple[int, ...], int]] = (),
    alignment: int | None = None,
    split_max_tensors: int = 0,
) -> list[Path]:
    """Write a GGUF with gguf.GGUFWriter; return the files written (several when split).

    `values` are (key, value, GGUFValueType or None to let the writer pick); `tensors` are
    (name, numpy-order shape, GGMLQuantizationType) filled with zeros (quantized with
    gguf.quants.quantize where it can, raw bytes of the right size otherwise).
    """
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, v, vtype in values:
        if vtype is None:
            if isinstance(v, (list, tuple)):
                w.add_array(key, v)
            else:
                w.add_key_value(key, v, VT.get_type(v))
        else:
            w.add_key_value(key, v, vtype)
    for name, shape, qtype in tensors:
        array, extra = _tensor_data(shape, qtype)
        w.add_tensor(name, array, **extra)
    paths = w.format_shard_names(Path(path))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths


def _tensor_data(shape: tuple[int, ...], qtype: int) -> tuple[np.ndarray, dict[str, Any]]:
    qtype = QT(qtype)
    rng = np.random.default_rng(len(shape))
    floats = rng.standard_normal(shape).astype(np.float32)
    if qtype == QT.F32:
        return floats, {}
    if qtype == QT.F16:
        return floats.astype(np.float16), {}
    try:
        return gguf.quants.quantize(floats, qtype), {"raw_dtype": qtype}
    except NotImplementedError:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * type_size
        return np.zeros((*shape[:-1], row_bytes), dtype=np.uint8), {"raw_dtype": qtype}


def header_size(data: bytes) -> int:
    """The data offset of a valid GGUF, per gguf.GGUFReader on a temporary copy."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return int(gguf.GGUFReader(f.name).data_offset)


def big_vocab_file(path: Path, *, n_tokens: int, tensor_bytes: int) -> int:
    """A llama-like file with an `n_tokens` vocabulary and `tensor_bytes` of (sparse, zero) tensor data.

    Written by hand for speed; returns the header size (the data offset).
    """
    tokens = [f"tok{i:07d}".encode() for i in range(n_tokens)]
    vocab = b"".join(u64(len(t)) + t for t in tokens)
    kvs = [
        kv("general.architecture", VT.STRING, "llama"),
        kv("llama.block_count", VT.UINT32, 2),
        gstr("tokenizer.ggml.tokens") + u32(VT.ARRAY) + u32(VT.STRING) + u64(n_tokens) + vocab,
        gstr("tokenizer.ggml.scores")
        + u32(VT.ARRAY)
        + u32(VT.FLOAT32)
        + u64(n_tokens)
        + np.zeros(n_tokens, "<f4").tobytes(),
        gstr("tokenizer.ggml.token_type")
        + u32(VT.ARRAY)
        + u32(VT.INT32)
        + u64(n_tokens)
        + np.ones(n_tokens, "<i4").tobytes(),
        kv("tokenizer.chat_template", VT.STRING, "{{ messages }}"),
    ]
    rows = max(tensor_bytes // (4096 * 4), 1)
    head = gguf_bytes(kvs, [tensor_info("token_embd.weight", [4096, rows], QT.F32, 0)])
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 4096 * rows * 4)  # sparse: the tensor data is never written
    return len(head)
