"""Backup and restore (issue 19, point 4): one consistent tar.gz, restored offline into an empty home.

The backup is taken through the test client and through real gunicorn (during an install in another
worker); the restore is the `kuiper-plugins restore` command, run in-process.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time

import pytest
import requests
from conftest import disk_state, engine_dump, free_port, make_zip, registry_dump
from test_api import SO
from test_verify import install_four

from kuiper_plugins.cli.main import main
from kuiper_plugins.layout import Layout
from kuiper_plugins.lifecycle import backup
from kuiper_plugins.store import db


def recorded_state(home, paths) -> dict:
    """Each recorded path's entry in disk_state (a folder: every entry under it too)."""
    state = disk_state(home)
    return {k: v for k, v in state.items() if any(k == p or k.startswith(p + "/") for p in paths)}


def recorded_paths(home) -> list[str]:
    import sqlite3
    with sqlite3.connect(Layout(home).registry_file) as conn:
        return sorted(row[0] for row in conn.execute("SELECT path FROM plugin_files"))


def plugin_rows(home) -> list[tuple]:
    import sqlite3
    with sqlite3.connect(Layout(home).registry_file) as conn:
        return sorted(conn.execute("SELECT type, name, version, sha256, request FROM plugins").fetchall())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Point the CLI's settings at a new, empty home, with nothing listening where they say the service does."""
    target = tmp_path / "restored"
    monkeypatch.setenv("KUIPER_HOME", str(target))
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__RESTPORT", str(free_port()))
    monkeypatch.delenv("KUIPER_PLUGINS_URL", raising=False)
    return target


def test_backup_then_restore_into_an_empty_home_verifies_clean(service, file_server, offline, tmp_path, capsys):
    install_four(service, file_server)
    response = service.client.get("/registry/backup")
    assert response.status_code == 200
    assert response.mimetype == "application/gzip"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="kuiper-plugins-')
    archive = tmp_path / "backup.tar.gz"
    archive.write_bytes(response.data)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and "registry/kuiper-plugins.db" in names and "engine/sqliteKV.db" in names
    assert "files/plugins/sinks/Influx.so" in names and "files/plugins/portable/mirror/lib/helper.txt" in names
    assert list((service.layout.work / "backups").iterdir()) == []  # the snapshot went with the answer

    assert main(["restore", str(archive)]) == 0, capsys.readouterr().err
    assert "ok: every recorded file" in capsys.readouterr().out
    paths = recorded_paths(service.home)
    assert recorded_paths(offline) == paths
    assert recorded_state(offline, paths) == recorded_state(service.home, paths)
    assert plugin_rows(offline) == plugin_rows(service.home)
    assert engine_dump(offline) == engine_dump(service.home)


def test_restore_refuses_while_the_service_runs_on_that_home(make_service, file_server, monkeypatch, tmp_path,
                                                            capsys):
    source = make_service()
    install_four(source, file_server)
    archive = tmp_path / "backup.tar.gz"
    archive.write_bytes(source.client.get("/registry/backup").data)
    target = tmp_path / "target"
    monkeypatch.setenv("KUIPER_HOME", str(target))
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__RESTPORT", str(free_port()))
    from kuiper_plugins import create_app
    from kuiper_plugins.settings import Settings
    running = create_app(Settings(home=target))  # a service of that home, up in this process
    before = disk_state(target)
    assert main(["restore", str(archive)]) == 1
    assert "is running on" in capsys.readouterr().err
    assert disk_state(target) == before
    assert running is not None


def test_restore_refuses_a_home_that_has_a_registry(service, file_server, offline, tmp_path, capsys):
    install_four(service, file_server)
    archive = tmp_path / "backup.tar.gz"
    archive.write_bytes(service.client.get("/registry/backup").data)
    layout = Layout(offline)
    layout.create()
    db.initialise(layout.registry_file)  # an older home, no service running on it
    (layout.work / "service.lock").touch()  # the lock a service or a restore takes: scratch, never removed
    before = disk_state(offline), registry_dump(offline)
    assert main(["restore", str(archive)]) == 1
    assert "exists: a restore goes into a home without a registry" in capsys.readouterr().err
    assert (disk_state(offline), registry_dump(offline)) == before


def test_restore_refuses_an_archive_that_is_not_a_backup(offline, tmp_path, capsys):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert main(["restore", str(archive)]) == 1
    assert "is not a kuiper-plugins backup" in capsys.readouterr().err
    assert not Layout(offline).registry_file.exists()


def test_cli_backup_verify_repair(service, file_server, tmp_path, capsys):
    """The CLI's verify, repair and backup against the app on a loopback port."""
    from test_cli import Serving
    install_four(service, file_server)
    serving = Serving(service.app)
    try:
        url = ["--url", serving.url]
        assert main([*url, "verify"]) == 0
        assert "ok: every recorded file" in capsys.readouterr().out
        (service.home / "plugins/sinks/Influx.so").unlink()
        assert main([*url, "verify"]) == 1
        out = capsys.readouterr()
        assert "plugins/sinks/Influx.so" in out.out and "missing" in out.out and "problem(s) remain" in out.err
        assert main([*url, "repair"]) == 0
        assert "repaired: sinks influx" in capsys.readouterr().out
        assert (service.home / "plugins/sinks/Influx.so").read_bytes() == SO + b"-sink"
        saved = tmp_path / "saved.tar.gz"
        assert main([*url, "backup", str(saved)]) == 0
        with tarfile.open(saved) as tar:
            assert "files/plugins/sinks/Influx.so" in tar.getnames()
    finally:
        serving.stop()


def test_backup_during_an_install_in_another_worker_restores_and_verifies(start_gunicorn, file_server, offline,
                                                                          tmp_path, capsys):
    server = start_gunicorn(workers=2)
    make_zip(file_server.root / "first.zip", {"First.so": SO + b"-first"})
    assert requests.post(f"{server.url}/plugins/sinks", json={"name": "first", "file": file_server.url("first.zip")},
                         timeout=30).status_code == 201
    # The second package's download is held until the test lets it go: the install is then in flight
    # (reserved, its files not yet moved) in one worker while the backup is asked of the other.
    release, asked = threading.Event(), threading.Event()
    payload = make_zip(tmp_path / "slow.zip", {"Slow.so": SO + b"-slow"}).read_bytes()

    def slow(handler):
        asked.set()
        release.wait(30)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    file_server.routes["/slow.zip"] = slow
    answers: dict[str, requests.Response] = {}

    def install():
        answers["install"] = requests.post(f"{server.url}/plugins/sinks",
                                           json={"name": "slow", "file": file_server.url("slow.zip")}, timeout=60)

    def take_backup():
        answers["backup"] = requests.get(f"{server.url}/registry/backup", timeout=60)

    installing = threading.Thread(target=install)
    installing.start()
    assert asked.wait(30), "the install never asked for its package"
    backing_up = threading.Thread(target=take_backup)
    backing_up.start()
    # Ordering: the backup logs that it waits for the operation in flight before the download is let go.
    deadline = time.monotonic() + 30
    while "backup waits for 1 operation(s) in flight" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)  # polling the log, bounded by the deadline
    release.set()
    installing.join(60)
    backing_up.join(60)
    assert answers["install"].status_code == 201, answers["install"].text
    assert answers["backup"].status_code == 200, answers["backup"].text
    archive = tmp_path / "backup.tar.gz"
    archive.write_bytes(answers["backup"].content)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    # The whole install, not half of it: its file and its registry row (checked after the restore).
    assert "files/plugins/sinks/Slow.so" in names and "files/plugins/sinks/First.so" in names

    assert main(["restore", str(archive)]) == 0, capsys.readouterr().err
    assert [row[:2] for row in plugin_rows(offline)] == [("sinks", "first"), ("sinks", "slow")]
    assert (offline / "plugins/sinks/Slow.so").read_bytes() == SO + b"-slow"
    verify = requests.get(f"{server.url}/registry/verify", timeout=30).json()
    assert verify == {"ok": True, "problems": []}
    assert backup.snapshots_folder(Layout(server.home)).is_dir()
    assert list(backup.snapshots_folder(Layout(server.home)).iterdir()) == []
