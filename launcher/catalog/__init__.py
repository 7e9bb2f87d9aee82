"""The catalog: which quants of a model exist, with their files, sizes, hashes and parsed GGUF headers.

Contract: `list_candidates(model)` takes a model reference as a user types it and returns one
`Candidate` per quant (`launcher.catalog.types`): a normalised label (Q4_K_M, UD-Q4_K_XL, IQ4_XS, BF16, ...),
every file (all shards, with size, URL or local path, and the published sha256 where there is one), the
vision projector if any, and the header (metadata and tensor infos, read without downloading weights). It
raises `CatalogError`, one line that starts with the model as given and says what went wrong; nothing else
escapes. Sources do their own I/O and translate their libraries' exceptions themselves.

References (`parse_reference`):

    (none)                                  the embedded default model (local)
    ./x.gguf, /models/, x-00001-of-00003.gguf  local: a file, a split set, a folder of quants (`local`)
    hf.co/user/repo[:QUANT], huggingface.co/user/repo, user/repo[@revision][:QUANT]
                                            Hugging Face (`huggingface`); a user/repo that is no existing path
    https://huggingface.co/user/repo/resolve/REV/x-Q4_K_M.gguf (or /blob/, or on the HF_ENDPOINT host)
                                            Hugging Face: that repository at REV, filtered to that file's quant
    http(s)://host/path/x.gguf              one GGUF file (any shard of a split set) read by Range (`url`)
    ollama://name[:tag]                     a model pulled into the local Ollama server (`ollama_local`)
    name[:tag] (qwen3:14b, gemma3)          the Ollama registry (`ollama`)

`:QUANT` keeps only that quant (case-insensitive) for Hugging Face and local references; for Ollama names
the part after `:` is the tag. Listings and headers are cached (`launcher.catalog.cache`): `refresh=True`
lists again, `offline=True` uses only the cache.

`candidates_to_json` gives the `fitquant quants --json` document (schema_version 1), sorted by quality.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError

if TYPE_CHECKING:
    import httpx

    from launcher.quants import QuantInfo

__all__ = [
    "Candidate",
    "CandidateFile",
    "ModelReference",
    "candidates_to_json",
    "list_candidates",
    "parse_reference",
    "sort_by_quality",
]

JSON_SCHEMA_VERSION = 1

_HF_PREFIXES = (
    "hf.co/",
    "huggingface.co/",
    "https://hf.co/",
    "https://huggingface.co/",
    "http://hf.co/",
    "http://huggingface.co/",
)
_OLLAMA_LOCAL_PREFIX = "ollama://"
_URL_SCHEMES = ("http://", "https://")
# user/repo[@revision][:QUANT]; Hub names: letters, digits, "-", "_", "." (huggingface_hub validate_repo_id)
_HF_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^:@\s]+))?(?::(?P<quant>[\w.-]+))?$")
# a file URL copied from the Hub: user/repo/resolve|blob/revision/path (huggingface_hub hf_hub_url)
_HF_FILE_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<path>.+)$"
)
# [host/][namespace/]model[:tag] (Ollama types/model/name.go); a host has a dot or a port
_OLLAMA_RE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)?(?:[\w.-]+/)?[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")


@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference: which source, what name there, and an optional quant filter."""

    kind: str  # "embedded" | "local" | "url" | "huggingface" | "ollama" | "ollama-local"
    name: str  # a path, a URL, "user/repo", or an Ollama "name:tag" ("" for the embedded model)
    quant: str | None = None  # the :QUANT filter (Hugging Face and local only)
    revision: str | None = None  # Hugging Face only


def parse_reference(model: str | None) -> ModelReference:
    """Decide where `model` comes from (see the module docstring); raises CatalogError for what fits no form."""
    if model is None or not model.strip():
        return ModelReference("embedded", "")
    text = model.strip()
    lower = text.lower()
    if lower.startswith(_OLLAMA_LOCAL_PREFIX):
        name = text[len(_OLLAMA_LOCAL_PREFIX) :]
        if not name or not _OLLAMA_RE.match(name):
            raise CatalogError(f"{model}: not an Ollama model name; write ollama://name[:tag], e.g. ollama://qwen3:14b")
        return ModelReference("ollama-local", name)
    for prefix in _HF_PREFIXES:
        if lower.startswith(prefix):
            return _hf_reference(model, text[len(prefix) :].rstrip("/"))
    if lower.startswith(_URL_SCHEMES):
        rest = _hf_endpoint_rest(text)
        return ModelReference("url", text) if rest is None else _hf_reference(model, rest.rstrip("/"))
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return ModelReference("local", expanded)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and os.path.exists(os.path.expanduser(head)):
        return ModelReference("local", os.path.expanduser(head), quant=tail)
    if text in (".", "..", "~") or text.startswith(("./", "../", "/", "~/")) or lower.endswith(".gguf"):
        return ModelReference("local", expanded)
    if text.count("/") == 1:
        return _hf_reference(model, text)
    if _OLLAMA_RE.match(text) and (text.count("/") == 0 or "." in text.split("/", 1)[0]):
        return ModelReference("ollama", text)
    raise CatalogError(
        f"{model}: not a GGUF file or folder here, a Hugging Face repository (user/repo) or an Ollama model (name:tag)"
    )


def _hf_endpoint_rest(url: str) -> str | None:
    """What follows the HF_ENDPOINT in `url` when `url` is on that endpoint (a mirror, a test server); else None."""
    from urllib.parse import urlsplit

    from launcher.http import DEFAULT_HF_ENDPOINT, hf_endpoint

    endpoint = hf_endpoint()
    if endpoint == DEFAULT_HF_ENDPOINT:
        return None  # huggingface.co itself: one of _HF_PREFIXES
    try:
        e, u = urlsplit(endpoint), urlsplit(url)
        same_host = (e.hostname, e.port or _default_port(e.scheme)) == (u.hostname, u.port or _default_port(u.scheme))
    except ValueError:
        return None
    base = e.path.rstrip("/") + "/"
    if not same_host or not u.path.startswith(base):
        return None
    return u.path[len(base) :] + (f"?{u.query}" if u.query else "")


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def file_url(url: str) -> str:
    """A GGUF URL as it downloads: a Hub file URL (`.../resolve/REV/x.gguf`, or the page `.../blob/REV/x.gguf`
    copied from a browser) becomes the file on the Hub fitquant asks (HF_ENDPOINT, as the catalog lists it);
    any other URL is returned as given."""
    from launcher.http import hf_endpoint

    text = url.strip()
    prefix = next((p for p in _HF_PREFIXES if text.lower().startswith(p) and "://" in p), None)
    rest = text[len(prefix) :] if prefix else _hf_endpoint_rest(text)
    m = _HF_FILE_RE.match(rest.split("?", 1)[0]) if rest is not None else None
    if m is None:
        return url
    return f"{hf_endpoint().rstrip('/')}/{m['repo']}/resolve/{m['rev']}/{m['path']}"


def _hf_file_reference(model: str, rest: str) -> ModelReference | None:
    """A Hub file URL's part after the host (`user/repo/resolve/main/x-Q4_K_M.gguf`) as that repository at that
    revision, filtered to that file's quant (else to its file name); None when `rest` is not one."""
    from urllib.parse import unquote

    from launcher.catalog import labels

    m = _HF_FILE_RE.match(rest.split("?", 1)[0].split("#", 1)[0])
    if m is None:
        return None
    from launcher.gguf import parse_part

    path = unquote(m["path"])
    part = parse_part(path)
    if part is not None:  # a part of a raw split: the quant of the file its parts make
        path = f"{path.rpartition('/')[0]}/{part.joined}".lstrip("/")
    if not path.lower().endswith(".gguf"):
        raise CatalogError(f"{model}: {path} is not a GGUF file; give the URL of a .gguf file or the repository")
    quant = labels.quant_label(path) or path.rsplit("/", 1)[-1]
    return ModelReference("huggingface", m["repo"], quant=quant, revision=unquote(m["rev"]))


def _hf_reference(model: str, rest: str) -> ModelReference:
    file_reference = _hf_file_reference(model, rest)
    if file_reference is not None:
        return file_reference
    m = _HF_RE.match(rest)
    if m is None:
        raise CatalogError(
            f"{model}: not a Hugging Face repository; write user/repo[:QUANT], e.g. unsloth/Qwen3-14B-GGUF:Q4_K_M"
        )
    return ModelReference("huggingface", m["repo"], quant=m["quant"], revision=m["rev"])


def list_candidates(
    model: str | None,
    *,
    client: httpx.Client | None = None,
    refresh: bool = False,
    offline: bool = False,
) -> list[Candidate]:
    """Every quant of `model` (any reference form; None = the embedded default) as Candidates with headers.

    `client` is used for HTTP (tests inject one); `refresh` lists again instead of using a fresh cached
    listing; `offline` uses only cached listings and headers. Raises CatalogError (one line).
    """
    ref = parse_reference(model)
    from launcher.http import redact_url

    shown = redact_url(model.strip()) if model and model.strip() else "the embedded default model"  # no credentials
    try:
        if ref.kind == "embedded":
            from launcher.catalog import local
            from launcher.embedded import embedded_model_path

            path = embedded_model_path()
            found = local.list_candidates(path, model=str(path))
            return [replace(c, explicit="it is the embedded default model") for c in found]
        if ref.kind == "local":
            from launcher.catalog import local

            return local.list_candidates(ref.name, model=shown, quant=ref.quant)
        if ref.kind == "url":
            if offline:
                raise CatalogError(f"{shown}: offline, and a GGUF URL is read from the network")
            from launcher.catalog import url

            return url.list_candidates(ref.name, model=shown, client=client)
        if ref.kind == "huggingface":
            from launcher.catalog import huggingface

            return huggingface.list_candidates(
                ref.name,
                model=shown,
                quant=ref.quant,
                revision=ref.revision or "main",
                client=client,
                refresh=refresh,
                offline=offline,
            )
        if ref.kind == "ollama-local":
            from launcher.catalog import ollama_local

            return ollama_local.list_candidates(ref.name, client=client)
        from launcher.catalog import ollama

        return ollama.list_candidates(ref.name, client=client, refresh=refresh, offline=offline)
    except GGUFFormatError as exc:
        raise CatalogError(f"{shown}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Quality order and the JSON document


def _quant_info(c: Candidate) -> QuantInfo:
    from launcher.quants import quant_info

    return quant_info(c.quant, c.bits_per_weight)


def sort_by_quality(candidates: list[Candidate]) -> list[tuple[Candidate, QuantInfo]]:
    """(candidate, launcher.quants.QuantInfo) pairs, best quality first (rank, then size, both descending)."""
    pairs = [(c, _quant_info(c)) for c in candidates]
    pairs.sort(key=lambda p: (p[1].rank is None, -(p[1].rank or 0), -p[0].size_bytes, p[0].quant))
    return pairs


def _file_json(f: CandidateFile | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {"name": f.name, "size_bytes": f.size_bytes, "url": f.url, "sha256": f.sha256, "local_path": f.local_path}


def candidates_to_json(model: str | None, candidates: list[Candidate]) -> dict[str, Any]:
    """The `fitquant quants --json` document: schema_version 1, the model, and the candidates best first.

    Per candidate: quant, size_bytes, bits_per_weight (measured from the header, else the label's nominal
    figure), quality_rank (higher is better), kld and kld_source (published mean KL-divergence, or null),
    files, projector, source, ollama_model, architecture, n_params and notes.
    """
    rows = []
    for c, info in sort_by_quality(candidates):
        bpw = c.bits_per_weight
        if bpw is None:
            bpw = info.nominal_bpw
        rows.append(
            {
                "quant": c.quant,
                "size_bytes": c.size_bytes,
                "bits_per_weight": None if bpw is None else round(bpw, 4),
                "quality_rank": info.rank,
                "kld": info.kld,
                "kld_source": info.kld_source,
                "files": [_file_json(f) for f in c.files],
                "projector": _file_json(c.projector),
                "source": c.source,
                "ollama_model": c.ollama_model,
                "architecture": c.header.architecture if c.header else None,
                "n_params": c.header.n_params if c.header else None,
                "notes": list(c.notes),
            }
        )
    return {"schema_version": JSON_SCHEMA_VERSION, "model": model, "candidates": rows}
