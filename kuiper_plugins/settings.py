"""Settings: the repository's etc/kuiper-plugins.yaml < <etc>/kuiper-plugins.yaml < KUIPER_PLUGINS__SECTION__KEY.

The service's own settings never share a name with the engine's: the two run
side by side on one home, often with one environment. Keys keep eKuiper's
names (``basic.restPort``); sections and keys are matched case-insensitively,
as eKuiper's loader does, and keys this service does not use are ignored. A
value of the wrong type stops start-up with a message naming the key.

The engine's own configuration, ``<etc>/kuiper.yaml`` overlaid with eKuiper's
``KUIPER__SECTION__KEY`` variables (the engine honours them, so they are its
truth), is read only for facts about the engine, and only when that file is
there: its ``restIp``/``restPort`` (where to reach it, ``engine.url`` when that
is not set, and a port this service must not take), and its ``store.*`` and
``portable.pythonBin``/``initTimeout``, which take the place of the
repository's defaults (this service's own files and variables still win).
Beside an engine the service listens on 9091 unless told otherwise, never on
the engine's port.
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

SETTINGS_FILE = "kuiper-plugins.yaml"  # this service's own, in the repository's etc (defaults) and in <etc>
DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "etc" / SETTINGS_FILE
ENV_PREFIX = "KUIPER_PLUGINS__"  # KUIPER_PLUGINS_LOG_LEVEL and the like (one underscore) are not settings
ENGINE_FILE = "kuiper.yaml"  # the engine's own, in <etc>
ENGINE_ENV_PREFIX = "KUIPER__"  # the engine's own variables, which override its file
SETTINGS_FILE_MAX_BYTES = 4 * 1024 * 1024  # eKuiper's kuiper.yaml is a few KiB; a settings file is never read unbounded
STANDALONE_PORT = 9081  # eKuiper's port, where clients look for the plugin API when no engine is here
BESIDE_ENGINE_PORT = 9091  # never the engine's: an nginx front (etc/nginx/ekuiper-front.conf) sends /plugins/ here
# What eKuiper does when its file leaves restIp or restPort out (or restIp empty): it listens on all addresses.
EKUIPER_REST_IP = "0.0.0.0"
EKUIPER_REST_PORT = 9081
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
# The engine's settings this service takes from the engine's configuration (section -> lower-cased keys).
ENGINE_FACTS = {"store": frozenset({"type", "sqlite.name"}), "portable": frozenset({"pythonbin", "inittimeout"})}
# Where eKuiper's three folders go when not under KUIPER_HOME, as its -etc, -data and -plugins flags place them.
FOLDER_VARIABLES = (("etc", "KUIPER_ETC_DIR"), ("data", "KUIPER_DATA_DIR"), ("plugins", "KUIPER_PLUGINS_DIR"))


class SettingsError(ValueError):
    """A configuration value is missing its right type or range; the message names the key."""


@dataclass(frozen=True)
class EngineConfig:
    """Where the engine's own configuration says it listens: read from <etc>/kuiper.yaml and KUIPER__*."""

    file: Path
    rest_ip: str = EKUIPER_REST_IP
    rest_port: int = EKUIPER_REST_PORT
    rest_tls: bool = False  # basic.restTls: the engine serves HTTPS
    port_origin: str = "eKuiper's default"  # what set rest_port, for messages
    authentication: bool = False  # the engine's basic.authentication: it asks its callers for a JWT

    @property
    def url(self) -> str:
        """The engine's REST base as reached from this machine: a wildcard address means loopback."""
        host = "127.0.0.1" if self.rest_ip in WILDCARD_ADDRESSES else self.rest_ip
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.rest_tls else 'http'}://{host}:{self.rest_port}"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from configuration, already checked."""

    home: Path
    etc_dir: Path | None = None  # KUIPER_ETC_DIR; default <home>/etc
    data_dir: Path | None = None  # KUIPER_DATA_DIR; default <home>/data
    plugins_dir: Path | None = None  # KUIPER_PLUGINS_DIR; default <home>/plugins
    rest_ip: str = "127.0.0.1"
    rest_port: int = STANDALONE_PORT  # load_settings makes it BESIDE_ENGINE_PORT when an engine's config is found
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
    keep_versions: int = 1  # basic.keepVersions: previous versions kept per plugin for a rollback; 0: none
    protected_mode: bool = True
    allowed_hosts: tuple[str, ...] = ()
    engine_url: str | None = None  # engine.url: the running engine's REST base (else the engine config's)
    engine_config: EngineConfig | None = None  # the engine's <etc>/kuiper.yaml, when there is one
    engine_token: str | None = None  # engine.token: a JWT the engine accepts
    engine_binary: Path | None = None  # engine.binary: the managed kuiperd, for the native compatibility check
    engine_restart_command: tuple[str, ...] = ()  # engine.restartCommand: run after DELETE ...?stop=1
    engine_restart_timeout: float = 60  # engine.restartTimeout: seconds restartCommand may take
    engine_sync_interval: float = 2  # engine.syncInterval: seconds between looks at the engine's plugins; 0: never
    store_type: str = "sqlite"  # eKuiper's store.type
    store_sqlite_name: str | None = None  # eKuiper's store.sqlite.name
    portable_python_bin: str = "python"  # eKuiper's portable.pythonBin
    portable_init_timeout: float = 60  # eKuiper's portable.initTimeout, in seconds
    portable_verify_on_install: bool = True  # portable.verifyOnInstall (ours): start it, await its handshake
    allowed_users: tuple[str, ...] = ()
    audit_retention: int = 10000  # basic.auditRetention: audit rows kept, the oldest deleted first; 0 keeps none
    # basic.proxyUsers: the local users whose loopback connections are a reverse proxy in front (nginx's
    # worker user on Debian): their X-Real-IP is taken as the client's address in the audit trail.
    proxy_users: tuple[str, ...] = ("www-data",)
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

    @property
    def proxy_uids(self) -> frozenset[int]:
        """The uids of basic.proxyUsers; a name this machine does not know names no one."""
        uids = set()
        for entry in self.proxy_users:
            try:
                uids.add(user_id(entry))
            except ValueError:
                continue  # a name this machine does not have names no one (create_app warns of it)
        return frozenset(uids)


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


def _sync_interval(value: Any) -> float:
    """engine.syncInterval: 0 (no periodic look), or from 0.1 to 3600 seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of seconds")
    if value != 0 and not 0.1 <= value <= 3600:
        raise ValueError("expected 0 (never) or from 0.1 to 3600 seconds")
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


def _proxy_users(value: Any) -> tuple[str, ...]:
    """basic.proxyUsers: as allowedUsers, but a name this machine lacks is kept, to name no one (the shipped
    default www-data, where nginx runs as another user): the service warns of it at start (web/auditing.py)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    entries = _list(value)
    for entry in entries:
        if entry.isdigit():
            user_id(entry)  # a uid out of range is refused
    return entries


_port = _int(1, 65535)


def _rest_port(value: Any) -> int | None:
    """basic.restPort: a port, or empty for the default (9081, or 9091 beside an engine)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _port(value)


BASIC_KEYS: dict[str, tuple[str, Any]] = {
    "restip": ("rest_ip", _ip),
    "restport": ("rest_port", _rest_port),
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
    "keepversions": ("keep_versions", _int(0, 100)),
    "protectedmode": ("protected_mode", _bool),
    "allowedhosts": ("allowed_hosts", _list),
    "allowedusers": ("allowed_users", _users),
    "auditretention": ("audit_retention", _int(0)),
    "proxyusers": ("proxy_users", _proxy_users),
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
        "syncinterval": ("engine_sync_interval", _sync_interval),
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


def _read_yaml(path: Path) -> dict[str, dict[str, Any]] | None:
    """The file's sections, folded; None when there is no such file."""
    try:
        # The engine's file may be a link (a mounted ConfigMap), but never a FIFO that holds start-up.
        data = yaml.safe_load(read_regular(path, SETTINGS_FILE_MAX_BYTES, follow_links=True).decode("utf-8"))
    except FileNotFoundError:
        return None
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


def _env_layer(environ: Mapping[str, str], prefix: str) -> dict[str, dict[str, Any]]:
    """The `<PREFIX>SECTION__KEY` variables as a layer; the prefix is matched case-insensitively."""
    layer: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.upper().startswith(prefix):
            continue
        parts = name[len(prefix):].split("__")
        if len(parts) < 2 or not all(parts):
            continue
        section, key = parts[0].lower(), ".".join(parts[1:]).lower()
        layer.setdefault(section, {})[key] = (parse_env_value(text), name)
    return layer


def _merge(*layers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Later layers win, key by key."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, keys in (layer or {}).items():
            merged.setdefault(section, {}).update(keys)
    return merged


def _locate(environ: Mapping[str, str]) -> tuple[Path, dict[str, Path | None], Path]:
    """KUIPER_HOME (or eKuiper's KuiperBaseKey), the folders placed apart, and the etc folder in use."""
    home = Path(environ.get("KUIPER_HOME") or environ.get("KuiperBaseKey") or "var").resolve()
    folders = {
        f"{name}_dir": Path(environ[variable]).resolve() if environ.get(variable) else None
        for name, variable in FOLDER_VARIABLES
    }
    return home, folders, folders["etc_dir"] or home / "etc"


def _engine_layer(environ: Mapping[str, str], etc: Path) -> dict[str, dict[str, Any]] | None:
    """The engine's configuration as the engine reads it (its file, then KUIPER__*); None without its file."""
    engine_file = _read_yaml(etc / ENGINE_FILE)
    if engine_file is None:
        return None
    return _merge(engine_file, _env_layer(environ, ENGINE_ENV_PREFIX))


def _engine_config(engine: dict[str, dict[str, Any]], etc: Path) -> EngineConfig:
    """Where the engine listens, as its basic.restIp, restPort and restTls say (eKuiper's defaults else)."""
    basic = engine.get("basic", {})
    values: dict[str, Any] = {}
    if "restip" in basic:
        raw, _ = basic["restip"]
        # eKuiper binds whatever host it is given, and takes an empty restIp as 0.0.0.0
        values["rest_ip"] = ("" if raw is None else str(raw)).strip().strip("[]") or EKUIPER_REST_IP
    if "restport" in basic:
        raw, origin = basic["restport"]
        values["rest_port"] = _parse(_port, raw, origin)
        from_file = not origin.upper().startswith(ENGINE_ENV_PREFIX)
        values["port_origin"] = f"{origin} in {etc / ENGINE_FILE}" if from_file else origin
    values["rest_tls"] = any(key.startswith("resttls.") and raw for key, (raw, _) in basic.items())
    if "authentication" in basic:  # only for a warning: a value the engine reads differently must not stop us
        values["authentication"] = str(basic["authentication"][0]).strip().lower() == "true"
    return EngineConfig(file=etc / ENGINE_FILE, **values)


def _engine_facts(engine: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Only the engine's keys this service shares with it (ENGINE_FACTS): its store and portable runtime."""
    return {
        section: {key: value for key, value in (engine or {}).get(section, {}).items() if key in keys}
        for section, keys in ENGINE_FACTS.items()
    }


def _same_address(ours: str, theirs: str) -> bool:
    """Whether two listeners on one port would collide: the same address, or either on all of them."""
    def normal(address: str) -> str:
        address = address.strip("[]").lower()
        return "127.0.0.1" if address == "localhost" else address

    ours, theirs = normal(ours), normal(theirs)
    if ours in WILDCARD_ADDRESSES or theirs in WILDCARD_ADDRESSES:
        return True
    try:
        return ipaddress.ip_address(ours) == ipaddress.ip_address(theirs)
    except ValueError:
        return ours == theirs  # a host name the engine binds


def _service_layers(environ: Mapping[str, str], etc: Path, defaults_file: Path,
                    engine: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The service's settings: defaults, then the engine's facts, then its own file and variables."""
    return _merge(
        _read_yaml(defaults_file), _engine_facts(engine), _read_yaml(etc / SETTINGS_FILE),
        _env_layer(environ, ENV_PREFIX),
    )


def load_settings(environ: Mapping[str, str] | None = None, defaults_file: Path = DEFAULTS_FILE) -> Settings:
    """Build the settings from the layers; raise SettingsError naming the first bad key."""
    environ = os.environ if environ is None else environ
    home, folders, etc = _locate(environ)
    engine = _engine_layer(environ, etc)
    merged = _service_layers(environ, etc, defaults_file, engine)

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

    values["rest_ip"], values["rest_port"] = _listen_address(merged.get("basic", {}), engine)
    engine_config = _engine_config(engine, etc) if engine is not None else None
    if engine_config is not None:
        if values.get("engine_url") is None:
            values["engine_url"] = engine_config.url
        same_address = _same_address(values["rest_ip"], engine_config.rest_ip)
        if values["rest_port"] == engine_config.rest_port and same_address:
            origin = merged["basic"]["restport"][1] if "restport" in merged.get("basic", {}) else "basic.restPort"
            raise SettingsError(
                f"{origin} {values['rest_port']} is the engine's port: the engine listens on "
                f"{engine_config.rest_ip}:{engine_config.rest_port} ({engine_config.port_origin}) (give this "
                f"service another port in {SETTINGS_FILE} or {ENV_PREFIX}BASIC__RESTPORT; {BESIDE_ENGINE_PORT} "
                f"is its default beside an engine)"
            )
    return Settings(home=home, prebuild=prebuild, engine_config=engine_config, **folders, **values)


def _listen_address(basic: Mapping[str, Any], engine: Mapping[str, Any] | None) -> tuple[str, int]:
    """basic.restIp and restPort as set, else 127.0.0.1 and 9081, or 9091 beside an engine (its config found)."""
    rest_ip = _parse(_ip, *basic["restip"]) if "restip" in basic else Settings.rest_ip
    rest_port = _parse(_rest_port, *basic["restport"]) if "restport" in basic else None
    return rest_ip, rest_port or (BESIDE_ENGINE_PORT if engine is not None else STANDALONE_PORT)


def service_url(environ: Mapping[str, str] | None = None, defaults_file: Path = DEFAULTS_FILE) -> str:
    """Where this service listens, as an http URL a client on this machine can use (the CLI's default).

    Only the layers and basic.restIp/restPort are read, so that a setting the client has no use for (a user
    name of allowedUsers, the engine binary) cannot keep it from reaching the service."""
    environ = os.environ if environ is None else environ
    _, _, etc = _locate(environ)
    engine = _engine_layer(environ, etc)
    rest_ip, rest_port = _listen_address(_service_layers(environ, etc, defaults_file, engine).get("basic", {}), engine)
    host = "127.0.0.1" if rest_ip in WILDCARD_ADDRESSES else rest_ip
    return f"http://[{host}]:{rest_port}" if ":" in host else f"http://{host}:{rest_port}"


def authentication_mismatch(settings: Settings) -> str | None:
    """A warning when the engine asks its callers for a JWT and this service does not; None otherwise."""
    engine = settings.engine_config
    if engine is None or not engine.authentication or settings.authentication:
        return None
    return (f"the engine's config ({engine.file}, KUIPER__*) turns its authentication on, and this service's "
            f"basic.authentication is off: set it in {SETTINGS_FILE} or {ENV_PREFIX}BASIC__AUTHENTICATION=true "
            "so that callers of /plugins/ need a token as the engine's do")


def describe_listening(settings: Settings) -> str:
    """One line for the start-up log: where the service listens, and what it found of an engine."""
    where = f"kuiper-plugins listens on {settings.rest_ip}:{settings.rest_port}"
    engine = settings.engine_config
    if engine is None:
        etc = settings.etc_dir or settings.home / "etc"
        return f"{where}; no engine config at {etc / ENGINE_FILE}, so it runs standalone"
    how = "derived from the engine's restIp and restPort" if settings.engine_url == engine.url else "as set"
    return (f"{where}; found the engine's config {engine.file}: the engine listens on "
            f"{engine.rest_ip}:{engine.rest_port}, engine.url is {settings.engine_url} ({how})")


def _parse(parse, raw: Any, origin: str) -> Any:
    try:
        return parse(raw)
    except SettingsError:
        raise  # already names its key
    except ValueError as exc:
        raise SettingsError(f"invalid value {raw!r} for {origin}: {exc}") from None
