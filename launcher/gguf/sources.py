"""Where GGUF header bytes come from: local files, split sets, and HTTP Range requests; `read_header` and `read_prefix`.

- `open_local(path)`: a file, read in growing chunks (256 KiB, doubling up to 16 MiB).
- `open_remote(url, client=...)`: a `RangeSource` over one URL through `launcher.http`: Range requests of at most
  1 MiB (64 KiB first), redirects followed and the redirected URL reused, transient failures retried, one
  streamed body read instead when the server ignores Range. Credentials are the caller's: the client's own, or
  `auth` (a `launcher.http.BearerAuth`) for each request; a redirected URL on another host gets none of them.
- Split sets (`name-00001-of-00003.gguf`, any shard given) are expanded by `shard_locations` and read whole:
  metadata from shard 1, tensors from all, every shard's split.* keys checked against the others.
- Raw byte splits (`name.gguf.part1of3`, any part given; mradermacher publishes its largest files this way) are
  one GGUF cut into pieces: `part_locations` expands them, and `PartsSource` reads the parts one after another as
  that one file (the header is in part 1, and is read on into part 2 if it is longer). The size of every part is
  asked for (a one-byte read of each remote part), so a missing part is an error that names it.

Both kinds of source feed one parser, `launcher.gguf.header.parse_source`. Every failure is a GGUFFormatError
that names the source without query string or user info (`launcher.http.redact_url`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher import http
from launcher.errors import GGUFFormatError
from launcher.gguf.header import GGUFHeader, ParsedHeader, parse_source

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

__all__ = [
    "FileSource",
    "PartName",
    "PartsSource",
    "RangeSource",
    "open_local",
    "open_remote",
    "parse_part",
    "part_locations",
    "read_header",
    "read_prefix",
    "shard_locations",
]

_SHARD_RE = re.compile(r"^(.*?)-(\d{5})-of-(\d{5})\.gguf$")
# `x.gguf.part2of3`: unpadded numbers (as published), at most 999 parts
_PART_RE = re.compile(r"^(.+\.[gG][gG][uU][fF])\.part([1-9]\d{0,2})of([1-9]\d{0,2})$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)

# Read-ahead: the first read, and the cap each later read doubles up to (for HTTP: each Range request's size).
_HTTP_FIRST_CHUNK = 64 * 1024
_HTTP_CHUNK_MAX = 1024 * 1024
_FILE_FIRST_CHUNK = 256 * 1024
_FILE_CHUNK_MAX = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Local files


class FileSource:
    """The bytes of one local file (`label`: "shard 2 of 3: " in messages)."""

    first_chunk = _FILE_FIRST_CHUNK
    chunk_max = _FILE_CHUNK_MAX

    def __init__(self, path: str, *, label: str = "") -> None:
        self.shown = path
        self.label = label
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
            self.size: int | None = os.fstat(self.file.fileno()).st_size
        except OSError as exc:
            what = label.split(" ", 1)[0]  # "shard" or "part"
            missing = f" (missing {what})" if label and isinstance(exc, FileNotFoundError) else ""
            raise GGUFFormatError(f"{label}open: {exc.strerror or exc}{missing}", source=path) from None

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


def open_local(path: str | os.PathLike[str], *, label: str = "") -> FileSource:
    """A local file as a header source; raises GGUFFormatError when it cannot be opened."""
    return FileSource(os.fsdecode(path), label=label)


# ---------------------------------------------------------------------------------------------------------------
# HTTP ranges


class RangeSource:
    """Reads byte ranges of one URL; switches to reading one streamed body if the server ignores Range."""

    first_chunk = _HTTP_FIRST_CHUNK
    chunk_max = _HTTP_CHUNK_MAX

    def __init__(self, url: str, *, client: httpx.Client, auth: http.BearerAuth | None = None, label: str = "") -> None:
        from urllib.parse import urlsplit

        self.label = label
        self.url = url  # becomes the redirected URL after the first answer
        self.given_url = url
        self.client = client
        self.auth = auth
        self.shown = http.redact_url(url)
        self.size: int | None = None
        self.host = urlsplit(url).hostname
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
            want = min(n - len(out), self.chunk_max)
            part = self._range(start, want)
            if part is None:  # the server ignored Range; read on from its streamed body
                continue
            out += part
            if len(part) < want:
                break
        return bytes(out)

    def _scrub(self, text: str) -> str:
        return http.scrub(text, urls=(self.url, self.given_url))

    def _range(self, start: int, length: int) -> bytes | None:
        what = f"{self.label}read bytes {start}-{start + length - 1}"

        def error(failure: http.HttpFailure) -> GGUFFormatError:
            tries = failure.tries if failure.transient else ""
            return GGUFFormatError(f"{what}: {self._scrub(failure.text)}{tries}", source=self.shown)

        return http.call(lambda: self._range_once(start, length), error=error)

    def _range_once(self, start: int, length: int) -> bytes | None:
        import httpx

        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        request = self.client.build_request("GET", self.url, headers=headers)
        if request.url.host != self.host:  # a redirected (CDN) URL: never send it the origin's credentials
            request.headers.pop("Authorization", None)
        auth = httpx.USE_CLIENT_DEFAULT if self.auth is None else self.auth
        response = self.client.send(request, stream=True, follow_redirects=True, auth=auth)
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
            raise http.status_failure(response)
        finally:
            if not keep_open:
                response.close()

    def _read_partial(self, response: httpx.Response, start: int, length: int) -> bytes:
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if m is None or m[1] is None:
            raise http.HttpFailure(
                f"206 response without a valid Content-Range ({response.headers.get('Content-Range')!r})",
                kind="body",
                transient=False,
            )
        first, last = int(m[1]), int(m[2])
        if first != start or last < first:
            raise http.HttpFailure(
                f"server sent bytes {first}-{last} for a request of bytes {start}-{start + length - 1}",
                kind="body",
                transient=False,
            )
        if m[3] != "*":
            self.size = int(m[3])
        expected = min(last - first + 1, length)
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= expected:
                break
        if len(data) < expected:
            raise http.HttpFailure(f"body ended after {len(data)} of {expected} bytes", kind="body", transient=True)
        return bytes(data[:expected])

    def _stream_read(self, offset: int, n: int) -> bytes:
        assert self.stream_iter is not None
        stream_iter = self.stream_iter
        if offset < self.stream_pos:
            raise GGUFFormatError(
                f"{self.label}read bytes from {offset}: the stream is already past them", source=self.shown
            )
        buf = bytearray(self.stream_buf)

        def read_on() -> None:
            while self.stream_pos + len(buf) < offset + n:
                chunk = next(stream_iter, None)
                if chunk is None:
                    break
                buf.extend(chunk)
                # drop what lies before `offset` as it arrives, so memory stays bounded
                if self.stream_pos + len(buf) <= offset:
                    self.stream_pos += len(buf)
                    buf.clear()

        def error(failure: http.HttpFailure) -> GGUFFormatError:
            message = f"{self.label}read bytes from {offset}: {self._scrub(failure.text)}"
            return GGUFFormatError(message, source=self.shown)

        http.call(read_on, error=error, retry=False)  # a stream cannot be asked again from where it broke
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


def open_remote(url: str, *, client: httpx.Client, auth: http.BearerAuth | None = None, label: str = "") -> RangeSource:
    """An http(s) URL as a header source, read through `client` (and `auth` for each request, when given)."""
    return RangeSource(url, client=client, auth=auth, label=label)


# ---------------------------------------------------------------------------------------------------------------
# Raw byte splits


@dataclass(frozen=True)
class PartName:
    """A raw byte split's file name, `{joined}.part{index}of{total}` (`x.Q8_0.gguf.part1of2`): the parts, joined
    in order, are the GGUF file `joined`; no part but the first is a GGUF on its own."""

    joined: str
    index: int
    total: int

    def name(self, index: int) -> str:
        """The name of part `index` (1-based) of the same split."""
        return f"{self.joined}.part{index}of{self.total}"


def parse_part(name: str) -> PartName | None:
    """The raw-split parts of a file name (`x.gguf.part1of2`; folders ignored), or None when it is not a part name
    (fewer than 2 parts, a part number past the count, zero-padded numbers or more than 999 parts)."""
    m = _PART_RE.match(name.replace("\\", "/").rsplit("/", 1)[-1])
    if m is None:
        return None
    index, total = int(m[2]), int(m[3])
    if total < 2 or index > total:
        return None
    return PartName(m[1], index, total)


class PartsSource:
    """The parts of a raw split read as the one file they make, one after another; each part is a FileSource or
    a RangeSource labelled "part 2 of 3: " for messages. A part's size must be known to read past it."""

    def __init__(self, parts: list[FileSource | RangeSource]) -> None:
        self.parts = parts
        first = parts[0]
        self.shown = first.shown
        self.first_chunk = first.first_chunk
        self.chunk_max = first.chunk_max

    @property
    def size(self) -> int | None:
        """The joined size: every part's, asked for with a one-byte read where not known yet."""
        total = 0
        for part in self.parts:
            if part.size is None:
                part.fetch(0, 1)  # the answer says how long the part is (Content-Range)
            if part.size is None:
                return None
            total += part.size
        return total

    def fetch(self, offset: int, n: int) -> bytes:
        out = bytearray()
        start = 0  # where `part` starts in the joined file
        for part in self.parts:
            if len(out) == n:
                break
            pos = offset + len(out)
            if part.size is None or pos < start + part.size:
                want = n - len(out) if part.size is None else min(n - len(out), start + part.size - pos)
                data = part.fetch(pos - start, want)
                out += data
                if len(out) == n:
                    break
                if part.size is None:
                    raise GGUFFormatError(
                        f"{part.label}read: the server does not say how long this part is, so the next part "
                        "cannot be read after it",
                        source=part.shown,
                    )
                if pos + len(data) < start + part.size:
                    break  # the part ends before its size: the joined file ends here (the parser says where)
            start += part.size
        return bytes(out)

    def close(self) -> None:
        for part in self.parts:
            part.close()


# ---------------------------------------------------------------------------------------------------------------
# Split sets and the entry points


def _sibling_names(loc: str) -> tuple[str, Callable[[str], str]]:
    """The file name `loc` (a path or a URL) ends in, and a function giving the same location with another name."""
    if http.is_url(loc):
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(loc)
        except ValueError as exc:
            raise GGUFFormatError(f"read header: invalid URL ({exc})", source=http.redact_url(loc)) from None
        head, _, name = parts.path.rpartition("/")
        return name, lambda other: urlunsplit(parts._replace(path=f"{head}/{other}"))
    head, name = os.path.split(loc)
    return name, lambda other: os.path.join(head, other)


def shard_locations(loc: str) -> list[str]:
    """Every shard of the split set `loc` belongs to (`x-00002-of-00003.gguf` -> shards 1 to 3), else [loc]."""
    name, sibling = _sibling_names(loc)
    m = _SHARD_RE.match(name)
    if m is None:
        return [loc]
    prefix, idx, total = m[1], int(m[2]), int(m[3])
    if total == 0 or idx == 0 or idx > total:
        raise GGUFFormatError(f"read split set: shard number {idx} of {total} is invalid", source=http.redact_url(loc))
    return [sibling(f"{prefix}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def part_locations(loc: str) -> list[str]:
    """Every part of the raw split `loc` belongs to (`x.gguf.part2of3` -> parts 1 to 3), else [loc]."""
    name, sibling = _sibling_names(loc)
    part = parse_part(name)
    if part is None:
        return [loc]
    return [sibling(part.name(i)) for i in range(1, part.total + 1)]


_Opener = Callable[[str, str], FileSource | RangeSource]  # (location, label) -> an open source


def read_header(
    source: str | os.PathLike[str],
    *,
    client: httpx.Client | None = None,
    auth: http.BearerAuth | None = None,
    max_array_len: int = 4096,
    max_header_bytes: int = 256 * 1024**2,
) -> GGUFHeader:
    """Read the GGUF header of a local file or an http(s) URL, reading only header bytes.

    Split sets (`name-00001-of-00003.gguf`, any shard given) are read whole: metadata from shard 1, tensors
    from all. A raw byte split (`name.gguf.part1of3`, any part given) is read as the one file its parts make.
    URLs are read with Range requests (redirects followed, network errors retried) through `client` or a
    private `launcher.http.make_client()`; `auth` (e.g. `launcher.http.hf_auth()`) is sent with them, to its
    own host only.
    """
    loc = os.fsdecode(source)
    parts = part_locations(loc)
    shards = shard_locations(loc) if len(parts) == 1 else []

    def read(opener: _Opener) -> GGUFHeader:
        if len(parts) > 1:
            return _read_parts(parts, opener, max_array_len, max_header_bytes)
        return _read_set(shards, opener, max_array_len, max_header_bytes)

    if not http.is_url(loc):
        return read(lambda x, label: FileSource(x, label=label))
    own = client is None
    session = http.make_client() if client is None else client
    try:
        return read(lambda x, label: RangeSource(x, client=session, auth=auth, label=label))
    finally:
        if own:
            session.close()


def _open_parts(locations: list[str], opener: _Opener) -> PartsSource:
    n = len(locations)
    parts: list[FileSource | RangeSource] = []
    try:
        for i, loc in enumerate(locations):
            parts.append(opener(loc, f"part {i + 1} of {n}: "))
    except GGUFFormatError:
        for part in parts:
            part.close()
        raise
    return PartsSource(parts)


def _read_parts(locations: list[str], opener: _Opener, max_array_len: int, max_header_bytes: int) -> GGUFHeader:
    """The header of the one GGUF file a raw split's parts make (`locations`: every part, in order)."""
    src = _open_parts(locations, opener)
    shown = src.shown
    parsed, size = _read_one(src, max_array_len, max_header_bytes, 0, "")
    _check_first_shard(parsed.metadata, 1, shown)
    return GGUFHeader(
        source=shown,
        version=parsed.version,
        metadata=parsed.metadata,
        tensors=tuple(parsed.tensors),
        alignment=parsed.alignment,
        data_offset=parsed.data_offset,
        file_size=size,
        shards=(shown,),
        shard_data_offsets=(parsed.data_offset,),
        shard_sizes=(size,),
        part_sizes=tuple(part.size for part in src.parts),
    )


def _read_set(locations: list[str], opener: _Opener, max_array_len: int, max_header_bytes: int) -> GGUFHeader:
    shown = [http.redact_url(x) for x in locations]
    n = len(locations)
    label = f"shard 1 of {n}: " if n > 1 else ""
    first, first_size = _read_one(opener(locations[0], label), max_array_len, max_header_bytes, 0, label)
    meta = first.metadata
    _check_first_shard(meta, n, shown[0])

    tensors = list(first.tensors)
    sizes: list[int | None] = [first_size]
    offsets = [first.data_offset]
    seen = {t.name for t in tensors}
    for i in range(1, n):
        label = f"shard {i + 1} of {n}: "
        part, size = _read_one(opener(locations[i], label), max_array_len, max_header_bytes, i, label)
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


def _check_first_shard(meta: dict[str, Any], n: int, shown: str) -> None:
    """The first file's split.* keys agree with the `n` shards its name announces."""
    split_count = meta.get("split.count")
    if split_count is not None and (not isinstance(split_count, int) or isinstance(split_count, bool)):
        raise GGUFFormatError(f"read split set: split.count is {split_count!r}, not an integer", source=shown)
    if n > 1 and split_count is None:
        raise GGUFFormatError(f"read split set: the file name says {n} shards but split.count is missing", source=shown)
    if n > 1 and split_count != n:
        raise GGUFFormatError(
            f"read split set: split.count is {split_count} but the file name says {n} shards", source=shown
        )
    if n == 1 and split_count is not None and split_count > 1:
        raise GGUFFormatError(
            f"read split set: split.count is {split_count} but the file name does not end in "
            f"-00001-of-{split_count:05d}.gguf",
            source=shown,
        )
    if n > 1 and meta.get("split.no", 0) != 0:
        raise GGUFFormatError(f"read split set: split.no is {meta['split.no']}, expected 0", source=shown)


def _read_one(
    src: FileSource | RangeSource | PartsSource, max_array_len: int, max_header_bytes: int, shard: int, label: str
) -> tuple[ParsedHeader, int | None]:
    try:
        parsed = parse_source(
            src,
            shown=src.shown,
            first_chunk=src.first_chunk,
            chunk_max=src.chunk_max,
            max_array_len=max_array_len,
            max_header_bytes=max_header_bytes,
            shard=shard,
            label=label,
        )
        return parsed, src.size
    finally:
        src.close()


def read_prefix(
    source: str | os.PathLike[str],
    n_bytes: int,
    *,
    client: httpx.Client | None = None,
    auth: http.BearerAuth | None = None,
) -> bytes:
    """The first `n_bytes` of a local file or an http(s) URL (Range requests): a header without tensor data.

    `client` and `auth` as for `read_header`. Raises GGUFFormatError when the source cannot be read or is
    shorter than `n_bytes`.
    """
    loc = os.fspath(source)
    shown = http.redact_url(loc)
    session: httpx.Client | None = None
    opener: _Opener
    if http.is_url(loc):
        if client is None:
            session = client = http.make_client()
        remote = client
        opener = lambda x, label: RangeSource(x, client=remote, auth=auth, label=label)  # noqa: E731
    else:
        opener = lambda x, label: FileSource(x, label=label)  # noqa: E731
    parts = part_locations(loc)
    src = _open_parts(parts, opener) if len(parts) > 1 else opener(loc, "")
    try:
        data = src.fetch(0, n_bytes)
    finally:
        src.close()
        if session is not None:
            session.close()
    if len(data) < n_bytes:
        raise GGUFFormatError(f"read header bytes: got {len(data)} of {n_bytes}", source=shown)
    return data
