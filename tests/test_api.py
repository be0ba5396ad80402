"""The REST API through Flask's test client, with packages served by a real loopback HTTP server."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from conftest import make_zip

SO = b"\x7fELF fake shared object"


def source_zip(file_server, name="random", members=None, *, so=None, zip_name=None, modes=None):
    """Build a source plugin zip in the served folder and return its URL."""
    content = {so or f"{name[0].upper()}{name[1:]}@v1.0.0.so": SO, f"{name}.yaml": "default:\n  interval: 1000\n"}
    content.update(members or {})
    content = {k: v for k, v in content.items() if v is not None}
    zip_name = zip_name or f"{name}.zip"
    make_zip(file_server.root / zip_name, content, modes=modes)
    return file_server.url(zip_name)


def plugin_zip(file_server, zip_name, members, modes=None):
    make_zip(file_server.root / zip_name, members, modes=modes)
    return file_server.url(zip_name)


def portable_members(name="mirror", descriptor=None, extra=None):
    descriptor = descriptor if descriptor is not None else {
        "version": "v1.0.0", "language": "go", "executable": name,
        "sources": ["random"], "sinks": ["file"], "functions": ["echo"],
    }
    members = {
        f"{name}.json": json.dumps(descriptor) if isinstance(descriptor, dict) else descriptor,
        name: b"#!/bin/sh\nexit 0\n",
        "sources/random.yaml": "default:\n",
        "sources/random.json": "{}",
        "sinks/file.json": "{}",
        "functions/echo.json": "{}",
    }
    members.update(extra or {})
    return {k: v for k, v in members.items() if v is not None}


def message(response) -> str:
    assert response.mimetype == "application/json", response.data
    body = response.get_json()
    assert set(body) == {"error", "message"}
    return body["message"]


# ---------------------------------------------------------------------------- native create and describe


def test_source_install_writes_the_layout(service, file_server):
    url = source_zip(file_server, members={"random.json": '{"about": {}}', "etc/conf/a.yaml": "a: 1\n"})
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 201
    assert response.data == b"sources plugin random is created"
    assert response.mimetype == "text/plain"
    home = service.home
    assert (home / "plugins/sources/Random@v1.0.0.so").read_bytes() == SO
    for folder in ("etc", "data"):
        assert (home / f"{folder}/sources/random.yaml").read_text() == "default:\n  interval: 1000\n"
        assert (home / f"{folder}/sources/random.json").read_text() == '{"about": {}}'
        assert (home / f"{folder}/sources/random/conf/a.yaml").read_text() == "a: 1\n"
    assert list(service.layout.staging.iterdir()) == []
    assert service.client.get("/plugins/sources").get_json() == ["random"]
    described = service.client.get("/plugins/sources/random")
    assert described.status_code == 200
    assert described.get_json() == {"name": "random", "version": "1.0.0"}


def test_lowercase_so_without_version_is_described_with_empty_version(service, file_server):
    url = plugin_zip(file_server, "sink.zip", {"file2.so": SO})
    assert service.post("sinks", {"name": "file2", "file": url}).status_code == 201
    assert (service.home / "plugins/sinks/file2.so").exists()
    assert service.client.get("/plugins/sinks/file2").get_json() == {"name": "file2", "version": ""}


def test_list_is_sorted(service, file_server):
    for name in ("zeta", "alpha", "mid"):
        url = plugin_zip(file_server, f"{name}.zip", {f"{name}.so": SO})
        assert service.post("sinks", {"name": name, "file": url}).status_code == 201
    assert service.client.get("/plugins/sinks").get_json() == ["alpha", "mid", "zeta"]
    assert service.client.get("/plugins/sources").get_json() == []


@pytest.mark.parametrize(
    "members, expected",
    [
        ({"random.yaml": None}, "needs random.yaml"),
        ({"Random@v1.0.0.so": None, "Other@v1.0.0.so": SO}, "no random.so or Random.so"),
        ({"Random@v1.0.0.so": None}, "no random.so or Random.so"),
        ({"random@v2.so": SO}, "more than one binary"),
        ({"Random@v1.0.0.so": None, "Random@v1..0.so": SO}, "invalid version"),
    ],
    ids=["source-without-yaml", "so-for-another-name", "no-so", "two-binaries", "dotdot-version"],
)
def test_package_rule_refusals_leave_nothing(service, file_server, members, expected):
    url = source_zip(file_server, members=members)
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 400
    assert expected in message(response)
    assert message(response).startswith("sources plugins create command error: fail to install plugin: ")
    service.assert_unchanged(before)


def test_not_a_zip_is_refused(service, file_server):
    (file_server.root / "junk.zip").write_bytes(b"<html>not a zip</html>")
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": file_server.url("junk.zip")})
    assert response.status_code == 400
    assert message(response).startswith(
        "sources plugins create command error: fail to install plugin: zip: not a valid zip file")
    service.assert_unchanged(before)


def test_duplicate_name_is_refused_and_keeps_the_first(service, file_server):
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    before = service.snapshot()
    for name in ("random", "Random"):
        response = service.post("sources", {"name": name, "file": url})
        assert response.status_code == 400
        assert message(response) == f"sources plugins create command error: invalid name {name}: duplicate"
    service.assert_unchanged(before)


def test_existing_source_yaml_is_kept_and_survives_delete(service, file_server):
    for folder in ("etc", "data"):
        (service.home / f"{folder}/sources/random.yaml").write_text("user: edited\n")
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    for folder in ("etc", "data"):
        assert (service.home / f"{folder}/sources/random.yaml").read_text() == "user: edited\n"
    assert service.client.delete("/plugins/sources/random").status_code == 200
    assert (service.home / "etc/sources/random.yaml").read_text() == "user: edited\n"
    assert not (service.home / "plugins/sources/Random@v1.0.0.so").exists()


# ---------------------------------------------------------------------------- install.sh


def test_install_script_receives_shell_paras(service, file_server, tmp_path):
    record = tmp_path / "args.txt"
    script = f'#!/bin/sh\nprintf "%s|" "$@" > {record}\nls > {tmp_path / "cwd.txt"}\n'
    url = source_zip(file_server, members={"install.sh": script, "dep.conf": "x"})
    body = {"name": "random", "file": url, "shellParas": ["a b", "; touch /tmp/kp-pwned", ""]}
    response = service.post("sources", body)
    assert response.status_code == 201, response.data
    assert record.read_text() == "a b|; touch /tmp/kp-pwned||"
    assert "dep.conf" in (tmp_path / "cwd.txt").read_text().split()
    assert not os.path.exists("/tmp/kp-pwned")
    # Files for install.sh only are dropped after the install.
    assert not list(service.home.rglob("dep.conf"))
    assert not list(service.home.rglob("install.sh"))


def test_failing_install_script_leaves_nothing(service, file_server):
    url = source_zip(file_server, members={"install.sh": "echo preparing\necho broken >&2\nexit 3\n"})
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 400
    text = message(response)
    assert "exit status 3" in text and "broken" in text
    service.assert_unchanged(before)
    assert service.client.get("/plugins/sources").get_json() == []


def test_shell_paras_without_install_script_is_refused(service, file_server):
    url = source_zip(file_server)
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": url, "shellParas": ["a", "b"]})
    assert response.status_code == 400
    assert "have shell parameters : [a b] but no install.sh file" in message(response)
    service.assert_unchanged(before)


def test_install_scripts_switched_off_refuses_packages_with_one(make_service, file_server):
    service = make_service(install_scripts=False)
    url = source_zip(file_server, members={"install.sh": "exit 0\n"})
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 400
    assert "installScripts" in message(response)
    service.assert_unchanged(before)


# ---------------------------------------------------------------------------- functions


def test_function_plugin_with_functions_and_udfs(service, file_server):
    url = plugin_zip(file_server, "misc.zip", {"Misc@v2.so": SO})
    response = service.post("functions", {"name": "misc", "file": url, "functions": ["f1", "f2"]})
    assert response.status_code == 201
    assert service.client.get("/plugins/functions/misc").get_json() == {
        "functions": ["f1", "f2"], "name": "misc", "version": "2",
    }
    assert service.client.get("/plugins/udfs").get_json() == ["f1", "f2"]
    assert service.client.get("/plugins/udfs/f2").get_json() == {"name": "f2", "plugin": "misc"}
    missing = service.client.get("/plugins/udfs/nope")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": 1002, "message": "describe function nope error: not found"}


def test_function_plugin_defaults_to_its_own_name(service, file_server):
    url = plugin_zip(file_server, "echo.zip", {"echo.so": SO})
    assert service.post("functions", {"name": "echo", "file": url}).status_code == 201
    assert service.client.get("/plugins/functions/echo").get_json()["functions"] == ["echo"]


def test_function_clash_registers_nothing_and_writes_nothing(service, file_server):
    url = plugin_zip(file_server, "misc.zip", {"misc.so": SO})
    assert service.post("functions", {"name": "misc", "file": url, "functions": ["f1", "f2"]}).status_code == 201
    before = service.snapshot()
    other = plugin_zip(file_server, "other.zip", {"other.so": SO})
    response = service.post("functions", {"name": "other", "file": other, "functions": ["f3", "f2"]})
    assert response.status_code == 400
    assert "function name f2 already exists" in message(response)
    service.assert_unchanged(before)
    assert service.client.get("/plugins/udfs").get_json() == ["f1", "f2"]


def test_udfs_span_native_and_portable(service, file_server):
    url = plugin_zip(file_server, "misc.zip", {"misc.so": SO})
    assert service.post("functions", {"name": "misc", "file": url, "functions": ["zz", "aa"]}).status_code == 201
    portable = plugin_zip(file_server, "mirror.zip", portable_members(), modes={"mirror": 0o100755})
    assert service.post("portables", {"name": "mirror", "file": portable}).status_code == 201
    assert service.client.get("/plugins/udfs").get_json() == ["aa", "echo", "zz"]
    assert service.client.get("/plugins/udfs/echo").get_json() == {"name": "echo", "plugin": "mirror"}


def test_register_replaces_the_function_list(service, file_server):
    url = plugin_zip(file_server, "misc.zip", {"misc.so": SO})
    assert service.post("functions", {"name": "misc", "file": url}).status_code == 201
    response = service.client.post("/plugins/functions/misc/register", json={"Functions": ["a", "b"]})
    assert response.status_code == 200
    assert response.data == b"function plugin misc function list is registered"
    assert service.client.get("/plugins/udfs").get_json() == ["a", "b"]
    assert service.client.get("/plugins/functions/misc").get_json()["functions"] == ["a", "b"]


def test_register_refusals(service, file_server):
    for name, functions in (("misc", ["m1"]), ("other", ["o1"])):
        url = plugin_zip(file_server, f"{name}.zip", {f"{name}.so": SO})
        body = {"name": name, "file": url, "functions": functions}
        assert service.post("functions", body).status_code == 201
    before = service.snapshot()
    unknown = service.client.post("/plugins/functions/ghost/register", json={"functions": ["x"]})
    assert unknown.status_code == 404
    assert message(unknown) == "register functions plugin ghost error: not found"
    empty = service.client.post("/plugins/functions/misc/register", json={"functions": []})
    assert empty.status_code == 400
    assert "must not be empty" in message(empty)
    clash = service.client.post("/plugins/functions/misc/register", json={"functions": ["m2", "o1"]})
    assert clash.status_code == 400
    assert "function name o1 already exists" in message(clash)
    not_a_list = service.client.post("/plugins/functions/misc/register", json={"functions": "m2"})
    assert not_a_list.status_code == 400
    service.assert_unchanged(before)
    assert service.client.get("/plugins/udfs").get_json() == ["m1", "o1"]


# ---------------------------------------------------------------------------- portable


def test_portable_install_describe_list_delete(service, file_server):
    url = plugin_zip(file_server, "mirror.zip", portable_members(extra={"lib/helper.txt": "h"}),
                     modes={"mirror": 0o100755})
    response = service.post("portables", {"name": "mirror", "file": url})
    assert response.status_code == 201, response.data
    assert response.data == b"portable plugin mirror is created"
    folder = service.home / "plugins/portable/mirror"
    executable = folder / "mirror"
    assert executable.stat().st_mode & stat.S_IXUSR, "the executable keeps the zip's run bit"
    assert (folder / "mirror.json").exists() and (folder / "lib/helper.txt").read_text() == "h"
    assert not (folder / "sources").exists()
    for root in ("etc", "data"):
        assert (service.home / root / "sources/random.yaml").exists()
        assert (service.home / root / "sinks/file.json").exists()
        assert (service.home / root / "functions/echo.json").exists()
    expected = {
        "name": "mirror", "version": "v1.0.0", "language": "go", "executable": str(executable),
        "sources": ["random"], "sinks": ["file"], "functions": ["echo"],
    }
    described = service.client.get("/plugins/portables/mirror")
    assert described.get_json() == expected
    assert list(json.loads(described.data)) == list(expected)
    assert service.client.get("/plugins/portables").get_json() == [expected]
    deleted = service.client.delete("/plugins/portables/mirror")
    assert deleted.status_code == 200
    assert deleted.data == b"portable plugin mirror is deleted"
    assert not folder.exists()
    assert not (service.home / "etc/sources/random.yaml").exists()
    assert service.client.get("/plugins/udfs").get_json() == []
    assert service.client.delete("/plugins/portables/mirror").status_code == 404


@pytest.mark.parametrize(
    "descriptor, extra, expected",
    [
        ({"name": "other", "language": "go", "executable": "mirror", "sources": ["random"]}, None,
         "invalid plugin, expect name 'mirror' but got 'other'"),
        ({"executable": "mirror", "sources": ["random"]}, None, "invalid plugin, missing language"),
        ({"language": "go", "sources": ["random"]}, None, "invalid plugin, missing executable"),
        ({"language": "go", "executable": "mirror"}, None,
         "invalid plugin, must define at lease one source, sink or function"),
        ({"language": "java", "executable": "mirror", "sources": ["random"]}, None,
         "invalid plugin, language 'java' is not supported"),
        ({"language": "go", "executable": "mirror.exe", "sources": ["random"]}, None, "missing mirror.exe"),
        ({"language": "go", "executable": "mirror", "sources": ["random", "other"]}, None,
         "missing sources/other.yaml"),
        ("{not json", None, "invalid json file mirror.json"),
        (None, {"mirror.json": None}, "missing or invalid json file mirror.json"),
    ],
    ids=["name", "language", "executable", "no-symbols", "unsupported-language", "missing-executable",
         "missing-source-yaml", "bad-json", "no-descriptor"],
)
def test_portable_descriptor_checks(service, file_server, descriptor, extra, expected):
    members = portable_members(descriptor=descriptor or {}, extra=extra)
    url = plugin_zip(file_server, "mirror.zip", members)
    before = service.snapshot()
    response = service.post("portables", {"name": "mirror", "file": url})
    assert response.status_code == 400
    assert expected in message(response)
    assert message(response).startswith("portable plugin create command error: ")
    service.assert_unchanged(before)


def test_portable_update_on_unknown_name_creates_it(service, file_server):
    url = plugin_zip(file_server, "mirror.zip", portable_members())
    response = service.client.put("/plugins/portables/mirror", json={"file": url})
    assert response.status_code == 200
    assert response.data == b"portable plugin mirror is updated"
    assert service.client.get("/plugins/portables/mirror").status_code == 200


# ---------------------------------------------------------------------------- delete and update


def test_delete_then_recreate(service, file_server):
    url = source_zip(file_server, members={"etc/x.conf": "x"})
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    deleted = service.client.delete("/plugins/sources/random")
    assert deleted.status_code == 200
    assert deleted.data == (
        b"sources plugin random is deleted and eKuiper must restart for the change to take effect."
    )
    assert service.client.get("/plugins/sources").get_json() == []
    assert service.client.get("/plugins/sources/random").status_code == 404
    assert not any(p.is_file() for p in (service.home / "plugins/sources").iterdir())
    assert not (service.home / "etc/sources/random").exists()
    # The source's configuration stays, as eKuiper's delete does not keep it but a user expects.
    for folder in ("etc", "data"):
        assert (service.home / f"{folder}/sources/random.yaml").read_text() == "default:\n  interval: 1000\n"
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    again = service.client.delete("/plugins/sources/random")
    assert again.status_code == 200
    missing = service.client.delete("/plugins/sources/random")
    assert missing.status_code == 404
    assert missing.get_json()["error"] == 1002


def test_delete_with_stop_answers_then_stops(service, file_server):
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    response = service.client.delete("/plugins/sources/random?stop=1")
    assert response.status_code == 200
    assert response.data == (b"sources plugin random is deleted and kuiper-plugins will be stopped (this service, not"
                             b" the engine: engine.restartCommand is not set, so the engine keeps running and takes"
                             b" the change at its next start; a supervisor such as systemd starts kuiper-plugins"
                             b" again)")
    response.close()
    assert service.stops == [True]


def test_delete_with_files_already_gone(service, file_server):
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    (service.home / "plugins/sources/Random@v1.0.0.so").unlink()
    assert service.client.delete("/plugins/sources/random").status_code == 200
    assert service.client.get("/plugins/sources").get_json() == []


def test_update_swaps_the_package(service, file_server):
    url = source_zip(file_server, members={"etc/old.conf": "old"})
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    (service.home / "etc/sources/random.yaml").write_text("user: edited\n")
    new = source_zip(file_server, so="Random@v2.0.0.so", members={"etc/new.conf": "new"}, zip_name="v2.zip")
    response = service.client.put("/plugins/sources/random", json={"name": "random", "file": new})
    assert response.status_code == 200
    assert response.data == b"plugin random is updated and eKuiper must restart for the change to take effect."
    assert service.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "2.0.0"}
    home = service.home
    assert not (home / "plugins/sources/Random@v1.0.0.so").exists()
    assert (home / "plugins/sources/Random@v2.0.0.so").exists()
    assert (home / "etc/sources/random/new.conf").exists() and not (home / "etc/sources/random/old.conf").exists()
    assert (home / "etc/sources/random.yaml").read_text() == "user: edited\n"
    assert list(service.layout.staging.iterdir()) == []
    # A delete keeps the yaml, the user's configuration.
    assert service.client.delete("/plugins/sources/random").status_code == 200
    assert (home / "etc/sources/random.yaml").read_text() == "user: edited\n"
    assert not (home / "plugins/sources/Random@v2.0.0.so").exists()


def test_update_unknown_native_is_404(service, file_server):
    url = source_zip(file_server)
    before = service.snapshot()
    response = service.client.put("/plugins/sources/random", json={"file": url})
    assert response.status_code == 404
    assert response.get_json()["error"] == 1002
    service.assert_unchanged(before)


def test_update_with_broken_zip_keeps_the_old_plugin_whole(service, file_server):
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    before = service.snapshot()
    (file_server.root / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    response = service.client.put("/plugins/sources/random", json={"file": file_server.url("broken.zip")})
    assert response.status_code == 400
    service.assert_unchanged(before)
    failing = source_zip(file_server, so="Random@v3.so", members={"install.sh": "exit 1\n"}, zip_name="v3.zip")
    response = service.client.put("/plugins/sources/random", json={"file": failing})
    assert response.status_code == 400
    service.assert_unchanged(before)
    assert service.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "1.0.0"}


def test_update_body_name_must_match_the_path(service, file_server):
    url = source_zip(file_server)
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    before = service.snapshot()
    response = service.client.put("/plugins/sources/random", json={"name": "other", "file": url})
    assert response.status_code == 400
    service.assert_unchanged(before)


# ---------------------------------------------------------------------------- names, bodies, routes


@pytest.mark.parametrize("name", ["", " a", "a b", "../x", "a.b", "ｒandom", "café", "x" * 251, "a\nb"])
def test_name_rule_in_bodies(service, file_server, name):
    before = service.snapshot()
    response = service.post("sources", {"name": name, "file": source_zip(file_server)})
    assert response.status_code == 400
    assert message(response).startswith("id "), "eKuiper's ID rule, in its words, without a prefix"
    service.assert_unchanged(before)


@pytest.mark.parametrize("path", ["invalid%20name", "a.b", "caf%C3%A9", "x" * 251])
@pytest.mark.parametrize("method", ["get", "delete", "put"])
def test_name_rule_in_paths(service, method, path):
    before = service.snapshot()
    response = getattr(service.client, method)(f"/plugins/sources/{path}", json={"file": "http://x/a.zip"})
    assert response.status_code == 400
    assert message(response).startswith("id '")
    service.assert_unchanged(before)


@pytest.mark.parametrize(
    "body",
    [
        {"file": "http://example.com/a.zip"},
        {"name": "random"},
        {"name": 42, "file": "http://example.com/a.zip"},
        {"name": "random", "file": ["x"]},
        {"name": "random", "file": "http://example.com/a.zip", "shellParas": "a b"},
        {"name": "random", "file": "http://example.com/a.zip", "functions": {}},
        {"name": "random", "file": "ftp://example.com/a.zip"},
        {"name": "random", "file": "http://example.com/a.tar"},
        [],
        None,
    ],
)
def test_bad_bodies_are_400(service, body):
    before = service.snapshot()
    response = service.post("sources", body)
    assert response.status_code == 400
    message(response)
    service.assert_unchanged(before)


def test_keys_are_case_insensitive_and_unknown_keys_ignored(service, file_server):
    url = source_zip(file_server)
    response = service.client.post("/plugins/sources", json={"NAME": "random", "File": url, "extra": 1})
    assert response.status_code == 201
    assert json.loads(service.app.extensions["kuiper_plugins"].installer._connect().execute(
        "SELECT request FROM plugins").fetchone()[0]) == {"name": "random", "file": url}


def test_raw_json_edge_cases(service):
    for raw in (b'{"name":', b"", b'{"name": NaN}', b'{"name": "\\ud800"}', b"[" * 30000 + b"]" * 30000,
                b'{"name": 1' + b"0" * 5000 + b"}"):
        response = service.client.post("/plugins/sources", data=raw, content_type="application/json")
        assert response.status_code == 400, raw[:40]
        message(response)


def test_oversized_body_is_413(service):
    response = service.client.post("/plugins/sources", data=b"{" + b" " * (1024 * 1024 + 1) + b"}",
                                   content_type="application/json")
    assert response.status_code == 413
    message(response)


def test_unknown_type_and_wrong_method(service):
    unknown = service.client.get("/plugins/wasm")
    assert unknown.status_code == 404
    assert unknown.get_json()["error"] == 1002
    wrong = service.client.patch("/plugins/sources")
    assert wrong.status_code == 405
    assert "GET" in wrong.headers["Allow"]
    message(wrong)


def test_describe_unknown_is_404(service):
    for plugin_type in ("sources", "sinks", "functions", "portables"):
        response = service.client.get(f"/plugins/{plugin_type}/ghost")
        assert response.status_code == 404
        label = "portable" if plugin_type == "portables" else plugin_type
        assert response.get_json() == {"error": 1002, "message": f"describe {label} plugin ghost error: not found"}


# ---------------------------------------------------------------------------- prebuild, health


def test_prebuild_urls(make_service):
    service = make_service(plugin_hosts=("https://a.example", "https://b.example"), kuiper_version="2.1.0")
    response = service.client.get("/plugins/sinks/prebuild")
    assert response.status_code == 200
    urls = response.get_json()
    assert set(urls) == {"image", "influx", "influx2", "zmq", "kafka", "sql"}
    from kuiper_plugins.install.catalog import go_arch, os_family

    assert urls["kafka"] == f"https://a.example/kuiper-plugins/2.1.0/{os_family()}/sinks/kafka_{go_arch()}.zip"
    assert service.client.get("/plugins/portables/prebuild").status_code == 404


def test_ping_and_readiness(service):
    assert service.client.get("/ping").status_code == 200
    ready = service.client.get("/").get_json()
    assert ready["registry"]["plugins"] == {"sources": 0, "sinks": 0, "functions": 0, "portables": 0}
    assert {"version", "os", "arch", "upTimeSeconds"} <= set(ready)


# ---------------------------------------------------------------------------- guards at their defaults


def test_private_addresses_are_refused_by_default(make_service, file_server):
    service = make_service(private_net_allow_list=())
    url = source_zip(file_server)
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 400
    assert "internal network" in message(response)
    assert file_server.requests == []
    service.assert_unchanged(before)


def test_file_urls_are_jailed_to_uploads(service, tmp_path):
    outside = make_zip(tmp_path / "outside/random.zip", {"Random.so": SO, "random.yaml": "a: 1\n"})
    before = service.snapshot()
    response = service.post("sources", {"name": "random", "file": outside.as_uri()})
    assert response.status_code == 400
    assert "file access denied" in message(response)
    service.assert_unchanged(before)
    inside = make_zip(service.layout.uploads / "random.zip", {"Random.so": SO, "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": inside.as_uri()}).status_code == 201
    assert inside.exists(), "the uploaded file stays where it was"


# ---------------------------------------------------------------------------- logs


def test_one_structured_log_line_per_operation(service, file_server, caplog):
    url = source_zip(file_server)
    caplog.set_level("INFO", logger="kuiper_plugins.install.installer")
    assert service.post("sources", {"name": "random", "file": url}).status_code == 201
    assert service.post("sources", {"name": "random", "file": url}).status_code == 400
    assert service.client.delete("/plugins/sources/random").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plugin ")]
    assert len(lines) == 3, lines
    installed, refused, deleted = lines
    assert re.fullmatch(
        rf"plugin install: type=sources name=random version=1\.0\.0 url={re.escape(url)} sha256=[0-9a-f]{{64}}"
        r" outcome=ok duration=\d+\.\d{3}s", installed)
    assert "outcome=refused:400" in refused and "duplicate" in refused
    assert deleted.startswith("plugin delete: type=sources name=random version=1.0.0 ") and "outcome=ok" in deleted
