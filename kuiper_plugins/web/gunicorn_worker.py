"""The gunicorn worker kuiper-plugins runs: the sync worker's request handling, fed only whole requests.

gunicorn's sync worker reads a request head with a blocking recv(): a client that sends half a head
and waits holds the worker until the worker timeout, and two such clients hold a two-worker service.
This worker keeps every connection it accepts in one selector, in its main thread, until the request
head, and a body of at most MAX_JSON_BODY bytes announced by Content-Length, has arrived in full; only
then does it serve the request, one at a time and in the main thread, exactly as the sync worker
does. Serving in the main thread keeps what the service relies on: signal handlers run there, so
`worker_int` and `worker_abort` (gunicorn_hooks) still interrupt the request in flight, and a request
that hangs still stops the heartbeat, so the master's timeout still aborts it.

Limits (a connection past one is closed; one whose request is late gets a 408 first). Two environment
variables, read when gunicorn starts, set them, as WEB_CONCURRENCY sets the worker count:
- KUIPER_PLUGINS_HEAD_TIMEOUT (HEAD_SECONDS, 10): the head must arrive within it of the connection,
  and be at most MAX_HEAD bytes;
- KUIPER_PLUGINS_BODY_TIMEOUT (BODY_SECONDS, 60): a buffered body must arrive within it after the head;
  a body streamed to the application (an upload over MAX_JSON_BODY, or chunked) may pause no longer,
  and after that long must keep up an average of STREAM_MIN_RATE bytes per second; writing the answer
  may stall no longer;
- after the answer, the worker lingers for the client's close in the selector, not in a recv().
Every connection is closed after its answer (Connection: close), as the sync worker does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from gunicorn import http, util
from gunicorn.workers.sync import SyncWorker
from werkzeug.exceptions import RequestTimeout

from kuiper_plugins.app import MAX_JSON_BODY
from kuiper_plugins.errors import MalformedBody
from kuiper_plugins.web import peers

log = logging.getLogger(__name__)



def _seconds(variable: str, default: float) -> float:
    """A positive number of seconds from the environment; a bad value stops start-up with its name."""
    text = os.environ.get(variable, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 86400:
        sys.exit(f"kuiper-plugins: {variable} must be a number of seconds above 0 (and below a day), not {text!r}")
    return value


HEAD_SECONDS = _seconds("KUIPER_PLUGINS_HEAD_TIMEOUT", 10.0)
BODY_SECONDS = _seconds("KUIPER_PLUGINS_BODY_TIMEOUT", 60.0)
STREAM_MIN_RATE = 16 * 1024
MAX_HEAD = 64 * 1024
LINGER_SECONDS = 2.0  # how long a closed connection may wait for the client's FIN, as gunicorn's close_graceful
RECV_SIZE = 256 * 1024


class _Connection:
    """One accepted connection while its request arrives (or, answered, while it lingers)."""

    __slots__ = ("sock", "addr", "listener", "data", "head_end", "body_end", "deadline", "watched")

    def __init__(self, sock: socket.socket, addr, listener, now: float):
        self.sock = sock
        self.addr = addr
        self.listener = listener
        self.data = bytearray()
        self.head_end: int | None = None
        self.body_end: int | None = None
        self.deadline = now + HEAD_SECONDS
        self.watched = False  # registered with the selector

    def complete(self, now: float) -> bool:
        """Whether the request has arrived far enough to be served; finds the head's end and body length."""
        if self.head_end is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end + 4
            length, expects_continue = _announced_body(bytes(self.data[:end]))
            if length is None or length == 0:
                return True
            if expects_continue:
                self._answer_continue()
            self.body_end = self.head_end + length
            self.deadline = now + BODY_SECONDS
        return self.body_end is None or len(self.data) >= self.body_end

    def _answer_continue(self) -> None:
        """Send 100 Continue now and drop the Expect line, so that gunicorn does not send it again."""
        head = bytes(self.data[: self.head_end])
        lines = head.split(b"\r\n")
        kept = [line for line in lines if not _is_expect_continue(line)]
        new_head = b"\r\n".join(kept)
        self.data[: self.head_end] = new_head
        self.head_end = len(new_head)
        try:
            self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            pass  # the client is gone: the read that follows sees it


def _is_expect_continue(line: bytes) -> bool:
    name, colon, value = line.partition(b":")
    return bool(colon) and name.strip().lower() == b"expect" and value.strip().lower() == b"100-continue"


def _announced_body(head: bytes) -> tuple[int | None, bool]:
    """(bytes of body to buffer before serving, or None to stream it; whether it expects 100 Continue).

    Only decides when to serve: gunicorn's parser reads the same bytes afterwards and refuses what is
    malformed, so anything unclear here (chunked, several lengths, a bad number) is simply streamed.
    """
    lengths, chunked, expects = set(), False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            lengths.add(value.strip())
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"expect":
            expects = expects or value.strip().lower() == b"100-continue"
    if not lengths:
        return (None, False) if chunked else (0, False)
    if chunked or len(lengths) != 1:
        return None, False
    text = lengths.pop()
    if not text.isdigit() or int(text) > MAX_JSON_BODY:
        return None, False
    return int(text), expects


class _StreamedBody:
    """The socket as gunicorn's request parser reads it, once the request is being served.

    The whole head (and a small body) is already in the parser's buffer, so only a streamed body is
    read through here: each read waits at most BODY_SECONDS, and no longer than the minimum rate allows.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.started = time.monotonic()
        self.received = 0

    def recv(self, size: int) -> bytes:
        allowed_until = self.started + BODY_SECONDS + self.received / STREAM_MIN_RATE
        wait = min(BODY_SECONDS, allowed_until - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            self.sock.settimeout(wait)
            data = self.sock.recv(size)
        except TimeoutError:
            raise RequestTimeout(
                f"request body too slow: {self.received} bytes in {time.monotonic() - self.started:.0f} s"
                f" (a body may pause at most {BODY_SECONDS:g} s, and after its first {BODY_SECONDS:g} s must"
                f" keep up {STREAM_MIN_RATE // 1024} KiB/s on average)"
            ) from None
        finally:
            self.sock.settimeout(BODY_SECONDS)
        self.received += len(data)
        return data


class _FramedBody:
    """The request body as the application reads it (wsgi.input): a broken chunked framing is a 400.

    gunicorn's chunked reader raises its own parse errors from inside a read, which the application
    knows nothing of (a 500 and a traceback); each becomes MalformedBody, in Go's words for it.
    """

    def __init__(self, body):
        self._body = body

    def read(self, size: int | None = None) -> bytes:
        return self._framed(self._body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._framed(self._body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._framed(self._body.readlines, size)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __getattr__(self, name: str):
        return getattr(self._body, name)  # what gunicorn itself asks of the body afterwards (`failed`)

    @staticmethod
    def _framed(read: Callable, size: int | None):
        try:
            return read(size)
        except http.errors.ParseException as exc:
            raise MalformedBody(f"malformed chunked encoding ({_printable(str(exc))})") from None
        except http.errors.NoMoreData:
            raise MalformedBody("unexpected EOF (the connection ended inside a chunked body)") from None


class BufferingWorker(SyncWorker):
    """A sync worker that serves a request only once it has arrived; see the module docstring."""

    @classmethod
    def check_config(cls, cfg, log_) -> None:
        """In the master at start: refuse TLS settings, which this worker does not implement."""
        if cfg.is_ssl:
            sys.exit("kuiper-plugins: the worker does not terminate TLS (certfile/keyfile): put nginx in front")

    def run(self) -> None:
        """Accept, read and serve until told to stop; then serve what has fully arrived and close the rest."""
        self._selector = selectors.DefaultSelector()
        self._reading: dict[int, _Connection] = {}
        self._lingering: dict[int, _Connection] = {}
        self._ready: deque[_Connection] = deque()
        self._accepting = False
        self._selector.register(self.PIPE[0], selectors.EVENT_READ, self._wake)
        # Our end of a connection, known without asking, when its listener is bound to one IP address.
        self._local_ends = {listener: _bound_end(listener) for listener in self.sockets}
        for listener in self.sockets:
            listener.setblocking(False)
        try:
            while self.alive:
                self.notify()
                self._set_accepting(not self._ready and len(self._reading) < self.cfg.worker_connections)
                self._poll(0 if self._ready else self._next_timeout())
                self._expire(time.monotonic())
                if self._ready:
                    self._serve(self._ready.popleft())
                if not self.is_parent_alive():
                    return
            while self._ready:
                self.notify()
                self._serve(self._ready.popleft())
        finally:
            for conn in [*self._ready, *self._reading.values(), *self._lingering.values()]:
                util.close(conn.sock)
            self._selector.close()

    # ------------------------------------------------------------ the selector

    def _poll(self, timeout: float) -> None:
        try:
            events = self._selector.select(timeout)
        except InterruptedError:
            return
        for key, _ in events:
            key.data(key.fileobj)

    def _wake(self, fd) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _next_timeout(self) -> float:
        deadlines = [c.deadline for c in self._reading.values()] + [c.deadline for c in self._lingering.values()]
        if not deadlines:
            return 1.0
        return max(0.0, min(1.0, min(deadlines) - time.monotonic()))

    def _set_accepting(self, accepting: bool) -> None:
        if accepting == self._accepting:
            return
        for listener in self.sockets:
            if accepting:
                self._selector.register(listener, selectors.EVENT_READ, self._accept)
            else:
                self._selector.unregister(listener)
        self._accepting = accepting

    def _accept(self, listener) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return  # another worker took it
            raise
        sock.setblocking(False)
        util.close_on_exec(sock)
        conn = _Connection(sock, addr, listener, time.monotonic())
        self._reading[sock.fileno()] = conn
        self._receive(conn, sock)  # the head often came with the connection
        if sock.fileno() in self._reading:
            self._selector.register(sock, selectors.EVENT_READ, partial(self._receive, conn))
            conn.watched = True

    def _receive(self, conn: _Connection, _sock=None) -> None:
        """Take what has arrived; queue the connection once its request is whole, drop it when it closed."""
        while True:
            chunk = _recv(conn.sock)
            if chunk is None:
                return
            if not chunk:
                self._forget(conn, self._reading)  # closed (or reset) before a whole request
                util.close(conn.sock)
                return
            conn.data += chunk
            if conn.complete(time.monotonic()):
                self._forget(conn, self._reading)
                self._ready.append(conn)
                return
            if conn.head_end is None and b"\n\n" in conn.data:
                # gunicorn 27 refuses bare LF line ends; older ones would wait in recv() for a CRLF.
                self._forget(conn, self._reading)
                self._refuse(conn, 400, "Bad Request", "invalid request head: lines must end with CRLF")
                return
            if conn.head_end is None and len(conn.data) > MAX_HEAD:
                self._forget(conn, self._reading)
                self._refuse(conn, 431, "Request Header Fields Too Large",
                             f"request head larger than {MAX_HEAD} bytes")
                return

    def _linger_read(self, conn: _Connection, _sock=None) -> None:
        if _recv(conn.sock) == b"":
            self._forget(conn, self._lingering)
            util.close(conn.sock)

    def _forget(self, conn: _Connection, table: dict[int, _Connection]) -> None:
        table.pop(conn.sock.fileno(), None)
        if conn.watched:  # not when its request was whole on arrival (asking would cost an exception)
            conn.watched = False
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass

    def _expire(self, now: float) -> None:
        """Answer 408 to requests past their deadline (after taking what arrived meanwhile); end lingering."""
        for conn in [c for c in self._reading.values() if c.deadline <= now]:
            self._receive(conn)  # it may have arrived while a request was being served
            if conn.sock.fileno() not in self._reading:
                continue
            self._forget(conn, self._reading)
            what = "request head" if conn.head_end is None else "request body"
            seconds = HEAD_SECONDS if conn.head_end is None else BODY_SECONDS
            log.info("closing %s: its %s did not arrive within %g s", _peer(conn.addr), what, seconds)
            self._refuse(conn, 408, "Request Timeout", f"{what} not received within {seconds:g} seconds")
        for conn in [c for c in self._lingering.values() if c.deadline <= now]:
            self._forget(conn, self._lingering)
            util.close(conn.sock)

    def _refuse(self, conn: _Connection, status: int, reason: str, message: str) -> None:
        """Answer an error without serving the request, in the envelope the service uses, and close."""
        body = json.dumps({"error": 1000, "message": message}).encode() + b"\n"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            conn.sock.send(head + body)  # a few hundred bytes into an empty send buffer: never blocks
        except OSError:
            pass
        util.close(conn.sock)

    # ------------------------------------------------------------ serving one request

    def _serve(self, conn: _Connection) -> None:
        """Serve one whole request as the sync worker does, then leave the close to the selector."""
        sock = conn.sock
        req = None
        sock.settimeout(BODY_SECONDS)
        try:
            parser = http.RequestParser(self.cfg, _StreamedBody(sock), conn.addr)
            parser.unreader.unread(bytes(conn.data))
            req = next(parser)
            req.body = _FramedBody(req.body)
            peers.serving(sock, conn.addr, self._local_ends.get(conn.listener))
            try:
                self.handle_request(conn.listener, req, sock, conn.addr)
            finally:
                peers.serving(None)
        except http.errors.NoMoreData as exc:
            self.log.debug("Ignored premature client disconnection. %s", exc)
        except StopIteration as exc:
            self.log.debug("Closing connection. %s", exc)
        except TimeoutError:
            log.info("closing %s: it stopped reading the answer for %g s", _peer(conn.addr), BODY_SECONDS)
            util.close(sock)
            return
        except ssl.SSLError as exc:  # never raised without TLS, which check_config refuses; as sync does
            self.handle_error(req, sock, conn.addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
            util.close(sock)
            return
        except BaseException as exc:
            self.handle_error(req, sock, conn.addr, exc)
        self._linger(conn)

    def _linger(self, conn: _Connection) -> None:
        """Half-close and wait for the client's FIN in the selector, so unread bytes do not reset the answer."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            util.close(conn.sock)
            return
        try:
            if conn.sock.recv(RECV_SIZE) == b"":
                util.close(conn.sock)  # the client has closed already
                return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            util.close(conn.sock)
            return
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._lingering[conn.sock.fileno()] = conn
        self._selector.register(conn.sock, selectors.EVENT_READ, partial(self._linger_read, conn))
        conn.watched = True


def _bound_end(listener) -> tuple[str, int] | None:
    """The address and port of a TCP listener bound to one IP address; None for a wildcard or a Unix socket."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    address = listener.getsockname()
    if address[0] in ("0.0.0.0", "::"):
        return None  # each connection's own end may be any of the machine's addresses
    return address[0], address[1]


def _recv(sock: socket.socket) -> bytes | None:
    """What has arrived on a non-blocking socket: None when nothing yet, b"" when it closed or broke."""
    try:
        return sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _printable(text: str, limit: int = 200) -> str:
    """Printable ASCII only, bounded: what a client sent, quoted back in a message."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _peer(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr or "a unix-socket client")
