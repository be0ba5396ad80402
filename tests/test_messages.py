"""eKuiper's words first: every refusal's message starts with the text eKuiper gives in the same case.

One row per case; docs/messages.md is the same table for readers. Each row builds its request against a fresh
service and asserts the status, the compact error body Go's http.Error writes (`{"error":N,"message":"..."}`
and a newline) and eKuiper's text as the message's prefix; anything of ours follows after " (".
"""

from __future__ import annotations

import json
import threading
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
    # The reason, then eKuiper's account of its check, follow in parentheses: test_a_zip_check_gives_the_reason_...
    Case("zip-check-no-yaml", post("sources", lambda s, v: source(s, v, {"random.yaml": None})), 400,
         "sources plugins create command error: fail to install plugin: invalid zip file"),
    Case("zip-check-no-so", post("sinks", lambda s, v: {"name": "file2", "file": served(s, "f.zip", {"x.txt": "x"})}),
         400, "sinks plugins create command error: fail to install plugin: invalid zip file"),
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


def test_the_tests_the_docs_name_exist():
    """A test of this file named in docs/messages.md (without a file before it) is one of this file's."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "messages.md").read_text()
    named = set(re.findall(r"(?<![\w.:])`(test_\w+)`", text))
    assert named and all(callable(globals().get(name)) for name in named), sorted(n for n in named
                                                                                  if n not in globals())


def test_bytes_after_the_json_body_are_ignored_as_gos_decoder_ignores_them(service, file_server):
    body = json.dumps(source(file_server, service)).encode() + b"\n{\"name\": \"other\"} trailing garbage"
    response = service.client.post("/plugins/sources", data=body, content_type="application/json")
    assert response.status_code == 201, response.data
    assert service.client.get("/plugins/sources").get_json() == ["random"]


# ---------------------------------------------------------------------------- hints that say what to do
# eKuiper's words stay first; ours say which setting, which URL or which file would make the request work.
# Each test asserts the whole message, and that the refusal changed nothing.

def refusal(response, status: int = 400) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()["message"]


def test_a_private_address_names_the_allow_list_and_the_switch(service, file_server):
    before = service.snapshot()
    refused = service.post("sources", {"name": "random", "file": "http://127.0.0.1:1/random.zip"})
    assert refusal(refused) == (
        "sources plugins create command error: fail to download file http://127.0.0.1:1/random.zip: ip 127.0.0.1 is"
        " in internal network (downloads from loopback, private and link-local addresses are refused: add"
        " 127.0.0.1:1 to basic.privateNetAllowList, or set basic.enablePrivateNet to true)")
    # A redirect to another loopback port names the address it was sent to, and the entry that would allow it.
    file_server.routes["/moved.zip"] = lambda handler: (handler.send_response(302),
                                                        handler.send_header("Location", "http://[::1]:2/r.zip"),
                                                        handler.send_header("Content-Length", "0"),
                                                        handler.end_headers())
    moved = service.post("sinks", {"name": "file2", "file": file_server.url("moved.zip")})
    assert refusal(moved) == (
        f"sinks plugins create command error: fail to download file {file_server.url('moved.zip')}: ip ::1 is in"
        " internal network (redirected to http://[::1]:2/r.zip; downloads from loopback, private and link-local"
        " addresses are refused: add [::1]:2 to basic.privateNetAllowList, or set basic.enablePrivateNet to true)")
    service.assert_unchanged(before)


@pytest.mark.parametrize("plugin_type, url, words", [
    ("sources", "ftp://x/a.zip", "sources plugins create command error: invalid uri ftp://x/a.zip"),
    ("portables", "http://x/a.tar", "portable plugin create command error: invalid uri http://x/a.tar"),
    ("sinks", "http://x/a.zip?v=1", "sinks plugins create command error: invalid uri http://x/a.zip?v=1"),
])
def test_an_invalid_uri_says_what_is_accepted(service, plugin_type, url, words):
    before = service.snapshot()
    assert refusal(service.post(plugin_type, {"name": "random", "file": url})) == (
        f"{words} (accepted: http:// or https:// with a host, or file:// with an absolute path; ending in .zip, in"
        " plain ASCII, without user info, blanks or a query after the .zip)")
    service.assert_unchanged(before)


def test_an_update_says_update_and_never_create(service, file_server):
    assert service.post("sources", source(file_server, service)).status_code == 201
    mirror = {"mirror.json": json.dumps(PORTABLE_JSON), "mirror": b"#!/bin/sh\n"}
    installed = service.post("portables", {"name": "mirror", "file": served(file_server, "m.zip", mirror)})
    assert installed.status_code == 201
    before = service.snapshot()
    native = service.client.put("/plugins/sources/random", json={"file": "ftp://x/a.zip"})
    assert refusal(native).startswith("sources plugins update command error: invalid uri ftp://x/a.zip (")
    broken = service.client.put("/plugins/sources/random", json={"file": served(file_server, "b.zip", {"x.txt": "x"})})
    assert refusal(broken).startswith(
        "sources plugins update command error: fail to install plugin: invalid zip file (")
    portable = service.client.put("/plugins/portables/mirror", json={"file": served(file_server, "n.zip", {"x": "x"})})
    assert refusal(portable) == ("portable plugin update command error: fail to install plugin: missing or invalid"
                                 " json file mirror.json, found 1 files in total")
    for answer in (native, broken, portable):
        assert "create" not in refusal(answer)
    service.assert_unchanged(before)


def test_register_on_a_portable_or_a_source_says_where_its_functions_come_from(service, file_server):
    assert service.post("sources", source(file_server, service)).status_code == 201
    mirror = {"mirror.json": json.dumps({**PORTABLE_JSON, "functions": ["echo"]}), "mirror": b"#!/bin/sh\n"}
    installed = service.post("portables", {"name": "mirror", "file": served(file_server, "m.zip", mirror)})
    assert installed.status_code == 201
    before = service.snapshot()
    portable = service.client.post("/plugins/functions/mirror/register", json={"functions": ["echo", "more"]})
    assert refusal(portable, 404) == (
        "register functions plugin mirror error: not found (portable plugin mirror declares its functions in its"
        " descriptor mirror.json, in the zip; to change them, update the plugin with a package whose mirror.json"
        " lists them)")
    native = service.client.post("/plugins/functions/random/register", json={"functions": ["f1"]})
    assert refusal(native, 404) == ("register functions plugin random error: not found (sources plugin random"
                                    " exports no functions: only a function plugin has a list)")
    unknown = service.client.post("/plugins/functions/ghost/register", json={"functions": ["f1"]})
    assert refusal(unknown, 404) == "register functions plugin ghost error: not found"
    service.assert_unchanged(before)
    assert service.client.get("/plugins/udfs").get_json() == ["echo"]


@pytest.mark.parametrize("plugin_type, name, members, ours", [
    ("sources", "random", {"Random@v1.0.0.so": SO, "random.yaml": YAML},
     "sources plugins create command error: functions is not taken for a source plugin (only a function plugin"
     " exports functions: leave functions out)"),
    ("sinks", "file2", {"file2.so": SO},
     "sinks plugins create command error: functions is not taken for a sink plugin (only a function plugin exports"
     " functions: leave functions out)"),
    ("portables", "mirror", {"mirror.json": json.dumps(PORTABLE_JSON), "mirror": b"#!/bin/sh\n"},
     "portable plugin create command error: functions is not taken for a portable plugin (it declares its functions"
     " in its descriptor mirror.json, in the zip: leave functions out)"),
])
def test_functions_on_a_plugin_that_is_not_a_function_plugin_is_refused(service, file_server, plugin_type, name,
                                                                        members, ours):
    url = served(file_server, f"{name}.zip", members)
    before = service.snapshot()
    for query in ("", "?dryRun=1"):  # a dry run refuses what the install would
        answer = service.client.post(f"/plugins/{plugin_type}{query}", json={"name": name, "file": url,
                                                                             "functions": ["f1"]})
        assert refusal(answer) == ours
    service.assert_unchanged(before)
    assert file_server.requests == []  # refused before anything was downloaded
    # Installed without it, an update that brings one is refused in the update's words, and changes nothing.
    assert service.post(plugin_type, {"name": name, "file": url}).status_code == 201
    installed = service.snapshot()
    update = service.client.put(f"/plugins/{plugin_type}/{name}", json={"file": url, "functions": ["f1"]})
    assert refusal(update) == ours.replace("create command", "update command")
    service.assert_unchanged(installed)


def test_a_zip_check_gives_the_reason_before_ekuipers_account_of_it(service, file_server):
    home = service.home.resolve()
    before = service.snapshot()
    no_yaml = service.post("sources", source(file_server, service, {"random.yaml": None}))
    assert refusal(no_yaml) == (
        "sources plugins create command error: fail to install plugin: invalid zip file (source plugin random needs"
        " random.yaml at the zip root; eKuiper's check: expectFiles: 3, got"
        f" filenames:[{home}/plugins/sources/Random@v1.0.0.so], zipFiles: [Random@v1.0.0.so],"
        " yamlFileChecked:false, soFileChecked:true)")
    no_so = service.post("sinks", {"name": "file2", "file": served(file_server, "f.zip", {"x.txt": "x"})})
    assert refusal(no_so) == (
        "sinks plugins create command error: fail to install plugin: invalid zip file (no file2.so or File2.so"
        " (optionally @version) at the zip root; eKuiper's check: expectFiles: 1, got filenames:[], zipFiles:"
        " [x.txt], yamlFileChecked:false, soFileChecked:false)")
    # A long listing is cut short, so that the reason stays on the first screen.
    many = {f"doc{i:02}.txt": "x" for i in range(30)}
    answer = service.post("sources", {"name": "random", "file": served(file_server, "r.zip", many)})
    listed = " ".join(f"doc{i:02}.txt" for i in range(20))
    assert refusal(answer) == (
        "sources plugins create command error: fail to install plugin: invalid zip file (no random.so or Random.so"
        " (optionally @version) at the zip root; source plugin random needs random.yaml at the zip root; eKuiper's"
        f" check: expectFiles: 3, got filenames:[], zipFiles: [{listed} ...and 10 more], yamlFileChecked:false,"
        " soFileChecked:false)")
    service.assert_unchanged(before)


def test_stop_names_what_stops(make_service, file_server):
    sink = {"name": "file2", "file": served(file_server, "f.zip", {"file2.so": SO})}
    mirror = {"name": "mirror", "file": served(file_server, "m.zip", {"mirror.json": json.dumps(PORTABLE_JSON),
                                                                       "mirror": b"#!/bin/sh\n"})}
    alone = make_service()
    for body, plugin_type in ((sink, "sinks"), (mirror, "portables")):
        assert alone.post(plugin_type, body).status_code == 201
    update = alone.client.put("/plugins/sinks/file2?stop=1", json={"file": sink["file"]})
    assert update.get_data(as_text=True) == (
        "plugin file2 is updated and eKuiper must restart for the change to take effect. (stop=1 stops nothing: set"
        " engine.restartCommand to have it restart the engine)")
    update.close()
    portable = alone.client.delete("/plugins/portables/mirror?stop=1")
    assert portable.get_data(as_text=True) == (
        "portable plugin mirror is deleted (stop=1 stops nothing for a portable plugin: its process has ended with"
        " the delete, and the engine keeps running)")
    portable.close()
    assert alone.stops == []
    deleted = alone.client.delete("/plugins/sinks/file2?stop=1")
    assert deleted.get_data(as_text=True) == (
        "sinks plugin file2 is deleted and kuiper-plugins will be stopped (this service, not the engine:"
        " engine.restartCommand is not set, so the engine keeps running and takes the change at its next start; a"
        " supervisor such as systemd starts kuiper-plugins again)")
    deleted.close()
    assert alone.stops == [True]
    alone.stop()


def test_stop_with_a_restart_command_names_it(make_service, file_server, tmp_path):
    ran = tmp_path / "restarted"
    service = make_service(engine_restart_command=("touch", str(ran)))
    sink = {"name": "file2", "file": served(file_server, "f.zip", {"file2.so": SO})}
    assert service.post("sinks", sink).status_code == 201
    update = service.client.put("/plugins/sinks/file2?stop=1", json={"file": sink["file"]})
    assert update.get_data(as_text=True) == (
        f"plugin file2 is updated and eKuiper will be stopped (engine.restartCommand restarts it: touch {ran};"
        " kuiper-plugins keeps running)")
    update.close()
    deleted = service.client.delete("/plugins/sinks/file2?stop=1")
    assert deleted.get_data(as_text=True) == (
        f"sinks plugin file2 is deleted and eKuiper will be stopped (engine.restartCommand restarts it: touch {ran};"
        " kuiper-plugins keeps running)")
    deleted.close()
    # Each close started the command in an "engine-restart" thread (engine/restart.py) before returning:
    # joining those threads (bounded) is what makes the command's file there to look at.
    for thread in [t for t in threading.enumerate() if t.name == "engine-restart"]:
        thread.join(timeout=60)
        assert not thread.is_alive(), "the restart command did not end within 60 s"
    assert ran.exists() and service.stops == []


@pytest.mark.slow
def test_a_busy_port_names_the_setting_to_change(tmp_path):
    """`make run` while another program holds the port: one line naming basic.restPort, and nothing written."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    home = tmp_path / "home"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        env = {name: value for name, value in os.environ.items() if not name.startswith("KUIPER")}
        env.update(KUIPER_HOME=str(home), KUIPER_PLUGINS__BASIC__RESTPORT=str(port))
        started = subprocess.run([str(Path(sys.executable).parent / "gunicorn"), "-c", "etc/gunicorn.conf.py",
                                  "wsgi:app"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    output = started.stdout + started.stderr
    assert started.returncode == 1, output
    assert (f"kuiper-plugins cannot start: listen tcp 127.0.0.1:{port}: bind: address already in use (another program"
            f" listens on port {port}: set basic.restPort in kuiper-plugins.yaml or KUIPER_PLUGINS__BASIC__RESTPORT,"
            " e.g. `KUIPER_PLUGINS__BASIC__RESTPORT=9095 make run`)") in output.splitlines()
    assert "Connection in use" not in output and "Traceback" not in output  # said once, before gunicorn retries
    assert not (home / "data").exists()  # refused before the registry was made or recovered
