"""A GGUF file at an http(s) URL as a catalog source: one candidate, its header read with Range requests.

`launcher.gguf.read_header` reads the header bytes only (given any shard of a split set it reads the whole set,
from sibling URLs; given any part of a raw byte split, `x.gguf.part1of2`, the one file its parts make: the
candidate's files are then the parts, `raw_split`). The label comes from the URL's path (`labels.quant_label`:
the file name, else a folder), else from the header's `general.file_type`. A file's size is the one the server
gave (Content-Range or Content-Length), else the header's: where the tensor data starts plus the bytes of its
tensors. URLs are kept as `launcher.http.redact_url` shows them (no query string, no user info), so a candidate
holds no credentials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from launcher.catalog import labels
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.quants import file_type_label

if TYPE_CHECKING:
    import httpx

    from launcher.gguf import GGUFHeader

__all__ = ["SOURCE", "list_candidates"]

SOURCE = "url"


def _path(url: str) -> str:
    try:
        return unquote(urlsplit(url).path)
    except ValueError:
        return ""


def list_candidates(url: str, *, model: str | None = None, client: httpx.Client | None = None) -> list[Candidate]:
    """The one candidate of the GGUF at `url` (any shard of a split set gives the whole set).

    `model` is the reference to name in messages (default: `url`). Raises CatalogError (one line) when the header
    cannot be read or the file is a vision projector.
    """
    from launcher.gguf import read_header
    from launcher.http import hf_auth

    shown = model if model is not None else url
    path = _path(url)
    name = path.rsplit("/", 1)[-1]
    if labels.is_projector_name(name):
        raise CatalogError(f"{shown}: {name} is a vision projector (mmproj), not a model")
    try:
        header = read_header(url, client=client, auth=hf_auth())  # HF_TOKEN: to the Hub's host only
    except GGUFFormatError as exc:
        raise CatalogError(f"{shown}: {exc}") from None
    if labels.is_projector_header(header):
        raise CatalogError(f"{shown}: {name} is a vision projector (mmproj), not a model")
    label = labels.quant_label(path) or file_type_label(header.get("general.file_type"))
    raw = bool(header.part_sizes)
    return [
        Candidate(
            model=shown,
            source=SOURCE,
            quant=label or "unknown",
            files=_parts(header) if raw else tuple(_file(header, i) for i in range(len(header.shards))),
            header=header,
            raw_split=raw,
        )
    ]


def _parts(header: GGUFHeader) -> tuple[CandidateFile, ...]:
    """The parts of a raw byte split: their URLs from part 1's, their sizes as their servers said."""
    from launcher.gguf import part_locations

    urls = part_locations(header.source)
    return tuple(
        CandidateFile(name=_path(url).rsplit("/", 1)[-1], size_bytes=size or 0, url=url)
        for url, size in zip(urls, header.part_sizes, strict=True)
    )


def _file(header: GGUFHeader, shard: int) -> CandidateFile:
    url = header.shards[shard]
    size = header.shard_sizes[shard] if shard < len(header.shard_sizes) else None
    if size is None:  # the server did not say: the header's data offset plus its tensors' bytes
        offset = header.shard_data_offsets[shard] if shard < len(header.shard_data_offsets) else header.data_offset
        size = offset + sum(t.n_bytes for t in header.tensors if t.shard == shard)
    return CandidateFile(name=_path(url).rsplit("/", 1)[-1], size_bytes=size, url=url)
