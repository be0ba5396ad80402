"""GET /engine/pending against a real kuiperd: the changes the running engine takes only at its restart.

A native update made while the engine runs is listed until the engine restarts; a native delete is listed
while the engine still keeps the plugin as deleted; an install made while the engine could not be reached
is listed once an engine that started before it is attached. GET / counts what GET /engine/pending lists.
Through the test client and through real gunicorn.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import time

import pytest
import requests
from conftest import free_port
from json_stub import JsonStub

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path):
    """The service's home is the engine's (start_kuiperd's first engine lives in tmp_path/engine)."""
    return tmp_path / "engine"


@pytest.fixture
def served(file_server, multi_plugin, multi_plugin_v2):
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    shutil.copyfile(multi_plugin_v2.zip_path, file_server.root / "multi2.zip")
    return file_server


def multi(file_server, zip_name: str = "multi.zip") -> dict:
    return {"name": "multi", "file": file_server.url(zip_name), "functions": ["twice", "shout"]}


def pending_restart(service) -> int | None:
    return service.client.get("/").get_json()["engine"]["pendingRestart"]


def pending_of(service, *, engine_restarted: bool = False) -> list[tuple[str, str, str, str | None]]:
    """GET /engine/pending's list, checked against GET /'s count, asked before it and after it.

    GET / counts from the engine's last known start (its GET /, kept a minute): right after the engine's
    restart it is asked only after the list, whose GET / of the engine gives the new start at once.
    """
    before = None if engine_restarted else pending_restart(service)
    answer = service.client.get("/engine/pending")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["count"] == len(body["pending"])
    assert pending_restart(service) == body["count"]
    if before is not None:
        assert before == body["count"]
    return [(c["type"], c["name"], c["change"], c["version"]) for c in body["pending"]]


def test_a_native_update_is_pending_until_the_engine_restarts(kuiperd, make_service, served):
    service = make_service(engine_url=kuiperd.url)
    assert service.post("functions", multi(served)).status_code == 201
    assert pending_of(service) == []  # a new native plugin is handed to the engine: live at once

    updated = service.client.put("/plugins/functions/multi", json=multi(served, "multi2.zip"))
    assert updated.status_code == 200, updated.get_data(as_text=True)
    assert pending_of(service) == [("functions", "multi", "update", "2.0.0")]
    reason = service.client.get("/engine/pending").get_json()["pending"][0]["reason"]
    assert "Go cannot unload" in reason

    # The restarted engine's start is after the update (the update's answer came before kuiperd.stop()).
    kuiperd.stop()
    kuiperd.start()
    assert pending_of(service, engine_restarted=True) == []

    # The engine runs 2.0.0 now: a rollback to 1.0.0 is a native update it takes at its next start.
    rolled_back = service.client.post("/plugins/functions/multi/rollback")
    assert rolled_back.status_code == 200, rolled_back.get_data(as_text=True)
    assert pending_of(service) == [("functions", "multi", "update", "1.0.0")]
    service.stop()


def test_a_native_delete_is_pending_while_the_engine_keeps_the_plugin(kuiperd, make_service, served):
    service = make_service(engine_url=kuiperd.url)
    assert service.post("functions", multi(served)).status_code == 201
    assert pending_of(service) == []
    assert service.client.delete("/plugins/functions/multi").status_code == 200

    assert pending_of(service) == [("functions", "multi", "delete", None)]
    kuiperd.stop()
    kuiperd.start()
    assert pending_of(service, engine_restarted=True) == []
    service.stop()


def test_an_install_made_while_the_engine_was_unreachable_is_pending(kuiperd, make_service, served):
    detached = make_service(engine_url=f"http://127.0.0.1:{free_port()}")
    assert detached.post("functions", multi(served)).status_code == 201
    detached.stop()

    attached = make_service(engine_url=kuiperd.url)
    assert pending_of(attached) == [("functions", "multi", "install", "1.0.0")]
    changes = attached.client.get("/engine/pending").get_json()["pending"]
    assert "could not be reached" in changes[0]["reason"]
    attached.stop()


class SameSecondEngine(JsonStub):
    """A loopback engine answering eKuiper's GET / and native describe, restarted within one second.

    Its GET / counts upTimeSeconds as eKuiper does (whole seconds now less whole seconds at `started`), and
    its describe of `multi` answers 404 or the version it has loaded, which a restart changes.
    """

    def __init__(self, started: float):
        self.started, self.loaded = started, None
        super().__init__(self._answer)

    def _answer(self, path: str, headers) -> tuple[int, dict]:
        if path == "/":
            up = math.floor(time.time()) - math.floor(self.started)
            return 200, {"version": "2.4.0", "os": "linux", "arch": "amd64", "upTimeSeconds": up}
        if path == "/plugins/functions/multi" and self.loaded:
            return 200, {"name": "multi", "version": self.loaded}
        return 404, {"error": 1002, "message": "not found"}


def test_an_engine_restarted_within_the_same_second_is_asked_again(make_service, home, served):
    """GET /'s confirmation of a change made around the engine's start holds for that start only.

    The install is noted pending (no engine answered); an engine that started in the install's second does
    not offer it, so GET / counts it. That engine restarts within the same second and loads it: both
    endpoints must now say nothing is pending, GET / included (it once kept the first start's verdict,
    keyed by the start's whole second).
    """
    detached = make_service(engine_url=f"http://127.0.0.1:{free_port()}")
    assert detached.post("functions", multi(served)).status_code == 201
    detached.stop()
    conn = sqlite3.connect(Layout(home).registry_file)
    [(noted_at,)] = conn.execute("SELECT at FROM engine_pending WHERE name = 'multi'").fetchall()
    conn.close()

    engine = SameSecondEngine(started=noted_at)
    try:
        attached = make_service(engine_url=engine.url, engine_sync_interval=0)
        assert pending_of(attached) == [("functions", "multi", "install", "1.0.0")]
        engine.loaded = "1.0.0"  # the restart, in the same second: it loads the plugin from disk
        assert pending_of(attached, engine_restarted=True) == []
        attached.stop()
    finally:
        engine.stop()


def test_without_an_engine_pending_is_refused_and_readiness_says_nothing_of_it(service):
    answer = service.client.get("/engine/pending")
    assert answer.status_code == 400 and "set engine.url" in answer.get_json()["message"]
    assert "engine" not in service.client.get("/").get_json()


def test_pending_through_gunicorn(tmp_path, start_kuiperd, start_gunicorn, served):
    start_kuiperd(home=tmp_path / "home")  # the service's home is the engine's: it finds it from kuiper.yaml
    server = start_gunicorn(workers=2)
    assert requests.post(f"{server.url}/plugins/functions", json=multi(served), timeout=60).status_code == 201
    for _ in range(4):  # each worker keeps a count of 0
        assert requests.get(f"{server.url}/", timeout=30).json()["engine"] == {"pendingRestart": 0}
        assert requests.get(f"{server.url}/engine/pending", timeout=30).json()["pending"] == []
    updated = requests.put(f"{server.url}/plugins/functions/multi", json=multi(served, "multi2.zip"), timeout=60)
    assert updated.status_code == 200, updated.text

    for _ in range(4):  # both workers answer alike, whichever made the change
        assert requests.get(f"{server.url}/", timeout=30).json()["engine"] == {"pendingRestart": 1}
        body = requests.get(f"{server.url}/engine/pending", timeout=30).json()
        assert [(c["name"], c["change"], c["version"]) for c in body["pending"]] == [("multi", "update", "2.0.0")]

    # The engine runs 1.0.0 and cannot find that version's .so to delete it (the update replaced it): it keeps
    # offering the plugin as it was, listed as no change of ours; GET / agrees.
    assert requests.delete(f"{server.url}/plugins/functions/multi", timeout=60).status_code == 200
    for _ in range(4):
        counted = requests.get(f"{server.url}/", timeout=30).json()["engine"]["pendingRestart"]
        assert requests.get(f"{server.url}/engine/pending", timeout=30).json()["count"] == counted


def test_the_documented_example_answers_its_documented_status(kuiperd, make_service, served):
    """GET /engine/pending as the OpenAPI document gives it (test_openapi.py replays the other lifecycle ones)."""
    from test_openapi import documented_requests

    service = make_service(engine_url=kuiperd.url)
    assert service.post("functions", multi(served)).status_code == 201
    document = service.client.get("/openapi.json").get_json()
    [(method, url, query, body, sent)] = documented_requests(document)["listPendingRestart"]
    answer = service.client.open(url, method=method.upper(), query_string=query, json=body, headers=sent)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    example = document["paths"]["/engine/pending"]["get"]["responses"]["200"]["content"]["application/json"]["example"]
    assert set(answer.get_json()) == set(example)
    service.stop()
