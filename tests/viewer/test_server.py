"""The local server: loopback by default, fixed routes only, capped uploads, 4xx + message on bad input."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.viewer.server import ViewerServer, is_loopback

TIMEOUT = 20


@contextlib.contextmanager
def _running(srv: ViewerServer) -> Iterator[ViewerServer]:
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def server() -> Iterator[ViewerServer]:
    with _running(ViewerServer(make_tiny_vit(num_registers=1), port=0, max_upload=64 * 1024)) as srv:
        yield srv


def _png(h: int = 20, w: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _multipart(field: str, filename: str, data: bytes, ctype: str = "image/png") -> tuple[bytes, str]:
    boundary = "vitscopeTESTboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _request(srv: ViewerServer, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Send the raw path as written (no client-side normalisation), loopback only."""
    host, port = srv.server_address[:2]
    assert host == "127.0.0.1"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _viewer_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" class="vitscope-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_binds_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


def test_index_health_and_samples(server):
    with urllib.request.urlopen(server.url, timeout=TIMEOUT) as resp:
        page = resp.read().decode()
    assert resp.status == 200 and 'enctype="multipart/form-data"' in page and 'href="/sample/chelsea"' in page
    with urllib.request.urlopen(server.url + "healthz", timeout=TIMEOUT) as resp:
        assert resp.read() == b"ok\n"
    status, page = _request(server, "GET", "/sample/chelsea")
    assert status == 200
    data = _viewer_data(page)
    assert data["title"] == "chelsea" and data["prefix"] == ["cls", "register"]


def test_upload_returns_the_viewer_for_that_image(server):
    body, ctype = _multipart("image", "my photo.png", _png(20, 30))
    req = urllib.request.Request(server.url + "view", data=body, headers={"Content-Type": ctype}, method="POST")
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        page = resp.read().decode()
    data = _viewer_data(page)
    assert data["title"] == "my photo.png"
    assert (data["image"]["height"], data["image"]["width"]) == (20, 30)
    assert data["layers"] == [0, 1] and len(data["queries"]) == 2 + 16  # [CLS], 1 register, 4 x 4 patches
    assert 'action="/view"' in page  # the upload form stays on the page


@pytest.mark.parametrize(
    ("body", "ctype", "status", "message"),
    [
        (b"just some text", "text/plain", 415, "multipart/form-data"),
        (_multipart("image", "notes.txt", b"not an image at all", "text/plain")[0],
         _multipart("image", "x", b"")[1], 415, "not an image"),
        (_multipart("photo", "a.png", b"\x89PNG")[0], _multipart("photo", "a", b"")[1], 400, "no file field"),
        (b"\x89PNG\r\n\x1a\n truncated", "image/png", 415, "not an image"),
    ],
)
def test_bad_uploads_get_4xx_and_a_message(server, body, ctype, status, message):
    got, text = _request(server, "POST", "/view", body, {"Content-Type": ctype})
    assert got == status
    assert message in text and text.startswith(f"{status} ")


def test_oversized_upload_refused_before_reading(server):
    # announce 10 MB but send nothing: the server must answer from the header alone, not wait for the body
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", "/view")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", str(10 * 2**20))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "byte limit" in resp.read().decode()
    finally:
        conn.close()
    # and an upload just over the cap with its body
    status, _ = _request(server, "POST", "/view", b"\0" * (64 * 1024 + 1), {"Content-Type": "image/png"})
    assert status == 413


def test_decompression_bomb_is_refused():
    from vitscope.viewer.server import UploadError, decode_upload

    with pytest.raises(UploadError) as exc:
        decode_upload(_png(20, 30), max_pixels=100)
    assert exc.value.status == 413


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/sample/../../pyproject.toml",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/sample/..%2F..%2Fsrc%2Fvitscope%2F__init__.py",
        "/sample/chelsea.jpg",
        "/sample/",
        "/viewer.js",
        "/src/vitscope/data/samples/chelsea.jpg",
        "//etc/passwd",
    ],
)
def test_unknown_paths_and_traversal_get_404(server, path):
    status, text = _request(server, "GET", path)
    assert status == 404 and "no such page" in text


def test_post_elsewhere_is_404(server):
    status, _ = _request(server, "POST", "/sample/chelsea", b"x", {"Content-Type": "image/png"})
    assert status == 404


def test_400_megapixel_upload_is_413_not_415(tmp_path):
    from tests.test_limits import big_png
    from vitscope.viewer.server import UploadError, decode_upload

    data = big_png(tmp_path / "huge.png").read_bytes()  # ~1 MB file, 20000x20000 pixels
    with pytest.raises(UploadError) as exc:
        decode_upload(data)
    assert exc.value.status == 413 and "pixels" in exc.value.message


@pytest.fixture(params=[1])
def strict_server(request) -> Iterator[ViewerServer]:
    srv = ViewerServer(make_tiny_vit(), port=0, request_timeout=1.5, max_concurrent=request.param)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)


def test_idle_and_slow_connections_are_closed_and_concurrency_bounded(strict_server):
    import socket
    import time

    host, port = strict_server.server_address[:2]
    idle = socket.create_connection((host, port), timeout=TIMEOUT)
    # the idle connection holds the only slot (accepted first: the listen backlog is first in, first out)
    with socket.create_connection((host, port), timeout=TIMEOUT) as second:
        second.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert second.recv(100).startswith(b"HTTP/1.0 503")
    started = time.monotonic()
    assert idle.recv(100) == b""  # the server gives up on the idle client after request_timeout ...
    idle.close()
    assert time.monotonic() - started < 10
    for _ in range(50):  # ... and frees its slot once its handler thread has finished
        time.sleep(0.1)
        with contextlib.suppress(http.client.RemoteDisconnected, ConnectionResetError):
            if _request(strict_server, "GET", "/healthz") == (200, "ok\n"):
                break
    else:
        raise AssertionError("the slot was never freed")


@pytest.mark.parametrize("strict_server", [8], indirect=True)
def test_slow_uploads_are_cut_off(strict_server):
    import socket
    import time

    host, port = strict_server.server_address[:2]
    # a body that trickles in (100 bytes/s of 1000) is cut off after request_timeout in all, not after 10 s
    slow = socket.create_connection((host, port), timeout=TIMEOUT)
    slow.sendall(b"POST /view HTTP/1.0\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
    started, sent, reply, ended = time.monotonic(), 0, b"", False
    while sent < 1000 and not ended:
        try:
            slow.sendall(b"x" * 10)
            sent += 10
            time.sleep(0.1)
            slow.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                chunk = slow.recv(200)
                reply += chunk
                ended = not chunk or reply.startswith(b"HTTP/1.0 408")
            slow.setblocking(True)
        except OSError:  # the server hung up (a reset may swallow its 408)
            ended = True
    slow.close()
    assert ended and sent < 1000 and time.monotonic() - started < 8, (sent, reply)
    assert reply in (b"",) or reply.startswith(b"HTTP/1.0 408")


def test_clients_that_go_away_are_not_logged(strict_server, capsys):
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        strict_server.quiet = False
        strict_server.handle_error(None, ("127.0.0.1", 1))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        strict_server.handle_error(None, ("127.0.0.1", 1))
    err = capsys.readouterr().err
    assert "Broken" not in err and "Traceback" not in err
    assert err.strip() == "vitscope serve: 127.0.0.1: RuntimeError: boom"


def test_port_problems_are_one_line_errors():
    import socket

    from vitscope.errors import VitscopeError
    from vitscope.viewer.server import make_server

    with pytest.raises(VitscopeError, match="--port: 70000 is not a port number"):
        make_server(make_tiny_vit(), port=70000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(VitscopeError, match="already in use"):
            make_server(make_tiny_vit(), port=s.getsockname()[1])


def _dropped(sock) -> bool:
    """Whether the server closed ``sock`` (end of stream or a reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_trickling_headers_cannot_hold_the_slots():
    """Slowloris: 8 clients that send one header byte every 0.2 s (well inside a per-read timeout) hold all 8
    slots; the deadline covers the whole request, so they are dropped after it and /healthz answers again."""
    import socket
    import time

    from vitscope.viewer.server import make_server

    deadline = 1.0
    with _running(make_server(make_tiny_vit(), request_timeout=deadline, max_concurrent=8, quiet=True)) as srv:
        host, port = srv.server_address[:2]
        socks = [socket.create_connection((host, port), timeout=TIMEOUT) for _ in range(8)]
        head = b"GET /healthz HTTP/1.0\r\nX-Trickle: " + b"a" * 100
        started, sent, alive = time.monotonic(), 0, set(range(8))
        while alive and time.monotonic() - started < 6 * deadline and sent < len(head):  # bounded: 6 s, 100 B
            for i in sorted(alive):
                if _dropped(socks[i]):
                    alive.discard(i)
                else:
                    with contextlib.suppress(OSError):
                        socks[i].sendall(head[sent : sent + 1])
            sent += 1
            time.sleep(0.2)
        took = time.monotonic() - started
        for s in socks:
            s.close()
        assert not alive and took < 4.5 * deadline, (sorted(alive), took)
        for _ in range(20):  # the handler threads end and give their slots back
            with contextlib.suppress(http.client.RemoteDisconnected, ConnectionResetError):
                if _request(srv, "GET", "/healthz") == (200, "ok\n"):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("/healthz never answered 200 after the trickling clients were dropped")


def test_one_request_per_connection(server):
    """A keep-alive client cannot hold a slot with a stream of small requests, each inside its deadline: the
    server speaks HTTP/1.0 without keep-alive, so it answers one and closes (a guard on `protocol_version`)."""
    import socket
    import time

    host, port = server.server_address[:2]
    ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        sock.sendall(ask * 3)
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes (a timeout fails the test)
            reply += chunk
    assert reply.count(b"HTTP/1.0 200 OK") == 1 and reply.endswith(b"\r\n\r\nok\n")
    assert time.monotonic() - started < 5  # closed at once, not after the 30 s request deadline


def _part_bomb(size: int) -> tuple[bytes, str]:
    """A ``size``-byte multipart body of empty parts (9 bytes each), and its content type."""
    part = b"\r\n--b\r\n\r\n"
    body = b"--b\r\n\r\n" + part * ((size - 16) // len(part)) + b"\r\n--b--\r\n"
    return body, "multipart/form-data; boundary=b"


def test_multipart_bomb_is_refused_in_bounded_time():
    """A 10 MiB form of 1.16 M empty parts cost the email parser 87 s of CPU: at most 16 parts, linear scans."""
    import time

    from vitscope.viewer.server import MAX_PARTS, UploadError, parse_upload

    body, ctype = _part_bomb(10 * 2**20)
    assert body.count(b"--b\r\n") > 1_000_000
    size = 10 * 2**20
    bombs = [  # (body, status, message): empty parts, and boundary look-alikes (a Python loop per match took 1.4 s)
        (body, 413, f"more than {MAX_PARTS} parts"),
        (b"--b\r\n\r\n" + b"x--b" * (size // 4), 400, "malformed"),
        (b"--b\r\n\r\n" + b"\r\n--bX" * (size // 6), 400, "malformed"),
    ]
    for bomb, status, message in bombs:
        cpu = time.process_time()
        with pytest.raises(UploadError) as exc:
            parse_upload(ctype, bomb)
        cpu = time.process_time() - cpu
        assert exc.value.status == status and message in exc.value.message
        assert cpu < 1.0, cpu
    # one part under the cap is still fine, and the image is found among the others
    form = b"".join(f"--b\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n".encode()
                    for i in range(MAX_PARTS - 1))
    png = _png(8, 8)
    form += b'--b\r\nContent-Disposition: form-data; name="image"; filename="../a.png"\r\n\r\n' + png + b"\r\n--b--\r\n"
    assert parse_upload(ctype, form) == (png, "a.png")
    with pytest.raises(UploadError, match="more than"):
        parse_upload(ctype, b"--b\r\n\r\nx\r\n" + form)


def test_multipart_bomb_over_http_is_a_quick_4xx():
    import time

    from vitscope.viewer.server import make_server

    body, ctype = _part_bomb(10 * 2**20)
    with _running(make_server(make_tiny_vit(), max_upload=11 * 2**20, quiet=True)) as srv:
        started = time.monotonic()
        host, port = srv.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=5)  # old code: a timeout, 87 s of server CPU
        try:
            conn.request("POST", "/view", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            assert resp.status == 413 and "parts" in resp.read().decode()
        finally:
            conn.close()
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("client", ["urllib", "http.client"])
def test_over_limit_upload_gets_its_413_not_a_reset(server, client):
    """A client that sends its whole 16 MiB body before reading (urllib, http.client) reads the 413: the server
    answers from the headers, then drains a bounded amount of the body before closing."""
    body, ctype = b"\0" * (16 * 2**20), "image/png"
    if client == "urllib":
        req = urllib.request.Request(server.url + "view", data=body, headers={"Content-Type": ctype}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=TIMEOUT)
        status, text = exc.value.code, exc.value.read().decode()
    else:
        status, text = _request(server, "POST", "/view", body, {"Content-Type": ctype})
    assert status == 413 and "byte limit" in text
    assert _request(server, "GET", "/healthz") == (200, "ok\n")


def test_busy_server_answers_503_to_a_client_sending_a_body():
    import socket

    with _running(ViewerServer(make_tiny_vit(), request_timeout=3.0, max_concurrent=1)) as srv:
        host, port = srv.server_address[:2]
        with socket.create_connection((host, port), timeout=TIMEOUT):  # holds the only slot
            status, text = _request(srv, "POST", "/view", b"\0" * (4 * 2**20), {"Content-Type": "image/png"})
        assert status == 503 and "busy" in text


def test_upload_with_a_hostile_file_name(server):
    """A file name in raw non-UTF-8 bytes with markup: the viewer comes back, its title decoded with U+FFFD
    and escaped wherever the page shows it."""
    body, ctype = _multipart("image", "x", _png(20, 30))
    body = body.replace(b'filename="x"', b'filename="\xff\xfe<b onmouseover=x>.png"')
    status, page = _request(server, "POST", "/view", body, {"Content-Type": ctype})
    assert status == 200
    assert _viewer_data(page)["title"] == "\ufffd\ufffd<b onmouseover=x>.png"
    assert "<b onmouseover" not in page


def test_every_page_shares_the_viewers_style(server):
    """One style sheet (viewer.css) in the upload page, a viewer page and a browser's error page; the body
    gets the viewer's font, not the browser's default serif. A client that does not ask for HTML (curl,
    scripts) still gets the one plain-text line."""
    from vitscope.viewer.page import asset, style

    css = style()
    assert css == asset("viewer.css") and re.search(r"\.vitscope-page \{[^}]*font: [^;]*sans-serif", css)
    _, index = _request(server, "GET", "/")
    _, viewer = _request(server, "GET", "/sample/coffee")
    status, error = _request(server, "GET", "/nowhere", headers={"Accept": "text/html,*/*;q=0.8"})
    assert status == 404
    for page in (index, viewer, error):
        assert f"<style>\n{css}\n</style>" in page and '<body class="vitscope-page">' in page
    assert "404 Not Found: no such page (try /)" in error and 'action="/view"' in error  # the form, to retry
    body, ctype = _multipart("image", "notes.txt", b"not an image at all", "text/plain")
    status, error = _request(server, "POST", "/view", body, {"Content-Type": ctype, "Accept": "text/html"})
    assert status == 415 and '<p class="vs-message">415 Unsupported Media Type: the upload is not an image' in error
    assert css in error
    status, error = _request(server, "POST", "/view", b"x", {"Content-Type": "text/<b>x</b>", "Accept": "text/html"})
    assert status == 415 and "(got text/&lt;b&gt;x&lt;/b&gt;)" in error and "<b>x" not in error  # escaped
    assert "script-src" not in error and "default-src 'none'" in error  # the error page runs no script
    status, plain = _request(server, "GET", "/nowhere")  # no Accept: text/html
    assert (status, plain) == (404, "404 Not Found: no such page (try /)\n")
