"""GET and PUT /config/plugins: the plugin set as one document, applied idempotently and all-or-nothing.

Packages are served by the real loopback file server, which counts the requests it gets; what an apply did
is read back from disk, the registry (through a fresh connection) and eKuiper's store.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import LoopbackPeer, Service, disk_state, engine_dump, make_zip, registry_tables
from cryptography.hazmat.primitives.asymmetric import rsa
from test_auth import ISSUER, public_pem, sign

from kuiper_plugins import create_app
from kuiper_plugins.install.locks import plugin_lock
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings

SO_V1 = b"\x7fELF version one"
SO_V2 = b"\x7fELF version two, longer"
YAML = "default:\n  interval: 1000\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(file_server, zip_name: str, members: dict) -> tuple[str, str]:
    """Serve a zip; its URL and sha256."""
    path = make_zip(file_server.root / zip_name, members)
    return file_server.url(zip_name), sha(path.read_bytes())


def source_v(n: int, name: str = "random") -> dict:
    return {f"{name[0].upper()}{name[1:]}@v{n}.0.0.so": SO_V1 if n == 1 else SO_V2, f"{name}.yaml": YAML}


def sink_v(n: int, name: str = "echo") -> dict:
    return {f"{name[0].upper()}{name[1:]}@v{n}.0.0.so": SO_V1 if n == 1 else SO_V2}


def portable_zip(name: str = "mirror", version: str = "v1.0.0") -> dict:
    descriptor = {"version": version, "language": "go", "executable": name, "sinks": [f"{name}out"]}
    return {f"{name}.json": json.dumps(descriptor), name: b"#!/bin/sh\n"}


def script(name: str, url: str, rest: str = "") -> str:
    """An install script as eKuiper writes it (Go's json.Marshal of {name, file, shellParas}), spelled out."""
    return '{"name":"' + name + '","file":"' + url + '"' + rest + "}"


def put(service, document, query: str = "", **kw):
    return service.client.put(f"/config/plugins{query}", json=document, **kw)


def current(service) -> dict:
    answer = service.client.get("/config/plugins")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def installed_state(service) -> tuple:
    """What an apply may change and an undone apply must give back: files, eKuiper's store, and the registry's
    plugins, files, functions and kept versions (history and audit rows record what happened, and stay)."""
    return disk_state(service.home), sorted(engine_dump(service.home)), registry_tables(service.home)


def changes_of(answer) -> list[tuple[str, str, str]]:
    return [(c["action"], c["type"], c["name"]) for c in answer.get_json()["changes"]]


# ---------------------------------------------------------------------------- GET


def test_get_answers_every_plugin_per_type_with_its_source_digest_and_functions(service, file_server):
    random_url, random_sha = serve(file_server, "random.zip", source_v(1))
    misc_url, misc_sha = serve(file_server, "misc.zip", {"misc.so": SO_V1, "install.sh": "#!/bin/sh\nexit 0\n"})
    assert service.post("sources", {"name": "random", "file": random_url}).status_code == 201
    created = service.post("functions", {"name": "misc", "file": misc_url, "functions": ["f1", "f2"],
                                         "shellParas": ["--fast", "two words"]})
    assert created.status_code == 201, created.get_data(as_text=True)

    document = current(service)

    assert document == {
        "sources": {"random": {"file": random_url, "sha256": random_sha, "version": "1.0.0"}},
        "sinks": {},
        "functions": {"misc": {"file": misc_url, "sha256": misc_sha, "version": None,
                               "shellParas": ["--fast", "two words"], "functions": ["f1", "f2"]}},
        "portables": {},
    }
    as_yaml = service.client.get("/config/plugins", headers={"Accept": "application/yaml"})
    assert as_yaml.status_code == 200 and as_yaml.mimetype == "application/yaml"
    assert yaml.safe_load(as_yaml.get_data(as_text=True)) == document


def test_get_of_an_empty_home_names_every_type(service):
    assert current(service) == {"sources": {}, "sinks": {}, "functions": {}, "portables": {}}
    refused = service.client.get("/config/plugins?format=xml")
    assert refused.status_code == 400
    assert refused.get_json()["message"].startswith("invalid format 'xml'")


# ---------------------------------------------------------------------------- the diff and the apply


def test_put_installs_updates_reregisters_and_keeps_what_is_unchanged(service, file_server):
    random1, _ = serve(file_server, "random1.zip", source_v(1))
    random2, random2_sha = serve(file_server, "random2.zip", source_v(2))
    echo_url, echo_sha = serve(file_server, "echo.zip", sink_v(1))
    misc_url, misc_sha = serve(file_server, "misc.zip", {"misc.so": SO_V1})
    mirror_url, mirror_sha = serve(file_server, "mirror.zip", portable_zip())
    assert service.post("sources", {"name": "random", "file": random1}).status_code == 201
    assert service.post("sinks", {"name": "echo", "file": echo_url}).status_code == 201
    assert service.post("functions", {"name": "misc", "file": misc_url, "functions": ["f1"]}).status_code == 201
    downloads = len(file_server.requests)

    answer = put(service, {
        "sources": {"random": {"file": random2}},  # another URL: an update
        "sinks": {"echo": {"file": echo_url}},  # the same URL: unchanged
        "functions": {"misc": {"file": misc_url, "functions": ["f1", "f2"]}},  # the list only: a register
        "portables": {"mirror": {"file": mirror_url}},  # new: an install
    })

    assert answer.status_code == 200, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["changed"] is True and "dryRun" not in body
    assert changes_of(answer) == [("register", "function", "misc"), ("update", "source", "random"),
                                  ("install", "portable", "mirror")]
    register, update, install = body["changes"]
    assert register["from"]["functions"] == ["f1"] and register["to"]["functions"] == ["f1", "f2"]
    assert register["reason"] == "function list differs"
    assert update["from"]["version"] == "1.0.0" and update["from"]["file"] == random1
    assert update["to"] == {"version": "2.0.0", "sha256": random2_sha, "file": random2}
    assert update["reason"].startswith("file differs")
    assert install["from"] is None and install["to"] == {"version": "v1.0.0", "sha256": mirror_sha,
                                                         "file": mirror_url}
    # only the two packages that changed were fetched: the register and the unchanged sink fetch nothing
    assert sorted(file_server.requests[downloads:]) == ["/mirror.zip", "/random2.zip"]
    document = current(service)
    assert document["sources"]["random"]["version"] == "2.0.0"
    assert document["sinks"]["echo"] == {"file": echo_url, "sha256": echo_sha, "version": "1.0.0"}
    assert document["functions"]["misc"]["functions"] == ["f1", "f2"]
    assert document["portables"]["mirror"]["sha256"] == mirror_sha
    assert sorted(service.client.get("/plugins/udfs").get_json()) == ["f1", "f2"]
    assert (service.home / "plugins/sources/Random@v2.0.0.so").read_bytes() == SO_V2
    assert not (service.home / "plugins/sources/Random@v1.0.0.so").exists()
    assert (service.home / "plugins/portable/mirror/mirror.json").is_file()


def test_the_same_document_twice_changes_nothing_and_downloads_nothing_the_second_time(service, file_server):
    random_url, _ = serve(file_server, "random.zip", source_v(1))
    misc_url, _ = serve(file_server, "misc.zip", {"misc.so": SO_V1, "install.sh": "#!/bin/sh\nexit 0\n"})
    mirror_url, _ = serve(file_server, "mirror.zip", portable_zip())
    document = {"sources": {"random": {"file": random_url}},
                "functions": {"misc": {"file": misc_url, "functions": ["f1", "f2"], "shellParas": ["-q"]}},
                "portables": {"mirror": {"file": mirror_url}}}
    first = put(service, document)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["changed"] is True and len(first.get_json()["changes"]) == 3
    downloads = len(file_server.requests)
    state = installed_state(service)

    second = put(service, document)

    assert second.status_code == 200
    assert second.get_json() == {"changed": False, "changes": []}
    assert len(file_server.requests) == downloads  # not one request to the package server
    assert installed_state(service) == state
    # what GET answers is such a document too: applied as it is, it changes nothing
    again = put(service, current(service))
    assert again.get_json() == {"changed": False, "changes": []}
    assert len(file_server.requests) == downloads


def test_a_given_sha256_decides_without_looking_at_the_url(service, file_server):
    url1, sha1 = serve(file_server, "echo1.zip", sink_v(1))
    url2, sha2 = serve(file_server, "echo2.zip", sink_v(2))
    assert put(service, {"sinks": {"echo": {"file": url1, "sha256": sha1}}}).status_code == 200
    downloads = len(file_server.requests)

    # the same package from a mirror: its digest is the one installed, nothing is fetched
    moved = put(service, {"sinks": {"echo": {"file": file_server.url("mirror/echo1.zip"), "sha256": sha1.upper()}}})
    assert moved.get_json() == {"changed": False, "changes": []}
    assert len(file_server.requests) == downloads

    # another digest: the package is fetched and must have it
    updated = put(service, {"sinks": {"echo": {"file": url2, "sha256": sha2}}})
    assert updated.status_code == 200, updated.get_data(as_text=True)
    assert changes_of(updated) == [("update", "sink", "echo")]
    assert updated.get_json()["changes"][0]["reason"].startswith("sha256 differs")
    assert current(service)["sinks"]["echo"]["sha256"] == sha2

    # install.sh's arguments are part of the install: other ones reinstall the plugin
    with_paras = put(service, {"sinks": {"echo": {"file": url2, "sha256": sha2, "shellParas": ["-x"]}}})
    assert with_paras.status_code == 400  # the package has no install.sh to take them: refused, as for one plugin
    assert with_paras.get_json()["failed"] == {"type": "sink", "name": "echo", "action": "update"}
    assert with_paras.get_json()["message"].startswith("sinks plugins update command error: ")


def test_a_function_list_left_out_is_kept_and_a_new_plugin_exports_its_name(service, file_server):
    misc_url, _ = serve(file_server, "misc.zip", {"misc.so": SO_V1})
    misc2_url, _ = serve(file_server, "misc2.zip", {"misc@v2.so": SO_V2})
    solo_url, _ = serve(file_server, "solo.zip", {"solo.so": SO_V1})
    assert service.post("functions", {"name": "misc", "file": misc_url, "functions": ["f1", "f2"]}).status_code == 201

    answer = put(service, {"functions": {"misc": {"file": misc2_url}, "solo": {"file": solo_url}}})

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert changes_of(answer) == [("update", "function", "misc"), ("install", "function", "solo")]
    document = current(service)
    assert document["functions"]["misc"]["functions"] == ["f1", "f2"]  # the update kept the list
    assert document["functions"]["misc"]["version"] == "2"
    assert document["functions"]["solo"]["functions"] == ["solo"]


def test_a_function_moves_between_plugins_in_one_apply(service, file_server):
    """The register that gives a function up comes before the install that takes it, and a removed plugin's
    function is free for the plugin that takes it once the remove is done."""
    alpha_url, _ = serve(file_server, "alpha.zip", {"alpha.so": SO_V1})
    beta_url, _ = serve(file_server, "beta.zip", {"beta.so": SO_V1})
    gamma_url, _ = serve(file_server, "gamma.zip", {"gamma.so": SO_V1})
    assert service.post("functions", {"name": "alpha", "file": alpha_url, "functions": ["f", "g"]}).status_code == 201
    assert service.post("functions", {"name": "gamma", "file": gamma_url, "functions": ["h"]}).status_code == 201

    answer = put(service, {"prune": True, "functions": {
        "alpha": {"file": alpha_url, "functions": ["f"]},
        "beta": {"file": beta_url, "functions": ["g", "h"]},
    }})

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert changes_of(answer) == [("register", "function", "alpha"), ("remove", "function", "gamma"),
                                  ("install", "function", "beta")]
    assert {name: entry["functions"] for name, entry in current(service)["functions"].items()} == {
        "alpha": ["f"], "beta": ["g", "h"]}


def test_prune_removes_what_the_document_does_not_name_and_without_it_everything_stays(service, file_server):
    random_url, _ = serve(file_server, "random.zip", source_v(1))
    echo_url, _ = serve(file_server, "echo.zip", sink_v(1))
    mirror_url, _ = serve(file_server, "mirror.zip", portable_zip())
    for plugin_type, name, url in (("sources", "random", random_url), ("sinks", "echo", echo_url),
                                   ("portables", "mirror", mirror_url)):
        assert service.post(plugin_type, {"name": name, "file": url}).status_code == 201
    only_echo = {"sinks": {"echo": {"file": echo_url}}}

    kept = put(service, only_echo)
    assert kept.get_json() == {"changed": False, "changes": []}
    assert set(current(service)["sources"]) == {"random"} and set(current(service)["portables"]) == {"mirror"}

    pruned = put(service, {**only_echo, "prune": True})

    assert pruned.status_code == 200, pruned.get_data(as_text=True)
    assert changes_of(pruned) == [("remove", "source", "random"), ("remove", "portable", "mirror")]
    assert pruned.get_json()["changes"][0]["to"] is None
    assert pruned.get_json()["changes"][0]["reason"] == "not in the document (prune)"
    assert current(service) == {"sources": {}, "sinks": {"echo": current(service)["sinks"]["echo"]},
                                "functions": {}, "portables": {}}
    assert not (service.home / "plugins/portable/mirror").exists()
    assert not (service.home / "plugins/sources/Random@v1.0.0.so").exists()


def test_a_dry_run_answers_the_plan_and_writes_and_fetches_nothing(service, file_server):
    random1, _ = serve(file_server, "random1.zip", source_v(1))
    random2, random2_sha = serve(file_server, "random2.zip", source_v(2))
    echo_url, _ = serve(file_server, "echo.zip", sink_v(1))
    assert service.post("sources", {"name": "random", "file": random1}).status_code == 201
    assert service.post("sinks", {"name": "echo", "file": echo_url}).status_code == 201
    downloads = len(file_server.requests)
    before = service.snapshot()
    document = {"sources": {"random": {"file": random2, "sha256": random2_sha, "version": "2.0.0"}},
                "functions": {"misc": {"file": file_server.url("misc.zip"), "functions": ["f1"]}}, "prune": True}

    plan = put(service, document, "?dryRun=1")

    assert plan.status_code == 200, plan.get_data(as_text=True)
    body = plan.get_json()
    assert body["dryRun"] is True and body["changed"] is True
    assert changes_of(plan) == [("update", "source", "random"), ("install", "function", "misc"),
                                ("remove", "sink", "echo")]
    assert body["changes"][0]["to"] == {"version": "2.0.0", "sha256": random2_sha, "file": random2}
    assert body["changes"][1]["to"]["functions"] == ["f1"]
    service.assert_unchanged(before)
    assert len(file_server.requests) == downloads
    assert not (service.layout.locks / "plugin-set.lock").exists()


# ---------------------------------------------------------------------------- all or nothing


@pytest.mark.parametrize("keep_versions", [1, 0])
def test_a_failing_step_undoes_every_earlier_change_of_the_request(make_service, file_server, keep_versions):
    """Register, update and install succeed, then an install fails: all three are undone, an update too when
    basic.keepVersions is 0 (the apply keeps the version it replaces until it ends)."""
    service = make_service(keep_versions=keep_versions)
    random1, random1_sha = serve(file_server, "random1.zip", source_v(1))
    random2, _ = serve(file_server, "random2.zip", source_v(2))
    random3, _ = serve(file_server, "random3.zip", {**source_v(2), "random.json": "{}"})
    misc_url, _ = serve(file_server, "misc.zip", {"misc.so": SO_V1})
    echo_url, _ = serve(file_server, "echo.zip", sink_v(1, "echo"))
    assert service.post("sources", {"name": "random", "file": random1}).status_code == 201
    if keep_versions:  # a kept version from before: the undone apply must leave the kept versions as they were
        assert service.client.put("/plugins/sources/random", json={"file": random3}).status_code == 200
        assert service.client.put("/plugins/sources/random", json={"file": random1}).status_code == 200
    assert service.post("functions", {"name": "misc", "file": misc_url, "functions": ["f1"]}).status_code == 201
    (service.home / "etc/sources/random.yaml").write_text("default:\n  interval: 5\n")  # the user's own
    before = installed_state(service)

    answer = put(service, {
        "sources": {"random": {"file": random2}},
        "sinks": {"echo": {"file": echo_url}},
        "functions": {"misc": {"file": misc_url, "functions": ["f1", "f2"]},
                      "zbroken": {"file": file_server.url("missing.zip")}},
    })

    assert answer.status_code == 400, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["failed"] == {"type": "function", "name": "zbroken", "action": "install"}
    assert body["error"] == body["message"]
    assert body["message"].startswith(f"functions plugins create command error: fail to download file"
                                      f" {file_server.url('missing.zip')}")
    assert "the install of functions plugin zbroken failed; 3 earlier changes were rolled back" in body["message"]
    assert [(c["action"], c["type"], c["name"]) for c in body["rolledBack"]] == [
        ("install", "sink", "echo"), ("update", "source", "random"), ("register", "function", "misc")]
    assert "notRolledBack" not in body
    assert installed_state(service) == before
    assert current(service)["sources"]["random"]["sha256"] == random1_sha
    assert list(service.layout.staging.iterdir()) == []


def test_a_failing_remove_reinstalls_the_plugins_removed_before_it(service, file_server):
    """Removes come last; one that fails (its plugin busy) has the removes before it undone by installing
    those plugins again from their recorded URL, pinned to their recorded sha256."""
    alpha_url, _ = serve(file_server, "alpha.zip", sink_v(1, "alpha"))
    beta_url, _ = serve(file_server, "beta.zip", sink_v(1, "beta"))
    assert service.post("sinks", {"name": "alpha", "file": alpha_url, "sha256": None}).status_code == 201
    assert service.post("sinks", {"name": "beta", "file": beta_url}).status_code == 201
    before = installed_state(service)
    downloads = len(file_server.requests)
    busy = plugin_lock(service.layout.locks, "sinks", "beta")  # as another request working on beta holds it
    assert busy.try_acquire()
    try:
        answer = put(service, {"prune": True})
    finally:
        busy.release()

    assert answer.status_code == 400, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["failed"] == {"type": "sink", "name": "beta", "action": "remove"}
    assert body["message"].startswith("sinks plugin beta is busy")
    assert [(c["action"], c["name"]) for c in body["rolledBack"]] == [("remove", "alpha")]
    assert file_server.requests[downloads:] == ["/alpha.zip"]  # alpha came back from where it came from
    # as it was, but for its request, which now pins the digest it was installed with
    after = installed_state(service)
    assert after[:2] == before[:2]
    assert {k: v for k, v in after[2].items() if k != "plugins"} == {k: v for k, v in before[2].items()
                                                                      if k != "plugins"}
    alpha_request = json.loads(next(row[4] for row in after[2]["plugins"] if row[1] == "alpha"))
    assert alpha_request.pop("sha256") == current(service)["sinks"]["alpha"]["sha256"]
    assert [row[:4] + (alpha_request if row[1] == "alpha" else json.loads(row[4]),) + row[5:]
            for row in after[2]["plugins"]] == [row[:4] + (json.loads(row[4]),) + row[5:]
                                                for row in before[2]["plugins"]]


def test_a_plugin_changed_by_another_request_is_not_undone_over_it(service, file_server):
    """The undo leaves alone a plugin another request changed after the apply did (here, between the steps:
    the second install's download is the moment, answered by the file server's hook)."""
    echo_url, _ = serve(file_server, "echo.zip", sink_v(1, "echo"))
    echo2_url, _ = serve(file_server, "echo2.zip", sink_v(2, "echo"))

    def meanwhile(handler):
        # Runs while the apply waits for this download, after its install of echo committed: another
        # request updates echo, then the download fails.
        assert service.app.extensions["kuiper_plugins"].installer.update(
            "sinks", "echo", {"name": "echo", "file": echo2_url}) is None
        handler.send_error(404)

    file_server.routes["/zz.zip"] = meanwhile

    answer = put(service, {"sinks": {"echo": {"file": echo_url}, "zz": {"file": file_server.url("zz.zip")}}})

    assert answer.status_code == 400
    body = answer.get_json()
    assert body["rolledBack"] == []
    assert [(c["action"], c["name"]) for c in body["notRolledBack"]] == [("install", "echo")]
    assert "was changed by another request since" in body["notRolledBack"][0]["error"]
    assert "1 could not be (see notRolledBack)" in body["message"]
    assert current(service)["sinks"]["echo"]["version"] == "2.0.0"


# ---------------------------------------------------------------------------- refused before any change

def _installed(service, file_server) -> None:
    random_url, _ = serve(file_server, "random.zip", source_v(1))
    misc_url, _ = serve(file_server, "misc.zip", {"misc.so": SO_V1})
    assert service.post("sources", {"name": "random", "file": random_url}).status_code == 201
    assert service.post("functions", {"name": "misc", "file": misc_url, "functions": ["f1"]}).status_code == 201


REFUSED = [
    pytest.param({"sinks": {"a.b": {"file": "http://127.0.0.1:9/a.zip"}}}, {"type": "sink", "name": "a.b",
                 "action": "install"},
                 "id 'a.b' contains invalid characters: only alphanumeric, hyphens and underscores are allowed",
                 id="name-rule"),
    pytest.param({"sources": {"mqtt": {"file": "http://127.0.0.1:9/mqtt.zip"}}}, {"type": "source", "name": "mqtt",
                 "action": "install"}, "sources plugins create command error: invalid name mqtt:", id="builtin-name"),
    pytest.param({"sinks": {"echo": {"file": "http://127.0.0.1:9/echo.tar"}}}, {"type": "sink", "name": "echo",
                 "action": "install"}, "sinks plugins create command error: invalid uri http://127.0.0.1:9/echo.tar",
                 id="url"),
    pytest.param({"sinks": {"echo": {"file": None}}}, {"type": "sink", "name": "echo", "action": "install"},
                 "sinks plugins create command error: invalid uri (the document gives no file", id="no-file"),
    pytest.param({"functions": {"other": {"file": "http://127.0.0.1:9/other.zip", "functions": ["f1"]}}},
                 {"type": "function", "name": "other", "action": "install"},
                 "functions plugins create command error: function name f1 already exists (it belongs to plugin"
                 " misc)", id="function-clash"),
    pytest.param({"functions": {"misc": {"file": None, "functions": ["abs"]}}},
                 {"type": "function", "name": "misc", "action": "register"}, "invalid function name abs:",
                 id="builtin-function"),
    pytest.param({"sources": {"Random": {"file": "http://127.0.0.1:9/random.zip"}}},
                 {"type": "source", "name": "Random", "action": "install"},
                 "sources plugins create command error: invalid name Random: duplicate (random is installed",
                 id="case-only"),
]


@pytest.mark.parametrize(("document", "failed", "start"), REFUSED)
def test_a_document_refused_for_one_plugin_changes_nothing_and_names_it(service, file_server, document, failed,
                                                                         start):
    _installed(service, file_server)
    fresh = {"sinks": {"fresh": {"file": serve(file_server, "fresh.zip", sink_v(1, "fresh"))[0]}}}
    downloads = len(file_server.requests)
    before = service.snapshot()

    answer = put(service, {**fresh, **document} if "sinks" not in document else document)

    assert answer.status_code == 400, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["failed"] == failed
    assert body["message"].startswith(start), body["message"]
    assert body["message"].endswith("is refused; nothing was changed)")
    assert body["rolledBack"] == []
    audit_free = service.snapshot()
    assert audit_free[0] == before[0] and audit_free[2] == before[2]
    assert len(file_server.requests) == downloads


@pytest.mark.parametrize(("body", "content_type", "start"), [
    ({"sources": {"random": {"file": "http://127.0.0.1:9/r.zip", "sha256": "xyz"}}}, None,
     "Invalid body: Error decoding the plugin set json: sources.random.sha256: String does not match"),
    ({"sinks": {"echo": {"file": "http://127.0.0.1:9/e.zip", "functions": ["f"]}}}, None,
     "Invalid body: Error decoding the plugin set json: sinks.echo.functions: only function plugins"),
    ({"sources": {}, "nativePlugins": {}}, None,
     "Invalid body: Error decoding the plugin set json: give either the plugin set"),
    ({"prune": "yes"}, None, "Invalid body: Error decoding the plugin set json: prune: Not a valid boolean."),
    (["sources"], None, "Invalid body: Error decoding the plugin set json: expected a JSON object"),
    ({"nativePlugins": {"streams_x": '{"name":"x","file":"http://127.0.0.1:9/x.zip"}'}}, None,
     "Invalid body: Error decoding the plugin set json: nativePlugins.streams_x: a key is <type>_<name>"),
    ({"nativePlugins": {"sinks_x": "not json"}}, None,
     "Invalid body: Error decoding the plugin set json: nativePlugins.sinks_x: not an install script"),
    ("a: &a [1, 2]\nb: *a\n", "application/yaml",
     "Invalid body: Error decoding the plugin set yaml: aliases (*name) are not accepted"),
    ("sources: [unclosed\n", "application/yaml", "Invalid body: Error decoding the plugin set yaml: "),
    ("sources:\n  123: {file: http://127.0.0.1:9/a.zip}\n", "application/yaml",
     "Invalid body: Error decoding the plugin set yaml: sources.123: Not a valid string."),
])
def test_a_malformed_document_is_refused_with_the_envelope_and_changes_nothing(service, file_server, body,
                                                                                content_type, start):
    _installed(service, file_server)
    before = service.snapshot()

    if content_type is None:
        answer = service.client.put("/config/plugins", json=body)
    else:
        answer = service.client.put("/config/plugins", data=body, content_type=content_type)

    assert answer.status_code == 400, answer.get_data(as_text=True)
    envelope = answer.get_json()
    assert set(envelope) == {"error", "message"} and envelope["error"] == 1000
    assert envelope["message"].startswith(start), envelope["message"]
    after = service.snapshot()
    assert after[0] == before[0] and after[2] == before[2]


# ---------------------------------------------------------------------------- YAML and eKuiper's format


def test_a_yaml_document_is_applied_and_get_as_yaml_round_trips(service, file_server):
    random_url, _ = serve(file_server, "random.zip", source_v(1))
    misc_url, _ = serve(file_server, "misc.zip", {"misc.so": SO_V1})
    document = (f"sources:\n  random:\n    file: {random_url}\n"
                f"functions:\n  misc:\n    file: {misc_url}\n    functions: [f1, f2]\n")

    applied = service.client.put("/config/plugins", data=document, content_type="application/yaml")

    assert applied.status_code == 200, applied.get_data(as_text=True)
    assert changes_of(applied) == [("install", "source", "random"), ("install", "function", "misc")]
    exported = service.client.get("/config/plugins", headers={"Accept": "application/yaml"}).get_data(as_text=True)
    downloads = len(file_server.requests)
    again = service.client.put("/config/plugins", data=exported, content_type="application/yaml")
    assert again.get_json() == {"changed": False, "changes": []}
    assert len(file_server.requests) == downloads


def _second_service(tmp_path, file_server) -> tuple[Service, LoopbackPeer]:
    """Another node: a service on a home of its own, its requests from a real loopback connection."""
    home = tmp_path / "node2"
    settings = Settings(home=home, private_net_allow_list=(f"127.0.0.1:{file_server.port}",),
                        portable_verify_on_install=False)
    peer = LoopbackPeer()
    return Service(home, create_app(settings, stop_service=lambda: None), [], peer), peer


def test_ekuipers_format_round_trips_with_function_lists_and_names_holding_underscores(service, file_server,
                                                                                         tmp_path):
    my_src_url, _ = serve(file_server, "my_src.zip", source_v(1, "my_src"))
    echo_url, _ = serve(file_server, "echo.zip", {**sink_v(1), "install.sh": "#!/bin/sh\nexit 0\n"})
    multi_url, _ = serve(file_server, "my_multi.zip", {"my_multi.so": SO_V1})
    mirror_url, _ = serve(file_server, "my_mirror.zip", portable_zip("my_mirror"))
    assert put(service, {
        "sources": {"my_src": {"file": my_src_url}},
        "sinks": {"echo": {"file": echo_url, "shellParas": ["--fast", "<&>"]}},
        "functions": {"my_multi": {"file": multi_url, "functions": ["twice", "shout"]}},
        "portables": {"my_mirror": {"file": mirror_url}},
    }).status_code == 200

    exported = service.client.get("/config/plugins?format=ekuiper")

    assert exported.status_code == 200
    body = exported.get_json()
    # eKuiper's keys and strings: Go's json.Marshal of {name, file, shellParas}, with &<> escaped
    assert body == {
        "nativePlugins": {
            "functions_my_multi": script("my_multi", multi_url),
            "sinks_echo": script("echo", echo_url, ',"shellParas":["--fast","\\u003c\\u0026\\u003e"]'),
            "sources_my_src": script("my_src", my_src_url),
        },
        "portablePlugins": {"my_mirror": script("my_mirror", mirror_url)},
        "functionLists": {"my_multi": ["twice", "shout"]},
    }
    downloads = len(file_server.requests)
    assert put(service, body).get_json() == {"changed": False, "changes": []}  # back to itself: nothing to do
    assert len(file_server.requests) == downloads

    node2, peer = _second_service(tmp_path, file_server)
    try:
        applied = put(node2, body)
        assert applied.status_code == 200, applied.get_data(as_text=True)
        assert current(node2) == current(service)  # the same plugins, digests and function lists
        assert node2.client.get("/plugins/udfs").get_json() == ["shout", "twice"]
    finally:
        node2.stop()
        peer.close()


def test_ekuipers_format_without_function_lists_keeps_the_installed_ones(service, file_server):
    multi_url, _ = serve(file_server, "multi.zip", {"multi.so": SO_V1})
    assert service.post("functions", {"name": "multi", "file": multi_url, "functions": ["twice"]}).status_code == 201

    # what eKuiper's own export holds for it: no function list
    answer = put(service, {"nativePlugins": {"functions_multi": script("multi", multi_url)},
                           "portablePlugins": {}, "rules": {"r1": "{}"}, "streams": {}})

    assert answer.get_json() == {"changed": False, "changes": []}
    assert current(service)["functions"]["multi"]["functions"] == ["twice"]


# ---------------------------------------------------------------------------- who may apply


def test_applying_needs_a_token_when_authentication_is_on(make_service, file_server):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    service = make_service(authentication=True)
    (service.layout.mgmt_keys / ISSUER).write_bytes(public_pem(key))
    echo_url, _ = serve(file_server, "echo.zip", sink_v(1))
    document = {"sinks": {"echo": {"file": echo_url}}}

    refused = put(service, document)
    assert refused.status_code == 401
    assert service.client.get("/config/plugins").status_code == 401
    assert not Layout(service.home).plugins.joinpath("sinks/Echo@v1.0.0.so").exists()

    applied = put(service, document, headers={"Authorization": f"Bearer {sign(key)}"})
    assert applied.status_code == 200, applied.get_data(as_text=True)
    assert changes_of(applied) == [("install", "sink", "echo")]
