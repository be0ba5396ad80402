"""The plugin registry in SQLite: plugins, the files each install wrote, functions, operations.

Invariants:
- a plugin row exists only for a fully installed plugin; its files are listed
  in plugin_files (a path belongs to at most one plugin);
- function names are one global namespace across native and portable plugins;
- each recorded file keeps the size and sha256 it was installed with (a
  folder: its total size and the digest of its listing), so that what is on
  disk can be told apart from what was installed;
- an operations row marks an install, update or delete in flight, reserving
  its (type, name); the journal of the file moves it makes is written beside
  its staging folder before the first move, so that a crash at any point can
  be rolled back at start-up (see install/apply.py);
- the commit of an operation ends its row and records its id in
  finished_operations in the same transaction: a staging folder whose
  operation is listed there committed, and is finished, never undone;
- SQLite failures leave every function here as the 503/507 refusals of
  `db.unavailable`, except IntegrityError, which says a name, function or
  file is taken.
Write functions expect to run inside `db.transaction()`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kuiper_plugins.store.db import mapped_errors


@dataclass(frozen=True)
class Plugin:
    id: int
    type: str
    name: str
    version: str
    descriptor: dict[str, Any] | None
    request: dict[str, Any] | None
    sha256: str | None
    adopted: bool
    compatibility: dict[str, Any] | None = None  # the engine's verdict, when engine.binary checked it


@dataclass(frozen=True)
class RecordedFile:
    """A path a plugin owns, relative to KUIPER_HOME, with what it held when installed (None: unknown)."""

    path: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Operation:
    id: str
    type: str
    name: str
    kind: str
    pid: int


def name_key(name: str) -> str:
    """Names are unique within a type regardless of case (eKuiper upper-cases .so names)."""
    return name.lower()


def _first_column(conn: sqlite3.Connection, sql: str, parameters: tuple) -> list[Any]:
    """One column of a query, without building a Row per record (lists may hold thousands)."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return [row[0] for row in cursor.execute(sql, parameters)]


def _plugin(row: sqlite3.Row) -> Plugin:
    return Plugin(
        id=row["id"],
        type=row["type"],
        name=row["name"],
        version=row["version"],
        descriptor=json.loads(row["descriptor"]) if row["descriptor"] else None,
        request=json.loads(row["request"]) if row["request"] else None,
        sha256=row["sha256"],
        adopted=bool(row["adopted"]),
        compatibility=json.loads(row["compatibility"]) if row["compatibility"] else None,
    )


@mapped_errors
def list_names(conn: sqlite3.Connection, plugin_type: str) -> list[str]:
    """Names of the installed plugins of one type, sorted."""
    return _first_column(conn, "SELECT name FROM plugins WHERE type = ? ORDER BY name", (plugin_type,))


@mapped_errors
def list_descriptors(conn: sqlite3.Connection, plugin_type: str) -> list[dict[str, Any]]:
    """Descriptors of the installed plugins of one type, sorted by name."""
    rows = conn.execute("SELECT descriptor FROM plugins WHERE type = ? ORDER BY name", (plugin_type,))
    return [json.loads(row[0]) for row in rows]


@mapped_errors
def find(conn: sqlite3.Connection, plugin_type: str, name: str) -> Plugin | None:
    """The plugin of that exact type and name, or None."""
    row = conn.execute(
        "SELECT * FROM plugins WHERE type = ? AND name_key = ? AND name = ?", (plugin_type, name_key(name), name)
    ).fetchone()
    return _plugin(row) if row else None


@mapped_errors
def find_by_key(conn: sqlite3.Connection, plugin_type: str, name: str) -> Plugin | None:
    """The plugin whose name equals `name` regardless of case, or None."""
    row = conn.execute(
        "SELECT * FROM plugins WHERE type = ? AND name_key = ?", (plugin_type, name_key(name))
    ).fetchone()
    return _plugin(row) if row else None


@mapped_errors
def files_of(conn: sqlite3.Connection, plugin_id: int) -> list[str]:
    rows = conn.execute("SELECT path FROM plugin_files WHERE plugin_id = ? ORDER BY path", (plugin_id,))
    return [row[0] for row in rows]


@mapped_errors
def files_by_plugin(conn: sqlite3.Connection) -> dict[int, list[str]]:
    """Every plugin's recorded paths, by plugin id (one query, for a look over the whole registry)."""
    files: dict[int, list[str]] = {}
    for plugin_id, path in conn.execute("SELECT plugin_id, path FROM plugin_files ORDER BY plugin_id, path"):
        files.setdefault(plugin_id, []).append(path)
    return files


@mapped_errors
def all_plugins(conn: sqlite3.Connection) -> list[tuple[Plugin, list[str]]]:
    """Every plugin with its function list, in (type, name) order."""
    plugins = [_plugin(row) for row in conn.execute("SELECT * FROM plugins ORDER BY type, name")]
    functions: dict[int, list[str]] = {}
    for plugin_id, function in conn.execute("SELECT plugin_id, name FROM functions ORDER BY plugin_id, position"):
        functions.setdefault(plugin_id, []).append(function)
    return [(plugin, functions.get(plugin.id, [])) for plugin in plugins]


@mapped_errors
def recorded_files(conn: sqlite3.Connection, plugin_id: int) -> list[RecordedFile]:
    """The files of a plugin with the size and digest each had when installed."""
    rows = conn.execute(
        "SELECT path, size, sha256 FROM plugin_files WHERE plugin_id = ? ORDER BY path", (plugin_id,)
    )
    return [RecordedFile(row[0], row[1], row[2]) for row in rows]


@mapped_errors
def recorded_files_by_plugin(conn: sqlite3.Connection) -> dict[int, list[RecordedFile]]:
    """`recorded_files` of every plugin, by plugin id, in one query (a check of the whole registry)."""
    files: dict[int, list[RecordedFile]] = {}
    rows = conn.execute("SELECT plugin_id, path, size, sha256 FROM plugin_files ORDER BY plugin_id, path")
    for plugin_id, path, size, sha256 in rows:
        files.setdefault(plugin_id, []).append(RecordedFile(path, size, sha256))
    return files


@mapped_errors
def functions_of(conn: sqlite3.Connection, plugin_id: int) -> list[str]:
    rows = conn.execute("SELECT name FROM functions WHERE plugin_id = ? ORDER BY position", (plugin_id,))
    return [row[0] for row in rows]


@mapped_errors
def function_names(conn: sqlite3.Connection) -> list[str]:
    """Every registered function name, sorted."""
    return _first_column(conn, "SELECT name FROM functions ORDER BY name", ())


@mapped_errors
def function_owner(conn: sqlite3.Connection, function: str) -> str | None:
    """The name of the plugin that owns a function, or None."""
    row = conn.execute(
        "SELECT p.name FROM functions f JOIN plugins p ON p.id = f.plugin_id WHERE f.name = ?", (function,)
    ).fetchone()
    return row[0] if row else None


@mapped_errors
def function_clashes(
    conn: sqlite3.Connection, functions: Iterable[str], except_plugin: int | None
) -> list[tuple[str, str]]:
    """(function, owning plugin) for each name already owned by another plugin."""
    clashes = []
    for function in functions:
        row = conn.execute(
            "SELECT f.plugin_id, p.name FROM functions f JOIN plugins p ON p.id = f.plugin_id WHERE f.name = ?",
            (function,),
        ).fetchone()
        if row and row[0] != except_plugin:
            clashes.append((function, row[1]))
    return clashes


@mapped_errors
def file_owners(
    conn: sqlite3.Connection, paths: Iterable[str], except_plugin: int | None
) -> list[tuple[str, str, str]]:
    """(path, owner type, owner name) for each path recorded for another plugin."""
    owners = []
    for path in paths:
        row = conn.execute(
            "SELECT f.plugin_id, p.type, p.name FROM plugin_files f JOIN plugins p ON p.id = f.plugin_id"
            " WHERE f.path = ?",
            (path,),
        ).fetchone()
        if row and row[0] != except_plugin:
            owners.append((path, row[1], row[2]))
    return owners


@mapped_errors
def all_recorded_files(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT path FROM plugin_files")}


@mapped_errors
def save(
    conn: sqlite3.Connection,
    *,
    plugin_type: str,
    name: str,
    version: str,
    descriptor: dict[str, Any] | None,
    request: dict[str, Any] | None,
    sha256: str | None,
    files: Sequence[RecordedFile],
    functions: Sequence[str],
    replaces: int | None = None,
    adopted: bool = False,
    compatibility: dict[str, Any] | None = None,
) -> int:
    """Record a fully installed plugin (replacing the row `replaces` on update); return its id."""
    now = time.time()
    created_at = now
    if replaces is not None:
        row = conn.execute("SELECT created_at FROM plugins WHERE id = ?", (replaces,)).fetchone()
        created_at = row[0] if row else now
        conn.execute("DELETE FROM plugins WHERE id = ?", (replaces,))
    cursor = conn.execute(
        "INSERT INTO plugins (type, name, name_key, version, descriptor, request, sha256, adopted,"
        " created_at, updated_at, compatibility) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            plugin_type,
            name,
            name_key(name),
            version,
            json.dumps(descriptor) if descriptor is not None else None,
            json.dumps(request) if request is not None else None,
            sha256,
            int(adopted),
            created_at,
            now,
            json.dumps(compatibility) if compatibility is not None else None,
        ),
    )
    plugin_id = cursor.lastrowid
    conn.executemany(
        "INSERT INTO plugin_files (path, plugin_id, size, sha256) VALUES (?, ?, ?, ?)",
        [(f.path, plugin_id, f.size, f.sha256) for f in files],
    )
    set_functions(conn, plugin_id, functions)
    return plugin_id


@mapped_errors
def set_functions(conn: sqlite3.Connection, plugin_id: int, functions: Sequence[str]) -> None:
    """Replace a plugin's function list; raises IntegrityError when a name is owned elsewhere."""
    conn.execute("DELETE FROM functions WHERE plugin_id = ?", (plugin_id,))
    conn.executemany(
        "INSERT INTO functions (name, plugin_id, position) VALUES (?, ?, ?)",
        [(f, plugin_id, i) for i, f in enumerate(functions)],
    )


@mapped_errors
def remove(conn: sqlite3.Connection, plugin_id: int) -> None:
    """Forget a plugin, its files and its functions."""
    conn.execute("DELETE FROM plugins WHERE id = ?", (plugin_id,))


@mapped_errors
def begin_operation(conn: sqlite3.Connection, op_id: str, plugin_type: str, name: str, kind: str, pid: int) -> None:
    """Reserve a plugin name for one operation; IntegrityError when one is already recorded."""
    conn.execute(
        "INSERT INTO operations (id, type, name, name_key, kind, pid, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (op_id, plugin_type, name, name_key(name), kind, pid, time.time()),
    )


@mapped_errors
def end_operation(conn: sqlite3.Connection, op_id: str, *, committed: bool = False) -> None:
    """Drop an operation's reservation; `committed` records, in the same transaction, that it took effect."""
    conn.execute("DELETE FROM operations WHERE id = ?", (op_id,))
    if committed:
        conn.execute("INSERT OR IGNORE INTO finished_operations (id) VALUES (?)", (op_id,))


@mapped_errors
def finished_operations(conn: sqlite3.Connection) -> set[str]:
    """Ids of committed operations whose staging folders may not be cleared yet."""
    return set(_first_column(conn, "SELECT id FROM finished_operations", ()))


@mapped_errors
def forget_finished(conn: sqlite3.Connection, op_ids: Iterable[str]) -> None:
    """Drop finished operations whose staging folders are gone."""
    conn.executemany("DELETE FROM finished_operations WHERE id = ?", [(i,) for i in op_ids])


def _operation(row: sqlite3.Row) -> Operation:
    return Operation(id=row["id"], type=row["type"], name=row["name"], kind=row["kind"], pid=row["pid"])


@mapped_errors
def operations(conn: sqlite3.Connection) -> list[Operation]:
    """Every operation recorded as in flight."""
    return [_operation(row) for row in conn.execute("SELECT * FROM operations ORDER BY started_at")]


@mapped_errors
def operation_for(conn: sqlite3.Connection, plugin_type: str, name: str) -> Operation | None:
    row = conn.execute(
        "SELECT * FROM operations WHERE type = ? AND name_key = ?", (plugin_type, name_key(name))
    ).fetchone()
    return _operation(row) if row else None


@mapped_errors
def counts(conn: sqlite3.Connection) -> dict[str, Any]:
    """Plugins per type, functions, and operations in flight (for the readiness answer)."""
    return {
        "plugins": dict(conn.execute("SELECT type, COUNT(*) FROM plugins GROUP BY type").fetchall()),
        "functions": conn.execute("SELECT COUNT(*) FROM functions").fetchone()[0],
        "operationsInFlight": conn.execute("SELECT COUNT(*) FROM operations").fetchone()[0],
    }
