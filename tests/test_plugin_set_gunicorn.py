"""PUT /config/plugins on real gunicorn with several workers: applies never interleave, and a worker killed in
the middle of one leaves every plugin whole, old or new.

The package server's hooks hold a download open until the test lets it go, so that the test knows where an
apply is: inside that download, holding the plugin set's lock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import make_zip
from test_peer_access import NOBODY, curl_one

from kuiper_plugins.layout import Layout

pytestmark = pytest.mark.slow

SO_V1 = b"\x7fELF version one"
SO_V2 = b"\x7fELF version two, longer"
WAIT = 30.0
# A line of /proc/locks for a process waiting for a flock ("->"), with the locked file's inode.
WAITING = re.compile(r"^\d+: -> FLOCK\s+\S+\s+WRITE\s+\d+\s+[0-9a-f]+:[0-9a-f]+:(\d+)\s", re.MULTILINE)


def held_download(file_server, path: str, data: bytes) -> tuple[threading.Event, threading.Event]:
    """Serve `data` at `path` only once `release` is set (at most WAIT seconds); `started` says it was asked."""
    started, release = threading.Event(), threading.Event()

    def answer(handler) -> None:
        started.set()
        release.wait(WAIT)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    file_server.routes[path] = answer
    return started, release


def zip_bytes(tmp_path: Path, name: str, members: dict) -> bytes:
    return make_zip(tmp_path / "made" / name, members).read_bytes()


def put_in_thread(url: str, document: dict, answers: dict, key: str) -> threading.Thread:
    def send() -> None:
        try:
            answers[key] = requests.put(f"{url}/config/plugins", json=document, timeout=120)
        except requests.RequestException as exc:
            answers[key] = exc

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def wait_for_a_waiter(lock_path: Path) -> None:
    """Wait (bounded) until the kernel lists a process waiting for the flock on `lock_path`."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            inode = str(os.stat(lock_path).st_ino)
        except FileNotFoundError:  # nobody holds it (the file exists only while it is held)
            inode = None
        if inode is not None and inode in WAITING.findall(Path("/proc/locks").read_text()):
            return
        assert time.monotonic() < deadline, "no second apply waited for the plugin set's lock"
        time.sleep(0.02)  # polling the kernel's lock table, bounded by the deadline


def test_two_applies_at_once_run_one_after_the_other(start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=3)
    started, release = held_download(file_server, "/echo1.zip", zip_bytes(tmp_path, "echo1.zip",
                                                                         {"Echo@v1.0.0.so": SO_V1}))
    make_zip(file_server.root / "echo2.zip", {"Echo@v2.0.0.so": SO_V2})
    answers: dict = {}
    try:
        first = put_in_thread(server.url, {"sinks": {"echo": {"file": file_server.url("echo1.zip")}}}, answers, "1")
        # Ordering relied on: the first apply is inside its download (the hook was reached), so it holds the
        # plugin set's lock, whose file exists exactly while it is held.
        assert started.wait(WAIT), "the first apply never fetched its package"
        second = put_in_thread(server.url, {"sinks": {"echo": {"file": file_server.url("echo2.zip")}}}, answers,
                               "2")
        # And the second is waiting for that lock (the kernel says so) before the first is let go.
        wait_for_a_waiter(Layout(server.home).locks / "plugin-set.lock")
    finally:
        release.set()
    first.join(WAIT)
    second.join(WAIT)

    assert answers["1"].status_code == 200, answers["1"].text
    assert [(c["action"], c["name"]) for c in answers["1"].json()["changes"]] == [("install", "echo")]
    # the second apply was planned after the first had committed: it sees echo installed, from the other URL
    assert answers["2"].status_code == 200, answers["2"].text
    assert [(c["action"], c["name"], c["from"]["version"]) for c in answers["2"].json()["changes"]] == [
        ("update", "echo", "1.0.0")]
    document = requests.get(f"{server.url}/config/plugins", timeout=10).json()
    assert document["sinks"]["echo"]["version"] == "2.0.0"
    assert not (Layout(server.home).locks / "plugin-set.lock").exists()


def test_a_worker_killed_in_the_middle_of_an_apply_leaves_each_plugin_old_or_new(start_gunicorn, file_server,
                                                                                 tmp_path):
    server = start_gunicorn(workers=2)
    make_zip(file_server.root / "first.zip", {"First@v1.0.0.so": SO_V1})
    started, release = held_download(file_server, "/second.zip", zip_bytes(tmp_path, "second.zip",
                                                                           {"Second@v1.0.0.so": SO_V1}))
    document = {"sinks": {"first": {"file": file_server.url("first.zip")},
                          "second": {"file": file_server.url("second.zip")}}}
    answers: dict = {}
    killed: set[int] = set()
    try:
        apply = put_in_thread(server.url, document, answers, "killed")
        # Ordering relied on: installs go by name, so when second's download is asked for, first's install
        # has committed; the apply is then inside second's install, which has a staging folder and no move yet.
        assert started.wait(WAIT), "the apply never reached its second install"
        for pid in server.workers_booted():
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        apply.join(WAIT)
    finally:
        release.set()
    assert isinstance(answers["killed"], requests.RequestException)  # no answer: the worker died serving it

    deadline = time.monotonic() + WAIT
    while set(server.workers_booted()) & killed:  # the master has started new ones, which ran recovery
        assert time.monotonic() < deadline, "gunicorn did not replace the killed workers"
        time.sleep(0.05)  # polling gunicorn's workers, bounded by the deadline

    # first is new, second old (absent): each whole, nothing half-installed, no debris in staging
    sinks = requests.get(f"{server.url}/config/plugins", timeout=10).json()["sinks"]
    assert set(sinks) == {"first"}
    assert sorted(p.name for p in (server.home / "plugins/sinks").iterdir()) == ["First@v1.0.0.so"]
    assert list(Layout(server.home).staging.iterdir()) == []
    verified = requests.get(f"{server.url}/registry/verify", timeout=30).json()
    assert verified == {"ok": True, "problems": []}

    # the same document again finishes what the dead apply started
    again = requests.put(f"{server.url}/config/plugins", json=document, timeout=120)
    assert again.status_code == 200, again.text
    assert [(c["action"], c["name"]) for c in again.json()["changes"]] == [("install", "second")]


def test_another_local_user_cannot_have_an_install_sh_run_by_an_apply(start_gunicorn, file_server):
    """As for POST /plugins/{type}: a local user let in by basic.allowedUsers, but not root nor the service's
    user, may apply packages without an install.sh only; a step whose package has one is refused (403), the
    changes before it are undone, and the script never runs. Any other local user is refused outright."""
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="nobody")
    marker = server.home / "ran-as"
    make_zip(file_server.root / "plain.zip", {"Plain@v1.0.0.so": SO_V1})
    make_zip(file_server.root / "scripted.zip", {"Scripted@v1.0.0.so": SO_V1,
                                                 "install.sh": f"#!/bin/sh\nid -u > {marker}\n"})
    document = json.dumps({"sinks": {"plain": {"file": file_server.url("plain.zip")},
                                     "scripted": {"file": file_server.url("scripted.zip")}}})

    status, answer = curl_one(f"{server.url}/config/plugins", "PUT", json_body=document)

    assert status == 403, answer
    body = json.loads(answer)
    assert body["failed"] == {"type": "sink", "name": "scripted", "action": "install"}
    assert body["message"].startswith("fail to install plugin: the package has an install.sh, which runs as this"
                                      f" service's user, and the caller is local user 'nobody' (uid {NOBODY})")
    assert [(c["action"], c["name"]) for c in body["rolledBack"]] == [("install", "plain")]
    assert not marker.exists()
    assert requests.get(f"{server.url}/config/plugins", timeout=10).json()["sinks"] == {}

    # www-data is not in basic.allowedUsers: neither its read nor its write is served
    for method, json_body in (("GET", None), ("PUT", document)):
        status, answer = curl_one(f"{server.url}/config/plugins", method, json_body=json_body, user="www-data")
        assert status == 403 and "local user 'www-data'" in answer, answer
    # root may apply it, and the script runs
    status, answer = curl_one(f"{server.url}/config/plugins", "PUT", json_body=document, user=None)
    assert status == 200, answer
    assert marker.read_text().strip() == "0"
