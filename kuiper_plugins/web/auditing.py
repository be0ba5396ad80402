"""Request ids and the audit trail at the edge: the web layer knows the request, the caller and the answer.

Every request gets an id (the client's `X-Request-Id` when sane, see `lifecycle.audit`), held while it
is served so that each log line carries it, and echoed in the `X-Request-Id` response header.
Every write request, refused or not, is then logged and recorded by `lifecycle.audit`, with:

- the actor: a JWT's `iss` and `sub`; the local user the kernel names for the connection; the
  client's address. Behind a reverse proxy the connection's peer is the proxy, so its `X-Real-IP` is
  taken as the client's address, but only when the peer is on the loopback and the kernel says it is
  one of `basic.proxyUsers` (nginx's worker user): from anyone else the header is ignored, since any
  client could send it;
- the operation, plugin type and name, and the version before and after (read from the registry
  around the request, by a reader that sees every commit);
- the package's sha256 and URL (the request's, or the registry's for a delete);
- the status, outcome, error message and duration.

The row is skipped (the line is still logged) when the answer is a 503 or 507: the registry itself
could not be used, and writing to it again would make the caller wait once more.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import pwd
import socket
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from marshmallow import ValidationError

from kuiper_plugins.errors import InvalidRequest, PluginError
from kuiper_plugins.lifecycle import audit
from kuiper_plugins.store import db, registry
from kuiper_plugins.web.access import (
    CALLER_UIDS,
    EXTENSION,
    TOKEN_CLAIMS,
    AccessCheck,
    connection_socket,
    is_loopback,
)
from kuiper_plugins.web.peers import PeerUnknown
from kuiper_plugins.web.schemas import AuditQuerySchema, flatten_errors

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# The API's views, by the names their rows give; any other write (a 404, a new view) is named by its view or method.
OPERATIONS = {
    "plugins.create_plugin": "create",
    "plugins.update_plugin": "update",
    "plugins.delete_plugin": "delete",
    "plugins.register_functions": "register",
    "plugins.upload_file": "upload",
    "plugins.delete_upload": "delete upload",
    "plugins.rollback_plugin": "rollback",
    "lifecycle.repair_home": "repair",
    "config.apply_plugins": "apply plugin set",
}
UNAVAILABLE = (503, 507)  # the registry could not be used: no row (the log line remains)
MAX_CLAIM = 200

audit_bp = Blueprint("audit", __name__)
audit_query = AuditQuerySchema()


def register_request_ids(app: Flask) -> None:
    """Give each request an id, log and record each write request; call before the access checks are registered.

    The id must be set before the caller is checked, so that a refusal's log line carries it too.
    """
    settings = app.extensions["kuiper_plugins"].settings
    unknown = [entry for entry in settings.proxy_users if not _names_a_user(entry)]
    if unknown:
        log.warning("basic.proxyUsers names %s, unknown on this machine: X-Real-IP is not believed from them"
                    " (set it to the user nginx's workers run as)", ", ".join(unknown))

    @app.before_request
    def start_request() -> None:
        g.audit_started = time.monotonic()
        g.request_id = audit.request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.request_id_token = audit.current_request_id.set(g.request_id)
        g.audit_noted = {}
        if request.method not in READS:
            g.audit_before = _plugin_state(*_target())

    @app.after_request
    def finish_request(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id is None:  # a request that failed before start_request ran (none we know of)
            return response
        response.headers[REQUEST_ID_HEADER] = request_id
        if request.method not in READS:
            _audit(response, request_id)
        return response

    @app.teardown_request
    def end_request(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            audit.current_request_id.reset(token)


def _names_a_user(entry: str) -> bool:
    if entry.isdigit():
        return True
    try:
        pwd.getpwnam(entry)
    except KeyError:
        return False
    return True


def note(**fields: Any) -> None:
    """Tell the audit trail what only the view knows: the plugin name, URL and sha256 a body asked for."""
    noted = g.get("audit_noted")
    if noted is None:
        return
    noted.update({key: value for key, value in fields.items() if value})
    if fields.get("name") and g.get("audit_before") is None:
        # A create names its plugin in the body: what the registry holds under that name, before the install.
        g.audit_before = _plugin_state(_target()[0], fields["name"])


def _target() -> tuple[str | None, str | None]:
    """The plugin type and name the request's path names (a create's name is in its body: `note`)."""
    args = request.view_args or {}
    plugin_type = args.get("plugin_type")
    if request.endpoint == "plugins.register_functions":
        plugin_type = "functions"
    name = args.get("name") if plugin_type else None
    return plugin_type, name


def _plugin_state(plugin_type: str | None, name: str | None) -> registry.Plugin | None:
    """The plugin as the registry holds it now; None when there is none, or the registry cannot say."""
    if not plugin_type or not name:
        return None
    state = current_app.extensions["kuiper_plugins"]
    try:
        return registry.find(db.reader(state.layout.registry_file), plugin_type, name)
    except PluginError as exc:  # the request meets the same registry and answers for itself
        log.debug("audit: the registry could not say what %s %s was: %s", plugin_type, name, exc.message)
        return None


def _audit(response: Response, request_id: str) -> None:
    noted = g.get("audit_noted") or {}
    plugin_type, name = _target()
    name = name or noted.get("name")
    if name is not None:
        name = _printable(name)[:MAX_CLAIM]  # a refused create's body may name anything
    before = g.get("audit_before")
    after = _plugin_state(plugin_type, name) if response.status_code not in UNAVAILABLE else before
    # The package: the one now installed after a success; the one a refused request asked for (its body), else
    # the one it was about (a delete's).
    succeeded = 200 <= response.status_code < 300
    source = after if succeeded and after is not None else None if noted.get("url") else before
    recorded = (source.request or {}) if source is not None else {}
    sha256 = source.sha256 if source is not None else noted.get("sha256")
    entry = audit.Entry(
        request_id=request_id,
        method=request.method,
        path=_printable(request.path),
        operation=_operation(),
        status=response.status_code,
        duration=time.monotonic() - g.get("audit_started", time.monotonic()),
        actor=_actor(),
        plugin_type=plugin_type,
        name=name,
        version_before=before.version if before is not None else None,
        version_after=after.version if after is not None else None,
        sha256=sha256,
        url=recorded.get("file") or noted.get("url"),
        message=_error_message(response),
    )
    audit.log_entry(entry)
    if response.status_code in UNAVAILABLE:
        return
    state = current_app.extensions["kuiper_plugins"]
    try:
        with state.audit_writer.session() as conn:
            audit.record(conn, entry, state.settings.audit_retention)
    except PluginError as exc:
        log.warning("audit: the row of request %s could not be written (%s); its log line above stands",
                    request_id, exc.message)


def _operation() -> str:
    """What the request did, in a word or two; a dry run says so (it changed nothing)."""
    operation = OPERATIONS.get(request.endpoint or "", (request.endpoint or request.method.lower()).split(".")[-1])
    return f"{operation} (dry run)" if request.args.get("dryRun", "").lower() in ("1", "true") else operation


def _error_message(response: Response) -> str | None:
    """The message of an error answer (the service's envelope); None for a success."""
    if response.status_code < 400 or response.mimetype != "application/json" or response.is_streamed:
        return None
    body = response.get_json(silent=True)
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else None


# ------------------------------------------------------------------ who called


def _actor() -> audit.Actor:
    environ = request.environ
    claims = environ.get(TOKEN_CLAIMS)
    issuer = subject = None
    if isinstance(claims, dict):
        issuer = _claim(claims.get("iss"))
        subject = _claim(claims.get("sub"))
    address = request.remote_addr or None
    local = is_loopback(address) or _on_unix_socket(environ)
    uids = environ.get(CALLER_UIDS)
    if uids is None and local and (issuer is None or request.headers.get("X-Real-IP")):
        uids = _peer_uids(environ)
    forwarded = _forwarded_address(uids) if local else None
    if forwarded is not None:
        return audit.Actor(issuer=issuer, subject=subject, address=forwarded, proxy=_users(uids))
    user = _users(uids) if uids and issuer is None else None
    return audit.Actor(issuer=issuer, subject=subject, user=user, address=address)


def _peer_uids(environ: dict[str, Any]) -> frozenset[int] | None:
    """The uids the kernel names for a local connection the access check did not look up (or refused)."""
    access: AccessCheck | None = current_app.extensions.get(EXTENSION)
    if access is None:
        return None
    try:
        return access.local_callers.callers(environ)
    except PeerUnknown:
        return None


def _forwarded_address(uids: frozenset[int] | None) -> str | None:
    """The X-Real-IP header, when the connection comes from the trusted front (basic.proxyUsers) and is an address."""
    given = request.headers.get("X-Real-IP")
    if given is None:
        return None
    proxies = current_app.extensions["kuiper_plugins"].settings.proxy_uids
    if not uids or not proxies or not uids <= proxies:
        log.debug("audit: ignoring X-Real-IP from a peer that is not in basic.proxyUsers")
        return None
    try:
        return str(ipaddress.ip_address(given.strip()))
    except ValueError:
        log.info("audit: the front passed an X-Real-IP that is no address: %s", _printable(given)[:100])
        return None


def _on_unix_socket(environ: dict[str, Any]) -> bool:
    sock = connection_socket(environ)
    return sock is not None and sock.family == getattr(socket, "AF_UNIX", None)


def _users(uids: frozenset[int] | None) -> str | None:
    if not uids:
        return None
    names = []
    for uid in sorted(uids):
        try:
            names.append(pwd.getpwuid(uid).pw_name)
        except KeyError:
            names.append(f"uid {uid}")
    return ",".join(names)


def _claim(value: Any) -> str | None:
    """A claim as text, printable and bounded: it came from the token, whoever signed it."""
    if value is None:
        return None
    return _printable(value if isinstance(value, str) else str(value))[:MAX_CLAIM]


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" if ord(c) <= 0xFF else "?" for c in text)


# ------------------------------------------------------------------ GET /audit


@audit_bp.get("/audit")
def list_audit() -> Response:
    """The newest audit rows first: ?limit= (1-1000, default 100), ?since= (RFC 3339)."""
    repeated = sorted(key for key, values in request.args.lists() if len(values) > 1)
    if repeated:
        raise InvalidRequest(f"invalid audit query: {', '.join(repeated)} is given more than once")
    try:
        query = audit_query.load(request.args.to_dict())
    except ValidationError as exc:
        raise InvalidRequest(f"invalid audit query: {flatten_errors(exc.messages)}") from None
    since = query["since"].timestamp() if query["since"] is not None else None
    state = current_app.extensions["kuiper_plugins"]
    rows = audit.recent(db.reader(state.layout.registry_file), query["limit"], since)
    return Response(json.dumps(rows, separators=(",", ":"), ensure_ascii=False), mimetype="application/json")

