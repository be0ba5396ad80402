"""gunicorn settings for kuiper-plugins: `gunicorn -c etc/gunicorn.conf.py wsgi:app`.

The bind address comes from the service settings (basic.restIp, basic.restPort);
WEB_CONCURRENCY sets the worker count. A sync worker is killed when one request
outlasts `timeout`, so the timeout is derived from the longest install: the
download and install.sh at their limits, plus OVERHEAD_SECONDS for the rest
(waits on a busy registry at the reservation and the commit, killing and
reaping install.sh's processes, unpacking up to maxUnpackedSize). SIGTERM is a
graceful stop that waits as long for installs in flight to finish. SIGINT or
SIGQUIT stop at once (and a worker past its timeout is aborted): the request in
flight is interrupted, rolls back what it started and answers 503, instead of
gunicorn's SystemExit and 500.
A registry that cannot be used (corrupt file) stops start-up with one clear
line instead of being served; the file is left as it is.
"""

import os
import sys

from kuiper_plugins.errors import PluginError
from kuiper_plugins.settings import SettingsError, load_settings

OVERHEAD_SECONDS = 120
WORKER_BOOT_ERROR = 3  # gunicorn's exit status for "worker failed to boot": the master stops, no respawn loop

try:
    _settings = load_settings()
except SettingsError as exc:
    sys.exit(f"kuiper-plugins: {exc}")

_host = f"[{_settings.rest_ip}]" if ":" in _settings.rest_ip else _settings.rest_ip
bind = [f"{_host}:{_settings.rest_port}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
timeout = int(_settings.download_timeout + _settings.install_script_timeout + OVERHEAD_SECONDS)
graceful_timeout = timeout
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("KUIPER_PLUGINS_LOG_LEVEL", "info")
raw_env = ["KUIPER_PLUGINS_SERVER=gunicorn"]
# gunicorn 23+ opens a control socket in ~/.gunicorn; several instances on one box would share it.
control_socket_disable = True
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
    },
}


class RequestInterrupted(PluginError):
    """The worker was told to stop at once while serving a request."""

    status = 503


def _registry_problem() -> str | None:
    """Why the registry cannot be used (corrupt, too new), read-only and without writing; None when it can."""
    from kuiper_plugins import db
    from kuiper_plugins.layout import Layout

    try:
        db.check(Layout(_settings.home).registry_file)
    except PluginError as exc:
        return exc.message
    return None


def on_starting(server):
    """In the master, before any worker is forked (the check's connection is closed by then)."""
    problem = _registry_problem()
    if problem:
        sys.exit(f"kuiper-plugins cannot start: {problem}")


def post_fork(server, worker):
    """In each new worker, before the app loads: a registry that went bad since start stops the service."""
    problem = _registry_problem()
    if problem:
        server.log.error("kuiper-plugins cannot start: %s", problem)
        sys.exit(WORKER_BOOT_ERROR)


def pre_request(worker, req):
    worker.log.debug("%s %s", req.method, req.path)
    worker.kuiper_request_in_flight = True


def post_request(worker, req, environ, resp):
    worker.kuiper_request_in_flight = False


def worker_int(worker):
    """SIGINT or SIGQUIT in a worker: interrupt the request in flight (see `_interrupt`)."""
    _interrupt(worker, "the service is stopping")


def worker_abort(worker):
    """SIGABRT, sent by the master to a worker past its timeout: interrupt the request in flight."""
    _interrupt(worker, "the request outlasted the worker timeout")


def _interrupt(worker, reason: str) -> None:
    """Raise, from the signal handler, into the request being served, if there is one.

    The installer undoes what the operation started as the exception unwinds it (whatever it cannot
    finish, start-up recovery does), the client gets a 503, and the worker, no longer alive, exits
    after answering. With no request in flight, gunicorn's own exit goes ahead.
    """
    if getattr(worker, "kuiper_request_in_flight", False):
        worker.kuiper_request_in_flight = False
        raise RequestInterrupted(f"{reason}: the request was interrupted and nothing it started is kept")
