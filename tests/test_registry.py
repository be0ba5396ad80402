"""The SQLite registry: schema, invariants and transactions, on a real file."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from kuiper_plugins import db, registry
from kuiper_plugins.errors import RegistryUnavailable


@pytest.fixture
def conn(tmp_path):
    path = tmp_path / "registry.db"
    db.initialise(path)
    connection = db.connect(path)
    yield connection
    connection.close()


def save(conn, name, plugin_type="functions", files=(), functions=(), **kw):
    with db.transaction(conn):
        return registry.save(
            conn, plugin_type=plugin_type, name=name, version="1.0", descriptor=None, request={"name": name},
            sha256=None, files=list(files), functions=list(functions), **kw,
        )


def test_schema_version_and_wal(tmp_path, conn):
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.initialise(tmp_path / "registry.db")  # idempotent
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)


def test_a_newer_schema_is_refused_not_rewritten(tmp_path):
    path = tmp_path / "registry.db"
    db.initialise(path)
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(RegistryUnavailable, match="schema version 99"):
        db.initialise(path)


def test_a_corrupt_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryUnavailable):
        db.initialise(path)
    assert path.read_bytes() == b"this is not a database" * 100


def test_save_find_list_and_remove(conn):
    plugin_id = save(conn, "misc", files=["plugins/functions/misc.so"], functions=["b", "a"])
    save(conn, "echo", functions=["echo"])
    assert registry.list_names(conn, "functions") == ["echo", "misc"]
    plugin = registry.find(conn, "functions", "misc")
    assert plugin.id == plugin_id and plugin.request == {"name": "misc"}
    assert registry.find(conn, "functions", "MISC") is None
    assert registry.find_by_key(conn, "functions", "MISC").id == plugin_id
    assert registry.functions_of(conn, plugin_id) == ["b", "a"]
    assert registry.function_names(conn) == ["a", "b", "echo"]
    assert registry.function_owner(conn, "a") == "misc"
    assert registry.files_of(conn, plugin_id) == ["plugins/functions/misc.so"]
    with db.transaction(conn):
        registry.remove(conn, plugin_id)
    assert registry.function_names(conn) == ["echo"]
    assert registry.all_recorded_files(conn) == set()


def test_names_are_unique_per_type_regardless_of_case(conn):
    save(conn, "random", plugin_type="sources")
    save(conn, "random", plugin_type="sinks")
    with pytest.raises(sqlite3.IntegrityError):
        save(conn, "Random", plugin_type="sources")
    assert registry.list_names(conn, "sources") == ["random"]


def test_function_names_are_one_namespace(conn):
    save(conn, "misc", functions=["f1"])
    with pytest.raises(sqlite3.IntegrityError):
        save(conn, "other", plugin_type="portables", functions=["f2", "f1"])
    assert registry.find(conn, "portables", "other") is None, "the failed transaction left nothing"
    assert registry.function_clashes(conn, ["f1", "f3"], None) == [("f1", "misc")]


def test_a_file_belongs_to_one_plugin(conn):
    save(conn, "a", files=["etc/sources/x.json"])
    with pytest.raises(sqlite3.IntegrityError):
        save(conn, "b", files=["etc/sources/x.json"])
    assert registry.file_owners(conn, ["etc/sources/x.json"], None) == [("etc/sources/x.json", "functions", "a")]


def test_replacing_keeps_the_creation_time(conn):
    first = save(conn, "misc", functions=["f1"])
    created = conn.execute("SELECT created_at FROM plugins WHERE id = ?", (first,)).fetchone()[0]
    second = save(conn, "misc", functions=["f1", "f2"], replaces=first)
    assert conn.execute("SELECT created_at FROM plugins WHERE id = ?", (second,)).fetchone()[0] == created
    assert registry.function_names(conn) == ["f1", "f2"]


def test_operations_reserve_a_name(conn):
    with db.transaction(conn):
        registry.begin_operation(conn, "op1", "sources", "random", "install", 123)
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction(conn):
            registry.begin_operation(conn, "op2", "sources", "RANDOM", "install", 124)
    with db.transaction(conn):
        registry.record_journal(conn, "op1", [{"dest": "x", "backup": None, "placed": True}])
    (op,) = registry.operations(conn)
    assert (op.id, op.kind, op.pid, op.journal) == ("op1", "install", 123, [{"dest": "x", "backup": None,
                                                                              "placed": True}])
    assert registry.operation_for(conn, "sources", "Random").id == "op1"
    with db.transaction(conn):
        registry.end_operation(conn, "op1")
    assert registry.operations(conn) == []


def test_concurrent_writers_queue_instead_of_failing(tmp_path):
    path = tmp_path / "registry.db"
    db.initialise(path)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        connection = db.connect(path)
        try:
            for n in range(20):
                with db.transaction(connection):
                    name = f"p{index}-{n}"
                    if registry.find_by_key(connection, "sinks", name) is None:
                        registry.save(connection, plugin_type="sinks", name=name, version="", descriptor=None,
                                      request=None, sha256=None, files=[], functions=[])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    check = db.connect(path)
    assert len(registry.list_names(check, "sinks")) == 120
    check.close()


def test_a_failed_transaction_rolls_back(conn):
    with pytest.raises(RuntimeError):
        with db.transaction(conn):
            save_inner = registry.save
            save_inner(conn, plugin_type="sinks", name="x", version="", descriptor=None, request=None, sha256=None,
                       files=[], functions=[])
            raise RuntimeError("boom")
    assert registry.list_names(conn, "sinks") == []
    assert not conn.in_transaction
