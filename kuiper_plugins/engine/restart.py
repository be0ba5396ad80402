"""Restarting the managed engine after `DELETE ...?stop=1`: `engine.restartCommand`, run once, bounded.

The command is an argument list (never a shell string), run in its own
session with stdin closed, after the response has gone out, in a thread of
its own so that the worker goes on serving. Its outcome and the last lines
of its output are logged; at `engine.restartTimeout` it and everything in
its process group are killed.

The command gets the environment a clean start of the service would have:
this process's, minus what configures this service (its ``KUIPER_PLUGINS*``
settings and variables, its folder variables), what gunicorn or systemd
handed to this service alone, and eKuiper's ``KUIPER__*`` variables. Those
are the engine's own, and this service reads them only to learn where the
engine listens; the engine the command starts takes them from its own unit or
environment file, never from this service's (until the service read them as
its own settings, a script that started kuiperd directly gave the engine the
service's ``basic.restPort``, and the engine failed to bind a port that was
taken). ``KuiperBaseKey`` stays: it is eKuiper's own, and names the
installation both of them work on.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

OUTPUT_TAIL = 2048  # characters of the command's output kept for the log

# Variables that configure this service: its settings (KUIPER_PLUGINS__SECTION__KEY) and other KUIPER_PLUGINS_*
# variables (log level, timeouts, the CLI's URL and token, the plugins folder), and gunicorn's
# (GUNICORN_CMD_ARGS, and the GUNICORN_FD and GUNICORN_PID of a re-exec). And eKuiper's KUIPER__*: the engine's
# own, which an engine the command starts must get from its own unit, not from this service's environment.
SERVICE_PREFIXES = ("KUIPER__", "KUIPER_PLUGINS", "GUNICORN_")
SERVICE_VARIABLES = frozenset({
    "KUIPER_HOME", "KUIPER_ETC_DIR", "KUIPER_DATA_DIR",  # this service's folders (eKuiper reads KuiperBaseKey)
    "WEB_CONCURRENCY",  # gunicorn's worker count
    "SERVER_SOFTWARE",  # set by gunicorn's arbiter: a child would think it runs under a web server
    # Handed to this service's process alone: its listening sockets (by systemd, or by gunicorn to the
    # master it re-executes) and its line to systemd's notification socket and watchdog.
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC",
})


def restart_in_background(command: Sequence[str], timeout: float) -> threading.Thread:
    """Start running the restart command in a thread; return the thread (tests join it)."""
    thread = threading.Thread(target=run_restart_command, args=(tuple(command), timeout), name="engine-restart",
                              daemon=True)
    thread.start()
    return thread


def run_restart_command(command: Sequence[str], timeout: float) -> int | None:
    """Run the command once and log its outcome; return its exit status (None when it could not run)."""
    log.warning("restarting the engine as a delete with stop=1 asked: %s", " ".join(command))
    try:
        process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=restart_environment(os.environ),
        )
    except OSError as exc:
        log.error("engine.restartCommand could not be started: %s", exc)
        return None
    output, finished = _read_tail(process, timeout)
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()
        process.wait()
        log.error("engine.restartCommand did not finish within %g s and was killed; its output ended with: %s",
                  timeout, _tail(output))
        return None
    tail = _tail(output)
    if process.returncode == 0:
        log.info("engine.restartCommand finished (exit status 0)%s", f": {tail}" if tail else "")
    else:
        log.error("engine.restartCommand failed with exit status %d: %s", process.returncode, tail)
    return process.returncode


def restart_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return `environ` without the variables that configure this service (see SERVICE_PREFIXES)."""
    return {
        name: value for name, value in environ.items()
        if not name.upper().startswith(SERVICE_PREFIXES) and name.upper() not in SERVICE_VARIABLES
    }


def _read_tail(process: subprocess.Popen, timeout: float) -> tuple[bytes, bool]:
    """Read the command's output until it ends, keeping the last OUTPUT_TAIL bytes; (tail, whether it ended).

    A command that keeps writing (one that runs the engine in the foreground, say) costs no more memory
    than the tail: every read of a child's output is bounded.
    """
    deadline = time.monotonic() + timeout
    kept = bytearray()
    fd = process.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(kept), False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        kept += chunk
        del kept[:-OUTPUT_TAIL]
    process.stdout.close()
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # it closed its output but goes on
        return bytes(kept), False
    return bytes(kept), True


def _tail(output: bytes | None) -> str:
    return (output or b"").decode("utf-8", "replace").strip()[-OUTPUT_TAIL:]
