"""Candidates from files on this machine: one GGUF file, a split set, or a folder of quants.

A folder is searched two levels deep (per-quant subfolders like `Q8_0/x-00001-of-00002.gguf`). Each file,
complete split set or complete raw byte split (`x.gguf.part1of2`, ...: `Candidate.raw_split`, joined into one file
by `launcher.fetch` before use) is one candidate labelled from its name (`labels.quant_label`), else from its
header's `general.file_type`; `mmproj` files are the vision companion of every candidate in the folder, not quants;
`mtp-` and imatrix files are left out. Headers are read from disk (header bytes only); sha256 is not
computed (hashing gigabytes to list quants is not worth it), so `CandidateFile.sha256` is None.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from launcher.catalog import labels
from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.gguf import GGUFHeader, parse_part, read_header
from launcher.quants import file_type_label, same_label

__all__ = ["list_candidates"]

_MAX_DEPTH = 2  # the folder itself and one level of subfolders
_PROJECTOR_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf") or parse_part(name) is not None


def _scan(folder: Path) -> list[Path]:
    found: list[Path] = []
    base_depth = len(folder.parts)
    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).parts) - base_depth
        if depth + 1 >= _MAX_DEPTH:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if _is_gguf(f) and not f.startswith("."))
    return found


def _file(path: Path) -> CandidateFile:
    return CandidateFile(name=path.name, size_bytes=path.stat().st_size, local_path=str(path))


def pick_projector(names: list[str]) -> str | None:
    """The projector to pair with every quant when there are several: F16, then BF16, Q8_0, F32, else the first."""
    if not names:
        return None
    ranked = sorted(names)
    for want in _PROJECTOR_PREFERENCE:
        for name in ranked:
            if labels.quant_label(name) == want:
                return name
    return ranked[0]


def _group(paths: list[Path]) -> tuple[list[list[Path]], list[str]]:
    """Files -> [files of one candidate, in shard or part order]; notes about incomplete split sets and raw splits."""
    groups: dict[tuple[str, str, int, str] | str, dict[int, Path]] = {}
    for path in paths:
        shard = labels.parse_shard(path.name)
        part = parse_part(path.name)
        if shard is not None:
            groups.setdefault((str(path.parent), shard.prefix, shard.total, "shard"), {})[shard.index] = path
        elif part is not None:
            groups.setdefault((str(path.parent), part.joined, part.total, "part"), {})[part.index] = path
        else:
            groups[str(path)] = {1: path}
    out, notes = [], []
    for key, members in groups.items():
        if isinstance(key, tuple):
            folder, prefix, total, kind = key
            missing = [i for i in range(1, total + 1) if i not in members]
            if missing and kind == "part":
                notes.append(f"{Path(folder) / prefix}: {labels.raw_split_lacks(prefix, missing, total)}; left out")
                continue
            if missing:
                first = Path(folder) / labels.ShardName(prefix, 1, total).name(1)
                notes.append(
                    f"{first}: split set of {total} files is missing {len(missing)} of them "
                    f"(shard {missing[0]} first); left out"
                )
                continue
        out.append([members[i] for i in sorted(members)])
    return out, notes


def _name_label(path: Path) -> str | None:
    # the file name, else its folder's (per-quant folders); folders further up name other things
    return labels.quant_label(f"{path.parent.name}/{path.name}")


def _candidate(
    files: list[Path], model: str, header: GGUFHeader | None, projector: CandidateFile | None, notes: tuple[str, ...]
) -> Candidate:
    label = _name_label(files[0])
    if label is None and header is not None:
        label = file_type_label(header.get("general.file_type"))
    return Candidate(
        model=model,
        source="local",
        quant=label or "unknown",
        files=tuple(_file(p) for p in files),
        header=header,
        projector=projector,
        notes=notes,
        raw_split=parse_part(files[0].name) is not None,
    )


def _read(path: Path) -> GGUFHeader:
    return read_header(path)


def _single(path: Path, model: str, quant: str | None) -> list[Candidate]:
    if labels.is_projector_name(path.name):
        raise CatalogError(f"{model}: {path.name} is a vision projector (mmproj), not a model")
    shard = labels.parse_shard(path.name)
    part = parse_part(path.name)
    files = [path]
    if shard is not None:
        files = [path.parent / shard.name(i) for i in range(1, shard.total + 1)]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise CatalogError(
                f"{model}: split set of {shard.total} files is missing {len(missing)} of them ({missing[0].name} first)"
            )
    elif part is not None:
        files = [path.parent / part.name(i) for i in range(1, part.total + 1)]
        absent = [i + 1 for i, p in enumerate(files) if not p.is_file()]
        if absent:
            raise CatalogError(f"{model}: {labels.raw_split_lacks(part.joined, absent, part.total)}")
    try:
        header = _read(files[0])
    except GGUFFormatError as exc:
        raise CatalogError(f"{model}: {exc}") from None
    if labels.is_projector_header(header):
        raise CatalogError(f"{model}: {path.name} is a vision projector (mmproj), not a model")
    found = [replace(_candidate(files, model, header, None, ()), explicit="you named it")]
    return _filter(found, model, quant)


def _filter(found: list[Candidate], model: str, quant: str | None) -> list[Candidate]:
    if quant is None:
        return found
    kept = [c for c in found if same_label(c.quant, quant)]
    if not kept:
        have = ", ".join(sorted({c.quant for c in found})) or "none"
        raise CatalogError(f"{model}: no quant {quant} here; available: {have}")
    return kept


def _folder(folder: Path, model: str, quant: str | None) -> list[Candidate]:
    paths = _scan(folder)
    projector_paths = [p for p in paths if labels.is_projector_name(p.name)]
    model_paths = [p for p in paths if p not in projector_paths and not labels.is_sidecar_name(p.name)]
    if not model_paths:
        what = "only vision projectors (mmproj)" if projector_paths else "no GGUF files"
        raise CatalogError(f"{model}: the folder holds {what}")
    groups, notes = _group(model_paths)
    if not groups:
        raise CatalogError(f"{model}: {notes[0]}")
    chosen = pick_projector([str(p) for p in projector_paths])
    projector = _file(Path(chosen)) if chosen else None
    if quant is not None:
        # read only what the filter can keep: named groups of that label, and unnamed ones (their header names them)
        named = [g for g in groups if same_label(_name_label(g[0]) or "", quant)]
        unnamed = [g for g in groups if _name_label(g[0]) is None]
        if named or unnamed:
            groups = named + unnamed
    found: list[Candidate] = []
    errors: list[str] = []
    for files in groups:
        try:
            header = _read(files[0])
        except GGUFFormatError as exc:
            errors.append(str(exc))
            found.append(_candidate(files, model, None, projector, (f"header unreadable: {exc}",)))
            continue
        if labels.is_projector_header(header):
            continue
        found.append(_candidate(files, model, header, projector, tuple(notes)))
    if found and all(c.header is None for c in found):
        raise CatalogError(f"{model}: {errors[0]}")
    if not found:
        raise CatalogError(f"{model}: the folder holds only vision projectors (mmproj)")
    found.sort(key=lambda c: (-c.size_bytes, c.quant, c.files[0].name))
    return _filter(found, model, quant)


def list_candidates(
    path: str | os.PathLike[str], *, model: str | None = None, quant: str | None = None
) -> list[Candidate]:
    """Candidates for a local GGUF file, split set (any shard given) or folder of quants, largest first.

    `quant` keeps only that label (case-insensitive). `model` is the reference to name in messages (default: the path).
    Raises CatalogError (one line naming the model) when nothing usable is there.
    """
    p = Path(os.fspath(path)).expanduser()
    shown = model if model is not None else os.fspath(path)
    try:
        p.lstat()
    except (FileNotFoundError, NotADirectoryError):
        raise CatalogError(f"{shown}: no such file or folder") from None
    except OSError as exc:  # a name too long (ENAMETOOLONG), a loop of links, no permission to look
        if len(shown) > 80:
            shown = f"{shown[:40]}...{shown[-20:]} ({len(shown)} characters)"
        raise CatalogError(f"{shown}: cannot be read as a path ({exc.strerror or exc})") from None
    if p.is_dir():
        return _folder(p, shown, quant)
    if p.is_file():
        return _single(p, shown, quant)
    if p.exists():
        raise CatalogError(f"{shown}: not a file or a folder")
    raise CatalogError(f"{shown}: no such file or folder")
