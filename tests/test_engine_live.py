"""A real kuiperd 2.4.0 takes plugins through its own REST API and runs rules that use them.

The baseline for the live-engine work: the engine built from Go modules (tests/engine_fixtures.py), a native
function plugin of ours built against it (tests/go/kuiperd/multi) and a portable plugin on eKuiper's Python
SDK (tests/portable/pygreet), each installed through kuiperd's own API and used by a running rule whose
output the test receives on a loopback server.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests
from conftest import REPO, engine_dump, make_zip

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

PORTABLE = Path(__file__).resolve().parent / "portable"
ACCEPT_TIMEOUT = 30.0
FLOW_TIMEOUT = 30.0


def create_stream(engine, sql: str) -> None:
    response = engine.post("/streams", {"sql": sql})
    assert response.status_code == 201, response.text


def rest_rule(rule_id: str, sql: str, sink_url: str) -> dict:
    """A rule whose every output record is posted, one JSON object each, to `sink_url`."""
    return {"id": rule_id, "sql": sql, "actions": [{"rest": {"url": sink_url, "method": "post", "sendSingle": True}}]}


def accepted_after(engine, rule: dict, since: float) -> float:
    """Create the rule, retrying (bounded) while the engine refuses it; return seconds from `since` to the 201."""
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while True:
        response = engine.post("/rules", rule)
        if response.status_code == 201:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"rule not accepted in {ACCEPT_TIMEOUT} s: {response.text}"
        time.sleep(0.1)  # asking again, bounded by the deadline


def wait_running(engine, rule_id: str) -> dict:
    """The rule's status once it says running (bounded)."""
    deadline = time.monotonic() + FLOW_TIMEOUT
    while True:
        status = engine.get(f"/rules/{rule_id}/status").json()
        if status.get("status") == "running":
            return status
        assert time.monotonic() < deadline, f"rule {rule_id} is not running: {status}\n{engine.log()}"
        time.sleep(0.1)  # polling the rule's state, bounded by the deadline


def listening(engine) -> set[tuple[str, int]]:
    """The (address, port) of every socket the engine's process listens on."""
    return {(conn.laddr.ip, conn.laddr.port) for conn in psutil.Process(engine.process.pid).net_connections("inet")
            if conn.status == psutil.CONN_LISTEN}


def say(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def test_kuiperd_runs_from_the_cached_build_on_loopback_only(kuiperd, kuiperd_build, capsys):
    answer = kuiperd.get("/")
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == "2.4.0"

    # the process answering is the cached build, kept outside the clone
    engine = psutil.Process(kuiperd.process.pid)
    assert Path(engine.exe()) == kuiperd_build.binary
    assert not kuiperd_build.binary.is_relative_to(REPO)
    assert engine.environ()["KuiperBaseKey"] == str(kuiperd.home)

    # every socket it listens on is a loopback one, the REST and CLI ports among them
    sockets = listening(kuiperd)
    assert {("127.0.0.1", kuiperd.rest_port), ("127.0.0.1", kuiperd.cli_port)} <= sockets
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets

    # its /tmp is a file system of its own, not the host's
    assert os.stat(f"/proc/{engine.pid}/root/tmp").st_dev != os.stat("/tmp").st_dev

    built = "warm cache" if kuiperd_build.built_in is None else f"built in {kuiperd_build.built_in:.0f} s"
    say(capsys, f"kuiperd {answer.json()['version']} from {kuiperd_build.binary} ({built})")


def test_a_native_function_plugin_installed_through_kuiperd_runs_in_a_rule(kuiperd, multi_plugin, sink_server, capsys):
    create_stream(kuiperd, 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo", FORMAT="json")')
    rule = rest_rule("twice_shout", "SELECT twice(a) AS t, shout(s) AS u FROM demo", sink_server.url("multi"))
    refused = kuiperd.post("/rules", rule)
    assert refused.status_code == 400
    assert "function twice not found" in refused.text

    shutil.copyfile(multi_plugin.zip_path, kuiperd.uploads / "multi.zip")
    created = kuiperd.post("/plugins/functions", {
        "name": "multi", "file": f"file://{kuiperd.uploads / 'multi.zip'}", "functions": ["twice", "shout"],
    })
    installed_at = time.monotonic()
    assert created.status_code == 201, created.text
    assert (kuiperd.home / "plugins" / "functions" / multi_plugin.so_name).is_file()
    assert sorted(kuiperd.get("/plugins/udfs").json()) == ["shout", "twice"]

    seconds = accepted_after(kuiperd, rule, installed_at)
    wait_running(kuiperd, "twice_shout")
    # The push endpoint exists only once the rule's source has connected, and a record pushed before its
    # subscription is not kept: push fresh records until one comes out (bounded), then check what came.
    deadline = time.monotonic() + FLOW_TIMEOUT
    while not sink_server.bodies("multi") and time.monotonic() < deadline:
        try:
            requests.post(f"{kuiperd.push_url}/demo", json={"a": 21, "s": "hi"}, timeout=5)
        except requests.ConnectionError:
            pass  # the engine's data server starts with the first push endpoint
        sink_server.wait_for("multi", 1, timeout=0.25)
    out = sink_server.bodies("multi")
    assert out, f"no output from the rule in {FLOW_TIMEOUT} s:\n{kuiperd.log()}"
    assert all(body == {"t": 42, "u": "HI"} for body in out), out
    # the data server the push endpoint opened listens on loopback too
    sockets = listening(kuiperd)
    assert ("127.0.0.1", kuiperd.http_server_port) in sockets
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    built = "from cache" if multi_plugin.built_in is None else f"built in {multi_plugin.built_in:.0f} s"
    say(capsys, f"multi: kuiperd's 201 to the rule's acceptance: {seconds:.2f} s (plugin {built})")


def test_a_portable_source_installed_through_kuiperd_feeds_a_rule(kuiperd, sink_server, capsys):
    create_stream(kuiperd, 'CREATE STREAM greetings () WITH (TYPE="greeting", FORMAT="json")')
    rule = rest_rule("greet", "SELECT greeting FROM greetings", sink_server.url("greetings"))
    refused = kuiperd.post("/rules", rule)
    assert refused.status_code == 400
    assert "source type greeting not found" in refused.text

    folder = PORTABLE / "pygreet"
    files = {str(path.relative_to(folder)): path for path in sorted(folder.rglob("*")) if path.is_file()}
    make_zip(kuiperd.uploads / "pygreet.zip", {name: path.read_bytes() for name, path in files.items()},
             modes={name: stat.S_IFREG | stat.S_IMODE(path.stat().st_mode) for name, path in files.items()})
    created = kuiperd.post("/plugins/portables", {"name": "pygreet", "file": f"file://{kuiperd.uploads}/pygreet.zip"})
    installed_at = time.monotonic()
    assert created.status_code == 201, created.text

    seconds = accepted_after(kuiperd, rule, installed_at)
    wait_running(kuiperd, "greet")
    # the greeting source emits one record a second (tests/portable/pygreet/sources/greeting.yaml)
    out = sink_server.wait_for("greetings", 3, timeout=FLOW_TIMEOUT)
    assert len(out) >= 3, f"{len(out)} records in {FLOW_TIMEOUT} s:\n{kuiperd.log()}"
    assert all(body == {"greeting": "hello"} for body in out), out

    status = kuiperd.get("/plugins/portables/pygreet/status")
    assert status.status_code == 200, status.text
    assert status.json()["status"] == "running"
    assert status.json()["refCount"] == {"greet": 1}
    # the plugin's control socket is in the engine's private /tmp
    assert Path(f"/proc/{kuiperd.process.pid}/root/tmp/plugin_pygreet.ipc").exists()
    say(capsys, f"pygreet: kuiperd's 201 to the rule's acceptance: {seconds:.2f} s")


# ---------------------------------------------------------------------------- our service, live in the engine
# The service and kuiperd share one home (the service is the engine's plugin manager), with engine.url set:
# each change must be in the running engine when the service answers. Every check of the engine is made
# once, right after our answer (no retry), and the engine's process must be the one that was running
# before, so that a restart cannot pass for a live change.


@pytest.fixture
def home(tmp_path) -> Path:
    """The service's home is the engine's (start_kuiperd's first engine lives in tmp_path/engine)."""
    return tmp_path / "engine"


@pytest.fixture
def live(kuiperd, make_service, file_server, multi_plugin):
    """The service attached to the running kuiperd, the multi package served, and the engine's demo stream."""
    service = make_service(engine_url=kuiperd.url)
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    create_stream(kuiperd, 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo", FORMAT="json")')
    yield service
    service.stop()


def engine_process(engine) -> tuple[int, float]:
    """The running engine's pid and start time: a restarted engine differs in one of them."""
    process = psutil.Process(engine.process.pid)
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return process.pid, process.create_time()


def install_multi(service, file_server, functions=("twice", "shout")):
    return service.post("functions", {"name": "multi", "file": file_server.url("multi.zip"),
                                      "functions": list(functions)})


def rule_answer(engine, rule_id: str, sql: str) -> requests.Response:
    """One attempt at creating a rule (no retry); the rule is removed again when it was created."""
    response = engine.post("/rules", {"id": rule_id, "sql": sql, "actions": [{"log": {}}]})
    if response.status_code == 201:
        assert engine.delete(f"/rules/{rule_id}").status_code == 200
    return response


def test_an_install_through_the_service_is_live_in_the_running_engine(live, kuiperd, file_server, multi_plugin):
    before = engine_process(kuiperd)
    assert rule_answer(kuiperd, "early", "SELECT twice(a) FROM demo").status_code == 400

    created = install_multi(live, file_server)
    assert created.status_code == 201, created.get_data(as_text=True)
    # right after our answer, with no retry: the engine accepts rules using both functions
    for rule_id, sql in (("t", "SELECT twice(a) FROM demo"), ("s", "SELECT shout(s) FROM demo")):
        answer = rule_answer(kuiperd, rule_id, sql)
        assert answer.status_code == 201, answer.text
    assert sorted(kuiperd.get("/plugins/udfs").json()) == ["shout", "twice"]
    assert engine_process(kuiperd) == before  # the same engine process: live, not restarted

    # the file at the path is the one we verified and sealed, no hand-over package is left anywhere
    so_path = kuiperd.home / "plugins" / "functions" / multi_plugin.so_name
    with zipfile.ZipFile(multi_plugin.zip_path) as package:
        assert so_path.read_bytes() == package.read(multi_plugin.so_name)
    assert sorted(p.name for p in kuiperd.uploads.iterdir()) == []
    assert not (kuiperd.home / "plugins" / "multi.zip").exists()
    assert list(live.layout.staging.iterdir()) == []
    # eKuiper's store holds our request (its file URL), not the engine's view of the hand-over
    store = "\n".join(engine_dump(kuiperd.home))  # blobs shown in hex
    assert file_server.url("multi.zip").encode().hex().upper() in store
    assert b".kuiper-plugins-".hex().upper() not in store

    described = live.client.get("/plugins/functions/multi")
    assert described.status_code == 200
    assert described.get_json() == {"name": "multi", "version": "1.0.0", "functions": ["twice", "shout"],
                                    "engine": "loaded"}


def test_a_delete_through_the_service_is_live_and_keeps_what_is_not_ours(live, kuiperd, file_server, multi_plugin):
    assert install_multi(live, file_server).status_code == 201
    assert rule_answer(kuiperd, "t", "SELECT twice(a) FROM demo").status_code == 201
    # a file eKuiper's own delete would remove, that no install of ours wrote: a user's
    users = kuiperd.home / "etc" / "functions" / "multi.json"
    users.write_text('{"about": "mine"}')
    before = engine_process(kuiperd)

    deleted = live.client.delete("/plugins/functions/multi")
    assert deleted.status_code == 200, deleted.get_data(as_text=True)
    answer = rule_answer(kuiperd, "t2", "SELECT twice(a) FROM demo")
    assert answer.status_code == 400 and "function twice not found" in answer.text, answer.text
    assert kuiperd.get("/plugins/udfs").json() == []
    assert engine_process(kuiperd) == before

    assert not (kuiperd.home / "plugins" / "functions" / multi_plugin.so_name).exists()
    assert users.read_text() == '{"about": "mine"}'
    assert live.client.get("/plugins/functions/multi").status_code == 404
    assert list(live.layout.staging.iterdir()) == []


def test_a_function_list_registered_through_the_service_is_live(live, kuiperd, file_server):
    assert install_multi(live, file_server).status_code == 201
    before = engine_process(kuiperd)

    registered = live.client.post("/plugins/functions/multi/register", json={"functions": ["twice"]})
    assert registered.status_code == 200, registered.get_data(as_text=True)
    assert kuiperd.get("/plugins/udfs").json() == ["twice"]
    assert rule_answer(kuiperd, "t", "SELECT twice(a) FROM demo").status_code == 201
    answer = rule_answer(kuiperd, "s", "SELECT shout(s) FROM demo")
    assert answer.status_code == 400 and "function shout not found" in answer.text, answer.text
    assert engine_process(kuiperd) == before
    assert live.client.get("/plugins/functions/multi").get_json()["functions"] == ["twice"]


def test_a_damaged_plugin_is_not_handed_to_the_running_engine(live, kuiperd, file_server, multi_plugin):
    """A register of a function plugin whose .so is gone reaches neither the engine nor its store."""
    assert install_multi(live, file_server).status_code == 201
    before = engine_process(kuiperd)
    (kuiperd.home / "plugins" / "functions" / multi_plugin.so_name).unlink()
    rows = engine_dump(kuiperd.home)

    refused = live.client.post("/plugins/functions/multi/register", json={"functions": ["twice"]})

    assert refused.status_code == 400, refused.get_data(as_text=True)
    assert "functions plugin multi is damaged" in refused.get_json()["message"]
    # the engine still has the list of the install: it was handed nothing
    assert sorted(kuiperd.get("/plugins/udfs").json()) == ["shout", "twice"]
    assert rule_answer(kuiperd, "s", "SELECT shout(s) FROM demo").status_code == 201
    assert engine_dump(kuiperd.home) == rows
    assert engine_process(kuiperd) == before

    # repaired from its recorded source (a native update: the engine keeps the loaded code), then registered
    repaired = live.client.post("/registry/repair").get_json()
    assert [(r["type"], r["name"]) for r in repaired["repaired"]] == [("functions", "multi")], repaired
    registered = live.client.post("/plugins/functions/multi/register", json={"functions": ["twice"]})
    assert registered.status_code == 200, registered.get_data(as_text=True)
    assert kuiperd.get("/plugins/udfs").json() == ["twice"]
    assert engine_process(kuiperd) == before


def test_describe_says_whether_the_engine_has_the_plugin(kuiperd, make_service, file_server, multi_plugin):
    from conftest import free_port

    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    # installed while the engine cannot be reached: files and rows for its next start, as without an engine
    detached = make_service(engine_url=f"http://127.0.0.1:{free_port()}")
    assert install_multi(detached, file_server).status_code == 201
    assert detached.client.get("/plugins/functions/multi").get_json()["engine"] == "unknown"
    detached.stop()
    assert kuiperd.get("/plugins/udfs").json() == []

    attached = make_service(engine_url=kuiperd.url)
    try:
        assert attached.client.get("/plugins/functions/multi").get_json()["engine"] == "pending restart"
    finally:
        attached.stop()


def test_start_up_puts_back_what_a_crash_left_set_aside_around_the_engines_delete(home, make_service):
    """A worker killed between shielding files from the engine's delete and putting them back.

    The staging folder holds only the list and the files set aside (no journal yet, the reservation lost
    to a power cut): start-up must put each file back where it is missing before removing the folder.
    """
    service = make_service()
    service.stop()
    layout = Layout(home)
    config = home / "etc" / "sources" / "mine.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    workdir = layout.staging / "0123456789abcdef0123456789abcdef"
    (workdir / "engine-aside").mkdir(parents=True)
    (workdir / "engine-aside" / "1").write_text("default: {interval: 1000}\n")
    (workdir / "engine-aside.json").write_text(json.dumps([{"dest": "etc/sources/mine.yaml", "aside": "1",
                                                            "linked": False}]))
    assert not config.exists()

    make_service().stop()  # start-up recovery
    assert config.read_text() == "default: {interval: 1000}\n"
    assert list(layout.staging.iterdir()) == []
