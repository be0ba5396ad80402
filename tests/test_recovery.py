"""Start-up: adopting hand-copied binaries and rolling back operations a dead worker left behind."""

from __future__ import annotations

from kuiper_plugins import db, registry
from kuiper_plugins.layout import Layout


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


def test_an_unfinished_operation_is_rolled_back_at_start_up(home, make_service):
    service = make_service()
    layout = service.layout
    user_yaml = home / "etc/sources/random.yaml"
    user_yaml.write_text("original\n")
    # What a worker killed between moving files and committing leaves: a journal, moved files, a backup.
    conn = db.connect(layout.registry_file)
    with db.transaction(conn):
        registry.begin_operation(conn, "deadbeef", "sources", "random", "install", 999999)
        registry.record_journal(conn, "deadbeef", [
            {"dest": "plugins/sources/Random.so", "backup": None, "placed": True},
            {"dest": "etc/sources/random.yaml", "backup": "backup/1", "placed": True},
        ])
    conn.close()
    staging = layout.staging / "deadbeef"
    (staging / "backup").mkdir(parents=True)
    user_yaml.rename(staging / "backup/1")
    user_yaml.write_text("from the package\n")
    (layout.native_dir("sources") / "Random.so").write_bytes(b"half installed")
    (layout.staging / "orphan-folder").mkdir()

    restarted = make_service()
    assert user_yaml.read_text() == "original\n"
    assert not (layout.native_dir("sources") / "Random.so").exists()
    assert list(layout.staging.iterdir()) == []
    assert restarted.client.get("/plugins/sources").get_json() == []
    conn = db.connect(layout.registry_file)
    assert registry.operations(conn) == []
    conn.close()
