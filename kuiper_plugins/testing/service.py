"""The real service for tests: gunicorn with the service's own config, on a free loopback port and a home of its own.

`Gunicorn` starts `gunicorn -c <config> <app>` as production does, waits (bounded) until every worker has
built the app, and stops it with SIGTERM (gunicorn's graceful stop), then SIGKILL if it hangs. The config is
the one `make run` uses: `etc/gunicorn.conf.py` of a source tree, shipped in the package as
`kuiper_plugins/testing/gunicorn.conf.py` (a link to it in the tree, a copy in a built wheel), since etc/ is
not part of the installed package; the app is `create_app()` of the installed package. Settings reach the
service as in production, through KUIPER_HOME and KUIPER_PLUGINS__SECTION__KEY variables.

`Services` is what a fixture hands a test: it starts services on one home, stops them all at the end of
the test, and then fails the test if the log holds a traceback (a 500 is a bug, never an answer).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

GUNICORN_CONFIG = Path(__file__).resolve().parent / "gunicorn.conf.py"
APP = "kuiper_plugins:create_app()"
START_TIMEOUT = 30
STOP_TIMEOUT = 30

# What each worker logs once it has built the app.
_SERVING = re.compile(r"\[(\d+)\] \[INFO\] kuiper_plugins\.app: .* serving KUIPER_HOME")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command() -> Path:
    """The gunicorn script of this Python's environment; fail the test, saying what to install, without it."""
    import pytest

    script = Path(sys.executable).parent / "gunicorn"
    if not script.exists():
        pytest.fail(f"kuiper_plugins.testing runs the service under gunicorn, and {script} is missing: install it "
                    "in this environment (pip install 'kuiper-plugins[testing]')", pytrace=False)
    return script


class Gunicorn:
    """A real `gunicorn -c <config> <app>` serving kuiper-plugins on a free loopback port."""

    def __init__(self, home: Path, log_path: Path, workers: int = 2, env: Mapping[str, str] | None = None, *,
                 config: Path = GUNICORN_CONFIG, app: str = APP, cwd: Path | None = None):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.config = config
        self.app = app
        self.cwd = cwd or log_path.parent
        self.env = {
            # The service's settings and folders come from this test alone, never from the environment
            # pytest runs in: a KUIPER_ETC_DIR or KUIPER_PLUGINS__* there could point it at a real installation.
            **{key: value for key, value in os.environ.items() if not key.upper().startswith("KUIPER")},
            "KUIPER_HOME": str(home),
            "KUIPER_PLUGINS__BASIC__RESTPORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Gunicorn:
        """Start gunicorn and wait (bounded) until every worker serves; fail with the log's end if it does not."""
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(gunicorn_command()), "-c", str(self.config), self.app],
            cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}: {self.log()}")
            try:
                # Until a worker has booted a request just waits: give it a while on a busy 2-core box.
                if requests.get(f"{self.url}/ping", timeout=5).status_code == 200:
                    # Every worker, not just the one that answered: a test that keeps some busy (a held
                    # lock, a stop) must not find the others still in their start-up recovery.
                    self.workers_booted()
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.05)  # polling for readiness, bounded by the deadline
        raise AssertionError(f"gunicorn did not answer within {START_TIMEOUT}s: {self.log()}")

    def stop(self) -> None:
        """SIGTERM (gunicorn's graceful stop), SIGKILL after STOP_TIMEOUT; the log names who did not stop."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Say who did not stop, and where each was waiting, in the log a failing test shows.
                self._log.write(f"\n[test] no graceful stop within {STOP_TIMEOUT} s; still running: "
                                f"{self._group()}\n".encode())
                self._log.flush()
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()

    def _group(self) -> str:
        """The processes left in gunicorn's process group: pid, state, kernel wait channel and command."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "status", "cmdline"]):
            try:
                if os.getpgid(proc.info["pid"]) != self.process.pid:
                    continue
                wchan = Path(f"/proc/{proc.info['pid']}/wchan").read_text()
            except OSError:
                continue
            found.append(f"{proc.info['pid']} {proc.info['status']} wchan={wchan or '-'} "
                         f"{' '.join(proc.info['cmdline'] or [])[:120]}")
        return "; ".join(found) or "none"

    def log(self) -> str:
        """The end of gunicorn's log (its output and the service's)."""
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        """The master's exit status, once it has exited; fail with the end of its log if it does not."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn did not exit within {timeout:g}s:\n{self.log()}") from None

    def workers_booted(self) -> list[int]:
        """Wait until every worker the master has now has built the app (it logs `serving KUIPER_HOME`).

        The first /ping proves one worker is up; another may still be in its start-up recovery. `start`
        waits for this; a test that has workers replaced asks again.
        """
        import psutil

        master = psutil.Process(self.process.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            workers = {child.pid for child in master.children()}
            text = self.log_path.read_text(errors="replace")
            served = {int(pid) for pid in _SERVING.findall(text)}
            if len(workers) == int(self.env["WEB_CONCURRENCY"]) and workers <= served:
                return sorted(workers)
            time.sleep(0.02)  # polling the log for the workers' start-up line, bounded by the deadline
        raise AssertionError(f"the workers did not all boot within {START_TIMEOUT}s: {self.log()}")


class Services:
    """The services one test starts on one home, all logging to one file; `stop_all` ends them at its end."""

    def __init__(self, home: Path, log_path: Path, defaults: Mapping[str, str] | None = None,
                 gunicorn: type[Gunicorn] = Gunicorn):
        self.home = home
        self.log_path = log_path
        self.defaults = dict(defaults or {})
        self.gunicorn = gunicorn
        self.started: list[Gunicorn] = []

    def start(self, workers: int = 2, **env: str) -> Gunicorn:
        """Start a service with `workers` workers; `env` (KUIPER_PLUGINS__SECTION__KEY=...) overrides settings."""
        server = self.gunicorn(self.home, self.log_path, workers, {**self.defaults, **env})
        self.started.append(server)  # stopped at the end even when it fails to start
        return server.start()

    def stop_all(self) -> None:
        """Stop every service started; then fail if the log holds a traceback (a 500 is a bug, not an answer)."""
        for server in self.started:
            server.stop()
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        assert "Traceback" not in log, log[-4000:]
