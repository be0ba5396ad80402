"""Knowing the engine (engine.url) and restarting it (engine.restartCommand), against a loopback stub that
answers as eKuiper's REST API does: `GET /` and `GET /plugins/portables/{name}/status`."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time

import pytest
import requests
from conftest import make_zip
from json_stub import JsonStub

from kuiper_plugins.engine.client import EngineClient
from kuiper_plugins.engine.restart import restart_environment, run_restart_command

ROOT_ANSWER = {"version": "2.4.1", "os": "linux", "arch": "arm64", "upTimeSeconds": 42, "memoryTotal": "1024"}
STATUS_ANSWER = [{"pluginName": "mirror", "status": "running", "pid": 123, "refCount": {"rule1": 1}}]


class Engine(JsonStub):
    """A loopback HTTP server answering eKuiper's shapes; it records requests and can be stopped."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []
        super().__init__(self._answer)

    def _answer(self, path: str, headers) -> tuple[int, object]:
        self.requests.append((path, headers.get("Authorization")))
        if path == "/":
            return 200, ROOT_ANSWER
        if path == "/plugins/portables/mirror/status":
            return 200, STATUS_ANSWER
        return 404, '{"error":1002,"message":"portable plugin ghost is not found"}\n'  # eKuiper's, for one it lacks


@pytest.fixture
def engine():
    stub = Engine()
    yield stub
    stub.stop()


def test_root_reports_the_engines_version_os_and_arch(make_service, engine):
    service = make_service(engine_url=engine.url, engine_token="a.jwt.token")
    ready = service.client.get("/").get_json()
    assert (ready["version"], ready["os"], ready["arch"]) == ("2.4.1", "linux", "arm64")
    assert "serviceVersion" in ready
    assert engine.requests == [("/", "a.jwt.token")]


def test_the_catalogue_asks_for_the_engines_own_build(make_service, engine):
    service = make_service(engine_url=engine.url)
    urls = service.client.get("/plugins/sources/prebuild").get_json()
    assert urls["random"].startswith("https://packages.emqx.io/kuiper-plugins/2.4.1/")
    assert urls["random"].endswith("/sources/random_arm64.zip")


def test_without_engine_url_the_catalogue_uses_kuiper_version(make_service):
    service = make_service()
    urls = service.client.get("/plugins/sinks/prebuild").get_json()
    assert "/kuiper-plugins/2.4.0/" in urls["influx"]
    ready = service.client.get("/").get_json()
    assert ready["version"] == "2.4.0"


def test_the_engine_being_down_never_fails_and_the_last_answer_is_kept(make_service, engine, file_server, caplog):
    service = make_service(engine_url=engine.url)
    assert service.client.get("/").get_json()["version"] == "2.4.1"
    engine.stop()
    client = service.app.extensions["kuiper_plugins"].engine
    client._fetched_at = 0.0  # the cached answer has aged: the next call asks again, and fails
    assert service.client.get("/").get_json()["version"] == "2.4.1"
    assert "did not say who it is" in caplog.text
    make_zip(file_server.root / "random.zip", {"Random.so": b"so", "random.yaml": "a: 1\n"})
    assert service.post("sources", {"name": "random", "file": file_server.url("random.zip")}).status_code == 201


def test_an_engine_never_reached_falls_back_to_kuiper_version(make_service, caplog):
    service = make_service(engine_url="http://127.0.0.1:9")  # discard port: nothing listens
    urls = service.client.get("/plugins/functions/prebuild").get_json()
    assert "/kuiper-plugins/2.4.0/" in urls["echo"]
    assert "using basic.kuiperVersion" in caplog.text
    # A down engine is asked again only after a while, not on every request (GET / is a health probe).
    assert service.client.get("/").get_json()["version"] == "2.4.0"
    assert caplog.text.count("did not say who it is") == 1


def test_portable_status_is_relayed_as_the_engine_answers(make_service, engine):
    service = make_service(engine_url=engine.url)
    running = service.client.get("/plugins/portables/mirror/status")
    assert running.status_code == 200 and running.get_json() == STATUS_ANSWER
    unknown = service.client.get("/plugins/portables/ghost/status")
    assert unknown.status_code == 404
    assert unknown.data == b'{"error":1002,"message":"portable plugin ghost is not found"}\n'


def test_portable_status_without_engine_url_says_what_to_set(service):
    response = service.client.get("/plugins/portables/mirror/status")
    assert response.status_code == 400
    assert response.get_json()["message"] == "portable plugin status comes from the engine: set engine.url"


def test_engine_client_strips_a_v_from_the_version(engine):
    ROOT_ANSWER["version"] = "v2.4.1"
    try:
        assert EngineClient(engine.url).info().version == "2.4.1"
    finally:
        ROOT_ANSWER["version"] = "2.4.1"


# ---------------------------------------------------------------------------- ?stop=1


def test_stop_with_a_restart_command_runs_it_once_and_keeps_serving(start_gunicorn, file_server, tmp_path):
    marker = tmp_path / "restarted"
    command = json.dumps([sys.executable, "-c", f"open({str(marker)!r}, 'a').write('restart\\n')"])
    server = start_gunicorn(workers=2, KUIPER_PLUGINS__ENGINE__RESTARTCOMMAND=command)
    make_zip(file_server.root / "random.zip", {"Random.so": b"so", "random.yaml": "a: 1\n"})
    body = {"name": "random", "file": file_server.url("random.zip")}
    assert requests.post(f"{server.url}/plugins/sources", json=body, timeout=30).status_code == 201
    response = requests.delete(f"{server.url}/plugins/sources/random?stop=1", timeout=30)
    assert response.status_code == 200
    assert response.text == ("sources plugin random is deleted and eKuiper will be stopped (engine.restartCommand"
                             f" restarts it: {' '.join(json.loads(command))}; kuiper-plugins keeps running)")
    deadline = time.monotonic() + 30
    while "engine.restartCommand finished" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the command's outcome in the log, bounded by the deadline
    assert "engine.restartCommand finished (exit status 0)" in server.log()
    assert marker.read_text() == "restart\n"  # once
    assert requests.get(f"{server.url}/ping", timeout=30).status_code == 200  # this service keeps running
    assert server.process.poll() is None


def test_the_restart_command_runs_without_this_services_settings_in_its_environment(
        start_gunicorn, file_server, tmp_path):
    # The engine a restart script starts must not read this service's KUIPER_PLUGINS__BASIC__RESTPORT, nor
    # anything else meant for this service or its gunicorn, nor eKuiper's KUIPER__* as this service's
    # environment holds them: the engine takes its own from its own unit.
    dump = tmp_path / "restart-environ.json"
    dump_it = f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"
    command = json.dumps([sys.executable, "-c", dump_it])
    server = start_gunicorn(
        workers=2, KUIPER_PLUGINS__ENGINE__RESTARTCOMMAND=command, KUIPER_PLUGINS__BASIC__DOWNLOADTIMEOUT="60",
        KUIPER_PLUGINS_LOG_LEVEL="info", KUIPER_PLUGINS_HEAD_TIMEOUT="10", GUNICORN_CMD_ARGS="--graceful-timeout 30",
        KUIPER__BASIC__RESTPORT="9082",  # an engine's own variable, in this service's environment
        LANG="C.UTF-8", HOME=str(tmp_path), KuiperBaseKey=str(tmp_path / "home"),
    )
    make_zip(file_server.root / "random.zip", {"Random.so": b"so", "random.yaml": "a: 1\n"})
    body = {"name": "random", "file": file_server.url("random.zip")}
    assert requests.post(f"{server.url}/plugins/sources", json=body, timeout=30).status_code == 201
    assert requests.delete(f"{server.url}/plugins/sources/random?stop=1", timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while "engine.restartCommand finished" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the command's outcome in the log, bounded by the deadline
    assert "engine.restartCommand finished (exit status 0)" in server.log()
    seen = json.loads(dump.read_text())
    assert server.env["KUIPER_PLUGINS__BASIC__RESTPORT"] == str(server.port)  # the service had its settings ...
    leaked = sorted(name for name in seen if name.upper().startswith(("KUIPER__", "KUIPER_PLUGINS", "GUNICORN_")))
    assert leaked == []  # ... and the command got none of them
    for name in ("KUIPER_HOME", "WEB_CONCURRENCY", "SERVER_SOFTWARE"):
        assert name not in seen, name
    # What a command needs stays, as does eKuiper's own base folder variable.
    for name in ("PATH", "HOME", "LANG", "KuiperBaseKey"):
        assert seen.get(name) == server.env[name], name


def test_restart_environment_keeps_what_commands_need_and_drops_the_services_own():
    environ = {
        "PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
        "HTTPS_PROXY": "http://127.0.0.1:3128", "KuiperBaseKey": "/kuiper", "DOCKER_HOST": "unix:///run/docker.sock",
        "KUIPER__BASIC__RESTPORT": "9082", "kuiper__basic__restport": "9083", "KUIPER__STORE__SQLITE__NAME": "x.db",
        "KUIPER_PLUGINS_SERVER": "gunicorn", "KUIPER_PLUGINS_LOG_LEVEL": "debug", "KUIPER_PLUGINS_DIR": "/p",
        "KUIPER_PLUGINS_TOKEN": "a.b.c", "KUIPER_PLUGINS__BASIC__RESTPORT": "9091", "kuiper_plugins__engine__url": "x",
        "KUIPER_HOME": "/var/lib/kuiper", "KUIPER_ETC_DIR": "/etc/kuiper",
        "KUIPER_DATA_DIR": "/var/lib/kuiper/data", "WEB_CONCURRENCY": "4", "SERVER_SOFTWARE": "gunicorn/23.0.0",
        "GUNICORN_CMD_ARGS": "--workers 4", "GUNICORN_FD": "3", "GUNICORN_PID": "1", "LISTEN_FDS": "1",
        "LISTEN_PID": "1", "LISTEN_FDNAMES": "http", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "1",
    }
    assert restart_environment(environ) == {
        "PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
        "HTTPS_PROXY": "http://127.0.0.1:3128", "KuiperBaseKey": "/kuiper", "DOCKER_HOST": "unix:///run/docker.sock",
    }


def test_a_restart_command_past_its_timeout_is_killed_and_logged(caplog):
    started = time.monotonic()
    assert run_restart_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5) is None
    assert time.monotonic() - started < 30
    assert "did not finish within 0.5 s and was killed" in caplog.text


def test_a_failing_restart_command_is_logged_with_its_output(caplog):
    assert run_restart_command([sys.executable, "-c", "print('no unit kuiper'); raise SystemExit(5)"], 30) == 5
    assert "failed with exit status 5: no unit kuiper" in caplog.text


def test_a_restart_command_writing_without_end_costs_only_its_tail(caplog):
    """A command that runs the engine in the foreground writes for as long as it runs: only the tail is kept."""
    flood = "import sys; out = sys.stdout.buffer; [out.write(b'x' * 65536) for _ in range(2048)]; print('the end')"
    caplog.set_level(logging.INFO, logger="kuiper_plugins.engine.restart")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    assert run_restart_command([sys.executable, "-c", flood], timeout=60) == 0  # 128 MiB of output

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 32 * 1024  # KiB: far below 128 MiB
    assert "finished (exit status 0)" in caplog.text and caplog.text.rstrip().endswith("the end")
    caplog.clear()
    endless = "import sys\nwhile True: sys.stdout.write('y' * 4096)"
    assert run_restart_command([sys.executable, "-c", endless], timeout=2) is None
    assert "did not finish within 2 s and was killed" in caplog.text


def test_restart_command_must_be_an_argument_list(tmp_path):
    from kuiper_plugins.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="RESTARTCOMMAND: expected an argument list"):
        load_settings({"KUIPER_HOME": str(tmp_path),
                       "KUIPER_PLUGINS__ENGINE__RESTARTCOMMAND": "systemctl restart kuiper"})
