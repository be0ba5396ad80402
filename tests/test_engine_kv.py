"""eKuiper's sqliteKV.db as we write it: eKuiper's schema, values Go decodes, reconcile, a busy engine, store.type."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kuiper_plugins.engine import gob
from kuiper_plugins.engine.kv import (
    FUNCTIONS_TABLE,
    NATIVE_TABLE,
    OWNED_TABLE,
    PORTABLE_TABLE,
    EngineStore,
    EngineStoreUnavailable,
    InstallScript,
    UnsupportedEngineStore,
    check_store_type,
    functions_row,
    native_row,
    portable_row,
    store_path,
)
from kuiper_plugins.settings import SettingsError

# The statement eKuiper runs for each of its key-value tables (internal/pkg/store/sql/sqlKv.go).
EKUIPER_CREATE = "CREATE TABLE IF NOT EXISTS '{table}'('key' VARCHAR(255) PRIMARY KEY, 'val' BLOB);"


def rows_of(path: Path, table: str) -> dict[str, bytes]:
    """Read a table of the KV file the way the engine does: plain SQL, key -> val blob."""
    conn = sqlite3.connect(path)
    try:
        return {key: bytes(val) for key, val in conn.execute(f"SELECT key, val FROM '{table}'")}
    finally:
        conn.close()


def ekuiper_file(path: Path, rows: dict[str, dict[str, bytes]]) -> None:
    """Write a KV file as eKuiper would: its CREATE statement per table, then REPLACE INTO."""
    conn = sqlite3.connect(path)
    with conn:
        for table, values in rows.items():
            conn.execute(EKUIPER_CREATE.format(table=table))
            for key, val in values.items():
                conn.execute(f"REPLACE INTO '{table}'(key,val) values(?,?);", (key, val))
    conn.close()


@pytest.fixture
def kv_path(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return store_path(data)


# ---------------------------------------------------------------------------- the file and its schema


@pytest.mark.parametrize("table", [NATIVE_TABLE, FUNCTIONS_TABLE, PORTABLE_TABLE])
def test_tables_are_created_with_ekuipers_exact_statement(kv_path, tmp_path, table):
    EngineStore(kv_path).ensure_tables()
    reference = sqlite3.connect(tmp_path / "reference.db")
    reference.execute(EKUIPER_CREATE.format(table=table))
    expected = reference.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    reference.close()
    assert expected == f"CREATE TABLE '{table}'('key' VARCHAR(255) PRIMARY KEY, 'val' BLOB)"
    assert EngineStore(kv_path).table_schema(table) == expected


def test_the_file_is_data_sqlitekv_db_or_store_sqlite_name(tmp_path):
    assert store_path(tmp_path) == tmp_path / "sqliteKV.db"
    assert store_path(tmp_path, "engine.db") == tmp_path / "engine.db"
    assert store_path(tmp_path, "") == tmp_path / "sqliteKV.db"
    for bad in ("../x.db", "sub/x.db", ".."):
        with pytest.raises(SettingsError, match="store.sqlite.name"):
            store_path(tmp_path, bad)


def test_an_existing_ekuiper_file_keeps_its_rows_tables_and_journal_mode(kv_path):
    ekuiper_file(kv_path, {NATIVE_TABLE: {"$boot_install": gob.encode_string("$boot_install")}, "stream": {}})
    store = EngineStore(kv_path)
    store.put_native("sinks", "file2", "http://127.0.0.1/file2.zip")
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"$boot_install", "sinks_file2"}
    conn = sqlite3.connect(kv_path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert tables == {NATIVE_TABLE, FUNCTIONS_TABLE, PORTABLE_TABLE, OWNED_TABLE, "stream"}
    assert journal == "delete"
    assert not (kv_path.parent / "checkpoint.db").exists()  # eKuiper's file existed: its layout is its own


def test_a_write_to_a_rollback_journal_file_commits_by_a_zeroed_journal_header(kv_path):
    # SQLite's default DELETE mode commits by unlinking the journal, which synchronous=FULL leaves unsynced:
    # a power cut could bring the journal back, hot, and undo an acknowledged write. Ours commits by
    # zeroing the journal's header (PERSIST, a setting of our connection), which SQLite syncs.
    ekuiper_file(kv_path, {"stream": {"demo": b"stream rows stay"}})
    store = EngineStore(kv_path)
    store.put_native("sinks", "file2", "http://127.0.0.1/file2.zip")
    journal = kv_path.with_name(kv_path.name + "-journal")
    assert journal.is_file()
    assert journal.read_bytes()[:28] == bytes(28)  # not hot: SQLite ignores it, and so does eKuiper
    # The file itself keeps its own mode, and a connection in the default mode (the engine's) reads
    # our row, writes its own, and takes the journal away as it commits.
    engine = sqlite3.connect(kv_path, isolation_level=None)
    assert engine.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    engine.execute("REPLACE INTO 'stream'(key, val) VALUES ('other', x'01')")
    engine.close()
    assert not journal.exists()
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"sinks_file2"}
    store.put_native("sinks", "file3", "http://127.0.0.1/file3.zip")
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"sinks_file2", "sinks_file3"}
    assert rows_of(kv_path, "stream") == {"demo": b"stream rows stay", "other": b"\x01"}
    store.close()


def test_a_file_replaced_between_writes_is_the_one_written_next(kv_path, tmp_path):
    store = EngineStore(kv_path)
    store.put_native("sinks", "first", "http://127.0.0.1/first.zip")
    restored = tmp_path / "restored.db"
    ekuiper_file(restored, {NATIVE_TABLE: {"$boot_install": gob.encode_string("$boot_install")}})
    old = kv_path.with_name("old.db")
    kv_path.rename(old)
    restored.rename(kv_path)  # an operator puts a backup in place while the service runs
    store.put_native("sinks", "second", "http://127.0.0.1/second.zip")
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"$boot_install", "sinks_second"}
    assert set(rows_of(old, NATIVE_TABLE)) == {"sinks_first"}
    kv_path.unlink()  # and removed: the next write makes it again
    store.put_native("sinks", "third", "http://127.0.0.1/third.zip")
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"sinks_third"}
    store.close()


def test_a_wal_file_stays_wal(kv_path):
    conn = sqlite3.connect(kv_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    EngineStore(kv_path).put_portable("mirror", "http://127.0.0.1/mirror.zip")
    conn = sqlite3.connect(kv_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_new_default_file_gets_an_empty_checkpoint_db_so_the_engine_keeps_its_split_layout(kv_path, tmp_path):
    EngineStore(kv_path).ensure_tables()
    checkpoint = kv_path.parent / "checkpoint.db"
    assert checkpoint.exists() and checkpoint.stat().st_size == 0
    named = store_path(tmp_path / "other", "engine.db")
    EngineStore(named).ensure_tables()
    assert named.exists() and not (named.parent / "checkpoint.db").exists()


def test_a_table_of_another_shape_is_refused_and_left_alone(kv_path):
    conn = sqlite3.connect(kv_path)
    conn.execute(f"CREATE TABLE '{NATIVE_TABLE}'(id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(EngineStoreUnavailable, match="nativePlugin has the columns id, name, not eKuiper's key"):
        EngineStore(kv_path).put_native("sources", "random", "http://127.0.0.1/random.zip")
    assert EngineStore(kv_path).table_schema(FUNCTIONS_TABLE) is None  # rolled back: nothing created


def test_a_corrupt_file_is_refused_and_not_rewritten(kv_path):
    kv_path.write_bytes(b"this is not a database" * 100)
    before = kv_path.read_bytes()
    with pytest.raises(EngineStoreUnavailable, match="sqliteKV.db unavailable"):
        EngineStore(kv_path).put_functions("misc", ["f1"])
    with pytest.raises(EngineStoreUnavailable):
        EngineStore(kv_path).function_lists()
    assert kv_path.read_bytes() == before


def test_reads_deletes_and_an_empty_reconcile_of_a_missing_file_create_nothing(kv_path):
    store = EngineStore(kv_path)
    assert store.native_plugins() == {} and store.function_lists() == {} and store.portable_plugins() == {}
    assert store.get_functions("misc") is None and store.owned() == set()
    store.delete_native("functions", "misc")
    result = store.reconcile([])
    assert result.written == () and result.deleted == ()
    assert not kv_path.exists() and not (kv_path.parent / "checkpoint.db").exists()


# ---------------------------------------------------------------------------- values Go reads


def test_native_rows_hold_the_go_gob_of_go_json(kv_path, go_gob):
    store = EngineStore(kv_path)
    store.put_native("sources", "random", "http://127.0.0.1:8080/random.zip?a=1&b=<2>")
    store.put_native("functions", "misc", "http://127.0.0.1/misc.zip", ["--with", "函数"])
    rows = rows_of(kv_path, NATIVE_TABLE)
    assert set(rows) == {"sources_random", "functions_misc"}
    random_json, random_gob = go_gob.marshal_ioplugin("random", "http://127.0.0.1:8080/random.zip?a=1&b=<2>", None)
    assert rows["sources_random"] == random_gob
    assert go_gob.decode_string(rows["sources_random"]) == random_json
    assert "\\u0026" in random_json and "\\u003c" in random_json
    decoded = json.loads(go_gob.decode_string(rows["functions_misc"]))
    assert decoded == {"name": "misc", "file": "http://127.0.0.1/misc.zip", "shellParas": ["--with", "函数"]}
    assert list(json.loads(go_gob.decode_string(rows["functions_misc"]))) == ["name", "file", "shellParas"]


def test_function_lists_are_go_string_slices(kv_path, go_gob):
    store = EngineStore(kv_path)
    store.put_functions("misc", ["f1", "f2"])
    assert go_gob.decode_strings(rows_of(kv_path, FUNCTIONS_TABLE)["misc"]) == ["f1", "f2"]
    store.put_functions("misc", ["f1", "f2", "f3"])  # a register rewrites the list
    assert go_gob.decode_strings(rows_of(kv_path, FUNCTIONS_TABLE)["misc"]) == ["f1", "f2", "f3"]
    assert rows_of(kv_path, FUNCTIONS_TABLE)["misc"] == go_gob.encode_strings(["f1", "f2", "f3"])


def test_portable_rows_hold_the_same_install_script(kv_path, go_gob):
    EngineStore(kv_path).put_portable("mirror", "http://127.0.0.1/mirror.zip", ["x"])
    blob = rows_of(kv_path, PORTABLE_TABLE)["mirror"]
    assert blob == go_gob.marshal_ioplugin("mirror", "http://127.0.0.1/mirror.zip", ["x"])[1]


def test_every_row_of_the_plugin_tables_decodes_in_go_as_the_engine_reads_it(kv_path, go_gob):
    store = EngineStore(kv_path)
    store.put(
        native_row("sinks", "file2", "http://127.0.0.1/file2.zip"),
        native_row("functions", "misc", "http://127.0.0.1/misc.zip"),
        functions_row("misc", []),
        functions_row("echo", ["echo", "echo2"]),
        portable_row("mirror", "http://127.0.0.1/mirror.zip"),
    )
    # eKuiper's All() decodes every nativePlugin/portablePlugin row as a string; Get() pluginFuncs as []string.
    for table in (NATIVE_TABLE, PORTABLE_TABLE):
        for blob in rows_of(kv_path, table).values():
            json.loads(go_gob.decode_string(blob))
    assert {k: go_gob.decode_strings(v) for k, v in rows_of(kv_path, FUNCTIONS_TABLE).items()} == {
        "misc": [],
        "echo": ["echo", "echo2"],
    }


def test_delete_removes_the_rows_and_a_missing_row_is_fine(kv_path):
    store = EngineStore(kv_path)
    store.put_native("functions", "misc", "http://127.0.0.1/misc.zip")
    store.put_functions("misc", ["f1"])
    store.put_portable("mirror", "http://127.0.0.1/mirror.zip")
    store.delete_native("functions", "misc")
    store.delete_portable("mirror")
    store.delete_portable("never-there")
    assert rows_of(kv_path, NATIVE_TABLE) == {}
    assert rows_of(kv_path, FUNCTIONS_TABLE) == {}
    assert rows_of(kv_path, PORTABLE_TABLE) == {}
    assert store.owned() == set()


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda s: s.put_native("widgets", "x", "http://h/x.zip"), "unknown native plugin type"),
        (lambda s: s.put_functions("x", "f1"), "list of names"),
        (lambda s: s.delete(("rules", "x")), "not one of eKuiper's plugin tables"),
        (lambda s: s.put_functions("x", ["ok", "\ud800"]), "lone surrogate"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(kv_path, call, problem):
    with pytest.raises(ValueError, match=problem):
        call(EngineStore(kv_path))
    assert not kv_path.exists()


# ---------------------------------------------------------------------------- what eKuiper wrote, for adoption


def test_rows_ekuiper_wrote_are_read_for_adoption(kv_path, go_gob):
    renumbered = gob._message(gob._int(-70) + b"\x02\x01\x02" + gob._int(70) + b"\x00\x01\x0c\x00\x00")
    renumbered += gob._message(gob._int(70) + b"\x00\x02\x02f1\x02f2")
    assert go_gob.decode_strings(renumbered) == ["f1", "f2"]  # a long-running engine's numbering
    ekuiper_file(
        kv_path,
        {
            NATIVE_TABLE: {
                "$boot_install": go_gob.encode_string("$boot_install"),
                "functions_misc": go_gob.marshal_ioplugin("misc", "http://h/misc.zip", None)[1],
                "sources_random": go_gob.encode_string('{"file": "http://h/r.zip", "name": "random"}'),
                "sinks_broken": go_gob.encode_string("not json"),
            },
            FUNCTIONS_TABLE: {"misc": renumbered, "bad": b"\x00\x01"},
            PORTABLE_TABLE: {"mirror": go_gob.marshal_ioplugin("mirror", "http://h/m.zip", ["-q"])[1]},
            "nativePluginStatus": {},
        },
    )
    store = EngineStore(kv_path)
    assert store.native_plugins() == {
        ("functions", "misc"): InstallScript("misc", "http://h/misc.zip"),
        ("sources", "random"): InstallScript("random", "http://h/r.zip"),
    }
    assert store.function_lists() == {"misc": ["f1", "f2"]}
    assert store.get_functions("misc") == ["f1", "f2"]
    assert store.get_functions("bad") is None
    assert store.get_native("sinks", "broken") is None
    assert store.portable_plugins() == {"mirror": InstallScript("mirror", "http://h/m.zip", ("-q",))}
    assert store.get_portable("mirror") == InstallScript("mirror", "http://h/m.zip", ("-q",))
    assert store.owned() == set()  # reading adopts nothing


# ---------------------------------------------------------------------------- reconcile


def test_reconcile_makes_our_rows_equal_the_projection_and_leaves_ekuipers_alone(kv_path, go_gob):
    ekuiper_rows = {
        "$boot_install": go_gob.encode_string("$boot_install"),
        "sinks_theirs": go_gob.marshal_ioplugin("theirs", "http://h/theirs.zip", None)[1],
        "sources_adopted": go_gob.marshal_ioplugin("adopted", "http://h/adopted.zip", None)[1],
    }
    ekuiper_file(kv_path, {NATIVE_TABLE: ekuiper_rows, "rule": {"r1": b"rule body"}})
    store = EngineStore(kv_path)
    store.put(
        native_row("functions", "misc", "http://h/misc-1.zip"),
        functions_row("misc", ["f1"]),
        portable_row("gone", "http://h/gone.zip"),
    )
    result = store.reconcile(
        [
            native_row("functions", "misc", "http://h/misc-2.zip"),  # changed
            functions_row("misc", ["f1"]),  # unchanged
            native_row("sources", "adopted", "http://h/adopted.zip"),  # eKuiper's row, now ours
            portable_row("new", "http://h/new.zip"),  # missing
        ]
    )
    assert set(result.written) == {(NATIVE_TABLE, "functions_misc"), (PORTABLE_TABLE, "new")}
    assert result.deleted == ((PORTABLE_TABLE, "gone"),)
    assert result.adopted == ((NATIVE_TABLE, "sources_adopted"),)
    natives = rows_of(kv_path, NATIVE_TABLE)
    assert natives["$boot_install"] == ekuiper_rows["$boot_install"]
    assert natives["sinks_theirs"] == ekuiper_rows["sinks_theirs"]
    assert json.loads(go_gob.decode_string(natives["functions_misc"]))["file"] == "http://h/misc-2.zip"
    assert set(rows_of(kv_path, PORTABLE_TABLE)) == {"new"}
    assert rows_of(kv_path, "rule") == {"r1": b"rule body"}
    assert store.owned() == {
        (NATIVE_TABLE, "functions_misc"),
        (FUNCTIONS_TABLE, "misc"),
        (NATIVE_TABLE, "sources_adopted"),
        (PORTABLE_TABLE, "new"),
    }
    again = store.reconcile(
        [
            native_row("functions", "misc", "http://h/misc-2.zip"),
            functions_row("misc", ["f1"]),
            native_row("sources", "adopted", "http://h/adopted.zip"),
            portable_row("new", "http://h/new.zip"),
        ]
    )
    assert again.written == () and again.deleted == () and again.adopted == ()


def test_reconcile_heals_a_crash_between_the_registry_commit_and_the_kv_write(kv_path):
    store = EngineStore(kv_path)
    store.put(native_row("functions", "old", "http://h/old.zip"), functions_row("old", ["o1"]))
    # The registry committed "delete old" and "install fresh", then the process died before touching the KV.
    result = store.reconcile([native_row("functions", "fresh", "http://h/fresh.zip"), functions_row("fresh", ["n1"])])
    assert set(result.deleted) == {(NATIVE_TABLE, "functions_old"), (FUNCTIONS_TABLE, "old")}
    assert set(rows_of(kv_path, NATIVE_TABLE)) == {"functions_fresh"}
    assert store.function_lists() == {"fresh": ["n1"]}


def test_reconcile_compares_values_not_go_type_numbers(kv_path):
    renumbered = gob._message(gob._int(-65) + b"\x02\x01\x02" + gob._int(65) + b"\x00\x01\x0c\x00\x00")
    renumbered += gob._message(gob._int(65) + b"\x00\x01\x02f1")
    ekuiper_file(kv_path, {FUNCTIONS_TABLE: {"misc": renumbered}})
    result = EngineStore(kv_path).reconcile([functions_row("misc", ["f1"])])
    assert result.written == () and result.adopted == ((FUNCTIONS_TABLE, "misc"),)
    assert rows_of(kv_path, FUNCTIONS_TABLE)["misc"] == renumbered


def test_reconcile_refuses_two_values_for_one_key(kv_path):
    with pytest.raises(ValueError, match="two different desired rows"):
        EngineStore(kv_path).reconcile([functions_row("misc", ["a"]), functions_row("misc", ["b"])])
    assert not kv_path.exists()


# ---------------------------------------------------------------------------- a running engine holds the file

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("REPLACE INTO 'pluginFuncs'(key, val) VALUES ('engine', x'00')")
print("locked", flush=True)
hold = float(sys.argv[2])
if hold > 0:
    time.sleep(hold)   # the engine's brief write
else:
    sys.stdin.readline()   # held until the test says so
conn.execute("COMMIT")
print("released", time.time(), flush=True)
"""


@contextmanager
def engine_holding_lock(path: Path, hold: float) -> Iterator[subprocess.Popen]:
    """Run another process that takes the KV file's write lock, as a writing engine does.

    With `hold` > 0 it commits after that many seconds; with 0 it commits when the block ends.
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if hold <= 0:
            holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_a_write_waits_for_an_engine_holding_the_lock_briefly(kv_path):
    store = EngineStore(kv_path, busy_timeout=10)
    store.ensure_tables()
    with engine_holding_lock(kv_path, hold=0.5) as holder:
        store.put_functions("misc", ["f1", "f2"])
        finished = time.time()
        released = float(holder.stdout.readline().split()[1])
    assert finished >= released  # it waited for the engine's commit rather than failing
    assert store.get_functions("misc") == ["f1", "f2"]
    assert set(rows_of(kv_path, FUNCTIONS_TABLE)) == {"engine", "misc"}


def test_a_write_gives_up_after_the_busy_timeout_and_changes_nothing(kv_path):
    store = EngineStore(kv_path, busy_timeout=0.2)
    store.put_portable("kept", "http://h/kept.zip")
    with engine_holding_lock(kv_path, hold=0):
        started = time.monotonic()
        with pytest.raises(EngineStoreUnavailable, match="sqliteKV.db unavailable: database is locked") as caught:
            store.put_portable("mirror", "http://h/mirror.zip")
        waited = time.monotonic() - started
    assert caught.value.status == 503
    assert waited >= 0.2
    assert set(rows_of(kv_path, PORTABLE_TABLE)) == {"kept"}
    assert store.owned() == {(PORTABLE_TABLE, "kept")}


def test_reads_go_on_while_the_engine_holds_its_write_lock(kv_path):
    store = EngineStore(kv_path, busy_timeout=0.2)
    store.put_functions("misc", ["f1"])
    with engine_holding_lock(kv_path, hold=0):
        assert store.get_functions("misc") == ["f1"]


def test_our_write_lock_is_released_at_once(kv_path):
    """While we write in a loop, another connection (the engine) still gets its own writes in."""
    store = EngineStore(kv_path, busy_timeout=10)
    store.ensure_tables()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(200):
                if stop.is_set():
                    return
                store.put_functions(f"p{i}", ["f"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    engine = sqlite3.connect(kv_path, timeout=2, isolation_level=None)
    try:
        for i in range(50):
            engine.execute("BEGIN IMMEDIATE")
            engine.execute("REPLACE INTO 'pluginFuncs'(key, val) VALUES (?, x'00')", (f"engine{i}",))
            engine.execute("COMMIT")
    finally:
        stop.set()
        thread.join(timeout=60)
        engine.close()
    assert not errors
    assert {f"engine{i}" for i in range(50)} <= set(rows_of(kv_path, FUNCTIONS_TABLE))


# ---------------------------------------------------------------------------- store.type


@pytest.mark.parametrize("value", ["sqlite", None])
def test_sqlite_store_type_is_accepted(value):
    check_store_type(value)


@pytest.mark.parametrize("value", ["redis", "fdb", "pebble", "SQLite", "", "memory"])
def test_any_other_store_type_stops_start_up_naming_the_key(value):
    with pytest.raises(UnsupportedEngineStore) as caught:
        check_store_type(value)
    message = str(caught.value)
    assert message.startswith(f"invalid value {value!r} for store.type:")
    assert "supported: sqlite" in message and "\n" not in message
    assert isinstance(caught.value, SettingsError)
