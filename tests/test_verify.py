"""Verify and repair (issue 19, point 3): what the registry recorded against the disk and eKuiper's store.

Through the test client against a real loopback file server; the files are tampered with on disk as an
operator or a failing disk would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3

import pytest
from conftest import engine_dump, make_zip, recorded_files
from test_api import SO, plugin_zip, portable_members, source_zip

from kuiper_plugins.engine import kv
from kuiper_plugins.install import durable
from kuiper_plugins.layout import Layout


def install_four(service, file_server) -> dict[str, str]:
    """A source, a sink, a function and a portable plugin; their URLs by name."""
    urls = {
        "beat": source_zip(file_server, "beat", members={"beat.json": '{"about": {}}'}),
        "influx": plugin_zip(file_server, "influx.zip", {"Influx.so": SO + b"-sink"}),
        "tally": plugin_zip(file_server, "tally.zip", {"Tally.so": SO + b"-function"}),
        "mirror": plugin_zip(file_server, "mirror.zip", portable_members(extra={"lib/helper.txt": "h"}),
                             modes={"mirror": 0o100755}),
    }
    for plugin_type, name, extra in (("sources", "beat", {}), ("sinks", "influx", {}),
                                     ("functions", "tally", {"functions": ["tally", "tally2"]}),
                                     ("portables", "mirror", {})):
        response = service.post(plugin_type, {"name": name, "file": urls[name], **extra})
        assert response.status_code == 201, response.data
    return urls


def verified(service) -> dict:
    response = service.client.get("/registry/verify")
    assert response.status_code == 200, response.data
    return response.get_json()


def test_a_fresh_home_verifies_clean(service, file_server):
    install_four(service, file_server)
    assert verified(service) == {"ok": True, "problems": []}
    assert service.client.get("/").get_json()["registry"]["damaged"] == 0


def _remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _empty(path):
    path.write_bytes(b"")


def _same_size(path):
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


def _grow(path):
    with open(path, "ab") as out:
        out.write(b"x")


TAMPERING = [
    # (recorded path, what is done to it, plugin, problem)
    ("plugins/sources/Beat@v1.0.0.so", _remove, ("sources", "beat"), "missing"),
    ("plugins/sources/Beat@v1.0.0.so", _empty, ("sources", "beat"), "empty"),
    ("plugins/sources/Beat@v1.0.0.so", _same_size, ("sources", "beat"), "modified"),
    ("plugins/sinks/Influx.so", _grow, ("sinks", "influx"), "modified"),
    ("plugins/functions/Tally.so", _remove, ("functions", "tally"), "missing"),
    ("etc/sources/beat.json", _same_size, ("sources", "beat"), "modified"),
    ("data/sources/beat.json", _remove, ("sources", "beat"), "missing"),
    ("etc/sources/beat.yaml", _remove, ("sources", "beat"), "missing"),
    ("plugins/portable/mirror", _remove, ("portables", "mirror"), "missing"),
    ("etc/sinks/file.json", _same_size, ("portables", "mirror"), "modified"),
]


@pytest.mark.parametrize(("path", "tamper", "plugin", "problem"), TAMPERING,
                         ids=[f"{t[0]}-{t[1].__name__[1:]}" for t in TAMPERING])
def test_verify_finds_each_kind_of_tampering(service, file_server, path, tamper, plugin, problem):
    install_four(service, file_server)
    tamper(service.layout.absolute(path))
    answer = verified(service)
    assert answer["ok"] is False
    files = [p for p in answer["problems"] if not p["path"].startswith("kv:")]
    assert [(p["type"], p["name"], p["path"], p["problem"]) for p in files] == [(*plugin, path, problem)]
    # GET / compares sizes only: a change of the same size is found by verify's digests alone.
    by_size = 0 if tamper is _same_size else 1
    assert service.client.get("/").get_json()["registry"]["damaged"] == by_size


@pytest.mark.parametrize("change", ["lib/helper.txt", "added.txt"])
def test_verify_sees_inside_a_portable_folder(service, file_server, change):
    install_four(service, file_server)
    target = service.home / "plugins/portable/mirror" / change
    if target.exists():
        _same_size(target)  # same size: only the digest tells
    else:
        target.write_text("not installed")
    problems = verified(service)["problems"]
    assert [(p["name"], p["path"], p["problem"]) for p in problems] == [
        ("mirror", "plugins/portable/mirror", "modified")]
    assert "'mirror'" in "\n".join(engine_dump(service.home)), "a changed folder is reported, not withheld"


def test_a_source_yaml_the_user_edited_is_not_a_problem(service, file_server):
    install_four(service, file_server)
    (service.home / "etc/sources/beat.yaml").write_text("default:\n  interval: 5000\n")
    assert verified(service) == {"ok": True, "problems": []}


def test_verify_compares_eKuipers_store_with_the_registry(service, file_server):
    install_four(service, file_server)
    store = kv.EngineStore(service.layout.data / "sqliteKV.db")
    store.delete_native("sinks", "influx")
    store.put_functions("tally", ["other"])
    try:
        problems = verified(service)["problems"]
    finally:
        store.close()
    assert [(p["type"], p["name"], p["path"], p["problem"]) for p in problems] == [
        ("sinks", "influx", "kv:nativePlugin/sinks_influx", "kv row missing"),
        ("functions", "tally", "kv:pluginFuncs/tally", "kv row differs"),
    ]


def test_verify_names_the_rows_of_a_damaged_plugin_as_such(service, file_server):
    # The registry records the plugin, so its row in eKuiper's store is not "not in the registry": it is a row
    # eKuiper must not be offered while the plugin's files are missing.
    install_four(service, file_server)
    (service.home / "plugins/sinks/Influx.so").unlink()
    kv_problems = [(p["name"], p["path"], p["problem"], p.get("detail")) for p in verified(service)["problems"]
                   if p["path"].startswith("kv:")]
    assert kv_problems == [("influx", "kv:nativePlugin/sinks_influx", "kv row of a damaged plugin",
                            "offered to eKuiper while the plugin's files are missing")]


def test_start_up_warns_and_does_not_project_a_plugin_whose_files_are_missing(make_service, file_server, caplog):
    """The issue's attack: a registry whose plugins have no files was served healthy and projected."""
    first = make_service()
    install_four(first, file_server)
    first.stop()
    (first.home / "plugins/sinks/Influx.so").unlink()
    shutil.rmtree(first.home / "plugins/portable/mirror")
    with caplog.at_level(logging.WARNING, logger="kuiper_plugins.lifecycle.verify"):
        service = make_service()
    warnings = [r.getMessage() for r in caplog.records if r.name == "kuiper_plugins.lifecycle.verify"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("portable plugin mirror is damaged: plugins/portable/mirror missing")
    assert warnings[1].startswith("sinks plugin influx is damaged: plugins/sinks/Influx.so missing")
    assert service.client.get("/").get_json()["registry"]["damaged"] == 2
    rows = "\n".join(engine_dump(service.home))
    assert "sinks_influx" not in rows and "'mirror'" not in rows  # never handed to an engine starting here
    assert "sources_beat" in rows and "functions_tally" in rows
    assert verified(service)["problems"] == [
        {"type": "portables", "name": "mirror", "path": "plugins/portable/mirror", "problem": "missing",
         "detail": "nothing at this path"},
        {"type": "sinks", "name": "influx", "path": "plugins/sinks/Influx.so", "problem": "missing",
         "detail": "nothing at this path"},
    ]


def test_repair_reinstalls_from_the_recorded_source(service, file_server):
    install_four(service, file_server)
    before = {p: service.layout.absolute(p).read_bytes() for p in
              ("plugins/sinks/Influx.so", "plugins/functions/Tally.so", "etc/sources/beat.json")}
    (service.home / "plugins/sinks/Influx.so").unlink()
    _same_size(service.home / "plugins/functions/Tally.so")
    _empty(service.home / "etc/sources/beat.json")
    shutil.rmtree(service.home / "plugins/portable/mirror/lib")
    served_before = len(file_server.requests)
    response = service.client.post("/registry/repair")
    assert response.status_code == 200, response.data
    answer = response.get_json()
    assert answer["ok"] is True and answer["problems"] == [] and answer["notRepaired"] == []
    assert sorted((r["type"], r["name"]) for r in answer["repaired"]) == [
        ("functions", "tally"), ("portables", "mirror"), ("sinks", "influx"), ("sources", "beat")]
    assert sorted(file_server.requests[served_before:]) == ["/beat.zip", "/influx.zip", "/mirror.zip", "/tally.zip"]
    for path, data in before.items():
        assert service.layout.absolute(path).read_bytes() == data
    assert (service.home / "plugins/portable/mirror/lib/helper.txt").read_text() == "h"
    assert service.client.get("/plugins/functions/tally").get_json()["functions"] == ["tally", "tally2"]
    assert verified(service) == {"ok": True, "problems": []}
    assert service.client.get("/").get_json()["registry"]["damaged"] == 0


def test_repair_leaves_alone_a_plugin_whose_source_now_serves_other_bytes(service, file_server):
    install_four(service, file_server)
    (service.home / "plugins/sinks/Influx.so").unlink()
    make_zip(file_server.root / "influx.zip", {"File.so": SO + b"-a-newer-build"})  # same URL, other bytes
    # A running service had handed the plugin to eKuiper's store before its file went: repair withdraws
    # that row (as start-up would), and changes nothing else.
    store = kv.EngineStore(service.layout.data / "sqliteKV.db")
    assert store.get_native("sinks", "influx") is not None
    store.delete_native("sinks", "influx")
    store.close()
    before = service.snapshot()
    answer = service.client.post("/registry/repair").get_json()
    assert answer["ok"] is False and answer["repaired"] == []
    assert [(r["type"], r["name"]) for r in answer["notRepaired"]] == [("sinks", "influx")]
    assert "sha256" in answer["notRepaired"][0]["reason"]
    assert [(p["name"], p["problem"]) for p in answer["problems"]] == [("influx", "missing")]
    service.assert_unchanged(before)


def test_repair_reports_an_adopted_plugin_it_has_no_source_for(make_service, file_server):
    home_plugins = make_service().home / "plugins/sinks"
    (home_plugins / "Hand.so").write_bytes(SO + b"-by-hand")
    service = make_service()  # adopts the hand-copied file
    (home_plugins / "Hand.so").write_bytes(SO + b"-changed")
    answer = service.client.post("/registry/repair").get_json()
    assert answer["repaired"] == []
    assert answer["notRepaired"] == [{"type": "sinks", "name": "hand", "reason": answer["notRepaired"][0]["reason"]}]
    assert answer["notRepaired"][0]["reason"].startswith("no recorded source")
    assert (home_plugins / "Hand.so").read_bytes() == SO + b"-changed"


def test_verify_runs_against_a_registry_restored_alone(make_service, file_server, tmp_path):
    """The issue's first finding: a registry copied into a fresh home was served as healthy."""
    first = make_service()
    install_four(first, file_server)
    first.stop()
    saved = tmp_path / "registry-copy.db"
    with sqlite3.connect(first.layout.registry_file) as source, sqlite3.connect(saved) as copy:
        source.backup(copy)
    shutil.rmtree(first.home)
    os.makedirs(first.layout.data)
    shutil.copy(saved, first.layout.registry_file)
    service = make_service()
    assert service.client.get("/").get_json()["registry"]["damaged"] == 4
    assert verified(service)["ok"] is False
    assert engine_dump(service.home) == [] or "sources_beat" not in "\n".join(engine_dump(service.home))


# ---------------------------------------------------------------------------- a damaged plugin is withheld
# A plugin whose files are missing is not given to eKuiper's store, nor to the running engine, until a
# repair reinstalls it: start-up leaves it out, and so do a register and every later commit.


def kv_keys(home) -> set[tuple[str, str]]:
    """The (table, key) of every plugin row in eKuiper's store."""
    store = kv.EngineStore(Layout(home).data / "sqliteKV.db")
    try:
        return {key for key, value in store.values(store.owned()).items() if value is not None}
    finally:
        store.close()


TALLY_ROWS = {("nativePlugin", "functions_tally"), ("pluginFuncs", "tally")}


def test_register_of_a_damaged_function_plugin_is_refused_and_changes_nothing(service, file_server):
    install_four(service, file_server)
    (service.home / "plugins/functions/Tally.so").unlink()  # under the running service
    before = service.snapshot()

    answer = service.client.post("/plugins/functions/tally/register", json={"functions": ["tally"]})

    assert answer.status_code == 400, answer.data
    message = answer.get_json()["message"]
    assert message.startswith("function plugins tally regiser functions error: (functions plugin tally is damaged,"
                              " plugins/functions/Tally.so missing: POST /registry/repair"), message
    assert "kuiper-plugins repair" in message and "the function list is unchanged" in message
    service.assert_unchanged(before)  # registry, disk and eKuiper's store
    assert service.client.get("/plugins/functions/tally").get_json()["functions"] == ["tally", "tally2"]


def test_a_damaged_plugin_stays_out_of_eKuipers_store_until_repaired(make_service, file_server):
    first = make_service()
    install_four(first, file_server)
    first.stop()
    (first.home / "plugins/functions/Tally.so").unlink()
    service = make_service()  # start-up withholds tally
    assert not TALLY_ROWS & kv_keys(service.home)

    refused = service.client.post("/plugins/functions/tally/register", json={"functions": ["tally"]})
    assert refused.status_code == 400, refused.data
    assert not TALLY_ROWS & kv_keys(service.home)
    # a commit of another plugin projects that plugin alone
    assert service.client.delete("/plugins/sinks/influx").status_code == 200
    assert not TALLY_ROWS & kv_keys(service.home)
    assert ("nativePlugin", "sources_beat") in kv_keys(service.home)

    repaired = service.client.post("/registry/repair").get_json()
    assert [(r["type"], r["name"]) for r in repaired["repaired"]] == [("functions", "tally")], repaired
    assert TALLY_ROWS <= kv_keys(service.home)  # projected again
    registered = service.client.post("/plugins/functions/tally/register", json={"functions": ["tally"]})
    assert registered.status_code == 200, registered.data
    store = kv.EngineStore(service.layout.data / "sqliteKV.db")
    try:
        assert store.function_lists()["tally"] == ["tally"]
    finally:
        store.close()
    assert verified(service) == {"ok": True, "problems": []}


def test_projecting_a_damaged_plugin_withdraws_its_rows(service, file_server):
    """The projection after a commit (install/project.py) asks the plugin's files first, as start-up does.

    Called directly: every operation of ours on a damaged plugin either repairs it (update, rollback) or is
    refused before its commit (register), so none reaches this check with the plugin still damaged; an
    operation undone beside a running engine (`bring_back`) and a file removed between a check and the
    projection do.
    """
    from kuiper_plugins.store import db

    install_four(service, file_server)
    assert ("nativePlugin", "sinks_influx") in kv_keys(service.home)
    (service.home / "plugins/sinks/Influx.so").unlink()
    installer = service.app.extensions["kuiper_plugins"].installer
    conn = db.connect(service.layout.registry_file)
    try:
        installer.projection.project(conn, "sinks", "influx")
        installer.projection.project(conn, "functions", "tally")  # a whole plugin is projected as before
    finally:
        conn.close()
    keys = kv_keys(service.home)
    assert ("nativePlugin", "sinks_influx") not in keys
    assert TALLY_ROWS <= keys
    assert [(p["name"], p["path"], p["problem"]) for p in verified(service)["problems"]] == [
        ("influx", "plugins/sinks/Influx.so", "missing")]


def test_a_portable_folder_is_recorded_as_read_back_from_disk_though_its_files_are_not_read_again(
        service, file_server):
    """Without install.sh the folder's fingerprint comes from the digests the unpacking kept; it must be the very
    fingerprint a fresh read of the folder gives, executable bit and nested folders included."""
    extra = {f"lib/pkg{n}/mod{n}.py": f"value = {n}\n" * (n + 1) for n in range(5)}
    url = plugin_zip(file_server, "mirror.zip", portable_members(extra=extra), modes={"mirror": 0o100755})
    assert service.post("portables", {"name": "mirror", "file": url}).status_code == 201
    folder = service.home / "plugins/portable/mirror"
    read_back = durable.fingerprint(folder)
    assert recorded_files(service.home, "mirror")["plugins/portable/mirror"] == (read_back.size, read_back.sha256)
    assert verified(service) == {"ok": True, "problems": []}


def test_a_folders_fingerprint_takes_a_known_files_digest_only_while_its_size_is_the_known_one(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha")
    (tree / "sub" / "b.txt").write_bytes(b"bravo!")
    fresh = durable.read_fingerprint(tree)
    known = {"a.txt": durable.Fingerprint(5, hashlib.sha256(b"alpha").hexdigest()),
             "sub/b.txt": durable.Fingerprint(6, hashlib.sha256(b"bravo!").hexdigest())}
    assert durable.read_fingerprint(tree, known=known) == fresh
    # A known digest is taken as given, the file unread: a wrong one shows in the folder's fingerprint.
    told_wrong = {**known, "a.txt": durable.Fingerprint(5, hashlib.sha256(b"other").hexdigest())}
    assert durable.read_fingerprint(tree, known=told_wrong) != fresh
    # A file whose size is not the known one is read.
    (tree / "a.txt").write_bytes(b"alpha, longer")
    assert durable.read_fingerprint(tree, known=known) == durable.read_fingerprint(tree) != fresh


def _on_disk(home, recorded):
    """What `durable.fingerprint` reads at each recorded path now: (size, sha256)."""
    prints = {path: durable.fingerprint(Layout(home).absolute(path)) for path in recorded}
    return {path: (p.size, p.sha256) for path, p in prints.items()}


def test_a_native_plugins_files_are_recorded_as_read_back_from_disk_though_not_read_again(service, file_server):
    """Without install.sh, the .so and yaml are recorded with the digests the unpacking kept as it wrote them; they
    must be the very digests a fresh read gives (the .so here is larger than one unpacking chunk)."""
    so = os.urandom((1 << 20) + 4096)
    url = source_zip(file_server, members={"Random@v1.0.0.so": so})
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    recorded = recorded_files(service.home, "random")
    assert recorded["plugins/sources/Random@v1.0.0.so"] == (len(so), hashlib.sha256(so).hexdigest())
    assert recorded == _on_disk(service.home, recorded)
    assert verified(service) == {"ok": True, "problems": []}


def test_a_native_plugins_file_that_install_sh_changed_is_recorded_as_the_script_left_it(service, file_server):
    """install.sh runs among the unpacked files before they are staged: what it writes into the .so is what is
    installed, and what the registry records (the digest the unpacking kept is stale then). The script keeps
    the file's size: only its bytes tell."""
    script = "#!/bin/sh\nprintf 'PATCHED' | dd of=Random@v1.0.0.so bs=1 conv=notrunc 2>/dev/null\n"
    url = source_zip(file_server, members={"install.sh": script})
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    so_path = service.home / "plugins/sources/Random@v1.0.0.so"
    assert so_path.read_bytes() == b"PATCHED" + SO[len("PATCHED"):]
    recorded = recorded_files(service.home, "random")
    assert recorded["plugins/sources/Random@v1.0.0.so"] == (so_path.stat().st_size,
                                                             hashlib.sha256(so_path.read_bytes()).hexdigest())
    assert recorded == _on_disk(service.home, recorded)
    assert verified(service) == {"ok": True, "problems": []}


def test_reading_files_for_their_flush_takes_a_known_digest_only_while_the_size_is_the_known_one(tmp_path):
    files = [tmp_path / "a.so", tmp_path / "b.yaml"]
    files[0].write_bytes(b"alpha")
    files[1].write_bytes(b"bravo!")
    truth = [durable.fingerprint(path) for path in files]
    told = durable.Fingerprint(5, hashlib.sha256(b"other").hexdigest())  # a digest taken as given: shows as such
    prints, unflushed = durable.read_all(files, None, known={files[0]: told})
    unflushed.flush()
    assert prints == [told, truth[1]]
    # A file whose size is not the known one is read.
    prints, unflushed = durable.read_all(files, None, known={files[0]: durable.Fingerprint(4, told.sha256)})
    unflushed.flush()
    assert prints == truth
