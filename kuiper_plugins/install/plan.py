"""Plan: decide what an operation would do, without doing any of it.

Pure: no write to the home, no lock, no registry row. A plan reads the request, the registry and the
package the caller has fetched (and, for the engine's verdict, unpacked) into its scratch folder, and
refuses in eKuiper's words, in the same order as the operation itself would, whatever the operation
would refuse. The result is an `OperationPlan`: what would be written, removed, registered and run,
with the engine's verdict, as JSON-ready values (`to_json`) for whoever shows it. `apply` carries a plan
out; it still refuses, at the moment it stages, a destination that is not this plugin's.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuiper_plugins import found_files
from kuiper_plugins.engine import compat
from kuiper_plugins.errors import (
    ArchiveRejected,
    Forbidden,
    InvalidRequest,
    PackageInvalid,
    PluginNotFound,
    ScriptFailed,
)
from kuiper_plugins.install import archive, durable, packages, scripts
from kuiper_plugins.install.fetch import Fetched
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE, Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import registry

log = logging.getLogger(__name__)

SCRIPT_HEAD_LINES = 20  # how much of an install.sh a plan shows
SCRIPT_HEAD_MAX_BYTES = 64 * 1024  # and at most this much of it is read for those lines


@dataclass(frozen=True)
class PlannedFile:
    """A file or folder an operation would write, as the registry records it."""

    path: str  # relative to KUIPER_HOME: plugins/sources/Random.so
    size: int | None  # from the package's listing; None for a folder (or what install.sh makes)
    sha256: str | None  # None until staged: the registry records the sealed file's


@dataclass(frozen=True)
class PlannedScript:
    """The install.sh an operation would run."""

    sha256: str
    head: list[str]  # its first SCRIPT_HEAD_LINES lines, undecodable bytes replaced


@dataclass
class OperationPlan:
    """What one operation would write, remove, register and run, with the engine's verdict.

    The fields up to `restart_needed` are the plan as shown (`to_json`); the rest is what `apply`
    needs to carry it out.
    """

    kind: str  # install, update or delete
    plugin_type: str
    name: str
    version: str | None
    source_url: str | None
    package_size: int | None
    package_sha256: str | None
    writes: list[PlannedFile]
    removes: list[str]  # recorded files the operation takes away (those still on disk when it runs)
    functions: list[str]
    function_clashes: list[tuple[str, str]]  # (function, the plugin that exports it); a plan with one is refused
    runs_script: bool
    script: PlannedScript | None  # known once the package is unpacked
    compatibility: dict[str, Any] | None  # engine.binary's verdict on a native binary, when set
    # Go cannot unload a plugin: a native plugin replaced or removed stays in the running engine until it restarts.
    restart_needed: bool
    request: dict[str, Any] | None = field(default=None, repr=False)
    package: packages.InstallPlan | None = field(default=None, repr=False)
    entries: list[archive.Entry] = field(default_factory=list, repr=False)
    old: registry.Plugin | None = field(default=None, repr=False)  # the plugin replaced or removed
    # The sha256 of each file `archive.extract` wrote, by entry name, once the package is unpacked.
    unpacked: dict[str, str] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready values, in eKuiper's type names."""
        return {
            "kind": self.kind,
            "type": packages.type_label(self.plugin_type),
            "name": self.name,
            "version": self.version,
            "source": {"url": self.source_url, "size": self.package_size, "sha256": self.package_sha256},
            "writes": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.writes],
            "removes": list(self.removes),
            "functions": list(self.functions),
            "functionClashes": [{"function": f, "plugin": p} for f, p in self.function_clashes],
            "installScript": None if not self.runs_script else {
                "sha256": self.script.sha256 if self.script else None,
                "head": list(self.script.head) if self.script else None,
            },
            "compatibility": self.compatibility,
            "restartNeeded": self.restart_needed,
        }


class Planner:
    """Decides the operations on one KUIPER_HOME: reads, refuses, and never writes."""

    def __init__(self, settings: Settings, layout: Layout, engine=None):
        self.settings = settings
        self.layout = layout
        self.engine = engine  # an EngineClient when engine.url is set

    def engine_version(self) -> str | None:
        """The managed engine's version: its own answer (engine.url), else basic.kuiperVersion."""
        info = self.engine.info() if self.engine is not None else None
        return info.version if info is not None else self.settings.kuiper_version

    def update_target(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> registry.Plugin | None:
        """The plugin an update replaces, refused in eKuiper's words when there is none (a portable may be new)."""
        old = registry.find(conn, plugin_type, name)
        if old is None:
            if plugin_type != PORTABLE:
                raise PluginNotFound(
                    f"update {plugin_type} plugin {name} error, cannot delete old version:"
                    f" invalid name {name}: not exist"
                )
            if registry.find_by_key(conn, plugin_type, name) is not None:
                raise InvalidRequest(f"invalid name {name}: duplicate")
        return old

    def refuse_before_fetching(
        self, conn: sqlite3.Connection, plugin_type: str, request: dict[str, Any], old: registry.Plugin | None
    ) -> None:
        """What the request alone decides, before anything is downloaded: a function list where none belongs,
        built-in names, function clashes."""
        name = request["name"]
        if plugin_type != "functions" and request.get("functions"):
            # eKuiper ignores it; a caller who gives one expects functions the plugin will not export.
            if plugin_type == PORTABLE:
                raise InvalidRequest(f"functions is not taken for a portable plugin (it declares its functions in"
                                     f" its descriptor {name}.json, in the zip: leave functions out)")
            raise InvalidRequest(f"functions is not taken for a {plugin_type.removesuffix('s')} plugin (only a"
                                 " function plugin exports functions: leave functions out)")
        packages.check_plugin_name(plugin_type, name)
        if plugin_type == "functions":
            functions = request.get("functions") or [name]
            refuse_builtin_functions(functions)
            refuse_function_clashes(conn, functions, old.id if old is not None else None)

    def plan_package(
        self, conn: sqlite3.Connection, kind: str, plugin_type: str, request: dict[str, Any], fetched: Fetched,
        old: registry.Plugin | None, unprivileged_caller: str | None = None,
    ) -> OperationPlan:
        """Plan an install or update from the fetched zip, refusing what it would refuse before unpacking.

        `unprivileged_caller` names a caller who is neither root, this service's user nor a token's holder:
        a package with an install.sh (which runs as this service's user) is refused for such a caller.
        """
        try:
            entries, package = self._inspect(plugin_type, request["name"], request, fetched.path)
            clashes = registry.function_clashes(conn, package.functions, old.id if old is not None else None)
            _refuse_clashes(clashes)
            if package.script and not self.settings.install_scripts:
                raise ScriptFailed("the package has an install.sh and basic.installScripts is false")
            if package.script and unprivileged_caller is not None:
                raise Forbidden(
                    f"the package has an install.sh, which runs as this service's user, and the caller is"
                    f" {unprivileged_caller}: only root, this service's user or a token's holder may install"
                    " a package that carries one (packages without install.sh are not affected)"
                )
            if package.script:
                scripts.require_confinement()  # refused before unpacking where install.sh cannot be confined
        except (ArchiveRejected, PackageInvalid, ScriptFailed, Forbidden) as exc:
            raise exc.with_prefix("fail to install plugin")
        sizes = {entry.name: entry.size for entry in entries if not entry.is_dir}
        destinations = {unit.dest for unit in package.units}
        return OperationPlan(
            kind=kind, plugin_type=plugin_type, name=package.name, version=package.version,
            source_url=request["file"], package_size=fetched.size, package_sha256=fetched.sha256,
            writes=[PlannedFile(unit.dest, None if unit.is_dir else sizes.get(unit.src), None)
                    for unit in package.units],
            removes=sorted(set(registry.files_of(conn, old.id)) - destinations) if old is not None else [],
            functions=list(package.functions), function_clashes=list(clashes), runs_script=package.script is not None,
            script=None, compatibility=None, restart_needed=plugin_type in NATIVE_TYPES and old is not None,
            request=request, package=package, entries=entries, old=old,
        )

    def plan_unpacked(self, plan: OperationPlan, unpacked: Path) -> None:
        """Complete a plan from its unpacked package: install.sh as it would run, and the engine's verdict."""
        if plan.plugin_type in NATIVE_TYPES:
            plan.compatibility = self.check_compatibility(plan.package, unpacked)
        if plan.package.script:
            plan.script = _script_of(unpacked / plan.package.script)

    def plan_delete(self, conn: sqlite3.Connection, plugin_type: str, name: str, *,
                    configuration_too: bool = False) -> OperationPlan:
        """Plan the delete of an installed plugin: its recorded files but a source's yaml go, and its functions.

        `configuration_too`: the source's yaml goes as well while it still holds what was recorded (the delete
        undoes an install; a yaml the user has changed since stays all the same).
        """
        plugin = registry.find(conn, plugin_type, name)
        if plugin is None:
            if plugin_type == PORTABLE:
                raise PluginNotFound(f"delete portable plugin {name} error: portable plugin {name} is not found")
            raise PluginNotFound(f"delete {plugin_type} plugin {name} error: invalid name {name}: not exist")
        kept = set(packages.kept_on_delete(plugin_type, name))
        if configuration_too:
            recorded = {f.path: f for f in registry.recorded_files(conn, plugin.id)}
            kept = {path for path in kept if path in recorded and not self._as_recorded(recorded[path])}
        return OperationPlan(
            kind="delete", plugin_type=plugin_type, name=plugin.name, version=plugin.version,
            source_url=(plugin.request or {}).get("file"), package_size=None, package_sha256=plugin.sha256,
            writes=[], removes=[f for f in registry.files_of(conn, plugin.id) if f not in kept],
            functions=registry.functions_of(conn, plugin.id), function_clashes=[], runs_script=False, script=None,
            compatibility=None, restart_needed=plugin_type in NATIVE_TYPES, request=plugin.request, old=plugin,
        )

    def _as_recorded(self, recorded: registry.RecordedFile) -> bool:
        """Whether a recorded file still holds what its record says (size and sha256 known and equal)."""
        if recorded.sha256 is None:
            return False
        print_ = durable.fingerprint(self.layout.absolute(recorded.path))
        return print_ is not None and (print_.size, print_.sha256) == (recorded.size, recorded.sha256)

    def check_compatibility(self, plan: packages.InstallPlan, unpacked: Path) -> dict[str, Any] | None:
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

    def _inspect(
        self, plugin_type: str, name: str, request: dict[str, Any], zip_path: Path
    ) -> tuple[list[archive.Entry], packages.InstallPlan]:
        """Inspect the zip (refusing unsafe archives) and apply the package rules to its listing."""
        entries = archive.inspect(
            zip_path, max_entries=self.settings.max_archive_entries,
            max_unpacked_size=self.settings.max_unpacked_size,
        )
        plan = packages.plan_package(
            plugin_type, name, entries,
            archive.member_reader(zip_path, entries),
            shell_paras=request.get("shellParas") or [], functions=request.get("functions") or [name],
            shown=lambda recorded: str(self.layout.absolute(recorded)),
        )
        return entries, plan


def refuse_builtin_functions(functions: Sequence[str]) -> None:
    """Refuse a function list that names one of eKuiper's built-ins, or a name the API refuses."""
    for function in functions:
        packages.check_function_name(function)


def refuse_function_clashes(conn: sqlite3.Connection, functions: Sequence[str], owner: int | None) -> None:
    """Refuse functions that another plugin than `owner` already exports, in eKuiper's words."""
    _refuse_clashes(registry.function_clashes(conn, functions, owner))


def _refuse_clashes(clashes: Sequence[tuple[str, str]]) -> None:
    if clashes:
        function, plugin = clashes[0]
        raise InvalidRequest(f"function name {function} already exists (it belongs to plugin {plugin})")


def _script_of(path: Path) -> PlannedScript | None:
    """The sha256 and first lines of an unpacked install.sh; None (logged) when it cannot be read.

    Showing it is not a reason to refuse: running it is what decides, as it did before plans.
    """
    print_ = durable.fingerprint(path)
    try:
        with os.fdopen(found_files.open_regular(path), "rb") as script:
            start = script.read(SCRIPT_HEAD_MAX_BYTES)
    except OSError as exc:
        log.warning("cannot show %s in the plan: %s", path, exc)
        return None
    lines = start.decode("utf-8", errors="replace").splitlines()[:SCRIPT_HEAD_LINES]
    return PlannedScript(sha256=print_.sha256 if print_ else "", head=lines)
