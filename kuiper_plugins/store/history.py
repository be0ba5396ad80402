"""The registry's memory of a plugin's past: what each committed operation installed, and the kept versions.

- `history` has one row per committed install, update and rollback, appended in the operation's commit
  transaction, never changed; a delete leaves the rows, so a name installed again shows its whole past;
- `kept_versions` has one row per previous version whose files are kept for a rollback, in the folder
  `data/.kuiper-plugins/versions/<folder>`; the row is written in the commit of the operation that
  replaced that version, after the folder was made durable, so a row always names a whole folder. A folder
  without a row is debris of an operation that did not commit, and is swept.
Write functions expect to run inside `db.transaction()`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from kuiper_plugins.store.db import mapped_errors
from kuiper_plugins.store.registry import name_key


@dataclass(frozen=True)
class KeptVersion:
    """A previous version of a plugin, as its registry row was, with its files kept in `folder`."""

    folder: str
    kept_at: float
    manifest: dict[str, Any]  # type, name, version, sha256, request, descriptor, functions, compatibility, files

    @property
    def version(self) -> str:
        return self.manifest["version"]


@mapped_errors
def record(conn: sqlite3.Connection, plugin_type: str, name: str, operation: str, version: str,
           sha256: str | None, url: str | None, outcome: str = "ok") -> None:
    """Append one committed operation to the plugin's history."""
    conn.execute(
        "INSERT INTO history (type, name_key, name, operation, version, sha256, url, at, outcome)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (plugin_type, name_key(name), name, operation, version, sha256, url, time.time(), outcome),
    )


@mapped_errors
def entries(conn: sqlite3.Connection, plugin_type: str, name: str) -> list[dict[str, Any]]:
    """The plugin's history, newest first, as JSON-ready values."""
    rows = conn.execute(
        "SELECT operation, version, sha256, url, at, outcome FROM history WHERE type = ? AND name_key = ?"
        " ORDER BY id DESC", (plugin_type, name_key(name)),
    ).fetchall()
    return [{"operation": r[0], "version": r[1], "sha256": r[2], "url": r[3], "at": r[4], "outcome": r[5]}
            for r in rows]


@mapped_errors
def keep(conn: sqlite3.Connection, plugin_type: str, name: str, folder: str, manifest: dict[str, Any]) -> None:
    """Record a previous version whose files are (durably) in `folder`."""
    conn.execute(
        "INSERT INTO kept_versions (folder, type, name_key, kept_at, manifest) VALUES (?, ?, ?, ?, ?)",
        (folder, plugin_type, name_key(name), time.time(), json.dumps(manifest)),
    )


@mapped_errors
def kept(conn: sqlite3.Connection, plugin_type: str, name: str) -> list[KeptVersion]:
    """The plugin's kept versions, newest first."""
    rows = conn.execute(
        "SELECT folder, kept_at, manifest FROM kept_versions WHERE type = ? AND name_key = ?"
        " ORDER BY kept_at DESC, rowid DESC", (plugin_type, name_key(name)),
    ).fetchall()
    return [KeptVersion(r[0], r[1], json.loads(r[2])) for r in rows]


@mapped_errors
def forget_kept(conn: sqlite3.Connection, folders: list[str]) -> None:
    """Forget kept versions (their folders are removed after the commit, or swept)."""
    conn.executemany("DELETE FROM kept_versions WHERE folder = ?", [(f,) for f in folders])


@mapped_errors
def kept_folders(conn: sqlite3.Connection) -> set[str]:
    """Every folder a kept version names."""
    return {r[0] for r in conn.execute("SELECT folder FROM kept_versions")}
