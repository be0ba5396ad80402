"""Local callers are identified by the kernel, not trusted by their address (basic.allowedUsers).

A real second local user: `nobody`, through `setpriv` (util-linux), runs curl against real gunicorn
(and through the shipped nginx config, whose workers run as www-data); root is this test process.
The lookups themselves are checked against sockets that this process and a `nobody` process hold.
"""

from __future__ import annotations

import gc
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn, disk_state, free_port, make_zip
from cryptography.hazmat.primitives.asymmetric import rsa
from test_auth import ISSUER, public_pem, sign
from test_deploy import nginx  # noqa: F401  (the fixture nginx_as_www_data builds on)

from kuiper_plugins.settings import Settings, SettingsError, load_settings, user_id
from kuiper_plugins.web import peers

NOBODY = pwd.getpwnam("nobody").pw_uid
WWW_DATA = pwd.getpwnam("www-data").pw_uid
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
CURL = shutil.which("curl") or "/usr/bin/curl"
MARK = "\n--status--"


def as_user(user: str, group: str | None = None) -> list[str]:
    """The setpriv prefix that runs a command as `user`, with no supplementary groups."""
    group = group or pwd.getpwnam(user).pw_gid
    return [SETPRIV, f"--reuid={user}", f"--regid={group}", "--clear-groups"]


def curl(url: str, method: str = "GET", *, user: str | None = "nobody", json_body: str | None = None,
         headers: tuple[str, ...] = (), upload: bytes | None = None, unix_socket: str | None = None,
         more_urls: tuple[str, ...] = ()) -> list[tuple[int, str, int]]:
    """Run curl (as `user`, or as root with None); return (status, body, new connections) per URL, in order."""
    argv = [CURL, "-sS", "--max-time", "20", "-X", method, "-w", MARK + "%{http_code} %{num_connects}\n"]
    for header in headers:
        argv += ["-H", header]
    if json_body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json_body]
    if upload is not None:
        argv += ["-F", "uploadFile=@-;filename=up.zip"]
    if unix_socket is not None:
        argv += ["--unix-socket", unix_socket]
    prefix = as_user(user, "nogroup" if user == "nobody" else None) if user else []
    done = subprocess.run([*prefix, *argv, url, *more_urls], input=upload or b"", capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    # body1 MARK "status connects\n" body2 MARK ... MARK "status connects\n"
    chunks = done.stdout.decode().split(MARK)
    bodies = [chunks[0]] + [chunk.split("\n", 1)[1] for chunk in chunks[1:-1]]
    statuses = [tuple(map(int, chunk.split("\n", 1)[0].split())) for chunk in chunks[1:]]
    return [(status, body, connects) for (status, connects), body in zip(statuses, bodies, strict=True)]


def curl_one(url: str, method: str = "GET", **kw) -> tuple[int, str]:
    ((status, body, _connects),) = curl(url, method, **kw)
    return status, body


def assert_refused_user(answer: tuple[int, str], user: str) -> None:
    status, body = answer
    assert status == 403, answer
    message = json.loads(body)["message"]
    assert f"local user '{user}'" in message, message
    assert "basic.allowedUsers" in message and "basic.authentication" in message and "JWT" in message, message


# ---------------------------------------------------------------------------- the lookups, on real sockets

@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(20)
    yield sock
    sock.close()


def endpoints(accepted: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    return accepted.getpeername()[:2], accepted.getsockname()[:2]


LOOKUPS = {
    "sock_diag, the exact connection": lambda client, server: {peers.owner_by_sock_diag(client, server)},
    "sock_diag, a dump filtered on the client's end": lambda client, server: peers.owners_by_sock_diag_dump(client),
    "/proc/net/tcp, the exact connection": lambda client, server: peers.owners_from_proc(client, server),
    "/proc/net/tcp, the client's end": lambda client, server: peers.owners_from_proc(client),
}


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_each_lookup_names_the_user_holding_the_client_socket(listener, lookup):
    find = LOOKUPS[lookup]
    with socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert find(*endpoints(accepted)) == {os.geteuid()}
    # nobody's curl, connected and waiting for an answer that comes once the lookup is done
    theirs = subprocess.Popen([*as_user("nobody", "nogroup"), CURL, "-s", "--max-time", "20",
                               f"http://127.0.0.1:{listener.getsockname()[1]}/"], stdout=subprocess.DEVNULL)
    try:
        accepted, _ = listener.accept()
        with accepted:
            assert find(*endpoints(accepted)) == {NOBODY}
            accepted.sendall(b"HTTP/1.0 204 No Content\r\n\r\n")
    finally:
        assert theirs.wait(timeout=30) == 0


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_a_closed_client_socket_names_nobody_at_all(listener, lookup):
    """TIME_WAIT and orphaned sockets report uid 0: taking that for root would let anyone in.

    The lookups by the client's end alone count every live socket with that end, by design (see
    peers.owners). Linux lets two connections to different servers share a local port, so on a busy
    machine another process's live connection on 127.0.0.1 could hold the same end, and be counted.
    The client therefore binds a loopback address of its own that no other socket uses.
    """
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind((f"127.{os.getpid() % 250 + 3}.{uuid.uuid4().int % 250 + 3}.{uuid.uuid4().int % 250 + 3}", 0))
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    with accepted:
        ends = endpoints(accepted)
        client.close()
        deadline = time.monotonic() + 10
        while accepted.recv(1) and time.monotonic() < deadline:  # the FIN has arrived once recv returns b""
            pass
        with pytest.raises(peers.PeerUnknown, match="already closed"):
            LOOKUPS[lookup](*ends)


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_a_connection_that_does_not_exist_is_unknown(listener, lookup):
    with pytest.raises(peers.PeerUnknown, match="no socket on this machine"):
        LOOKUPS[lookup](("127.0.0.1", free_port()), listener.getsockname())


def test_a_forked_child_asks_through_its_own_netlink_socket(listener):
    """As a gunicorn worker forked from a master that already looked a caller up."""
    with socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert peers.peer_of_socket(accepted) == {os.geteuid()}  # the parent's socket now exists
            reader, writer = os.pipe()
            child = os.fork()
            if child == 0:  # pragma: no cover (the child reports through the pipe)
                gc.freeze()  # it finalizes nothing it inherited (see test_registry's forked children)
                try:
                    fresh = peers._shared.socket is None
                    answer = peers.peer_of_socket(accepted) == {os.geteuid()}
                    os.write(writer, b"%d%d" % (fresh, answer))
                finally:
                    os._exit(0)
            os.close(writer)
            with os.fdopen(reader, "rb") as report:
                assert report.read() == b"11"
            assert os.waitpid(child, 0)[1] == 0
            assert peers.peer_of_socket(accepted) == {os.geteuid()}


def test_the_ends_a_worker_got_from_accept_answer_for_that_socket_only(listener):
    """Our worker says which connection it serves, with the ends accept() gave: only that socket uses them."""
    with socket.create_connection(listener.getsockname()) as client, socket.create_connection(
            listener.getsockname()):
        accepted, address = listener.accept()
        other, _ = listener.accept()
        with accepted, other:
            try:
                peers.serving(accepted, address, listener.getsockname())
                assert peers.peer_of_socket(accepted) == {os.geteuid()}
                # The kernel is still the one asked: ends that name no connection name nobody.
                peers.serving(accepted, ("127.0.0.1", free_port()), listener.getsockname())
                with pytest.raises(peers.PeerUnknown, match="no socket on this machine"):
                    peers.peer_of_socket(accepted)
                # Another socket never takes them: it is looked up by its own ends.
                assert peers.peer_of_socket(other) == {os.geteuid()}
            finally:
                peers.serving(None)
            assert peers.peer_of_socket(accepted) == {os.geteuid()}  # done: asked for its ends again
            assert client.getsockname()[:2] == address[:2]


def test_ipv6_and_ipv4_mapped_connections():
    with socket.socket(socket.AF_INET6) as dual:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        dual.listen(2)
        port = dual.getsockname()[1]
        with socket.create_connection(("::1", port)), socket.create_connection(("127.0.0.1", port)):
            for _ in range(2):
                accepted, _ = dual.accept()
                with accepted:
                    assert peers.peer_of_socket(accepted) == {os.geteuid()}
                    client = accepted.getpeername()[:2]  # "::1", or "::ffff:127.0.0.1" for the IPv4 client
                    assert peers.owners(client) == {os.geteuid()}
                    assert peers.owners_from_proc(peers._normalise(client)) == {os.geteuid()}


def test_a_port_shared_with_another_users_socket_names_both(listener, tmp_path):
    """Two sockets bound to one address and port (SO_REUSEADDR), connected to different servers: without the
    server's end of the connection, both owners are named, so neither can borrow the other's identity."""
    with socket.socket() as second_server:
        second_server.bind(("127.0.0.1", 0))
        second_server.listen(1)
        mine = socket.socket()
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        mine.bind(("127.0.0.1", 0))
        port = mine.getsockname()[1]
        mine.connect(listener.getsockname())
        script = ("import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                  f"s.bind(('127.0.0.1',{port}))\ns.connect(('127.0.0.1',{second_server.getsockname()[1]}))\n"
                  "print('connected',flush=True)\nsys.stdin.read()\n")
        theirs = subprocess.Popen([*as_user("nobody", "nogroup"), "/usr/bin/python3", "-c", script],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert theirs.stdout.readline() == b"connected\n"
            accepted, _ = listener.accept()
            with accepted, mine:
                client, server = endpoints(accepted)
                assert client == ("127.0.0.1", port)
                assert peers.owners(client) == {os.geteuid(), NOBODY}
                assert peers.owners_from_proc(client) == {os.geteuid(), NOBODY}
                assert peers.owners(client, server) == {os.geteuid()}  # the exact connection is mine
        finally:
            theirs.stdin.close()
            assert theirs.wait(timeout=30) == 0
            theirs.stdout.close()


# ---------------------------------------------------------------------------- settings


def test_allowed_users_default_to_root_and_the_services_own_user(tmp_path):
    settings = load_settings({"KUIPER_HOME": str(tmp_path)})
    assert settings.allowed_users == ()
    assert settings.allowed_uids == {0, os.geteuid()}


def test_allowed_users_take_names_and_uids(tmp_path):
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__BASIC__ALLOWEDUSERS": "65534"}
    assert load_settings(environ).allowed_users == ("65534",)
    settings = load_settings({"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__BASIC__ALLOWEDUSERS": "[nobody, 33]"})
    assert settings.allowed_users == ("nobody", "33")
    assert settings.allowed_uids == {0, os.geteuid(), NOBODY, 33}
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/kuiper-plugins.yaml").write_text("basic:\n  allowedUsers: [www-data, 65534]\n")
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).allowed_uids == {0, os.geteuid(), WWW_DATA, NOBODY}


@pytest.mark.parametrize("value, expected", [("no-such-user-here", "no user named 'no-such-user-here'"),
                                             ("4294967295", "out of range"), ("[true]", "unexpected item")])
def test_a_bad_allowed_user_stops_start_up_naming_the_key(tmp_path, value, expected):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/kuiper-plugins.yaml").write_text(f"basic:\n  allowedUsers: {value}\n")
    with pytest.raises(SettingsError, match="basic.allowedUsers") as raised:
        load_settings({"KUIPER_HOME": str(tmp_path)})
    assert expected in str(raised.value)
    with pytest.raises(SettingsError, match="basic.allowedUsers"):
        assert Settings(home=tmp_path, allowed_users=("no-such-user-here",)).allowed_uids
    assert user_id("0") == 0 and user_id("nobody") == NOBODY


# ---------------------------------------------------------------------------- the test client, honestly


def test_a_request_no_socket_stands_behind_is_refused(service):
    """The claimed client end names no socket on this machine: refused, however loopback it looks."""
    before = service.snapshot()
    for environ in ({"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(free_port())}, {"REMOTE_PORT": ""},
                    {"REMOTE_ADDR": "::1", "REMOTE_PORT": service.peer.environ["REMOTE_PORT"]},
                    {"REMOTE_PORT": "99999"}, {"REMOTE_PORT": "\u0661\u0662"}):
        for method, path in (("GET", "/plugins/sources"), ("POST", "/plugins/sources"), ("GET", "/config/uploads")):
            response = service.client.open(path, method=method, environ_base=environ,
                                           json={"name": "random", "file": "http://127.0.0.1:9/random.zip"})
            assert response.status_code == 403, (environ, path)
            message = response.get_json()["message"]
            assert message.startswith("the local caller could not be identified"), message
            assert "basic.allowedUsers" in message and "basic.authentication" in message and "JWT" in message
        for open_path in ("/", "/ping", "/openapi.json", "/docs", "/docs/"):
            assert service.client.get(open_path, environ_base=environ).status_code in (200, 302), open_path
    service.assert_unchanged(before)


def test_protected_mode_off_admits_remote_addresses_but_still_checks_local_callers(make_service):
    service = make_service(protected_mode=False)
    assert service.client.get("/plugins/sources", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 200
    assert service.client.get("/plugins/sources").status_code == 200  # this test's own connection: root
    unknown = {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(free_port())}
    refused = service.client.get("/plugins/sources", environ_base=unknown)
    assert refused.status_code == 403
    assert refused.get_json()["message"].startswith("the local caller could not be identified")


def test_a_port_shared_with_a_user_not_allowed_is_refused_until_that_user_is(make_service, listener):
    """Through the test client (no socket in the environ): every socket on the claimed end must be allowed."""
    with socket.socket() as second_server:
        second_server.bind(("127.0.0.1", 0))
        second_server.listen(1)
        mine = socket.socket()
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        mine.bind(("127.0.0.1", 0))
        port = mine.getsockname()[1]
        mine.connect(listener.getsockname())
        script = ("import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                  f"s.bind(('127.0.0.1',{port}))\ns.connect(('127.0.0.1',{second_server.getsockname()[1]}))\n"
                  "print('connected',flush=True)\nsys.stdin.read()\n")
        theirs = subprocess.Popen([*as_user("nobody", "nogroup"), "/usr/bin/python3", "-c", script],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert theirs.stdout.readline() == b"connected\n"
            environ = {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(port)}
            refused = make_service().client.get("/plugins/sources", environ_base=environ)
            assert refused.status_code == 403
            assert "local user 'nobody'" in refused.get_json()["message"]
            allowed = make_service(allowed_users=("nobody",)).client.get("/plugins/sources", environ_base=environ)
            assert allowed.status_code == 200
        finally:
            mine.close()
            theirs.stdin.close()
            assert theirs.wait(timeout=30) == 0
            theirs.stdout.close()


# ---------------------------------------------------------------------------- real gunicorn, a real second user


def source_zip(file_server, name: str = "random") -> str:
    make_zip(file_server.root / f"{name}.zip", {f"{name.capitalize()}@v1.0.0.so": b"so", f"{name}.yaml": "a: 1\n"})
    return file_server.url(f"{name}.zip")


def plugin_body(file_server, name: str = "random") -> str:
    return json.dumps({"name": name, "file": source_zip(file_server, name)})


def guarded_requests(file_server) -> list[tuple[str, str, dict]]:
    """Every route that needs access, as (method, path, curl options): reads and writes."""
    body = plugin_body(file_server, "other")
    return [
        *[("GET", f"/plugins/{kind}", {}) for kind in ("sources", "sinks", "functions", "portables")],
        ("GET", "/plugins/sources/random", {}),
        ("GET", "/plugins/sources/prebuild", {}),
        ("GET", "/plugins/udfs", {}),
        ("GET", "/plugins/udfs/echo", {}),
        ("GET", "/config/uploads", {}),
        ("POST", "/plugins/sources", {"json_body": body}),
        ("PUT", "/plugins/sources/random", {"json_body": body.replace('"other"', '"random"')}),
        ("DELETE", "/plugins/sources/random", {}),
        ("POST", "/plugins/functions/random/register", {"json_body": '{"functions": ["f"]}'}),
        ("POST", "/config/uploads", {"upload": b"PK\x05\x06" + bytes(18)}),
        ("POST", "/config/uploads", {"json_body": '{"name": "a.zip", "content": "x"}'}),
        ("DELETE", "/config/uploads/kept.zip", {}),
    ]


@pytest.mark.slow
def test_nobody_is_refused_on_every_guarded_route_and_root_installs(start_gunicorn, file_server):
    server = start_gunicorn()
    created = requests.post(f"{server.url}/plugins/sources", data=plugin_body(file_server), timeout=30,
                            headers={"Content-Type": "application/json"})
    assert created.status_code == 201, created.text
    kept = requests.post(f"{server.url}/config/uploads", json={"name": "kept.zip", "content": "k"}, timeout=10)
    assert kept.status_code == 201, kept.text
    for method, path, options in guarded_requests(file_server):
        assert_refused_user(curl_one(server.url + path, method, **options), "nobody")
    for open_path in ("/", "/ping", "/openapi.json"):
        assert curl_one(server.url + open_path)[0] == 200, open_path
    # Nothing the refused requests asked for happened.
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == ["random"]
    assert (server.home / "data/uploads/kept.zip").read_text() == "k"
    assert not (server.home / "data/uploads/a.zip").exists() and not (server.home / "data/uploads/up.zip").exists()
    # Another user is no different; root's curl is let in.
    assert_refused_user(curl_one(f"{server.url}/plugins/sources", user="www-data"), "www-data")
    assert curl_one(f"{server.url}/plugins/sources", user=None) == (200, '["random"]')


@pytest.mark.slow
@pytest.mark.parametrize("allowed", ["nobody", str(NOBODY)])
def test_allowed_users_lets_nobody_in_by_name_or_uid(start_gunicorn, file_server, allowed):
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__ALLOWEDUSERS=allowed)
    assert curl_one(f"{server.url}/plugins/sources") == (200, "[]")
    status, body = curl_one(f"{server.url}/plugins/sources", "POST", json_body=plugin_body(file_server))
    assert status == 201, body
    assert requests.get(f"{server.url}/plugins/sources/random", timeout=10).json()["name"] == "random"
    assert curl_one(f"{server.url}/plugins/sources/random", "DELETE")[0] == 200
    assert_refused_user(curl_one(f"{server.url}/plugins/sources", user="www-data"), "www-data")


@pytest.mark.slow
def test_an_allowed_user_who_is_not_root_cannot_have_an_install_sh_run_as_root(start_gunicorn, file_server):
    """install.sh runs as the service's user (root): only root, the service's user or a token's holder may
    install a package that carries one. Another allowed user gets a 403, and the script never runs."""
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="nobody")
    marker = server.home / "ran-as"
    make_zip(file_server.root / "scripted.zip", {
        "Scripted@v1.0.0.so": b"so", "scripted.yaml": "a: 1\n",
        "install.sh": f"#!/bin/sh\nid -u > {marker}\n",
    })
    body = json.dumps({"name": "scripted", "file": file_server.url("scripted.zip")})
    before = disk_state(server.home)

    status, answer = curl_one(f"{server.url}/plugins/sources", "POST", json_body=body)

    assert status == 403, answer
    message = json.loads(answer)["message"]
    assert message.startswith("fail to install plugin: the package has an"
                              " install.sh, which runs as this service's user, and the caller is local user"
                              f" 'nobody' (uid {NOBODY})"), message
    assert not marker.exists()
    assert disk_state(server.home) == before
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []
    # The same user may install a package without one; root may install this one, and its script runs.
    assert curl_one(f"{server.url}/plugins/sources", "POST", json_body=plugin_body(file_server))[0] == 201
    assert curl_one(f"{server.url}/plugins/sources", "POST", json_body=body, user=None)[0] == 201
    assert marker.read_text().strip() == "0"


@pytest.fixture(scope="module")
def issuer_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.slow
def test_with_authentication_on_a_jwt_lets_nobody_in(start_gunicorn, file_server, tmp_path, issuer_key):
    mgmt = tmp_path / "home/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / ISSUER).write_bytes(public_pem(issuer_key))
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    token = f"Authorization: Bearer {sign(issuer_key)}"
    status, body = curl_one(f"{server.url}/plugins/sources", "POST", json_body=plugin_body(file_server),
                            headers=(token,))
    assert status == 201, body
    assert curl_one(f"{server.url}/plugins/sources", headers=(token,)) == (200, '["random"]')
    status, body = curl_one(f"{server.url}/plugins/sources")
    assert status == 401 and "missing_token" in body
    assert curl_one(f"{server.url}/plugins/sources", user=None)[0] == 401  # root needs one too: no peer check


@pytest.mark.slow
def test_keep_alive_connections_of_threaded_workers_keep_their_own_user(start_gunicorn):
    """gthread workers serve many requests per connection: each connection is asked about once and stays its own."""
    server = start_gunicorn(workers=1, GUNICORN_CMD_ARGS="--worker-class gthread --threads 4 --keep-alive 10")
    url = f"{server.url}/plugins/sources"
    with requests.Session() as root_session:
        first = root_session.get(url, timeout=10)
        answers = curl(url, more_urls=(url, url))
        second = root_session.get(url, timeout=10)
    assert first.status_code == second.status_code == 200
    assert [connects for _status, _body, connects in answers] == [1, 0, 0]  # one connection, three requests
    for status, body, _connects in answers:
        assert_refused_user((status, body), "nobody")
    assert curl(url, user=None, more_urls=(url,)) == [(200, "[]", 1), (200, "[]", 0)]


@pytest.mark.slow
def test_a_unix_domain_socket_names_its_peer_with_so_peercred(tmp_path):
    """gunicorn bound to a Unix socket too (as `-b unix:PATH` adds one): the caller is read with SO_PEERCRED."""
    folder = Path(tempfile.mkdtemp(prefix="kuiper-plugins-sock-"))
    try:
        folder.chmod(0o755)  # nobody must reach the socket to be refused by the service rather than the file system
        path = folder / "api.sock"
        server = Gunicorn(tmp_path / "home", tmp_path / "gunicorn.log", workers=1)
        server.env["GUNICORN_CMD_ARGS"] = f"--bind unix:{path} --bind 127.0.0.1:{server.port}"
        server.start()
        try:
            url = "http://localhost/plugins/sources"
            assert curl_one(url, user=None, unix_socket=str(path)) == (200, "[]")
            assert_refused_user(curl_one(url, unix_socket=str(path)), "nobody")
            assert curl_one("http://localhost/ping", unix_socket=str(path))[0] == 200
        finally:
            server.stop()
        assert "Traceback" not in server.log()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- behind nginx

@pytest.fixture
def nginx_as_www_data(nginx):  # noqa: F811  (test_deploy's real nginx with the shipped server block)
    """The shipped server block in front of a given gunicorn port, nginx's workers running as www-data."""
    return lambda upstream_port: nginx(upstream_port, user="www-data www-data")


@pytest.mark.slow
def test_behind_nginx_the_peer_is_nginx_so_proxied_deployments_turn_authentication_on(
        start_gunicorn, nginx_as_www_data, tmp_path, issuer_key):
    server = start_gunicorn(workers=1)
    url = nginx_as_www_data(server.port)
    refused = requests.get(f"{url}/plugins/sources", timeout=10)  # sent by root, relayed by www-data
    assert_refused_user((refused.status_code, refused.text), "www-data")
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    server.stop()

    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="www-data")
    url = nginx_as_www_data(server.port)
    assert requests.get(f"{url}/plugins/sources", timeout=10).status_code == 200
    assert curl_one(f"{url}/plugins/sources") == (200, "[]")  # anyone nginx relays: hence authentication
    server.stop()

    (tmp_path / "home/etc/mgmt").mkdir(parents=True, exist_ok=True)
    (tmp_path / "home/etc/mgmt" / ISSUER).write_bytes(public_pem(issuer_key))
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    url = nginx_as_www_data(server.port)
    assert requests.get(f"{url}/plugins/sources", timeout=10).status_code == 401
    token = {"Authorization": f"Bearer {sign(issuer_key)}"}
    assert requests.get(f"{url}/plugins/sources", headers=token, timeout=10).status_code == 200
