"""The SQLite registry: schema, invariants and transactions, on a real file."""

from __future__ import annotations

import gc
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kuiper_plugins.errors import RegistryUnavailable
from kuiper_plugins.store import db, registry


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
            sha256=None, files=[registry.RecordedFile(f) for f in files], functions=list(functions), **kw,
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
    (op,) = registry.operations(conn)
    assert (op.id, op.type, op.name, op.kind, op.pid) == ("op1", "sources", "random", "install", 123)
    assert registry.operation_for(conn, "sources", "Random").id == "op1"
    assert registry.operation_for(conn, "sinks", "random") is None
    with db.transaction(conn):
        registry.end_operation(conn, "op1")
    assert registry.operations(conn) == []


def test_the_journal_column_of_the_first_schema_is_migrated_away(tmp_path):
    path = tmp_path / "registry.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN")
    for statement in db.MIGRATIONS[0].split(";"):
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO plugins (type, name, name_key, created_at, updated_at) VALUES ('sinks', 'a', 'a', 1, 1)")
    raw.execute("COMMIT")
    raw.close()
    db.initialise(path)
    conn = db.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(operations)")]
    assert "journal" not in columns
    assert registry.list_names(conn, "sinks") == ["a"]
    conn.close()


def test_reads_of_a_corrupt_registry_are_refused_cleanly(tmp_path):
    path = tmp_path / "registry.db"
    db.initialise(path)
    conn = db.connect(path)
    save(conn, "misc", functions=["f1"])
    conn.close()
    garbage = b"\x00garbage, not SQLite" * 512
    path.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    with pytest.raises(RegistryUnavailable, match="not a database"):
        db.connect(path)
    with pytest.raises(RegistryUnavailable, match="is corrupt .* leaves the file as it is"):
        db.check(path)
    with pytest.raises(RegistryUnavailable, match="is corrupt"):
        db.initialise(path)
    assert path.read_bytes() == garbage


def test_check_reads_without_writing(tmp_path):
    path = tmp_path / "registry.db"
    db.check(path)  # no file yet: nothing to check, nothing created
    assert not path.exists()
    db.initialise(path)
    conn = db.connect(path)
    save(conn, "misc")
    conn.close()
    content = path.read_bytes()
    db.check(path)
    assert path.read_bytes() == content


def test_a_registry_locked_past_the_busy_timeout_is_a_503(tmp_path):
    """Without waiting the real timeout: the holder's lock is seen by a connection with no patience."""
    path = tmp_path / "registry.db"
    db.initialise(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    impatient = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        with pytest.raises(RegistryUnavailable, match="database is locked") as refused:
            with db.transaction(impatient):
                pass
        assert refused.value.status == 503 and refused.value.retry_after >= 1
    finally:
        impatient.close()
        holder.execute("ROLLBACK")
        holder.close()


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


def test_reads_in_a_snapshot_never_straddle_another_commit(tmp_path):
    """A describe reads a plugin row, then its functions: an update committed in between must not show."""
    path = tmp_path / "registry.db"
    db.initialise(path)
    writer = db.connect(path)
    reader = db.connect(path)
    try:
        old_id = save(writer, "misc", functions=["f1", "f2"])
        with db.snapshot(reader):
            plugin = registry.find(reader, "functions", "misc")
            save(writer, "misc", functions=["g1"], replaces=old_id)  # another worker's update commits
            assert registry.functions_of(reader, plugin.id) == ["f1", "f2"]
        assert not reader.in_transaction
        # Outside a snapshot, the same two reads see half of each state: a plugin without its functions.
        plugin = registry.find(reader, "functions", "misc")
        with db.transaction(writer):
            registry.remove(writer, plugin.id)  # another worker's delete commits
        assert registry.functions_of(reader, plugin.id) == []
    finally:
        writer.close()
        reader.close()


def _initialise_when_released(path, barrier, results) -> None:
    # A forked child must not finalize what it inherited: a pynng socket an earlier test left to the collector
    # would close here, and nng panics in a forked process (as gunicorn's workers, it freezes them first).
    gc.freeze()
    barrier.wait(timeout=30)
    try:
        db.initialise(path)
        results.put("ok")
    except RegistryUnavailable as exc:
        results.put(exc.message)


def test_workers_starting_together_on_a_new_registry_all_start(tmp_path):
    """Switching a new file to WAL does not wait on the busy handler: initialise must wait itself."""
    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        path = tmp_path / f"registry-{round_}.db"
        barrier, results = context.Barrier(8), context.Queue()
        workers = [context.Process(target=_initialise_when_released, args=(path, barrier, results))
                   for _ in range(8)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
        assert outcomes == ["ok"] * 8
        conn = db.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


# ---------------------------------------------------------------------------- change detection for cached reads


def _wal_database(path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return conn


def test_changes_asks_sqlite_only_once_the_wal_header_moved(tmp_path):
    path = tmp_path / "r.db"
    writer = _wal_database(path)
    reader = sqlite3.connect(path, isolation_level=None)
    asked: list[str] = []
    reader.set_trace_callback(asked.append)
    changes = db.Changes(reader, path)
    start = changes.version()
    assert [changes.version() for _ in range(5)] == [start] * 5
    assert asked == ["PRAGMA data_version"] * 2  # the first asks, the second learns the header; then none
    writer.execute("INSERT INTO t VALUES (1)")  # another connection commits
    after_one = changes.version()
    assert after_one != start and len(asked) == 3
    assert changes.version() == after_one and len(asked) == 3
    # Another process commits: the header lives in the shared -shm file, so this worker sees it too.
    subprocess.run([sys.executable, "-c", f"import sqlite3; c = sqlite3.connect({str(path)!r}, isolation_level=None);"
                    " c.execute('INSERT INTO t VALUES (2)')"], check=True, timeout=30)
    after_two = changes.version()
    assert after_two != after_one and len(asked) == 4
    # A checkpoint that restarts the WAL moves the header without a commit: SQLite is asked, nothing changed.
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.execute("INSERT INTO t VALUES (3)")
    assert changes.version() != after_two
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 3
    writer.close()
    reader.close()


def test_changes_without_a_wal_asks_every_time(tmp_path):
    path = tmp_path / "rollback.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE t (x)")
    reader = sqlite3.connect(path, isolation_level=None)
    asked: list[str] = []
    reader.set_trace_callback(asked.append)
    changes = db.Changes(reader, path)
    start = changes.version()
    assert changes.version() == start and len(asked) == 2
    writer.execute("INSERT INTO t VALUES (1)")
    assert changes.version() != start and len(asked) == 3
    writer.close()
    reader.close()


# SQLite's unix VFS: the byte of the -shm file on which each process with the database open holds a shared
# lock (UNIX_SHM_BASE + SQLITE_SHM_NLOCK = (22 + 8) * 4 + 8): a process that can lock it exclusively takes
# itself for the first to open the database, and cuts the -shm file to 3 bytes to begin the index anew.
SHM_DMS_BYTE = 128


def _dms_lock_is_free(shm: Path) -> bool:
    """Whether another process could take the -shm file's DMS byte exclusively (asked from a new process)."""
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             f"try: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, {SHM_DMS_BYTE}); print('free')\n"
             "except OSError: print('held')")
    done = subprocess.run([sys.executable, "-c", probe, str(shm)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "free"


def test_the_change_check_keeps_sqlites_own_locks_on_the_wal_index(tmp_path):
    """A worker's look at the WAL index must not drop SQLite's locks: closing a descriptor of the -shm file
    drops all of the process's locks on it, and the next process to open the registry then cut the index
    to 3 bytes under the workers, which died of SIGBUS mid-request."""
    path = tmp_path / "r.db"
    writer = _wal_database(path)
    writer.execute("INSERT INTO t VALUES (1)")
    reader = sqlite3.connect(path, isolation_level=None)
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert not _dms_lock_is_free(Path(f"{path}-shm"))  # this process has the database open: SQLite says so
    changes = db.Changes(reader, path)
    for _ in range(3):
        changes.version()
        writer.execute("INSERT INTO t VALUES (2)")
    assert not _dms_lock_is_free(Path(f"{path}-shm"))
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 4
    writer.close()
    reader.close()
