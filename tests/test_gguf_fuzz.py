"""Fuzz launcher.gguf with mutated and truncated real headers: only GGUFFormatError escapes, fast and small.

Seeds are small valid files (gguf.GGUFWriter and hand-made). Mutations: bit flips, byte sets, truncation,
huge counts and lengths written over length-like fields, odd type ids over u32 fields, insertions,
deletions and duplicated slices. Every example must finish in under 1 s and allocate under 64 MiB
(tracemalloc peak). Derandomized and database-free, so every run tries the same inputs.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

from gguf_factory import QT, VT, gguf_bytes, gstr, kv, tensor_info, u32, u64, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.errors import GGUFFormatError
from launcher.gguf import parse_header, read_header
from launcher.gguf import sources as gs

MAX_SECONDS = 1.0
MAX_BYTES = 64 * 1024**2
HUGE = [2**62, 2**60, 2**40, 2**32, 2**63, 2**64 - 1, 2**31 - 1, 4097, 1 << 20]
ODD_U32 = [0, 1, 5, 7, 8, 9, 12, 13, 31, 39, 42, 99, 2**31, 2**32 - 1]


def _seeds(tmp: Path) -> list[bytes]:
    (full,) = write_gguf(
        tmp / "full.gguf",
        alignment=64,
        values=[
            ("x.u8", 1, VT.UINT8),
            ("x.i16", -3, VT.INT16),
            ("x.f32", 0.5, VT.FLOAT32),
            ("x.u64", 2**40, VT.UINT64),
            ("x.f64", 2.5, VT.FLOAT64),
            ("x.bool", True, VT.BOOL),
            ("x.s", "héllo", VT.STRING),
            ("x.strs", ["a", "bb", "ccc"], None),
            ("x.ints", [1, 2, 3, 4], None),
            ("x.bools", [True, False], None),
            ("x.nested", [[1, 2], [3]], None),
            ("x.deep", [[["q"]]], None),
        ],
        tensors=[("a", (2, 32), QT.F32), ("b", (2, 64), QT.Q4_0), ("c", (256,), QT.Q4_K)],
    )
    long_arrays = gguf_bytes(
        [
            kv("general.architecture", VT.STRING, "gemma3"),
            kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(40)])),
            kv("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.25] * 40)),
            kv("gemma3.layers", VT.ARRAY, (VT.ARRAY, [(VT.INT32, [1, 2])] * 12)),
            kv("gemma3.attention.sliding_window_pattern", VT.ARRAY, (VT.BOOL, [True] * 18)),
        ],
        [tensor_info("token_embd.weight", [32, 4], QT.Q8_0, 0), tensor_info("norm", [8], QT.F16, 160)],
        data=192,
    )
    shard = gguf_bytes(
        [kv("split.no", VT.UINT16, 1), kv("split.count", VT.UINT16, 2), kv("split.tensors.count", VT.INT32, 2)],
        [tensor_info("blk.1.w", [64, 2], QT.MXFP4, 0)],
        data=64,
    )
    tiny = gguf_bytes([kv("general.architecture", VT.STRING, "llama")])
    empty = gguf_bytes([kv("x.e", VT.ARRAY, (VT.UINT32, [])), gstr("x.k") + u32(VT.UINT8) + b"\x07"], version=2)
    return [full.read_bytes(), long_arrays, shard, tiny, empty]


SEEDS = _seeds(Path(__import__("tempfile").mkdtemp(prefix="gguf-fuzz-")))


def _length_like(data: bytes) -> list[int]:
    """Positions holding a small non-zero u64: likely counts and string lengths."""
    return [i for i in range(len(data) - 7) if 0 < struct.unpack_from("<Q", data, i)[0] < 1 << 16]


LENGTH_LIKE = [_length_like(s) for s in SEEDS]


@st.composite
def mutated(draw) -> tuple[bytes, int]:
    # positions come from a hypothesis-seeded Random: uniform over the header (hypothesis's own integers
    # favour the bounds, which would mostly break the magic)
    rnd = draw(st.randoms(use_true_random=False))
    k = rnd.randrange(len(SEEDS))
    data = bytearray(SEEDS[k])
    for _ in range(rnd.randint(1, 4)):
        n = len(data)
        if n == 0:
            break
        kind = rnd.choice(["flip", "set", "truncate", "huge", "huge", "u32", "insert", "delete", "dup"])
        pos = rnd.randrange(n)
        if kind == "flip":
            data[pos] ^= 1 << rnd.randrange(8)
        elif kind == "set":
            data[pos] = rnd.randrange(256)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "huge":
            spots = LENGTH_LIKE[k]
            at = rnd.choice(spots) if spots and rnd.random() < 0.7 else pos
            data[at : at + 8] = u64(rnd.choice(HUGE))
        elif kind == "u32":
            data[pos : pos + 4] = u32(rnd.choice(ODD_U32))
        elif kind == "insert":
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        elif kind == "delete":
            del data[pos : pos + rnd.randint(1, 16)]
        else:
            start = rnd.randrange(n)
            data[pos:pos] = data[start : start + rnd.randint(1, 32)]
    return bytes(data), rnd.choice([0, 2, 8, 4096])


def _check(fn, data: bytes):
    """Run fn(); return the header or the GGUFFormatError. Any other exception, 1 s or 64 MiB fails the test."""
    tracemalloc.start()  # traced only while fn runs: hypothesis's own allocations stay out (and fast)
    start = time.perf_counter()
    try:
        result = fn()
    except GGUFFormatError as exc:
        result = exc
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if isinstance(result, GGUFFormatError):
        assert type(result) is GGUFFormatError
        assert "internal parser error" not in str(result), str(result)
        assert result.offset is None or 0 <= result.offset <= len(data), str(result)
    assert elapsed < MAX_SECONDS, f"{elapsed:.2f} s on {data[:64]!r}..."
    assert peak < MAX_BYTES, f"{peak} bytes on {data[:64]!r}..."
    return result


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_seeds_are_valid():
    for seed in SEEDS:
        parse_header(seed)


def test_mutated_headers_raise_only_gguf_format_errors():
    runs = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=10_000)
    @given(mutated())
    def run(case):
        data, max_array_len = case
        result = _check(lambda: parse_header(data, max_array_len=max_array_len), data)
        runs["error" if isinstance(result, GGUFFormatError) else "ok"] += 1

    run()
    assert runs["ok"] + runs["error"] >= 10_000
    assert runs["ok"] > 100 and runs["error"] > 5_000  # both paths were exercised


def test_mutated_files_read_in_tiny_chunks_agree_with_parse_header(tmp_path, monkeypatch):
    # tiny read-ahead: every window refill and seek-past-the-window path of _Reader is hit
    monkeypatch.setattr(gs.FileSource, "first_chunk", 8)
    monkeypatch.setattr(gs.FileSource, "chunk_max", 64)
    path = tmp_path / "m.gguf"

    @settings(FUZZ, max_examples=3_000)
    @given(mutated())
    def run(case):
        data, max_array_len = case
        path.write_bytes(data)
        result = _check(lambda: read_header(path, max_array_len=max_array_len), data)
        if not isinstance(result, GGUFFormatError):
            pure = parse_header(data, max_array_len=max_array_len)
            # repr: mutated floats may be NaN, which never equals itself
            assert repr(result.metadata) == repr(pure.metadata)
            assert (result.tensors, result.data_offset) == (pure.tensors, pure.data_offset)

    run()
