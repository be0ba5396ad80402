"""Reads answered by the worker from the app's kept answer, on connections it keeps open (web/fast_reads.py).

Real gunicorn with several workers, a raw HTTP client on loopback sockets (to see every byte of every
answer and when the server closes), curl as `nobody` through setpriv for another local user. An answer
is a kept one when it comes with `Connection: keep-alive`: only kept answers keep the connection.
"""

from __future__ import annotations

import email.utils
import json
import re
import signal
import socket
import threading
import time
import uuid

import pytest
import requests
from conftest import make_zip
from test_auth import ISSUER, claims, public_pem, sign
from test_deploy import nginx  # noqa: F401  (the shipped nginx in front of the service)
from test_peer_access import assert_refused_user, curl

READS = ("/plugins/sources", "/plugins/sources/random", "/plugins/functions", "/plugins/udfs", "/plugins/udfs/twice",
         "/plugins/sinks", "/plugins/functions/multi")
ATTEMPTS = 40  # new connections tried before one lands on a worker that kept the answer (two workers, usually 3)


class Answer:
    """One HTTP answer as it came off the socket."""

    def __init__(self, status_line: bytes, headers: list[tuple[str, str]], body: bytes):
        self.status_line = status_line
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        found = [value for key, value in self.headers if key.lower() == name.lower()]
        assert len(found) <= 1, self.headers
        return found[0] if found else None

    def head_without(self, *names: str) -> list[tuple[str, str]]:
        return [(key, value) for key, value in self.headers if key.lower() not in {n.lower() for n in names}]


class Client:
    """A raw HTTP/1.1 client on one loopback connection: what it sends is sent as given."""

    opened: list[Client] = []  # closed after each test (close_clients), whatever the test's outcome

    def __init__(self, port: int, timeout: float = 10.0, receive_buffer: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        Client.opened.append(self)
        if receive_buffer is not None:  # before connecting: it sets the window the server may fill
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> Answer:
        """Read one whole answer (its body framed by Content-Length)."""
        for _ in range(10_000):  # bounded by the socket's timeout as well
            if b"\r\n\r\n" in self.buffer:
                break
            assert self._fill(), f"the server closed before a whole answer head: {self.buffer!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        pairs = (line.partition(b":") for line in lines)
        headers = [(name.decode(), value.strip().decode()) for name, _, value in pairs]
        length = int(next(value for name, value in headers if name.lower() == "content-length"))
        while len(self.buffer) < length:
            assert self._fill(), "the server closed inside an answer's body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status_line, headers, body)

    def closed_by_server(self, timeout: float) -> bool:
        """Whether the server closes the connection within `timeout` without sending anything more."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert chunk == b"", f"the server sent more than expected: {chunk!r}"
        return True

    def closed_after_what_was_sent(self, timeout: float) -> bool:
        """Whether the connection ends (EOF or reset) once what was sent already is read (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if self.sock.recv(1 << 20) == b"":
                    return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while Client.opened:
        Client.opened.pop().close()


def get(path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    """A GET head with the headers given (Host: 127.0.0.1 unless one is given)."""
    host = [] if any(header.lower().startswith("host:") for header in headers) else ["Host: 127.0.0.1"]
    return "\r\n".join([f"GET {path} {version}", *host, *headers, "", ""]).encode()


def kept_connection(port: int, path: str, *headers: str) -> tuple[Client, Answer]:
    """A connection the service keeps open after answering `path` from its kept answer, and that answer.

    A worker that has not kept the answer yet serves the request through the app (which keeps it) and closes
    the connection; each new connection may land on either worker, so a few tries are needed (bounded).
    """
    for _ in range(ATTEMPTS):
        client = Client(port)
        client.send(get(path, *headers))
        answer = client.answer()
        if answer.header("Connection") == "keep-alive":
            return client, answer
        assert answer.header("Connection") == "close", answer.headers
        client.close()
    raise AssertionError(f"no answer to {path} kept its connection in {ATTEMPTS} connections")


def worker_holding(server, client: Client) -> int:
    """The pid of the worker holding the server's end of this client's connection (from /proc)."""
    import psutil

    local = client.sock.getsockname()
    for worker in psutil.Process(server.process.pid).children():
        for conn in worker.net_connections(kind="tcp"):
            if conn.raddr and (conn.raddr.ip, conn.raddr.port) == local:
                return worker.pid
    raise AssertionError(f"no worker holds the connection from {local}")


def install_plugins(server, file_server) -> None:
    """A source `random` and a function plugin `multi` (twice, shout), through the service."""
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": b"so", "random.yaml": "a: 1\n"})
    make_zip(file_server.root / "multi.zip", {"Multi@v1.0.0.so": b"so"})
    for plugin_type, body in (("sources", {"name": "random", "file": file_server.url("random.zip")}),
                              ("functions", {"name": "multi", "file": file_server.url("multi.zip"),
                                             "functions": ["twice", "shout"]})):
        created = requests.post(f"{server.url}/plugins/{plugin_type}", json=body, timeout=60)
        assert created.status_code == 201, created.text


def access_lines(server, request_id: str, count: int = 1) -> list[str]:
    """The access log lines of a request id, once there are `count` of them.

    A worker writes a request's line just after its answer: the client may read the answer first. Polled,
    bounded by a deadline.
    """
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.log_path.read_text(errors="replace").splitlines()
                 if "gunicorn.access" in line and line.endswith(f"request_id={request_id}")]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def _dated(answer: Answer) -> None:
    """The Date header is an HTTP date of the last few seconds."""
    date = email.utils.parsedate_to_datetime(answer.header("Date"))
    assert abs(date.timestamp() - time.time()) < 30, answer.header("Date")


# ---------------------------------------------------------------------------- the app's own bytes


@pytest.mark.slow
@pytest.mark.parametrize("path", READS)
def test_a_kept_answer_is_the_apps_answer_byte_for_byte(start_gunicorn, file_server, path):
    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    request_id = f"compare-{uuid.uuid4().hex[:12]}"
    # The app's answer: a target with a query is never answered from a kept answer.
    app_client = Client(server.port)
    app_client.send(get(f"{path}?", f"X-Request-Id: {request_id}", "Connection: close"))
    by_app = app_client.answer()
    assert app_client.closed_by_server(10)
    app_client.close()

    client, kept = kept_connection(server.port, path, f"X-Request-Id: {request_id}")
    client.send(get(path, f"X-Request-Id: {request_id}", "Connection: close"))
    kept_then_closed = client.answer()
    assert client.closed_by_server(10)  # Connection: close is honoured
    client.close()

    assert by_app.status_line == kept.status_line == kept_then_closed.status_line == b"HTTP/1.1 200 OK"
    assert by_app.body == kept.body == kept_then_closed.body
    for answer in (by_app, kept, kept_then_closed):
        _dated(answer)
    # Every header the same, in the same order, but the Date, and Connection while the connection is kept.
    assert kept_then_closed.head_without("Date") == by_app.head_without("Date")
    assert kept.head_without("Date", "Connection") == by_app.head_without("Date", "Connection")
    assert by_app.header("Connection") == "close" and kept.header("Connection") == "keep-alive"
    assert kept.header("X-Request-Id") == request_id
    # Each answer has its access log line, the same but for the time and the target the client sent.
    lines = access_lines(server, request_id, 3)
    masked = {re.sub(r"^.*?gunicorn\.access: | \[[^]]+\] ", " ", line).replace(f"{path}? ", f"{path} ")
              for line in lines}
    assert len(lines) >= 3 and len(masked) == 1, lines


@pytest.mark.slow
def test_each_kept_answer_has_its_own_request_id_and_log_line(start_gunicorn, file_server):
    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    client, first = kept_connection(server.port, "/plugins/sources")
    ids = [first.header("X-Request-Id")]
    for _ in range(3):
        client.send(get("/plugins/sources"))
        answer = client.answer()
        assert answer.header("Connection") == "keep-alive" and answer.body == b'["random"]'
        ids.append(answer.header("X-Request-Id"))
    client.close()
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids), ids
    for request_id in ids:
        (line,) = access_lines(server, request_id)
        assert '"GET /plugins/sources HTTP/1.1" 200 10 "-" "-"' in line, line


def test_a_long_head_gets_its_kept_answer_each_time_too(start_gunicorn, file_server):
    """Heads of over 2 KiB are read anew each time rather than remembered (gunicorn_worker.PLAIN_HEAD_KEPT_MAX);
    they are answered from the kept answer all the same, one after another on one connection."""
    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    client, _ = kept_connection(server.port, "/plugins/sources")
    for index in range(3):
        client.send(get("/plugins/sources", f"X-Pad: {index}{'a' * 3000}"))
        answer = client.answer()
        assert answer.header("Connection") == "keep-alive" and answer.body == b'["random"]', answer.headers
    client.close()


@pytest.mark.slow
def test_workers_giving_kept_answers_nonstop_or_idle_still_tell_the_master_they_live(start_gunicorn, file_server):
    """The worker tells the master it lives at most once a second (gunicorn_worker.NOTIFY_EVERY). With gunicorn's
    timeout at 3 s, no worker is taken for hung: not the one giving kept answers without a break, nor the idle one,
    nor either once no request comes for longer than the timeout."""
    server = start_gunicorn(workers=2, GUNICORN_CMD_ARGS="--timeout 3")
    workers = server.workers_booted()
    install_plugins(server, file_server)
    client, _ = kept_connection(server.port, "/plugins/sources")
    given, deadline = 0, time.monotonic() + 5
    while time.monotonic() < deadline:  # bounded: 5 s of kept answers, back to back (over the 3 s timeout)
        client.send(get("/plugins/sources"))
        assert client.answer().header("Connection") == "keep-alive"
        given += 1
    client.close()
    time.sleep(4)  # no request for longer than the timeout: only the heartbeat keeps the workers
    assert "WORKER TIMEOUT" not in server.log() and given > 100
    assert server.workers_booted() == workers


# ---------------------------------------------------------------------------- as fresh as the app


def kept_connection_per_worker(server, path: str) -> dict[int, Client]:
    """A kept connection held by each of the service's workers (pid -> connection); bounded tries."""
    import psutil

    workers = {child.pid for child in psutil.Process(server.process.pid).children()}
    held: dict[int, Client] = {}
    for _ in range(ATTEMPTS):
        client, _ = kept_connection(server.port, path)
        pid = worker_holding(server, client)
        if pid in held:
            client.close()
        else:
            held[pid] = client
        if set(held) == workers:
            return held
    raise AssertionError(f"kept connections only on workers {sorted(held)} of {sorted(workers)}")


@pytest.mark.slow
def test_a_commit_in_another_worker_is_seen_by_the_very_next_request(start_gunicorn, file_server):
    """The install is sent on a connection one worker holds, so that worker serves it; the list is asked right
    after the 201 on the connection the other worker holds, its answer to it kept from before the commit."""
    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    for index in range(2):
        (first, writer), (second, reader) = kept_connection_per_worker(server, "/plugins/sources").items()
        if index:
            (first, writer), (second, reader) = (second, reader), (first, writer)
        name = f"fresh{index}"
        make_zip(file_server.root / f"{name}.zip", {f"{name.capitalize()}@v1.0.0.so": b"so", f"{name}.yaml": "a: 1\n"})
        body = json.dumps({"name": name, "file": file_server.url(f"{name}.zip")}).encode()
        writer.send(b"POST /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nX-Request-Id: install-%d\r\n\r\n%s" % (len(body), index, body))
        created = writer.answer()
        assert created.status_line == b"HTTP/1.1 201 CREATED", created.body
        reader.send(get("/plugins/sources"))
        listed = reader.answer()
        assert json.loads(listed.body) == sorted(["random", *(f"fresh{i}" for i in range(index + 1))]), listed.body
        assert listed.header("Connection") == "keep-alive"  # the connection stays kept: a new answer is kept
        (line,) = access_lines(server, f"install-{index}")
        assert f"[{first}]" in line and first != second, line  # the install was the other worker's
        for client in (writer, reader):
            client.close()


# ---------------------------------------------------------------------------- what a kept connection may do


@pytest.mark.slow
def test_kept_connections_honour_http_1_0_pipelining_and_the_idle_bound(start_gunicorn, file_server):
    server = start_gunicorn(workers=2, KUIPER_PLUGINS_HEAD_TIMEOUT="2")
    install_plugins(server, file_server)

    # Pipelined: more requests in one write than a worker answers in a row (PIPELINE_BATCH), all answered in order,
    # each with its own id.
    client, _ = kept_connection(server.port, "/plugins/sources")
    client.send(b"".join(get("/plugins/sources", f"X-Request-Id: pipelined-{index}") for index in range(40)))
    answers = [client.answer() for _ in range(40)]
    assert [answer.header("X-Request-Id") for answer in answers] == [f"pipelined-{index}" for index in range(40)]
    assert {answer.body for answer in answers} == {b'["random"]'}
    assert {answer.header("Connection") for answer in answers} == {"keep-alive"}

    # HTTP/1.0 on a kept connection: answered by the app in HTTP/1.0, and the connection closed.
    client.send(get("/plugins/sources", version="HTTP/1.0"))
    answer = client.answer()
    assert answer.status_line == b"HTTP/1.0 200 OK" and answer.body == b'["random"]'
    assert answer.header("Connection") == "close"
    assert client.closed_by_server(10)
    client.close()

    # Idle between two requests: closed after the head timeout, silently (no 408 for a request never begun).
    client, _ = kept_connection(server.port, "/plugins/sources")
    began = time.monotonic()
    assert client.closed_by_server(10)
    assert 1.5 < time.monotonic() - began < 8
    client.close()

    # Half of a next head: a 408, as a new connection gets one.
    client, _ = kept_connection(server.port, "/plugins/sources")
    client.send(b"GET /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    late = client.answer()
    assert late.status_line.startswith(b"HTTP/1.1 408") and b"request head not received within 2 seconds" in late.body
    client.close()


@pytest.mark.slow
def test_a_client_that_never_reads_its_answers_holds_no_worker(start_gunicorn, file_server):
    """One worker. A client with a small receive buffer pipelines requests and reads none of the answers, until
    the service stops reading it; another keeps a connection busy with requests. New connections are still
    answered at once, and the first client is closed once it has read nothing for the body timeout."""
    server = start_gunicorn(workers=1, KUIPER_PLUGINS_BODY_TIMEOUT="3")
    install_plugins(server, file_server)
    greedy = None
    for _ in range(ATTEMPTS):  # one worker: the second connection finds the answer kept
        greedy = Client(server.port, receive_buffer=4096)
        greedy.send(get("/plugins/sources"))
        if greedy.answer().header("Connection") == "keep-alive":
            break
    busy, _ = kept_connection(server.port, "/plugins/sources")
    stop = threading.Event()
    answered = []

    def keep_busy() -> None:
        while not stop.is_set() and len(answered) < 100_000:
            busy.send(get("/plugins/sources"))
            answered.append(busy.answer().body)

    worker = threading.Thread(target=keep_busy, daemon=True)
    worker.start()
    greedy.sock.setblocking(False)
    pending, last_sent, began = b"", time.monotonic(), time.monotonic()
    # Until nothing more goes out for a second: the service has stopped reading this client, its answers
    # waiting for it (bounded by 30 s).
    while time.monotonic() - last_sent < 1 and time.monotonic() - began < 30:
        pending = pending or get("/plugins/sources") * 100
        try:
            sent = greedy.sock.send(pending)
        except BlockingIOError:
            time.sleep(0.01)  # its buffers are full: try again, bounded by the loop's deadlines
            continue
        pending, last_sent = pending[sent:], time.monotonic()
    assert time.monotonic() - last_sent >= 1, "the service kept reading a client that read nothing"
    delays = []
    for _ in range(10):
        asked = time.monotonic()
        assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
        delays.append(time.monotonic() - asked)
    stop.set()
    worker.join(timeout=30)
    assert max(delays) < 2, delays
    assert len(answered) > 50 and set(answered) == {b'["random"]'}, len(answered)
    # Closed once it has read nothing for BODY_SECONDS: the worker says so (polled, bounded).
    deadline = time.monotonic() + 20
    while "it stopped reading the answer for 3 s" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the client that reads nothing was not closed"
        time.sleep(0.1)
    greedy.sock.setblocking(True)
    assert greedy.closed_after_what_was_sent(10)


# ---------------------------------------------------------------------------- every check on the caller stays


@pytest.mark.slow
def test_a_kept_answer_is_given_only_to_callers_the_app_lets_in(start_gunicorn, file_server):
    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    url = f"{server.url}/plugins/sources"
    client, _ = kept_connection(server.port, "/plugins/sources")
    # Another Host on the same connection: the app's refusal, and the connection closed after it.
    client.send(get("/plugins/sources", "Host: evil.example"))
    refused = client.answer()
    assert refused.status_line == b"HTTP/1.1 403 FORBIDDEN", refused.status_line
    assert json.loads(refused.body)["message"] == "host 'evil.example' is not allowed; add it to basic.allowedHosts"
    assert refused.header("X-Request-Id") and client.closed_by_server(10)
    client.close()
    client, _ = kept_connection(server.port, "/plugins/sources")
    client.send(get("/plugins/sources", "Origin: http://evil.example"))
    assert client.answer().status_line == b"HTTP/1.1 403 FORBIDDEN"
    client.close()
    # Root's curl: one connection for the three; nobody's: three 403s, a new connection for each.
    assert curl(url, user=None, more_urls=(url, url)) == [(200, '["random"]', 1), (200, '["random"]', 0),
                                                          (200, '["random"]', 0)]
    answers = curl(url, more_urls=(url, url))
    assert [connects for _status, _body, connects in answers] == [1, 1, 1]
    for status, body, _connects in answers:
        assert_refused_user((status, body), "nobody")


@pytest.mark.slow
def test_with_authentication_on_every_kept_answer_needs_a_valid_token(start_gunicorn, file_server, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "home/etc/mgmt").mkdir(parents=True)
    (tmp_path / "home/etc/mgmt" / ISSUER).write_bytes(public_pem(key))
    server = start_gunicorn(workers=2, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    token = f"Authorization: Bearer {sign(key)}"
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": b"so", "random.yaml": "a: 1\n"})
    body = {"name": "random", "file": file_server.url("random.zip")}
    created = requests.post(f"{server.url}/plugins/sources", json=body,
                            headers={"Authorization": token.split(": ", 1)[1]}, timeout=60)
    assert created.status_code == 201, created.text
    client, _ = kept_connection(server.port, "/plugins/sources", token)
    client.send(get("/plugins/sources", token))
    assert client.answer().header("Connection") == "keep-alive"
    client.send(get("/plugins/sources"))  # the same connection, no token
    missing = client.answer()
    assert missing.status_line == b"HTTP/1.1 401 UNAUTHORIZED"
    assert json.loads(missing.body)["message"] == "missing_token"
    client.close()
    client, _ = kept_connection(server.port, "/plugins/sources", token)
    expired_token = sign(key, claims(exp=int(time.time()) - 60, iat=int(time.time()) - 120))
    client.send(get("/plugins/sources", f"Authorization: Bearer {expired_token}"))
    expired = client.answer()
    assert expired.status_line == b"HTTP/1.1 401 UNAUTHORIZED", expired.body
    assert json.loads(expired.body)["message"] == "validate token error: token is expired"
    client.close()


# ---------------------------------------------------------------------------- a reload builds the app anew


@pytest.mark.slow
def test_a_reload_serves_kept_answers_under_the_settings_as_they_are_then(start_gunicorn, file_server):
    import psutil

    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    before = {child.pid for child in psutil.Process(server.process.pid).children()}
    client, _ = kept_connection(server.port, "/plugins/sources")
    client.send(get("/plugins/sources", "Host: plugins.example"))
    assert client.answer().status_line == b"HTTP/1.1 403 FORBIDDEN"
    client.close()
    (server.home / "etc").mkdir(parents=True, exist_ok=True)
    (server.home / "etc/kuiper-plugins.yaml").write_text("basic:\n  allowedHosts: [127.0.0.1, plugins.example]\n")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the old workers leave once the new ones are up (bounded)
        now = {child.pid for child in psutil.Process(server.process.pid).children()}
        if len(now) == 2 and not now & before:
            break
        time.sleep(0.1)
    assert len(now) == 2 and not now & before, (before, now)
    server.workers_booted()
    client, _ = kept_connection(server.port, "/plugins/sources", "Host: plugins.example")
    client.send(get("/plugins/sources", "Host: plugins.example"))
    answer = client.answer()
    assert answer.status_line == b"HTTP/1.1 200 OK" and answer.body == b'["random"]'
    assert answer.header("Connection") == "keep-alive"
    client.close()


# ---------------------------------------------------------------------------- behind the shipped nginx


@pytest.mark.slow
def test_behind_the_shipped_nginx_its_upstream_connections_stay_open(start_gunicorn, file_server, nginx):  # noqa: F811
    """etc/nginx keeps its connections to the service open (HTTP/1.1, keepalive 8, X-Forwarded-Proto set):
    reads are answered from kept answers on them, instead of one new connection per request."""
    import psutil

    server = start_gunicorn(workers=2)
    install_plugins(server, file_server)
    url = nginx(server.port)
    for _ in range(30):
        answer = requests.get(f"{url}/plugins/sources", timeout=10, headers={"Connection": "close"})
        assert answer.status_code == 200 and answer.json() == ["random"], answer.text
    held = [conn for worker in psutil.Process(server.process.pid).children()
            for conn in worker.net_connections(kind="tcp")
            if conn.laddr.port == server.port and conn.status == psutil.CONN_ESTABLISHED]
    assert 1 <= len(held) <= 8, held  # nginx's idle upstream connections, kept by the workers
