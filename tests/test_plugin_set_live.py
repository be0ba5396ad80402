"""An apply beside a running kuiperd 2.4.0 (engine.url set, one home): each step is live in the engine when the
answer comes, and an undone apply leaves the engine offering what it offered before, with no restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest
from test_engine_live import create_stream, rule_answer

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path) -> Path:
    """The service's home is the engine's (start_kuiperd's first engine lives in tmp_path/engine)."""
    return tmp_path / "engine"


def engine_process(engine) -> tuple[int, float]:
    process = psutil.Process(engine.process.pid)
    return process.pid, process.create_time()


def test_an_apply_is_live_in_the_running_engine_and_its_undo_too(kuiperd, make_service, file_server, multi_plugin):
    service = make_service(engine_url=kuiperd.url)
    try:
        shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
        create_stream(kuiperd, 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo", FORMAT="json")')
        started = engine_process(kuiperd)
        multi = {"file": file_server.url("multi.zip"), "functions": list(multi_plugin.functions)}

        # multi is installed (live), then zz's download fails: the engine is handed the delete as well
        failed = service.client.put("/config/plugins", json={"functions": {
            "multi": multi, "zz": {"file": file_server.url("missing.zip")}}})

        assert failed.status_code == 400, failed.get_data(as_text=True)
        assert [(c["action"], c["name"]) for c in failed.get_json()["rolledBack"]] == [("install", "multi")]
        assert kuiperd.get("/plugins/udfs").json() == []
        refused = rule_answer(kuiperd, "early", "SELECT twice(a) FROM demo")
        assert refused.status_code == 400 and "function twice not found" in refused.text, refused.text

        applied = service.client.put("/config/plugins", json={"functions": {"multi": multi}})

        assert applied.status_code == 200, applied.get_data(as_text=True)
        # right after the answer, with no retry and no restart: rules may use both functions
        for rule_id, sql in (("t", "SELECT twice(a) FROM demo"), ("s", "SELECT shout(s) FROM demo")):
            answer = rule_answer(kuiperd, rule_id, sql)
            assert answer.status_code == 201, answer.text
        assert sorted(kuiperd.get("/plugins/udfs").json()) == sorted(multi_plugin.functions)
        assert service.client.get("/plugins/functions/multi").get_json()["engine"] == "loaded"

        # a list that alone differs is registered with the engine too, at once
        shout_only = service.client.put("/config/plugins", json={"functions": {"multi": {**multi,
                                                                                        "functions": ["shout"]}}})
        assert [(c["action"], c["name"]) for c in shout_only.get_json()["changes"]] == [("register", "multi")]
        assert kuiperd.get("/plugins/udfs").json() == ["shout"]
        assert engine_process(kuiperd) == started
    finally:
        service.stop()
