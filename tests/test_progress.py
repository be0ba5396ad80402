"""Progress of the server's work (issue 22, point 1), and install.sh's output in the log (point 5).

Every write request records its phases under its request id; `GET /operations/{id}` answers them while
the request runs (from another gunicorn worker) and for a while after. The CLI sends its own request id
and, on a terminal, draws one line per phase. install.sh's output reaches the log one prefixed line at a
time. Real parts: the test client over a real home, real gunicorn with two workers, a loopback file server
whose body is held back by an Event, the installed console script under a pseudo-terminal.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import threading
import time
import uuid
import zipfile
from pathlib import Path

import psutil
import requests
from conftest import make_zip
from test_cli import (
    CLI,
    Terminal,
    cli_env,
    server,  # noqa: F401  (the app served by werkzeug on a loopback port, for the CLI)
)
from test_peer_access import curl_one
from test_portable_handshake import FIXTURES, zip_folder

from kuiper_plugins.install import scripts
from kuiper_plugins.lifecycle import progress
from kuiper_plugins.store.progress import KEEP_SECONDS, MAX_ROWS, ProgressStore, Record, store_path

SO = b"\x7fELF fake shared object"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NATIVE_PHASES = ["download", "inspect", "unpack", "commit"]
# A line of the service's own log, as etc/gunicorn.conf.py formats it: what a script must not be able to write.
FORGED = "2024-05-01 12:00:00,000 [1] [INFO] kuiper_plugins.lifecycle.audit: audit: delete type=sinks name=influx"


def source_zip(path: Path, *, version: str = "v1.0.0", script: str | None = None, padding: int = 0) -> Path:
    members: dict[str, bytes | str] = {f"Random@{version}.so": SO + os.urandom(padding), "random.yaml": "a: 1\n"}
    if script is not None:
        members["install.sh"] = script
    return make_zip(path, members)


def unpacked_size(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist() if not info.is_dir())


def operation(client, request_id: str) -> dict:
    answer = client.get(f"/operations/{request_id}")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def names(answer: dict) -> list[str]:
    return [phase["phase"] for phase in answer["phases"]]


# ---------------------------------------------------------------------------- through the test client


def test_a_finished_install_answers_each_phase_with_its_bytes_and_seconds(service, file_server):
    package = source_zip(file_server.root / "random.zip", script="echo preparing\n", padding=300_000)
    answer = service.post("sources", {"name": "random", "file": file_server.url("random.zip")},
                          headers={"X-Request-Id": "deploy-7"})
    assert answer.status_code == 201, answer.get_data(as_text=True)

    shown = operation(service.client, "deploy-7")
    assert (shown["requestId"], shown["method"], shown["path"]) == ("deploy-7", "POST", "/plugins/sources")
    assert (shown["state"], shown["status"], shown["phase"]) == ("finished", 201, None)
    assert names(shown) == ["download", "inspect", "unpack", "install.sh", "commit"]
    download, inspect, unpack, script, commit = shown["phases"]
    assert download["bytes"] == download["totalBytes"] == package.stat().st_size
    assert unpack["bytes"] == unpack["totalBytes"] == unpacked_size(package)
    assert inspect["bytes"] is script["bytes"] is commit["bytes"] is None
    assert all(phase["done"] and 0 <= phase["seconds"] < 60 for phase in shown["phases"])
    assert shown["finishedAt"] >= shown["startedAt"]
    # The OpenAPI document's example has the shape of this real answer.
    documented = service.client.get("/openapi.json").get_json()["paths"]["/operations/{request_id}"]["get"]
    example = documented["responses"]["200"]["content"]["application/json"]["example"]
    assert set(example) == set(shown)
    assert all(set(phase) == set(shown["phases"][0]) for phase in example["phases"])


def test_a_refused_install_shows_where_it_stopped_and_changes_nothing(service, file_server):
    before = service.snapshot()
    answer = service.post("sources", {"name": "random", "file": file_server.url("missing.zip")},
                          headers={"X-Request-Id": "refused-1"})
    assert answer.status_code == 400
    service.assert_unchanged(before)  # the progress file is bookkeeping, as the audit rows are

    shown = operation(service.client, "refused-1")
    assert (shown["state"], shown["status"]) == ("finished", 400)
    assert names(shown) == ["download"]
    assert shown["phases"][0]["done"] and shown["phases"][0]["bytes"] is None


def test_a_delete_and_an_update_have_their_phases_too(service, file_server):
    source_zip(file_server.root / "v1.zip")
    assert service.post("sources", {"name": "random", "file": file_server.url("v1.zip")}).status_code == 201
    source_zip(file_server.root / "v2.zip", version="v2.0.0")
    answer = service.client.put("/plugins/sources/random", json={"name": "random", "file": file_server.url("v2.zip")},
                                headers={"X-Request-Id": "update-1"})
    assert answer.status_code == 200
    assert names(operation(service.client, "update-1")) == NATIVE_PHASES
    assert service.client.delete("/plugins/sources/random", headers={"X-Request-Id": "delete-1"}).status_code == 200
    deleted = operation(service.client, "delete-1")
    assert (deleted["method"], deleted["status"], names(deleted)) == ("DELETE", 200, ["commit"])


def test_a_portable_install_names_its_handshake(make_service, file_server):
    service = make_service(portable_verify_on_install=True, portable_init_timeout=2.0)
    descriptor = {"version": "v1", "language": "go", "executable": "silent.sh", "sinks": ["hush"]}
    zip_folder(FIXTURES / "silent", file_server.root / "silent.zip",
               {"silent.json": (json.dumps(descriptor).encode(), 0o644)})
    answer = service.post("portables", {"name": "silent", "file": file_server.url("silent.zip")},
                          headers={"X-Request-Id": "portable-1"})
    assert answer.status_code == 400  # it never shakes hands: refused at portable.initTimeout

    shown = operation(service.client, "portable-1")
    assert names(shown) == ["download", "inspect", "unpack", "handshake"]
    assert shown["phases"][-1]["seconds"] >= 2.0


def test_unknown_malformed_and_read_request_ids(service):
    missing = service.client.get("/operations/never-sent")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": 1002, "message": (
        f"operation never-sent is not found (no write request with this X-Request-Id has begun, or it ended more"
        f" than {KEEP_SECONDS} s ago)")}
    malformed = service.client.get("/operations/a%20b")
    assert malformed.status_code == 400
    assert malformed.get_json()["message"].startswith("invalid request id 'a b' (a request id is 1 to 128 ")
    assert service.client.get("/operations/" + "x" * 129).status_code == 400
    # Reads record nothing: only writes have phases to tell.
    assert service.client.get("/plugins/sources", headers={"X-Request-Id": "a-read"}).status_code == 200
    assert service.client.get("/operations/a-read").status_code == 404


def test_a_progress_file_that_cannot_be_written_never_fails_the_install(service, file_server, caplog):
    store_path(service.layout.work).mkdir()  # a folder where the file should be: SQLite cannot open it
    source_zip(file_server.root / "random.zip")
    with caplog.at_level(logging.WARNING, logger="kuiper_plugins.lifecycle.progress"):
        answer = service.post("sources", {"name": "random", "file": file_server.url("random.zip")},
                              headers={"X-Request-Id": "no-file"})
    assert answer.status_code == 201, answer.get_data(as_text=True)
    assert service.client.get("/plugins/sources").get_json() == ["random"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "kuiper_plugins.lifecycle.progress"]
    assert len(warnings) == 1, warnings  # once for the request, however many writes it tried
    assert warnings[0].startswith("progress of request no-file cannot be recorded in ")
    unavailable = service.client.get("/operations/no-file")
    assert unavailable.status_code == 503
    assert unavailable.get_json()["message"].startswith("progress unavailable: ")


# ---------------------------------------------------------------------------- the store and the tracker


def test_rows_answer_for_a_while_after_their_request_then_go(tmp_path):
    store = ProgressStore(tmp_path / "progress.db")
    now = time.time()
    for number in range(MAX_ROWS + 5):
        store.begin(Record(f"r{number}", "POST", "/plugins/sources", os.getpid(), now + number * 0.001,
                           now, None, None, []))
    conn = sqlite3.connect(tmp_path / "progress.db")
    assert conn.execute("SELECT count(*) FROM progress").fetchone()[0] == MAX_ROWS  # the newest kept
    assert store.find("r0") is None and store.find(f"r{MAX_ROWS + 4}") is not None

    store.update("r10", [], finished_at=now - 60, status=201)
    store.update("r11", [], finished_at=now - KEEP_SECONDS - 1, status=201)
    assert store.find("r10").status == 201
    assert store.find("r11") is None  # past its time: no longer answered...
    store.begin(Record("next", "POST", "/plugins/sinks", os.getpid(), now, now, None, None, []))
    assert conn.execute("SELECT count(*) FROM progress WHERE request_id = 'r11'").fetchone()[0] == 0  # ...and gone
    conn.close()
    store.close()


class CountingStore(ProgressStore):
    """The real store, counting its updates."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.updates = 0

    def update(self, *args, **kwargs) -> None:
        self.updates += 1
        super().update(*args, **kwargs)


def test_bytes_are_written_at_most_every_quarter_second_and_the_last_ones_soon_after(tmp_path):
    store = CountingStore(tmp_path / "progress.db")
    tracker = progress.Tracker(store, "throttled", "POST", "/plugins/sources")
    tracker.begin()
    started = time.monotonic()
    tracker.phase("download", 100_000)
    for _ in range(100_000):
        tracker.advance(1)
    elapsed = time.monotonic() - started
    # One write for the phase, then one per UPDATE_EVERY at most (the flusher's included), however many calls.
    assert store.updates <= 2 + elapsed / progress.UPDATE_EVERY, (store.updates, elapsed)

    # The bytes counted after the last write are written by the flusher within UPDATE_EVERY: poll for it,
    # bounded (this thread makes no more calls, so only the flusher can write them).
    deadline = time.monotonic() + 10
    while store.find("throttled").phases[-1]["bytes"] != 100_000:
        assert time.monotonic() < deadline, store.find("throttled")
        time.sleep(0.05)
    store.close()


# ---------------------------------------------------------------------------- install.sh's output in the log


def test_install_sh_output_is_logged_line_by_line_with_its_plugin_and_request_id(service, file_server, caplog):
    script = f"echo preparing\necho '{FORGED}'\nprintf 'no newline at the end'\n"
    source_zip(file_server.root / "random.zip", script=script)
    with caplog.at_level(logging.INFO, logger="kuiper_plugins.install.scripts"):
        answer = service.post("sources", {"name": "random", "file": file_server.url("random.zip")},
                              headers={"X-Request-Id": "logged-1"})
    assert answer.status_code == 201
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("install.sh ")]
    prefix = "install.sh plugin=sources/random request_id=logged-1 | "
    assert lines == [prefix + "preparing", prefix + FORGED, prefix + "no newline at the end"]
    assert not any(r.getMessage().startswith(FORGED[:23]) or f"\n{FORGED[:23]}" in r.getMessage()
                   for r in caplog.records)


def test_install_sh_output_in_the_log_keeps_its_bound(tmp_path, caplog):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "install.sh").write_text(
        "i=0\nwhile [ $i -lt 5000 ]; do echo \"line $i\"; i=$((i+1)); done\n"
        "head -c 5000 /dev/zero | tr '\\0' x\necho\necho last-line\n")
    with caplog.at_level(logging.INFO, logger="kuiper_plugins.install.scripts"):
        scripts.run_install_script(workdir / "install.sh", [], cwd=workdir, timeout=30, marker=uuid.uuid4().hex,
                                   plugin="sinks/chatty")
    prefix = "install.sh plugin=sinks/chatty request_id=- | "
    lines = [r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix)]
    output = [line for line in lines if not line.endswith(" line(s) not logged)")]
    assert len(output) <= scripts.LOG_LINES
    assert sum(len(line) for line in output) <= scripts.LOG_CHARS
    assert output[:2] == ["line 0", "line 1"]  # the start, as it came
    assert output[-2:] == ["x" * scripts.LOG_LINE_CHARS + "...", "last-line"]  # the end, once it had ended
    assert any(re.fullmatch(r"\(\d+ line\(s\) not logged\)", line) for line in lines)


# ---------------------------------------------------------------------------- real gunicorn, two workers


class HeldBack:
    """A package the file server sends half of, then holds back until `release` is set (bounded wait)."""

    def __init__(self, file_server, name: str = "held.zip"):
        self.package = source_zip(file_server.root / "random.zip", padding=400_000).read_bytes()
        self.half = len(self.package) // 2
        self.release = threading.Event()
        self.url = file_server.url(name)
        file_server.routes[f"/{name}"] = self._send

    def _send(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(self.package)))
        handler.end_headers()
        handler.wfile.write(self.package[:self.half])
        handler.wfile.flush()
        self.release.wait(60)  # bounded: each test sets it as soon as it has seen the half, and in `finally`
        handler.wfile.write(self.package[self.half:])


def post_in_background(url: str, body: dict, request_id: str) -> tuple[threading.Thread, list]:
    """Send a write from a thread; its answer (or the exception it met) lands in the list."""
    answers: list = []

    def send() -> None:
        try:
            answers.append(requests.post(url, json=body, headers={"X-Request-Id": request_id}, timeout=120))
        except requests.RequestException as exc:
            answers.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answers


def poll_operation(url: str, done, timeout: float = 30) -> dict:
    """Ask GET /operations until `done(answer)` holds; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = requests.get(url, timeout=10)
        shown = answer.json()
        if answer.status_code == 200 and done(shown):
            return shown
        assert time.monotonic() < deadline, (answer.status_code, shown)
        time.sleep(0.05)


def test_another_worker_answers_the_progress_of_an_install_in_flight(start_gunicorn, file_server):
    held = HeldBack(file_server)
    live = start_gunicorn(workers=2)
    poster, answers = post_in_background(f"{live.url}/plugins/sources", {"name": "random", "file": held.url},
                                         "in-flight-1")
    try:
        # The file server has sent exactly `half` bytes and waits for `release`: the service can count no more.
        # Poll (bounded) until its count is written; the flusher writes it within UPDATE_EVERY of its arrival.
        shown = poll_operation(f"{live.url}/operations/in-flight-1",
                               lambda shown: shown["phases"] and shown["phases"][-1]["bytes"] == held.half)
        # A sync worker serves one request at a time: the install still holds its own, so another one answered.
        assert poster.is_alive() and not answers
        assert (shown["state"], shown["status"], shown["phase"]) == ("running", None, "download")
        assert (shown["method"], shown["path"]) == ("POST", "/plugins/sources")
        (download,) = shown["phases"]
        assert (download["totalBytes"], download["done"]) == (len(held.package), False)
    finally:
        held.release.set()
        poster.join(120)
    assert answers[0].status_code == 201, answers[0].text

    finished = requests.get(f"{live.url}/operations/in-flight-1", timeout=10).json()
    assert (finished["state"], finished["status"], names(finished)) == ("finished", 201, NATIVE_PHASES)
    assert finished["phases"][0]["bytes"] == finished["phases"][0]["totalBytes"] == len(held.package)


def test_a_request_whose_worker_is_killed_shows_as_interrupted(start_gunicorn, file_server):
    held = HeldBack(file_server)
    live = start_gunicorn(workers=2)
    poster, answers = post_in_background(f"{live.url}/plugins/sources", {"name": "random", "file": held.url},
                                         "killed-1")
    try:
        poll_operation(f"{live.url}/operations/killed-1",
                       lambda shown: shown["phases"] and shown["phases"][-1]["bytes"] == held.half)
        # The worker serving the install is the one connected to the file server.
        serving = [worker for worker in psutil.Process(live.process.pid).children()
                   if any(conn.raddr and conn.raddr.port == file_server.port
                          for conn in worker.net_connections(kind="tcp"))]
        assert len(serving) == 1
        serving[0].kill()
        # The master reaps it at once; until then its pid still answers: poll, bounded.
        shown = poll_operation(f"{live.url}/operations/killed-1", lambda shown: shown["state"] != "running")
    finally:
        held.release.set()
        poster.join(120)
    assert (shown["state"], shown["status"], shown["phase"], shown["finishedAt"]) == ("interrupted", None, None, None)
    (download,) = shown["phases"]
    assert (download["bytes"], download["totalBytes"], download["done"]) == (held.half, len(held.package), True)
    assert isinstance(answers[0], requests.ConnectionError)  # the client saw its connection drop


def test_install_sh_lines_in_the_service_log_are_prefixed_and_cannot_pass_for_its_own(start_gunicorn, file_server):
    source_zip(file_server.root / "random.zip", script=f"echo preparing\necho '{FORGED}'\n")
    live = start_gunicorn(workers=2)
    answer = requests.post(f"{live.url}/plugins/sources", json={"name": "random", "file": file_server.url(
        "random.zip")}, headers={"X-Request-Id": "forge-1"}, timeout=60)
    assert answer.status_code == 201, answer.text
    log = live.log_path.read_text(errors="replace").splitlines()
    assert any(line.endswith("install.sh plugin=sources/random request_id=forge-1 | preparing") for line in log)
    assert any(line.endswith(f"install.sh plugin=sources/random request_id=forge-1 | {FORGED}") for line in log)
    assert not [line for line in log if line.startswith(FORGED[:23])]


def test_operations_are_guarded_as_the_audit_is(start_gunicorn, file_server):
    source_zip(file_server.root / "random.zip")
    live = start_gunicorn(workers=2)
    body = json.dumps({"name": "random", "file": file_server.url("random.zip")})
    refused = curl_one(f"{live.url}/plugins/sources", "POST", json_body=body, headers=("X-Request-Id: nobody-1",))
    assert refused[0] == 403
    answer = requests.post(f"{live.url}/plugins/sources", data=body, timeout=60,
                           headers={"Content-Type": "application/json", "X-Request-Id": "root-1"})
    assert answer.status_code == 201

    assert requests.get(f"{live.url}/operations/root-1", timeout=10).json()["status"] == 201
    # A caller refused by the access check left no progress (nor could it make the service write any).
    assert requests.get(f"{live.url}/operations/nobody-1", timeout=10).status_code == 404
    as_nobody = curl_one(f"{live.url}/operations/root-1")
    assert as_nobody == curl_one(f"{live.url}/audit")  # refused in the same words as the audit trail
    assert as_nobody[0] == 403 and "local user 'nobody'" in json.loads(as_nobody[1])["message"]


# ---------------------------------------------------------------------------- the CLI


def final_lines(shown: bytes) -> list[str]:
    """The lines of a terminal as they were left: each line's text after its last carriage return."""
    text = shown.replace(b"\r\n", b"\n").decode(errors="replace")  # the terminal turns "\n" into "\r\n"
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n") if line.strip()]


def test_the_cli_draws_the_servers_phases_on_a_terminal(start_gunicorn, file_server, tmp_path):
    go = tmp_path / "go"
    waiting = f"echo waiting\ni=0\nwhile [ ! -e '{go}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
    source_zip(file_server.root / "random.zip", script=waiting, padding=2_000_000)
    live = start_gunicorn(workers=2)

    create = Terminal(["create", "source", "random", "--file", file_server.url("random.zip")], live.url)
    try:
        # install.sh waits for `go`: the CLI, asking from its second connection, draws that phase as it runs.
        drawn = create.read_until(b"\rinstall.sh")
        assert b"\rdownload" in drawn
    finally:
        go.touch()
    status, out, shown = create.finish()
    assert (status, out) == (0, b"sources plugin random is created\n"), shown
    lines = final_lines(shown)
    assert [line.split()[0] for line in lines] == ["download", "inspect", "unpack", "install.sh", "commit"], lines
    download = lines[0]
    # 2 MB over the loopback take milliseconds: the seconds are above 0 and the rate is shown.
    assert re.fullmatch(r"download\s+\d+\.\d MiB / \d+\.\d MiB  \d+\.\d [KMG]iB/s  \d+\.\d s", download), download
    assert re.fullmatch(r"install\.sh\s+\d+\.\d s", lines[3]), lines[3]

    # An update from a local zip: the upload's bar, then the server's phases.
    local = source_zip(tmp_path / "random-v2.zip", version="v2.0.0")
    update = Terminal(["update", "source", "random", "--zip", str(local)], live.url)
    status, out, shown = update.finish()
    assert (status, out) == (0, b"plugin random is updated and eKuiper must restart for the change to take effect.\n")
    lines = final_lines(shown)
    assert lines[0].startswith("uploading random-v2.zip [") and "100%" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == NATIVE_PHASES, lines


def test_the_cli_sends_its_own_request_id_and_draws_nothing_off_a_terminal_or_with_json(server, file_server):  # noqa: F811
    source_zip(file_server.root / "random.zip")
    source_zip(file_server.root / "random2.zip", version="v2.0.0")
    piped = subprocess.run([str(CLI), "create", "source", "random", "--file", file_server.url("random.zip")],
                           env=cli_env(server.url), capture_output=True, text=True, timeout=60)
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, "sources plugin random is created\n", "")
    with_json = Terminal(["--json", "update", "source", "random", "--file", file_server.url("random2.zip")],
                         server.url)
    status, out, shown = with_json.finish()
    assert (status, shown) == (0, b"")
    assert json.loads(out)["message"].startswith("plugin random is updated")

    rows = requests.get(f"{server.url}/audit", timeout=10).json()
    sent = [row["requestId"] for row in rows[:2]]
    assert all(UUID4.fullmatch(request_id) for request_id in sent), sent  # the CLI's own, a uuid4 each
    for request_id, status_code in zip(sent, (200, 201), strict=True):
        shown_operation = requests.get(f"{server.url}/operations/{request_id}", timeout=10).json()
        assert (shown_operation["state"], shown_operation["status"]) == ("finished", status_code)
        assert names(shown_operation) == NATIVE_PHASES
