"""The OpenAPI 3 document, generated from the marshmallow schemas with apispec, and the /docs page.

The document is made for the service that serves it (`for_service`): its examples name this service's uploads
folder and form a session that works as it is (web/examples.py), and it asks for a token exactly when
basic.authentication is on, so that Swagger UI's Authorize and "Try it out" work either way.

The page is Swagger UI from the swagger-ui-bundle package, served from this
service: nothing is loaded from a CDN, and the validator (an outside site) is off. Until its script has run
(a megabyte), the page shows a summary rendered here: every operation, and how to authorize.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template_string,
    send_from_directory,
    url_for,
)

from kuiper_plugins.layout import NATIVE_TYPES, PLUGIN_TYPES, Layout
from kuiper_plugins.store.progress import KEEP_SECONDS
from kuiper_plugins.web import examples, schemas

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


def _body(schema: str, required: bool = True, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"required": required, "content": {"application/json": media}}


def _param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
TYPE_PARAM = _param("type", {"type": "string", "enum": list(PLUGIN_TYPES)}, "plugin type") | {"example": "sources"}
NATIVE_PARAM = _param("type", {"type": "string", "enum": list(NATIVE_TYPES)}, "native plugin type")
NAME_PARAM = _param("name", NAME, "plugin name") | {"example": "random"}
# The package of the examples: eKuiper's file:// form, in the uploads folder of a home at /var/lib/kuiper.
EXAMPLE_PACKAGE = "file:///var/lib/kuiper/data/uploads/random.zip"
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

# A write's own X-Request-Id, under which GET /operations/{request_id} answers its progress (the install example
# sends this one, and the operations example asks for it).
REQUEST_ID_PATTERN = "^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"
EXAMPLE_REQUEST_ID = "example-install-random"
REQUEST_ID_PARAM = {"name": "X-Request-Id", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN}, "example": EXAMPLE_REQUEST_ID,
                    "description": "the request's id (one is made when none is sent): echoed in the answer, written in"
                                   " its log lines and audit row, and the key of GET /operations/{request_id}"}

# ?dryRun=1 (issue 19): the plan of a create, update or delete, as install/plan.py's to_json() gives it.
# No example value: "Try it out" and the replayed session send the request itself, not its plan.
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
    # A body that is no plugin set is refused before any step, in the envelope of every other refusal.
    failure = {"description": "A step failed: its own status (400 for a refused package); every earlier change of"
                              " the request was undone. A body that is no plugin set: the error envelope",
               "content": {"application/json": {"schema": {"anyOf": ["PluginSetFailure", "Error"]},
                                                "example": PLUGIN_SET_FAILURE_EXAMPLE}}}
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
                     "parameters": [DRY_RUN_PARAM, REQUEST_ID_PARAM],
                     "requestBody": _body("PluginRequest", example={"name": "random", "file": EXAMPLE_PACKAGE}),
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
                    "requestBody": _body("PluginUpdate", example={"file": EXAMPLE_PACKAGE}),
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
    history_entry = {"type": "object", "required": ["operation", "version", "sha256", "url", "at", "outcome", "kept"],
                     "properties": {"operation": {"type": "string", "enum": ["install", "update", "rollback"]},
                                    "version": {"type": "string"}, "sha256": {"type": "string", "nullable": True},
                                    "url": {"type": "string", "nullable": True}, "at": {"type": "number"},
                                    "outcome": {"type": "string"},
                                    "kept": {"type": "boolean", "description": "the version this entry installed"
                                             " is kept: POST .../rollback?version= goes back to it"}}}
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
                     "at": 1796610000.5, "outcome": "ok", "kept": False},
                    {"operation": "install", "version": "1.0.0", "url": "http://127.0.0.1:8000/random.zip",
                     "sha256": "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
                     "at": 1796600000.25, "outcome": "ok", "kept": True},
                ]}}}, **_errors()},
        }},
    )
    spec.path(
        path="/plugins/{type}/{name}/rollback",
        parameters=[TYPE_PARAM, NAME_PARAM],
        operations={"post": {
            "summary": "Swap a kept previous version back in: the one version names, else the newest (404 when"
                       " none is kept, or that version is not; 400 for the one installed); for a native"
                       " plugin, stop=1 then runs engine.restartCommand when it is set",
            "tags": ["history"],
            "parameters": [{"name": "stop", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["0", "1"]}},
                           {"name": "version", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "a kept version, as GET .../history marks them (`kept`); without it,"
                                           " the newest kept version, so that twice returns to where you started"}],
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
            "summary": "Replace the function list of a native function plugin (400 while its files are missing:"
                       " POST /registry/repair first)", "tags": ["functions"],
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
        parameters=[_param("request_id", {"type": "string", "pattern": REQUEST_ID_PATTERN},
                           "the X-Request-Id the write request was sent with (or was answered with)")
                    | {"example": EXAMPLE_REQUEST_ID}],
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
                                               "kv row not in the registry", "kv row of a damaged plugin"]},
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


# ---------------------------------------------------------------------------- the document of this service

# One name per operation, for clients generated from the document; an operation added without one gets a name
# made of its method and path (`_operation_id`).
OPERATION_IDS = {
    ("get", "/plugins/{type}"): "listPlugins",
    ("post", "/plugins/{type}"): "installPlugin",
    ("get", "/plugins/{type}/{name}"): "describePlugin",
    ("put", "/plugins/{type}/{name}"): "updatePlugin",
    ("delete", "/plugins/{type}/{name}"): "deletePlugin",
    ("get", "/plugins/{type}/{name}/history"): "pluginHistory",
    ("post", "/plugins/{type}/{name}/rollback"): "rollbackPlugin",
    ("get", "/plugins/{type}/prebuild"): "listPrebuiltPlugins",
    ("post", "/plugins/functions/{name}/register"): "registerFunctions",
    ("get", "/plugins/portables/{name}/status"): "portablePluginStatus",
    ("get", "/plugins/udfs"): "listFunctions",
    ("get", "/plugins/udfs/{name}"): "describeFunction",
    ("get", "/config/uploads"): "listUploads",
    ("post", "/config/uploads"): "uploadFile",
    ("delete", "/config/uploads/{name}"): "deleteUpload",
    ("get", "/audit"): "listAudit",
    ("get", "/registry/verify"): "verifyRegistry",
    ("post", "/registry/repair"): "repairRegistry",
    ("get", "/registry/backup"): "backupRegistry",
    ("get", "/engine/pending"): "listPendingRestart",
    ("get", "/operations/{request_id}"): "getOperation",
    ("get", "/config/plugins"): "getPluginSet",
    ("put", "/config/plugins"): "applyPluginSet",
    ("get", "/ping"): "ping",
    ("get", "/"): "readiness",
}
OPEN_OPERATIONS = {("get", "/"), ("get", "/ping")}  # no token, even with authentication on (web/access.py)
METHODS = ("get", "put", "post", "delete", "patch")
SECURITY_SCHEME = {
    "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
    "description": "An RS256 JWT whose iss names a PEM public key in <etc>/mgmt and whose aud holds eKuiper, as"
                   " eKuiper's own (docs/access.md). Swagger UI sends it as `Authorization: Bearer <jwt>`; eKuiper's"
                   " clients send the token alone, which is taken too.",
}
# Path parameters filled in for "Try it out": the plugins, functions and uploads of the example session.
PATH_EXAMPLES = {
    "/plugins/functions/{name}/register": {"name": "misc"},
    "/plugins/udfs/{name}": {"name": "f1"},
    "/config/uploads/{name}": {"name": "random.zip"},
}
DEFAULT_PATH_EXAMPLES = {"type": "sources", "name": "random"}


def _operation_id(method: str, path: str) -> str:
    known = OPERATION_IDS.get((method, path))
    if known:
        return known
    words = [word for word in re.split(r"[^A-Za-z0-9]+", path) if word]
    return method + "".join(word[0].upper() + word[1:] for word in words)


def for_service(document: dict[str, Any], *, uploads: Path, authentication: bool) -> dict[str, Any]:
    """The document as this service serves it: its address, its token scheme, a name for every operation, and
    examples that work as they are against it (web/examples.py)."""
    document = copy.deepcopy(document)
    document["servers"] = [{"url": "/", "description": "this service, where this document was read"}]
    document["components"]["securitySchemes"] = {"jwt": SECURITY_SCHEME}
    state = "on: authorize with a token" if authentication else "off on this service: no token is needed"
    document["info"]["description"] += (
        f" Authentication (basic.authentication) is {state}. The examples form one session that works as it is:"
        " upload random.zip and misc.zip (POST /config/uploads), install them (POST /plugins/{type}, type sources"
        " then functions), then read, update, register and remove them."
    )
    if authentication:
        document["security"] = [{"jwt": []}]
    for path, item in document["paths"].items():
        wanted = {**DEFAULT_PATH_EXAMPLES, **PATH_EXAMPLES.get(path, {})}
        for parameter in item.get("parameters", []):
            if parameter["in"] == "path" and parameter["name"] in wanted:
                parameter["example"] = wanted[parameter["name"]]
        for method in METHODS:
            if method in item:
                item[method]["operationId"] = _operation_id(method, path)
                if (method, path) in OPEN_OPERATIONS:
                    item[method]["security"] = []
    _request_examples(document["paths"], uploads)
    return document


def _request_examples(paths: dict[str, Any], uploads: Path) -> None:
    """Bodies that work as they are: packages uploaded as text, installed from this service's uploads folder."""
    random_zip, misc_zip = examples.packages()
    url = {package.plugin_name: f"file://{uploads}/{package.file_name}" for package in (random_zip, misc_zip)}

    def body(operation: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
        content = operation["requestBody"]["content"][media]
        content.pop("example", None)
        return content

    body(paths["/config/uploads"]["post"])["examples"] = {
        package.plugin_name: {
            "summary": f"{package.file_name}: {package.plugin_type} plugin {package.plugin_name}",
            "description": "content is the file as text. This zip is written with ASCII bytes only, so that JSON"
                           " can carry it; send real packages as multipart uploadFile, or from a URL (file).",
            "value": {"name": package.file_name, "content": package.text},
        } for package in (random_zip, misc_zip)}
    body(paths["/plugins/{type}"]["post"])["examples"] = {
        "sources": {"summary": "type sources: source plugin random, from the uploaded random.zip",
                    "value": {"name": "random", "file": url["random"]}},
        "functions": {"summary": "type functions: function plugin misc exporting f1 and f2, from misc.zip",
                      "value": {"name": "misc", "file": url["misc"], "functions": list(misc_zip.functions)}},
    }
    body(paths["/plugins/{type}/{name}"]["put"])["examples"] = {
        "sources": {"summary": "source plugin random, from random.zip again", "value": {"file": url["random"]}}}
    body(paths["/plugins/functions/{name}/register"]["post"])["examples"] = {
        "misc": {"summary": "misc exports f1, f2 and f3", "value": {"functions": ["f1", "f2", "f3"]}}}
    plugin_set = body(paths["/config/plugins"]["put"])
    plugin_set["examples"] = {
        "document": {"summary": "the plugin set: random and misc, pinned to their sha256", "value": {
            "sources": {"random": {"file": url["random"], "sha256": random_zip.sha256}},
            "sinks": {},
            "functions": {"misc": {"file": url["misc"], "sha256": misc_zip.sha256,
                                   "functions": list(misc_zip.functions)}},
            "portables": {}, "prune": False}},
        "ekuiper": {"summary": "the same in eKuiper's export format, with the function lists", "value": {
            "nativePlugins": {f"{package.plugin_type}_{package.plugin_name}":
                              f'{{"name":"{package.plugin_name}","file":"{url[package.plugin_name]}"}}'
                              for package in (random_zip, misc_zip)},
            "portablePlugins": {}, "functionLists": {"misc": list(misc_zip.functions)}}},
    }


def _swagger_folder() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


@docs_bp.get("/openapi.json")
def openapi_document() -> Response:
    return jsonify(_served_document())


def _served_document() -> dict[str, Any]:
    from kuiper_plugins import __version__

    settings = current_app.extensions["kuiper_plugins"].settings
    return _document(__version__, Layout.of(settings).uploads, settings.authentication)


@cache
def _document(version: str, uploads: Path, authentication: bool) -> dict[str, Any]:
    return for_service(build_spec(version).to_dict(), uploads=uploads, authentication=authentication)


@docs_bp.get("/docs")
def docs_redirect() -> Response:
    return redirect(url_for("docs.docs_page"))


# Swagger UI, from files of this service. Until Swagger UI has both its script and the document, and has drawn
# the operations (its onComplete), the page shows a summary rendered here, and Swagger UI draws out of sight:
# otherwise a browser shows Swagger UI's bare "LOADING" for as long as /openapi.json is on its way.
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>{{ title }} {{ version }}: API</title>
  <link rel="stylesheet" type="text/css" href="./swagger-ui.css">
  <link rel="icon" type="image/png" href="./favicon-32x32.png" sizes="32x32">
  <style>
    body { margin: 0; background: #fafafa; }
    #first-view { max-width: 1200px; margin: 0 auto; padding: 20px; font-family: sans-serif; color: #3b4151; }
    #first-view table { border-collapse: collapse; width: 100%; }
    #first-view td, #first-view th { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ddd; }
    #first-view code { font-size: 13px; }
  </style>
</head>
<body>
  <div id="first-view">
    <h1>{{ title }} <small>{{ version }}</small></h1>
    <p>{{ description }}</p>
    <p>{{ authorize }}The interactive page (Swagger UI, served by this service) loads here; the document
      itself is <a href="{{ document_url }}">{{ document_url }}</a>.</p>
    <table>
      <thead><tr><th>method</th><th>path</th><th>what it does</th><th>operationId</th></tr></thead>
      <tbody>
      {%- for operation in operations %}
        <tr><td><code>{{ operation.method }}</code></td><td><code>{{ operation.path }}</code></td>
          <td>{{ operation.summary }}</td><td><code>{{ operation.id }}</code></td></tr>
      {%- endfor %}
      </tbody>
    </table>
  </div>
  <div id="swagger-ui" hidden></div>
  <script src="./swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="./swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.onload = function () {
      window.ui = SwaggerUIBundle({
        url: {{ document_url|tojson }},
        dom_id: "#swagger-ui",
        validatorUrl: null,
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        plugins: [SwaggerUIBundle.plugins.DownloadUrl],
        layout: "StandaloneLayout",
        onComplete: function () {  // again for each document Explore loads: the summary is gone by then
          var first = document.getElementById("first-view");
          if (first) { first.remove(); }
          document.getElementById("swagger-ui").hidden = false;
        }
      });
    };
  </script>
</body>
</html>
"""


@docs_bp.get("/docs/")
def docs_page() -> str:
    document = _served_document()
    operations = [
        {"method": method.upper(), "path": path, "summary": item[method].get("summary", ""),
         "id": item[method]["operationId"]}
        for path, item in document["paths"].items() for method in METHODS if method in item
    ]
    authorize = ("Every operation but GET / and GET /ping needs a token: press Authorize and give the JWT. "
                 if "security" in document else "")
    return render_template_string(
        DOCS_PAGE, title=document["info"]["title"], version=document["info"]["version"],
        description=document["info"]["description"], authorize=authorize, operations=operations,
        document_url=url_for("docs.openapi_document"))


@docs_bp.get("/docs/<path:asset>")
def docs_asset(asset: str) -> Response:
    return send_from_directory(_swagger_folder(), asset)
