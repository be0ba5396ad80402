"""A portable rollback through the service is live in a running kuiperd, as an update is.

The service under real gunicorn on the engine's home; a rule over the portable source sends its records
to a loopback sink server. After an update (the shouting code) and a rollback, the plugin's process is a
new one running the old code, the engine offers the old version, and eKuiper's store row names the old
package again; the engine's own process stays the same, so a restart of it cannot pass for live.
"""

from __future__ import annotations

import pytest
import requests
from test_engine_live import engine_process
from test_engine_live_portable import (
    beside,  # noqa: F401  (a fixture)
    exited,
    greeting_rule_running,
    greetings_after,
    plugin_pids,
    portable_rows,
    pygreet_zip,
)

pytestmark = pytest.mark.slow


def test_a_portable_rollback_restarts_the_plugin_with_the_previous_code(beside, file_server, sink_server,  # noqa: F811
                                                                        tmp_path):
    engine, server = beside()
    home = tmp_path / "home"
    pygreet_zip(file_server.root / "pygreet.zip")
    pygreet_zip(file_server.root / "shouting.zip", shouting=True)
    greeting_rule_running(engine, server, file_server, sink_server)
    updated = requests.put(f"{server.url}/plugins/portables/pygreet",
                           json={"name": "pygreet", "file": file_server.url("shouting.zip")}, timeout=180)
    assert updated.status_code == 200, updated.text
    [shouting] = plugin_pids(engine)
    before = engine_process(engine)

    rolled = requests.post(f"{server.url}/plugins/portables/pygreet/rollback", timeout=180)

    assert rolled.status_code == 200, rolled.text
    assert rolled.json() == {"type": "portables", "name": "pygreet", "version": "v1.0.0"}
    # right after our answer: the shouting process is gone, a new one runs the previous code
    assert exited(shouting), f"the plugin process {shouting} of the version left still runs"
    [again] = plugin_pids(engine)
    assert again != shouting
    assert engine_process(engine) == before
    assert engine.get("/plugins/portables/pygreet").json()["version"] == "v1.0.0"
    count = len(sink_server.bodies("greetings"))
    later = greetings_after(sink_server, count, {"greeting": "hello"})
    assert later[-1] == {"greeting": "hello"}, f"{later}\n{engine.log()}"
    rows = portable_rows(home)
    assert len(rows) == 1 and file_server.url("pygreet.zip").encode().hex().upper() in rows[0], rows
    described = requests.get(f"{server.url}/plugins/portables/pygreet", timeout=30).json()
    assert (described["version"], described["engine"]) == ("v1.0.0", "loaded"), described
    assert list((home / "data" / ".kuiper-plugins" / "staging").iterdir()) == []
