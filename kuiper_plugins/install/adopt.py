"""Adoption: list in the registry what the engine or a user put in eKuiper's folders, as eKuiper's boot scan does.

Start-up adopts every native .so and portable folder the registry does not know, taking function
lists and package URLs from eKuiper's own store; with an engine attached, `adopt_offered` adopts one
plugin the running engine offers and `forget_removed` forgets one whose files the engine's own delete
took. A plugin the API would refuse is not listed, a file an operation in flight has journaled is not
hand-copied, and each plugin is adopted under its lock: an operation of ours on it settles its own files.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kuiper_plugins import found_files
from kuiper_plugins.engine import kv
from kuiper_plugins.errors import InvalidRequest, PackageInvalid, PluginError
from kuiper_plugins.install import durable, packages
from kuiper_plugins.install.apply import journaled_files
from kuiper_plugins.install.locks import plugin_lock
from kuiper_plugins.install.packages import main_file, type_label
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE, Layout
from kuiper_plugins.store import db, engine_pending, registry

log = logging.getLogger(__name__)

# A config copy found beside an adopted plugin is compared with the folder's own file only up to this size:
# a yaml or json of more is not one eKuiper's install wrote from a plugin package, and is left alone.
CONFIG_COPY_MAX_BYTES = 1024 * 1024
SO_FILE_NAME = re.compile(r"([A-Za-z0-9_-]+?)(?:@([A-Za-z0-9._+-]+))?\.so")


class _OnDemand(dict):
    """The mapping `read()` returns, read at the first key asked for (a start-up that adopts nothing never
    reads eKuiper's store for adoption: at 10,000 plugins, decoding it took a quarter of a second)."""

    def __init__(self, read: Callable[[], dict[str, Any]]):
        super().__init__()
        self._read = read

    def __missing__(self, key: str) -> Any:
        if self._read is None:
            raise KeyError(key)
        read, self._read = self._read, None
        self.update(read())
        return self[key]


class Adopter:
    """Adopts into the registry the plugins found on one KUIPER_HOME's disk, and forgets those gone from it."""

    def __init__(self, layout: Layout, writer: db.KeptWriter, engine_store: kv.EngineStore):
        self.layout = layout
        self._writer = writer  # the operations' kept connection, for adoptions outside start-up
        self.engine_store = engine_store

    def adopt_all(self, conn: sqlite3.Connection) -> None:
        """List the plugins found on disk that the registry does not know, as eKuiper's boot scan does.

        Native .so files copied in by hand or installed by eKuiper take their function list from
        eKuiper's `pluginFuncs` and their package URL from its `nativePlugin` rows; every portable
        folder whose descriptor eKuiper would accept is listed too. A file an unfinished operation's
        journal names is not hand-copied, and an empty or unreadable binary is not a plugin: both are
        left alone (the second logged).
        """
        recorded = registry.all_recorded_files(conn)
        journaled = journaled_files(self.layout.staging)
        engine = _OnDemand(self._engine_rows_for_adoption)  # read only if a plugin is adopted: mostly none is
        for plugin_type in NATIVE_TYPES:
            for so_path in sorted(self.layout.native_dir(plugin_type).glob("*.so")):
                self._adopt_so(conn, plugin_type, so_path, recorded, journaled, engine)
        portable_root = self.layout.plugins / "portable"
        for folder in sorted(p for p in portable_root.iterdir() if p.is_dir() and not p.is_symlink()):
            self._adopt_folder(conn, folder, recorded, journaled, engine)

    def adopt_offered(self, plugin_type: str, name: str) -> bool | None:
        """Adopt one plugin the running engine offers, from its files on disk, by start-up's rules.

        Return whether the registry has the plugin now, or None when an operation of ours holds it (its
        lock is held, or its files are in a journal): that operation commits or undoes its own files, so
        the plugin is left alone now and asked about again later, not taken as refused.
        """
        key = registry.name_key(name)
        with self._writer.session() as conn:
            recorded = registry.all_recorded_files(conn)
            journaled = journaled_files(self.layout.staging)
            engine = self._engine_rows_for_adoption()
            busy = False
            if plugin_type == PORTABLE:
                folder = self.layout.portable_dir(name)
                if folder.is_dir() and not folder.is_symlink():
                    busy = not self._adopt_folder(conn, folder, recorded, journaled, engine)
            else:
                for so_path in native_binaries(self.layout, plugin_type, name):
                    busy = not self._adopt_so(conn, plugin_type, so_path, recorded, journaled, engine) or busy
            found = registry.find_by_key(conn, plugin_type, name)
            if found is not None and found.adopted:
                with db.transaction(conn):  # the engine offers what it installed: nothing waits for its restart
                    engine_pending.note(conn, found.id, "install", pending=False)
        if found is not None and registry.name_key(found.name) == key:
            return True
        return None if busy else False

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
                    # Nothing of ours waits for the engine's restart: what it deleted itself is its own change.
                    engine_pending.note_delete(conn, plugin_type, plugin.name, pending=False)
            left = [f for f in files if self._exists(f)]
        log.warning("forgot %s plugin %s: the engine no longer has it and %s is gone%s", type_label(plugin_type),
                    plugin.name, main, f"; left in place, no longer recorded: {', '.join(left)}" if left else "")
        return True

    def _adopt_so(self, conn: sqlite3.Connection, plugin_type: str, so_path: Path, recorded: set[str],
                  journaled: set[str], engine: dict[str, Any]) -> bool:
        """Adopt one native binary found on disk, unless it is recorded, journaled or not a plugin the API takes;
        False when an operation of ours holds it (journaled, or its plugin's lock held), True otherwise."""
        relative = self.layout.relative(so_path)
        if relative in journaled:
            return False
        if relative in recorded:
            return True
        try:
            mode = so_path.lstat().st_mode
        except FileNotFoundError:
            return True
        if not stat.S_ISREG(mode):
            # A link, FIFO, socket or device: an install never writes one, and reading it could block.
            log.warning("not adopting %s: it is a %s, not a regular file", relative, found_files.kind_of(mode))
            return True
        match = SO_FILE_NAME.fullmatch(so_path.name)
        if match is None:
            log.warning("ignoring %s: its name does not make a plugin name", relative)
            return True
        name = match.group(1)[0].lower() + match.group(1)[1:]
        try:
            packages.check_plugin_name(plugin_type, name)
        except InvalidRequest as exc:
            log.warning("not adopting %s: %s (the API refuses such an install)", relative, exc.message)
            return True
        return self._adopt_under_lock(plugin_type, name, relative, self._adopt_native,
                                      conn, plugin_type, name, relative, match.group(2), engine)

    def _adopt_folder(self, conn: sqlite3.Connection, folder: Path, recorded: set[str], journaled: set[str],
                      engine: dict[str, Any]) -> bool:
        """Adopt one portable plugin folder found on disk, unless it is recorded, journaled or badly named;
        False when an operation of ours holds it (journaled, or its plugin's lock held), True otherwise."""
        relative = self.layout.relative(folder)
        if relative in journaled:
            return False
        if relative in recorded:
            return True
        try:
            packages.check_plugin_name(PORTABLE, folder.name)
        except InvalidRequest as exc:
            log.warning("not adopting portable plugin folder %s: %s", folder, exc.message)
            return True
        return self._adopt_under_lock(PORTABLE, folder.name, relative, self._adopt_portable, conn, folder, engine)

    def _adopt_under_lock(self, plugin_type: str, name: str, relative: str, adopt: Callable[..., None], *args) -> bool:
        """Adopt under the plugin's lock; False, having done nothing, when the lock is held."""
        # A file an operation in flight has just moved in is not hand-copied: that operation holds the
        # plugin's lock until it has committed (and recorded the file) or rolled back.
        with plugin_lock(self.layout.locks, plugin_type, name) as lock:
            if not lock.try_acquire():
                return False
            try:
                adopt(*args)
            except PluginError as exc:
                log.error("could not adopt %s: %s", relative, exc.message)
            return True

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
            raw = found_files.read_regular(folder / packages.descriptor_member(name), packages.DESCRIPTOR_MAX_BYTES)
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

    def _exists(self, recorded: str) -> bool:
        return os.path.lexists(self.layout.absolute(recorded))


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


def native_binaries(layout: Layout, plugin_type: str, name: str) -> list[Path]:
    """The .so files on disk that make a native plugin of this name (any case of its first letter, any version)."""
    key = registry.name_key(name)
    found = []
    for so_path in sorted(layout.native_dir(plugin_type).glob("*.so")):
        match = SO_FILE_NAME.fullmatch(so_path.name)
        if match is not None and registry.name_key(match.group(1)) == key:
            found.append(so_path)
    return found

def _recorded_now(path: Path, recorded: str) -> registry.RecordedFile:
    print_ = durable.fingerprint(path)
    return registry.RecordedFile(recorded, print_.size if print_ else None, print_.sha256 if print_ else None)


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


