"""Durable before acknowledged: the order of the durable steps, and power cuts at every barrier.

Two kinds of proof, both from strace:
- the order: a real gunicorn's workers are traced through an install, an update and a delete, and the
  trace must show every file's bytes fsynced before its rename into place, each destination folder
  fsynced after its renames and before the commit's WAL sync, the answer sent after that, and no
  set-aside old file removed before the commit. A package of many files is flushed by one syncfs of the
  file system instead of an fsync per file: a syncfs on the home's file system counts as an fsync of
  every file and folder there, from that point of the trace on;
- the outcome: one request runs in a process of its own that strace kills at its K-th fsync (or
  fdatasync), for every K the request makes. Then the power cut is replayed from the trace (every file
  cut down to the bytes it had fsynced, SQLite's WAL to its fsynced frames, its shared-memory index
  gone), the service starts on that disk, and what it shows must be the whole old state or the whole
  new state, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import REPO, client_class_for, disk_state, make_zip
from fs_trace import (
    TRACED,
    PowerCut,
    flushed_file_system,
    linked,
    parse,
    removed,
    renamed,
    sent_to_socket,
    synced,
    written,
)

from kuiper_plugins import create_app
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings

pytestmark = pytest.mark.slow

WAIT = 30
# Killed runs of one power-cut test going at once, each on a copy of its own: a run mostly waits for its flushes.
CUTS_AT_ONCE = 2
CHILD = Path(__file__).with_name("power_cut_child.py")


def source_members(version: str) -> dict:
    return {
        f"Alpha@{version}.so": f"binary {version}\n" * 2000,
        "alpha.yaml": "default:\n  interval: 1000\n",
        "alpha.json": json.dumps({"about": {"version": version}}),
        "etc/settings.conf": f"built for {version}\n",
    }


# ---------------------------------------------------------------------------- the order of the steps


def attach_strace(pids: list[int], out: Path) -> subprocess.Popen:
    command = ["strace", "-f", "-qq", "-yy", "-s", "64", "-e", f"trace={TRACED}", "-e", "signal=none", "-o", str(out)]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT
    while not all(_traced(pid) for pid in pids):
        if time.monotonic() > deadline or tracer.poll() is not None:
            tracer.kill()
            raise AssertionError("strace did not attach to the workers")
        time.sleep(0.01)  # polling /proc for the tracer, bounded by the deadline
    return tracer


def _traced(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        if "TracerPid:\t0\n" in status:
            return False
    return True


def check_order(events, home: Path) -> dict:
    """Assert the durable order of every operation in a trace; return counts of what was checked."""
    work = str(Layout(home).work)
    last_write: dict[str, int] = {}
    last_sync: dict[str, int] = {}
    last_fs_sync = -1  # the last syncfs of the home's file system: it flushed every file and folder there

    def flushes(event, path: str) -> bool:
        return synced(event) == path or (flushed_file_system(event) or "").startswith(str(home))

    placed: list[tuple[int, str, int]] = []  # (event index, destination, pid)
    set_aside: dict[str, tuple[int, str]] = {}  # installed path -> (event index, its backup in staging)
    checked = {"renames": 0, "folders": 0, "answers": 0, "set aside": 0}
    for event in events:
        if (link := linked(event)) is not None and "/backup/" in link[1]:
            set_aside[link[0]] = (event.index, link[1])
        elif (move := renamed(event)) is not None and "/backup/" in move[1] and move[1].startswith(work):
            set_aside[move[0]] = (event.index, move[1])
        if (write := written(event)) is not None:
            last_write[write[0]] = event.index
        elif (path := synced(event)) is not None:
            last_sync[path] = event.index
        elif (flushed_file_system(event) or "").startswith(str(home)):
            last_fs_sync = event.index
        elif (move := renamed(event)) is not None:
            source, dest = move
            if dest.startswith(str(home)) and not dest.startswith(work):
                under = {path: index for path, index in last_write.items()
                         if path == source or path.startswith(f"{source}/")}
                for path, index in under.items():
                    assert max(last_sync.get(path, -1), last_fs_sync) > index, f"{path} was renamed to {dest} unsynced"
                assert last_sync.get(source, -1) >= 0 or last_fs_sync > max(under.values(), default=-1), (
                    f"{source} was never fsynced before its rename to {dest}")
                if dest in set_aside:
                    # The old file's backup, and the backup folder's own name, were durable before it was replaced.
                    at, backup = set_aside.pop(dest)
                    for folder in (os.path.dirname(backup), os.path.dirname(os.path.dirname(backup))):
                        assert any(at < e.index < event.index and flushes(e, folder) for e in events), (
                            f"{folder} was not fsynced between setting {dest} aside and replacing it")
                    checked["set aside"] += 1
                placed.append((event.index, dest, event.pid))
                checked["renames"] += 1
            for table in (last_write, last_sync):
                for path in [p for p in table if p == source or p.startswith(f"{source}/")]:
                    table[dest + path[len(source):]] = table.pop(path)
    wal = str(Layout(home).registry_file) + "-wal"
    for index, dest, pid in placed:
        commit = next(e.index for e in events if e.index > index and synced(e) == wal)
        folder = os.path.dirname(dest)
        assert any(index < e.index < commit and flushes(e, folder) for e in events), (
            f"{folder} was not fsynced between the rename of {dest} and the commit")
        checked["folders"] += 1
        # Whatever was written inside a placed folder after its rename (a portable install.sh) is synced too.
        written_after = {}
        for event in events:
            if index < event.index < commit and (write := written(event)) is not None \
                    and write[0].startswith(f"{dest}/"):
                written_after[write[0]] = event.index
        for path, at in written_after.items():
            assert any(at < e.index < commit and flushes(e, path) for e in events), (
                f"{path} was written after its folder was placed and not fsynced before the commit")
            checked["written in place"] = checked.get("written in place", 0) + 1
        answer = next(e for e in events if e.index > index and e.pid == pid
                      and (sent_to_socket(e) or "").startswith("HTTP/1.1 "))
        assert answer.index > commit, f"answered before the commit was durable: {sent_to_socket(answer)[:40]}"
        checked["answers"] += 1
        # The old files set aside in staging stay until the commit is durable.
        for event in events:
            gone = removed(event)
            if gone and "/backup/" in gone and event.index < commit and event.index > index - 200:
                raise AssertionError(f"{gone} was removed before the commit")
    return checked


def test_the_durable_steps_come_in_order(start_gunicorn, file_server, tmp_path, capsys):
    server = start_gunicorn(workers=2)
    make_zip(file_server.root / "v1.zip", source_members("v1.0.0"))
    make_zip(file_server.root / "v2.zip", source_members("v2.0.0"))
    import psutil
    master = psutil.Process(server.process.pid)
    deadline = time.monotonic() + WAIT
    while len(master.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # polling until both workers have booted (a request may go to either), bounded
    workers = [child.pid for child in master.children()]
    assert len(workers) == 2, workers
    trace = tmp_path / "trace.txt"
    tracer = attach_strace(workers, trace)
    try:
        body = {"name": "alpha", "file": file_server.url("v1.zip")}
        assert requests.post(f"{server.url}/plugins/sources", json=body, timeout=WAIT).status_code == 201
        body["file"] = file_server.url("v2.zip")
        assert requests.put(f"{server.url}/plugins/sources/alpha", json=body, timeout=WAIT).status_code == 200
        assert requests.delete(f"{server.url}/plugins/sources/alpha", timeout=WAIT).status_code == 200
        # A portable plugin: a whole folder moved in, and its install.sh run in place before the commit.
        portable = {"version": "v1", "language": "go", "executable": "run", "sinks": ["beta"]}
        make_zip(file_server.root / "beta.zip", {"beta.json": json.dumps(portable), "run": "#!/bin/sh\n",
                                                  "lib/data.txt": "d" * 5000, "install.sh": "echo x > made.txt\n",
                                                  "sinks/beta.json": "{}"}, modes={"run": 0o100755})
        body = {"name": "beta", "file": file_server.url("beta.zip")}
        assert requests.post(f"{server.url}/plugins/portables", json=body, timeout=WAIT).status_code == 201
        assert requests.delete(f"{server.url}/plugins/portables/beta", timeout=WAIT).status_code == 200
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=WAIT)
    events = parse(trace)
    checked = check_order(events, server.home)
    # install: .so, 2 yaml, 2 json, 2 folders; update: the same; delete: only moves aside.
    assert checked["renames"] >= 14 and checked["folders"] == checked["renames"] == checked["answers"]
    assert checked["set aside"] >= 3  # the update's .so, yaml and json were replaced only once their backups held
    removals = [e for e in events if (removed(e) or "").find("/backup/") >= 0]
    assert removals, "an update and a delete set old files aside and removed them after the commit"
    with capsys.disabled():
        print(f"\ndurable order: {checked['renames']} renames into place and {checked.get('written in place', 0)}"
              f" files written in place checked in {len(events)} traced calls")
    assert checked.get("written in place", 0) >= 1  # the portable install.sh's made.txt


# ---------------------------------------------------------------------------- power cuts at every barrier


def logical_state(home: Path) -> tuple[dict, list]:
    """What a user would check after a restart: every file (staging and locks included) and the registry."""
    files = {path: value for path, value in disk_state(home).items()}
    conn = sqlite3.connect(Layout(home).registry_file)
    try:
        rows = [
            ("plugin", *row) for row in conn.execute(
                "SELECT type, name, version, descriptor, request, sha256, adopted FROM plugins ORDER BY type, name")
        ] + [
            ("file", *row) for row in conn.execute(
                "SELECT p.name, f.path, f.size, f.sha256 FROM plugin_files f JOIN plugins p ON p.id = f.plugin_id"
                " ORDER BY f.path")
        ] + [
            ("function", *row) for row in conn.execute(
                "SELECT p.name, f.name, f.position FROM functions f JOIN plugins p ON p.id = f.plugin_id"
                " ORDER BY f.name")
        ] + [("operation", *row) for row in conn.execute("SELECT type, name, kind FROM operations")]
        rows += [("finished", *row) for row in conn.execute("SELECT id FROM finished_operations")]
    finally:
        conn.close()
    # Each run has a home of its own (a copy of the template): the package URL recorded with a plugin names it,
    # and so does a portable plugin's descriptor (its executable's absolute path).
    rows = [tuple(re.sub(r"file://[^\"]*/data/uploads/", "file://<home>/data/uploads/", v.replace(str(home), "<home>"))
                  if isinstance(v, str) else v for v in row) for row in rows]
    return files, rows


def quiesce(home: Path) -> None:
    """Fold the WAL into the registry file, so that a run starts from an empty WAL (every byte durable)."""
    conn = sqlite3.connect(Layout(home).registry_file)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    os.sync()


def run_child(home: Path, request, trace: Path, kill_at: tuple[str, int] | None) -> subprocess.CompletedProcess:
    command = ["strace", "-f", "-qq", "-yy", "-s", "64", "-e", f"trace={TRACED}", "-o", str(trace)]
    if kill_at is not None:
        call, number = kill_at
        command += ["-e", f"inject={call}:signal=SIGKILL:when={number}"]
    method, path, body = request(home)
    command += [sys.executable, str(CHILD), str(home), method, path] + ([json.dumps(body)] if body else [])
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def restart(home: Path) -> None:
    """Start the service on the disk the power cut left, as a worker would after the reboot."""
    shm = Path(f"{Layout(home).registry_file}-shm")
    shm.unlink(missing_ok=True)  # shared memory does not survive a reboot
    create_app(Settings(home=home), stop_service=lambda: None)


def barriers(events, pid: int) -> dict[str, int]:
    """How many fsyncs, fdatasyncs and syncfs the request made before its answer: a cut after it is the run
    without a kill point (the child leaves right after answering)."""
    counts = {"fsync": 0, "fdatasync": 0, "syncfs": 0}
    for event in events:
        if event.pid == pid and event.call == "write" and (event.string(1) or "").startswith("ANSWERED"):
            break
        if event.pid == pid and event.call in counts:
            counts[event.call] += 1
    return counts


def power_cut_outcomes(template: Path, request, tmp_path: Path, max_barriers: int | None = None) -> dict:
    """Cut the power at every barrier of one request; return how often the old and the new state came back.

    With `max_barriers`, the request must make no more barriers than that (checked before any cut).
    """
    old = logical_state(template)
    reference = tmp_path / "reference"
    shutil.copytree(template, reference, symlinks=True)
    done = run_child(reference, request, tmp_path / "reference.trace", None)
    assert done.returncode == 0 and "ANSWERED 20" in done.stdout, done.stdout + done.stderr
    events = parse(tmp_path / "reference.trace")
    child = next(e.pid for e in events if e.call in ("openat", "open"))
    restart(reference)
    new = logical_state(reference)
    assert new != old
    outcomes = {"old": 0, "new": 0, "cuts": 0}
    points = [(call, k) for call, count in barriers(events, child).items() for k in range(1, count + 1)]
    if max_barriers is not None:
        assert len(points) <= max_barriers, f"{len(points)} barriers: {barriers(events, child)}"
    points.append(None)  # the power goes after the answer: nothing unsynced may be lost either

    def killed_run(index: int, point: tuple[str, int] | None) -> tuple[Path, PowerCut, Path, object]:
        """One run on a copy of its own, killed at `point`: the processes, run CUTS_AT_ONCE at a time."""
        home = tmp_path / f"cut{index}"
        shutil.copytree(template, home, symlinks=True)
        cut = PowerCut(home).start()
        trace = tmp_path / f"cut{index}.trace"
        return home, cut, trace, run_child(home, request, trace, point)

    with ThreadPoolExecutor(CUTS_AT_ONCE) as pool:
        # In order, each checked as soon as its run is over; the restarts run in this thread only.
        runs = pool.map(killed_run, range(len(points)), points)
        for point, (home, cut, trace, result) in zip(points, runs, strict=True):
            if point is not None:
                assert result.returncode != 0 and "ANSWERED" not in result.stdout, (point, result.stdout)
            else:  # the run the power leaves after its answer: answered as the reference run was
                assert result.returncode == 0 and "ANSWERED 20" in result.stdout, result.stdout + result.stderr
            cut.follow(parse(trace))
            registry_file = str(Layout(home).registry_file)
            outcomes["cuts"] += len(cut.apply(keep=(registry_file,)))
            restart(home)
            state = logical_state(home)
            if state == old:
                outcomes["old"] += 1
            elif state == new:
                outcomes["new"] += 1
            else:
                raise AssertionError(f"a power cut at {point} left neither the old nor the new state:\n"
                                     f"{_difference(old, new, state)}")
            if point is None:
                assert state == new
            shutil.rmtree(home)
            trace.unlink()
    return outcomes


def _difference(old, new, state) -> str:
    lines = []
    for label, reference in (("old", old), ("new", new)):
        added = sorted(set(state[0]) - set(reference[0]))
        missing = sorted(set(reference[0]) - set(state[0]))
        changed = sorted(k for k in set(state[0]) & set(reference[0]) if state[0][k] != reference[0][k])
        rows = sorted(set(map(str, state[1])) ^ set(map(str, reference[1])))
        lines.append(f"vs {label}: added={added} missing={missing} changed={changed} registry rows differing={rows}")
    return "\n".join(lines)


@pytest.fixture
def template(tmp_path) -> Path:
    """A home with the packages in data/uploads (file:// needs no server) and the service started once."""
    home = tmp_path / "template"
    layout = Layout(home)
    layout.create()
    make_zip(layout.uploads / "v1.zip", source_members("v1.0.0"))
    make_zip(layout.uploads / "v2.zip", source_members("v2.0.0"))
    create_app(Settings(home=home), stop_service=lambda: None)
    return home


def install_request(version: str, method: str = "POST"):
    """The request, for a given home: its package is that home's own upload."""

    def request(home: Path) -> tuple:
        url = (Layout(home).uploads / f"{version}.zip").as_uri()
        path = "/plugins/sources" if method == "POST" else "/plugins/sources/alpha"
        return method, path, {"name": "alpha", "file": url}

    return request


def report(capsys, what: str, outcomes: dict) -> None:
    with capsys.disabled():
        print(f"\npower cut at every barrier of {what}: {outcomes['old']} x old state, {outcomes['new']} x new state,"
              f" {outcomes['cuts']} unsynced files cut, 0 damaged")


def test_a_power_cut_during_an_install_leaves_no_plugin_or_the_whole_plugin(template, tmp_path, capsys):
    quiesce(template)
    outcomes = power_cut_outcomes(template, install_request("v1"), tmp_path)
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    report(capsys, "an install", outcomes)


def installed_in(home: Path, peer, request) -> None:
    app = create_app(Settings(home=home))
    app.test_client_class = client_class_for(peer)
    method, path, body = request(home)
    assert app.test_client().open(path, method=method, json=body).status_code == 201


def test_a_power_cut_during_an_update_leaves_v1_or_v2_whole(template, tmp_path, capsys, loopback_peer):
    installed_in(template, loopback_peer(), install_request("v1"))
    quiesce(template)
    outcomes = power_cut_outcomes(template, install_request("v2", "PUT"), tmp_path)
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    report(capsys, "an update", outcomes)


def test_a_power_cut_during_a_delete_leaves_the_plugin_whole_or_gone(template, tmp_path, capsys, loopback_peer):
    installed_in(template, loopback_peer(), install_request("v1"))
    quiesce(template)
    outcomes = power_cut_outcomes(template, lambda home: ("DELETE", "/plugins/sources/alpha", None), tmp_path)
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    report(capsys, "a delete", outcomes)


# ---------------------------------------------------------------------------- many files, one flush

MANY_FILES = 2000
FLUSHES_MAX = 40  # the fsyncs, fdatasyncs and syncfs of one install, whatever its number of files


def many_file_members(name: str, count: int) -> tuple[dict, dict]:
    """A go-language portable plugin of `count` members, and their modes: its descriptor, an executable that
    sends eKuiper's handshake (a Python script, as tests/portable/gohand, with the run bit), its sink's
    metadata, and the rest small modules in 20 vendored folders, as a Python plugin with its dependencies."""
    descriptor = {"version": "v1.0.0", "language": "go", "executable": "run", "sinks": [name]}
    handshake = (f"#!{sys.executable} -u\nimport pynng\n"
                 "with pynng.Req0(recv_timeout=600_000) as sock:\n"
                 f"    sock.dial('ipc:///tmp/plugin_{name}.ipc', block=True)\n"
                 "    sock.send(b'handshake')\n"
                 "    sock.recv()\n")
    members = {f"{name}.json": json.dumps(descriptor), "run": handshake, f"sinks/{name}.json": "{}"}
    modules = count - len(members)
    for index in range(modules):
        members[f"vendor/pkg{index * 20 // modules:02d}/mod{index:05d}.py"] = f"value = {index}\n" * (1 + index % 40)
    return members, {"run": 0o100755}


def flush_calls(events, pid: int | None = None) -> list:
    return [e for e in events if e.call in ("fsync", "fdatasync", "syncfs") and (pid is None or e.pid == pid)]


def test_a_many_file_package_is_flushed_at_once_and_every_byte_is_durable_before_its_move_and_commit(
        start_gunicorn, file_server, tmp_path, capsys):
    """2,000 files: every byte and name durable before the moves and the commit, by a handful of flushes;
    with an install.sh, what it writes in the folder in place is durable before the commit too."""
    server = start_gunicorn(workers=1)
    members, modes = many_file_members("many", MANY_FILES)
    make_zip(file_server.root / "many.zip", members, modes=modes)
    members, modes = many_file_members("scripted", MANY_FILES - 1)
    make_zip(file_server.root / "scripted.zip", {**members, "install.sh": "echo made > made.txt\n"}, modes=modes)
    import psutil
    workers = [child.pid for child in psutil.Process(server.process.pid).children()]
    assert len(workers) == 1, workers
    trace = tmp_path / "trace.txt"
    tracer = attach_strace(workers, trace)
    try:
        for name in ("many", "scripted"):
            body = {"name": name, "file": file_server.url(f"{name}.zip")}
            assert requests.post(f"{server.url}/plugins/portables", json=body, timeout=WAIT * 4).status_code == 201
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=WAIT)
    events = parse(trace)
    checked = check_order(events, server.home)
    # each plugin's folder, and its sink's metadata in etc/sinks and data/sinks
    assert checked["renames"] == checked["folders"] == checked["answers"] == 6, checked
    assert checked.get("written in place") == 1  # install.sh's made.txt
    flushes = flush_calls(events)
    whole = [e for e in flushes if (flushed_file_system(e) or "").startswith(str(server.home))]
    assert len(whole) >= 2 and len(flushes) <= 2 * FLUSHES_MAX, f"{len(flushes)} flushes, {len(whole)} of them syncfs"
    # Every file is still fingerprinted: the registry records each folder as it is on disk.
    from kuiper_plugins.install import durable
    conn = sqlite3.connect(Layout(server.home).registry_file)
    try:
        recorded = dict(conn.execute("SELECT path, sha256 FROM plugin_files WHERE path LIKE 'plugins/portable/%'"))
    finally:
        conn.close()
    on_disk = {f"plugins/portable/{name}": durable.fingerprint(Layout(server.home).portable_dir(name)).sha256
               for name in ("many", "scripted")}
    assert recorded == on_disk
    scripted = Layout(server.home).portable_dir("scripted")
    assert (scripted / "made.txt").read_text() == "made\n"
    assert sum(len(files) for _root, _dirs, files in os.walk(scripted)) == MANY_FILES  # with made.txt
    with capsys.disabled():
        print(f"\ndurable order of two {MANY_FILES}-file installs: {checked['renames']} renames into place checked,"
              f" {len(flushes)} flushes ({len(whole)} syncfs) in {len(events)} traced calls")


@pytest.fixture
def many_file_template(tmp_path) -> Path:
    """A home with the many-file package in data/uploads, the service started once."""
    home = tmp_path / "template"
    layout = Layout(home)
    layout.create()
    members, modes = many_file_members("many", MANY_FILES)
    make_zip(layout.uploads / "many.zip", members, modes=modes)
    create_app(Settings(home=home), stop_service=lambda: None)
    return home


def test_a_power_cut_during_a_many_file_install_leaves_no_plugin_or_the_whole_plugin(
        many_file_template, tmp_path, capsys):
    quiesce(many_file_template)

    def request(home: Path) -> tuple:
        return "POST", "/plugins/portables", {"name": "many", "file": (Layout(home).uploads / "many.zip").as_uri()}

    outcomes = power_cut_outcomes(many_file_template, request, tmp_path, max_barriers=FLUSHES_MAX)
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    report(capsys, f"a {MANY_FILES}-file install", outcomes)


# ---------------------------------------------------------------------------- where one syncfs is not trusted

SEALED_FILES = 100  # more than durable.SYNCFS_MIN_ENTRIES


def traced_seal(tmp_path: Path, staging: Path, tree: Path, *, tmpfs: Path | None = None) -> list:
    """Write SEALED_FILES files under `tree`, then seal it with a batch opened on `staging`, in a traced child.

    With `tmpfs`, the child runs in a mount namespace of its own where a fresh tmpfs is mounted there first.
    """
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from kuiper_plugins.install import durable\n"
        "staging, tree = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "staging.mkdir(parents=True, exist_ok=True)\n"
        "batch = durable.FileSystemSync(staging)\n"
        f"for index in range({SEALED_FILES}):\n"
        "    path = tree / ('sub' if index % 2 else 'top') / f'file{index}'\n"
        "    path.parent.mkdir(parents=True, exist_ok=True)\n"
        "    path.write_text(f'{index}\\n' * 100)\n"
        "sealed, read = durable.seal(tree, batch), durable.fingerprint(tree)\n"
        "print((sealed.size, sealed.sha256) == (read.size, read.sha256))\n"
    )
    trace = tmp_path / "seal.trace"
    command = ["strace", "-f", "-qq", "-yy", "-e", f"trace={TRACED}", "-o", str(trace),
               sys.executable, "-c", script, str(staging), str(tree)]
    if tmpfs is not None:
        tmpfs.mkdir(parents=True, exist_ok=True)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"', str(tmpfs), *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "True\n", done.stdout  # sealing reads what fingerprint reads, however it flushes
    return parse(trace)


def file_fsyncs(events, tree: Path) -> set[str]:
    return {path for e in events if (path := synced(e)) and path.startswith(f"{tree}/")
            and os.path.basename(path).startswith("file")}


def test_many_files_on_the_staging_folders_file_system_are_flushed_by_one_syncfs(tmp_path):
    tree = tmp_path / "staging" / "op" / "unit-0"
    events = traced_seal(tmp_path, tmp_path / "staging" / "op", tree)
    assert [flushed_file_system(e) for e in flush_calls(events)] == [str(tmp_path / "staging" / "op")]


def test_a_file_system_syncfs_is_not_trusted_with_gets_an_fsync_per_file_and_folder(tmp_path):
    # tmpfs is not one of durable.SYNCFS_FILE_SYSTEMS: a file system not known to commit all with one syncfs
    mounted = tmp_path / "tmpfs"
    tree = mounted / "op" / "unit-0"
    events = traced_seal(tmp_path, mounted / "op", tree, tmpfs=mounted)
    assert not any(flushed_file_system(e) for e in events)
    assert len(file_fsyncs(events, tree)) == SEALED_FILES
    assert {synced(e) for e in events} >= {str(tree), str(tree / "top"), str(tree / "sub")}


def test_a_tree_reaching_into_another_file_system_gets_an_fsync_per_file_and_folder(tmp_path):
    # the staging folder on the test's own file system, half of the tree on a tmpfs mounted inside it
    tree = tmp_path / "staging" / "op" / "unit-0"
    events = traced_seal(tmp_path, tmp_path / "staging" / "op", tree, tmpfs=tree / "sub")
    assert not any(flushed_file_system(e) for e in events)
    assert len(file_fsyncs(events, tree)) == SEALED_FILES
