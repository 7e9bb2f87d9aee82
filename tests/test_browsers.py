"""The rules by which `fitquant serve` keeps web pages out (launcher.service.browsers): which Origin a page may
send, and which Host names a loopback server (the DNS rebinding guard). Ollama's defaults, checked case by case;
the router applies them per request (tests/test_serve.py runs them through a real `fitquant serve`)."""

from __future__ import annotations

import socket

import pytest

from launcher.service.browsers import host_allowed, host_name, origin_allowed


@pytest.mark.parametrize("origin", [
    "http://localhost", "http://localhost:3000", "https://127.0.0.1:8443", "http://0.0.0.0:5173", "http://[::1]:8080",
    "HTTP://LOCALHOST:3000", "app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://1abc",
    "chrome-extension://jfgfiigpkhlkbnfnbobbkinehhfdhndo", "moz-extension://4b1a-77",
])  # fmt: skip
def test_a_local_page_an_app_or_an_extension_may_use_the_server(origin: str) -> None:
    assert origin_allowed(origin)


@pytest.mark.parametrize("origin", [
    "https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io:8080", "null",
    "http://192.168.1.20:3000", "https://localhost:3000.evil.example/x", "http://[::2]:80",
])  # fmt: skip
def test_any_other_page_may_not(origin: str) -> None:
    assert not origin_allowed(origin)


def test_the_profile_adds_origins_by_pattern() -> None:
    extra = ["https://chat.example.com", "http://192.168.1.*:3000"]
    assert origin_allowed("https://chat.example.com", extra)
    assert origin_allowed("HTTPS://Chat.Example.com", extra)
    assert origin_allowed("http://192.168.1.20:3000", extra)
    assert not origin_allowed("https://chat.example.com.evil.example", extra)
    assert not origin_allowed("http://192.168.1.20:3001", extra)
    assert not origin_allowed("http://192.168.1.20/:3000", extra)  # `*` stays within one part
    assert origin_allowed("https://anything.example", ["*"])


@pytest.mark.parametrize(("header", "name"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("[::1]", "::1"), ("Evil.Example.:8080", "evil.example"),
    ("localhost", "localhost"), (" LOCALHOST:80 ", "localhost"),
])  # fmt: skip
def test_the_name_a_host_header_gives(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize("header", [
    None, "", "localhost:8080", "LOCALHOST", "localhost.:8080", "app.localhost:8080", "127.0.0.1:8080",
    "127.1.2.3", "[::1]:8080", "192.168.1.20:8080", socket.gethostname(), "host.docker.internal:8080",
    "homeserver.local",
])  # fmt: skip
def test_a_request_that_names_the_server_as_this_machine_does_passes(header: str | None) -> None:
    assert host_allowed(header)


@pytest.mark.parametrize("header", [
    "evil.example:8080", "localhost.evil.example", "rebind.127.0.0.1.nip.io:8080", "llm.home.arpa:8080", "[::1",
    "internal.evil.example", "local.evil.example:8080",
])  # fmt: skip
def test_a_name_that_is_not_this_machine_is_the_rebinding_guard_s_refusal(header: str) -> None:
    assert not host_allowed(header)


def test_the_profile_adds_host_names_for_a_reverse_proxy() -> None:
    assert host_allowed("llm.home.arpa:8080", ["llm.home.arpa"])
    assert host_allowed("a.home.arpa", ["*.home.arpa"])
    assert not host_allowed("home.arpa.evil.example", ["*.home.arpa"])
    assert host_allowed("anything.example", ["*"])


def test_a_header_longer_than_any_browser_sends_is_refused_before_a_pattern_reads_it() -> None:
    # a pattern of several stars against a long name backtracks for ages: the length bound comes first
    slow = ["*a*a*a*a*a*a*b"]
    assert not host_allowed("a" * 100_000 + ":8080", slow)
    assert not origin_allowed("http://" + "a" * 100_000, ["http://*a*a*a*a*a*a*b"])
    assert host_allowed("a" * 250 + "b", slow)  # within the bound, the same pattern still matches


@pytest.mark.parametrize("header", ["ev\xffil.example", "\x00", "evil.example\r\nX: y", "[evil.example]:80"])
def test_odd_bytes_in_a_host_header_are_a_refusal_not_a_failure(header: str) -> None:
    assert not host_allowed(header)
