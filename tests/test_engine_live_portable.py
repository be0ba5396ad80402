"""Portable plugins installed, updated and deleted through the service are live in a running kuiperd.

eKuiper's own fvt flow (fvt/portable_test.go), made through the service under real gunicorn on the engine's
home: a stream over the portable source, the plugin installed, a rule whose records reach a loopback sink
server, the plugin updated (its process restarted: a new PID, the new code's records), the plugin deleted
(rules refused, process gone). Each check of the engine is made once, right after our answer, and the
engine's own process must stay the same throughout, so that a restart of the engine cannot pass for live.
"""

from __future__ import annotations

import stat
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
from conftest import engine_dump, make_zip
from test_engine_live import create_stream, engine_process, rest_rule, wait_running

pytestmark = pytest.mark.slow

PYGREET = Path(__file__).resolve().parent / "portable" / "pygreet"
FLOW_TIMEOUT = 30.0
EXIT_TIMEOUT = 5.0
GREETINGS = 'CREATE STREAM greetings () WITH (TYPE="greeting", FORMAT="json")'


def pygreet_zip(path: Path, *, shouting: bool = False, broken: bool = False) -> Path:
    """The pygreet package; `shouting` is version v1.0.1 whose source greets in capitals.

    `broken` declares a Go executable that cannot be started (no execute bit): our package rules let it
    through when the handshake check is off, and the engine refuses it at once (exec fails).
    """
    files = {str(p.relative_to(PYGREET)): p for p in sorted(PYGREET.rglob("*")) if p.is_file()}
    members = {name: p.read_bytes() for name, p in files.items()}
    modes = {name: stat.S_IFREG | stat.S_IMODE(p.stat().st_mode) for name, p in files.items()}
    if shouting:
        members["greeting.py"] = members["greeting.py"].replace(b'{"greeting": self.text}',
                                                                b'{"greeting": self.text.upper()}')
        assert b"upper()" in members["greeting.py"]
        members["pygreet.json"] = members["pygreet.json"].replace(b'"v1.0.0"', b'"v1.0.1"')
    if broken:
        members["pygreet.json"] = (b'{"version": "v2.0.0", "language": "go", "executable": "run",'
                                   b' "sources": ["greeting"], "sinks": ["tally"], "functions": ["shout"]}')
        members["run"] = b"not a program"
        modes["run"] = 0o100644
    return make_zip(path, members, modes=modes)


def plugin_pids(engine) -> list[int]:
    """The live pygreet processes the engine started (its children running pygreet.py)."""
    found = []
    for child in psutil.Process(engine.process.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "pygreet.py" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def gone(pid: int) -> bool:
    """Whether the process has exited (or is an unreaped zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def exited(pid: int) -> bool:
    """Wait (bounded) until a process the engine killed has exited.

    The engine sends SIGKILL before it answers, and so before our answer; the kernel completes the exit
    on its own a moment later. Waiting for that completion is bounded by EXIT_TIMEOUT.
    """
    deadline = time.monotonic() + EXIT_TIMEOUT
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling the exit of a killed process, bounded by the deadline
    return True


def greetings_after(sink_server, count: int, wanted: dict) -> list:
    """Wait (bounded) until a record equal to `wanted` came after the first `count`; return all after `count`."""
    deadline = time.monotonic() + FLOW_TIMEOUT
    while time.monotonic() < deadline:
        later = sink_server.bodies("greetings")[count:]
        if wanted in later:
            return later
        sink_server.wait_for("greetings", len(later) + count + 1, timeout=0.5)
    return sink_server.bodies("greetings")[count:]


def rule_refused(engine, rule_id: str, sql: str) -> requests.Response:
    """One attempt at a rule (no retry); removed again if the engine took it."""
    answer = engine.post("/rules", {"id": rule_id, "sql": sql, "actions": [{"log": {}}]})
    if answer.status_code == 201:
        engine.delete(f"/rules/{rule_id}")
    return answer


def portable_rows(home: Path) -> list[str]:
    return [line for line in engine_dump(home) if line.startswith('INSERT INTO "portablePlugin"')]


@pytest.fixture
def beside(start_kuiperd, start_gunicorn, tmp_path, file_server):
    """kuiperd on the service's home, the service under gunicorn (engine.url from the engine's config)."""

    def start(**env: str):
        engine = start_kuiperd(home=tmp_path / "home")
        server = start_gunicorn(workers=2, **env)
        assert f"engine.url is {engine.url}" in server.log()
        create_stream(engine, GREETINGS)
        return engine, server

    return start


def install(server, file_server, package: str) -> requests.Response:
    return requests.post(f"{server.url}/plugins/portables",
                         json={"name": "pygreet", "file": file_server.url(package)}, timeout=180)


def greeting_rule_running(engine, server, file_server, sink_server) -> None:
    """Install pygreet.zip through the service and start rule `greet`, which sends its records to the sink."""
    assert install(server, file_server, "pygreet.zip").status_code == 201
    assert engine.post("/rules", rest_rule("greet", "SELECT greeting FROM greetings",
                                           sink_server.url("greetings"))).status_code == 201
    assert sink_server.wait_for("greetings", 1, timeout=FLOW_TIMEOUT), engine.log()


def test_a_portable_install_through_the_service_feeds_a_rule_at_once(beside, file_server, sink_server, tmp_path):
    # the handshake check on: the service starts the plugin itself once, confined, before the engine does
    engine, server = beside(KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL="true")
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "pygreet.zip")
    rule = rest_rule("greet", "SELECT greeting FROM greetings", sink_server.url("greetings"))
    refused = engine.post("/rules", rule)
    assert refused.status_code == 400 and "source type greeting not found" in refused.text, refused.text
    before = engine_process(engine)

    created = install(server, file_server, "pygreet.zip")
    assert created.status_code == 201, created.text
    # right after our answer, once: the engine takes the rule, its process is running
    accepted = engine.post("/rules", rule)
    assert accepted.status_code == 201, accepted.text
    assert len(plugin_pids(engine)) == 1
    assert wait_running(engine, "greet")["status"] == "running"
    out = sink_server.wait_for("greetings", 2, timeout=FLOW_TIMEOUT)
    assert len(out) >= 2 and all(body == {"greeting": "hello"} for body in out), f"{out}\n{engine.log()}"
    status = requests.get(f"{server.url}/plugins/portables/pygreet/status", timeout=30).json()
    assert status["status"] == "running" and status["refCount"] == {"greet": 1}, status
    assert engine_process(engine) == before

    # the files are the package's, no hand-over zip is left, and the store row names our request
    with zipfile.ZipFile(file_server.root / "pygreet.zip") as package:
        for member, path in (("pygreet.py", "plugins/portable/pygreet/pygreet.py"),
                             ("pygreet.json", "plugins/portable/pygreet/pygreet.json"),
                             ("sources/greeting.yaml", "etc/sources/greeting.yaml"),
                             ("sources/greeting.yaml", "data/sources/greeting.yaml")):
            assert (home / path).read_bytes() == package.read(member), path
    assert list((home / "data" / "uploads").iterdir()) == []
    assert not (home / "plugins" / "portable" / "pygreet.zip").exists()
    assert list((home / "data" / ".kuiper-plugins" / "staging").iterdir()) == []
    rows = portable_rows(home)
    assert len(rows) == 1 and file_server.url("pygreet.zip").encode().hex().upper() in rows[0], rows
    described = requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).json()
    assert (described["version"], described["engine"]) == ("v1.0.0", "loaded"), described


def test_a_portable_update_through_the_service_restarts_the_plugin_with_the_new_code(
        beside, file_server, sink_server, tmp_path):
    engine, server = beside()
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "pygreet.zip")
    pygreet_zip(file_server.root / "shouting.zip", shouting=True)
    greeting_rule_running(engine, server, file_server, sink_server)
    [old] = plugin_pids(engine)
    before = engine_process(engine)

    updated = requests.put(f"{server.url}/plugins/portables/pygreet",
                           json={"name": "pygreet", "file": file_server.url("shouting.zip")}, timeout=180)
    assert updated.status_code == 200, updated.text
    # right after our answer: the old process is killed, a new one runs the new code, the engine is the same
    assert exited(old), f"the old plugin process {old} still runs"
    [new] = plugin_pids(engine)
    assert new != old
    assert engine_process(engine) == before
    offered = engine.get("/plugins/portables/pygreet").json()
    assert offered["version"] == "v1.0.1", offered
    # the running rule's source is served by the new process: the new code's records come (bounded wait)
    count = len(sink_server.bodies("greetings"))
    later = greetings_after(sink_server, count, {"greeting": "HELLO"})
    assert {"greeting": "HELLO"} in later, f"{later}\n{engine.log()}"
    assert later[-1] == {"greeting": "HELLO"}
    assert engine.get("/rules/greet/status").json()["status"] == "running"
    assert engine_process(engine) == before

    with zipfile.ZipFile(file_server.root / "shouting.zip") as package:
        assert (home / "plugins/portable/pygreet/greeting.py").read_bytes() == package.read("greeting.py")
    assert list((home / "data" / "uploads").iterdir()) == []
    rows = portable_rows(home)
    assert len(rows) == 1 and file_server.url("shouting.zip").encode().hex().upper() in rows[0], rows
    described = requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).json()
    assert (described["version"], described["engine"]) == ("v1.0.1", "loaded"), described


def test_a_portable_delete_through_the_service_stops_the_plugin_and_keeps_what_is_not_ours(
        beside, file_server, sink_server, tmp_path):
    engine, server = beside()
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "pygreet.zip")
    greeting_rule_running(engine, server, file_server, sink_server)
    [pid] = plugin_pids(engine)
    # a file the engine's own delete removes (a yaml for the plugin's sink), that no install of ours wrote
    users = home / "etc" / "sinks" / "tally.yaml"
    users.write_text("default: {mine: true}\n")
    before = engine_process(engine)

    deleted = requests.delete(f"{server.url}/plugins/portables/pygreet", timeout=180)
    assert deleted.status_code == 200, deleted.text
    # right after our answer, once: new rules over the source are refused, the process is gone
    answer = rule_refused(engine, "again", "SELECT greeting FROM greetings")
    assert answer.status_code == 400 and "source type greeting not found" in answer.text, answer.text
    assert engine.get("/plugins/portables/pygreet").status_code == 404
    assert exited(pid), f"the plugin process {pid} still runs"
    assert plugin_pids(engine) == []
    assert engine_process(engine) == before

    assert not (home / "plugins" / "portable" / "pygreet").exists()
    assert not (home / "data" / "sources" / "greeting.json").exists()
    assert users.read_text() == "default: {mine: true}\n"
    assert portable_rows(home) == []
    assert requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).status_code == 404
    assert list((home / "data" / ".kuiper-plugins" / "staging").iterdir()) == []


def test_the_engines_refusal_of_a_portable_install_is_ours_and_undoes_everything(
        beside, file_server, tmp_path):
    from conftest import disk_state

    engine, server = beside()  # the handshake check off: only the engine can find the executable unusable
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "broken.zip", broken=True)
    state = disk_state(home)
    rows = portable_rows(home)

    refused = install(server, file_server, "broken.zip")
    assert refused.status_code == 400, refused.text
    message = refused.json()["message"]
    assert message.startswith("portable plugin create command error: fail to install plugin: "), message
    assert "permission denied" in message, message
    assert disk_state(home) == state
    assert portable_rows(home) == rows
    assert engine.get("/plugins/portables/pygreet").status_code == 404
    assert requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).status_code == 404


def test_a_refused_portable_update_leaves_the_engine_running_the_old_plugin(
        beside, file_server, sink_server, tmp_path):
    engine, server = beside()
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "pygreet.zip")
    pygreet_zip(file_server.root / "broken.zip", broken=True)
    greeting_rule_running(engine, server, file_server, sink_server)
    old_json = (home / "plugins/portable/pygreet/pygreet.json").read_bytes()
    before = engine_process(engine)

    refused = requests.put(f"{server.url}/plugins/portables/pygreet",
                           json={"name": "pygreet", "file": file_server.url("broken.zip")}, timeout=180)
    assert refused.status_code == 400, refused.text
    assert refused.json()["message"].startswith("portable plugin update command error: fail to install plugin: ")
    # the old plugin is back on disk and in the engine, which runs it again (a new process, the old code)
    assert (home / "plugins/portable/pygreet/pygreet.json").read_bytes() == old_json
    assert not (home / "plugins/portable/pygreet/run").exists()
    assert engine.get("/plugins/portables/pygreet").json()["version"] == "v1.0.0"
    assert len(plugin_pids(engine)) == 1
    count = len(sink_server.bodies("greetings"))
    assert sink_server.wait_for("greetings", count + 1, timeout=FLOW_TIMEOUT)[count:], engine.log()
    assert engine_process(engine) == before
    rows = portable_rows(home)
    assert len(rows) == 1 and file_server.url("pygreet.zip").encode().hex().upper() in rows[0], rows
    described = requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).json()
    assert (described["version"], described["engine"]) == ("v1.0.0", "loaded"), described


def test_describe_says_pending_restart_while_the_engine_runs_another_version(
        beside, start_gunicorn, file_server, tmp_path):
    from conftest import free_port

    engine, server = beside()
    pygreet_zip(file_server.root / "pygreet.zip")
    pygreet_zip(file_server.root / "shouting.zip", shouting=True)
    assert install(server, file_server, "pygreet.zip").status_code == 201
    server.stop()
    # updated while the engine cannot be reached: files and rows for its next start; it keeps v1.0.0 running
    detached = start_gunicorn(workers=2, KUIPER_PLUGINS__ENGINE__URL=f"http://127.0.0.1:{free_port()}")
    updated = requests.put(f"{detached.url}/plugins/portables/pygreet",
                           json={"name": "pygreet", "file": file_server.url("shouting.zip")}, timeout=180)
    assert updated.status_code == 200, updated.text
    assert requests.get(f"{detached.url}/plugins/portables/pygreet", timeout=30).json()["engine"] == "unknown"
    detached.stop()

    attached = start_gunicorn(workers=2)
    described = requests.get(f"{attached.url}/plugins/portables/pygreet", timeout=30).json()
    assert engine.get("/plugins/portables/pygreet").json()["version"] == "v1.0.0"
    assert (described["version"], described["engine"]) == ("v1.0.1", "pending restart"), described


def test_start_up_puts_our_files_back_over_what_a_crashed_hand_over_left(tmp_path, make_service):
    """A worker killed while the engine's install had rewritten our files (no journal, reservation lost).

    The staging folder holds the list and the hard links of our files: start-up must put each back over
    the engine's copy, and remove what the engine wrote where nothing was, before removing the folder.
    """
    from kuiper_plugins.layout import Layout

    home = tmp_path / "home"
    make_service().stop()
    layout = Layout(home)
    ours = home / "etc" / "sources" / "greeting.yaml"
    made = home / "data" / "sources" / "greeting.yaml"
    ours.parent.mkdir(parents=True, exist_ok=True)
    made.parent.mkdir(parents=True, exist_ok=True)
    workdir = layout.staging / "0123456789abcdef0123456789abcdef"
    (workdir / "engine-handed").mkdir(parents=True)
    (workdir / "engine-handed" / "0").write_text("default: {text: mine}\n")  # our sealed file, linked aside
    ours.write_text("default: {text: hello}\n")  # the engine's rewrite
    made.write_text("default: {text: hello}\n")  # written by the engine where none was
    (workdir / "engine-handed.json").write_text(
        '[{"dest": "etc/sources/greeting.yaml", "kept": "0"}, {"dest": "data/sources/greeting.yaml", "kept": null}]')

    make_service().stop()  # start-up recovery
    assert ours.read_text() == "default: {text: mine}\n"
    assert not made.exists()
    assert list(layout.staging.iterdir()) == []
