"""The plugin set as one document: what this home has, how it differs from a wanted set, and converging to it.

A node's plugins are one document: per type, each plugin's package (`file`, and `sha256` when pinned),
install.sh's arguments and, for a function plugin, its function list (docs/plugin-set.md). `export` reads it
from the registry; `export_ekuiper` writes the plugin part of eKuiper's own export, with the function lists
that format loses under a key eKuiper ignores.

Applying a document (`apply`):
1. plan: the difference between the registry and the document, without a download. A plugin is unchanged
   while its recorded sha256 equals the document's (when the document gives one), else while its recorded URL
   equals the document's, and install.sh's arguments are the same; a function plugin whose list alone
   differs is re-registered, not reinstalled. Whatever the document alone can be refused for (names, URLs,
   function names, and function names owned twice in the state it leads to) is refused here, before any
   change.
2. the changes, one plugin at a time, each through the installer's own crash-safe operation, under one lock
   for the whole home so that two applies never interleave. Order: by default registers, updates, installs,
   then removes (last, since undoing one takes a download); a change that takes a function another change
   frees comes after it.
3. a failed step undoes every change already made, newest first, through the same operations: an install is
   deleted (with the source yaml it wrote), an update rolled back to the version it kept (an update here keeps
   one even with basic.keepVersions 0, until the apply ends), a register given its old list back, a remove
   reinstalled from its recorded URL, pinned to its recorded sha256. A plugin another request changed since
   is not undone over that change, and is reported instead.

A worker killed in the middle leaves each plugin whole, old or new: the operation in flight is undone by
start-up recovery, as any operation is, and the ones before it stay done. Applying the document again
finishes the apply (the plan then holds only what is left).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kuiper_plugins.engine import kv
from kuiper_plugins.errors import InvalidRequest, PluginError
from kuiper_plugins.install import fetch, packages
from kuiper_plugins.install.installer import Installer, type_label
from kuiper_plugins.install.locks import waiting_lock
from kuiper_plugins.install.plan import refuse_builtin_functions
from kuiper_plugins.layout import PLUGIN_TYPES, PORTABLE
from kuiper_plugins.store import db, history, registry
from kuiper_plugins.store.registry import name_key

log = logging.getLogger(__name__)

SINGULAR = {"sources": "source", "sinks": "sink", "functions": "function", "portables": "portable"}
LOCK_FILE = "plugin-set.lock"  # under the layout's locks folder: one apply at a time per home
FUNCTION_LISTS = "functionLists"  # the key eKuiper's export format gets for function lists (eKuiper ignores it)

INSTALL, UPDATE, REGISTER, REMOVE = "install", "update", "register", "remove"
# The default order of the steps; a change that takes a function another one frees waits for it (`_ordered`).
STEP_ORDER = {REGISTER: 0, UPDATE: 1, INSTALL: 2, REMOVE: 3}


@dataclass(frozen=True)
class Wanted:
    """One plugin as the document names it."""

    file: str | None  # None: no source named (a plugin copied in by hand), kept as it is
    sha256: str | None = None
    shell_paras: tuple[str, ...] = ()
    functions: tuple[str, ...] | None = None  # function plugins; None: the list is not named
    version: str | None = None  # informational

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Wanted:
        """The plugin from a loaded entry (web/schemas.py)."""
        functions = entry.get("functions")
        sha256 = entry.get("sha256")
        return cls(file=entry.get("file"), sha256=sha256.lower() if sha256 else None,
                   shell_paras=tuple(entry.get("shellParas") or ()),
                   functions=tuple(functions) if functions is not None else None, version=entry.get("version"))


@dataclass(frozen=True)
class Document:
    """A wanted plugin set: type -> name -> plugin; with `prune`, the plugins it does not name go."""

    plugins: dict[str, dict[str, Wanted]]
    prune: bool = False

    @classmethod
    def of(cls, loaded: dict[str, Any]) -> Document:
        """The document from what the request schema loaded (either format)."""
        plugins = {plugin_type: {name: Wanted.of(entry) for name, entry in loaded["plugins"].get(plugin_type,
                                                                                                {}).items()}
                   for plugin_type in PLUGIN_TYPES}
        return cls(plugins=plugins, prune=bool(loaded.get("prune")))


@dataclass
class Change:
    """One step of an apply: what happens to which plugin, why, and the plugin before and after."""

    action: str  # install, update, register or remove
    plugin_type: str  # the API's type: sources, sinks, functions, portables
    name: str
    reason: str
    before: dict[str, Any] | None  # version, sha256, file (and functions) as installed; None for an install
    after: dict[str, Any] | None  # as wanted; once carried out, as the registry recorded it; None for a remove
    request: dict[str, Any] | None = None  # install, update: the request; remove: the one to reinstall it from
    functions: list[str] | None = None  # the list the plugin exports afterwards (function plugins)
    previous_functions: list[str] | None = field(default=None, repr=False)  # register: the list to give back

    def to_json(self) -> dict[str, Any]:
        """The change as PUT /config/plugins answers it."""
        return {"action": self.action, "type": SINGULAR[self.plugin_type], "name": self.name,
                "from": self.before, "to": self.after, "reason": self.reason}

    def target(self) -> dict[str, str]:
        """Which step this is: the plugin and the action, as a failure names it."""
        return {"type": SINGULAR[self.plugin_type], "name": self.name, "action": self.action}


class ApplyFailed(Exception):
    """An apply stopped at one step; the changes made before it were undone (those that could be).

    `planned`: refused while planning, before any change. `plain`: the message is eKuiper's as it is, with no
    command prefix (a name refused by the ID rule, as the eKuiper endpoints answer it too).
    """

    def __init__(self, change: Change, cause: PluginError, rolled_back: Sequence[Change] = (),
                 not_rolled_back: Sequence[tuple[Change, str]] = (), *, planned: bool = False, plain: bool = False):
        super().__init__(cause.message)
        self.change = change
        self.cause = cause
        self.rolled_back = list(rolled_back)
        self.not_rolled_back = list(not_rolled_back)
        self.planned = planned
        self.plain = plain


class PluginSet:
    """The plugin set of one KUIPER_HOME, through its installer: export, plan, apply."""

    def __init__(self, installer: Installer):
        self.installer = installer
        self.settings = installer.settings
        self.layout = installer.layout

    # ---------------------------------------------------------------- export

    def export(self, conn: sqlite3.Connection) -> dict[str, Any]:
        """Every installed plugin, per type, as the document names it."""
        with db.snapshot(conn):
            installed = registry.all_plugins(conn)
        document: dict[str, Any] = {plugin_type: {} for plugin_type in PLUGIN_TYPES}
        for plugin, functions in installed:
            recorded = plugin.request or {}
            entry: dict[str, Any] = {"file": recorded.get("file"), "sha256": plugin.sha256,
                                     "version": plugin.version or None}
            if recorded.get("shellParas"):
                entry["shellParas"] = list(recorded["shellParas"])
            if plugin.type == "functions":
                entry["functions"] = list(functions)
            document[plugin.type][plugin.name] = entry
        return document

    def export_ekuiper(self, conn: sqlite3.Connection) -> dict[str, Any]:
        """The plugin part of eKuiper's /data/export, plus each function plugin's list under `functionLists`.

        The install scripts are the strings eKuiper stores (and writes to its export) for the same requests.
        A plugin with no recorded URL (copied in by hand) has no install script and is left out, as eKuiper's
        export leaves it out.
        """
        with db.snapshot(conn):
            installed = registry.all_plugins(conn)
        native: dict[str, str] = {}
        portable: dict[str, str] = {}
        function_lists: dict[str, list[str]] = {}
        for plugin, functions in installed:
            recorded = plugin.request or {}
            if not recorded.get("file"):
                continue
            script = kv.install_script(plugin.name, recorded["file"], recorded.get("shellParas") or ())
            if plugin.type == PORTABLE:
                portable[plugin.name] = script
            else:
                native[kv.native_key(plugin.type, plugin.name)] = script
            if plugin.type == "functions":
                function_lists[plugin.name] = list(functions)
        return {"nativePlugins": native, "portablePlugins": portable, FUNCTION_LISTS: function_lists}

    # ---------------------------------------------------------------- plan

    def plan(self, conn: sqlite3.Connection, document: Document) -> list[Change]:
        """The changes that bring the registry to `document`, in the order they would be made; nothing is read
        but the registry, nothing is downloaded. Raises ApplyFailed (planned) for what the document alone
        is refused for."""
        with db.snapshot(conn):
            installed = registry.all_plugins(conn)
        by_key = {(plugin.type, name_key(plugin.name)): (plugin, functions) for plugin, functions in installed}
        changes: list[Change] = []
        for plugin_type in PLUGIN_TYPES:
            spelled: dict[str, str] = {}
            for name, wanted in document.plugins.get(plugin_type, {}).items():
                found = by_key.get((plugin_type, name_key(name)))
                installed_as = found[0].name if found is not None else None
                if installed_as != name:
                    found = None  # another spelling of an installed name: a new plugin, refused as a duplicate
                change = _change_for(plugin_type, name, wanted, found)
                _refuse_request(change, wanted, found, installed_as, spelled.get(name_key(name)))
                spelled[name_key(name)] = name
                if change.action:
                    changes.append(change)
        if document.prune:
            named = {(plugin_type, name_key(name)) for plugin_type, plugins in document.plugins.items()
                     for name in plugins}
            for plugin, functions in installed:
                if (plugin.type, name_key(plugin.name)) not in named:
                    changes.append(_removal(plugin, functions))
        _refuse_function_clashes(changes, installed)
        return _ordered(changes, installed)

    # ---------------------------------------------------------------- apply

    def apply(self, document: Document, *, unprivileged_caller: str | None = None) -> list[Change]:
        """Make the registry (files, functions, eKuiper's store, the running engine) match `document`.

        Every change is made, or none stays: see the module's docstring. Raises ApplyFailed.
        """
        with waiting_lock(self.layout.locks / LOCK_FILE):
            changes = self.plan(db.reader(self.layout.registry_file), document)
            done: list[Change] = []
            try:
                for change in changes:
                    try:
                        self._carry_out(change, unprivileged_caller)
                    except PluginError as exc:
                        log.warning("plugin set: the %s of %s plugin %s failed (%s); undoing %d earlier change(s)",
                                    change.action, type_label(change.plugin_type), change.name, exc.message,
                                    len(done))
                        rolled_back, left = self._undo(done, unprivileged_caller)
                        raise ApplyFailed(change, exc, rolled_back, left) from exc
                    except BaseException:
                        log.error("plugin set: the %s of %s plugin %s stopped unexpectedly; undoing %d earlier"
                                  " change(s)", change.action, type_label(change.plugin_type), change.name,
                                  len(done))
                        self._undo(done, unprivileged_caller)
                        raise
                    change.after = self._recorded(change.plugin_type, change.name)
                    done.append(change)
            finally:
                self._trim_versions(done)
        log.info("plugin set applied: %d change(s) (%s)", len(changes),
                 ", ".join(f"{c.action} {type_label(c.plugin_type)}/{c.name}" for c in changes) or "none")
        return changes

    def _carry_out(self, change: Change, unprivileged_caller: str | None) -> None:
        installer = self.installer
        if change.action == INSTALL:
            installer.install(change.plugin_type, change.request, unprivileged_caller=unprivileged_caller)
        elif change.action == UPDATE:
            # The version replaced stays kept until the apply ends, whatever basic.keepVersions says: the
            # apply's undo rolls back to it.
            installer.update(change.plugin_type, change.name, change.request, unprivileged_caller=unprivileged_caller,
                             keep_at_least=max(self.settings.keep_versions, 0) + 1)
        elif change.action == REGISTER:
            installer.register_functions(change.name, change.functions)
        else:
            installer.delete(change.plugin_type, change.name)

    def _undo(self, done: list[Change], unprivileged_caller: str | None
              ) -> tuple[list[Change], list[tuple[Change, str]]]:
        """Take back the changes made, newest first; the ones taken back, and the others with the reason."""
        rolled_back: list[Change] = []
        left: list[tuple[Change, str]] = []
        for change in reversed(done):
            try:
                self._take_back(change, unprivileged_caller)
            except PluginError as exc:
                log.error("plugin set: could not undo the %s of %s plugin %s: %s", change.action,
                          type_label(change.plugin_type), change.name, exc.message)
                left.append((change, exc.message))
            else:
                log.info("plugin set: undid the %s of %s plugin %s", change.action, type_label(change.plugin_type),
                         change.name)
                rolled_back.append(change)
        return rolled_back, left

    def _take_back(self, change: Change, unprivileged_caller: str | None) -> None:
        """Undo one change made by this apply, unless another request changed the plugin since."""
        installer = self.installer
        now = self._recorded(change.plugin_type, change.name)
        label = f"{type_label(change.plugin_type)} plugin {change.name}"
        if change.action == REMOVE:
            if now is not None:
                raise InvalidRequest(f"{label} was installed again by another request: it is left as it is")
            if change.request is None:
                raise InvalidRequest(f"{label} has no recorded URL to be installed again from")
            installer.install(change.plugin_type, change.request, unprivileged_caller=unprivileged_caller)
            return
        if now != change.after:
            raise InvalidRequest(f"{label} was changed by another request since: it is left as it is")
        if change.action == INSTALL:
            installer.delete(change.plugin_type, change.name, undoing_install=True)
        elif change.action == REGISTER:
            installer.register_functions(change.name, change.previous_functions or [change.name])
        else:
            kept = history.kept(db.reader(self.layout.registry_file), change.plugin_type, change.name)
            if not kept or kept[0].manifest.get("sha256") != change.before["sha256"]:
                raise InvalidRequest(f"{label}: the version the update replaced is no longer kept")
            installer.rollback(change.plugin_type, change.name, keep_left=False)

    def _trim_versions(self, done: list[Change]) -> None:
        """Let basic.keepVersions rule again over the plugins this apply updated."""
        for change in done:
            if change.action != UPDATE:
                continue
            try:
                self.installer.trim_versions(change.plugin_type, change.name)
            except PluginError as exc:  # busy: the next operation on the plugin trims its kept versions
                log.warning("plugin set: could not trim the kept versions of %s plugin %s: %s",
                            type_label(change.plugin_type), change.name, exc.message)

    def _recorded(self, plugin_type: str, name: str) -> dict[str, Any] | None:
        """The plugin as the registry holds it now, as a change shows it; None when it is not installed."""
        conn = db.reader(self.layout.registry_file)
        with db.snapshot(conn):
            plugin = registry.find(conn, plugin_type, name)
            functions = registry.functions_of(conn, plugin.id) if plugin is not None else []
        return _state(plugin, functions) if plugin is not None else None


# ---------------------------------------------------------------- the plan's parts


def _state(plugin: registry.Plugin, functions: Sequence[str]) -> dict[str, Any]:
    """An installed plugin as a change shows it."""
    state = {"version": plugin.version or None, "sha256": plugin.sha256, "file": (plugin.request or {}).get("file")}
    if plugin.type == "functions":
        state["functions"] = list(functions)
    return state


def _wanted_state(plugin_type: str, wanted: Wanted, functions: Sequence[str] | None) -> dict[str, Any]:
    state = {"version": wanted.version, "sha256": wanted.sha256, "file": wanted.file}
    if plugin_type == "functions":
        state["functions"] = list(functions or ())
    return state


def _request(plugin_type: str, name: str, wanted: Wanted, functions: Sequence[str] | None) -> dict[str, Any]:
    """The request an install or update is given, as the eKuiper endpoints record theirs."""
    record: dict[str, Any] = {"name": name, "file": wanted.file}
    if wanted.shell_paras:
        record["shellParas"] = list(wanted.shell_paras)
    if plugin_type == "functions" and functions:
        record["functions"] = list(functions)
    if wanted.sha256:
        record["sha256"] = wanted.sha256
    return record


def _change_for(plugin_type: str, name: str, wanted: Wanted,
                found: tuple[registry.Plugin, list[str]] | None) -> Change:
    """The change one named plugin needs; its action is "" when it needs none."""
    if found is None:
        functions = list(wanted.functions) if wanted.functions is not None else [name]
        return Change(INSTALL, plugin_type, name, "not installed", None,
                      _wanted_state(plugin_type, wanted, functions), request=_request(plugin_type, name, wanted,
                                                                                      wanted.functions),
                      functions=functions if plugin_type == "functions" else None)
    plugin, functions = found
    before = _state(plugin, functions)
    # A list left out is not named: an update keeps the one installed.
    kept_list = list(wanted.functions) if wanted.functions is not None else list(functions)
    reason = _update_reason(plugin, wanted)
    if reason:
        return Change(UPDATE, plugin_type, name, reason, before, _wanted_state(plugin_type, wanted, kept_list),
                      request=_request(plugin_type, name, wanted, kept_list if plugin_type == "functions" else None),
                      functions=kept_list if plugin_type == "functions" else None)
    if plugin_type == "functions" and wanted.functions is not None and list(wanted.functions) != list(functions):
        return Change(REGISTER, plugin_type, name, "function list differs", before, {**before, "functions": kept_list},
                      functions=kept_list, previous_functions=list(functions))
    return Change("", plugin_type, name, "unchanged", before, before)


def _update_reason(plugin: registry.Plugin, wanted: Wanted) -> str:
    """Why an installed plugin must be reinstalled from the document's package; "" when it need not be."""
    if wanted.file is None:
        return ""  # no source named: the plugin stays as it is (a different sha256 is refused: _refuse_request)
    recorded = plugin.request or {}
    if wanted.sha256 is not None:
        if (plugin.sha256 or "").lower() != wanted.sha256:
            return f"sha256 differs: installed {_short(plugin.sha256)}, wanted {_short(wanted.sha256)}"
    elif recorded.get("file") != wanted.file:
        return f"file differs: installed from {recorded.get('file') or 'an unrecorded source'}"
    if list(recorded.get("shellParas") or ()) != list(wanted.shell_paras):
        return "shellParas differ"
    return ""


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "unknown"


def _removal(plugin: registry.Plugin, functions: Sequence[str]) -> Change:
    """The remove of an installed plugin the document does not name, with the request to reinstall it from."""
    request = None
    recorded = plugin.request or {}
    if recorded.get("file"):
        request = {key: value for key, value in recorded.items() if key in ("file", "shellParas")}
        request["name"] = plugin.name
        if plugin.type == "functions":
            request["functions"] = list(functions)
        if plugin.sha256:
            request["sha256"] = plugin.sha256  # what comes back is what went
    return Change(REMOVE, plugin.type, plugin.name, "not in the document (prune)", _state(plugin, functions), None,
                  request=request)


def _refuse_request(change: Change, wanted: Wanted, found: tuple[registry.Plugin, list[str]] | None,
                    installed_as: str | None, spelled: str | None) -> None:
    """Refuse, before any change, what the installer would refuse for this plugin from the document alone.

    `installed_as`: the installed plugin's name when it differs from `change.name` in case only; `spelled`: the
    name the document gave before this one with the same letters.
    """
    name, plugin_type = change.name, change.plugin_type
    try:
        packages.check_name(name)
    except InvalidRequest as exc:
        raise ApplyFailed(change, exc, planned=True, plain=True) from None
    try:
        packages.check_plugin_name(plugin_type, name)
        if spelled is not None:
            raise InvalidRequest(f"invalid name {name}: duplicate (the document names {spelled} too; names that"
                                 " differ only in case name one plugin)")
        if installed_as is not None and installed_as != name:
            raise InvalidRequest(f"invalid name {name}: duplicate ({installed_as} is installed; names that differ"
                                 " only in case name one plugin)")
        if change.action in (INSTALL, UPDATE):
            if change.action == INSTALL and wanted.file is None:
                raise InvalidRequest("invalid uri (the document gives no file to install the plugin from)")
            fetch.check_url(wanted.file)
        elif found is not None and wanted.file is None and wanted.sha256 is not None \
                and (found[0].sha256 or "").lower() != wanted.sha256:
            raise InvalidRequest("invalid uri (the document gives another sha256 than the one installed, and no"
                                 " file to fetch that package from)")
        if change.functions is not None and change.action in (INSTALL, UPDATE, REGISTER):
            refuse_builtin_functions(change.functions)
    except InvalidRequest as exc:
        raise ApplyFailed(change, exc, planned=True) from None


def _refuse_function_clashes(changes: list[Change], installed: list[tuple[registry.Plugin, list[str]]]) -> None:
    """Refuse a document that leads to a function exported by two plugins, in the installer's words."""
    listing = {(c.plugin_type, name_key(c.name)): c for c in changes
               if c.plugin_type == "functions" and c.action in (INSTALL, UPDATE, REGISTER)}
    removed = {(c.plugin_type, name_key(c.name)) for c in changes if c.action == REMOVE}
    owners: dict[str, str] = {}
    for plugin, functions in installed:
        key = (plugin.type, name_key(plugin.name))
        if key not in removed and key not in listing:
            owners.update({function: plugin.name for function in functions})
    for change in sorted(listing.values(), key=lambda c: name_key(c.name)):
        for function in change.functions or ():
            owner = owners.setdefault(function, change.name)
            if owner != change.name:
                raise ApplyFailed(change, InvalidRequest(
                    f"function name {function} already exists (it belongs to plugin {owner})"), planned=True)


def _ordered(changes: list[Change], installed: list[tuple[registry.Plugin, list[str]]]) -> list[Change]:
    """The changes in the order they are made: STEP_ORDER, then type and name; one that takes a function
    another changed plugin exports now comes after that plugin's change (a cycle keeps the default order,
    and its step is refused as the installer refuses it)."""
    default = sorted(changes, key=lambda c: (STEP_ORDER[c.action], PLUGIN_TYPES.index(c.plugin_type),
                                             name_key(c.name)))
    owner_of = {function: (plugin.type, name_key(plugin.name)) for plugin, functions in installed
                for function in functions}
    changing = {(c.plugin_type, name_key(c.name)): c for c in changes}
    waits_for: dict[int, list[Change]] = {}
    for change in changes:
        if change.action == REMOVE or change.functions is None:
            continue
        own = (change.plugin_type, name_key(change.name))
        waits_for[id(change)] = [changing[owner_of[f]] for f in change.functions
                                 if owner_of.get(f, own) != own and owner_of[f] in changing]
    ordered: list[Change] = []
    placed: set[int] = set()
    while len(ordered) < len(default):
        ready = next((c for c in default if id(c) not in placed
                      and all(id(d) in placed for d in waits_for.get(id(c), ()))), None)
        if ready is None:  # a cycle (two plugins swapping a function): the first left, in the default order
            ready = next(c for c in default if id(c) not in placed)
        ordered.append(ready)
        placed.add(id(ready))
    return ordered

