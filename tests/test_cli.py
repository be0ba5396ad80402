"""The kuiper-plugins command-line client against the real app served on a loopback port.

The app runs in-process under werkzeug's server in a thread; the CLI runs in-process through
`main(argv)` (output captured with capsys) and, in a few tests, as the installed console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import make_zip
from flask import request
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from kuiper_plugins import create_app
from kuiper_plugins.cli.main import TOKEN_ENV, URL_ENV, main
from kuiper_plugins.settings import Settings

CLI = Path(sys.executable).parent / "kuiper-plugins"
SO = b"\x7fELF fake shared object"


class QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler without its access log on stderr (capsys would catch it)."""

    def log(self, type, message, *args):
        pass


class Serving:
    """A WSGI app served on 127.0.0.1 by werkzeug in a thread."""

    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@dataclass
class LiveService:
    url: str
    home: Path
    stopped: threading.Event
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization) per request
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) per request


@pytest.fixture
def server(home, file_server):
    """The real app (stop_service only records the call) on a loopback port."""
    stopped = threading.Event()
    settings = Settings(home=home, private_net_allow_list=(f"127.0.0.1:{file_server.port}",),
                        portable_verify_on_install=False)  # stub portable packages
    app = create_app(settings, stop_service=stopped.set)
    live = LiveService(url="", home=home, stopped=stopped)

    @app.before_request
    def record_request():
        live.seen.append((request.path, request.headers.get("Authorization")))
        live.calls.append((request.method, request.path))

    serving = Serving(app)
    live.url = serving.url
    try:
        yield live
    finally:
        serving.stop()


def run(capsys, server_url: str | None, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return its exit status, stdout and stderr."""
    capsys.readouterr()
    prefix = ["--url", server_url] if server_url else []
    status = main([*prefix, *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def source_zip(root: Path, name: str = "random", version: str = "v1.0.0", zip_name: str | None = None,
               extra: dict | None = None) -> Path:
    members = {f"{name[0].upper()}{name[1:]}@{version}.so": SO, f"{name}.yaml": "default:\n  interval: 1000\n"}
    members.update(extra or {})
    return make_zip(root / (zip_name or f"{name}.zip"), members)


def served_source(file_server, name: str = "random", version: str = "v1.0.0", zip_name: str | None = None) -> str:
    path = source_zip(file_server.root, name, version, zip_name)
    return file_server.url(path.name)


def served_zip(file_server, zip_name: str, members: dict) -> str:
    make_zip(file_server.root / zip_name, members)
    return file_server.url(zip_name)


def portable_members(name: str = "mirror") -> dict:
    descriptor = {"version": "v1.0.0", "language": "go", "executable": name,
                  "sources": ["random"], "sinks": ["file"], "functions": ["echo"]}
    return {f"{name}.json": json.dumps(descriptor), name: b"#!/bin/sh\nexit 0\n", "sources/random.yaml": "default:\n"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- plugins


def test_create_list_describe_drop_a_source(server, file_server, capsys):
    url = served_source(file_server)
    assert run(capsys, server.url, "create", "source", "random", "--file", url) == (
        0, "sources plugin random is created\n", "")
    assert run(capsys, server.url, "list", "sources") == (0, "random\n", "")
    assert run(capsys, server.url, "describe", "source", "random") == (0, "name     random\nversion  1.0.0\n", "")

    status, out, err = run(capsys, server.url, "--json", "describe", "sources", "random")
    assert (status, err) == (0, "")
    assert json.loads(out) == {"name": "random", "version": "1.0.0"}

    status, out, err = run(capsys, server.url, "drop", "source", "random")
    assert (status, out, err) == (
        0, "sources plugin random is deleted and eKuiper must restart for the change to take effect.\n", "")
    assert not server.stopped.is_set()
    assert run(capsys, server.url, "list", "source") == (0, "No plugin is found.\n", "")
    assert not (server.home / "plugins/sources/Random@v1.0.0.so").exists()


def test_json_output_for_lists_and_text_answers(server, file_server, capsys):
    url = served_source(file_server)
    status, out, _ = run(capsys, server.url, "--json", "create", "source", "random", "--file", url)
    assert status == 0
    assert json.loads(out) == {"message": "sources plugin random is created"}
    status, out, _ = run(capsys, server.url, "--json", "list", "sources")
    assert (status, json.loads(out)) == (0, ["random"])
    # the global options are taken after the command too
    status, out, _ = run(capsys, None, "list", "sources", "--json", "--url", server.url)
    assert (status, json.loads(out)) == (0, ["random"])


def test_update_replaces_the_package(server, file_server, capsys):
    run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))
    url = served_source(file_server, version="v2.0.0", zip_name="random2.zip")
    assert run(capsys, server.url, "update", "source", "random", "--file", url) == (
        0, "plugin random is updated and eKuiper must restart for the change to take effect.\n", "")
    assert run(capsys, server.url, "describe", "source", "random")[1] == "name     random\nversion  2.0.0\n"


@pytest.mark.parametrize(("word", "segment"), [
    ("source", "sources"), ("sources", "sources"), ("sink", "sinks"), ("sinks", "sinks"),
    ("function", "functions"), ("functions", "functions"), ("portable", "portables"), ("portables", "portables"),
])
def test_type_is_taken_singular_or_plural(server, capsys, word, segment):
    assert run(capsys, server.url, "list", word) == (0, "No plugin is found.\n", "")
    assert server.seen[-1][0] == f"/plugins/{segment}"


@pytest.mark.parametrize(("create_as", "list_as"), [("sink", "sinks"), ("sinks", "sink")])
def test_create_and_list_with_either_form(server, file_server, capsys, create_as, list_as):
    url = served_zip(file_server, "file2.zip", {"file2.so": SO})
    assert run(capsys, server.url, "create", create_as, "file2", "--file", url)[0] == 0
    assert (server.home / "plugins/sinks/file2.so").exists()
    assert run(capsys, server.url, "list", list_as) == (0, "file2\n", "")
    assert run(capsys, server.url, "describe", create_as, "file2") == (0, "name     file2\nversion  -\n", "")


def test_function_plugin_functions_udfs_udf_register(server, file_server, capsys):
    url = served_zip(file_server, "misc.zip", {"Misc@v2.so": SO})
    status, out, err = run(capsys, server.url, "create", "function", "misc", "--file", url,
                           "--function", "f1", "--function", "f2")
    assert (status, out, err) == (0, "functions plugin misc is created\n", "")
    assert run(capsys, server.url, "describe", "functions", "misc")[1] == (
        "name       misc\n"
        "version    2\n"
        "functions  f1, f2\n"
    )
    assert run(capsys, server.url, "udfs") == (  # with the owning plugin (issue 22); -o name: the names alone
        0, "FUNCTION  PLUGIN  TYPE\nf1        misc    function\nf2        misc    function\n", "")
    assert run(capsys, server.url, "udfs", "-o", "name") == (0, "f1\nf2\n", "")
    assert run(capsys, server.url, "udf", "f2") == (0, "name    f2\nplugin  misc\n", "")
    status, out, _ = run(capsys, server.url, "--json", "udf", "f2")
    assert json.loads(out) == {"name": "f2", "plugin": "misc"}

    assert run(capsys, server.url, "register", "misc", "f3", "f4") == (
        0, "function plugin misc function list is registered\n", "")
    status, out, _ = run(capsys, server.url, "--json", "udfs")
    assert (status, json.loads(out)) == (0, ["f3", "f4"])
    status, out, err = run(capsys, server.url, "udf", "f1")
    assert (status, out, err) == (1, "", "error: describe function f1 error: not found\n")


def test_udfs_when_there_are_none(server, capsys):
    assert run(capsys, server.url, "udfs") == (0, "No udf is found.\n", "")


def test_portable_list_and_describe_tables(server, file_server, capsys):
    url = served_zip(file_server, "mirror.zip", portable_members())
    assert run(capsys, server.url, "create", "portable", "mirror", "--file", url) == (
        0, "portable plugin mirror is created\n", "")
    assert run(capsys, server.url, "list", "portables") == (
        0, "NAME    VERSION  LANGUAGE\nmirror  v1.0.0   go\n", "")
    status, out, _ = run(capsys, server.url, "describe", "portable", "mirror")
    rows = [line.split(None, 1) for line in out.splitlines()]
    assert rows[:3] == [["name", "mirror"], ["version", "v1.0.0"], ["language", "go"]]
    assert dict(rows)["functions"] == "echo"
    assert dict(rows)["executable"] == str(server.home / "plugins/portable/mirror/mirror")
    status, out, _ = run(capsys, server.url, "--json", "list", "portable")
    assert [p["name"] for p in json.loads(out)] == ["mirror"]
    assert run(capsys, server.url, "drop", "portable", "mirror") == (0, "portable plugin mirror is deleted\n", "")


def test_drop_with_stop_stops_the_service(server, file_server, capsys):
    url = served_zip(file_server, "file2.zip", {"file2.so": SO})
    run(capsys, server.url, "create", "sink", "file2", "--file", url)
    assert run(capsys, server.url, "drop", "sink", "file2", "--stop") == (
        0, "sinks plugin file2 is deleted and kuiper-plugins will be stopped (this service, not the engine:"
        " engine.restartCommand is not set, so the engine keeps running and takes the change at its next start; a"
        " supervisor such as systemd starts kuiper-plugins again)\n", "")
    assert server.stopped.wait(timeout=10)  # called once the response has gone out


def test_prebuild_table(server, capsys):
    status, out, err = run(capsys, server.url, "prebuild", "source")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "URL"]
    rows = dict(line.split() for line in lines[1:])
    assert list(rows) == ["random", "zmq", "sql", "video", "kafka"]
    assert "/sources/random_" in rows["random"] and rows["random"].endswith(".zip")
    # the URL column starts at the same place on every line
    assert len({line.index("http") for line in lines[1:]}) == 1
    status, out, _ = run(capsys, server.url, "--json", "prebuild", "sources")
    assert json.loads(out) == rows


def test_duplicate_name_is_an_error_with_the_servers_message(server, file_server, capsys):
    url = served_source(file_server)
    assert run(capsys, server.url, "create", "source", "random", "--file", url)[0] == 0
    assert run(capsys, server.url, "create", "source", "random", "--file", url) == (
        1, "", "error: sources plugins create command error: invalid name random: duplicate\n")


def test_unknown_plugin_is_an_error(server, capsys):
    assert run(capsys, server.url, "describe", "sink", "nope") == (
        1, "", "error: describe sinks plugin nope error: not found\n")


def test_names_are_quoted_into_the_path(server, capsys):
    status, _, err = run(capsys, server.url, "drop", "source", "../sinks/x")
    assert status == 1 and err.startswith("error: ")
    assert server.seen[-1][0] == "/plugins/sources/../sinks/x"  # one path segment, not a traversal


# ---------------------------------------------------------------------------- connection, env, token


def test_unreachable_server_exits_2(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    status, out, err = run(capsys, url, "list", "sources")
    assert (status, out) == (2, "")
    assert err == f"error: cannot reach kuiper-plugins at {url}: Connection refused\n"


def test_server_url_from_the_environment(server, capsys, monkeypatch):
    monkeypatch.setenv(URL_ENV, server.url)
    assert run(capsys, None, "list", "sources") == (0, "No plugin is found.\n", "")
    # --url wins over the environment
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{free_port()}")
    assert run(capsys, server.url, "list", "sources") == (0, "No plugin is found.\n", "")


def test_default_url_is_port_9081(capsys, monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    status, _, err = run(capsys, None, "list", "sources")
    assert status == 2
    assert "http://127.0.0.1:9081" in err


def test_default_url_is_where_this_machines_service_listens(capsys, monkeypatch, tmp_path, server):
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.setenv("KUIPER_HOME", str(tmp_path))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/kuiper.yaml").write_text("basic:\n  restIp: 0.0.0.0\n  restPort: 9081\n")  # an engine's
    status, _, err = run(capsys, None, "list", "sources")
    assert status == 2
    assert "cannot reach kuiper-plugins at http://127.0.0.1:9091" in err  # nothing of this test listens there
    # The service's own settings move it, as they move the service; eKuiper's KUIPER__ variables do not.
    monkeypatch.setenv("KUIPER__BASIC__RESTPORT", "9082")
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__RESTPORT", server.url.rsplit(":", 1)[1])
    assert run(capsys, None, "list", "sources") == (0, "No plugin is found.\n", "")
    monkeypatch.setenv("KUIPER_PLUGINS__BASIC__RESTPORT", "http")
    status, _, err = run(capsys, None, "list", "sources")
    assert (status, err) == (2, "error: cannot tell where kuiper-plugins listens: invalid value 'http' for "
                                "KUIPER_PLUGINS__BASIC__RESTPORT: expected a whole number (give --url or "
                                "$KUIPER_PLUGINS_URL)\n")


def test_token_reaches_the_server_raw(server, capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    run(capsys, server.url, "list", "sources")
    assert server.seen[-1] == ("/plugins/sources", None)
    run(capsys, server.url, "--token", "abc.def.ghi", "list", "sources")
    assert server.seen[-1] == ("/plugins/sources", "abc.def.ghi")
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    run(capsys, server.url, "udfs")
    assert server.seen[-1] == ("/plugins/udfs", "from-env")
    run(capsys, server.url, "--token", "flag-wins", "udfs")
    assert server.seen[-1] == ("/plugins/udfs", "flag-wins")


# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv", [
    ["create", "source", "random"],                                     # neither --file nor --zip
    ["create", "source", "random", "--file", "u", "--zip", "z.zip"],    # both
    ["list", "wasm"],
    ["prebuild", "portable"],
    ["register", "misc"],
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run(capsys, None, *argv)
    assert status == 2
    assert "usage: kuiper-plugins" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["create", "source", "random", "--file", "http://x/r.zip", "--function", "f"],
     "error: --function applies to function plugins only\n"),
    (["create", "source", "random", "--zip", "/nonexistent/random.zip"],
     "error: cannot upload /nonexistent/random.zip: no such file\n"),
    (["--url", "ftp://host", "udfs"], "error: the server URL must be http:// or https:// with a host, got 'ftp://host'\n"),
])
def test_refused_before_any_request(capsys, argv, message):
    assert run(capsys, None, *argv) == (2, "", message)


def test_zip_must_be_a_zip(tmp_path, capsys):
    local = tmp_path / "random.tar"
    local.write_bytes(b"x")
    assert run(capsys, None, "create", "source", "random", "--zip", str(local)) == (
        2, "", f"error: --zip expects a file whose name ends in .zip, got {local}\n")


def test_help_and_version(capsys):
    status, out, _ = run(capsys, None, "--help")
    assert status == 0 and "prebuild" in out and URL_ENV in out
    status, out, _ = run(capsys, None, "--version")
    assert status == 0 and out.startswith("kuiper-plugins ")


# ---------------------------------------------------------------------------- the client side of uploads


class Recorder:
    """A stand-in server that records what the CLI sends: uploads, installs, or a canned refusal."""

    def __init__(self, saved_path: str = "/srv/kuiper/data/uploads/random v2.zip"):
        self.saved_path = saved_path
        self.requests: list[dict] = []
        self.refuse_with: Response | None = None

    def __call__(self, environ, start_response):
        req = Request(environ)
        try:
            record = {"method": req.method, "path": req.path, "headers": dict(req.headers)}
            if req.files:
                upload = req.files["uploadFile"]
                record["filename"] = upload.filename
                record["content"] = upload.read()
            elif req.is_json:
                record["json"] = req.get_json()
        finally:
            req.close()  # the parsed upload's temporary file
        self.requests.append(record)
        if self.refuse_with is not None:
            return self.refuse_with(environ, start_response)
        if req.method == "GET" and req.path == "/config/uploads":  # asked before a --zip upload: none yet
            response = Response("[]", status=200, mimetype="application/json")
        elif req.method == "GET":  # asked before an update --zip: the plugin is there
            response = Response('{"name": "random", "version": "1.0.0"}', status=200, mimetype="application/json")
        elif req.path == "/config/uploads":
            response = Response(self.saved_path, status=201, mimetype="text/plain")
        else:
            response = Response(f"sources plugin {record['json']['name']} is created", 201, mimetype="text/plain")
        return response(environ, start_response)


@pytest.fixture
def recorder():
    app = Recorder()
    serving = Serving(app)
    app.url = serving.url
    try:
        yield app
    finally:
        serving.stop()


def test_zip_is_streamed_as_multipart_and_installed_from_the_saved_path(recorder, tmp_path, capsys):
    # install.sh: the shell parameters below need one, and the package is checked locally before the upload.
    local = source_zip(tmp_path, extra={"padding.bin": os.urandom(700_000), "install.sh": "exit 0\n"},
                       zip_name="random v2.zip")
    content = local.read_bytes()
    status, out, err = run(capsys, recorder.url, "create", "source", "random", "--zip", str(local),
                           "--shell-para=-x", "--shell-para", "fast")
    assert (status, out, err) == (0, "sources plugin random is created\n", "")  # no bar: stderr is not a tty
    asked, sent, install = recorder.requests
    assert (asked["method"], asked["path"]) == ("GET", "/config/uploads")  # is an upload of that name there?
    assert sent["path"] == "/config/uploads"
    assert sent["filename"] == "random v2.zip"
    assert sent["content"] == content
    assert "Transfer-Encoding" not in sent["headers"]
    assert int(sent["headers"]["Content-Length"]) > len(content)
    assert install["path"] == "/plugins/sources"
    assert install["json"] == {
        "name": "random",
        "file": "file:///srv/kuiper/data/uploads/random%20v2.zip",
        "shellParas": ["-x", "fast"],
        "sha256": hashlib.sha256(content).hexdigest(),  # what is installed is what was sent
    }


def test_sha256_given_is_sent_as_given(recorder, tmp_path, capsys):
    local = source_zip(tmp_path)
    digest = "ab" * 32
    assert run(capsys, recorder.url, "update", "source", "random", "--zip", str(local), "--sha256", digest)[0] == 0
    # Asked first: is the plugin there, is an upload of that name there; then the upload and the update.
    assert [(r["method"], r["path"]) for r in recorder.requests[:3]] == [
        ("GET", "/plugins/sources/random"), ("GET", "/config/uploads"), ("POST", "/config/uploads")]
    assert recorder.requests[3]["method"] == "PUT"
    assert recorder.requests[3]["path"] == "/plugins/sources/random"
    assert recorder.requests[3]["json"]["sha256"] == digest


def test_progress_bar_is_drawn_on_a_terminal(recorder, tmp_path, capsys, monkeypatch):
    local = source_zip(tmp_path, extra={"padding.bin": os.urandom(1_000_000)})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    status, out, err = run(capsys, recorder.url, "upload", str(local))
    assert (status, out) == (0, "/srv/kuiper/data/uploads/random v2.zip\n")
    frames = err.split("\r")[1:]
    assert frames[0].startswith("uploading random.zip [------------------------------]   0%")
    assert frames[-1].startswith("uploading random.zip [##############################] 100%")
    assert frames[-1].endswith("\n") and err.count("\n") == 1
    assert len(frames) > 3  # drawn as the chunks went, not once at the end


def test_a_refusal_that_is_not_json_names_the_status(recorder, tmp_path, capsys):
    recorder.refuse_with = Response("<html><body>Bad Gateway</body></html>", 502, mimetype="text/html")
    status, out, err = run(capsys, recorder.url, "udfs")
    assert (status, out) == (1, "")
    assert err == f"error: HTTP 502 BAD GATEWAY from {recorder.url}/plugins/udfs\n"


# ---------------------------------------------------------------------------- uploads through the real server


def test_upload_prints_the_saved_path(server, tmp_path, capsys):
    local = tmp_path / "notes.zip"
    local.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    status, out, err = run(capsys, server.url, "upload", str(local))
    assert (status, err) == (0, "")
    saved = Path(out.strip())
    assert saved == server.home / "data/uploads/notes.zip"
    assert saved.read_bytes() == local.read_bytes()
    status, out, _ = run(capsys, server.url, "--json", "upload", str(local))
    assert (status, json.loads(out)) == (0, {"message": str(saved)})


def test_create_from_a_local_zip(server, tmp_path, capsys):
    local = source_zip(tmp_path)
    assert run(capsys, server.url, "create", "source", "random", "--zip", str(local)) == (
        0, "sources plugin random is created\n", "")
    assert (server.home / "plugins/sources/Random@v1.0.0.so").read_bytes() == SO
    assert run(capsys, server.url, "describe", "source", "random")[1] == "name     random\nversion  1.0.0\n"
    # The uploads listed (none of that name is there yet), the upload, the install, the describe.
    assert [path for path, _ in server.seen] == ["/config/uploads", "/config/uploads", "/plugins/sources",
                                                 "/plugins/sources/random"]


# ---------------------------------------------------------------------------- the installed console script


def cli_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[URL_ENV] = url
    return env


class Terminal:
    """The console script with stderr (and, for a person answering it, stdin) on a pseudo-terminal, read as it
    draws; stdout on a pipe."""

    def __init__(self, argv: list[str], url: str, *, answered: bool = False):
        self.controller, terminal = pty.openpty()
        self.process = subprocess.Popen([str(CLI), *argv], env=cli_env(url), stdout=subprocess.PIPE, stderr=terminal,
                                        stdin=terminal if answered else subprocess.DEVNULL, start_new_session=True)
        os.close(terminal)
        self.shown = b""

    def read_until(self, wanted: bytes | None, timeout: float = 60) -> bytes:
        """Read what is drawn until `wanted` appears (None: until the script closes the terminal); bounded."""
        deadline = time.monotonic() + timeout
        while wanted is None or wanted not in self.shown:
            remaining = deadline - time.monotonic()
            assert remaining > 0, self.shown
            ready, _, _ = select.select([self.controller], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.controller, 4096)
            except OSError:  # EIO: the script has exited and closed the terminal
                chunk = b""
            if not chunk:
                assert wanted is None, self.shown
                break
            self.shown += chunk
        return self.shown

    def answer(self, line: bytes) -> None:
        """Type `line` at the terminal (with `answered`)."""
        os.write(self.controller, line)

    def finish(self) -> tuple[int, bytes, bytes]:
        """Wait for the script to end; its exit status, stdout, and every line drawn as it was left."""
        self.read_until(None)
        os.close(self.controller)
        out, _ = self.process.communicate(timeout=60)
        return self.process.returncode, out, self.shown


def test_console_script(server, file_server):
    url = served_source(file_server)
    env = cli_env(server.url)
    done = subprocess.run([str(CLI), "create", "source", "random", "--file", url],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "sources plugin random is created\n", "")
    done = subprocess.run([str(CLI), "list", "sources"], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "random\n", "")
    done = subprocess.run([str(CLI), "create", "source", "random", "--file", url],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: sources plugins create command error: invalid name random: duplicate\n"


def test_console_script_draws_the_bar_on_a_real_terminal(server, tmp_path):
    local = source_zip(tmp_path, extra={"padding.bin": os.urandom(1_000_000)})
    controller, terminal = pty.openpty()
    process = subprocess.Popen([str(CLI), "create", "source", "random", "--zip", str(local)],
                               env=cli_env(server.url), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the script has exited and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, shown
    assert out == b"sources plugin random is created\n"
    assert b"uploading random.zip [" in shown
    assert b"] 100%" in shown


# ---------------------------------------------------------------------------- audit


def test_audit_shows_who_changed_what_newest_first(server, file_server, capsys):
    run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))
    url = served_source(file_server, version="v2.0.0", zip_name="random2.zip")
    run(capsys, server.url, "update", "source", "random", "--file", url)
    assert run(capsys, server.url, "drop", "sink", "nothere")[0] == 1  # refused: audited too

    status, out, err = run(capsys, server.url, "audit")
    assert (status, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == ["TIME", "OPERATION", "PLUGIN", "VERSIONS", "OUTCOME", "ACTOR", "REQUEST", "ID"]
    assert [line.split()[1:7] for line in lines] == [
        ["delete", "sinks/nothere", "-", "->", "-", "refused"],
        ["update", "sources/random", "1.0.0", "->", "2.0.0", "ok"],
        ["create", "sources/random", "-", "->", "1.0.0", "ok"],
    ]
    assert all("root 127.0.0.1" in line for line in lines)

    status, out, _ = run(capsys, server.url, "--json", "audit", "--limit", "1")
    rows = json.loads(out)
    assert status == 0 and [(r["operation"], r["status"]) for r in rows] == [("delete", 404)]
    since = rows[0]["time"]
    status, out, _ = run(capsys, server.url, "audit", "--since", since)
    assert status == 0 and len(out.splitlines()) == 2  # the header and the newest row

    status, out, err = run(capsys, server.url, "audit", "--limit", "0")
    assert (status, out) == (1, "")
    assert err.startswith("error: invalid audit query: limit:"), err


# ---------------------------------------------------------------------------- dry runs


def test_dry_run_create_update_drop_print_the_plan_as_a_table_and_change_nothing(server, file_server, capsys):
    url = served_source(file_server)
    status, out, err = run(capsys, server.url, "create", "source", "random", "--file", url, "--dry-run")
    assert (status, err) == (0, "")
    assert "plan            install sources plugin random (dry run: nothing written)" in out
    assert "version         1.0.0" in out
    assert "ACTION  PATH" in out and "write   plugins/sources/Random@v1.0.0.so" in out
    assert run(capsys, server.url, "--json", "list", "sources") == (0, "[]\n", "")

    run(capsys, server.url, "create", "source", "random", "--file", url)
    url2 = served_source(file_server, version="v2.0.0", zip_name="random2.zip")
    status, out, _err = run(capsys, server.url, "update", "source", "random", "--file", url2, "--dry-run")
    assert status == 0 and "remove  plugins/sources/Random@v1.0.0.so" in out and "restart needed  yes" in out
    status, out, _err = run(capsys, server.url, "drop", "source", "random", "--dry-run")
    assert status == 0 and "plan            delete sources plugin random" in out
    assert run(capsys, server.url, "describe", "source", "random") == (0, "name     random\nversion  1.0.0\n", "")

    status, out, _err = run(capsys, server.url, "--json", "drop", "source", "random", "--dry-run")
    assert status == 0 and json.loads(out)["removes"] == ["plugins/sources/Random@v1.0.0.so"]


def test_a_refused_dry_run_exits_as_the_refused_request(server, file_server, capsys):
    url = served_source(file_server)
    run(capsys, server.url, "create", "source", "random", "--file", url)
    dry = run(capsys, server.url, "create", "source", "random", "--file", url, "--dry-run")
    real = run(capsys, server.url, "create", "source", "random", "--file", url)
    assert dry == real and dry[0] != 0 and "duplicate" in dry[2]


def test_history_and_rollback(server, file_server, capsys):
    run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))
    url2 = served_source(file_server, version="v2.0.0", zip_name="random2.zip")
    run(capsys, server.url, "update", "source", "random", "--file", url2)

    status, out, err = run(capsys, server.url, "history", "source", "random")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["WHEN", "(UTC)", "OPERATION", "VERSION", "OUTCOME", "SHA256", "URL"]
    assert [line.split()[2:5] for line in lines[1:]] == [["update", "2.0.0", "ok"], ["install", "1.0.0", "ok"]]
    assert lines[1].endswith(url2)

    assert run(capsys, server.url, "rollback", "source", "random") == (
        0, "sources plugin random is rolled back to version 1.0.0\n", "")
    assert run(capsys, server.url, "describe", "source", "random") == (0, "name     random\nversion  1.0.0\n", "")
    status, out, _ = run(capsys, server.url, "--json", "rollback", "source", "random")
    assert (status, json.loads(out)) == (0, {"type": "sources", "name": "random", "version": "2.0.0"})

    run(capsys, server.url, "drop", "source", "random")
    status, out, err = run(capsys, server.url, "rollback", "source", "random")
    assert status != 0 and out == "" and "rollback sources plugin random error: not found" in err


def test_rollback_to_a_named_version(server, file_server, capsys):
    run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))
    url2 = served_source(file_server, version="v2.0.0", zip_name="random2.zip")
    run(capsys, server.url, "update", "source", "random", "--file", url2)

    status, out, err = run(capsys, server.url, "rollback", "source", "random", "--version", "0.9.0")
    assert status != 0 and out == ""
    assert "rollback sources plugin random error: version 0.9.0 not found (kept versions: 1.0.0;" in err
    status, out, err = run(capsys, server.url, "rollback", "source", "random", "--version", "2.0.0")
    assert status != 0 and "version 2.0.0 is the one installed" in err
    status, out, _ = run(capsys, server.url, "--json", "history", "source", "random")
    assert [(e["version"], e["kept"]) for e in json.loads(out)] == [("2.0.0", False), ("1.0.0", True)]

    assert run(capsys, server.url, "rollback", "source", "random", "--version", "1.0.0") == (
        0, "sources plugin random is rolled back to version 1.0.0\n", "")
    assert run(capsys, server.url, "describe", "source", "random") == (0, "name     random\nversion  1.0.0\n", "")
