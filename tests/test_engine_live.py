"""A real kuiperd 2.4.0 takes plugins through its own REST API and runs rules that use them.

The baseline for the live-engine work: the engine built from Go modules (tests/engine_fixtures.py), a native
function plugin of ours built against it (tests/go/kuiperd/multi) and a portable plugin on eKuiper's Python
SDK (tests/portable/pygreet), each installed through kuiperd's own API and used by a running rule whose
output the test receives on a loopback server.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import REPO, make_zip

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
