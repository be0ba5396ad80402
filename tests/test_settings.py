"""Settings: repository defaults < <etc>/kuiper-plugins.yaml < KUIPER_PLUGINS__SECTION__KEY; the engine's
<etc>/kuiper.yaml and KUIPER__* only for what they say of the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kuiper_plugins.settings import (
    DEFAULTS_FILE,
    Settings,
    SettingsError,
    authentication_mismatch,
    describe_listening,
    load_settings,
    parse_env_value,
    service_url,
)


def write_home_config(home: Path, text: str) -> None:
    """The service's own settings file in the home's etc folder."""
    (home / "etc").mkdir(parents=True, exist_ok=True)
    (home / "etc/kuiper-plugins.yaml").write_text(text)


def write_engine_config(home: Path, text: str) -> None:
    """The engine's kuiper.yaml in the home's etc folder, as an eKuiper installation has it."""
    (home / "etc").mkdir(parents=True, exist_ok=True)
    (home / "etc/kuiper.yaml").write_text(text)


# The basic section of eKuiper's shipped kuiper.yaml, as far as this service shares key names with it.
EKUIPER_BASIC = """basic:
  restIp: 0.0.0.0
  restPort: 9081
  ip: 0.0.0.0
  port: 20498
  authentication: false
  pluginHosts: https://packages.emqx.io
  enablePrivateNet: false
  allowExternalFileAccess: true
  consoleLog: false
"""


def test_repository_defaults_match_the_documented_defaults(tmp_path):
    settings = load_settings({"KUIPER_HOME": str(tmp_path)})
    documented = Settings(home=tmp_path)
    assert settings == documented
    assert settings.rest_ip == "127.0.0.1" and settings.rest_port == 9081
    assert settings.max_plugin_size == 536870912 and settings.max_unpacked_size == 2147483648
    assert settings.host_allow_list == {"localhost", "127.0.0.1", "::1"}


def test_every_documented_key_is_in_the_defaults_file():
    from kuiper_plugins.settings import BASIC_KEYS

    basic = yaml.safe_load(DEFAULTS_FILE.read_text())["basic"]
    assert {k.lower() for k in basic} == set(BASIC_KEYS)


def test_home_defaults_to_var_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).home == tmp_path / "var"


def test_home_file_overrides_the_defaults(tmp_path):
    write_home_config(tmp_path, "basic:\n  restPort: 9500\n  PluginHosts: https://a.example, https://b.example/\n")
    settings = load_settings({"KUIPER_HOME": str(tmp_path)})
    assert settings.rest_port == 9500
    assert settings.plugin_hosts == ("https://a.example", "https://b.example")
    assert settings.download_timeout == 300


def test_environment_overrides_both(tmp_path):
    write_home_config(tmp_path, "basic:\n  restPort: 9500\n")
    env = {
        "KUIPER_HOME": str(tmp_path),
        "KUIPER_PLUGINS__BASIC__RESTPORT": "9082",
        "KUIPER_PLUGINS__BASIC__ENABLEPRIVATENET": "true",
        "kuiper_plugins__Basic__PluginHosts": "[http://a,http://b]",  # prefix, section and key in any case
        "KUIPER_PLUGINS__BASIC__DOWNLOADTIMEOUT": "2.5",
        "KUIPER_PLUGINS__PREBUILD__SOURCES": "random,zmq",
    }
    settings = load_settings(env)
    assert settings.rest_port == 9082
    assert settings.enable_private_net is True
    assert settings.plugin_hosts == ("http://a", "http://b")
    assert settings.download_timeout == 2.5
    assert settings.prebuild["sources"] == ("random", "zmq")


def test_keys_we_do_not_use_are_ignored(tmp_path):
    write_home_config(tmp_path, "basic:\n  consoleLog: false\n  port: 20498\nstore:\n  type: sqlite\n")
    assert load_settings({"KUIPER_HOME": str(tmp_path)}) == Settings(home=tmp_path)


@pytest.mark.parametrize(
    "env, key",
    [
        ({"KUIPER_PLUGINS__BASIC__RESTPORT": "http"}, "KUIPER_PLUGINS__BASIC__RESTPORT"),
        ({"KUIPER_PLUGINS__BASIC__RESTPORT": "70000"}, "KUIPER_PLUGINS__BASIC__RESTPORT"),
        ({"KUIPER_PLUGINS__BASIC__TLSVERIFY": "maybe"}, "KUIPER_PLUGINS__BASIC__TLSVERIFY"),
        ({"KUIPER_PLUGINS__BASIC__RESTIP": "not-an-ip"}, "KUIPER_PLUGINS__BASIC__RESTIP"),
        ({"KUIPER_PLUGINS__BASIC__PLUGINHOSTS": "ftp://x"}, "KUIPER_PLUGINS__BASIC__PLUGINHOSTS"),
        ({"KUIPER_PLUGINS__BASIC__DOWNLOADTIMEOUT": "0"}, "KUIPER_PLUGINS__BASIC__DOWNLOADTIMEOUT"),
        ({"KUIPER_PLUGINS__BASIC__MAXPLUGINSIZE": "-1"}, "KUIPER_PLUGINS__BASIC__MAXPLUGINSIZE"),
        ({"KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST": "nonsense"}, "KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST"),
        ({"KUIPER_PLUGINS__ENGINE__URL": "ftp://x"}, "KUIPER_PLUGINS__ENGINE__URL"),
        ({"KUIPER_PLUGINS__PORTABLE__INITTIMEOUT": "soon"}, "portable.initTimeout"),
    ],
)
def test_bad_values_name_the_key(tmp_path, env, key):
    with pytest.raises(SettingsError, match=key):
        load_settings({"KUIPER_HOME": str(tmp_path), **env})


def test_bad_value_in_a_file_names_the_key(tmp_path):
    write_home_config(tmp_path, "basic:\n  maxArchiveEntries: lots\n")
    with pytest.raises(SettingsError, match="basic.maxArchiveEntries"):
        load_settings({"KUIPER_HOME": str(tmp_path)})


def test_unreadable_yaml_is_reported(tmp_path):
    write_home_config(tmp_path, "basic: [unclosed\n")
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"KUIPER_HOME": str(tmp_path)})


@pytest.mark.parametrize("text, value", [("12", 12), ("true", True), ("FALSE", False), ("1.5", 1.5), ("abc", "abc")])
def test_env_values_are_typed_as_ekuiper_does(text, value):
    assert parse_env_value(text) == value


def test_settings_are_frozen(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.rest_port = 1  # type: ignore[misc]
    assert settings.with_overrides(rest_port=1).rest_port == 1


def test_max_token_lifetime_is_whole_seconds_from_the_file_or_the_environment(tmp_path):
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).max_token_lifetime == 86400
    write_home_config(tmp_path, "basic:\n  maxTokenLifetime: 3600\n")
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).max_token_lifetime == 3600
    env = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__BASIC__MAXTOKENLIFETIME": "0"}
    assert load_settings(env).max_token_lifetime == 0  # no limit, as eKuiper


@pytest.mark.parametrize("text", ["24h", "-1", "1.5", "true", "", "86400s"])
def test_a_bad_max_token_lifetime_stops_start_up_naming_the_key(tmp_path, text):
    env = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__BASIC__MAXTOKENLIFETIME": text}
    with pytest.raises(SettingsError, match="KUIPER_PLUGINS__BASIC__MAXTOKENLIFETIME: expected a whole number of"):
        load_settings(env)


def test_a_bad_max_token_lifetime_in_the_file_names_the_key(tmp_path):
    write_home_config(tmp_path, "basic:\n  maxTokenLifetime: 1d\n")
    with pytest.raises(SettingsError, match=r"'1d' for basic.maxTokenLifetime: expected a whole number of seconds"):
        load_settings({"KUIPER_HOME": str(tmp_path)})


# ---------------------------------------------------------------------------- beside an engine


def test_only_the_double_underscore_form_is_a_setting(tmp_path):
    # Other variables of this service share the prefix with one underscore; none of them is a setting.
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS_LOG_LEVEL": "debug", "KUIPER_PLUGINS_HEAD_TIMEOUT": "3",
               "KUIPER_PLUGINS_SERVER": "gunicorn", "KUIPER_PLUGINS_URL": "http://127.0.0.1:1",
               "KUIPER_PLUGINS_DIR": str(tmp_path / "plugins"), "KUIPER_PLUGINS_BASIC__RESTPORT": "not-a-port",
               "KUIPER_PLUGINS___BASIC__RESTPORT": "not-a-port", "KUIPER_PLUGINS__RESTPORT": "not-a-port"}
    assert load_settings(environ) == Settings(home=tmp_path, plugins_dir=tmp_path / "plugins")
    environ["KUIPER_PLUGINS__BASIC__RESTPORT"] = "9500"  # ... and the double one is
    assert load_settings(environ) == Settings(home=tmp_path, plugins_dir=tmp_path / "plugins", rest_port=9500)


def test_ekuipers_own_file_and_variables_are_not_the_services_settings(tmp_path):
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__RESTPORT": "9500", "KUIPER__BASIC__RESTIP": "0.0.0.0",
               "KUIPER__BASIC__AUTHENTICATION": "true", "KUIPER__BASIC__ALLOWEXTERNALFILEACCESS": "true",
               "KUIPER__BASIC__PLUGINHOSTS": "http://mirror.example", "KUIPER__ENGINE__URL": "http://127.0.0.1:1"}
    assert load_settings(environ) == Settings(home=tmp_path)  # no engine here: its variables say nothing
    write_engine_config(tmp_path, EKUIPER_BASIC + "  authentication: true\n")
    settings = load_settings(environ)
    # The service keeps its own address, access rules and catalogue ...
    assert (settings.rest_ip, settings.rest_port) == ("127.0.0.1", 9091)
    assert (settings.authentication, settings.allow_external_file_access) == (False, False)
    assert settings.plugin_hosts == ("https://packages.emqx.io",)
    # ... and learns where the engine listens, from its file overlaid with its own variables, as it reads them.
    assert settings.engine_url == "http://127.0.0.1:9500"
    assert (settings.engine_config.rest_ip, settings.engine_config.rest_port) == ("0.0.0.0", 9500)
    # The engine asks its callers for a token and the service does not: start-up warns, naming the setting.
    assert settings.engine_config.authentication is True
    assert "this service's basic.authentication is off: set it in kuiper-plugins.yaml" in authentication_mismatch(
        settings)
    environ["KUIPER_PLUGINS__BASIC__AUTHENTICATION"] = "true"
    assert authentication_mismatch(load_settings(environ)) is None


def test_an_engine_config_gives_engine_url_and_the_9091_default(tmp_path):
    write_engine_config(tmp_path, EKUIPER_BASIC)
    settings = load_settings({"KUIPER_HOME": str(tmp_path)})
    assert (settings.rest_ip, settings.rest_port) == ("127.0.0.1", 9091)
    assert settings.engine_url == "http://127.0.0.1:9081"
    assert settings.engine_config.file == tmp_path / "etc/kuiper.yaml"
    assert settings.allow_external_file_access is False  # eKuiper ships true: the engine's, not ours
    assert settings == Settings(home=tmp_path, rest_port=9091, engine_url="http://127.0.0.1:9081",
                                engine_config=settings.engine_config)
    assert describe_listening(settings) == (
        f"kuiper-plugins listens on 127.0.0.1:9091; found the engine's config {tmp_path}/etc/kuiper.yaml: the engine "
        "listens on 0.0.0.0:9081, engine.url is http://127.0.0.1:9081 (derived from the engine's restIp and restPort)"
    )
    assert service_url({"KUIPER_HOME": str(tmp_path)}) == "http://127.0.0.1:9091"


def test_without_an_engine_config_the_service_runs_standalone_on_9081(tmp_path):
    settings = load_settings({"KUIPER_HOME": str(tmp_path)})
    assert (settings.rest_port, settings.engine_url, settings.engine_config) == (9081, None, None)
    assert describe_listening(settings) == (
        f"kuiper-plugins listens on 127.0.0.1:9081; no engine config at {tmp_path}/etc/kuiper.yaml, so it runs "
        "standalone"
    )
    assert service_url({"KUIPER_HOME": str(tmp_path)}) == "http://127.0.0.1:9081"


def test_the_engine_config_is_read_from_the_etc_folder_in_use(tmp_path):
    etc = tmp_path / "etc/kuiper"
    etc.mkdir(parents=True)
    (etc / "kuiper.yaml").write_text("basic:\n  restIp: 127.0.0.1\n  restPort: 9082\n")
    settings = load_settings({"KUIPER_HOME": str(tmp_path / "var"), "KUIPER_ETC_DIR": str(etc)})
    assert (settings.rest_port, settings.engine_url) == (9091, "http://127.0.0.1:9082")


@pytest.mark.parametrize("basic, url", [
    ("restIp: 0.0.0.0\n  restPort: 9082", "http://127.0.0.1:9082"),
    ("restIp: '::'\n  restPort: 9082", "http://127.0.0.1:9082"),
    ("restIp: ''\n  restPort: 9082", "http://127.0.0.1:9082"),  # eKuiper binds 0.0.0.0 for an empty restIp
    ("restIp: 127.0.0.2\n  restPort: 9082", "http://127.0.0.2:9082"),
    ("restIp: '::1'\n  restPort: 9082", "http://[::1]:9082"),
    ("restIp: 127.0.0.1", "http://127.0.0.1:9081"),  # eKuiper's own default port
    ("consoleLog: true", "http://127.0.0.1:9081"),
    ("restPort: 9082\n  restTls:\n    certfile: /c.pem\n    keyfile: /k.pem", "https://127.0.0.1:9082"),
])
def test_engine_url_is_where_the_engines_config_has_it_listen(tmp_path, basic, url):
    write_engine_config(tmp_path, f"basic:\n  {basic}\n")
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).engine_url == url


def test_an_engine_url_that_is_set_wins_over_the_engines_config(tmp_path):
    write_engine_config(tmp_path, EKUIPER_BASIC)
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__ENGINE__URL": "http://127.0.0.1:9999/"}
    settings = load_settings(environ)
    assert settings.engine_url == "http://127.0.0.1:9999"
    assert describe_listening(settings).endswith("engine.url is http://127.0.0.1:9999 (as set)")


def test_the_engines_store_and_portable_runtime_come_from_its_config_unless_the_service_says_otherwise(tmp_path):
    write_engine_config(tmp_path, "portable:\n  pythonBin: /opt/engine/python\n  initTimeout: 5s\n  sendTimeout: 1s\n"
                                  "store:\n  sqlite:\n    name: engine.db\n")
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER__PORTABLE__INITTIMEOUT": "7s"}
    settings = load_settings(environ)
    assert (settings.portable_python_bin, settings.portable_init_timeout) == ("/opt/engine/python", 7.0)
    assert settings.store_sqlite_name == "engine.db"
    # The service's own file and variables still win: e.g. the engine's python as seen from outside its container.
    write_home_config(tmp_path, "portable:\n  pythonBin: /kuiper/venv/bin/python\n")
    assert load_settings(environ).portable_python_bin == "/kuiper/venv/bin/python"
    environ["KUIPER_PLUGINS__PORTABLE__INITTIMEOUT"] = "9s"
    assert load_settings(environ).portable_init_timeout == 9.0


@pytest.mark.parametrize("engine, ours", [
    ("restIp: 0.0.0.0\n  restPort: 9081", {"KUIPER_PLUGINS__BASIC__RESTPORT": "9081"}),
    ("restIp: 127.0.0.1\n  restPort: 9081", {"KUIPER_PLUGINS__BASIC__RESTPORT": "9081"}),
    ("restPort: 9081", {"KUIPER_PLUGINS__BASIC__RESTIP": "127.0.0.2", "KUIPER_PLUGINS__BASIC__RESTPORT": "9081"}),
    ("restIp: 127.0.0.1\n  restPort: 9081",
     {"KUIPER_PLUGINS__BASIC__RESTIP": "0.0.0.0", "KUIPER_PLUGINS__BASIC__RESTPORT": "9081"}),
    ("restIp: 0.0.0.0\n  restPort: 9091", {}),  # the default beside an engine is taken by the engine itself
])
def test_the_engines_port_is_refused_naming_both_settings(tmp_path, engine, ours):
    write_engine_config(tmp_path, f"basic:\n  {engine}\n")
    with pytest.raises(SettingsError, match=r"restPort|RESTPORT") as refused:
        load_settings({"KUIPER_HOME": str(tmp_path), **ours})
    message = str(refused.value)
    assert "is the engine's port: the engine listens on" in message
    assert f"in {tmp_path}/etc/kuiper.yaml" in message  # which file gave the engine that port
    assert "KUIPER_PLUGINS__BASIC__RESTPORT" in message and "9091 is its default beside an engine" in message


def test_the_engines_port_from_its_own_variable_is_refused_too(tmp_path):
    write_engine_config(tmp_path, EKUIPER_BASIC)
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__RESTPORT": "9091"}
    with pytest.raises(SettingsError) as refused:
        load_settings(environ)
    assert str(refused.value).startswith(
        "basic.restPort 9091 is the engine's port: the engine listens on 0.0.0.0:9091 (KUIPER__BASIC__RESTPORT)")


@pytest.mark.parametrize("engine, ours, expected", [
    ("restIp: 127.0.0.1\n  restPort: 9081",
     {"KUIPER_PLUGINS__BASIC__RESTIP": "127.0.0.2", "KUIPER_PLUGINS__BASIC__RESTPORT": "9081"},
     ("127.0.0.2", 9081, "http://127.0.0.1:9081")),
    ("restIp: 127.0.0.1\n  restPort: 9082", {}, ("127.0.0.1", 9091, "http://127.0.0.1:9082")),
])
def test_another_address_or_port_than_the_engines_is_fine(tmp_path, engine, ours, expected):
    write_engine_config(tmp_path, f"basic:\n  {engine}\n")
    settings = load_settings({"KUIPER_HOME": str(tmp_path), **ours})
    assert (settings.rest_ip, settings.rest_port, settings.engine_url) == expected


def test_a_bad_value_in_the_engines_config_names_its_key(tmp_path):
    # Without an engine's kuiper.yaml there is no engine here: its variables are not read at all.
    assert load_settings({"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__RESTPORT": "http"}) == Settings(home=tmp_path)
    write_engine_config(tmp_path, "basic:\n  restPort: http\n")
    with pytest.raises(SettingsError, match="invalid value 'http' for basic.restPort"):
        load_settings({"KUIPER_HOME": str(tmp_path)})
    write_engine_config(tmp_path, EKUIPER_BASIC)
    with pytest.raises(SettingsError, match="invalid value 70000 for KUIPER__BASIC__RESTPORT"):
        load_settings({"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__RESTPORT": "70000"})
    write_engine_config(tmp_path, "basic: [unclosed\n")
    with pytest.raises(SettingsError, match=r"cannot read .*/etc/kuiper\.yaml"):
        load_settings({"KUIPER_HOME": str(tmp_path)})


def test_an_empty_rest_port_means_the_default(tmp_path):
    environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__BASIC__RESTPORT": ""}
    assert load_settings(environ).rest_port == 9081
    write_engine_config(tmp_path, EKUIPER_BASIC)
    assert load_settings(environ).rest_port == 9091


def test_engine_sync_interval_is_seconds_or_zero(tmp_path):
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).engine_sync_interval == 2
    for given, read in (("0", 0.0), ("0.5", 0.5), ("3600", 3600.0)):
        environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__ENGINE__SYNCINTERVAL": given}
        assert load_settings(environ).engine_sync_interval == read
    for given in ("-1", "0.01", "3601", "often"):
        environ = {"KUIPER_HOME": str(tmp_path), "KUIPER_PLUGINS__ENGINE__SYNCINTERVAL": given}
        with pytest.raises(SettingsError, match="SYNCINTERVAL"):
            load_settings(environ)
