"""The server's progress on a terminal while an install or update waits for its answer.

The write carries the CLI's own `X-Request-Id` (a uuid4). While the answer is awaited, a thread asks
`GET /operations/{id}` on a connection of its own, every `POLL_SECONDS`, and draws one line per phase on
stderr: the phase, its bytes so far and in all, the rate, the seconds. The current phase's line is redrawn
in place (`\\r`); a phase that is over is printed whole, on a line of its own. Once the answer has come,
one last question gives every phase's final numbers. Nothing is drawn when stderr is not a terminal, or
with --json, and a server that does not answer the question (an older one, or one behind a front that
does not pass the path) only leaves the lines out: the write itself is never affected.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import requests

REQUEST_ID_HEADER = "X-Request-Id"
POLL_SECONDS = 0.5
POLL_TIMEOUT = (5, 10)  # seconds to connect, and to read one answer
NAME_WIDTH = 10  # the longest phase name, install.sh and handshake, fits


def new_request_id() -> str:
    """A request id for one write: a uuid4, which the server keeps as it is."""
    return str(uuid.uuid4())


class PhaseLines:
    """One line per phase on a terminal: the current one redrawn in place, each finished one printed whole."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.printed = 0  # phases printed whole, from the first
        self.drawn = 0  # characters of the line being redrawn, to blank what a shorter one leaves

    def show(self, answer: Any) -> None:
        """Draw an answer of GET /operations: print the phases now over, redraw the current one."""
        phases = answer.get("phases") if isinstance(answer, dict) else None
        if not isinstance(phases, list):
            return
        phases = [p for p in phases if isinstance(p, dict)]
        while self.printed < len(phases) and phases[self.printed].get("done"):
            self._put(describe(phases[self.printed]), whole=True)
            self.printed += 1
        if self.printed < len(phases):
            self._put(describe(phases[self.printed]), whole=False)

    def close(self) -> None:
        """End a line left half drawn, so that what comes next starts on a line of its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = 0

    def _put(self, line: str, *, whole: bool) -> None:
        padding = " " * max(self.drawn - len(line), 0)
        self.stream.write(f"\r{line}{padding}" + ("\n" if whole else ""))
        self.stream.flush()
        self.drawn = 0 if whole else len(line)


def describe(phase: dict[str, Any]) -> str:
    """A phase in one line: `download    12.0 MiB / 57.0 MiB  4.1 MiB/s  2.9 s`."""
    name = str(phase.get("phase") or "?")[:20]
    seconds = phase.get("seconds")
    seconds = float(seconds) if isinstance(seconds, int | float) else 0.0
    parts = [name.ljust(NAME_WIDTH)]
    done = phase.get("bytes")
    total = phase.get("totalBytes")
    if isinstance(done, int):
        parts.append(f"{size(done)} / {size(total)}" if isinstance(total, int) else size(done))
        if seconds > 0:
            parts.append(f"{size(int(done / seconds))}/s")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def size(count: int) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class OperationWatcher:
    """A thread that asks GET /operations/{id} on its own session until told to stop, drawing each answer."""

    def __init__(self, base_url: str, headers: dict[str, str], request_id: str, lines: PhaseLines,
                 limit_seconds: float):
        self.url = f"{base_url.rstrip('/')}/operations/{request_id}"
        self.headers = headers
        self.lines = lines
        self.deadline = time.monotonic() + limit_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kuiper-plugins-progress", daemon=True)
        # Drawing and stopping take it: once stopped, the thread draws nothing more, even from an answer it was
        # still waiting for (it is not waited for: a daemon, it ends with its question, or with the process).
        self.lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self, *, final_look: bool = True) -> None:
        """Stop asking, ask once more for the final numbers (unless told not to), and end the drawing."""
        with self.lock:
            self.stopped.set()
        answer = None
        if final_look:
            with requests.Session() as session:
                answer = self._ask(session)
        with self.lock:
            if answer is not None:
                self.lines.show(answer)
            self.lines.close()

    def _run(self) -> None:
        with requests.Session() as session:  # a connection of its own: the write holds the caller's
            # Bounded: by the write's own timeout, and it ends as soon as the answer has come.
            while not self.stopped.wait(POLL_SECONDS) and time.monotonic() < self.deadline:
                answer = self._ask(session)
                if answer is None:
                    continue
                with self.lock:
                    if not self.stopped.is_set():
                        self.lines.show(answer)

    def _ask(self, session: requests.Session) -> dict[str, Any] | None:
        try:
            response = session.get(self.url, headers=self.headers, timeout=POLL_TIMEOUT)
        except requests.RequestException:
            return None
        with response:
            if response.status_code != 200:
                return None  # not begun yet (404), or a server without the path: nothing to draw
            try:
                answer = response.json()
            except ValueError:
                return None
        return answer if isinstance(answer, dict) else None


@contextmanager
def watched(base_url: str, headers: dict[str, str], request_id: str, stream: TextIO | None,
            limit_seconds: float) -> Iterator[None]:
    """Draw the server's phases of request `request_id` on `stream` while the block runs; nothing without one."""
    if stream is None:
        yield
        return
    watcher = OperationWatcher(base_url, headers, request_id, PhaseLines(stream), limit_seconds)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:
        watcher.stop(final_look=False)  # the user wants out: no last question
        raise
    except BaseException:
        watcher.stop()
        raise
    watcher.stop()
