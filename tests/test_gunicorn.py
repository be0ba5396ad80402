"""End to end: the real gunicorn with several workers, a temp home, real HTTP clients."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests
from conftest import GUNICORN, REPO, make_zip, registry_dump

pytestmark = pytest.mark.slow

def served_source(file_server, name="random") -> str:
    make_zip(file_server.root / f"{name}.zip", {f"{name.capitalize()}@v1.0.0.so": b"so", f"{name}.yaml": "a: 1\n"})
    return file_server.url(f"{name}.zip")


def test_create_list_describe_delete_across_workers(start_gunicorn, file_server):
    server = start_gunicorn(workers=3)
    session = requests.Session()
    created = session.post(f"{server.url}/plugins/sources", json={"name": "random", "file": served_source(file_server)})
    assert created.status_code == 201, created.text
    # Fresh connections spread over the workers; every one must see the plugin at once.
    for _ in range(12):
        assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == ["random"]
        described = requests.get(f"{server.url}/plugins/sources/random", timeout=10)
        assert described.json() == {"name": "random", "version": "1.0.0"}
    assert requests.delete(f"{server.url}/plugins/sources/random", timeout=10).status_code == 200
    for _ in range(12):
        assert requests.get(f"{server.url}/plugins/sources", timeout=10).json() == []
        assert requests.get(f"{server.url}/plugins/sources/random", timeout=10).status_code == 404


def test_restart_keeps_the_registry_and_files(start_gunicorn, file_server, tmp_path):
    server = start_gunicorn()
    url = served_source(file_server)
    assert requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": url}).status_code == 201
    so = tmp_path / "home/plugins/sources/Random@v1.0.0.so"
    content = so.read_bytes()
    server.stop()
    dump = registry_dump(tmp_path / "home")
    again = start_gunicorn()
    assert requests.get(f"{again.url}/plugins/sources").json() == ["random"]
    assert so.read_bytes() == content
    assert registry_dump(tmp_path / "home") == dump


def test_delete_with_stop_ends_the_service(start_gunicorn, file_server):
    server = start_gunicorn()
    url = served_source(file_server)
    assert requests.post(f"{server.url}/plugins/sources", json={"name": "random", "file": url}).status_code == 201
    response = requests.delete(f"{server.url}/plugins/sources/random?stop=1", timeout=10)
    assert response.status_code == 200
    assert response.text == ("sources plugin random is deleted and kuiper-plugins will be stopped (this service, not"
                             " the engine: engine.restartCommand is not set, so the engine keeps running and takes"
                             " the change at its next start; a supervisor such as systemd starts kuiper-plugins"
                             " again)")
    assert server.process.wait(timeout=30) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/ping", timeout=2)


def test_bad_setting_stops_start_up_naming_the_key(tmp_path):
    env = {**os.environ, "KUIPER_HOME": str(tmp_path / "home"), "KUIPER_PLUGINS__BASIC__RESTPORT": "not-a-port"}
    result = subprocess.run(
        [str(GUNICORN), "-c", "etc/gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "KUIPER_PLUGINS__BASIC__RESTPORT" in result.stderr


def test_a_worker_gives_back_the_memory_malloc_holds_free():
    """`release_free_memory` (run after each write and before the workers are forked) returns what glibc keeps.

    In a process of its own: 100 MB of blocks too big for Python's small-object allocator come from malloc and
    are freed, one block allocated after them keeping the heap's top in use, so free() alone shrinks nothing.
    """
    code = (
        "import os\n"
        "from kuiper_plugins.web.gunicorn_hooks import release_free_memory\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "blocks = [bytes(2048) for _ in range(50000)]\n"
        "last = bytes(2048)\n"
        "del blocks\n"
        "before = rss()\n"
        "release_free_memory()\n"
        "print(before, rss())\n"
    )
    done = subprocess.run([GUNICORN.parent / "python", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO, check=True)
    before, after = map(int, done.stdout.split())
    assert before - after > 64 * 1024 * 1024, (before, after)
