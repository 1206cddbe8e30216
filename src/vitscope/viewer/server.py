"""`vitscope serve`: the viewer from a local HTTP server, where users upload their own images.

Standard library only (``http.server.ThreadingHTTPServer``). It binds ``127.0.0.1`` unless told otherwise,
serves a fixed set of routes and no files from disk (so no path can escape anything), caps uploads
(``max_upload`` bytes, refused from the ``Content-Length`` before reading), answers bad uploads with a 4xx
and a one-line message, and runs one capture at a time (capture hooks the shared model).

Every HTML page it serves has the viewer's style (`vitscope.viewer.page.style`, the one ``viewer.css``). Errors
go to a browser (a request that accepts ``text/html``) as the upload page with the message above the form, and
to other clients (curl, scripts) as one plain-text line.

Hostile clients are bounded: a request (request line, headers and body together) must arrive within
``request_timeout`` seconds in all, however slowly it trickles; at most ``max_concurrent`` requests are handled
at once; a multipart form may hold at most `MAX_PARTS` parts and is split with linear-time searches only; a
request that is refused before its body is read is answered first, and then a bounded amount of the body is
read and dropped (``max_drain`` bytes, ``drain_timeout`` seconds) so an ordinary client that sends its whole
body before reading still gets the status instead of a connection reset.

Routes:
    ``GET /``               upload form and links to the bundled samples
    ``GET /sample/<name>``  the viewer for a bundled sample image (names from a fixed list)
    ``POST /view``          ``multipart/form-data`` with a file field ``image`` (or a raw ``image/*`` body)
    ``GET /healthz``        ``ok``
"""

from __future__ import annotations

import binascii
import contextlib
import html
import io
import ipaddress
import quopri
import re
import socket
import threading
import time
from collections.abc import Callable
from email.message import Message
from email.utils import collapse_rfc2231_value
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from vitscope.errors import VitscopeError

#: Largest accepted upload body, in bytes.
MAX_UPLOAD = 10 * 2**20
#: Largest decoded upload, in pixels (a small compressed file can decode to a huge image).
MAX_UPLOAD_PIXELS = 40_000_000
#: Most parts a ``multipart/form-data`` upload may hold (the form has one field; browsers add none).
MAX_PARTS = 16
#: Longest ``Content-Type`` header, and longest header block of one multipart part, in bytes.
MAX_HEADER_BYTES = 8192


class UploadError(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the user."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bundled_samples(shapes_size: tuple[int, int] = (96, 96)) -> dict[str, Callable[[], Any]]:
    """Name -> loader of the images offered without upload: the bundled photos, plus a few procedural
    shapes images (what the bundled model was trained on) when `vitscope.train.shapes` is available."""
    out: dict[str, Callable[[], Any]] = {}
    folder = resources.files("vitscope") / "data" / "samples"
    if folder.is_dir():
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.lower().endswith((".jpg", ".jpeg", ".png")):
                out[Path(entry.name).stem] = partial(_open_rgb, Path(str(entry)))
    try:
        from vitscope.train.shapes import render_shape
    except ImportError:  # pragma: no cover - the dataset ships with vitscope
        return out
    for i in range(3):
        out[f"shapes-{i}"] = partial(_render_shape, render_shape, i, shapes_size)
    return out


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    from vitscope.images import open_image

    with Image.open(path) as im:
        return open_image(im)


def _render_shape(render: Callable[..., Any], index: int, size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.fromarray(render(seed=0, index=index, image_size=size, split="val").image)


def parse_upload(content_type: str, body: bytes, max_parts: int = MAX_PARTS) -> tuple[bytes, str]:
    """``(file bytes, file name)`` from a ``multipart/form-data`` body (field ``image``) or a raw image body.

    The form is split with `bytes.find` only (linear time) and may hold at most ``max_parts`` parts: a body of a
    million empty parts is refused after the first ``max_parts + 1``, in microseconds.
    """
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return body, "upload"
    if ctype != "multipart/form-data":
        raise UploadError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"expected multipart/form-data with a file field 'image' (got {ctype[:100] or 'no content type'})",
        )
    if len(content_type) > MAX_HEADER_BYTES:
        raise UploadError(HTTPStatus.BAD_REQUEST, "the Content-Type header is too long")
    boundary = _param(content_type, "content-type", "boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart body (no valid boundary)")
    for headers, data in _split_multipart(body, boundary.encode("utf-8", "replace"), max_parts):
        disposition = headers.get("content-disposition", "")
        if _param(disposition, "content-disposition", "name") == "image":
            data = _decode_transfer(headers.get("content-transfer-encoding", ""), data)
            if not data:
                raise UploadError(HTTPStatus.BAD_REQUEST, "the 'image' field is empty: choose a file")
            filename = _param(disposition, "content-disposition", "filename")
            return data, Path(filename or "upload").name or "upload"
    raise UploadError(HTTPStatus.BAD_REQUEST, "no file field named 'image' in the form")


def _param(value: str, header: str, name: str) -> str | None:
    """Parameter ``name`` of one header value (quoted strings and RFC 2231 ``name*=`` included)."""
    msg = Message()
    msg[header] = value
    got = msg.get_param(name, header=header)
    if got is None or isinstance(got, str):
        return got
    return collapse_rfc2231_value(got)


def _split_multipart(body: bytes, boundary: bytes, max_parts: int) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body as ``(lower-cased headers, raw content)``, at most ``max_parts`` of them."""
    dash = b"--" + boundary
    malformed = UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart body")

    def delimiter(start: int) -> tuple[int, int, bool]:
        """The first delimiter line at or after ``start`` (at the body's start or after CRLF):
        ``(where it starts, where the next part starts, whether it closes the body)``. RFC 2046: CRLF "--"
        boundary never occurs inside a part, so each occurrence is a delimiter or the body is malformed."""
        if start == 0 and body.startswith(dash):
            at = 0
        else:
            at = body.find(b"\r\n" + dash, max(start - 2, 0))
            if at < 0:
                raise malformed
            at += 2
        after = at + len(dash)
        if body.startswith(b"--", after):
            return at, after + 2, True
        eol = body.find(b"\r\n", after, after + 1024)
        if eol < 0 or body[after:eol].strip(b" \t"):  # only transport padding may follow the boundary
            raise malformed
        return at, eol + 2, False

    parts: list[tuple[dict[str, str], bytes]] = []
    _, pos, closed = delimiter(0)  # the preamble before the first delimiter is ignored
    while not closed:
        if len(parts) == max_parts:
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the form has more than {max_parts} parts")
        at, nxt, closed = delimiter(pos)
        content = body[pos : at - 2] if at >= pos + 2 else b""
        if not content or content.startswith(b"\r\n"):  # no headers
            head, data = b"", content[2:]
        else:
            end = content.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
            if end < 0:
                raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart body (a part's headers do not end)")
            head, data = content[:end], content[end + 4 :]
        parts.append((_part_headers(head), data))
        pos = nxt
    return parts


def _part_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not head:
        return headers
    last = ""
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and last:  # folded continuation
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart body (a bad part header)")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


def _decode_transfer(encoding: str, data: bytes) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "7bit", "8bit", "binary"):
        return data
    try:
        if encoding == "base64":
            return binascii.a2b_base64(data)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        raise UploadError(HTTPStatus.BAD_REQUEST, f"the 'image' field is not valid {encoding}") from None
    raise UploadError(HTTPStatus.BAD_REQUEST, f"unsupported Content-Transfer-Encoding {encoding[:40]!r}")


def decode_upload(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> Any:
    """Bytes -> upright (EXIF orientation) RGB PIL image, refusing non-images (415) and too many pixels (413)."""
    from PIL import Image, UnidentifiedImageError

    from vitscope.images import _header_only, open_image

    too_many = f"more than {max_pixels:,} pixels: downscale it"
    try:
        with _header_only(max_pixels), Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise UploadError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image is {im.width}x{im.height} pixels, {too_many}",
                )
            return open_image(im)
    except UploadError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard fired first: still too many pixels, not a bad file
        raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image has {too_many}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise UploadError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the upload is not an image PIL can read (PNG, JPEG, WebP, ...)"
        ) from None


#: Errors of a client that went away or stalled: closed quietly, never logged as tracebacks.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _DeadlineReader(io.RawIOBase):
    """A connection's raw reader where every read waits at most until ``deadline`` (`time.monotonic`): a
    client that trickles a byte at a time cannot make a request last longer than that, unlike a per-read
    socket timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self.restart(deadline)

    def restart(self, deadline: float) -> None:
        """A new request: a new deadline, nothing received and not expired yet."""
        self.deadline, self.received, self.expired = deadline, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("the request took too long to arrive")
        self._sock.settimeout(left)
        try:
            got = self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise
        self.received += got
        return got


def _drain(read: Callable[[int], bytes | None], limit: int) -> int:
    """Read and drop up to ``limit`` bytes until end of stream, a timeout or a reset; the number read."""
    left = limit
    with contextlib.suppress(OSError):  # TimeoutError, resets
        while left > 0:
            chunk = read(min(1 << 16, left))
            if not chunk:
                break
            left -= len(chunk)
    return limit - left


class ViewerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the model, the samples and the upload cap."""

    daemon_threads = True
    #: seconds a request may take to arrive, in all: request line, headers and body (also bounds idle time)
    request_timeout = 30.0
    #: requests handled at once; more are answered 503 and closed
    max_concurrent = 8
    #: after refusing a request whose body was not read, read and drop at most this many bytes of it ...
    max_drain = 64 * 2**20
    #: ... for at most this many seconds, so a client that sends its whole body first still reads the status
    drain_timeout = 5.0

    def __init__(
        self,
        model: Any = "vitscope:shapes",
        host: str = "127.0.0.1",
        port: int = 0,
        max_upload: int = MAX_UPLOAD,
        quiet: bool = True,
        request_timeout: float | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        if request_timeout is not None:
            self.request_timeout = float(request_timeout)
        if max_concurrent is not None:
            self.max_concurrent = int(max_concurrent)
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        # connections beyond max_concurrent: as many again are answered 503 in a thread that drains what they
        # send (bounded); past that they are answered 503 and closed at once
        self._busy_slots = threading.BoundedSemaphore(self.max_concurrent)
        super().__init__((host, port), ViewerHandler)
        self.model_spec = model
        self.max_upload = int(max_upload)
        self.quiet = quiet
        self.samples = bundled_samples()
        self._vit: Any = None
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a handler thread only while fewer than `max_concurrent` requests run; else answer 503."""
        if self._slots.acquire(blocking=False):
            super().process_request(request, client_address)
        elif self._busy_slots.acquire(blocking=False):
            threading.Thread(target=self._busy, args=(request,), daemon=True).start()
        else:
            self._busy(request, drain=False)

    def _busy(self, request: socket.socket, drain: bool = True) -> None:
        """Answer 503, then (``drain``) read and drop what the client sends for a short while, and close."""
        try:
            request.settimeout(min(2.0, self.drain_timeout))
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                            b"Connection: close\r\nContent-Length: 35\r\n\r\n503: the server is busy, try again\n")
            if drain:
                request.shutdown(socket.SHUT_WR)
                reader = _DeadlineReader(request, time.monotonic() + min(2.0, self.drain_timeout))
                _drain(reader.read, self.max_drain)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
            if drain:
                self._busy_slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or stalled is closed quietly; anything else is one log line."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, CLIENT_GONE) or self.quiet:
            return
        sys.stderr.write(f"vitscope serve: {client_address[0]}: {type(exc).__name__}: {exc}\n")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def vit(self) -> Any:
        from vitscope.adapters import as_vit

        with self._lock:
            if self._vit is None:
                self._vit = as_vit(self.model_spec)
            return self._vit

    def viewer_page(self, image: Any, title: str) -> str:
        from vitscope.viewer.page import view

        vit = self.vit()
        with self._lock:  # one capture at a time: capture hooks the shared module
            v = view(image, vit, title=title)
        return v.to_html(header_html=self.upload_form())

    def upload_form(self, message: str = "") -> str:
        links = " ".join(
            f'<a href="/sample/{html.escape(name)}">{html.escape(name)}</a>' for name in self.samples
        )
        msg = f'<p class="vs-message">{html.escape(message)}</p>' if message else ""
        return (
            '<form class="vitscope-upload" method="post" action="/view" enctype="multipart/form-data">'
            f"<strong>vitscope</strong> &middot; {html.escape(str(self.model_label()))} &middot; "
            '<input type="file" name="image" accept="image/*" required> '
            f'<button type="submit">show attention</button> (up to {self.max_upload / 2**20:.0f} MB)'
            f" &middot; samples: {links}{msg}</form>"
        )

    def model_label(self) -> str:
        if self._vit is not None:
            return str(self._vit.info.name)
        return self.model_spec if isinstance(self.model_spec, str) else type(self.model_spec).__name__

    def index_page(self, message: str = "", title: str = "vitscope") -> str:
        """The upload page (in the viewer's style); ``message`` (an error) is shown in the form."""
        from vitscope.viewer.page import render_plain_page

        return render_plain_page(
            title,
            f"{self.upload_form(message)}"
            '<div class="vs-intro"><p>Upload an image (or pick a sample) to see the model\'s '
            "attention: every layer, head and query.</p></div>",
        )


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "vitscope"
    #: a malformed request line is answered with a status line (the base class's HTTP/0.9 default omits it)
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the buffered socket file made by StreamRequestHandler; replaced by one with a deadline
        self._reader = _DeadlineReader(self.connection, time.monotonic() + self.server.request_timeout)
        self.rfile = io.BufferedReader(self._reader)
        self._unread = 0
        self._answered = False

    def handle(self) -> None:
        try:
            super().handle()
        except CLIENT_GONE:
            self.close_connection = True

    def handle_one_request(self) -> None:
        """One request, which must arrive (request line, headers, body) within `ViewerServer.request_timeout`
        in all; a body left unread (the request was refused from its headers) is drained after the answer."""
        self._reader.restart(time.monotonic() + self.server.request_timeout)
        self._unread = 0  # bytes of the body not read yet; -1: unknown (no usable Content-Length, a bad request)
        self._answered = False
        super().handle_one_request()
        if self._reader.expired and self._reader.received and not self._answered:
            # part of a request arrived, too slowly (the base class only closes): say why, then close
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.settimeout(1.0)
                self.connection.sendall(
                    b"HTTP/1.0 408 Request Timeout\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    b"Content-Length: 39\r\n\r\n408: the request took too long to arrive\n")
            return
        if self._unread:  # answered; the client may still be sending: a lingering close
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees it end
            seconds = self.server.drain_timeout if self._unread > 0 else min(1.0, self.server.drain_timeout)
            self._reader.deadline = min(self._reader.deadline, time.monotonic() + seconds)
            limit = self.server.max_drain if self._unread < 0 else min(self._unread, self.server.max_drain)
            _drain(self.rfile.read1, limit)

    def parse_request(self) -> bool:
        if not getattr(self, "raw_requestline", b"").strip():  # the base class closes without a word
            self.command, self.requestline, self.request_version = "", "", self.default_request_version
            self.close_connection = True
            self.send_error(HTTPStatus.BAD_REQUEST, "Empty request line")
            return False
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, too long, too many headers, unknown method): the rest of
        the request is unread, so close lingering (a short drain) rather than with a reset."""
        self._unread = self._unread or -1
        super().send_error(code, message, explain)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._answered = True
        self.connection.settimeout(self.server.request_timeout)  # writing the answer: its own time limit
        super().send_response(code, message)

    def _body_length(self) -> int:
        """The declared body length (0 without a body); a body that cannot be framed is refused."""
        if "Transfer-Encoding" in self.headers:
            self._unread = -1
            raise UploadError(HTTPStatus.LENGTH_REQUIRED,
                              "chunked or encoded uploads are not supported: send a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        if len(set(values)) > 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
            self._unread = -1
            raise UploadError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        self._unread = int(values[0])
        return self._unread

    def _read_body(self, length: int) -> bytes:
        """Read ``length`` bytes before the request's deadline (a slow sender is cut off with a 408)."""
        chunks, got = [], 0
        try:
            while got < length:
                chunk = self.rfile.read1(min(1 << 16, length - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                self._unread -= len(chunk)
        except TimeoutError:
            self.close_connection = True
            self._unread = 0
            raise UploadError(HTTPStatus.REQUEST_TIMEOUT, "the upload took too long to arrive") from None
        return b"".join(chunks)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, body: str, content_type: str = "text/html; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        """``status`` and a one-line ``message``: the upload page showing it for a browser, plain text else."""
        line = f"{status.value} {status.phrase}: {message}"
        if "text/html" in self.headers.get("Accept", ""):
            self._send(status, self.server.index_page(line, title=f"{status.value} {status.phrase} - vitscope"))
        else:
            self._send(status, line + "\n", "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            self._body_length()  # a body is not read, only drained
            if path == "/":
                self._send(HTTPStatus.OK, self.server.index_page())
            elif path == "/healthz":
                self._send(HTTPStatus.OK, "ok\n", "text/plain; charset=utf-8")
            elif path.startswith("/sample/") and path[len("/sample/") :] in self.server.samples:
                name = path[len("/sample/") :]
                image = self.server.samples[name]()
                self._send(HTTPStatus.OK, self.server.viewer_page(image, title=name))
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such page (try /)")
        except UploadError as exc:
            self._error(exc.status, exc.message)
        except VitscopeError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            length = self._body_length()
            if path != "/view":
                raise UploadError(HTTPStatus.NOT_FOUND, "no such endpoint (upload to /view)")
            if "Content-Length" not in self.headers:
                raise UploadError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
            if length > self.server.max_upload:  # answered before the body is read, which is then drained
                raise UploadError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"upload is {length:,} bytes, more than the {self.server.max_upload:,} byte limit",
                )
            body = self._read_body(length)
            if len(body) != length:
                raise UploadError(HTTPStatus.BAD_REQUEST, "the upload was cut short")
            data, name = parse_upload(self.headers.get("Content-Type", ""), body)
            image = decode_upload(data)
            page = self.server.viewer_page(image, title=name)
        except UploadError as exc:
            self._error(exc.status, exc.message)
            return
        except VitscopeError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
            return
        self._send(HTTPStatus.OK, page)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Any = "vitscope:shapes", host: str = "127.0.0.1", port: int = 0, max_upload: int = MAX_UPLOAD,
    quiet: bool = False, on_ready: Callable[[ViewerServer], None] | None = None,
) -> None:
    """Run the server until interrupted (Ctrl-C). ``on_ready`` gets the bound server (e.g. to print its URL).

    Raises:
        VitscopeError: the port is out of range, in use or not allowed, or the host cannot be bound.
    """
    server = make_server(model, host=host, port=port, max_upload=max_upload, quiet=quiet)
    try:
        server.vit()  # load the model before saying we are ready
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    finally:
        server.server_close()


def make_server(model: Any = "vitscope:shapes", host: str = "127.0.0.1", port: int = 0,
                max_upload: int = MAX_UPLOAD, quiet: bool = False, request_timeout: float | None = None,
                max_concurrent: int | None = None) -> ViewerServer:
    """Bind a `ViewerServer`, with one-line errors for port and host problems. ``request_timeout`` (seconds a
    request may take to arrive, in all) and ``max_concurrent`` default to the `ViewerServer` class values."""
    import errno

    if not 0 <= int(port) <= 65535:
        raise VitscopeError("--port", f"{port} is not a port number", "use 1-65535, or 0 to pick a free one")
    try:
        return ViewerServer(model, host=host, port=int(port), max_upload=max_upload, quiet=quiet,
                            request_timeout=request_timeout, max_concurrent=max_concurrent)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise VitscopeError("--port", f"port {port} on {host} is already in use",
                                "stop the other server or pick another port (0 picks a free one)") from None
        if exc.errno == errno.EACCES:
            raise VitscopeError("--port", f"not allowed to bind port {port} on {host}",
                                "use a port above 1023, or 0 to pick a free one") from None
        raise VitscopeError("--host", f"cannot bind {host}:{port} ({exc.strerror or exc})",
                            "use 127.0.0.1 or an address of this machine") from None
    except (OverflowError, UnicodeError) as exc:
        raise VitscopeError("--host", f"cannot bind {host}:{port} ({exc})", "use 127.0.0.1 or a valid address") from None
