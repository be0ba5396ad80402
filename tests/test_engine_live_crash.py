"""A power cut at each step of a live native install: both sides restart and agree on the plugin.

The service (real gunicorn, 2 workers) and a real kuiperd share one home; a native function plugin (multi)
is installed through the service, which hands it to the running engine before its commit. The install is
stopped at one of its steps (docs/engine-live.md, "The order of steps") by strace, which attaches to the
process that takes the step and stops it (SIGSTOP) when that process enters the system call that is the
step, as tests/test_crash.py stops a worker mid-extraction: nothing is timed. Then both processes are
killed with SIGKILL (master and workers, and the engine), which is what a power cut does to them (their
unsynced writes aside: LazyFS is not in the suite), and both restart on the same home, the service first:
its start-up recovery settles the install before the engine's boot scan reads the folders.

After that the two sides must agree: the plugin is in both or in neither, and a rule using its function
is accepted by the engine exactly when our registry lists the plugin. A step before the commit leaves
neither (and the disk, our registry and the engine's store as before); a step after it leaves both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import disk_state, engine_dump, registry_dump
from test_crash import InFlight, wait_for

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

WAIT = 30
SO = "plugins/functions/Multi@v1.0.0.so"


class StopAt:
    """strace attached to a process stops it (SIGSTOP) as it enters the `when`-th `call` on one of `paths`."""

    def __init__(self, pid: int, call: str, paths: list[Path], when: int, log: Path):
        self.pid, self.log = pid, log
        filters = [arg for path in paths for arg in ("-P", str(path))]
        with open(log, "wb") as stderr:
            # -f: a Go program makes its system calls from any of its threads
            self.strace = subprocess.Popen(
                ["strace", "-f", "-p", str(pid), "-e", f"trace={call}", "-e",
                 f"inject={call}:signal=SIGSTOP:when={when}", *filters],
                stderr=stderr,
            )
        wait_for(lambda: b"attached" in log.read_bytes(), "strace to attach")

    def wait_stopped(self) -> None:
        wait_for(lambda: b"stopped by SIGSTOP" in self.log.read_bytes(), f"process {self.pid} to stop at its step")

    def finish(self) -> None:
        if self.strace.poll() is None:
            self.strace.kill()
        self.strace.wait(timeout=WAIT)


def workers(server) -> list[int]:
    return server.workers_booted()


# Each step: which process takes it, the system call that is the step, on which paths, the how-many-th.
# The worker's first hard link from the .so keeps the sealed file aside for the engine (strace matches a link
# by its first path); it opens the .so's folder to sync it twice: after publishing, and after putting the
# sealed file back over the engine's copy. The engine's install removes the .so before it writes its own copy,
# by its name in the folder it opened (strace matches the folder's descriptor). The commit is the registry's
# first fsync of the operation (the reservation is not synced); the rows rewritten after it are the worker's
# first write into the engine's store.
STEPS = {
    "published, before the hand-over": ("worker", "link,linkat", [SO], 1, False),
    "the engine installing": ("engine", "unlinkat", ["plugins/functions"], 1, False),
    "the engine answered, the sealed .so put back": ("worker", "open,openat", ["plugins/functions"], 2, False),
    "checked, committing": ("worker", "fsync,fdatasync", ["data/kuiper-plugins.db-wal"], 1, None),
    "committed, the engine's rows being rewritten": (
        "worker", "pwrite64,write", ["data/sqliteKV.db-wal", "data/sqliteKV.db-journal", "data/sqliteKV.db"], 1,
        True),
}


def rule_accepted(engine) -> bool:
    """Whether the engine accepts a rule using the plugin's function now (the rule is removed again)."""
    response = engine.post("/rules", {"id": "uses_twice", "sql": "SELECT twice(a) FROM demo",
                                      "actions": [{"log": {}}]})
    if response.status_code == 201:
        assert engine.delete("/rules/uses_twice").status_code == 200
        return True
    assert "function twice not found" in response.text, response.text
    return False


@pytest.mark.parametrize("step", list(STEPS))
def test_a_power_cut_at_each_step_of_a_live_install_leaves_both_sides_agreeing(
        step, start_kuiperd, start_gunicorn, file_server, multi_plugin, tmp_path):
    who, call, paths, when, expected = STEPS[step]
    home = tmp_path / "home"
    engine = start_kuiperd(home)
    env = {"KUIPER_PLUGINS__ENGINE__URL": engine.url}
    server = start_gunicorn(workers=2, **env)
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    created = engine.post("/streams", {"sql": 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo",'
                                              ' FORMAT="json")'})
    assert created.status_code == 201, created.text
    before = disk_state(home), registry_dump(home), engine_dump(home)

    # One worker takes the request; strace waits on each (a sync worker makes its calls from its main thread).
    stops = [StopAt(pid, call, [home / p for p in paths], when, tmp_path / f"strace-{pid}.log")
             for pid in ([engine.process.pid] if who == "engine" else workers(server))]
    try:
        request = InFlight("POST", f"{server.url}/plugins/functions", {
            "name": "multi", "file": file_server.url("multi.zip"), "functions": ["twice", "shout"]})
        wait_for(lambda: any(b"stopped by SIGSTOP" in stop.log.read_bytes() for stop in stops),
                 f"the install to reach the step: {step}")
        # the power goes: every process of the service and the engine at once
        os.killpg(server.process.pid, signal.SIGKILL)
        os.killpg(engine.process.pid, signal.SIGKILL)
        server.process.wait(timeout=WAIT)
        engine.process.wait(timeout=WAIT)
        assert isinstance(request.outcome(), requests.ConnectionError)
    finally:
        for stop in stops:
            stop.finish()
    engine.stop()  # closes its log; the process is gone

    server = start_gunicorn(workers=2, **env)  # start-up recovery settles the install
    engine.start()  # then the engine boots, scanning what recovery left

    listed = "multi" in requests.get(f"{server.url}/plugins/functions", timeout=WAIT).json()
    in_engine = "multi" in engine.get("/plugins/functions").json()
    accepted = rule_accepted(engine)
    assert listed == in_engine == accepted, f"registry {listed}, engine {in_engine}, rule accepted {accepted}"
    if expected is not None:
        assert listed is expected, step
    assert list(Layout(home).staging.iterdir()) == []
    assert [p.name for p in (home / "data" / "uploads").iterdir()] == []  # no hand-over package left
    assert not (home / "plugins" / "multi.zip").exists()
    if not listed:
        assert disk_state(home) == before[0]
        assert registry_dump(home) == before[1]
        assert engine_dump(home) == before[2], "the engine's store keeps rows of a plugin nobody has"
        # and the same install goes through, live, on the restarted pair
        again = requests.post(f"{server.url}/plugins/functions", json={
            "name": "multi", "file": file_server.url("multi.zip"), "functions": ["twice", "shout"]}, timeout=WAIT)
        assert again.status_code == 201, again.text
        assert rule_accepted(engine)
    else:
        assert sorted(engine.get("/plugins/udfs").json()) == ["shout", "twice"]
        described = requests.get(f"{server.url}/plugins/functions/multi", timeout=WAIT).json()
        assert described["functions"] == ["twice", "shout"] and described["engine"] == "loaded", described
