"""GGUF headers: metadata and tensor infos of a local file, a split set or an http(s) URL, never tensor data.

Contract: `read_header(source, *, client=None, auth=None)` returns a `GGUFHeader` (split sets read whole) and
raises only `GGUFFormatError`, whose message starts with the step and names the source and byte offset;
`parse_header(data)` does the same for bytes in memory; `read_prefix(source, n)` gives a header's raw bytes.

- `header`: the parser, pure and hardened against hostile bytes (every count and length bounded by the bytes
  that remain); it reads through a `ByteSource` and knows nothing of files, URLs or credentials.
- `sources`: local files, split-set expansion, raw byte splits (`x.gguf.part1of2`: the parts joined are one
  file, read as one), and HTTP Range reads through `launcher.http`. A URL is read with the caller's client and
  credentials (`auth=launcher.http.hf_auth()` for a gated Hugging Face file).

`gguf_constants` is llama.cpp's `gguf.constants` (the top-level `gguf` package, which this one does not
shadow: imports here are absolute), loaded without numpy.
"""

from __future__ import annotations

from launcher.gguf.header import (
    GGML_TYPE_NAMES,
    GGML_TYPE_SIZES,
    ByteSource,
    GGMLQuantizationType,
    GGUFHeader,
    GGUFValueType,
    ParsedHeader,
    SkippedArray,
    TensorInfo,
    gguf_constants,
    parse_header,
    parse_source,
)
from launcher.gguf.sources import (
    FileSource,
    PartName,
    PartsSource,
    RangeSource,
    open_local,
    open_remote,
    parse_part,
    part_locations,
    read_header,
    read_prefix,
    shard_locations,
)

__all__ = [
    "GGML_TYPE_NAMES",
    "GGML_TYPE_SIZES",
    "ByteSource",
    "FileSource",
    "GGMLQuantizationType",
    "GGUFHeader",
    "GGUFValueType",
    "ParsedHeader",
    "PartName",
    "PartsSource",
    "RangeSource",
    "SkippedArray",
    "TensorInfo",
    "gguf_constants",
    "open_local",
    "open_remote",
    "parse_header",
    "parse_part",
    "parse_source",
    "part_locations",
    "read_header",
    "read_prefix",
    "shard_locations",
]
