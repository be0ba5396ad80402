"""Domain errors and the one JSON error envelope every refusal is sent in.

Modules below the blueprint raise the small classes here; the handlers that
`register_error_handlers` installs turn them, marshmallow's validation
errors and werkzeug's HTTP errors into ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

UNDEFINED_ERR = 1000
NOT_FOUND = 1002


class PluginError(Exception):
    """A refusal the client can act on: a status, an eKuiper error code, a message."""

    status = 400
    code = UNDEFINED_ERR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def with_prefix(self, prefix: str) -> PluginError:
        """Return the same kind of error with ``prefix: `` put before the message."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        Exception.__init__(clone, f"{prefix}: {self.message}")
        clone.message = f"{prefix}: {self.message}"
        return clone


class InvalidRequest(PluginError):
    """The request itself is wrong: body, name, URL syntax, parameters."""


class MalformedBody(InvalidRequest):
    """The request body broke its framing (a malformed chunked encoding) while it was read; a 400.

    Raised from inside the body stream, before the view has a body to look at: the view puts its
    own eKuiper prefix in front (`with_prefix`), as eKuiper's decode error would carry.
    """


class InstallFailed(PluginError):
    """The package could not be installed: download, archive, rules or script."""


class DownloadFailed(InstallFailed):
    """The package could not be fetched from its URL."""


class ArchiveRejected(InstallFailed):
    """The zip is unsafe or malformed; the whole archive is refused."""


class PackageInvalid(InstallFailed):
    """The zip is a sound archive but breaks the plugin package rules."""


class ScriptFailed(InstallFailed):
    """install.sh exited non-zero, was killed at its timeout, or is not allowed."""


class PluginBusy(PluginError):
    """Another install, update or delete of the same plugin is in flight."""


class PluginNotFound(PluginError):
    status = 404
    code = NOT_FOUND


class Forbidden(PluginError):
    status = 403


class Unauthorized(PluginError):
    status = 401


class RegistryUnavailable(PluginError):
    """The registry is locked past its busy timeout, read-only or corrupt."""

    status = 503
    retry_after = 1


class EngineUnavailable(PluginError):
    """The engine at engine.url did not answer a call that only it can answer."""

    status = 503


class DiskFull(PluginError):
    status = 507


class RequestInterrupted(PluginError):
    """The worker was told to stop at once while serving a request; what it started was rolled back."""

    status = 503


def envelope(status: int, code: int, message: str, headers: dict[str, str] | None = None):
    """The JSON error response every refusal is sent as."""
    from flask import Response

    # Compact, with a trailing newline, as Go's http.Error writes eKuiper's envelope.
    body = json.dumps({"error": code, "message": message}, ensure_ascii=False, separators=(",", ":")) + "\n"
    return Response(body, status=status, mimetype="application/json", headers=headers)


def register_error_handlers(app) -> None:
    """Answer domain errors, HTTP errors and unexpected exceptions with the one envelope."""
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(PluginError)
    def plugin_error(exc: PluginError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RegistryUnavailable) else None
        return envelope(exc.status, exc.code, exc.message, headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = NOT_FOUND if exc.code == 404 else UNDEFINED_ERR
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return envelope(exc.code or 500, code, exc.description or exc.name, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error")
        return envelope(500, UNDEFINED_ERR, "internal server error; the service log has the details")
