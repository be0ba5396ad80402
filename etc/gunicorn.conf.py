"""gunicorn settings for kuiper-plugins: `gunicorn -c etc/gunicorn.conf.py wsgi:app`.

The bind address comes from the service settings (basic.restIp, basic.restPort);
WEB_CONCURRENCY sets the worker count. Workers must outlive the longest
install, a download plus install.sh, so the worker timeout is derived from them.
"""

import os
import sys

from kuiper_plugins.settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    sys.exit(f"kuiper-plugins: {exc}")

_host = f"[{_settings.rest_ip}]" if ":" in _settings.rest_ip else _settings.rest_ip
bind = [f"{_host}:{_settings.rest_port}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
timeout = int(_settings.download_timeout + _settings.install_script_timeout + 60)
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
