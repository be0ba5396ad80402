"""Where write requests keep their progress: a small SQLite file of its own, `data/.kuiper-plugins/progress.db`.

One row per write request, keyed by its request id, which any worker can read while another one serves
the request (`GET /operations/{request id}`). Why a file of its own and not a table of the registry:
the registry commits durably (an fsync each: 3.2 ms median, 21 ms at worst, measured on this project's
build machine) and holds one write lock for every worker, so a progress write would have to wait for
another worker's install to commit (a write into the registry waited 339 ms behind a writer holding it
300 ms; into this file, 0.2 ms). Progress is worth nothing after a power cut, so here commits are not
fsynced (WAL with synchronous=NORMAL: a crash may lose the newest rows, never the file's consistency),
and waits are short (`BUSY_TIMEOUT_SECONDS`): a write that cannot be made at once is skipped, never waited
for, by the request that makes it (`lifecycle.progress`).

Rows are kept `KEEP_SECONDS` after their request ended, `MAX_ROWS` at most, whatever their state: each new
row removes what is past either bound. The file is this service's scratch: nothing else reads it, backups
leave it out, and it is made again when missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "progress.db"
KEEP_SECONDS = 600  # how long a finished request's row answers after its answer went out
MAX_ROWS = 1000  # rows kept at most, the newest; a row of a worker that died goes this way too
BUSY_TIMEOUT_SECONDS = 0.25  # a progress write never waits longer than this for another one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS progress (
    request_id   TEXT    PRIMARY KEY,
    method       TEXT    NOT NULL,
    path         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    finished_at  REAL,
    status       INTEGER,
    phases       TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS progress_by_start ON progress(started_at);
"""


@dataclass(frozen=True)
class Record:
    """One request's progress as stored: its phases are dicts, see `lifecycle.progress.Phase.as_stored`."""

    request_id: str
    method: str
    path: str
    pid: int
    started_at: float
    updated_at: float
    finished_at: float | None
    status: int | None
    phases: list[dict[str, Any]]


class ProgressStore:
    """The progress file of one home: one connection per thread and process, opened on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()

    def begin(self, record: Record) -> None:
        """Write a new request's row (replacing one of the same id), and remove rows past the bounds."""
        conn = self._connection()
        with _transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO progress (request_id, method, path, pid, started_at, updated_at,"
                " finished_at, status, phases) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.request_id, record.method, record.path, record.pid, record.started_at, record.updated_at,
                 record.finished_at, record.status, json.dumps(record.phases, separators=(",", ":"))),
            )
            conn.execute("DELETE FROM progress WHERE finished_at < ?", (time.time() - KEEP_SECONDS,))
            conn.execute(
                "DELETE FROM progress WHERE request_id IN"
                " (SELECT request_id FROM progress ORDER BY started_at DESC LIMIT -1 OFFSET ?)", (MAX_ROWS,))

    def update(self, request_id: str, phases: list[dict[str, Any]], *, finished_at: float | None = None,
               status: int | None = None) -> None:
        """Write a request's phases (and, once it has ended, when and with which status)."""
        conn = self._connection()
        conn.execute(
            "UPDATE progress SET phases = ?, updated_at = ?, finished_at = ?, status = ? WHERE request_id = ?",
            (json.dumps(phases, separators=(",", ":")), time.time(), finished_at, status, request_id),
        )

    def find(self, request_id: str) -> Record | None:
        """The row of a request id, or None when there is none (never written, or removed)."""
        row = self._connection().execute(
            "SELECT * FROM progress WHERE request_id = ? AND (finished_at IS NULL OR finished_at >= ?)",
            (request_id, time.time() - KEEP_SECONDS),
        ).fetchone()
        if row is None:
            return None
        return Record(request_id=row["request_id"], method=row["method"], path=row["path"], pid=row["pid"],
                      started_at=row["started_at"], updated_at=row["updated_at"], finished_at=row["finished_at"],
                      status=row["status"], phases=json.loads(row["phases"]))

    def close(self) -> None:
        """Close this thread's connection (a test restarting a service in-process)."""
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        if entry is not None and entry[0] == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                entry[1].close()

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, made (with the file and its table, when missing) on first use.

        Raises sqlite3.Error or OSError when the file cannot be opened or made; callers decide what that means.
        """
        entry = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == os.getpid():
            return entry[1]
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: no fsync per commit, and never a torn file
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._local.entry = (os.getpid(), conn)  # never carried across fork: a child opens its own
        return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def store_path(work: Path) -> Path:
    """The progress file in a home's private work folder."""
    return Path(work) / FILE_NAME
