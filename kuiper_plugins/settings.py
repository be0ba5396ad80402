"""Settings: the repository's etc/kuiper.yaml < $KUIPER_HOME/etc/kuiper.yaml < KUIPER__SECTION__KEY.

Keys keep eKuiper's names (``basic.restPort``); sections and keys are matched
case-insensitively, as eKuiper's loader does, and keys this service does not
use are ignored so that an eKuiper installation's own kuiper.yaml can be read.
A value of the wrong type stops start-up with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kuiper_plugins.engine.portable import parse_duration
from kuiper_plugins.found_files import read_regular
from kuiper_plugins.install.fetch import parse_allow_list

DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "etc" / "kuiper.yaml"
ENV_PREFIX = "KUIPER__"
SETTINGS_FILE_MAX_BYTES = 4 * 1024 * 1024  # eKuiper's kuiper.yaml is a few KiB; a settings file is never read unbounded
# Where eKuiper's three folders go when not under KUIPER_HOME, as its -etc, -data and -plugins flags place them.
FOLDER_VARIABLES = (("etc", "KUIPER_ETC_DIR"), ("data", "KUIPER_DATA_DIR"), ("plugins", "KUIPER_PLUGINS_DIR"))


class SettingsError(ValueError):
    """A configuration value is missing its right type or range; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from configuration, already checked."""

    home: Path
    etc_dir: Path | None = None  # KUIPER_ETC_DIR; default <home>/etc
    data_dir: Path | None = None  # KUIPER_DATA_DIR; default <home>/data
    plugins_dir: Path | None = None  # KUIPER_PLUGINS_DIR; default <home>/plugins
    rest_ip: str = "127.0.0.1"
    rest_port: int = 9081
    plugin_hosts: tuple[str, ...] = ("https://packages.emqx.io",)
    enable_private_net: bool = False
    private_net_allow_list: tuple[str, ...] = ()
    allow_external_file_access: bool = False
    authentication: bool = False
    max_token_lifetime: int = 86400  # basic.maxTokenLifetime: seconds a JWT may live; 0: no limit
    max_plugin_size: int = 512 * 1024 * 1024
    max_unpacked_size: int = 2 * 1024 * 1024 * 1024
    max_archive_entries: int = 10000
    install_script_timeout: float = 300
    download_timeout: float = 300
    tls_verify: bool = True
    kuiper_version: str = "2.4.0"
    install_scripts: bool = True
    protected_mode: bool = True
    allowed_hosts: tuple[str, ...] = ()
    engine_url: str | None = None  # engine.url: the running engine's REST base
    engine_token: str | None = None  # engine.token: a JWT the engine accepts
    engine_binary: Path | None = None  # engine.binary: the managed kuiperd, for the native compatibility check
    engine_restart_command: tuple[str, ...] = ()  # engine.restartCommand: run after DELETE ...?stop=1
    engine_restart_timeout: float = 60  # engine.restartTimeout: seconds restartCommand may take
    store_type: str = "sqlite"  # eKuiper's store.type
    store_sqlite_name: str | None = None  # eKuiper's store.sqlite.name
    portable_python_bin: str = "python"  # eKuiper's portable.pythonBin
    portable_init_timeout: float = 60  # eKuiper's portable.initTimeout, in seconds
    portable_verify_on_install: bool = True  # portable.verifyOnInstall (ours): start it, await its handshake
    allowed_users: tuple[str, ...] = ()
    prebuild: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "sources": ("random", "zmq", "sql", "video", "kafka"),
            "sinks": ("image", "influx", "influx2", "zmq", "kafka", "sql"),
            "functions": (
                "accumulateWordCount", "countPlusOne", "echo", "geohash", "image", "labelImage", "tfLite",
            ),
        }
    )

    def with_overrides(self, **changes: Any) -> Settings:
        """Return a copy with some fields replaced (tests and tools use this)."""
        return dataclasses.replace(self, **changes)

    @property
    def host_allow_list(self) -> frozenset[str]:
        """Host header values accepted: the configured ones, or the loopback names plus restIp."""
        hosts = self.allowed_hosts or ("localhost", "127.0.0.1", "::1", self.rest_ip)
        return frozenset(h.strip().lower().strip("[]") for h in hosts if h.strip())

    @property
    def allowed_uids(self) -> frozenset[int]:
        """The uids served with authentication off: root, this process's own, and basic.allowedUsers."""
        try:
            return frozenset({0, os.geteuid(), *(user_id(entry) for entry in self.allowed_users)})
        except ValueError as exc:
            raise SettingsError(f"invalid value for basic.allowedUsers: {exc}") from None


MAX_UID = 0xFFFFFFFE  # (uid_t)-1 means "no user" to the kernel


def user_id(entry: str) -> int:
    """The uid a basic.allowedUsers entry names: a number as it is, a name looked up in the user database."""
    text = str(entry).strip()
    if text.isdigit():
        if int(text) > MAX_UID:
            raise ValueError(f"uid {text} is out of range")
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no user named {text!r} on this machine") from None


# eKuiper key (lower-cased) in section `basic` -> (field name, parser)
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("expected true or false")


def _int(minimum: int, maximum: int | None = None):
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"expected at least {minimum}{upper}")
        return value

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of seconds")
    if not 0 < value <= 86400:
        raise ValueError("expected more than 0 and at most 86400 seconds")
    return float(value)


def _token_lifetime(value: Any) -> int:
    """basic.maxTokenLifetime: whole seconds, as the other basic.* durations are written; 0 turns the limit off."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number of seconds (86400 for 24 hours), or 0 for no limit")
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
        raise ValueError("expected a non-empty text")
    return str(value).strip()


def _ip(value: Any) -> str:
    text = _text(value)
    ipaddress.ip_address(text)  # raises ValueError with a clear message
    return text


def _list(value: Any) -> tuple[str, ...]:
    """Accept a YAML list, a comma-separated text, or eKuiper's env form `[a,b]`."""
    if isinstance(value, list | tuple):
        items = value
    elif isinstance(value, str):
        items = value.strip().removeprefix("[").removesuffix("]").split(",")
    else:
        raise ValueError("expected a list or a comma-separated text")
    out = []
    for item in items:
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise ValueError(f"unexpected item {item!r}")
        if str(item).strip():
            out.append(str(item).strip())
    return tuple(out)


def _hosts(value: Any) -> tuple[str, ...]:
    hosts = tuple(h.rstrip("/") for h in _list(value))
    if not hosts:
        raise ValueError("expected at least one http(s) URL")
    for host in hosts:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{host!r} is not an http(s) URL")
    return hosts


def _allow_list(value: Any) -> tuple[str, ...]:
    entries = _list(value)
    parse_allow_list(entries)
    return entries


def _users(value: Any) -> tuple[str, ...]:
    if isinstance(value, int) and not isinstance(value, bool):  # one uid, from YAML or an environment variable
        value = str(value)
    entries = _list(value)
    for entry in entries:
        user_id(entry)
    return entries


BASIC_KEYS: dict[str, tuple[str, Any]] = {
    "restip": ("rest_ip", _ip),
    "restport": ("rest_port", _int(1, 65535)),
    "pluginhosts": ("plugin_hosts", _hosts),
    "enableprivatenet": ("enable_private_net", _bool),
    "privatenetallowlist": ("private_net_allow_list", _allow_list),
    "allowexternalfileaccess": ("allow_external_file_access", _bool),
    "authentication": ("authentication", _bool),
    "maxtokenlifetime": ("max_token_lifetime", _token_lifetime),
    "maxpluginsize": ("max_plugin_size", _int(1)),
    "maxunpackedsize": ("max_unpacked_size", _int(1)),
    "maxarchiveentries": ("max_archive_entries", _int(1)),
    "installscripttimeout": ("install_script_timeout", _seconds),
    "downloadtimeout": ("download_timeout", _seconds),
    "tlsverify": ("tls_verify", _bool),
    "kuiperversion": ("kuiper_version", _text),
    "installscripts": ("install_scripts", _bool),
    "protectedmode": ("protected_mode", _bool),
    "allowedhosts": ("allowed_hosts", _list),
    "allowedusers": ("allowed_users", _users),
}
PREBUILD_TYPES = ("sources", "sinks", "functions")

def _init_timeout(value: Any) -> float:
    """portable.initTimeout, read as eKuiper reads it (Go's time.ParseDuration; a number is milliseconds)."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None  # its message names the key already


def _url(value: Any) -> str:
    text = _text(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


def _optional_text(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value)


def _optional_path(value: Any) -> Path | None:
    text = _optional_text(value)
    return Path(text) if text else None


def _command(value: Any) -> tuple[str, ...]:
    """An argument list (never a shell string): a YAML list, or `[a,b]` from the environment."""
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if not text.startswith("["):
            raise ValueError('expected an argument list, e.g. ["systemctl", "restart", "kuiper"]')
        try:
            value = json.loads(text)  # a JSON list keeps commas and quotes inside arguments
        except ValueError:
            pass  # eKuiper's own [a,b] form
    return _list(value)


def _engine_binary(value: Any) -> Path | None:
    """engine.binary: a kuiperd that can load plugins; anything else stops start-up, naming the key."""
    from kuiper_plugins.engine.compat import read_engine  # compat reads SettingsError from here

    path = _optional_path(value)
    if path is not None:
        read_engine(path)  # raises UnusableEngine, which says why
    return path


def _store_type(value: Any) -> str:
    from kuiper_plugins.engine.kv import check_store_type  # kv reads SettingsError from here

    text = _text(value)
    check_store_type(text)  # stops start-up with one line naming store.type and what is supported
    return text


SECTION_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "engine": {
        "url": ("engine_url", lambda v: _url(v) if _optional_text(v) else None),
        "token": ("engine_token", _optional_text),
        "binary": ("engine_binary", _engine_binary),
        "restartcommand": ("engine_restart_command", _command),
        "restarttimeout": ("engine_restart_timeout", _seconds),
    },
    "store": {
        "type": ("store_type", _store_type),
        "sqlite.name": ("store_sqlite_name", _optional_text),
    },
    "portable": {
        "pythonbin": ("portable_python_bin", _text),
        "inittimeout": ("portable_init_timeout", _init_timeout),
        "verifyoninstall": ("portable_verify_on_install", _bool),
    },
}


def parse_env_value(text: str) -> Any:
    """Type an environment value as eKuiper does: int, then bool, then float, else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _read_yaml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        # The engine's file may be a link (a mounted ConfigMap), but never a FIFO that holds start-up.
        data = yaml.safe_load(read_regular(path, SETTINGS_FILE_MAX_BYTES, follow_links=True).decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections")
    return _fold(data, str(path))


def _fold(data: Mapping[Any, Any], origin: str) -> dict[str, dict[str, Any]]:
    """Lower-case section and key names; keep the values."""
    folded: dict[str, dict[str, Any]] = {}
    for section, keys in data.items():
        if keys is None:
            continue
        if not isinstance(keys, dict):
            raise SettingsError(f"{origin}: section {section!r} must be a mapping")
        target = folded.setdefault(str(section).lower(), {})
        for key, value in _flat(keys):
            target[key.lower()] = (value, f"{section}.{key}")
    return folded


def _flat(keys: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested keys as dotted names (eKuiper's `store.sqlite.name`)."""
    out = []
    for key, value in keys.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flat(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].split("__")
        if len(parts) < 2 or not all(parts):
            continue
        section, key = parts[0].lower(), ".".join(parts[1:]).lower()
        layer.setdefault(section, {})[key] = (parse_env_value(text), name)
    return layer


def load_settings(environ: Mapping[str, str] | None = None, defaults_file: Path = DEFAULTS_FILE) -> Settings:
    """Build the settings from the three layers; raise SettingsError naming the first bad key."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get("KUIPER_HOME") or environ.get("KuiperBaseKey") or "var").resolve()
    folders = {
        f"{name}_dir": Path(environ[variable]).resolve() if environ.get(variable) else None
        for name, variable in FOLDER_VARIABLES
    }
    etc = folders["etc_dir"] or home / "etc"
    merged: dict[str, dict[str, Any]] = {}
    for layer in (_read_yaml(defaults_file), _read_yaml(etc / "kuiper.yaml"), _env_layer(environ)):
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)

    values: dict[str, Any] = {}
    for key, (raw, origin) in merged.get("basic", {}).items():
        if key not in BASIC_KEYS:
            continue
        field_name, parse = BASIC_KEYS[key]
        values[field_name] = _parse(parse, raw, origin)
    for section, keys in SECTION_KEYS.items():
        for key, (raw, origin) in merged.get(section, {}).items():
            if key in keys:
                field_name, parse = keys[key]
                values[field_name] = _parse(parse, raw, origin)
    prebuild = dict(Settings.__dataclass_fields__["prebuild"].default_factory())
    for key, (raw, origin) in merged.get("prebuild", {}).items():
        if key in PREBUILD_TYPES:
            prebuild[key] = _parse(_list, raw, origin)
    return Settings(home=home, prebuild=prebuild, **folders, **values)


def _parse(parse, raw: Any, origin: str) -> Any:
    try:
        return parse(raw)
    except SettingsError:
        raise  # already names its key
    except ValueError as exc:
        raise SettingsError(f"invalid value {raw!r} for {origin}: {exc}") from None
