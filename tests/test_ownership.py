"""We touch only what we own, and leave nothing behind: neighbours' files, built-in names, the source
yaml rule, locks and scratch, one read of a file:// package, and links in the uploads folder.

Each refusal is checked with a listing of the whole tree before and after (`assert_unchanged`: every
file, folder, size, digest and mode under KUIPER_HOME, lock files included, and the registry dump).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading

import pytest
import requests
from conftest import make_zip

from kuiper_plugins.engine import builtins
from kuiper_plugins.layout import Layout

SO = b"\x7fELF binary"
YAML = "default:\n  interval: 1000\n"


def serve(file_server, zip_name: str, members: dict) -> str:
    make_zip(file_server.root / zip_name, members)
    return file_server.url(zip_name)


def message(response) -> str:
    assert response.mimetype == "application/json", response.data
    return response.get_json()["message"]


# ---------------------------------------------------------------------------- files that are not ours


def test_an_operators_config_folder_is_never_replaced(service, file_server):
    geo = service.home / "etc/functions/geo"
    geo.mkdir()
    (geo / "zones.json").write_text('{"operator": true}')
    url = serve(file_server, "geo.zip", {"geo.so": SO, "etc/defaults.json": "{}"})
    before = service.snapshot()
    response = service.post("functions", {"name": "geo", "file": url})
    assert response.status_code == 400
    assert message(response) == (
        "functions plugins create command error: fail to install plugin: etc/functions/geo already exists and was"
        " not installed as part of functions plugin geo (kuiper-plugins never replaces what it did not install:"
        " move it away first)")
    service.assert_unchanged(before)
    assert service.client.get("/plugins/functions").get_json() == []


@pytest.mark.parametrize("path", [
    "etc/sinks/influx.json", "data/sinks/influx.json", "plugins/sinks/Influx.so",
])
def test_a_file_someone_else_put_there_is_never_replaced(service, file_server, path):
    (service.home / path).write_bytes(b"not ours\n")
    url = serve(file_server, "influx.zip", {"Influx.so": SO, "influx.json": '{"about": {}}'})
    before = service.snapshot()
    response = service.post("sinks", {"name": "influx", "file": url})
    assert response.status_code == 400
    if path.startswith("plugins/"):  # the plugin's own binary: a plugin of that name is there, unknown to us
        assert message(response).startswith(f"sinks plugins create command error: invalid name influx: duplicate"
                                            f" ({path} already exists and was not installed")
    else:
        assert f"fail to install plugin: {path} already exists and was not installed" in message(response)
    service.assert_unchanged(before)


def test_a_portable_folder_eKuiper_installed_is_never_replaced(service, file_server):
    folder = service.home / "plugins/portable/mirror"
    folder.mkdir()
    (folder / "mirror.json").write_text('{"language": "go", "executable": "mirror", "sources": ["random"]}')
    members = {
        "mirror.json": '{"version": "v1", "language": "go", "executable": "mirror", "sinks": ["echo"]}',
        "mirror": b"#!/bin/sh\nexit 0\n",
    }
    make_zip(file_server.root / "mirror.zip", members, modes={"mirror": 0o100755})
    before = service.snapshot()
    response = service.post("portables", {"name": "mirror", "file": file_server.url("mirror.zip")})
    assert response.status_code == 400
    assert message(response).startswith("portable plugin create command error: invalid name mirror: duplicate"
                                        " (plugins/portable/mirror already exists and was not installed")
    service.assert_unchanged(before)


def test_an_update_replaces_only_the_files_of_the_plugin(service, file_server):
    v1 = serve(file_server, "v1.zip", {"Alpha@v1.0.0.so": SO, "alpha.yaml": YAML})
    assert service.post("sources", {"name": "alpha", "file": v1}).status_code == 201
    (service.home / "etc/sources/alpha.json").write_text("someone else's\n")
    v2 = serve(file_server, "v2.zip", {"Alpha@v2.0.0.so": SO, "alpha.yaml": YAML, "alpha.json": "{}"})
    before = service.snapshot()
    response = service.client.put("/plugins/sources/alpha", json={"name": "alpha", "file": v2})
    assert response.status_code == 400
    assert "etc/sources/alpha.json already exists and was not installed" in message(response)
    service.assert_unchanged(before)
    assert service.client.get("/plugins/sources/alpha").get_json() == {"name": "alpha", "version": "1.0.0"}


# ---------------------------------------------------------------------------- eKuiper's built-in names


@pytest.mark.parametrize(("plugin_type", "name", "spelled"), [
    ("sources", "mqtt", "source"), ("sources", "httppull", "source"), ("sources", "Memory", "source"),
    ("sinks", "log", "sink"), ("sinks", "rest", "sink"), ("sinks", "logtomemory", "sink"),
    ("functions", "abs", "function"), ("functions", "json_path_query", "function"),
])
def test_builtin_names_are_refused(service, file_server, plugin_type, name, spelled):
    capitalised = name[0].upper() + name[1:]
    url = serve(file_server, f"{name}.zip", {f"{capitalised}.so": SO, f"{name}.yaml": YAML})
    before = service.snapshot()
    response = service.post(plugin_type, {"name": name, "file": url})
    assert response.status_code == 400
    assert message(response) == (
        f"{plugin_type} plugins create command error: invalid name {name}:"
        f" {name} is a built-in {spelled} of eKuiper, which always uses its own")
    service.assert_unchanged(before)
    assert file_server.requests == [], "refused before anything is downloaded"


def test_builtin_function_names_are_refused_in_function_lists(service, file_server):
    url = serve(file_server, "misc.zip", {"misc.so": SO})
    before = service.snapshot()
    response = service.post("functions", {"name": "misc", "file": url, "functions": ["f1", "Avg"]})
    assert response.status_code == 400
    assert "invalid function name Avg: Avg is a built-in function of eKuiper" in message(response)
    service.assert_unchanged(before)
    assert service.post("functions", {"name": "misc", "file": url, "functions": ["f1"]}).status_code == 201
    before = service.snapshot()
    refused = service.client.post("/plugins/functions/misc/register", json={"functions": ["f1", "concat"]})
    assert refused.status_code == 400 and "concat is a built-in function" in message(refused)
    service.assert_unchanged(before)


def test_the_builtin_lists_are_eKuipers():
    assert {"mqtt", "httppull", "httppush", "file", "memory", "neuron", "websocket", "simulator"} <= builtins.SOURCES
    assert {"log", "mqtt", "rest", "nop", "memory", "neuron", "file", "websocket"} <= builtins.SINKS
    assert {"abs", "count", "avg", "concat", "lower", "window_start", "json_path_query"} <= builtins.FUNCTIONS
    assert len(builtins.FUNCTIONS) == 190
    # eKuiper's prebuilt plugins are plugins, not built-ins, in its default build.
    for plugin in ("random", "zmq", "sql", "video", "kafka", "image", "influx", "influx2", "tfLite", "geohash"):
        assert not any(builtins.builtin_name(kind, plugin) for kind in builtins.BY_KIND), plugin
    assert builtins.builtin_name("sources", "MQTT") == "mqtt"


# ---------------------------------------------------------------------------- the source yaml rule


@pytest.mark.parametrize("on_disk", [b"", YAML[:10].encode()], ids=["empty", "truncated"])
def test_an_empty_or_truncated_copy_of_our_yaml_is_rewritten(service, file_server, on_disk):
    for folder in ("etc", "data"):
        (service.home / f"{folder}/sources/alpha.yaml").write_bytes(on_disk)
    url = serve(file_server, "alpha.zip", {"Alpha@v1.0.0.so": SO, "alpha.yaml": YAML})
    assert service.post("sources", {"name": "alpha", "file": url}).status_code == 201
    for folder in ("etc", "data"):
        assert (service.home / f"{folder}/sources/alpha.yaml").read_text() == YAML


def test_an_edited_yaml_is_kept_and_an_unedited_one_follows_the_update(service, file_server):
    v1 = serve(file_server, "v1.zip", {"Alpha@v1.0.0.so": SO, "alpha.yaml": YAML})
    v2_yaml = "default:\n  interval: 2000\n"
    v2 = serve(file_server, "v2.zip", {"Alpha@v2.0.0.so": SO, "alpha.yaml": v2_yaml})
    assert service.post("sources", {"name": "alpha", "file": v1}).status_code == 201
    assert service.client.put("/plugins/sources/alpha", json={"file": v2}).status_code == 200
    assert (service.home / "data/sources/alpha.yaml").read_text() == v2_yaml  # still ours: the new one
    (service.home / "data/sources/alpha.yaml").write_text("user: edited\n")
    assert service.client.put("/plugins/sources/alpha", json={"file": v1}).status_code == 200
    assert (service.home / "data/sources/alpha.yaml").read_text() == "user: edited\n"
    assert (service.home / "etc/sources/alpha.yaml").read_text() == v2_yaml  # the group stays as it is


# ---------------------------------------------------------------------------- residue


def test_refusals_leave_no_lock_file(service, file_server):
    before = service.snapshot()
    for index in range(5):
        assert service.post("sources", {"name": f"p{index}", "file": file_server.url("missing.zip")}).status_code == 400
    service.assert_unchanged(before)
    assert sorted(p.name for p in service.layout.locks.iterdir()) == ["recovery.lock"]


def test_start_up_sweeps_dead_workers_locks_and_unfinished_uploads(home, make_service):
    service = make_service()
    layout = service.layout
    (layout.locks / "sources.random.lock").write_bytes(b"")
    dead = ["upload-999999-abc", "download-999999-def.zip"]
    for name in dead:
        (layout.incoming / name).write_bytes(b"x" * 1000)
    live = layout.incoming / f"upload-{os.getpid()}-live"
    live.write_bytes(b"being written")
    make_service()
    assert sorted(p.name for p in layout.locks.iterdir()) == ["recovery.lock"]
    assert sorted(p.name for p in layout.incoming.iterdir()) == [live.name]


def test_a_refused_upload_leaves_no_folders(make_service):
    service = make_service(max_plugin_size=1000)
    before = service.snapshot()
    response = service.client.post(
        "/config/uploads", data={"uploadFile": (io.BytesIO(b"x" * 5000), "team/a/b/big.zip")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert "larger than the limit" in message(response)
    service.assert_unchanged(before)
    assert list(service.layout.incoming.iterdir()) == []


def test_an_empty_binary_is_not_adopted(home, make_service):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("sources") / "Alpha@v1.0.0.so").write_bytes(b"")
    (layout.native_dir("sinks") / "Beta.so").write_bytes(SO)
    service = make_service()
    assert service.client.get("/plugins/sources").get_json() == []
    assert service.client.get("/plugins/sinks").get_json() == ["beta"]
    assert (layout.native_dir("sources") / "Alpha@v1.0.0.so").exists()  # not ours: left as it is


# ---------------------------------------------------------------------------- one read of the package


def test_a_pinned_file_install_installs_exactly_the_pinned_bytes_while_the_upload_changes(start_gunicorn):
    server = start_gunicorn(workers=2)
    uploads = Layout(server.home).uploads
    make_zip_bytes = {}
    for tag in ("good", "other"):
        path = server.home.parent / f"{tag}.zip"
        make_zip(path, {"Alpha@v1.0.0.so": f"{tag} binary\n".encode() * 5000, "alpha.yaml": YAML})
        make_zip_bytes[tag] = path.read_bytes()
    pinned = hashlib.sha256(make_zip_bytes["good"]).hexdigest()
    stop = threading.Event()
    uploads_done = [0]

    def re_upload() -> None:
        tags = ("other", "good")
        for index in range(400):  # bounded; stops as soon as the installs are done
            if stop.is_set():
                return
            data = make_zip_bytes[tags[index % 2]]
            requests.post(f"{server.url}/config/uploads", files={"uploadFile": ("p.zip", data)}, timeout=30)
            uploads_done[0] += 1

    (uploads / "p.zip").write_bytes(make_zip_bytes["good"])
    writer = threading.Thread(target=re_upload)
    writer.start()
    outcomes = {"installed": 0, "mismatch": 0}
    try:
        for _ in range(12):
            body = {"name": "alpha", "file": (uploads / "p.zip").as_uri(), "sha256": pinned}
            response = requests.post(f"{server.url}/plugins/sources", json=body, timeout=30)
            if response.status_code == 201:
                installed = (server.home / "plugins/sources/Alpha@v1.0.0.so").read_bytes()
                assert installed.startswith(b"good binary\n"), "other bytes were installed under the pinned digest"
                outcomes["installed"] += 1
                assert requests.delete(f"{server.url}/plugins/sources/alpha", timeout=30).status_code == 200
            else:
                # Each upload renames a whole file over p.zip; an install reads the file it opened, whichever
                # that was (test_fetch.py makes the rename land between fetch's check and its open).
                assert response.status_code == 400 and "sha256 mismatch" in response.json()["message"], response.text
                outcomes["mismatch"] += 1
    finally:
        stop.set()
        writer.join(timeout=60)
    assert outcomes["installed"] + outcomes["mismatch"] == 12 and uploads_done[0] > 0


# ---------------------------------------------------------------------------- links in the uploads folder


def test_deleting_an_upload_never_follows_a_linked_folder(service, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.zip").write_bytes(b"keep me")
    (service.layout.uploads / "link").symlink_to(outside, target_is_directory=True)
    (service.layout.uploads / "file-link.zip").symlink_to(outside / "f.zip")
    before = service.snapshot()
    for name in ("link/f.zip", "file-link.zip"):
        response = service.client.delete(f"/config/uploads/{name}")
        assert response.status_code == 400, name
        assert "links are not followed" in message(response)
    service.assert_unchanged(before)
    assert (outside / "f.zip").read_bytes() == b"keep me"
    response = service.client.post("/config/uploads", json={"name": "link/g.zip", "content": "x"})
    assert response.status_code == 400
    assert not (outside / "g.zip").exists()
