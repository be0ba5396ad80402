"""The engine agrees: eKuiper's own store (data/sqliteKV.db) after every step, adoption both ways, layouts.

Every value read back from eKuiper's store is decoded by Go's own encoding/gob (tests/go/gobcheck), as the
engine reads it; rows "written the way eKuiper does" are written with Go's bytes and eKuiper's statements.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import client_class_for, make_zip

from kuiper_plugins import create_app
from kuiper_plugins.engine import kv
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings, SettingsError, load_settings

SO = b"\x7fELF shared object"
YAML = "default:\n  interval: 1000\n"


def kv_file(home: Path) -> Path:
    return Layout(home).data / "sqliteKV.db"


def engine_rows(path: Path, go_gob) -> dict[str, dict[str, object]]:
    """Every row of eKuiper's three plugin tables, each value decoded by Go."""
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows: dict[str, dict[str, object]] = {}
        for table in (kv.NATIVE_TABLE, kv.FUNCTIONS_TABLE, kv.PORTABLE_TABLE):
            if table not in tables:
                continue
            decode = go_gob.decode_strings if table == kv.FUNCTIONS_TABLE else go_gob.decode_string
            found = {key: decode(val) for key, val in conn.execute(f"SELECT key, val FROM '{table}'")}
            if found:
                rows[table] = found
        return rows
    finally:
        conn.close()


def script(go_gob, name: str, url: str, paras: list[str] | None = None) -> str:
    """The install script eKuiper stores, as Go's own json.Marshal of IOPlugin writes it."""
    return go_gob.marshal_ioplugin(name, url, paras or None)[0]


def write_as_ekuiper(path: Path, go_gob, rows: dict[str, dict[str, bytes]]) -> None:
    """eKuiper's KV file as the engine writes it: its CREATE statement, REPLACE INTO, Go's gob bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        for table, values in rows.items():
            conn.execute(f"CREATE TABLE IF NOT EXISTS '{table}'('key' VARCHAR(255) PRIMARY KEY, 'val' BLOB);")
            for key, blob in values.items():
                conn.execute(f"REPLACE INTO '{table}'(key, val) VALUES (?, ?)", (key, blob))
        conn.commit()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the whole flow


def test_install_register_update_delete_keep_ekuipers_store_as_ekuiper_would(service, file_server, go_gob):
    make_zip(file_server.root / "misc.zip", {"Misc@v1.0.0.so": SO})
    make_zip(file_server.root / "misc2.zip", {"Misc@v2.0.0.so": SO, "install.sh": "exit 0\n"})
    url, url2 = file_server.url("misc.zip"), file_server.url("misc2.zip")
    path = kv_file(service.home)

    assert service.post("functions", {"name": "misc", "file": url, "functions": ["f1", "f2"]}).status_code == 201
    assert engine_rows(path, go_gob) == {
        "nativePlugin": {"functions_misc": script(go_gob, "misc", url)},
        "pluginFuncs": {"misc": ["f1", "f2"]},
    }
    registered = service.client.post("/plugins/functions/misc/register", json={"functions": ["f1", "f2", "f3"]})
    assert registered.status_code == 200
    assert engine_rows(path, go_gob)["pluginFuncs"] == {"misc": ["f1", "f2", "f3"]}

    paras = ["a<b>", "c&d", "ünï \"q\""]
    body = {"name": "misc", "file": url2, "shellParas": paras, "functions": ["f1", "f2", "f3"]}
    assert service.client.put("/plugins/functions/misc", json=body).status_code == 200
    assert engine_rows(path, go_gob) == {
        "nativePlugin": {"functions_misc": script(go_gob, "misc", url2, paras)},
        "pluginFuncs": {"misc": ["f1", "f2", "f3"]},
    }
    assert "\\u003c" in engine_rows(path, go_gob)["nativePlugin"]["functions_misc"]  # Go's json.Marshal escapes

    assert service.client.delete("/plugins/functions/misc").status_code == 200
    assert engine_rows(path, go_gob) == {}


def test_sources_and_portables_get_their_install_scripts(service, file_server, go_gob):
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": SO, "random.yaml": YAML})
    portable = {"mirror.json": json.dumps({"version": "v1", "language": "go", "executable": "mirror",
                                           "sinks": ["echo"]}), "mirror": b"#!/bin/sh\nexit 0\n"}
    make_zip(file_server.root / "mirror.zip", portable, modes={"mirror": 0o100755})
    assert service.post("sources", {"name": "random", "file": file_server.url("random.zip")}).status_code == 201
    assert service.post("portables", {"name": "mirror", "file": file_server.url("mirror.zip")}).status_code == 201
    assert engine_rows(kv_file(service.home), go_gob) == {
        "nativePlugin": {"sources_random": script(go_gob, "random", file_server.url("random.zip"))},
        "portablePlugin": {"mirror": script(go_gob, "mirror", file_server.url("mirror.zip"))},
    }
    # A function plugin installed without a list has no pluginFuncs row: eKuiper falls back to its name.
    make_zip(file_server.root / "echo2.zip", {"echo2.so": SO})
    assert service.post("functions", {"name": "echo2", "file": file_server.url("echo2.zip")}).status_code == 201
    assert "pluginFuncs" not in engine_rows(kv_file(service.home), go_gob)


def test_refusals_leave_ekuipers_store_as_it_was(service, file_server, go_gob):
    make_zip(file_server.root / "misc.zip", {"misc.so": SO})
    assert service.post("functions", {"name": "misc", "file": file_server.url("misc.zip")}).status_code == 201
    before = service.snapshot()
    assert service.post("functions", {"name": "misc", "file": file_server.url("misc.zip")}).status_code == 400
    assert service.client.post("/plugins/functions/misc/register", json={"functions": []}).status_code == 400
    assert service.client.put("/plugins/functions/misc", json={"file": file_server.url("gone.zip")}).status_code == 400
    service.assert_unchanged(before)


@pytest.mark.parametrize("step", ["install", "delete"])
def test_a_crash_between_the_two_commits_heals_at_start_up(make_service, file_server, go_gob, step, tmp_path):
    service = make_service()
    make_zip(file_server.root / "misc.zip", {"misc.so": SO})
    body = {"name": "misc", "file": file_server.url("misc.zip"), "functions": ["m1"]}
    path = kv_file(service.home)
    if step == "delete":
        assert service.post("functions", body).status_code == 201
    # What eKuiper's store held before our registry committed: the crash came before its own write.
    shutil.copy(path, tmp_path / "kv-before") if path.exists() else None
    if step == "install":
        response = service.post("functions", body)
    else:
        response = service.client.delete("/plugins/functions/misc")
    assert response.status_code in (200, 201)
    expected = engine_rows(path, go_gob)
    path.unlink()
    if (tmp_path / "kv-before").exists():
        shutil.copy(tmp_path / "kv-before", path)
    assert engine_rows(path, go_gob) != expected
    make_service()  # restart: start-up reconciles eKuiper's store with the registry
    assert engine_rows(path, go_gob) == expected


# ---------------------------------------------------------------------------- adoption, both ways


def test_a_native_plugin_ekuiper_installed_is_adopted_with_its_functions_and_url(home, make_service, go_gob):
    layout = Layout(home)
    layout.create()
    (layout.native_dir("functions") / "Misc@v1.2.so").write_bytes(SO)
    (layout.etc / "functions/misc.json").write_text('{"about": {}}')
    (layout.etc / "functions/misc").mkdir()
    (layout.etc / "functions/misc/model.bin").write_bytes(b"model")
    url = "https://example.com/misc.zip"
    install_json, install_gob = go_gob.marshal_ioplugin("misc", url, None)
    write_as_ekuiper(kv_file(home), go_gob, {
        "nativePlugin": {"functions_misc": install_gob},
        "pluginFuncs": {"misc": go_gob.encode_strings(["a", "b"])},
    })
    service = make_service()
    assert service.client.get("/plugins/functions/misc").get_json() == {
        "name": "misc", "version": "1.2", "functions": ["a", "b"]}
    assert service.client.get("/plugins/udfs").get_json() == ["a", "b"]
    assert engine_rows(kv_file(home), go_gob)["nativePlugin"] == {"functions_misc": install_json}
    # A same-name create is a duplicate, as in eKuiper.
    refused = service.post("functions", {"name": "misc", "file": "http://127.0.0.1:1/misc.zip"})
    assert refused.status_code == 400 and refused.get_json()["message"].endswith("invalid name misc: duplicate")
    # Delete removes what eKuiper's delete removes: the binary, its json, its folder, its rows.
    assert service.client.delete("/plugins/functions/misc").status_code == 200
    assert not (layout.native_dir("functions") / "Misc@v1.2.so").exists()
    assert not (layout.etc / "functions/misc.json").exists() and not (layout.etc / "functions/misc").exists()
    assert engine_rows(kv_file(home), go_gob) == {}


def test_a_portable_plugin_ekuiper_installed_is_listed_described_and_deletable(home, make_service, go_gob):
    layout = Layout(home)
    layout.create()
    folder = layout.portable_dir("mirror")
    folder.mkdir()
    (folder / "mirror.json").write_text(json.dumps({
        "version": "v1.0.0", "language": "python", "executable": "pysam.py",
        "sources": ["pyjson"], "sinks": ["print"], "functions": ["revert"]}))
    (folder / "pysam.py").write_text("print('hello')\n")
    for root in (layout.etc, layout.data):
        (root / "sources/pyjson.yaml").write_text(YAML)
        (root / "sources/pyjson.json").write_text("{}")
        (root / "sinks/print.json").write_text("{}")
        (root / "functions/revert.json").write_text("{}")
    _json, install_gob = go_gob.marshal_ioplugin("mirror", "file:///tmp/mirror.zip", None)
    write_as_ekuiper(kv_file(home), go_gob, {"portablePlugin": {"mirror": install_gob}})
    (layout.plugins / "portable/broken").mkdir()  # no descriptor: eKuiper's boot scan would refuse it too
    service = make_service()
    listed = service.client.get("/plugins/portables").get_json()
    assert [p["name"] for p in listed] == ["mirror"]
    described = service.client.get("/plugins/portables/mirror").get_json()
    assert described["executable"] == str(folder / "pysam.py")
    assert described["functions"] == ["revert"] and described["version"] == "v1.0.0"
    assert service.client.get("/plugins/udfs").get_json() == ["revert"]
    assert service.client.delete("/plugins/portables/mirror").status_code == 200
    assert not folder.exists()
    for root in (layout.etc, layout.data):
        assert not (root / "sinks/print.json").exists() and not (root / "functions/revert.json").exists()
    assert engine_rows(kv_file(home), go_gob) == {}
    assert (layout.plugins / "portable/broken").is_dir()  # not ours, never touched


# ---------------------------------------------------------------------------- layouts


def client_of(settings, peer):
    app = create_app(settings, stop_service=lambda: None)
    app.test_client_class = client_class_for(peer)
    return app.test_client()


def test_the_deb_layout_puts_each_folder_where_that_engine_reads_it(tmp_path, file_server, go_gob, loopback_peer):
    etc, data, plugins = tmp_path / "etc/kuiper", tmp_path / "var/lib/kuiper/data", tmp_path / "var/lib/kuiper/plugins"
    etc.mkdir(parents=True)
    (etc / "kuiper-plugins.yaml").write_text("basic:\n  restPort: 9123\n")
    (etc / "kuiper.yaml").write_text("basic:\n  restPort: 9082\nstore:\n  sqlite:\n    name: engine.db\n")
    settings = load_settings({"KUIPER_HOME": str(tmp_path / "var/lib/kuiper"), "KUIPER_ETC_DIR": str(etc),
                              "KUIPER_DATA_DIR": str(data), "KUIPER_PLUGINS_DIR": str(plugins)})
    assert settings.rest_port == 9123  # the settings file is <etc>/kuiper-plugins.yaml
    # ... and the engine's file, <etc>/kuiper.yaml, says where the engine listens and keeps its store
    assert (settings.engine_url, settings.store_sqlite_name) == ("http://127.0.0.1:9082", "engine.db")
    settings = settings.with_overrides(private_net_allow_list=(f"127.0.0.1:{file_server.port}",),
                                       engine_url=None)  # no engine runs here to be asked
    client = client_of(settings, loopback_peer())
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": SO, "random.yaml": YAML, "etc/a.conf": "a"})
    created = client.post("/plugins/sources", json={"name": "random", "file": file_server.url("random.zip")})
    assert created.status_code == 201, created.data
    assert (plugins / "sources/Random@v1.0.0.so").read_bytes() == SO
    assert (etc / "sources/random.yaml").read_text() == YAML and (data / "sources/random.yaml").read_text() == YAML
    assert (etc / "sources/random/a.conf").exists() and (data / "sources/random/a.conf").exists()
    assert (data / "kuiper-plugins.db").exists() and (data / ".kuiper-plugins/staging").is_dir()
    assert engine_rows(data / "engine.db", go_gob)["nativePlugin"] == {
        "sources_random": script(go_gob, "random", file_server.url("random.zip"))}
    assert not (tmp_path / "var/lib/kuiper/etc").exists()  # nothing where that engine never reads
    assert client.delete("/plugins/sources/random").status_code == 200
    assert not (plugins / "sources/Random@v1.0.0.so").exists() and not (etc / "sources/random").exists()


def test_kuiper_base_key_is_an_alias_of_kuiper_home(tmp_path):
    assert load_settings({"KuiperBaseKey": str(tmp_path)}).home == tmp_path
    assert load_settings({"KuiperBaseKey": str(tmp_path / "b"), "KUIPER_HOME": str(tmp_path)}).home == tmp_path


@pytest.mark.parametrize("value", ["redis", "fdb", "pebble"])
def test_another_engine_store_stops_start_up_naming_the_key(tmp_path, value):
    with pytest.raises(SettingsError, match=r"store\.type.*supported: sqlite"):
        load_settings({"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__STORE__TYPE": value})
    # The engine's own config says so too, in its file or in its KUIPER__ variables (its truth).
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/kuiper.yaml").write_text(f"store:\n  type: {value}\n")
    with pytest.raises(SettingsError, match=r"store\.type.*supported: sqlite"):
        load_settings({"KUIPER_HOME": str(tmp_path)})
    (tmp_path / "etc/kuiper.yaml").write_text("store:\n  type: sqlite\n")
    with pytest.raises(SettingsError, match=r"store\.type.*supported: sqlite"):
        load_settings({"KUIPER_HOME": str(tmp_path), "KUIPER__STORE__TYPE": value})


def test_store_sqlite_name_moves_ekuipers_store(tmp_path, file_server, go_gob, loopback_peer):
    settings = Settings(home=tmp_path, store_sqlite_name="engine.db",
                        private_net_allow_list=(f"127.0.0.1:{file_server.port}",))
    client = client_of(settings, loopback_peer())
    make_zip(file_server.root / "echo3.zip", {"echo3.so": SO})
    body = {"name": "echo3", "file": file_server.url("echo3.zip")}
    assert client.post("/plugins/functions", json=body).status_code == 201
    assert engine_rows(tmp_path / "data/engine.db", go_gob)["nativePlugin"] == {
        "functions_echo3": script(go_gob, "echo3", file_server.url("echo3.zip"))}
    assert not (tmp_path / "data/sqliteKV.db").exists()
