"""A function the running engine cannot call is refused, and leaves nothing behind anywhere.

A native plugin can open and link cleanly yet export a function symbol that is not an api.Function (an Exec
written for the contract before v2, as upstream's geohash extension still has): eKuiper 2.4 installs it, and
then refuses every rule that uses it. With the engine attached, the service resolves each function of a
function-plugin install, and each name of a register, as a rule's validation does, and refuses the change in
the engine's words. Checked here against a real kuiperd sharing the home with the service under real
gunicorn: the answer, the files, our registry, the engine's store (sqliteKV.db) and the engine's memory
(its plugin and function lists, rules it accepts), in the same engine process and after it restarts.
"""

from __future__ import annotations

import shutil

import psutil
import pytest
import requests
from conftest import _diff, disk_state, engine_dump, registry_dump

pytestmark = pytest.mark.slow

WAIT = 60


@pytest.fixture
def attached(start_kuiperd, start_gunicorn, file_server, mixed_plugin, tmp_path):
    """kuiperd and the service (real gunicorn, 2 workers) on one home, the service's engine.url the engine's."""
    engine = start_kuiperd(tmp_path / "home")
    service = start_gunicorn(workers=2, KUIPER_PLUGINS__ENGINE__URL=engine.url)
    shutil.copyfile(mixed_plugin.zip_path, file_server.root / "mixed.zip")
    created = engine.post("/streams", {"sql": 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo",'
                                              ' FORMAT="json")'})
    assert created.status_code == 201, created.text
    return engine, service


def engine_process(engine) -> tuple[int, float]:
    """The running engine's pid and start time: a restarted engine differs in one of them."""
    process = psutil.Process(engine.process.pid)
    return process.pid, process.create_time()


def restart(engine) -> None:
    """Stop kuiperd and start it again on the same home and ports."""
    engine.stop()
    engine.start()


def rule_answer(engine, rule_id: str, sql: str) -> requests.Response:
    """One attempt at creating a rule (no retry); the rule is removed again when it was created."""
    response = engine.post("/rules", {"id": rule_id, "sql": sql, "actions": [{"log": {}}]})
    if response.status_code == 201:
        assert engine.delete(f"/rules/{rule_id}").status_code == 200
    return response


def everything(engine, service) -> tuple:
    """Disk, our registry, the engine's store, and what the engine lists: all a change could have touched."""
    return (disk_state(service.home), registry_dump(service.home), engine_dump(service.home),
            sorted(engine.get("/plugins/functions").json()), sorted(engine.get("/plugins/udfs").json()))


def assert_unchanged(before: tuple, after: tuple) -> None:
    """Disk, our registry and the engine's store as they were; a failure says which paths or rows differ."""
    assert after[0] == before[0], f"disk changed: {_diff(before[0], after[0])}"
    assert after[1] == before[1], f"registry changed: {sorted(set(after[1]) ^ set(before[1]))}"
    assert after[2] == before[2], f"the engine's store changed: {sorted(set(after[2]) ^ set(before[2]))}"


def install_mixed(service, file_server, functions) -> requests.Response:
    body = {"name": "mixed", "file": file_server.url("mixed.zip"), "functions": list(functions)}
    return requests.post(f"{service.url}/plugins/functions", json=body, timeout=WAIT)


def message(response: requests.Response) -> str:
    return response.json()["message"]


STALE_WORDS = ("validate function stale error: native plugin:exported symbol &{} is not type of api.Function or"
               " function that return api.Function")


def test_an_install_with_a_function_the_engine_cannot_call_is_refused_and_leaves_nothing(attached, file_server):
    engine, service = attached
    before, process = everything(engine, service), engine_process(engine)

    refused = install_mixed(service, file_server, ["good", "stale"])
    assert refused.status_code == 400, refused.text
    assert message(refused).startswith(f"functions plugins create command error: fail to install plugin: {STALE_WORDS}"
                                       " (the running engine cannot call function stale"), message(refused)
    assert "nothing was installed" in message(refused)
    # nothing left: files, our registry, the engine's store; the engine offers none of its functions
    after = everything(engine, service)
    assert_unchanged(before, after)
    assert after[4] == [], after
    # the engine cannot forget an opened plugin before it restarts; it holds it as deleted, as its own delete does
    assert engine.get("/plugins/functions/mixed").json().get("version") in (None, "$deleted")
    answer = rule_answer(engine, "g", "SELECT good(a) FROM demo")
    assert answer.status_code == 400 and "function good not found" in answer.text, answer.text
    assert engine_process(engine) == process  # the same engine: refused live, not by a restart
    assert requests.get(f"{service.url}/plugins/functions", timeout=WAIT).json() == []
    assert requests.get(f"{service.url}/plugins/functions/mixed", timeout=WAIT).status_code == 404

    # the default function list (the plugin's own name) is checked too: the .so has no symbol Mixed
    refused = requests.post(f"{service.url}/plugins/functions", json={
        "name": "mixed", "file": file_server.url("mixed.zip")}, timeout=WAIT)
    assert refused.status_code == 400, refused.text
    assert message(refused).startswith("functions plugins create command error: fail to install plugin:"
                                       " validate function mixed error: "), message(refused)
    assert_unchanged(before, everything(engine, service))

    # after the engine restarts it has nothing of the plugin at all
    restart(engine)
    assert engine.get("/plugins/functions").json() == []
    assert engine.get("/plugins/udfs").json() == []
    assert engine.get("/plugins/functions/mixed").status_code == 404
    assert_unchanged(before, everything(engine, service))


def test_the_callable_functions_alone_install_and_are_live(attached, file_server):
    engine, service = attached
    assert install_mixed(service, file_server, ["good", "stale"]).status_code == 400
    process = engine_process(engine)

    # the same package with the function the engine can call only: accepted, and live at once
    created = install_mixed(service, file_server, ["good"])
    assert created.status_code == 201, created.text
    answer = rule_answer(engine, "g", "SELECT good(a) FROM demo")
    assert answer.status_code == 201, answer.text
    assert engine.get("/plugins/udfs").json() == ["good"]
    assert engine_process(engine) == process
    assert rule_answer(engine, "s", "SELECT stale(a) FROM demo").status_code == 400
    described = requests.get(f"{service.url}/plugins/functions/mixed", timeout=WAIT).json()
    assert described["functions"] == ["good"] and described["engine"] == "loaded", described

    # both sides agree after the engine restarts
    restart(engine)
    assert engine.get("/plugins/functions").json() == ["mixed"]
    assert engine.get("/plugins/udfs").json() == ["good"]
    assert rule_answer(engine, "g", "SELECT good(a) FROM demo").status_code == 201


@pytest.mark.parametrize("added, words", [
    ("stale", STALE_WORDS),
    ("ghost", "validate function ghost error: "),  # the .so exports no symbol Ghost
])
def test_a_register_naming_a_function_the_engine_cannot_call_is_refused(attached, file_server, added, words):
    engine, service = attached
    assert install_mixed(service, file_server, ["good"]).status_code == 201
    before, process = everything(engine, service), engine_process(engine)

    refused = requests.post(f"{service.url}/plugins/functions/mixed/register",
                            json={"functions": ["good", added]}, timeout=WAIT)
    assert refused.status_code == 400, refused.text
    assert message(refused).startswith(f"function plugins mixed regiser functions error: {words}"), message(refused)
    assert message(refused).endswith("the function list is unchanged)"), message(refused)
    assert everything(engine, service) == before  # the engine's list and its pluginFuncs row are the old ones
    assert engine.get("/plugins/udfs").json() == ["good"]
    assert engine_process(engine) == process
    assert requests.get(f"{service.url}/plugins/functions/mixed", timeout=WAIT).json()["functions"] == ["good"]

    restart(engine)
    assert engine.get("/plugins/udfs").json() == ["good"]


def test_describe_says_pending_restart_for_a_plugin_the_engine_deleted(attached, file_server):
    """The engine's own delete leaves the plugin in its memory under version `$deleted` until it restarts."""
    engine, service = attached
    assert install_mixed(service, file_server, ["good"]).status_code == 201
    assert engine.delete("/plugins/functions/mixed").status_code == 200
    assert engine.get("/plugins/functions/mixed").json()["version"] == "$deleted"
    described = requests.get(f"{service.url}/plugins/functions/mixed", timeout=WAIT).json()
    assert described["engine"] == "pending restart", described
