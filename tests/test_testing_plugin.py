"""kuiper_plugins.testing, the pytest plugin for integration harnesses, used as a downstream project uses it.

The downstream tests are written into a fresh folder by pytest's own `pytester` and run by a new pytest
process (`runpytest_subprocess`): nothing of this repository's tests/ is on its path, no conftest of ours
applies, and the plugin is there only because the installed package's `pytest11` entry point names it.
What those tests report, and what they leave on disk, is checked from here. The builders are also checked
directly against the service's own package rules, and through the service's API.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO

from kuiper_plugins.errors import InvalidRequest, PackageInvalid
from kuiper_plugins.testing import (
    GUNICORN_CONFIG,
    check_plugin_zip,
    native_plugin_zip,
    portable_plugin_zip,
)
from kuiper_plugins.testing import engine as engine_module
from kuiper_plugins.testing.engine import MODULE, Engines, find_go

pytest_plugins = ["pytester"]


def listing(path: Path) -> dict[str, int]:
    """Each member of a zip and its Unix mode."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: info.external_attr >> 16 for info in archive.infolist()}


# ---------------------------------------------------------------------------- the builders

def test_a_native_plugin_zip_is_laid_out_as_the_server_plans_it(tmp_path):
    sink = native_plugin_zip(tmp_path / "mirror.zip", "sinks", "mirror", version="1.0.0")
    source = native_plugin_zip(tmp_path / "random.zip", "sources", "random")

    assert listing(sink) == {"Mirror@v1.0.0.so": 0o100644}
    assert listing(source) == {"Random.so": 0o100644, "random.yaml": 0o100644}
    sink_plan = check_plugin_zip(sink, "sinks", "mirror")
    assert (sink_plan.version, [unit.dest for unit in sink_plan.units]) == ("1.0.0", ["plugins/sinks/Mirror@v1.0.0.so"])
    assert [unit.dest for unit in check_plugin_zip(source, "sources", "random").units] == [
        "plugins/sources/Random.so", "etc/sources/random.yaml", "data/sources/random.yaml"]


def test_a_portable_plugin_zip_declares_its_symbols_and_runs_its_executable(tmp_path):
    path = portable_plugin_zip(tmp_path / "greet.zip", "greet", "python", sources=["hello"], functions=["shout"])

    assert listing(path) == {"greet.json": 0o100644, "greet.py": 0o100755, "sources/hello.yaml": 0o100644}
    with zipfile.ZipFile(path) as archive:
        descriptor = json.loads(archive.read("greet.json"))
    assert descriptor == {"name": "greet", "version": "v1.0.0", "language": "python", "executable": "greet.py",
                          "sources": ["hello"], "sinks": [], "functions": ["shout"]}
    plan = check_plugin_zip(path, "portables", "greet")
    assert (plan.executable, plan.functions) == ("greet.py", ["shout"])


def test_a_builder_refuses_in_the_services_words_and_leaves_no_zip(tmp_path):
    with pytest.raises(PackageInvalid, match=r"^invalid plugin, language 'rust' is not supported$"):
        portable_plugin_zip(tmp_path / "rusty.zip", "rusty", "rust")
    with pytest.raises(PackageInvalid, match=r"^invalid json file other\.json: Expecting"):
        portable_plugin_zip(tmp_path / "other.zip", "other", "python", files={"other.json": b"[1"})
    with pytest.raises(InvalidRequest, match=r"^invalid name abs: "):
        native_plugin_zip(tmp_path / "abs.zip", "functions", "abs")
    assert list(tmp_path.iterdir()) == []


def test_built_packages_install_through_the_service(service, file_server):
    native_plugin_zip(file_server.root / "random.zip", "sources", "random", version="2.1.0")
    portable_plugin_zip(file_server.root / "greet.zip", "greet", "python", sources=["hello"])

    for plugin_type, name in (("sources", "random"), ("portables", "greet")):
        answer = service.post(plugin_type, {"name": name, "file": file_server.url(f"{name}.zip")})
        assert answer.status_code == 201, answer.get_data(as_text=True)
    assert service.client.get("/plugins/sources/random").get_json()["version"] == "2.1.0"
    assert (service.home / "plugins/sources/Random@v2.1.0.so").is_file()
    assert (service.home / "plugins/portable/greet/greet.py").is_file()
    assert (service.home / "etc/sources/hello.yaml").read_text() == "default: {}\n"


def test_the_package_ships_the_gunicorn_config_make_run_uses_and_the_engines_go_module():
    # In a source tree the packaged config is a link to etc's; a built wheel holds a copy of it.
    assert GUNICORN_CONFIG.read_bytes() == (REPO / "etc" / "gunicorn.conf.py").read_bytes()
    assert (MODULE / "go.mod").read_text().startswith("module kuiper-plugins/testing/kuiperd\n")
    assert not (REPO / "tests" / "go" / "kuiperd" / "go.mod").exists()  # one copy of the module, the package's


# ---------------------------------------------------------------------------- as a downstream project uses it

BUILDERS_ONLY = """
    from kuiper_plugins.testing import native_plugin_zip

    def test_a_zip_from_the_file_server(file_server):
        native_plugin_zip(file_server.root / "mirror.zip", "sinks", "mirror", version="1.0.0")
        assert file_server.url("mirror.zip").startswith("http://127.0.0.1:")
"""


def test_pytest_finds_the_plugin_through_its_entry_point(pytester):
    entry = importlib.metadata.entry_points(group="pytest11", name="kuiper_plugins.testing")
    assert [point.value for point in entry] == ["kuiper_plugins.testing"]
    pytester.makepyfile(test_downstream=textwrap.dedent(BUILDERS_ONLY))

    found = pytester.runpytest_subprocess("--trace-config")
    found.assert_outcomes(passed=1)
    # pytest lists the plugins that distributions' pytest11 entry points brought in as "registered third-party".
    third_party = found.outlines[found.outlines.index("registered third-party plugins:") + 1:]
    assert any(re.fullmatch(r"  kuiper-plugins-\S+ at \S+/kuiper_plugins/testing/__init__\.py", line)
               for line in third_party[:20]), found.stdout.str()
    # Without the entry point's plugin the same file has no fixture: it came from nowhere else.
    blocked = pytester.runpytest_subprocess("-p", "no:kuiper_plugins.testing")
    blocked.assert_outcomes(errors=1)
    assert "fixture 'file_server' not found" in blocked.stdout.str()


INSTALL_FROM_THE_FILE_SERVER = """
    import requests

    from kuiper_plugins.testing import native_plugin_zip

    def test_a_sink_plugin_installs_from_the_file_server(kuiper_service, file_server):
        native_plugin_zip(file_server.root / "mirror.zip", "sinks", "mirror", version="1.0.0")
        answer = requests.post(f"{kuiper_service.url}/plugins/sinks",
                               json={"name": "mirror", "file": file_server.url("mirror.zip")}, timeout=60)
        assert answer.status_code == 201, answer.text
        assert answer.text == "sinks plugin mirror is created"
        described = requests.get(f"{kuiper_service.url}/plugins/sinks/mirror", timeout=30).json()
        assert (described["name"], described["version"]) == ("mirror", "1.0.0")
        assert file_server.requests == ["/mirror.zip"]
        # For the test that ran this one: the master's pid, and where the service kept its home.
        print(f"gunicorn={kuiper_service.process.pid} home={kuiper_service.home}")
"""


@pytest.mark.slow
def test_a_downstream_test_installs_a_built_plugin_into_the_started_service(pytester):
    pytester.makepyfile(test_downstream=textwrap.dedent(INSTALL_FROM_THE_FILE_SERVER))

    result = pytester.runpytest_subprocess("-s", timeout=600)

    result.assert_outcomes(passed=1)
    # The line shares its start with pytest's progress ("test_downstream.py gunicorn=...").
    pid, home = re.search(r"gunicorn=(\d+) home=(\S+)", result.stdout.str()).groups()
    home = Path(home)
    assert home.is_relative_to(pytester.path)  # a temporary home, in the run's own folder
    assert (home / "plugins" / "sinks" / "Mirror@v1.0.0.so").read_bytes().startswith(b"\x7fELF")
    # Stopped after the test: the master is gone, and no process still holds the home.
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    holding = [proc.pid for proc in psutil.process_iter(["environ"])
               if (proc.info["environ"] or {}).get("KUIPER_HOME") == str(home)]
    assert holding == []


WITH_THE_ENGINE = """
    import requests

    from kuiper_plugins.testing import portable_plugin_zip

    # A portable function plugin on eKuiper's Python SDK, as eKuiper's documentation writes one.
    ECHO = '''
    from ekuiper import Function, PluginConfig, plugin


    class Echo(Function):
        def validate(self, args):
            return "" if len(args) == 1 else "echo takes one argument"

        def exec(self, args, ctx):
            return args[0]

        def is_aggregate(self):
            return False


    if __name__ == "__main__":
        plugin.start(PluginConfig("echoes", {}, {}, {"echo": lambda: Echo()}))
    '''

    def test_a_portable_plugin_installed_through_the_service_is_live_in_the_engine(kuiper_service_with_engine,
                                                                                  file_server):
        service, engine = kuiper_service_with_engine.service, kuiper_service_with_engine.engine
        portable_plugin_zip(file_server.root / "echoes.zip", "echoes", "python", functions=["echo"], program=ECHO)
        answer = requests.post(f"{service.url}/plugins/portables",
                               json={"name": "echoes", "file": file_server.url("echoes.zip")}, timeout=120)
        assert answer.status_code == 201, answer.text
        # The engine's own API, not ours: the running engine has the plugin.
        described = engine.get("/plugins/portables/echoes")
        assert described.status_code == 200, described.text
        assert described.json()["functions"] == ["echo"]
        print(f"engine={engine.process.pid} home={engine.home}")
"""


ASKS_FOR_AN_ENGINE = """
    def test_with_an_engine(kuiperd):
        assert kuiperd.get("/").status_code == 200
"""


def test_an_old_go_fails_the_engine_fixture_saying_what_to_install(pytester, monkeypatch):
    fake = pytester.mkdir("old-go")
    (fake / "go").write_text("#!/bin/sh\necho 'go version go1.19.8 linux/amd64'\n")
    (fake / "go").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    pytester.makepyfile(test_downstream=textwrap.dedent(ASKS_FOR_AN_ENGINE))

    result = pytester.runpytest_subprocess(timeout=120)

    result.assert_outcomes(errors=1)  # an error at set-up, not a skip
    assert (f"kuiperd 2.4.0 is built with Go 1.25.4 or later, and {fake}/go is Go 1.19.8: install Go 1.25.4 or "
            "later (https://go.dev/dl, or a distribution's golang-go of that version) and put its go command "
            "first on PATH") in result.stdout.str()


def test_without_go_the_engine_fixture_fails_saying_what_to_install(pytester, monkeypatch):
    # Go is hidden as on a machine without it: off PATH, and its usual folders empty (a mount namespace of
    # the run's own, where an empty tmpfs covers each).
    hidden = [folder for folder in ("/usr/local/go", "/usr/lib/go") if os.path.isdir(folder)]
    path = [folder for folder in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(folder, "go"))]
    monkeypatch.setenv("PATH", ":".join(path))
    pytester.makepyfile(test_downstream=textwrap.dedent(ASKS_FOR_AN_ENGINE))
    covering = "".join(f"mount -t tmpfs none {folder} && " for folder in hidden)

    result = pytester.run("unshare", "--mount", "--propagation", "private", "sh", "-c", covering + 'exec "$@"', "sh",
                          sys.executable, "-m", "pytest", f"--basetemp={pytester.path / 'basetemp'}", timeout=120)

    result.assert_outcomes(errors=1)
    assert ("no go command found (on PATH, nor /usr/lib/go/bin/go or /usr/local/go/bin/go): install Go 1.25.4 or "
            "later (https://go.dev/dl, or a distribution's golang-go of that version) and put its go command "
            "first on PATH") in result.stdout.str()


@pytest.fixture
def machine_caches(monkeypatch):
    """The machine's build caches for the downstream run, as a developer's own environment has them.

    pytester gives the run a HOME of its own (so that no user configuration leaks in); without this, the
    engine, Go's build cache and its module cache would all be made anew there, from the network.
    """
    home = pwd.getpwuid(os.getuid()).pw_dir
    go_env = subprocess.run([find_go(), "env", "GOPATH", "GOCACHE", "GOMODCACHE"], env={**os.environ, "HOME": home},
                            capture_output=True, text=True, timeout=60, check=True).stdout.split()
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME") or f"{home}/.cache")
    for key, value in zip(("GOPATH", "GOCACHE", "GOMODCACHE"), go_env, strict=True):
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_a_downstream_test_installs_into_the_service_beside_a_real_engine(pytester, machine_caches):
    pytester.makepyfile(test_downstream=textwrap.dedent(WITH_THE_ENGINE))

    # The engine is built once per machine: a cold build takes minutes, a warm run builds nothing.
    result = pytester.runpytest_subprocess("-s", timeout=1800)

    result.assert_outcomes(passed=1)
    pid, home = re.search(r"engine=(\d+) home=(\S+)", result.stdout.str()).groups()
    assert Path(home).is_relative_to(pytester.path)
    assert (Path(home) / "plugins" / "portable" / "echoes" / "echoes.py").is_file()
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_the_engine_home_starts_from_ekuipers_own_shipped_etc(kuiperd_build):
    """A home is laid out from the etc/ of the eKuiper module kuiperd is built from (on a cold Go module cache the
    fixture once copied the clone's own etc/ instead, and every engine test then failed on a missing kuiper.yaml)."""
    shipped = yaml.safe_load((kuiperd_build.shipped_etc / "kuiper.yaml").read_text())
    assert shipped["basic"]["restPort"] == 9081
    assert shipped["portable"]["pythonBin"] == "python"
    assert (kuiperd_build.shipped_etc / "sources").is_dir()
    assert not (kuiperd_build.shipped_etc / "kuiper-plugins.yaml").exists()


@pytest.mark.parametrize("taken, failure", [
    ("rest", "panic: listen tcp"),  # the REST server's bind fails in a goroutine: a Go panic
    ("rpc", "level=fatal"),  # the rpc server's bind fails first at start: a fatal log line
])
def test_kuiperd_whose_port_was_taken_before_it_bound_it_starts_again_on_new_ports(
        kuiperd_build, sdk_python, tmp_path, monkeypatch, taken, failure):
    """The fixture's answer to L39 (rpc port) and to a clean clone of 6253e5f (REST port): another process took a
    port between free_port() and kuiperd's bind. The engine starts again on new ports, and the first start's
    panic or fatal line, which is the retry's cause and not the engine's fault, does not fail the teardown."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # the picks are the REST port, then the rpc port, then the HTTP data server's
        picks = iter([port] if taken == "rest" else [engine_module.free_port(), port])
        real = engine_module.free_port
        monkeypatch.setattr(engine_module, "free_port", lambda: next(picks, None) or real())
        engines = Engines(kuiperd_build, sdk_python, tmp_path)
        try:
            engine = engines.start()
            assert engine.get("/").status_code == 200
            assert port not in (engine.rest_port, engine.cli_port, engine.http_server_port)
            log = engine.log_path.read_text(errors="replace")
            assert f"listen tcp 127.0.0.1:{port}: bind: address already in use" in log
            assert failure in log.partition("a port was taken before kuiperd bound it")[0]
            assert "a port was taken before kuiperd bound it: new ports, attempt 2" in log
        finally:
            engines.stop_all()
