"""History and rollback: every version a plugin had, and the way back to the previous one.

An update (or a rollback) first copies the files of the version it replaces into the service's private
work folder, `data/.kuiper-plugins/versions/<type>.<name>.<package sha256 prefix>`, where the engine never
looks, and makes the copy durable; its commit then records that kept version and a history row in the
same transaction as the new plugin row (see store/history.py). `basic.keepVersions` bounds how many are kept per plugin
(0: none, and then nothing is copied).

A rollback is an operation like an update whose source is a kept version instead of a package (the newest,
or the one `?version=` names: `history` marks which entries are kept):
it takes the plugin's lock, reserves the name, stages copies of the kept files, and publishes them
through the same journaled moves (install/apply.py), so that a crash anywhere before its commit is undone
at start-up, and one after it is finished. The version it leaves is kept in turn, so a second rollback
returns to where the first started. As for an update, a native plugin's rollback reaches the running
engine only at its restart (Go cannot unload a plugin); a portable one is handed over at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

from kuiper_plugins.engine import live
from kuiper_plugins.errors import InvalidRequest, PackageInvalid, PluginError, PluginNotFound
from kuiper_plugins.install import durable, packages
from kuiper_plugins.install.apply import Applier, Operation
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.layout import PORTABLE, Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db, engine_pending, history, registry

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".partial"  # a kept copy being made: never a version, swept with the others


class Versions:
    """Keeps previous versions' files for one KUIPER_HOME, and rolls a plugin back to the newest of them."""

    def __init__(self, settings: Settings, layout: Layout, applier: Applier):
        self.settings = settings
        self.layout = layout
        self.applier = applier

    # ---------------------------------------------------------------- keeping the version being replaced

    def keep(self, conn: sqlite3.Connection, op: Operation, plugin: registry.Plugin) -> dict[str, Any] | None:
        """Copy the installed files of `plugin` into its kept folder, durably; the manifest to record, or None.

        Called by the operation that replaces it, under its lock, before any move. A file of the plugin
        missing from disk is not kept; it, and a file emptied, are named in the record's `incomplete`.
        """
        if self._limit(op) <= 0:
            return None
        folder = self._free_folder(conn, plugin, self._limit(op))
        partial = folder.with_name(folder.name + TEMPORARY_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an operation on this plugin that died
        partial.mkdir(parents=True)
        kept_files, incomplete = [], []
        config = set(packages.kept_on_delete(plugin.type, plugin.name))  # the user's settings: only absence counts
        for index, recorded in enumerate(registry.recorded_files(conn, plugin.id)):
            source = self.layout.absolute(recorded.path)
            copy = partial / str(index)
            if _missing_or_emptied(source, recorded, user_config=recorded.path in config):
                incomplete.append(recorded.path)  # a rollback to this version would restore a damaged plugin
            if os.path.islink(source) or not os.path.lexists(source):
                continue
            if source.is_dir():
                shutil.copytree(source, copy, symlinks=True)
            else:
                shutil.copy2(source, copy, follow_symlinks=False)
            kept_files.append({"path": recorded.path, "copy": str(index), "size": recorded.size,
                               "sha256": recorded.sha256})
        durable.seal_all([partial / f["copy"] for f in kept_files])
        durable.sync_folders([partial])
        os.replace(partial, folder)
        durable.sync_folders([self.layout.versions])
        return {
            "folder": folder.name, "type": plugin.type, "name": plugin.name, "version": plugin.version,
            "sha256": plugin.sha256,
            "request": plugin.request, "descriptor": plugin.descriptor,
            "functions": registry.functions_of(conn, plugin.id), "compatibility": plugin.compatibility,
            "files": kept_files, "incomplete": incomplete,
        }

    def _limit(self, op: Operation) -> int:
        """How many previous versions of its plugin an operation keeps: basic.keepVersions, or more if it asks."""
        return max(self.settings.keep_versions, op.keep_at_least, 0)

    def _free_folder(self, conn: sqlite3.Connection, plugin: registry.Plugin, limit: int) -> Path:
        """The kept folder for `plugin`: named after it and its package, so that a rerun names it the same.

        A folder of that name that no row names is debris, removed; one a row names (the same package kept
        twice) gets a numbered twin.
        """
        base = f"{_prefix(plugin.type, plugin.name)}{(plugin.sha256 or 'unknown')[:16]}"
        recorded = history.kept_folders(conn)
        for number in range(limit + 2):
            name = base if number == 0 else f"{base}.{number}"
            if name not in recorded:
                shutil.rmtree(self.layout.versions / name, ignore_errors=True)
                return self.layout.versions / name
        raise AssertionError("more kept versions than basic.keepVersions allows")  # forgotten at each commit

    def record(self, conn: sqlite3.Connection, op: Operation, kept: dict[str, Any] | None, *, version: str,
               sha256: str | None, url: str | None, used: str | None = None) -> None:
        """In the operation's commit transaction: its history row, the version it kept, the oldest dropped.

        `used` is the kept version a rollback consumed.
        """
        history.record(conn, op.plugin_type, op.name, op.kind, version, sha256, url)
        if used is not None:
            history.forget_kept(conn, [used])
        if kept is not None:
            history.keep(conn, op.plugin_type, op.name, kept["folder"], kept)
        surplus = history.kept(conn, op.plugin_type, op.name)[self._limit(op):]
        history.forget_kept(conn, [k.folder for k in surplus])

    def trim(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> None:
        """Forget the plugin's kept versions beyond basic.keepVersions (an operation kept more for a while).

        The caller holds the plugin's lock; the folders go with `tidy`.
        """
        surplus = history.kept(conn, plugin_type, name)[max(self.settings.keep_versions, 0):]
        if surplus:
            with db.transaction(conn):
                history.forget_kept(conn, [k.folder for k in surplus])

    def forget(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> None:
        """In a delete's commit: the plugin's kept versions go with it (their folders are swept)."""
        history.forget_kept(conn, [k.folder for k in history.kept(conn, plugin_type, name)])

    def discard(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> None:
        """While an unfinished operation on the plugin is undone (its lock held): remove the copy it kept.

        Done before the operation is let go, so that once recovery has cleared it, nothing of it is left.
        """
        try:
            names = os.listdir(self.layout.versions)
        except FileNotFoundError:
            return
        recorded = history.kept_folders(conn)
        for folder in names:
            if folder.startswith(_prefix(plugin_type, name)) and folder not in recorded:
                log.info("removing the kept version %s of an operation that did not finish", folder)
                shutil.rmtree(self.layout.versions / folder, ignore_errors=True)

    def sweep(self, conn: sqlite3.Connection) -> None:
        """Remove kept folders no row names, except those of operations in flight (theirs to record)."""
        try:
            names = os.listdir(self.layout.versions)
        except FileNotFoundError:
            return
        recorded = history.kept_folders(conn)
        in_flight = tuple(_prefix(op.type, op.name) for op in registry.operations(conn))
        for name in names:
            if name in recorded or name.startswith(in_flight):
                continue
            log.info("removing the kept version %s, which no registry row names", name)
            shutil.rmtree(self.layout.versions / name, ignore_errors=True)

    def history(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> list[dict[str, Any]]:
        """The plugin's committed installs, updates and rollbacks, newest first, each marked `kept`; 404 if none."""
        with db.snapshot(conn):
            entries = history.entries(conn, plugin_type, name)
            installed = registry.find(conn, plugin_type, name) is not None
            kept = history.kept(conn, plugin_type, name)
        if not entries and not installed:
            raise PluginNotFound(f"describe {type_label(plugin_type)} plugin {name} error: not found")
        _mark_kept(entries, kept, installed)
        return entries

    # ---------------------------------------------------------------- rollback

    def rollback(self, conn: sqlite3.Connection, plugin_type: str, name: str, version: str | None = None, *,
                 keep_left: bool = True) -> dict[str, Any]:
        """Swap a kept version of the plugin back in (`version`, else the newest); the outcome for the log line.

        The caller holds the plugin's lock (`Applier.locked`). `keep_left=False` keeps no copy of the version
        left: an apply of a plugin set undoing its own update leaves the kept versions as they were before it.
        """
        label = type_label(plugin_type)
        current = registry.find(conn, plugin_type, name)
        if current is None:
            raise PluginNotFound(f"rollback {label} plugin {name} error: not found")
        kept = history.kept(conn, plugin_type, name)
        if not kept:
            raise PluginNotFound(f"rollback {label} plugin {name} error: no previous version is kept"
                                 " (an update keeps the one it replaces; basic.keepVersions sets how many)")
        target = kept[0] if version is None else _chosen(current, kept, version)
        if target.manifest.get("incomplete") and keep_left:
            # An apply of a plugin set undoing its own update (keep_left=False) puts back what was, as it was.
            raise InvalidRequest(
                f"rollback {label} plugin {name} error: version {target.version} cannot be restored whole (it was"
                f" kept without {', '.join(target.manifest['incomplete'])}, missing or emptied when it was replaced;"
                " install it again from its package instead)")
        with self.applier.reserved(conn, plugin_type, name, "rollback") as op:
            moves, files = self._stage(conn, op, current, target)  # refuses before anything is kept
            keeping = self.keep(conn, op, current) if keep_left else None
            self.applier.publish(op, moves)
            manifest = target.manifest
            engine = None
            live_engine = self.applier.projection.live
            if live_engine is not None and plugin_type == PORTABLE and manifest["descriptor"]:
                if live_engine.portable_blocked(name):
                    engine = live.PENDING
                else:
                    op.engine_changed = True
                    engine = self.applier.projection.hand_portable(
                        op.staging, name, self._relative_descriptor(name, manifest["descriptor"]), replacing=True)
            request = manifest["request"]
            with db.transaction(conn):
                plugin_id = registry.save(
                    conn, plugin_type=plugin_type, name=current.name, version=manifest["version"],
                    descriptor=manifest["descriptor"], request=request, sha256=manifest["sha256"], files=files,
                    functions=manifest["functions"], replaces=current.id, compatibility=manifest["compatibility"],
                )
                engine_pending.note(conn, plugin_id, "update", pending=engine != live.LOADED)  # as an update
                self.record(conn, op, keeping, version=manifest["version"], sha256=manifest["sha256"],
                            url=(request or {}).get("file"), used=target.folder)
                registry.end_operation(conn, op.id, committed=True)
            op.committed = True
        outcome = {"version": manifest["version"], "sha256": manifest["sha256"], "from": current.version}
        if engine is not None:
            outcome["engine"] = engine
        return outcome

    def _stage(
        self, conn: sqlite3.Connection, op: Operation, current: registry.Plugin, target: history.KeptVersion,
    ) -> tuple[list[tuple[Path | None, str]], list[registry.RecordedFile]]:
        """Copy the kept files into staging and seal them; the moves to make and the files to record.

        As for an update, nothing that is not this plugin's is replaced, and a source's yaml that the user
        changed since it was installed stays as it is.
        """
        source = self.layout.versions / target.folder
        current_records = {f.path: f for f in registry.recorded_files(conn, current.id)}
        wanted = [f for f in target.manifest["files"]]
        owners = registry.file_owners(conn, [f["path"] for f in wanted], current.id)
        if owners:
            path, owner_type, owner_name = owners[0]
            raise PackageInvalid(f"rollback failed: {path} belongs to {type_label(owner_type)} plugin {owner_name}")
        users = set(packages.kept_on_delete(current.type, current.name))
        moves: list[tuple[Path | None, str]] = []
        kept_as_is: list[registry.RecordedFile] = []
        for index, entry in enumerate(wanted):
            dest = entry["path"]
            exists = os.path.lexists(self.layout.absolute(dest))
            if exists and dest not in current_records:
                raise InvalidRequest(
                    f"rollback failed: {dest} already exists and was not installed as part of"
                    f" {type_label(current.type)} plugin {current.name} (kuiper-plugins never replaces what it"
                    " did not install: move it away first)")
            if dest in users and exists and not _as_recorded(self.layout.absolute(dest), current_records[dest]):
                kept_as_is.append(current_records[dest])  # the user's configuration
                continue
            staged = op.staging / f"unit-{index}"
            copy = source / entry["copy"]
            if copy.is_dir() and not copy.is_symlink():
                shutil.copytree(copy, staged, symlinks=True)
            else:
                shutil.copy2(copy, staged, follow_symlinks=False)
            moves.append((staged, dest))
        prints = durable.seal_all([staged for staged, _dest in moves])
        files = [registry.RecordedFile(dest, p.size, p.sha256) for (_s, dest), p in zip(moves, prints, strict=True)]
        placed = {dest for _s, dest in moves} | {f.path for f in kept_as_is}
        for stale in sorted(set(current_records) - placed):
            if os.path.lexists(self.layout.absolute(stale)):
                moves.append((None, stale))
        return moves, sorted(files + kept_as_is, key=lambda f: f.path)

    def _relative_descriptor(self, name: str, descriptor: dict[str, Any]) -> dict[str, Any]:
        """A recorded portable descriptor as its package gave it: the executable relative to the plugin's folder."""
        relative = dict(descriptor)
        relative["executable"] = os.path.relpath(descriptor["executable"], self.layout.portable_dir(name))
        return relative

    def tidy(self, conn: sqlite3.Connection) -> None:
        """After an operation: remove the folders no row names (best effort; start-up sweeps too)."""
        try:
            self.sweep(conn)
        except (OSError, PluginError) as exc:
            log.warning("could not remove kept versions no longer recorded (start-up will): %s", exc)


def _chosen(current: registry.Plugin, kept: list[history.KeptVersion], version: str) -> history.KeptVersion:
    """The newest kept version named `version`; refused when it is the one installed, 404 when none is kept."""
    prefix = f"rollback {type_label(current.type)} plugin {current.name} error"
    listed = ", ".join(dict.fromkeys(k.version for k in kept))  # newest first, each name once
    where = f"GET /plugins/{current.type}/{current.name}/history marks them"
    if version == current.version:
        raise InvalidRequest(f"{prefix}: version {version} is the one installed (kept versions: {listed}; {where})")
    for candidate in kept:
        if candidate.version == version:
            return candidate
    raise PluginNotFound(f"{prefix}: version {version} not found (kept versions: {listed}; {where})")


def _mark_kept(entries: list[dict[str, Any]], kept: list[history.KeptVersion], installed: bool) -> None:
    """Set each history entry's `kept`: whether the version it installed is kept for a rollback.

    A kept version marks the newest entry with its version and package, after the entry of what is
    installed (the newest, when the plugin is installed): the entry a rollback with `?version=` returns to.
    """
    left: dict[tuple[str, str | None], int] = {}
    for version in kept:
        key = (version.version, version.manifest.get("sha256"))
        left[key] = left.get(key, 0) + 1
    for index, entry in enumerate(entries):
        key = (entry["version"], entry["sha256"])
        entry["kept"] = not (installed and index == 0) and left.get(key, 0) > 0
        if entry["kept"]:
            left[key] -= 1


def _missing_or_emptied(path: Path, recorded: registry.RecordedFile, *, user_config: bool) -> bool:
    """Whether a recorded file is gone, or has no bytes where it was installed with some (start-up's check)."""
    try:
        st = os.lstat(path)
    except OSError:
        return True  # verify counts a file it cannot read as missing
    return not user_config and stat.S_ISREG(st.st_mode) and st.st_size == 0 and (recorded.size or 0) > 0


def _as_recorded(path: Path, recorded: registry.RecordedFile) -> bool:
    """Whether a file still holds what its record says (an unknown record counts as ours)."""
    if recorded.sha256 is None:
        return True
    print_ = durable.fingerprint(path)
    return print_ is not None and (print_.size, print_.sha256) == (recorded.size, recorded.sha256)


def _prefix(plugin_type: str, name: str) -> str:
    """How every kept folder of a plugin begins."""
    return f"{plugin_type}.{registry.name_key(name)}."
