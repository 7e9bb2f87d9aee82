"""launcher.http against a real HTTP server on 127.0.0.1: user agent, credentials per host, retries, error mapping."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from hf_server import refused_endpoint
from local_server import start_server, stop_server

from launcher import __version__, http
from launcher.errors import CatalogError


class ScriptedServer:
    """Answers each path from a script: a list of statuses used in turn (the last one repeats), or a redirect.

    `redirects[path] = url` answers 302 to `url`; `latency_s` sleeps before every answer. Records (path, headers).
    """

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        self.redirects: dict[str, str] = {}
        self.latency_s = 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.httpd = start_server(self.handle)
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((h.path, dict(h.headers)))
            statuses = self.script.get(h.path, [200])
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        time.sleep(self.latency_s)
        body = b"ok" if status == 200 else b""
        if h.path in self.redirects:
            status, body = 302, b""
        with contextlib.suppress(OSError):  # the client may have given up waiting (the timeout tests)
            h.send_response(status)
            if status == 302:
                h.send_header("Location", self.redirects[h.path])
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    def close(self) -> None:
        stop_server(self.httpd)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


def _get_text(client: httpx.Client, url: str) -> str:
    """One attempt: the body of a 200, else the status as an HttpFailure."""
    response = client.get(url)
    if response.status_code != 200:
        raise http.status_failure(response)
    return response.text


def _as_catalog_error(failure: http.HttpFailure) -> CatalogError:
    return CatalogError(f"test: {failure.text}{failure.tries if failure.transient else ''}")


# ---------------------------------------------------------------------------------------------------------------
# The client


def test_client_sends_the_fitquant_user_agent(server: ScriptedServer) -> None:
    with http.make_client() as client:
        assert client.get(server.url("/x")).status_code == 200
    assert server.requests[0][1]["User-Agent"] == f"fitquant/{__version__}" == http.user_agent()


def test_client_follows_redirects(server: ScriptedServer) -> None:
    server.redirects["/a"] = server.url("/b")
    with http.make_client() as client:
        assert _get_text(client, server.url("/a")) == "ok"
    assert [p for p, _ in server.requests] == ["/a", "/b"]


def test_hf_token_goes_to_the_hub_host_and_not_to_a_redirect_target_on_another_host(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    server.redirects["/resolve/m.gguf"] = server.url("/blob/m.gguf", host="localhost")  # the CDN: another host
    with http.make_client(auth=http.hf_auth()) as client:
        assert _get_text(client, server.url("/resolve/m.gguf")) == "ok"
        assert _get_text(client, server.url("/blob/m.gguf", host="localhost")) == "ok"  # asked directly, too
    auth = [(path, headers.get("Authorization")) for path, headers in server.requests]
    assert auth == [("/resolve/m.gguf", "Bearer hf_SECRET"), ("/blob/m.gguf", None), ("/blob/m.gguf", None)]


def test_hf_token_is_not_sent_when_the_hub_is_another_host(server: ScriptedServer) -> None:
    auth = http.hf_auth("hf_SECRET")  # HF_ENDPOINT unset: huggingface.co
    assert auth is not None and auth.host == "huggingface.co"
    with http.make_client(auth=auth) as client:
        client.get(server.url("/x"))
    assert "Authorization" not in server.requests[0][1]


def test_no_token_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    assert http.hf_auth() is None
    monkeypatch.setenv("HF_TOKEN", "  ")
    assert http.hf_auth() is None


def test_credentials_never_show_their_token() -> None:
    auth = http.BearerAuth("hf_SECRET", host="example.com")
    assert "hf_SECRET" not in repr(auth) and "hf_SECRET" not in str(auth)


# ---------------------------------------------------------------------------------------------------------------
# Retries


def test_503_then_429_are_retried_until_success(server: ScriptedServer) -> None:
    server.script["/x"] = [503, 429, 200]
    with http.make_client() as client:
        assert http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error) == "ok"
    assert len(server.requests) == 3


def test_attempts_are_bounded(server: ScriptedServer) -> None:
    server.script["/x"] = [503]
    with http.make_client() as client, pytest.raises(CatalogError) as info:
        http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error)
    assert str(info.value) == f"test: HTTP 503 Service Unavailable (after {http.RETRY_ATTEMPTS} attempts)"
    assert len(server.requests) == http.RETRY_ATTEMPTS == 3


def test_total_time_is_bounded(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_STOP_AFTER_S", 0.05)
    server.latency_s = 0.1  # the first answer comes after the deadline: no second attempt
    server.script["/x"] = [503]
    with http.make_client() as client, pytest.raises(CatalogError) as info:
        http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error)
    assert str(info.value) == "test: HTTP 503 Service Unavailable"
    assert len(server.requests) == 1


def test_waits_grow_from_the_knob(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "RETRY_WAIT_S", 0.05)
    server.script["/x"] = [503]
    started = time.monotonic()
    with http.make_client() as client, pytest.raises(CatalogError):
        http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error)
    assert time.monotonic() - started >= 0.05 + 0.1  # 0.05 s, then 0.1 s


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(server: ScriptedServer, status: int) -> None:
    server.script["/x"] = [status]
    with http.make_client() as client, pytest.raises(CatalogError) as info:
        http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error)
    assert str(info.value).startswith(f"test: HTTP {status} ") and "attempts" not in str(info.value)
    assert len(server.requests) == 1


def test_no_retry_when_told(server: ScriptedServer) -> None:
    server.script["/x"] = [503]
    with http.make_client() as client, pytest.raises(CatalogError) as info:
        http.call(lambda: _get_text(client, server.url("/x")), error=_as_catalog_error, retry=False)
    assert str(info.value) == "test: HTTP 503 Service Unavailable"
    assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------------
# Error mapping


def _failure_of(attempt: Callable[[], object]) -> http.HttpFailure:
    failures: list[http.HttpFailure] = []

    def error(failure: http.HttpFailure) -> CatalogError:
        failures.append(failure)
        return CatalogError("mapped")

    with pytest.raises(CatalogError, match=r"^mapped$") as info:
        http.call(attempt, error=error)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised from None: no httpx trace
    return failures[0]


def test_connection_refused_is_transient_and_unreachable() -> None:
    url = refused_endpoint()
    with http.make_client() as client:
        failure = _failure_of(lambda: client.get(url))
    assert (failure.kind, failure.transient, failure.unreachable, failure.error) == (
        "connect",
        True,
        True,
        "ConnectError",
    )
    assert failure.text == f"ConnectError: {failure.cause}" and failure.attempts == 3


def test_a_timeout_is_transient_and_unreachable(server: ScriptedServer) -> None:
    server.latency_s = 0.5
    with http.make_client(timeout_s=0.05) as client:
        failure = _failure_of(lambda: client.get(server.url("/x")))
    assert (failure.kind, failure.unreachable, failure.error) == ("timeout", True, "ReadTimeout")
    assert len(server.requests) == 3


def test_a_redirect_loop_is_one_failure_not_retried(server: ScriptedServer) -> None:
    server.redirects["/a"] = server.url("/b")
    server.redirects["/b"] = server.url("/a")
    with http.make_client() as client:
        failure = _failure_of(lambda: client.get(server.url("/a")))
    assert (failure.kind, failure.transient, failure.text) == (
        "redirects",
        False,
        "too many redirects (a redirect loop?)",
    )
    assert len(server.requests) == 21  # httpx's max_redirects is 20


def test_an_invalid_url_is_not_retried() -> None:
    with http.make_client() as client:
        failure = _failure_of(lambda: client.get("http://[::1/"))
    assert (failure.kind, failure.transient, failure.error) == ("invalid_url", False, "InvalidURL")


def test_failure_texts_never_show_tokens_or_signed_queries() -> None:
    http.BearerAuth("hf_SECRET", host="example.com")
    request = httpx.Request("GET", "https://cdn.example/blob?sig=SIGNED", headers={"Authorization": "Bearer mine"})
    with pytest.raises(http.HttpFailure) as info, http.translate():
        raise httpx.ReadError(
            "lost https://cdn.example/blob?sig=SIGNED with hf_SECRET and Bearer mine", request=request
        )
    text = info.value.text
    assert text == "ReadError: lost https://cdn.example/blob with *** and ***"
    assert info.value.kind == "cut_short" and info.value.transient


def test_other_exceptions_pass_through_untouched() -> None:
    with pytest.raises(KeyError), http.translate():
        raise KeyError("not http")
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise ValueError("not retried")

    with pytest.raises(ValueError, match="not retried"):
        http.call(attempt, error=_as_catalog_error)
    assert calls == [1]


def test_importing_it_imports_neither_httpx_nor_tenacity() -> None:
    code = (
        "import sys, launcher; before = set(sys.modules); import launcher.http; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('httpx', 'tenacity')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_clients_share_one_tls_context_so_none_reloads_the_ca_bundle(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building a TLS context loads the CA bundle (26 ms on the 2-core test machine): every client fitquant makes
    shares the one built at first use, a server's readiness wait (a loopback poll every 50 ms) and the warm-up's
    requests included, where each used to build its own."""
    import ssl

    from launcher.backends.base import Instance
    from launcher.backends.llamacpp import LlamaCppBackend
    from launcher.chat import ChatError, count_tokens

    assert http.ssl_context(True) is http.ssl_context(True) and http.ssl_context(False) is http.ssl_context(False)
    loaded: list[object] = []
    real = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                        lambda self, *a, **k: loaded.append(a) or real(self, *a, **k))  # fmt: skip
    for trust_env in (True, False):
        with http.make_client(trust_env=trust_env) as client:
            assert client.get(server.url("/x")).status_code == 200
    server.script["/health"] = [503, 503, 200]  # loading, loading, ready
    instance = Instance("llamacpp", "llama-server", None, server.url("/v1"), "m", None, port=server.port)
    LlamaCppBackend().wait_ready(instance, timeout_s=10)
    assert [p for p, _ in server.requests].count("/health") == 3
    with pytest.raises(ChatError, match="answered 501"):  # the scripted server answers GETs only: the request was made
        count_tokens(instance, "hello", timeout_s=5)
    assert loaded == []
    # a plain httpx client builds its own, which is what the shared one saves
    httpx.Client().close()
    assert loaded
