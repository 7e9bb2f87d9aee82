"""launcher.gguf (through launcher.http) over HTTP, against a real server on 127.0.0.1 that honours Range, redirects, and misbehaves."""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from gguf_factory import QT, VT, big_vocab_file, write_gguf
from http_range import begin_range_reply
from local_server import start_server, stop_server

from launcher import http
from launcher.errors import GGUFFormatError
from launcher.gguf import SkippedArray, read_header
from launcher.http import hf_auth

_PIECE = 64 * 1024


class FakeHub:
    """Serves files of `root` at /blob/<name>; /resolve/<name> answers 302 to the blob, as HF resolve URLs do.

    Knobs: `ignore_range` (answer 200 with the whole body), `status` (path -> status to answer always),
    `short_body` (send half the body then hang up), `blob_host` (redirect to another host name).
    Records every request and counts the body bytes it managed to send.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ignore_range = False
        self.status: dict[str, int] = {}
        self.short_body = False
        self.blob_host: str | None = None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.served = 0
        self.lock = threading.Lock()
        self.httpd = start_server(self.handle)
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self, prefix: str = "") -> list[str]:
        return [p.split("?")[0] for p, _ in self.requests if p.startswith(prefix)]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((h.path, dict(h.headers)))
        path = h.path.split("?")[0]
        if path in self.status:
            self._reply(h, self.status[path])
            return
        if path.startswith("/loop/"):
            self._reply(h, 302, {"Location": "/loop/b" if path == "/loop/a" else "/loop/a"})
            return
        if path.startswith("/resolve/"):
            target = "/blob/" + path[len("/resolve/") :]
            if self.blob_host:
                target = self.url(target, self.blob_host)
            self._reply(h, 302, {"Location": target})
            return
        file = self.root / path[len("/blob/") :] if path.startswith("/blob/") else None
        if file is None or not file.is_file():
            self._reply(h, 404)
            return
        span = begin_range_reply(h, file.stat().st_size, honour_range=not self.ignore_range)
        if span is None:
            return
        start, end = span
        length = end - start + 1
        if self.short_body:
            length //= 2
        with open(file, "rb") as f:
            f.seek(start)
            while length > 0:
                piece = f.read(min(_PIECE, length))
                try:
                    h.wfile.write(piece)
                    h.wfile.flush()
                except OSError:  # the client hung up: it has what it needed
                    return
                with self.lock:
                    self.served += len(piece)
                length -= len(piece)
        h.close_connection = True

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def close(self) -> None:
        stop_server(self.httpd)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(http, "RETRY_WAIT_S", 0.001)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    root = tmp_path / "srv"
    root.mkdir()
    server = FakeHub(root)
    yield server
    server.close()


TENSORS = [("token_embd.weight", (8, 256), QT.Q4_K), ("blk.0.attn_q.weight", (4, 64), QT.Q8_0)]


def _same(a, b) -> None:
    assert (a.version, a.metadata, a.tensors, a.alignment, a.data_offset, a.file_size) == (
        b.version,
        b.metadata,
        b.tensors,
        b.alignment,
        b.data_offset,
        b.file_size,
    )


def test_header_from_url_equals_the_local_read(hub):
    (path,) = write_gguf(
        hub.root / "m.gguf", values=[("x.tokens", ["a", "b"], None), ("x.n", 3, VT.UINT32)], tensors=TENSORS
    )
    h = read_header(hub.url("/resolve/m.gguf?download=true"))
    _same(h, read_header(path))
    assert h.source == hub.url("/resolve/m.gguf")
    assert h.shards == (h.source,)


def test_big_header_is_read_with_at_most_one_mib_of_overshoot(hub):
    path = hub.root / "big.gguf"
    header = big_vocab_file(path, n_tokens=400_000, tensor_bytes=512 * 1024**2)
    assert header > 8 * 1024**2 and path.stat().st_size > 40 * header
    h = read_header(hub.url("/resolve/big.gguf"))
    _same(h, read_header(path))
    assert h.get("tokenizer.ggml.tokens") == SkippedArray(VT.STRING, 400_000)
    assert hub.served <= header + 1024**2
    # one resolve, then the redirected blob URL is reused for every further chunk, each at most 1 MiB
    assert hub.paths("/resolve/") == ["/resolve/big.gguf"]
    blob_requests = [hdrs for p, hdrs in hub.requests if p.startswith("/blob/")]
    assert len(blob_requests) == len(hub.requests) - 1 > 5
    for hdrs in blob_requests:
        a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", hdrs["Range"]).groups())
        assert b - a + 1 <= 1024**2


def test_fixed_width_arrays_are_seeked_past_not_downloaded(hub):
    path = hub.root / "big.gguf"
    header = big_vocab_file(path, n_tokens=400_000, tensor_bytes=64 * 1024**2)
    read_header(hub.url("/blob/big.gguf"))
    skipped = 2 * 400_000 * 4  # tokenizer.ggml.scores (f32) and token_type (i32)
    # less than the header: read-ahead overshoots into the first skipped array by up to 1 MiB, little after
    assert hub.served <= header - skipped + 2 * 1024**2 < header - 1024**2


def test_split_set_over_http(hub):
    paths = write_gguf(hub.root / "m.gguf", tensors=[(f"t{i}", (2, 32), QT.F32) for i in range(3)], split_max_tensors=1)
    h = read_header(hub.url("/resolve/m-00002-of-00003.gguf?download=true"))
    _same(h, read_header(paths[0]))
    assert h.shards == tuple(hub.url(f"/resolve/m-0000{i}-of-00003.gguf") for i in (1, 2, 3))
    assert [t.shard for t in h.tensors] == [0, 1, 2]
    assert [p for p, _ in hub.requests if p.startswith("/resolve/")] == [
        f"/resolve/m-0000{i}-of-00003.gguf?download=true" for i in (1, 2, 3)
    ]


def test_split_set_over_http_names_the_missing_shard(hub):
    paths = write_gguf(hub.root / "m.gguf", tensors=[(f"t{i}", (2, 32), QT.F32) for i in range(3)], split_max_tensors=1)
    paths[2].unlink()
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/resolve/m-00001-of-00003.gguf"))
    assert str(info.value) == (
        f"{hub.url('/resolve/m-00003-of-00003.gguf')}: shard 3 of 3: read bytes 0-65535: HTTP 404 Not Found"
    )


def test_404_is_not_retried(hub):
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/nope.gguf?token=SECRET"))
    assert str(info.value) == f"{hub.url('/blob/nope.gguf')}: read bytes 0-65535: HTTP 404 Not Found"
    assert info.value.source == hub.url("/blob/nope.gguf")
    assert len(hub.requests) == 1


def test_500_is_retried_then_reported_once(hub):
    hub.status["/blob/m.gguf"] = 500
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/m.gguf"))
    assert str(info.value) == (
        f"{hub.url('/blob/m.gguf')}: read bytes 0-65535: HTTP 500 Internal Server Error (after 3 attempts)"
    )
    assert len(hub.requests) == 3


def test_connection_refused_is_retried_then_reported(hub):
    hub.close()
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/m.gguf"))
    assert "read bytes 0-65535: ConnectError" in str(info.value) and "(after 3 attempts)" in str(info.value)


def test_truncated_body_is_retried_then_reported(hub):
    write_gguf(hub.root / "m.gguf", tensors=TENSORS)
    hub.short_body = True
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/m.gguf"))
    assert "read bytes 0-65535: RemoteProtocolError" in str(info.value)
    assert str(info.value).endswith("(after 3 attempts)")
    assert len(hub.requests) == 3


def test_truncated_file_is_reported_as_truncated(hub):
    (path,) = write_gguf(hub.root / "m.gguf", values=[("x.s", "y" * 5000, VT.STRING)])
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/m.gguf"))
    assert "truncated" in str(info.value) and "before the end of the file (3000 bytes)" in str(info.value)


def test_redirect_loop_is_a_clear_error(hub):
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/loop/a"))
    assert str(info.value) == f"{hub.url('/loop/a')}: read bytes 0-65535: too many redirects (a redirect loop?)"
    assert len(hub.requests) == 21  # httpx's default max_redirects is 20; not retried


def test_server_that_ignores_range_is_streamed_and_dropped(hub):
    path = hub.root / "big.gguf"
    header = big_vocab_file(path, n_tokens=200_000, tensor_bytes=512 * 1024**2)
    hub.ignore_range = True
    h = read_header(hub.url("/resolve/big.gguf"))
    _same(h, read_header(path))
    assert len(hub.requests) == 2  # the resolve, then one streamed GET
    # what reached the socket: the header, plus what the kernel buffered before we hung up
    assert hub.served < header + 32 * 1024**2 < path.stat().st_size // 10


def test_hf_token_goes_to_the_hub_only(hub, monkeypatch):
    (path,) = write_gguf(hub.root / "m.gguf", tensors=TENSORS)
    monkeypatch.setenv("HF_ENDPOINT", hub.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    hub.blob_host = "localhost"  # the blob lives on another host, like HF's CDN
    h = read_header(hub.url("/resolve/m.gguf"), auth=hf_auth())
    _same(h, read_header(path))
    auth = [(p, hdrs.get("Authorization")) for p, hdrs in hub.requests]
    assert auth[0] == ("/resolve/m.gguf", "Bearer hf_SECRET")
    assert all(a is None for p, a in auth[1:]) and len(auth) >= 2


def test_hf_token_is_not_sent_to_other_hosts(hub, monkeypatch):
    write_gguf(hub.root / "m.gguf")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")  # HF_ENDPOINT unset: huggingface.co
    read_header(hub.url("/resolve/m.gguf"), auth=hf_auth())
    assert all("Authorization" not in hdrs for _, hdrs in hub.requests)


def test_errors_never_show_the_token(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    hub.status["/resolve/m.gguf"] = 503
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/resolve/m.gguf?sig=SIGNED"), auth=hf_auth())
    assert "hf_SECRET" not in str(info.value) and "SIGNED" not in str(info.value)
    assert hub.requests[0][1]["Authorization"] == "Bearer hf_SECRET"


def test_a_given_client_is_used_and_its_credentials_stay_on_its_host(hub):
    (path,) = write_gguf(hub.root / "m.gguf", tensors=TENSORS)
    hub.blob_host = "localhost"
    with httpx.Client(headers={"Authorization": "Bearer mine"}) as client:
        h = read_header(hub.url("/resolve/m.gguf"), client=client)
        assert not client.is_closed
    _same(h, read_header(path))
    assert hub.requests[0][1]["Authorization"] == "Bearer mine"
    assert all("Authorization" not in hdrs for _, hdrs in hub.requests[1:])


def test_local_and_remote_agree_on_a_copied_file(hub, tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", values=[("x.nested", [[1, 2], [3]], None)], tensors=TENSORS)
    shutil.copy(path, hub.root / "m.gguf")
    _same(read_header(hub.url("/blob/m.gguf")), read_header(path))


def test_empty_file_is_truncated(hub):
    (hub.root / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFFormatError) as info:
        read_header(hub.url("/blob/empty.gguf"))
    assert "read magic: truncated" in str(info.value)


def test_the_reader_sends_no_token_it_was_not_given(hub, monkeypatch):
    write_gguf(hub.root / "m.gguf", tensors=TENSORS)
    monkeypatch.setenv("HF_ENDPOINT", hub.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    read_header(hub.url("/resolve/m.gguf"))  # no auth=: the reader knows nothing of HF_TOKEN
    assert all("Authorization" not in hdrs for _, hdrs in hub.requests)


def test_inspecting_a_hub_url_sends_the_token_to_the_hub_only(hub, monkeypatch, corpus):
    import launcher

    model = next(m for m in corpus if m.family_name == "tiny-llama")
    shutil.copy(model.path, hub.root / "m.gguf")
    monkeypatch.setenv("HF_ENDPOINT", hub.url(""))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET")
    hub.blob_host = "localhost"
    facts = launcher.read_model_facts(hub.url("/resolve/m.gguf"))
    assert facts.source == hub.url("/resolve/m.gguf")
    assert replace(facts, source="") == replace(launcher.read_model_facts(str(model.path)), source="")
    auth = [(p, hdrs.get("Authorization")) for p, hdrs in hub.requests]
    assert auth[0] == ("/resolve/m.gguf", "Bearer hf_SECRET")
    assert all(a is None for _, a in auth[1:]) and len(auth) >= 2
