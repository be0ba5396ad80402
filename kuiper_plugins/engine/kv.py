"""eKuiper's own key-value store (``<data>/sqliteKV.db``), kept as a projection of our registry.

What eKuiper keeps there about plugins, and what we write the same way:

============== ====================== =============================================
table          key                    value (Go ``encoding/gob`` bytes)
============== ====================== =============================================
nativePlugin   ``<type>_<name>``      string: ``json.Marshal(IOPlugin{...})``
pluginFuncs    ``<name>``             []string: the function plugin's functions
portablePlugin ``<name>``             string: ``json.Marshal(IOPlugin{...})``
============== ====================== =============================================

``<type>`` is eKuiper's folder name of the plugin type: ``sources``,
``sinks`` or ``functions``. The install-script string is Go's JSON of
``{name, file, shellParas}``, in that order, with ``shellParas`` left out
when empty, and ``<``, ``>``, ``&``, U+2028, U+2029 escaped as Go escapes
them (`install_script`). Each table is created with eKuiper's own statement
(`create_table_statement`), and rows are written with ``REPLACE INTO`` as
eKuiper writes them. Other rows and tables (``$boot_install``, the status
tables, rules, streams) are eKuiper's, and we never touch them. The engine
reads ``pluginFuncs`` when it starts and the install scripts when it exports
or re-installs at boot, so a row written here takes effect at the engine's
next start, which a native install needs anyway.

Our registry stays the source of truth. The two SQLite files cannot commit
together, so they converge instead:

1. An install, update, register or delete commits the registry first.
2. Right after, the caller rewrites that plugin's rows here (`EngineStore.put`
   / `EngineStore.delete`, one short transaction). A crash, a full disk or
   an engine holding the lock past the busy timeout between 1 and 2 leaves
   the KV file behind the registry, never ahead of it.
3. At start-up the caller passes the projection of the whole registry to
   `EngineStore.reconcile`, which makes the rows we own equal to it: writes
   the missing or different ones, deletes the ones we own that are no longer
   wanted, and leaves every other row alone. After it, the files agree again.

A failed step 2 is logged and step 1 is not undone: the registry is right,
and the next start-up heals the KV file. Reconciling the whole projection
after every commit is cheap as well (milliseconds for hundreds of rows), for
a caller that prefers one path.

Which rows "we own" is recorded in the KV file itself, in the table
`OWNED_TABLE`, in the same transaction as the rows it lists, so the record
can never disagree with the rows: a row lost from our registry by a crash
between 1 and 2 is still listed there, and reconcile deletes it. eKuiper
never lists the tables of its file, so it never sees that one. A row eKuiper wrote becomes ours when a desired row
has its key (adoption); until then `native_plugins`, `function_lists` and
`portable_plugins` only read it.

A running engine may hold the file open. Every write here is one
``BEGIN IMMEDIATE ... COMMIT`` of a few rows, with the values encoded
before it starts, so no lock is held across anything slow, and a busy
engine is waited for up to the busy timeout. eKuiper's connection string
asks for WAL and a busy timeout in go-sqlite3's spelling, which its
driver (modernc.org/sqlite) may not apply; so the file's journal mode is
left as it is and a write lock is never held for more than a moment, since
the engine may not wait for it.

A commit here is durable when it returns, whatever the file's mode. A WAL
file is written with ``synchronous=FULL``. A rollback-journal file (what
eKuiper's driver leaves) is written by our connection in ``PERSIST`` mode, a
setting of the connection, not of the file: the commit is the zeroing of
the journal's header, synced. In SQLite's default ``DELETE`` mode the commit
would be the journal's unlink, which ``synchronous=FULL`` does not make
durable: a power cut just after could bring the journal back, hot, and roll
an acknowledged write back. So a ``sqliteKV.db-journal`` with a zeroed header
may stay beside the file; SQLite, eKuiper's included, ignores such a journal,
and eKuiper's own next write removes it.

When this module creates ``sqliteKV.db`` itself, it also leaves an empty
``checkpoint.db`` beside it (unless one exists): eKuiper, finding a
``sqliteKV.db`` without a ``checkpoint.db`` at its first start, would fall
back to its older layout that keeps rule checkpoints in ``sqliteKV.db``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kuiper_plugins.engine import gob
from kuiper_plugins.errors import RegistryUnavailable
from kuiper_plugins.settings import SettingsError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NATIVE_TABLE = "nativePlugin"
FUNCTIONS_TABLE = "pluginFuncs"
PORTABLE_TABLE = "portablePlugin"
ENGINE_TABLES = (NATIVE_TABLE, FUNCTIONS_TABLE, PORTABLE_TABLE)
OWNED_TABLE = "kuiperPluginsOwned"

NATIVE_TYPES = ("sources", "sinks", "functions")
DEFAULT_FILE_NAME = "sqliteKV.db"
CHECKPOINT_FILE_NAME = "checkpoint.db"
STORE_TYPE_KEY = "store.type"
SUPPORTED_STORE_TYPES = ("sqlite",)
BUSY_TIMEOUT_SECONDS = 5.0
JOURNAL_SIZE_LIMIT = 256 * 1024  # what a PERSIST journal may keep between writes
# The largest pluginFuncs value decoded. A thousand names of 250 characters (the most an install
# registers) take about 250 KiB; a larger row is not one eKuiper wrote for a real plugin, and decoding
# it whole could turn a few MiB of one-letter names into millions of Python strings in every worker.
FUNCTION_LIST_MAX_BYTES = 1024 * 1024


def create_table_statement(table: str) -> str:
    """Return eKuiper's CREATE statement for one of its key-value tables."""
    return f"CREATE TABLE IF NOT EXISTS '{table}'('key' VARCHAR(255) PRIMARY KEY, 'val' BLOB);"


_CREATE_OWNED = (
    f"CREATE TABLE IF NOT EXISTS '{OWNED_TABLE}'('tbl' TEXT NOT NULL, 'key' TEXT NOT NULL, PRIMARY KEY (tbl, key));"
)


class EngineStoreUnavailable(RegistryUnavailable):
    """eKuiper's KV file is locked past the busy timeout, read-only, corrupt or of another shape."""


class UnsupportedEngineStore(SettingsError):
    """eKuiper keeps its state somewhere this service cannot write (redis, fdb, pebble)."""


# ---------------------------------------------------------------------------- settings


def check_store_type(value: object) -> None:
    """Refuse an eKuiper ``store.type`` other than sqlite (unset means eKuiper's default, sqlite)."""
    if value is None or value in SUPPORTED_STORE_TYPES:
        return
    supported = ", ".join(SUPPORTED_STORE_TYPES)
    raise UnsupportedEngineStore(
        f"invalid value {value!r} for {STORE_TYPE_KEY}: kuiper-plugins can keep eKuiper's plugin store only "
        f"in SQLite; supported: {supported} (eKuiper's default)"
    )


def store_path(data_dir: Path, sqlite_name: str | None = None) -> Path:
    """Return the file eKuiper keeps its key-value tables in: ``<data>/sqliteKV.db`` or store.sqlite.name."""
    name = sqlite_name or DEFAULT_FILE_NAME
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise SettingsError(f"invalid value {sqlite_name!r} for store.sqlite.name: expected a file name")
    return Path(data_dir) / name


# ---------------------------------------------------------------------------- Go's JSON

_GO_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_GO_HEX_ESCAPED = frozenset("<>&\u2028\u2029")
_GO_PLAIN = re.compile('[^"\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]*')  # what no escape above touches


def go_json_string(text: str) -> str:
    """Return `text` as Go's json.Marshal writes a string (HTML-safe escapes; bad UTF-16 as U+FFFD)."""
    if _GO_PLAIN.fullmatch(text):  # nothing to escape (names and URLs, nearly always): as it is
        return f'"{text}"'
    parts = ['"']
    for char in text:
        short = _GO_SHORT_ESCAPES.get(char)
        if short is not None:
            parts.append(short)
        elif char < " " or char in _GO_HEX_ESCAPED:
            parts.append(f"\\u{ord(char):04x}")
        elif "\ud800" <= char <= "\udfff":  # a lone surrogate: not UTF-8, Go writes the replacement char
            parts.append("\ufffd")
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)


def install_script(name: str, file: str, shell_paras: Sequence[str] = ()) -> str:
    """Return the string eKuiper stores for a plugin: Go's json.Marshal of IOPlugin{name, file, shellParas}."""
    text = '{"name":' + go_json_string(name) + ',"file":' + go_json_string(file)
    if shell_paras:
        text += ',"shellParas":[' + ",".join(go_json_string(p) for p in shell_paras) + "]"
    return text + "}"


@dataclass(frozen=True)
class InstallScript:
    """A plugin's install request as eKuiper keeps it: where its zip came from and install.sh's arguments."""

    name: str
    file: str
    shell_paras: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> InstallScript:
        """Read eKuiper's stored JSON (ours, eKuiper's or an imported one); raise ValueError when malformed."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        name, file, paras = data.get("name", ""), data.get("file", ""), data.get("shellParas") or []
        if not isinstance(name, str) or not isinstance(file, str):
            raise ValueError("name and file must be strings")
        if not isinstance(paras, list) or not all(isinstance(p, str) for p in paras):
            raise ValueError("shellParas must be a list of strings")
        return cls(name, file, tuple(paras))


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One row of eKuiper's plugin tables: a table, a key, and the Go value its gob holds."""

    table: str
    key: str
    value: str | tuple[str, ...]

    def encoded(self) -> bytes:
        """Return the gob bytes eKuiper would store for this row's value."""
        if isinstance(self.value, str):
            return gob.encode_string(self.value)
        return gob.encode_strings(self.value)

    def matches(self, stored: bytes | None) -> bool:
        """Tell whether `stored` (a val blob) already holds this row's value, whatever Go type id it uses."""
        if stored is None:
            return False
        try:
            if isinstance(self.value, str):
                return gob.decode_string(stored) == self.value
            return tuple(gob.decode_strings(stored)) == self.value
        except gob.GobError:
            return False


def native_key(plugin_type: str, name: str) -> str:
    """Return eKuiper's nativePlugin key for a plugin: ``<type>_<name>``."""
    if plugin_type not in NATIVE_TYPES:
        raise ValueError(f"unknown native plugin type {plugin_type!r}; expected one of {', '.join(NATIVE_TYPES)}")
    return f"{plugin_type}_{name}"


def native_row(plugin_type: str, name: str, file: str, shell_paras: Sequence[str] = ()) -> Row:
    """Return the nativePlugin row eKuiper writes after installing a native plugin."""
    return Row(NATIVE_TABLE, native_key(plugin_type, name), install_script(name, file, shell_paras))


def functions_row(name: str, functions: Sequence[str]) -> Row:
    """Return the pluginFuncs row eKuiper writes for a function plugin's exported functions."""
    if isinstance(functions, str):
        raise ValueError("functions must be a list of names, not one string")
    return Row(FUNCTIONS_TABLE, name, tuple(functions))


def portable_row(name: str, file: str, shell_paras: Sequence[str] = ()) -> Row:
    """Return the portablePlugin row eKuiper writes after installing a portable plugin."""
    return Row(PORTABLE_TABLE, name, install_script(name, file, shell_paras))


@dataclass(frozen=True)
class ReconcileResult:
    """What one reconcile changed: keys (table, key) written, deleted, and taken over from eKuiper."""

    written: tuple[tuple[str, str], ...]
    deleted: tuple[tuple[str, str], ...]
    adopted: tuple[tuple[str, str], ...]


# ---------------------------------------------------------------------------- the store


class EngineStore:
    """eKuiper's KV file: its three plugin tables, and the record of which rows are ours.

    Each thread keeps one connection between calls, never carried across fork, and only while the
    path still names the same file: a file replaced or removed gets a new connection. Between calls
    it holds no lock, so the engine is never kept waiting by it.
    """

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT_SECONDS):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()

    # -- plumbing

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None
        try:
            conn.execute("PRAGMA synchronous = FULL")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = PERSIST")  # this connection's, not the file's: see above
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._unavailable(exc) from None
        return conn

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection to the file the path names now (opened when there is none yet)."""
        identity = _identity(self.path)
        entry = getattr(self._local, "entry", None)
        if entry is not None:
            if entry[0] == os.getpid() and identity is not None and entry[2] == identity:
                return entry[1]
            self.close()
        conn = self._connect()
        identity = identity or _identity(self.path)  # a file the connection has just made
        if identity is not None:
            self._local.entry = (os.getpid(), conn, identity)
        return conn

    def close(self) -> None:
        """Close this thread's connection (a test restarting a service in-process); one from before fork is let go."""
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        if entry is not None and entry[0] == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                entry[1].close()

    def _forget(self, conn: sqlite3.Connection) -> None:
        """Drop a connection an error may have left inside a transaction: the next call opens a new one."""
        entry = getattr(self._local, "entry", None)
        if entry is not None and entry[1] is conn:
            self._local.entry = None
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _unavailable(self, exc: sqlite3.Error) -> EngineStoreUnavailable:
        text = str(exc)
        if "locked" in text or "busy" in text:
            log.error("eKuiper's store %s still locked after %g s: %s", self.path, self.busy_timeout, text)
        else:
            log.error("eKuiper's store %s unavailable: %s", self.path, text)
        return EngineStoreUnavailable(f"eKuiper's store {self.path.name} unavailable: {text}")

    def _write(self, step: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `step(conn)` in one BEGIN IMMEDIATE ... COMMIT on this thread's connection; return its result.

        The tables are created, as eKuiper creates them, inside the same transaction when missing. When
        this makes the default-named file and eKuiper has no checkpoint.db yet, an empty one is made too:
        eKuiper gives a data folder that already holds sqliteKV.db but no checkpoint.db its older
        single-file layout, and a file we made first must not change the layout the engine picks.
        """
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = self.path.with_name(CHECKPOINT_FILE_NAME)
            if self.path.name == DEFAULT_FILE_NAME and not checkpoint.exists():
                checkpoint.touch()
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._create_tables(conn)
                result = step(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._forget(conn)
            raise self._unavailable(exc) from None
        except BaseException:
            self._forget(conn)  # whatever interrupted the step left no half-done transaction behind
            raise
        if created:
            log.info("created eKuiper's store %s with its plugin tables", self.path)
        return result

    def _create_tables(self, conn: sqlite3.Connection) -> None:
        present = self._tables(conn)
        for table in ENGINE_TABLES:
            if table not in present:
                conn.execute(create_table_statement(table))
                continue
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info('{table}')")}
            if not {"key", "val"} <= columns:
                raise EngineStoreUnavailable(
                    f"eKuiper's store {self.path.name} unavailable: its table {table} has the columns "
                    f"{', '.join(sorted(columns))}, not eKuiper's key and val"
                )
        if OWNED_TABLE not in present:
            conn.execute(_CREATE_OWNED)

    def _read(self, step: Callable[[sqlite3.Connection | None], _T]) -> _T:
        """Run `step(conn)` on this thread's connection inside one read transaction (one consistent view)."""
        if not self.path.exists():
            return step(None)
        conn = self._connection()
        try:
            conn.execute("BEGIN DEFERRED")
            try:
                return step(conn)
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._forget(conn)
            raise self._unavailable(exc) from None
        except BaseException:
            self._forget(conn)  # whatever interrupted the step left no half-done transaction behind
            raise

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    # -- set-up

    def ensure_tables(self) -> None:
        """Create the file and eKuiper's three plugin tables (as eKuiper does) and our record, when missing."""
        self._write(lambda conn: None)

    def table_schema(self, table: str) -> str | None:
        """Return the CREATE text SQLite keeps for `table`, None when it does not exist."""

        def read(conn: sqlite3.Connection | None) -> str | None:
            if conn is None:
                return None
            row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
            return row[0] if row else None

        return self._read(read)

    # -- writes

    def apply(self, put: Iterable[Row] = (), delete: Iterable[tuple[str, str]] = ()) -> None:
        """Write `put` and remove the (table, key) pairs in `delete`, in one short transaction; own what is put."""
        encoded = [(row.table, row.key, row.encoded()) for row in put]  # before the lock: nothing slow inside
        removed = list(delete)
        for table, _key, _blob in encoded:
            _check_table(table)
        for table, _key in removed:
            _check_table(table)

        def step(conn: sqlite3.Connection) -> None:
            for table, key in removed:
                conn.execute(f"DELETE FROM '{table}' WHERE key = ?", (key,))
                conn.execute(f"DELETE FROM '{OWNED_TABLE}' WHERE tbl = ? AND key = ?", (table, key))
            for table, key, blob in encoded:
                conn.execute(f"REPLACE INTO '{table}'(key, val) VALUES (?, ?)", (key, blob))
                conn.execute(f"INSERT OR IGNORE INTO '{OWNED_TABLE}'(tbl, key) VALUES (?, ?)", (table, key))

        if not encoded and not self.path.exists():
            return  # nothing of ours can be there: do not create the engine's file just to delete from it
        started = time.monotonic()
        self._write(step)
        log.debug(
            "eKuiper's store: %d rows written, %d deleted in %.1f ms",
            len(encoded),
            len(removed),
            (time.monotonic() - started) * 1000,
        )

    def values(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]:
        """The stored value of each (table, key), None where there is none: to put back with `restore`."""
        keys = list(keys)

        def read(conn: sqlite3.Connection | None) -> dict[tuple[str, str], bytes | None]:
            tables = self._tables(conn) if conn is not None else set()
            found = {}
            for table, key in keys:
                row = conn.execute(f"SELECT val FROM '{table}' WHERE key = ?", (key,)).fetchone() \
                    if table in tables else None
                found[(table, key)] = row[0] if row else None
            return found

        for table, _key in keys:
            _check_table(table)
        return self._read(read)

    def restore(self, values: dict[tuple[str, str], bytes | None]) -> None:
        """Put rows back exactly as `values` has them (a value, or no row); whose they are is not changed."""
        for table, _key in values:
            _check_table(table)

        def step(conn: sqlite3.Connection) -> None:
            for (table, key), value in values.items():
                if value is None:
                    conn.execute(f"DELETE FROM '{table}' WHERE key = ?", (key,))
                else:
                    conn.execute(f"REPLACE INTO '{table}'(key, val) VALUES (?, ?)", (key, value))

        if self.path.exists():
            self._write(step)

    def put(self, *rows: Row) -> None:
        """Write rows as eKuiper would (REPLACE INTO) and record them as ours."""
        self.apply(put=rows)

    def delete(self, *keys: tuple[str, str]) -> None:
        """Remove rows by (table, key), whoever wrote them; a missing row is not an error."""
        self.apply(delete=keys)

    def put_native(self, plugin_type: str, name: str, file: str, shell_paras: Sequence[str] = ()) -> None:
        """Write a native plugin's nativePlugin row."""
        self.put(native_row(plugin_type, name, file, shell_paras))

    def delete_native(self, plugin_type: str, name: str) -> None:
        """Remove a native plugin's nativePlugin row (and its pluginFuncs row for a function plugin)."""
        keys = [(NATIVE_TABLE, native_key(plugin_type, name))]
        if plugin_type == "functions":
            keys.append((FUNCTIONS_TABLE, name))
        self.delete(*keys)

    def put_functions(self, name: str, functions: Sequence[str]) -> None:
        """Write a function plugin's pluginFuncs row (on install with functions, and on every register)."""
        self.put(functions_row(name, functions))

    def delete_functions(self, name: str) -> None:
        """Remove a function plugin's pluginFuncs row."""
        self.delete((FUNCTIONS_TABLE, name))

    def put_portable(self, name: str, file: str, shell_paras: Sequence[str] = ()) -> None:
        """Write a portable plugin's portablePlugin row."""
        self.put(portable_row(name, file, shell_paras))

    def delete_portable(self, name: str) -> None:
        """Remove a portable plugin's portablePlugin row."""
        self.delete((PORTABLE_TABLE, name))

    def reconcile(self, desired_rows: Iterable[Row]) -> ReconcileResult:
        """Make the rows we own equal `desired_rows` (the registry's projection); leave eKuiper's others alone.

        Writes desired rows that are missing or hold another value, deletes rows we own that are not
        desired, and records exactly the desired keys as ours; all in one short transaction.
        """
        desired: dict[tuple[str, str], Row] = {}
        for row in desired_rows:
            _check_table(row.table)
            if (row.table, row.key) in desired and desired[(row.table, row.key)] != row:
                raise ValueError(f"two different desired rows for {row.table} key {row.key!r}")
            desired[(row.table, row.key)] = row
        blobs = {pair: row.encoded() for pair, row in desired.items()}

        def step(conn: sqlite3.Connection) -> ReconcileResult:
            owned = set(conn.execute(f"SELECT tbl, key FROM '{OWNED_TABLE}'").fetchall())
            written, deleted, adopted = [], [], []
            for pair, row in desired.items():
                table, key = pair
                found = conn.execute(f"SELECT val FROM '{table}' WHERE key = ?", (key,)).fetchone()
                if found is not None and pair not in owned:
                    adopted.append(pair)
                if not row.matches(found[0] if found else None):
                    conn.execute(f"REPLACE INTO '{table}'(key, val) VALUES (?, ?)", (key, blobs[pair]))
                    written.append(pair)
            for pair in sorted(owned - desired.keys()):
                table, key = pair
                if table in ENGINE_TABLES and conn.execute(f"DELETE FROM '{table}' WHERE key = ?", (key,)).rowcount:
                    deleted.append(pair)
                conn.execute(f"DELETE FROM '{OWNED_TABLE}' WHERE tbl = ? AND key = ?", pair)
            conn.executemany(
                f"INSERT OR IGNORE INTO '{OWNED_TABLE}'(tbl, key) VALUES (?, ?)", sorted(desired.keys() - owned)
            )
            return ReconcileResult(tuple(written), tuple(deleted), tuple(adopted))

        if not desired and not self.path.exists():
            return ReconcileResult((), (), ())
        result = self._write(step)
        if result.written or result.deleted:
            log.info(
                "eKuiper's store reconciled: %d rows written, %d deleted, %d taken over",
                len(result.written),
                len(result.deleted),
                len(result.adopted),
            )
        return result

    # -- reads

    def raw(self, table: str, key: str) -> bytes | None:
        """Return a row's val blob as stored, None when there is no such row."""
        _check_table(table)

        def read(conn: sqlite3.Connection | None) -> bytes | None:
            if conn is None or table not in self._tables(conn):
                return None
            row = conn.execute(f"SELECT val FROM '{table}' WHERE key = ?", (key,)).fetchone()
            return bytes(row[0]) if row and row[0] is not None else None

        return self._read(read)

    def _all(self, table: str) -> dict[str, bytes]:
        def read(conn: sqlite3.Connection | None) -> dict[str, bytes]:
            if conn is None or table not in self._tables(conn):
                return {}
            return {key: bytes(val) for key, val in conn.execute(f"SELECT key, val FROM '{table}'") if val is not None}

        return self._read(read)

    def owned(self) -> set[tuple[str, str]]:
        """Return the (table, key) pairs recorded as written by us."""

        def read(conn: sqlite3.Connection | None) -> set[tuple[str, str]]:
            if conn is None or OWNED_TABLE not in self._tables(conn):
                return set()
            return set(conn.execute(f"SELECT tbl, key FROM '{OWNED_TABLE}'").fetchall())

        return self._read(read)

    def get_native(self, plugin_type: str, name: str) -> InstallScript | None:
        """Return a native plugin's install request from nativePlugin, None when absent or unreadable."""
        key = native_key(plugin_type, name)
        return self._script(NATIVE_TABLE, key, self.raw(NATIVE_TABLE, key))

    def get_functions(self, name: str) -> list[str] | None:
        """Return a function plugin's function list from pluginFuncs, None when eKuiper has none."""
        blob = self.raw(FUNCTIONS_TABLE, name)
        if blob is None:
            return None
        try:
            return gob.decode_strings(blob)
        except gob.GobError as exc:
            log.warning("eKuiper's %s row %r is skipped: %s", FUNCTIONS_TABLE, name, exc)
            return None

    def get_portable(self, name: str) -> InstallScript | None:
        """Return a portable plugin's install request from portablePlugin, None when absent or unreadable."""
        return self._script(PORTABLE_TABLE, name, self.raw(PORTABLE_TABLE, name))

    def native_plugins(self) -> dict[tuple[str, str], InstallScript]:
        """Return every readable nativePlugin row as {(type, name): install request}, for adoption."""
        result = {}
        for key, blob in self._all(NATIVE_TABLE).items():
            plugin_type, sep, name = key.partition("_")
            if not sep or plugin_type not in NATIVE_TYPES or not name:
                continue  # eKuiper's own markers, such as $boot_install
            script = self._script(NATIVE_TABLE, key, blob)
            if script is not None:
                result[(plugin_type, name)] = script
        return result

    def function_lists(self) -> dict[str, list[str]]:
        """Return every readable pluginFuncs row as {plugin name: functions}, for adoption.

        A row over FUNCTION_LIST_MAX_BYTES is skipped with a warning, without being read.
        """

        def read(conn: sqlite3.Connection | None) -> list[tuple[str, int, bytes | None]]:
            if conn is None or FUNCTIONS_TABLE not in self._tables(conn):
                return []
            return conn.execute(
                "SELECT key, size, CASE WHEN size <= ? THEN CAST(val AS BLOB) END FROM"
                f" (SELECT key, val, length(CAST(val AS BLOB)) AS size FROM '{FUNCTIONS_TABLE}' WHERE val IS NOT NULL)",
                (FUNCTION_LIST_MAX_BYTES,),
            ).fetchall()

        result = {}
        for key, size, blob in self._read(read):
            if blob is None:
                log.warning("eKuiper's %s row %r is skipped: %d bytes, larger than %d", FUNCTIONS_TABLE, key, size,
                            FUNCTION_LIST_MAX_BYTES)
                continue
            try:
                result[key] = gob.decode_strings(bytes(blob))
            except gob.GobError as exc:
                log.warning("eKuiper's %s row %r is skipped: %s", FUNCTIONS_TABLE, key, exc)
        return result

    def portable_plugins(self) -> dict[str, InstallScript]:
        """Return every readable portablePlugin row as {name: install request}, for adoption."""
        result = {}
        for key, blob in self._all(PORTABLE_TABLE).items():
            script = self._script(PORTABLE_TABLE, key, blob)
            if script is not None:
                result[key] = script
        return result

    @staticmethod
    def _script(table: str, key: str, blob: bytes | None) -> InstallScript | None:
        if blob is None:
            return None
        try:
            return InstallScript.parse(gob.decode_string(blob))
        except ValueError as exc:  # GobError, JSONDecodeError and shape errors are all ValueErrors
            log.warning("eKuiper's %s row %r is skipped: %s", table, key, exc)
            return None


def _identity(path: Path) -> tuple[int, int] | None:
    """The file a path names now (device and inode), None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_table(table: str) -> None:
    if table not in ENGINE_TABLES:
        raise ValueError(f"not one of eKuiper's plugin tables: {table!r}")
