"""The plan step on its own: what an operation would write, remove, register and run, with nothing written.

Each plan is made from a package fetched from the real loopback server into a scratch folder outside the
home, against the service's real registry, and then compared with what the real request does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_zip, recorded_files

from kuiper_plugins.errors import InvalidRequest
from kuiper_plugins.install import archive, fetch
from kuiper_plugins.store import db, registry

SO = b"\x7fELF fake shared object"
SCRIPT = "#!/bin/sh\n" + "".join(f"echo line {n}\n" for n in range(2, 31))


def planner_of(service):
    return service.app.extensions["kuiper_plugins"].installer.planner


def fetched(service, url: str, scratch: Path) -> fetch.Fetched:
    """Bring the package into `scratch` (the caller's folder, not the home), as an operation does."""
    settings = service.app.extensions["kuiper_plugins"].settings
    scratch.mkdir(parents=True, exist_ok=True)
    return fetch.fetch(
        url, scratch, uploads_dir=service.layout.uploads, allow_external_file_access=False,
        enable_private_net=settings.enable_private_net, private_net_allow_list=settings.private_net_allow_list,
        max_size=settings.max_plugin_size, timeout=settings.download_timeout, tls_verify=True,
    )


def plan_install(service, url: str, plugin_type: str, request: dict, scratch: Path, old=None):
    """Plan an install as the installer does: from the fetched zip, then from its unpacked tree."""
    package = fetched(service, url, scratch)
    conn = db.connect(service.layout.registry_file)
    try:
        plan = planner_of(service).plan_package(conn, "install" if old is None else "update", plugin_type,
                                                request, package, old)
    finally:
        conn.close()
    unpacked = scratch / "unpacked"
    unpacked.mkdir()
    archive.extract(package.path, plan.entries, unpacked)
    planner_of(service).plan_unpacked(plan, unpacked)
    return plan, package


def test_an_install_plan_writes_nothing_and_names_the_files_its_install_writes(service, file_server, tmp_path):
    members = {"Random@v1.0.0.so": SO, "random.yaml": "default:\n  interval: 1000\n", "install.sh": SCRIPT}
    make_zip(file_server.root / "random.zip", members)
    url = file_server.url("random.zip")
    request = {"name": "random", "file": url}
    before = service.snapshot()

    plan, package = plan_install(service, url, "sources", request, tmp_path / "scratch")

    service.assert_unchanged(before)
    shown = json.loads(json.dumps(plan.to_json()))
    assert shown["kind"] == "install" and shown["type"] == "sources" and shown["name"] == "random"
    assert shown["version"] == "1.0.0"
    assert shown["source"] == {"url": url, "size": package.size,
                               "sha256": hashlib.sha256((file_server.root / "random.zip").read_bytes()).hexdigest()}
    assert shown["removes"] == [] and shown["functionClashes"] == [] and shown["restartNeeded"] is False
    assert shown["installScript"] == {"sha256": hashlib.sha256(SCRIPT.encode()).hexdigest(),
                                      "head": SCRIPT.splitlines()[:20]}

    assert service.post("sources", request).status_code == 201
    recorded = recorded_files(service.home, "random")
    assert {f["path"] for f in shown["writes"]} == set(recorded)
    for planned in shown["writes"]:
        assert planned["size"] == recorded[planned["path"]][0], planned


def test_an_update_plan_removes_what_the_new_package_no_longer_has(service, file_server, tmp_path):
    make_zip(file_server.root / "v1.zip", {"Random@v1.0.0.so": SO, "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": file_server.url("v1.zip")}).status_code == 201
    make_zip(file_server.root / "v2.zip", {"Random@v2.0.0.so": SO + b"2", "random.yaml": "a: 1\n"})
    request = {"name": "random", "file": file_server.url("v2.zip")}
    conn = db.connect(service.layout.registry_file)
    try:
        old = registry.find(conn, "sources", "random")
    finally:
        conn.close()
    before = service.snapshot()

    plan, _package = plan_install(service, request["file"], "sources", request, tmp_path / "scratch", old=old)

    service.assert_unchanged(before)
    assert plan.kind == "update" and plan.version == "2.0.0" and plan.restart_needed is True
    assert plan.removes == ["plugins/sources/Random@v1.0.0.so"]
    assert service.client.put("/plugins/sources/random", json=request).status_code == 200
    assert not (service.home / plan.removes[0]).exists()
    assert set(recorded_files(service.home, "random")) == {f.path for f in plan.writes}


def test_a_delete_plan_lists_the_files_the_delete_removes(service, file_server):
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": SO, "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": file_server.url("random.zip")}).status_code == 201
    before = service.snapshot()
    conn = db.connect(service.layout.registry_file)
    try:
        plan = planner_of(service).plan_delete(conn, "sources", "random")
    finally:
        conn.close()

    service.assert_unchanged(before)
    assert plan.to_json()["writes"] == [] and plan.restart_needed is True
    assert plan.removes == ["plugins/sources/Random@v1.0.0.so"]  # a source's yaml is the user's: it stays
    assert service.client.delete("/plugins/sources/random").status_code == 200
    assert not (service.home / plan.removes[0]).exists()
    assert (service.home / "etc/sources/random.yaml").exists()


def test_a_plan_refuses_a_function_clash_in_the_words_of_the_request(service, file_server, tmp_path):
    make_zip(file_server.root / "geo.zip", {"Geo.so": SO})
    make_zip(file_server.root / "geo2.zip", {"Geo2.so": SO})
    assert service.post("functions", {"name": "geo", "file": file_server.url("geo.zip"),
                                      "functions": ["dist"]}).status_code == 201
    request = {"name": "geo2", "file": file_server.url("geo2.zip"), "functions": ["dist", "other"]}
    before = service.snapshot()

    with pytest.raises(InvalidRequest) as refused:
        plan_install(service, request["file"], "functions", request, tmp_path / "scratch")
    answer = service.post("functions", request)

    assert refused.value.message == "function name dist already exists (it belongs to plugin geo)"
    assert answer.status_code == refused.value.status == 400
    assert refused.value.message in answer.get_data(as_text=True)
    service.assert_unchanged(before)
