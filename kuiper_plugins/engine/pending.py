"""Restart pending: the changes the running engine cannot take until it restarts.

Go cannot unload a plugin, so a native update (or a rollback, which is one) made while the engine runs
is on disk and in eKuiper's store, but the engine still runs the old code; a native delete leaves the
plugin in the engine, described as `$deleted`, until it restarts. A change made while the engine could
not be reached (installed, updated or deleted here, not handed over) is likewise taken only at its
next start.

The engine's start time is its `upTimeSeconds` (GET /) taken from now. A change recorded before that
start was loaded at it; a change recorded since is pending when it is a native update, and otherwise
when the engine itself says it does not offer what the registry holds (its describe). `upTimeSeconds`
counts whole seconds of the engine's clock, so the start it gives may be up to a second off, either way: a
change recorded within that second is listed only when the engine's describe confirms it (a native update
that kept its version name, made in that second, is then missed).

GET / counts the same changes without asking the engine: each operation notes in its commit whether the
engine took its change (store/engine_pending.py), and `PendingCount` counts the notes made since the
engine's last known start, asking the engine only about those made within a second of it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests

from kuiper_plugins.engine import live
from kuiper_plugins.engine.client import EngineClient, EngineInfo
from kuiper_plugins.errors import EngineUnavailable
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE
from kuiper_plugins.store import db, engine_pending

log = logging.getLogger(__name__)

START_SLACK_SECONDS = 1  # upTimeSeconds counts whole seconds of the engine's clock
NATIVE_UPDATE = "a native plugin's new code is loaded only when the engine starts (Go cannot unload the old one)"


@dataclass(frozen=True)
class PendingChange:
    """One change the running engine has not taken."""

    plugin_type: str
    name: str
    change: str  # install, update or delete
    version: str | None  # what the registry holds (None for a delete)
    changed_at: float | None  # when the change was recorded here (None for a delete, which leaves no row)
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The change as JSON-ready values, in eKuiper's type names."""
        return {
            "type": type_label(self.plugin_type), "name": self.name, "change": self.change, "version": self.version,
            "changedAt": iso(self.changed_at) if self.changed_at is not None else None, "reason": self.reason,
        }


def engine_started_at(client: EngineClient) -> float:
    """When the running engine started, from its GET / asked afresh (the cache too); EngineUnavailable if not up."""
    info = client.fresh_info()
    if info is None or info.started_at is None:
        raise EngineUnavailable(f"the engine at {client.url} did not say when it started (its GET / answered no"
                                " upTimeSeconds)")
    return info.started_at


def pending_changes(conn: sqlite3.Connection, engine: live.LiveEngine, started_at: float) -> list[PendingChange]:
    """The changes made since `started_at` that the running engine has not taken, by type and name."""
    found: list[PendingChange] = []
    rows = conn.execute(
        "SELECT type, name, version, created_at, updated_at FROM plugins WHERE updated_at >= ? ORDER BY type, name",
        (math.floor(started_at) - START_SLACK_SECONDS,)).fetchall()
    for plugin_type, name, version, created_at, updated_at in rows:
        updated = created_at != updated_at  # an update keeps the first install's created_at
        native_update = plugin_type in NATIVE_TYPES and updated
        # A native update made after the start is not loaded, whatever version the engine names (it may be
        # the same); one made within a second of the start, either side, is confirmed by the engine's describe.
        if (native_update and updated_at >= surely_after(started_at)) or \
                engine.state(plugin_type, name, version=version) == live.PENDING:
            reason = (NATIVE_UPDATE if native_update else
                      "the engine does not offer this version: it could not be reached when the change was made")
            found.append(PendingChange(plugin_type, name, "update" if updated else "install", version, updated_at,
                                       reason))
    found += _pending_deletes(conn, engine)
    return sorted(found, key=lambda c: (c.plugin_type, c.name))


def surely_after(started_at: float) -> float:
    """The first moment surely after the engine's start, known only as `started_at`.

    eKuiper's upTimeSeconds is its clock's whole seconds now less its whole seconds at start, so the start
    lies within a second of `started_at`, before or after it: from the next whole second on, a change was
    surely made after it.
    """
    return math.floor(started_at) + START_SLACK_SECONDS


class PendingCount:
    """GET /'s count of what `pending_changes` lists, from what each change's commit noted.

    GET / is polled: it asks the engine nothing but its (cached) GET /. A note made surely after the
    engine's start counts, one made more than a second before it does not (store/engine_pending.py). One
    made within a second of the start, either side, is one `pending_changes` confirms with the engine's
    describe: so it is here, once per note and answer of the engine's GET / (the client keeps one a
    minute, and GET /engine/pending asks afresh), and kept (only the changes made around a restart are
    ever asked about). The confirmations are not keyed by the start's whole second: two starts a second
    apart can be estimated in the same second (upTimeSeconds is whole seconds), and the first one's
    verdict would then be taken for the second's.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._info: EngineInfo | None = None  # the engine's GET / answer the confirmations are for
        self._confirmed: dict[engine_pending.Note, bool] = {}

    def count(self, conn: sqlite3.Connection, engine: live.LiveEngine, info: EngineInfo) -> int:
        """How many changes the running engine, whose GET / answered `info`, has not taken."""
        started_at = info.started_at
        surely = surely_after(started_at)
        with db.snapshot(conn):
            count = engine_pending.count_since(conn, surely)
            around = engine_pending.noted_between(conn, math.floor(started_at) - START_SLACK_SECONDS, surely)
        if not around:
            return count
        with self._lock:
            if self._info is not info:
                self._info, self._confirmed = info, {}
            known = dict(self._confirmed)
        for note in around:
            if note not in known:
                verdict = _still_pending(engine, note)
                if verdict is None:
                    count += 1  # the engine did not say: counted as noted, and asked again at the next call
                    continue
                known[note] = verdict
                with self._lock:
                    self._confirmed[note] = verdict
            count += known[note]
        return count


def _still_pending(engine: live.LiveEngine, note: engine_pending.Note) -> bool | None:
    """Whether the engine's describe says it has not taken the noted change (None: it did not answer)."""
    if note.change == "delete":
        try:
            return _engine_version(engine.client, note.type, note.name) == live.DELETED
        except EngineUnavailable:
            return None
    state = engine.state(note.type, note.name, version=note.version)
    return None if state == live.UNKNOWN else state == live.PENDING


def _pending_deletes(conn: sqlite3.Connection, engine: live.LiveEngine) -> list[PendingChange]:
    """Plugins the engine still offers, or offers as deleted, that the registry no longer has."""
    found = []
    for plugin_type in (*NATIVE_TYPES, PORTABLE):
        listed = _engine_list(engine.client, plugin_type)
        known = {row[0] for row in conn.execute("SELECT name FROM plugins WHERE type = ?", (plugin_type,))}
        for name in sorted(set(listed) - known):
            if plugin_type == PORTABLE or listed[name] is None:
                version = _engine_version(engine.client, plugin_type, name)
            else:
                version = listed[name]
            if plugin_type in NATIVE_TYPES and version == live.DELETED:
                found.append(PendingChange(plugin_type, name, "delete", None, None,
                                           "the engine keeps a deleted native plugin until it restarts"))
            # Anything else the engine offers and we do not know is its own install: engine/sync takes it in.
    return found


def _engine_list(client: EngineClient, plugin_type: str) -> dict[str, str | None]:
    """The names the engine lists for a type (with the version when the list gives it)."""
    answer = _engine_get(client, f"/plugins/{plugin_type}")
    if not isinstance(answer, list):
        return {}
    listed: dict[str, str | None] = {}
    for item in answer:
        if isinstance(item, str):
            listed[item] = None
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            listed[item["name"]] = item.get("version")
    return listed


def _engine_version(client: EngineClient, plugin_type: str, name: str) -> str | None:
    answer = _engine_get(client, f"/plugins/{plugin_type}/{quote(name, safe='')}")
    return answer.get("version") if isinstance(answer, dict) else None


def _engine_get(client: EngineClient, path: str) -> Any:
    try:
        response = client.send("GET", path, read_timeout=client.timeout)
        if response.status_code != 200:
            return None
        return response.json()
    except (requests.RequestException, ValueError) as exc:
        raise EngineUnavailable(f"the engine at {client.url} did not answer GET {path} ({exc})") from None


def iso(at: float) -> str:
    """A time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
