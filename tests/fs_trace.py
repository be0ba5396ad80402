"""Reading `strace -f -yy` output as file-system events, and replaying a power cut from them.

Traces are taken with `strace -f -qq -yy -s 64 -e trace=<TRACED>`: every file descriptor is shown with
its path (`7</home/x/y.so>`), so each event names the paths it touched. `PowerCut` follows the events
of one run and knows, for every file, how many of its bytes were written and how many had been fsynced;
`apply` then does to the disk what losing the page cache would: every file keeps only its fsynced bytes,
and SQLite's WAL only its fsynced frames. A syncfs(2) flushes the whole file system its descriptor is on:
every file on it keeps all its bytes written so far.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TRACED = "%file,%desc,fsync,fdatasync,sendto,sendmsg,writev"

_LINE = re.compile(r"^(?P<pid>\d+) +(?P<call>[a-z0-9_]+)\((?P<args>.*)\) += (?P<ret>-?\d+|\?)(?:<(?P<retpath>[^>]*)>)?")
_RESUMED = re.compile(r"^<\.\.\. [a-z0-9_]+ resumed>(?P<rest>.*)$")
_FD = re.compile(r"^(?:-?\d+|AT_FDCWD)<(?P<path>[^>]*)>$")
_STRING = re.compile(r'^"(?P<text>(?:[^"\\]|\\.)*)"(?:\.\.\.)?$')


@dataclass
class Event:
    index: int
    pid: int
    call: str
    args: list[str]
    ret: int | None
    ret_path: str | None

    def fd_path(self, position: int) -> str | None:
        """The path of the descriptor argument at `position`, as -y shows it."""
        if position >= len(self.args):
            return None
        match = _FD.match(self.args[position])
        return match["path"] if match else None

    def string(self, position: int) -> str | None:
        if position >= len(self.args):
            return None
        match = _STRING.match(self.args[position])
        return _unescape(match["text"]) if match else None

    def path_at(self, dir_position: int, name_position: int) -> str | None:
        """The absolute path named by a (dir fd, name) pair or by a plain path argument."""
        name = self.string(name_position)
        if name is None:
            return None
        if name.startswith("/"):
            return os.path.normpath(name)
        base = self.fd_path(dir_position) if dir_position >= 0 else None
        return os.path.normpath(os.path.join(base, name)) if base else None


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), text)


def _split_args(args: str) -> list[str]:
    """Split an strace argument list at top-level commas (not inside quotes, brackets or braces)."""
    parts, depth, current, quoted, escaped = [], 0, [], False, False
    for char in args:
        if quoted:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            continue
        if char == '"':
            quoted = True
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if current:
        parts.append("".join(current).strip())
    return parts


def parse(trace: Path) -> list[Event]:
    """The completed system calls of a trace, in order (failed ones included, with their return value)."""
    events: list[Event] = []
    pending: dict[str, str] = {}  # pid -> the start of a call another thread's line interrupted
    for line in trace.read_text(errors="replace").splitlines():
        pid, _, rest = line.partition(" ")
        if rest.endswith(" <unfinished ...>"):
            pending[pid] = line[: -len(" <unfinished ...>")]
            continue
        resumed = _RESUMED.match(rest.lstrip())
        if resumed is not None:
            if pid not in pending:
                continue
            line = pending.pop(pid) + resumed["rest"]
        match = _LINE.match(line)
        if match is None:
            continue  # signals, exits, and calls a kill interrupted
        ret = None if match["ret"] == "?" else int(match["ret"])
        events.append(Event(len(events), int(match["pid"]), match["call"], _split_args(match["args"]), ret,
                            match["retpath"]))
    return events


# ---------------------------------------------------------------------------- classifying events

def renamed(event: Event) -> tuple[str, str] | None:
    """(source, destination) of a successful rename, or None."""
    if event.ret != 0:
        return None
    if event.call == "rename":
        return event.path_at(-1, 0), event.path_at(-1, 1)
    if event.call in ("renameat", "renameat2"):
        return event.path_at(0, 1), event.path_at(2, 3)
    return None


def linked(event: Event) -> tuple[str, str] | None:
    if event.ret != 0:
        return None
    if event.call == "link":
        return event.path_at(-1, 0), event.path_at(-1, 1)
    if event.call == "linkat":
        return event.path_at(0, 1), event.path_at(2, 3)
    return None


def removed(event: Event) -> str | None:
    """The path a successful unlink or rmdir removed, or None."""
    if event.ret != 0:
        return None
    if event.call in ("unlink", "rmdir"):
        return event.path_at(-1, 0)
    if event.call == "unlinkat":
        return event.path_at(0, 1)
    return None


def synced(event: Event) -> str | None:
    """The path a successful fsync or fdatasync flushed, or None."""
    if event.call in ("fsync", "fdatasync") and event.ret == 0:
        return event.fd_path(0)
    return None


def flushed_file_system(event: Event) -> str | None:
    """The path whose whole file system a successful syncfs flushed, or None."""
    if event.call == "syncfs" and event.ret == 0:
        return event.fd_path(0)
    return None


def written(event: Event) -> tuple[str, int, int | None] | None:
    """(path, bytes written, offset or None for the file position) of a successful write to a file."""
    if event.ret is None or event.ret <= 0:
        return None
    if event.call in ("write", "writev"):
        path = event.fd_path(0)
        return (path, event.ret, None) if path and path.startswith("/") else None
    if event.call == "pwrite64":
        path = event.fd_path(0)
        return (path, event.ret, int(event.args[3])) if path and path.startswith("/") else None
    if event.call == "sendfile":
        path = event.fd_path(0)
        return (path, event.ret, None) if path and path.startswith("/") else None
    if event.call == "copy_file_range":
        path = event.fd_path(2)
        return (path, event.ret, None) if path and path.startswith("/") else None
    return None


def sent_to_socket(event: Event) -> str | None:
    """The text a successful write or send to a TCP socket started with, or None."""
    if event.call not in ("write", "sendto", "sendmsg", "writev") or not event.ret or event.ret <= 0:
        return None
    if not event.args or "TCP" not in event.args[0]:
        return None
    text = event.string(1)
    if text is None and event.call in ("sendmsg", "writev"):
        match = re.search(r'iov_base="((?:[^"\\]|\\.)*)"', ", ".join(event.args[1:]))
        text = _unescape(match[1]) if match else None
    return text


# ---------------------------------------------------------------------------- a power cut

@dataclass
class _File:
    size: int = 0  # bytes written so far (sequential writes: the file's length)
    durable: int = 0  # of which fsynced
    created_in_run: bool = False


@dataclass
class PowerCut:
    """What each file under `root` holds durably, followed through the events of one run.

    Files that existed before the run count as durable as they were (`start`); renames and hard links
    carry a file's state to its new names. Directory entries are taken as durable: what is checked is
    whether the bytes behind each name were synced before the name pointed at them. A syncfs through a
    descriptor inside `root` makes every file followed durable: `root` lies on one file system.
    """

    root: Path
    files: dict[str, _File] = field(default_factory=dict)

    def start(self) -> PowerCut:
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                self.files[str(path)] = _File(size, size)
        return self

    def follow(self, events: list[Event]) -> PowerCut:
        for event in events:
            self._apply(event)
        return self

    def _inside(self, path: str | None) -> bool:
        return path is not None and (path == str(self.root) or path.startswith(f"{self.root}/"))

    def _apply(self, event: Event) -> None:
        if event.call in ("openat", "open") and event.ret is not None and event.ret >= 0 and event.ret_path:
            flags = event.args[2] if event.call == "openat" else event.args[1]
            path = event.ret_path
            if self._inside(path) and ("O_CREAT" in flags or "O_TRUNC" in flags):
                state = self.files.get(path)
                if state is None:
                    self.files[path] = _File(created_in_run=True)
                elif "O_TRUNC" in flags:
                    state.size = 0
            return
        if (write := written(event)) is not None:
            path, count, offset = write
            if self._inside(path):
                state = self.files.setdefault(path, _File(created_in_run=True))
                state.size = max(state.size, offset + count) if offset is not None else state.size + count
            return
        if (path := synced(event)) is not None:
            if path in self.files:
                self.files[path].durable = self.files[path].size
            return
        if (path := flushed_file_system(event)) is not None:
            if self._inside(path):
                for state in self.files.values():
                    state.durable = state.size
            return
        if event.call == "ftruncate" and event.ret == 0:
            path = event.fd_path(0)
            if path in self.files:
                self.files[path].size = int(event.args[1])
                self.files[path].durable = min(self.files[path].durable, self.files[path].size)
            return
        if (move := renamed(event)) is not None:
            source, dest = move
            moved = {p: s for p, s in self.files.items() if p == source or p.startswith(f"{source}/")}
            for path, state in moved.items():
                del self.files[path]
                self.files[dest + path[len(source):]] = state
            return
        if (link := linked(event)) is not None:
            source, dest = link
            if source in self.files:
                self.files[dest] = self.files[source]
            return
        if (gone := removed(event)) is not None:
            for path in [p for p in self.files if p == gone or p.startswith(f"{gone}/")]:
                del self.files[path]

    def unsynced(self) -> dict[str, tuple[int, int]]:
        """Each file holding bytes that were never fsynced: path -> (bytes written, bytes durable)."""
        return {p: (s.size, s.durable) for p, s in self.files.items() if s.size > s.durable}

    def apply(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Cut every file down to its durable bytes, as losing the page cache would; return what was cut.

        Paths in `keep` are left whole (SQLite's main file: its unsynced pages are still in the WAL).
        """
        cut = []
        for path, (_size, durable) in sorted(self.unsynced().items()):
            if path in keep:
                continue
            if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > durable:
                os.truncate(path, durable)
                cut.append(path)
        return cut
