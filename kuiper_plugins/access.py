"""Who may call the API: the Host/Origin allow-list, protected mode and JWT authentication.

`/` and `/ping` stay open to everyone, as in eKuiper, so supervisors can probe them.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from flask import Flask, request

from kuiper_plugins.errors import Forbidden
from kuiper_plugins.settings import Settings

OPEN_PATHS = frozenset({"/", "/ping"})


def _host_part(value: str) -> str:
    """The host of a Host header or Origin netloc, without port or IPv6 brackets, lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


def register_access_checks(app: Flask, settings: Settings, authenticate=None) -> None:
    """Refuse requests from hosts, origins or clients the settings do not allow."""
    allowed = settings.host_allow_list

    @app.before_request
    def check_access():
        host = _host_part(request.host or "")
        if host not in allowed:
            raise Forbidden(f"host '{host}' is not allowed; add it to basic.allowedHosts")
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null":
            origin_host = _host_part(urlsplit(origin).netloc)
            if origin_host not in allowed:
                raise Forbidden(f"origin '{origin}' is not allowed; add its host to basic.allowedHosts")
        elif origin == "null":
            raise Forbidden("requests from an opaque origin are not allowed")
        if request.path in OPEN_PATHS:
            return None
        if authenticate is not None:
            authenticate(request)
        elif settings.protected_mode and not _is_loopback(request.remote_addr):
            raise Forbidden(
                f"client {request.remote_addr} refused: protected mode allows only loopback clients while"
                " authentication is off (turn on basic.authentication, or set basic.protectedMode to false)"
            )
        return None
