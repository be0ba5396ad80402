"""The command-line client as a new user meets it (issue 22, point 2): listings across types, functions with
their owners, uploads, status, tokens, errors that say what to do, and a `--zip` that checks before it sends.

Against the real app on a loopback port (test_cli.py's `server`; a real gunicorn where authentication is on),
the CLI run in-process through `main(argv)`, or as the installed console script where a terminal, another
process's environment or the modules it loads matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests
import yaml
from conftest import make_zip
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_cli import (
    CLI,
    SO,
    Serving,
    Terminal,
    cli_env,
    free_port,
    portable_members,
    run,
    served_source,
    served_zip,
    server,  # noqa: F401  (the fixture: the real app on a loopback port)
    source_zip,
)
from werkzeug.wrappers import Response

from kuiper_plugins import __version__
from kuiper_plugins.cli.main import TOKEN_ENV

NOT_SENT = "(checked on this machine before uploading: nothing was sent)"


def cli(url: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script, stdin not a terminal; its exit status, stdout and stderr."""
    return subprocess.run([str(CLI), *argv], env={**cli_env(url), **(env or {})}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def uploads(home: Path) -> dict[str, bytes]:
    folder = home / "data/uploads"
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.exists() else {}


def install_one_of_each(server_url: str, file_server, capsys) -> dict[str, str]:
    """A source, a sink without a version, a function plugin with two functions and a portable; their URLs."""
    urls = {
        "sensor": served_source(file_server, name="sensor"),
        "file2": served_zip(file_server, "file2.zip", {"file2.so": SO}),
        "misc": served_zip(file_server, "misc.zip", {"Misc@v2.so": SO}),
        "mirror": served_zip(file_server, "mirror.zip", portable_members()),
    }
    for argv in (["source", "sensor"], ["sink", "file2"], ["function", "misc", "--function", "f1", "--function", "f2"],
                 ["portable", "mirror"]):
        status, _, err = run(capsys, server_url, "create", *argv, "--file", urls[argv[1]])
        assert status == 0, err
    return urls


def sha256_of_served(file_server, name: str) -> str:
    return hashlib.sha256((file_server.root / name).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- a mistyped command


def test_a_mistyped_command_is_answered_with_the_command_meant(capsys):
    done = cli("http://127.0.0.1:9", "lst", "sources")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: kuiper-plugins ")
    assert done.stderr.endswith(
        "kuiper-plugins: error: argument COMMAND: invalid choice: 'lst' (did you mean `list`?)\n")
    # Global options before it, with their values, are not taken for the command.
    status, _, err = run(capsys, None, "--url", "http://127.0.0.1:9", "--json", "stauts")
    assert status == 2
    assert json.loads(err)["message"] == "argument COMMAND: invalid choice: 'stauts' (did you mean `status`?)"
    # Nothing close: argparse's own words, which name every command.
    status, _, err = run(capsys, None, "frobnicate")
    assert status == 2 and "invalid choice: 'frobnicate' (choose from " in err and "did you mean" not in err


# ---------------------------------------------------------------------------- list, udfs


def test_list_without_a_type_shows_every_plugin_of_every_type_with_its_version(server, file_server, capsys):  # noqa: F811
    assert run(capsys, server.url, "list") == (0, "No plugin is found.\n", "")
    assert run(capsys, server.url, "list", "-o", "json") == (0, "[]\n", "")
    urls = install_one_of_each(server.url, file_server, capsys)

    assert run(capsys, server.url, "list") == (0, (
        "TYPE      NAME    VERSION\n"
        "source    sensor  1.0.0\n"
        "sink      file2   -\n"
        "function  misc    2\n"
        "portable  mirror  v1.0.0\n"), "")

    rows = [
        {"type": "source", "name": "sensor", "version": "1.0.0", "sha256": sha256_of_served(file_server, "sensor.zip"),
         "file": urls["sensor"]},
        {"type": "sink", "name": "file2", "version": None, "sha256": sha256_of_served(file_server, "file2.zip"),
         "file": urls["file2"]},
        {"type": "function", "name": "misc", "version": "2", "functions": ["f1", "f2"],
         "sha256": sha256_of_served(file_server, "misc.zip"), "file": urls["misc"]},
        {"type": "portable", "name": "mirror", "version": "v1.0.0", "functions": ["echo"],
         "sha256": sha256_of_served(file_server, "mirror.zip"), "file": urls["mirror"]},
    ]
    for argv in (["list", "-o", "json"], ["--json", "list"]):
        status, out, err = run(capsys, server.url, *argv)
        assert (status, err) == (0, "") and json.loads(out) == rows
    status, out, _ = run(capsys, server.url, "list", "-o", "yaml")
    assert status == 0 and yaml.safe_load(out) == rows

    status, out, _ = run(capsys, server.url, "list", "-o", "wide")
    header, *lines = out.splitlines()
    assert status == 0 and header.split() == ["TYPE", "NAME", "VERSION", "FUNCTIONS", "SHA256", "FILE"]
    assert lines[2].split() == ["function", "misc", "2", "f1,", "f2", rows[2]["sha256"], urls["misc"]]
    assert lines[3].split() == ["portable", "mirror", "v1.0.0", "echo", rows[3]["sha256"], urls["mirror"]]

    assert run(capsys, server.url, "list", "-o", "name") == (
        0, "source/sensor\nsink/file2\nfunction/misc\nportable/mirror\n", "")
    # With a type: that type's rows, or its names (what completion asks for).
    assert run(capsys, server.url, "list", "portable", "-o", "name") == (0, "mirror\n", "")
    status, out, _ = run(capsys, server.url, "list", "function", "-o", "json")
    assert (status, json.loads(out)) == (0, [rows[2]])
    assert run(capsys, server.url, "list", "sinks") == (0, "file2\n", "")  # as before: eKuiper's list


def test_udfs_shows_the_plugin_that_owns_each_function(server, file_server, capsys):  # noqa: F811
    assert run(capsys, server.url, "udfs") == (0, "No udf is found.\n", "")
    install_one_of_each(server.url, file_server, capsys)
    assert run(capsys, server.url, "udfs") == (0, (
        "FUNCTION  PLUGIN  TYPE\n"
        "echo      mirror  portable\n"
        "f1        misc    function\n"
        "f2        misc    function\n"), "")
    status, out, _ = run(capsys, server.url, "udfs", "-o", "json")
    assert (status, json.loads(out)) == (0, [{"name": "echo", "plugin": "mirror", "type": "portable"},
                                             {"name": "f1", "plugin": "misc", "type": "function"},
                                             {"name": "f2", "plugin": "misc", "type": "function"}])
    assert run(capsys, server.url, "udfs", "-o", "name") == (0, "echo\nf1\nf2\n", "")
    status, out, _ = run(capsys, server.url, "--json", "udfs")
    assert (status, json.loads(out)) == (0, ["echo", "f1", "f2"])  # the server's answer, as before


# ---------------------------------------------------------------------------- uploads


def test_uploads_lists_and_removes_the_servers_uploads(server, tmp_path, capsys):  # noqa: F811
    for name in ("a.zip", "b.zip"):
        (tmp_path / name).write_bytes(b"PK\x05\x06" + b"\x00" * 18)
        assert run(capsys, server.url, "upload", str(tmp_path / name))[0] == 0
    folder = server.home / "data/uploads"
    assert run(capsys, server.url, "uploads") == (
        0, f"NAME   PATH\na.zip  {folder / 'a.zip'}\nb.zip  {folder / 'b.zip'}\n", "")
    assert run(capsys, server.url, "uploads", "-o", "name") == (0, "a.zip\nb.zip\n", "")
    status, out, _ = run(capsys, server.url, "--json", "uploads")
    assert (status, json.loads(out)) == (0, [str(folder / "a.zip"), str(folder / "b.zip")])

    assert run(capsys, server.url, "uploads", "rm", "a.zip") == (0, "upload a.zip is removed\n", "")
    assert sorted(uploads(server.home)) == ["b.zip"]
    assert run(capsys, server.url, "uploads", "rm", "a.zip") == (1, "", "error: upload a.zip not found\n")
    status, out, _ = run(capsys, server.url, "--json", "uploads", "rm", "b.zip")
    assert (status, json.loads(out)) == (0, {"removed": ["b.zip"]})
    assert run(capsys, server.url, "uploads") == (0, "No upload is found.\n", "")


def test_a_zip_whose_name_is_uploaded_already_needs_force_off_a_terminal(server, tmp_path, capsys):  # noqa: F811
    first = source_zip(tmp_path / "v1")
    assert run(capsys, server.url, "create", "source", "random", "--zip", str(first))[0] == 0
    saved = server.home / "data/uploads/random.zip"
    second = source_zip(tmp_path / "v2", version="v2.0.0")  # random.zip too

    server.calls.clear()
    done = cli(server.url, "update", "source", "random", "--zip", str(second))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"error: an upload named random.zip is on the server already ({saved}): give --force"
                           " to replace it (nothing was uploaded)\n")
    assert ("POST", "/config/uploads") not in server.calls and ("PUT", "/plugins/sources/random") not in server.calls
    assert uploads(server.home) == {"random.zip": first.read_bytes()}

    done = cli(server.url, "update", "source", "random", "--zip", str(second), "--force")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "plugin random is updated and eKuiper must restart for the change to take effect.\n", "")
    assert uploads(server.home) == {"random.zip": second.read_bytes()}
    assert run(capsys, server.url, "describe", "source", "random")[1] == "name     random\nversion  2.0.0\n"


def test_a_zip_whose_name_is_uploaded_already_is_asked_about_on_a_terminal(server, tmp_path, capsys):  # noqa: F811
    first = source_zip(tmp_path / "v1")
    assert run(capsys, server.url, "create", "source", "random", "--zip", str(first))[0] == 0
    saved = server.home / "data/uploads/random.zip"
    second = source_zip(tmp_path / "v2", version="v2.0.0")
    question = f"{saved} is on the server already, and a plugin installed from it is repaired from it: replace it?" \
               " [y/N] ".encode()

    declined = Terminal(["update", "source", "random", "--zip", str(second)], server.url, answered=True)
    declined.read_until(question)  # the script waits for the answer: nothing is sent before it
    declined.answer(b"n\n")
    status, out, shown = declined.finish()
    assert (status, out) == (1, b""), shown
    assert f"error: {saved} is left as it was (nothing was uploaded)".encode() in shown
    assert uploads(server.home) == {"random.zip": first.read_bytes()}

    accepted = Terminal(["update", "source", "random", "--zip", str(second)], server.url, answered=True)
    accepted.read_until(question)
    accepted.answer(b"y\n")
    status, out, shown = accepted.finish()
    assert (status, out) == (0, b"plugin random is updated and eKuiper must restart for the change to take effect.\n")
    assert uploads(server.home) == {"random.zip": second.read_bytes()}


# ---------------------------------------------------------------------------- --zip: checked first, cleaned up after


@pytest.mark.parametrize(("plugin_type", "name", "members"), [
    ("sink", "file2", {"File2.so.bak": SO, "Wrong@v1.so": SO}),                    # no binary named after it
    ("function", "abs", {"abs.so": SO}),                                           # an eKuiper built-in's name
    ("source", "a.b", {"a.b.so": SO}),                                             # outside the ID rule
    ("portable", "mirror", {k: v for k, v in portable_members().items() if k != "mirror"}),  # no executable
])
def test_a_package_the_server_would_refuse_is_refused_in_its_words_before_any_upload(
        server, tmp_path, capsys, plugin_type, name, members):  # noqa: F811
    local = make_zip(tmp_path / "local" / f"{name}.zip", {**members, "padding.bin": os.urandom(200_000)})
    status, out, err = run(capsys, server.url, "create", plugin_type, name, "--zip", str(local))
    assert (status, out) == (1, "")
    assert server.calls == []  # nothing was asked, nothing was sent
    assert uploads(server.home) == {}

    # The server says the same, once it has the package.
    saved = run(capsys, server.url, "upload", str(local))[1].strip()
    status, _, said = run(capsys, server.url, "create", plugin_type, name, "--file", Path(saved).as_uri())
    assert status == 1
    assert err == f"{said.rstrip()} {NOT_SENT}\n"


def test_a_refused_zip_install_removes_the_upload_it_made(server, tmp_path, capsys):  # noqa: F811
    first = source_zip(tmp_path / "first")
    assert run(capsys, server.url, "create", "source", "random", "--zip", str(first))[0] == 0
    # A package the local check passes and the server refuses: the name is taken.
    again = source_zip(tmp_path / "again", zip_name="random-again.zip")
    status, out, err = run(capsys, server.url, "create", "source", "random", "--zip", str(again))
    assert (status, out) == (1, "")
    assert err == ("error: sources plugins create command error: invalid name random: duplicate"
                   " (the upload random-again.zip made for this install is removed)\n")
    assert uploads(server.home) == {"random.zip": first.read_bytes()}  # the installed plugin's stays: repair uses it

    # An install.sh that fails; with --json, the server's status and body on stderr.
    failing = source_zip(tmp_path / "failing", name="other", extra={"install.sh": "echo broken >&2\nexit 3\n"})
    status, out, err = run(capsys, server.url, "--json", "create", "source", "other", "--zip", str(failing))
    assert (status, out) == (1, "")
    refusal = json.loads(err)
    assert refusal["status"] == 400 and refusal["body"]["error"] == 1000
    assert refusal["message"] == refusal["body"]["message"] + " (the upload other.zip made for this install is removed)"
    assert uploads(server.home) == {"random.zip": first.read_bytes()}
    assert run(capsys, server.url, "list", "-o", "name") == (0, "source/random\n", "")


def test_update_of_a_missing_plugin_is_refused_before_the_upload(server, tmp_path, capsys):  # noqa: F811
    local = make_zip(tmp_path / "nope.zip", {"nope.so": SO, "padding.bin": os.urandom(200_000)})
    status, out, err = run(capsys, server.url, "update", "sink", "nope", "--zip", str(local))
    assert (status, out) == (1, "")
    server_words = "update sinks plugin nope error, cannot delete old version: invalid name nope: not exist"
    assert err == (f"error: {server_words} (checked before uploading nope.zip: nothing was sent; `kuiper-plugins"
                   " create` installs a new plugin)\n")
    assert server.calls == [("GET", "/plugins/sinks/nope")]
    assert uploads(server.home) == {}
    # The words are the server's own for that update.
    assert run(capsys, server.url, "update", "sink", "nope", "--file", "file:///x/nope.zip") == (
        1, "", f"error: {server_words}\n")


# ---------------------------------------------------------------------------- status


def test_status_says_what_get_root_says_in_words(server, file_server, capsys):  # noqa: F811
    install_one_of_each(server.url, file_server, capsys)
    root = requests.get(f"{server.url}/", timeout=10).json()
    status, out, err = run(capsys, server.url, "status")
    assert (status, err) == (0, "")
    first, *lines = out.splitlines()
    assert first.startswith(f"kuiper-plugins {__version__} at {server.url}, up ") and first.endswith(" s")
    assert lines == [
        f"engine: none attached; plugins are for eKuiper {root['version']} (basic.kuiperVersion) on"
        f" {root['os']}/{root['arch']}",
        "plugins: 1 source, 1 sink, 1 function plugin, 1 portable; 3 functions",
        "in flight: nothing",
        "damaged: none",
    ]
    (server.home / "plugins/sinks/file2.so").unlink()
    status, out, _ = run(capsys, server.url, "status")
    assert status == 0
    assert out.splitlines()[4] == ("damaged: 1 plugin (`kuiper-plugins verify` says what is missing,"
                                   " `kuiper-plugins repair` reinstalls)")
    status, out, _ = run(capsys, server.url, "--json", "status")
    answer = json.loads(out)
    assert status == 0 and answer["registry"]["damaged"] == 1 and answer["serviceVersion"] == __version__


def test_status_through_a_front_that_sends_get_root_to_the_engine_says_so(capsys):
    engine_answer = {"version": "2.4.0", "os": "linux", "arch": "amd64", "upTimeSeconds": 7265, "cpuUsage": "1.2"}
    engine = Serving(Response(json.dumps(engine_answer), mimetype="application/json"))  # eKuiper's own GET /
    try:
        assert run(capsys, engine.url, "status") == (0, (
            f"eKuiper 2.4.0 on linux/amd64 at {engine.url}, up 2 h 1 min (this is the engine's own answer:"
            " kuiper-plugins says how it is on its own port, basic.restPort, 9091 beside an engine)\n"), "")
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- errors


def test_with_json_errors_are_json_on_stderr_with_the_status_and_ekuipers_body(server, capsys):  # noqa: F811
    said = "describe sources plugin nope error: not found"
    status, out, err = run(capsys, server.url, "--json", "describe", "source", "nope")
    assert (status, out) == (1, "")
    assert json.loads(err) == {"status": 404, "message": said, "body": {"error": 1002, "message": said}}

    url = f"http://127.0.0.1:{free_port()}"
    status, out, err = run(capsys, url, "--json", "list", "sources")
    assert (status, out) == (2, "")
    assert json.loads(err) == {"status": None, "message": f"cannot reach kuiper-plugins at {url}: Connection refused",
                               "body": None}
    status, out, err = run(capsys, None, "list", "wasm", "--json")
    assert (status, out) == (2, "")
    usage_error = json.loads(err)
    assert usage_error["status"] is None
    assert usage_error["message"] == "argument TYPE: unknown plugin type 'wasm' (choose from source, sink, function," \
                                     " portable)"
    assert usage_error["usage"].startswith("usage: kuiper-plugins list ")


# ---------------------------------------------------------------------------- tokens


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.slow
def test_a_token_minted_by_the_cli_is_accepted_by_a_service_with_authentication_on(start_gunicorn, file_server,
                                                                                 tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "keys/admin.pem"
    private.parent.mkdir()
    private.write_bytes(pem_private(key))
    private.chmod(0o600)
    mgmt = tmp_path / "home/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / "admin.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    live = start_gunicorn(workers=2, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")

    # Without a token: eKuiper's word, then how to give one.
    done = cli(live.url, "list", "sources")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("error: missing_token (the service has basic.authentication on: give a token with --token"
                           " or $KUIPER_PLUGINS_TOKEN; `kuiper-plugins token --key KEY.pem` mints one from a private"
                           " key)\n")

    minted = cli(live.url, "token", "--key", str(private), "--subject", "alice")
    assert (minted.returncode, minted.stderr) == (0, "")
    token = minted.stdout.strip()
    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"], audience="eKuiper")
    assert (claims["iss"], claims["aud"], claims["sub"]) == ("admin.pub", "eKuiper", "alice")
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 120

    url = served_source(file_server)
    done = cli(live.url, "create", "source", "random", "--file", url, env={TOKEN_ENV: token})
    assert (done.returncode, done.stdout, done.stderr) == (0, "sources plugin random is created\n", "")
    done = cli(live.url, "--token", token, "list", "sources")
    assert (done.returncode, done.stdout, done.stderr) == (0, "random\n", "")
    audit = requests.get(f"{live.url}/audit", params={"limit": "1"}, headers={"Authorization": token}, timeout=10)
    actor = audit.json()[0]["actor"]
    assert (actor["iss"], actor["sub"]) == ("admin.pub", "alice")  # who, as the token says


def test_token_refuses_a_key_the_service_would_not_check_tokens_with(tmp_path):
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(pem_private(ec.generate_private_key(ec.SECP256R1())))
    done = cli("http://127.0.0.1:9", "token", "--key", str(ec_key))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"error: {ec_key} holds not an RSA key: the service accepts RS256 tokens only, signed with"
                           " an RSA key of at least 2048 bits (`openssl genrsa -out KEY.pem 2048`)\n")
    public = tmp_path / "admin.pub"
    public.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    done = cli("http://127.0.0.1:9", "token", "--key", str(public))
    assert done.returncode == 2 and done.stderr.startswith(f"error: {public} is not a PEM private key (")


# ---------------------------------------------------------------------------- what the client loads


WATCHED = ("kuiper_plugins.install.packages", "kuiper_plugins.install.archive", "jwt", "cryptography", "shtab",
           "flask", "elftools")


def loaded_by(url: str, *argv: str) -> list[str]:
    """The watched modules a run of the CLI (in a fresh interpreter) had loaded when it ended."""
    code = ("import sys\nfrom kuiper_plugins.cli.main import main\nmain(sys.argv[1:])\n"
            f"print('LOADED', *sorted(m for m in sys.modules if m in {WATCHED!r}))")
    done = subprocess.run([sys.executable, "-c", code, *argv], env=cli_env(url), capture_output=True, text=True,
                          timeout=60)
    return done.stdout.rsplit("LOADED", 1)[1].split()


def test_only_the_commands_that_need_them_load_the_package_rules_the_jwt_library_and_shtab(server, tmp_path):  # noqa: F811
    assert loaded_by(server.url, "list") == []
    assert loaded_by(server.url, "completion", "bash") == ["shtab"]
    key = tmp_path / "admin.pem"
    key.write_bytes(pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert loaded_by(server.url, "token", "--key", str(key)) == ["cryptography", "jwt"]
    bad = make_zip(tmp_path / "file2.zip", {"Wrong.so": SO})
    assert loaded_by(server.url, "create", "sink", "file2", "--zip", str(bad)) == [
        "kuiper_plugins.install.archive", "kuiper_plugins.install.packages"]
