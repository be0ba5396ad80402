"""Request and response schemas (marshmallow). Bodies are checked here, at the edge.

Keys are matched case-insensitively and unknown keys ignored, as eKuiper's
Go decoder does; two keys that fold to the same name are refused as
ambiguous.
"""

from __future__ import annotations

import json
import re
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from kuiper_plugins.errors import InvalidRequest
from kuiper_plugins.install import fetch, packages, scripts

SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_FUNCTIONS = packages.MAX_FUNCTIONS  # one limit for requests and for what start-up adopts
NAME_DOC = {
    "pattern": "^[A-Za-z0-9_-]+$",
    "maxLength": 250,
    "description": "letters, digits, hyphens and underscores (eKuiper's rule), at most 250",
    "example": "random",
}
URL_DOC = {
    "pattern": r"^(https?://[^/?#\s]+/|file:///)[^?#\s]*\.zip$",
    "description": "an http(s) URL with a host, or a file URL with an empty host; the path ends in .zip",
    "example": "file:///var/lib/kuiper/data/uploads/random.zip",
}


def _name(value: str) -> None:
    try:
        packages.check_name(value)
    except InvalidRequest as exc:
        raise ValidationError(exc.message)


def _url(value: str) -> None:
    try:
        fetch.check_url(value)
    except InvalidRequest as exc:
        raise ValidationError(exc.message)


def _shell_paras(value: list[str]) -> None:
    try:
        scripts.check_shell_paras(value)
    except InvalidRequest as exc:
        raise ValidationError(exc.message)


def _function_list(value: list[str]) -> None:
    if len(value) > MAX_FUNCTIONS:
        raise ValidationError(f"at most {MAX_FUNCTIONS} functions")
    if len(set(value)) != len(value):
        raise ValidationError("a function is listed twice")


class CaseInsensitiveSchema(Schema):
    """Match incoming keys to the declared ones regardless of case; ignore unknown keys."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def fold_keys(self, data: Any, **kwargs: Any) -> Any:
        if not isinstance(data, dict):
            raise ValidationError("expected a JSON object")
        declared = {(f.data_key or name).lower(): f.data_key or name for name, f in self.fields.items()}
        folded: dict[str, Any] = {}
        for key, value in data.items():
            canonical = declared.get(str(key).lower())
            if canonical is None:
                continue
            if canonical in folded:
                raise ValidationError(f"key {canonical!r} is given more than once")
            folded[canonical] = value
        return folded


class PluginRequestSchema(CaseInsensitiveSchema):
    """Body of POST /plugins/{type}: a name and the URL of its package."""

    # Checked after decoding, as eKuiper checks them: the name by its ID rule (a plain message), the URL
    # by the installer (a "create command error"), before anything else.
    name = fields.String(required=True, metadata=NAME_DOC)
    file = fields.String(required=True, metadata=URL_DOC)
    shellParas = fields.List(
        fields.String(), load_default=list, validate=_shell_paras,
        metadata={"maxItems": 32, "description": "arguments of install.sh, passed as they are"},
    )
    functions = fields.List(
        fields.String(validate=_name, metadata=NAME_DOC), load_default=list, validate=_function_list,
        metadata={"maxItems": MAX_FUNCTIONS, "uniqueItems": True,
                  "description": "function plugins only (refused for any other type): the functions it exports"
                                 " (default: its name)"},
    )
    sha256 = fields.String(
        load_default=None, allow_none=True, validate=validate.Regexp(SHA256),
        metadata={"pattern": "^[0-9a-fA-F]{64}$", "description": "hex SHA-256 the package must have"},
    )


class PluginUpdateSchema(PluginRequestSchema):
    """Body of PUT /plugins/{type}/{name}: as for create; the name may be left out."""

    name = fields.String(load_default=None, metadata={**NAME_DOC, "description": "must equal the path's name"})


class FunctionListSchema(CaseInsensitiveSchema):
    """Body of POST /plugins/functions/{name}/register."""

    functions = fields.List(
        fields.String(validate=_name, metadata=NAME_DOC), required=True, validate=_function_list,
        metadata={"minItems": 1, "maxItems": MAX_FUNCTIONS, "uniqueItems": True},
    )


class UploadSchema(CaseInsensitiveSchema):
    """JSON body of POST /config/uploads: a name and either the text content or a URL to fetch."""

    name = fields.String(required=True, metadata={"example": "random.zip", "description": "path under data/uploads"})
    content = fields.String(load_default=None, metadata={"description": "the file's text"})
    file = fields.String(load_default=None, validate=_url, metadata={**URL_DOC, "description": "a URL to fetch"})

    @validates_schema
    def one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("content") is None) == (data.get("file") is None):
            raise ValidationError("give either content or file")


# ------------------------------------------------------------------ the plugin set (PUT /config/plugins)

PLUGIN_SET_TYPES = ("sources", "sinks", "functions", "portables")
EKUIPER_KEYS = ("nativePlugins", "portablePlugins")
PRUNE_DOC = {"description": "remove the installed plugins the document does not name (default false: kept)"}


def _strict_boolean(**kwargs: Any) -> fields.Boolean:
    """A JSON true or false, nothing that merely looks like one ("yes", 1)."""
    return fields.Boolean(truthy={True}, falsy={False}, **kwargs)


def _without_dict_levels(messages: Any) -> Any:
    """marshmallow's errors for a Dict, {name: {"key": [...], "value": {...}}}, as {name: ...}."""
    if not isinstance(messages, dict):
        return messages
    plain: dict[Any, Any] = {}
    for name, errors in messages.items():
        if isinstance(errors, dict) and errors and set(errors) <= {"key", "value"}:
            key_errors, value_errors = errors.get("key"), errors.get("value")
            if key_errors and value_errors:
                plain[name] = {"_schema": key_errors, **(value_errors if isinstance(value_errors, dict)
                                                        else {"_value": value_errors})}
            else:
                plain[name] = key_errors or value_errors
        else:
            plain[name] = errors
    return plain


class NamedDict(fields.Dict):
    """A JSON object from names to values; its errors are reported by name (sources.random.sha256)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return super()._deserialize(value, attr, data, **kwargs)
        except ValidationError as exc:
            raise ValidationError(_without_dict_levels(exc.messages)) from None


class PluginEntrySchema(CaseInsensitiveSchema):
    """One plugin of a plugin set: where its package comes from and how it is installed."""

    file = fields.String(required=True, allow_none=True, metadata={
        **URL_DOC, "nullable": True,
        "description": "the package's URL, as for POST /plugins/{type}; null only for a plugin installed without"
                       " one (copied in by hand), which the document then keeps as it is"})
    sha256 = fields.String(
        load_default=None, allow_none=True, validate=validate.Regexp(SHA256),
        metadata={"pattern": "^[0-9a-fA-F]{64}$", "nullable": True,
                  "description": "the package's digest; when given, a plugin is unchanged while its recorded"
                                 " digest equals it (else while its recorded URL equals `file`)"},
    )
    version = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200),
                            metadata={"nullable": True, "description": "informational: not compared"})
    shellParas = fields.List(
        fields.String(), load_default=list, validate=_shell_paras,
        metadata={"maxItems": 32, "description": "arguments of install.sh; a change reinstalls the plugin"},
    )
    functions = fields.List(
        fields.String(validate=_name, metadata=NAME_DOC), load_default=None, allow_none=True,
        validate=_function_list,
        metadata={"maxItems": MAX_FUNCTIONS, "uniqueItems": True, "nullable": True,
                  "description": "function plugins only: the functions it exports; left out, an installed"
                                 " plugin keeps its list and a new one exports its name"},
    )


class PluginSetSchema(CaseInsensitiveSchema):
    """Body of PUT /config/plugins (and GET's answer): every plugin a node should have, per type."""

    sources = NamedDict(keys=fields.String(metadata=NAME_DOC), values=fields.Nested(PluginEntrySchema),
                        load_default=dict)
    sinks = NamedDict(keys=fields.String(metadata=NAME_DOC), values=fields.Nested(PluginEntrySchema),
                      load_default=dict)
    functions = NamedDict(keys=fields.String(metadata=NAME_DOC), values=fields.Nested(PluginEntrySchema),
                          load_default=dict)
    portables = NamedDict(keys=fields.String(metadata=NAME_DOC), values=fields.Nested(PluginEntrySchema),
                          load_default=dict)
    prune = _strict_boolean(load_default=False, metadata=PRUNE_DOC)

    @validates_schema
    def function_lists_of_function_plugins(self, data: dict[str, Any], **kwargs: Any) -> None:
        errors = {plugin_type: {name: {"functions": ["only function plugins have a function list"]}
                                for name, entry in data.get(plugin_type, {}).items()
                                if entry.get("functions") is not None}
                  for plugin_type in ("sources", "sinks", "portables")}
        errors = {plugin_type: names for plugin_type, names in errors.items() if names}
        if errors:
            raise ValidationError(errors)

    @post_load
    def as_plugin_set(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"plugins": {plugin_type: data[plugin_type] for plugin_type in PLUGIN_SET_TYPES},
                "prune": data["prune"], "format": "document"}


class InstallScriptSchema(CaseInsensitiveSchema):
    """eKuiper's install script for one plugin, the JSON text its export holds: {name, file, shellParas}."""

    name = fields.String(load_default=None, allow_none=True)
    file = fields.String(required=True)
    shellParas = fields.List(fields.String(), load_default=list, allow_none=True, validate=_shell_paras)


class InstallScriptText(fields.String):
    """A string holding an install script, as eKuiper's export writes it (JSON inside a JSON string)."""

    schema = InstallScriptSchema()

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            script = json.loads(text)  # as Go's decoder: a key given twice takes the last value
        except ValueError as exc:
            raise ValidationError(f"not an install script: {exc}") from None
        return self.schema.load(script)


class EkuiperPluginsSchema(CaseInsensitiveSchema):
    """The plugin part of eKuiper's /data/export, as PUT /config/plugins takes it; the rest is ignored.

    `nativePlugins` maps `<type>_<name>` to an install script, `portablePlugins` maps `<name>` to one;
    `functionLists` (ours, a key eKuiper ignores) maps a function plugin's name to its function list.
    """

    nativePlugins = NamedDict(keys=fields.String(), values=InstallScriptText(), load_default=dict,
                              metadata={"description": "<type>_<name>: eKuiper's install script (a JSON string)"})
    portablePlugins = NamedDict(keys=fields.String(), values=InstallScriptText(), load_default=dict,
                                metadata={"description": "<name>: eKuiper's install script (a JSON string)"})
    functionLists = NamedDict(
        keys=fields.String(),
        values=fields.List(fields.String(validate=_name, metadata=NAME_DOC), validate=_function_list),
        load_default=dict, metadata={"description": "ours: a function plugin's name to its function list"})
    prune = _strict_boolean(load_default=False, metadata=PRUNE_DOC)

    @post_load
    def as_plugin_set(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        plugins: dict[str, dict[str, Any]] = {plugin_type: {} for plugin_type in PLUGIN_SET_TYPES}
        errors: dict[str, dict[str, list[str]]] = {}
        for key, script in data["nativePlugins"].items():
            plugin_type, _, name = key.partition("_")
            if plugin_type not in PLUGIN_SET_TYPES[:3] or not name:
                errors.setdefault("nativePlugins", {})[key] = [
                    "a key is <type>_<name>, with the type sources, sinks or functions"]
            elif script["name"] not in (None, name):
                errors.setdefault("nativePlugins", {})[key] = [f"the script names plugin {script['name']!r}"]
            else:
                plugins[plugin_type][name] = _entry_of(script, data["functionLists"].get(name)
                                                       if plugin_type == "functions" else None)
        for name, script in data["portablePlugins"].items():
            if script["name"] not in (None, name):
                errors.setdefault("portablePlugins", {})[name] = [f"the script names plugin {script['name']!r}"]
            else:
                plugins["portables"][name] = _entry_of(script, None)
        for name in data["functionLists"]:
            if name not in plugins["functions"]:
                errors.setdefault("functionLists", {})[name] = [f"nativePlugins has no functions_{name}"]
        if errors:
            raise ValidationError(errors)
        return {"plugins": plugins, "prune": data["prune"], "format": "ekuiper"}


def _entry_of(script: dict[str, Any], functions: list[str] | None) -> dict[str, Any]:
    return {"file": script["file"], "sha256": None, "version": None, "shellParas": script["shellParas"] or [],
            "functions": functions}


class PluginSetRequest:
    """PUT /config/plugins' body, in either format: the plugin set, or the plugin part of eKuiper's export."""

    document = PluginSetSchema()
    ekuiper = EkuiperPluginsSchema()

    def load(self, data: Any) -> dict[str, Any]:
        """The plugin set as {"plugins": {type: {name: entry}}, "prune", "format"}; ValidationError otherwise."""
        if not isinstance(data, dict):
            raise ValidationError("expected a JSON object")
        keys = {str(key).lower() for key in data}
        ekuiper = keys & {key.lower() for key in EKUIPER_KEYS}
        if ekuiper and keys & set(PLUGIN_SET_TYPES):
            raise ValidationError("give either the plugin set (sources, sinks, functions, portables) or the plugin"
                                  " part of eKuiper's export (nativePlugins, portablePlugins), not both")
        return (self.ekuiper if ekuiper else self.document).load(data)


class OutputSchema(Schema):
    """An answer's schema: keys come out in the order the fields are declared."""

    class Meta:
        ordered = True


class NativeDescriptionSchema(OutputSchema):
    """GET /plugins/{sources,sinks,functions}/{name}; keys in the order eKuiper's sorted maps give."""

    functions = fields.List(fields.String())
    name = fields.String(required=True)
    version = fields.String(required=True)


class PortableDescriptionSchema(OutputSchema):
    """A portable plugin's descriptor, as GET /plugins/portables and /plugins/portables/{name} answer."""

    name = fields.String(required=True)
    version = fields.String(required=True)
    language = fields.String(required=True)
    executable = fields.String(required=True)
    virtualEnvType = fields.String()
    env = fields.String()
    sources = fields.List(fields.String(), required=True)
    sinks = fields.List(fields.String(), required=True)
    functions = fields.List(fields.String(), required=True)


class FunctionOwnerSchema(OutputSchema):
    """GET /plugins/udfs/{name}."""

    name = fields.String(required=True)
    plugin = fields.String(required=True)


class ErrorSchema(OutputSchema):
    """The one error envelope."""

    error = fields.Integer(required=True)
    message = fields.String(required=True)


def flatten_errors(messages: Any, prefix: str = "") -> str:
    """Turn marshmallow's nested error dict into one readable line."""
    if isinstance(messages, dict):
        parts = []
        for key, value in messages.items():
            label = f"{prefix}{key}" if key != "_schema" else prefix.rstrip(".")
            parts.append(flatten_errors(value, f"{label}." if label else ""))
        return "; ".join(p for p in parts if p)
    if isinstance(messages, list):
        text = " ".join(str(m) for m in messages if not isinstance(m, dict | list))
        nested = "; ".join(flatten_errors(m, prefix) for m in messages if isinstance(m, dict | list))
        label = prefix.rstrip(".")
        head = f"{label}: {text}" if label and text else text
        return "; ".join(p for p in (head, nested) if p)
    return f"{prefix.rstrip('.')}: {messages}" if prefix else str(messages)


class AuditQuerySchema(Schema):
    """The query of GET /audit: how many rows, and from when on."""

    class Meta:
        unknown = RAISE

    limit = fields.Integer(
        load_default=100, validate=validate.Range(1, 1000),
        metadata={"description": "most rows answered, newest first (1 to 1000)", "example": 20},
    )
    since = fields.AwareDateTime(
        load_default=None, format="iso",
        metadata={"description": "only rows at or after this time (RFC 3339 with a zone, as rows give theirs)",
                  "example": "2024-01-01T00:00:00Z"},
    )


class AuditActorSchema(OutputSchema):
    """Who made a request: the fields that could be told."""

    iss = fields.String(metadata={"description": "the JWT's issuer (authentication on)"})
    sub = fields.String(metadata={"description": "the JWT's subject"})
    user = fields.String(metadata={"description": "the local user the kernel names for the connection"})
    address = fields.String(metadata={"description": "the client's address; behind the shipped nginx, its X-Real-IP"})
    proxy = fields.String(metadata={"description": "the front's local user, when `address` was passed by it"})


class AuditEntrySchema(OutputSchema):
    """One row of GET /audit."""

    id = fields.Integer(required=True)
    time = fields.String(required=True, metadata={"example": "2024-05-01T12:00:00.123Z"})
    requestId = fields.String(required=True)
    actor = fields.Nested(AuditActorSchema, required=True)
    operation = fields.String(required=True, metadata={"example": "create"})
    method = fields.String(required=True)
    path = fields.String(required=True)
    type = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    versionBefore = fields.String(allow_none=True)
    versionAfter = fields.String(allow_none=True)
    sha256 = fields.String(allow_none=True)
    url = fields.String(allow_none=True)
    status = fields.Integer(required=True)
    outcome = fields.String(required=True, validate=validate.OneOf(["ok", "refused", "failed"]))
    message = fields.String(allow_none=True)
    durationSeconds = fields.Float(required=True)
