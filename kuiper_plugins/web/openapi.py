"""The OpenAPI 3 document, generated from the marshmallow schemas with apispec, and the /docs page.

The page is Swagger UI from the swagger-ui-bundle package, served from this
service: nothing is loaded from a CDN.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, jsonify, redirect, render_template_string, send_from_directory, url_for

from kuiper_plugins.layout import NATIVE_TYPES, PLUGIN_TYPES
from kuiper_plugins.store.progress import KEEP_SECONDS
from kuiper_plugins.web import schemas

docs_bp = Blueprint("docs", __name__)

ERROR_STATUSES = {
    "400": "Invalid request or failed install; nothing was changed",
    "401": "Authentication is on and the token is missing or invalid",
    "403": "Client, Host or Origin refused",
    "404": "Unknown plugin, function or path",
    "413": "Body too large",
    "503": "The registry is busy or cannot be written; retry after Retry-After seconds",
    "507": "The disk is full; the attempt was rolled back",
}


def _text(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string", "example": example}}}}


def _json(description: str, schema: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _updated_or_plan(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "text/plain": {"schema": {"type": "string", "example": example}},
        "application/json": {"schema": "Plan", "example": PLAN_EXAMPLE},
    }}


def _errors(*statuses: str) -> dict[str, Any]:
    chosen = statuses or tuple(ERROR_STATUSES)
    return {status: {"$ref": f"#/components/responses/Error{status}"} for status in chosen}


def _body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
TYPE_PARAM = _param("type", {"type": "string", "enum": list(PLUGIN_TYPES)}, "plugin type")
NATIVE_PARAM = _param("type", {"type": "string", "enum": list(NATIVE_TYPES)}, "native plugin type")
NAME_PARAM = _param("name", NAME, "plugin name")
NAMES = {"type": "array", "items": {"type": "string"}}
AUDIT_EXAMPLE = {
    "id": 7, "time": "2024-05-01T12:00:00.123Z", "requestId": "deploy-42",
    "actor": {"iss": "sample_key.pub", "sub": "ci", "address": "192.0.2.10", "proxy": "www-data"},
    "operation": "update", "method": "PUT", "path": "/plugins/sources/random", "type": "sources", "name": "random",
    "versionBefore": "1.0.0", "versionAfter": "1.1.0",
    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "url": "https://packages.example.com/random_amd64.zip", "status": 200, "outcome": "ok", "message": None,
    "durationSeconds": 1.234,
}
# GET /operations/{request_id} (issue 22): an install waiting in its install.sh, as the CLI sees it while it waits.
OPERATION_EXAMPLE = {
    "requestId": "6f1c1f7e-8d1b-4a51-9a43-0d2f8f0b5c11", "method": "POST", "path": "/plugins/sinks",
    "state": "running", "status": None, "phase": "install.sh",
    "phases": [
        {"phase": "download", "bytes": 59768832, "totalBytes": 59768832, "seconds": 4.512, "done": True},
        {"phase": "inspect", "bytes": None, "totalBytes": None, "seconds": 0.021, "done": True},
        {"phase": "unpack", "bytes": 143654912, "totalBytes": 143654912, "seconds": 1.302, "done": True},
        {"phase": "install.sh", "bytes": None, "totalBytes": None, "seconds": 2.75, "done": False},
    ],
    "startedAt": "2024-05-01T12:00:00.000Z", "updatedAt": "2024-05-01T12:00:05.850Z", "finishedAt": None,
}
OPERATION_SCHEMA = {"type": "object", "properties": {
    "requestId": {"type": "string"}, "method": {"type": "string"}, "path": {"type": "string"},
    "state": {"type": "string", "enum": ["running", "finished", "interrupted"],
              "description": "interrupted: the worker serving it is gone (stopped at once, or killed)"},
    "status": {"type": "integer", "nullable": True, "description": "the answer's status, once finished"},
    "phase": {"type": "string", "nullable": True, "description": "the phase it is in, while running"},
    "phases": {"type": "array", "items": {"type": "object", "properties": {
        "phase": {"type": "string", "enum": ["download", "inspect", "unpack", "install.sh", "handshake", "commit"]},
        "bytes": {"type": "integer", "nullable": True, "description": "downloaded, or written while unpacking"},
        "totalBytes": {"type": "integer", "nullable": True,
                       "description": "the download's Content-Length or the file's size; the unpacked size"},
        "seconds": {"type": "number", "description": "in the phase: so far, or in all once done"},
        "done": {"type": "boolean"}}}},
    "startedAt": {"type": "string", "format": "date-time"},
    "updatedAt": {"type": "string", "format": "date-time"},
    "finishedAt": {"type": "string", "format": "date-time", "nullable": True},
}}

# ?dryRun=1 (issue 19): the plan of a create, update or delete, as install/plan.py's to_json() gives it.
DRY_RUN_PARAM = {"name": "dryRun", "in": "query", "required": False, "schema": {"type": "string", "enum": ["0", "1"]},
                 "description": "1: answer the plan (200, JSON) and write nothing; a failing plan answers the"
                                " request's own 4xx"}
PLAN_EXAMPLE = {
    "kind": "install", "type": "sources", "name": "random", "version": "1.0.0",
    "source": {"url": "http://127.0.0.1:8000/random.zip", "size": 1024, "sha256": "9f86d08188" + "0" * 54},
    "writes": [{"path": "plugins/sources/Random@v1.0.0.so", "size": 980, "sha256": "2c26b46b68" + "0" * 54},
               {"path": "etc/sources/random.yaml", "size": 28, "sha256": "fcde2b2edb" + "0" * 54}],
    "removes": [], "functions": [], "functionClashes": [],
    "installScript": {"sha256": "b5bb9d8014" + "0" * 54, "head": ["#!/bin/sh", "echo preparing"]},
    "compatibility": None, "restartNeeded": False,
}
PENDING_EXAMPLE = {
    "engineStartedAt": "2026-12-07T01:00:00Z", "count": 1,
    "pending": [{"type": "functions", "name": "multi", "change": "update", "version": "2.0.0",
                 "changedAt": "2026-12-07T01:20:00Z",
                 "reason": "a native plugin's new code is loaded only when the engine starts"
                           " (Go cannot unload the old one)"}],
}

# The plugin set (issue 20): GET /config/plugins answers it, PUT converges to it.
_SHA_RANDOM = "763e0197f6aa644ceff2c8c75b02566c61931ee48ecc59b9a0e07e73f132fdbf"
_SHA_MISC = "74421c2ddef9c1e9f3971a3a96695a05bc10d25d155ce868a9c1c11dbd6b0b3a"
PLUGIN_SET_EXAMPLE = {
    "sources": {"random": {"file": "https://packages.example.com/random_amd64.zip", "sha256": _SHA_RANDOM,
                           "version": "1.0.0"}},
    "sinks": {},
    "functions": {"misc": {"file": "https://packages.example.com/misc_amd64.zip", "sha256": _SHA_MISC,
                           "version": "2.0.0", "shellParas": ["--fast"], "functions": ["f1", "f2"]}},
    "portables": {},
}
EKUIPER_PLUGINS_EXAMPLE = {
    "nativePlugins": {
        "sources_random": '{"name":"random","file":"https://packages.example.com/random_amd64.zip"}',
        "functions_misc": '{"name":"misc","file":"https://packages.example.com/misc_amd64.zip",'
                          '"shellParas":["--fast"]}',
    },
    "portablePlugins": {},
    "functionLists": {"misc": ["f1", "f2"]},
}
PLUGIN_SET_CHANGES_EXAMPLE = {
    "changed": True,
    "changes": [
        {"action": "register", "type": "function", "name": "misc",
         "from": {"version": "2.0.0", "sha256": _SHA_MISC, "file": "https://packages.example.com/misc_amd64.zip",
                  "functions": ["f1"]},
         "to": {"version": "2.0.0", "sha256": _SHA_MISC, "file": "https://packages.example.com/misc_amd64.zip",
                "functions": ["f1", "f2"]},
         "reason": "function list differs"},
        {"action": "install", "type": "source", "name": "random", "from": None,
         "to": {"version": "1.0.0", "sha256": _SHA_RANDOM, "file": "https://packages.example.com/random_amd64.zip"},
         "reason": "not installed"},
    ],
}
_FAILED_MESSAGE = ("sinks plugins create command error: fail to download file https://packages.example.com/"
                   "influx_amd64.zip: cannot download the file with status: 404 Not Found (plugin set: the install"
                   " of sinks plugin influx failed; 1 earlier change was rolled back)")
PLUGIN_SET_FAILURE_EXAMPLE = {
    "error": _FAILED_MESSAGE, "message": _FAILED_MESSAGE,
    "failed": {"type": "sink", "name": "influx", "action": "install"},
    "rolledBack": [PLUGIN_SET_CHANGES_EXAMPLE["changes"][1]],
}


def _plugin_set_components(spec: APISpec) -> None:
    """The plugin set's shapes: the document, eKuiper's export part, the changes, a failed apply."""
    state = {"type": "object", "nullable": True, "properties": {
        "version": {"type": "string", "nullable": True}, "sha256": {"type": "string", "nullable": True},
        "file": {"type": "string", "nullable": True}, "functions": NAMES}}
    change = {"type": "object", "required": ["action", "type", "name", "from", "to", "reason"], "properties": {
        "action": {"type": "string", "enum": ["install", "update", "register", "remove"]},
        "type": {"type": "string", "enum": ["source", "sink", "function", "portable"]},
        "name": {"type": "string"}, "from": state, "to": state, "reason": {"type": "string"}}}
    spec.components.schema("PluginSetChange", change)
    spec.components.schema("PluginSetChanges", {
        "type": "object", "required": ["changed", "changes"], "properties": {
            "changed": {"type": "boolean"},
            "changes": {"type": "array", "items": {"$ref": "#/components/schemas/PluginSetChange"}},
            "dryRun": {"type": "boolean", "description": "dryRun=1: the plan; nothing was written"}}})
    spec.components.schema("PluginSetFailure", {
        "type": "object", "required": ["error", "message", "failed", "rolledBack"], "properties": {
            "error": {"type": "string", "description": "the failed step's message (eKuiper's words first)"},
            "message": {"type": "string", "description": "the same text, where the error envelope has it"},
            "failed": {"type": "object", "required": ["type", "name", "action"], "properties": {
                "type": {"type": "string"}, "name": {"type": "string"}, "action": {"type": "string"}}},
            "rolledBack": {"type": "array", "items": {"$ref": "#/components/schemas/PluginSetChange"}},
            "notRolledBack": {"type": "array", "description": "changes that could not be undone, each with its"
                                                               " error (only when there are some)",
                              "items": {"$ref": "#/components/schemas/PluginSetChange"}}}})


def _plugin_set_paths(spec: APISpec) -> None:
    failure = {"description": "A step failed: its own status (400 for a refused package); every earlier change of"
                              " the request was undone", "content": {"application/json": {
                                  "schema": "PluginSetFailure", "example": PLUGIN_SET_FAILURE_EXAMPLE}}}
    spec.path(path="/config/plugins", operations={
        "get": {
            "summary": "Every installed plugin as one document (YAML with Accept: application/yaml), or the plugin"
                       " part of eKuiper's export (format=ekuiper), function lists added", "tags": ["plugin set"],
            "parameters": [{"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["ekuiper"]},
                            "description": "ekuiper: nativePlugins, portablePlugins and functionLists"}],
            "responses": {"200": {"description": "The plugin set", "content": {
                "application/json": {"schema": {"anyOf": ["PluginSet", "EkuiperPlugins"]},
                                     "examples": {"document": {"value": PLUGIN_SET_EXAMPLE},
                                                  "ekuiper": {"value": EKUIPER_PLUGINS_EXAMPLE}}},
                "application/yaml": {"schema": "PluginSet"}}}, **_errors("400", "401", "403", "503")},
        },
        "put": {
            "summary": "Converge to a plugin set: install, update, re-register and (prune) remove, one plugin at a"
                       " time, all or nothing; unchanged plugins are not downloaded", "tags": ["plugin set"],
            "parameters": [DRY_RUN_PARAM],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"anyOf": ["PluginSet", "EkuiperPlugins"]},
                                     "examples": {"document": {"value": {**PLUGIN_SET_EXAMPLE, "prune": False}},
                                                  "ekuiper": {"value": EKUIPER_PLUGINS_EXAMPLE}}},
                "application/yaml": {"schema": "PluginSet"}}},
            "responses": {"200": {"description": "What changed (dryRun=1: what would), in the order it was done",
                                  "content": {"application/json": {"schema": "PluginSetChanges",
                                                                   "example": PLUGIN_SET_CHANGES_EXAMPLE}}},
                          "400": failure, **_errors("401", "403", "404", "413", "503", "507")},
        },
    })


def _plan(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": "Plan", "example": PLAN_EXAMPLE}}}


def build_spec(version: str) -> APISpec:
    """Describe every endpoint, its body, its answers and the error envelope."""
    spec = APISpec(
        title="kuiper-plugins",
        version=version,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "eKuiper's plugin-management REST API."},
    )
    for name, schema in (
        ("PluginRequest", schemas.PluginRequestSchema),
        ("PluginUpdate", schemas.PluginUpdateSchema),
        ("FunctionList", schemas.FunctionListSchema),
        ("Upload", schemas.UploadSchema),
        ("NativeDescription", schemas.NativeDescriptionSchema),
        ("PortableDescription", schemas.PortableDescriptionSchema),
        ("FunctionOwner", schemas.FunctionOwnerSchema),
        ("Error", schemas.ErrorSchema),
        ("AuditEntry", schemas.AuditEntrySchema),
        ("PluginEntry", schemas.PluginEntrySchema),
        ("PluginSet", schemas.PluginSetSchema),
        ("EkuiperPlugins", schemas.EkuiperPluginsSchema),
    ):
        spec.components.schema(name, schema=schema)
    spec.components.schema("Plan", {
        "type": "object",
        "required": ["kind", "type", "name", "source", "writes", "removes", "functions", "restartNeeded"],
        "properties": {
            "kind": {"type": "string", "enum": ["install", "update", "delete"]},
            "type": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "string", "nullable": True},
            "source": {"type": "object", "properties": {"url": {"type": "string", "nullable": True},
                                                        "size": {"type": "integer", "nullable": True},
                                                        "sha256": {"type": "string", "nullable": True}}},
            "writes": {"type": "array", "items": {"type": "object", "properties": {
                "path": {"type": "string"}, "size": {"type": "integer", "nullable": True},
                "sha256": {"type": "string", "nullable": True}}}},
            "removes": NAMES, "functions": NAMES,
            "functionClashes": {"type": "array", "items": {"type": "object", "properties": {
                "function": {"type": "string"}, "plugin": {"type": "string"}}}},
            "installScript": {"type": "object", "nullable": True, "properties": {
                "sha256": {"type": "string", "nullable": True}, "head": NAMES}},
            "compatibility": {"type": "object", "nullable": True},
            "restartNeeded": {"type": "boolean"},
        },
    })
    for status, description in ERROR_STATUSES.items():
        response = _json(description, "Error")
        if status == "503":
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        spec.components.response(f"Error{status}", response)

    plugin_list = {
        "anyOf": [NAMES, {"type": "array", "items": "PortableDescription"}],
        "description": "names, sorted; for portables, the descriptors sorted by name",
    }
    spec.path(
        path="/plugins/{type}",
        parameters=[TYPE_PARAM],
        operations={
            "get": {"summary": "List the installed plugins of a type", "tags": ["plugins"],
                    "responses": {"200": _json("Installed plugins", plugin_list), **_errors()}},
            "post": {"summary": "Install a plugin from a zip URL; dryRun=1 answers the plan instead",
                     "tags": ["plugins"],
                     "parameters": [DRY_RUN_PARAM],
                     "requestBody": _body("PluginRequest"),
                     "responses": {"201": _text("Created", "sources plugin random is created"),
                                   "200": _plan("dryRun=1: what the install would write and run; nothing written"),
                                   **_errors()}},
        },
    )
    description = {"anyOf": ["NativeDescription", "PortableDescription"]}
    spec.path(
        path="/plugins/{type}/{name}",
        parameters=[TYPE_PARAM, NAME_PARAM],
        operations={
            "get": {"summary": "Describe a plugin", "tags": ["plugins"],
                    "responses": {"200": _json("The plugin", description), **_errors()}},
            "put": {"summary": "Replace a plugin by a new package; for a native one, stop=1 then runs"
                               " engine.restartCommand when it is set",
                    "tags": ["plugins"],
                    "parameters": [{"name": "stop", "in": "query", "required": False,
                                    "schema": {"type": "string", "enum": ["0", "1"]}}, DRY_RUN_PARAM],
                    "requestBody": _body("PluginUpdate"),
                    "responses": {"200": _updated_or_plan(
                        "Updated (text), or with dryRun=1 the plan (JSON)",
                        "plugin random is updated and eKuiper must restart for the change to take effect."),
                        **_errors()}},
            "delete": {
                "summary": "Remove a plugin; stop=1 then runs engine.restartCommand, or stops this service",
                "tags": ["plugins"],
                "parameters": [{"name": "stop", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["0", "1"]}}, DRY_RUN_PARAM],
                "responses": {"200": _updated_or_plan(
                    "Deleted (text), or with dryRun=1 the plan (JSON)",
                    "sources plugin random is deleted and eKuiper must restart for the change to take effect."),
                    **_errors()},
            },
        },
    )
    history_entry = {"type": "object", "required": ["operation", "version", "sha256", "url", "at", "outcome"],
                     "properties": {"operation": {"type": "string", "enum": ["install", "update", "rollback"]},
                                    "version": {"type": "string"}, "sha256": {"type": "string", "nullable": True},
                                    "url": {"type": "string", "nullable": True}, "at": {"type": "number"},
                                    "outcome": {"type": "string"}}}
    spec.path(
        path="/plugins/{type}/{name}/history",
        parameters=[TYPE_PARAM, NAME_PARAM],
        operations={"get": {
            "summary": "Every committed install, update and rollback of a plugin, newest first", "tags": ["history"],
            "responses": {"200": {"description": "The history", "content": {"application/json": {
                "schema": {"type": "array", "items": history_entry},
                "example": [
                    {"operation": "update", "version": "2.0.0", "url": "http://127.0.0.1:8000/random2.zip",
                     "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                     "at": 1796610000.5, "outcome": "ok"},
                    {"operation": "install", "version": "1.0.0", "url": "http://127.0.0.1:8000/random.zip",
                     "sha256": "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
                     "at": 1796600000.25, "outcome": "ok"},
                ]}}}, **_errors()},
        }},
    )
    spec.path(
        path="/plugins/{type}/{name}/rollback",
        parameters=[TYPE_PARAM, NAME_PARAM],
        operations={"post": {
            "summary": "Swap the newest kept previous version back in (404 when none is kept); for a native"
                       " plugin, stop=1 then runs engine.restartCommand when it is set",
            "tags": ["history"],
            "parameters": [{"name": "stop", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["0", "1"]}}],
            "responses": {"200": {"description": "The version now installed", "content": {"application/json": {
                "schema": {"type": "object", "required": ["type", "name", "version"],
                           "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                          "version": {"type": "string"}}},
                "example": {"type": "sources", "name": "random", "version": "1.0.0"}}}}, **_errors()},
        }},
    )
    spec.path(
        path="/plugins/{type}/prebuild",
        parameters=[NATIVE_PARAM],
        operations={"get": {
            "summary": "Download URLs of the prebuilt plugins for this machine", "tags": ["catalogue"],
            "responses": {"200": _json("Plugin name to URL", {"type": "object",
                                                              "additionalProperties": {"type": "string"}}),
                          **_errors()},
        }},
    )
    spec.path(
        path="/plugins/functions/{name}/register",
        parameters=[NAME_PARAM],
        operations={"post": {
            "summary": "Replace the function list of a native function plugin", "tags": ["functions"],
            "requestBody": _body("FunctionList"),
            "responses": {"200": _text("Registered", "function plugin misc function list is registered"),
                          **_errors()},
        }},
    )
    spec.path(
        path="/plugins/portables/{name}/status",
        parameters=[NAME_PARAM],
        operations={"get": {
            "summary": "The running engine's status of a portable plugin, relayed from engine.url", "tags": ["plugins"],
            "responses": {"200": _json("The engine's answer, as it is", {}), **_errors("400", "404", "503")},
        }},
    )
    spec.path(path="/plugins/udfs", operations={"get": {
        "summary": "Every function name, native and portable, sorted", "tags": ["functions"],
        "responses": {"200": _json("Function names", NAMES), **_errors()},
    }})
    spec.path(
        path="/plugins/udfs/{name}",
        parameters=[_param("name", NAME, "function name")],
        operations={"get": {"summary": "Which plugin owns a function", "tags": ["functions"],
                            "responses": {"200": _json("The owner", "FunctionOwner"), **_errors()}}},
    )
    spec.path(path="/config/uploads", operations={
        "get": {"summary": "Uploaded files (absolute paths of the top-level entries)", "tags": ["uploads"],
                "responses": {"200": _json("Paths", NAMES), **_errors()}},
        "post": {
            "summary": "Save a file into data/uploads", "tags": ["uploads"],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": "Upload"},
                "multipart/form-data": {"schema": {"type": "object", "required": ["uploadFile"], "properties": {
                    "uploadFile": {"type": "string", "format": "binary"}}}},
            }},
            "responses": {"201": _text("The saved absolute path", "/var/lib/kuiper/data/uploads/random.zip"),
                          **_errors()},
        },
    })
    spec.path(
        path="/config/uploads/{name}",
        parameters=[_param("name", {"type": "string"}, "path under data/uploads")],
        operations={"delete": {"summary": "Remove an uploaded file", "tags": ["uploads"],
                               "responses": {"200": _text("Removed", "ok"), **_errors()}}},
    )
    spec.path(path="/audit", operations={"get": {
        "summary": "The audit trail: every write request, refused ones included, newest first", "tags": ["audit"],
        "parameters": [
            {"name": "limit", "in": "query", "required": False, "example": 20,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
             "description": "most rows answered"},
            {"name": "since", "in": "query", "required": False, "example": "2024-01-01T00:00:00Z",
             "schema": {"type": "string", "format": "date-time"},
             "description": "only rows at or after this time (RFC 3339 with a zone, as rows give theirs)"},
        ],
        "responses": {"200": _json("Rows, newest first; at most basic.auditRetention are kept",
                                   {"type": "array", "items": "AuditEntry", "example": [AUDIT_EXAMPLE]}),
                      **_errors("400", "401", "403", "503")},
    }})
    spec.path(
        path="/operations/{request_id}",
        parameters=[_param("request_id", {"type": "string", "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"},
                           "the X-Request-Id the write request was sent with (or was answered with)")],
        operations={"get": {
            "summary": "How far a write request has got: its phases, bytes so far and in all, seconds in each"
                       f" (while it runs, and for {KEEP_SECONDS // 60} minutes after its answer)", "tags": ["audit"],
            "responses": {"200": {"description": "The request's progress", "content": {"application/json": {
                "schema": OPERATION_SCHEMA, "example": OPERATION_EXAMPLE}}},
                **_errors("400", "401", "403", "404", "503")},
        }},
    )
    problem = {"type": "object", "properties": {
        "type": {"type": "string"}, "name": {"type": "string"},
        "path": {"type": "string", "description": "a recorded path, or kv:<table>/<key> for a row of eKuiper's store"},
        "problem": {"type": "string", "enum": ["missing", "empty", "modified", "kv row missing", "kv row differs",
                                               "kv row not in the registry"]},
        "detail": {"type": "string"}}}
    verify_example = {"ok": False, "problems": [{"type": "sinks", "name": "influx", "path": "plugins/sinks/Influx.so",
                                                 "problem": "missing", "detail": "nothing at this path"}]}
    spec.path(path="/registry/verify", operations={"get": {
        "summary": "Compare every recorded file (size and sha256) and eKuiper's store with the registry",
        "tags": ["registry"],
        "responses": {"200": {"description": "ok, and one problem per plugin and path", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "ok": {"type": "boolean"}, "problems": {"type": "array", "items": problem}}},
                "example": verify_example}}},
            **_errors("401", "403", "503")},
    }})
    spec.path(path="/registry/repair", operations={"post": {
        "summary": "Reinstall each damaged plugin from its recorded URL when it still gives the recorded sha256",
        "tags": ["registry"],
        "responses": {"200": {"description": "what was repaired, what was not and why, and what remains",
                              "content": {"application/json": {"schema": {"type": "object", "properties": {
                                  "ok": {"type": "boolean"},
                                  "repaired": {"type": "array", "items": {"type": "object"}},
                                  "notRepaired": {"type": "array", "items": {"type": "object"}},
                                  "problems": {"type": "array", "items": problem}}},
                                  "example": {"ok": True, "repaired": [
                                      {"type": "sinks", "name": "influx", "version": "1.0.0",
                                       "file": "https://example.com/influx_amd64.zip"}],
                                      "notRepaired": [], "problems": []}}}},
                      **_errors("401", "403", "503")},
    }})
    spec.path(path="/registry/backup", operations={"get": {
        "summary": "One consistent tar.gz: the registry, eKuiper's store and every recorded file"
                   " (restore it offline with `kuiper-plugins restore FILE`)",
        "tags": ["registry"],
        "responses": {"200": {"description": "manifest.json, registry/, engine/ and files/<recorded path>",
                              "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
                      **_errors("401", "403", "503", "507")},
    }})
    spec.path(path="/engine/pending", operations={"get": {
        "summary": "Changes the running engine takes only at its restart (native updates and deletes, and"
                   " changes made while it could not be reached)", "tags": ["health"],
        "responses": {"200": {"description": "The engine's start and the pending changes", "content": {
            "application/json": {"schema": {"type": "object"}, "example": PENDING_EXAMPLE}}},
            **_errors("400", "503")},
    }})
    _plugin_set_components(spec)
    _plugin_set_paths(spec)
    spec.path(path="/ping", operations={"get": {
        "summary": "Liveness (no authentication)", "tags": ["health"],
        "responses": {"200": {"description": "Alive"}, **_errors("403")},
    }})
    spec.path(path="/", operations={"get": {
        "summary": "Readiness: version, OS, architecture, uptime and registry state (no authentication)",
        "tags": ["health"],
        "responses": {"200": _json("Ready", {"type": "object", "required": ["version", "os", "arch", "upTimeSeconds"],
                                             "properties": {"version": {"type": "string"}, "os": {"type": "string"},
                                                            "arch": {"type": "string"},
                                                            "upTimeSeconds": {"type": "integer"},
                                                            "serviceVersion": {"type": "string"},
                                                            "registry": {"type": "object", "description":
                                                                         "plugins per type, functions,"
                                                                         " operationsInFlight, and damaged:"
                                                                         " plugins whose files are missing or"
                                                                         " of another size"},
                                                            "engine": {"type": "object", "description":
                                                                       "with the engine attached: pendingRestart,"
                                                                       " the count of GET /engine/pending"}}}),
                      **_errors("403", "503")},
    }})
    return spec


def _swagger_folder() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


@docs_bp.get("/openapi.json")
def openapi_document() -> Response:
    from kuiper_plugins import __version__

    return jsonify(_document(__version__))


@cache
def _document(version: str) -> dict[str, Any]:
    return build_spec(version).to_dict()


@docs_bp.get("/docs")
def docs_redirect() -> Response:
    return redirect(url_for("docs.docs_page"))


@docs_bp.get("/docs/")
def docs_page() -> str:
    template = (_swagger_folder() / "index.j2").read_text(encoding="utf-8")
    return render_template_string(template, openapi_spec_url=url_for("docs.openapi_document"))


@docs_bp.get("/docs/<path:asset>")
def docs_asset(asset: str) -> Response:
    return send_from_directory(_swagger_folder(), asset)
