"""Plan: decide what an operation would do, without doing any of it.

Pure: no write to the home, no lock, no registry row. A plan reads the request, the registry and the
package the caller has fetched (and, for the engine's verdict, unpacked) into its scratch folder, and
refuses in eKuiper's words, in the same order as the operation itself would, whatever the operation
would refuse. `apply` carries a plan out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kuiper_plugins.engine import compat
from kuiper_plugins.errors import ArchiveRejected, Forbidden, InvalidRequest, PackageInvalid, ScriptFailed
from kuiper_plugins.install import archive, packages, scripts
from kuiper_plugins.layout import PORTABLE, Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import registry

log = logging.getLogger(__name__)


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

    def refuse_before_fetching(
        self, conn: sqlite3.Connection, plugin_type: str, request: dict[str, Any], old: registry.Plugin | None
    ) -> None:
        """What the request alone decides, before anything is downloaded: built-in names, function clashes."""
        name = request["name"]
        packages.check_plugin_name(plugin_type, name)
        if plugin_type == "functions":
            functions = request.get("functions") or [name]
            refuse_builtin_functions(functions)
            refuse_function_clashes(conn, functions, old.id if old is not None else None)

    def read_package(
        self, conn: sqlite3.Connection, plugin_type: str, request: dict[str, Any], zip_path: Path,
        old: registry.Plugin | None, unprivileged_caller: str | None = None,
    ) -> tuple[list[archive.Entry], packages.InstallPlan]:
        """Apply the package rules to the fetched zip and refuse what the install would, before unpacking.

        `unprivileged_caller` names a caller who is neither root, this service's user nor a token's holder:
        a package with an install.sh (which runs as this service's user) is refused for such a caller.
        """
        try:
            entries, plan = self._inspect(plugin_type, request["name"], request, zip_path)
            refuse_function_clashes(conn, plan.functions, old.id if old is not None else None)
            if plan.script and not self.settings.install_scripts:
                raise ScriptFailed("the package has an install.sh and basic.installScripts is false")
            if plan.script and unprivileged_caller is not None:
                raise Forbidden(
                    f"the package has an install.sh, which runs as this service's user, and the caller is"
                    f" {unprivileged_caller}: only root, this service's user or a token's holder may install"
                    " a package that carries one (packages without install.sh are not affected)"
                )
            if plan.script:
                scripts.require_confinement()  # refused before unpacking where install.sh cannot be confined
        except (ArchiveRejected, PackageInvalid, ScriptFailed, Forbidden) as exc:
            raise exc.with_prefix("fail to install plugin")
        return entries, plan

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
        shell_paras = request.get("shellParas") or []
        if plugin_type == PORTABLE:
            member = packages.descriptor_member(name)
            present = any(e.name == member and not e.is_dir for e in entries)
            raw = archive.read_member(zip_path, member, max_size=packages.DESCRIPTOR_MAX_BYTES) if present else None
            return entries, packages.plan_portable(name, entries, raw, shell_paras=shell_paras)
        functions = request.get("functions") or [name]
        plan = packages.plan_native(plugin_type, name, entries, shell_paras=shell_paras, functions=functions,
                                    shown=lambda recorded: str(self.layout.absolute(recorded)))
        return entries, plan


def refuse_builtin_functions(functions: Sequence[str]) -> None:
    """Refuse a function list that names one of eKuiper's built-ins, or a name the API refuses."""
    for function in functions:
        packages.check_function_name(function)


def refuse_function_clashes(conn: sqlite3.Connection, functions: Sequence[str], owner: int | None) -> None:
    """Refuse functions that another plugin than `owner` already exports, in eKuiper's words."""
    clashes = registry.function_clashes(conn, functions, owner)
    if clashes:
        function, plugin = clashes[0]
        raise InvalidRequest(f"function name {function} already exists (it belongs to plugin {plugin})")
