"""Reads answered by the worker without Flask: each whole answer kept until the registry's next commit.

The lists and descriptions are asked for far more often than plugins change, and their bodies are
already kept until a commit (`api.cached_json`). What was left per request was Flask's dispatch,
gunicorn's parser and a new connection. So the first GET of a path after a commit is served by the
app as any request is, and the answer it gave, status, headers and body, is kept here under the
request target exactly as the client sent it, with the change token its body was built at. Our
gunicorn worker (`gunicorn_worker.BufferingWorker`) answers the next GET of that very target from
it, on a connection it keeps open, after:

- the same caller check the app runs (`access.AccessCheck`: Host and Origin, the JWT when
  basic.authentication is on, the local caller's uid, asked of the kernel once per connection);
- the same change check `cached_json` runs, on every request: the kept answer is used only while
  this thread's reader sees the token it was built at. A commit made by any connection, in any
  worker, moves the token, and the next request is served by the app again, which keeps the new
  answer. So an answer is exactly as fresh as the app's own.

Only what the app itself marked as fresh until the next commit is kept: the answers of
`cached_json`, returned as they are (a describe beside a running engine, which asks the engine at
each call, is never kept). Each request gets its own request id in `X-Request-Id`, as the app gives
one, and its line in the access log; everything else is the app's bytes. Answers are kept per
thread, with the thread's reader: a token means nothing to another connection.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, request

from kuiper_plugins.store import db

EXTENSION = "kuiper_plugins.fast_reads"  # where the app keeps its FastReads, for the worker to find
REQUEST_ID_HEADER = "X-Request-Id"
MAX_KEPT = 16384  # answers one thread keeps at most (one per list, plugin and function); past it, all are dropped

_serials = itertools.count(1)


@dataclass(frozen=True)
class Token:
    """The registry's state as one reader connection sees it: which tracker asked, and its version then."""

    tracker: int  # a tracker's serial: versions of two connections are not comparable
    version: int


class _Tracker:
    """One reader connection's change check (`db.Changes`), numbered so that its tokens stay its own."""

    def __init__(self, conn: sqlite3.Connection, registry_file: Path):
        self.conn = conn
        self.serial = next(_serials)
        self.changes = db.Changes(conn, registry_file)

    def token(self) -> Token:
        return Token(self.serial, self.changes.version())


@dataclass(frozen=True)
class KeptAnswer:
    """An answer of the app, ready to be sent again: only the request id and the connection's head differ."""

    token: Token
    status: bytes  # "200 OK"
    before_id: bytes  # the app's header lines before X-Request-Id, as gunicorn writes them
    after_id: bytes  # the lines after it, then the blank line that ends the head
    body: bytes
    headers: tuple[tuple[str, str], ...]  # the app's headers, the request id left out (for the access log)


class FastReads:
    """The answers kept for this process's threads, and the change token they are checked against."""

    def __init__(self, registry_file: Path):
        self.registry_file = registry_file
        self._local = threading.local()

    def connection_token(self) -> tuple[sqlite3.Connection, Token]:
        """This thread's reader connection (`db.reader`) and the registry's token as it sees it now."""
        conn = db.reader(self.registry_file)
        tracker = getattr(self._local, "tracker", None)
        if tracker is None or tracker.conn is not conn:
            tracker = self._local.tracker = _Tracker(conn, self.registry_file)
            self._local.answers = {}
        return conn, tracker.token()

    def answer(self, target: bytes) -> KeptAnswer | None:
        """The answer kept for this request target, if the registry has not changed since it was built."""
        answers = getattr(self._local, "answers", None)
        kept = answers.get(target) if answers else None
        if kept is None:
            return None
        _, token = self.connection_token()
        return kept if kept.token == token else None

    def known(self, target: bytes) -> bool:
        """Whether an answer was kept for this target, fresh or not: the app may be asked to give a new one."""
        answers = getattr(self._local, "answers", None)
        return bool(answers) and target in answers

    def keep(self, target: bytes, token: Token, response: Response) -> None:
        """Keep the app's answer to a GET of `target`, built at `token`; answers of older tokens are dropped."""
        tracker = getattr(self._local, "tracker", None)
        if tracker is None or tracker.serial != token.tracker:
            return  # built through another connection than this thread's reader: nothing to check it against
        headers = list(response.headers.items())
        names = [name.lower() for name, _ in headers]
        if names.count(REQUEST_ID_HEADER.lower()) != 1:
            return
        at = names.index(REQUEST_ID_HEADER.lower())
        answers = self._local.answers
        if len(answers) >= MAX_KEPT and target not in answers:
            answers.clear()
        answers[target] = KeptAnswer(
            token=token,
            status=response.status.encode("latin-1"),
            before_id="".join(f"{name}: {value}\r\n" for name, value in headers[:at]).encode("latin-1"),
            after_id=("".join(f"{name}: {value}\r\n" for name, value in headers[at + 1:]) + "\r\n").encode("latin-1"),
            body=response.get_data(),
            headers=tuple(headers[:at] + headers[at + 1:]),
        )


def mark_fresh(response: Response, token: Token) -> Response:
    """Say that `response` stays the answer to its request until the registry moves past `token`."""
    response.kuiper_fresh_at = token
    return response


def fast_reads_of(app: object) -> FastReads | None:
    """The FastReads an app built by `register_fast_reads` keeps; None for any other WSGI app."""
    extensions = getattr(app, "extensions", None)
    return extensions.get(EXTENSION) if isinstance(extensions, dict) else None


def register_fast_reads(app: Flask, reads: FastReads) -> None:
    """Keep the answers marked fresh (`mark_fresh`) in `reads`; register before any hook that adds headers.

    Flask runs after-request hooks last registered first: registered first, this one sees the answer
    as the client gets it, request id included.
    """
    app.extensions[EXTENSION] = reads

    @app.after_request
    def keep_fresh_answer(response: Response) -> Response:
        token = getattr(response, "kuiper_fresh_at", None)
        target = request.environ.get("RAW_URI")  # the request target as sent (gunicorn)
        if (token is not None and request.method == "GET" and response.status_code == 200
                and isinstance(target, str) and target.startswith("/") and "?" not in target
                and not response.is_streamed):
            reads.keep(target.encode("latin-1"), token, response)
        return response
