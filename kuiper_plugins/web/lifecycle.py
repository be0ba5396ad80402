"""Views of the home as a whole: verify it against the registry, repair it, back it up."""

from __future__ import annotations

import time

from flask import Blueprint, Response, request

from kuiper_plugins.lifecycle import backup, verify
from kuiper_plugins.web.access import unprivileged_caller
from kuiper_plugins.web.api import installer, json_response

lifecycle_bp = Blueprint("lifecycle", __name__)


@lifecycle_bp.get("/registry/verify")
def verify_home() -> Response:
    return json_response(verify.report(verify.verify(installer(), hashes=True)))


@lifecycle_bp.post("/registry/repair")
def repair_home() -> Response:
    return json_response(verify.repair(installer(), unprivileged_caller=unprivileged_caller(request.environ)))


@lifecycle_bp.get("/registry/backup")
def backup_home() -> Response:
    snapshot = backup.take_snapshot(installer())
    name = time.strftime("kuiper-plugins-%Y%m%dT%H%M%SZ.tar.gz", time.gmtime(snapshot.manifest["createdAt"]))
    response = Response(backup.stream(snapshot), mimetype="application/gzip")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    response.call_on_close(snapshot.remove)  # a client gone before the first chunk: the generator never ran
    return response
