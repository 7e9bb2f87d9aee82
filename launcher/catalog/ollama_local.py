"""A running local Ollama as a catalog source: the models it has pulled, from `/api/tags` and `/api/show`.

The server is `host=` or OLLAMA_HOST (default http://127.0.0.1:11434), read by `launcher.ollama_host` as the
official ollama-python client reads it: `[scheme://]host[:port][/path]`, scheme http unless given, port 11434 unless
given (80 / 443 after an explicit http:// / https://).

Per model, `/api/tags` gives the name, the size of all its layers and `details.quantization_level`; `/api/show`
gives `details`, `model_info` (GGUF metadata without the big arrays) and the Modelfile, whose `FROM` line names the
model blob (`<models>/blobs/sha256-<hex>`). The model and projector layers (digest, exact size) come from the
manifest file under the models directory when it is readable, else the model digest from that FROM line. The
models directory is $OLLAMA_MODELS, else ~/.ollama/models, else the Linux service's /usr/share/ollama/.ollama/models.
When the model blob is on this machine its header is read with `read_header`; otherwise `header` is None with a
note (the server may run on another machine, or store its models where this user cannot read).

Cloud models (`…-cloud`, with `remote_host`) run elsewhere and are not listed. Requests go through `launcher.http`
(its client and error mapping, no retries: a local server answers or it does not); `_Server.call` words the
failures, and a refused connection says how to start the server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.http import HttpFailure, call, make_client
from launcher.ollama_host import DEFAULT_URL, ollama_base_url
from launcher.quants import file_type_label, normalize_label

if TYPE_CHECKING:
    import httpx

    from launcher.gguf import GGUFHeader

__all__ = ["DEFAULT_HOST", "list_candidates", "models_dirs"]

DEFAULT_HOST = DEFAULT_URL
TIMEOUT_S = 30.0  # /api/show reads the model's metadata from disk
CONNECT_TIMEOUT_S = 3.0
MAX_BODY_BYTES = 64 * 1024 * 1024
_MEDIA_MODEL = "application/vnd.ollama.image.model"
_MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
_FROM_RE = re.compile(r"^FROM\s+(\S*sha256[-:]([0-9a-f]{64}))\s*$", re.MULTILINE)
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def models_dirs() -> list[Path]:
    """Where Ollama may keep its models on this machine, in the order they are searched."""
    env = os.environ.get("OLLAMA_MODELS", "").strip()
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


class _Server:
    def __init__(self, base: str, client: httpx.Client) -> None:
        self.base = base
        self.client = client

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any | None:
        """The JSON answer of `path`; None for a 404; CatalogError for anything else that is not a 200."""
        url = f"{self.base}{path}"

        def error(failure: HttpFailure) -> CatalogError:
            if failure.kind == "connect":
                return CatalogError(
                    f"ollama: no server at {self.base} (start it with 'ollama serve' or set OLLAMA_HOST)"
                )
            if failure.kind == "timeout":
                return CatalogError(f"ollama: the server at {self.base} did not answer {path} in time")
            return CatalogError(_one_line(f"ollama: {path} on {self.base}: {failure.text}"))

        response = call(lambda: self.client.request(method, url, json=body), error=error, retry=False)
        if response.status_code == 404:
            return None
        if len(response.content) > MAX_BODY_BYTES:
            raise CatalogError(f"ollama: {path} on {self.base}: the answer is larger than {MAX_BODY_BYTES} bytes")
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.status_code != 200:
            detail = doc.get("error") if isinstance(doc, dict) else None
            detail = detail if isinstance(detail, str) else response.text[:200]
            reason = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
            raise CatalogError(_one_line(f"ollama: {path} on {self.base}: {reason}: {detail}"))
        if not isinstance(doc, dict):
            raise CatalogError(f"ollama: {path} on {self.base}: the answer is not a JSON object")
        return doc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _full_name(name: str) -> str:
    """Ollama's short name with its implicit tag: "qwen3" -> "qwen3:latest"."""
    return name if name.rfind(":") > name.rfind("/") else f"{name}:latest"


def _layers_from_manifest(name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(model layer, projector layer) from the manifest file Ollama keeps for `name`, when it is readable here."""
    from launcher.catalog.ollama import DEFAULT_HOST as REGISTRY_HOST
    from launcher.catalog.ollama import parse_name

    try:
        parsed = parse_name(name)
    except CatalogError:
        return None, None
    rel = Path("manifests", parsed.host or REGISTRY_HOST, parsed.namespace, parsed.model, parsed.tag or "latest")
    for root in models_dirs():
        try:
            doc = json.loads((root / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        layers = doc.get("layers") if isinstance(doc, dict) else None
        if not isinstance(layers, list):
            continue

        def first(media: str, layers: list[Any] = layers) -> dict[str, Any] | None:
            for x in layers:
                if (
                    isinstance(x, dict)
                    and x.get("mediaType") == media
                    and isinstance(x.get("digest"), str)
                    and _DIGEST_RE.match(x["digest"])
                    and isinstance(x.get("size"), int)
                ):
                    return x
            return None

        return first(_MEDIA_MODEL), first(_MEDIA_PROJECTOR)
    return None, None


def _blob_path(digest: str, from_path: str | None) -> Path | None:
    """The blob file of `digest` on this machine, if there is one."""
    names = [Path(root) / "blobs" / digest.replace(":", "-") for root in models_dirs()]
    if from_path:
        names.insert(0, Path(from_path))
    for path in names:
        try:
            if path.is_file():
                return path
        except OSError:
            continue
    return None


def _candidate(given: str, entry: dict[str, Any], show: dict[str, Any], base: str) -> Candidate:
    listed = str(entry.get("name") or entry.get("model") or given)
    notes: list[str] = []
    model_layer, projector_layer = _layers_from_manifest(listed)
    from_path, from_hex = None, None
    m = _FROM_RE.search(str(show.get("modelfile") or ""))
    if m is not None:
        from_path, from_hex = m[1], m[2]
    digest = model_layer["digest"] if model_layer else (f"sha256:{from_hex}" if from_hex else None)

    path = _blob_path(digest, from_path) if digest else None
    header: GGUFHeader | None = None
    if path is not None:
        from launcher.gguf import read_header

        try:
            header = read_header(path)
        except GGUFFormatError as exc:
            notes.append(_one_line(f"header not read: {exc}"))
    elif digest is not None:
        notes.append(f"header not read: blob {digest} is not on this machine (is the server at {base} remote?)")
    else:
        notes.append("header not read: the server did not say which blob holds the model")

    if model_layer is not None:
        size = int(model_layer["size"])
    elif path is not None:
        size = path.stat().st_size
    else:
        size = int(entry.get("size") or 0)
        notes.append("size is that of all the model's layers (/api/tags)")

    files = (
        CandidateFile(
            name=digest or listed,
            size_bytes=size,
            local_path=str(path) if path is not None else None,
            sha256=digest.split(":", 1)[1] if digest else None,
        ),
    )
    projector = None
    if projector_layer is not None:
        ppath = _blob_path(projector_layer["digest"], None)
        projector = CandidateFile(
            name=projector_layer["digest"],
            size_bytes=int(projector_layer["size"]),
            local_path=str(ppath) if ppath is not None else None,
            sha256=projector_layer["digest"].split(":", 1)[1],
        )
    elif show.get("projector_info"):
        notes.append("has a vision projector whose blob could not be located")

    return Candidate(
        model=given,
        source="ollama-local",
        quant=_label(entry, show, header, listed),
        files=files,
        header=header,
        projector=projector,
        ollama_model=listed,
        notes=tuple(notes),
    )


def _label(entry: dict[str, Any], show: dict[str, Any], header: GGUFHeader | None, listed: str) -> str:
    for details in (show.get("details"), entry.get("details")):
        level = details.get("quantization_level") if isinstance(details, dict) else None
        if isinstance(level, str) and level.strip():
            return normalize_label(level)
    info = show.get("model_info")
    for ft in (
        info.get("general.file_type") if isinstance(info, dict) else None,
        header and header.get("general.file_type"),
    ):
        label = file_type_label(ft) if isinstance(ft, int) and not isinstance(ft, bool) else None
        if label is not None:
            return label
    return normalize_label(listed.rsplit(":", 1)[-1])


def list_candidates(
    name: str | None, *, client: httpx.Client | None = None, host: str | None = None
) -> list[Candidate]:
    """The models a running Ollama has pulled: `name` alone, or all of them when `name` is None.

    `host` overrides OLLAMA_HOST. Raises CatalogError when the server does not answer or lacks the model.
    """
    base = ollama_base_url(host)
    own_client = None
    if client is None:
        own_client = client = make_client(timeout_s=TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S)
    server = _Server(base, client)
    try:
        tags = server.call("GET", "/api/tags") or {}
        models = [m for m in tags.get("models") or [] if isinstance(m, dict)]
        if name is not None:
            want = _full_name(name.strip())
            entry = next((m for m in models if want in (m.get("name"), m.get("model"))), {"name": want})
            show = server.call("POST", "/api/show", {"model": name.strip()})
            if show is None:
                raise CatalogError(f"ollama: model {name!r} not found on {base} (pull it with 'ollama pull {name}')")
            if show.get("remote_host") or show.get("remote_model"):
                raise CatalogError(
                    f"ollama: model {name!r} on {base} is a cloud model (runs on {show.get('remote_host')}), "
                    f"not on this machine"
                )
            return [_candidate(name, entry, show, base)]
        cands = []
        for entry in models:
            listed = entry.get("name") or entry.get("model")
            if not isinstance(listed, str) or entry.get("remote_host") or entry.get("remote_model"):
                continue
            show = server.call("POST", "/api/show", {"model": listed})
            if show is None:  # removed between the two calls
                continue
            cands.append(_candidate(listed, entry, show, base))
        return cands
    finally:
        if own_client is not None:
            own_client.close()
