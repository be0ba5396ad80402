"""The deployment files as shipped: real nginx in front of real gunicorn, and the systemd unit."""

from __future__ import annotations

import configparser
import hashlib
import http.server
import io
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, make_zip

from kuiper_plugins.settings import load_settings

NGINX_SITE = REPO / "etc/nginx/kuiper-plugins.conf"
SYSTEMD_UNIT = REPO / "etc/systemd/kuiper-plugins.service"


@pytest.fixture
def nginx(tmp_path):
    """Start nginx with the shipped server block, pointed at a given gunicorn port; yields a starter."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is needed (make test installs it)"
    processes: list[subprocess.Popen] = []

    def start(upstream_port: int | None, user: str = "root", site: str | None = None) -> str:
        """nginx on a free port in front of `upstream_port`, its workers running as `user` ("name group").

        `site`: another server block of etc/nginx, its upstreams already pointed (else kuiper-plugins.conf)."""
        port = free_port()
        prefix = tmp_path / f"nginx-{len(processes)}"
        (prefix / "logs").mkdir(parents=True)
        if site is None:
            site = NGINX_SITE.read_text().replace("server 127.0.0.1:9081;", f"server 127.0.0.1:{upstream_port};")
        site = re.sub(r"listen \d+;", f"listen 127.0.0.1:{port};", site)
        (prefix / "site.conf").write_text(site)
        (prefix / "nginx.conf").write_text(
            "pid nginx.pid;\nerror_log logs/error.log;\nevents { worker_connections 64; }\n"
            "http {\n  access_log logs/access.log;\n  client_body_temp_path body;\n  proxy_temp_path proxy;\n"
            "  fastcgi_temp_path fastcgi;\n  uwsgi_temp_path uwsgi;\n  scgi_temp_path scgi;\n"
            "  include site.conf;\n}\n"
        )
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "logs/error.log"),
             "-g", f"daemon off; user {user};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                requests.get(f"{url}/ping", timeout=1)
                return url
            except requests.ConnectionError:
                time.sleep(0.05)  # polling for readiness, bounded by the deadline
        raise AssertionError("nginx did not start")

    yield start
    for process in processes:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        process.stderr.close()


@pytest.mark.slow
def test_create_list_delete_through_nginx(start_gunicorn, nginx, file_server, tmp_path):
    server = start_gunicorn()
    url = nginx(server.port)
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": b"so", "random.yaml": "a: 1\n"})
    created = requests.post(f"{url}/plugins/sources", json={"name": "random", "file": file_server.url("random.zip")},
                            timeout=30)
    assert created.status_code == 201, created.text
    assert requests.get(f"{url}/plugins/sources", timeout=10).json() == ["random"]
    assert requests.get(f"{url}/plugins/sources/random", timeout=10).json() == {"name": "random", "version": "1.0.0"}
    assert requests.delete(f"{url}/plugins/sources/random", timeout=10).status_code == 200
    assert requests.get(f"{url}/plugins/sources", timeout=10).json() == []
    # An upload larger than nginx's 1 MiB default body limit goes through, streamed.
    big = make_zip(tmp_path / "big.zip", {"Big.so": bytes(range(256)) * 8192, "big.yaml": "a: 1\n"})
    uploaded = requests.post(f"{url}/config/uploads", files={"uploadFile": ("big.zip", io.BytesIO(big.read_bytes()))},
                             timeout=30)
    assert uploaded.status_code == 201, uploaded.text
    assert Path(uploaded.text).read_bytes() == big.read_bytes()
    created = requests.post(f"{url}/plugins/sources", json={"name": "big", "file": Path(uploaded.text).as_uri()},
                            timeout=30)
    assert created.status_code == 201, created.text
    # A Host the service does not know is refused, through nginx too.
    refused = requests.get(f"{url}/plugins/sources", headers={"Host": "evil.example"}, timeout=10)
    assert refused.status_code == 403
    assert refused.json()["error"] == 1000


def test_nginx_limits_fit_the_service_defaults():
    site = NGINX_SITE.read_text()
    body = re.search(r"client_max_body_size (\d+)m;", site)
    assert body and int(body.group(1)) * 1024 * 1024 >= 536870912
    read = re.search(r"proxy_read_timeout (\d+)s;", site)
    assert read and int(read.group(1)) > 300 + 300


def test_systemd_unit_restarts_the_service():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(SYSTEMD_UNIT.read_text())
    service = unit["Service"]
    assert service["Restart"] == "always", "DELETE ?stop=1 relies on the supervisor to start it again"
    assert service["ExecStart"].endswith("gunicorn -c etc/gunicorn.conf.py wsgi:app")
    assert "KUIPER_HOME=" in service["Environment"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_says_why_it_runs_as_root_and_is_hardened_around_install_sh():
    text = SYSTEMD_UNIT.read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    assert service["User"] == "root"
    why = text[: text.index("User=root")].rsplit("[Service]", 1)[1]
    assert "install.sh" in why and "apt" in why and "CAP_SYS_ADMIN" in why, why
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectControlGroups",
                "ProtectKernelLogs", "LockPersonality", "RestrictRealtime"):
        assert service.get(key) == "yes", key
    # What install.sh and its PID namespace need stays available.
    for key in ("RestrictNamespaces", "CapabilityBoundingSet", "ProtectSystem", "RestrictSUIDSGID", "PrivateDevices",
                "ProtectKernelModules", "SystemCallFilter"):
        assert key not in service, f"{key} would break install.sh or its confinement"
    assert "AF_NETLINK" in service["RestrictAddressFamilies"].split(), "sock_diag needs netlink"


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (make test installs the systemd package)"
    # Placed where a checkout with its .venv really is, so that verify can check the commands exist.
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/opt/kuiper-plugins", str(REPO)))
    checked = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, which it only prints: any word from it is a finding.
    findings = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    assert checked.returncode == 0 and findings == [], findings


# ---------------------------------------------------------------------------- beside eKuiper

FRONT_SITE = REPO / "etc/nginx/ekuiper-front.conf"
ENGINE_ENV = REPO / "etc/systemd/kuiper-engine.env"
LAYOUTS = ("deb", "docker")


class StandIn:
    """A loopback HTTP server standing in for the engine or the service: it answers every request with its
    own name, the method, the path as it arrived and the body's digest."""

    def __init__(self, name: str):
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.seen.append((self.command, self.path))
                reply = json.dumps({"server": name, "method": self.command, "path": self.path,
                                    "body": hashlib.sha256(body).hexdigest()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args) -> None:
                pass

        self.seen: list[tuple[str, str]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def stand_ins():
    engine, service = StandIn("engine"), StandIn("service")
    yield engine, service
    engine.close()
    service.close()


def front_site(engine_port: int, service_port: int) -> str:
    """The shipped front, its two upstreams pointed at the stand-ins (the ports it ships with are checked below)."""
    site = FRONT_SITE.read_text()
    assert site.count("server 127.0.0.1:9082;") == 1 and site.count("server 127.0.0.1:9091;") == 1
    return (site.replace("server 127.0.0.1:9082;", f"server 127.0.0.1:{engine_port};")
            .replace("server 127.0.0.1:9091;", f"server 127.0.0.1:{service_port};"))


@pytest.mark.parametrize("method, path, body, reaches", [
    ("GET", "/plugins/sources", None, "service"),
    ("POST", "/plugins/portables", b'{"name":"pysam","file":"file:///kuiper/data/uploads/pysam.zip"}', "service"),
    ("GET", "/plugins/portables/pysam/status", None, "service"),  # the service asks the engine itself
    ("DELETE", "/plugins/functions/geohash?stop=1", None, "service"),
    ("GET", "/plugins/udfs/geohashEncode", None, "service"),
    ("GET", "/plugins/sinks/prebuild", None, "service"),
    ("POST", "/config/uploads", b"x" * (2 << 20), "service"),  # over nginx's 1 MiB default: streamed
    ("GET", "/config/uploads", None, "service"),
    ("DELETE", "/config/uploads/pysam.zip", None, "service"),
    ("GET", "/", None, "engine"),
    ("GET", "/ping", None, "engine"),
    ("POST", "/rules", b'{"id":"r1","sql":"SELECT * FROM demo"}', "engine"),
    ("GET", "/rules/r1/status", None, "engine"),
    ("POST", "/streams", b'{"sql":"CREATE STREAM demo () WITH (TYPE=\\"httppush\\")"}', "engine"),
    ("GET", "/tables", None, "engine"),
    ("POST", "/data/import?stop=1", b"{}", "engine"),
    ("GET", "/plugins", None, "engine"),  # not the plugin API: no such path in eKuiper's
    ("GET", "/config/uploadsx", None, "engine"),
    ("GET", "/audit?limit=5", None, "service"),  # the service's audit trail
    ("GET", "/auditx", None, "engine"),
    ("PUT", "/config/plugins", b'{"functions":{},"prune":false}', "service"),  # the fleet's plugin set
    ("GET", "/config/plugins?format=ekuiper", None, "service"),
    ("GET", "/config/pluginsx", None, "engine"),
    ("GET", "/registry/verify", None, "service"),
    ("POST", "/registry/repair", None, "service"),
    ("GET", "/engine/pending", None, "service"),
    ("GET", "/engine/pendingx", None, "engine"),
    ("GET", "/operations/6f1c1f7e-8d1b-4a51-9a43-0d2f8f0b5c11", None, "service"),  # a write's progress
    ("GET", "/operationsx", None, "engine"),
    ("GET", "/registry/backup", None, "engine"),  # the engine's whole store is in it: the service's port only
])
def test_the_front_sends_the_plugin_and_uploads_api_to_the_service_and_the_rest_to_the_engine(
        nginx, stand_ins, method, path, body, reaches):
    engine, service = stand_ins
    url = nginx(None, site=front_site(engine.port, service.port))
    response = requests.request(method, f"{url}{path}", data=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer == {"server": reaches, "method": method, "path": path,
                      "body": hashlib.sha256(body or b"").hexdigest()}
    other = service if reaches == "engine" else engine
    assert (method, path) not in other.seen


def test_the_front_takes_ekuipers_port_and_points_where_the_engine_and_the_service_listen(tmp_path):
    # nginx listens where eKuiper's clients look for it; the engine moved to loopback by its own variables,
    # the service on its default beside an engine, as the service's own settings work them out.
    site = FRONT_SITE.read_text()
    assert re.findall(r"^\s*listen (\S+);", site, re.M) == ["9081"]
    upstreams = dict(re.findall(r"upstream (\w+) \{\s*server 127\.0\.0\.1:(\d+);", site))
    engine_env = dict(line.split("=", 1) for line in ENGINE_ENV.read_text().splitlines()
                      if line.strip() and not line.startswith("#"))
    assert engine_env == {"KUIPER__BASIC__RESTIP": "127.0.0.1", "KUIPER__BASIC__RESTPORT": upstreams["ekuiper_engine"]}
    for layout in LAYOUTS:
        settings = layout_settings(layout, tmp_path / layout)
        assert (settings.rest_ip, str(settings.rest_port)) == ("127.0.0.1", upstreams["kuiper_plugins"]), layout
        assert settings.engine_url == f"http://127.0.0.1:{upstreams['ekuiper_engine']}", layout
        assert settings.engine_restart_command == ("systemctl", "restart", "kuiper"), layout


def unit_environment(text: str) -> dict[str, str]:
    """The Environment= assignments of a unit or drop-in, in order (later ones win, as in systemd)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            found.update(item.split("=", 1) for item in shlex.split(line.removeprefix("Environment=")))
    return found


def layout_settings(layout: str, root: Path):
    """The settings the service gets from its unit, the layout's drop-in and the engine's environment file,
    with the layout's folders moved under `root` and eKuiper's shipped kuiper.yaml (0.0.0.0:9081) in its etc."""
    drop_in = (REPO / f"etc/systemd/{layout}/kuiper-plugins.service.d/beside-ekuiper.conf").read_text()
    assert "EnvironmentFile=/etc/default/kuiper" in drop_in.splitlines(), layout  # the file the engine reads
    environ = {**unit_environment(SYSTEMD_UNIT.read_text()), **unit_environment(drop_in)}
    environ.update(line.split("=", 1) for line in ENGINE_ENV.read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    environ = {name: f"{root}{value}" if value.startswith("/") else value for name, value in environ.items()}
    etc = Path(environ.get("KUIPER_ETC_DIR") or f"{environ['KUIPER_HOME']}/etc")
    etc.mkdir(parents=True)
    (etc / "kuiper.yaml").write_text("basic:\n  restIp: 0.0.0.0\n  restPort: 9081\n")
    return load_settings(environ)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_engine_units_read_the_engines_environment_file(layout):
    unit = (REPO / f"etc/systemd/{layout}/kuiper.service").read_text()
    if layout == "deb":
        assert "EnvironmentFile=/etc/default/kuiper" in unit.splitlines()
        assert "ExecStart=/usr/bin/kuiperd" in unit.splitlines()
    else:
        command = shlex.split(re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.M | re.S).group(1).replace("\\\n", " "))
        assert command[:2] == ["/usr/bin/docker", "run"] and "--network" in command
        assert command[command.index("--env-file") + 1] == "/etc/default/kuiper"
        for folder in ("etc", "data", "plugins"):  # at the same paths on the host, where the service finds them
            assert f"/kuiper/{folder}:/kuiper/{folder}" in command
    assert "Restart=always" in unit.splitlines(), "the engine exits for ?stop=1; its supervisor starts it again"


def verify_units(folder: Path, *units: str) -> list[str]:
    """What `systemd-analyze verify` says of the units in `folder`, with drop-ins from that folder."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (make test installs the systemd package)"
    checked = subprocess.run([analyze, "verify", *(str(folder / unit) for unit in units)], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{folder}:"})
    findings = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    return findings if checked.returncode == 0 else [*findings, f"exit status {checked.returncode}"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_systemd_analyze_verifies_the_units_beside_ekuiper(tmp_path, layout):
    # As installed in /etc/systemd/system: the service's unit with the layout's drop-in, and the engine's unit.
    # The commands are pointed at programs that exist here (the checkout; the engine and docker are not installed).
    stand_in = shutil.which("true")
    (tmp_path / SYSTEMD_UNIT.name).write_text(SYSTEMD_UNIT.read_text().replace("/opt/kuiper-plugins", str(REPO)))
    shutil.copytree(REPO / f"etc/systemd/{layout}/kuiper-plugins.service.d", tmp_path / "kuiper-plugins.service.d")
    engine = (REPO / f"etc/systemd/{layout}/kuiper.service").read_text()
    (tmp_path / "kuiper.service").write_text(engine.replace("/usr/bin/kuiperd", stand_in)
                                             .replace("/usr/bin/docker", stand_in))
    if layout == "docker":
        (tmp_path / "docker.service").write_text(f"[Unit]\nDescription=stand-in\n[Service]\nExecStart={stand_in}\n")
    assert verify_units(tmp_path, "kuiper-plugins.service", "kuiper.service") == []
    # verify exits 0 and prints what it finds: a key it cannot know, planted in the drop-in, must be among it,
    # or the drop-in was never read.
    drop_in = tmp_path / "kuiper-plugins.service.d/beside-ekuiper.conf"
    drop_in.write_text(drop_in.read_text() + "NotAKey=1\n")
    assert any("beside-ekuiper.conf" in line and "NotAKey" in line
               for line in verify_units(tmp_path, "kuiper-plugins.service"))


# ---------------------------------------------------------------------------- one set of timeouts

FRONT_MARGIN = 30  # seconds nginx and systemd wait beyond gunicorn's (docs/deployment.md, "Timeouts: one formula")


def test_one_formula_sets_every_timeout(monkeypatch, tmp_path):
    """gunicorn's timeout is the request timeout of the shipped settings; nginx waits longer before it gives up on
    gunicorn, systemd longer before it kills gunicorn's graceful stop; the docs and the README give the same numbers."""
    for name in [name for name in os.environ if name.startswith(("KUIPER", "WEB_CONCURRENCY"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KUIPER_HOME", str(tmp_path / "home"))
    settings = load_settings()
    handshake = settings.portable_init_timeout + 15 if settings.portable_verify_on_install else 0
    request_timeout = int(settings.download_timeout + settings.install_script_timeout + handshake + 120)
    assert request_timeout == 795  # 300 + 300 + (60 + 15) + 120, as docs/deployment.md works it out
    gunicorn = runpy.run_path(str(REPO / "etc/gunicorn.conf.py"))
    assert (gunicorn["timeout"], gunicorn["graceful_timeout"]) == (request_timeout, request_timeout)
    beyond = request_timeout + FRONT_MARGIN

    for site in sorted((REPO / "etc/nginx").glob("*.conf")):
        text = site.read_text()
        for directive in ("proxy_read_timeout", "proxy_send_timeout"):
            assert re.findall(rf"^\s*{directive} (\d+)s;", text, re.M) == [str(beyond)], (site.name, directive)

    stop_timeouts = {}
    for unit in sorted((REPO / "etc/systemd").rglob("*")):
        if unit.is_file() and ("kuiper-plugins" in unit.name or "kuiper-plugins" in unit.parent.name):
            stop_timeouts[unit.relative_to(REPO).as_posix()] = re.findall(r"^TimeoutStopSec=(\S+)$", unit.read_text(),
                                                                           re.M)
    assert stop_timeouts.pop("etc/systemd/kuiper-plugins.service") == [str(beyond)]
    assert all(found == [] for found in stop_timeouts.values()), stop_timeouts  # no drop-in overrides it

    deployment = (REPO / "docs/deployment.md").read_text()
    formula = deployment[deployment.index("## Timeouts: one formula"):]
    formula = formula[:formula.index("\n## ", 1)]
    assert ("request timeout = basic.downloadTimeout + basic.installScriptTimeout + handshake + 120 s" in formula
            and "handshake       = portable.initTimeout + 15 s" in formula)
    assert f"300 + 300 + 75 + 120 = {request_timeout} s" in formula
    assert f"request timeout + {FRONT_MARGIN} s = {beyond} s" in formula
    # Wherever else the page names a timeout of minutes, it is one of these two.
    assert set(re.findall(r"\b(\d{3}) s\b", deployment.replace(formula, ""))) <= {str(request_timeout), str(beyond)}
    assert f"TimeoutStopSec={beyond}" in deployment and f"are {beyond} s" in deployment
    readme = (REPO / "README.md").read_text()
    assert f"{request_timeout} s with the shipped settings" in readme and f"`TimeoutStopSec` are {beyond} s" in readme
    for stale in ("660", "700 s", "720 s", "TimeoutStopSec=700"):
        assert stale not in readme + deployment, stale
