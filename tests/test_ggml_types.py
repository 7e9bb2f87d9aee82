"""ggml tensor types the installed `gguf` package does not know: refused in one line naming the type id and the
tensor when nobody knows them, read and estimated when launcher/data/quants.json carries them (ids, block sizes and
bytes per block from llama.cpp's ggml.c type traits). The headers are written byte by byte here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from gguf_factory import QT, VT, gguf_bytes, kv, metadata_kv, tensor_info

from launcher.cli import main
from launcher.errors import GGUFFormatError
from launcher.estimate import default_settings, estimate
from launcher.gguf import GGML_TYPE_NAMES, GGML_TYPE_SIZES, parse_header, read_header
from launcher.model import model_facts
from launcher.quants import file_type_label, file_type_name, newer_ggml_types

GGUF_SIZES = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
UNKNOWN = 99  # no ggml type, in gguf or in our table
N_LAYER, N_EMBD, N_FF, N_VOCAB = 2, 256, 512, 1024


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def ours_only() -> int:
    """An id in our table that the installed gguf does not know (Q2_0 = 42 with gguf 0.19)."""
    ids = sorted(set(newer_ggml_types()) - set(GGUF_SIZES))
    if not ids:
        pytest.skip("the installed gguf package knows every type of launcher/data/quants.json")
    return ids[-1]


def llama_header(weight_type: int, block: int, type_size: int) -> tuple[bytes, int]:
    """A llama header whose weight matrices have `weight_type` (norms F32), laid out with the sizes given; the
    header bytes and the bytes of tensor data they declare."""
    values = {
        "llama.block_count": N_LAYER,
        "llama.embedding_length": N_EMBD,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 8192,
        "llama.feed_forward_length": N_FF,
    }
    kvs = [kv("general.architecture", VT.STRING, "llama"), *(metadata_kv(k, v) for k, v in values.items())]
    tensors: list[tuple[str, Sequence[int], int]] = [("token_embd.weight", (N_EMBD, N_VOCAB), weight_type)]
    for il in range(N_LAYER):
        tensors += [
            (f"blk.{il}.attn_norm.weight", (N_EMBD,), QT.F32),
            (f"blk.{il}.attn_q.weight", (N_EMBD, N_EMBD), weight_type),
            (f"blk.{il}.attn_k.weight", (N_EMBD, 128), weight_type),
            (f"blk.{il}.attn_v.weight", (N_EMBD, 128), weight_type),
            (f"blk.{il}.attn_output.weight", (N_EMBD, N_EMBD), weight_type),
            (f"blk.{il}.ffn_norm.weight", (N_EMBD,), QT.F32),
            (f"blk.{il}.ffn_gate.weight", (N_EMBD, N_FF), weight_type),
            (f"blk.{il}.ffn_up.weight", (N_EMBD, N_FF), weight_type),
            (f"blk.{il}.ffn_down.weight", (N_FF, N_EMBD), weight_type),
        ]
    tensors += [("output_norm.weight", (N_EMBD,), QT.F32), ("output.weight", (N_EMBD, N_VOCAB), weight_type)]
    infos, offset = [], 0
    for name, dims, t in tensors:
        infos.append(tensor_info(name, dims, t, offset))
        n = 1
        for d in dims:
            n *= d
        size = n * 4 if t == QT.F32 else n // block * type_size
        offset += -(-size // 32) * 32
    return gguf_bytes(kvs, infos), offset


# ---------------------------------------------------------------------------------------------------------------
# A type nobody knows


def test_unknown_type_is_refused_naming_the_id_and_the_tensor() -> None:
    head, _ = llama_header(UNKNOWN, 32, 34)
    with pytest.raises(GGUFFormatError) as err:
        parse_header(head, source="new.gguf")
    message = str(err.value)
    installed = version("gguf")
    assert (
        f"read tensor 'token_embd.weight': unknown ggml type 99: newer than the installed gguf package (gguf {installed})"
        in message
    )
    assert message.endswith("upgrade both (pip install -U gguf fitquant)") and "\n" not in message


def test_unknown_type_is_one_line_from_the_cli(tmp_path: Path) -> None:
    head, size = llama_header(UNKNOWN, 32, 34)
    path = tmp_path / "new.gguf"
    path.write_bytes(head + bytes(size))
    for command in (["inspect"], ["estimate", "--ctx", "4k"], ["plan", "--ctx", "4k", "--ram", "8GiB", "--no-engine"]):
        code, out, err = run(*command, str(path))
        assert code == 1, out
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "read tensor 'token_embd.weight': unknown ggml type 99" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# A type in our table that gguf does not know


def test_a_type_only_our_table_knows_is_read_and_estimated(tmp_path: Path) -> None:
    type_id = ours_only()
    t = newer_ggml_types()[type_id]
    head, size = llama_header(type_id, t.block_size, t.type_size)
    header = parse_header(head, source="newer.gguf")
    q = header.tensor("blk.0.attn_q.weight")
    assert q is not None and q.type_name == t.name
    assert q.n_bytes == N_EMBD * N_EMBD // t.block_size * t.type_size
    facts = model_facts(header)
    assert facts.n_layer == N_LAYER
    result = estimate(facts, default_settings(facts, n_ctx=4096))
    assert result.weights_bytes == header.tensor_bytes_total

    path = tmp_path / "newer.gguf"
    path.write_bytes(head + bytes(size))
    assert read_header(path).tensor_bytes_total == header.tensor_bytes_total
    code, out, err = run("estimate", "--ctx", "4k", "--json", str(path))
    assert code == 0, err
    assert json.loads(out)["weights_bytes"] == header.tensor_bytes_total
    code, out, err = run("inspect", "--json", str(path))
    assert code == 0, err
    assert json.loads(out)["tensor_types"] == {
        "F32": 2 * N_LAYER + 1,
        t.name: 7 * N_LAYER + 2,
    }  # 7 matrices a layer, embeddings, output


def test_the_file_type_of_a_newer_type_is_named() -> None:
    for t in newer_ggml_types().values():
        assert t.file_type is not None
        name, value = t.file_type
        assert file_type_name(value) == name
        assert file_type_label(value) == name


# ---------------------------------------------------------------------------------------------------------------
# The table itself


def test_our_table_agrees_with_gguf_where_both_know_a_type() -> None:
    gguf_names = {int(m): m.name for m in gguf.GGMLQuantizationType}
    gguf_file_types = {m.name.removeprefix("MOSTLY_"): int(m) for m in gguf.LlamaFileType}
    for type_id, t in newer_ggml_types().items():
        assert GGML_TYPE_SIZES[type_id] == (t.block_size, t.type_size)
        assert GGML_TYPE_NAMES[type_id] == t.name
        if type_id in GGUF_SIZES:
            assert (gguf_names[type_id], GGUF_SIZES[type_id]) == (t.name, (t.block_size, t.type_size))
        if t.file_type is not None and t.file_type[0] in gguf_file_types:
            assert gguf_file_types[t.file_type[0]] == t.file_type[1]


def test_gguf_sizes_come_first_and_every_known_type_is_named() -> None:
    for type_id, sizes in GGUF_SIZES.items():
        assert GGML_TYPE_SIZES[type_id] == sizes
    assert set(GGML_TYPE_NAMES) == set(GGML_TYPE_SIZES)
    assert UNKNOWN not in GGML_TYPE_SIZES
