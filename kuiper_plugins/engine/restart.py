"""Restarting the managed engine after `DELETE ...?stop=1`: `engine.restartCommand`, run once, bounded.

The command is an argument list (never a shell string), run in its own
session with stdin closed, after the response has gone out, in a thread of
its own so that the worker goes on serving. Its outcome and the last lines
of its output are logged; at `engine.restartTimeout` it and everything in
its process group are killed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

OUTPUT_TAIL = 2048  # characters of the command's output kept for the log


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
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        log.error("engine.restartCommand could not be started: %s", exc)
        return None
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        log.error("engine.restartCommand did not finish within %g s and was killed; its output ended with: %s",
                  timeout, _tail(output))
        return None
    tail = _tail(output)
    if process.returncode == 0:
        log.info("engine.restartCommand finished (exit status 0)%s", f": {tail}" if tail else "")
    else:
        log.error("engine.restartCommand failed with exit status %d: %s", process.returncode, tail)
    return process.returncode


def _tail(output: bytes | None) -> str:
    return (output or b"").decode("utf-8", "replace").strip()[-OUTPUT_TAIL:]
