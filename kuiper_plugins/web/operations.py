"""Progress at the edge: each write request let in records how far it has got; `GET /operations/{id}` tells.

A client that sends its own `X-Request-Id` with a write (the CLI sends a uuid4) can ask, from a second
connection and while it still waits for the answer, which phase the request is in, with its bytes so far
and in all and its seconds (`lifecycle.progress`). Another worker answers, from the progress file every
worker shares (`store.progress`); the row answers for `store.progress.KEEP_SECONDS` after the answer too.
The eKuiper endpoints stay as they are: synchronous, their answers unchanged.

The path is guarded as `/audit` is (web/access.py runs before any view): whoever may call the API may read
any request's progress, as they may read the audit trail that names the same request ids.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from kuiper_plugins.errors import InvalidRequest, PluginNotFound, RegistryUnavailable
from kuiper_plugins.lifecycle import audit, progress
from kuiper_plugins.store.progress import KEEP_SECONDS, ProgressStore, Record, store_path
from kuiper_plugins.web.auditing import READS

log = logging.getLogger(__name__)

EXTENSION = "kuiper_plugins.progress"  # where the app keeps its ProgressStore

operations_bp = Blueprint("operations", __name__)


def register_progress(app: Flask, work_folder: Path) -> None:
    """Track every write request that the access checks let in; call after `register_access_checks`.

    Registered after the checks, so that a refused caller (a flood of them included) writes nothing here.
    """
    store = app.extensions[EXTENSION] = ProgressStore(store_path(work_folder))

    @app.before_request
    def start_tracking() -> None:
        if request.method in READS:
            return
        tracker = progress.Tracker(store, g.get("request_id") or audit.request_id_from(None), request.method,
                                   _printable_path(request.path))
        tracker.begin()
        g.progress_token = progress.current.set(tracker)
        g.progress_tracker = tracker

    @app.after_request
    def finish_tracking(response: Response) -> Response:
        tracker = g.pop("progress_tracker", None)
        if tracker is not None:
            tracker.finish(response.status_code)  # before the answer goes out: a poll after it sees the end
        return response

    @app.teardown_request
    def stop_tracking(_exc: BaseException | None) -> None:
        token = g.pop("progress_token", None)
        if token is not None:
            progress.current.reset(token)


def _printable_path(path: str) -> str:
    """The request's path as a row shows it: printable, bounded (a client chose it)."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in path)
    return shown[:audit.MAX_SHOWN]


@operations_bp.get("/operations/<request_id>")
def show_operation(request_id: str) -> Response:
    """How far the write request with this X-Request-Id has got: its phases, bytes and seconds."""
    if audit.request_id_from(request_id) != request_id:
        raise InvalidRequest(
            f"invalid request id {_printable_path(request_id)[:40]!r} (a request id is 1 to {audit.MAX_REQUEST_ID}"
            " letters, digits or characters of !#$%&'*+-.^_`|~, as X-Request-Id takes them)"
        )
    store: ProgressStore = current_app.extensions[EXTENSION]
    try:
        record = store.find(request_id)
    except (sqlite3.Error, OSError) as exc:
        log.warning("progress file %s cannot be read: %s", store.path, exc)
        raise RegistryUnavailable(f"progress unavailable: {exc} (the operation itself is not affected)") from None
    if record is None:
        raise PluginNotFound(
            f"operation {request_id} is not found (no write request with this X-Request-Id has begun, or it"
            f" ended more than {KEEP_SECONDS} s ago)"
        )
    return jsonify(as_answer(record))


def as_answer(record: Record, now: float | None = None) -> dict[str, Any]:
    """A row as GET /operations answers it; a running phase's seconds count up to `now`."""
    now = time.time() if now is None else now
    if record.finished_at is not None:
        state = "finished"
    elif _alive(record.pid):
        state = "running"
    else:
        state = "interrupted"  # its worker is gone: the row will say no more
    until = now if state == "running" else record.updated_at
    phases = []
    for stored in record.phases:
        seconds = stored.get("seconds")
        done = seconds is not None
        if not done:
            seconds = max(until - stored.get("startedAt", until), 0.0)
        phases.append({"phase": stored.get("phase"), "bytes": stored.get("bytes"), "totalBytes": stored.get("total"),
                       "seconds": round(seconds, 3), "done": done or state != "running"})
    return {
        "requestId": record.request_id,
        "method": record.method,
        "path": record.path,
        "state": state,
        "status": record.status,
        "phase": phases[-1]["phase"] if phases and state == "running" else None,
        "phases": phases,
        "startedAt": audit.timestamp(record.started_at),
        "updatedAt": audit.timestamp(record.updated_at),
        "finishedAt": audit.timestamp(record.finished_at) if record.finished_at is not None else None,
    }


def _alive(pid: int) -> bool:
    """Whether the worker that serves a request is still there (a pid of this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
