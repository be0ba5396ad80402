"""Start-up and per-plugin recovery, in process: adopting hand-copied binaries, rolling back what a dead
worker left behind, and delete's robustness. The end-to-end versions with real SIGKILLs are in test_crash.py.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_zip

from kuiper_plugins.install.locks import plugin_lock
from kuiper_plugins.layout import Layout
from kuiper_plugins.store import db, registry


def serve_source(file_server, name="random", version="v1.0.0", extra=None, zip_name=None) -> str:
    members = {f"{name[0].upper()}{name[1:]}@{version}.so": f"so {version}", f"{name}.yaml": "a: 1\n"}
    members.update(extra or {})
    zip_name = zip_name or f"{name}-{version}.zip"
    make_zip(file_server.root / zip_name, members)
    return file_server.url(zip_name)


def leave_unfinished(layout: Layout, op_id: str, plugin_type: str, name: str, kind: str, journal) -> None:
    """Record an operation as a worker does before it is killed: the row, then the journal file."""
    conn = db.connect(layout.registry_file)
    try:
        with db.transaction(conn):
            registry.begin_operation(conn, op_id, plugin_type, name, kind, 999999)
    finally:
        conn.close()
    staging = layout.staging / op_id
    (staging / "backup").mkdir(parents=True)
    if journal is not None:
        (staging / "journal.json").write_text(json.dumps(
            {"operation": op_id, "type": plugin_type, "name": name, "kind": kind, "moves": journal}))


def operations(layout: Layout) -> list[registry.Operation]:
    conn = db.connect(layout.registry_file)
    try:
        return registry.operations(conn)
    finally:
        conn.close()


def test_hand_copied_native_binaries_are_adopted(home, make_service):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("functions") / "Echo@v1.2.so").write_bytes(b"so")
    (layout.native_dir("sinks") / "file2.so").write_bytes(b"so")
    (layout.native_dir("sinks") / "not a plugin.so").write_bytes(b"so")
    service = make_service()
    assert service.client.get("/plugins/functions").get_json() == ["echo"]
    assert service.client.get("/plugins/functions/echo").get_json() == {
        "functions": ["echo"], "name": "echo", "version": "1.2",
    }
    assert service.client.get("/plugins/sinks").get_json() == ["file2"]
    assert service.client.get("/plugins/udfs").get_json() == ["echo"]
    registered = service.client.post("/plugins/functions/echo/register", json={"functions": ["e1", "e2"]})
    assert registered.status_code == 200
    assert service.client.get("/plugins/udfs").get_json() == ["e1", "e2"]
    # Deleting an adopted plugin removes its binary.
    assert service.client.delete("/plugins/sinks/file2").status_code == 200
    assert not (layout.native_dir("sinks") / "file2.so").exists()


def test_a_binary_of_a_plugin_in_flight_is_not_adopted(home, make_service):
    """A .so an operation has just moved in belongs to that operation, whose worker holds the lock."""
    layout = Layout(home)
    layout.create()
    (layout.native_dir("sources") / "Random@v1.0.0.so").write_bytes(b"so")
    with plugin_lock(layout.locks, "sources", "random") as lock:
        assert lock.try_acquire()
        service = make_service()
        assert service.client.get("/plugins/sources").get_json() == []
    restarted = make_service()
    assert restarted.client.get("/plugins/sources").get_json() == ["random"]


def test_an_unfinished_install_is_rolled_back_at_start_up(home, make_service):
    service = make_service()
    layout = service.layout
    user_yaml = home / "etc/sources/random.yaml"
    user_yaml.write_text("original\n")
    before = service.snapshot()
    # What a worker killed between moving files and committing leaves: a journal, moved files, a backup.
    leave_unfinished(layout, "deadbeef", "sources", "random", "install", [
        {"dest": "plugins/sources/Random.so", "backup": None, "placed": True},
        {"dest": "etc/sources/random.yaml", "backup": "backup/1", "placed": True},
    ])
    user_yaml.rename(layout.staging / "deadbeef/backup/1")
    user_yaml.write_text("from the package\n")
    (layout.native_dir("sources") / "Random.so").write_bytes(b"half installed")
    (layout.staging / "orphan-folder").mkdir()

    restarted = make_service()
    assert user_yaml.read_text() == "original\n"
    assert not (layout.native_dir("sources") / "Random.so").exists()
    assert restarted.client.get("/plugins/sources").get_json() == []
    assert operations(layout) == []
    restarted.assert_unchanged(before)


def test_an_update_killed_mid_move_is_rolled_back_byte_for_byte(home, make_service, file_server):
    service = make_service()
    old_url = serve_source(file_server, extra={"random.json": '{"v": 1}'})
    assert service.post("sources", {"name": "random", "file": old_url}).status_code == 201
    before = service.snapshot()
    layout = service.layout
    # The journal of an update to v2: the json replaced (hard-linked aside, then replaced), the old
    # binary set aside (stale), the new binary moved in; the worker died after the first two moves.
    leave_unfinished(layout, "cafe", "sources", "random", "update", [
        {"dest": "plugins/sources/Random@v2.0.0.so", "backup": None, "placed": True},
        {"dest": "etc/sources/random.json", "backup": "backup/1", "placed": True},
        {"dest": "plugins/sources/Random@v1.0.0.so", "backup": "backup/2", "placed": False},
    ])
    staging = layout.staging / "cafe"
    (layout.native_dir("sources") / "Random@v2.0.0.so").write_bytes(b"so v2")
    json_path = home / "etc/sources/random.json"
    (staging / "backup/1").hardlink_to(json_path)
    (staging / "new.json").write_text('{"v": 2}')
    (staging / "new.json").replace(json_path)
    # The third move (v1 binary aside) never happened.

    restarted = make_service()
    restarted.assert_unchanged(before)
    assert restarted.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "1.0.0"}
    assert json_path.read_text() == '{"v": 1}'


def test_an_operation_killed_before_its_first_move_leaves_only_debris(home, make_service):
    service = make_service()
    before = service.snapshot()
    leave_unfinished(service.layout, "0123", "functions", "echo", "install", None)
    (service.layout.staging / "0123/download-x.zip").write_bytes(b"partial download")
    restarted = make_service()
    restarted.assert_unchanged(before)
    assert operations(service.layout) == []


def test_an_unreadable_journal_of_a_finished_operation_is_logged_and_start_up_goes_on(home, make_service, caplog):
    layout = Layout(home)
    layout.create()
    db.initialise(layout.registry_file)
    conn = db.connect(layout.registry_file)
    try:
        with db.transaction(conn):
            registry.begin_operation(conn, "deadbeef", "sources", "random", "install", 999999)
            registry.end_operation(conn, "deadbeef", committed=True)
    finally:
        conn.close()
    journal = layout.staging / "deadbeef.journal.json"
    journal.write_text("{torn")
    service = make_service()
    assert service.client.get("/plugins/sources").get_json() == []
    assert "the journal" in caplog.text and "is unreadable" in caplog.text
    # Left as it was for the next start, and so is the record of the operation it belongs to.
    assert journal.read_text() == "{torn"
    conn = db.connect(layout.registry_file)
    try:
        assert "deadbeef" in registry.finished_operations(conn)
    finally:
        conn.close()


def test_a_live_operation_is_left_alone_by_another_worker_starting(home, make_service):
    service = make_service()
    layout = service.layout
    leave_unfinished(layout, "live", "sinks", "file2", "install", [
        {"dest": "plugins/sinks/File2.so", "backup": None, "placed": True},
    ])
    (layout.native_dir("sinks") / "File2.so").write_bytes(b"moved in by a live worker")
    with plugin_lock(layout.locks, "sinks", "file2") as lock:
        assert lock.try_acquire()  # the live worker
        make_service()
        assert [op.id for op in operations(layout)] == ["live"]
        assert (layout.staging / "live/journal.json").exists()
        assert (layout.native_dir("sinks") / "File2.so").exists()
    # Once its worker is gone, the next operation on that plugin rolls it back before doing its own.
    response = service.client.delete("/plugins/sinks/file2")
    assert response.status_code == 404
    assert operations(layout) == []
    assert not (layout.native_dir("sinks") / "File2.so").exists()
    assert list(layout.staging.iterdir()) == []


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_an_operation_on_a_busy_plugin_is_refused_at_once(service, file_server, method):
    url = serve_source(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    before = service.snapshot()
    with plugin_lock(service.layout.locks, "sources", "random") as lock:
        assert lock.try_acquire()  # another worker's operation on the same plugin
        path = "/plugins/sources" if method == "post" else "/plugins/sources/random"
        kwargs = {} if method == "delete" else {"json": {"name": "random", "file": url}}
        response = getattr(service.client, method)(path, **kwargs)
    assert response.status_code == 400
    assert "plugin random is busy" in response.get_json()["message"]
    service.assert_unchanged(before)
    assert service.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "1.0.0"}


def test_delete_of_a_busy_name_not_yet_installed_is_refused_not_404(service):
    """An install in flight holds the name: delete says busy rather than pretending it does not exist."""
    with plugin_lock(service.layout.locks, "functions", "echo") as lock:
        assert lock.try_acquire()
        response = service.client.delete("/plugins/functions/echo")
    assert response.status_code == 400
    assert "busy" in response.get_json()["message"]
    assert service.client.delete("/plugins/functions/echo").status_code == 404


def test_delete_with_every_file_already_gone_cleans_the_registry(service, file_server):
    url = serve_source(file_server, name="echo", extra={"echo.json": "{}", "etc/conf.yaml": "a: 1\n"})
    body = {"name": "echo", "file": url, "functions": ["f1", "f2"]}
    assert service.post("functions", body).status_code == 201
    conn = db.connect(service.layout.registry_file)
    plugin = registry.find(conn, "functions", "echo")
    files = registry.files_of(conn, plugin.id)
    conn.close()
    assert "etc/functions/echo" in files
    for recorded in files:
        path = service.home / recorded
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    deleted = service.client.delete("/plugins/functions/echo")
    assert deleted.status_code == 200, deleted.get_json()
    assert service.client.get("/plugins/functions").get_json() == []
    assert service.client.get("/plugins/udfs").get_json() == []
    assert service.client.delete("/plugins/functions/echo").status_code == 404
    assert service.client.delete("/plugins/functions/unknown").status_code == 404
    assert list(service.layout.staging.iterdir()) == []
    # The name is free again at once.
    assert service.post("functions", body).status_code == 201


def test_recovery_never_undoes_a_move_through_a_link_planted_outside_home(home, make_service, tmp_path):
    service = make_service()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Victim.so").write_bytes(b"not ours")
    (service.layout.native_dir("sources") / "evil").symlink_to(outside)
    leave_unfinished(service.layout, "feed", "sources", "victim", "install", [
        {"dest": "plugins/sources/evil/Victim.so", "backup": None, "placed": True},
        {"dest": "plugins/sources/Other.so", "backup": "../../../../outside", "placed": True},
    ])
    make_service()
    assert (outside / "Victim.so").read_bytes() == b"not ours"
    assert operations(service.layout) == []
    assert list(service.layout.staging.iterdir()) == []
