"""The engine's side of our operations: its store's rows projected from the registry, and the hand-overs.

The registry is the truth. After each commit `project` rewrites the plugin's rows in eKuiper's store
(`sqliteKV.db`), and start-up's `reconcile` makes the whole store agree; a failure there is logged, never
refused. A plugin whose files are missing (lifecycle/verify.py, sizes only) is left out of both, and is
never handed to the running engine, until a repair reinstalls it. With an engine attached, an operation
also hands what it published to the running engine (install, delete, register) and, when it is undone,
takes it back: the engine's rows for the plugin are kept in staging before a hand-over and put back from
there by an undo or by recovery. Nothing here decides what is installed: the caller has decided, and this
module makes the engine follow.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kuiper_plugins import found_files
from kuiper_plugins.engine import kv, live
from kuiper_plugins.errors import InvalidRequest, PluginError
from kuiper_plugins.install import durable
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.layout import PORTABLE, Layout
from kuiper_plugins.store import registry

log = logging.getLogger(__name__)

ENGINE_ROWS_FILE = "engine-rows.json"  # the engine's rows for a plugin before its hand-over, in staging
# Ours, but read at start-up from a folder anything may have written into: never read without a bound.
ENGINE_ROWS_MAX_BYTES = 64 * 1024 * 1024


class EngineProjection:
    """Keeps eKuiper's store, and the running engine when one is attached, in step with the registry."""

    def __init__(self, layout: Layout, store: kv.EngineStore, engine: live.LiveEngine | None):
        self.layout = layout
        self.store = store
        self.live = engine  # None for a standalone registry: only the store is written

    # ---------------------------------------------------------------- eKuiper's own store

    def reconcile(self, conn: sqlite3.Connection) -> list:
        """Make eKuiper's plugin rows equal the projection of the whole registry (start-up); return what the
        check of every recorded file found (verify.Problem, sizes only), for start-up to report."""
        from kuiper_plugins.lifecycle import verify  # lifecycle builds on install: imported late
        problems = verify.file_problems(conn, self.layout, hashes=False)
        # A plugin with a file missing or emptied is not offered to eKuiper until repaired. A file of another
        # size is reported, not withheld: a portable plugin's folder changes when its program writes beside
        # itself (a Python plugin's __pycache__), and eKuiper loads it all the same.
        damaged = {(p.type, p.name) for p in problems if p.problem in verify.WITHHELD}
        rows = [row for plugin, functions in registry.all_plugins(conn) if (plugin.type, plugin.name) not in damaged
                for row in engine_rows(plugin.type, plugin.name, plugin.request, functions)]
        try:
            self.store.reconcile(rows)
        except PluginError as exc:
            log.error("eKuiper's store could not be reconciled with the registry (%s); the next start will",
                      exc.message)
        return problems

    def project(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> None:
        """Rewrite one plugin's rows in eKuiper's store after our registry committed its change.

        The registry is the truth: a failure here is logged, and start-up reconciles the store.
        """
        plugin = registry.find(conn, plugin_type, name)
        missing = self.missing_files(conn, plugin) if plugin is not None else []
        if missing:
            # As at start-up: an engine starting on this home must not load a plugin that is not there.
            log.warning("%s plugin %s is damaged (%s missing): eKuiper's store is not given it until POST"
                        " /registry/repair (kuiper-plugins repair) reinstalls it", type_label(plugin_type), name,
                        ", ".join(missing))
        put = (engine_rows(plugin_type, name, plugin.request, registry.functions_of(conn, plugin.id))
               if plugin is not None and not missing else [])
        kept = {(row.table, row.key) for row in put}
        delete = [key for key in engine_keys(plugin_type, name) if key not in kept]
        try:
            self.store.apply(put=put, delete=delete)
        except PluginError as exc:
            log.error("eKuiper's store was not updated for %s plugin %s (%s); start-up will reconcile it",
                      type_label(plugin_type), name, exc.message)

    def missing_files(self, conn: sqlite3.Connection, plugin: registry.Plugin) -> list[str]:
        """The recorded paths of `plugin` that are missing or emptied: while any is, eKuiper is given nothing of it.

        Sizes only, as start-up's check (lifecycle/verify.py): a file of another size is reported by verify,
        not withheld.
        """
        from kuiper_plugins.lifecycle.verify import missing_files  # lifecycle builds on install: imported late
        return [problem.path for problem in missing_files(conn, self.layout, plugin)]

    def keep_rows(self, staging: Path, plugin_type: str, name: str) -> None:
        """Write down, durably, the engine's rows for the plugin before its install writes its own."""
        values = self.store.values(engine_keys(plugin_type, name))
        listed = [{"table": t, "key": k, "value": v.hex() if v is not None else None} for (t, k), v in values.items()]
        with open(staging / ENGINE_ROWS_FILE, "w") as out:
            json.dump(listed, out)
            out.flush()
            os.fsync(out.fileno())
        durable.sync_folders([staging])  # before the engine can write a row: recovery must find it

    def restore_rows(self, staging: Path) -> None:
        """Put the engine's rows back as they were before a hand-over that is being undone (logged if not)."""
        try:
            listed = json.loads(found_files.read_regular(staging / ENGINE_ROWS_FILE, ENGINE_ROWS_MAX_BYTES))
            self.store.restore({(row["table"], row["key"]): bytes.fromhex(row["value"])
                                if row["value"] is not None else None for row in listed})
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, PluginError) as exc:
            log.error("the engine's rows of the undone operation in %s were not put back: %s", staging, exc)

    # ---------------------------------------------------------------- the running engine

    def hand_native(self, staging: Path, plugin_type: str, name: str, so_dest: str,
                    functions: Sequence[str]) -> str:
        """Hand a newly published native plugin to the running engine, its rows kept first for an undo."""
        self.keep_rows(staging, plugin_type, name)
        return self.live.install_native(staging, plugin_type, name, so_dest, functions)

    def hand_portable(self, staging: Path, name: str, descriptor: dict[str, Any], *, replacing: bool) -> str:
        """Make a published portable plugin live: the engine stops the old process, then starts the new one.

        eKuiper's own update is its delete then its install; the two are made apart, so that our new files
        are kept from the delete (it removes the plugin's folder) and handed to the install. The caller has
        checked `live.portable_blocked` and counts the engine as changed from here on.
        """
        if replacing and self.live.delete_portable(staging, name) == live.PENDING:
            return live.PENDING  # the engine keeps the old one until it restarts
        return self.live.install_portable(staging, name, descriptor)

    def hand_delete(self, staging: Path, plugin_type: str, name: str, so_file: str | None) -> str:
        """Have the running engine drop a plugin being deleted, our files kept in place; its verdict."""
        if plugin_type == PORTABLE:
            return self.live.delete_portable(staging, name)
        return self.live.delete_native(staging, plugin_type, name, so_file)

    def withdraw(self, staging: Path, plugin_type: str, name: str, verdict: str | None, so_dest: str) -> None:
        """Before an install handed to the engine is undone: the engine drops it, its rows go as ours say."""
        if verdict != live.LOADED:
            return
        self.live.withdraw_native(staging, plugin_type, name, so_dest)
        self.restore_rows(staging)

    def bring_back(self, conn: sqlite3.Connection, staging: Path, name: str) -> None:
        """After an undone portable operation, make the engine run what the registry holds again (best effort).

        The engine may have stopped the old process or started the new one before the operation failed; its
        own delete also dropped its store row, which is written again from the registry. A plugin whose files
        are missing is not handed back: the engine goes without it until it is repaired.
        """
        try:
            plugin = registry.find(conn, PORTABLE, name)
            self.live.delete_portable(staging, name)
            if plugin is not None and plugin.descriptor is not None and not self.missing_files(conn, plugin):
                folder = self.layout.portable_dir(name)
                descriptor = dict(plugin.descriptor,
                                  executable=Path(plugin.descriptor["executable"]).relative_to(folder).as_posix())
                self.live.install_portable(staging, name, descriptor)
        except (PluginError, OSError, ValueError) as exc:
            log.error("the running engine and the registry differ on portable plugin %s until the engine's next"
                      " start: %s", name, getattr(exc, "message", exc))
        self.project(conn, PORTABLE, name)

    def give_back_functions(self, name: str, functions: Sequence[str]) -> None:
        """Put the engine's function list back after our commit failed (best effort, logged)."""
        try:
            self.live.register_functions(name, functions)
        except PluginError as exc:
            log.error("the running engine keeps the new function list of %s, our registry the old one (%s);"
                      " they agree again at the engine's next start", name, exc.message)

    def refuse_uncallable(self, functions: Sequence[str], prefix: str, outcome: str) -> None:
        """Refuse a change that leaves the running engine a function it cannot call, in the engine's words."""
        found = self.live.uncallable(functions)
        if found is not None:
            function, words = found
            raise InvalidRequest(
                f"{prefix}: {words} (the running engine cannot call function {function}: every rule using it"
                f" would be refused so; a plugin built against another version of eKuiper's API looks like this;"
                f" {outcome})"
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
