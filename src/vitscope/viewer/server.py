"""`vitscope serve`: the viewer from a local HTTP server, where users upload their own images.

Standard library only (``http.server.ThreadingHTTPServer``). It binds ``127.0.0.1`` unless told otherwise,
serves a fixed set of routes and no files from disk (so no path can escape anything), caps uploads
(``max_upload`` bytes, refused from the ``Content-Length`` before reading), answers bad uploads with a 4xx
and a one-line message, and runs one capture at a time (capture hooks the shared model).

Routes:
    ``GET /``               upload form and links to the bundled samples
    ``GET /sample/<name>``  the viewer for a bundled sample image (names from a fixed list)
    ``POST /view``          ``multipart/form-data`` with a file field ``image`` (or a raw ``image/*`` body)
    ``GET /healthz``        ``ok``
"""

from __future__ import annotations

import html
import io
import ipaddress
import threading
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
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


def parse_upload(content_type: str, body: bytes) -> tuple[bytes, str]:
    """``(file bytes, file name)`` from a ``multipart/form-data`` body (field ``image``) or a raw image body."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return body, "upload"
    if ctype != "multipart/form-data":
        raise UploadError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"expected multipart/form-data with a file field 'image' (got {ctype or 'no content type'})",
        )
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            data = part.get_payload(decode=True)
            if not isinstance(data, bytes) or not data:
                raise UploadError(HTTPStatus.BAD_REQUEST, "the 'image' field is empty: choose a file")
            name = Path(part.get_filename() or "upload").name
            return data, name
    raise UploadError(HTTPStatus.BAD_REQUEST, "no file field named 'image' in the form")


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


class ViewerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the model, the samples and the upload cap."""

    daemon_threads = True
    #: seconds a connection may stay idle or stall between reads, and the most a request may take to arrive
    request_timeout = 30.0
    #: requests handled at once; more are answered 503 at once and closed
    max_concurrent = 8

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
        super().__init__((host, port), ViewerHandler)
        self.model_spec = model
        self.max_upload = int(max_upload)
        self.quiet = quiet
        self.samples = bundled_samples()
        self._vit: Any = None
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a handler thread only while fewer than `max_concurrent` requests run; else answer 503."""
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(2.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Connection: close\r\nContent-Length: 35\r\n\r\n503: the server is busy, try again\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

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
        return self._vit.info.name if self._vit is not None else str(self.model_spec)

    def index_page(self) -> str:
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vitscope</title>'
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'\"></head><body>"
            f"{self.upload_form()}"
            "<p style=\"font:14px system-ui,sans-serif;padding:0 16px\">Upload an image (or pick a sample) to see "
            "the model's attention: every layer, head and query.</p></body></html>"
        )


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "vitscope"

    def setup(self) -> None:
        self.request.settimeout(self.server.request_timeout)  # per connection: idle or stalled clients time out
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except CLIENT_GONE:
            self.close_connection = True

    def _read_body(self, length: int) -> bytes:
        """Read ``length`` bytes within `ViewerServer.request_timeout` in all (a slow sender is cut off)."""
        import time

        deadline = time.monotonic() + self.server.request_timeout
        chunks, got = [], 0
        while got < length:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise UploadError(HTTPStatus.REQUEST_TIMEOUT, "the upload took too long to arrive")
            chunk = self.rfile.read1(min(1 << 16, length - got))  # type: ignore[attr-defined]
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
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
        self._send(status, f"{status.value} {status.phrase}: {message}\n", "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
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
        except VitscopeError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/view":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint (upload to /view)")
            return
        try:
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                raise UploadError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
            try:
                length = int(length_text)
            except ValueError:
                raise UploadError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
            if length < 0:
                raise UploadError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            if length > self.server.max_upload:
                self.close_connection = True  # the body is not read
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
                max_upload: int = MAX_UPLOAD, quiet: bool = False) -> ViewerServer:
    """Bind a `ViewerServer`, with one-line errors for port and host problems."""
    import errno

    if not 0 <= int(port) <= 65535:
        raise VitscopeError("--port", f"{port} is not a port number", "use 1-65535, or 0 to pick a free one")
    try:
        return ViewerServer(model, host=host, port=int(port), max_upload=max_upload, quiet=quiet)
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
