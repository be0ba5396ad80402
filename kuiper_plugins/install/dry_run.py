"""Dry run: plan an install, update or delete as the real request would, and apply nothing.

`?dryRun=1` shows an operator what a request would do before it does it. A dry run goes through the
same refusals, in the same order and words, as the operation (`Installer.install`, `update`, `delete`),
so a plan that would fail answers the same 4xx. It writes nothing the service keeps: no lock file, no
operation row, no staging folder, no registry or KV row. The package is downloaded and unpacked in a
private temporary folder under `incoming` (the home's own filesystem, so the same disk space rules
apply) that is removed before the answer.

What a dry run cannot foresee is said in the docs: what install.sh does when it runs, and what the
running engine answers when it is handed the plugin; a concurrent operation may also change the
outcome between the plan and the real request.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kuiper_plugins.errors import (
    ArchiveRejected,
    Forbidden,
    InvalidRequest,
    PackageInvalid,
    ScriptFailed,
)
from kuiper_plugins.install import archive, durable, fetch
from kuiper_plugins.install.packages import type_label
from kuiper_plugins.install.plan import OperationPlan, PlannedFile
from kuiper_plugins.store import db, registry

log = logging.getLogger(__name__)


class DryRun:
    """Plans the operations of one installer, with its settings, layout, planner and applier's checks."""

    def __init__(self, installer):
        self.installer = installer
        self.settings = installer.settings
        self.layout = installer.layout

    def install(self, plugin_type: str, request: dict[str, Any], *, unprivileged_caller: str | None = None
                ) -> OperationPlan:
        """Plan an install: refuse what the install would refuse, or say what it would do."""
        name = request["name"]
        started = time.monotonic()
        fetch.check_url(request["file"])  # eKuiper's order: the URL, then duplicate, then function names
        conn = self._reader()
        if registry.find_by_key(conn, plugin_type, name) is not None:
            raise InvalidRequest(f"invalid name {name}: duplicate")
        self.installer.planner.refuse_before_fetching(conn, plugin_type, request, None)
        plan = self._plan_package(conn, "install", plugin_type, request, None, unprivileged_caller)
        _log_plan(plan, started)
        return plan

    def update(self, plugin_type: str, name: str, request: dict[str, Any], *,
               unprivileged_caller: str | None = None) -> OperationPlan:
        """Plan an update, as `install`."""
        started = time.monotonic()
        fetch.check_url(request["file"])
        conn = self._reader()
        old = self.installer.planner.update_target(conn, plugin_type, name)
        self.installer.planner.refuse_before_fetching(conn, plugin_type, request, old)
        plan = self._plan_package(conn, "update", plugin_type, request, old, unprivileged_caller)
        _log_plan(plan, started)
        return plan

    def delete(self, plugin_type: str, name: str) -> OperationPlan:
        """Plan a delete: the files it would remove (those on disk now) and the functions that would go."""
        started = time.monotonic()
        plan = self.installer.planner.plan_delete(self._reader(), plugin_type, name)
        plan.removes = [f for f in plan.removes if os.path.lexists(self.layout.absolute(f))]
        _log_plan(plan, started)
        return plan

    def _reader(self):
        return db.reader(self.layout.registry_file)

    def _plan_package(self, conn, kind: str, plugin_type: str, request: dict[str, Any],
                      old: registry.Plugin | None, unprivileged_caller: str | None) -> OperationPlan:
        """Fetch and unpack into a private folder, plan from both, and check the destinations as staging does."""
        settings = self.settings
        with tempfile.TemporaryDirectory(prefix="dry-run-", dir=self.layout.incoming) as scratch_name:
            scratch = Path(scratch_name)
            fetched = fetch.fetch(
                request["file"], scratch, uploads_dir=self.layout.uploads,
                allow_external_file_access=settings.allow_external_file_access,
                enable_private_net=settings.enable_private_net,
                private_net_allow_list=settings.private_net_allow_list, max_size=settings.max_plugin_size,
                timeout=settings.download_timeout, tls_verify=settings.tls_verify, sha256=request.get("sha256"),
            )
            planner = self.installer.planner
            plan = planner.plan_package(conn, kind, plugin_type, request, fetched, old, unprivileged_caller)
            unpacked = scratch / "unpacked"
            unpacked.mkdir()
            try:
                archive.extract(fetched.path, plan.entries, unpacked)
            except (ArchiveRejected, PackageInvalid, ScriptFailed, Forbidden) as exc:
                raise exc.with_prefix("fail to install plugin")
            fetched.path.unlink(missing_ok=True)
            planner.plan_unpacked(plan, unpacked)
            _old_records, _kept, placing = self.installer.applier.refuse_foreign_destinations(
                conn, plan.package, unpacked, old)
            # What is written: the units placed (a user's edited source yaml is kept), with their sha256.
            plan.writes = [_planned_file(unit, unpacked, plan) for unit in placing]
            plan.removes = [f for f in plan.removes if os.path.lexists(self.layout.absolute(f))]
        return plan


def _planned_file(unit, unpacked: Path, plan: OperationPlan) -> PlannedFile:
    """A unit as it would be recorded: the size and sha256 of the unpacked file (a folder's are not shown)."""
    if unit.is_dir:
        return PlannedFile(unit.dest, None, None)
    print_ = durable.fingerprint(unpacked / unit.src)
    size = next((f.size for f in plan.writes if f.path == unit.dest), None)
    return PlannedFile(unit.dest, print_.size if print_ else size, print_.sha256 if print_ else None)


def _log_plan(plan: OperationPlan, started: float) -> None:
    log.info(
        "plugin dry-run %s: type=%s name=%s version=%s url=%s sha256=%s writes=%d removes=%d duration=%.3fs",
        plan.kind, type_label(plan.plugin_type), plan.name, plan.version, plan.source_url or "-",
        plan.package_sha256 or "-", len(plan.writes), len(plan.removes), time.monotonic() - started,
    )
