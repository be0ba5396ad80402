"""eKuiper's words first: every refusal's message starts with the text eKuiper gives in the same case.

One row per case; docs/messages.md is the same table for readers. Each row builds its request against a fresh
service and asserts the status, the compact error body Go's http.Error writes (`{"error":N,"message":"..."}`
and a newline) and eKuiper's text as the message's prefix; anything of ours follows after " (".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import make_zip

SO = b"\x7fELF so"
YAML = "default:\n  interval: 1000\n"


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable  # (service, file_server) -> response
    status: int
    prefix: str  # eKuiper's words, with {url}/{home}/{data} filled in


def post(plugin_type, body):
    return lambda service, server: service.client.post(f"/plugins/{plugin_type}", json=body(server, service))


def served(server, name, members, modes=None):
    make_zip(server.root / name, members, modes=modes)
    return server.url(name)


def source(server, service, members=None, zip_name="random.zip"):
    content = {"Random@v1.0.0.so": SO, "random.yaml": YAML, **(members or {})}
    return {"name": "random", "file": served(server, zip_name, {k: v for k, v in content.items() if v is not None})}


def junk(server) -> str:
    (server.root / "junk.zip").write_bytes(b"<html>not a zip</html>")
    return server.url("junk.zip")


def installed_then(second):
    """Install source plugin random (and function plugin misc), then send `second`."""

    def send(service, server):
        assert service.post("sources", source(server, service)).status_code == 201
        body = {"name": "misc", "file": served(server, "misc.zip", {"misc.so": SO}), "functions": ["f1"]}
        assert service.post("functions", body).status_code == 201
        return second(service, server)

    return send


PORTABLE_JSON = {"version": "v1", "language": "go", "executable": "mirror", "sinks": ["echo"]}

CASES = [
    Case("id-invalid-characters", post("sources", lambda s, v: {"name": "a.b", "file": "http://x/a.zip"}), 400,
         "id 'a.b' contains invalid characters: only alphanumeric, hyphens and underscores are allowed"),
    Case("id-empty", post("sources", lambda s, v: {"name": "", "file": "http://x/a.zip"}), 400,
         "id cannot be empty"),
    Case("id-whitespace", post("sinks", lambda s, v: {"name": " a", "file": "http://x/a.zip"}), 400,
         "id ' a' contains leading or trailing whitespace"),
    Case("id-in-path", lambda service, server: service.client.get("/plugins/sources/a.b"), 400,
         "id 'a.b' contains invalid characters: only alphanumeric, hyphens and underscores are allowed"),
    Case("body-empty", lambda service, server: service.client.post("/plugins/sources", data=b""), 400,
         "Invalid body: Error decoding the sources plugin json: EOF"),
    Case("invalid-uri", post("sources", lambda s, v: {"name": "random", "file": "ftp://x/a.zip"}), 400,
         "sources plugins create command error: invalid uri ftp://x/a.zip"),
    Case("invalid-uri-no-zip", post("portables", lambda s, v: {"name": "mirror", "file": "http://x/a.tar"}), 400,
         "portable plugin create command error: invalid uri http://x/a.tar"),
    Case("duplicate", installed_then(post("sources", source)), 400,
         "sources plugins create command error: invalid name random: duplicate"),
    Case("function-name-exists",
         installed_then(post("functions", lambda s, v: {"name": "other", "file": "http://127.0.0.1:1/o.zip",
                                                        "functions": ["f1"]})), 400,
         "functions plugins create command error: function name f1 already exists"),
    Case("download-status", post("sources", lambda s, v: {"name": "random", "file": s.url("missing.zip")}), 400,
         "sources plugins create command error: fail to download file {url}missing.zip: cannot download the file"
         " with status: 404 File not found"),  # Go's resp.Status: the code and the server's own reason phrase
    Case("file-access-denied", post("sources", lambda s, v: {"name": "random", "file": "file:///etc/x.zip"}), 400,
         "sources plugins create command error: fail to download file file:///etc/x.zip: file access denied: path"
         " must be under {data}/uploads"),
    Case("not-a-zip", post("sources", lambda s, v: {"name": "random", "file": junk(s)}), 400,
         "sources plugins create command error: fail to install plugin: zip: not a valid zip file"),
    Case("zip-check-no-yaml", post("sources", lambda s, v: source(s, v, {"random.yaml": None})), 400,
         "sources plugins create command error: fail to install plugin: invalid zip file: expectFiles: 3, got"
         " filenames:[{home}/plugins/sources/Random@v1.0.0.so], zipFiles: [Random@v1.0.0.so],"
         " yamlFileChecked:false, soFileChecked:true"),
    Case("zip-check-no-so", post("sinks", lambda s, v: {"name": "file2", "file": served(s, "f.zip", {"x.txt": "x"})}),
         400, "sinks plugins create command error: fail to install plugin: invalid zip file: expectFiles: 1, got"
         " filenames:[], zipFiles: [x.txt], yamlFileChecked:false, soFileChecked:false"),
    Case("shell-paras-without-script",
         post("sources", lambda s, v: source(s, v) | {"shellParas": ["a", "b"]}), 400,
         "sources plugins create command error: fail to install plugin: have shell parameters : [a b] but no"
         " install.sh file"),
    Case("portable-no-descriptor", post("portables", lambda s, v: {"name": "mirror", "file": served(
        s, "m.zip", {"mirror": b"#!/bin/sh\n"})}), 400,
         "portable plugin create command error: fail to install plugin: missing or invalid json file mirror.json,"
         " found 1 files in total"),
    Case("portable-no-language", post("portables", lambda s, v: {"name": "mirror", "file": served(
        s, "m.zip", {"mirror.json": json.dumps({"executable": "mirror", "sinks": ["e"]}), "mirror": b"x"})}), 400,
         "portable plugin create command error: fail to install plugin: invalid plugin, missing language"),
    Case("portable-no-symbols", post("portables", lambda s, v: {"name": "mirror", "file": served(
        s, "m.zip", {"mirror.json": json.dumps({"language": "go", "executable": "mirror"}), "mirror": b"x"})}), 400,
         "portable plugin create command error: fail to install plugin: invalid plugin, must define at lease one"
         " source, sink or function"),
    Case("portable-missing-executable", post("portables", lambda s, v: {"name": "mirror", "file": served(
        s, "m.zip", {"mirror.json": json.dumps(PORTABLE_JSON)})}), 400,
         "portable plugin create command error: fail to install plugin: missing mirror"),
    Case("describe-not-found", lambda service, server: service.client.get("/plugins/sources/nope"), 404,
         "describe sources plugin nope error: not found"),
    Case("delete-not-found", lambda service, server: service.client.delete("/plugins/sinks/nope"), 404,
         "delete sinks plugin nope error: invalid name nope: not exist"),
    Case("portable-delete-not-found", lambda service, server: service.client.delete("/plugins/portables/nope"), 404,
         "delete portable plugin nope error: portable plugin nope is not found"),
    Case("update-native-not-found", lambda service, server: service.client.put(
        "/plugins/sources/nope", json={"file": "http://127.0.0.1:1/a.zip"}), 404,
         "update sources plugin nope error, cannot delete old version: invalid name nope: not exist"),
    Case("register-empty", installed_then(lambda service, server: service.client.post(
        "/plugins/functions/misc/register", json={"functions": []})), 400,
         "function plugins misc regiser functions error: property 'functions' must not be empty"),
    Case("register-damaged", installed_then(lambda service, server: (
        (service.home / "plugins/functions/misc.so").unlink(),
        service.client.post("/plugins/functions/misc/register", json={"functions": ["f2"]}))[1]), 400,
         "function plugins misc regiser functions error:"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refusals_start_with_ekuipers_words(service, file_server, case):
    response = case.send(service, file_server)
    assert response.status_code == case.status, response.data
    assert response.mimetype == "application/json"
    raw = response.get_data()
    assert raw.endswith(b"}\n") and b'{"error":' in raw and b'","message":"' not in raw[:12], raw[:80]
    body = json.loads(raw)
    assert list(body) == ["error", "message"]
    assert body["error"] == (1002 if case.status == 404 else 1000)
    assert raw == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"  # Go's compact form
    expected = case.prefix.format(url=file_server.url(""), home=service.home.resolve(), data=service.layout.data)
    message = body["message"]
    assert message.startswith(expected), f"\n  ours: {message}\nwants: {expected}"
    rest = message[len(expected):]
    assert rest == "" or rest.startswith(" ("), f"ours must follow in parentheses: {rest!r}"


def test_the_docs_table_lists_every_case():
    from pathlib import Path

    table = (Path(__file__).resolve().parent.parent / "docs" / "messages.md").read_text()
    for case in CASES:
        assert f"`{case.id}`" in table, case.id


def test_bytes_after_the_json_body_are_ignored_as_gos_decoder_ignores_them(service, file_server):
    body = json.dumps(source(file_server, service)).encode() + b"\n{\"name\": \"other\"} trailing garbage"
    response = service.client.post("/plugins/sources", data=body, content_type="application/json")
    assert response.status_code == 201, response.data
    assert service.client.get("/plugins/sources").get_json() == ["random"]
