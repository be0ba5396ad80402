"""eKuiper's clients through the shipped front: every request to nginx's one port, live in the running engine.

A deployment beside eKuiper puts nginx with etc/nginx/ekuiper-front.conf where eKuiper's clients look for the
engine: the plugin and uploads APIs go to this service, the rest (streams, rules) to the engine. Here all
three are real and share one machine as they would in production: kuiperd on a free loopback port, the
service under gunicorn (several workers) on the engine's home with engine.url derived from the engine's own
kuiper.yaml, and nginx running the shipped front with only its listen port and its two upstream ports
rewritten. The tests speak only to the front's URL, as a client of eKuiper does; they look behind it only
to check what a user of the machine would (the engine's process and its plugins' processes, the files).

Each check of the engine is made once, right after the front's answer (no retry): a change must be live
when the client gets its 2xx. The engine's process is the same throughout, so a restart cannot pass for live.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from test_deploy import front_site, nginx  # noqa: F401  (the fixture: real nginx with a server block given)
from test_engine_live import create_stream, engine_process, rest_rule, rule_answer, wait_running
from test_engine_live_portable import (
    FLOW_TIMEOUT,
    GREETINGS,
    exited,
    greetings_after,
    plugin_pids,
    pygreet_zip,
    rule_refused,
)

pytestmark = pytest.mark.slow

DEMO = 'CREATE STREAM demo () WITH (TYPE="httppush", DATASOURCE="/demo", FORMAT="json")'
# an install or an update waits for the engine to start the plugin's process: well under nginx's 825 s
INSTALL_TIMEOUT = 180


@dataclass(frozen=True)
class Front:
    """eKuiper's address as its clients know it: nginx with the shipped front, the engine and the service behind."""

    url: str
    engine: object  # the Kuiperd behind it, for its process and its home only
    home: Path

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: dict) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=INSTALL_TIMEOUT)

    def put(self, path: str, body: dict) -> requests.Response:
        return requests.put(f"{self.url}{path}", json=body, timeout=INSTALL_TIMEOUT)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(f"{self.url}{path}", timeout=INSTALL_TIMEOUT)


@pytest.fixture
def front(start_kuiperd, start_gunicorn, nginx, tmp_path) -> Front:  # noqa: F811
    """kuiperd, the service under gunicorn on its home, and nginx with the shipped front pointed at both."""
    home = tmp_path / "home"  # start_gunicorn's home
    engine = start_kuiperd(home=home)
    server = start_gunicorn(workers=3)
    # the service found the engine as a deployment's does: in the engine's own kuiper.yaml on the shared home
    assert f"engine.url is {engine.url} (derived from the engine's restIp and restPort)" in server.log()
    url = nginx(None, site=front_site(engine.rest_port, server.port))
    return Front(url, engine, home)


def test_ekuipers_portable_flow_through_the_front_is_live(front, file_server, sink_server):
    # eKuiper's own fvt flow (fvt/portable_test.go): the stream first, a rule refused until the plugin is in
    pygreet_zip(file_server.root / "pygreet.zip")
    pygreet_zip(file_server.root / "shouting.zip", shouting=True)
    create_stream(front, GREETINGS)
    rule = rest_rule("greet", "SELECT greeting FROM greetings", sink_server.url("greetings"))
    refused = front.post("/rules", rule)
    assert refused.status_code == 400 and "source type greeting not found" in refused.text, refused.text
    before = engine_process(front.engine)

    created = front.post("/plugins/portables", {"name": "pygreet", "file": file_server.url("pygreet.zip")})
    assert created.status_code == 201, created.text
    # right after the answer, once: the engine takes the rule, whose records reach the sink
    accepted = front.post("/rules", rule)
    assert accepted.status_code == 201, accepted.text
    assert wait_running(front, "greet")["status"] == "running"
    out = sink_server.wait_for("greetings", 2, timeout=FLOW_TIMEOUT)
    assert len(out) >= 2 and all(body == {"greeting": "hello"} for body in out), f"{out}\n{front.engine.log()}"
    status = front.get("/plugins/portables/pygreet/status")
    assert status.status_code == 200, status.text
    assert status.json()["status"] == "running" and status.json()["refCount"] == {"greet": 1}, status.text
    described = front.get("/plugins/portables/pygreet").json()
    assert (described["version"], described["engine"]) == ("v1.0.0", "loaded"), described
    [old] = plugin_pids(front.engine)
    assert engine_process(front.engine) == before

    updated = front.put("/plugins/portables/pygreet", {"name": "pygreet", "file": file_server.url("shouting.zip")})
    assert updated.status_code == 200, updated.text
    # right after the answer: the old process is gone, a new one serves the running rule with the new code
    assert exited(old), f"the old plugin process {old} still runs"
    [new] = plugin_pids(front.engine)
    assert new != old
    count = len(sink_server.bodies("greetings"))
    later = greetings_after(sink_server, count, {"greeting": "HELLO"})
    assert later and later[-1] == {"greeting": "HELLO"}, f"{later}\n{front.engine.log()}"
    assert front.get("/rules/greet/status").json()["status"] == "running"
    described = front.get("/plugins/portables/pygreet").json()
    assert (described["version"], described["engine"]) == ("v1.0.1", "loaded"), described
    assert engine_process(front.engine) == before

    deleted = front.delete("/plugins/portables/pygreet")
    assert deleted.status_code == 200, deleted.text
    # right after the answer, once: a new rule over the plugin's source is refused, its process is gone
    again = rule_refused(front, "again", "SELECT greeting FROM greetings")
    assert again.status_code == 400 and "source type greeting not found" in again.text, again.text
    assert exited(new), f"the plugin process {new} still runs"
    assert plugin_pids(front.engine) == []
    assert front.get("/plugins/portables/pygreet").status_code == 404
    assert front.get("/plugins/portables").json() == []
    assert engine_process(front.engine) == before


def test_a_native_function_plugin_through_the_front_is_live(front, file_server, multi_plugin):
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    create_stream(front, DEMO)
    early = rule_answer(front, "early", "SELECT twice(a) FROM demo")
    assert early.status_code == 400 and "function twice not found" in early.text, early.text
    before = engine_process(front.engine)

    # installed with one of its two functions, as a client may
    created = front.post("/plugins/functions", {"name": "multi", "file": file_server.url("multi.zip"),
                                                "functions": ["twice"]})
    assert created.status_code == 201, created.text
    # right after the answer, once: a rule using it is accepted; the function not registered is unknown
    answer = rule_answer(front, "t", "SELECT twice(a) FROM demo")
    assert answer.status_code == 201, answer.text
    answer = rule_answer(front, "s", "SELECT shout(s) FROM demo")
    assert answer.status_code == 400 and "function shout not found" in answer.text, answer.text
    assert engine_process(front.engine) == before

    # a list naming a function the plugin does not export: a 2xx would promise rules the engine refuses
    refused = front.post("/plugins/functions/multi/register", {"functions": ["twice", "shout", "thrice"]})
    assert refused.status_code == 400, refused.text
    words = refused.json()["message"]
    assert words.startswith("function plugins multi regiser functions error: validate function thrice error: "), words
    assert words.endswith("the function list is unchanged)"), words
    assert front.get("/plugins/functions/multi").json()["functions"] == ["twice"]
    answer = rule_answer(front, "s", "SELECT shout(s) FROM demo")
    assert answer.status_code == 400 and "function shout not found" in answer.text, answer.text

    registered = front.post("/plugins/functions/multi/register", {"functions": ["twice", "shout"]})
    assert registered.status_code == 200, registered.text
    answer = rule_answer(front, "s", "SELECT shout(s) FROM demo")
    assert answer.status_code == 201, answer.text
    assert sorted(front.get("/plugins/udfs").json()) == ["shout", "twice"]
    described = front.get("/plugins/functions/multi").json()
    assert described == {"name": "multi", "version": "1.0.0", "functions": ["twice", "shout"],
                         "engine": "loaded"}, described
    assert engine_process(front.engine) == before

    deleted = front.delete("/plugins/functions/multi")
    assert deleted.status_code == 200, deleted.text
    answer = rule_answer(front, "t2", "SELECT twice(a) FROM demo")
    assert answer.status_code == 400 and "function twice not found" in answer.text, answer.text
    assert front.get("/plugins/functions/multi").status_code == 404
    assert front.get("/plugins/udfs").json() == []
    assert not (front.home / "plugins" / "functions" / multi_plugin.so_name).exists()
    assert engine_process(front.engine) == before


def test_uploads_through_the_front_install_live_from_data_uploads(front, file_server, multi_plugin, sink_server,
                                                                   tmp_path):
    uploads = front.home / "data" / "uploads"
    package = pygreet_zip(tmp_path / "pygreet.zip")
    shutil.copyfile(multi_plugin.zip_path, file_server.root / "multi.zip")
    create_stream(front, GREETINGS)
    create_stream(front, DEMO)
    before = engine_process(front.engine)

    # the two forms eKuiper's clients use: a multipart file, and a URL the server fetches (JSON {name, file})
    with open(package, "rb") as body:
        sent = requests.post(f"{front.url}/config/uploads", files={"uploadFile": ("pygreet.zip", body)},
                             timeout=INSTALL_TIMEOUT)
    assert sent.status_code == 201, sent.text
    assert sent.text == str(uploads / "pygreet.zip")
    fetched = front.post("/config/uploads", {"name": "multi.zip", "file": file_server.url("multi.zip")})
    assert fetched.status_code == 201, fetched.text
    assert fetched.text == str(uploads / "multi.zip")
    assert front.get("/config/uploads").json() == [str(uploads / "multi.zip"), str(uploads / "pygreet.zip")]

    created = front.post("/plugins/portables", {"name": "pygreet", "file": Path(sent.text).as_uri()})
    assert created.status_code == 201, created.text
    accepted = front.post("/rules", rest_rule("greet", "SELECT greeting FROM greetings",
                                              sink_server.url("greetings")))
    assert accepted.status_code == 201, accepted.text
    assert wait_running(front, "greet")["status"] == "running"
    out = sink_server.wait_for("greetings", 1, timeout=FLOW_TIMEOUT)
    assert out and all(body == {"greeting": "hello"} for body in out), f"{out}\n{front.engine.log()}"

    # pygreet has a function shout of its own: the native plugin brings its twice only
    created = front.post("/plugins/functions", {"name": "multi", "file": Path(fetched.text).as_uri(),
                                                "functions": ["twice"]})
    assert created.status_code == 201, created.text
    answer = rule_answer(front, "t", "SELECT twice(a) FROM demo")
    assert answer.status_code == 201, answer.text
    assert engine_process(front.engine) == before

    # the uploads are the client's, as sent; nothing else was left in data/uploads (no hand-over zip)
    assert sorted(path.name for path in uploads.iterdir()) == ["multi.zip", "pygreet.zip"]
    assert (uploads / "pygreet.zip").read_bytes() == package.read_bytes()
    assert (uploads / "multi.zip").read_bytes() == multi_plugin.zip_path.read_bytes()
    with zipfile.ZipFile(multi_plugin.zip_path) as native:
        assert (front.home / "plugins" / "functions" / multi_plugin.so_name).read_bytes() == native.read(
            multi_plugin.so_name)
