"""SQLite plumbing: connections, explicit write transactions, schema migrations.

Every commit is durable when it returns (synchronous=FULL): a 2xx is never
answered for a write a power cut could still take back.

Connections are opened per request or unit of work (never in the gunicorn
master before it forks), in autocommit mode so that every write goes through
`transaction()`, which starts with BEGIN IMMEDIATE: a read-then-write never
has to upgrade a snapshot, so concurrent workers queue on the busy timeout
instead of failing with "database is locked".

Every SQLite failure a client can meet is turned into a refusal by
`unavailable()`: 503 (with Retry-After) when the registry stays locked past
the busy timeout, is read-only, unreadable or corrupt; 507 when the disk is
full. The service never rewrites, recreates or deletes the registry file: a
corrupt one stops start-up with a message saying so and stays as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import quote

from kuiper_plugins.errors import DiskFull, RegistryUnavailable

log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 10.0
_BUSY_RETRY_SECONDS = 0.02

_P = ParamSpec("_P")
_R = TypeVar("_R")

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
    # The journal of file moves now lives in the operation's staging folder, written before the moves:
    # recording it needed a registry write between reservation and commit, one more wait on a busy registry.
    """
    ALTER TABLE operations DROP COLUMN journal;
    """,
    # Lists are read far more often than written: walk them in name order from an index instead of sorting.
    """
    CREATE INDEX plugins_by_type_name ON plugins(type, name);
    """,
    # Power-cut safety: what each installed file must hold, and which operations committed but may still
    # have a staging folder to clear (recovery finishes those instead of undoing them).
    """
    ALTER TABLE plugin_files ADD COLUMN size INTEGER;
    ALTER TABLE plugin_files ADD COLUMN sha256 TEXT;
    CREATE TABLE finished_operations (
        id          TEXT    PRIMARY KEY
    );
    """,
    # The engine's verdict on a native plugin (engine.binary), shown by describe.
    """
    ALTER TABLE plugins ADD COLUMN compatibility TEXT;
    """,
    # The audit trail (lifecycle/audit.py): one row per write request, refused ones included. Rows are only
    # ever added, and the oldest deleted past basic.auditRetention: the trigger refuses any change to a row.
    """
    CREATE TABLE audit (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        at              REAL    NOT NULL,
        request_id      TEXT    NOT NULL,
        method          TEXT    NOT NULL,
        path            TEXT    NOT NULL,
        operation       TEXT    NOT NULL,
        type            TEXT,
        name            TEXT,
        version_before  TEXT,
        version_after   TEXT,
        sha256          TEXT,
        url             TEXT,
        status          INTEGER NOT NULL,
        outcome         TEXT    NOT NULL,
        message         TEXT,
        duration        REAL    NOT NULL,
        issuer          TEXT,
        subject         TEXT,
        user            TEXT,
        address         TEXT,
        proxy           TEXT
    );
    CREATE INDEX audit_by_time ON audit(at);
    CREATE TRIGGER audit_rows_are_kept_as_written BEFORE UPDATE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'audit rows cannot be changed');
    END;
    """,
    # History and rollback: every committed install, update and rollback of a plugin (kept when it is
    # deleted), and the previous versions whose files are kept in the work folder for a rollback.
    """
    CREATE TABLE history (
        id          INTEGER PRIMARY KEY,
        type        TEXT    NOT NULL,
        name_key    TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        operation   TEXT    NOT NULL,
        version     TEXT    NOT NULL,
        sha256      TEXT,
        url         TEXT,
        at          REAL    NOT NULL,
        outcome     TEXT    NOT NULL
    );
    CREATE INDEX history_by_plugin ON history(type, name_key, id);
    CREATE TABLE kept_versions (
        folder      TEXT    PRIMARY KEY,
        type        TEXT    NOT NULL,
        name_key    TEXT    NOT NULL,
        kept_at     REAL    NOT NULL,
        manifest    TEXT    NOT NULL
    );
    CREATE INDEX kept_versions_by_plugin ON kept_versions(type, name_key, kept_at);
    """,
    # Restart pending (store/engine_pending.py): the plugins whose last change the running engine takes only
    # at its restart, noted in that change's commit, so that GET / counts them without asking the engine.
    """
    CREATE TABLE engine_pending (
        type        TEXT    NOT NULL,
        name_key    TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        change      TEXT    NOT NULL,
        version     TEXT,
        at          REAL    NOT NULL,
        PRIMARY KEY (type, name_key)
    );
    """,
]


def connect(path: Path) -> sqlite3.Connection:
    """Open the registry in autocommit mode with the busy timeout and foreign keys on."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        # FULL: in WAL mode every commit is fsynced before COMMIT returns; NORMAL would let a power cut
        # take back a commit that a client has already been told about.
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    return conn


_readers = threading.local()


def reader(path: Path) -> sqlite3.Connection:
    """This thread's connection for reads, opened on first use in this process and kept.

    Opening a connection costs about half a millisecond (the WAL index is mapped anew), as much as the
    rest of a read request; writes go through a `KeptWriter`. A connection is never carried across
    fork: a process that finds one opened by its parent opens its own.
    """
    cached = getattr(_readers, "entry", None)
    if cached is not None and cached[0] == os.getpid() and cached[1] == path:
        return cached[2]
    conn = connect(path)
    _readers.entry = (os.getpid(), path, conn)
    return conn


def close_reader(path: Path) -> None:
    """Close this thread's read connection to `path`, if it has one (a test restarting a service in-process)."""
    cached = getattr(_readers, "entry", None)
    if cached is not None and cached[0] == os.getpid() and cached[1] == path:
        _readers.entry = None
        with contextlib.suppress(sqlite3.Error):
            cached[2].close()


def hold_open(path: Path) -> None:
    """Make sure this thread's read connection (see `reader`) is open on the registry and has read it.

    A connection in WAL mode that has read holds a shared lock for as long as it is open. While one
    does, closing a connection that wrote neither checkpoints the WAL into the database nor deletes
    it, and the WAL need not be made anew by the next writer (a checkpoint's two fsyncs, and the new
    WAL's header and folder).
    """
    try:
        reader(path).execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise unavailable(exc) from None


class KeptWriter:
    """The connection operations write through: one per thread, kept from one operation to the next.

    A new connection's first commit costs an fsync of the folder besides the WAL's; a kept one's costs
    the WAL's alone. It is kept only while the registry file is as this thread left it: a file
    replaced, rewritten or made read-only by someone else (its inode, size, mtime or ctime changed,
    another worker's checkpoint included) gets a new connection, which sees the file as it now is.
    The old one is closed while this thread's reader holds its shared lock (`hold_open`), so that
    closing it never checkpoints the WAL into a file someone else has changed. Never carried across
    fork.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()

    @contextmanager
    def session(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for one unit of work; given up if the unit ends inside a transaction."""
        hold_open(self.path)
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        conn = None
        if entry is not None and entry[0] == os.getpid():
            if entry[2] == self._signature():
                conn = entry[1]
            else:
                _close(entry[1])
        if conn is None:
            conn = connect(self.path)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                _close(conn)
            else:
                self._local.entry = (os.getpid(), conn, self._signature())

    def close(self) -> None:
        """Close this thread's kept connection (a test restarting a service in-process)."""
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        if entry is not None and entry[0] == os.getpid():
            _close(entry[1])

    def _signature(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _close(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.close()


def data_version(conn: sqlite3.Connection | sqlite3.Cursor) -> int:
    """A number that changes whenever another connection has committed since this one last asked.

    A cursor kept for the purpose may be given instead of its connection: it spares making one per call.
    """
    try:
        return conn.execute("PRAGMA data_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise unavailable(exc) from None


WAL_INDEX_HEADER = 48  # bytes in one copy of the WAL index's header; SQLite keeps two, one after the other


class WalHeader:
    """The header of a WAL database's index, read from its `-shm` file with one pread, not a SQLite call.

    SQLite keeps that header at the start of the `-shm` file, twice (its documented file format). A
    commit rewrites the first copy, then the second, and each copy changes with every commit: it holds
    a commit counter, the WAL's last frame and its salts. `look()` reads both copies and returns the
    header only when the two agree, and None otherwise, or when there is no `-shm` file.

    The descriptor it reads through is never closed. Closing any descriptor of a file drops every POSIX
    lock the process holds on that file, SQLite's own included: its lock that tells a newcomer others
    have the `-shm` open, and its WAL read marks. A worker that had closed one was, to SQLite, no longer
    there: the next process to open the registry (a worker booting, a command-line client) took itself
    for the first, cut the `-shm` file to 3 bytes and began it anew, and a worker reading the index just
    then died of SIGBUS with the requests it held. So one descriptor per `-shm` file is opened per
    process and kept; a `-shm` file SQLite has since replaced (it removes it when the last connection
    closes) gets a new one, the old left open. Made only while this thread's reader holds the database
    open, so the file cannot be replaced under it. A read, unlike a mapping, cannot fault past the end.
    """

    _descriptors: dict[str, int] = {}  # the -shm path: the descriptor kept open for it in this process
    _lock = threading.Lock()

    def __init__(self, database: Path):
        self._fd = self._descriptor(f"{database}-shm")

    @classmethod
    def _descriptor(cls, shm: str) -> int | None:
        with cls._lock:
            kept = cls._descriptors.get(shm)
            try:
                current = os.stat(shm).st_ino
                if kept is not None and os.fstat(kept).st_ino == current:
                    return kept
                fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None  # not in WAL mode, or not opened yet: every look says "ask SQLite"
            cls._descriptors[shm] = fd  # never closed (see the class docstring), nor the one it replaces
            return fd

    def look(self) -> bytes | None:
        if self._fd is None:
            return None
        try:
            both = os.pread(self._fd, 2 * WAL_INDEX_HEADER, 0)
        except OSError:
            return None
        first = both[:WAL_INDEX_HEADER]
        return first if len(both) == 2 * WAL_INDEX_HEADER and first == both[WAL_INDEX_HEADER:] else None


class Changes:
    """A reader's `PRAGMA data_version`, asked of SQLite only when the WAL index's header has changed.

    The header is read before SQLite is asked. So a commit that lands between the two costs one more
    question at the next call, and it can never be taken for no change.
    """

    def __init__(self, conn: sqlite3.Connection, database: Path):
        self._cursor = conn.cursor()
        self._database = database
        self._wal: WalHeader | None = None
        self._header: bytes | None = None
        self._version = 0

    def version(self) -> int:
        """A number that changes whenever another connection has committed (as `data_version`)."""
        header = self._wal.look() if self._wal is not None else None
        if header is not None and header == self._header:
            return self._version
        self._version = data_version(self._cursor)
        self._header = header
        if self._wal is None:
            self._wal = WalHeader(self._database)  # the reader has the database open now
        return self._version


@contextmanager
def transaction(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """Run the block in one BEGIN IMMEDIATE ... COMMIT; roll back if it raises.

    `durable=False` skips the fsync of this one commit, for bookkeeping a power cut may take back (the
    next durable commit makes it durable too: the WAL is written in order).
    """
    try:
        if not durable:
            conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # nothing was committed; closing the connection ends the transaction
        if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.IntegrityError
        ):
            raise unavailable(exc) from None
        raise
    finally:
        if not durable:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA synchronous = FULL")


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run several reads on one consistent view of the registry (a deferred read transaction).

    Two reads in autocommit mode may straddle another worker's commit: a describe could pair a
    plugin's old version with its new function list. Inside this block they cannot. In WAL mode a
    reader takes no lock a writer waits for.
    """
    try:
        conn.execute("BEGIN DEFERRED")
    except sqlite3.Error as exc:
        raise unavailable(exc) from None
    try:
        yield conn
    finally:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")  # nothing to keep: the block only read
            except sqlite3.Error:
                pass  # closing the connection ends the read transaction as well


def unavailable(exc: sqlite3.Error) -> Exception:
    """Map a SQLite failure to the refusal a client sees: 507 for a full disk, 503 otherwise."""
    text = str(exc)
    code = _code(exc)
    if code == sqlite3.SQLITE_FULL or "disk is full" in text:
        log.error("registry write failed, the disk is full: %s", text)
        return DiskFull(f"disk full while writing the plugin registry: {text}")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in text:
        log.error("registry still locked after the %g s busy timeout: %s", BUSY_TIMEOUT_SECONDS, text)
    elif code == sqlite3.SQLITE_READONLY or "readonly database" in text:
        log.error("registry is read-only, writes are refused until it is writable again: %s", text)
    elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
        log.error("registry file is corrupt; it is left untouched, restore it from a backup: %s", text)
    else:
        log.error("registry unavailable: %s", text)
    return RegistryUnavailable(f"plugin registry unavailable: {text}")


def mapped_errors(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let SQLite failures of a registry function reach the client as 503/507 refusals.

    IntegrityError passes unchanged: callers read it as "a name, function or file is taken".
    """

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise unavailable(exc) from None

    return wrapper


def check(path: Path) -> None:
    """Refuse (RegistryUnavailable) an existing registry file that cannot be used; never write to it.

    Start-up calls this before anything else touches the file, so that a corrupt registry stops the
    service with one clear message instead of being served, migrated or recreated. The file is opened
    read-only: not even a checkpoint is written.
    """
    if not path.exists():
        return

    def verify() -> None:
        conn = sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            _verify(conn, path)
        finally:
            conn.close()

    _patiently(verify)


def _verify(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a registry that is not a database, fails SQLite's quick check, or has a newer schema."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if _code(exc) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise
        problems, version = [str(exc)], 0
    if problems != ["ok"]:
        detail = "; ".join(problems[:3])
        log.error("registry %s is corrupt (%s); it is left untouched", path, detail)
        raise RegistryUnavailable(
            f"plugin registry {path} is corrupt ({detail}); the service will not start on it and leaves the"
            " file as it is: restore it from a backup, or move it away to start with an empty registry"
        )
    if version > len(MIGRATIONS):
        raise RegistryUnavailable(
            f"plugin registry {path} has schema version {version}, newer than this service knows"
        )


def initialise(path: Path) -> None:
    """Create the registry or bring its schema up to date, and switch it to WAL once.

    An existing file is checked first, read-only: a corrupt one is refused before anything writes to it.
    Every worker runs this at start, all at once on a new registry; each step is safe to repeat.
    """
    check(path)

    def set_up() -> None:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version, len(MIGRATIONS)):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if conn.execute("PRAGMA user_version").fetchone()[0] == number:  # else another worker did it
                        _run_script(conn, MIGRATIONS[number])
                        conn.execute(f"PRAGMA user_version = {number + 1}")
                        log.info("registry %s migrated to schema version %d", path, number + 1)
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        finally:
            conn.close()

    _patiently(set_up)


def _patiently(step: Callable[[], None]) -> None:
    """Run a start-up step, again while SQLite answers "busy" at once, up to the busy timeout.

    Switching a new registry to WAL, or reading one that another worker is switching, needs a lock
    SQLite does not wait for on its busy handler: workers starting together would fail at once.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            step()
            return
        except sqlite3.Error as exc:
            if _code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and time.monotonic() < deadline:
                time.sleep(_BUSY_RETRY_SECONDS)
                continue
            raise unavailable(exc) from None


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (extended codes folded), None when unknown."""
    extended = getattr(exc, "sqlite_errorcode", None)
    return extended & 0xFF if isinstance(extended, int) else None


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of a migration inside the open transaction (executescript would COMMIT).

    A statement ends at a semicolon that SQLite says completes it: a trigger's body holds semicolons of its own.
    """
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \t\r\n;"):
                conn.execute(statement)
            statement = ""
