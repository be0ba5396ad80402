"""Who may call the API: the Host/Origin allow-list, protected mode and JWT authentication.

Checked before any view runs, in this order, for every path (and, by our gunicorn worker, on a
request's head before its body is read: `AccessCheck`):
1. ``Host`` must name one of ``basic.allowedHosts`` (DNS rebinding: a page on
   ``evil.example`` whose name now resolves to 127.0.0.1 still sends
   ``Host: evil.example``); a browser's ``Origin``, when sent, too (a
   cross-site form or fetch carries the attacker's origin). 403.
2. ``/`` and ``/ping`` stay open past this point, as in eKuiper, so that
   supervisors can probe them; so do ``/openapi.json`` and ``/docs``.
3. With ``basic.authentication`` on, a valid JWT (`kuiper_plugins.web.auth`); 401.
   With it off: a client on a non-loopback address is refused while ``basic.protectedMode`` is on
   (403) and let in while it is off; a client on the loopback (or a Unix domain socket) is served only
   when the kernel names the user holding its end of the connection and that user is root, the
   service's own user or one in ``basic.allowedUsers`` (`kuiper_plugins.web.peers`); 403 otherwise.
   The address alone proves nothing: every local user can connect from 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import re
import socket
import weakref
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.wrappers import Request

from kuiper_plugins.errors import Forbidden, Unauthorized, envelope
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.web.auth import JwtAuthenticator, check_key_files
from kuiper_plugins.web.peers import PeerUnknown, owners, peer_of_socket

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/ping", "/openapi.json", "/docs"})
OPEN_PREFIXES = ("/docs/",)  # the API's description is no secret; a browser cannot send a JWT for it
WWW_AUTHENTICATE = 'Bearer realm="kuiper-plugins"'
EXTENSION = "kuiper_plugins.access"  # where the app keeps its AccessCheck, for the worker to find

# Where WSGI servers put the accepted connection: gunicorn, and werkzeug's development server.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
UNPRIVILEGED_CALLER = "kuiper_plugins.unprivileged_caller"  # environ key set by AccessCheck.check
# Also set by AccessCheck.check, for the audit trail (web/auditing.py): who the caller was found to be.
TOKEN_CLAIMS = "kuiper_plugins.token_claims"  # a JWT's verified claims
CALLER_UIDS = "kuiper_plugins.caller_uids"  # the uids the kernel names for a local caller
# Set by a server that may answer more requests on the same connection (our worker's kept answers).
PERSISTENT_CONNECTION = "kuiper_plugins.persistent_connection"
ANOTHER_WAY = "or turn on basic.authentication and send a JWT"

# A Host header or an Origin's authority: a name or IPv4 address, or a bracketed IPv6 address; an optional port.
_AUTHORITY = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")

Authenticate = Callable[[Request], object]


def host_of(authority: str) -> str | None:
    """The host of a Host header or Origin authority, lower-cased, without port or brackets; None if malformed."""
    match = _AUTHORITY.fullmatch(authority.strip())
    if match is None:
        return None
    return (match["ipv6"] or match["name"]).lower()


def is_loopback(address: str | None) -> bool:
    """Whether a client address is on this machine's loopback (an IPv4-mapped 127.x counts too)."""
    if not address:
        return False
    if address in ("127.0.0.1", "::1"):  # the usual answer, without parsing on every request
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class LocalCallers:
    """The local users served while authentication is off, and who holds the client's end of a connection.

    With the accepted socket in the WSGI environ (gunicorn, werkzeug), the connection's four-tuple is
    looked up exactly, or SO_PEERCRED read for a Unix domain socket. Where a connection may carry many
    requests (a threaded server's keep-alive, our worker's kept connections: PERSISTENT_CONNECTION),
    the answer is kept for as long as the socket lives: the kernel records a socket's owner when the
    socket is made, and only a privileged process (CAP_CHOWN) can give it to another user.
    Without the socket, REMOTE_ADDR and REMOTE_PORT as the server gives them name the client's end,
    and every live socket bound there must belong to an allowed user.
    """

    def __init__(self, allowed_uids: frozenset[int]):
        self.allowed_uids = allowed_uids
        self._known: weakref.WeakKeyDictionary[socket.socket, frozenset[int]] = weakref.WeakKeyDictionary()

    def check(self, environ: Mapping[str, Any]) -> frozenset[int]:
        """Return the caller's uids if the kernel names an allowed user; raise Forbidden otherwise."""
        try:
            uids = self.callers(environ)
        except PeerUnknown as exc:
            log.info("refused a local caller that could not be identified: %s", exc)
            raise Forbidden(
                f"the local caller could not be identified: {_shown(str(exc), 200)} (with basic.authentication off only"
                f" connections the kernel attributes to root, the service's user or basic.allowedUsers"
                f" are served; {ANOTHER_WAY})"
            ) from None
        if not uids <= self.allowed_uids:
            who = ", ".join(_user_shown(uid) for uid in sorted(uids - self.allowed_uids))
            log.info("refused local user %s: not in basic.allowedUsers", who)
            raise Forbidden(
                f"local user {who} may not call this service while basic.authentication is off"
                f" (add the user to basic.allowedUsers, {ANOTHER_WAY})"
            )
        return uids

    def callers(self, environ: Mapping[str, Any]) -> frozenset[int]:
        """The uids the kernel names for this request's connection; raise PeerUnknown when it cannot."""
        sock = connection_socket(environ)
        if sock is not None:
            if not (environ.get("wsgi.multithread") or environ.get(PERSISTENT_CONNECTION)):
                # One request on this connection: a cache entry would never be read again.
                return peer_of_socket(sock)
            uids = self._known.get(sock)
            if uids is None:
                uids = peer_of_socket(sock)
                self._known[sock] = uids
            return uids
        port = str(environ.get("REMOTE_PORT") or "")
        if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
            raise PeerUnknown("the server gave neither the connection nor the client's port")
        return owners((str(environ.get("REMOTE_ADDR") or ""), int(port)))


def connection_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The accepted socket the WSGI server put in the environ, if it did."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _user_shown(uid: int) -> str:
    try:
        return f"'{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def jwt_authentication(settings: Settings) -> Authenticate:
    """The authenticate hook for basic.authentication: a JWT checked against $KUIPER_HOME/etc/mgmt/.

    Raises UnsafeKeyFiles when users other than root and this service's could change those keys.
    """
    keys_dir = Layout.of(settings).mgmt_keys
    check_key_files(keys_dir)
    authenticator = JwtAuthenticator(keys_dir, max_lifetime=settings.max_token_lifetime)

    def authenticate(req: Request) -> object:
        # The header only: a token in the query string would end up in access logs and browser history.
        return authenticator.verify(req.headers.get("Authorization"))

    return authenticate


class AccessCheck:
    """The checks above, for one service's settings, on one request.

    The app runs them before every view. Our gunicorn worker runs the same object on a request's
    head, before it reads the body (`kuiper_plugins.web.gunicorn_worker`): a refused caller's body is
    then never buffered, and the answer is the one the app would give.
    """

    def __init__(self, settings: Settings, authenticate: Authenticate | None = None):
        if authenticate is None and settings.authentication:
            authenticate = jwt_authentication(settings)
        self.settings = settings
        self.allowed = settings.host_allow_list
        self.authenticate = authenticate
        self.local_callers = LocalCallers(settings.allowed_uids)

    def check(self, req: Request) -> bool:
        """Raise Forbidden or Unauthorized for a request the settings refuse; return whether its caller was checked.

        False is an open path (``/ping``, ``/docs``, ...): only Host and Origin were checked there.
        """
        # The Host header as sent: host_of checks it more strictly than werkzeug's request.host would.
        given = req.environ.get("HTTP_HOST") or ""
        host = host_of(given)
        if host is None or host not in self.allowed:
            raise Forbidden(f"host '{_shown(given)}' is not allowed; add it to basic.allowedHosts")
        origin = req.environ.get("HTTP_ORIGIN")
        if origin is not None:
            if origin.strip().lower() == "null":
                raise Forbidden("requests from an opaque origin are not allowed")
            parts = urlsplit(origin.strip())
            origin_host = host_of(parts.netloc) if parts.scheme in ("http", "https") else None
            if origin_host is None or origin_host not in self.allowed:
                raise Forbidden(f"origin '{_shown(origin)}' is not allowed; add its host to basic.allowedHosts")
        if req.path in OPEN_PATHS or req.path.startswith(OPEN_PREFIXES):
            return False
        if self.authenticate is not None:
            req.environ[TOKEN_CLAIMS] = self.authenticate(req)
            # A token's holder acts with the authority of whoever may place keys in etc/mgmt: root or the
            # service's user (start-up refuses keys anyone else could change).
            req.environ[UNPRIVILEGED_CALLER] = None
        elif is_loopback(req.remote_addr) or _on_unix_socket(req.environ):
            uids = req.environ[CALLER_UIDS] = self.local_callers.check(req.environ)
            others = sorted(uids - {0, os.geteuid()})
            req.environ[UNPRIVILEGED_CALLER] = ", ".join(f"local user {_user_shown(uid)}" for uid in others) or None
        elif self.settings.protected_mode:
            raise Forbidden(
                f"client {_shown(req.remote_addr or '')} refused: protected mode allows only loopback clients"
                " while authentication is off (turn on basic.authentication, or set basic.protectedMode to false)"
            )
        else:
            req.environ[UNPRIVILEGED_CALLER] = f"client {_shown(req.remote_addr or '')}, let in without a token"
        return True


def unprivileged_caller(environ: Mapping[str, Any]) -> str | None:
    """Who called, when that is neither root, this service's user, nor a token's holder; None otherwise.

    A package's install.sh runs as this service's user (root, as eKuiper runs it): it runs only for
    callers with that authority.
    """
    return environ.get(UNPRIVILEGED_CALLER, "a caller the access check did not name")


def refusal(exc: Forbidden | Unauthorized) -> Response:
    """The answer to a refused caller: the service's envelope, with a Bearer challenge on a 401."""
    headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if isinstance(exc, Unauthorized) else None
    return envelope(exc.status, exc.code, exc.message, headers)


def access_check_of(app: object) -> AccessCheck | None:
    """The AccessCheck an app built by `register_access_checks` runs; None for any other WSGI app."""
    extensions = getattr(app, "extensions", None)
    return extensions.get(EXTENSION) if isinstance(extensions, dict) else None


def register_access_checks(app: Flask, settings: Settings, authenticate: Authenticate | None = None) -> None:
    """Refuse requests from hosts, origins or clients the settings do not allow.

    With basic.authentication on and no `authenticate` given, JWT authentication is built here.
    """
    access = app.extensions[EXTENSION] = AccessCheck(settings, authenticate)

    @app.before_request
    def check_access():
        # The request object once: each use of the proxy looks the request up again.
        access.check(request._get_current_object())

    @app.errorhandler(Unauthorized)
    def unauthorized(exc: Unauthorized):
        return refusal(exc)


def _on_unix_socket(environ: Mapping[str, Any]) -> bool:
    sock = connection_socket(environ)
    return sock is not None and sock.family == getattr(socket, "AF_UNIX", None)


def _shown(text: str, limit: int = 100) -> str:
    """Printable ASCII only, bounded: header values are quoted back in messages and logs."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if " " <= c <= "~" and c != "'" else f"\\x{ord(c):02x}" if ord(c) <= 0xFF else "?" for c in text)
