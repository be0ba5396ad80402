"""End to end: the real gunicorn on a home an eKuiper engine shares, with the engine's own kuiper.yaml in it.

The service takes its settings from kuiper-plugins.yaml and KUIPER_PLUGINS__* only; the engine's kuiper.yaml
and KUIPER__* tell it where the engine listens (its engine.url) and which port it must never take.
"""

from __future__ import annotations

import os
import socket
import subprocess

import psutil
import pytest
import requests
from conftest import GUNICORN, REPO, free_port

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

# eKuiper's shipped defaults for its REST API: every address, port 9081.
EKUIPER_DEFAULTS = "basic:\n  restIp: 0.0.0.0\n  restPort: 9081\n  consoleLog: false\n  allowExternalFileAccess: true\n"


def engine_config(home, text: str = EKUIPER_DEFAULTS) -> None:
    (home / "etc").mkdir(parents=True, exist_ok=True)
    (home / "etc/kuiper.yaml").write_text(text)


def listening(server) -> set[tuple[str, int]]:
    """The (address, port) pairs gunicorn's master listens on."""
    return {(conn.laddr.ip, conn.laddr.port) for conn in psutil.Process(server.process.pid).net_connections("inet")
            if conn.status == psutil.CONN_LISTEN}


def test_beside_an_engine_config_it_listens_on_its_own_port_on_loopback_and_says_so(start_gunicorn, tmp_path):
    home = tmp_path / "home"
    engine_config(home)
    # start_gunicorn gives the service a free port with KUIPER_PLUGINS__BASIC__RESTPORT (9091, the default
    # here, may be taken on a shared machine; tests/test_settings.py shows the default).
    server = start_gunicorn()
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert listening(server) == {("127.0.0.1", server.port)}  # not the engine's 0.0.0.0, not its 9081
    assert (f"kuiper-plugins listens on 127.0.0.1:{server.port}; found the engine's config {home}/etc/kuiper.yaml: "
            "the engine listens on 0.0.0.0:9081, engine.url is http://127.0.0.1:9081 (derived from the engine's "
            "restIp and restPort)") in server.log()


def test_ekuipers_own_variables_do_not_move_the_service(start_gunicorn, tmp_path):
    engine_config(tmp_path / "home")
    engine_port = free_port()
    # What an environment shared with the engine holds: the engine's port and address, and its authentication.
    server = start_gunicorn(KUIPER__BASIC__RESTPORT=str(engine_port), KUIPER__BASIC__RESTIP="127.0.0.1",
                            KUIPER__BASIC__AUTHENTICATION="true")
    assert listening(server) == {("127.0.0.1", server.port)}
    assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []  # no token asked: ours is off
    assert (f"the engine listens on 127.0.0.1:{engine_port}, engine.url is http://127.0.0.1:{engine_port} "
            "(derived from the engine's restIp and restPort)") in server.log()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{engine_port}/ping", timeout=5)  # nothing took the engine's port
    assert ("[WARNING] kuiper_plugins.web.gunicorn_hooks: the engine's config "
            f"({tmp_path}/home/etc/kuiper.yaml, KUIPER__*) turns its authentication on, and this service's "
            "basic.authentication is off") in server.log()


def test_the_engines_port_stops_start_up_with_a_message(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    engine_config(home, f"basic:\n  restIp: 127.0.0.1\n  restPort: {port}\n")
    env = {**os.environ, "KUIPER_HOME": str(home), "KUIPER_PLUGINS__BASIC__RESTPORT": str(port)}
    result = subprocess.run(
        [str(GUNICORN), "-c", "etc/gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=60,
    )
    assert result.returncode != 0
    assert (f"kuiper-plugins: KUIPER_PLUGINS__BASIC__RESTPORT {port} is the engine's port: the engine listens on "
            f"127.0.0.1:{port} (basic.restPort in {home}/etc/kuiper.yaml)") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "data").exists()  # it stopped before it wrote anything


def test_beside_a_real_engine_on_its_home_the_service_finds_it(start_kuiperd, start_gunicorn, tmp_path):
    # The engine's home is the service's: eKuiper's shipped etc/, kuiper.yaml changed to loopback and free ports.
    engine = start_kuiperd(home=tmp_path / "home")
    server = start_gunicorn()
    assert f"engine.url is {engine.url} (derived from the engine's restIp and restPort)" in server.log()
    # A portable plugin's status is the engine's to say: relayed as it is, from the engine the config named.
    ours = requests.get(f"{server.url}/plugins/portables/nope/status", timeout=30)
    theirs = engine.get("/plugins/portables/nope/status")
    assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content)
    assert theirs.status_code == 404, theirs.text
    # And the service's readiness answer names the engine's own build.
    engine_root = engine.get("/").json()
    service_root = requests.get(f"{server.url}/", timeout=30).json()
    assert (service_root["version"], service_root["os"], service_root["arch"]) == (
        engine_root["version"], engine_root["os"], engine_root["arch"])


def test_the_master_settles_a_cut_short_operation_before_it_tells_systemd_it_is_ready(start_gunicorn, tmp_path):
    """After a power cut, systemd starts the engine once this service is ready (Type=notify, Before=kuiper.service
    in the shipped units): gunicorn's master must have settled the home by then, not its workers later.

    The operation left is a worker's that shielded a source's yaml from the engine's delete (the list and the
    file set aside, no journal, no reservation). The master notifies systemd (NOTIFY_SOCKET) after its
    on_starting hook, in the same thread, before it forks any worker: the recovery's log line must carry the
    master's pid, and the yaml be back when READY=1 arrives.
    """
    home = tmp_path / "home"
    config = home / "etc" / "sources" / "mine.yaml"
    workdir = Layout(home).staging / "0123456789abcdef0123456789abcdef"
    (workdir / "engine-aside").mkdir(parents=True)
    (workdir / "engine-aside" / "1").write_text("default: {interval: 1000}\n")
    (workdir / "engine-aside.json").write_text(
        '[{"dest": "etc/sources/mine.yaml", "aside": "1", "linked": false}]')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    try:
        server = start_gunicorn(workers=2, NOTIFY_SOCKET=str(tmp_path / "notify"))
        ready = notify.recv(4096)
        restored = config.read_text() if config.exists() else None
    finally:
        notify.close()
    assert b"READY=1" in ready
    assert restored == "default: {interval: 1000}\n"
    settled = [line for line in server.log_path.read_text().splitlines() if "made no move of its own" in line]
    assert settled and all(f"[{server.process.pid}]" in line for line in settled), settled
    assert not workdir.exists()
