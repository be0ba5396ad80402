"""The deployment files as shipped: real nginx in front of real gunicorn, and the systemd unit."""

from __future__ import annotations

import configparser
import io
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, make_zip

NGINX_SITE = REPO / "etc/nginx/kuiper-plugins.conf"
SYSTEMD_UNIT = REPO / "etc/systemd/kuiper-plugins.service"


@pytest.fixture
def nginx(tmp_path):
    """Start nginx with the shipped server block, pointed at a given gunicorn port; yields a starter."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is needed (make test installs it)"
    processes: list[subprocess.Popen] = []

    def start(upstream_port: int, user: str = "root") -> str:
        """nginx on a free port in front of `upstream_port`, its workers running as `user` ("name group")."""
        port = free_port()
        prefix = tmp_path / f"nginx-{len(processes)}"
        (prefix / "logs").mkdir(parents=True)
        site = NGINX_SITE.read_text()
        site = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", site)
        site = site.replace("server 127.0.0.1:9081;", f"server 127.0.0.1:{upstream_port};")
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
