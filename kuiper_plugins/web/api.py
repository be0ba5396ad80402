"""The REST blueprint: thin views that check input with schemas and delegate to the installer and registry."""

from __future__ import annotations

import json
import math
import platform
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml
from flask import Blueprint, Response, current_app, request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from kuiper_plugins import __version__
from kuiper_plugins.engine import pending
from kuiper_plugins.errors import InvalidRequest, MalformedBody, PluginError, PluginNotFound
from kuiper_plugins.install import catalog, fetch, packages
from kuiper_plugins.install.installer import Installer, type_label
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE
from kuiper_plugins.lifecycle import verify
from kuiper_plugins.store import db, registry
from kuiper_plugins.web import auditing
from kuiper_plugins.web.access import unprivileged_caller
from kuiper_plugins.web.fast_reads import mark_fresh
from kuiper_plugins.web.schemas import (
    FunctionListSchema,
    FunctionOwnerSchema,
    NativeDescriptionSchema,
    PluginRequestSchema,
    PluginUpdateSchema,
    PortableDescriptionSchema,
    UploadSchema,
    flatten_errors,
)

bp = Blueprint("plugins", __name__)

ALL_TYPES = "any(sources, sinks, functions, portables)"

create_schema = PluginRequestSchema()
update_schema = PluginUpdateSchema()
function_list_schema = FunctionListSchema()
native_description = NativeDescriptionSchema()
portable_description = PortableDescriptionSchema()
portable_descriptions = PortableDescriptionSchema(many=True)
function_owner = FunctionOwnerSchema()
upload_schema = UploadSchema()


def services() -> Any:
    return current_app.extensions["kuiper_plugins"]


def installer() -> Installer:
    return services().installer


def connection() -> sqlite3.Connection:
    """The registry connection for reads (one per worker thread, see db.reader)."""
    return db.reader(services().layout.registry_file)


_bodies = threading.local()


def cached_json(key: str, build: Callable[[sqlite3.Connection], Any]) -> Response:
    """Answer with a JSON body built by `build`, reused until another connection commits a change.

    Lists and descriptions are polled far more often than plugins change; with thousands of plugins,
    building a body costs much more than asking whether anything changed (`db.Changes`: the WAL
    index's header, and PRAGMA data_version when that header moved).
    A `build` that raises (not found) caches nothing; there is at most one entry per plugin or function.
    The answer is marked fresh until that change: returned as it is, the worker may answer the same
    request again without the app (web/fast_reads.py).
    """
    conn, token = services().fast_reads.connection_token()
    if getattr(_bodies, "tracker", None) != token.tracker:
        _bodies.tracker, _bodies.entries = token.tracker, {}
    hit = _bodies.entries.get(key)
    if hit is None or hit[0] != token:
        body = json.dumps(build(conn), separators=(",", ":"), ensure_ascii=False)
        hit = _bodies.entries[key] = (token, body)
    return mark_fresh(Response(hit[1], mimetype="application/json"), token)


def text(message: str, status: int = 200) -> Response:
    return Response(message, status=status, mimetype="text/plain")


def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status=status, mimetype="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object with a key given twice is ambiguous (readers differ on which one wins): refuse it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {duplicate!r} is given more than once")
    return obj


def _finite_float(text: str) -> float:
    """A JSON number too large for a float (1e999) is as meaningless as Infinity: refuse it."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            object_pairs_hook=_reject_duplicate_keys)


def _read_body() -> bytes:
    """The request body, refusing (413) one longer than MAX_CONTENT_LENGTH, with or without Content-Length.

    Without a Content-Length (chunked), werkzeug stops reading at the limit without an error; one more
    byte from the server's own input stream tells whether the body really ended there.
    """
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return raw


def _check_strings(value: Any) -> None:
    """Refuse strings that cannot be UTF-8 (lone surrogates from \\ud800 escapes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


def load_body(schema, what: str, *, yaml_too: bool = False) -> dict[str, Any]:
    """Parse the JSON body strictly and load it with `schema`; every failure is a 400 naming the cause.

    `yaml_too`: a body sent as YAML (`Content-Type: application/yaml`) is read with PyYAML's safe loader,
    aliases refused, then checked the same way.
    """
    as_yaml = yaml_too and request.mimetype in YAML_TYPES
    prefix = f"Invalid body: Error decoding the {what} {'yaml' if as_yaml else 'json'}"
    try:
        raw = _read_body()
    except MalformedBody as exc:  # a broken chunked framing, found while reading
        raise exc.with_prefix(prefix) from None
    if not raw.strip():
        raise InvalidRequest(f"{prefix}: EOF")
    try:
        if as_yaml:
            data = _yaml_value(raw.decode("utf-8"))
        else:
            # As Go's json.Decoder: the first JSON value is read, whatever follows it is ignored.
            data, _end = _DECODER.raw_decode(raw.decode("utf-8").lstrip(" \t\r\n"))
        _check_strings(data)
    except (ValueError, RecursionError, UnicodeError, yaml.YAMLError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())
        raise InvalidRequest(f"{prefix}: {detail}")
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise InvalidRequest(f"{prefix}: {flatten_errors(exc.messages)}")


def _yaml_value(text: str) -> Any:
    """One YAML document, by the safe loader; aliases are refused (a few bytes of them can stand for a huge tree)."""
    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
        raise ValueError("aliases (*name) are not accepted")
    return yaml.safe_load(text)


def checked_name(name: str) -> str:
    return packages.check_name(name)


def creation_prefix(plugin_type: str, action: str = "create") -> str:
    """eKuiper's prefix of a refused create or update: `sources plugins create command error`.

    An update says `update`, for every type. (eKuiper's native update deletes, then creates, and so says
    `create`; its portable update says `update`, which is what the caller asked for.)
    """
    if plugin_type == PORTABLE:
        return f"portable plugin {action} command error"
    return f"{plugin_type} plugins {action} command error"


def settle_with_engine(plugin_type: str, name: str) -> None:
    """Before a write: take in a plugin the engine installed or deleted itself (see engine/sync.py)."""
    engine_sync = services().engine_sync
    if engine_sync is not None:
        engine_sync.settle(plugin_type, name)


def dry_run_requested() -> bool:
    """Whether the write asks for its plan only (`?dryRun=1`); a value we do not know is refused, never run."""
    value = request.args.get("dryRun")
    if value is None or value.lower() in ("0", "false"):
        return False
    if value.lower() in ("1", "true"):
        return True
    raise InvalidRequest(f"invalid dryRun value {value!r} (dryRun=1 answers the plan and writes nothing)")


def prefixed(exc: PluginError, prefix: str) -> PluginError:
    """Put eKuiper's command prefix before a 400 message; other statuses keep their own words."""
    return exc.with_prefix(prefix) if exc.status == 400 else exc


# ------------------------------------------------------------------ plugins


@bp.get(f"/plugins/<{ALL_TYPES}:plugin_type>")
def list_plugins(plugin_type: str) -> Response:
    if plugin_type == PORTABLE:
        return cached_json(PORTABLE, lambda conn: portable_descriptions.dump(registry.list_descriptors(conn, PORTABLE)))
    return cached_json(plugin_type, lambda conn: registry.list_names(conn, plugin_type))


@bp.post(f"/plugins/<{ALL_TYPES}:plugin_type>")
def create_plugin(plugin_type: str) -> Response:
    body = load_body(create_schema, f"{type_label(plugin_type)} plugin")
    auditing.note(name=body["name"], url=body["file"], sha256=body.get("sha256"))
    checked_name(body["name"])  # as eKuiper: after decoding, in its own words, before the create command
    dry_run = dry_run_requested()
    if not dry_run:  # taking in the engine's own changes writes: a dry run plans from the registry as it is
        settle_with_engine(plugin_type, body["name"])
    try:
        if dry_run:
            plan = installer().dry_run.install(plugin_type, _request_record(plugin_type, body),
                                               unprivileged_caller=unprivileged_caller(request.environ))
            return json_response(plan.to_json())
        installer().install(plugin_type, _request_record(plugin_type, body),
                            unprivileged_caller=unprivileged_caller(request.environ))
    except PluginError as exc:
        raise prefixed(exc, creation_prefix(plugin_type))
    return text(f"{type_label(plugin_type)} plugin {body['name']} is created", 201)


def prebuilt_plugins(plugin_type: str) -> Response:
    """GET /plugins/{sources,sinks,functions}/prebuild: the prebuilt catalogue for the managed engine."""
    state = services()
    info = state.engine.info() if state.engine is not None else None
    if info is None:
        return json_response(catalog.prebuilt(state.settings, plugin_type))
    return json_response(catalog.prebuilt(state.settings, plugin_type, version=info.version, system=info.os,
                                          arch=info.arch))


@bp.get(f"/plugins/<{ALL_TYPES}:plugin_type>/<name>")
def describe_plugin(plugin_type: str, name: str) -> Response:
    # eKuiper routes GET .../prebuild to the catalogue before plugin names; other methods keep the name.
    if name == "prebuild" and plugin_type in NATIVE_TYPES:
        return prebuilt_plugins(plugin_type)
    checked_name(name)
    described = cached_json(f"describe/{plugin_type}/{name}", lambda conn: _description(conn, plugin_type, name))
    live_engine = installer().live
    if live_engine is None:
        return described
    # Asked of the engine at each call, never cached: whether it offers the plugin now or at its restart.
    body = json.loads(described.get_data())
    # Our version tells whether the engine runs the one installed (an update may be pending).
    body["engine"] = live_engine.state(plugin_type, name, version=body.get("version"))
    return json_response(body)


def _description(conn: sqlite3.Connection, plugin_type: str, name: str) -> dict[str, Any]:
    with db.snapshot(conn):  # the row and its functions from one state of the registry
        plugin = registry.find(conn, plugin_type, name)
        functions = registry.functions_of(conn, plugin.id) if plugin and plugin_type == "functions" else None
    if plugin is None:
        raise PluginNotFound(f"describe {type_label(plugin_type)} plugin {name} error: not found")
    if plugin_type == PORTABLE:
        return portable_description.dump(plugin.descriptor)
    description: dict[str, Any] = {"name": plugin.name, "version": plugin.version}
    if functions is not None:
        description["functions"] = functions
    body = native_description.dump(description)
    if plugin.compatibility is not None:
        body["compatibility"] = plugin.compatibility  # keyed apart: eKuiper's name/version shape stays
    return body


@bp.delete(f"/plugins/<{ALL_TYPES}:plugin_type>/<name>")
def delete_plugin(plugin_type: str, name: str) -> Response:
    checked_name(name)
    stop = request.args.get("stop") == "1" and plugin_type != PORTABLE
    if dry_run_requested():
        return json_response(installer().dry_run.delete(plugin_type, name).to_json())
    settle_with_engine(plugin_type, name)
    installer().delete(plugin_type, name)
    if plugin_type == PORTABLE:
        if request.args.get("stop") == "1":  # eKuiper ignores it too: say so, as the caller expects a stop
            return text(f"portable plugin {name} is deleted (stop=1 stops nothing for a portable plugin: its"
                        " process has ended with the delete, and the engine keeps running)")
        return text(f"portable plugin {name} is deleted")
    if stop:
        restart_engine = services().restart_engine
        if restart_engine is not None:
            # engine.restartCommand stops (and restarts) the engine, as eKuiper's own ?stop=1 stops it.
            response = text(f"{plugin_type} plugin {name} is deleted and eKuiper will be stopped"
                            f" ({_restarted_by()})")
            response.call_on_close(restart_engine)
        else:
            response = text(f"{plugin_type} plugin {name} is deleted and kuiper-plugins will be stopped (this"
                            " service, not the engine: engine.restartCommand is not set, so the engine keeps"
                            " running and takes the change at its next start; a supervisor such as systemd"
                            " starts kuiper-plugins again)")
            response.call_on_close(services().stop_service)
        return response
    return text(f"{plugin_type} plugin {name} is deleted and eKuiper must restart for the change to take effect.")


def _restarted_by() -> str:
    """Our part of a ?stop=1 answer with engine.restartCommand set: what stops, and what starts it again."""
    command = " ".join(services().settings.engine_restart_command)
    return f"engine.restartCommand restarts it: {command}; kuiper-plugins keeps running"


@bp.put(f"/plugins/<{ALL_TYPES}:plugin_type>/<name>")
def update_plugin(plugin_type: str, name: str) -> Response:
    checked_name(name)
    body = load_body(update_schema, f"{type_label(plugin_type)} plugin")
    auditing.note(url=body["file"], sha256=body.get("sha256"))
    if body.get("name") not in (None, name):
        raise InvalidRequest(f"the name '{body['name']}' in the body does not match '{name}' in the path")
    body["name"] = name
    dry_run = dry_run_requested()
    if not dry_run:
        settle_with_engine(plugin_type, name)
    try:
        if dry_run:
            plan = installer().dry_run.update(plugin_type, name, _request_record(plugin_type, body),
                                              unprivileged_caller=unprivileged_caller(request.environ))
            return json_response(plan.to_json())
        installer().update(plugin_type, name, _request_record(plugin_type, body),
                           unprivileged_caller=unprivileged_caller(request.environ))
    except PluginError as exc:
        raise prefixed(exc, creation_prefix(plugin_type, "update"))
    if plugin_type == PORTABLE:
        return text(f"portable plugin {name} is updated")
    restart_engine = services().restart_engine
    restarted = f"plugin {name} is updated and eKuiper must restart for the change to take effect."
    if request.args.get("stop") == "1":
        if restart_engine is None:  # eKuiper's PUT ignores stop; say that nothing stops, and how it would
            return text(f"{restarted} (stop=1 stops nothing: set engine.restartCommand to have it restart the"
                        " engine)")
        # Go cannot unload the old code: engine.restartCommand restarts the engine, which loads the new one.
        response = text(f"plugin {name} is updated and eKuiper will be stopped ({_restarted_by()})")
        response.call_on_close(restart_engine)
        return response
    return text(restarted)


@bp.get(f"/plugins/<{ALL_TYPES}:plugin_type>/<name>/history")
def plugin_history(plugin_type: str, name: str) -> Response:
    checked_name(name)
    return json_response(installer().history(connection(), plugin_type, name))


@bp.post(f"/plugins/<{ALL_TYPES}:plugin_type>/<name>/rollback")
def rollback_plugin(plugin_type: str, name: str) -> Response:
    checked_name(name)
    wanted = request.args.get("version")  # one of the kept versions GET .../history marks; none: the newest
    if wanted is not None and not wanted.strip():
        raise InvalidRequest(f"rollback {type_label(plugin_type)} plugin {name} error: invalid version {wanted!r}"
                             " (name a kept version, as GET .../history marks them, or leave version out for the"
                             " newest)")
    settle_with_engine(plugin_type, name)
    version = installer().rollback(plugin_type, name, wanted)
    body = {"type": plugin_type, "name": name, "version": version}  # the path's type, as the request named it
    response = json_response(body)
    restart_engine = services().restart_engine
    if plugin_type != PORTABLE and request.args.get("stop") == "1" and restart_engine is not None:
        # As for an update: the engine runs the rolled-back code only once restarted.
        response.call_on_close(restart_engine)
    return response


def _request_record(plugin_type: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request as kept in the registry: only the keys that apply to the type, empty ones left out."""
    record = {"name": body["name"], "file": body["file"]}
    if body.get("shellParas"):
        record["shellParas"] = list(body["shellParas"])
    if body.get("functions"):  # refused for any type but functions, before anything is fetched (plan.py)
        record["functions"] = list(body["functions"])
    if body.get("sha256"):
        record["sha256"] = body["sha256"].lower()
    return record


# ------------------------------------------------------------------ functions


@bp.post("/plugins/functions/<name>/register")
def register_functions(name: str) -> Response:
    checked_name(name)
    body = load_body(function_list_schema, "function list")
    settle_with_engine("functions", name)
    installer().register_functions(name, body["functions"])
    return text(f"function plugin {name} function list is registered")


@bp.get("/plugins/udfs")
def list_functions() -> Response:
    return cached_json("udfs", registry.function_names)


@bp.get("/plugins/udfs/<name>")
def describe_function(name: str) -> Response:
    checked_name(name)

    def owner(conn: sqlite3.Connection) -> dict[str, Any]:
        plugin = registry.function_owner(conn, name)
        if plugin is None:
            raise PluginNotFound(f"describe function {name} error: not found")
        return function_owner.dump({"name": name, "plugin": plugin})

    return cached_json(f"udf/{name}", owner)


# ------------------------------------------------------------------ health


@bp.get("/plugins/portables/<name>/status")
def portable_status(name: str) -> Response:
    """The engine's own answer about a running portable plugin, relayed as it is."""
    checked_name(name)
    engine = services().engine
    if engine is None:
        raise InvalidRequest("portable plugin status comes from the engine: set engine.url")
    relayed = engine.portable_status(name)
    return Response(relayed.body, status=relayed.status, content_type=relayed.content_type)


@bp.get("/engine/pending")
def engine_pending() -> Response:
    """The changes the running engine cannot take until it restarts, with when it started."""
    live_engine = installer().live
    if live_engine is None:
        raise InvalidRequest("the changes pending a restart are the engine's: set engine.url")
    started_at = pending.engine_started_at(live_engine.client)
    changes = pending.pending_changes(connection(), live_engine, started_at)
    return json_response({"engineStartedAt": pending.iso(started_at), "count": len(changes),
                          "pending": [change.to_json() for change in changes]})


def _pending_count(info) -> int | None:
    """How many changes GET /engine/pending lists, from the engine's last known start; None without one.

    The readiness probe asks the engine nothing more than its GET / (cached), but about a change made within a
    second of the engine's start: the count is of what each change noted in its commit (engine/pending.py).
    """
    if info is None or info.started_at is None:
        return None
    return services().pending.count(connection(), installer().live, info)


@bp.get("/ping")
def ping() -> Response:
    return Response(status=200)


@bp.get("/")
def readiness() -> Response:
    state = services()
    counts = registry.counts(connection())
    info = state.engine.info() if state.engine is not None else None
    return json_response({
        "version": info.version if info else state.settings.kuiper_version,
        "os": info.os if info else sys.platform,
        "arch": info.arch if info else catalog.go_arch(platform.machine()),
        "upTimeSeconds": int(time.time() - state.started_at),
        "serviceVersion": __version__,
        "registry": {
            "plugins": {t: counts["plugins"].get(t, 0) for t in (*NATIVE_TYPES, PORTABLE)},
            "functions": counts["functions"],
            "operationsInFlight": counts["operationsInFlight"],
            # sizes only, asked at each call: a file removed under a running service shows at once
            "damaged": len(verify.damaged_plugins(connection(), state.layout)),
        },
        **({"engine": {"pendingRestart": _pending_count(info)}} if installer().live is not None else {}),
    })


# ------------------------------------------------------------------ uploads


@bp.post("/config/uploads")
def upload_file() -> Response:
    """Save a file into data/uploads from JSON {name, content} / {name, file} or multipart `uploadFile`."""
    state = services()
    uploads = state.uploads
    if request.mimetype == "application/json":
        body = load_body(upload_schema, "upload")
        if body.get("content") is not None:
            path = uploads.save_bytes(body["name"], body["content"].encode("utf-8"))
        else:
            path = _upload_from_url(body["name"], body["file"])
    else:
        request.max_content_length = state.settings.max_plugin_size + 64 * 1024
        try:
            part = request.files.get("uploadFile")
        except MalformedBody as exc:
            raise exc.with_prefix("Error parse the multi part form") from None
        if part is None:
            raise InvalidRequest("Error Retrieving the File: the multipart field uploadFile is missing")
        path = uploads.save_stream(part.filename or "", part.stream)
    return text(str(path), 201)


def _upload_from_url(name: str, url: str):
    settings, layout, uploads = services().settings, services().layout, services().uploads
    uploads.path_of(name)  # refuse a bad name before downloading anything
    try:
        fetched = fetch.fetch(
            url, layout.incoming, uploads_dir=layout.uploads,
            allow_external_file_access=settings.allow_external_file_access,
            enable_private_net=settings.enable_private_net, private_net_allow_list=settings.private_net_allow_list,
            max_size=settings.max_plugin_size, timeout=settings.download_timeout, tls_verify=settings.tls_verify,
        )
    except PluginError as exc:
        raise prefixed(exc, "Upload error: getFile has error")
    return uploads.adopt(name, fetched.path)


@bp.get("/config/uploads")
def list_uploads() -> Response:
    return json_response(services().uploads.list())


@bp.delete("/config/uploads/<path:name>")
def delete_upload(name: str) -> Response:
    services().uploads.delete(name)
    return text("ok")
