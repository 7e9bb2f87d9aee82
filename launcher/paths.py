"""Where fitquant keeps its files: FITQUANT_HOME when set, else the platform's cache/config dirs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path
from urllib.parse import unquote


def fitquant_home() -> Path | None:
    """FITQUANT_HOME, when set (tests and portable installs put everything under it)."""
    value = os.environ.get("FITQUANT_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Cache for assembled models, parsed headers and listings."""
    home = fitquant_home()
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("fitquant"))


def config_dir() -> Path:
    """Machine profiles and settings."""
    home = fitquant_home()
    if home is not None:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir("fitquant"))


def state_dir() -> Path:
    """What fitquant started and what it measured: instance records, server logs, per-machine records."""
    home = fitquant_home()
    if home is not None:
        return home / "state"
    import platformdirs

    return Path(platformdirs.user_state_dir("fitquant"))


# ---------------------------------------------------------------------------------------------------------------
# Names from the network, and files only this user may read
#
# Every name that comes from a URL, a Hugging Face listing, an Ollama manifest or a split set becomes a file name
# through `safe_basename` and a path through `inside`; fitquant's own files in the state and cache directories are
# written by `write_private` / `append_private` (0600, in 0700 folders, never through a symlink).

MAX_NAME_BYTES = 200  # longer names are shortened with a hash (file systems stop at 255 bytes)
_SHARD_TAIL_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$|\.gguf\.part\d+of\d+$|\.[A-Za-z0-9_]{1,16}$")
_UNSAFE_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


def safe_basename(name: str, *, default: str = "download") -> str:
    """`name` as one safe file name: percent-decoded, then its last segment (after `/` or `\\`), control characters
    replaced by `_`, leading dots and spaces dropped (no `..`, no hidden file), `default` when nothing
    is left, and a name over MAX_NAME_BYTES shortened to a prefix, a hash of the whole name and its suffix (kept,
    so the shards of one split set stay siblings by name)."""
    text = unquote(name)
    text = re.split(r"[/\\]", text)[-1]
    text = _UNSAFE_CHARS_RE.sub("_", text).lstrip(". ").rstrip(" ")
    if not text:
        return default
    if len(text.encode()) <= MAX_NAME_BYTES:
        return text
    m = _SHARD_TAIL_RE.search(text)
    tail = m[0] if m else ""
    stem = text[: len(text) - len(tail)]
    digest = hashlib.sha256(stem.encode()).hexdigest()[:16]
    return f"{stem.encode()[:100].decode(errors='ignore')}-{digest}{tail}"


def safe_relpath(path: str) -> bool:
    """Whether `path` (a file inside a repository, as a listing names it) stays inside the folder it is joined to:
    relative, `/`-separated segments that are neither empty, `.` nor `..`, with no `\\` and no control character."""
    if not path or path.startswith("/") or "\\" in path or re.search(r"[\x00-\x1f\x7f]", path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def inside(directory: Path, name: str) -> Path:
    """`directory / name`, checked to lie inside `directory` once both are resolved, and not to be a symlink.
    Raises ValueError naming both when it does not (the caller says what was refused, in its own error type)."""
    path = directory / name
    base = directory.resolve()
    try:
        path.resolve().relative_to(base)
    except ValueError:
        raise ValueError(f"{name!r} would lie outside {directory}") from None
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; fitquant does not write through one")
    return path


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (mkdir -p would give the parents 0755); an existing
    folder of this user is set to 0700. A symlink where a folder should be is refused (OSError)."""
    missing = []
    p = path
    while not p.is_dir():
        if p.is_symlink() or p.exists():
            raise NotADirectoryError(f"{p} is not a folder")
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=0o700)
    if path.is_symlink():
        raise NotADirectoryError(f"{path} is a symbolic link, not a folder")
    _tighten(path)
    roots = {state_dir(), cache_dir()}
    for parent in path.parents:  # up to fitquant's own state and cache folders (made 0755 by an older fitquant)
        if any(parent == r or r in parent.parents for r in roots):
            _tighten(parent)
    return path


def _tighten(folder: Path) -> None:
    st = folder.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def open_private(path: Path, flags: int) -> int:
    """`os.open(path, flags)` for a file in fitquant's folders: mode 0600 when created, never through a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)


def write_private(path: Path, data: str | bytes) -> Path:
    """Write `path` atomically (a reader never sees half a file) and privately: its folder made 0700, the text
    written to a fresh temp file (O_EXCL | O_NOFOLLOW, 0600) beside it, then renamed over `path` (a rename
    replaces a symlink, it does not follow it)."""
    private_dir(path.parent)
    body = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def append_private(path: Path, text: str) -> Path:
    """Append `text` to `path` (created 0600 in a 0700 folder; a symlink is refused), one write, so lines of
    concurrent writers do not interleave."""
    private_dir(path.parent)
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # written by an older fitquant with 0644
        body = memoryview(text.encode())
        while body:
            body = body[os.write(fd, body) :]
    finally:
        os.close(fd)
    return path
