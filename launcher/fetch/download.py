"""fitquant's own downloader (Ollama registry blobs, plain URLs): resumable, verified, one writer per file.

Files go to `cache_dir()/blobs/sha256-<hex>` (content with a published sha256), else (no hash, or a split set,
whose shards llama.cpp finds by name) to `cache_dir()/downloads/<hash of the URL's folder>/<safe file name>`.
Bytes go to `<target>.partial` (0600, never through a symlink), hashed while they are written; a partial left by
an earlier run is hashed first and resumed with `Range: bytes=N-` (a 200 answer starts over, a 416 means it was
complete). A body that ends before the size known from the server, the listing or the header is resumed by the
retry policy; one that is still short keeps its `.partial` and is never renamed into place or marked. Without a
known size and without a sha256 a download cannot be told from a cut one: it is not used. A second fitquant that
wants the same file waits for the first (showing its progress) while its partial grows, then uses the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import FetchError
from launcher.fetch.job import Job, bar_label, file_size, gib, mismatch
from launcher.fetch.markers import check, hash_file, mark, unmark
from launcher.http import HttpFailure, hf_auth, redact_url, retrying, status_failure
from launcher.http import timeout as http_timeout
from launcher.paths import cache_dir, inside, open_private, private_dir, safe_basename

if TYPE_CHECKING:
    import httpx

READ_TIMEOUT_S = 30.0  # a stream that sends nothing for this long is cut off (and resumed by a retry)
MAX_ROUNDS = 1000  # rounds of retries that each brought more bytes: a bound, not a limit a real download meets
WAIT_STALLED_S = 300.0  # waiting for another fitquant's download: given up once its file stops growing this long
LOCK_POLL_S = 0.2

_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def download_target(url: str, sha256: str | None, *, split: bool = False) -> Path:
    """Where fitquant's own downloader puts the file at `url`: `cache_dir()/blobs/sha256-<hex>` for content with a
    published sha256, else (or for a shard of a split set, which llama.cpp finds by its name)
    `cache_dir()/downloads/<sha256 of the URL's folder, 16 hex>/<safe file name>`; always inside the cache
    (`launcher.paths.safe_basename`, `inside`), else FetchError."""
    try:
        return target_for(url, sha256, split=split)
    except ValueError as exc:
        raise FetchError(f"{redact_url(url)}: refused as a download target: {exc}") from None


def target_for(url: str, sha256: str | None, *, split: bool = False) -> Path:
    """`download_target`, raising ValueError (what was refused) for the caller to put in its own words."""
    if sha256 and not split:
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"{sha256!r} is not a sha256")
        return inside(cache_dir() / "blobs", f"sha256-{sha256}")
    shown = redact_url(url)
    folder, _, name = shown.rpartition("/")
    key = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return inside(cache_dir() / "downloads" / key, safe_basename(name))


def partial_of(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def finished(job: Job, shown: str) -> bool:
    """Whether the job's target is there and complete (its sha256 checked, else its size against the known one);
    a corrupt one is removed, a short one (an older fitquant accepted cut downloads) becomes the partial again."""
    assert job.path is not None
    target = job.path
    if target.is_symlink():
        raise FetchError(f"{shown}: {job.what}: {target} is a symbolic link; fitquant does not follow one in its cache")
    if not target.is_file():
        return False
    if job.sha256 is None:
        expected = job.file.size_bytes
        if expected and file_size(target) < expected:
            unmark(target)
            with contextlib.suppress(OSError):
                os.replace(target, partial_of(target))  # resumed from where it was cut
            return False
        return True
    try:
        got = check(target, job.sha256)
    except OSError as exc:
        raise FetchError(f"{shown}: {job.what}: cannot read {target}: {exc.strerror or exc}") from None
    if got is None:
        return True
    unmark(target)
    with contextlib.suppress(OSError):
        target.unlink()  # not what it should be: download it again
    return False


def http_plan(job: Job, shown: str) -> None:
    """A finished target is reused (verified once); a corrupt one is removed. Counts the bytes still missing."""
    assert job.path is not None
    if finished(job, shown):
        job.done, job.result = True, job.path
        return
    job.missing = max(job.file.size_bytes - file_size(partial_of(job.path)), 0)


@dataclass
class _State:
    """The bytes of the partial file hashed so far (kept across attempts, so a retry does not hash them again)."""

    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0
    total: int | None = None  # the file's size as the server said

    def restart(self) -> None:
        self.hasher, self.hashed = hashlib.sha256(), 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None for what it does not say."""
    m = _CONTENT_RANGE_RE.match((value or "").strip())
    if m is None:
        return None, None
    first = int(m[1]) if m[1] is not None else None
    total = int(m[3]) if m[3] != "*" else None
    return first, total


class Bar:
    """A rich progress bar on stderr (bytes, speed, ETA), or nothing."""

    def __init__(self, enabled: bool, label: str, total: int | None, done: int) -> None:
        self.progress: Any = None
        self.task: Any = None
        if not enabled:
            return
        self.progress = download_progress()
        self.task = self.progress.add_task(label, total=total or None, completed=done)
        self.progress.start()

    def update(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _attempt(client: httpx.Client, job: Job, partial: Path, state: _State, bar: Bar) -> None:
    """One GET of what is missing, appended to `partial` and hashed; raises HttpFailure (inside translate())."""
    have = file_size(partial)
    if have != state.hashed:  # what is on disk is what counts: hash it (once per run)
        state.restart()
        if have:
            hash_file(partial, state.hasher)
            state.hashed = have
    size = job.file.size_bytes
    if job.sha256 is not None and size and have >= size:
        if have == size:
            return  # complete: the caller checks the hash
        partial.unlink()  # longer than the file: not it
        state.restart()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    auth = hf_auth() if job.auth else None
    with client.stream(
        "GET", job.url, headers=headers, auth=auth, timeout=http_timeout(READ_TIMEOUT_S), follow_redirects=True
    ) as response:
        status = response.status_code
        if status == 416 and have:
            _, total = _content_range(response.headers.get("Content-Range"))
            if total == have:
                state.total = total
                return  # the partial holds the whole file
            partial.unlink()
            state.restart()
            raise HttpFailure("the server refused to resume (HTTP 416); starting over", kind="status", transient=True)
        if status == 206 and have:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != have:
                partial.unlink()
                state.restart()
                raise HttpFailure(
                    f"the server resumed at byte {first}, not {have}; starting over", kind="body", transient=True
                )
            flags = os.O_APPEND
        elif status == 200:
            first, total = 0, None
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and "Content-Encoding" not in response.headers:
                total = int(length)
            flags = os.O_TRUNC  # a whole answer: from the start (also when the server ignored the Range)
            state.restart()
            have = 0
        else:
            raise status_failure(response)
        if total is not None and job.sha256 is not None and size and total != size:
            raise HttpFailure(
                f"the server has {total} bytes, the listing said {size}: not the listed file",
                kind="body",
                transient=False,
            )
        state.total = total
        bar.update(have)
        with os.fdopen(open_private(partial, os.O_WRONLY | os.O_CREAT | flags), "wb") as out:
            # pieces as they arrive: a chunker would hold back (and lose, on a cut) up to CHUNK_BYTES
            for chunk in response.iter_bytes():
                out.write(chunk)
                state.hasher.update(chunk)
                state.hashed += len(chunk)
                bar.update(state.hashed)
        # a body may end early with no Content-Length to say so: the listing's (or header's) size does
        expected = total if total is not None else (size or None)
        if expected is not None and state.hashed < expected:
            raise HttpFailure(
                f"the answer ended after {state.hashed} of {expected} bytes", kind="cut_short", transient=True
            )


def http_download(job: Job, client: httpx.Client, shown: str, progress: bool, *, stalled_s: float) -> Path:
    assert job.path is not None
    target = job.path
    partial = partial_of(target)
    where = redact_url(job.url)
    try:
        private_dir(target.parent)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {target.parent}: {exc.strerror or exc}") from None
    state = _State()
    expected_size = job.file.size_bytes or None
    with lock(target, shown, job.what, growing=partial, expected=expected_size, progress=progress, stalled_s=stalled_s):
        if finished(job, shown):
            return target  # another fitquant finished it while this one waited
        bar = Bar(progress, bar_label(job), expected_size, file_size(partial))
        try:
            _rounds(client, job, partial, state, bar, shown, where)
        finally:
            bar.close()
        got = file_size(partial)
        expected = state.total if state.total is not None else expected_size
        if expected is not None and got < expected:  # never renamed into place, never marked
            raise FetchError(
                f"{shown}: cannot download {job.what} from {where}: it ended after {got} of {expected} bytes; "
                f"{gib(got)} kept in {partial}: run again to resume"
            )
        if job.sha256 is not None:
            digest = state.hasher.hexdigest()
            if digest != job.sha256:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise mismatch(shown, job.what, job.sha256, digest)
        elif expected is None:
            raise FetchError(
                f"{shown}: cannot download {job.what} from {where}: the server sent {got} bytes without saying how "
                f"many there are and no sha256 is published, so a cut download cannot be told from a complete one; "
                f"not used (kept in {partial})"
            )
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise FetchError(f"{shown}: cannot move {partial} into place: {exc.strerror or exc}") from None
        mark(target, job.sha256)
    return target


def _rounds(client: httpx.Client, job: Job, partial: Path, state: _State, bar: Bar, shown: str, where: str) -> None:
    """`_attempt` under launcher.http's retry policy, again while each round brings more bytes (bounded)."""
    rounds = 0
    while True:
        before = file_size(partial)
        try:
            retrying(lambda: _attempt(client, job, partial, state, bar))
            return
        except HttpFailure as failure:
            got = file_size(partial)
            rounds += 1
            if failure.transient and got > before and rounds < MAX_ROUNDS:
                continue
            raise FetchError(_http_failure(shown, job, where, failure, got, state)) from None
        except OSError as exc:
            raise FetchError(f"{shown}: {job.what}: cannot write {partial}: {exc.strerror or exc}") from None


def _http_failure(shown: str, job: Job, where: str, failure: HttpFailure, got: int, state: _State) -> str:
    text = f"{shown}: cannot download {job.what} from {where}: {failure.text}{failure.tries}"
    if got > 0 and failure.transient:
        total = state.total or job.file.size_bytes
        of = f" of {gib(total)}" if total else ""
        text += f"; {gib(got)}{of} kept in {partial_of(job.path or Path())}: run again to resume"
    return text


# ---------------------------------------------------------------------------------------------------------------
# One writer per file


@contextlib.contextmanager
def lock(
    target: Path, shown: str, what: str, *, growing: Path, expected: int | None, progress: bool, stalled_s: float
) -> Iterator[None]:
    """An exclusive lock on `<target>.lock` (where fcntl exists), so two runs never write one file. When another
    fitquant holds it, wait (its progress on `growing` shown as a bar when `progress`) while `growing` keeps
    changing; after `stalled_s` without a change, FetchError."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    path = target.with_name(target.name + ".lock")
    try:
        fd = open_private(path, os.O_CREAT | os.O_RDWR)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {path}: {exc.strerror or exc}") from None
    try:
        if not _try_lock(fcntl, fd):
            _wait_for(fcntl, fd, path, shown, what, growing, expected, progress, stalled_s)
        with contextlib.suppress(OSError):  # who holds it, for the messages of the one that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fcntl: Any, fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _wait_for(
    fcntl: Any, fd: int, path: Path, shown: str, what: str, growing: Path, expected: int | None, progress: bool,
    stalled_s: float,
) -> None:  # fmt: skip
    try:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        owner = ""
    who = f"another fitquant process (pid {owner})" if owner.isdigit() else "another fitquant process"
    seen = file_size(growing)
    since = time.monotonic()
    label = growing.name.rsplit(".", 1)[0]
    bar = Bar(progress, f"{label[:36]} (by {who.removeprefix('another ')})", expected, seen)
    try:
        while not _try_lock(fcntl, fd):
            time.sleep(LOCK_POLL_S)
            now = file_size(growing)
            if now != seen:
                seen, since = now, time.monotonic()
                bar.update(now)
            elif time.monotonic() - since > stalled_s:
                raise FetchError(
                    f"{shown}: {what} is being downloaded by {who} ({path}), which wrote nothing for "
                    f"{stalled_s:.0f} s; wait for it to finish or stop it, then run again"
                )
    finally:
        bar.close()


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def download_progress(console: Any = None, *, description: str = "[bold]{task.description}") -> Any:
    """The one download bar (bytes, speed, time left) on stderr, for files and for Ollama's pull stream."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console if console is not None else Console(stderr=True),
    )
