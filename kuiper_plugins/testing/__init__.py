"""A pytest plugin for integration harnesses: the real kuiper-plugins service, a real eKuiper, plugin zips to install.

Installed with the package (`pip install 'kuiper-plugins[testing]'`), it is found through the `pytest11` entry
point, so a test only names its fixtures:

* `kuiper_service`: the service under real gunicorn (the package's own gunicorn config, two workers) on a free
  loopback port with a temporary home, stopped after the test; `start_kuiper_service(workers=2, **env)` starts
  one with other settings (`KUIPER_PLUGINS__SECTION__KEY="..."`). It may download from `file_server`.
* `kuiper_service_with_engine`: the same beside a real kuiperd on the same home (`.service`, `.engine`): the
  service finds the engine's kuiper.yaml and hands it what it installs. The engine is built once per machine
  from Go modules (Go, a C compiler and the Go module proxy are needed; minutes the first time).
  `kuiperd`, `start_kuiperd` and `kuiperd_build` give the engine alone.
* `file_server`: a loopback HTTP server serving `file_server.root`; `file_server.url(name)` is an install's
  `file`, `file_server.requests` what it was asked.

The builders `native_plugin_zip` and `portable_plugin_zip` write packages the service's own package rules
accept (they are checked with them); `make_zip` writes any zip. Everything listens on 127.0.0.1 only, every
wait is bounded, and a service whose log shows a traceback fails the test that started it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kuiper_plugins.testing import engine
from kuiper_plugins.testing.engine import (
    Engines,
    Kuiperd,
    KuiperdBuild,
    build_go_package,
    build_kuiperd,
    cache_root,
    find_go,
    terminal,
)
from kuiper_plugins.testing.file_server import FileServer
from kuiper_plugins.testing.plugin_zips import check_plugin_zip, make_zip, native_plugin_zip, portable_plugin_zip
from kuiper_plugins.testing.service import GUNICORN_CONFIG, Gunicorn, Services, free_port

__all__ = [
    "GUNICORN_CONFIG",
    "BesideEngine",
    "FileServer",
    "Gunicorn",
    "Kuiperd",
    "KuiperdBuild",
    "build_go_package",
    "cache_root",
    "check_plugin_zip",
    "file_server",
    "find_go",
    "free_port",
    "kuiper_service",
    "kuiper_service_with_engine",
    "kuiperd",
    "kuiperd_build",
    "make_zip",
    "native_plugin_zip",
    "portable_plugin_zip",
    "sdk_python",
    "start_kuiper_service",
    "start_kuiperd",
]


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    """A real HTTP server on 127.0.0.1 serving tmp_path/'served'."""
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_kuiper_service(tmp_path: Path, file_server: FileServer) -> Iterator[Callable[..., Gunicorn]]:
    """Start services on tmp_path/'home' (`start(workers=2, **env)`); each is stopped after the test.

    Downloads from `file_server` are allowed (basic.privateNetAllowList); every other setting is the
    service's default unless `env` says otherwise. The log is tmp_path/'gunicorn.log'.
    """
    services = Services(tmp_path / "home", tmp_path / "gunicorn.log",
                        {"KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST": f"127.0.0.1:{file_server.port}"})
    yield services.start
    services.stop_all()


@pytest.fixture
def kuiper_service(start_kuiper_service: Callable[..., Gunicorn]) -> Gunicorn:
    """One running service (`.url`, `.home`, `.log()`), with its default settings."""
    return start_kuiper_service()


@pytest.fixture(scope="session")
def kuiperd_build(request: pytest.FixtureRequest) -> KuiperdBuild:
    """kuiperd, built once per machine (cached outside the clone by go.mod, go.sum and `go version`)."""
    return build_kuiperd(terminal(request))


@pytest.fixture(scope="session")
def sdk_python(request: pytest.FixtureRequest) -> Path:
    """A Python with eKuiper's SDK (`ekuiper` from PyPI), made once per machine; the engine runs portables on it."""
    return engine.sdk_python(terminal(request))


@pytest.fixture
def start_kuiperd(tmp_path: Path, kuiperd_build: KuiperdBuild, sdk_python: Path) -> Iterator[Callable[..., Kuiperd]]:
    """Start kuiperd engines (on a home given, else tmp_path/engine); each is stopped after the test.

    A test fails if an engine's output shows a Go panic or a fatal runtime error.
    """
    engines = Engines(kuiperd_build, sdk_python, tmp_path)
    yield engines.start
    engines.stop_all()


@pytest.fixture
def kuiperd(start_kuiperd: Callable[..., Kuiperd]) -> Kuiperd:
    """One running kuiperd on a fresh home."""
    return start_kuiperd()


@dataclass(frozen=True)
class BesideEngine:
    """A service and the real engine whose home it shares."""

    service: Gunicorn
    engine: Kuiperd


@pytest.fixture
def kuiper_service_with_engine(tmp_path: Path, start_kuiperd: Callable[..., Kuiperd],
                               start_kuiper_service: Callable[..., Gunicorn]) -> BesideEngine:
    """A running kuiperd and the service beside it on the same home; the service is stopped first."""
    # The fixtures above end in the reverse of this order: the service stops while its engine still answers.
    started = start_kuiperd(home=tmp_path / "home")
    return BesideEngine(start_kuiper_service(), started)
