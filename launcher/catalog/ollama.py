"""The Ollama registry as a catalog source: every quant of a library model, with sizes and headers, no weights.

Names are `[host/][namespace/]model[:tag]` (Ollama's types/model/name.go; defaults registry.ollama.ai, library,
latest). The default host's base URL is https://registry.ollama.ai, or FITQUANT_OLLAMA_REGISTRY (mirrors, tests).

Per tag: `GET /v2/{ns}/{model}/manifests/{tag}` (Accept: the Docker manifest v2 type) gives the model layer's size
and digest and the projector layer; the config blob gives `file_type` ("Q4_K_M") and `model_type` ("8.0B"); it is
content-addressed, so its fields are kept for good; the model blob's GGUF header is read by Range requests on
`/v2/{ns}/{model}/blobs/{digest}` (the registry answers 307 to its blob store; `launcher.gguf.read_header` follows).

The registry has no tag-list API, so:
- `name:tag` where the tag is not a size (`qwen3:14b-q8_0`, `gemma3:27b-it-qat`): that one manifest.
- `name:size` (`qwen3:14b`, `qwen3:30b-a3b`, `llama3.1:8b-instruct`): the tag itself and `{tag}-{quant}` for every
  suffix in QUANT_SUFFIXES; for a pure size also `{size}-{variant}-{quant}` for the older families' VARIANTS
  (`llama3.1:8b-instruct-q4_K_M`). All probed concurrently.
- a bare `name` (or `name:latest`): `latest` is fetched, then its size is looked for: the header's
  `general.size_label` and the config's `model_type` give candidate sizes ("14B" -> 14b; "14.8B" -> 14.8b, 14b,
  15b; "268.10M" -> 268m, 270m, 0.3b), each probed as a tag; the sizes whose tag holds the same model blob as
  `latest` are expanded as above. When none does, `latest` alone is listed, with a note saying so.
Tags holding the same model blob are one candidate: the tag with a quant suffix is kept, the others are noted.

Caches (under cache_dir()/catalog): a probe's 404 is remembered for NEGATIVE_TTL_S in `ollama-tags.json` (with
the config fields by digest), so the next expansion asks only for the tags that exist (`refresh=True` forgets
them; a tag the user names is always asked). The listing (tags, layers, config fields) is kept through
`launcher.catalog.cache`: younger than its LISTING_TTL_S it is used without asking the registry (unless
`refresh`); `offline=True`, or a registry that does not answer, uses it with a note. Headers are kept by blob
digest, so listing a model twice reads no header bytes the second time.

Failures: 404 on the tag asked -> "not found"; 401 -> the registry wants authentication (private models are not
supported); 5xx, 408, 429, connection errors, timeouts and bodies cut short are retried (`launcher.http`'s one
policy) and then, like a redirect loop or a malformed manifest, end in one CatalogError line that names the model
and the cause. Requests go through `launcher.http` (its client, retries and error mapping); `_Registry.get` words
its failures. A header that
cannot be read leaves that candidate's `header` None with a note; if no candidate's header can be read the
listing fails with the first cause.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from launcher.catalog.types import Candidate, CandidateFile
from launcher.errors import CatalogError, GGUFFormatError
from launcher.http import HttpFailure, call, make_client, status_failure
from launcher.quants import file_type_label, normalize_label, quant_info

if TYPE_CHECKING:
    import httpx

    from launcher.gguf import GGUFHeader

__all__ = [
    "DEFAULT_REGISTRY",
    "MANIFEST_ACCEPT",
    "QUANT_SUFFIXES",
    "VARIANTS",
    "OllamaName",
    "list_candidates",
    "parse_name",
    "size_candidates",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_REGISTRY = f"https://{DEFAULT_HOST}"
REGISTRY_ENV = "FITQUANT_OLLAMA_REGISTRY"
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"

# Tag suffixes Ollama's library uses for quants (compared case-insensitively by the registry's users, sent as is).
QUANT_SUFFIXES: tuple[str, ...] = (
    "q4_K_M",
    "q4_K_S",
    "q5_K_M",
    "q5_K_S",
    "q6_K",
    "q8_0",
    "fp16",
    "bf16",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q3_K_M",
    "q3_K_S",
    "q3_K_L",
    "q2_K",
)
# Older families put a variant between size and quant: llama3.1:8b-instruct-q4_K_M, llama2:7b-chat-q4_0,
# gemma3:12b-it-q8_0.
VARIANTS: tuple[str, ...] = ("instruct", "text", "chat", "it")

NEGATIVE_TTL_S = 24 * 3600.0
MAX_CONCURRENCY = 16
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
_STORE_FILE = "ollama-tags.json"
_STORE_VERSION = 1
_STORE_MAX_CONFIGS = 4000
SOURCE = "ollama"  # the listing cache's source name

_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(:\d{1,5})?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SIZE = r"(?:e?\d+(?:\.\d+)?[kmbt](?:-a\d+(?:\.\d+)?[mb])?|\d+x\d+(?:\.\d+)?[mb])"
_SIZE_RE = re.compile(rf"^{_SIZE}$", re.IGNORECASE)
_SIZE_VARIANT_RE = re.compile(rf"^{_SIZE}-(?:{'|'.join(VARIANTS)})$", re.IGNORECASE)
_MODEL_TYPE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class OllamaName:
    """A parsed Ollama model name; `tag` is None when the name has none."""

    host: str | None  # None: the default registry (FITQUANT_OLLAMA_REGISTRY or registry.ollama.ai)
    namespace: str
    model: str
    tag: str | None

    def with_tag(self, tag: str) -> str:
        """How Ollama itself names `tag` of this model: "qwen3:14b-q4_K_M", "user/m:tag", "host/ns/m:tag"."""
        if self.host is not None:
            return f"{self.host}/{self.namespace}/{self.model}:{tag}"
        if self.namespace != "library":
            return f"{self.namespace}/{self.model}:{tag}"
        return f"{self.model}:{tag}"


def parse_name(name: str) -> OllamaName:
    """Split `[host/][namespace/]model[:tag]`; raises CatalogError for a name Ollama would refuse."""
    text = name.strip()
    head, tag = text, None
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        head, tag = text[:colon], text[colon + 1 :]
    parts = head.split("/")
    host: str | None = None
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    elif len(parts) == 1:
        namespace, model = "library", parts[0]
    else:
        namespace = model = ""
    ok = (
        bool(model)
        and _PART_RE.match(model) is not None
        and _PART_RE.match(namespace) is not None
        and (host is None or _HOST_RE.match(host) is not None)
        and (tag is None or _TAG_RE.match(tag) is not None)
    )
    if not ok:
        raise CatalogError(f"ollama registry: invalid model name {name!r} (expected [host/][namespace/]model[:tag])")
    if host is not None and host.lower() == DEFAULT_HOST:
        host = None
    return OllamaName(host=host, namespace=namespace, model=model, tag=tag)


def _registry_base(host: str | None) -> str:
    if host is not None:
        return f"https://{host}"
    value = os.environ.get(REGISTRY_ENV, "").strip().rstrip("/")
    if not value:
        return DEFAULT_REGISTRY
    if not value.lower().startswith(("http://", "https://")):
        raise CatalogError(f"ollama registry: {REGISTRY_ENV}={value!r} is not an http(s) URL")
    return value


def _quant_of_tag(tag: str) -> str | None:
    """The known quant label a tag ends with ("8b-instruct-q4_K_M" -> "Q4_K_M"), else None."""
    last = tag.rsplit("-", 1)[-1]
    try:
        label = normalize_label(last)
    except ValueError:
        return None
    return label if quant_info(label).known else None


def _expansion(base: str) -> list[str]:
    """The tags to try for a size tag: itself, then `{base}-{quant}` (and the variants for a pure size)."""
    tags = [base] + [f"{base}-{q}" for q in QUANT_SUFFIXES]
    if _SIZE_RE.match(base):
        tags += [f"{base}-{v}-{q}" for v in VARIANTS for q in QUANT_SUFFIXES]
    return tags


def _is_size_tag(tag: str) -> bool:
    return bool(_SIZE_RE.match(tag) or _SIZE_VARIANT_RE.match(tag))


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def size_candidates(size_label: Any, model_type: Any) -> list[str]:
    """Size tags worth trying for a model: from general.size_label ("14B") and the config's model_type ("14.8B")."""
    out: list[str] = []
    if isinstance(size_label, str):
        for part in size_label.split(","):
            s = part.strip().lower()
            if _SIZE_RE.match(s):
                out.append(s)
    m = _MODEL_TYPE_RE.match(model_type) if isinstance(model_type, str) else None
    if m is not None:
        value, unit = float(m[1]), m[2].lower()
        out.append(f"{_fmt(value)}{unit}")
        if value >= 1:
            out += [f"{_fmt(round(value, 1))}{unit}", f"{int(value)}{unit}", f"{int(value + 0.5)}{unit}"]
        if unit == "m":
            out += [f"{int(value + 0.5)}m", f"{int(value / 10 + 0.5) * 10}m"]
            if value >= 50:
                out.append(f"{_fmt(round(value / 1000, 1))}b")
    return [s for s in dict.fromkeys(out) if _SIZE_RE.match(s)][:6]


# ---------------------------------------------------------------------------------------------------------------
# What a manifest says


@dataclass(frozen=True)
class _Layer:
    digest: str
    size: int


@dataclass
class _Tag:
    tag: str
    model: _Layer | None
    projector: _Layer | None
    config_digest: str | None
    config_size: int
    n_model_layers: int
    config: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def layer(x: _Layer | None) -> list[Any] | None:
            return None if x is None else [x.digest, x.size]

        return {
            "tag": self.tag,
            "model": layer(self.model),
            "projector": layer(self.projector),
            "config_digest": self.config_digest,
            "config": self.config,
            "n_model_layers": self.n_model_layers,
            "aliases": self.aliases,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Tag:
        def layer(x: Any) -> _Layer | None:
            return None if not x else _Layer(str(x[0]), int(x[1]))

        return cls(
            tag=str(d["tag"]),
            model=layer(d.get("model")),
            projector=layer(d.get("projector")),
            config_digest=d.get("config_digest"),
            config_size=0,
            n_model_layers=int(d.get("n_model_layers", 1)),
            config=dict(d.get("config") or {}),
            aliases=[str(a) for a in d.get("aliases", [])],
        )


class _Fatal(Exception):
    """A malformed manifest or config blob: the message is the cause, as the user will read it."""


class _Unreachable(CatalogError):
    """The registry did not answer (connection refused, timeouts): the caller may fall back to a cached listing."""


def _parse_manifest(body: bytes, tag: str, where: str) -> _Tag:
    try:
        doc = json.loads(body)
    except ValueError:
        raise _Fatal(f"the manifest from {where} is not JSON") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise _Fatal(f"the answer from {where} is not an image manifest (no 'layers')")

    def layer(entry: Any) -> _Layer:
        if not isinstance(entry, dict):
            raise _Fatal(f"the manifest from {where} has a malformed layer")
        digest, size = entry.get("digest"), entry.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise _Fatal(f"the manifest from {where} has a malformed digest {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _Fatal(f"the manifest from {where} has a malformed layer size {str(size)[:40]!r}")
        return _Layer(digest, size)

    models = [layer(x) for x in layers if isinstance(x, dict) and x.get("mediaType") == MEDIA_MODEL]
    projectors = [layer(x) for x in layers if isinstance(x, dict) and x.get("mediaType") == MEDIA_PROJECTOR]
    config = doc.get("config")
    config_layer = layer(config) if isinstance(config, dict) else None
    return _Tag(
        tag=tag,
        model=models[0] if models else None,
        projector=projectors[0] if projectors else None,
        config_digest=config_layer.digest if config_layer else None,
        config_size=config_layer.size if config_layer else 0,
        n_model_layers=len(models),
    )


def _config_fields(body: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise _Fatal(f"the config blob from {where} is not JSON") from None
    if not isinstance(doc, dict):
        raise _Fatal(f"the config blob from {where} is not a JSON object")
    keep = ("file_type", "model_type", "model_family", "model_format", "requires")
    return {k: doc[k] for k in keep if isinstance(doc.get(k), str)}


# ---------------------------------------------------------------------------------------------------------------
# The negative-answer and listing store


class _Store:
    """cache_dir()/catalog/ollama-tags.json: tags that answered 404 (with the time), config fields by digest."""

    def __init__(self) -> None:
        from launcher.paths import cache_dir

        self.path = cache_dir() / "catalog" / _STORE_FILE
        self.lock = threading.Lock()
        self.dirty = False
        self.missing: dict[str, float] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("version") == _STORE_VERSION:
                self.missing = {str(k): float(v) for k, v in dict(doc.get("missing", {})).items()}
                self.configs = {str(k): dict(v) for k, v in dict(doc.get("configs", {})).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.missing, self.configs = {}, {}  # missing or corrupt: start empty, the next save replaces it

    def is_missing(self, key: str) -> bool:
        at = self.missing.get(key)
        return at is not None and 0 <= time.time() - at < NEGATIVE_TTL_S

    def set_missing(self, key: str, missing: bool) -> None:
        with self.lock:
            if missing:
                self.missing[key] = time.time()
            elif self.missing.pop(key, None) is None:
                return
            self.dirty = True

    def config(self, digest: str) -> dict[str, Any] | None:
        return self.configs.get(digest)

    def set_config(self, digest: str, fields: dict[str, Any]) -> None:
        with self.lock:
            self.configs[digest] = fields
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        now = time.time()
        missing = {k: v for k, v in self.missing.items() if 0 <= now - v < NEGATIVE_TTL_S}
        configs = dict(list(self.configs.items())[-_STORE_MAX_CONFIGS:])
        doc = {"version": _STORE_VERSION, "missing": missing, "configs": configs}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ollama-tags.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, separators=(",", ":"))
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass  # a cache that cannot be written only costs requests next time
        self.dirty = False


# ---------------------------------------------------------------------------------------------------------------
# The registry client

T = TypeVar("T")
R = TypeVar("R")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Registry:
    def __init__(
        self, given: str, name: OllamaName, base: str, client: httpx.Client, store: _Store, refresh: bool
    ) -> None:
        self.given = given
        self.name = name
        self.base = base
        self.client = client
        self.store = store
        self.refresh = refresh
        self.repo = f"{name.namespace}/{name.model}"

    # -- errors ------------------------------------------------------------------------------------------------

    def error(self, cause: str, tag: str | None = None) -> CatalogError:
        which = f" (tag {tag!r})" if tag is not None and tag != self.name.tag else ""
        return CatalogError(_one_line(f"ollama registry: model {self.given!r}{which}: {cause}"))

    def tags_hint(self) -> str:
        if self.name.host is not None:
            return ""
        return f"; see https://ollama.com/{self.name.namespace}/{self.name.model}/tags"

    # -- HTTP --------------------------------------------------------------------------------------------------

    def url(self, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{self.repo}/{kind}/{ref}"

    def get(self, url: str, *, accept: str, tag: str | None, limit: int = MAX_JSON_BYTES) -> bytes | None:
        """The body of a 200 answer, or None for a 404; any other outcome raises CatalogError (retried first when
        transient; `_Unreachable` when the registry did not answer at all)."""

        def error(failure: HttpFailure) -> CatalogError:
            tries = failure.tries if failure.transient else ""
            err = self.error(_cause(failure, url, self.base) + tries, tag)
            return _Unreachable(str(err)) if failure.unreachable else err

        return call(lambda: self._get_once(url, accept, limit), error=error)

    def _get_once(self, url: str, accept: str, limit: int) -> bytes | None:
        with self.client.stream("GET", url, headers={"Accept": accept}, follow_redirects=True) as response:
            status = response.status_code
            if status == 200:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise HttpFailure(
                            f"the answer from {url} is larger than {limit} bytes", kind="body", transient=False
                        )
                return bytes(body)
            if status == 404:
                return None
            failure = status_failure(response)
            text = f"{failure.text} from {url}"
            if status == 401:
                text = (
                    f"the registry wants authentication ({text}); fitquant reads public models "
                    f"only: pull it with 'ollama pull' and use the local Ollama's copy"
                )
            elif status == 403:
                text = f"access denied ({text})"
            raise HttpFailure(text, kind="status", transient=failure.transient)

    # -- tags --------------------------------------------------------------------------------------------------

    def missing_key(self, tag: str) -> str:
        return f"{self.base}|{self.repo}:{tag}"

    def probe(self, tag: str, *, speculative: bool) -> _Tag | None:
        """The manifest of `tag`, or None when the registry has no such tag (speculative 404s are remembered)."""
        key = self.missing_key(tag)
        if speculative and not self.refresh and self.store.is_missing(key):
            return None
        url = self.url("manifests", tag)
        body = self.get(url, accept=MANIFEST_ACCEPT, tag=tag)
        self.store.set_missing(key, body is None)
        if body is None:
            return None
        try:
            return _parse_manifest(body, tag, url)
        except _Fatal as exc:
            raise self.error(str(exc), tag) from None

    def probe_many(self, tags: Iterable[str], *, speculative: bool) -> list[_Tag]:
        found = _parallel(lambda t: self.probe(t, speculative=speculative), list(dict.fromkeys(tags)))
        return [t for t in found if t is not None]

    def config(self, t: _Tag) -> None:
        """Fill t.config from the config blob (content-addressed: read once, kept in the store)."""
        if t.config_digest is None or t.config:
            return
        cached = self.store.config(t.config_digest)
        if cached is not None:
            t.config = dict(cached)
            return
        if t.config_size > MAX_CONFIG_BYTES:
            return
        url = self.url("blobs", t.config_digest)
        body = self.get(url, accept="application/json, */*", tag=t.tag, limit=MAX_CONFIG_BYTES)
        if body is None:
            return
        try:
            t.config = _config_fields(body, url)
        except _Fatal as exc:
            raise self.error(str(exc), t.tag) from None
        self.store.set_config(t.config_digest, t.config)

    # -- resolution --------------------------------------------------------------------------------------------

    def resolve(self, header: Callable[[_Tag], tuple[GGUFHeader | None, str | None]]) -> tuple[list[_Tag], str | None]:
        """Every tag of the model the name asks for, aliases merged; and a note for the whole listing."""
        tag = self.name.tag
        note = None
        if tag is None or tag == "latest":
            latest = self.probe("latest", speculative=False)
            if latest is None:
                raise self.error(f"not found at {self.base} (no tag 'latest'{self.tags_hint()})")
            found = [latest]
            if latest.model is not None:
                self.config(latest)
                head, _ = header(latest)
                sizes = size_candidates(
                    head.get("general.size_label") if head is not None else None, latest.config.get("model_type")
                )
                aliases = self.probe_many(sizes, speculative=True)
                matched = [a for a in aliases if a.model is not None and a.model.digest == latest.model.digest]
                asked = {"latest", *sizes}
                for alias in matched:
                    found.append(alias)
                    more = [x for x in _expansion(alias.tag) if x not in asked]
                    asked.update(more)
                    found += self.probe_many(more, speculative=True)
                if not matched:
                    example = self.name.with_tag("<size>")
                    note = f"could not tell which size 'latest' is; name one ({example}) to list its other quants"
        elif _is_size_tag(tag):
            tried = _expansion(tag)
            found = self.probe_many(tried[:1], speculative=False) + self.probe_many(tried[1:], speculative=True)
            if not found:
                raise self.error(
                    f"not found at {self.base} (none of the {len(tried)} tags tried for {tag!r} exists"
                    f"{self.tags_hint()})"
                )
        else:
            one = self.probe(tag, speculative=False)
            if one is None:
                raise self.error(f"not found at {self.base} (no tag {tag!r}{self.tags_hint()})")
            found = [one]
        return _merge_aliases(found), note


def _cause(failure: HttpFailure, url: str, base: str) -> str:
    """Why a request to the registry failed, in this module's words (status and body failures carry theirs)."""
    if failure.kind == "redirects":
        return f"too many redirects from {url} (a redirect loop?)"
    if failure.kind == "connect":
        return f"cannot connect to {base} ({failure.cause})"
    if failure.kind == "timeout":
        return f"no answer from {url} in time ({failure.error})"
    if failure.kind == "cut_short":
        return f"the answer from {url} was cut short ({failure.text})"
    if failure.kind in ("transport", "http"):
        return f"{failure.error} on {url}: {failure.cause}"
    if failure.kind == "invalid_url":
        return f"invalid URL {url} ({failure.cause})"
    return failure.text


def _merge_aliases(found: list[_Tag]) -> list[_Tag]:
    """One _Tag per model blob: the first with a quant suffix wins, the other tags become its aliases."""
    groups: dict[str, list[_Tag]] = {}
    out: list[_Tag] = []
    for t in found:
        if t.model is None:
            out.append(t)
            continue
        groups.setdefault(t.model.digest, []).append(t)
    for group in groups.values():
        keep = next((t for t in group if _quant_of_tag(t.tag) is not None), group[0])
        seen = {keep.tag}
        for t in group:
            if t.tag not in seen:
                keep.aliases.append(t.tag)
                seen.add(t.tag)
        out.append(keep)
    return out


def _parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """fn over items on a thread pool, results in order; the first failure (in order) is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(MAX_CONCURRENCY, len(items)))
    try:
        futures = [pool.submit(fn, x) for x in items]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# Candidates


def _label(t: _Tag, header: GGUFHeader | None) -> tuple[str, str | None]:
    """The quant label: the config's file_type, else the tag's suffix, else the header's general.file_type."""
    file_type = t.config.get("file_type")
    if isinstance(file_type, str) and file_type.strip():
        return normalize_label(file_type), None
    from_tag = _quant_of_tag(t.tag)
    if from_tag is not None:
        return from_tag, None
    if header is not None:
        ft = header.get("general.file_type")
        from_header = file_type_label(ft if isinstance(ft, int) else None)
        if from_header is not None:
            return from_header, None
    return normalize_label(t.tag), f"quant not declared: labelled by its tag {t.tag!r}"


def _file(layer: _Layer, blob_url: str) -> CandidateFile:
    return CandidateFile(name=layer.digest, size_bytes=layer.size, url=blob_url, sha256=layer.digest.split(":", 1)[1])


def _candidate(
    given: str, name: OllamaName, base: str, t: _Tag, header: GGUFHeader | None, notes: list[str]
) -> Candidate:
    assert t.model is not None
    repo = f"{base}/v2/{name.namespace}/{name.model}/blobs"
    label, label_note = _label(t, header)
    notes = list(notes)
    if label_note:
        notes.append(label_note)
    if t.aliases:
        notes.append("also tagged " + ", ".join(t.aliases))
    if t.n_model_layers > 1:
        notes.append(f"the manifest has {t.n_model_layers} model layers; the first is listed")
    if t.config.get("requires"):
        notes.append(f"needs Ollama {t.config['requires']} or newer")
    projector = _file(t.projector, f"{repo}/{t.projector.digest}") if t.projector is not None else None
    return Candidate(
        model=given,
        source="ollama",
        quant=label,
        files=(_file(t.model, f"{repo}/{t.model.digest}"),),
        header=header,
        projector=projector,
        ollama_model=name.with_tag(t.tag),
        notes=tuple(notes),
    )


def _sorted(cands: list[Candidate]) -> list[Candidate]:
    def key(c: Candidate) -> tuple[float, int]:
        return (-quant_info(c.quant, c.bits_per_weight).rank, -c.size_bytes)

    return sorted(cands, key=key)


def _listing_key(base: str, name: OllamaName) -> str:
    return f"{base}|{name.namespace}/{name.model}|{'' if name.tag in (None, 'latest') else name.tag}"


def _decode_listing(data: Any) -> tuple[list[_Tag], str | None] | None:
    """(tags, listing note) from a kept listing's data, or None (unreadable)."""
    if not isinstance(data, dict):
        return None
    try:
        tags = [_Tag.from_json(d) for d in data["tags"]]
        note = data.get("note")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    if not tags or any(t.model is None for t in tags) or not (note is None or isinstance(note, str)):
        return None
    return tags, note


def list_candidates(
    name: str,
    *,
    client: httpx.Client | None = None,
    refresh: bool = False,
    offline: bool = False,
) -> list[Candidate]:
    """Every quant of an Ollama registry model (`name`, `name:tag`, `ns/name:tag`, `host/ns/name:tag`).

    A listing younger than `launcher.catalog.cache.LISTING_TTL_S` is used as it is unless `refresh`; `offline`
    uses only cached listings and headers; a registry that does not answer falls back to a cached listing with a
    note. Headers are cached by blob digest. Raises CatalogError (one line naming the model and the cause).
    """
    from launcher.catalog import cache

    parsed = parse_name(name)
    base = _registry_base(parsed.host)
    own_client = None
    if client is None and not offline:
        own_client = client = make_client(max_connections=MAX_CONCURRENCY + 4)
    store = _Store()
    fetched_headers: list[_Headers] = []

    def fetch() -> tuple[tuple[list[_Tag], str | None], Any]:
        assert client is not None  # never called offline
        registry = _Registry(name, parsed, base, client, store, refresh)
        headers = _Headers(base, parsed, client)
        tags, note = registry.resolve(headers.get)
        with_model = [t for t in tags if t.model is not None]
        if not with_model:
            raise registry.error(
                "no GGUF model layer in its manifest (a hosted-only '-cloud' tag, or a format fitquant cannot read)"
            )
        _parallel(registry.config, with_model)
        fetched_headers.append(headers)
        return (with_model, note), {"tags": [t.to_json() for t in with_model], "note": note}

    try:
        listed = cache.fetch_listing(
            SOURCE,
            _listing_key(base, parsed),
            decode=_decode_listing,
            fetch=fetch,
            unreachable=_Unreachable,
            never_listed=(
                f"ollama registry: model {name!r}: offline, and it has not been listed before (list it once online)"
            ),
            refresh=refresh,
            offline=offline,
        )
        tags, note = listed.value
        if listed.stale_since is not None:
            return _candidates(name, parsed, base, tags, note, None, offline_since=listed.stale_since)
        return _candidates(name, parsed, base, tags, note, client, headers=next(iter(fetched_headers), None))
    finally:
        store.save()
        if own_client is not None:
            own_client.close()


class _Headers:
    """Model blob headers, once per digest: from the header cache, else read by Range requests (and kept)."""

    def __init__(self, base: str, name: OllamaName, client: httpx.Client | None) -> None:
        self.repo_url = f"{base}/v2/{name.namespace}/{name.model}/blobs"
        self.client = client
        self.lock = threading.Lock()
        self.done: dict[str, tuple[GGUFHeader | None, str | None]] = {}
        self.failed: set[str] = set()  # digests whose header could not be read (not: not cached while offline)

    def get(self, t: _Tag) -> tuple[GGUFHeader | None, str | None]:
        """(header, None), or (None, why not)."""
        from launcher.catalog import cache

        assert t.model is not None
        digest = t.model.digest
        with self.lock:
            if digest in self.done:
                return self.done[digest]
        url = f"{self.repo_url}/{digest}"
        key = cache.header_key([digest])
        head = cache.load_header(key, source=url)
        result: tuple[GGUFHeader | None, str | None] = (head, None)
        if head is None and self.client is None:
            result = (None, "offline: header not cached")
        elif head is None:
            from launcher.gguf import read_header

            try:
                head = read_header(url, client=self.client)
                cache.store_header(key, head)
                result = (head, None)
            except GGUFFormatError as exc:
                with self.lock:
                    self.failed.add(digest)
                result = (None, _one_line(f"header not read: {exc}"))
        with self.lock:
            self.done[digest] = result
        return result


def _candidates(
    given: str,
    name: OllamaName,
    base: str,
    tags: list[_Tag],
    note: str | None,
    client: httpx.Client | None,
    *,
    headers: _Headers | None = None,
    offline_since: float | None = None,
) -> list[Candidate]:
    """Candidates of the tags (model layer present), headers read concurrently; best quality first."""
    from launcher.catalog import cache

    headers = headers or _Headers(base, name, client)
    heads = _parallel(headers.get, tags)
    if len(headers.failed) == len(tags):  # nothing to plan with: say why, once
        first = next(err for _, err in heads if err)
        cause = first.replace("header not read: ", "cannot read the GGUF header: ", 1)
        raise CatalogError(_one_line(f"ollama registry: model {given!r}: {cause}"))
    cands = []
    for t, (head, err) in zip(tags, heads, strict=True):
        notes = []
        if offline_since is not None:
            notes.append(cache.stale_note(offline_since))
        if err:
            notes.append(err)
        if note and t.tag == "latest":
            notes.append(note)
        cands.append(_candidate(given, name, base, t, head, notes))
    return _sorted(cands)
