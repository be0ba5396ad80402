"""Install, update and delete plugins without ever leaving one half-installed, through power cuts too.

Every operation on a plugin runs the same stages:
1. take the plugin's flock (busy -> refused at once, 400) and roll back any
   dead operation a crashed worker left on that name;
2. check the request against the registry (duplicate, not found, built-in
   names, function clashes), then reserve the name in the operations table
   and make a staging folder `data/.kuiper-plugins/staging/<operation id>`
   on the same filesystem (the reservation is not fsynced on its own: the
   journal is what recovery goes by, and the operation's last commit makes
   the row durable with it);
3. do the slow work inside staging: download, inspect, unpack, install.sh;
   refuse a destination that exists and is not recorded as this plugin's;
4. seal what will be moved: fsync every staged file and folder, taking the
   size and sha256 the registry will record;
5. write the journal (the operation and its file moves) beside the staging
   folder, `<operation id>.journal.json`, fsynced with the staging root (one
   fsync makes both names durable); then set every old file aside into the
   staging folder (a file being replaced is hard-linked, so its path never
   goes missing) and fsync that folder, make the moves with os.replace, and
   fsync every folder a move touched;
6. commit the plugin row, end the reservation and record the operation as
   finished, in one durable transaction: the commit point;
7. only then remove the staging folder (and with it the old files).
A failure before the commit point undoes the moves from the journal. After a
crash or power cut, `recover()` reads every journal left in staging: an
operation recorded as finished is finished (its staging folder removed);
any other is undone, whether or not its reservation survived. A 2xx is
answered only after step 6, so it never promises what a power cut can take
back. Between the reservation and the commit the registry is written to
only once more (the commit), so a busy registry makes an operation wait at
its start or at its commit point only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuiper_plugins import found_files
from kuiper_plugins.engine import compat, kv, live, portable
from kuiper_plugins.errors import (
    ArchiveRejected,
    DiskFull,
    Forbidden,
    InstallFailed,
    InvalidRequest,
    PackageInvalid,
    PluginBusy,
    PluginError,
    PluginNotFound,
    ScriptFailed,
)
from kuiper_plugins.install import archive, durable, fetch, packages, scripts
from kuiper_plugins.install.locks import PluginLock, blocking_lock, plugin_lock
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE, Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db, registry

log = logging.getLogger(__name__)

DESCRIPTOR_MAX_BYTES = 1024 * 1024
# A config copy found beside an adopted plugin is compared with the folder's own file only up to this size:
# a yaml or json of more is not one eKuiper's install wrote from a plugin package, and is left alone.
CONFIG_COPY_MAX_BYTES = 1024 * 1024
# Ours, but read at start-up from a folder anything may have written into: never read without a bound.
# (A journal lists one entry per file moved: a 10,000-file package makes well under 4 MiB.)
JOURNAL_MAX_BYTES = 64 * 1024 * 1024
# An operation's journal sits beside its staging folder, `<operation>.journal.json`, so that one fsync of
# the staging root makes both names durable; versions before kept it inside, as `journal.json`, and a
# journal found there is honoured all the same.
JOURNAL_SUFFIX = ".journal.json"
PARTIAL_SUFFIX = JOURNAL_SUFFIX + ".partial"  # a journal being written: never read, removed with its folder
LEGACY_JOURNAL_FILE = "journal.json"
ENGINE_ROWS_FILE = "engine-rows.json"  # the engine's rows for a plugin before its hand-over, in staging
BACKUP_NAME = re.compile(r"backup/[0-9]+")
UNIT_PREFIX = "unit-"  # a staged unit's name in its operation's folder: unit-0, unit-1, ...
SO_FILE_NAME = re.compile(r"([A-Za-z0-9_-]+?)(?:@([A-Za-z0-9._+-]+))?\.so")


@dataclass
class _Operation:
    id: str
    staging: Path
    plugin_type: str
    name: str
    kind: str
    journal: list[dict[str, Any]] = field(default_factory=list)
    committed: bool = False
    engine_changed: bool = False  # a portable plugin was stopped or started in the running engine


def type_label(plugin_type: str) -> str:
    """How eKuiper names a type in messages: `sources`, `sinks`, `functions`, `portable`."""
    return "portable" if plugin_type == PORTABLE else plugin_type


class Installer:
    """Carries out plugin operations against one KUIPER_HOME and its registry."""

    def __init__(self, settings: Settings, connect: Callable[[], sqlite3.Connection], engine=None):
        self.settings = settings
        self.engine = engine  # an EngineClient when engine.url is set
        self.layout = Layout.of(settings)
        # With an engine, native changes are also made through its API, to be live before the answer.
        self.live = live.LiveEngine(engine, self.layout) if engine is not None else None
        self._connect = connect  # a fresh connection, for start-up recovery
        self._writer = db.KeptWriter(self.layout.registry_file)  # the operations' connection, kept between them
        self.engine_store = kv.EngineStore(kv.store_path(self.layout.data, settings.store_sqlite_name))

    def close(self) -> None:
        """Close this thread's kept connections (a test restarting a service in-process)."""
        self._writer.close()
        self.engine_store.close()

    # ---------------------------------------------------------------- operations

    def install(self, plugin_type: str, request: dict[str, Any], *, unprivileged_caller: str | None = None) -> None:
        """Install a new plugin from the request's package URL.

        `unprivileged_caller` names a caller who is neither root, this service's user nor a token's holder:
        a package with an install.sh (which runs as this service's user) is refused for such a caller.
        """
        name = request["name"]
        with self._logged("install", plugin_type, name, request) as outcome:
            fetch.check_url(request["file"])  # eKuiper's order: the URL, then duplicate, then function names
            with self._locked(plugin_type, name) as conn:
                if registry.find_by_key(conn, plugin_type, name) is not None:
                    raise InvalidRequest(f"invalid name {name}: duplicate")
                self._refuse_before_fetching(conn, plugin_type, request, None)
                with self._reserved(conn, plugin_type, name, "install") as op:
                    outcome.update(self._install_package(conn, op, plugin_type, request, old=None,
                                                         unprivileged_caller=unprivileged_caller))
                self._project(conn, plugin_type, name)

    def update(self, plugin_type: str, name: str, request: dict[str, Any], *,
               unprivileged_caller: str | None = None) -> None:
        """Replace an installed plugin by a new package; the old one stays whole until the new one is in.

        `unprivileged_caller` is as for `install`.
        """
        with self._logged("update", plugin_type, name, request) as outcome:
            fetch.check_url(request["file"])
            with self._locked(plugin_type, name) as conn:
                old = registry.find(conn, plugin_type, name)
                if old is None:
                    if plugin_type != PORTABLE:
                        raise PluginNotFound(
                            f"update {plugin_type} plugin {name} error, cannot delete old version:"
                            f" invalid name {name}: not exist"
                        )
                    if registry.find_by_key(conn, plugin_type, name) is not None:
                        raise InvalidRequest(f"invalid name {name}: duplicate")
                self._refuse_before_fetching(conn, plugin_type, request, old)
                with self._reserved(conn, plugin_type, name, "update") as op:
                    outcome.update(self._install_package(conn, op, plugin_type, request, old=old,
                                                         unprivileged_caller=unprivileged_caller))
                self._project(conn, plugin_type, name)

    def delete(self, plugin_type: str, name: str) -> None:
        """Remove exactly the files the install wrote, the plugin's functions and its registry entry.

        A source's yaml stays, as a user's configuration does. Files already gone from disk are not an
        error: the registry entry goes all the same.
        """
        with self._logged("delete", plugin_type, name, None) as outcome, self._locked(plugin_type, name) as conn:
            plugin = self._require(conn, plugin_type, name, "delete")
            outcome["version"] = plugin.version
            kept = set(packages.kept_on_delete(plugin_type, name))
            with self._reserved(conn, plugin_type, name, "delete") as op:
                if self.live is not None and plugin_type in NATIVE_TYPES:
                    outcome["engine"] = self.live.delete_native(
                        op.staging, plugin_type, name, _so_file(plugin_type, registry.files_of(conn, plugin.id)))
                elif self.live is not None:
                    op.engine_changed = True
                    outcome["engine"] = self.live.delete_portable(op.staging, name)
                present = [f for f in registry.files_of(conn, plugin.id) if f not in kept and self._exists(f)]
                self._publish(op, [(None, f) for f in present])
                with db.transaction(conn):
                    registry.remove(conn, plugin.id)
                    registry.end_operation(conn, op.id, committed=True)
                op.committed = True
            self._project(conn, plugin_type, name)

    def register_functions(self, name: str, functions: Sequence[str]) -> None:
        """Replace the function list of a native function plugin."""
        with self._locked("functions", name, roll_back_stale=False) as conn:
            plugin = registry.find(conn, "functions", name)
            if plugin is None:
                raise PluginNotFound(f"register functions plugin {name} error: not found")
            if not functions:
                raise InvalidRequest(
                    f"function plugins {name} regiser functions error: property 'functions' must not be empty"
                )
            _refuse_builtin_functions(functions)
            self._refuse_function_clashes(conn, functions, plugin.id)
            # The engine's refusal comes before our commit, and changes nothing on either side.
            engine = self.live.register_functions(name, functions) if self.live is not None else None
            try:
                if engine == live.LOADED:
                    _refuse_uncallable(self.live, functions, f"function plugins {name} regiser functions error",
                                       "the function list is unchanged")
                with db.transaction(conn):
                    registry.set_functions(conn, plugin.id, functions)
            except (sqlite3.IntegrityError, PluginError):
                if engine == live.LOADED:
                    self._give_back_functions(name, registry.functions_of(conn, plugin.id))
                    self._project(conn, "functions", name)  # the engine rewrote its pluginFuncs row both times
                self._refuse_function_clashes(conn, functions, plugin.id)
                raise
            self._project(conn, "functions", name)
            log.info("functions plugin %s now exports %s", name, ",".join(functions))

    def _give_back_functions(self, name: str, functions: Sequence[str]) -> None:
        """Put the engine's function list back after our commit failed (best effort, logged)."""
        try:
            self.live.register_functions(name, functions)
        except PluginError as exc:
            log.error("the running engine keeps the new function list of %s, our registry the old one (%s);"
                      " they agree again at the engine's next start", name, exc.message)

    # ---------------------------------------------------------------- start-up recovery

    def recover(self) -> None:
        """Finish or undo what crashed workers left in staging, sweep scratch, adopt hand-copied .so files.

        Every journal in staging is honoured: an operation recorded as finished is finished, any other
        is undone, whether or not its reservation survived; a folder without a journal made no move and
        is removed. Each is handled under its plugin's flock: a free lock proves its owner is dead.
        Whatever cannot be done now (a read-only or locked registry) is logged and left for the next
        start or the next operation on that plugin; start-up goes on so that reads are still served.
        """
        with blocking_lock(self.layout.locks / "recovery.lock"):
            conn = self._connect()
            try:
                seen = set()
                for folder in _operation_folders(self.layout.staging):
                    seen.add(folder.name)
                    try:
                        self._recover_folder(conn, folder)
                    except (PluginError, OSError) as exc:
                        log.error("could not recover the operation in %s: %s; it will be retried", folder, exc)
                for op in registry.operations(conn):
                    if op.id not in seen:
                        self._recover_folder(conn, self.layout.staging / op.id)
                self._forget_cleared(conn)
                self._sweep_locks()
                self._adopt(conn)
                self.reconcile_engine_store(conn)
            finally:
                conn.close()

    def _recover_folder(self, conn: sqlite3.Connection, folder: Path) -> None:
        """Finish or undo the operation whose staging folder this is, unless its worker is alive."""
        journal = _read_journal(folder)
        op_row = next((op for op in registry.operations(conn) if op.id == folder.name), None)
        owner = (journal["type"], journal["name"]) if journal else (op_row.type, op_row.name) if op_row else None
        if owner is None:
            # No journal, no reservation: it moved nothing, unless it shielded files from the engine.
            log.info("settling %s, left by an operation that made no move of its own", folder)
            live.restore_set_aside(self.layout, folder)
            live.restore_handed(self.layout, folder)
            live.remove_handover(self.layout, folder, None)
            _remove_staging(folder)
            return
        lock = plugin_lock(self.layout.locks, *owner)
        if not lock.try_acquire():
            return  # its owner is alive and working
        try:
            self._settle(conn, folder, op_row)
        finally:
            lock.release()

    def _settle(self, conn: sqlite3.Connection, folder: Path, op_row: registry.Operation | None) -> None:
        """Finish or undo a dead operation from what its staging folder says; the caller holds its lock."""
        op_id = folder.name
        live.restore_set_aside(self.layout, folder)  # a crash around the engine's delete: files go back first
        live.restore_handed(self.layout, folder)  # and around a portable hand-over
        journal = _read_journal(folder)
        if op_id in registry.finished_operations(conn):
            if _clear_staging(folder):
                with db.transaction(conn):
                    registry.forget_finished(conn, [op_id])
            log.info("finished clearing the committed operation %s", op_id)
            return
        killed = scripts.kill_marked(op_id)
        # A hand-over to the engine cut short: its package goes, and the rows its install wrote are undone.
        live.remove_handover(self.layout, folder, journal["name"] if journal else op_row.name if op_row else None)
        self._restore_engine_rows(folder)
        self._undo(journal["moves"] if journal else [], folder)
        _drop_journal(folder)
        with db.transaction(conn):
            registry.end_operation(conn, op_id)
        _remove_staging(folder)
        about = journal or (vars(op_row) if op_row else {"kind": "operation", "type": "-", "name": "-"})
        log.warning(
            "rolled back the unfinished %s of %s plugin %s (operation %s, worker pid %s, %d processes killed)",
            about["kind"], type_label(about["type"]), about["name"], op_id, op_row.pid if op_row else "unknown",
            killed,
        )

    def _forget_cleared(self, conn: sqlite3.Connection) -> None:
        """Drop the finished-operation records whose staging folders are gone."""
        cleared = [i for i in registry.finished_operations(conn)
                   if not any(os.path.lexists(path) for path in _journal_files(self.layout.staging / i))
                   and not os.path.lexists(self.layout.staging / i)]
        if cleared:
            with db.transaction(conn):
                registry.forget_finished(conn, cleared)

    def _sweep_locks(self) -> None:
        """Remove the lock files that killed workers left behind (a free lock is nobody's)."""
        for path in self.layout.locks.glob("*.*.lock"):
            lock = PluginLock(path)
            if lock.try_acquire():
                lock.release()

    def _adopt(self, conn: sqlite3.Connection) -> None:
        """List the plugins found on disk that the registry does not know, as eKuiper's boot scan does.

        Native .so files copied in by hand or installed by eKuiper take their function list from
        eKuiper's `pluginFuncs` and their package URL from its `nativePlugin` rows; every portable
        folder whose descriptor eKuiper would accept is listed too. A file an unfinished operation's
        journal names is not hand-copied, and an empty or unreadable binary is not a plugin: both are
        left alone (the second logged).
        """
        recorded = registry.all_recorded_files(conn)
        journaled = self._journaled_files()
        engine = self._engine_rows_for_adoption()
        for plugin_type in NATIVE_TYPES:
            for so_path in sorted(self.layout.native_dir(plugin_type).glob("*.so")):
                self._adopt_so(conn, plugin_type, so_path, recorded, journaled, engine)
        portable_root = self.layout.plugins / "portable"
        for folder in sorted(p for p in portable_root.iterdir() if p.is_dir() and not p.is_symlink()):
            self._adopt_folder(conn, folder, recorded, journaled, engine)

    def adopt_offered(self, plugin_type: str, name: str) -> bool:
        """Adopt one plugin the running engine offers, from its files on disk, by start-up's rules.

        Return whether the registry has the plugin now. A plugin whose lock is held (an operation of
        ours in flight) is left alone: that operation commits or undoes its own files.
        """
        key = registry.name_key(name)
        with self._writer.session() as conn:
            recorded = registry.all_recorded_files(conn)
            journaled = self._journaled_files()
            engine = self._engine_rows_for_adoption()
            if plugin_type == PORTABLE:
                folder = self.layout.portable_dir(name)
                if folder.is_dir() and not folder.is_symlink():
                    self._adopt_folder(conn, folder, recorded, journaled, engine)
            else:
                for so_path in native_binaries(self.layout, plugin_type, name):
                    self._adopt_so(conn, plugin_type, so_path, recorded, journaled, engine)
            found = registry.find_by_key(conn, plugin_type, name)
        return found is not None and registry.name_key(found.name) == key

    def forget_removed(self, plugin_type: str, name: str) -> bool:
        """Forget a plugin whose binary (or portable folder) is gone: the engine's own delete removed it.

        No file and no row of eKuiper's store is touched: the engine's delete took what it removes, and
        what it left is logged, never removed. Return whether the plugin was forgotten; a plugin with an
        operation in flight, or whose binary is back, is not.
        """
        with plugin_lock(self.layout.locks, plugin_type, name) as lock:
            if not lock.try_acquire():
                return False
            with self._writer.session() as conn:
                plugin = registry.find_by_key(conn, plugin_type, name)
                if plugin is None or registry.operation_for(conn, plugin_type, name) is not None:
                    return False
                files = registry.files_of(conn, plugin.id)
                main = main_file(plugin_type, plugin.name, files)
                if main is None or self._exists(main):
                    return False
                with db.transaction(conn):
                    registry.remove(conn, plugin.id)
            left = [f for f in files if self._exists(f)]
        log.warning("forgot %s plugin %s: the engine no longer has it and %s is gone%s", type_label(plugin_type),
                    plugin.name, main, f"; left in place, no longer recorded: {', '.join(left)}" if left else "")
        return True

    def _adopt_so(self, conn: sqlite3.Connection, plugin_type: str, so_path: Path, recorded: set[str],
                  journaled: set[str], engine: dict[str, Any]) -> None:
        """Adopt one native binary found on disk, unless it is recorded, journaled or not a plugin the API takes."""
        relative = self.layout.relative(so_path)
        if relative in recorded or relative in journaled:
            return
        try:
            mode = so_path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            # A link, FIFO, socket or device: an install never writes one, and reading it could block.
            log.warning("not adopting %s: it is a %s, not a regular file", relative, found_files.kind_of(mode))
            return
        match = SO_FILE_NAME.fullmatch(so_path.name)
        if match is None:
            log.warning("ignoring %s: its name does not make a plugin name", relative)
            return
        name = match.group(1)[0].lower() + match.group(1)[1:]
        try:
            packages.check_plugin_name(plugin_type, name)
        except InvalidRequest as exc:
            log.warning("not adopting %s: %s (the API refuses such an install)", relative, exc.message)
            return
        self._adopt_under_lock(plugin_type, name, relative, self._adopt_native,
                               conn, plugin_type, name, relative, match.group(2), engine)

    def _adopt_folder(self, conn: sqlite3.Connection, folder: Path, recorded: set[str], journaled: set[str],
                      engine: dict[str, Any]) -> None:
        """Adopt one portable plugin folder found on disk, unless it is recorded, journaled or badly named."""
        relative = self.layout.relative(folder)
        if relative in recorded or relative in journaled:
            return
        try:
            packages.check_plugin_name(PORTABLE, folder.name)
        except InvalidRequest as exc:
            log.warning("not adopting portable plugin folder %s: %s", folder, exc.message)
            return
        self._adopt_under_lock(PORTABLE, folder.name, relative, self._adopt_portable, conn, folder, engine)

    def _adopt_under_lock(self, plugin_type: str, name: str, relative: str, adopt: Callable[..., None], *args) -> None:
        # A file an operation in flight has just moved in is not hand-copied: that operation holds the
        # plugin's lock until it has committed (and recorded the file) or rolled back.
        with plugin_lock(self.layout.locks, plugin_type, name) as lock:
            if not lock.try_acquire():
                return
            try:
                adopt(*args)
            except PluginError as exc:
                log.error("could not adopt %s: %s", relative, exc.message)

    def _engine_rows_for_adoption(self) -> dict[str, Any]:
        """What eKuiper's own store says of its plugins: install scripts and function lists."""
        try:
            return {
                "native": self.engine_store.native_plugins(),
                "functions": self.engine_store.function_lists(),
                "portable": self.engine_store.portable_plugins(),
            }
        except PluginError as exc:
            log.warning("cannot read eKuiper's store for adoption (%s): adopting from the files alone", exc.message)
            return {"native": {}, "functions": {}, "portable": {}}

    def _journaled_files(self) -> set[str]:
        """Every destination named by a journal still in staging (operations in flight or not yet settled)."""
        named: set[str] = set()
        for folder in _operation_folders(self.layout.staging):
            try:
                journal = _read_journal(folder)
            except PluginError:
                continue
            named.update(move["dest"] for move in (journal or {}).get("moves", []))
        return named

    def _adopt_native(self, conn: sqlite3.Connection, plugin_type: str, name: str, relative: str,
                      version: str | None, engine: dict[str, Any]) -> None:
        print_ = durable.fingerprint(self.layout.absolute(relative))
        if print_ is None or print_.size == 0:
            log.warning("not adopting %s: it is empty or unreadable", relative)
            return
        script = engine["native"].get((plugin_type, name))
        functions = [name]
        if plugin_type == "functions" and engine["functions"].get(name):
            functions = _adoptable_functions(name, engine["functions"][name])
        if plugin_type != "functions":
            functions = []
        request = _request_of(script, functions if name in engine["functions"] else None)
        copies = self._claimed_copies(plugin_type, name, None, packages.config_copies(plugin_type, name),
                                      installed_by_engine=script is not None)
        self._save_adopted(conn, plugin_type, name, (version or "").removeprefix("v"), None, request,
                           [registry.RecordedFile(relative, print_.size, print_.sha256)], copies, functions)

    def _adopt_portable(self, conn: sqlite3.Connection, folder: Path, engine: dict[str, Any]) -> None:
        """Adopt a portable plugin folder whose `<name>/<name>.json` eKuiper's boot scan and our install accept.

        The descriptor is read as anything found in the tree is (see found_files): a FIFO, link or oversized
        file there is logged and the folder skipped. Its symbols follow the install's rules, and an executable
        reached through a link is refused, as a package holding a link is.
        """
        name = folder.name
        try:
            raw = found_files.read_regular(folder / packages.descriptor_member(name), DESCRIPTOR_MAX_BYTES)
            info = packages.parse_descriptor(name, raw)
        except (OSError, PackageInvalid) as exc:
            log.warning("not adopting portable plugin folder %s: %s", folder, getattr(exc, "message", exc))
            return
        problem = _executable_problem(folder, info["executable"])
        if problem is not None:
            log.warning("not adopting portable plugin %s: %s", name, problem)
            return
        descriptor = dict(info, executable=str(self.layout.portable_dir(name) / info["executable"]))
        print_ = durable.fingerprint(folder)
        script = engine["portable"].get(name)
        copies = self._claimed_copies(PORTABLE, name, folder, packages.config_copies(PORTABLE, name, info),
                                      installed_by_engine=script is not None)
        self._save_adopted(conn, PORTABLE, name, info["version"], descriptor, _request_of(script),
                           [registry.RecordedFile(self.layout.relative(folder), print_.size if print_ else None,
                                                  print_.sha256 if print_ else None)],
                           copies, list(info["functions"]))

    def _claimed_copies(self, plugin_type: str, name: str, folder: Path | None, copies: list[packages.ConfigCopy],
                        *, installed_by_engine: bool) -> list[str]:
        """The config copies on disk that `packages.claims_copy` gives to a plugin found on disk.

        A copy the plugin's folder still holds the packaged original of is compared with it byte for byte;
        a copy that is not a regular file (or real folder) where one is expected is logged and never claimed.
        """
        claimed = []
        for copy in copies:
            path = self.layout.absolute(copy.path)
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue
            if not (stat.S_ISDIR(mode) if copy.is_dir else stat.S_ISREG(mode)):
                log.warning("not claiming %s for %s plugin %s: it is a %s, not a regular %s", copy.path,
                            type_label(plugin_type), name, found_files.kind_of(mode),
                            "folder" if copy.is_dir else "file")
                continue
            same = None
            packaged = folder / copy.packaged_as if folder is not None and copy.packaged_as else None
            if packaged is not None and os.path.lexists(packaged):
                same = self._same_bytes(path, packaged)
            if packages.claims_copy(copy, same_as_packaged=same, installed_by_engine=installed_by_engine):
                claimed.append(copy.path)
            else:
                log.info("leaving %s to its owner: %s plugin %s found on disk does not own it", copy.path,
                         type_label(plugin_type), name)
        return claimed

    @staticmethod
    def _same_bytes(copy: Path, packaged: Path) -> bool:
        """Whether a config copy holds exactly the bytes of the plugin folder's file (both bounded reads)."""
        try:
            return (found_files.read_regular(copy, CONFIG_COPY_MAX_BYTES)
                    == found_files.read_regular(packaged, CONFIG_COPY_MAX_BYTES))
        except OSError as exc:
            log.warning("cannot compare %s with %s: %s", copy, packaged, exc)
            return False

    def _save_adopted(self, conn: sqlite3.Connection, plugin_type: str, name: str, version: str,
                      descriptor: dict[str, Any] | None, request: dict[str, Any] | None,
                      main: list[registry.RecordedFile], copies: list[str], functions: list[str]) -> None:
        """Record a plugin found on disk, with the config copies of its name that nobody else owns."""
        with db.transaction(conn):
            if registry.file_owners(conn, [f.path for f in main], None) or not all(self._exists(f.path) for f in main):
                return  # recorded or removed meanwhile
            if registry.operation_for(conn, plugin_type, name) is not None:
                log.warning("not adopting %s yet: an unfinished operation on %s awaits its roll-back", main[0].path,
                            name)
                return
            if registry.find_by_key(conn, plugin_type, name) is not None:
                log.warning("ignoring %s: plugin %s is already installed", main[0].path, name)
                return
            if functions and registry.function_clashes(conn, functions, None):
                if plugin_type == PORTABLE:
                    log.error("not adopting portable plugin %s: its functions clash with installed ones", name)
                    return
                functions = []
            taken = {path for path, _type, _name in registry.file_owners(conn, copies, None)}
            files = main + [_recorded_now(self.layout.absolute(p), p) for p in copies
                            if p not in taken and self._exists(p)]
            registry.save(conn, plugin_type=plugin_type, name=name, version=version, descriptor=descriptor,
                          request=request, sha256=None, files=files, functions=functions, adopted=True)
        log.info("adopted %s plugin %s from %s found on disk", type_label(plugin_type), name, main[0].path)

    # ---------------------------------------------------------------- eKuiper's own store

    def reconcile_engine_store(self, conn: sqlite3.Connection) -> None:
        """Make eKuiper's plugin rows equal the projection of the whole registry (start-up)."""
        from kuiper_plugins.lifecycle.verify import plugins_missing_files  # lifecycle builds on install: imported late
        damaged = plugins_missing_files(conn, self.layout)  # a plugin whose files are missing is not offered to eKuiper
        rows = [row for plugin, functions in registry.all_plugins(conn) if (plugin.type, plugin.name) not in damaged
                for row in engine_rows(plugin.type, plugin.name, plugin.request, functions)]
        try:
            self.engine_store.reconcile(rows)
        except PluginError as exc:
            log.error("eKuiper's store could not be reconciled with the registry (%s); the next start will",
                      exc.message)

    def _project(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> None:
        """Rewrite one plugin's rows in eKuiper's store after our registry committed its change.

        The registry is the truth: a failure here is logged, and start-up reconciles the store.
        """
        plugin = registry.find(conn, plugin_type, name)
        put = engine_rows(plugin_type, name, plugin.request, registry.functions_of(conn, plugin.id)) if plugin else []
        kept = {(row.table, row.key) for row in put}
        delete = [key for key in engine_keys(plugin_type, name) if key not in kept]
        try:
            self.engine_store.apply(put=put, delete=delete)
        except PluginError as exc:
            log.error("eKuiper's store was not updated for %s plugin %s (%s); start-up will reconcile it",
                      type_label(plugin_type), name, exc.message)

    # ---------------------------------------------------------------- the stages

    def _refuse_before_fetching(
        self, conn: sqlite3.Connection, plugin_type: str, request: dict[str, Any], old: registry.Plugin | None
    ) -> None:
        """What the request alone decides, before anything is downloaded: built-in names, function clashes."""
        name = request["name"]
        packages.check_plugin_name(plugin_type, name)
        if plugin_type == "functions":
            functions = request.get("functions") or [name]
            _refuse_builtin_functions(functions)
            self._refuse_function_clashes(conn, functions, old.id if old is not None else None)

    def _install_package(
        self, conn: sqlite3.Connection, op: _Operation, plugin_type: str, request: dict[str, Any],
        old: registry.Plugin | None, unprivileged_caller: str | None = None,
    ) -> dict[str, Any]:
        name = request["name"]
        settings = self.settings
        fetched = fetch.fetch(
            request["file"], op.staging, uploads_dir=self.layout.uploads,
            allow_external_file_access=settings.allow_external_file_access,
            enable_private_net=settings.enable_private_net,
            private_net_allow_list=settings.private_net_allow_list, max_size=settings.max_plugin_size,
            timeout=settings.download_timeout, tls_verify=settings.tls_verify, sha256=request.get("sha256"),
        )
        try:
            entries, plan = self._plan(plugin_type, name, request, fetched.path)
            old_id = old.id if old is not None else None
            self._refuse_function_clashes(conn, plan.functions, old_id)
            if plan.script and not settings.install_scripts:
                raise ScriptFailed("the package has an install.sh and basic.installScripts is false")
            if plan.script and unprivileged_caller is not None:
                raise Forbidden(
                    f"the package has an install.sh, which runs as this service's user, and the caller is"
                    f" {unprivileged_caller}: only root, this service's user or a token's holder may install"
                    " a package that carries one (packages without install.sh are not affected)"
                )
            if plan.script:
                scripts.require_confinement()  # refused before unpacking where install.sh cannot be confined
            unpacked = op.staging / "unpacked"
            unpacked.mkdir()
            archive.extract(fetched.path, entries, unpacked)
        except (ArchiveRejected, PackageInvalid, ScriptFailed, Forbidden) as exc:
            raise exc.with_prefix("fail to install plugin")
        finally:
            fetched.path.unlink(missing_ok=True)

        compatibility = self._check_compatibility(plan, unpacked) if plugin_type in NATIVE_TYPES else None
        if plan.script and plugin_type != PORTABLE:
            # As eKuiper: a native plugin's install.sh runs in a scratch folder with the zip's other files.
            self._run_script(op, plan, request, unpacked)

        moves, files = self._stage_units(conn, op, plan, unpacked, old)
        self._publish(op, moves)
        if plugin_type == PORTABLE:
            files = self._finish_portable(op, plan, request, files)
        engine = None
        if self.live is not None and plugin_type in NATIVE_TYPES and old is None:
            # Go cannot unload a plugin: only a new one is handed over; an update waits for a restart.
            self._keep_engine_rows(op)
            engine = self.live.install_native(op.staging, plugin_type, name, plan.units[0].dest, plan.functions)
        elif self.live is not None and plugin_type == PORTABLE:
            engine = self._hand_portable(op, plan, old)
        descriptor = None
        if plan.descriptor is not None:
            descriptor = dict(plan.descriptor)
            descriptor["executable"] = str(self.layout.portable_dir(name) / plan.descriptor["executable"])
        try:
            if engine == live.LOADED and plugin_type == "functions":
                _refuse_uncallable(self.live, plan.functions, "fail to install plugin", "nothing was installed")
            with db.transaction(conn):
                registry.save(
                    conn, plugin_type=plugin_type, name=name, version=plan.version, descriptor=descriptor,
                    request=request, sha256=fetched.sha256, files=files, functions=plan.functions,
                    replaces=old.id if old is not None else None, compatibility=compatibility,
                )
                registry.end_operation(conn, op.id, committed=True)
        except sqlite3.IntegrityError:
            # Another plugin took a function or file between our checks and the commit.
            self._withdraw_from_engine(conn, op, engine, plan.units[0].dest)
            self._refuse_function_clashes(conn, plan.functions, old.id if old is not None else None)
            raise InstallFailed(f"fail to install plugin: a file of plugin {name} was taken by another plugin")
        except BaseException:
            self._withdraw_from_engine(conn, op, engine, plan.units[0].dest)
            raise
        op.committed = True
        outcome = {"version": plan.version, "sha256": fetched.sha256}
        if engine is not None:
            outcome["engine"] = engine
        return outcome

    def _hand_portable(self, op: _Operation, plan: packages.InstallPlan, old: registry.Plugin | None) -> str:
        """Make a published portable plugin live: the engine stops the old process, then starts the new one.

        eKuiper's own update is its delete then its install; the two are made apart, so that our new files
        are kept from the delete (it removes the plugin's folder) and handed to the install.
        """
        if self.live.portable_blocked(plan.name):
            return live.PENDING
        op.engine_changed = True
        if old is not None and self.live.delete_portable(op.staging, plan.name) == live.PENDING:
            return live.PENDING  # the engine keeps the old one until it restarts
        return self.live.install_portable(op.staging, plan.name, plan.descriptor or {})

    def _engine_back(self, conn: sqlite3.Connection, op: _Operation) -> None:
        """After an undone portable operation, make the engine run what the registry holds again (best effort).

        The engine may have stopped the old process or started the new one before the operation failed; its
        own delete also dropped its store row, which is written again from the registry.
        """
        try:
            plugin = registry.find(conn, PORTABLE, op.name)
            self.live.delete_portable(op.staging, op.name)
            if plugin is not None and plugin.descriptor is not None:
                folder = self.layout.portable_dir(op.name)
                descriptor = dict(plugin.descriptor,
                                  executable=Path(plugin.descriptor["executable"]).relative_to(folder).as_posix())
                self.live.install_portable(op.staging, op.name, descriptor)
        except (PluginError, OSError, ValueError) as exc:
            log.error("the running engine and the registry differ on portable plugin %s until the engine's next"
                      " start: %s", op.name, getattr(exc, "message", exc))
        self._project(conn, PORTABLE, op.name)

    def _withdraw_from_engine(self, conn: sqlite3.Connection, op: _Operation, engine: str | None,
                              so_dest: str) -> None:
        """Before an install handed to the engine is undone: the engine drops it, its rows go as ours say."""
        if engine != live.LOADED:
            return
        self.live.withdraw_native(op.staging, op.plugin_type, op.name, so_dest)
        self._restore_engine_rows(op.staging)

    def _keep_engine_rows(self, op: _Operation) -> None:
        """Write down, durably, the engine's rows for the plugin before its install writes its own."""
        values = self.engine_store.values(engine_keys(op.plugin_type, op.name))
        listed = [{"table": t, "key": k, "value": v.hex() if v is not None else None} for (t, k), v in values.items()]
        with open(op.staging / ENGINE_ROWS_FILE, "w") as out:
            json.dump(listed, out)
            out.flush()
            os.fsync(out.fileno())
        durable.sync_folders([op.staging])  # before the engine can write a row: recovery must find it

    def _restore_engine_rows(self, staging: Path) -> None:
        """Put the engine's rows back as they were before a hand-over that is being undone (logged if not)."""
        try:
            listed = json.loads(found_files.read_regular(staging / ENGINE_ROWS_FILE, JOURNAL_MAX_BYTES))
            self.engine_store.restore({(row["table"], row["key"]): bytes.fromhex(row["value"])
                                       if row["value"] is not None else None for row in listed})
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, PluginError) as exc:
            log.error("the engine's rows of the undone operation in %s were not put back: %s", staging, exc)

    def _check_compatibility(self, plan: packages.InstallPlan, unpacked: Path) -> dict[str, Any] | None:
        """Refuse, before install.sh or anything else runs, a binary engine.binary's plugin.Open would refuse."""
        if self.settings.engine_binary is None:
            return None  # a standalone registry: only the package rules apply
        binary = plan.units[0]
        verdict = compat.verdict_for(
            unpacked / binary.src, self.settings.engine_binary, engine_version=self.engine_version(),
            shown_as=Path(os.path.realpath(self.layout.absolute(binary.dest).parent)) / Path(binary.dest).name,
        )
        if not verdict.ok:
            raise PackageInvalid(verdict.message)
        return verdict.as_description()

    def _run_script(self, op: _Operation, plan: packages.InstallPlan, request: dict[str, Any], cwd: Path,
                    passed_env: dict[str, str] | None = None) -> None:
        try:
            scripts.run_install_script(
                cwd / plan.script, request.get("shellParas") or [], cwd=cwd,
                timeout=self.settings.install_script_timeout, marker=op.id, passed_env=passed_env,
            )
        except ScriptFailed as exc:
            raise exc.with_prefix("fail to install plugin")

    def _finish_portable(self, op: _Operation, plan: packages.InstallPlan, request: dict[str, Any],
                         files: list[registry.RecordedFile]) -> list[registry.RecordedFile]:
        """Run install.sh and the handshake in the plugin's own folder, in place (as eKuiper does), then seal it.

        The folder is already moved in (an update's old one set aside): a venv or an absolute link made by
        install.sh stays valid. A failure undoes the moves, taking the whole folder away and putting the
        old one back. What install.sh added is fsynced and fingerprinted before the commit.
        """
        folder = self.layout.portable_dir(plan.name)
        if plan.script:
            passed = {k: os.environ[k] for k in scripts.PORTABLE_PASSED_ENV if k in os.environ}
            self._run_script(op, plan, request, folder, passed)
        if self.settings.portable_verify_on_install:
            try:
                portable.verify_descriptor(folder, plan.name, plan.descriptor or {},
                                           python_bin=self.settings.portable_python_bin,
                                           init_timeout=self.settings.portable_init_timeout)
            except PackageInvalid as exc:
                raise exc.with_prefix("fail to install plugin")
        recorded = self.layout.relative(folder)
        print_ = durable.seal(folder)
        durable.sync_folders([folder.parent])
        return [registry.RecordedFile(recorded, print_.size, print_.sha256) if f.path == recorded else f
                for f in files]

    def engine_version(self) -> str | None:
        """The managed engine's version: its own answer (engine.url), else basic.kuiperVersion."""
        info = self.engine.info() if self.engine is not None else None
        return info.version if info is not None else self.settings.kuiper_version

    def _plan(
        self, plugin_type: str, name: str, request: dict[str, Any], zip_path: Path
    ) -> tuple[list[archive.Entry], packages.InstallPlan]:
        """Inspect the zip (refusing unsafe archives) and apply the package rules to its listing."""
        entries = archive.inspect(
            zip_path, max_entries=self.settings.max_archive_entries,
            max_unpacked_size=self.settings.max_unpacked_size,
        )
        shell_paras = request.get("shellParas") or []
        if plugin_type == PORTABLE:
            member = packages.descriptor_member(name)
            present = any(e.name == member and not e.is_dir for e in entries)
            raw = archive.read_member(zip_path, member, max_size=DESCRIPTOR_MAX_BYTES) if present else None
            return entries, packages.plan_portable(name, entries, raw, shell_paras=shell_paras)
        functions = request.get("functions") or [name]
        plan = packages.plan_native(plugin_type, name, entries, shell_paras=shell_paras, functions=functions,
                                    shown=lambda recorded: str(self.layout.absolute(recorded)))
        return entries, plan

    def _stage_units(
        self, conn: sqlite3.Connection, op: _Operation, plan: packages.InstallPlan, unpacked: Path,
        old: registry.Plugin | None,
    ) -> tuple[list[tuple[Path | None, str]], list[registry.RecordedFile]]:
        """Materialise and seal each unit in staging; return the moves to make and the files to record.

        A destination that exists must be recorded as this plugin's, or the install is refused: nothing
        that is not ours is replaced. The source yaml is the one exception (see `_kept_groups`).
        """
        old_records = {f.path: f for f in registry.recorded_files(conn, old.id)} if old is not None else {}
        kept_groups = self._kept_groups(plan, unpacked, old_records)
        placing = [u for u in plan.units if u.group not in kept_groups or u.group is None]
        owners = registry.file_owners(conn, [u.dest for u in placing], old.id if old is not None else None)
        if owners:
            path, owner_type, owner_name = owners[0]
            raise PackageInvalid(
                f"fail to install plugin: {path} belongs to {type_label(owner_type)} plugin {owner_name}"
            )
        main = plan.units[-1] if plan.plugin_type == PORTABLE else plan.units[0]  # the folder or the binary
        for unit in placing:
            if unit.group is None and unit.dest not in old_records and self._exists(unit.dest):
                if unit is main and old is None:
                    # A plugin of that name is there that we do not know: eKuiper would call it a duplicate.
                    raise InvalidRequest(
                        f"invalid name {plan.name}: duplicate ({unit.dest} already exists and was not installed by"
                        " kuiper-plugins, nor adopted at start-up: move it away first)"
                    )
                raise PackageInvalid(
                    f"fail to install plugin: {unit.dest} already exists and was not installed as part of"
                    f" {type_label(plan.plugin_type)} plugin {plan.name} (kuiper-plugins never replaces what it"
                    " did not install: move it away first)"
                )

        first_copy: dict[str, Path] = {}
        moves: list[tuple[Path | None, str]] = []
        for index, unit in enumerate(placing):
            staged = op.staging / f"{UNIT_PREFIX}{index}"  # beside the unpacked tree: no folder to make for them
            if unit.src in first_copy:
                if unit.is_dir:
                    shutil.copytree(first_copy[unit.src], staged, symlinks=True)
                else:
                    shutil.copyfile(first_copy[unit.src], staged)
            elif unit.src == "":
                # The rest of the tree is a portable plugin's own folder: drop the emptied symbol folders.
                for kind in packages.PORTABLE_SYMBOL_KINDS:
                    if (unpacked / kind).is_dir() and not any((unpacked / kind).iterdir()):
                        (unpacked / kind).rmdir()
                os.replace(unpacked, staged)
            else:
                os.replace(unpacked / unit.src, staged)
                first_copy[unit.src] = staged
            moves.append((staged, unit.dest))
        prints = durable.seal_all([staged for staged, _dest in moves])
        files = [registry.RecordedFile(dest, print_.size, print_.sha256)
                 for (_staged, dest), print_ in zip(moves, prints, strict=True)]

        placed = {u.dest for u in placing}
        kept_owned = {u.dest for u in plan.units if u.group in kept_groups and u.dest in old_records}
        files += [old_records[dest] for dest in sorted(kept_owned) if self._exists(dest)]
        for stale in sorted(set(old_records) - placed - kept_owned):
            if self._exists(stale):
                moves.append((None, stale))
        return moves, sorted(files, key=lambda f: f.path)

    def _kept_groups(
        self, plan: packages.InstallPlan, unpacked: Path, old_records: dict[str, registry.RecordedFile]
    ) -> set[str]:
        """The groups (a source's yaml copies) to keep as they are on disk: a user's edited configuration.

        A copy on disk is ours to rewrite when it is empty, a truncated or whole copy of what this
        install writes, or still exactly what an earlier install of ours recorded; any other content is
        the user's, and then the whole group stays as it is.
        """
        kept = set()
        for unit in plan.units:
            if unit.group is None or not self._exists(unit.dest):
                continue
            if not _is_our_copy(self.layout.absolute(unit.dest), unpacked / unit.src, old_records.get(unit.dest)):
                kept.add(unit.group)
        return kept

    def _publish(self, op: _Operation, moves: list[tuple[Path | None, str]]) -> None:
        """Journal the moves in the staging folder, make them, then fsync every folder they touched.

        Old files go aside into staging, new ones in. When this returns, the new state is on disk and the
        old one is still recoverable from staging: only the commit decides which one stays.
        """
        journal = []
        for index, (staged, dest) in enumerate(moves):
            if staged is not None:
                # Folders this move will make come first, so that an undo removes them after their contents.
                journal += [{"dest": folder, "backup": None, "placed": True, "made": True}
                            for folder in self._missing_parents(dest) if folder not in {e["dest"] for e in journal}]
            backup = f"backup/{index}" if self._exists(dest) else None
            journal.append({"dest": dest, "backup": backup, "placed": staged is not None})
        if any(entry["backup"] for entry in journal):
            (op.staging / "backup").mkdir(exist_ok=True)  # made only when old files will go there
        _write_journal(op.staging, {
            "operation": op.id, "type": op.plugin_type, "name": op.name, "kind": op.kind, "moves": journal,
        })
        op.journal = journal
        moving = [(staged, self._inside_home(entry["dest"]), entry)
                  for (staged, _dest), entry in zip(moves, [e for e in journal if not e.get("made")], strict=True)]
        # Every old file goes aside first, and the backup folder (with its name in the operation's folder)
        # is made durable before anything replaces one: a filesystem may persist the replacing rename on
        # its own, and the old file must then still be in staging for an undo to put back.
        aside = False
        for staged, target, entry in moving:
            if entry["backup"]:
                _set_aside(target, op.staging / entry["backup"], replaced=staged is not None and not staged.is_dir())
                aside = True
        if aside:
            durable.sync_folders([op.staging / "backup", op.staging])
        # Then each destination folder. The folder the staged files leave need not be synced: losing that
        # side of a rename only leaves debris in staging.
        touched = set()
        for staged, target, _entry in moving:
            if staged is not None:
                touched.update(_make_parents(target))
                os.replace(staged, target)
            touched.add(target.parent)
        durable.sync_folders(touched)

    def _undo(self, moves: list[dict[str, Any]], staging: Path) -> None:
        """Reverse a journal's moves, newest first, and fsync the folders; safe on a partial or repeated undo.

        Nothing is removed or restored through a folder that resolves outside KUIPER_HOME: a link planted
        after the moves must not turn the undo into a delete elsewhere.
        """
        touched = set()
        for entry in reversed(moves):
            target = self.layout.absolute(entry["dest"])
            strange_backup = entry["backup"] is not None and not BACKUP_NAME.fullmatch(entry["backup"])
            if strange_backup or not self._resolves_inside_home(target):
                log.warning("not undoing the move of %r: it does not lead inside %s", entry, self.layout.home)
                continue
            backup = staging / entry["backup"] if entry["backup"] else None
            if entry.get("made"):
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(target)  # a folder the operation made, emptied by the undos before this one
                touched.add(target.parent)
            elif backup is None:
                if entry["placed"]:
                    _remove(target)
                    touched.add(target.parent)
            elif os.path.lexists(backup):
                _remove(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(backup, target)
                touched.add(target.parent)
        durable.sync_folders(touched)

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def _locked(
        self, plugin_type: str, name: str, *, roll_back_stale: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """Hold the plugin's lock (busy: refused at once) and a registry connection for a with-block.

        A dead operation on the plugin (its lock was free, so its worker is gone) is settled first.
        """
        take = plugin_lock(self.layout.locks, plugin_type, name).acquire_or_refuse
        try:
            lock = take(f"{type_label(plugin_type)} plugin {name}")
        except FileNotFoundError:
            self._remake_scratch()
            lock = take(f"{type_label(plugin_type)} plugin {name}")
        try:
            with self._writer.session() as conn:
                stale = registry.operation_for(conn, plugin_type, name) if roll_back_stale else None
                if stale is not None:
                    try:
                        self._settle(conn, self.layout.staging / stale.id, stale)
                    except OSError as exc:
                        raise _os_error(exc) from exc
                yield conn
        finally:
            lock.release()

    def _remake_scratch(self) -> None:
        """Make our scratch folders again, durably, when someone removed them under a running service."""
        log.warning("%s was missing (removed while the service ran?): made it again", self.layout.locks)
        try:
            for folder in (self.layout.staging, self.layout.locks, self.layout.incoming):
                folder.mkdir(parents=True, exist_ok=True)
            durable.sync_folders([self.layout.work, self.layout.work.parent])
        except OSError as exc:
            raise _os_error(exc) from exc

    @contextmanager
    def _reserved(self, conn: sqlite3.Connection, plugin_type: str, name: str, kind: str) -> Iterator[_Operation]:
        """Record the operation and give it a staging folder; undo it unless the block commits it."""
        op_id = uuid.uuid4().hex
        op = _Operation(id=op_id, staging=self.layout.staging / op_id, plugin_type=plugin_type, name=name, kind=kind)
        try:
            # Not fsynced on its own: the journal, fsynced before the first move, is what recovery honours,
            # and the operation's next durable commit (its end, either way) makes this row durable too.
            with db.transaction(conn, durable=False):
                registry.begin_operation(conn, op.id, plugin_type, name, kind, os.getpid())
        except sqlite3.IntegrityError:
            # Only an operation whose roll-back failed can still hold the name; the lock says it is not ours.
            raise PluginBusy(f"{type_label(plugin_type)} plugin {name} is busy: an unfinished operation awaits"
                             " its roll-back")
        try:
            try:
                op.staging.mkdir()  # its name is made durable with its journal's, before the first move
                yield op
            except OSError as exc:
                raise _os_error(exc) from exc
        except BaseException:
            if not op.committed:
                self._abandon(conn, op)
                if op.engine_changed and not op.journal:  # undone: the engine follows the registry again
                    self._engine_back(conn, op)
            raise
        finally:
            if op.committed:
                self._clear_committed(conn, op)
            elif not op.journal:
                _remove_staging(op.staging)

    def _clear_committed(self, conn: sqlite3.Connection, op: _Operation) -> None:
        """Remove a committed operation's staging folder (its old files), then its finished record.

        The record need not be durable: one that a power cut brings back names a folder that is gone,
        and start-up drops it.
        """
        if not _clear_staging(op.staging):
            return
        try:
            with db.transaction(conn, durable=False):
                registry.forget_finished(conn, [op.id])
        except PluginError as exc:
            log.warning("could not drop the record of finished operation %s (start-up will): %s", op.id, exc)

    def _abandon(self, conn: sqlite3.Connection, op: _Operation) -> None:
        """Undo a failed operation; if even that fails, leave its row and journal for recovery to finish."""
        try:
            # An install.sh may outlive an interrupted run_install_script (a signal between its start and the
            # cleanup that follows): whatever carries the operation's marker goes first, as in recovery.
            scripts.kill_marked(op.id)
            self._undo(op.journal, op.staging)
            _drop_journal(op.staging)
            with db.transaction(conn):
                registry.end_operation(conn, op.id)
            op.journal = []
        except (OSError, PluginError) as exc:
            log.error(
                "could not finish rolling back operation %s (%s); start-up recovery or the next operation on"
                " the same plugin will", op.id, exc,
            )

    def _require(self, conn: sqlite3.Connection, plugin_type: str, name: str, verb: str) -> registry.Plugin:
        plugin = registry.find(conn, plugin_type, name)
        if plugin is None:
            if plugin_type == PORTABLE:
                raise PluginNotFound(f"{verb} portable plugin {name} error: portable plugin {name} is not found")
            raise PluginNotFound(f"{verb} {plugin_type} plugin {name} error: invalid name {name}: not exist")
        return plugin

    def _refuse_function_clashes(self, conn: sqlite3.Connection, functions: Sequence[str], owner: int | None):
        clashes = registry.function_clashes(conn, functions, owner)
        if clashes:
            function, plugin = clashes[0]
            raise InvalidRequest(f"function name {function} already exists (it belongs to plugin {plugin})")

    def _missing_parents(self, recorded: str) -> list[str]:
        """The folders above a destination that do not exist yet, outermost first."""
        missing = []
        parent = recorded.rpartition("/")[0]
        while parent and "/" in parent and not self._exists(parent):
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        return list(reversed(missing))

    def _exists(self, recorded: str) -> bool:
        return os.path.lexists(self.layout.absolute(recorded))

    def _inside_home(self, recorded: str) -> Path:
        """The absolute destination, refusing one whose folder resolves outside eKuiper's folders (a planted link)."""
        target = self.layout.absolute(recorded)
        if not self._resolves_inside_home(target) or os.path.islink(target):
            raise InstallFailed(f"fail to install plugin: {recorded} resolves outside {self.layout.home}")
        return target

    def _resolves_inside_home(self, target: Path) -> bool:
        return self.layout.contains(target.parent)

    @contextmanager
    def _logged(self, action: str, plugin_type: str, name: str, request: dict[str, Any] | None):
        """Write one structured log line per operation: what, outcome and duration."""
        started = time.monotonic()
        outcome: dict[str, Any] = {}
        try:
            yield outcome
        except PluginError as exc:
            _log_operation(action, plugin_type, name, request, outcome, f"refused:{exc.status}", started, exc.message)
            raise
        except BaseException:
            _log_operation(action, plugin_type, name, request, outcome, "error", started, None)
            raise
        _log_operation(action, plugin_type, name, request, outcome, "ok", started, None)


def _log_operation(action, plugin_type, name, request, outcome, result, started, message) -> None:
    log.info(
        "plugin %s: type=%s name=%s version=%s url=%s sha256=%s outcome=%s duration=%.3fs%s%s",
        action, type_label(plugin_type), name, outcome.get("version", "-"),
        (request or {}).get("file", "-"), outcome.get("sha256", "-"), result, time.monotonic() - started,
        f" engine={outcome['engine']!r}" if "engine" in outcome else "",
        f" reason={message!r}" if message else "",
    )


def engine_rows(plugin_type: str, name: str, request: dict[str, Any] | None, functions: Sequence[str]) -> list[kv.Row]:
    """The rows eKuiper's store holds for a plugin, as eKuiper writes them on install and register.

    The install script ({name, file, shellParas}) when the plugin came from a URL; a function plugin's
    list when the install named its functions or a register changed them (without a row, eKuiper
    falls back to the plugin's name, which is what our default list says too).
    """
    rows = []
    if request and request.get("file"):
        paras = request.get("shellParas") or ()
        if plugin_type == PORTABLE:
            rows.append(kv.portable_row(name, request["file"], paras))
        else:
            rows.append(kv.native_row(plugin_type, name, request["file"], paras))
    if plugin_type == "functions" and ((request or {}).get("functions") or list(functions) != [name]):
        rows.append(kv.functions_row(name, functions))
    return rows


def engine_keys(plugin_type: str, name: str) -> list[tuple[str, str]]:
    """Every (table, key) eKuiper's store may hold for a plugin."""
    if plugin_type == PORTABLE:
        return [(kv.PORTABLE_TABLE, name)]
    keys = [(kv.NATIVE_TABLE, kv.native_key(plugin_type, name))]
    if plugin_type == "functions":
        keys.append((kv.FUNCTIONS_TABLE, name))
    return keys


def _request_of(script: kv.InstallScript | None, functions: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The request record of an adopted plugin, from eKuiper's install script (None without one)."""
    if script is None or not script.file:
        return None
    request: dict[str, Any] = {"name": script.name, "file": script.file}
    if script.shell_paras:
        request["shellParas"] = list(script.shell_paras)
    if functions:
        request["functions"] = list(functions)
    return request


def main_file(plugin_type: str, name: str, recorded: Sequence[str]) -> str | None:
    """The recorded file a plugin stands on: a native plugin's .so, a portable plugin's folder."""
    if plugin_type == PORTABLE:
        folder = f"plugins/portable/{name}"
        return folder if folder in recorded else None
    return _so_file(plugin_type, recorded)


def native_binaries(layout: Layout, plugin_type: str, name: str) -> list[Path]:
    """The .so files on disk that make a native plugin of this name (any case of its first letter, any version)."""
    key = registry.name_key(name)
    found = []
    for so_path in sorted(layout.native_dir(plugin_type).glob("*.so")):
        match = SO_FILE_NAME.fullmatch(so_path.name)
        if match is not None and registry.name_key(match.group(1)) == key:
            found.append(so_path)
    return found
def _refuse_uncallable(engine: live.LiveEngine, functions: Sequence[str], prefix: str, outcome: str) -> None:
    """Refuse a change that leaves the running engine a function it cannot call, in the engine's words."""
    found = engine.uncallable(functions)
    if found is not None:
        function, words = found
        raise InvalidRequest(
            f"{prefix}: {words} (the running engine cannot call function {function}: every rule using it would be"
            f" refused so; a plugin built against another version of eKuiper's API looks like this; {outcome})"
        )


def _so_file(plugin_type: str, recorded: Sequence[str]) -> str | None:
    """The recorded .so of a native plugin (the file eKuiper's delete looks the plugin up by)."""
    folder = f"plugins/{plugin_type}/"
    return next((f for f in recorded if f.startswith(folder) and f.endswith(".so")), None)


def _recorded_now(path: Path, recorded: str) -> registry.RecordedFile:
    print_ = durable.fingerprint(path)
    return registry.RecordedFile(recorded, print_.size if print_ else None, print_.sha256 if print_ else None)


def _refuse_builtin_functions(functions: Sequence[str]) -> None:
    for function in functions:
        packages.check_function_name(function)


def _adoptable_functions(name: str, listed: Sequence[str]) -> list[str]:
    """The functions of eKuiper's pluginFuncs row that the API would register; the rest logged in one line.

    An empty result falls back to the plugin's own name, as eKuiper does without a row.
    """
    verdict = packages.adoptable_functions(listed)
    if verdict.refused or verdict.past_limit:
        log.warning(
            "eKuiper's pluginFuncs lists %d functions for functions plugin %s; registering %d: %d are names an"
            " install refuses (%s%s)%s", len(listed), name, len(verdict.kept) or 1, verdict.refused,
            "; ".join(verdict.examples), "; ..." if verdict.refused > len(verdict.examples) else "",
            f", {verdict.past_limit} more are past the limit of {packages.MAX_FUNCTIONS}" if verdict.past_limit
            else "",
        )
    return verdict.kept or [name]


def _executable_problem(folder: Path, executable: str) -> str | None:
    """Why a portable folder's executable cannot be adopted (missing, or reached through a link), or None.

    A package that holds a link is refused at install; the same executable put there by hand is not taken
    either. Each folder on the way and the file itself are looked at without following links.
    """
    path = folder
    parts = executable.split("/")
    for index, part in enumerate(parts):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except OSError:
            return f"cannot find executable {folder / executable}"
        last = index == len(parts) - 1
        if stat.S_ISLNK(mode):
            return f"{path} is a symbolic link (an install refuses links in a package)"
        if (not last and not stat.S_ISDIR(mode)) or (last and not stat.S_ISREG(mode)):
            return f"{path} is a {found_files.kind_of(mode)}, not a regular {'file' if last else 'folder'}"
    return None


def _is_our_copy(existing: Path, new_file: Path, recorded: registry.RecordedFile | None) -> bool:
    """Whether a file on disk is ours to rewrite: empty, a prefix of (or equal to) `new_file`, or as recorded."""
    try:
        size = os.lstat(existing).st_size
        if not os.path.isfile(existing) or os.path.islink(existing):
            return False
        if size == 0:
            return True
        if recorded is not None and recorded.sha256 is not None:
            print_ = durable.fingerprint(existing)
            if print_ is not None and (print_.size, print_.sha256) == (recorded.size, recorded.sha256):
                return True
        if size > os.path.getsize(new_file):
            return False
        # Checked above by name; opened so that a FIFO or device swapped in meanwhile is refused, not waited on.
        with os.fdopen(found_files.open_regular(existing), "rb") as ours, open(new_file, "rb") as theirs:
            while chunk := ours.read(durable.CHUNK_SIZE):
                if theirs.read(len(chunk)) != chunk:
                    return False
        return True
    except OSError:
        return False


def _journal_file(staging: Path) -> Path:
    return staging.with_name(staging.name + JOURNAL_SUFFIX)


def _partial_journal(staging: Path) -> Path:
    return staging.with_name(staging.name + PARTIAL_SUFFIX)


def _journal_files(staging: Path) -> tuple[Path, Path]:
    """Where an operation's journal may be: beside its folder, or inside it (versions before)."""
    return _journal_file(staging), staging / LEGACY_JOURNAL_FILE


def _operation_folders(root: Path) -> list[Path]:
    """The staging folder of every operation that left anything in the staging root, sorted."""
    names = set()
    for entry in root.iterdir():
        name = entry.name
        for suffix in (PARTIAL_SUFFIX, JOURNAL_SUFFIX):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return [root / name for name in sorted(names)]


def _write_journal(staging: Path, journal: dict[str, Any]) -> None:
    """Write the journal beside the staging folder whole or not at all, and make it durable, before any move.

    One fsync of the staging root makes durable both the journal's name and the staging folder's (made
    earlier, in the same folder).
    """
    target = _journal_file(staging)
    partial = _partial_journal(staging)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(json.dumps(journal).encode())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)
    durable.fsync_path(staging.parent)


def _read_journal(staging: Path) -> dict[str, Any] | None:
    """The journal an operation wrote before its first move; None when it made none."""
    for path in _journal_files(staging):
        try:
            raw = found_files.read_regular(path, JOURNAL_MAX_BYTES)  # in staging, but read before anything answers
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise InstallFailed(f"the journal {path} is unreadable: {exc}")
        try:
            journal = json.loads(raw)
            if not isinstance(journal, dict) or not isinstance(journal.get("moves"), list):
                raise ValueError("not a journal of this version")
        except ValueError as exc:
            raise InstallFailed(f"the journal {path} is unreadable: {exc}")
        return journal
    return None


def _drop_journal(staging: Path) -> None:
    """Remove an undone operation's journal durably, so that it can never be replayed over a later state."""
    for path in _journal_files(staging):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        durable.fsync_path(path.parent)


def _clear_staging(staging: Path) -> bool:
    """Remove a committed operation's journal, then its staging folder (the old files go with it).

    Return whether both are gone.
    """
    for path in _journal_files(staging):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError:
            return False
    shutil.rmtree(staging, ignore_errors=True)
    return not os.path.lexists(staging)


def _remove_staging(staging: Path) -> None:
    """Remove what an operation that moved nothing, or was undone, left in staging: folder and partial journal."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(_partial_journal(staging))


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above `target`; return the folders whose listings changed."""
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return [folder.parent for folder in missing]


def _set_aside(target: Path, backup: Path, *, replaced: bool) -> None:
    """Move an installed file or folder into the backup place.

    A regular file about to be replaced is hard-linked there instead, so that the os.replace that puts
    the new file in swaps it atomically and its path is never missing for a reader. Undo reads both
    the same way: if the backup exists, it is what goes back to the target.
    """
    if replaced and target.is_file() and not target.is_symlink():
        try:
            os.link(target, backup, follow_symlinks=False)
            return
        except OSError:
            pass  # a filesystem without hard links: fall back to the move
    os.replace(target, backup)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _os_error(exc: OSError) -> PluginError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while installing the plugin: {exc}")
    log.warning("plugin operation failed on the file system: %s", exc)
    return InstallFailed(f"fail to install plugin: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


def recover_home(settings: Settings, engine=None) -> Installer:
    """Make the home's folders and registry, and settle what a crash or power cut left; the installer.

    gunicorn's master runs it before it tells systemd it is ready, so that an engine ordered after this
    service boots on settled folders; each worker runs it again as it loads the app (nothing is left then,
    unless a worker died since).
    """
    layout = Layout.of(settings)
    layout.create()
    db.initialise(layout.registry_file)
    installer = Installer(settings, connect=lambda: db.connect(layout.registry_file), engine=engine)
    installer.recover()
    return installer
