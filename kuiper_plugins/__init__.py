"""kuiper-plugins: eKuiper's plugin-management REST API as a Flask service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from flask import Flask


def create_app(settings: Any = None, stop_service: Any = None) -> Flask:
    """Build the application (see kuiper_plugins.app); imported lazily so the CLI starts without Flask."""
    from kuiper_plugins.app import create_app as build

    return build(settings, stop_service)
