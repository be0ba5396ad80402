"""A local user's connection floods against the service, run as another user by tests/test_connections.py.

Standard library only: it runs under the system's python3 as `nobody` (setpriv), with no access to the
test's virtualenv. Every loop is bounded by a count and a deadline; it prints one JSON report and exits.

    idle PORT COUNT SECONDS
        Keep COUNT connections open that send nothing; each one the service closes (after its answer, or
        at once) is replaced at once. Prints "ready" once all COUNT are opened, then the report after SECONDS.
    bodies PORT COUNT SECONDS
        Open COUNT connections, each sending `POST /plugins/sources` with `Content-Length: 1048576` and
        then all but the last byte of that body, as fast as the service takes it; collect each answer.
        Prints "ready" once all are connected, then the report, at the latest after SECONDS.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sys
import time

BODY = 1024 * 1024
MAX_ROUNDS = 1_000_000  # selector passes; the deadline ends a flood long before


def raise_open_files(needed: int) -> None:
    """An unprivileged process may raise its own soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))  # in progress: the kernel finishes it, or retries while the queue is full
    return sock


def idle(port: int, count: int, seconds: float) -> dict:
    raise_open_files(count + 256)
    selector = selectors.DefaultSelector()
    for _ in range(count):
        selector.register(connect(port), selectors.EVENT_READ)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    reopened = 0
    answers: dict[str, int] = {}
    for _ in range(MAX_ROUNDS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for key, _events in selector.select(min(remaining, 0.5)):
            sock = key.fileobj
            try:
                seen = sock.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                seen = b""
            status = seen.split(b"\r\n", 1)[0][9:12].decode("ascii", "replace") if seen else "closed"
            answers[status] = answers.get(status, 0) + 1
            selector.unregister(sock)
            sock.close()
            selector.register(connect(port), selectors.EVENT_READ)
            reopened += 1
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    return {"opened": count, "reopened": reopened, "answers": answers}


def bodies(port: int, count: int, seconds: float) -> dict:
    raise_open_files(count + 256)
    head = (b"POST /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY)
    body = memoryview(b"{" + b" " * (BODY - 2))  # BODY - 1 bytes: the body never ends
    selector = selectors.DefaultSelector()
    began = time.monotonic()
    state = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head)
        sock.setblocking(False)
        state[sock] = {"sent": 0, "answer": b"", "after": None}
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    print("ready", flush=True)
    deadline = began + seconds
    answers = []
    for _ in range(MAX_ROUNDS):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.get_map():
            break
        for key, events in selector.select(min(remaining, 0.5)):
            sock, seen = key.fileobj, state[key.fileobj]
            if events & selectors.EVENT_WRITE:
                try:
                    seen["sent"] += sock.send(body[seen["sent"]:])
                except BlockingIOError:
                    pass
                except OSError:
                    pass  # the service closed: what it answered is read below
                if seen["sent"] >= len(body):
                    selector.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                seen["answer"] += chunk
                if seen["after"] is None and chunk:
                    seen["after"] = time.monotonic() - began
                whole = _whole(seen["answer"])
                if whole or not chunk:
                    status, text = whole or (0, seen["answer"][:300].decode("latin-1"))
                    answers.append({"status": status, "body": text, "after": seen["after"], "sent": seen["sent"]})
                    selector.unregister(sock)
                    sock.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    return {"connections": count, "answers": answers}


def _whole(answer: bytes) -> tuple[int, str] | None:
    """(status, body) once a whole answer with a Content-Length has arrived."""
    head, separator, rest = answer.partition(b"\r\n\r\n")
    if not separator:
        return None
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    if length is None or len(rest) < length:
        return None
    return int(head[9:12]), rest[:length].decode("utf-8", "replace")


if __name__ == "__main__":
    mode, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    report = {"idle": idle, "bodies": bodies}[mode](port, count, seconds)
    print(json.dumps(report), flush=True)
