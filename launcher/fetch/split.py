"""Raw byte splits (`x.Q8_0.gguf.part1of2`, ... as mradermacher publishes its largest quants): every part fetched
and checked against its own sha256, then joined, in order, into one file in fitquant's cache,
`cache_dir()/joined/<key of the parts>/<safe name>` (written to `<name>.joining`, renamed into place once complete
and of the summed size; a `.verified` marker holds the key). The key is made of the parts' published sha256 (else
their path, size and mtime once here), so a joined file is only ever used for the very parts it was made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import FetchError
from launcher.fetch.download import Bar, lock
from launcher.fetch.job import CHUNK_BYTES, Job, bar_label, published_sha
from launcher.fetch.markers import mark, marked
from launcher.paths import cache_dir, inside, open_private, private_dir, safe_basename


def check_parts(c: Candidate, shown: str) -> None:
    """A raw split's files are parts 1 to N of one name, in order; else FetchError naming the first part missing."""
    from launcher.gguf import parse_part

    first = parse_part(c.files[0].name)
    if first is None:
        raise FetchError(f"{shown}: {c.files[0].name} is not a part of a raw split (name.gguf.part1of2, ...)")
    have = [f.name.rpartition("/")[2] for f in c.files]
    wanted = [first.name(i) for i in range(1, first.total + 1)]
    for name in wanted:
        if name not in have:
            raise FetchError(f"{shown}: {name} is missing: a raw split is joined from every part")
    if have != wanted:
        raise FetchError(f"{shown}: the parts of {first.joined} are not listed once each, in order: {', '.join(have)}")


def join_job(c: Candidate, parts: list[Job]) -> Job:
    """The joined file of a raw split: named and sized after its parts, placed (and done) when their key is known."""
    from launcher.gguf import parse_part

    first = c.files[0].name
    part = parse_part(first)
    assert part is not None  # check_parts
    folder = first.rpartition("/")[0]
    name = f"{folder}/{part.joined}" if folder else part.joined
    joined = CandidateFile(name=name, size_bytes=sum(f.size_bytes for f in c.files))
    job = Job(joined, f"{part.joined} (joined from {len(parts)} parts)", "join")
    join_place(job, parts)
    return job


def join_place(job: Job, parts: list[Job]) -> None:
    """Set where the joined file goes (by the key of its parts) and whether it is there already, verified; before
    the key is known, a stand-in path in the same folder (for the disk-space check)."""
    job.join_key = _parts_key(parts)
    leaf = safe_basename(job.file.name.rpartition("/")[2], default="joined.gguf")
    try:
        if job.join_key is None:
            job.path, job.missing = inside(cache_dir() / "joined", leaf), job.file.size_bytes
            return
        job.path = inside(cache_dir() / "joined" / job.join_key, leaf)
    except ValueError as exc:
        raise FetchError(f"{job.what}: refused as a file name: {exc}") from None
    if marked(job.path, job.join_key):
        job.done, job.result, job.missing = True, job.path, 0
    else:
        job.missing = job.file.size_bytes


def _parts_key(parts: list[Job]) -> str | None:
    """What the joined file is made of: each part's published sha256, else its path, size and mtime once it is
    here; None while a part without a hash is not here yet."""
    ids = []
    for j in parts:
        sha = published_sha(j.file)
        if sha is None:
            if j.result is None:
                return None
            try:
                st = j.result.stat()
            except OSError:
                return None
            sha = f"{j.result.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        ids.append(sha)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


def join(job: Job, parts: list[Path], shown: str, progress: bool, *, stalled_s: float) -> Path:
    """Concatenate `parts` (each verified) into the job's file: written to `<name>.joining`, renamed into place once
    complete and of the summed size, then marked with the parts' key."""
    assert job.path is not None and job.join_key is not None
    target = job.path
    joining = target.with_name(target.name + ".joining")
    try:
        private_dir(target.parent)
    except OSError as exc:
        raise FetchError(f"{shown}: cannot create {target.parent}: {exc.strerror or exc}") from None
    size = job.file.size_bytes
    with lock(target, shown, job.what, growing=joining, expected=size or None, progress=progress, stalled_s=stalled_s):
        if marked(target, job.join_key):
            return target  # another run joined them meanwhile
        bar = Bar(progress, f"join {bar_label(job)}", size or None, 0)
        written = 0
        try:
            with os.fdopen(open_private(joining, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while chunk := src.read(CHUNK_BYTES):
                            out.write(chunk)
                            written += len(chunk)
                            bar.update(written)
            if written != size:
                raise FetchError(
                    f"{shown}: {job.what}: the parts hold {written} bytes, {size} were listed; nothing was joined"
                )
            os.replace(joining, target)
        except OSError as exc:
            raise FetchError(f"{shown}: cannot join the parts into {target}: {exc.strerror or exc}") from None
        finally:
            bar.close()
            with contextlib.suppress(OSError):
                joining.unlink()  # what is left of a failed join (after the rename there is nothing)
        mark(target, job.join_key)
    return target
