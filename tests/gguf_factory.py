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


def metadata_kv(key: str, v: Any) -> bytes:
    """One metadata pair with the type picked from the Python value: bool, int (u32), float (f32), str, or a
    list of bools / ints (an array)."""
    if isinstance(v, bool):
        return kv(key, VT.BOOL, v)
    if isinstance(v, int):
        return kv(key, VT.UINT32, v)
    if isinstance(v, float):
        return kv(key, VT.FLOAT32, v)
    if isinstance(v, str):
        return kv(key, VT.STRING, v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, bool) for x in v):
        return kv(key, VT.ARRAY, (VT.BOOL, list(v)))
    if isinstance(v, (list, tuple)):
        return kv(key, VT.ARRAY, (VT.UINT32, list(v)))
    raise TypeError(f"no GGUF type for {key}={v!r}")


def tensor_nbytes(dims: Sequence[int], ggml_type: int) -> int:
    """ggml_nbytes of a tensor: `dims` in GGUF order (dims[0] is the row, a whole number of blocks)."""
    block, type_size = gguf.GGML_QUANT_SIZES[QT(ggml_type)]
    assert dims[0] % block == 0, f"row of {dims[0]} is not a multiple of {QT(ggml_type).name}'s block {block}"
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def header_only_gguf(
    arch: str, values: dict[str, Any], tensors: Sequence[tuple[str, Sequence[int], int]] = (), *, alignment: int = 32
) -> tuple[bytes, int]:
    """A model's GGUF header (no tensor data) and the size the whole file would have.

    `values` are metadata (types as metadata_kv picks them), `tensors` (name, GGUF-order dims, ggml type) of any
    type gguf.GGML_QUANT_SIZES knows: the header declares them, the data is never made.
    """
    kvs = [kv("general.architecture", VT.STRING, arch)] + [metadata_kv(k, v) for k, v in values.items()]
    infos, offset = [], 0
    for name, dims, qtype in tensors:
        infos.append(tensor_info(name, dims, qtype, offset))
        offset += -(-tensor_nbytes(dims, qtype) // alignment) * alignment
    head = gguf_bytes(kvs, infos, alignment=alignment)
    return head, len(head) + offset


def write_header_only(path: Path, head: bytes, file_size: int) -> Path:
    """Write a header and extend the file to `file_size` without writing the data (a sparse file)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(file_size)
    return path


def llama_gguf(
    ggml_type: int,
    *,
    n_layer: int = 12,
    n_embd: int = 1024,
    n_ff: int = 2816,
    n_vocab: int = 32000,
    n_head: int = 16,
    n_head_kv: int = 4,
    context_length: int = 131072,
) -> tuple[bytes, int]:
    """A llama-architecture header whose every weight matrix has `ggml_type` (norms F32), and its file size.

    Rows (n_embd, n_ff) must be whole blocks of the type: multiples of 256 for the K-quants.
    """
    kv_width = n_embd // n_head * n_head_kv
    values = {
        "llama.block_count": n_layer,
        "llama.embedding_length": n_embd,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.context_length": context_length,
        "llama.feed_forward_length": n_ff,
    }
    tensors: list[tuple[str, Sequence[int], int]] = [("token_embd.weight", (n_embd, n_vocab), ggml_type)]
    for il in range(n_layer):
        tensors += [
            (f"blk.{il}.attn_norm.weight", (n_embd,), QT.F32),
            (f"blk.{il}.attn_q.weight", (n_embd, n_embd), ggml_type),
            (f"blk.{il}.attn_k.weight", (n_embd, kv_width), ggml_type),
            (f"blk.{il}.attn_v.weight", (n_embd, kv_width), ggml_type),
            (f"blk.{il}.attn_output.weight", (n_embd, n_embd), ggml_type),
            (f"blk.{il}.ffn_norm.weight", (n_embd,), QT.F32),
            (f"blk.{il}.ffn_gate.weight", (n_embd, n_ff), ggml_type),
            (f"blk.{il}.ffn_up.weight", (n_embd, n_ff), ggml_type),
            (f"blk.{il}.ffn_down.weight", (n_ff, n_embd), ggml_type),
        ]
    tensors += [("output_norm.weight", (n_embd,), QT.F32), ("output.weight", (n_embd, n_vocab), ggml_type)]
    return header_only_gguf("llama", values, tensors)
