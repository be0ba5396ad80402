"""Hostile connections against real gunicorn as shipped.

Malformed chunked bodies are 400s in eKuiper's envelope.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

pytestmark = pytest.mark.slow

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
