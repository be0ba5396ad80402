"""The audit trail and request ids: who changed what, refused requests included (issue 19, point 5).

Through the test client (its requests come from a real loopback connection of this test's user, root),
through real gunicorn (its log lines and access log carry the request id), and behind the shipped nginx
(the address it passes is believed from its worker user only).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import sqlite3

import pytest
import requests
from conftest import audit_rows, make_zip
from test_auth import ISSUER, public_pem, sign
from test_deploy import nginx  # noqa: F401  (the real nginx with the shipped server block)

from kuiper_plugins.layout import Layout

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def _zip(file_server, name: str, version: str) -> tuple[str, str]:
    """A native source package of `version` on the file server: its URL and its sha256."""
    path = make_zip(file_server.root / f"{name}-{version}.zip",
                    {f"{name.capitalize()}@v{version}.so": f"so {version}".encode(), f"{name}.yaml": "a: 1\n"})
    return file_server.url(path.name), hashlib.sha256(path.read_bytes()).hexdigest()


def _audit(client, query: str = "") -> list[dict]:
    answer = client.get(f"/audit{query}")
    assert answer.status_code == 200, answer.text
    return answer.get_json()


# ---------------------------------------------------------------------------- through the test client


def test_the_audit_rows_of_a_refused_install(service, file_server):
    before = service.snapshot()
    url = file_server.url("missing.zip")  # the server answers 404: the download fails
    answer = service.post("sources", {"name": "random", "file": url}, headers={"X-Request-Id": "deploy-42"})
    assert answer.status_code == 400
    assert answer.headers["X-Request-Id"] == "deploy-42"
    service.assert_unchanged(before)  # files, plugin rows and eKuiper's store: only the audit row was added

    (row,) = _audit(service.client)
    assert row["requestId"] == "deploy-42"
    assert (row["operation"], row["method"], row["path"]) == ("create", "POST", "/plugins/sources")
    assert (row["type"], row["name"], row["url"]) == ("sources", "random", url)
    assert (row["versionBefore"], row["versionAfter"], row["sha256"]) == (None, None, None)
    assert (row["status"], row["outcome"]) == (400, "refused")
    assert row["message"] == answer.get_json()["message"]
    assert row["actor"] == {"user": "root", "address": "127.0.0.1"}
    assert 0 <= row["durationSeconds"] < 60
    assert [r["request_id"] for r in audit_rows(service.home)] == ["deploy-42"]


def test_install_update_delete_are_audited_newest_first_with_versions_and_packages(service, file_server):
    url1, sha1 = _zip(file_server, "random", "1.0.0")
    url2, sha2 = _zip(file_server, "random", "2.0.0")
    assert service.post("sources", {"name": "random", "file": url1}).status_code == 201
    assert service.client.put("/plugins/sources/random", json={"file": url2}).status_code == 200
    duplicate = service.post("sources", {"name": "random", "file": url1})
    assert duplicate.status_code == 400
    assert service.client.delete("/plugins/sources/random").status_code == 200

    rows = _audit(service.client)
    summary = [(r["operation"], r["status"], r["outcome"], r["versionBefore"], r["versionAfter"], r["sha256"],
                r["url"]) for r in rows]
    assert summary == [
        ("delete", 200, "ok", "2.0.0", None, sha2, url2),
        ("create", 400, "refused", "2.0.0", "2.0.0", None, url1),  # refused: nothing changed
        ("update", 200, "ok", "1.0.0", "2.0.0", sha2, url2),
        ("create", 201, "ok", None, "1.0.0", sha1, url1),
    ]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    ids = {r["requestId"] for r in rows}
    assert len(ids) == 4 and all(GENERATED_ID.fullmatch(i) for i in ids)


def test_dry_runs_rollbacks_and_repairs_are_audited_by_their_names(service, file_server):
    url1, _ = _zip(file_server, "random", "1.0.0")
    url2, _ = _zip(file_server, "random", "2.0.0")
    assert service.client.post("/plugins/sources?dryRun=1", json={"name": "random", "file": url1}).status_code == 200
    assert service.post("sources", {"name": "random", "file": url1}).status_code == 201
    assert service.client.put("/plugins/sources/random", json={"file": url2}).status_code == 200
    assert service.client.post("/plugins/sources/random/rollback").status_code == 200
    assert service.client.post("/registry/repair").status_code == 200
    summary = [(r["operation"], r["versionBefore"], r["versionAfter"]) for r in _audit(service.client)]
    assert summary == [("repair", None, None), ("rollback", "2.0.0", "1.0.0"), ("update", "1.0.0", "2.0.0"),
                       ("create", None, "1.0.0"), ("create (dry run)", None, None)]


@pytest.mark.parametrize("given", ["a b", "x" * 129, "caf\u00e9", "", "id;drop", "quo\"te", "tab\tbed"])
def test_an_insane_request_id_is_replaced_by_a_generated_one(service, given):
    answer = service.client.delete("/plugins/sources/nothere", headers={"X-Request-Id": given})
    assert answer.status_code == 404
    echoed = answer.headers["X-Request-Id"]
    assert GENERATED_ID.fullmatch(echoed), echoed
    assert [r["requestId"] for r in _audit(service.client)] == [echoed]


@pytest.mark.parametrize("given", ["deploy-42", "a" * 128, "Tr4ce.id_x~1|2"])
def test_a_sane_request_id_is_kept_and_echoed_by_reads_too(service, given):
    assert service.client.get("/plugins/sources", headers={"X-Request-Id": given}).headers["X-Request-Id"] == given
    assert _audit(service.client) == []  # reads are not audited


@pytest.mark.parametrize("query", [
    "?limit=0", "?limit=1001", "?limit=ten", "?limit=", "?since=yesterday", "?since=2024-01-01T00:00:00",
    "?order=asc", "?limit=1&limit=2",
])
def test_bad_audit_queries_are_a_400_in_the_envelope(service, query):
    answer = service.client.get(f"/audit{query}")
    assert answer.status_code == 400
    assert answer.mimetype == "application/json"
    body = answer.get_json()
    assert body["error"] == 1000 and body["message"].startswith("invalid audit query: "), body


def test_limit_and_since_choose_the_rows(service):
    for name in ("one", "two", "three"):
        assert service.client.delete(f"/plugins/sinks/{name}").status_code == 404
    rows = _audit(service.client)
    assert [r["name"] for r in rows] == ["three", "two", "one"]
    assert [r["name"] for r in _audit(service.client, "?limit=2")] == ["three", "two"]
    # A row's own time, given back as since, includes that row (times are cut to the millisecond, never rounded up).
    since = rows[1]["time"]
    assert [r["name"] for r in _audit(service.client, f"?since={since}")] == ["three", "two"]
    assert _audit(service.client, "?since=2999-01-01T00:00:00%2B00:00") == []


def test_retention_keeps_the_newest_rows(make_service):
    service = make_service(audit_retention=2)
    for name in ("one", "two", "three"):
        service.client.delete(f"/plugins/sinks/{name}")
    assert [r["name"] for r in audit_rows(service.home)] == ["two", "three"]
    assert [r["name"] for r in _audit(service.client)] == ["three", "two"]


def test_retention_zero_keeps_no_rows_but_still_gives_request_ids(make_service):
    service = make_service(audit_retention=0)
    answer = service.client.delete("/plugins/sinks/one", headers={"X-Request-Id": "r0"})
    assert answer.headers["X-Request-Id"] == "r0"
    assert audit_rows(service.home) == [] and _audit(service.client) == []


def test_audit_rows_cannot_be_changed(service):
    service.client.delete("/plugins/sinks/one")
    conn = sqlite3.connect(Layout(service.home).registry_file)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="audit rows cannot be changed"):
            conn.execute("UPDATE audit SET status = 200")
    finally:
        conn.close()
    assert [r["status"] for r in audit_rows(service.home)] == [404]


def test_the_actor_is_the_tokens_issuer_and_subject_and_a_missing_token_is_audited(make_service, file_server):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    service = make_service(authentication=True)
    (service.layout.mgmt_keys / ISSUER).write_bytes(public_pem(key))
    url, sha = _zip(file_server, "random", "1.0.0")
    token = {"Authorization": f"Bearer {sign(key)}", "X-Request-Id": "with-token"}
    assert service.post("sources", {"name": "random", "file": url}, headers=token).status_code == 201
    refused = service.client.delete("/plugins/sources/random", headers={"X-Request-Id": "no-token"})
    assert refused.status_code == 401
    assert refused.headers["X-Request-Id"] == "no-token"

    listed = service.client.get("/audit", headers={"Authorization": f"Bearer {sign(key)}"}).get_json()
    rows = {r["requestId"]: r for r in listed}
    assert rows["with-token"]["actor"] == {"iss": ISSUER, "sub": "tester", "address": "127.0.0.1"}
    assert rows["with-token"]["sha256"] == sha
    # Without a token, who sent it is what the kernel says of the connection.
    assert rows["no-token"]["actor"] == {"user": "root", "address": "127.0.0.1"}
    assert (rows["no-token"]["status"], rows["no-token"]["outcome"]) == (401, "refused")
    assert rows["no-token"]["versionBefore"] == rows["no-token"]["versionAfter"] == "1.0.0"
    assert service.client.get("/audit").status_code == 401  # the trail is guarded like the rest


def test_x_real_ip_is_believed_only_from_a_proxy_user(make_service):
    # The test client's connection is root's: root is not a proxy by default (basic.proxyUsers: www-data).
    service = make_service()
    service.client.delete("/plugins/sinks/one", headers={"X-Real-IP": "198.51.100.7"})
    assert _audit(service.client)[0]["actor"] == {"user": "root", "address": "127.0.0.1"}

    trusting = make_service(proxy_users=("root",))
    trusting.client.delete("/plugins/sinks/two", headers={"X-Real-IP": "198.51.100.7"})
    trusting.client.delete("/plugins/sinks/three", headers={"X-Real-IP": "not-an-address"})
    rows = {r["name"]: r["actor"] for r in _audit(trusting.client)}
    assert rows["two"] == {"address": "198.51.100.7", "proxy": "root"}
    assert rows["three"] == {"user": "root", "address": "127.0.0.1"}


def test_the_openapi_example_of_audit_works_as_it_is(service):
    document = service.client.get("/openapi.json").get_json()
    operation = document["paths"]["/audit"]["get"]
    query = "&".join(f"{p['name']}={p['example']}" for p in operation["parameters"])
    service.client.delete("/plugins/sinks/one")
    rows = _audit(service.client, f"?{query}")
    assert [r["name"] for r in rows] == ["one"]
    example = operation["responses"]["200"]["content"]["application/json"]["schema"]["example"][0]
    assert set(example) == set(rows[0])
    assert set(example["actor"]) <= {"iss", "sub", "user", "address", "proxy"}


# ---------------------------------------------------------------------------- real gunicorn


@pytest.mark.slow
def test_through_gunicorn_every_log_line_of_a_request_carries_its_id(start_gunicorn, file_server):
    server = start_gunicorn(workers=2)
    url, sha = _zip(file_server, "random", "1.0.0")
    base = f"http://127.0.0.1:{server.port}"
    created = requests.post(f"{base}/plugins/sources", json={"name": "random", "file": url},
                            headers={"X-Request-Id": "gunicorn-ok-1"}, timeout=30)
    assert created.status_code == 201, created.text
    assert created.headers["X-Request-Id"] == "gunicorn-ok-1"
    refused = requests.post(f"{base}/plugins/sources", json={"name": "random", "file": file_server.url("no.zip")},
                            headers={"X-Request-Id": "gunicorn-refused-1"}, timeout=30)
    assert refused.status_code == 400 and refused.headers["X-Request-Id"] == "gunicorn-refused-1"
    rows = requests.get(f"{base}/audit", timeout=10).json()  # either worker: both write to one registry
    assert [(r["requestId"], r["outcome"], r["sha256"]) for r in rows] == [
        ("gunicorn-refused-1", "refused", None), ("gunicorn-ok-1", "ok", sha)]
    server.stop()  # the log is whole once the workers have exited

    log = server.log()
    ours = [line for line in log.splitlines() if "gunicorn-ok-1" in line]
    # The installer's own line, the audit line, and gunicorn's access line: each names the request.
    assert any("plugin install: type=sources name=random" in line and line.endswith("request_id=gunicorn-ok-1")
               for line in ours), ours
    assert any("audit: create type=sources name=random version=-->1.0.0" in line for line in ours), ours
    assert any('"POST /plugins/sources HTTP/1.1" 201' in line and line.endswith("request_id=gunicorn-ok-1")
               for line in ours), ours
    assert any("outcome=refused" in line and "request_id=gunicorn-refused-1" in line for line in log.splitlines())


# ---------------------------------------------------------------------------- behind the shipped nginx


def _delete_from(port: int, path: str, source: str, headers: dict[str, str]) -> tuple[int, str]:
    """A DELETE sent from a chosen loopback source address."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request("DELETE", path, headers={"Host": "127.0.0.1", **headers})
        answer = conn.getresponse()
        return answer.status, answer.getheader("X-Request-Id") or ""
    finally:
        conn.close()


@pytest.mark.slow
def test_behind_nginx_the_address_it_passes_is_believed_from_its_worker_user_only(
        start_gunicorn, nginx):  # noqa: F811
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="www-data")
    front = int(nginx(server.port, user="www-data www-data").rsplit(":", 1)[1])
    # Through nginx, from 127.0.0.2, claiming another address: nginx replaces X-Real-IP with the one it saw.
    status, _ = _delete_from(front, "/plugins/sinks/via-front", "127.0.0.2",
                             {"X-Real-IP": "198.51.100.7", "X-Request-Id": "via-front"})
    assert status == 404
    # Straight to gunicorn as root, claiming the same: root is not the front, the header is ignored.
    status, _ = _delete_from(server.port, "/plugins/sinks/direct", "127.0.0.2",
                             {"X-Real-IP": "198.51.100.7", "X-Request-Id": "direct"})
    assert status == 404
    rows = {r["requestId"]: r["actor"] for r in requests.get(f"http://127.0.0.1:{server.port}/audit",
                                                               timeout=10).json()}
    assert rows["via-front"] == {"address": "127.0.0.2", "proxy": "www-data"}
    assert rows["direct"] == {"user": "root", "address": "127.0.0.2"}
    server.stop()

    # With no proxy users, nginx's connections are just www-data's: its header is not believed either.
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="www-data",
                            KUIPER_PLUGINS__BASIC__PROXYUSERS="")
    front = int(nginx(server.port, user="www-data www-data").rsplit(":", 1)[1])
    status, _ = _delete_from(front, "/plugins/sinks/untrusted", "127.0.0.2", {"X-Request-Id": "untrusted"})
    assert status == 404
    rows = {r["requestId"]: r["actor"] for r in requests.get(f"http://127.0.0.1:{server.port}/audit",
                                                               timeout=10).json()}
    assert rows["untrusted"] == {"user": "www-data", "address": "127.0.0.1"}
    server.stop()
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------- settings


def test_audit_settings_are_read_and_checked(tmp_path):
    from kuiper_plugins.settings import SettingsError, load_settings

    home = {"KUIPER_HOME": str(tmp_path)}
    shipped = load_settings(home)
    assert (shipped.audit_retention, shipped.proxy_users) == (10000, ("www-data",))
    chosen = load_settings({**home, "KUIPER_PLUGINS__BASIC__AUDITRETENTION": "5",
                            "KUIPER_PLUGINS__BASIC__PROXYUSERS": ""})
    assert (chosen.audit_retention, chosen.proxy_uids) == (5, frozenset())
    with pytest.raises(SettingsError, match="AUDITRETENTION: expected at least 0"):
        load_settings({**home, "KUIPER_PLUGINS__BASIC__AUDITRETENTION": "-1"})
    with pytest.raises(SettingsError, match="PROXYUSERS: uid 4294967295 is out of range"):
        load_settings({**home, "KUIPER_PLUGINS__BASIC__PROXYUSERS": "4294967295"})


def test_a_proxy_user_this_machine_lacks_names_no_one_and_is_warned_of(make_service, caplog):
    service = make_service(proxy_users=("no-such-front", "root"))
    assert "basic.proxyUsers names no-such-front, unknown on this machine" in caplog.text
    assert service.app.extensions["kuiper_plugins"].settings.proxy_uids == frozenset({0})


@pytest.mark.slow
def test_a_caller_refused_on_the_head_of_a_post_is_audited_with_its_request_id(start_gunicorn):
    """Our worker refuses a caller on a head that announces a body, before reading it: that refusal must get
    its request id and its audit row like any other (nobody is not among basic.allowedUsers)."""
    from test_peer_access import curl

    server = start_gunicorn(workers=2, KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="www-data")
    body = '{"name": "refused", "file": "http://127.0.0.1:1/refused.zip"}' + " " * 4096
    ((status, answer, _),) = curl(f"{server.url}/plugins/sources", "POST", user="nobody", json_body=body,
                                  headers=("X-Request-Id: head-refused",))
    assert status == 403, answer
    log = server.log_path.read_text()
    assert "before reading the body it announced" in log  # answered by the worker, on the head
    rows = {r["requestId"]: r for r in requests.get(f"{server.url}/audit", timeout=10).json()}
    row = rows["head-refused"]
    assert (row["status"], row["outcome"], row["operation"]) == (403, "refused", "create"), row
    assert row["actor"] == {"user": "nobody", "address": "127.0.0.1"}, row
    assert re.search(r"audit: create .*status=403 .*request_id=head-refused", log), log[-2000:]


def test_the_log_line_formatter_dates_lines_as_loggings_own_does():
    """LineFormatter works the date out once a second; each line must still read as logging's Formatter writes it."""
    import logging

    from kuiper_plugins.lifecycle.audit import LineFormatter

    fmt = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
    ours, logging_own = LineFormatter(fmt), logging.Formatter(fmt)
    dated, dated_own = LineFormatter(fmt, "%H:%M"), logging.Formatter(fmt, "%H:%M")
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_000.5, 1_765_150_399.123456,
                    1_765_150_400.0):
        record = logging.LogRecord("kuiper", logging.INFO, __file__, 1, "line %s", ("one",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == logging_own.format(record)
        assert dated.format(record) == dated_own.format(record)
