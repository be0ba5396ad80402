"""Every descendant of install.sh ends with it, through the real API (issue 10, point 3).

Each install.sh starts two children that try to escape: one drops the marker variable and leaves the
session (`env -u KUIPER_PLUGINS_OPERATION setsid`), one clears its whole environment and leaves the session
(`env -i setsid`). Each child says it started, sleeps, then tampers: it rewrites the installed .so and drops
a file outside the home. The script succeeds, fails or overruns its timeout. Afterwards no process of
theirs is left (psutil, by a word in their command line), nothing appears during a wait longer than their
sleep, and the installed bytes are the committed ones.

The unit side, including the refusal when no PID namespace can be made, is in test_scripts.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from conftest import disk_state, make_zip, registry_dump

SO = b"\x7fELF committed bytes of Random"
YAML = "default:\n  interval: 1000\n"
CHILD_SLEEP = 1.0  # seconds an escaping child waits before it tampers
AFTER_WAIT = CHILD_SLEEP + 1.5  # how long we watch for tampering after the answer
START_WAIT = 500  # the script waits for its children to say they started: this many 10 ms rounds at most
ESCAPES = {
    "env-u-setsid": "env -u KUIPER_PLUGINS_OPERATION setsid",
    "env-i-setsid": "env -i setsid",
}


def with_token(token: str) -> list[int]:
    """Live (not zombie) processes on this machine with `token` in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(token in part for part in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


class Escapers:
    """The two escaping children of one install.sh: where they say they started and what they would drop."""

    def __init__(self, tmp_path: Path, so_path: Path):
        self.token = f"escaper-{uuid.uuid4().hex}"
        self.so_path = so_path
        self.started = {name: tmp_path / f"started-{name}" for name in ESCAPES}
        self.dropped = {name: tmp_path / f"dropped-{name}" for name in ESCAPES}

    def script(self, ending: str) -> str:
        """An install.sh that starts both children, waits until both run, then does `ending`."""
        lines = []
        for name, prefix in ESCAPES.items():
            # Absolute paths: after `env -i` there is no PATH. The token is the child shell's $0.
            child = (
                f"/bin/touch {self.started[name]}; /bin/sleep {CHILD_SLEEP}; "
                f"printf tampered > {self.so_path}; /bin/touch {self.dropped[name]}"
            )
            lines.append(f"{prefix} /bin/sh -c '{child}' {self.token} &")
        waits = " || ".join(f"[ ! -e {path} ]" for path in self.started.values())
        lines.append(f'i=0\nwhile {{ {waits}; }} && [ "$i" -lt {START_WAIT} ]; do sleep 0.01; i=$((i+1)); done')
        lines.append(ending)
        return "\n".join(lines) + "\n"

    def assert_contained(self) -> None:
        """Both children ran; none of their processes is left; nothing of theirs appears while we watch."""
        assert {name: path.exists() for name, path in self.started.items()} == dict.fromkeys(ESCAPES, True)
        assert with_token(self.token) == [], "a child of install.sh outlived it"
        deadline = time.monotonic() + AFTER_WAIT
        while time.monotonic() < deadline:  # polling for files nothing can notify us of, bounded
            appeared = [name for name, path in self.dropped.items() if path.exists()]
            assert appeared == [], f"an escaped child tampered after the answer: {appeared}"
            time.sleep(0.05)
        assert not any(path.exists() for path in self.dropped.values())
        assert with_token(self.token) == []

    def kill_strays(self) -> None:
        for pid in with_token(self.token):  # never leave a stray behind, even when a test failed
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def escapers(tmp_path, home):
    made = Escapers(tmp_path, home / "plugins" / "sources" / "Random@v1.0.0.so")
    yield made
    made.kill_strays()


def serve(file_server, script: str, name: str = "random.zip") -> str:
    make_zip(file_server.root / name, {"Random@v1.0.0.so": SO, "random.yaml": YAML, "install.sh": script})
    return file_server.url(name)


def test_after_a_successful_script_nothing_it_started_remains(make_service, file_server, escapers, home):
    service = make_service()
    url = serve(file_server, escapers.script("echo installed\nexit 0"))
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 201, response.get_json()
    escapers.assert_contained()
    assert escapers.so_path.read_bytes() == SO
    assert (home / "etc" / "sources" / "random.yaml").read_text() == YAML
    assert service.client.get("/plugins/sources").get_json() == ["random"]


@pytest.mark.parametrize(
    "ending, settings, message",
    [
        ("echo about to fail\nexit 1", {}, "install.sh failed with exit status 1"),
        ("echo hanging\nsleep 60", {"install_script_timeout": 1}, "install.sh did not finish within 1 seconds"),
    ],
    ids=["fails", "times-out"],
)
def test_after_a_failed_script_nothing_it_started_remains(make_service, file_server, escapers, ending, settings,
                                                          message):
    service = make_service(**settings)
    before = service.snapshot()
    url = serve(file_server, escapers.script(ending))
    response = service.post("sources", {"name": "random", "file": url})
    assert response.status_code == 400, response.get_json()
    assert f"fail to install plugin: {message}" in response.get_json()["message"]
    escapers.assert_contained()
    service.assert_unchanged(before)
    assert not escapers.so_path.exists()


def test_an_update_keeps_the_committed_bytes(make_service, file_server, escapers, home):
    """A failing update's children cannot rewrite the version that stays installed."""
    service = make_service()
    first = serve(file_server, "exit 0\n", "first.zip")
    assert service.post("sources", {"name": "random", "file": first}).status_code == 201
    before = service.snapshot()
    url = serve(file_server, escapers.script("exit 2"))
    response = service.client.put("/plugins/sources/random", json={"name": "random", "file": url})
    assert response.status_code == 400, response.get_json()
    assert "exit status 2" in response.get_json()["message"]
    escapers.assert_contained()
    service.assert_unchanged(before)
    assert escapers.so_path.read_bytes() == SO


@pytest.mark.slow
def test_under_gunicorn_nothing_the_script_started_remains(start_gunicorn, file_server, escapers):
    server = start_gunicorn(workers=2)
    url = serve(file_server, escapers.script("exit 0"))
    response = requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": url}, timeout=60)
    assert response.status_code == 201, response.text
    escapers.assert_contained()
    assert escapers.so_path.read_bytes() == SO
    assert registry_dump(server.home)
    assert "Random@v1.0.0.so" in str(disk_state(server.home))
    log = server.log()
    assert "install.sh will run in a PID namespace of its own" in log, log
