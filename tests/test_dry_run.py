"""`?dryRun=1` on create, update and delete: 200 with the plan, nothing written, the real request's refusals.

Each plan is compared with the real request that follows it: the files the plan says it writes are the
files the registry then records (path, size and sha256), and the files it says it removes are gone.
A dry run that would fail answers the same status and message as the real request, and neither
writes anything. Through the test client and through real gunicorn with two workers.
"""

from __future__ import annotations

import hashlib

import requests
from conftest import disk_state, make_zip, recorded_files, registry_dump

from kuiper_plugins.store import db

SO = b"\x7fELF fake shared object"
SCRIPT = "#!/bin/sh\n" + "".join(f"echo line {n}\n" for n in range(2, 31))


def planned(plan: dict) -> dict[str, tuple[int, str]]:
    return {f["path"]: (f["size"], f["sha256"]) for f in plan["writes"]}


def test_a_dry_run_create_answers_the_plan_writes_nothing_and_the_create_writes_those_files(service, file_server):
    members = {"Random@v1.0.0.so": SO, "random.yaml": "default:\n  interval: 1000\n", "install.sh": SCRIPT}
    zipped = make_zip(file_server.root / "random.zip", members)
    request = {"name": "random", "file": file_server.url("random.zip")}
    before = service.snapshot()

    answer = service.client.post("/plugins/sources?dryRun=1", json=request)

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.mimetype == "application/json"
    service.assert_unchanged(before)
    assert list(service.layout.incoming.iterdir()) == []  # the download and the unpacked tree are gone
    assert [p.name for p in service.layout.locks.iterdir()] == ["recovery.lock"]  # no plugin lock taken
    plan = answer.get_json()
    assert plan["kind"] == "install" and plan["type"] == "sources" and plan["name"] == "random"
    assert plan["version"] == "1.0.0"
    assert plan["source"] == {"url": request["file"], "size": zipped.stat().st_size,
                              "sha256": hashlib.sha256(zipped.read_bytes()).hexdigest()}
    assert plan["installScript"] == {"sha256": hashlib.sha256(SCRIPT.encode()).hexdigest(),
                                     "head": SCRIPT.splitlines()[:20]}
    assert plan["removes"] == [] and plan["functionClashes"] == [] and plan["restartNeeded"] is False
    assert planned(plan)["plugins/sources/Random@v1.0.0.so"] == (len(SO), hashlib.sha256(SO).hexdigest())

    assert service.post("sources", request).status_code == 201
    assert planned(plan) == recorded_files(service.home, "random")


def test_a_dry_run_update_names_what_the_update_writes_and_removes(service, file_server):
    make_zip(file_server.root / "v1.zip", {"Random@v1.0.0.so": SO, "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": file_server.url("v1.zip")}).status_code == 201
    make_zip(file_server.root / "v2.zip", {"Random@v2.0.0.so": SO + b"2", "random.yaml": "a: 1\n"})
    request = {"file": file_server.url("v2.zip")}
    before = service.snapshot()

    answer = service.client.put("/plugins/sources/random?dryRun=1", json=request)

    assert answer.status_code == 200, answer.get_data(as_text=True)
    service.assert_unchanged(before)
    plan = answer.get_json()
    assert plan["kind"] == "update" and plan["version"] == "2.0.0" and plan["restartNeeded"] is True
    assert plan["removes"] == ["plugins/sources/Random@v1.0.0.so"]

    assert service.client.put("/plugins/sources/random", json=request).status_code == 200
    assert not (service.home / "plugins/sources/Random@v1.0.0.so").exists()
    assert planned(plan) == recorded_files(service.home, "random")


def test_a_dry_run_update_leaves_a_users_edited_yaml_out_of_what_it_writes(service, file_server):
    make_zip(file_server.root / "v1.zip", {"Random@v1.0.0.so": SO, "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": file_server.url("v1.zip")}).status_code == 201
    (service.home / "etc/sources/random.yaml").write_text("a: 2  # the operator's own\n")
    make_zip(file_server.root / "v2.zip", {"Random@v2.0.0.so": SO + b"2", "random.yaml": "a: 1\n"})
    request = {"file": file_server.url("v2.zip")}

    plan = service.client.put("/plugins/sources/random?dryRun=1", json=request).get_json()

    assert set(planned(plan)) == {"plugins/sources/Random@v2.0.0.so"}
    assert service.client.put("/plugins/sources/random", json=request).status_code == 200
    assert (service.home / "etc/sources/random.yaml").read_text() == "a: 2  # the operator's own\n"


def test_a_dry_run_delete_lists_what_the_delete_removes(service, file_server):
    make_zip(file_server.root / "geo.zip", {"Geo.so": SO})
    assert service.post("functions", {"name": "geo", "file": file_server.url("geo.zip"),
                                      "functions": ["dist", "area"]}).status_code == 201
    before = service.snapshot()

    answer = service.client.delete("/plugins/functions/geo?dryRun=1")

    assert answer.status_code == 200, answer.get_data(as_text=True)
    service.assert_unchanged(before)
    plan = answer.get_json()
    assert plan["kind"] == "delete" and plan["writes"] == [] and plan["restartNeeded"] is True
    assert plan["removes"] == ["plugins/functions/Geo.so"]
    assert sorted(plan["functions"]) == ["area", "dist"]
    assert service.client.delete("/plugins/functions/geo").status_code == 200
    assert not (service.home / "plugins/functions/Geo.so").exists()


def refused_alike(service, method: str, path: str, body=None) -> tuple[int, str]:
    """The dry run and the real request give the same status and body, and neither writes anything."""
    before = service.snapshot()
    call = getattr(service.client, method)
    kwargs = {"json": body} if body is not None else {}
    dry = call(f"{path}?dryRun=1", **kwargs)
    service.assert_unchanged(before)
    real = call(path, **kwargs)
    service.assert_unchanged(before)
    assert list(service.layout.incoming.iterdir()) == []
    assert (dry.status_code, dry.get_data(as_text=True)) == (real.status_code, real.get_data(as_text=True))
    assert 400 <= real.status_code < 500
    return real.status_code, real.get_json()["message"]


def test_a_dry_run_that_would_fail_answers_the_real_requests_4xx(service, file_server):
    make_zip(file_server.root / "geo.zip", {"Geo.so": SO})
    make_zip(file_server.root / "geo2.zip", {"Geo2.so": SO})
    make_zip(file_server.root / "bad.zip", {"readme.txt": "no binary"})
    assert service.post("functions", {"name": "geo", "file": file_server.url("geo.zip"),
                                      "functions": ["dist"]}).status_code == 201

    duplicate = refused_alike(service, "post", "/plugins/functions",
                              {"name": "geo", "file": file_server.url("geo.zip")})
    assert duplicate[0] == 400 and "duplicate" in duplicate[1]
    clash = refused_alike(service, "post", "/plugins/functions",
                          {"name": "geo2", "file": file_server.url("geo2.zip"), "functions": ["dist"]})
    assert "function name dist already exists" in clash[1]
    missing = refused_alike(service, "post", "/plugins/functions", {"name": "nope", "file": file_server.url("x.zip")})
    assert missing[0] == 400 and "fail to download file" in missing[1]
    invalid = refused_alike(service, "post", "/plugins/sources", {"name": "bad", "file": file_server.url("bad.zip")})
    assert invalid[0] == 400
    digest = refused_alike(service, "post", "/plugins/sources",
                           {"name": "geo2", "file": file_server.url("geo2.zip"), "sha256": "0" * 64})
    assert digest[0] == 400
    not_found = refused_alike(service, "put", "/plugins/sinks/nope", {"file": file_server.url("geo.zip")})
    assert not_found[0] == 404
    assert refused_alike(service, "delete", "/plugins/sinks/nope")[0] == 404
    # and the same request without the clash is planned, not run
    before = service.snapshot()
    fine = service.post("functions?dryRun=1", {"name": "geo2", "file": file_server.url("geo2.zip"),
                                               "functions": ["other"]})
    assert fine.status_code == 200 and fine.get_json()["functions"] == ["other"]
    service.assert_unchanged(before)


def test_a_dry_run_refuses_a_file_that_is_not_ours_as_the_create_does(service, file_server):
    make_zip(file_server.root / "random.zip", {"Random.so": SO, "random.yaml": "a: 1\n"})
    (service.home / "plugins/sources/Random.so").write_bytes(b"someone else's")
    (service.home / "plugins/sources/Random.so").chmod(0o644)

    status, message = refused_alike(service, "post", "/plugins/sources",
                                    {"name": "random", "file": file_server.url("random.zip")})

    assert status == 400 and "was not installed by kuiper-plugins" in message
    assert (service.home / "plugins/sources/Random.so").read_bytes() == b"someone else's"
    (service.home / "plugins/sources/Random.so").unlink()  # moved away: now it is planned, and not run
    before = service.snapshot()
    plan = service.post("sources?dryRun=1", {"name": "random", "file": file_server.url("random.zip")})
    assert plan.status_code == 200 and "plugins/sources/Random.so" in planned(plan.get_json())
    service.assert_unchanged(before)


def test_a_dry_run_value_we_do_not_know_is_refused_not_run(service, file_server):
    make_zip(file_server.root / "random.zip", {"Random.so": SO})
    before = service.snapshot()

    answer = service.client.post("/plugins/sources?dryRun=yes",
                                 json={"name": "random", "file": file_server.url("random.zip")})

    assert answer.status_code == 400 and "dryRun" in answer.get_json()["message"]
    service.assert_unchanged(before)


def test_a_dry_run_through_gunicorn_writes_nothing_and_the_real_run_writes_the_plan(start_gunicorn, file_server):
    server = start_gunicorn(workers=2)
    members = {"Random@v1.0.0.so": SO, "random.yaml": "a: 1\n", "install.sh": SCRIPT}
    make_zip(file_server.root / "random.zip", members)
    request = {"name": "random", "file": file_server.url("random.zip")}
    # Both workers are asked (connections are not kept, so the master hands each to any worker).
    disk, rows = disk_state(server.home), registry_dump(server.home)
    plans = [requests.post(f"{server.url}/plugins/sources?dryRun=1", json=request, timeout=30) for _ in range(4)]

    assert [p.status_code for p in plans] == [200] * 4, [p.text for p in plans]
    assert disk_state(server.home) == disk and registry_dump(server.home) == rows
    work = server.home / "data/.kuiper-plugins"
    assert [list((work / folder).iterdir()) for folder in ("staging", "incoming")] == [[], []]
    assert [p.name for p in (work / "locks").iterdir()] == ["recovery.lock"]  # no plugin lock taken
    assert all(p.json() == plans[0].json() for p in plans)
    answer = requests.post(f"{server.url}/plugins/sources", json=request, timeout=30)
    assert answer.status_code == 201, answer.text
    conn = db.connect(server.home / "data/kuiper-plugins.db")
    try:
        written = {path: (size, sha) for path, size, sha in conn.execute(
            "SELECT path, size, sha256 FROM plugin_files")}
    finally:
        conn.close()
    assert planned(plans[0].json()) == written
