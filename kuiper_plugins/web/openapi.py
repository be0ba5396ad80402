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
    ):
        spec.components.schema(name, schema=schema)
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
            "post": {"summary": "Install a plugin from a zip URL", "tags": ["plugins"],
                     "requestBody": _body("PluginRequest"),
                     "responses": {"201": _text("Created", "sources plugin random is created"), **_errors()}},
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
                                    "schema": {"type": "string", "enum": ["0", "1"]}}],
                    "requestBody": _body("PluginUpdate"),
                    "responses": {"200": _text("Updated", "plugin random is updated and eKuiper must restart for the"
                                                          " change to take effect."), **_errors()}},
            "delete": {
                "summary": "Remove a plugin; stop=1 then runs engine.restartCommand, or stops this service",
                "tags": ["plugins"],
                "parameters": [{"name": "stop", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["0", "1"]}}],
                "responses": {"200": _text("Deleted", "sources plugin random is deleted and eKuiper must restart"
                                                      " for the change to take effect."), **_errors()},
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
                                                            "registry": {"type": "object"}}}),
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
