"""Who may call the API: the Host/Origin allow-list, protected mode and JWT authentication.

Checked before any view runs, in this order, for every path:
1. ``Host`` must name one of ``basic.allowedHosts`` (DNS rebinding: a page on
   ``evil.example`` whose name now resolves to 127.0.0.1 still sends
   ``Host: evil.example``); a browser's ``Origin``, when sent, too (a
   cross-site form or fetch carries the attacker's origin). 403.
2. ``/`` and ``/ping`` stay open past this point, as in eKuiper, so that
   supervisors can probe them; so do ``/openapi.json`` and ``/docs``.
3. With ``basic.authentication`` on, a valid JWT (`kuiper_plugins.web.auth`); 401.
   With it off and ``basic.protectedMode`` on, only loopback clients; 403.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import Flask, Request, request

from kuiper_plugins.errors import Forbidden, Unauthorized, envelope
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings
from kuiper_plugins.web.auth import JwtAuthenticator

OPEN_PATHS = frozenset({"/", "/ping", "/openapi.json", "/docs"})
OPEN_PREFIXES = ("/docs/",)  # the API's description is no secret; a browser cannot send a JWT for it
WWW_AUTHENTICATE = 'Bearer realm="kuiper-plugins"'

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


def jwt_authentication(settings: Settings) -> Authenticate:
    """The authenticate hook for basic.authentication: a JWT checked against $KUIPER_HOME/etc/mgmt/."""
    authenticator = JwtAuthenticator(Layout.of(settings).mgmt_keys)

    def authenticate(req: Request) -> object:
        # The header only: a token in the query string would end up in access logs and browser history.
        return authenticator.verify(req.headers.get("Authorization"))

    return authenticate


def register_access_checks(app: Flask, settings: Settings, authenticate: Authenticate | None = None) -> None:
    """Refuse requests from hosts, origins or clients the settings do not allow.

    With basic.authentication on and no `authenticate` given, JWT authentication is built here.
    """
    allowed = settings.host_allow_list
    if authenticate is None and settings.authentication:
        authenticate = jwt_authentication(settings)

    @app.before_request
    def check_access():
        host = host_of(request.host or "")
        if host is None or host not in allowed:
            raise Forbidden(f"host '{_shown(request.host or '')}' is not allowed; add it to basic.allowedHosts")
        origin = request.headers.get("Origin")
        if origin is not None:
            if origin.strip().lower() == "null":
                raise Forbidden("requests from an opaque origin are not allowed")
            parts = urlsplit(origin.strip())
            origin_host = host_of(parts.netloc) if parts.scheme in ("http", "https") else None
            if origin_host is None or origin_host not in allowed:
                raise Forbidden(f"origin '{_shown(origin)}' is not allowed; add its host to basic.allowedHosts")
        if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return None
        if authenticate is not None:
            authenticate(request)
        elif settings.protected_mode and not is_loopback(request.remote_addr):
            raise Forbidden(
                f"client {_shown(request.remote_addr or '')} refused: protected mode allows only loopback clients"
                " while authentication is off (turn on basic.authentication, or set basic.protectedMode to false)"
            )
        return None

    @app.errorhandler(Unauthorized)
    def unauthorized(exc: Unauthorized):
        return envelope(exc.status, exc.code, exc.message, {"WWW-Authenticate": WWW_AUTHENTICATE})


def _shown(text: str, limit: int = 100) -> str:
    """Printable ASCII only, bounded: header values are quoted back in messages and logs."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if " " <= c <= "~" and c != "'" else f"\\x{ord(c):02x}" if ord(c) <= 0xFF else "?" for c in text)
