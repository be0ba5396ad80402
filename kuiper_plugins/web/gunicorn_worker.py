"""The gunicorn worker kuiper-plugins runs: the sync worker's request handling, fed only whole requests.

gunicorn's sync worker reads a request head with a blocking recv(): a client that sends half a head
and waits holds the worker until the worker timeout, and two such clients hold a two-worker service.
This worker keeps every connection it accepts in one selector, in its main thread, until the request
head, and a body of at most MAX_JSON_BODY bytes announced by Content-Length, has arrived in full; only
then does it serve the request, one at a time and in the main thread, exactly as the sync worker
does. Serving in the main thread keeps what the service relies on: signal handlers run there, so
`worker_int` and `worker_abort` (gunicorn_hooks) still interrupt the request in flight, and a request
that hangs still stops the heartbeat, so the master's timeout still aborts it.

Who sends a body is checked before the body is read. Once a head that announces a body is whole,
the app's own caller check (`kuiper_plugins.web.access.AccessCheck`) runs on it here: a refused
caller gets the app's 403 or 401 at once, and nothing of its body is kept. A body is buffered only
for a caller let in on a guarded path; anything else (an open path, a head the check cannot read)
is served at once, and the application reads from the socket what it needs.

Crowds of connections cannot shut the worker: it never stops accepting because it holds many. It
holds up to `worker_connections` (etc/gunicorn.conf.py raises it, and this worker raises its
open-files limit to fit); at that number, each new connection closes the oldest one still waiting
for its head (503), so idle or slow connections make room for new ones instead of keeping them in
the listen queue. What it buffers is bounded too: unfinished heads HEAD_BUDGET bytes in all (past it
the oldest are closed, 503), bodies waiting to be served BODY_BUDGET (past it a request is served at
once and the rest of its body streams).

A worker never keeps other requests waiting behind a write it serves. It reads many connections at
once but serves one request at a time, so a connection it accepted just before it began a long write
(an install that downloads, runs install.sh or waits on the registry's lock) would wait for that write
while another worker sits idle. So before it serves anything but a read, it hands every other
connection it holds with a request under way (whole, arriving, or accepted in the last HANDOFF_FRESH
seconds) to whichever worker is free: the descriptor, with what arrived of the request, goes over a
socket pair the master made before forking (SCM_RIGHTS), which only workers waiting for connections
read. A worker that cannot hand one over (the pair is full, the request holds more than HANDOFF_MAX
bytes) keeps it, as before.

Limits (a connection past one is closed; one whose request is late gets a 408 first). Two environment
variables, read when gunicorn starts, set them, as WEB_CONCURRENCY sets the worker count:
- KUIPER_PLUGINS_HEAD_TIMEOUT (HEAD_SECONDS, 10): the head must arrive within it of the connection,
  and be at most MAX_HEAD bytes;
- KUIPER_PLUGINS_BODY_TIMEOUT (BODY_SECONDS, 60): a buffered body must arrive within it after the head;
  a body streamed to the application (an upload over MAX_JSON_BODY, or chunked) may pause no longer,
  and after that long must keep up an average of STREAM_MIN_RATE bytes per second; writing the answer
  may stall no longer;
- after the answer, the worker lingers for the client's close in the selector, not in a recv().
Every connection is closed after its answer (Connection: close), as the sync worker does, but for one kind.

Reads answered from the app's kept answer keep their connection. A plain GET (`_plain_get`) whose answer
the app kept since the registry's last commit (web/fast_reads.py) is answered here, in the selector's
pass, once the caller passes the app's own check (`AccessCheck`, its uid asked of the kernel once per
connection) and the change token is still the one the answer was built at. The connection then waits
in the selector for its next request head, within HEAD_SECONDS (idle that long, it is closed without a
word); `Connection: close` and a stopping worker close it after the answer. At most PIPELINE_BATCH such
answers are given in a row on one connection before the others get their turn. An answer the client
does not take at once waits in the selector (its connection read no further) for BODY_SECONDS at most,
within WRITE_BUDGET: a client that never reads holds no worker. While a worker answers kept connections
(SPREAD_WINDOW), or has just taken one (BURST_WINDOW), it offers each new connection to the other workers
over the hand-over pair below, so that clients connecting together do not all stay with the worker that
woke first.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import io
import json
import logging
import os
import re
import resource
import selectors
import socket
import ssl
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial

from gunicorn import SERVER, http, util
from gunicorn.http import wsgi
from gunicorn.workers.sync import SyncWorker
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import RequestTimeout
from werkzeug.wrappers import Request

from kuiper_plugins.app import MAX_JSON_BODY
from kuiper_plugins.errors import Forbidden, MalformedBody, Unauthorized
from kuiper_plugins.lifecycle import audit
from kuiper_plugins.web import peers
from kuiper_plugins.web.access import PERSISTENT_CONNECTION, AccessCheck, access_check_of, refusal
from kuiper_plugins.web.fast_reads import REQUEST_ID_HEADER, FastReads, KeptAnswer, fast_reads_of

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
HEAD_RECV_SIZE = 16 * 1024  # while a head arrives: little of a body is read before its caller is checked
HEAD_BUDGET = 16 * 1024 * 1024  # bytes of unfinished heads one worker holds at most
BODY_BUDGET = 32 * 1024 * 1024  # bytes of let-in requests, waiting to be served, one worker holds at most
ACCEPT_BATCH = 64  # connections taken per wake-up, so that a crowd leaves the listen queue quickly
FD_RESERVE = 256  # descriptors left for what a request opens: the registry, downloads, install.sh's pipes
WARN_EVERY = 10.0  # seconds between two warnings that connections were closed to make room
HANDOFF_MAX = 64 * 1024  # bytes of a request that may go with its connection to another worker
HANDOFF_FRESH = 1.0  # seconds: a connection with nothing received yet is handed over only this young
HANDOFF_BATCH = 64  # connections handed over at most before one request is served
READS = frozenset({b"GET", b"HEAD", b"OPTIONS"})  # served at once: nothing waits long behind them
PIPELINE_BATCH = 16  # kept answers given in a row on one connection before the others get their turn
WRITE_BUDGET = 32 * 1024 * 1024  # bytes of kept answers waiting for slow readers, one worker holds at most
SPREAD_WINDOW = 0.05  # seconds since it last gave a kept answer: a worker is in use
BURST_WINDOW = 0.005  # ... or since it last took a connection: the next ones of a burst go to the others
OFFER_WAIT = 0.002  # seconds a worker in use waits, after offering or taking one, before it takes offered ones
PLAIN_HEADS_KEPT = 256  # heads read as plain GETs, kept by their bytes (a client repeats its head); then all dropped
PLAIN_HEAD_KEPT_MAX = 2048  # bytes of such a head at most (a client's is a few hundred): 256 kept hold little memory
NOTIFY_EVERY = 1.0  # seconds between two heartbeats to the master (its timeout, far longer, counts from the last)
# A header name the fast path reads as it is: a token without "_" (gunicorn drops or maps those names).
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(rb"[\x20-\x7e\t]*")  # printable ASCII: anything else is for gunicorn's parser to judge
# Headers that change how gunicorn frames or reads a request: such a request is served by the app.
_FRAMING = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"})


class _Connection:
    """One accepted connection while its request arrives (or, answered, while it lingers)."""

    __slots__ = ("sock", "fd", "addr", "listener", "data", "head_end", "body_end", "deadline", "watched", "table",
                 "accepted", "kept", "turn", "out", "closing")

    def __init__(self, sock: socket.socket, addr, listener, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.listener = listener
        self.data = bytearray()
        self.head_end: int | None = None
        self.body_end: int | None = None
        self.deadline = now + HEAD_SECONDS
        self.watched = False  # registered with the selector
        self.table: dict[int, _Connection] | None = None  # the worker's table it is in, if any
        self.accepted = now
        self.kept = False  # kept open after a kept answer, for the client's next request
        self.turn = 0  # kept answers given in a row since it last waited its turn
        self.out: memoryview | None = None  # what is left to send of a kept answer the client reads slowly
        self.closing = False  # close once `out` is sent, rather than keep the connection

    def answer_continue(self) -> None:
        """Send 100 Continue now and drop the Expect line, so that gunicorn does not send it again."""
        head = bytes(self.data[: self.head_end])
        new_head = b"\r\n".join(line for line in head.split(b"\r\n") if not _is_expect_continue(line))
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


class _PlainGet:
    """A request head the worker may answer from a kept answer: GET, HTTP/1.1, no body, plain headers."""

    __slots__ = ("target", "headers", "close", "environ")

    def __init__(self, target: bytes, headers: dict[bytes, bytes], close: bool):
        self.target = target
        self.headers = headers  # lower-cased names, values as sent (stripped)
        self.close = close  # the client asked for the connection to be closed after the answer
        path = target.decode("latin-1")
        # What the environ gunicorn builds holds of this head alone (the connection's ends are added per request).
        self.environ = {
            "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "", "RAW_URI": path,
            "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.multithread": False,
            **{"HTTP_" + name.decode("latin-1").upper().replace("-", "_"): value.decode("latin-1")
               for name, value in headers.items()},
        }


class _HeadLimits:
    """What of gunicorn's settings decides whether it would take a head as it is (read once per worker)."""

    __slots__ = ("line", "fields", "field_size", "judged")

    def __init__(self, cfg):
        self.line = cfg.limit_request_line or sys.maxsize  # 0: unlimited
        self.fields = cfg.limit_request_fields
        self.field_size = cfg.limit_request_field_size or sys.maxsize
        # Headers gunicorn reads to set the URL scheme (nginx's X-Forwarded-Proto), refusing two that disagree:
        # each name with the value that means https.
        self.judged = {name.lower().encode("latin-1"): value.encode("latin-1")
                       for name, value in (cfg.secure_scheme_headers or {}).items()}


def _plain_get(head: bytes, limits: _HeadLimits) -> _PlainGet | None:
    """Read a whole head (without its blank line) as a plain GET; None for anything else.

    Deliberately narrow: whatever is not plainly a GET of an absolute path over HTTP/1.1 with well-formed,
    unrepeated headers (an HTTP/1.0 client, a body, a header gunicorn would map or drop, secure-scheme
    headers that disagree, a size over its limits) is left to gunicorn's parser and the app.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if (len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or len(lines[0]) > limits.line
            or len(lines) - 1 > limits.fields):
        return None
    target = parts[1]
    if target[:1] != b"/" or not target.isascii() or b"?" in target or b"%" in target or b"#" in target:
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or len(line) > limits.field_size or not _HEADER_NAME.fullmatch(name):
            return None
        name, value = name.lower(), value.strip(b" \t")
        if name in headers or name in _FRAMING or not _HEADER_VALUE.fullmatch(value):
            return None
        headers[name] = value
    if headers.get(b"content-length", b"0") != b"0":
        return None
    if len({headers[name] == https for name, https in limits.judged.items() if name in headers}) > 1:
        return None
    close = False
    connection = headers.get(b"connection")
    if connection is not None:
        tokens = {token.strip().lower() for token in connection.split(b",")}
        if b"upgrade" in tokens:
            return None
        close = b"close" in tokens
    return _PlainGet(target, headers, close)


class _KeptRequest:
    """What the caller check (`AccessCheck.check`) reads of a request, as werkzeug's Request would give it."""

    __slots__ = ("environ", "path", "remote_addr", "headers")

    def __init__(self, environ: dict):
        self.environ = environ
        self.path = "/" + environ["PATH_INFO"].lstrip("/")  # an ASCII target without escapes: werkzeug's path
        self.remote_addr = environ["REMOTE_ADDR"]
        self.headers = EnvironHeaders(environ)


class _Logged:
    """One kept answer as its access log line reads it."""

    __slots__ = ("environ", "status", "sent", "request_headers", "answer_headers", "request_id", "took")

    def __init__(self, environ: dict, status: str, sent: int, request_headers: dict[bytes, bytes],
                 answer_headers: tuple[tuple[str, str], ...], request_id: str, took: float):
        self.environ, self.status, self.sent = environ, status, sent
        self.request_headers, self.answer_headers, self.took = request_headers, answer_headers, took
        self.request_id = request_id  # the answer's X-Request-Id header, which answer_headers leave out


class _AccessLine:
    """gunicorn's access log line (`access_log_format`) for a kept answer, with only the atoms it names.

    gunicorn builds every atom it knows, and one per request header, response header and environ entry,
    for each line; the shipped format names ten. Here each atom the format names means what gunicorn's
    `Logger.atoms` makes it mean (an unknown one is "-", a double quote in a text is escaped, as its
    SafeAtoms does), and the line goes to gunicorn's access logger as its own lines do.
    """

    _NAME = re.compile(r"%\(([^)]*)\)")

    def __init__(self, access_log_format: str):
        self.format = access_log_format
        self._atoms = [(name, self._reader(name)) for name in dict.fromkeys(self._NAME.findall(access_log_format))]
        self._stamp = (0, "")

    def atoms(self, logged: _Logged) -> dict[str, object]:
        """The atoms the format names, for one answer."""
        atoms: dict[str, object] = {}
        for name, read in self._atoms:
            value = read(logged)
            atoms[name] = value.replace('"', '\\"') if isinstance(value, str) else value
        return atoms

    def _reader(self, name: str) -> Callable[[_Logged], object]:
        """How to read one atom of an answer (gunicorn's names and meanings)."""
        if name.startswith("{"):
            key, _, kind = name.lower()[1:].rpartition("}")
            if kind == "i":
                raw = key.encode("latin-1")
                return lambda logged: logged.request_headers.get(raw, b"-").decode("latin-1")
            if kind == "o":
                if key == REQUEST_ID_HEADER.lower():
                    return lambda logged: logged.request_id
                return lambda logged: next((value for header, value in logged.answer_headers
                                            if header.lower() == key), "-")
            if kind == "e":
                return lambda logged: next((value for variable, value in logged.environ.items()
                                            if variable.lower() == key), "-")
            return lambda logged: "-"
        readers: dict[str, Callable[[_Logged], object]] = {
            "h": lambda logged: logged.environ.get("REMOTE_ADDR", "-"),
            "l": lambda logged: "-",
            "u": lambda logged: _basic_user(logged.environ.get("HTTP_AUTHORIZATION")),
            "t": lambda logged: self._now(),
            "r": lambda logged: " ".join((logged.environ["REQUEST_METHOD"], logged.environ["RAW_URI"],
                                          logged.environ["SERVER_PROTOCOL"])),
            "s": lambda logged: logged.status.split(None, 1)[0],
            "m": lambda logged: logged.environ["REQUEST_METHOD"],
            "U": lambda logged: logged.environ["PATH_INFO"],
            "q": lambda logged: logged.environ["QUERY_STRING"],
            "H": lambda logged: logged.environ["SERVER_PROTOCOL"],
            "b": lambda logged: str(logged.sent),
            "B": lambda logged: logged.sent,
            "f": lambda logged: logged.environ.get("HTTP_REFERER", "-"),
            "a": lambda logged: logged.environ.get("HTTP_USER_AGENT", "-"),
            "T": lambda logged: int(logged.took),
            "D": lambda logged: int(logged.took * 1e6),
            "M": lambda logged: int(logged.took * 1e3),
            "L": lambda logged: f"{int(logged.took)}.{int(logged.took * 1e6) % 1000000:06d}",
            "p": lambda logged: f"<{os.getpid()}>",
        }
        return readers.get(name, lambda logged: "-")

    def _now(self) -> str:
        """gunicorn's `Logger.now()`, made once a second."""
        second = int(time.time())
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second)))
        return self._stamp[1]


def _basic_user(authorization: str | None) -> str:
    """The user of a Basic Authorization header, as gunicorn's access log reads it; "-" otherwise."""
    if not authorization or not authorization.lower().startswith("basic"):
        return "-"
    scheme_and_value = authorization.split(" ", 1)
    if len(scheme_and_value) != 2:
        return "-"
    try:
        return base64.b64decode(scheme_and_value[1].strip().encode("utf-8")).split(b":", 1)[0].decode("utf-8")
    except (TypeError, binascii.Error, UnicodeDecodeError):
        return "-"


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

    handoff: _Handoff | None = None  # made by the master (check_config) and inherited by every worker

    @classmethod
    def check_config(cls, cfg, log_) -> None:
        """In the master at start: refuse TLS settings, which this worker does not implement."""
        if cfg.is_ssl:
            sys.exit("kuiper-plugins: the worker does not terminate TLS (certfile/keyfile): put nginx in front")
        BufferingWorker.handoff = _Handoff.make()

    _notified = -NOTIFY_EVERY  # when the master was last told this worker is alive (time.monotonic())

    def notify(self) -> None:
        """Tell the master this worker is alive, at most once per NOTIFY_EVERY (each time is a system call)."""
        now = time.monotonic()
        if now - self._notified >= NOTIFY_EVERY:
            self._notified = now
            super().notify()

    def run(self) -> None:
        """Accept, read and serve until told to stop; then serve what has fully arrived and close the rest."""
        self._selector = selectors.DefaultSelector()
        # Each table keeps its connections in the order they entered it, which is their deadlines' order.
        self._heads: dict[int, _Connection] = {}  # accepted, the head arriving
        self._bodies: dict[int, _Connection] = {}  # the caller let in, a body arriving to be kept
        self._ready: dict[int, _Connection] = {}  # whole (or to be streamed): waiting to be served
        self._writing: dict[int, _Connection] = {}  # a kept answer partly sent, the rest waiting for the client
        self._lingering: dict[int, _Connection] = {}  # answered: waiting for the client's close
        self._head_bytes = 0  # held in _heads
        self._body_bytes = 0  # held in _bodies and _ready
        self._out_bytes = 0  # of kept answers held in _writing
        self._shed = 0  # connections closed to make room since the last warning
        self._warned = -WARN_EVERY
        self._capacity = _connection_capacity(self.cfg.worker_connections)
        self._access: AccessCheck | None = access_check_of(self.wsgi)
        self._fast_reads: FastReads | None = fast_reads_of(self.wsgi) if self._access is not None else None
        self._date = (0, b"")  # the Date header of the current second
        self._head_limits = _HeadLimits(self.cfg)
        self._plain_heads: dict[bytes, _PlainGet] = {}
        self._access_line = _AccessLine(self.cfg.access_log_format) if self._fast_reads is not None else None
        self._accepting = self._taking = False
        self._kept_given = 0  # kept answers given so far
        self._last_kept = self._last_taken = -SPREAD_WINDOW  # when the last was given; when one was last taken
        self._offered_until = 0.0  # until then, what this worker offered is left to the others
        self._selector.register(self.PIPE[0], selectors.EVENT_READ, self._wake)
        # Our end of a connection, known without asking, when its listener is bound to one IP address.
        self._local_ends = {listener: _bound_end(listener) for listener in self.sockets}
        for listener in self.sockets:
            listener.setblocking(False)
        try:
            while self.alive:
                self.notify()
                self._set_accepting(not self._ready, not self._ready and time.monotonic() >= self._offered_until)
                self._poll(0 if self._ready else self._next_timeout())
                self._expire(time.monotonic())
                if self._ready:
                    self._serve(self._next_ready())
                if not self.is_parent_alive():
                    return
            while self._ready:
                self.notify()
                self._serve(self._next_ready())
        finally:
            idle = sum(1 for conn in self._heads.values() if conn.kept and not conn.data)  # between two requests
            unanswered = len(self._ready) + len(self._heads) + len(self._bodies) - idle
            if unanswered:
                log.info("the worker is stopping: closing %d connection(s) whose request was not served", unanswered)
            for table in (self._ready, self._heads, self._bodies, self._writing, self._lingering):
                for conn in table.values():
                    util.close(conn.sock)
            self._selector.close()

    # ------------------------------------------------------------ the tables

    def _enter(self, conn: _Connection, table: dict[int, _Connection]) -> None:
        """Move a connection into a table (at its end), its buffered bytes counted against that table's budget."""
        self._leave(conn)
        conn.table = table
        table[conn.fd] = conn
        if table is self._heads:
            self._head_bytes += len(conn.data)
        elif table is self._writing:
            self._out_bytes += len(conn.out)
        elif table is not self._lingering:
            self._body_bytes += len(conn.data)

    def _leave(self, conn: _Connection) -> None:
        table = conn.table
        if table is None:
            return
        del table[conn.fd]
        conn.table = None
        if table is self._heads:
            self._head_bytes -= len(conn.data)
        elif table is self._writing:
            self._out_bytes -= len(conn.out)
        elif table is not self._lingering:
            self._body_bytes -= len(conn.data)

    def _watch(self, conn: _Connection, callback) -> None:
        self._selector.register(conn.sock, selectors.EVENT_READ, partial(callback, conn))
        conn.watched = True

    def _unwatch(self, conn: _Connection) -> None:
        if conn.watched:  # not when its request was whole on arrival (asking would cost an exception)
            conn.watched = False
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass

    def _close(self, conn: _Connection) -> None:
        self._leave(conn)
        self._unwatch(conn)
        util.close(conn.sock)

    def _queue(self, conn: _Connection) -> None:
        """Serve this request as soon as the worker is free: nothing more is read for it here."""
        self._unwatch(conn)
        self._enter(conn, self._ready)

    def _next_ready(self) -> _Connection:
        conn = next(iter(self._ready.values()))
        self._leave(conn)
        return conn

    def _open(self) -> int:
        return len(self._heads) + len(self._bodies) + len(self._ready) + len(self._writing) + len(self._lingering)

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
        fronts = [next(iter(table.values())).deadline
                  for table in (self._heads, self._bodies, self._writing, self._lingering) if table]
        if self._offered_until > time.monotonic():
            fronts.append(self._offered_until)
        if not fronts:
            return 1.0
        return max(0.0, min(1.0, min(fronts) - time.monotonic()))

    def _set_accepting(self, accepting: bool, taking: bool) -> None:
        """Watch the listeners (`accepting`) and the connections other workers hand over (`taking`), or not."""
        if accepting != self._accepting:
            for listener in self.sockets:
                if accepting:
                    self._selector.register(listener, selectors.EVENT_READ, self._accept)
                else:
                    self._selector.unregister(listener)
            self._accepting = accepting
        if self.handoff is not None and taking != self._taking:
            if taking:
                self._selector.register(self.handoff.receiving, selectors.EVENT_READ, self._take_handed)
            else:
                self._selector.unregister(self.handoff.receiving)
            self._taking = taking

    def _accept(self, listener) -> None:
        """Take what waits on a listener, a few at a time; stop once a request is whole, leaving the rest to
        idle workers."""
        given = self._kept_given
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue  # reset while it waited
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return  # none left (or another worker took it)
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("cannot accept a connection: %s", exc.strerror)
                    if self._heads:  # a place for the next one; the kernel keeps this one queued
                        self._shed_oldest_head("the process ran out of file descriptors")
                    return
                raise
            sock.setblocking(False)
            util.close_on_exec(sock)
            conn = _Connection(sock, addr, listener, time.monotonic())
            if self._offer(conn):
                continue
            self._admit(conn)
            self._last_taken = time.monotonic()
            if self._ready or self._kept_given != given:
                return

    def _offer(self, conn: _Connection) -> bool:
        """Hand a new connection to the other workers while this one answers kept connections; True if handed.

        Clients that connect together and keep their connections would otherwise all stay with the worker
        that woke first. This worker leaves what it offered for OFFER_WAIT before it takes it back itself,
        when no other worker was free to.
        """
        if self.handoff is None or self.cfg.workers < 2 or not self.alive or not self._in_use():
            return False
        if not self.handoff.send(conn, self.sockets.index(conn.listener)):
            return False
        util.close(conn.sock)  # our descriptor only: the connection travels in the message
        self._offered_until = time.monotonic() + OFFER_WAIT
        return True

    def _in_use(self) -> bool:
        """Whether this worker gave a kept answer within SPREAD_WINDOW, or took a connection within BURST_WINDOW.

        Clients that keep connections are spread over the workers; one connection after another from clients
        that do not (installs, each on a new connection) stays with the worker that takes it.
        """
        now = time.monotonic()
        return now - self._last_kept < SPREAD_WINDOW or now - self._last_taken < BURST_WINDOW

    def _admit(self, conn: _Connection) -> None:
        """Take a connection (just accepted, or handed over): make room, read what it brought, watch it."""
        if not self._make_room():
            self._refuse(conn, 503, "Service Unavailable",
                         f"too many requests in progress: this worker holds {self._capacity} connections,"
                         " each with a request arriving or waiting to be served")
            return
        self._enter(conn, self._heads)
        if conn.data:  # what arrived before another worker handed it over
            self._head_received(conn, 0)
        if conn.table is self._heads or conn.table is self._bodies:
            self._receive(conn)  # the head often came with the connection
        if (conn.table is self._heads or conn.table is self._bodies) and not conn.watched:
            self._watch(conn, self._receive)  # (answered and kept meanwhile, it is watched already)

    def _make_room(self) -> bool:
        """Make a place for one more connection when the worker holds its capacity; False if none can be freed.

        Lingering connections, already answered, go first; then the oldest whose head is still arriving.
        Requests whose caller was let in are never closed for room.
        """
        while self._open() >= self._capacity:
            if self._lingering:
                self._close(next(iter(self._lingering.values())))
            elif self._heads:
                self._shed_oldest_head(f"this worker holds its {self._capacity} connections (worker_connections)")
            else:
                return False
        return True

    def _shed_oldest_head(self, why: str) -> None:
        """Close the connection that has waited longest for its head, with a 503 saying why."""
        conn = next(iter(self._heads.values()))
        self._shed += 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            log.warning("closed %d connection(s) still without a whole request head, oldest first, to make room:"
                        " %s", self._shed, why)
            self._shed, self._warned = 0, now
        if conn.kept and not conn.data:
            self._close(conn)  # kept after an answer, no request begun: closing it answers nobody
            return
        self._refuse(conn, 503, "Service Unavailable",
                     f"too many connections: {why}, and this one, the oldest still without a whole request head,"
                     " was closed to make room")

    def _receive(self, conn: _Connection, _sock=None) -> None:
        """Take what has arrived: check the caller once the head is whole, queue the request once it can be
        served, drop the connection when it closed."""
        conn.turn = 0
        while conn.table is self._heads or conn.table is self._bodies:
            in_head = conn.table is self._heads
            size = HEAD_RECV_SIZE if in_head else RECV_SIZE
            chunk = _recv(conn.sock, size)
            if chunk is None:
                return
            if not chunk:
                if conn.kept and not conn.data:
                    log.debug("%s closed its kept connection", _peer(conn.addr))
                else:
                    log.debug("%s closed (or reset) its connection before a whole request", _peer(conn.addr))
                self._close(conn)
                return
            seen = len(conn.data)
            conn.data += chunk
            if in_head:
                self._head_bytes += len(chunk)
                self._head_received(conn, seen)
            else:
                self._body_bytes += len(chunk)
                if len(conn.data) >= conn.body_end:
                    self._queue(conn)
                elif self._body_bytes > BODY_BUDGET:
                    log.info("serving %s before its body has arrived: %d bytes of requests are buffered",
                             _peer(conn.addr), self._body_bytes)
                    self._queue(conn)  # the rest of its body streams while it is served
            if len(chunk) < size:
                return  # nothing more had arrived: asking again would only fail (the selector says when)

    def _head_received(self, conn: _Connection, seen: int) -> None:
        """After more of a head arrived (`seen` bytes were there before): act on a whole, bad or large head."""
        end = conn.data.find(b"\r\n\r\n", max(0, seen - 3))
        if end >= 0:
            self._head_whole(conn, end + 4)
        elif conn.data.find(b"\n\n", max(0, seen - 1)) >= 0:
            # gunicorn 27 refuses bare LF line ends; older ones would wait in recv() for a CRLF.
            self._refuse(conn, 400, "Bad Request", "invalid request head: lines must end with CRLF")
        elif len(conn.data) > MAX_HEAD:
            self._refuse(conn, 431, "Request Header Fields Too Large", f"request head larger than {MAX_HEAD} bytes")
        else:
            while self._head_bytes > HEAD_BUDGET and self._heads:
                self._shed_oldest_head(f"unfinished request heads hold {self._head_bytes} bytes in this worker")

    def _head_whole(self, conn: _Connection, head_end: int) -> None:
        """The head is whole: serve a request without a body; check the caller of one with a body."""
        conn.head_end = head_end
        head = bytes(conn.data[: head_end - 4])
        get = self._plain_head(head)
        length, expects = (0, False) if get is not None else _announced_body(head)  # a plain GET has no body
        if length == 0:
            if not self._answer_kept(conn, get):
                self._queue(conn)
            return
        keep_body = self._check_caller(conn)
        if conn.table is not self._heads:
            return  # refused: answered here
        if length is None or not keep_body:
            self._queue(conn)  # streamed to the application, which reads what it needs
            return
        self._leave(conn)
        if expects:
            conn.answer_continue()
        conn.body_end = conn.head_end + length
        conn.deadline = time.monotonic() + BODY_SECONDS
        self._enter(conn, self._bodies)
        if len(conn.data) >= conn.body_end:
            self._queue(conn)

    # ------------------------------------------------------------ kept answers, on kept connections

    def _plain_head(self, head: bytes) -> _PlainGet | None:
        """`_plain_get` of a head (without its blank line), remembered: a client sends the same head again and again."""
        if self._fast_reads is None:
            return None
        get = self._plain_heads.get(head)
        if get is None:
            get = _plain_get(head, self._head_limits)
            if get is not None and len(head) <= PLAIN_HEAD_KEPT_MAX:
                if len(self._plain_heads) >= PLAIN_HEADS_KEPT:
                    self._plain_heads.clear()
                self._plain_heads[head] = get
        return get

    def _answer_kept(self, conn: _Connection, get: _PlainGet | None = None) -> bool:
        """Answer a whole GET from the app's kept answer (web/fast_reads.py); False to let the app serve it.

        The caller is checked as the app checks it; the answer is used only while the registry has not
        changed since the app gave it. The connection is then kept for the client's next request (unless
        it asked to close, or the worker is stopping), which must arrive within HEAD_SECONDS.
        """
        reads = self._fast_reads
        if reads is None or not self.alive or conn.turn >= PIPELINE_BATCH or not isinstance(conn.addr, tuple):
            return False
        began = time.monotonic()
        if get is None:
            get = self._plain_head(bytes(conn.data[: conn.head_end - 4]))
            if get is None:
                return False
        kept = reads.answer(get.target)
        if kept is None and reads.known(get.target) and self._refresh(conn):
            kept = reads.answer(get.target)
        if kept is None:
            return False
        environ = self._kept_environ(conn, get)
        peers.serving(conn.sock, conn.addr, self._local_ends.get(conn.listener))
        try:
            self._access.check(_KeptRequest(environ))
        except Exception:  # (refused, or the check failed: the app runs it again and answers, with its log line)
            return False
        finally:
            peers.serving(None)
        conn.turn += 1
        self._kept_given += 1
        self._last_kept = time.monotonic()
        self._leave(conn)
        del conn.data[: conn.head_end]
        conn.head_end = None
        request_id = audit.request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        self.nr += 1
        if self.nr >= self.max_requests:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        conn.closing = not self.alive or get.close
        self._log_kept(kept, request_id, get, environ, began)
        self._send_answer(conn, kept, request_id)
        return True

    def _refresh(self, conn: _Connection) -> bool:
        """Have the app answer this GET again, within the worker, so that it keeps its new answer; False if not.

        An answer kept before a commit is stale after it: the app, asked as any request asks it, builds and
        keeps the new one (or refuses the caller, and keeps nothing), and the client's connection stays kept
        instead of being closed by an answer served the sync worker's way.
        """
        try:
            environ = self._environ(conn)
        except Exception:  # (gunicorn's parser answers it when the request is served)
            return False
        environ[PERSISTENT_CONNECTION] = True
        peers.serving(conn.sock, conn.addr, self._local_ends.get(conn.listener))
        try:
            answer = self.wsgi(environ, lambda status, headers, exc_info=None: None)
            try:
                for _ in answer:
                    pass
            finally:
                if hasattr(answer, "close"):
                    answer.close()
        except Exception:  # (served the sync worker's way, the request meets the same failure and answers it)
            log.debug("the app did not give %s a new answer to keep", _peer(conn.addr), exc_info=True)
            return False
        finally:
            peers.serving(None)
        return True

    def _answered(self, conn: _Connection) -> None:
        """A kept answer is sent: keep the connection for the client's next request, or close it."""
        if conn.closing or not self.alive:
            self._unwatch(conn)
            self._linger(conn)
            return
        conn.kept = True
        conn.deadline = time.monotonic() + HEAD_SECONDS
        self._enter(conn, self._heads)
        if not conn.watched:
            self._watch(conn, self._receive)
        if conn.data:  # a pipelined request came with this one
            self._head_received(conn, 0)

    def _kept_environ(self, conn: _Connection, get: _PlainGet) -> dict:
        """The environ the caller check reads, as gunicorn would build it for this head."""
        server = self._local_ends.get(conn.listener) or conn.listener.getsockname()
        environ = get.environ.copy()  # (the check adds to its environ: each request gets its own)
        environ.update({
            "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]), "REMOTE_ADDR": conn.addr[0],
            "REMOTE_PORT": str(conn.addr[1]), "gunicorn.socket": conn.sock, PERSISTENT_CONNECTION: True,
        })
        return environ

    def _send_answer(self, conn: _Connection, kept: KeptAnswer, request_id: str) -> None:
        """Write a kept answer, with its own request id, as gunicorn writes the app's; never wait for the client.

        What the client is not ready to take waits in the selector (`_flush`), its connection read no further,
        for at most BODY_SECONDS, and within WRITE_BUDGET: a client that sends requests without reading the
        answers holds no worker, and at most its unread answer here.
        """
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True).encode("latin-1"))
        answer = b"".join((
            b"HTTP/1.1 ", kept.status, b"\r\nServer: ", SERVER.encode(), b"\r\nDate: ", self._date[1],
            b"\r\nConnection: close\r\n" if conn.closing else b"\r\nConnection: keep-alive\r\n",
            kept.before_id, f"{REQUEST_ID_HEADER}: {request_id}\r\n".encode("latin-1"), kept.after_id, kept.body,
        ))
        try:
            sent = conn.sock.send(answer)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.debug("%s went away before its answer: %s", _peer(conn.addr), exc)
            self._close(conn)
            return
        if sent == len(answer):
            self._answered(conn)
            return
        if self._out_bytes + len(answer) - sent > WRITE_BUDGET:
            log.info("closing %s: %d bytes of answers already wait for slow readers in this worker",
                     _peer(conn.addr), self._out_bytes)
            self._close(conn)
            return
        self._unwatch(conn)
        conn.out = memoryview(answer)[sent:]
        conn.deadline = time.monotonic() + BODY_SECONDS
        self._enter(conn, self._writing)
        self._selector.register(conn.sock, selectors.EVENT_WRITE, partial(self._flush, conn))
        conn.watched = True

    def _flush(self, conn: _Connection, _sock=None) -> None:
        """Send more of a kept answer the client reads slowly; once it is all sent, carry on as `_answered`."""
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("%s went away while it was answered: %s", _peer(conn.addr), exc)
            self._close(conn)
            return
        self._out_bytes -= sent
        conn.out = conn.out[sent:]
        if conn.out:
            return
        self._leave(conn)
        self._unwatch(conn)
        conn.out = None
        self._answered(conn)

    def _log_kept(self, kept: KeptAnswer, request_id: str, get: _PlainGet, environ: dict, began: float) -> None:
        """The access log line gunicorn writes for an answer of the app, for a kept answer."""
        logger = self.log.access_log
        if self._access_line is None or not self.log.access_log_enabled or not logger.isEnabledFor(logging.INFO):
            return
        atoms = self._access_line.atoms(_Logged(environ, kept.status.decode("latin-1"), len(kept.body), get.headers,
                                                kept.headers, request_id, time.monotonic() - began))
        try:
            # What logger.info() does, but for looking up which line of which file called it (nothing in gunicorn's
            # format prints that): the access line cost a fifth of a kept answer's time.
            logger.handle(logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, self._access_line.format,
                                            (atoms,), None))
        except Exception:  # as gunicorn's own access(): a broken log line never fails the request
            self.log.error(traceback.format_exc())

    # ------------------------------------------------------------ the caller, before the body

    def _check_caller(self, conn: _Connection) -> bool:
        """Run the app's caller check on a whole head that announces a body; answer a refused caller here.

        True: a caller let in on a guarded path, whose body may be kept here. False: serve the request
        without keeping its body: an open path; a head gunicorn's parser refuses (it answers it when the
        request is served); a caller refused (answered here); another app than ours (nothing to ask).
        """
        if self._access is None:
            return True
        try:
            environ = self._environ(conn)
        except Exception:  # (gunicorn's parser answers it, as for any request, when served)
            return False
        peers.serving(conn.sock, conn.addr, self._local_ends.get(conn.listener))
        try:
            return self._access.check(Request(environ))
        except (Forbidden, Unauthorized) as exc:
            self._answer_refusal(conn, exc, environ)
            return False
        except Exception:  # (the app runs the same check when it serves the request, and answers)
            log.debug("the caller check on %s's head failed; the app will run it", _peer(conn.addr), exc_info=True)
            return False
        finally:
            peers.serving(None)

    def _environ(self, conn: _Connection) -> dict:
        """The WSGI environ gunicorn builds for this head, as the app would see it (the body not read).

        An Expect: 100-continue line is left out: gunicorn would answer it, and only a caller let in may
        be told to send its body.
        """
        head = bytes(conn.data[: conn.head_end])
        head = b"\r\n".join(line for line in head.split(b"\r\n") if not _is_expect_continue(line))
        req = next(http.RequestParser(self.cfg, iter([head]), conn.addr))
        server = self._local_ends.get(conn.listener) or conn.listener.getsockname()
        return wsgi.create(req, conn.sock, conn.addr, server, self.cfg)[1]

    def _answer_refusal(self, conn: _Connection, exc: Forbidden | Unauthorized, environ: dict) -> None:
        """Answer a refused caller as the app would, drop what arrived of its body, and linger for its close.

        The app itself answers the head, its body left out, so that the refusal gets its request id and its
        audit row as any other; should the app not refuse it (it runs the same check), the refusal is ours.
        """
        status, headers, body = self._app_refusal(environ) or self._own_refusal(exc)
        lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers), "Connection: close", "", ""]
        log.info("answered %s to %s before reading the body it announced", status.split()[0], _peer(conn.addr))
        self._leave(conn)
        self._unwatch(conn)
        conn.data = bytearray()
        try:
            conn.sock.send("\r\n".join(lines).encode("latin-1") + body)  # small: never blocks
        except OSError:
            pass
        self._linger(conn)

    def _app_refusal(self, environ: dict) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The app's own answer to a refused head, served with an empty body; None unless it refuses it."""
        environ = {**environ, "CONTENT_LENGTH": "0", "wsgi.input": io.BytesIO()}
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        started: list = []
        try:
            answer = self.wsgi(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
            try:
                body = b"".join(answer)
            finally:
                if hasattr(answer, "close"):
                    answer.close()
        except Exception:  # (our own refusal is answered instead)
            log.debug("the app did not answer a refused head", exc_info=True)
            return None
        if not started or started[0][0].split()[0] not in ("401", "403"):
            return None
        status, headers = started[0]
        return status, [(name, value) for name, value in headers if name.lower() != "connection"], body

    @staticmethod
    def _own_refusal(exc: Forbidden | Unauthorized) -> tuple[str, list[tuple[str, str]], bytes]:
        response = refusal(exc)
        return response.status, list(response.headers.items()), response.get_data()

    # ------------------------------------------------------------ deadlines and refusals

    def _expire(self, now: float) -> None:
        """Answer 408 to requests past their deadline (after taking what arrived meanwhile); end lingering."""
        for table, what, seconds in ((self._heads, "request head", HEAD_SECONDS),
                                     (self._bodies, "request body", BODY_SECONDS)):
            while table:
                conn = next(iter(table.values()))
                if conn.deadline > now:
                    break
                self._receive(conn)  # it may have arrived while a request was being served
                if conn.table is not table:
                    continue
                if conn.kept and not conn.data:
                    self._close(conn)  # idle between two requests: no request is late, nothing to answer
                    continue
                log.info("closing %s: its %s did not arrive within %g s", _peer(conn.addr), what, seconds)
                self._refuse(conn, 408, "Request Timeout", f"{what} not received within {seconds:g} seconds")
        while self._writing:
            conn = next(iter(self._writing.values()))
            if conn.deadline > now:
                break
            log.info("closing %s: it stopped reading the answer for %g s", _peer(conn.addr), BODY_SECONDS)
            self._close(conn)
        while self._lingering:
            conn = next(iter(self._lingering.values()))
            if conn.deadline > now:
                break
            self._close(conn)

    def _refuse(self, conn: _Connection, status: int, reason: str, message: str) -> None:
        """Answer an error without serving the request, in the envelope the service uses, and close."""
        self._leave(conn)
        self._unwatch(conn)
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
        conn.turn = 0  # its turn in the queue: pipelined requests may be answered again
        if conn.head_end is not None and self._answer_kept(conn):
            return
        if self.alive and self.handoff is not None and bytes(conn.data[: conn.data.find(b" ")]) not in READS:
            self._hand_over_the_others()
        sock = conn.sock
        req = None
        sock.settimeout(BODY_SECONDS)
        try:
            parser = http.RequestParser(self.cfg, _StreamedBody(sock), conn.addr)
            parser.unreader.unread(bytes(conn.data))
            conn.data = bytearray()
            req = next(parser)
            req.body = _FramedBody(req.body)
            peers.serving(sock, conn.addr, self._local_ends.get(conn.listener))
            try:
                self.handle_request(conn.listener, req, sock, conn.addr)
            finally:
                peers.serving(None)
        except http.errors.NoMoreData as exc:
            log.debug("%s closed its connection inside its request: %s", _peer(conn.addr), exc)
        except StopIteration:
            log.debug("%s sent no request before it closed its connection", _peer(conn.addr))
        except TimeoutError:
            log.info("closing %s: it stopped reading the answer for %g s", _peer(conn.addr), BODY_SECONDS)
            util.close(sock)
            return
        except ssl.SSLError as exc:  # never raised without TLS, which check_config refuses; as sync does
            self.handle_error(req, sock, conn.addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
            else:
                log.debug("%s went away while it was served: %s", _peer(conn.addr), exc)
            util.close(sock)
            return
        except BaseException as exc:
            self.handle_error(req, sock, conn.addr, exc)
        self._linger(conn)

    # ------------------------------------------------------------ handing requests to free workers

    def _hand_over_the_others(self) -> None:
        """Before a write is served: give the requests under way here to a free worker (module docstring)."""
        now = time.monotonic()
        for conn in list(self._heads.values())[:HANDOFF_BATCH]:
            self._receive(conn)  # what arrived since the last look: a head may be whole by now
        handed = 0
        for table in (self._ready, self._bodies, self._heads):
            for conn in list(table.values()):
                if handed >= HANDOFF_BATCH:
                    return
                if len(conn.data) > HANDOFF_MAX or (not conn.data and not conn.kept
                                                     and now - conn.accepted > HANDOFF_FRESH):
                    continue  # too much to carry, or idle long enough not to be a client about to send
                if not self.handoff.send(conn, self.sockets.index(conn.listener)):
                    return  # the pair is full: the rest stay here
                self._close(conn)  # our descriptor only: the connection travels in the message
                handed += 1

    def _take_handed(self, _sock=None) -> None:
        """Take connections other workers handed over, while this one is free, as if just accepted."""
        given = self._kept_given
        for _ in range(ACCEPT_BATCH):
            in_use = self._in_use()
            handed = self.handoff.receive(self.sockets)
            if handed is None:
                return
            self._admit(handed)
            self._last_taken = time.monotonic()
            if in_use:  # one at a time: workers not in use, or whose wait is over, take the next ones
                self._offered_until = self._last_taken + OFFER_WAIT
                return
            if self._ready or self._kept_given != given:
                return

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
        self._enter(conn, self._lingering)
        self._watch(conn, self._linger_read)

    def _linger_read(self, conn: _Connection, _sock=None) -> None:
        if _recv(conn.sock) == b"":
            self._close(conn)


class _Handoff:
    """The socket pair over which workers hand connections to each other (module docstring).

    One message is one connection: its descriptor (SCM_RIGHTS), then a small JSON header (the listener's
    index among the worker's sockets, the client's address, the request's deadline and when it was
    accepted) and what arrived of the request. CLOCK_MONOTONIC, which time.monotonic reads, is the
    machine's, so deadlines mean the same in every worker.
    """

    def __init__(self, sending: socket.socket, receiving: socket.socket):
        self.sending = sending
        self.receiving = receiving

    @classmethod
    def make(cls) -> _Handoff | None:
        """Make the pair (in the master, before it forks); None where the system cannot."""
        try:
            sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            log.warning("workers cannot hand connections to each other (%s): a request may wait behind a"
                        " write in the worker that took it", exc)
            return None
        sending.setblocking(False)
        receiving.setblocking(False)
        return cls(sending, receiving)

    def send(self, conn: _Connection, listener_index: int) -> bool:
        """Hand one connection over; False if the pair has no room for it now."""
        addr = list(conn.addr) if isinstance(conn.addr, tuple) else conn.addr
        header = json.dumps({"listener": listener_index, "addr": addr, "deadline": conn.deadline,
                             "accepted": conn.accepted, "kept": conn.kept}).encode()
        message = len(header).to_bytes(4, "big") + header + bytes(conn.data)
        try:
            socket.send_fds(self.sending, [message], [conn.fd])
        except OSError:  # EAGAIN (full), EMSGSIZE, ENOBUFS: keep it
            return False
        return True

    def receive(self, listeners: list) -> _Connection | None:
        """Take one handed-over connection; None when there is none now."""
        for _ in range(16):  # past a malformed message (never sent here), to the next one
            try:
                message, fds, flags, _ = socket.recv_fds(self.receiving, HANDOFF_MAX + 4096, 4)
            except (BlockingIOError, InterruptedError):
                return None
            try:
                if len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ValueError("not one connection")
                size = int.from_bytes(message[:4], "big")
                header = json.loads(message[4:4 + size])
                sock = socket.socket(fileno=fds.pop())
                sock.setblocking(False)
                addr = header["addr"]
                conn = _Connection(sock, tuple(addr) if isinstance(addr, list) else addr,
                                   listeners[header["listener"]], header["accepted"])
                conn.deadline = header["deadline"]
                conn.kept = bool(header.get("kept"))
                conn.data = bytearray(message[4 + size:])
                return conn
            except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
                log.warning("dropped a malformed connection hand-over: %s", exc)
            finally:
                for fd in fds:
                    os.close(fd)
        return None


def _connection_capacity(wanted: int) -> int:
    """How many connections a worker may hold: `wanted`, with its open-files soft limit raised to fit.

    The soft limit is raised (never lowered, and never past the hard limit) to `wanted` + FD_RESERVE;
    when the hard limit is lower, the worker holds fewer, and says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, raised, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    capacity = max(soft // 2, soft - FD_RESERVE)
    log.warning("worker_connections is %d, but the open-files limit (%d, hard %d) leaves room for %d connections"
                " per worker: raise LimitNOFILE", wanted, soft, hard, capacity)
    return capacity


def _bound_end(listener) -> tuple[str, int] | None:
    """The address and port of a TCP listener bound to one IP address; None for a wildcard or a Unix socket."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    address = listener.getsockname()
    if address[0] in ("0.0.0.0", "::"):
        return None  # each connection's own end may be any of the machine's addresses
    return address[0], address[1]


def _recv(sock: socket.socket, size: int = RECV_SIZE) -> bytes | None:
    """What has arrived on a non-blocking socket: None when nothing yet, b"" when it closed or broke."""
    try:
        return sock.recv(size)
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
