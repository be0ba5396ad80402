"""Run a package's install.sh under control, and clean up after it.

The script runs as ``/bin/sh install.sh <shellParas...>`` (an argument list,
never a shell string) with stdin closed and an environment built from
scratch. Its output is read as it comes and only the last 64 KiB are kept.
The timeout is a total deadline.

Its output goes to the log one record per line, as each line ends, each
prefixed with the plugin and the request id (``install.sh plugin=sinks/influx
request_id=<id> | <line>``): a script cannot write a line that passes for the
service's own. At most LOG_CHARS characters and LOG_LINES lines go there: the
first as they come, then, once the script has ended, the last lines of what
did not fit (`_OutputLog`).

Confinement: the script runs in a PID namespace of its own, made by
util-linux's ``unshare --pid --fork --kill-child --mount-proc``. PID 1 of that namespace is
a tiny init (``_INIT``, run by this Python) that starts the script, reaps
orphans and reports the script's wait status through a pipe. When the init
exits (the script has ended) or is killed (timeout, or unshare dying), the
kernel kills every other process in the namespace and the init is not gone
until they are: a descendant cannot escape by clearing its environment or
leaving the session. Whether this works here (root, or user namespaces for
anyone else) is probed once per process; where it does not, every install.sh
is refused, never run unconfined.

A second net stays: unshare starts its own session and process group, and
every run carries ``MARKER_ENV=<marker>`` in its environment. When the script
exits or overruns, its process group is killed, then every process still in
its session and every process on the machine whose environment still carries
the marker; we wait, bounded, until they are dead. ``kill_marked`` needs
nothing but ``/proc``, so start-up can clean up after a worker that was
killed while its script ran (killing the marked init ends its namespace).
"""

from __future__ import annotations

import logging
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kuiper_plugins.errors import InvalidRequest, ScriptFailed
from kuiper_plugins.lifecycle import progress
from kuiper_plugins.lifecycle.audit import current_request_id

log = logging.getLogger(__name__)

MARKER_ENV = "KUIPER_PLUGINS_OPERATION"
SCRIPT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SHELL_PARAS = 32
OUTPUT_LIMIT = 64 * 1024  # bytes of output kept (the last ones)
TAIL_LINES = 20  # lines of output quoted in an error message
TAIL_CHARS = 2048  # characters of output quoted in an error message, at most
LOG_CHARS = 8192  # characters of output written to the log, at most
LOG_LINES = 200  # lines of output written to the log, at most
LOG_LINE_CHARS = 1024  # characters of one line written to the log, at most (a longer one is cut)

_READ_SIZE = 64 * 1024
_POLL_INTERVAL = 0.05  # how often to look for the script's exit when pidfds are unavailable
_DRAIN_QUIET = 0.2  # after the script exited: stop reading once the pipe is quiet this long
_DRAIN_LIMIT = 2.0  # ... or after this long in any case
_REAP_TIMEOUT = 10.0  # waiting for a SIGKILLed script to be reapable
_DEATH_WAIT = 5.0  # kill_marked waits this long, at most, for its targets to die
_KILL_ROUNDS = 100  # kill_marked rescans until a scan finds nobody new, at most this often
_ANCESTRY_LIMIT = 4096
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_PROBE_TIMEOUT = 10.0  # seconds the one-off confinement probe may take
_STATUS_LIMIT = 64  # bytes of the init's status report read, at most

# unshare's options, tried in this order: a PID namespace needs CAP_SYS_ADMIN (root), or a user namespace of
# its own, mapping the service's user to itself, for anyone else. --mount-proc (a private mount namespace
# with its own /proc) lets the script's $$ and /proc agree; where /proc cannot be mounted (some containers)
# the namespace still confines, with the host's /proc in view.
_KILL_TREE = ("--pid", "--fork", "--kill-child")
UNSHARE_OPTIONS = (
    (*_KILL_TREE, "--mount-proc"),
    ("--user", "--map-current-user", *_KILL_TREE, "--mount-proc"),
    _KILL_TREE,
    ("--user", "--map-current-user", *_KILL_TREE),
)

# PID 1 of the script's namespace, run as `python -I -S -c _INIT <status fd> /bin/sh install.sh args...`.
# It must not be the script itself: the kernel drops signals a namespace's init gets from inside it, so a
# script's `kill $$` would do nothing, and a shell reaps orphans only while it waits. The child restores
# the signal dispositions Python changed (ignored ones survive exec). The wait status goes to the pipe,
# because an exit code cannot tell `exit 137` from a SIGKILL. (_signal, not signal: enum costs 5 ms to import.)
_INIT = """\
import _signal, os, sys
status_fd = int(sys.argv[1])
argv = sys.argv[2:]
for number in (_signal.SIGINT, _signal.SIGPIPE, _signal.SIGXFSZ):
    _signal.signal(number, _signal.SIG_DFL)
script = os.fork()
if script == 0:
    os.close(status_fd)
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        os.write(2, f"cannot run {argv[0]}: {exc.strerror}\\n".encode())
    os._exit(127)
while True:
    pid, status = os.wait()
    if pid == script:
        break
os.write(status_fd, str(status).encode())
os._exit(os.waitstatus_to_exitcode(status) & 255)
"""


@dataclass(frozen=True)
class Confinement:
    """How install.sh is confined on this machine: the command put before it, or why there is none."""

    command: tuple[str, ...]  # e.g. ("/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--"); () if none
    description: str  # the mechanism, or the reason there is none

    @property
    def available(self) -> bool:
        return bool(self.command)


def probe_confinement(unshare: str = "unshare") -> Confinement:
    """Find out whether `unshare` can put a process in a new PID namespace here; try each of UNSHARE_OPTIONS.

    `unshare` is a command name (looked up in the scripts' PATH) or a path. Runs a few short processes.
    """
    path = unshare if os.sep in unshare else shutil.which(unshare, path=SCRIPT_PATH)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return Confinement((), f"util-linux's unshare was not found ({unshare} is not an executable file)")
    try:
        own = os.readlink("/proc/self/ns/pid")
    except OSError as exc:
        return Confinement((), f"this kernel shows no PID namespaces (/proc/self/ns/pid: {exc.strerror})")
    failures = []
    for options in UNSHARE_OPTIONS:
        command = (path, *options, "--")
        try:
            done = subprocess.run(
                [*command, "readlink", "/proc/self/ns/pid"],
                stdin=subprocess.DEVNULL, capture_output=True, env={"PATH": SCRIPT_PATH, "LC_ALL": "C"},
                timeout=_PROBE_TIMEOUT, start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failures.append(f"{' '.join(options)}: {exc}")
            continue
        seen = done.stdout.decode(errors="replace").strip()
        if done.returncode == 0 and seen.startswith("pid:") and seen != own:
            return Confinement(command, f"a PID namespace of its own ({' '.join(command[:-1])})")
        problem = _sanitize(done.stderr.decode(errors="replace")).strip().splitlines()
        failures.append(f"{' '.join(options)}: {problem[-1] if problem else f'exit status {done.returncode}'}")
    return Confinement((), f"{path} cannot make a PID namespace here ({'; '.join(failures)})")


_probe_lock = threading.Lock()
_probed: dict[int, Confinement] = {}  # this process's pid -> its probe's result (a forked child probes again)


def confinement() -> Confinement:
    """Return this machine's confinement for install.sh, probed once per process and logged when probed."""
    pid = os.getpid()
    with _probe_lock:
        found = _probed.get(pid)
        if found is None:
            found = probe_confinement()
            _probed.clear()
            _probed[pid] = found
            if found.available:
                log.info("install.sh will run in %s", found.description)
            else:
                log.warning("packages with an install.sh will be refused: %s", found.description)
    return found


def require_confinement(confined: Confinement | None = None) -> Confinement:
    """Return `confined` (by default this machine's); raise ScriptFailed if install.sh cannot be confined."""
    confined = confined if confined is not None else confinement()
    if not confined.available:
        raise ScriptFailed(
            "install.sh is refused: this machine cannot end every process it starts"
            f" (needs a PID namespace: {confined.description})"
        )
    return confined


def check_shell_paras(paras: Sequence[str]) -> None:
    """Refuse (InvalidRequest) parameters that cannot be passed to install.sh as they are."""
    if isinstance(paras, str | bytes) or not isinstance(paras, Sequence):
        raise InvalidRequest("shellParas must be a list of strings")
    if len(paras) > MAX_SHELL_PARAS:
        raise InvalidRequest(f"shellParas has {len(paras)} items; at most {MAX_SHELL_PARAS} are allowed")
    for index, para in enumerate(paras):
        if not isinstance(para, str):
            raise InvalidRequest(f"shellParas[{index}] must be a string, not {type(para).__name__}")
        if "\0" in para:
            raise InvalidRequest(f"shellParas[{index}] contains a NUL character")
        try:
            para.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from JSON: exec would fail with an encoding error, a 500.
            raise InvalidRequest(f"shellParas[{index}] is not valid Unicode text")


# What a portable plugin's install.sh gets from the service's environment, as eKuiper's runs with its own
# environment: the proxy settings a `pip install` needs, and the language.
PORTABLE_PASSED_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "LANG")


def run_install_script(
    script: Path, args: Sequence[str], *, cwd: Path, timeout: float, marker: str,
    confined: Confinement | None = None, passed_env: Mapping[str, str] | None = None, plugin: str | None = None,
) -> str:
    """Run `/bin/sh script args...` in cwd and return the last 64 KiB of its output (stdout and stderr).

    The script runs in `confined` (by default this machine's confinement, see `confinement`); without one,
    raise ScriptFailed before anything runs. The output is decoded as UTF-8 with control characters
    removed. Raise ScriptFailed when the script exits non-zero, is killed by a signal, overruns `timeout`
    seconds, or cannot be started. Whatever the outcome, no process it started is left running.
    `passed_env` adds variables to the otherwise scrubbed environment (see PORTABLE_PASSED_ENV).
    `plugin` (e.g. ``sinks/influx``) prefixes each line of output in the log, with the request's id.
    """
    check_shell_paras(args)
    _marker_entry(marker)
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    confined = require_confinement(confined)
    workdir = os.path.abspath(cwd)
    env = {
        "PATH": SCRIPT_PATH,
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": workdir,
        MARKER_ENV: marker,
    }
    if passed_env:
        env.update(passed_env)
        if "LANG" in passed_env:
            del env["LC_ALL"]  # the passed language applies
    log.info("running %s in %s with %d parameter(s), timeout %g s", script, workdir, len(args), timeout)
    progress.phase("install.sh")
    started = time.monotonic()
    status_read, status_write = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [*confined.command, sys.executable, "-I", "-S", "-c", _INIT, str(status_write),
                 "/bin/sh", str(script), *args],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(status_write,),
            )
        except OSError as exc:
            raise ScriptFailed(f"install.sh could not be started: {exc.strerror or exc}")
        finally:
            os.close(status_write)

        output = _OutputTail(OUTPUT_LIMIT, _OutputLog(plugin or "-", current_request_id.get() or "-"))
        finished = False
        with proc.stdout:
            fd = proc.stdout.fileno()
            os.set_blocking(fd, False)
            try:
                finished = _read_until_exit(proc.pid, fd, output, started + timeout)
            finally:
                # unshare is a zombie (or still running, on timeout or error): its group id cannot have been
                # reused yet, so the group kill hits only what it started. Killing the init, which is in that
                # group, ends the namespace; the scans below wait for it to be empty.
                leftovers = _kill_leftovers(proc.pid, marker)
                unshare_status = _reap(proc)
            # Whatever is still in the pipe was written before the kills; a holder that escaped them must
            # not keep us here, hence the bounded drain rather than a wait for EOF.
            _drain(fd, output)
        # The init wrote the script's wait status before it exited, and unshare outlived the init.
        returncode = _read_status(status_read)
    finally:
        os.close(status_read)
    elapsed = time.monotonic() - started

    text = _sanitize(output.text())
    if not finished:
        outcome = "was killed at its timeout"
    elif unshare_status is None:
        outcome = "could not be reaped"
    elif returncode is None:
        unshare_outcome = _describe_status(unshare_status)
        outcome = f"left no exit status (unshare {unshare_outcome})"
    else:
        outcome = _describe_status(returncode)
    output.lines.finish(output.tail())
    log.info(
        "%s %s after %.1f s (%d leftover process(es) killed); %d bytes of output, %d line(s) of it logged above",
        script,
        outcome,
        elapsed,
        leftovers,
        output.total,
        output.lines.logged,
    )

    tail = _tail(text)
    if not finished:
        raise ScriptFailed(f"install.sh did not finish within {timeout:g} seconds and was killed: {tail}")
    if unshare_status is None:
        raise ScriptFailed(f"install.sh could not be reaped after it was killed: {tail}")
    if returncode is None:
        raise ScriptFailed(f"install.sh ended without an exit status (unshare {unshare_outcome}): {tail}")
    if returncode < 0:
        number = -returncode
        raise ScriptFailed(f"install.sh was killed by signal {number} ({_signal_name(number)}): {tail}")
    if returncode > 0:
        raise ScriptFailed(f"install.sh failed with exit status {returncode}: {tail}")
    return text


def _read_status(fd: int) -> int | None:
    """The script's exit code (negative: killed by that signal) as the init reported it; None if it did not."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, _STATUS_LIMIT)
    except BlockingIOError:
        return None
    try:
        return os.waitstatus_to_exitcode(int(data))
    except ValueError:
        return None


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with status {returncode}"


def kill_marked(marker: str) -> int:
    """SIGKILL every process on this machine whose environment carries MARKER_ENV=marker; return how many.

    Reads only /proc, never in-memory state. Spares this process and its ancestors. Waits (briefly,
    bounded) for the targets to die, so a scan right after finds none of them.
    """
    entry = _marker_entry(marker)
    count = _kill_where(lambda pid: _carries(pid, entry))
    if count:
        log.info("killed %d process(es) marked %s=%s", count, MARKER_ENV, marker)
    return count


def _kill_where(matches: Callable[[int], bool]) -> int:
    """SIGKILL every process (but us and our ancestors) that `matches`; wait for them to die; count them."""
    spared = _self_and_ancestors()
    killed: set[int] = set()
    # A target may fork between the scan and the kill; its child shows up in the next scan.
    for _ in range(_KILL_ROUNDS):
        found = [pid for pid in _all_pids() if pid not in spared and matches(pid)]
        if not any(pid not in killed for pid in found):
            break
        pidfds = []
        for pid in found:
            hit, pidfd = _kill(pid, matches)
            if hit:
                killed.add(pid)
            if pidfd is not None:
                pidfds.append(pidfd)
        _await_exit(pidfds)
    return len(killed)


class _OutputLog:
    """install.sh's output in the log: one record per line, prefixed with the plugin and the request id.

    Lines are logged as they end while they fit in LOG_CHARS - TAIL_CHARS characters and LOG_LINES -
    TAIL_LINES lines. Past that, output is only counted (a script may write 100 MB: no line of it is looked
    at), and `finish` logs the last TAIL_LINES lines of what was not logged (TAIL_CHARS characters at most),
    taken from the output's kept tail, after a line saying how many were left out. So the log gets at most
    LOG_CHARS characters and LOG_LINES lines of output: the start as it came, and the end a failure quotes.
    """

    def __init__(self, plugin: str, request_id: str):
        self.plugin = plugin
        self.request_id = request_id
        self.seen = 0  # bytes of output so far
        self.line_start = 0  # where the line being written began, in the output
        self.pending = bytearray()  # that line, its first LOG_LINE_CHARS bytes
        self.cut = False  # the line being written is longer: the rest of it is dropped
        self.chars_left = LOG_CHARS - TAIL_CHARS
        self.lines_left = LOG_LINES - TAIL_LINES
        self.live_end: int | None = None  # where logging as it comes stopped, in the output
        self.newlines_after = 0  # line ends from live_end on
        self.logged = 0

    def add(self, data: bytes) -> None:
        """Take output as it comes; log each line it ends while they fit."""
        if self.live_end is not None:
            self.newlines_after += data.count(b"\n")
            self.seen += len(data)
            return
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._take(data[start:end])
            text = self._text(bytes(self.pending), self.cut)
            if not self._fits(text):
                self.live_end = self.line_start
                self.newlines_after = 1 + data.count(b"\n", end + 1)
                self.seen += len(data)
                return
            self._log(text)
            self.pending.clear()
            self.cut = False
            self.line_start = self.seen + end + 1
            start = end + 1
        self._take(data[start:])
        self.seen += len(data)

    def finish(self, tail: bytes) -> None:
        """Log the unended last line, or the last lines of what did not fit; `tail`: the output's last bytes."""
        if self.live_end is None:
            if not self.pending:
                return
            text = self._text(bytes(self.pending), self.cut)
            if self._fits(text):
                self._log(text)
                return
            self.live_end = self.line_start
        begin = max(self.live_end, self.seen - len(tail))
        lines = tail[len(tail) - (self.seen - begin):].split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the output ended with its last line's end
        left = self.newlines_after + (1 if self.seen > self.live_end and tail[-1:] != b"\n" else 0)
        shown = [self._text(line[:LOG_LINE_CHARS], len(line) > LOG_LINE_CHARS) for line in lines[-TAIL_LINES:]]
        while sum(len(text) for text in shown) > TAIL_CHARS:
            shown.pop(0)
        if left > len(shown):
            log.info("install.sh plugin=%s request_id=%s | (%d line(s) not logged)", self.plugin, self.request_id,
                     left - len(shown), extra={"request_id": ""})
        for text in shown:
            self._log(text)

    def _take(self, piece: bytes) -> None:
        room = LOG_LINE_CHARS - len(self.pending)
        if len(piece) > room:
            piece, self.cut = piece[:max(room, 0)], True
        self.pending += piece

    def _fits(self, text: str) -> bool:
        if len(text) > self.chars_left or self.lines_left <= 0:
            return False
        self.chars_left -= len(text)
        self.lines_left -= 1
        return True

    @staticmethod
    def _text(raw: bytes, cut: bool) -> str:
        return _sanitize(raw.decode("utf-8", errors="replace"))[:LOG_LINE_CHARS] + ("..." if cut else "")

    def _log(self, text: str) -> None:
        self.logged += 1
        log.info("install.sh plugin=%s request_id=%s | %s", self.plugin, self.request_id, text,
                 extra={"request_id": ""})  # named in the message already


class _OutputTail:
    """The last `limit` bytes written to it, kept as a queue of chunks; counts every byte seen.

    Each chunk also goes to `lines`, which logs it line by line.
    """

    def __init__(self, limit: int, lines: _OutputLog | None = None):
        self.limit = limit
        self.lines = lines or _OutputLog("-", "-")
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.total = 0

    def add(self, data: bytes) -> None:
        self.lines.add(data)
        self.chunks.append(data)
        self.size += len(data)
        self.total += len(data)
        while len(self.chunks) > 1 and self.size - len(self.chunks[0]) >= self.limit:
            self.size -= len(self.chunks.popleft())

    def tail(self) -> bytes:
        """The last `limit` bytes (or all, when fewer came)."""
        return b"".join(self.chunks)[-self.limit :]

    def text(self) -> str:
        data = self.tail()
        if self.total > len(data):
            # The cut may have split a character: drop its continuation bytes.
            skip = 0
            while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", errors="replace")


def _read_until_exit(pid: int, fd: int, output: _OutputTail, deadline: float) -> bool:
    """Collect output until the process exits (True, left unreaped) or the deadline passes (False)."""
    pidfd = _pidfd(pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            while not _has_exited(pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if pidfd is None:
                    remaining = min(remaining, _POLL_INTERVAL)
                for key, _ in selector.select(remaining):
                    if key.fd == fd and not _read_into(fd, output):
                        selector.unregister(fd)  # the script closed its output; keep waiting for its exit
            return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _drain(fd: int, output: _OutputTail) -> None:
    """Read what is left in the pipe until EOF, a quiet spell, or a short limit."""
    stop = time.monotonic() + _DRAIN_LIMIT
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = min(_DRAIN_QUIET, stop - time.monotonic())
            if remaining <= 0 or not selector.select(remaining):
                return
            if not _read_into(fd, output):
                return


def _read_into(fd: int, output: _OutputTail) -> bool:
    """Read one chunk into output; False at EOF."""
    try:
        data = os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return True
    if not data:
        return False
    output.add(data)
    return True


def _has_exited(pid: int) -> bool:
    """Whether our child has exited, without reaping it."""
    try:
        status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return status is not None


def _kill_leftovers(leader: int, marker: str) -> int:
    """SIGKILL the script's process group, then whatever is left in its session or carries its marker.

    `leader` is the unreaped script: its pid is also the group and session id, none reusable yet.
    """
    try:
        # One atomic signal first: a forking group cannot outrun it.
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    entry = _marker_entry(marker)
    return _kill_where(lambda pid: _in_session(pid, leader) or _carries(pid, entry))


def _reap(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("install.sh (pid %d) did not die within %g s of SIGKILL", proc.pid, _REAP_TIMEOUT)
        return None


def _marker_entry(marker: str) -> bytes:
    """The exact environ entry a marked process carries; ValueError for a marker that cannot be one."""
    if not isinstance(marker, str) or not marker or "\0" in marker:
        raise ValueError(f"invalid process marker {marker!r}")
    return os.fsencode(f"{MARKER_ENV}={marker}")


def _all_pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError as exc:
        log.warning("cannot list /proc to find processes to kill: %s", exc)
        return []
    return [int(name) for name in names if name.isdigit()]


def _carries(pid: int, entry: bytes) -> bool:
    """Whether the process's environment holds exactly `entry`; False if gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            data = environ.read()
    except OSError:
        return False
    return entry in data and entry in data.split(b"\0")


def _in_session(pid: int, sid: int) -> bool:
    """Whether pid is a live (not zombie) member of session sid."""
    fields = _stat_fields(pid)
    return len(fields) > 3 and fields[0] != b"Z" and fields[3] == str(sid).encode()


def _kill(pid: int, matches: Callable[[int], bool]) -> tuple[bool, int | None]:
    """SIGKILL pid if it still matches; return whether it was hit and a pidfd to await its death."""
    pidfd = _pidfd(pid)
    try:
        # With the process pinned by its pidfd, check again: the pid may have been reused since the scan.
        if matches(pid):
            if pidfd is None:
                os.kill(pid, signal.SIGKILL)
            else:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return True, pidfd
    except (ProcessLookupError, PermissionError):
        pass
    if pidfd is not None:
        os.close(pidfd)
    return False, None


def _await_exit(pidfds: list[int]) -> None:
    """Wait, bounded, until every pidfd reports its process dead; close them all."""
    try:
        poller = select.poll()
        for pidfd in pidfds:
            poller.register(pidfd, select.POLLIN)
        pending = len(pidfds)
        stop = time.monotonic() + _DEATH_WAIT
        while pending:
            remaining = stop - time.monotonic()
            if remaining <= 0:
                log.warning("%d killed process(es) still alive after %g s", pending, _DEATH_WAIT)
                return
            for pidfd, _ in poller.poll(remaining * 1000):
                poller.unregister(pidfd)
                pending -= 1
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd for pid, or None when it is gone or the kernel has none (or we ran out of descriptors)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _self_and_ancestors() -> set[int]:
    spared = {1, os.getpid()}
    pid = os.getppid()
    for _ in range(_ANCESTRY_LIMIT):
        if pid <= 0 or pid in spared:
            break
        spared.add(pid)
        pid = _parent_of(pid)
    return spared


def _parent_of(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...; [] if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name may hold spaces and parentheses; the fields after the last ")" do not.
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _sanitize(text: str) -> str:
    """Remove terminal escapes and control characters other than newline and tab."""
    text = text.replace("\r\n", "\n")
    return _CONTROL_CHARS.sub("", _ANSI_ESCAPE.sub("", text))


def _tail(text: str) -> str:
    """The last lines of output, for an error message."""
    lines = text.rstrip().splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:] or "(no output)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "an unknown signal"
