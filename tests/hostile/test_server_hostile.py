"""The hostile-input catalogue, server part: raw HTTP from hostile or broken clients to one `vitscope serve`
server with small limits (64 KiB uploads, 1 s per request, 8 slots). Every case must get a proper 4xx/5xx
status line (never a hang: the client's socket times out), leave the server healthy (``/healthz`` 200) and write
no file: the server's working folder and temporary folder are hashed before and after (`tree_state`).
"""

from __future__ import annotations

import base64
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_tiny_vit
from tests.hostile.harness import check_contained, tree_state
from vitscope.viewer.server import MAX_PARTS, ViewerServer, make_server

MAX_UPLOAD = 64 * 2**10
DEADLINE = 1.0  # seconds a request may take to arrive, in all
CLIENT_TIMEOUT = 5.0  # a case that gets no answer within this fails (the server hangs) instead of hanging


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes  # what the client sends
    expect: frozenset[int]  # the right statuses
    trickle: float = 0.0  # > 0: one byte every `trickle` seconds (a slowloris), until the server answers
    shut: bool = False  # half-close after sending (a client that stops early); else just wait for the answer


def _req(method: str = "GET", target: str = "/", headers: dict[str, str] | None = None, body: bytes = b"",
         version: str = "HTTP/1.0", length: bool = True) -> bytes:
    heads = dict(headers or {})
    if body and length:
        heads.setdefault("Content-Length", str(len(body)))
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in heads.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _post(body: bytes, ctype: str = "multipart/form-data; boundary=b", headers: dict[str, str] | None = None,
          version: str = "HTTP/1.0", length: bool = True) -> bytes:
    return _req("POST", "/view", {"Content-Type": ctype, **(headers or {})}, body, version, length)


def _form(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(b"--b\r\n" + p + b"\r\n" for p in parts) + (b"--b--\r\n" if close else b"")


def _image_part(data: bytes, extra: str = "", filename: str = "a.png") -> bytes:
    head = f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n{extra}'
    return head.encode() + b"\r\n" + data


def _cases() -> list[Case]:
    s = frozenset
    cases: list[Case] = []
    # -- malformed request lines
    for name, raw, want in [
        ("blank-line", b"\r\n", {400}),
        ("garbage", b"GARBAGE\r\n\r\n", {400}),
        ("method-only", b"GET\r\n\r\n", {400}),
        ("four-words", b"GET / HTTP/1.1 x\r\n\r\n", {400}),
        ("http-9.9", b"GET / HTTP/9.9\r\n\r\n", {505}),
        ("http-2.0", b"GET / HTTP/2.0\r\n\r\n", {505}),
        ("ftp-version", b"GET / FTP/1.0\r\n\r\n", {400}),
        ("version-letters", b"GET / HTTP/1.x\r\n\r\n", {400}),
        ("version-many-dots", b"GET / HTTP/1.1.1\r\n\r\n", {400}),
        ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n", {400}),
        ("post-http-0.9", b"POST /view\r\n\r\n", {400}),
        ("uri-70k", b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", {414}),
    ]:
        cases.append(Case(f"line-{name}", raw, s(want)))
    cases.append(Case("line-cut-short", b"GET / HTT", s({400}), shut=True))
    # -- headers
    many = {f"X-{i}": "1" for i in range(150)}
    cases += [
        Case("headers-150", _req(headers=many), s({431})),
        Case("header-70k", _req(headers={"X-Long": "a" * 70_000}), s({431})),
        Case("content-type-9k", _post(b"x", "multipart/form-data; boundary=b; x=" + "a" * 9000), s({400})),
    ]
    # -- Content-Length: huge, negative, not a number, twice, absent, longer than the body
    for name, value, want in [
        ("negative", "-1", 400), ("letters", "abc", 400), ("float", "1e3", 400), ("hex", "0x10", 400),
        ("underscore", "1_000", 400), ("plus", "+5", 400), ("empty", "", 400), ("20-digits", "9" * 20, 400),
        ("19-digits", "9" * 19, 413), ("over-limit-no-body", str(MAX_UPLOAD + 1), 413),
        ("unicode-digit", "\xb2", 400),
    ]:
        cases.append(Case(f"length-{name}", _post(b"", "image/png", headers={"Content-Length": value}), s({want})))
    cases += [
        Case("length-twice", _post(b"abc", "image/png", headers={"Content-Length": "3"}).replace(
            b"Content-Length: 3\r\n", b"Content-Length: 3\r\nContent-Length: 4\r\n"), s({400})),
        Case("length-missing", _post(b"abc", "image/png", length=False), s({411})),
        Case("length-over-body", _post(b"abc", "image/png", headers={"Content-Length": "100"}), s({400}), shut=True),
        Case("length-zero", _post(b"", "image/png", headers={"Content-Length": "0"}), s({415})),
        Case("over-limit-with-body", _post(b"\0" * (MAX_UPLOAD + 1), "image/png"), s({413})),
        Case("over-limit-1mib-body", _post(b"\0" * 2**20, "image/png"), s({413})),
        Case("over-limit-expect-100", _post(b"", "image/png", headers={
            "Content-Length": str(MAX_UPLOAD + 1), "Expect": "100-continue"}), s({413})),
    ]
    # -- chunked and other transfer encodings
    chunked = b"5\r\nabcde\r\n0\r\n\r\n"
    for name, headers, body in [
        ("chunked", {"Transfer-Encoding": "chunked"}, chunked),
        ("chunked-and-length", {"Transfer-Encoding": "chunked", "Content-Length": str(len(chunked))}, chunked),
        ("chunked-garbage", {"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n"),
        ("gzip", {"Transfer-Encoding": "gzip"}, b"\x1f\x8b"),
        ("chunked-huge-size", {"Transfer-Encoding": "chunked"}, b"ffffffffffffffff\r\nabc"),
    ]:
        cases.append(Case(f"te-{name}", _post(body, "image/png", headers=headers, length=False), s({411})))
    cases.append(Case("te-chunked-get", _req(headers={"Transfer-Encoding": "chunked"}, body=chunked, length=False),
                      s({411})))
    # -- wrong content types and bodies that are not images
    for name, ctype, body, want in [
        ("text", "text/plain", b"just text", 415),
        ("none", "", b"just text", 415),
        ("json", "application/json", b'{"image": 1}', 415),
        ("png-garbage", "image/png", b"\x89PNG\r\n\x1a\n garbage", 415),
        ("svg", "image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415),
        ("octet-random", "application/octet-stream", bytes(range(256)) * 4, 415),
        ("multipart-no-boundary", "multipart/form-data", _form(_image_part(b"x")), 400),
        ("multipart-empty-boundary", "multipart/form-data; boundary=", _form(_image_part(b"x")), 400),
        ("multipart-boundary-71", "multipart/form-data; boundary=" + "b" * 71, _form(_image_part(b"x")), 400),
    ]:
        cases.append(Case(f"ctype-{name}", _post(body, ctype), s({want})))
    # -- multipart edge cases (boundary "b")
    text = b"not an image"
    for name, body, want in [
        ("no-closing-boundary", _form(_image_part(text), close=False), 400),
        ("wrong-boundary", _form(_image_part(text)).replace(b"--b", b"--c"), 400),
        ("preamble-only", b"no delimiter at all", 400),
        ("lf-line-endings", _form(_image_part(text)).replace(b"\r\n", b"\n"), 400),
        (f"{MAX_PARTS + 1}-parts", _form(*[b"\r\nx"] * (MAX_PARTS + 1)), 413),
        ("5000-empty-parts", _form(*[b""] * 5000), 413),
        ("image-field-empty", _form(_image_part(b"")), 400),
        ("no-image-field", _form(b'Content-Disposition: form-data; name="photo"\r\n\r\n' + text), 400),
        ("headers-never-end", _form(b'Content-Disposition: form-data; name="image"\r\n' + text), 400),
        ("part-headers-9k", _form(_image_part(text, "X-Pad: " + "a" * 9000 + "\r\n")), 400),
        ("bad-part-header", _form(_image_part(text, "no colon here\r\n")), 400),
        ("base64-bad-padding", _form(_image_part(b"abc", "Content-Transfer-Encoding: base64\r\n")), 400),
        ("base64-text", _form(_image_part(base64.b64encode(text), "Content-Transfer-Encoding: base64\r\n")), 415),
        ("unknown-transfer-encoding", _form(_image_part(text, "Content-Transfer-Encoding: x-uue\r\n")), 400),
        ("traversal-filename", _form(_image_part(text, filename="../../../../tmp/x.png")), 415),
        ("rfc2231-filename", _form(b"Content-Disposition: form-data; name=\"image\"; filename*=utf-8''%2e%2e%2f"
                                   b"%ff.png\r\n\r\n" + text), 415),
        ("boundary-look-alike", _form(_image_part(text + b"\r\n--bX" + text)), 400),
        ("boundary-then-junk", _form(_image_part(text)).replace(b"--b--", b"--b junk"), 400),
        ("nested-multipart", _form(_image_part(_form(_image_part(text)), "Content-Type: multipart/mixed; "
                                                                         "boundary=b\r\n")), 400),
    ]:
        cases.append(Case(f"multipart-{name}", _post(body), s({want})))
    # -- path traversal in URLs: fixed routes only
    for target in ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/sample/..%2f..%2fpyproject.toml",
                   "/..\\..\\etc\\passwd", "/healthz%00", "/sample/%00", "http://evil/../etc/passwd",
                   "/sample/chelsea/../../../etc/passwd", "//etc/passwd", "/%ff%fe", "/sample/../healthz"]:
        cases.append(Case(f"path-get-{target}", _req("GET", target), s({404})))
    cases.append(Case("path-head-traversal", _req("HEAD", "/sample/../../etc/passwd"), s({404})))
    cases.append(Case("path-post-elsewhere-over-limit", _req("POST", "/upload", {
        "Content-Type": "image/png", "Content-Length": str(10 * MAX_UPLOAD)}), s({404})))
    for target in ["/view/../view", "/../view", "/sample/chelsea", "/healthz"]:
        cases.append(Case(f"path-post-{target}", _post(b"abc", "image/png", version="HTTP/1.0").replace(
            b"POST /view ", f"POST {target} ".encode()), s({404})))
    # -- methods
    for method in ["PUT", "DELETE", "PATCH", "TRACE", "BREW", "get", "G\x00T", "M" * 1000]:
        cases.append(Case(f"method-{method[:8]!r}", _req(method, "/"), s({501})))
    cases += [
        Case("method-options-star", _req("OPTIONS", "*"), s({501})),
        Case("method-connect", _req("CONNECT", "evil.example:443"), s({501})),
    ]
    # -- trickling and stalling clients: cut off after the deadline, in all
    cases += [
        Case("trickle-request-line", b"GET /" + b"a" * 200, s({408}), trickle=0.1),
        Case("trickle-headers", b"GET /healthz HTTP/1.0\r\nX-Trickle: " + b"a" * 200, s({408}), trickle=0.1),
        Case("trickle-body", _post(b"x" * 200, "image/png")[:-200] + b"x" * 200, s({408}), trickle=0.05),
        Case("stall-in-headers", b"GET /healthz HTTP/1.0\r\nX-Half: ", s({408})),
        Case("stall-in-body", _post(b"x" * 1000, "image/png")[:-500], s({408})),
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ViewerServer, Path]]:
    """One server for the module, run from an empty working folder with its own temporary folder (both
    inside ``root``, which every case hashes)."""
    root = tmp_path_factory.mktemp("server-hostile")
    (root / "cwd").mkdir()
    (root / "tmp").mkdir()
    (root / "cwd" / "user-file.txt").write_text("a file of the user's that must stay as it is\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "cwd")
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        srv = make_server(make_tiny_vit(), max_upload=MAX_UPLOAD, quiet=True, request_timeout=DEADLINE,
                          max_concurrent=8)
        srv.drain_timeout = 0.5
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield srv, root
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(CLIENT_TIMEOUT)


def _exchange(srv: ViewerServer, case: Case) -> bytes:
    """Send the case over a fresh loopback connection; everything the server answers until it closes."""
    host, port = srv.server_address[:2]
    assert host == "127.0.0.1"
    reply = b""
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT) as sock:
        try:
            if case.trickle:
                sock.setblocking(False)
                started = time.monotonic()
                for i in range(len(case.raw)):  # bounded: the raw bytes, and 10 deadlines
                    if time.monotonic() - started > 10 * DEADLINE:
                        break
                    try:
                        reply += sock.recv(65536)
                        break  # the server answered (or hung up)
                    except BlockingIOError:
                        pass
                    sock.send(case.raw[i : i + 1])
                    time.sleep(case.trickle)
                sock.settimeout(CLIENT_TIMEOUT)
            else:
                sock.sendall(case.raw)
            if case.shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server hung up while we were still sending: read what it said
            pass
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def _status(reply: bytes) -> int:
    """The final status of a reply (interim ``100 Continue`` skipped)."""
    while reply.startswith(b"HTTP/1.") and reply[9:12] == b"100":
        reply = reply[reply.index(b"\r\n\r\n") + 4 :]
    assert reply.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), f"no status line: {reply[:200]!r}"
    return int(reply[9:12])


def _healthy(srv: ViewerServer) -> bool:
    reply = _exchange(srv, Case("healthz", b"GET /healthz HTTP/1.0\r\n\r\n", frozenset({200})))
    return _status(reply) == 200 and reply.endswith(b"\r\n\r\nok\n")


def _check(srv: ViewerServer, root: Path, raw_case: Case) -> int:
    before = tree_state(root)
    status = _status(_exchange(srv, raw_case))
    assert 400 <= status < 600, status
    assert _healthy(srv), "the server is not healthy after the case"
    check_contained(before, tree_state(root), root, outputs=[])  # nothing written, nothing lost
    return status


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_client(hostile_server: tuple[ViewerServer, Path], case: Case) -> None:
    srv, root = hostile_server
    started = time.monotonic()
    status = _check(srv, root, case)
    assert status in case.expect, (status, sorted(case.expect))
    if case.trickle or case.id.startswith("stall"):  # cut off after the deadline, not after a per-read timeout
        assert time.monotonic() - started < DEADLINE + 3.0


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(value=st.text(st.characters(min_codepoint=33, max_codepoint=255), min_size=1, max_size=30),
       sent=st.integers(0, 300))
def test_any_content_length_gets_a_4xx(hostile_server: tuple[ViewerServer, Path], value: str, sent: int) -> None:
    """Any Content-Length value (of any size, against any body length) on a text upload is a 4xx."""
    srv, root = hostile_server
    raw = _post(b"x" * sent, "text/plain", headers={"Content-Length": value})
    status = _check(srv, root, Case("length", raw, frozenset(), shut=True))
    assert status in (400, 411, 413, 415), (value, sent, status)
