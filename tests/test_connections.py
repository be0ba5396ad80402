"""Hostile connections against real gunicorn as shipped, and through the shipped nginx.

Another local user (`nobody`, through setpriv, as in tests/test_peer_access.py) floods the service with
idle connections, or with request bodies it is refused anyway (tests/flood_client.py runs the flood and
reports what it saw); meanwhile the service must stay available and its workers' memory bounded. Then:
malformed chunked bodies are 400s in eKuiper's envelope, and one client cannot keep nginx's upload slot
from the others.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time

import psutil
import pytest
import requests
from conftest import REPO
from cryptography.hazmat.primitives.asymmetric import rsa
from test_auth import ISSUER, public_pem, sign
from test_deploy import nginx  # noqa: F401  (the fixture: real nginx with the shipped server block)
from test_peer_access import as_user

pytestmark = pytest.mark.slow

FLOOD_CLIENT = REPO / "tests/flood_client.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # nobody cannot read this test's virtualenv, nor needs to
MiB = 1024 * 1024


def start_flood(mode: str, port: int, count: int, seconds: float) -> subprocess.Popen:
    """tests/flood_client.py as nobody; returns once it says it has opened its connections."""
    # The program's text goes on the command line: nobody may not be able to read the checkout (a clone in a
    # 0700 folder, as `mktemp -d` makes).
    flood = subprocess.Popen([*as_user("nobody", "nogroup"), SYSTEM_PYTHON, "-c", FLOOD_CLIENT.read_text(), mode,
                              str(port), str(count), str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd="/")
    ready, _, _ = select.select([flood.stdout], [], [], 60)
    line = flood.stdout.readline() if ready else b""
    if line != b"ready\n":
        flood.kill()
        _out, err = flood.communicate(timeout=30)
        raise AssertionError(f"the flood did not start: {line!r} {err.decode(errors='replace')[-2000:]}")
    return flood


def flood_report(flood: subprocess.Popen, timeout: float) -> dict:
    """The flood's JSON report, once it has ended by itself (killed, and the test failed, if it does not)."""
    try:
        out, err = flood.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        flood.kill()
        flood.communicate(timeout=30)
        raise AssertionError(f"the flood did not end within {timeout:g} s") from None
    assert flood.returncode == 0, err.decode(errors="replace")[-2000:]
    return json.loads(out)


class RssPeaks(threading.Thread):
    """The highest resident size of each process, sampled every 10 ms until stopped."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.processes = [psutil.Process(pid) for pid in pids]
        self.before = {p.pid: p.memory_info().rss for p in self.processes}
        self.peak = dict(self.before)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.01):  # sampling, bounded by stop()
            for process in self.processes:
                self.peak[process.pid] = max(self.peak[process.pid], process.memory_info().rss)

    def growth(self) -> dict[int, int]:
        self.stopping.set()
        self.join(10)
        return {pid: self.peak[pid] - self.before[pid] for pid in self.before}


# ---------------------------------------------------------------------------- idle connections

FLOOD_SOCKETS = 5000
HEAD_TIMEOUT = 4  # so that the service closes the flood's connections, and it reopens them, three times
PROBES = 40
PROBE_EVERY = 0.3
PROBE_WITHIN = 2.0
FLOOD_SECONDS = PROBES * PROBE_EVERY + PROBE_WITHIN + 1  # outlasts the last probe


def probe_ping(url: str) -> list[float | None]:
    """PROBES requests for /ping, one started every PROBE_EVERY s on a fresh connection; each one's seconds,
    or None when it was not a 200 within PROBE_WITHIN."""
    took: list[float | None] = [None] * PROBES

    def one(index: int) -> None:
        began = time.monotonic()
        try:
            answer = requests.get(f"{url}/ping", timeout=PROBE_WITHIN)
        except requests.RequestException:
            return
        seconds = time.monotonic() - began
        if answer.status_code == 200 and seconds <= PROBE_WITHIN:
            took[index] = seconds

    threads = []
    began = time.monotonic()
    for index in range(PROBES):
        # A fixed schedule, so that the probes spread over the whole flood whatever each one takes.
        time.sleep(max(0.0, began + index * PROBE_EVERY - time.monotonic()))
        threads.append(threading.Thread(target=one, args=(index,), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join(PROBE_WITHIN * 3)
    return took


def test_another_users_idle_connections_do_not_starve_the_service(start_gunicorn):
    """W11: 5,000 idle connections of an unprivileged user, each reopened as the service closes it."""
    server = start_gunicorn(workers=2, KUIPER_PLUGINS_HEAD_TIMEOUT=str(HEAD_TIMEOUT))
    # The probes start once the flood has opened all its connections, and end before it stops (FLOOD_SECONDS).
    flood = start_flood("idle", server.port, FLOOD_SOCKETS, FLOOD_SECONDS)
    try:
        took = probe_ping(server.url)
    finally:
        report = flood_report(flood, FLOOD_SECONDS + 60)
    answered = [seconds for seconds in took if seconds is not None]
    assert len(answered) >= 0.9 * PROBES, f"{len(answered)} of {PROBES} /ping answered within {PROBE_WITHIN} s: {took}"
    # The service did close the idle connections (its head timeout), and the flood did replace them.
    assert report["opened"] == FLOOD_SOCKETS
    assert report["reopened"] >= FLOOD_SOCKETS, report
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200


# ---------------------------------------------------------------------------- bodies of a refused caller

BODY_CONNECTIONS = 300
BODY_FLOOD_SECONDS = 20
ANSWER_WITHIN = 10.0  # far below the body timeout (60 s): nobody waited for the bodies, which never end


def test_a_refused_users_bodies_are_refused_on_the_head_and_never_buffered(start_gunicorn):
    """W12: connections each announcing a 1 MiB JSON body and sending all of it but the last byte."""
    server = start_gunicorn(workers=2)
    peaks = RssPeaks(server.workers_booted())
    peaks.start()
    try:
        flood = start_flood("bodies", server.port, BODY_CONNECTIONS, BODY_FLOOD_SECONDS)
        report = flood_report(flood, BODY_FLOOD_SECONDS + 60)
    finally:
        growth = peaks.growth()
    answers = report["answers"]
    assert len(answers) == BODY_CONNECTIONS, f"only {len(answers)} of {BODY_CONNECTIONS} answered"
    for answer in answers:
        assert answer["status"] == 403, answer
        message = json.loads(answer["body"])["message"]
        assert message.startswith("local user 'nobody' (uid 65534) may not call this service"), message
        assert answer["after"] <= ANSWER_WITHIN, answer
        assert answer["sent"] < MiB  # never a whole body
    # Nothing of the bodies is kept: far below the MiB per connection that buffering them would take.
    assert all(bytes_ < 32 * MiB for bytes_ in growth.values()), {pid: b // MiB for pid, b in growth.items()}
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []


def test_a_caller_without_a_token_is_refused_before_it_is_asked_for_its_body(start_gunicorn, tmp_path):
    """The worker's answer on the head is the app's own: status, envelope, message, Bearer challenge."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "home/etc/mgmt").mkdir(parents=True)
    (tmp_path / "home/etc/mgmt" / ISSUER).write_bytes(public_pem(key))
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    from_the_app = requests.get(f"{server.url}/plugins/sources", timeout=10)  # no body: the app answers
    assert from_the_app.status_code == 401
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}\n"):
            chunk = sock.recv(65536)  # the 10 s timeout bounds it; the body is never sent
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), answer  # and no 100 Continue before it
    assert b"WWW-Authenticate: " + from_the_app.headers["WWW-Authenticate"].encode() in head.split(b"\r\n")
    assert json.loads(body) == from_the_app.json()


def worker_connections_held(pid: int, port: int) -> int:
    """The TCP connections to `port` the process holds open (its listener aside)."""
    return sum(1 for conn in psutil.Process(pid).net_connections(kind="tcp")
               if conn.status != psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port)


def test_a_full_worker_closes_its_oldest_connection_without_a_head_for_a_new_one(start_gunicorn):
    server = start_gunicorn(workers=1, GUNICORN_CMD_ARGS="--worker-connections 20")
    (worker,) = server.workers_booted()
    idle = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        # The worker holds all 20 (and nothing else, such as a connection lingering after an answer).
        deadline = time.monotonic() + 10
        while worker_connections_held(worker, server.port) != 20 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the worker has accepted them; bounded by the deadline
        assert worker_connections_held(worker, server.port) == 20
        assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
        idle[0].settimeout(5)
        answer = idle[0].recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        message = json.loads(answer.partition(b"\r\n\r\n")[2])["message"]
        assert message.startswith("too many connections: this worker holds its 20 connections"), message
        for sock in idle[1:]:  # the others are still open, and were sent nothing
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1, socket.MSG_PEEK)
    finally:
        for sock in idle:
            sock.close()


# ---------------------------------------------------------------------------- malformed chunked bodies

MALFORMED_CHUNKED = {
    "bad hex size": b"zz\r\nab\r\n0\r\n\r\n",
    "bare LF after a chunk extension": b"2;x=y\nab\r\n0\r\n\r\n",
    "no CRLF after the data": b"2\r\nabXX0\r\n\r\n",
    "negative size": b"-1\r\nab\r\n0\r\n\r\n",
    "NUL in a trailer": b"2\r\nab\r\n0\r\nX-Trailer: a\x00b\r\n\r\n",
}
CHUNKED_ENDPOINTS = [
    ("/plugins/sources", "application/json", "Invalid body: Error decoding the sources plugin json: "),
    ("/config/uploads", "multipart/form-data; boundary=b", "Error parse the multi part form: "),
    ("/config/uploads", "application/json", "Invalid body: Error decoding the upload json: "),
]


def raw_answer(port: int, request: bytes) -> tuple[int, dict]:
    """Send one raw request; return the answer's status and JSON body, read until the service closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)


def test_malformed_chunked_bodies_are_400_in_ekuipers_envelope(start_gunicorn):
    """W2; the fixture fails the test if the log holds a traceback."""
    server = start_gunicorn(workers=2)
    for path, content_type, prefix in CHUNKED_ENDPOINTS:
        for case, body in MALFORMED_CHUNKED.items():
            status, answer = raw_answer(server.port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                                        + body)
            assert status == 400, (path, case, answer)
            assert answer["error"] == 1000, (path, case, answer)
            assert answer["message"].startswith(prefix + "malformed chunked encoding ("), (path, case, answer)
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []
    assert requests.get(f"{server.url}/config/uploads", timeout=10).json() == []


# ---------------------------------------------------------------------------- nginx's upload slot

ATTACK_EVERY = 0.5
UPLOADS = 20
UPLOAD_EVERY = 0.25
ATTACK_HEAD = (b"POST /config/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 100000000\r\n\r\n")


class UnfinishedUploads(threading.Thread):
    """From another client address (127.0.0.2), start an upload every ATTACK_EVERY s: its head, 1,000 body
    bytes, then nothing; every connection stays open until stop()."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        for _ in range(200):  # bounded; stop() ends it long before
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(ATTACK_HEAD + b"--b\r\n" + b"x" * 995)
            self.sockets.append(sock)
            if self.stopping.wait(ATTACK_EVERY):
                return

    def stop(self) -> list[bytes]:
        """Stop, and return the status code each connection got (b"" for none)."""
        self.stopping.set()
        self.join(20)
        lines = []
        for sock in self.sockets:
            sock.settimeout(0.5)
            try:
                lines.append(sock.recv(4096)[9:12])
            except OSError:
                lines.append(b"")
            sock.close()
        return lines


def test_an_unauthenticated_client_cannot_keep_the_upload_slot_behind_nginx(start_gunicorn, nginx,  # noqa: F811
                                                                            tmp_path):
    """N3: with authentication on, a client without a token keeps starting uploads it never finishes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "home/etc/mgmt").mkdir(parents=True)
    (tmp_path / "home/etc/mgmt" / ISSUER).write_bytes(public_pem(key))
    server = start_gunicorn(workers=2, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    url = nginx(server.port)
    attack = UnfinishedUploads(int(url.rsplit(":", 1)[1]))
    attack.start()
    statuses = []
    try:
        token = {"Authorization": f"Bearer {sign(key)}"}
        began = time.monotonic()
        for number in range(UPLOADS):
            # Paced, so that the uploads spread over the attack instead of all landing between two of its requests.
            time.sleep(max(0.0, began + number * UPLOAD_EVERY - time.monotonic()))
            answer = requests.post(f"{url}/config/uploads", headers=token, timeout=10,
                                   files={"uploadFile": (f"up{number}.zip", b"PK\x05\x06" + bytes(18))})
            statuses.append(answer.status_code)
    finally:
        refused = attack.stop()
    assert statuses.count(201) >= UPLOADS - 1, statuses
    assert len(refused) >= 5
    # The attacker got the service's 401 (on the head), or nginx's 503 while its own previous one still lingered.
    assert set(refused) <= {b"401", b"503"}, refused
    assert b"401" in refused
    uploaded = requests.get(f"{url}/config/uploads", headers=token, timeout=10).json()
    assert sorted(path.rsplit("/", 1)[1] for path in uploaded) == sorted(
        f"up{number}.zip" for number, status in enumerate(statuses) if status == 201)
