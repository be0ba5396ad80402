"""The application factory: settings, layout, registry, start-up recovery, blueprints, error handlers."""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask

from kuiper_plugins import __version__
from kuiper_plugins.engine import restart
from kuiper_plugins.engine.client import EngineClient
from kuiper_plugins.engine.pending import PendingCount
from kuiper_plugins.engine.sync import EngineSync
from kuiper_plugins.errors import register_error_handlers
from kuiper_plugins.install import scripts
from kuiper_plugins.install.installer import Installer, recover_home
from kuiper_plugins.layout import Layout
from kuiper_plugins.lifecycle import backup, verify
from kuiper_plugins.settings import Settings, load_settings
from kuiper_plugins.store import db
from kuiper_plugins.web.access import register_access_checks
from kuiper_plugins.web.auth import check_key_files
from kuiper_plugins.web.fast_reads import FastReads, register_fast_reads
from kuiper_plugins.web.uploads import Uploads

MAX_JSON_BODY = 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """What the views need, built once per process by create_app."""

    settings: Settings
    layout: Layout
    installer: Installer
    uploads: Uploads
    started_at: float
    stop_service: Callable[[], None]
    restart_engine: Callable[[], object] | None = None
    engine: EngineClient | None = None
    engine_sync: EngineSync | None = None  # started in each gunicorn worker (gunicorn_hooks.post_worker_init)
    audit_writer: db.KeptWriter | None = None  # the audit trail's connection (web/auditing.py)
    fast_reads: FastReads | None = None  # answers kept until the next commit (web/fast_reads.py)
    service_lock: int | None = None  # a descriptor held shared while this app lives: an offline restore refuses
    pending: PendingCount = field(default_factory=PendingCount)  # GET /'s engine.pendingRestart (engine/pending.py)


class _Flask(Flask):
    """Flask, minus the check for coroutines on every call of a view or hook: none of ours is async."""

    def ensure_sync(self, func: Callable) -> Callable:
        return func


def stop_gunicorn() -> None:
    """Stop the whole service as eKuiper exits: SIGTERM to the gunicorn master, or to this process alone."""
    master = os.getppid()
    target = master if os.environ.get("KUIPER_PLUGINS_SERVER") == "gunicorn" else os.getpid()
    log.warning("stopping the service (signal to pid %d) as a delete with stop=1 asked", target)
    os.kill(target, signal.SIGTERM)


def _engine_restarter(settings: Settings) -> Callable[[], object] | None:
    """What ?stop=1 runs when engine.restartCommand is set: that command, after the response."""
    if not settings.engine_restart_command:
        return None
    command, timeout = settings.engine_restart_command, settings.engine_restart_timeout
    return lambda: restart.restart_in_background(command, timeout)


def create_app(settings: Settings | None = None, stop_service: Callable[[], None] | None = None) -> Flask:
    """Build the application: settings, layout, registry, start-up recovery, blueprint, error handlers."""
    settings = settings or load_settings()
    layout = Layout.of(settings)
    if settings.authentication:
        check_key_files(layout.mgmt_keys)  # before anything is written; raises UnsafeKeyFiles
    engine = EngineClient(settings.engine_url, settings.engine_token) if settings.engine_url else None
    installer = recover_home(settings, engine)
    service_lock = backup.hold_service_lock(layout)
    backup.sweep_snapshots(layout)
    if installer.damaged_at_recovery is not None:
        verify.warn_damaged(installer.damaged_at_recovery)  # sizes only: one warning per damaged plugin
    uploads = Uploads(layout.uploads, layout.incoming, settings.max_plugin_size)
    uploads.sweep()
    if settings.install_scripts:
        scripts.confinement()  # probed and logged once per process: whether install.sh can be confined

    app = _Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_JSON_BODY
    # "//" in a path (a %2F in a name) must not become an HTML 308 redirect: no route matches, a JSON 404.
    app.url_map.merge_slashes = False
    app.json.sort_keys = False
    app.extensions["kuiper_plugins"] = Services(
        settings=settings, layout=layout, installer=installer, started_at=time.time(),
        uploads=uploads,
        stop_service=stop_service or stop_gunicorn,
        restart_engine=_engine_restarter(settings),
        engine=engine,
        service_lock=service_lock,
        engine_sync=EngineSync(installer, engine, settings.engine_sync_interval) if engine is not None else None,
        audit_writer=db.KeptWriter(layout.registry_file),
        fast_reads=FastReads(layout.registry_file),
    )
    from kuiper_plugins.web.api import bp
    from kuiper_plugins.web.auditing import audit_bp, register_request_ids
    from kuiper_plugins.web.config import config_bp
    from kuiper_plugins.web.lifecycle import lifecycle_bp
    from kuiper_plugins.web.openapi import docs_bp
    from kuiper_plugins.web.operations import operations_bp, register_progress

    # Before the request ids: its after-request hook then runs last, and keeps the answer as sent.
    register_fast_reads(app, app.extensions["kuiper_plugins"].fast_reads)
    register_request_ids(app)  # a request refused by the access checks has its id and row too
    register_access_checks(app, settings)
    register_progress(app, layout.work)  # after the checks: a refused caller records no progress
    app.register_blueprint(bp)
    app.register_blueprint(audit_bp)
    app.register_blueprint(lifecycle_bp)
    app.register_blueprint(config_bp)
    app.register_blueprint(docs_bp)
    app.register_blueprint(operations_bp)
    register_error_handlers(app)
    weakref.finalize(app, os.close, service_lock)  # an app dropped in-process (tests) lets go of the lock
    log_serving(settings)
    return app


def log_serving(settings: Settings) -> None:
    """Say that this process serves the home: once its app is built, and in each gunicorn worker as it starts."""
    log.info("kuiper-plugins %s serving KUIPER_HOME %s", __version__, settings.home)


def settle_home(services: Services) -> None:
    """Undo what a worker that died left (its operation, snapshot, upload), as building the app does.

    Each gunicorn worker runs it as it starts, before it serves: the app is built once, in the master, but a
    worker replacing one that was killed must first roll back what that one had under way.
    """
    services.installer.recover()
    backup.sweep_snapshots(services.layout)
    services.uploads.sweep()
