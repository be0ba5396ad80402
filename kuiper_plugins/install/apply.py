"""Apply: carry out a decided operation as one durable transaction, and settle what a crash left.

Every operation on a plugin runs the same stages (the plan step has already decided what it does):
1. take the plugin's flock (busy -> refused at once, 400) and roll back any
   dead operation a crashed worker left on that name (`locked`);
2. reserve the name in the operations table and make a staging folder
   `data/.kuiper-plugins/staging/<operation id>` on the same filesystem (`reserved`; the
   reservation is not fsynced on its own: the journal is what recovery goes by, and the
   operation's last commit makes the row durable with it);
3. do the slow work inside staging: download, inspect, unpack (the caller and the plan step),
   install.sh; refuse a destination that exists and is not recorded as this plugin's;
4. seal what will be moved: make every staged file and folder durable, taking
   the size and sha256 the registry will record (a few files: an fsync each;
   many: all read first, then one syncfs of the file system, through a
   descriptor opened with the staging folder, before anything was written:
   see `durable.FileSystemSync`); a portable plugin's folder is only made
   durable here, and fingerprinted in place, once install.sh has run in it
   (and what that wrote made durable), while its handshake check runs, before
   the commit (without install.sh, from the digests the unpacking kept);
5. write the journal (the operation and its file moves) beside the staging
   folder, `<operation id>.journal.json`, fsynced with the staging root (one
   fsync makes both names durable), while the flush of step 4 runs in other
   threads (both are durable before anything moves); then set every old file aside into the
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
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuiper_plugins import found_files
from kuiper_plugins.engine import live, portable
from kuiper_plugins.errors import (
    DiskFull,
    InstallFailed,
    InvalidRequest,
    PackageInvalid,
    PluginBusy,
    PluginError,
    ScriptFailed,
)
from kuiper_plugins.install import durable, packages, scripts
from kuiper_plugins.install.locks import PluginLock, plugin_lock
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.install.plan import OperationPlan, refuse_function_clashes
from kuiper_plugins.install.project import EngineProjection
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE, Layout
from kuiper_plugins.lifecycle import progress
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db, engine_pending, registry

log = logging.getLogger(__name__)

# Ours, but read at start-up from a folder anything may have written into: never read without a bound.
# (A journal lists one entry per file moved: a 10,000-file package makes well under 4 MiB.)
JOURNAL_MAX_BYTES = 64 * 1024 * 1024
# An operation's journal sits beside its staging folder, `<operation>.journal.json`, so that one fsync of
# the staging root makes both names durable; versions before kept it inside, as `journal.json`, and a
# journal found there is honoured all the same.
JOURNAL_SUFFIX = ".journal.json"
PARTIAL_SUFFIX = JOURNAL_SUFFIX + ".partial"  # a journal being written: never read, removed with its folder
LEGACY_JOURNAL_FILE = "journal.json"
BACKUP_NAME = re.compile(r"backup/[0-9]+")
UNIT_PREFIX = "unit-"  # a staged unit's name in its operation's folder: unit-0, unit-1, ...


@dataclass
class Operation:
    id: str
    staging: Path
    plugin_type: str
    name: str
    kind: str
    journal: list[dict[str, Any]] = field(default_factory=list)
    committed: bool = False
    engine_changed: bool = False  # a portable plugin was stopped or started in the running engine
    # Previous versions this operation keeps at least, whatever basic.keepVersions says: an apply of a plugin
    # set keeps the version an update replaces until the whole set is in (fleet/plugin_set.py).
    keep_at_least: int = 0
    # Opened with the staging folder, before the operation writes anything: flushes what it wrote in one go.
    flush: durable.FileSystemSync | None = None
    # A portable plugin's handshake check, started once its package is downloaded (engine/portable.py); stopped with
    # the operation if it never ran.
    check: portable.CheckAhead | None = None


class Applier:
    """Carries out decided operations on one KUIPER_HOME durably, and settles those a crash left."""

    def __init__(self, settings: Settings, layout: Layout, writer: db.KeptWriter, projection: EngineProjection):
        self.settings = settings
        self.layout = layout
        self._writer = writer  # the operations' connection, kept between them
        self.projection = projection
        # lifecycle.history.Versions, set by the installer: keeps the version an update replaces, and
        # records the operation's history in its commit.
        self.keeper: Any = None

    # ---------------------------------------------------------------- the operations' steps

    def install(
        self, conn: sqlite3.Connection, op: Operation, operation: OperationPlan, unpacked: Path
    ) -> dict[str, Any]:
        """Stage, publish and commit an unpacked package as the plan says; the outcome for the log line."""
        plan, request, old = operation.package, operation.request, operation.old
        name = plan.name
        plugin_type = plan.plugin_type
        if plan.script and plugin_type != PORTABLE:
            # As eKuiper: a native plugin's install.sh runs in a scratch folder with the zip's other files.
            self._run_script(op, plan, request, unpacked)

        if plugin_type != PORTABLE:
            progress.phase("commit")  # sealing, moving into place, the engine's hand-over, the registry's commit
        moves, files, unflushed = self._stage_units(conn, op, operation, unpacked, old)
        kept = self.keeper.keep(conn, op, old) if self.keeper is not None and old is not None else None
        self._publish(op, moves, unflushed)
        if plugin_type == PORTABLE:
            # Its folder is in place before install.sh and the handshake run in it (as eKuiper unpacks it there).
            files = self._finish_portable(op, operation, files)
            progress.phase("commit")
        engine = None
        live_engine = self.projection.live
        if live_engine is not None and plugin_type in NATIVE_TYPES and old is None:
            # Go cannot unload a plugin: only a new one is handed over; an update waits for a restart.
            engine = self.projection.hand_native(op.staging, plugin_type, name, plan.units[0].dest, plan.functions)
        elif live_engine is not None and plugin_type == PORTABLE:
            if live_engine.portable_blocked(name):
                engine = live.PENDING
            else:
                op.engine_changed = True
                engine = self.projection.hand_portable(op.staging, name, plan.descriptor or {},
                                                       replacing=old is not None)
        descriptor = None
        if plan.descriptor is not None:
            descriptor = dict(plan.descriptor)
            descriptor["executable"] = str(self.layout.portable_dir(name) / plan.descriptor["executable"])
        try:
            if engine == live.LOADED and plugin_type == "functions":
                self.projection.refuse_uncallable(plan.functions, "fail to install plugin", "nothing was installed")
            with db.transaction(conn):
                plugin_id = registry.save(
                    conn, plugin_type=plugin_type, name=name, version=plan.version, descriptor=descriptor,
                    request=request, sha256=operation.package_sha256, files=files, functions=plan.functions,
                    replaces=old.id if old is not None else None, compatibility=operation.compatibility,
                )
                # A native update is never handed over: Go cannot unload the code the engine runs.
                engine_pending.note(conn, plugin_id, op.kind, pending=engine != live.LOADED)
                if self.keeper is not None:
                    self.keeper.record(conn, op, kept, version=plan.version, sha256=operation.package_sha256,
                                       url=request.get("file"))
                registry.end_operation(conn, op.id, committed=True)
        except sqlite3.IntegrityError:
            # Another plugin took a function or file between our checks and the commit.
            self.projection.withdraw(op.staging, op.plugin_type, op.name, engine, plan.units[0].dest)
            refuse_function_clashes(conn, plan.functions, old.id if old is not None else None)
            raise InstallFailed(f"fail to install plugin: a file of plugin {name} was taken by another plugin")
        except BaseException:
            self.projection.withdraw(op.staging, op.plugin_type, op.name, engine, plan.units[0].dest)
            raise
        op.committed = True
        outcome = {"version": plan.version, "sha256": operation.package_sha256}
        if engine is not None:
            outcome["engine"] = engine
        return outcome

    def remove(self, conn: sqlite3.Connection, op: Operation, plan: OperationPlan, engine: str | None = None) -> None:
        """Move aside the files the plan removes that are still on disk, then forget the plugin, in one commit.

        `engine` is the running engine's verdict on its own delete, when it was asked.
        """
        progress.phase("commit")
        present = [f for f in plan.removes if self._exists(f)]
        self._publish(op, [(None, f) for f in present])
        with db.transaction(conn):
            registry.remove(conn, plan.old.id)
            # The engine keeps a native plugin it deleted, as $deleted, until it restarts.
            engine_pending.note_delete(conn, op.plugin_type, op.name,
                                       pending=op.plugin_type in NATIVE_TYPES and engine == live.LOADED)
            if self.keeper is not None:
                self.keeper.forget(conn, op.plugin_type, op.name)
            registry.end_operation(conn, op.id, committed=True)
        op.committed = True

    # ---------------------------------------------------------------- start-up recovery

    def recover(self, conn: sqlite3.Connection) -> None:
        """Finish or undo what crashed workers left in staging; forget cleared records; sweep free locks.

        Every journal in staging is honoured: an operation recorded as finished is finished, any other
        is undone, whether or not its reservation survived; a folder without a journal made no move and
        is removed. Each is handled under its plugin's flock: a free lock proves its owner is dead.
        Whatever cannot be done now (a read-only or locked registry) is logged and left for the next
        start or the next operation on that plugin.
        """
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
        self.projection.restore_rows(folder)
        self._undo(journal["moves"] if journal else [], folder)
        owner = (journal["type"], journal["name"]) if journal else (op_row.type, op_row.name) if op_row else None
        if self.keeper is not None and owner is not None:
            self.keeper.discard(conn, *owner)  # the copy of the version it replaced, before it is let go
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


    # ---------------------------------------------------------------- the stages

    def _run_script(self, op: Operation, plan: packages.InstallPlan, request: dict[str, Any], cwd: Path,
                    passed_env: dict[str, str] | None = None) -> None:
        try:
            scripts.run_install_script(
                cwd / plan.script, request.get("shellParas") or [], cwd=cwd,
                timeout=self.settings.install_script_timeout, marker=op.id, passed_env=passed_env,
                plugin=f"{op.plugin_type}/{op.name}",
            )
        except ScriptFailed as exc:
            raise exc.with_prefix("fail to install plugin")

    def _finish_portable(self, op: Operation, operation: OperationPlan,
                         files: list[registry.RecordedFile]) -> list[registry.RecordedFile]:
        """Run install.sh and the handshake in the plugin's own folder, in place (as eKuiper does), then seal it.

        The folder is already moved in (an update's old one set aside): a venv or an absolute link made by
        install.sh stays valid. A failure undoes the moves, taking the whole folder away and putting the
        old one back. The folder is fingerprinted as it is once install.sh has run, and what install.sh
        wrote is flushed, before the commit. The handshake check runs the plugin as nobody, who can write
        nothing in a tree this service made (folders 0755, files 0644 or 0755: see `archive.extract` and the
        installer's unpacked folder): the folder is read while the check runs, unless this service runs as
        nobody itself, and then only after it. Without install.sh, the folder's files are not read again: their
        digests are those `archive.extract` kept as it wrote them (only a file it did not write is read).
        """
        plan, request, written = operation.package, operation.request, operation.unpacked
        folder = self.layout.portable_dir(plan.name)
        if plan.script:
            passed = {k: os.environ[k] for k in scripts.PORTABLE_PASSED_ENV if k in os.environ}
            self._run_script(op, plan, request, folder, passed)

        def seal() -> durable.Fingerprint:
            if plan.script:
                return durable.seal(folder, op.flush)
            # Nothing has written in it since it was unpacked and flushed in staging, before it moved: each
            # file holds what extract wrote, whose digest it kept (the folder is the whole unpacked tree).
            known = {entry.name: durable.Fingerprint(entry.size, written[entry.name])
                     for entry in operation.entries if entry.name in written}
            return durable.read_fingerprint(folder, known=known)

        if not self.settings.portable_verify_on_install:
            print_ = seal()
        elif os.geteuid() == portable.NOBODY:
            self._check_handshake(op, plan, folder)
            print_ = durable.seal(folder, op.flush)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"seal-{op.id[:8]}") as pool:
                sealed = pool.submit(seal)
                self._check_handshake(op, plan, folder)  # leaving the with-block waits for the reading either way
                print_ = sealed.result()
        recorded = self.layout.relative(folder)
        durable.sync_folders([folder.parent])
        return [registry.RecordedFile(recorded, print_.size, print_.sha256) if f.path == recorded else f
                for f in files]

    def _check_handshake(self, op: Operation, plan: packages.InstallPlan, folder: Path) -> None:
        try:
            portable.verify_descriptor(folder, plan.name, plan.descriptor or {}, ahead=op.check,
                                       python_bin=self.settings.portable_python_bin,
                                       init_timeout=self.settings.portable_init_timeout)
        except PackageInvalid as exc:
            raise exc.with_prefix("fail to install plugin")

    def _stage_units(
        self, conn: sqlite3.Connection, op: Operation, operation: OperationPlan, unpacked: Path,
        old: registry.Plugin | None,
    ) -> tuple[list[tuple[Path | None, str]], list[registry.RecordedFile], durable.Unflushed]:
        """Materialise and read each unit in staging; return the moves to make, the files to record, and what
        must be flushed before the moves (`_publish` does it while it writes the journal).

        A destination that exists must be recorded as this plugin's, or the install is refused: nothing
        that is not ours is replaced. The source yaml is the one exception (see `_kept_groups`). A file moved
        as `archive.extract` wrote it is not read again: its digest is the one extract kept. Only when an
        install.sh has run in the unpacked tree is every file read, as the script may have changed it.
        """
        plan = operation.package
        old_records, kept_groups, placing = self.refuse_foreign_destinations(conn, plan, unpacked, old)
        first_copy: dict[str, Path] = {}
        moves: list[tuple[Path | None, str]] = []
        unread: set[Path] = set()
        known: dict[Path, durable.Fingerprint] = {}
        sizes = {entry.name: entry.size for entry in operation.entries if not entry.is_dir} if not plan.script else {}
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
                # Fingerprinted in place, once install.sh has run in it, while the handshake check runs
                # (`_finish_portable`): here it is only made durable before it moves.
                unread.add(staged)
            else:
                os.replace(unpacked / unit.src, staged)
                first_copy[unit.src] = staged
                if unit.src in sizes and unit.src in operation.unpacked:
                    known[staged] = durable.Fingerprint(sizes[unit.src], operation.unpacked[unit.src])
            moves.append((staged, unit.dest))
        prints, unflushed = durable.read_all([staged for staged, _dest in moves], op.flush, unread=unread,
                                             known=known)
        files = [registry.RecordedFile(dest, print_.size, print_.sha256) if print_ else registry.RecordedFile(dest)
                 for (_staged, dest), print_ in zip(moves, prints, strict=True)]

        placed = {u.dest for u in placing}
        kept_owned = {u.dest for u in plan.units if u.group in kept_groups and u.dest in old_records}
        files += [old_records[dest] for dest in sorted(kept_owned) if self._exists(dest)]
        for stale in sorted(set(old_records) - placed - kept_owned):
            if self._exists(stale):
                moves.append((None, stale))
        return moves, sorted(files, key=lambda f: f.path), unflushed

    def refuse_foreign_destinations(
        self, conn: sqlite3.Connection, plan: packages.InstallPlan, unpacked: Path, old: registry.Plugin | None,
    ) -> tuple[dict[str, registry.RecordedFile], set[str], list[packages.Unit]]:
        """Refuse a destination that exists and is not this plugin's; the old records, kept groups and units to place.

        Reads only, so that a dry run refuses what staging would.
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

        return old_records, kept_groups, placing

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

    def publish(self, op: Operation, moves: list[tuple[Path | None, str]]) -> None:
        """Journal and make an operation's moves (staged path or None to remove, destination), durably."""
        self._publish(op, moves)

    def _publish(self, op: Operation, moves: list[tuple[Path | None, str]],
                 unflushed: durable.Unflushed | None = None) -> None:
        """Journal the moves in the staging folder, make them, then fsync every folder they touched.

        What was staged and not yet flushed (`unflushed`) is made durable while the journal is written:
        both are on disk before the first move.

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
        written = {"operation": op.id, "type": op.plugin_type, "name": op.name, "kind": op.kind, "moves": journal}
        if unflushed is not None:
            unflushed.flush(alongside=lambda: _write_journal(op.staging, written))
        else:
            _write_journal(op.staging, written)
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


    @contextmanager
    def locked(
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
    def reserved(self, conn: sqlite3.Connection, plugin_type: str, name: str, kind: str) -> Iterator[Operation]:
        """Record the operation and give it a staging folder; undo it unless the block commits it."""
        op_id = uuid.uuid4().hex
        op = Operation(id=op_id, staging=self.layout.staging / op_id, plugin_type=plugin_type, name=name, kind=kind)
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
                op.flush = durable.FileSystemSync(op.staging)
                yield op
            except OSError as exc:
                raise _os_error(exc) from exc
        except BaseException:
            if not op.committed:
                self._abandon(conn, op)
                if op.engine_changed and not op.journal:  # undone: the engine follows the registry again
                    self.projection.bring_back(conn, op.staging, op.name)
            raise
        finally:
            if op.check is not None:
                op.check.close()
            if op.flush is not None:
                op.flush.close()
            if op.committed:
                self._clear_committed(conn, op)
            elif not op.journal:
                _remove_staging(op.staging)

    def _clear_committed(self, conn: sqlite3.Connection, op: Operation) -> None:
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

    def _abandon(self, conn: sqlite3.Connection, op: Operation) -> None:
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


def journaled_files(staging_root: Path) -> set[str]:
    """Every destination named by a journal still in staging (operations in flight or not yet settled)."""
    named: set[str] = set()
    for folder in _operation_folders(staging_root):
        try:
            journal = _read_journal(folder)
        except PluginError:
            continue
        named.update(move["dest"] for move in (journal or {}).get("moves", []))
    return named


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
