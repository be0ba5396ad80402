"""The plugin set as one document: GET and PUT /config/plugins (fleet/plugin_set.py does the work).

GET answers the document (JSON, or YAML for `Accept: application/yaml`; `?format=ekuiper` for the plugin
part of eKuiper's export). PUT takes either format, applies it all-or-nothing, and answers the changes; a
step that fails answers that step's own status with the failed plugin and what was rolled back.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml
from flask import Blueprint, Response, request

from kuiper_plugins.errors import InvalidRequest, PluginError, RegistryUnavailable
from kuiper_plugins.fleet.plugin_set import INSTALL, UPDATE, ApplyFailed, Document, PluginSet
from kuiper_plugins.install import packages
from kuiper_plugins.install.installer import type_label
from kuiper_plugins.web.access import unprivileged_caller
from kuiper_plugins.web.api import (
    YAML_TYPES,
    connection,
    creation_prefix,
    dry_run_requested,
    installer,
    json_response,
    load_body,
    services,
    settle_with_engine,
)
from kuiper_plugins.web.schemas import PluginSetRequest

log = logging.getLogger(__name__)

config_bp = Blueprint("config", __name__)

plugin_set_request = PluginSetRequest()
EKUIPER_FORMAT = "ekuiper"


@config_bp.get("/config/plugins")
def export_plugins() -> Response:
    """Every installed plugin as the document names it, or as eKuiper's export writes it (?format=ekuiper)."""
    wanted_format = request.args.get("format")
    if wanted_format not in (None, EKUIPER_FORMAT):
        raise InvalidRequest(f"invalid format {wanted_format!r} (format=ekuiper answers eKuiper's export format;"
                             " without it, the plugin set, as JSON or with Accept: application/yaml as YAML)")
    plugin_set = PluginSet(installer())
    if wanted_format == EKUIPER_FORMAT:
        return json_response(plugin_set.export_ekuiper(connection()))
    document = plugin_set.export(connection())
    if _yaml_wanted():
        return Response(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), mimetype="application/yaml")
    return json_response(document)


@config_bp.put("/config/plugins")
def apply_plugins() -> Response:
    """Converge to the document: install, update, re-register and (with prune) remove, all or nothing."""
    document = Document.of(load_body(plugin_set_request, "plugin set", yaml_too=True))
    dry_run = dry_run_requested()
    plugin_set = PluginSet(installer())
    try:
        if dry_run:  # as for one plugin: planned from the registry as it is, the engine's own changes not taken in
            changes = plugin_set.plan(connection(), document)
        else:
            _settle_with_engine(document)
            changes = plugin_set.apply(document, unprivileged_caller=unprivileged_caller(request.environ))
    except ApplyFailed as failed:
        return _failure(failed)
    body: dict[str, Any] = {"changed": bool(changes), "changes": [change.to_json() for change in changes]}
    if dry_run:
        body["dryRun"] = True
    return json_response(body)


def _yaml_wanted() -> bool:
    """Whether the client asked for YAML rather than JSON (JSON wins a tie, and is the default)."""
    offered = ["application/json", *sorted(YAML_TYPES)]
    return request.accept_mimetypes.best_match(offered, default="application/json") in YAML_TYPES


def _settle_with_engine(document: Document) -> None:
    """Before an apply: take in what the engine installed or deleted itself, for every plugin it may touch.

    A name the ID rule refuses is not looked for (it never names a file); the plan refuses it.
    """
    for plugin_type, plugins in document.plugins.items():
        for name in plugins:
            try:
                packages.check_name(name)
            except InvalidRequest:
                continue
            settle_with_engine(plugin_type, name)
    engine_sync = services().engine_sync
    if document.prune and engine_sync is not None:
        try:
            engine_sync.look()  # every plugin may be removed: the whole registry in step with the engine first
        except (PluginError, OSError) as exc:  # as for the periodic look: what it could not do waits for the next
            log.warning("plugin set: the look at the engine's plugins before a prune failed: %s", exc)


def _failure(failed: ApplyFailed) -> Response:
    """The answer to an apply that stopped: the step's status, its message, and what was undone."""
    message = f"{_step_words(failed)} ({_what_happened(failed)})"
    body: dict[str, Any] = {
        "error": message, "message": message, "failed": failed.change.target(),
        "rolledBack": [change.to_json() for change in failed.rolled_back],
    }
    if failed.not_rolled_back:
        body["notRolledBack"] = [{**change.to_json(), "error": reason} for change, reason in failed.not_rolled_back]
    response = json_response(body, failed.cause.status)
    if isinstance(failed.cause, RegistryUnavailable):
        response.headers["Retry-After"] = str(failed.cause.retry_after)
    return response


def _step_words(failed: ApplyFailed) -> str:
    """The failed step's message as its own endpoint words it: eKuiper's command prefix before a 400."""
    change, cause = failed.change, failed.cause
    if failed.plain or cause.status != 400 or change.action not in (INSTALL, UPDATE):
        return cause.message  # a register's and a delete's messages carry their own words
    # As POST /plugins/{type} and PUT /plugins/{type}/{name} prefix theirs.
    action = "update" if change.action == UPDATE else "create"
    return f"{creation_prefix(change.plugin_type, action)}: {cause.message}"


def _what_happened(failed: ApplyFailed) -> str:
    """Our part of the message: which plugin of the set, and what became of the changes before it."""
    change = failed.change
    step = f"plugin set: the {change.action} of {type_label(change.plugin_type)} plugin {change.name}"
    if failed.planned:
        return f"{step} is refused; nothing was changed"
    undone = len(failed.rolled_back)
    told = f"{step} failed; {undone} earlier change{'s were' if undone != 1 else ' was'} rolled back"
    if failed.not_rolled_back:
        told += f", {len(failed.not_rolled_back)} could not be (see notRolledBack)"
    return told
