"""Rollbacks on the real gunicorn: one killed midway, and one that restarts the engine (?stop=1).

A rollback killed midway, on the real gunicorn: after recovery the plugin is whole, as it was before.

The rollback is held at a known stage by design:
- mid-moves: strace, attached to every worker, stops the one doing the rollback (SIGSTOP) just after its
  rename that sets the installed binary aside into staging: the newer version's binary is gone and the
  kept one not yet in (the other files are hard-linked aside, and nothing is moved in yet);
- before the commit: stopped as above, the test then holds `BEGIN IMMEDIATE` on the registry and lets
  the worker go on (SIGCONT), so its commit waits on its busy timeout once every file is in place; the
  test sees the files, then kills.
The worker is killed; its replacement undoes the rollback. Then two rollbacks in a row still go back and
forth, so the kept version survived the crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from conftest import disk_state, engine_dump, make_zip, registry_dump
from test_crash import (
    WAIT,
    InFlight,
    RegistryHold,
    diff,
    process_state,
    recovered,
    source_members,
    wait_for,
)

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

WORKERS = 2


class RenameStop:
    """strace attached to one worker stops it (SIGSTOP) right after its first rename of `source`.

    (strace's -P matches a rename by its first path only, the one that exists.)
    """

    def __init__(self, pid: int, source: Path, log: Path):
        self.pid = pid
        self.log = log
        with open(log, "wb") as stderr:
            self.strace = subprocess.Popen(
                ["strace", "-f", "-p", str(pid), "-e", "trace=rename,renameat,renameat2",
                 "-e", "inject=rename,renameat,renameat2:signal=SIGSTOP:when=1", "-P", str(source)],
                stderr=stderr,
            )
        wait_for(lambda: b"attached" in log.read_bytes(), "strace to attach")

    def stopped(self) -> bool:
        return b"stopped by SIGSTOP" in self.log.read_bytes()

    def finish(self) -> None:
        if self.strace.poll() is None:
            self.strace.kill()  # a worker that never renamed: its strace is ours to end
        self.strace.wait(timeout=WAIT)


def describe(server) -> dict:
    return requests.get(f"{server.url}/plugins/sources/random", timeout=WAIT).json()


@pytest.mark.parametrize("stage", ["mid-moves", "commit"])
def test_a_rollback_killed_midway_leaves_the_version_it_started_from_whole(stage, start_gunicorn, file_server,
                                                                          tmp_path):
    server = start_gunicorn(workers=WORKERS)
    home = server.home
    for version in ("v1.0.0", "v2.0.0"):
        make_zip(file_server.root / f"{version}.zip", source_members("random", version))
    url = file_server.url
    assert requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": url("v1.0.0.zip")},
                         timeout=WAIT).status_code == 201
    assert requests.put(f"{server.url}/plugins/sources/random", json={"file": url("v2.0.0.zip")},
                        timeout=WAIT).status_code == 200
    v1_binary = home / "plugins/sources/Random@v1.0.0.so"
    v2_binary = home / "plugins/sources/Random@v2.0.0.so"
    before = disk_state(home), registry_dump(home), engine_dump(home)
    kept_before = sorted(os.listdir(Layout(home).versions))
    stops: list[RenameStop] = []
    hold = None
    try:
        workers = psutil.Process(server.process.pid).children()
        assert len(workers) == WORKERS
        # Whichever worker takes the request is stopped; the others never rename that path.
        stops = [RenameStop(w.pid, v2_binary, tmp_path / f"strace-{w.pid}.log") for w in workers]
        rollback = InFlight("POST", f"{server.url}/plugins/sources/random/rollback")
        stopped = wait_for(lambda: [s for s in stops if s.stopped()], "the worker to stop mid-moves")
        pid = stopped[0].pid
        wait_for(lambda: process_state(pid) in ("t", "T"), "the stop to take hold")
        assert not v1_binary.exists() and not v2_binary.exists()  # half swapped: no binary at all
        if stage == "commit":
            # The registry is held before the worker goes on: it makes every move, then its commit waits.
            hold = RegistryHold(home)
            os.kill(pid, signal.SIGCONT)
            wait_for(lambda: v1_binary.exists() and not v2_binary.exists(), "the kept files moved in")
            assert v1_binary.read_text() == "binary v1.0.0\n" * 100
        psutil.Process(pid).kill()
        assert isinstance(rollback.outcome(), requests.ConnectionError)
        if hold is not None:
            hold.release()
        wait_for(lambda: recovered(home), "the replacement worker to undo the rollback")
        # Its recovery removes the copy of v2 the rollback had kept, just after the staging folder; the copy's
        # name goes last (shutil.rmtree removes the folder's contents first), so once it is gone, all of it is.
        versions = Layout(home).versions
        wait_for(lambda: sorted(os.listdir(versions)) == kept_before, "the kept copy of the dead rollback to go")
        assert disk_state(home) == before[0], diff(before[0], disk_state(home))
        assert registry_dump(home) == before[1]
        assert engine_dump(home) == before[2]
        for _ in range(WORKERS):
            assert describe(server) == {"name": "random", "version": "2.0.0"}
    finally:
        for stop in stops:
            stop.finish()
        if hold is not None:
            hold.release()

    first = requests.post(f"{server.url}/plugins/sources/random/rollback", timeout=WAIT)
    assert first.status_code == 200, first.text
    assert first.json()["version"] == "1.0.0"
    assert v1_binary.read_text() == "binary v1.0.0\n" * 100 and not v2_binary.exists()
    second = requests.post(f"{server.url}/plugins/sources/random/rollback", timeout=WAIT)
    assert second.json()["version"] == "2.0.0"
    assert disk_state(home) == before[0] or _only_kept_folder_differs(home, before[0])
    assert list(Layout(home).staging.iterdir()) == []


def _only_kept_folder_differs(home: Path, before: dict) -> bool:
    """After two rollbacks the installed files are as before; only the kept copy's folder name changed."""
    kept = "data/.kuiper-plugins/versions/"
    now = disk_state(home)
    return ({k: v for k, v in now.items() if not k.startswith(kept)}
            == {k: v for k, v in before.items() if not k.startswith(kept)})


def test_a_native_rollback_with_stop_runs_the_restart_command_once(start_gunicorn, file_server, tmp_path):
    marker = tmp_path / "restarted"
    command = json.dumps([sys.executable, "-c", f"open({str(marker)!r}, 'a').write('restart\\n')"])
    server = start_gunicorn(workers=2, KUIPER_PLUGINS__ENGINE__RESTARTCOMMAND=command)
    for version in ("v1.0.0", "v2.0.0"):
        make_zip(file_server.root / f"{version}.zip", source_members("random", version))
    assert requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": file_server.url(
        "v1.0.0.zip")}, timeout=WAIT).status_code == 201
    assert requests.put(f"{server.url}/plugins/sources/random", json={"file": file_server.url("v2.0.0.zip")},
                        timeout=WAIT).status_code == 200
    assert not marker.exists()

    answer = requests.post(f"{server.url}/plugins/sources/random/rollback?stop=1", timeout=WAIT)

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"type": "sources", "name": "random", "version": "1.0.0"}
    # The command runs once the answer is sent: its line in the log is what the test waits for.
    wait_for(lambda: "engine.restartCommand finished" in server.log(), "the restart command to finish")
    assert "engine.restartCommand finished (exit status 0)" in server.log()
    assert marker.read_text() == "restart\n"  # once
    assert describe(server) == {"name": "random", "version": "1.0.0"}
