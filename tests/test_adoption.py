"""Adoption follows the install rules, and start-up survives whatever it finds in the tree.

At start-up the service lists the plugins eKuiper (or a user) put into the home. What it finds there
was not checked by anyone: a FIFO or a socket where a descriptor or a binary should be, a link where
the API would refuse one, built-in or malformed names, a user's own configuration beside a plugin
folder, a function list of 50,000 hostile names in eKuiper's store. Each case here starts the service
over such a home and checks what a user would: that it answers, what it lists, and which files a
DELETE leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from conftest import make_zip

from kuiper_plugins.engine import gob, kv
from kuiper_plugins.install import packages
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import SettingsError, load_settings

SO = b"\x7fELF shared object"
YAML = "default:\n  interval: 1000\n"
RUN = b"#!/bin/sh\nexit 0\n"
SIGTERM_SAFETY_SECONDS = 60  # far above an idle stop, far below graceful_timeout (the stated stop bound)
BUILD_DEADLINE_SECONDS = 60  # far above an in-process start-up on a busy box


def portable_folder(layout: Layout, name: str, descriptor: dict, files: dict[str, bytes | str] | None = None) -> Path:
    """A portable plugin folder as eKuiper leaves it: `<name>/<name>.json`, an executable, other files."""
    folder = layout.portable_dir(name)
    folder.mkdir(parents=True)
    (folder / f"{name}.json").write_text(json.dumps({"version": "v1", "language": "go", **descriptor}))
    for relative, content in (files or {}).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def make_socket_file(path: Path) -> None:
    """Leave a Unix socket's file at `path` (bound in a short folder: socket paths are limited to 108 bytes)."""
    short = Path(tempfile.mkdtemp(prefix="kp-sock-", dir="/tmp"))
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short / "s"))
        os.replace(short / "s", path)
    finally:
        shutil.rmtree(short)


def kind(path: Path) -> str:
    mode = path.lstat().st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else \
        "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"


def write_engine_rows(path: Path, rows: dict[str, dict[str, bytes]]) -> None:
    """eKuiper's KV file with the given rows, each table made by eKuiper's own statement."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        for table, values in rows.items():
            conn.execute(kv.create_table_statement(table))
            for key, blob in values.items():
                conn.execute(f"REPLACE INTO '{table}'(key, val) VALUES (?, ?)", (key, blob))
        conn.commit()
    finally:
        conn.close()


def within_deadline(call, fifos: list[Path], seconds: float = BUILD_DEADLINE_SECONDS):
    """Run `call()` (a start-up) in a thread and fail, instead of hanging, if it blocks on one of `fifos`.

    Ordering relied on: a start-up that is not blocked ends well within `seconds` (it takes about a second
    here); one blocked in open() of a FIFO for reading is released by our open of it for writing (the
    kernel pairs the two), so the thread always ends and the test fails with a clear message.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test's thread, which re-raises it
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="start-up", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"start-up was still blocked after {seconds:g} s (on a FIFO: {fifos})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def warnings_naming(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# ---------------------------------------------------------------------------- K7: files that are not files


@pytest.mark.slow
def test_a_fifo_descriptor_and_odd_files_in_the_tree_never_stop_start_up_or_sigterm(start_gunicorn, tmp_path):
    home = tmp_path / "home"
    layout = Layout(home)
    layout.create()
    fifo_folder = layout.portable_dir("fifodesc")
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "fifodesc.json")  # eKuiper's boot scan, and ours before, block in open() here
    (fifo_folder / "fifodesc").write_bytes(RUN)
    os.mkfifo(layout.native_dir("sources") / "Pipe.so")
    make_socket_file(layout.native_dir("functions") / "Sock.so")
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(SO)
    (layout.native_dir("sinks") / "Linked.so").symlink_to(elsewhere)
    (layout.native_dir("sinks") / "Beta.so").write_bytes(SO)  # a good neighbour: still adopted

    server = start_gunicorn(workers=2)  # fails unless /ping answers within START_TIMEOUT
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/plugins/portables", timeout=10).json() == []
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []
    assert requests.get(f"{server.url}/plugins/functions", timeout=10).json() == []
    assert requests.get(f"{server.url}/plugins/sinks", timeout=10).json() == ["beta"]
    log = server.log_path.read_text(errors="replace")
    for name, what in (("fifodesc.json", "FIFO"), ("Pipe.so", "FIFO"), ("Sock.so", "socket"),
                       ("Linked.so", "symbolic link")):
        lines = [line for line in log.splitlines() if name in line and "not adopting" in line]
        assert lines and all(what in line for line in lines), (name, lines)
        assert len(lines) <= 3, lines  # once per start-up: the master's, then each of the 2 workers'; not per retry
    assert [kind(fifo_folder / "fifodesc.json"), kind(layout.native_dir("sources") / "Pipe.so"),
            kind(layout.native_dir("functions") / "Sock.so"), kind(layout.native_dir("sinks") / "Linked.so")] == [
        "fifo", "fifo", "socket", "link"]

    server.process.send_signal(signal.SIGTERM)  # to the master alone: it stops its workers
    assert server.wait_exit(timeout=SIGTERM_SAFETY_SECONDS) == 0


@pytest.mark.parametrize("odd", ["fifo", "socket", "link", "folder"])
def test_a_descriptor_that_is_not_a_regular_file_is_logged_and_skipped(home, make_service, tmp_path, caplog, odd):
    layout = Layout(home)
    layout.create()
    folder = layout.portable_dir("odd")
    folder.mkdir()
    (folder / "odd").write_bytes(RUN)
    descriptor = folder / "odd.json"
    if odd == "fifo":
        os.mkfifo(descriptor)
    elif odd == "socket":
        make_socket_file(descriptor)
    elif odd == "link":
        real = tmp_path / "real.json"
        real.write_text(json.dumps({"language": "go", "executable": "odd", "sinks": ["s1"]}))
        descriptor.symlink_to(real)
    else:
        descriptor.mkdir()
    caplog.set_level(logging.INFO)
    service = within_deadline(make_service, [descriptor] if odd == "fifo" else [])
    assert service.client.get("/plugins/portables").get_json() == []
    [line] = warnings_naming(caplog, "odd.json")
    assert "is a " + {"fifo": "FIFO", "socket": "socket", "link": "symbolic link", "folder": "folder"}[odd] in line
    assert descriptor.is_symlink() if odd == "link" else os.path.lexists(descriptor)


def test_a_descriptor_over_the_size_limit_is_not_read_whole(home, make_service, caplog):
    layout = Layout(home)
    layout.create()
    folder = portable_folder(layout, "big", {"executable": "run", "sinks": ["s1"]}, {"run": RUN})
    with open(folder / "big.json", "r+b") as descriptor:
        descriptor.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of nothing, made at once
    caplog.set_level(logging.INFO)
    service = make_service()
    assert service.client.get("/plugins/portables").get_json() == []
    [line] = warnings_naming(caplog, "big.json")
    assert "larger than" in line


def test_a_fifo_journal_in_staging_is_logged_and_start_up_goes_on(home, make_service, caplog):
    """Our own staging folder, but anything an install.sh ran as root could write into: recovery reads it first."""
    service = make_service()
    journal = service.layout.staging / "deadbeef.journal.json"
    os.mkfifo(journal)
    service.stop()
    caplog.set_level(logging.INFO)
    restarted = within_deadline(make_service, [journal])
    assert restarted.client.get("/ping").status_code == 200
    assert any("deadbeef" in line and "is a FIFO" in line for line in warnings_naming(caplog, "journal"))
    assert kind(journal) == "fifo"  # left for an operator: not ours to remove unread


@pytest.mark.parametrize("file_name", ["kuiper-plugins.yaml", "kuiper.yaml"])  # the service's own, the engine's
def test_a_fifo_settings_file_stops_start_up_with_a_message_and_a_linked_one_is_read(tmp_path, file_name):
    etc = tmp_path / "home/etc"
    etc.mkdir(parents=True)
    settings_file = etc / file_name
    os.mkfifo(settings_file)
    environ = {"KUIPER_HOME": str(tmp_path / "home")}
    fifo = rf"cannot read .*/{re.escape(file_name)}: .* is a FIFO, not a regular file"
    with pytest.raises(SettingsError, match=fifo):
        within_deadline(lambda: load_settings(environ), [settings_file])
    settings_file.unlink()
    mounted = tmp_path / "configmap" / file_name  # a mounted ConfigMap is a link: followed, as the engine does
    mounted.parent.mkdir()
    mounted.write_text("basic:\n  restPort: 9345\n")
    settings_file.symlink_to(mounted)
    settings = load_settings(environ)
    if file_name == "kuiper.yaml":  # the engine's port: where to reach it, never this service's
        assert (settings.engine_url, settings.rest_port) == ("http://127.0.0.1:9345", 9091)
    else:
        assert (settings.engine_url, settings.rest_port) == (None, 9345)


# ---------------------------------------------------------------------------- K5: links the API refuses


@pytest.mark.parametrize("layout_of_link", ["executable", "parent-folder"])
def test_a_linked_executable_is_not_adopted(home, make_service, tmp_path, caplog, layout_of_link):
    layout = Layout(home)
    layout.create()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run").write_bytes(RUN)
    if layout_of_link == "executable":
        folder = portable_folder(layout, "lnk", {"executable": "run", "sinks": ["s1"]})
        (folder / "run").symlink_to("/bin/sh")
    else:
        folder = portable_folder(layout, "lnk", {"executable": "bin/run", "sinks": ["s1"]})
        (folder / "bin").symlink_to(outside)
    caplog.set_level(logging.INFO)
    service = make_service()
    assert service.client.get("/plugins/portables").get_json() == []
    assert service.client.get("/plugins/portables/lnk").status_code == 404
    [line] = warnings_naming(caplog, "lnk")
    assert "link" in line
    assert (outside / "run").read_bytes() == RUN and os.path.lexists(folder / ("run" if layout_of_link ==
                                                                               "executable" else "bin"))


# ------------------------------------------------------------------------ K8: the install rules, and the user's files


@pytest.mark.parametrize("symbols", [
    {"sources": ["mqtt"], "functions": ["abs"]}, {"sources": ["mqtt"]}, {"functions": ["abs"]},
    {"functions": ["ok1", "x" * 251]},
], ids=["mqtt-and-abs", "source-mqtt", "function-abs", "function-too-long"])
def test_a_folder_declaring_names_the_api_refuses_is_not_adopted_and_nothing_is_touched(home, make_service, caplog,
                                                                                        symbols):
    layout = Layout(home)
    layout.create()
    for root in (layout.etc, layout.data):
        (root / "sources/mqtt.yaml").write_text("user: mqtt config\n")
        (root / "sources/mqtt.json").write_text('{"about": "user"}')
    portable_folder(layout, "pq", {"executable": "run", **symbols}, {"run": RUN, "sources/mqtt.yaml": "a: 1\n"})
    caplog.set_level(logging.INFO)
    service = make_service()
    before = service.snapshot()
    assert service.client.get("/plugins/portables").get_json() == []
    assert service.client.get("/plugins/udfs/abs").status_code == 404
    assert service.client.get("/plugins/udfs").get_json() == []
    [line] = warnings_naming(caplog, "portable plugin folder")
    assert "pq" in line
    assert service.client.delete("/plugins/portables/pq").status_code == 404
    service.assert_unchanged(before)
    assert (home / "etc/sources/mqtt.yaml").read_text() == "user: mqtt config\n"
    assert (home / "etc/sources/mqtt.json").read_text() == '{"about": "user"}'


@pytest.mark.parametrize(("plugin_type", "file_name"), [
    ("sources", "Mqtt.so"), ("sinks", "Log@v1.so"), ("functions", "Abs.so"), ("sources", "Httppull.so"),
    ("sinks", "x" * 251 + ".so"),
])
def test_a_binary_named_as_the_api_refuses_is_not_adopted(home, make_service, caplog, plugin_type, file_name):
    layout = Layout(home)
    layout.create()
    (layout.native_dir(plugin_type) / file_name).write_bytes(SO)
    (layout.etc / "sources/mqtt.yaml").write_text("user: mqtt config\n")
    caplog.set_level(logging.INFO)
    service = make_service()
    assert service.client.get(f"/plugins/{plugin_type}").get_json() == []
    assert service.client.get("/plugins/udfs").get_json() == []
    assert len(warnings_naming(caplog, file_name)) == 1
    assert (layout.native_dir(plugin_type) / file_name).read_bytes() == SO
    assert (layout.etc / "sources/mqtt.yaml").read_text() == "user: mqtt config\n"


@pytest.mark.parametrize("on_disk", ["edited", "identical", "absent-from-folder"])
def test_a_config_file_outside_the_folder_is_claimed_only_when_it_is_the_folders_own(home, make_service, on_disk):
    """eKuiper's install writes `sources/<s>.yaml` of the package to etc/sources; only a byte-for-byte copy
    of the folder's own file can be that. A user's file stays the user's, through a DELETE too."""
    layout = Layout(home)
    layout.create()
    packaged = "default:\n  url: tcp://packaged\n"
    files = {"run": RUN, "sinks/mysink.json": '{"about": "packaged"}'}
    if on_disk != "absent-from-folder":
        files["sources/mysrc.yaml"] = packaged
    folder = portable_folder(layout, "ms", {"executable": "run", "sources": ["mysrc"], "sinks": ["mysink"]}, files)
    on_disk_yaml = "default:\n  url: tcp://users-own\n" if on_disk != "identical" else packaged
    for root in (layout.etc, layout.data):
        (root / "sources/mysrc.yaml").write_text(on_disk_yaml)
        (root / "sinks/mysink.json").write_text('{"about": "users-own"}')  # never the folder's bytes
    service = make_service()
    assert [p["name"] for p in service.client.get("/plugins/portables").get_json()] == ["ms"]
    assert service.client.delete("/plugins/portables/ms").status_code == 200
    assert not folder.exists()
    for root in (layout.etc, layout.data):
        assert (root / "sinks/mysink.json").read_text() == '{"about": "users-own"}'
        if on_disk == "identical":
            assert not (root / "sources/mysrc.yaml").exists()  # the folder's own copy: eKuiper's delete removes it
        else:
            assert (root / "sources/mysrc.yaml").read_text() == on_disk_yaml


@pytest.mark.parametrize("odd", ["fifo", "link", "socket"])
def test_a_source_yaml_that_is_not_a_regular_file_is_never_claimed(home, make_service, tmp_path, caplog, odd):
    layout = Layout(home)
    layout.create()
    portable_folder(layout, "ms", {"executable": "run", "sources": ["mysrc"]},
                    {"run": RUN, "sources/mysrc.yaml": YAML})
    target = tmp_path / "target.yaml"
    target.write_text(YAML)  # the same bytes: only the kind of file differs
    for root in (layout.etc, layout.data):
        path = root / "sources/mysrc.yaml"
        if odd == "fifo":
            os.mkfifo(path)
        elif odd == "socket":
            make_socket_file(path)
        else:
            path.symlink_to(target)
    caplog.set_level(logging.INFO)
    service = make_service()
    assert [p["name"] for p in service.client.get("/plugins/portables").get_json()] == ["ms"]
    assert len(warnings_naming(caplog, "mysrc.yaml")) == 2  # etc and data, once each
    assert service.client.delete("/plugins/portables/ms").status_code == 200
    for root in (layout.etc, layout.data):
        assert kind(root / "sources/mysrc.yaml") == odd
    assert target.read_text() == YAML


def test_copies_named_after_a_builtin_sink_are_never_claimed(home, make_service):
    """eKuiper's own sample declares a sink `file` (accepted, as the API accepts it); etc/sinks/file.json is
    eKuiper's metadata of its built-in sink, even when eKuiper's store says it installed the plugin."""
    layout = Layout(home)
    layout.create()
    portable_folder(layout, "mirror", {"executable": "run", "sinks": ["file", "echo"]},
                    {"run": RUN, "sinks/file.json": '{"about": "file"}', "sinks/echo.json": "{}"})
    for root in (layout.etc, layout.data):
        (root / "sinks/file.json").write_text('{"about": "file"}')
        (root / "sinks/echo.json").write_text("{}")
    script = gob.encode_string(kv.install_script("mirror", "https://example.com/mirror.zip"))
    write_engine_rows(layout.data / "sqliteKV.db", {kv.PORTABLE_TABLE: {"mirror": script}})
    service = make_service()
    assert [p["name"] for p in service.client.get("/plugins/portables").get_json()] == ["mirror"]
    assert service.client.delete("/plugins/portables/mirror").status_code == 200
    for root in (layout.etc, layout.data):
        assert (root / "sinks/file.json").read_text() == '{"about": "file"}'
        assert not (root / "sinks/echo.json").exists()


# ---------------------------------------------------------------------------- K4: eKuiper's pluginFuncs


HOSTILE = ["abs", "", "../x", "a" * 5000, "x y", "\u202eevil", "count", "f;drop table x"]


def test_function_names_from_ekuipers_store_follow_the_api_rules_and_are_capped(home, make_service, caplog, go_gob):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("functions") / "Geo@v1.so").write_bytes(SO)
    listed = HOSTILE + [f"f{i}" for i in range(50_000)]
    write_engine_rows(layout.data / "sqliteKV.db", {kv.FUNCTIONS_TABLE: {"geo": gob.encode_strings(listed)}})
    caplog.set_level(logging.INFO)
    service = make_service()
    assert service.client.get("/plugins/udfs/abs").status_code == 404
    assert service.client.get("/plugins/udfs/count").status_code == 404
    kept = [f"f{i}" for i in range(packages.MAX_FUNCTIONS)]
    assert service.client.get("/plugins/functions/geo").get_json() == {
        "name": "geo", "version": "1", "functions": kept}
    assert service.client.get("/plugins/udfs").get_json() == sorted(kept)
    [line] = warnings_naming(caplog, "pluginFuncs")  # one summary, not 50,000 lines
    assert "geo" in line and "50008" in line and len(line) < 2000
    # eKuiper's row now lists what is registered: what the engine reads agrees with what we answer.
    conn = sqlite3.connect(layout.data / "sqliteKV.db")
    try:
        [(blob,)] = conn.execute(f"SELECT val FROM '{kv.FUNCTIONS_TABLE}' WHERE key = 'geo'").fetchall()
    finally:
        conn.close()
    assert go_gob.decode_strings(blob) == kept


def test_a_function_listed_twice_in_ekuipers_store_is_registered_once(home, make_service):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("functions") / "Geo.so").write_bytes(SO)
    listed = ["g1", "g2", "g1", "G2"]
    write_engine_rows(layout.data / "sqliteKV.db", {kv.FUNCTIONS_TABLE: {"geo": gob.encode_strings(listed)}})
    service = make_service()
    assert service.client.get("/plugins/functions/geo").get_json()["functions"] == ["g1", "g2", "G2"]


def test_a_function_list_row_too_large_to_be_eKuipers_is_not_decoded(home, make_service, caplog):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("functions") / "Geo.so").write_bytes(SO)
    huge = gob.encode_strings(["f"] * (2 * 1024 * 1024))  # 4 MiB of one-letter names
    write_engine_rows(layout.data / "sqliteKV.db", {kv.FUNCTIONS_TABLE: {"geo": huge}})
    caplog.set_level(logging.INFO)
    service = make_service()
    assert service.client.get("/plugins/functions/geo").get_json()["functions"] == ["geo"]
    [line] = warnings_naming(caplog, "pluginFuncs")
    assert "geo" in line and "larger than" in line


# ---------------------------------------------------------------------------- the same rules at the API


@pytest.mark.parametrize(("symbols", "expect"), [
    ({"functions": ["f1", "abs"]}, "invalid function name abs: abs is a built-in function of eKuiper"),
    ({"sources": ["MQTT"]}, "invalid source name MQTT: MQTT is a built-in source of eKuiper"),
    ({"functions": ["x" * 251]}, "is too long"),
    ({"functions": [f"f{i}" for i in range(packages.MAX_FUNCTIONS + 1)]}, "at most 1000"),
], ids=["function-abs", "source-mqtt", "function-too-long", "too-many-functions"])
def test_the_api_refuses_a_portable_declaring_what_adoption_refuses(service, file_server, symbols, expect):
    descriptor = {"version": "v1", "language": "go", "executable": "pq", **symbols}
    members = {"pq.json": json.dumps(descriptor), "pq": RUN, **{f"sources/{s}.yaml": YAML
                                                              for s in symbols.get("sources", [])}}
    make_zip(file_server.root / "pq.zip", members, modes={"pq": 0o100755})
    before = service.snapshot()
    response = service.post("portables", {"name": "pq", "file": file_server.url("pq.zip")})
    assert response.status_code == 400
    text = response.get_json()["message"]
    assert text.startswith("portable plugin create command error: fail to install plugin: invalid json file pq.json")
    assert expect in text
    service.assert_unchanged(before)
