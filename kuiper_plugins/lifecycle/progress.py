"""How far a write request has got: its phases, bytes so far and in all, and seconds in each phase.

The web layer starts a `Tracker` for each write request it lets in and holds it in a context variable while
the request is served; the install's steps say where they are with the functions below, which do nothing
outside a request (start-up recovery, the CLI's local checks, tests calling a module directly):

- `phase(name, total)` when a step begins: `download` (install/fetch.py), `inspect` (install/archive.py),
  `unpack`, `install.sh` (install/scripts.py), `handshake` (engine/portable.py) and `commit`
  (install/apply.py). An operation that installs several packages (a plugin set, a repair) goes through
  them again for each one;
- `advance(count)` as bytes of the step are done: downloaded, or written while unpacking.

Writes are cheap and bounded: one when the request begins, one at each phase change, at most one every
`UPDATE_EVERY` seconds while bytes come, and one when the answer is ready. Bytes counted since the last
write are written by this process's flusher thread once `UPDATE_EVERY` has passed, should the request
itself not write again by then: a download that stalls shows every byte that came before it stalled.
Progress is never worth an install: a write that fails is logged once for the request and skipped; the
install goes on.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from kuiper_plugins.store.progress import ProgressStore, Record

log = logging.getLogger(__name__)

PHASES = ("download", "inspect", "unpack", "install.sh", "handshake", "commit")
UPDATE_EVERY = 0.25  # seconds between two writes of the same phase's bytes, at least
MAX_PHASES = 64  # phases kept per request, the newest (a plugin set of many packages goes through many)

current: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("progress", default=None)


def phase(name: str, total: int | None = None) -> None:
    """Say that the request being served enters phase `name`, of `total` bytes when known."""
    tracker = current.get()
    if tracker is not None:
        tracker.phase(name, total)


def advance(count: int) -> None:
    """Add `count` bytes done to the current phase of the request being served."""
    tracker = current.get()
    if tracker is not None:
        tracker.advance(count)


@dataclass
class Phase:
    """One phase of a request: when it began (wall clock), its bytes, and how long it took once over."""

    name: str
    started_at: float
    total: int | None = None
    done_bytes: int | None = None
    seconds: float | None = None  # set when the phase is over

    def as_stored(self) -> dict[str, Any]:
        return {"phase": self.name, "startedAt": self.started_at, "bytes": self.done_bytes, "total": self.total,
                "seconds": self.seconds}


class Tracker:
    """The progress of one write request, written to the progress store as it goes."""

    def __init__(self, store: ProgressStore, request_id: str, method: str, path: str):
        self.store = store
        self.request_id = request_id
        self.method = method
        self.path = path
        self.phases: list[Phase] = []
        self._written_at = 0.0  # monotonic time of the last write
        self._dirty = False  # bytes counted since the last write
        self._complained = False
        self._begun = False
        self._lock = threading.Lock()  # one write at a time: the request's thread's, or the flusher's

    def begin(self) -> None:
        """Write the request's row: it is running, in no phase yet."""
        now = time.time()
        record = Record(request_id=self.request_id, method=self.method, path=self.path, pid=os.getpid(),
                        started_at=now, updated_at=now, finished_at=None, status=None, phases=[])
        self._begun = self._attempt(lambda: self.store.begin(record))
        self._written_at = time.monotonic()

    def phase(self, name: str, total: int | None = None) -> None:
        """End the current phase and begin `name` (a phase already current only takes the new total)."""
        with self._lock:
            if self.phases and self.phases[-1].name == name and self.phases[-1].seconds is None:
                if total is not None:
                    self.phases[-1].total = total
                    self._write()
                return
            self._end_current()
            self.phases.append(Phase(name=name, started_at=time.time(), total=total))
            del self.phases[:-MAX_PHASES]
            self._write()

    def advance(self, count: int) -> None:
        """Count bytes done in the current phase; write them when the last write is old enough."""
        with self._lock:
            if not self.phases:
                return
            current_phase = self.phases[-1]
            current_phase.done_bytes = (current_phase.done_bytes or 0) + count
            due = self._written_at + UPDATE_EVERY
            if time.monotonic() >= due:
                self._write()
                return
            if not self._dirty:
                self._dirty = True
                _flusher.schedule(self, due)

    def flush(self) -> None:
        """Write the bytes counted since the last write, if no write has taken them since (the flusher)."""
        with self._lock:
            if self._dirty:
                self._write()

    def finish(self, status: int) -> None:
        """End the last phase and record the answer's status: the request is over."""
        with self._lock:
            self._end_current()
            self._write(finished_at=time.time(), status=status)

    def _end_current(self) -> None:
        if self.phases and self.phases[-1].seconds is None:
            self.phases[-1].seconds = max(time.time() - self.phases[-1].started_at, 0.0)

    def _write(self, *, finished_at: float | None = None, status: int | None = None) -> None:
        if not self._begun:  # the row could not be made: try again, it may be there now
            self.begin()
            if not self._begun:
                return
        stored = [p.as_stored() for p in self.phases]
        self._attempt(lambda: self.store.update(self.request_id, stored, finished_at=finished_at, status=status))
        self._written_at = time.monotonic()
        self._dirty = False

    def _attempt(self, write) -> bool:
        """Make one write; on failure log it (once per request) and go on: progress never stops an install."""
        try:
            write()
        except (sqlite3.Error, OSError) as exc:
            if not self._complained:
                self._complained = True
                log.warning("progress of request %s cannot be recorded in %s (%s); the request goes on without",
                            self.request_id, self.store.path, exc)
            return False
        return True


class _Flusher:
    """This process's one thread that writes trackers' late bytes when their time has come (`Tracker.flush`).

    Started on first use in each process (a gunicorn worker starts its own after fork). It holds at most
    one entry per tracker with unwritten bytes, and a tracker's write takes its own lock, so a flush and
    the request's own next write never interleave.
    """

    def __init__(self) -> None:
        self._due: dict[Tracker, float] = {}
        self._wake = threading.Condition()
        self._pid: int | None = None

    def schedule(self, tracker: Tracker, due: float) -> None:
        """Flush `tracker` at monotonic time `due`, unless it is already waiting for an earlier one."""
        with self._wake:
            if self._pid != os.getpid():
                self._due.clear()  # a forked child's copy: its parent's trackers are not its own
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="progress-flusher", daemon=True).start()
            earliest = min(self._due.values(), default=None)
            self._due.setdefault(tracker, due)
            if earliest is None or due < earliest:
                # the thread waits for the earliest time due: woken only when that is now sooner
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due:
                    self._wake.wait()
                tracker, due = min(self._due.items(), key=lambda item: item[1])
                delay = due - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                del self._due[tracker]
            tracker.flush()


_flusher = _Flusher()
