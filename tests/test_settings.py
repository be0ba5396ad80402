"""Settings: repository defaults < $KUIPER_HOME/etc/kuiper.yaml < KUIPER__SECTION__KEY."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kuiper_plugins.settings import DEFAULTS_FILE, Settings, SettingsError, load_settings, parse_env_value


def write_home_config(home: Path, text: str) -> None:
    (home / "etc").mkdir(parents=True, exist_ok=True)
    (home / "etc/kuiper.yaml").write_text(text)


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
        "KUIPER__BASIC__RESTPORT": "9082",
        "KUIPER__BASIC__ENABLEPRIVATENET": "true",
        "KUIPER__BASIC__PLUGINHOSTS": "[http://a,http://b]",
        "KUIPER__BASIC__DOWNLOADTIMEOUT": "2.5",
        "KUIPER__PREBUILD__SOURCES": "random,zmq",
    }
    settings = load_settings(env)
    assert settings.rest_port == 9082
    assert settings.enable_private_net is True
    assert settings.plugin_hosts == ("http://a", "http://b")
    assert settings.download_timeout == 2.5
    assert settings.prebuild["sources"] == ("random", "zmq")


def test_keys_of_an_ekuiper_config_that_we_do_not_use_are_ignored(tmp_path):
    write_home_config(tmp_path, "basic:\n  consoleLog: false\n  port: 20498\nstore:\n  type: sqlite\n")
    assert load_settings({"KUIPER_HOME": str(tmp_path)}).rest_port == 9081


@pytest.mark.parametrize(
    "env, key",
    [
        ({"KUIPER__BASIC__RESTPORT": "http"}, "KUIPER__BASIC__RESTPORT"),
        ({"KUIPER__BASIC__RESTPORT": "70000"}, "KUIPER__BASIC__RESTPORT"),
        ({"KUIPER__BASIC__TLSVERIFY": "maybe"}, "KUIPER__BASIC__TLSVERIFY"),
        ({"KUIPER__BASIC__RESTIP": "not-an-ip"}, "KUIPER__BASIC__RESTIP"),
        ({"KUIPER__BASIC__PLUGINHOSTS": "ftp://x"}, "KUIPER__BASIC__PLUGINHOSTS"),
        ({"KUIPER__BASIC__DOWNLOADTIMEOUT": "0"}, "KUIPER__BASIC__DOWNLOADTIMEOUT"),
        ({"KUIPER__BASIC__MAXPLUGINSIZE": "-1"}, "KUIPER__BASIC__MAXPLUGINSIZE"),
        ({"KUIPER__BASIC__PRIVATENETALLOWLIST": "nonsense"}, "KUIPER__BASIC__PRIVATENETALLOWLIST"),
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
    env = {"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__MAXTOKENLIFETIME": "0"}
    assert load_settings(env).max_token_lifetime == 0  # no limit, as eKuiper


@pytest.mark.parametrize("text", ["24h", "-1", "1.5", "true", "", "86400s"])
def test_a_bad_max_token_lifetime_stops_start_up_naming_the_key(tmp_path, text):
    env = {"KUIPER_HOME": str(tmp_path), "KUIPER__BASIC__MAXTOKENLIFETIME": text}
    with pytest.raises(SettingsError, match="KUIPER__BASIC__MAXTOKENLIFETIME: expected a whole number of seconds"):
        load_settings(env)


def test_a_bad_max_token_lifetime_in_the_file_names_the_key(tmp_path):
    write_home_config(tmp_path, "basic:\n  maxTokenLifetime: 1d\n")
    with pytest.raises(SettingsError, match=r"'1d' for basic.maxTokenLifetime: expected a whole number of seconds"):
        load_settings({"KUIPER_HOME": str(tmp_path)})
