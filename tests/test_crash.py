"""Crash safety end to end: the real gunicorn with 4 workers, real SIGKILLs, at each stage of an install.

Each install is held at a known stage by design, never by guessing with sleeps:
- download: a loopback route sends the headers and half the body, then stalls until the test releases it;
- extraction: strace, attached to the worker, stops it (SIGSTOP) at its second write into a big archive
  member, so the member is half written when the kill comes;
- install.sh: the script tells the test it runs through one FIFO, then blocks reading another;
- between moving the files and the commit: the test holds `BEGIN IMMEDIATE` on the registry, so the
  commit waits on its busy timeout once every file is in place; the test sees the files, then kills.
After the kill (of the worker alone, or of master and workers with killpg) and a restart, the old
state must be back exactly: nothing listed, no file under plugins/, etc/ or data/ that was not there,
no staging debris, no install.sh process alive, the registry dump unchanged; then the same install
succeeds. Also here: updates killed midway, graceful and quick shutdown, and the worker timeout.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import select
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import REPO, disk_state, make_zip, registry_dump

from kuiper_plugins.install.scripts import MARKER_ENV
from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

WAIT = 30  # seconds any awaited condition may take before the test fails
WORKERS = 4


# ---------------------------------------------------------------------------- the service under test


# ---------------------------------------------------------------------------- holding an install by design


def wait_for(condition, what: str, timeout: float = WAIT):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)  # polling a condition nothing can notify us of, bounded by the deadline


class ScriptGate:
    """An install.sh that says it started through one FIFO, then blocks until the test writes to another.

    The test keeps both FIFOs open read-write, so neither side's open ever blocks, and a release
    written before the script runs lets it pass straight through.
    """

    def __init__(self, folder: Path, tag: str = "gate"):
        self.ready_path = folder / f"{tag}-ready"
        self.hold_path = folder / f"{tag}-hold"
        os.mkfifo(self.ready_path)
        os.mkfifo(self.hold_path)
        self._ready = os.open(self.ready_path, os.O_RDWR | os.O_NONBLOCK)
        self._hold = os.open(self.hold_path, os.O_RDWR | os.O_NONBLOCK)

    @property
    def script(self) -> str:
        return (
            f"exec 3<>'{self.hold_path}'\n"
            f"echo started > '{self.ready_path}'\n"
            "read answer <&3\n"
            'echo "released: $answer"\n'
        )

    def wait_started(self) -> None:
        poller = select.poll()
        poller.register(self._ready, select.POLLIN)
        assert poller.poll(WAIT * 1000), "install.sh did not start"
        assert b"started" in os.read(self._ready, 4096)

    def release(self) -> None:
        os.write(self._hold, b"go\n")

    def close(self) -> None:
        os.close(self._ready)
        os.close(self._hold)


class StalledRoute:
    """A loopback route that sends the headers and half the body, then stalls until released."""

    def __init__(self, file_server, path: str, body: bytes):
        self.body = body
        self.mid_body = threading.Event()
        self.released = threading.Event()
        file_server.routes[f"/{path}"] = self._answer
        self.url = file_server.url(path)

    def _answer(self, handler) -> None:
        half = len(self.body) // 2
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/zip")
            handler.send_header("Content-Length", str(len(self.body)))
            handler.end_headers()
            handler.wfile.write(self.body[:half])
            handler.wfile.flush()
            self.mid_body.set()
            if self.released.wait(WAIT * 2):
                handler.wfile.write(self.body[half:])
        except OSError:
            pass  # the worker reading it was killed

    def wait_mid_body(self) -> None:
        assert self.mid_body.wait(WAIT), "the download did not start"


class RegistryHold:
    """An external BEGIN IMMEDIATE on the registry: every writer waits on its busy timeout meanwhile."""

    def __init__(self, home: Path):
        self.conn = sqlite3.connect(Layout(home).registry_file, isolation_level=None, timeout=WAIT)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


class ExtractionStop:
    """strace attached to a worker stops it (SIGSTOP) at its second write into one file being unpacked.

    strace writes what it sees of the worker to `log`: that it attached, the writes into that file
    it traced, and the stop.
    """

    def __init__(self, pid: int, member: Path, log: Path):
        self.pid = pid
        self.log = log
        with open(log, "wb") as stderr:
            self.strace = subprocess.Popen(
                ["strace", "-p", str(pid), "-e", "trace=write", "-e", "inject=write:signal=SIGSTOP:when=2",
                 "-P", str(member)],
                stderr=stderr,
            )
        # strace prints this once it has seized and interrupted the worker: from then on, it sees every write.
        wait_for(lambda: b"attached" in log.read_bytes(), "strace to attach")

    def wait_stopped(self) -> None:
        # strace reports the group-stop its SIGSTOP caused; a bare "t" state may be a passing syscall-stop.
        wait_for(lambda: b"stopped by SIGSTOP" in self.log.read_bytes(), "the worker to stop mid-extraction")
        assert process_state(self.pid) in ("t", "T")

    def finish(self) -> None:
        if self.strace.poll() is None:
            try:
                self.strace.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.strace.kill()
                self.strace.wait(timeout=WAIT)


class InFlight(threading.Thread):
    """One request sent from a thread, so the test can act while it runs."""

    def __init__(self, method: str, url: str, body: dict | None = None):
        super().__init__(daemon=True)
        self.method, self.url, self.body = method, url, body
        self.response: requests.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = requests.request(self.method, self.url, json=self.body, timeout=WAIT * 3)
        except requests.RequestException as exc:
            self.error = exc

    def outcome(self) -> requests.Response | Exception:
        self.join(WAIT * 3)
        assert not self.is_alive(), f"{self.method} {self.url} did not return"
        return self.response if self.response is not None else self.error


# ---------------------------------------------------------------------------- looking at the machine


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "gone"


def marked_processes(op_id: str) -> list[int]:
    """Live processes whose environment carries the operation's install.sh marker."""
    entry = f"{MARKER_ENV}={op_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def in_flight(home: Path) -> list[tuple[str, str, int]]:
    """(operation id, plugin name, worker pid) of each operation the registry shows in flight."""
    conn = sqlite3.connect(Layout(home).registry_file, timeout=WAIT)
    try:
        return [tuple(row) for row in conn.execute("SELECT id, name, pid FROM operations")]
    finally:
        conn.close()


def the_operation(home: Path) -> tuple[str, int]:
    """The one operation in flight: its id and its worker's pid."""
    rows = wait_for(lambda: in_flight(home), "the operation to be reserved")
    assert len(rows) == 1, rows
    op_id, _name, pid = rows[0]
    return op_id, pid


def recovered(home: Path) -> bool:
    """Nothing in flight, staging empty, and the plugin locks let go (a held lock is a file)."""
    layout = Layout(home)
    return not in_flight(home) and not any(layout.staging.iterdir()) and not any(layout.locks.glob("*.*.lock"))


def diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added={added} removed={removed} changed={changed}"


def assert_old_state(home: Path, server, before: tuple[dict, list[str]], op_id: str, name: str, old=None) -> None:
    """Exactly the state before the operation: files, registry, no staging, no script, the API agreeing."""
    disk, dump = before
    assert disk_state(home) == disk, diff(disk, disk_state(home))
    assert registry_dump(home) == dump
    assert list(Layout(home).staging.iterdir()) == []
    assert marked_processes(op_id) == []
    for _ in range(WORKERS):  # fresh connections: different workers
        listed = requests.get(f"{server.url}/plugins/sources", timeout=WAIT).json()
        described = requests.get(f"{server.url}/plugins/sources/{name}", timeout=WAIT)
        if old is None:
            assert name not in listed
            assert described.status_code == 404
        else:
            assert name in listed
            assert described.json() == old


# ---------------------------------------------------------------------------- packages


def payload(size: int) -> bytes:
    """Bytes that deflate well below the archive ratio limit: a random 16 KiB block repeated."""
    block = random.Random(size).randbytes(16 * 1024)
    return (block * (size // len(block) + 1))[:size]


def source_members(name: str, version: str = "v1.0.0", script: str | None = None,
                   extra: dict | None = None) -> dict:
    members = {
        f"{name[0].upper()}{name[1:]}@{version}.so": f"binary {version}\n" * 100,
        f"{name}.yaml": "default:\n  interval: 1000\n",
        f"{name}.json": json.dumps({"about": {"version": version}}),
        "etc/settings.conf": f"built for {version}\n",
    }
    if script is not None:
        members["install.sh"] = script
    members.update(extra or {})
    return members


def installed_paths(name: str, version: str = "v1.0.0") -> list[str]:
    paths = [f"plugins/sources/{name[0].upper()}{name[1:]}@{version}.so"]
    for folder in ("etc", "data"):
        paths += [f"{folder}/sources/{name}.yaml", f"{folder}/sources/{name}.json",
                  f"{folder}/sources/{name}/settings.conf"]
    return paths


def all_in_place(home: Path, present: list[str], absent: list[str] = ()) -> bool:
    return all((home / p).exists() for p in present) and not any((home / p).exists() for p in absent)


# ---------------------------------------------------------------------------- kill at each stage

STAGES = ["download", "extraction", "install.sh", "commit"]


class Stage:
    """Prepares the package for one stage, starts the install, holds it there, and lets go afterwards."""

    def __init__(self, stage: str, file_server, tmp_path: Path, home: Path, name: str = "random"):
        self.stage, self.home, self.name, self.tmp_path = stage, home, name, tmp_path
        self.gate = ScriptGate(tmp_path) if stage in ("install.sh", "commit") else None
        self.route = self.strace = self.registry_hold = None
        extra = {}
        if stage == "download":
            extra["payload.bin"] = random.Random(1).randbytes(3 << 20)  # incompressible: > 1 MiB on disk mid-body
        if stage == "extraction":
            extra["payload.bin"] = payload(4 << 20)
        script = self.gate.script if self.gate else None
        package = make_zip(tmp_path / "package.zip", source_members(name, script=script, extra=extra)).read_bytes()
        if stage in ("download", "extraction"):
            self.route = StalledRoute(file_server, "stalled/package.zip", package)
            self.url = self.route.url
        else:
            (file_server.root / "package.zip").write_bytes(package)
            self.url = file_server.url("package.zip")

    def hold(self, server) -> tuple[str, int]:
        """Start the install and return (operation id, worker pid) once it is held at the stage."""
        self.request = InFlight("POST", f"{server.url}/plugins/sources", {"name": self.name, "file": self.url})
        staging = Layout(self.home).staging
        if self.stage == "download":
            self.route.wait_mid_body()
            op_id, pid = the_operation(self.home)
            downloads = wait_for(lambda: [p for p in (staging / op_id).glob("download-*") if p.stat().st_size],
                                 "part of the body on disk")
            assert downloads[0].stat().st_size < len(self.route.body)
        elif self.stage == "extraction":
            self.route.wait_mid_body()
            op_id, pid = the_operation(self.home)
            member = staging / op_id / "unpacked" / "payload.bin"
            self.strace = ExtractionStop(pid, member, self.tmp_path / "strace.log")
            self.route.released.set()
            self.strace.wait_stopped()
            assert 0 < member.stat().st_size < 4 << 20, "the worker stopped mid-extraction"
        else:
            self.gate.wait_started()
            op_id, pid = the_operation(self.home)
            assert marked_processes(op_id), "install.sh runs"
            if self.stage == "commit":
                self.registry_hold = RegistryHold(self.home)
                self.gate.release()
                wait_for(lambda: all_in_place(self.home, installed_paths(self.name)), "every file moved in")
                assert self.name not in requests.get(f"{server.url}/plugins/sources", timeout=WAIT).json()
        return op_id, pid

    def let_go(self) -> None:
        """After the kill: the test holds nothing the restarted service needs, and retries pass straight through.

        A held install.sh stays blocked: killing it is recovery's job.
        """
        if self.registry_hold is not None:
            self.registry_hold.release()
        if self.route is not None:
            self.route.released.set()
        if self.strace is not None:
            self.strace.finish()

    def open_gate(self) -> None:
        if self.gate is not None:
            self.gate.release()

    def close(self) -> None:
        self.let_go()
        if self.gate is not None:
            self.gate.release()
            self.gate.close()


def kill(victim: str, server, pid: int) -> None:
    if victim == "worker":
        os.kill(pid, signal.SIGKILL)
    else:
        os.killpg(server.process.pid, signal.SIGKILL)  # master and workers; install.sh has its own session
        server.process.wait(timeout=WAIT)


@pytest.mark.parametrize("victim", ["worker", "service"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_at_any_stage_leaves_the_old_state(stage, victim, start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    held = Stage(stage, file_server, tmp_path, home)
    try:
        before = disk_state(home), registry_dump(home)
        op_id, pid = held.hold(server)
        kill(victim, server, pid)
        assert isinstance(held.request.outcome(), requests.ConnectionError)
        held.let_go()
        if victim == "service":
            if stage == "install.sh":
                assert marked_processes(op_id), "install.sh outlives the service (it has its own session)"
            server = start_gunicorn(workers=WORKERS)
        else:
            # gunicorn replaces the worker; the new one rolls the operation back before it serves.
            wait_for(lambda: recovered(home), "the replacement worker to roll the operation back")
        assert_old_state(home, server, before, op_id, "random")

        held.open_gate()
        again = requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": held.url},
                              timeout=WAIT)
        assert again.status_code == 201, again.text
        assert all_in_place(home, installed_paths("random"))
        assert requests.get(f"{server.url}/plugins/sources/random", timeout=WAIT).json() == {
            "name": "random", "version": "1.0.0"}
        assert list(Layout(home).staging.iterdir()) == []
    finally:
        held.close()


@pytest.mark.parametrize("stage", ["install.sh", "commit"])
def test_an_update_killed_midway_keeps_the_old_plugin_intact(stage, start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    make_zip(file_server.root / "v1.zip", source_members("random"))
    v1 = requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": file_server.url("v1.zip")},
                       timeout=WAIT)
    assert v1.status_code == 201, v1.text
    gate = ScriptGate(tmp_path)
    make_zip(file_server.root / "v2.zip", source_members("random", "v2.0.0", script=gate.script))
    body = {"file": file_server.url("v2.zip")}
    old = {"name": "random", "version": "1.0.0"}
    registry_hold = None
    try:
        before = disk_state(home), registry_dump(home)
        update = InFlight("PUT", f"{server.url}/plugins/sources/random", body)
        gate.wait_started()
        op_id, pid = the_operation(home)
        if stage == "commit":
            registry_hold = RegistryHold(home)
            gate.release()
            # Every move made: v2 in place, v1's binary set aside, the yaml kept, json and conf replaced.
            wait_for(lambda: all_in_place(home, installed_paths("random", "v2.0.0"), installed_paths("random")[:1]),
                     "the new files moved in")
            assert (home / "etc/sources/random/settings.conf").read_text() == "built for v2.0.0\n"
        # Until the commit, every worker describes the old plugin.
        for _ in range(WORKERS):
            assert requests.get(f"{server.url}/plugins/sources/random", timeout=WAIT).json() == old
        os.kill(pid, signal.SIGKILL)
        assert isinstance(update.outcome(), requests.ConnectionError)
        if registry_hold is not None:
            registry_hold.release()
        wait_for(lambda: recovered(home), "the replacement worker to roll the update back")
        assert_old_state(home, server, before, op_id, "random", old=old)
        assert (home / "plugins/sources/Random@v1.0.0.so").read_text() == "binary v1.0.0\n" * 100

        gate.release()
        again = requests.put(f"{server.url}/plugins/sources/random", json=body, timeout=WAIT)
        assert again.status_code == 200, again.text
        assert requests.get(f"{server.url}/plugins/sources/random", timeout=WAIT).json() == {
            "name": "random", "version": "2.0.0"}
        assert all_in_place(home, installed_paths("random", "v2.0.0"), installed_paths("random")[:1])
    finally:
        if registry_hold is not None:
            registry_hold.release()
        gate.release()
        gate.close()


# ---------------------------------------------------------------------------- stopping the service


def test_sigterm_lets_an_install_in_flight_finish(start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    gate = ScriptGate(tmp_path)
    make_zip(file_server.root / "package.zip", source_members("random", script=gate.script))
    try:
        install = InFlight("POST", f"{server.url}/plugins/sources",
                           {"name": "random", "file": file_server.url("package.zip")})
        gate.wait_started()
        os.kill(server.process.pid, signal.SIGTERM)  # gunicorn's graceful stop
        # The idle workers leave at once; the master waits for the one busy with the install.
        master = psutil.Process(server.process.pid)
        wait_for(lambda: len(master.children()) == 1, "the idle workers to exit")
        assert server.process.poll() is None
        gate.release()
        response = install.outcome()
        assert isinstance(response, requests.Response) and response.status_code == 201, response
        assert server.wait_exit(WAIT) == 0
        state = disk_state(home), registry_dump(home)

        restarted = start_gunicorn(workers=WORKERS)
        assert requests.get(f"{restarted.url}/plugins/sources/random", timeout=WAIT).json() == {
            "name": "random", "version": "1.0.0"}
        assert (disk_state(home), registry_dump(home)) == state
        assert all_in_place(home, installed_paths("random"))
    finally:
        gate.release()
        gate.close()


def test_a_quick_stop_rolls_the_install_in_flight_back_before_exiting(start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    gate = ScriptGate(tmp_path)
    make_zip(file_server.root / "package.zip", source_members("random", script=gate.script))
    try:
        before = disk_state(home), registry_dump(home)
        install = InFlight("POST", f"{server.url}/plugins/sources",
                           {"name": "random", "file": file_server.url("package.zip")})
        gate.wait_started()
        op_id, _pid = the_operation(home)
        os.kill(server.process.pid, signal.SIGINT)  # gunicorn's quick stop: workers exit at once
        assert server.wait_exit(WAIT) == 0
        interrupted = install.outcome()
        assert isinstance(interrupted, requests.Response), interrupted
        assert interrupted.status_code == 503
        assert "the service is stopping" in interrupted.json()["message"]
        # Rolled back by the worker itself on its way out, before any restart.
        assert disk_state(home) == before[0], diff(before[0], disk_state(home))
        assert registry_dump(home) == before[1]
        assert list(Layout(home).staging.iterdir()) == []
        assert marked_processes(op_id) == []

        restarted = start_gunicorn(workers=WORKERS)
        gate.release()
        again = requests.post(f"{restarted.url}/plugins/sources",
                              json={"name": "random", "file": file_server.url("package.zip")}, timeout=WAIT)
        assert again.status_code == 201, again.text
    finally:
        gate.release()
        gate.close()


def test_a_clean_restart_keeps_the_registry_and_every_file_byte_for_byte(start_gunicorn, file_server):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    make_zip(file_server.root / "source.zip", source_members("random"))
    make_zip(file_server.root / "echo.zip", {"Echo@v2.1.so": b"\x7fELF echo", "echo.json": "{}"})
    make_zip(file_server.root / "mirror.zip", {
        "mirror.json": json.dumps({"version": "v1.0.0", "language": "go", "executable": "mirror",
                                   "sources": ["pyjson"], "functions": ["revert"]}),
        "mirror": b"#!/bin/sh\nexit 0\n", "sources/pyjson.yaml": "default:\n", "functions/revert.json": "{}",
    }, modes={"mirror": 0o100755})
    for plugin_type, body in [
        ("sources", {"name": "random", "file": file_server.url("source.zip")}),
        ("functions", {"name": "echo", "file": file_server.url("echo.zip"), "functions": ["echo", "echo2"]}),
        ("portables", {"name": "mirror", "file": file_server.url("mirror.zip")}),
    ]:
        created = requests.post(f"{server.url}/plugins/{plugin_type}", json=body, timeout=WAIT)
        assert created.status_code == 201, created.text
    answers = {path: requests.get(f"{server.url}{path}", timeout=WAIT).json() for path in (
        "/plugins/sources", "/plugins/sources/random", "/plugins/functions/echo", "/plugins/portables",
        "/plugins/portables/mirror", "/plugins/udfs")}
    state = disk_state(home), registry_dump(home)
    assert len(state[0]) > 20
    server.stop()
    assert server.process.returncode == 0, server.log()
    assert (disk_state(home), registry_dump(home)) == state

    restarted = start_gunicorn(workers=WORKERS)
    for path, answer in answers.items():
        assert requests.get(f"{restarted.url}{path}", timeout=WAIT).json() == answer
    assert (disk_state(home), registry_dump(home)) == state


def test_the_worker_timeout_outlasts_the_longest_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KUIPER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__DOWNLOADTIMEOUT", "1000")
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__INSTALLSCRIPTTIMEOUT", "2000")
    config = runpy.run_path(str(REPO / "etc/gunicorn.conf.py"))
    assert config["timeout"] >= 1000 + 2000 + 60
    assert config["graceful_timeout"] >= config["timeout"]


def test_a_stop_sent_while_a_worker_boots_is_not_lost(start_gunicorn, tmp_path):
    """A worker still booting when the stop comes leaves as soon as it has booted, not at the graceful timeout."""
    server = start_gunicorn(workers=2)
    registry = Layout(server.home).registry_file
    master = psutil.Process(server.process.pid)
    old_workers = set(server.workers_booted())  # both past their start-up check before it is blocked
    # Exclusive locking mode keeps even readers out, WAL or not: a new worker's start-up check of the
    # registry waits (it retries for its busy timeout), in post_fork, before it has signal handlers.
    hold = sqlite3.connect(registry, isolation_level=None, timeout=WAIT)
    try:
        hold.execute("PRAGMA locking_mode=EXCLUSIVE")
        hold.execute("BEGIN EXCLUSIVE")
        os.kill(next(iter(old_workers)), signal.SIGKILL)
        booting = wait_for(lambda: {c.pid for c in master.children()} - old_workers, "a replacement worker")
        # The ordering this relies on: the replacement cannot finish its start-up check while we hold the
        # lock (it waits at least db.BUSY_TIMEOUT_SECONDS, then gives up with a boot error), and the booted
        # worker, idle, leaves as soon as it gets the stop. So the replacement is still booting when the
        # booted one has gone, unless leaving takes an idle worker longer than the whole busy timeout.
        os.kill(server.process.pid, signal.SIGTERM)
        wait_for(lambda: all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                             for pid in old_workers), "the booted workers to leave")
        assert all(psutil.pid_exists(pid) for pid in booting), "the replacement is still in its start-up check"
    finally:
        hold.execute("ROLLBACK")
        hold.close()
    assert server.wait_exit(WAIT) == 0
