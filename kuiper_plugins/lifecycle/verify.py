"""Compare what the registry recorded with the disk and with eKuiper's store, and repair what differs.

Each recorded file keeps the size and sha256 it was installed with (a portable plugin's folder: the total
size of its files and the digest of its listing, see install/durable.py). A file is

- `missing` when nothing is at its path,
- `empty` when it was installed with bytes and has none now,
- `modified` when its size differs, or (with hashes) its digest does.

A source's yaml holds the user's own settings (it outlives a delete): only its absence is a problem.
Start-up and `GET /` compare sizes only (an lstat per file, a walk per portable folder); `GET
/registry/verify` reads every byte. A plugin with a file problem is *damaged*: eKuiper's store is not
given its rows (the projection leaves them out, see `damaged_plugins`), so that an engine starting on
this home never loads a plugin that is not there, until a repair reinstalls it.

Repair reinstalls a damaged plugin through the installer's own update (its lock, journal and commit),
from the URL the registry recorded, pinned to the sha256 recorded: a source that now serves other bytes
is refused by the download's own check and the plugin is left as it is, reported.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kuiper_plugins.engine import kv
from kuiper_plugins.errors import PluginError
from kuiper_plugins.install import durable, packages
from kuiper_plugins.install.installer import Installer
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.install.project import engine_keys, engine_rows
from kuiper_plugins.layout import Layout
from kuiper_plugins.store import db, registry

log = logging.getLogger(__name__)

MISSING, EMPTY, MODIFIED = "missing", "empty", "modified"
WITHHELD = (MISSING, EMPTY)  # what keeps a plugin out of eKuiper's store
KV_MISSING, KV_DIFFERS, KV_EXTRA = "kv row missing", "kv row differs", "kv row not in the registry"
KV_WITHHELD = "kv row of a damaged plugin"  # recorded, but eKuiper must not be offered it until repair


@dataclass(frozen=True)
class Problem:
    """One thing on disk or in eKuiper's store that is not as the registry recorded it."""

    type: str
    name: str
    path: str  # a recorded path (`plugins/sinks/file.so`), or `kv:<table>/<key>` for a row of eKuiper's store
    problem: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        """The problem as the API answers it."""
        return asdict(self)


def file_problem(layout: Layout, recorded: registry.RecordedFile, *, hashes: bool,
                 user_config: bool = False, withheld_only: bool = False) -> tuple[str, str] | None:
    """What is wrong with one recorded file now, as (problem, detail); None when it is as recorded.

    With `withheld_only`, only a problem in WITHHELD is looked for, with one lstat: a folder's size, which
    takes a walk of it, only ever makes it MODIFIED (a folder is never EMPTY).
    """
    path = layout.absolute_text(recorded.path)
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return MISSING, "nothing at this path"
    except OSError as exc:
        return MISSING, f"cannot be read: {exc.strerror}"
    if user_config or recorded.size is None:
        return None  # the user's own settings, or a file recorded without a fingerprint: being there is all
    mode = status.st_mode
    if withheld_only:
        emptied = stat.S_ISREG(mode) and status.st_size == 0 and recorded.size > 0
        return (EMPTY, f"0 bytes, installed with {recorded.size}") if emptied else None
    size = _size(path, mode)
    if size is None:
        return MODIFIED, "cannot be read"
    if size == 0 and recorded.size > 0 and not stat.S_ISDIR(mode):
        return EMPTY, f"0 bytes, installed with {recorded.size}"
    if size != recorded.size:
        return MODIFIED, f"{size} bytes, installed with {recorded.size}"
    if hashes and recorded.sha256 is not None:
        print_ = durable.fingerprint(Path(path))
        if print_ is None or print_.sha256 != recorded.sha256:
            return MODIFIED, "sha256 differs from the one installed"
    return None


def _size(path: str, mode: int) -> int | None:
    """The size durable.fingerprint would give, without reading a byte (a folder: its files' total)."""
    try:
        if stat.S_ISLNK(mode):
            return len(os.fsencode(os.readlink(path)))
        if stat.S_ISREG(mode):
            return os.lstat(path).st_size
        if not stat.S_ISDIR(mode):
            return None
        total = 0
        for folder, dirs, files in os.walk(path, followlinks=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                entry = os.path.join(folder, name)
                entry_mode = os.lstat(entry).st_mode
                if stat.S_ISLNK(entry_mode):
                    total += len(os.fsencode(os.readlink(entry)))
                elif stat.S_ISREG(entry_mode):
                    total += os.lstat(entry).st_size
        return total
    except OSError:
        return None


def file_problems(conn: sqlite3.Connection, layout: Layout, *, hashes: bool) -> list[Problem]:
    """Every recorded file that is missing, empty or modified, plugin by plugin."""
    with db.snapshot(conn):
        plugins = [plugin for plugin, _functions in registry.all_plugins(conn)]
        files = registry.recorded_files_by_plugin(conn)
    problems = []
    for plugin in plugins:
        problems += _plugin_file_problems(layout, plugin, files.get(plugin.id, []), hashes=hashes)
    return problems


def _plugin_file_problems(layout: Layout, plugin: registry.Plugin, files: list[registry.RecordedFile], *,
                          hashes: bool, withheld_only: bool = False) -> list[Problem]:
    """What is wrong with each of one plugin's recorded files (a source's yaml: only its absence)."""
    config = set(packages.kept_on_delete(plugin.type, plugin.name))
    problems = []
    for recorded in files:
        found = file_problem(layout, recorded, hashes=hashes, user_config=recorded.path in config,
                             withheld_only=withheld_only)
        if found is not None:
            problems.append(Problem(plugin.type, plugin.name, recorded.path, *found))
    return problems


def damaged_plugins(conn: sqlite3.Connection, layout: Layout, *, hashes: bool = False) -> set[tuple[str, str]]:
    """The (type, name) of every plugin with a file missing, empty or modified (sizes only by default)."""
    return {(p.type, p.name) for p in file_problems(conn, layout, hashes=hashes)}


def missing_files(conn: sqlite3.Connection, layout: Layout, plugin: registry.Plugin) -> list[Problem]:
    """One plugin's files that are missing or emptied, as start-up finds them: while any is, it is withheld.

    Asked before each projection of the plugin and each hand-over to the running engine, so it costs an
    lstat per recorded file (a portable plugin's folder is not walked: only its being there counts here).
    """
    return _plugin_file_problems(layout, plugin, registry.recorded_files(conn, plugin.id), hashes=False,
                                 withheld_only=True)


def store_problems(conn: sqlite3.Connection, store: kv.EngineStore,
                   withheld: set[tuple[str, str]]) -> list[Problem]:
    """Where eKuiper's store differs from the projection of the registry (`withheld` plugins have no rows)."""
    expected: dict[tuple[str, str], tuple[kv.Row | None, str, str]] = {}
    for plugin, functions in registry.all_plugins(conn):
        for key in engine_keys(plugin.type, plugin.name):
            expected[key] = (None, plugin.type, plugin.name)
        if (plugin.type, plugin.name) not in withheld:
            for row in engine_rows(plugin.type, plugin.name, plugin.request, functions):
                expected[(row.table, row.key)] = (row, plugin.type, plugin.name)
    owned = store.owned()
    stored = store.values(set(expected) | owned)
    problems = []
    for key, (row, plugin_type, name) in sorted(expected.items()):
        where = f"kv:{key[0]}/{key[1]}"
        if row is None:
            if stored.get(key) is not None and key in owned:
                if (plugin_type, name) in withheld:
                    problems.append(Problem(plugin_type, name, where, KV_WITHHELD,
                                            "offered to eKuiper while the plugin's files are missing"))
                else:
                    problems.append(Problem(plugin_type, name, where, KV_EXTRA))
        elif stored.get(key) is None:
            problems.append(Problem(plugin_type, name, where, KV_MISSING))
        elif not row.matches(stored[key]):
            problems.append(Problem(plugin_type, name, where, KV_DIFFERS))
    for key in sorted(owned - expected.keys()):
        if stored.get(key) is not None:
            problems.append(Problem("-", key[1], f"kv:{key[0]}/{key[1]}", KV_EXTRA))
    return problems


def verify(installer: Installer, *, hashes: bool = True) -> list[Problem]:
    """Every difference between the registry and the disk, then between the registry and eKuiper's store."""
    with _connection(installer) as conn:
        problems = file_problems(conn, installer.layout, hashes=hashes)
        # The store is compared with what start-up projects: without the plugins whose files are missing.
        withheld = {(p.type, p.name) for p in problems if p.problem in WITHHELD}
        problems += store_problems(conn, installer.engine_store, withheld)
    return problems


@contextmanager
def _connection(installer: Installer) -> Iterator[sqlite3.Connection]:
    """A connection of its own for one look (a repair's updates take the installer's kept one)."""
    conn = db.connect(installer.layout.registry_file)
    try:
        yield conn
    finally:
        conn.close()


def report(problems: Iterable[Problem]) -> dict[str, Any]:
    """The answer of GET /registry/verify."""
    listed = [p.as_dict() for p in problems]
    return {"ok": not listed, "problems": listed}


def warn_damaged(problems: Iterable[Problem]) -> int:
    """Log one warning per damaged plugin from the start-up check's problems; return how many there are."""
    by_plugin: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        by_plugin.setdefault((p.type, p.name), []).append(p)
    for (plugin_type, name), found in sorted(by_plugin.items()):
        withheld = any(p.problem in WITHHELD for p in found)
        log.warning("%s plugin %s is damaged: %s;%s POST /registry/repair (kuiper-plugins repair) reinstalls it",
                    type_label(plugin_type), name, "; ".join(f"{p.path} {p.problem}" for p in found),
                    " eKuiper's store is not given it until" if withheld else "")
    return len(by_plugin)


def repair(installer: Installer, *, unprivileged_caller: str | None = None) -> dict[str, Any]:
    """Reinstall every damaged plugin from its recorded URL and sha256; report those that cannot be."""
    problems = verify(installer, hashes=True)
    damaged = sorted({(p.type, p.name) for p in problems if not p.path.startswith("kv:")})
    repaired, left = [], []
    for plugin_type, name in damaged:
        with _connection(installer) as conn:
            plugin = registry.find(conn, plugin_type, name)
        if plugin is None:
            continue  # deleted meanwhile
        request = dict(plugin.request or {})
        if not request.get("file") or not plugin.sha256:
            left.append({"type": plugin_type, "name": name,
                         "reason": "no recorded source: the plugin was adopted, not installed from a URL"})
            continue
        request["sha256"] = plugin.sha256  # the bytes installed, or nothing
        try:
            installer.update(plugin_type, name, request, unprivileged_caller=unprivileged_caller)
        except PluginError as exc:
            left.append({"type": plugin_type, "name": name, "reason": exc.message})
            log.warning("could not repair %s plugin %s from %s: %s", type_label(plugin_type), name,
                        request["file"], exc.message)
            continue
        repaired.append({"type": plugin_type, "name": name, "version": plugin.version, "file": request["file"]})
        log.info("repaired %s plugin %s from %s", type_label(plugin_type), name, request["file"])
    if any(p.path.startswith("kv:") for p in problems):
        with _connection(installer) as conn:
            installer.reconcile_engine_store(conn)  # our rows only, as at start-up
    remaining = verify(installer, hashes=True)
    return {"ok": not remaining, "repaired": repaired, "notRepaired": left,
            "problems": [p.as_dict() for p in remaining]}
