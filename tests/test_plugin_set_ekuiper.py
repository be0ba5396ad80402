"""eKuiper's own export, from a real kuiperd 2.4.0, applied to the service; and the service's export in eKuiper's
format, taken back by the service and by a fresh kuiperd's import.

kuiperd installs two native function plugins built against it (it opens each at install): tests/go/kuiperd/multi
(two functions) and tests/go/kuiperd/mixed packaged as `my_mixed`, a name holding `_`, with an install.sh and
its arguments; both from the loopback package server, which the service then fetches them from too.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from conftest import make_zip

pytestmark = pytest.mark.slow

INSTALL_SCRIPT = "#!/bin/sh\nexit 0\n"


def current(service) -> dict:
    answer = service.client.get("/config/plugins")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def test_a_real_ekuiper_export_converges_and_the_ekuiper_format_round_trips(start_kuiperd, multi_plugin,
                                                                            mixed_plugin, service, file_server):
    engine = start_kuiperd()
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    with zipfile.ZipFile(mixed_plugin.zip_path) as built:
        binary = built.read(mixed_plugin.so_name)
    make_zip(file_server.root / "my_mixed.zip", {"My_mixed@v1.0.0.so": binary, "install.sh": INSTALL_SCRIPT})
    multi_url, mixed_url = file_server.url("multi.zip"), file_server.url("my_mixed.zip")
    created = engine.post("/plugins/functions", {"name": "multi", "file": multi_url,
                                                 "functions": list(multi_plugin.functions)})
    assert created.status_code == 201, created.text
    created = engine.post("/plugins/functions", {"name": "my_mixed", "file": mixed_url, "functions": ["good"],
                                                 "shellParas": ["--fast", "<x>"]})
    assert created.status_code == 201, created.text

    exported = engine.get("/data/export")
    assert exported.status_code == 200, exported.text
    export = json.loads(exported.text)
    native = export["nativePlugins"]
    assert set(native) == {"functions_multi", "functions_my_mixed"}
    assert "functions" not in json.loads(native["functions_multi"])  # eKuiper's export loses the lists

    # eKuiper's whole export, as it came: its plugins are installed, the rest of it is not ours and is ignored
    applied = service.client.put("/config/plugins", json=export)

    assert applied.status_code == 200, applied.get_data(as_text=True)
    assert [(c["action"], c["type"], c["name"]) for c in applied.get_json()["changes"]] == [
        ("install", "function", "multi"), ("install", "function", "my_mixed")]
    document = current(service)
    assert document["functions"]["my_mixed"]["file"] == mixed_url
    assert document["functions"]["my_mixed"]["shellParas"] == ["--fast", "<x>"]
    # all that eKuiper's export allows: each plugin exports its own name
    assert {name: entry["functions"] for name, entry in document["functions"].items()} == {
        "multi": ["multi"], "my_mixed": ["my_mixed"]}

    # the lists the engine knows, added under functionLists, repair that: registers, nothing fetched
    lists = {name: engine.get(f"/plugins/functions/{name}").json()["functions"] for name in ("multi", "my_mixed")}
    assert lists == {"multi": list(multi_plugin.functions), "my_mixed": ["good"]}
    downloads = len(file_server.requests)
    repaired = service.client.put("/config/plugins", json={"nativePlugins": native, "portablePlugins": {},
                                                           "functionLists": lists})
    assert repaired.status_code == 200, repaired.get_data(as_text=True)
    assert [(c["action"], c["name"]) for c in repaired.get_json()["changes"]] == [("register", "multi"),
                                                                                   ("register", "my_mixed")]
    assert len(file_server.requests) == downloads
    assert sorted(service.client.get("/plugins/udfs").get_json()) == ["good", "shout", "twice"]

    # the service's export in eKuiper's format: eKuiper's strings to the byte, and the lists beside them
    ours = service.client.get("/config/plugins?format=ekuiper").get_json()
    assert ours == {"nativePlugins": native, "portablePlugins": export["portablePlugins"], "functionLists": lists}
    again = service.client.put("/config/plugins", json=ours)
    assert again.get_json() == {"changed": False, "changes": []}
    assert len(file_server.requests) == downloads

    # and a fresh kuiperd takes it through its own import (partial: plugins installed at once, no restart)
    fresh = start_kuiperd()
    imported = fresh.post("/data/import?partial=1", {"content": json.dumps(ours)})
    assert imported.status_code == 200, imported.text
    assert imported.json()["ErrorMsg"] == ""
    assert sorted(fresh.get("/plugins/functions").json()) == ["multi", "my_mixed"]
