"""Shared fixtures: the service through Flask's test client, real gunicorn as `make run` starts it, Go's gob.

The file server, the zip writer and the gunicorn runner are kuiper_plugins.testing's, the pytest plugin the
package ships (its `pytest11` entry point loads it here as anywhere): the names the tests import from
this file are kept.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import *  # noqa: F403 (the kuiperd fixtures)
from flask.testing import FlaskClient

from kuiper_plugins import create_app, testing
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db
from kuiper_plugins.testing import FileServer, find_go, free_port, make_zip  # noqa: F401 (tests import them here)
from kuiper_plugins.testing.service import Services


def pytest_configure(config):
    """Load kuiper_plugins.testing (file_server, kuiperd, ...) where its pytest11 entry point has not done so.

    That is a .venv installed before the plugin existed, until `make venv` installs the package again.
    """
    if not config.pluginmanager.has_plugin("kuiper_plugins.testing"):
        config.pluginmanager.register(testing, "kuiper_plugins.testing")

# ---------------------------------------------------------------------------- loopback only

REAL_GETADDRINFO = socket.getaddrinfo


def loopback_only_resolver(host, *args, **kwargs):
    """Resolve IP literals (any inet_aton spelling) and localhost; refuse every other name without a query.

    Generated and hostile URLs must never make the resolver send a DNS query off this machine.
    """
    text = host.decode() if isinstance(host, bytes) else str(host)
    numeric = True
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        try:
            socket.inet_aton(text)
        except OSError:
            numeric = False
    if numeric or text.lower() == "localhost":
        return REAL_GETADDRINFO(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test resolver: loopback only)")


@pytest.fixture(autouse=True)
def no_dns_queries(monkeypatch):
    """Every test: names other than localhost never reach a DNS server (loopback only, ever)."""
    monkeypatch.setattr(socket, "getaddrinfo", loopback_only_resolver)


# make_zip and FileServer are kuiper_plugins.testing's (so is the `file_server` fixture, which the plugin provides).


# ---------------------------------------------------------------------------- the service under test

# The registry and eKuiper's store (each with its -wal/-shm, compared row by row instead); lock files must not remain.
# The progress file (with its -wal/-shm) is bookkeeping every write request adds to, a refused one too, as the audit.
UNTRACKED = ("data/kuiper-plugins.db", "data/sqliteKV.db", "data/checkpoint.db", "data/.kuiper-plugins/progress.db")


def disk_state(home: Path) -> dict[str, tuple]:
    """Every file and folder under home (registry and lock files aside): type, size and digest."""
    state = {}
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home).as_posix()
        if rel.startswith(UNTRACKED):
            continue
        if path.is_symlink():
            state[rel] = ("link", str(path.readlink()))
        elif path.is_dir():
            state[rel] = ("dir",)
        elif not path.is_file():
            state[rel] = ("special", stat.S_IFMT(path.lstat().st_mode))  # a FIFO or device: never read it
        else:
            state[rel] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                          path.stat().st_mode & 0o777)
    return state


def registry_dump(home: Path) -> list[str]:
    """A logical dump of the registry through a fresh connection, the audit trail's rows aside.

    Every write request, a refused one too, adds an audit row (lifecycle/audit.py): `audit_rows` shows them.
    """
    conn = sqlite3.connect(Layout(home).registry_file)
    try:
        return [line for line in conn.iterdump() if not line.startswith(_AUDIT_ROWS)]
    finally:
        conn.close()


def recorded_files(home: Path, name: str) -> dict[str, tuple[int, str]]:
    """Every file the registry records for plugin `name`: its path, with its size and sha256."""
    conn = sqlite3.connect(Layout(home).registry_file)
    try:
        rows = conn.execute(
            "SELECT f.path, f.size, f.sha256 FROM plugin_files f JOIN plugins p ON p.id = f.plugin_id"
            " WHERE p.name = ?", (name,)).fetchall()
    finally:
        conn.close()
    return {path: (size, sha256) for path, size, sha256 in rows}


def registry_tables(home: Path) -> dict[str, list]:
    """The registry's plugins, files, functions and kept versions, and how many operations are in flight.

    What an undone change must give back; its history and audit rows record what happened, and stay.
    """
    conn = sqlite3.connect(Layout(home).registry_file)
    try:
        return {
            "plugins": conn.execute("SELECT type, name, version, descriptor, request, sha256, adopted"
                                    " FROM plugins ORDER BY type, name").fetchall(),
            "files": conn.execute("SELECT p.name, f.path, f.size, f.sha256 FROM plugin_files f JOIN plugins p"
                                  " ON p.id = f.plugin_id ORDER BY f.path").fetchall(),
            "functions": conn.execute("SELECT p.name, f.name, f.position FROM functions f JOIN plugins p"
                                      " ON p.id = f.plugin_id ORDER BY f.name").fetchall(),
            "kept": conn.execute("SELECT folder, type, name_key, manifest FROM kept_versions"
                                 " ORDER BY folder").fetchall(),
            "operations": conn.execute("SELECT COUNT(*) FROM operations").fetchall(),
        }
    finally:
        conn.close()


# The audit table is the only one with AUTOINCREMENT, so sqlite_sequence holds its counter alone.
_AUDIT_ROWS = ('INSERT INTO "audit" ', 'DELETE FROM "sqlite_sequence";',
               "INSERT INTO \"sqlite_sequence\" VALUES('audit',")


def audit_rows(home: Path) -> list[dict]:
    """The audit table's rows, oldest first, through a fresh connection."""
    conn = sqlite3.connect(Layout(home).registry_file)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM audit ORDER BY id")]
    finally:
        conn.close()


def engine_dump(home: Path) -> list[str]:
    """eKuiper's store (data/sqliteKV.db) as a logical dump; [] while it does not exist."""
    path = Layout(home).data / "sqliteKV.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


class LoopbackPeer:
    """A real TCP connection on the loopback, opened and held by the test process.

    The test client has no socket; its requests claim this connection's client end as REMOTE_ADDR and
    REMOTE_PORT, so the service asks the kernel about a socket that exists and belongs to this process's
    user, as it would for a request from a real client of this user.
    """

    def __init__(self, address: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.socket(family)
        self.listener.bind((address, 0))
        self.listener.listen(1)
        self.client = socket.socket(family)
        self.client.bind((address, 0))  # else the kernel picks 127.0.0.1 as the source of any 127.x
        self.client.connect(self.listener.getsockname()[:2])
        self.accepted, _ = self.listener.accept()
        host, port = self.client.getsockname()[:2]
        self.environ = {"REMOTE_ADDR": host, "REMOTE_PORT": str(port)}

    def close(self) -> None:
        for sock in (self.client, self.accepted, self.listener):
            sock.close()


def client_class_for(peer: LoopbackPeer) -> type[FlaskClient]:
    """A test client class whose requests come from `peer`'s connection (a request may still override it)."""

    class PeerClient(FlaskClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.environ_base.update(peer.environ)

    return PeerClient


class Service:
    """The app under test with its home, a test client and helpers to check what changed."""

    def __init__(self, home: Path, app, stops: list, peer: LoopbackPeer):
        self.home = home
        self.layout = Layout(home)
        self.app = app
        self.peer = peer
        app.test_client_class = client_class_for(peer)
        self.client = app.test_client()
        self.stops = stops

    def stop(self) -> None:
        """Close the registry connections this thread keeps, as the end of a worker process does."""
        self.app.extensions["kuiper_plugins"].installer.close()
        self.app.extensions["kuiper_plugins"].audit_writer.close()
        db.close_reader(self.layout.registry_file)

    def snapshot(self) -> tuple[dict, list[str], list[str]]:
        return disk_state(self.home), registry_dump(self.home), engine_dump(self.home)

    def assert_unchanged(self, before: tuple[dict, list[str], list[str]]) -> None:
        """Nothing written: disk, registry and eKuiper's store exactly as in `before`, no staging debris."""
        after = self.snapshot()
        assert after[0] == before[0], _diff(before[0], after[0])
        assert after[1] == before[1]
        assert after[2] == before[2], "eKuiper's store changed"
        assert list(self.layout.staging.iterdir()) == []

    def post(self, plugin_type: str, body, **kw):
        return self.client.post(f"/plugins/{plugin_type}", json=body, **kw)


def _diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added={added} removed={removed} changed={changed}"


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def loopback_peer():
    """A real loopback connection held by this test (root's, as the tests run); more on demand."""
    peers: list[LoopbackPeer] = []

    def open_peer(address: str = "127.0.0.1") -> LoopbackPeer:
        peers.append(LoopbackPeer(address))
        return peers[-1]

    yield open_peer
    for peer in peers:
        peer.close()


@pytest.fixture
def make_service(home, file_server, loopback_peer):
    """Build the service on a fresh home; downloads from the fixture server are allowed, nothing else.

    Its test client's requests come from a real loopback connection of this test's user.
    """
    peer = loopback_peer()

    def build(**overrides) -> Service:
        overrides.setdefault("private_net_allow_list", (f"127.0.0.1:{file_server.port}",))
        # Stub portable packages cannot shake hands; the tests of the handshake turn the check on.
        overrides.setdefault("portable_verify_on_install", False)
        settings = Settings(home=home, **overrides)
        stops: list = []
        return Service(home, create_app(settings, stop_service=lambda: stops.append(True)), stops, peer)

    return build


@pytest.fixture
def service(make_service) -> Service:
    return make_service()


# ---------------------------------------------------------------------------- real gunicorn

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


# What the worker logs (at debug level) when it closes a connection without an answer, and why.
UNANSWERED = ("closed (or reset) its connection", "closed its connection inside", "sent no request",
              "went away while it was served", "whose request was not served", "malformed connection hand-over",
              "Socket error processing request", "WORKER TIMEOUT", "Booting worker", "Worker exiting",
              "exited with code", "was sent", "Handling signal")


def unanswered_closes(log_path: Path, limit: int = 40) -> list[str]:
    """The lines of a gunicorn log that say a connection was closed without an answer (or a worker changed)."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return [line for line in lines if any(what in line for what in UNANSWERED)][-limit:]


class Gunicorn(testing.Gunicorn):
    """A real `gunicorn -c etc/gunicorn.conf.py wsgi:app` in the repository, as `make run` starts it."""

    def __init__(self, home: Path, log_path: Path, workers: int = 2, env: dict[str, str] | None = None):
        super().__init__(home, log_path, workers, env, config=REPO / "etc" / "gunicorn.conf.py", app="wsgi:app",
                         cwd=REPO)


@pytest.fixture
def start_gunicorn(tmp_path, file_server):
    """Start services on tmp_path/'home' as `make run` does; downloads from file_server allowed; stopped at the end."""
    services = Services(tmp_path / "home", tmp_path / "gunicorn.log", {
        "KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST": f"127.0.0.1:{file_server.port}",
        "KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL": "false",  # stub portable packages, as make_service
    }, gunicorn=Gunicorn)
    yield services.start
    services.stop_all()


# ---------------------------------------------------------------------------- Go's own encoding/gob

GOBCHECK_SOURCE = Path(__file__).resolve().parent / "go" / "gobcheck"


class GoGob:
    """The gobcheck program (tests/go/gobcheck): Go's encoding/gob and encoding/json, one call per value."""

    def __init__(self, binary: Path, version: tuple[int, int]):
        self.binary = binary
        self.version = version

    def run(self, command: str, stdin: str) -> str:
        done = subprocess.run(
            [str(self.binary), command], input=stdin.encode(), capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise GoGobError(done.stderr.decode(errors="replace").strip())
        return done.stdout.decode()

    def encode_string(self, text: str) -> bytes:
        return bytes.fromhex(self.run("encode-string", json.dumps(text)).strip())

    def encode_strings(self, items: list[str]) -> bytes:
        return bytes.fromhex(self.run("encode-strings", json.dumps(items)).strip())

    def decode_string(self, data: bytes) -> str:
        return json.loads(self.run("decode-string", data.hex()))

    def decode_strings(self, data: bytes) -> list[str]:
        return json.loads(self.run("decode-strings", data.hex()))

    def marshal_ioplugin(self, name: str, file: str, shell_paras: list[str] | None) -> tuple[str, bytes]:
        """Return Go's json.Marshal of IOPlugin{name, file, shellParas} and the gob of that string."""
        request = {"name": name, "file": file}
        if shell_paras is not None:
            request["shellParas"] = shell_paras
        answer = json.loads(self.run("marshal-ioplugin", json.dumps(request)))
        return answer["json"], bytes.fromhex(answer["gob"])


class GoGobError(Exception):
    """gobcheck refused its input; the message is Go's error."""


@pytest.fixture(scope="session")
def go_gob(request, tmp_path_factory) -> GoGob:
    """Build tests/go/gobcheck once per session with the machine's Go (stdlib only, no network)."""
    go = find_go()
    work = tmp_path_factory.mktemp("gobcheck")
    cache = request.config.cache.mkdir("go-build") if getattr(request.config, "cache", None) else work / "go-build"
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOWORK": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "GOCACHE": str(cache),
        "GOPATH": str(work / "gopath"),
    }
    binary = work / "gobcheck"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=GOBCHECK_SOURCE, env=env, capture_output=True, timeout=300
    )
    assert built.returncode == 0, built.stderr.decode(errors="replace")
    version = subprocess.run([go, "env", "GOVERSION"], env=env, capture_output=True, timeout=60, text=True).stdout
    major, minor = (int(part) for part in version.strip().removeprefix("go").split(".")[:2])
    return GoGob(binary, (major, minor))
