"""The audit trail: who asked for which change, under which request id, and what came of it.

Every write request (any method but GET, HEAD and OPTIONS), refused ones included, becomes one log
line and one row of the registry's `audit` table. The web layer knows the request, the caller and the
answer, and builds the `Entry`; this module words the line, keeps the row, and reads rows back.

Rows are only added: the table's trigger refuses any change to a row, and the only deletion is the
retention here, which keeps the newest `basic.auditRetention` rows (0 keeps none, and the log line
alone remains). A row for a change that was made (2xx) is committed durably before the answer goes
out; a refusal's row is not fsynced on its own (a flood of refused requests costs no disk flush
each), and becomes durable with the next durable commit.

Request ids: a client's `X-Request-Id` is kept when it is a sane token (at most 128 of HTTP's token
characters); anything else is replaced by a generated id. The id of the request being served is
held in a context variable, and `RequestIdFilter`, set on a log handler, appends it to every line
logged while that request is served.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from kuiper_plugins.store import db

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
# HTTP's token characters (RFC 9110 tchar): printable, no space, quote, comma, semicolon or brackets,
# so that an id quoted in a log line or a header can neither split it nor pass for another field.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1," + str(MAX_REQUEST_ID) + "}")
MAX_SHOWN = 500  # characters of a message, path or URL kept in a row and a line

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is sane, else a newly generated id."""
    if header is not None and _SANE_REQUEST_ID.fullmatch(header):
        return header
    # uuid.uuid4().hex without the UUID object, which took as long as the rest of a kept read's answer
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


class LineFormatter(logging.Formatter):
    """logging's Formatter, its `%(asctime)s` (default format) worked out once a second instead of once a line.

    Every access line of a kept read goes through it: strftime took a tenth of that line's cost.
    """

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (self._second[1], record.msecs)


class RequestIdFilter(logging.Filter):
    """Append ` request_id=<id>` to each record logged while a request is served (the `request_id` field).

    Put on a handler whose format ends with `%(request_id)s`; outside a request the field is empty.
    A record that names its request in its own message says so with `extra={"request_id": ""}`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            current = current_request_id.get()
            record.request_id = f" request_id={current}" if current else ""
        return True


@dataclass(frozen=True)
class Actor:
    """Who made a request, as far as it can be told: a token's issuer and subject, a local user, an address."""

    issuer: str | None = None
    subject: str | None = None
    user: str | None = None
    address: str | None = None
    proxy: str | None = None  # the front (its local user) that passed `address`, when the address was forwarded

    def describe(self) -> str:
        """One word-like summary for a log line: `jwt:<iss>/<sub>`, `user:<name>`, or `address:<ip>`."""
        parts = []
        if self.issuer is not None:
            parts.append(f"jwt:{self.issuer}/{self.subject or '-'}")
        if self.user is not None:
            parts.append(f"user:{self.user}")
        if self.address is not None:
            parts.append(f"address:{self.address}" + (f"(via {self.proxy})" if self.proxy else ""))
        return ",".join(parts) or "unknown"

    def as_dict(self) -> dict[str, str]:
        """The known fields only, with the API's key names."""
        named = {"iss": self.issuer, "sub": self.subject, "user": self.user, "address": self.address,
                 "proxy": self.proxy}
        return {key: value for key, value in named.items() if value is not None}


@dataclass(frozen=True)
class Entry:
    """One write request as the audit trail keeps it."""

    request_id: str
    method: str
    path: str
    operation: str
    status: int
    duration: float  # seconds, from the request's arrival at the app to its answer
    actor: Actor
    plugin_type: str | None = None
    name: str | None = None
    version_before: str | None = None
    version_after: str | None = None
    sha256: str | None = None
    url: str | None = None
    message: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def outcome(self) -> str:
        """`ok` for a 2xx, `refused` for a 4xx, `failed` for anything else."""
        if 200 <= self.status < 300:
            return "ok"
        return "refused" if 400 <= self.status < 500 else "failed"


def log_entry(entry: Entry) -> None:
    """Write the entry's one log line: operation, plugin, versions, source, outcome, duration, actor, request id."""
    log.info(
        "audit: %s type=%s name=%s version=%s->%s url=%s sha256=%s status=%d outcome=%s duration=%.3fs"
        " actor=%s request_id=%s%s",
        entry.operation, entry.plugin_type or "-", entry.name or "-", entry.version_before or "-",
        entry.version_after or "-", entry.url or "-", entry.sha256 or "-", entry.status, entry.outcome,
        entry.duration, entry.actor.describe(), entry.request_id,
        f" reason={entry.message!r}" if entry.message and entry.outcome != "ok" else "",
        extra={"request_id": ""},  # named in the message already
    )


def record(conn: sqlite3.Connection, entry: Entry, retention: int) -> None:
    """Add the entry's row and delete the rows past the newest `retention`; with retention 0, keep nothing."""
    if retention <= 0:
        return
    actor = entry.actor
    with db.transaction(conn, durable=entry.outcome == "ok"):
        cursor = conn.execute(
            "INSERT INTO audit (at, request_id, method, path, operation, type, name, version_before, version_after,"
            " sha256, url, status, outcome, message, duration, issuer, subject, user, address, proxy)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.at, entry.request_id, entry.method, _bounded(entry.path), entry.operation, entry.plugin_type,
             entry.name, entry.version_before, entry.version_after, entry.sha256, _bounded(entry.url), entry.status,
             entry.outcome, _bounded(entry.message), entry.duration, actor.issuer, actor.subject, actor.user,
             actor.address, actor.proxy),
        )
        # Ids only grow (AUTOINCREMENT never reuses one), so the rows past retention are those below a bound.
        conn.execute("DELETE FROM audit WHERE id <= ?", (cursor.lastrowid - retention,))


def recent(conn: sqlite3.Connection, limit: int, since: float | None = None) -> list[dict[str, Any]]:
    """The newest `limit` rows, at or after `since` (seconds since the epoch) when given, newest first."""
    sql = "SELECT * FROM audit"
    parameters: tuple = ()
    if since is not None:
        sql, parameters = sql + " WHERE at >= ?", (since,)
    try:
        rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*parameters, limit)).fetchall()
    except sqlite3.Error as exc:
        raise db.unavailable(exc) from None
    return [_shown(row) for row in rows]


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds, as rows give their time (and `since` takes it back)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _shown(row: sqlite3.Row) -> dict[str, Any]:
    actor = Actor(issuer=row["issuer"], subject=row["subject"], user=row["user"], address=row["address"],
                  proxy=row["proxy"])
    return {
        "id": row["id"],
        "time": timestamp(row["at"]),
        "requestId": row["request_id"],
        "actor": actor.as_dict(),
        "operation": row["operation"],
        "method": row["method"],
        "path": row["path"],
        "type": row["type"],
        "name": row["name"],
        "versionBefore": row["version_before"],
        "versionAfter": row["version_after"],
        "sha256": row["sha256"],
        "url": row["url"],
        "status": row["status"],
        "outcome": row["outcome"],
        "message": row["message"],
        "durationSeconds": round(row["duration"], 3),
    }


def _bounded(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_SHOWN:
        return text
    return text[:MAX_SHOWN] + "..."
