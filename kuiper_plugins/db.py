"""SQLite plumbing: connections, explicit write transactions, schema migrations.

Connections are opened per request or unit of work (never in the gunicorn
master before it forks), in autocommit mode so that every write goes through
`transaction()`, which starts with BEGIN IMMEDIATE: a read-then-write never
has to upgrade a snapshot, so concurrent workers queue on the busy timeout
instead of failing with "database is locked".
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kuiper_plugins.errors import DiskFull, RegistryUnavailable

log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 10.0

# Each entry moves the schema from version N to N+1; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE plugins (
        id          INTEGER PRIMARY KEY,
        type        TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        name_key    TEXT    NOT NULL,
        version     TEXT    NOT NULL DEFAULT '',
        descriptor  TEXT,
        request     TEXT,
        sha256      TEXT,
        adopted     INTEGER NOT NULL DEFAULT 0,
        created_at  REAL    NOT NULL,
        updated_at  REAL    NOT NULL,
        UNIQUE (type, name_key)
    );
    CREATE TABLE plugin_files (
        path        TEXT    PRIMARY KEY,
        plugin_id   INTEGER NOT NULL REFERENCES plugins(id) ON DELETE CASCADE
    );
    CREATE INDEX plugin_files_by_plugin ON plugin_files(plugin_id);
    CREATE TABLE functions (
        name        TEXT    PRIMARY KEY,
        plugin_id   INTEGER NOT NULL REFERENCES plugins(id) ON DELETE CASCADE,
        position    INTEGER NOT NULL
    );
    CREATE INDEX functions_by_plugin ON functions(plugin_id);
    CREATE TABLE operations (
        id          TEXT    PRIMARY KEY,
        type        TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        name_key    TEXT    NOT NULL,
        kind        TEXT    NOT NULL,
        pid         INTEGER NOT NULL,
        started_at  REAL    NOT NULL,
        journal     TEXT    NOT NULL DEFAULT '[]',
        UNIQUE (type, name_key)
    );
    """,
]


def connect(path: Path) -> sqlite3.Connection:
    """Open the registry in autocommit mode with the busy timeout and foreign keys on."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one BEGIN IMMEDIATE ... COMMIT; roll back if it raises."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.IntegrityError
        ):
            raise unavailable(exc) from None
        raise


def unavailable(exc: sqlite3.Error) -> Exception:
    """Map a SQLite failure to the refusal a client sees: 507 for a full disk, 503 otherwise."""
    text = str(exc)
    if "disk is full" in text or "database or disk is full" in text:
        log.error("registry write failed, disk full: %s", text)
        return DiskFull(f"disk full while writing the plugin registry: {text}")
    log.error("registry unavailable: %s", text)
    return RegistryUnavailable(f"plugin registry unavailable: {text}")


def initialise(path: Path) -> None:
    """Create the registry or bring its schema up to date, and switch it to WAL once."""
    conn = connect(path)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RegistryUnavailable(
                f"plugin registry {path} has schema version {version}, newer than this service knows"
            )
        for number in range(version, len(MIGRATIONS)):
            with transaction(conn):
                if conn.execute("PRAGMA user_version").fetchone()[0] != number:
                    continue  # another worker migrated it meanwhile
                _run_script(conn, MIGRATIONS[number])
                conn.execute(f"PRAGMA user_version = {number + 1}")
                log.info("registry %s migrated to schema version %d", path, number + 1)
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    finally:
        conn.close()


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of a migration inside the open transaction (executescript would COMMIT)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
