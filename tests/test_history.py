"""History and rollback through the test client: what each install and update recorded, and the way back.

Each package is served by the real loopback file server; the registry, the files under the home and
eKuiper's store are read from disk to check what a rollback swapped.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import requests
from conftest import engine_dump, make_zip

SO_V1 = b"\x7fELF version one"
SO_V2 = b"\x7fELF version two, longer"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(file_server, name: str, members: dict) -> tuple[str, str]:
    path = make_zip(file_server.root / name, members)
    return file_server.url(name), sha(path.read_bytes())


def sink_files(service) -> dict[str, bytes]:
    """What plugins/sinks holds, by file name."""
    return {p.name: p.read_bytes() for p in (service.home / "plugins/sinks").iterdir()}


V1_FILES = {"Echo@v1.0.0.so": SO_V1}
V2_FILES = {"Echo@v2.0.0.so": SO_V2}


def install_two_versions(service, file_server):
    """Install sink `echo` at 1.0.0, then update it to 2.0.0; the two URLs and package digests."""
    url1, sha1 = serve(file_server, "echo1.zip", {"Echo@v1.0.0.so": SO_V1})
    url2, sha2 = serve(file_server, "echo2.zip", {"Echo@v2.0.0.so": SO_V2})
    assert service.post("sinks", {"name": "echo", "file": url1}).status_code == 201
    answer = service.client.put("/plugins/sinks/echo", json={"file": url2})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return (url1, sha1), (url2, sha2)


def test_history_lists_every_install_and_update_newest_first(service, file_server):
    (url1, sha1), (url2, sha2) = install_two_versions(service, file_server)

    answer = service.client.get("/plugins/sinks/echo/history")

    assert answer.status_code == 200
    entries = answer.get_json()
    assert [(e["operation"], e["version"], e["sha256"], e["url"], e["outcome"]) for e in entries] == [
        ("update", "2.0.0", sha2, url2, "ok"),
        ("install", "1.0.0", sha1, url1, "ok"),
    ]
    assert entries[0]["at"] >= entries[1]["at"] > 0


def test_history_of_an_unknown_plugin_is_404_in_ekuipers_words(service):
    answer = service.client.get("/plugins/sinks/nothing/history")
    assert answer.status_code == 404
    assert answer.get_json()["message"] == "describe sinks plugin nothing error: not found"


def test_rollback_swaps_the_previous_version_back_and_twice_returns(service, file_server):
    install_two_versions(service, file_server)
    assert sink_files(service) == V2_FILES
    rows_v2 = engine_dump(service.home)

    first = service.client.post("/plugins/sinks/echo/rollback")

    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["version"] == "1.0.0"
    assert sink_files(service) == V1_FILES
    assert service.client.get("/plugins/sinks/echo").get_json()["version"] == "1.0.0"
    assert list(service.layout.staging.iterdir()) == []

    second = service.client.post("/plugins/sinks/echo/rollback")

    assert second.status_code == 200
    assert second.get_json()["version"] == "2.0.0"
    assert sink_files(service) == V2_FILES
    assert service.client.get("/plugins/sinks/echo").get_json()["version"] == "2.0.0"
    assert engine_dump(service.home) == rows_v2
    history = service.client.get("/plugins/sinks/echo/history").get_json()
    assert [(e["operation"], e["version"]) for e in history] == [
        ("rollback", "2.0.0"), ("rollback", "1.0.0"), ("update", "2.0.0"), ("install", "1.0.0")]
    # basic.keepVersions is 1: one kept folder, outside the folders the engine scans
    assert len(list(service.layout.versions.iterdir())) == 1


def test_rollback_without_a_kept_version_is_404_and_changes_nothing(service, file_server):
    url1, _ = serve(file_server, "echo1.zip", {"Echo@v1.0.0.so": SO_V1})
    assert service.post("sinks", {"name": "echo", "file": url1}).status_code == 201
    before = service.snapshot()

    answer = service.client.post("/plugins/sinks/echo/rollback")

    assert answer.status_code == 404
    assert answer.get_json()["message"].startswith("rollback sinks plugin echo error: no previous version is kept")
    service.assert_unchanged(before)
    assert service.client.post("/plugins/sinks/missing/rollback").status_code == 404


def test_keep_versions_zero_keeps_nothing(make_service, file_server):
    service = make_service(keep_versions=0)
    install_two_versions(service, file_server)

    assert list(service.layout.versions.iterdir()) == []
    assert service.client.post("/plugins/sinks/echo/rollback").status_code == 404
    assert sink_files(service) == V2_FILES


def test_a_delete_forgets_the_kept_versions(service, file_server):
    install_two_versions(service, file_server)
    assert service.client.delete("/plugins/sinks/echo").status_code == 200
    assert list(service.layout.versions.iterdir()) == []
    url1, _ = serve(file_server, "echo1.zip", {"Echo@v1.0.0.so": SO_V1})
    assert service.post("sinks", {"name": "echo", "file": url1}).status_code == 201
    assert service.client.post("/plugins/sinks/echo/rollback").status_code == 404


def test_a_portable_rollback_restores_the_whole_folder(service, file_server):
    def package(version: str, extra: str) -> dict:
        descriptor = {"version": version, "language": "go", "executable": "mirror", "sources": ["pull"]}
        return {"mirror.json": json.dumps(descriptor),
                "mirror": f"#!/bin/sh\necho {version}\n", "sources/pull.yaml": "default: {}\n", extra: "x\n"}
    url1, _ = serve(file_server, "m1.zip", package("v1.0.0", "only_in_one.txt"))
    url2, _ = serve(file_server, "m2.zip", package("v2.0.0", "only_in_two.txt"))
    assert service.post("portables", {"name": "mirror", "file": url1}).status_code == 201
    assert service.client.put("/plugins/portables/mirror", json={"file": url2}).status_code == 200
    folder = service.home / "plugins/portable/mirror"
    assert (folder / "only_in_two.txt").exists()

    answer = service.client.post("/plugins/portables/mirror/rollback")

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["version"] == "v1.0.0"
    assert (folder / "only_in_one.txt").exists() and not (folder / "only_in_two.txt").exists()
    assert (folder / "mirror").read_text() == "#!/bin/sh\necho v1.0.0\n"
    assert service.client.get("/plugins/portables/mirror").get_json()["version"] == "v1.0.0"


def test_a_refused_rollback_writes_nothing(service, file_server):
    # v1 has a file v2 does not: a file a user then puts at that path is not ours, so the rollback is refused.
    url1, _ = serve(file_server, "echo1.zip", {"Echo@v1.0.0.so": SO_V1})
    url2, _ = serve(file_server, "echo2.zip", {"Echo@v2.0.0.so": SO_V2})
    assert service.post("sinks", {"name": "echo", "file": url1}).status_code == 201
    assert service.client.put("/plugins/sinks/echo", json={"file": url2}).status_code == 200
    (service.home / "plugins/sinks/Echo@v1.0.0.so").write_bytes(b"the user's own")
    before = service.snapshot()

    answer = service.client.post("/plugins/sinks/echo/rollback")

    assert answer.status_code == 400
    assert "plugins/sinks/Echo@v1.0.0.so already exists and was not installed" in answer.get_json()["message"]
    service.assert_unchanged(before)


def test_an_update_undone_after_keeping_the_old_version_leaves_no_copy(service, file_server):
    # A portable package's install.sh runs in the plugin's folder after the moves, so after the old version
    # was copied aside: its failure undoes the update, and the copy must go with it.
    def package(version: str, script: str | None = None) -> dict:
        descriptor = {"version": version, "language": "go", "executable": "mirror", "sources": ["pull"]}
        members = {"mirror.json": json.dumps(descriptor), "mirror": "#!/bin/sh\n", "sources/pull.yaml": "a: 1\n"}
        if script is not None:
            members["install.sh"] = script
        return members
    url1, _ = serve(file_server, "m1.zip", package("v1.0.0"))
    url2, _ = serve(file_server, "m2.zip", package("v2.0.0", "#!/bin/sh\nexit 3\n"))
    assert service.post("portables", {"name": "mirror", "file": url1}).status_code == 201
    before = service.snapshot()

    answer = service.client.put("/plugins/portables/mirror", json={"file": url2})

    assert answer.status_code == 400, answer.get_data(as_text=True)
    service.assert_unchanged(before)



def test_a_version_kept_while_its_files_were_missing_is_never_rolled_back_to(service, file_server):
    """A rollback must not restore a plugin without its files: eKuiper's store would be given it."""
    install_two_versions(service, file_server)
    (service.home / "plugins/sinks/Echo@v2.0.0.so").unlink()  # damaged; a rollback is one way out
    first = service.client.post("/plugins/sinks/echo/rollback")
    assert first.status_code == 200, first.get_data(as_text=True)
    assert sink_files(service) == V1_FILES
    before = service.snapshot()

    answer = service.client.post("/plugins/sinks/echo/rollback")  # back to 2.0.0, which was kept without its .so

    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert answer.get_json()["message"] == (
        "rollback sinks plugin echo error: version 2.0.0 cannot be restored whole (it was kept without"
        " plugins/sinks/Echo@v2.0.0.so, missing or emptied when it was replaced; install it again from its package"
        " instead)")
    service.assert_unchanged(before)
    assert service.client.get("/registry/verify").get_json() == {"ok": True, "problems": []}

# ---------------------------------------------------------------------------- choosing the kept version
# With basic.keepVersions above 1, ?version= names which kept version a rollback goes to.

V3_FILES = {"Echo@v3.0.0.so": b"\x7fELF version three, the longest of all"}


def install_three_versions(service, file_server) -> None:
    """Sink `echo` at 1.0.0, updated to 2.0.0, then to 3.0.0."""
    install_two_versions(service, file_server)
    url3, _ = serve(file_server, "echo3.zip", V3_FILES)
    answer = service.client.put("/plugins/sinks/echo", json={"file": url3})
    assert answer.status_code == 200, answer.get_data(as_text=True)


def kept_marks(service) -> list[tuple[str, str, bool]]:
    history = service.client.get("/plugins/sinks/echo/history").get_json()
    return [(e["operation"], e["version"], e["kept"]) for e in history]


def test_rollback_goes_to_the_kept_version_named_and_back_again(make_service, file_server):
    service = make_service(keep_versions=2)
    install_three_versions(service, file_server)
    assert kept_marks(service) == [("update", "3.0.0", False), ("update", "2.0.0", True), ("install", "1.0.0", True)]
    rows_v3 = engine_dump(service.home)

    answer = service.client.post("/plugins/sinks/echo/rollback?version=1.0.0")

    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json() == {"type": "sinks", "name": "echo", "version": "1.0.0"}
    assert sink_files(service) == V1_FILES
    assert service.client.get("/plugins/sinks/echo").get_json()["version"] == "1.0.0"
    # the version left is kept, the one restored is not any more; two kept, as basic.keepVersions says
    assert kept_marks(service) == [("rollback", "1.0.0", False), ("update", "3.0.0", True),
                                   ("update", "2.0.0", True), ("install", "1.0.0", False)]
    assert len(list(service.layout.versions.iterdir())) == 2

    back = service.client.post("/plugins/sinks/echo/rollback")  # without a version: the newest, where we started

    assert back.status_code == 200 and back.get_json()["version"] == "3.0.0"
    assert sink_files(service) == V3_FILES
    assert engine_dump(service.home) == rows_v3
    assert list(service.layout.staging.iterdir()) == []


def test_rollback_to_a_version_that_is_not_kept_is_404_and_lists_the_kept_ones(make_service, file_server):
    service = make_service(keep_versions=2)
    install_three_versions(service, file_server)
    before = service.snapshot()

    answer = service.client.post("/plugins/sinks/echo/rollback?version=0.9.0")

    assert answer.status_code == 404
    assert answer.get_json()["message"] == (
        "rollback sinks plugin echo error: version 0.9.0 not found (kept versions: 2.0.0, 1.0.0;"
        " GET /plugins/sinks/echo/history marks them)")
    service.assert_unchanged(before)


@pytest.mark.parametrize("version", ["3.0.0", ""])
def test_rollback_to_the_installed_version_or_none_is_refused(make_service, file_server, version):
    service = make_service(keep_versions=2)
    install_three_versions(service, file_server)
    before = service.snapshot()

    answer = service.client.post(f"/plugins/sinks/echo/rollback?version={version}")

    assert answer.status_code == 400, answer.get_data(as_text=True)
    message = answer.get_json()["message"]
    assert message.startswith("rollback sinks plugin echo error: ")
    assert ("version 3.0.0 is the one installed (kept versions: 2.0.0, 1.0.0;" in message if version
            else "invalid version ''" in message)
    service.assert_unchanged(before)
    assert sink_files(service) == V3_FILES


def test_rollback_to_a_named_version_through_gunicorn(start_gunicorn, file_server, tmp_path):
    server = start_gunicorn(workers=2, KUIPER_PLUGINS__BASIC__KEEPVERSIONS="2")
    for index, files in enumerate((V1_FILES, V2_FILES, V3_FILES), start=1):
        url, _ = serve(file_server, f"echo{index}.zip", files)
        if index == 1:
            answer = requests.post(f"{server.url}/plugins/sinks", json={"name": "echo", "file": url}, timeout=60)
        else:
            answer = requests.put(f"{server.url}/plugins/sinks/echo", json={"file": url}, timeout=60)
        assert answer.status_code in (200, 201), answer.text
    sinks = tmp_path / "home" / "plugins" / "sinks"

    missing = requests.post(f"{server.url}/plugins/sinks/echo/rollback", params={"version": "0.9.0"}, timeout=60)
    assert missing.status_code == 404 and "kept versions: 2.0.0, 1.0.0" in missing.json()["message"]
    rolled = requests.post(f"{server.url}/plugins/sinks/echo/rollback", params={"version": "1.0.0"}, timeout=60)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["version"] == "1.0.0"
    assert {p.name: p.read_bytes() for p in sinks.iterdir()} == V1_FILES
    for _ in range(4):  # each worker describes the version now installed
        assert requests.get(f"{server.url}/plugins/sinks/echo", timeout=30).json()["version"] == "1.0.0"
    back = requests.post(f"{server.url}/plugins/sinks/echo/rollback", timeout=60)
    assert back.status_code == 200 and back.json()["version"] == "3.0.0"
    assert {p.name: p.read_bytes() for p in sinks.iterdir()} == V3_FILES
