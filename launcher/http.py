"""The one HTTP layer: a client factory, one retry policy, and the one place httpx exceptions are caught.

- `make_client(...)`: an httpx.Client with `User-Agent: fitquant/<version>`, connect and read timeouts, redirects
  followed, and the caller's credentials. `BearerAuth` sends a token to one host and no other; `hf_auth()` is the
  Hugging Face one (HF_TOKEN, for the host of HF_ENDPOINT or huggingface.co). httpx applies credentials to the
  first request only and drops `Authorization` on a redirect to another origin, so a token never reaches a CDN.
- `translate()`: a context manager that turns httpx exceptions into `HttpFailure` (what kind, its text, whether
  another attempt may help); `status_failure(response)` does the same for a status the caller did not want.
  No other module catches httpx exceptions.
- `call(attempt, error=...)`: runs `attempt` inside `translate()`, retrying transient failures (connect and read
  errors, timeouts, bodies cut short, HTTP 408, 429 and 5xx) at most RETRY_ATTEMPTS times and starting none
  after RETRY_STOP_AFTER_S, with exponential waits from RETRY_WAIT_S (the knob tests set to 0) up to
  RETRY_WAIT_MAX_S. The failure that ends it becomes `error(failure)`: a FitquantError in the caller's words.

Tokens never appear in a message: every HttpFailure text is scrubbed of the tokens given to BearerAuth, of the
request's Authorization header and of its URL's query string. httpx and tenacity are imported on first use, so
importing this module costs nothing (`fitquant --help` stays instant).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import ssl

    import httpx

    from launcher.errors import FitquantError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "RETRY_ATTEMPTS",
    "RETRY_STOP_AFTER_S",
    "RETRY_WAIT_MAX_S",
    "RETRY_WAIT_S",
    "TIMEOUT_S",
    "BearerAuth",
    "HttpFailure",
    "call",
    "hf_auth",
    "hf_endpoint",
    "is_url",
    "make_client",
    "redact_url",
    "retrying",
    "scrub",
    "ssl_context",
    "status_failure",
    "timeout",
    "translate",
    "user_agent",
]

T = TypeVar("T")

TIMEOUT_S = 10.0  # read (and write, pool) timeout
CONNECT_TIMEOUT_S = 5.0
RETRY_ATTEMPTS = 3
RETRY_WAIT_S = 0.5  # exponential backoff: 0.5 s, 1 s (module-level so tests can set 0)
RETRY_WAIT_MAX_S = 4.0
RETRY_STOP_AFTER_S = 15.0  # no new attempt after this: with the timeouts above, a dead server fails in ~21 s
DEFAULT_HF_ENDPOINT = "https://huggingface.co"

# How an exchange failed: no connection, no answer in time, an answer cut short, another transport error (all
# transient); a redirect loop, a URL httpx refuses, another httpx error; an unwanted status; an unusable body.
FailureKind = Literal[
    "connect", "timeout", "cut_short", "transport", "redirects", "invalid_url", "http", "status", "body"
]

# Every token handed to BearerAuth: scrubbed from every message this module builds.
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# Clients and credentials


@lru_cache(maxsize=1)
def user_agent() -> str:
    """`fitquant/<version>`, the version of the installed distribution (else the package's own)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fitquant/{version('fitquant')}"
    except PackageNotFoundError:
        from launcher.version import __version__

        return f"fitquant/{__version__}"


@lru_cache(maxsize=2)
def ssl_context(trust_env: bool = True) -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs; SSL_CERT_FILE and SSL_CERT_DIR too where `trust_env`), built once
    and shared by every client (httpx's advice): building one loads the CA bundle, 26 ms on this project's 2-core
    test machine, which each new client paid, even one that only ever speaks plain HTTP to 127.0.0.1 (a load's
    readiness poll made one every 50 ms)."""
    import httpx

    return httpx.create_ssl_context(trust_env=trust_env)


def timeout(read_s: float = TIMEOUT_S, connect_s: float = CONNECT_TIMEOUT_S) -> httpx.Timeout:
    """An httpx.Timeout: `connect_s` to connect, `read_s` for every other phase."""
    import httpx

    return httpx.Timeout(read_s, connect=connect_s)


class BearerAuth:
    """`Authorization: Bearer <token>` on requests to `host`, on no other (httpx auth: a callable on the request)."""

    __slots__ = ("_token", "host")

    def __init__(self, token: str, *, host: str) -> None:
        self._token = token
        self.host = host.lower()
        with _secrets_lock:
            _secrets.add(token)
            _secrets.add(f"Bearer {token}")

    def __call__(self, request: httpx.Request) -> httpx.Request:
        if self.host and request.url.host == self.host:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return f"BearerAuth(host={self.host!r}, token='***')"


def hf_endpoint(endpoint: str | None = None) -> str:
    """The Hub to ask: `endpoint`, else `HF_ENDPOINT`, else https://huggingface.co (no trailing slash)."""
    value = endpoint or os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_HF_ENDPOINT
    return value.rstrip("/")


def hf_auth(token: str | None = None, *, endpoint: str | None = None) -> BearerAuth | None:
    """The Hugging Face token (`token`, else HF_TOKEN) for the Hub's host only (see `hf_endpoint`); None without one."""
    from urllib.parse import urlsplit

    value = (token if token is not None else os.environ.get("HF_TOKEN", "")).strip()
    if not value:
        return None
    try:
        host = urlsplit(hf_endpoint(endpoint)).hostname or ""
    except ValueError:
        host = ""  # an unreadable endpoint matches no host: the token goes nowhere
    return BearerAuth(value, host=host)


def make_client(
    *,
    auth: BearerAuth | None = None,
    timeout_s: float = TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    max_connections: int | None = None,
    trust_env: bool = True,
) -> httpx.Client:
    """An httpx.Client for fitquant: its User-Agent, these timeouts, redirects followed, `auth` on its host only.

    `max_connections` sizes the pool (and its keep-alive connections) for concurrent readers; `trust_env=False`
    ignores proxy settings from the environment (a loopback request must not go through a proxy).
    """
    import httpx

    limits = (
        httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if max_connections is not None
        else httpx.Limits()
    )
    return httpx.Client(
        auth=auth,
        follow_redirects=True,
        timeout=timeout(timeout_s, connect_timeout_s),
        headers={"User-Agent": user_agent()},
        limits=limits,
        verify=ssl_context(trust_env),
        trust_env=trust_env,
    )


# ---------------------------------------------------------------------------------------------------------------
# Failures


@dataclass(eq=False)
class HttpFailure(Exception):
    """One HTTP exchange failed. `text` says why in words a message can quote ("ConnectError: ...",
    "HTTP 503 Service Unavailable", "too many redirects (a redirect loop?)"); `error` and `cause` are the httpx
    exception's type name and text; `transient` says whether another attempt may help; `attempts` how many
    were made (set by `retrying`)."""

    text: str
    _: KW_ONLY
    kind: FailureKind
    transient: bool
    error: str | None = None
    cause: str = ""
    attempts: int = 1

    def __str__(self) -> str:
        return self.text

    @property
    def unreachable(self) -> bool:
        """No answer at all (connection refused, timeouts): a cached answer may stand in."""
        return self.kind in ("connect", "timeout")

    @property
    def tries(self) -> str:
        """ " (after N attempts)" when more than one attempt was made, else ""."""
        return f" (after {self.attempts} attempts)" if self.attempts > 1 else ""


def is_url(source: str) -> bool:
    """Whether `source` is an http(s) URL (case-insensitive scheme)."""
    return source[:8].lower().startswith(("http://", "https://"))


def redact_url(source: str) -> str:
    """`source` without query string, fragment or user info: safe to show. Not a URL: unchanged."""
    if not is_url(source):
        return source
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(source)
    except ValueError:
        return source.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: str, *, urls: Iterable[str] = (), secrets: Iterable[str] = ()) -> str:
    """`text` with each of `urls` redacted (`redact_url`) and each secret, and every BearerAuth token, as ***."""
    for url in urls:
        if url:
            text = text.replace(url, redact_url(url))
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)  # "Bearer x" before "x"
    for secret in (*secrets, *known):
        if secret:
            text = text.replace(secret, "***")
    return text


def _from_exception(exc: Exception, kind: FailureKind, transient: bool, text: str | None = None) -> HttpFailure:
    urls: list[str] = []
    secrets: list[str] = []
    try:
        request = exc.request  # type: ignore[attr-defined]  # httpx.RequestError; RuntimeError when unset
    except (AttributeError, RuntimeError):
        request = None
    if request is not None:
        urls.append(str(request.url))
        authorization = request.headers.get("Authorization")
        if authorization:
            secrets.append(authorization)
    cause = scrub(str(exc), urls=urls, secrets=secrets)
    error = type(exc).__name__
    return HttpFailure(text or f"{error}: {cause}", kind=kind, transient=transient, error=error, cause=cause)


@contextmanager
def translate() -> Iterator[None]:
    """Turn an httpx exception raised inside into an HttpFailure (raised from None); let everything else through."""
    import httpx

    try:
        yield
    except httpx.TooManyRedirects as exc:
        raise _from_exception(exc, "redirects", False, "too many redirects (a redirect loop?)") from None
    except httpx.ConnectError as exc:
        raise _from_exception(exc, "connect", True) from None
    except httpx.TimeoutException as exc:
        raise _from_exception(exc, "timeout", True) from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise _from_exception(exc, "cut_short", True) from None
    except httpx.TransportError as exc:
        raise _from_exception(exc, "transport", True) from None
    except httpx.InvalidURL as exc:
        raise _from_exception(exc, "invalid_url", False) from None
    except httpx.HTTPError as exc:
        raise _from_exception(exc, "http", False) from None


def is_transient_status(status: int) -> bool:
    """Whether another attempt may get a better answer than `status`: 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


def status_failure(response: httpx.Response) -> HttpFailure:
    """The failure of an answer with an unwanted status: text "HTTP 503 Service Unavailable"."""
    status = response.status_code
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    return HttpFailure(reason, kind="status", transient=is_transient_status(status))


# ---------------------------------------------------------------------------------------------------------------
# Retries and the mapping to fitquant's errors


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, HttpFailure) and exc.transient


def retrying(attempt: Callable[[], T]) -> T:
    """`attempt()` inside `translate()`, again while it fails transiently (the policy in the module docstring).

    The HttpFailure that ends it is raised with `attempts` set; any other exception is raised at once.
    """
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

    count = 0

    def once() -> T:
        nonlocal count
        count += 1
        with translate():
            return attempt()

    policy = Retrying(
        stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_STOP_AFTER_S),
        wait=wait_exponential(multiplier=RETRY_WAIT_S, max=RETRY_WAIT_MAX_S),
        retry=retry_if_exception(_is_transient),
        reraise=True,
    )
    try:
        return policy(once)
    except HttpFailure as failure:
        failure.attempts = count
        raise


def call(attempt: Callable[[], T], *, error: Callable[[HttpFailure], FitquantError], retry: bool = True) -> T:
    """`attempt()` with retries (`retrying`; once without when `retry` is False); a failure that ends it is raised
    as `error(failure)`, from None, so the caller words its own message and no httpx exception escapes."""
    try:
        if retry:
            return retrying(attempt)
        with translate():
            return attempt()
    except HttpFailure as failure:
        raise error(failure) from None
