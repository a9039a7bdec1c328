"""The HTTP/1.1 transport under the runtime's server: sockets, deadlines, connection limits and ``Host`` names.

This module knows HTTP and sockets but nothing of models or of OpenAI's API; ``edgedistill.runtime.server`` builds
the OpenAI-compatible application on top of it. It holds:

- :class:`TransportServer`, a ``ThreadingHTTPServer`` whose listen backlog is sized to its connection cap, which
  serves at most ``max_connections`` connections (one thread each) and answers any more from the accept loop with a
  prebuilt 503 (:func:`overload_reply`), which closes connections through :class:`GracefulCloser`, and which logs a
  client that went away (:data:`CLIENT_GONE`) or an internal error in one line on stderr instead of a traceback.
- :class:`TransportHandler`, a request handler whose request line, headers and body must all arrive within the
  server's ``request_timeout_s`` (:class:`DeadlineReader`; else 408), and which answers the stdlib's own errors
  (bad request line, headers too long) as JSON. The application supplies the body of these errors
  (:meth:`TransportHandler.error_body`) and the routes.
- :class:`DeadlineReader`: a per-read timeout alone lets a client that trickles one byte at a time hold a
  connection for ever, so the reads of one request share one deadline.
- :class:`GracefulCloser`: closed connections are half-closed and drained by one helper thread before the socket is
  released, so that request bytes the server did not read never turn the close into a TCP reset that destroys the
  reply before the client has read it.
- :func:`host_name` and :func:`allowed_hosts_for`: parsing a ``Host`` header and the names a server bound to an
  address answers (against DNS rebinding).
- :func:`serve_forever`: serve until SIGINT or SIGTERM, then close.
"""

from __future__ import annotations

import io
import json
import re
import selectors
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgedistill.errors import EdgeDistillError

# Seconds one socket write (or a read outside a request's deadline) may block before the server drops the client.
SOCKET_TIMEOUT = 30.0
# The listen backlog: at least this, else twice the connection cap. The stdlib's 5 made a burst of 50 connections
# see ~40 % resets instead of the 503 the server would have answered.
MIN_BACKLOG = 128
# A closed connection is drained for at most this long (and this many bytes) before its socket is released; the
# client has read the reply and closed its side long before in any normal exchange.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1 << 20
MAX_LINGERING = 1024  # sockets drained at once; beyond that the oldest is closed at once
# The Host names every server answers; --host X adds X, and 0.0.0.0, :: or '*' accept any Host.
LOCAL_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"
# Errors a client that closed, reset or stopped reading its connection causes; logged in one line.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

_HOST_PORT = re.compile(r"(:[0-9]*)?")


# ------------------------------------------------------------------------------------------------ host names


def host_name(header: str) -> str | None:
    """The host name of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case; None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1 :]) if end > 0 else ("", "")
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    name = name.rstrip(".")
    if not name or not _HOST_PORT.fullmatch(rest):
        return None
    return name


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names a server bound to ``bind_host`` answers: this machine's names, ``bind_host`` and ``extra``.

    A wildcard bind address (0.0.0.0, ::, "") or ``*`` among ``extra`` gives ``{"*"}``: any Host.
    """
    names = set(LOCAL_HOST_NAMES)
    for given in (bind_host, *extra):
        text = given.strip().lower()
        if text in ("", "0.0.0.0", "::", "[::]", ANY_HOST):
            return frozenset({ANY_HOST})
        name = host_name(text) if text.startswith("[") or text.count(":") == 1 else text.rstrip(".")
        if not name:
            raise EdgeDistillError(f"server: {given!r} is not a host name")
        names.add(name)
    return frozenset(names)


# ------------------------------------------------------------------------------------------- helpers for logs


def client_label(client_address: Any) -> str:
    """``host:port`` (``[v6]:port``) of a client address, for one log line."""
    try:
        host, port = client_address[:2]
    except (TypeError, ValueError):
        return str(client_address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def listen_backlog(max_connections: int) -> int:
    """The listen backlog for a server that serves ``max_connections`` at once."""
    return max(MIN_BACKLOG, 2 * max_connections)


def overload_reply(payload: Mapping[str, Any]) -> bytes:
    """A whole HTTP/1.1 503 reply with ``Retry-After: 1`` and ``payload`` as its JSON body (ASCII), built once for
    the accept loop, which has no handler to send it."""
    data = json.dumps(payload).encode("ascii")
    status = HTTPStatus.SERVICE_UNAVAILABLE
    head = [
        f"HTTP/1.1 {int(status)} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Retry-After: 1",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + data


# --------------------------------------------------------------------------------------------- reading, closing


class RequestTimeout(Exception):
    """The request's line, headers and body did not all arrive within its deadline (not an OSError on purpose:
    the stdlib's handler would swallow a TimeoutError and close the connection without a reply)."""


class DeadlineReader(io.RawIOBase):
    """A socket's reading side whose reads, together, end at :attr:`deadline` (``time.monotonic()`` seconds).

    Each read waits at most for the time left; at the deadline it raises :class:`RequestTimeout`. Between reads
    the socket keeps ``write_timeout`` for the replies.
    """

    def __init__(self, sock: socket.socket, write_timeout: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._write_timeout = write_timeout
        self.deadline: float | None = None
        self.received = 0  # bytes read since the handler last reset it

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            count = self._sock.recv_into(buffer)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout
            self._sock.settimeout(left)
            try:
                count = self._sock.recv_into(buffer)
            except TimeoutError:
                raise RequestTimeout from None
            finally:
                self._sock.settimeout(self._write_timeout)
        self.received += count
        return count


class GracefulCloser:
    """One thread that closes finished connections without a reset.

    Closing a socket whose receive buffer still holds bytes (a body the server refused to read, a request sent to
    a connection refused as over the cap) makes the kernel send a TCP reset, and a reset can destroy the reply
    before the client has read it. So a socket is half-closed (the client sees the end of the reply), and what the
    client still sends is read and dropped until it closes too, or for at most ``LINGER_SECONDS``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inbox: list[socket.socket] = []
        self._stopped = False
        self._lingering: dict[socket.socket, list[float]] = {}  # socket -> [since, bytes drained]; oldest first
        self._wake_recv, self._wake_send = socket.socketpair()
        for end in (self._wake_recv, self._wake_send):
            end.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_recv, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="edgedistill-closer", daemon=True)
        self._thread.start()

    def close(self, sock: socket.socket) -> None:
        """Half-close ``sock`` now and release it once the client is done."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already reset or closed by the peer: nothing left to protect
            sock.close()
            return
        with self._lock:
            if self._stopped:
                sock.close()
                return
            self._inbox.append(sock)
        try:
            self._wake_send.send(b"\0")
        except OSError:  # the wake-up channel is full: the thread is being woken anyway
            pass

    def stop(self) -> None:
        """Close every socket still draining and end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._wake_send.send(b"\0")
        except OSError:
            pass
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while True:
                timeout = None
                if self._lingering:
                    since = next(iter(self._lingering.values()))[0]
                    timeout = max(0.0, since + LINGER_SECONDS - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._wake_recv:
                        try:
                            while self._wake_recv.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._drain(key.fileobj)  # type: ignore[arg-type]
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                    stopped = self._stopped
                for sock in inbox:
                    self._add(sock)
                if stopped:
                    return
                now = time.monotonic()
                while self._lingering:
                    sock, (since, _) = next(iter(self._lingering.items()))
                    if since + LINGER_SECONDS > now:
                        break
                    self._release(sock)
        finally:
            for sock in list(self._lingering):
                self._release(sock)
            self._selector.close()
            self._wake_recv.close()
            self._wake_send.close()

    def _add(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        except (OSError, ValueError):
            sock.close()
            return
        self._lingering[sock] = [time.monotonic(), 0]
        if len(self._lingering) > MAX_LINGERING:
            self._release(next(iter(self._lingering)))

    def _drain(self, sock: socket.socket) -> None:
        state = self._lingering.get(sock)
        if state is None:
            return
        try:
            for _ in range(16):
                data = sock.recv(65536)
                state[1] += len(data)
                if not data or state[1] > LINGER_MAX_BYTES:
                    break
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._release(sock)

    def _release(self, sock: socket.socket) -> None:
        self._lingering.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()


# ------------------------------------------------------------------------------------------ server and handler


class TransportServer(ThreadingHTTPServer):
    """A threading HTTP server with a connection cap, a whole-request deadline and graceful closes.

    Args:
        address: ``(host, port)`` to bind.
        handler: the request handler class (a :class:`TransportHandler`).
        max_connections: connections served at once, one thread each; the accept loop answers any more with
            ``busy_reply`` and closes them gracefully.
        request_timeout_s: seconds within which a request's line, headers and body must all have arrived (else
            408); also how long an idle keep-alive connection is kept.
        busy_reply: the whole reply for a connection over the cap (see :func:`overload_reply`).

    Raises:
        EdgeDistillError: the address cannot be bound.
    """

    daemon_threads = True
    allow_reuse_address = True
    verbose = False  # log each request to stderr

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[TransportHandler],
        max_connections: int,
        request_timeout_s: float,
        busy_reply: bytes,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._connections = threading.BoundedSemaphore(max_connections)
        self.request_queue_size = listen_backlog(max_connections)
        self._busy_reply = busy_reply
        host, port = address
        try:
            super().__init__(address, handler)
        except OSError as err:
            raise EdgeDistillError(f"serve: cannot listen on {host}:{port} ({err.strerror or err})") from None
        self._closer = GracefulCloser()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"

    def log(self, line: str) -> None:
        """One line on stderr (stderr escapes what its encoding cannot write)."""
        print(f"edgedistill serve: {line}", file=sys.stderr, flush=True)

    # --------------------------------------------------------------------------------- socketserver's hooks

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            # Over the cap: a fresh socket's send buffer is empty, so this small reply never blocks the loop.
            try:
                request.setblocking(False)
                request.send(self._busy_reply)
            except OSError:
                pass
            if self.verbose:
                self.log(f"{client_label(client_address)}: refused, {self.max_connections} connections open")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: its slot is free again
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def shutdown_request(self, request: Any) -> None:
        closer = getattr(self, "_closer", None)
        if closer is None:
            super().shutdown_request(request)
        else:
            closer.close(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback for anything a connection raises; one line says enough.
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            self.log(f"{client_label(client_address)}: the client went away ({type(error).__name__})")
        else:
            self.log(f"{client_label(client_address)}: internal error: {type(error).__name__}: {error}")

    def server_close(self) -> None:
        super().server_close()
        closer = getattr(self, "_closer", None)
        if closer is not None:
            closer.stop()


class TransportHandler(BaseHTTPRequestHandler, ABC):
    """One HTTP/1.1 connection whose requests must each arrive within the server's ``request_timeout_s``.

    Subclasses add the routes (``do_GET`` ...) and :meth:`error_body`; they reply with :meth:`send_json`, set
    :attr:`pending_body` while a body the request announced is unread, and clear :attr:`deadline_reader`'s
    deadline once the body is in.
    """

    server: TransportServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    error_content_type = "application/json"

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The JSON body of an error the transport answers itself (408, the stdlib's 400, 414, 431 ...)."""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader has no deadline; ours replaces it
        self.deadline_reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.deadline_reader)
        self.pending_body = False

    def handle_one_request(self) -> None:
        # The request line, headers and body must all arrive before the deadline; so must the first byte of the
        # next request on a kept-alive connection.
        reader = self.deadline_reader
        reader.deadline = time.monotonic() + self.server.request_timeout_s
        reader.received = 0
        self.raw_requestline = b""
        self.requestline, self.command, self.request_version = "", None, self.protocol_version
        self.pending_body = False
        try:
            super().handle_one_request()
        except RequestTimeout:
            self.close_connection = True
            if reader.received or self.raw_requestline:  # an idle connection just closes
                seconds = self.server.request_timeout_s
                self.server.log(f"{client_label(self.client_address)}: the request did not arrive within {seconds:g} s")
                try:
                    status = HTTPStatus.REQUEST_TIMEOUT
                    self.send_json(status, self.error_body(status, f"the request took longer than {seconds:g} s"))
                except OSError:
                    pass
        except CLIENT_GONE as err:  # while reading the request line or headers, or sending the stdlib's errors
            self.close_connection = True
            self.server.log(f"{client_label(self.client_address)}: the client went away ({type(err).__name__})")
        finally:
            reader.deadline = None

    def parse_request(self) -> bool:
        # RFC 9112 section 2.2: ignore at least one empty line before the request line; a second one is an error.
        if self.raw_requestline in (b"\r\n", b"\n"):
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return False
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return False
        if not self.raw_requestline.strip():
            self.send_error(HTTPStatus.BAD_REQUEST, "empty request line")
            return False
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if self.server.verbose:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own errors (bad request line, headers too long) as JSON too.
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the stdlib's guess for a broken request line: it would send no
            self.request_version = "HTTP/1.0"  # status line and no headers, only the body
        self.send_json(code, self.error_body(code, message or HTTPStatus(code).phrase))

    def announces_body(self) -> bool:
        """Whether the request's headers announce a body (``Transfer-Encoding``, or a ``Content-Length`` not 0)."""
        if self.headers.get("Transfer-Encoding") is not None:
            return True
        return any(value.strip() != "0" for value in self.headers.get_all("Content-Length") or [])

    def send_json(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        """A whole reply with ``payload`` as its JSON body; it closes the connection while a body is unread."""
        # backslashreplace: whatever a message quotes, the reply can be encoded (a lone surrogate becomes \\udxxx).
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")
        if self.pending_body:  # the body stays unread: it must not be taken for the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def serve_forever(server: TransportServer) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM, then close the socket.

    In the main thread the two signals are handled, not left to raise KeyboardInterrupt: an exception raised at an
    arbitrary point of the accept loop (inside a lock, or while a handler thread starts) could leave the process
    unable to exit. The handler asks the loop to stop from a helper thread (``shutdown`` waits for the loop), and
    the loop notices within its poll interval.
    """
    import signal

    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, name="edgedistill-shutdown", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.server_close()
