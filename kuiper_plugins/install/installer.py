"""Install, update and delete plugins without ever leaving one half-installed, through power cuts too.

The installer is thin: each operation is planned, then applied.
- `plan` decides what the operation would write, remove, register and run, and refuses what it would
  refuse, writing nothing;
- `apply` carries it out as one durable transaction (lock, reservation, staging, journal, moves,
  commit) and, after a crash, `recover` finishes or undoes what a dead worker left (see its docstring
  for the stages and the commit point);
- `adopt` lists what the engine or a user put in eKuiper's folders;
- `project` makes eKuiper's store, and the running engine when one is attached, follow the registry.
Here are the public operations, the download into the operation's scratch folder, and one log line
per operation.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from kuiper_plugins.engine import kv, live, portable
from kuiper_plugins.errors import (
    ArchiveRejected,
    Forbidden,
    InvalidRequest,
    PackageInvalid,
    PluginError,
    PluginNotFound,
    ScriptFailed,
)
from kuiper_plugins.install import archive, fetch
from kuiper_plugins.install.adopt import Adopter, native_binaries
from kuiper_plugins.install.apply import Applier, Operation
from kuiper_plugins.install.dry_run import DryRun
from kuiper_plugins.install.locks import blocking_lock
from kuiper_plugins.install.packages import main_file, so_file, type_label
from kuiper_plugins.install.plan import Planner, refuse_builtin_functions, refuse_function_clashes
from kuiper_plugins.install.project import EngineProjection
from kuiper_plugins.layout import PORTABLE, Layout
from kuiper_plugins.lifecycle.history import Versions
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db, registry

# Callers (the web layer, engine/sync.py) import these from here, the install package's face.
__all__ = ["Installer", "main_file", "native_binaries", "recover_home", "type_label"]

log = logging.getLogger(__name__)


def _not_a_function_plugin(conn: sqlite3.Connection, name: str) -> str:
    """What a register of `name` should have been, when `name` is a plugin of another type; "" otherwise."""
    for plugin_type in ("portables", "sources", "sinks"):
        if registry.find(conn, plugin_type, name) is None:
            continue
        if plugin_type == PORTABLE:
            return (f" (portable plugin {name} declares its functions in its descriptor {name}.json, in the zip;"
                    f" to change them, update the plugin with a package whose {name}.json lists them)")
        return f" ({type_label(plugin_type)} plugin {name} exports no functions: only a function plugin has a list)"
    return ""


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
        self.projection = EngineProjection(self.layout, self.engine_store, self.live)
        self.planner = Planner(settings, self.layout, engine)
        self.applier = Applier(settings, self.layout, self._writer, self.projection)
        self.adopter = Adopter(self.layout, self._writer, self.engine_store)
        self.dry_run = DryRun(self)  # ?dryRun=1: the same refusals, and a plan instead of the operation
        self.versions = Versions(settings, self.layout, self.applier)
        self.damaged_at_recovery: list | None = None  # what the last recover() found wrong with recorded files
        self.applier.keeper = self.versions

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
            with self.applier.locked(plugin_type, name) as conn:
                if registry.find_by_key(conn, plugin_type, name) is not None:
                    raise InvalidRequest(f"invalid name {name}: duplicate")
                self.planner.refuse_before_fetching(conn, plugin_type, request, None)
                with self.applier.reserved(conn, plugin_type, name, "install") as op:
                    outcome.update(self._install_package(conn, op, plugin_type, request, old=None,
                                                         unprivileged_caller=unprivileged_caller))
                self.projection.project(conn, plugin_type, name)

    def update(self, plugin_type: str, name: str, request: dict[str, Any], *,
               unprivileged_caller: str | None = None, keep_at_least: int = 0) -> None:
        """Replace an installed plugin by a new package; the old one stays whole until the new one is in.

        `unprivileged_caller` is as for `install`. `keep_at_least` keeps that many previous versions even
        when basic.keepVersions says fewer, until `trim_versions` (an apply of a plugin set may undo it).
        """
        with self._logged("update", plugin_type, name, request) as outcome:
            fetch.check_url(request["file"])
            with self.applier.locked(plugin_type, name) as conn:
                old = self.planner.update_target(conn, plugin_type, name)
                self.planner.refuse_before_fetching(conn, plugin_type, request, old)
                try:
                    with self.applier.reserved(conn, plugin_type, name, "update") as op:
                        op.keep_at_least = keep_at_least
                        outcome.update(self._install_package(conn, op, plugin_type, request, old=old,
                                                             unprivileged_caller=unprivileged_caller))
                finally:
                    # Committed: the oldest kept version may have been dropped; undone: its copy goes.
                    self.versions.tidy(conn)
                self.projection.project(conn, plugin_type, name)

    def delete(self, plugin_type: str, name: str, *, undoing_install: bool = False) -> None:
        """Remove exactly the files the install wrote, the plugin's functions and its registry entry.

        A source's yaml stays, as a user's configuration does, unless `undoing_install` says the delete takes
        back an install of moments ago: then a yaml still as that install wrote it goes too. Files already
        gone from disk are not an error: the registry entry goes all the same.
        """
        with self._logged("delete", plugin_type, name, None) as outcome, \
                self.applier.locked(plugin_type, name) as conn:
            plan = self.planner.plan_delete(conn, plugin_type, name, configuration_too=undoing_install)
            outcome["version"] = plan.version
            with self.applier.reserved(conn, plugin_type, name, "delete") as op:
                if self.live is not None:
                    if plugin_type == PORTABLE:
                        op.engine_changed = True
                    outcome["engine"] = self.projection.hand_delete(
                        op.staging, plugin_type, name, so_file(plugin_type, registry.files_of(conn, plan.old.id)))
                self.applier.remove(conn, op, plan, outcome.get("engine"))
            self.projection.project(conn, plugin_type, name)
            self.versions.tidy(conn)  # its kept versions went with it

    def rollback(self, plugin_type: str, name: str, version: str | None = None, *, keep_left: bool = True) -> str:
        """Swap a kept version of a plugin back in (`version`, else the newest), through the same crash-safe path.

        Return the version now installed. `keep_left=False` keeps no copy of the version left (see
        `Versions.rollback`).
        """
        with self._logged("rollback", plugin_type, name, None) as outcome:
            with self.applier.locked(plugin_type, name) as conn:
                try:
                    outcome.update(self.versions.rollback(conn, plugin_type, name, version, keep_left=keep_left))
                finally:
                    self.versions.tidy(conn)  # the version consumed, or the copy of an undone rollback
                self.projection.project(conn, plugin_type, name)
        return outcome["version"]

    def trim_versions(self, plugin_type: str, name: str) -> None:
        """Forget the plugin's kept versions beyond basic.keepVersions, which an update asked to exceed."""
        with self.applier.locked(plugin_type, name, roll_back_stale=False) as conn:
            try:
                self.versions.trim(conn, plugin_type, name)
            finally:
                self.versions.tidy(conn)

    def history(self, conn: sqlite3.Connection, plugin_type: str, name: str) -> list[dict[str, Any]]:
        """The plugin's installs, updates and rollbacks, newest first; 404 when it has none and is not installed."""
        return self.versions.history(conn, plugin_type, name)

    def register_functions(self, name: str, functions: Sequence[str]) -> None:
        """Replace the function list of a native function plugin."""
        with self.applier.locked("functions", name, roll_back_stale=False) as conn:
            plugin = registry.find(conn, "functions", name)
            if plugin is None:
                hint = _not_a_function_plugin(conn, name)
                raise PluginNotFound(f"register functions plugin {name} error: not found{hint}")
            if not functions:
                raise InvalidRequest(
                    f"function plugins {name} regiser functions error: property 'functions' must not be empty"
                )
            refuse_builtin_functions(functions)
            refuse_function_clashes(conn, functions, plugin.id)
            missing = self.projection.missing_files(conn, plugin)
            if missing:
                # A list for a plugin that is not there would reach eKuiper's store and the running engine.
                raise InvalidRequest(
                    f"function plugins {name} regiser functions error: (functions plugin {name} is damaged,"
                    f" {', '.join(missing)} missing: POST /registry/repair, or kuiper-plugins repair, reinstalls"
                    " it from its recorded source; the function list is unchanged)")
            # The engine's refusal comes before our commit, and changes nothing on either side.
            engine = self.live.register_functions(name, functions) if self.live is not None else None
            try:
                if engine == live.LOADED:
                    self.projection.refuse_uncallable(functions, f"function plugins {name} regiser functions error",
                                                      "the function list is unchanged")
                with db.transaction(conn):
                    registry.set_functions(conn, plugin.id, functions)
            except (sqlite3.IntegrityError, PluginError):
                if engine == live.LOADED:
                    self.projection.give_back_functions(name, registry.functions_of(conn, plugin.id))
                    # the engine rewrote its pluginFuncs row both times
                    self.projection.project(conn, "functions", name)
                refuse_function_clashes(conn, functions, plugin.id)
                raise
            self.projection.project(conn, "functions", name)
            log.info("functions plugin %s now exports %s", name, ",".join(functions))

    # ---------------------------------------------------------------- start-up, and the engine's own changes

    def recover(self) -> None:
        """Finish or undo what crashed workers left in staging, sweep scratch, adopt hand-copied .so files.

        Every journal in staging is honoured (see `Applier.recover`), then what is on disk and not
        recorded is adopted, then eKuiper's store is made to agree with the registry. Whatever cannot
        be done now is logged and left for the next start or the next operation on that plugin;
        start-up goes on so that reads are still served.
        """
        with blocking_lock(self.layout.locks / "recovery.lock"):
            conn = self._connect()
            try:
                self.applier.recover(conn)
                self.versions.sweep(conn)
                self.adopter.adopt_all(conn)
                self.damaged_at_recovery = self.reconcile_engine_store(conn)
            finally:
                conn.close()

    def adopt_offered(self, plugin_type: str, name: str) -> bool | None:
        """Adopt one plugin the running engine offers, from its files on disk; whether the registry has it now
        (None: an operation of ours holds it, ask again later)."""
        return self.adopter.adopt_offered(plugin_type, name)

    def forget_removed(self, plugin_type: str, name: str) -> bool:
        """Forget a plugin whose files the engine's own delete removed; whether it was forgotten."""
        return self.adopter.forget_removed(plugin_type, name)

    def reconcile_engine_store(self, conn: sqlite3.Connection) -> list:
        """Make eKuiper's plugin rows equal the projection of the whole registry (start-up); return the
        recorded files found missing, empty or modified on the way (verify.Problem)."""
        return self.projection.reconcile(conn)

    def engine_version(self) -> str | None:
        """The managed engine's version: its own answer (engine.url), else basic.kuiperVersion."""
        return self.planner.engine_version()

    # ---------------------------------------------------------------- the steps

    def _install_package(
        self, conn: sqlite3.Connection, op: Operation, plugin_type: str, request: dict[str, Any],
        old: registry.Plugin | None, unprivileged_caller: str | None = None,
    ) -> dict[str, Any]:
        """Fetch the package into the operation's scratch folder, plan from it, unpack it, and apply the plan."""
        settings = self.settings
        fetched = fetch.fetch(
            request["file"], op.staging, uploads_dir=self.layout.uploads,
            allow_external_file_access=settings.allow_external_file_access,
            enable_private_net=settings.enable_private_net,
            private_net_allow_list=settings.private_net_allow_list, max_size=settings.max_plugin_size,
            timeout=settings.download_timeout, tls_verify=settings.tls_verify, sha256=request.get("sha256"),
        )
        try:
            if plugin_type == PORTABLE and settings.portable_verify_on_install:
                # Its handshake check starts now and readies itself while the package is checked and unpacked
                # (the applier runs it once the plugin is in place; the operation stops it if it never runs).
                op.check = portable.check_ahead()
            plan = self.planner.plan_package(conn, op.kind, plugin_type, request, fetched, old, unprivileged_caller)
            if op.check is not None and plan.package.script:
                op.check.close()  # install.sh may run for minutes: the check is started after it instead
                op.check = None
            unpacked = op.staging / "unpacked"
            # A portable plugin's own folder once in place: writable by this service's user alone, whatever
            # the umask, as archive.extract makes every folder inside it.
            unpacked.mkdir(mode=archive.FOLDER_MODE)
            try:
                plan.unpacked = archive.extract(fetched.path, plan.entries, unpacked)
            except (ArchiveRejected, PackageInvalid, ScriptFailed, Forbidden) as exc:
                raise exc.with_prefix("fail to install plugin")
        finally:
            fetched.path.unlink(missing_ok=True)

        self.planner.plan_unpacked(plan, unpacked)
        return self.applier.install(conn, op, plan, unpacked)

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


def recover_home(settings: Settings, engine=None) -> Installer:
    """Make the home's folders and registry, and settle what a crash or power cut left; the installer.

    gunicorn's master runs it before it tells systemd it is ready, so that an engine ordered after this
    service boots on settled folders. The workers forked right after share what it settled; a worker forked
    later, replacing one that stopped, settles the home again as it starts (app.settle_home).
    """
    layout = Layout.of(settings)
    layout.create()
    db.initialise(layout.registry_file)
    installer = Installer(settings, connect=lambda: db.connect(layout.registry_file), engine=engine)
    installer.recover()
    return installer
