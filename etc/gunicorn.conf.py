"""gunicorn settings for kuiper-plugins: `gunicorn -c etc/gunicorn.conf.py wsgi:app`.

The bind address comes from the service settings (basic.restIp, basic.restPort: 9081 standalone, 9091
beside an engine whose kuiper.yaml is in the etc folder; never the engine's port, which stops start-up);
WEB_CONCURRENCY sets the worker count. The worker class is our own
(kuiper_plugins/web/gunicorn_worker.py): gunicorn's sync worker, fed only requests that have fully
arrived, so that slow or idle clients cannot hold a worker (docs/deployment.md says why this one).
A worker is killed when one request outlasts `timeout`, so the timeout is
the request timeout of docs/deployment.md ("Timeouts: one formula"): the download, install.sh and a portable
plugin's handshake at their limits, plus OVERHEAD_SECONDS for the rest. nginx's proxy timeouts and systemd's
TimeoutStopSec are derived from it there. SIGTERM is a
graceful stop that waits as long for installs in flight to finish. SIGINT or
SIGQUIT stop at once (and a worker past its timeout is aborted): the request in
flight is interrupted, rolls back what it started and answers 503, instead of
gunicorn's SystemExit and 500.
A registry that cannot be used (corrupt file) stops start-up with one clear
line instead of being served; the file is left as it is. So do, with
basic.authentication on, JWT keys in etc/mgmt that users other than root and
the service's could change. The hooks doing that live in
kuiper_plugins/web/gunicorn_hooks.py.
"""

import os
import sys

from kuiper_plugins.settings import SettingsError, load_settings
from kuiper_plugins.web.gunicorn_hooks import (  # noqa: F401  (gunicorn reads these names from this file)
    on_reload,
    on_starting,
    post_fork,
    post_request,
    post_worker_init,
    pre_fork,
    pre_request,
    worker_abort,
    worker_int,
)

OVERHEAD_SECONDS = 120

try:
    _settings = load_settings()
except SettingsError as exc:
    sys.exit(f"kuiper-plugins: {exc}")

_host = f"[{_settings.rest_ip}]" if ":" in _settings.rest_ip else _settings.rest_ip
bind = [f"{_host}:{_settings.rest_port}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "kuiper_plugins.web.gunicorn_worker.BufferingWorker"
# Connections one worker holds while their requests arrive (idle and slow ones included); at that number it
# closes the oldest still without a whole head for each new one. The worker raises its open-files limit to fit.
worker_connections = 4096
# A portable install also starts the plugin and waits, at most portable.initTimeout (and 15 s to set it up), for
# its handshake.
_handshake = _settings.portable_init_timeout + 15 if _settings.portable_verify_on_install else 0
timeout = int(_settings.download_timeout + _settings.install_script_timeout + _handshake + OVERHEAD_SECONDS)
graceful_timeout = timeout
accesslog = "-"
# gunicorn's own line, with the request id the service answered in X-Request-Id (kuiper_plugins/web/auditing.py).
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" request_id=%({x-request-id}o)s'
errorlog = "-"
loglevel = os.environ.get("KUIPER_PLUGINS_LOG_LEVEL", "info")
raw_env = ["KUIPER_PLUGINS_SERVER=gunicorn"]
# gunicorn 23+ opens a control socket in ~/.gunicorn; several instances on one box would share it.
control_socket_disable = True
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    # Each line logged while a request is served ends with its id (lifecycle/audit.py: RequestIdFilter).
    "filters": {"request_id": {"()": "kuiper_plugins.lifecycle.audit.RequestIdFilter"}},
    "formatters": {"plain": {
        "class": "kuiper_plugins.lifecycle.audit.LineFormatter",
        "format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s%(request_id)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr",
                            "filters": ["request_id"]}},
    "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
    },
}
