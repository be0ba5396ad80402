"""The registry's note of the changes the running engine has not taken, for GET /'s count.

GET /engine/pending asks the engine which changes made since its start it has not taken; GET /, which
is polled, counts the same changes from this table. Each operation notes here, in its own commit
transaction, whether the engine took its change:

- an install, update or rollback is pending unless it was handed to the running engine and loaded there
  (a native update or rollback never is: Go cannot unload the code it runs);
- a native delete is pending when the engine deleted the plugin, which it then keeps as `$deleted` until
  it restarts; a delete the engine did not make leaves the plugin offered as it was, which GET
  /engine/pending does not list either.

One row per plugin name, its last change's: a change the engine took removes it. `at` is the plugin row's
`updated_at` (for a delete, its time), so that the engine's start compares with it as GET /engine/pending
compares with the row: a change noted before the start was taken at it. Write functions expect to run
inside `db.transaction()`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from kuiper_plugins.store.db import mapped_errors
from kuiper_plugins.store.registry import name_key


@dataclass(frozen=True)
class Note:
    """A change the running engine had not taken when it was committed."""

    type: str
    name: str
    change: str  # install, update or delete
    version: str | None  # what the registry holds after it (None for a delete)
    at: float


@mapped_errors
def note(conn: sqlite3.Connection, plugin_id: int, change: str, *, pending: bool) -> None:
    """Note whether the running engine took the install, update or rollback just saved as plugin `plugin_id`."""
    plugin_type, name, version, at = conn.execute(
        "SELECT type, name, version, updated_at FROM plugins WHERE id = ?", (plugin_id,)).fetchone()
    _note(conn, Note(plugin_type, name, change, version, at), pending)


@mapped_errors
def note_delete(conn: sqlite3.Connection, plugin_type: str, name: str, *, pending: bool) -> None:
    """Note whether the running engine took the delete of a plugin being committed."""
    _note(conn, Note(plugin_type, name, "delete", None, time.time()), pending)


def _note(conn: sqlite3.Connection, change: Note, pending: bool) -> None:
    if pending:
        conn.execute(
            "REPLACE INTO engine_pending (type, name_key, name, change, version, at) VALUES (?, ?, ?, ?, ?, ?)",
            (change.type, name_key(change.name), change.name, change.change, change.version, change.at))
    else:
        conn.execute("DELETE FROM engine_pending WHERE type = ? AND name_key = ?",
                     (change.type, name_key(change.name)))


@mapped_errors
def count_since(conn: sqlite3.Connection, since: float) -> int:
    """How many plugins have a pending change noted at or after `since`."""
    return conn.execute("SELECT COUNT(*) FROM engine_pending WHERE at >= ?", (since,)).fetchone()[0]


@mapped_errors
def noted_between(conn: sqlite3.Connection, since: float, until: float) -> list[Note]:
    """The pending changes noted at or after `since` and before `until`."""
    rows = conn.execute("SELECT type, name, change, version, at FROM engine_pending WHERE at >= ? AND at < ?"
                        " ORDER BY type, name_key", (since, until))
    return [Note(*row) for row in rows]
