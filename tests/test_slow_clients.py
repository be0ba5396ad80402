"""Slow and idle clients cannot starve the service: real gunicorn as shipped, and through the shipped nginx.

An attacker keeps HELD connections open, each having sent half a request head and nothing more; a
connection the server closes is replaced at once, so HELD are open the whole time. Meanwhile three
clients ask for /ping, list the sources and install plugins, each in a loop, for PROBE_SECONDS: every
one of those requests must be answered, and answered right. Afterwards the half-sent connections are
seen to have been closed by the server, the head deadline having passed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import make_zip, unanswered_closes
from test_deploy import nginx  # noqa: F401  (the fixture: real nginx with the shipped server block)

from kuiper_plugins.web.gunicorn_worker import HEAD_SECONDS, MAX_HEAD, _announced_body

pytestmark = pytest.mark.slow

HELD = 30
PROBE_SECONDS = 10.0
ANSWER_WITHIN = 5.0  # seconds any probe request may take before it counts as a failure
HALF_HEAD = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class HalfSentRequests(threading.Thread):
    """Keep `count` connections open that sent half a head; replace each one the server closes."""

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.open: list[tuple[socket.socket, float]] = []
        self.closed_after: list[float] = []  # seconds each closed connection stayed open
        self.answers: list[bytes] = []  # what the server sent before closing
        self.stopping = threading.Event()
        self.began = time.monotonic()
        for _ in range(count):
            self.open.append(self._connect())

    def _connect(self) -> tuple[socket.socket, float]:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(HALF_HEAD)
        sock.setblocking(False)
        return sock, time.monotonic()

    def all_open(self) -> bool:
        """Whether the server has neither answered nor closed any of them yet."""
        return all(self._peek(sock) is None for sock, _ in self.open)

    @staticmethod
    def _peek(sock: socket.socket) -> bytes | None:
        try:
            return sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def run(self) -> None:
        while not self.stopping.wait(0.05):  # checking sockets nothing can notify us of, bounded by stop()
            for index, (sock, opened) in enumerate(self.open):
                seen = self._peek(sock)
                if seen is None:
                    continue
                self.answers.append(seen)
                self.closed_after.append(time.monotonic() - opened)
                sock.close()
                self.open[index] = self._connect()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        for sock, _ in self.open:
            sock.close()


class Prober(threading.Thread):
    """One client asking the same kind of request again and again for PROBE_SECONDS, on fresh connections."""

    def __init__(self, ask):
        super().__init__(daemon=True)
        self.ask = ask
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + PROBE_SECONDS
        number = 0
        while time.monotonic() < deadline:
            number += 1
            try:
                problem = self.ask(number)
            except requests.RequestException as exc:
                problem = f"{time.strftime('%H:%M:%S')} {exc!r}"
            if problem:
                self.failures.append(problem)
            else:
                self.answered += 1


def probe_under_attack(url: str, attack_port: int, file_server,
                       log_path: Path | None = None) -> tuple[HalfSentRequests, dict[str, Prober]]:
    installed: list[str] = []

    def ping(_n: int) -> str | None:
        answer = requests.get(f"{url}/ping", timeout=ANSWER_WITHIN)
        return None if answer.status_code == 200 else f"/ping: {answer.status_code} {answer.text}"

    def listing(_n: int) -> str | None:
        answer = requests.get(f"{url}/plugins/sources", timeout=ANSWER_WITHIN)
        if answer.status_code != 200 or not isinstance(answer.json(), list):
            return f"list: {answer.status_code} {answer.text}"
        return None

    def install(n: int) -> str | None:
        name = f"slow{n}"
        make_zip(file_server.root / f"{name}.zip", {f"{name}.so": b"so", f"{name}.yaml": "a: 1\n"})
        answer = requests.post(f"{url}/plugins/sources", json={"name": name, "file": file_server.url(f"{name}.zip")},
                               timeout=ANSWER_WITHIN)
        if answer.status_code != 201:
            return f"install {name}: {answer.status_code} {answer.text}"
        installed.append(name)
        return None

    attack = HalfSentRequests(attack_port, HELD)
    attack.start()
    probers = {"ping": Prober(ping), "list": Prober(listing), "install": Prober(install)}
    try:
        assert attack.all_open(), "the server must hold the half-sent requests, not refuse them at once"
        for prober in probers.values():
            prober.start()
        for prober in probers.values():
            prober.join(PROBE_SECONDS + ANSWER_WITHIN * 2)
            assert not prober.is_alive()
        # The first HELD reach their head deadline (10 s, gunicorn's and nginx's) about when probing ends.
        deadline = attack.began + 10 + 5
        while len(attack.closed_after) < HELD and time.monotonic() < deadline:
            time.sleep(0.05)  # the attacker's thread notes each close; bounded by the deadline
    finally:
        attack.stop()
    for what, prober in probers.items():
        if prober.failures:  # in full (an assertion's message is cut short), with the workers' lines
            pytest.fail("\n".join([f"{what}: {len(prober.failures)} failures:", *prober.failures[:10],
                                    "the workers' lines on unanswered closes:",
                                    *(unanswered_closes(log_path) if log_path else [])]))
        assert prober.answered >= 3, f"{what}: only {prober.answered} answers in {PROBE_SECONDS:g} s"
    assert sorted(requests.get(f"{url}/plugins/sources", timeout=10).json()) == sorted(installed)
    return attack, probers


def test_half_sent_requests_do_not_starve_gunicorn(start_gunicorn, file_server):
    # Debug: a failed probe then comes with the worker's own account of every connection it closed unanswered.
    server = start_gunicorn(workers=3, KUIPER_PLUGINS_LOG_LEVEL="debug")
    attack, _probers = probe_under_attack(server.url, server.port, file_server, server.log_path)
    # The head deadline closed the first connections, with a 408, when it passed (not before, not much after).
    assert len(attack.closed_after) >= HELD, f"the server closed only {len(attack.closed_after)} half-sent requests"
    assert all(HEAD_SECONDS - 0.5 <= seconds <= HEAD_SECONDS + 5 for seconds in attack.closed_after), \
        attack.closed_after
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in attack.answers), attack.answers[:3]


def test_half_sent_requests_do_not_starve_the_service_behind_nginx(start_gunicorn, nginx, file_server):  # noqa: F811
    server = start_gunicorn(workers=3)
    url = nginx(server.port)
    port = int(url.rsplit(":", 1)[1])
    attack, _probers = probe_under_attack(url, port, file_server)
    # nginx's client_header_timeout closed them (it sends nothing, or its 408).
    assert len(attack.closed_after) >= HELD, f"nginx closed only {len(attack.closed_after)} half-sent requests"
    assert all(10 - 0.5 <= seconds <= 10 + 5 for seconds in attack.closed_after), attack.closed_after


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket, within: float) -> bytes:
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    return data


def test_a_small_body_is_read_before_a_worker_serves_it(start_gunicorn, file_server):
    """Half a JSON body holds no worker: with 1 worker, /ping is answered while the body is missing."""
    server = start_gunicorn(workers=1)
    held = [_raw_request(server.port, b"POST /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na")
            for _ in range(5)]
    try:
        for _ in range(5):
            assert requests.get(f"{server.url}/ping", timeout=ANSWER_WITHIN).status_code == 200
        # The rest of a body arriving in time is served as usual.
        make_zip(file_server.root / "late.zip", {"Late@v1.0.0.so": b"so", "late.yaml": "a: 1\n"})
        body = json.dumps({"name": "late", "file": file_server.url("late.zip")}).encode()
        late = _raw_request(server.port, b"POST /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode())
        late.settimeout(ANSWER_WITHIN)
        assert late.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        late.sendall(body)
        answer = _answer(late, ANSWER_WITHIN)
        assert answer.startswith(b"HTTP/1.1 201 "), answer
        assert b"100 Continue" not in answer, "sent once, not twice"
        assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == ["late"]
    finally:
        for sock in held:
            sock.close()


STALL_SECONDS = 3


def test_a_streamed_body_that_stalls_is_cut_off(start_gunicorn):
    """An upload whose body stops coming gets a 408 at the body timeout, and frees its worker."""
    server = start_gunicorn(workers=1, KUIPER_PLUGINS_BODY_TIMEOUT=str(STALL_SECONDS))
    boundary = "slowboundary"
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"uploadFile\"; filename=\"a.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode()
    size = 4 * 1024 * 1024  # over the buffered limit: streamed to the application
    stalled = _raw_request(server.port, b"POST /config/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
                           + f"Content-Length: {size}\r\n\r\n".encode() + preamble + b"x" * 1024)
    began = time.monotonic()
    answer = _answer(stalled, STALL_SECONDS + 30)
    took = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"request body too slow" in answer
    assert STALL_SECONDS - 0.5 <= took <= STALL_SECONDS + 5, took
    assert requests.get(f"{server.url}/config/uploads", timeout=10).json() == []
    assert requests.get(f"{server.url}/ping", timeout=ANSWER_WITHIN).status_code == 200


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET /ping HTTP/1.1\r\nHost: a", (0, False)),
    (b"POST /x HTTP/1.1\r\nContent-Length: 12", (12, False)),
    (b"POST /x HTTP/1.1\r\ncontent-length:  12 \r\nExpect: 100-Continue", (12, True)),
    (b"POST /x HTTP/1.1\r\nContent-Length: %d" % (2 * 1024 * 1024), (None, False)),  # an upload: streamed
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked", (None, False)),
    (b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6", (None, False)),  # gunicorn refuses it
    (b"POST /x HTTP/1.1\r\nContent-Length: -5", (None, False)),
])
def test_which_bodies_are_read_before_serving(head, expected):
    assert _announced_body(head) == expected


def test_a_huge_head_is_refused_and_a_bare_lf_head_answered_at_once(start_gunicorn):
    server = start_gunicorn(workers=1)
    huge = _raw_request(server.port, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * (MAX_HEAD + 10))
    answer = _answer(huge, ANSWER_WITHIN)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == 1000
    bare_lf = _raw_request(server.port, b"GET /ping HTTP/1.1\nHost: 127.0.0.1\n\n")
    answer = _answer(bare_lf, ANSWER_WITHIN)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"lines must end with CRLF" in answer


def test_one_upload_streams_at_a_time_behind_nginx(start_gunicorn, nginx, tmp_path):  # noqa: F811
    server = start_gunicorn(workers=2)
    url = nginx(server.port)
    port = int(url.rsplit(":", 1)[1])
    size = 4 * 1024 * 1024
    first = _raw_request(port, b"POST /config/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n"
                         + f"Content-Length: {size}\r\n\r\n".encode() + b"--b\r\n")
    try:
        # While the first streams, a second upload is refused in the service's envelope; reads go on.
        deadline = time.monotonic() + ANSWER_WITHIN
        while True:
            second = requests.post(f"{url}/config/uploads", files={"uploadFile": ("b.zip", b"PK")}, timeout=10)
            if second.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # until nginx has read the first upload's head, bounded by the deadline
        assert second.status_code == 503, second.text
        assert "another upload is in progress" in second.json()["message"]
        assert requests.get(f"{url}/plugins/sources", timeout=ANSWER_WITHIN).json() == []
    finally:
        first.close()
    # Once it is gone, uploads go through again.
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        again = requests.post(f"{url}/config/uploads", files={"uploadFile": ("b.zip", b"PK")}, timeout=10)
        if again.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # until nginx has seen the first connection close, bounded by the deadline
    assert again.status_code == 201, again.text


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_timeout_stops_start_up_with_its_name(value):
    started = subprocess.run(
        [sys.executable, "-c", "import kuiper_plugins.web.gunicorn_worker"],
        env={**os.environ, "KUIPER_PLUGINS_HEAD_TIMEOUT": value}, capture_output=True, text=True, timeout=60,
    )
    assert started.returncode == 1
    assert f"KUIPER_PLUGINS_HEAD_TIMEOUT must be a number of seconds above 0 (and below a day), not '{value}'" \
        in started.stderr
