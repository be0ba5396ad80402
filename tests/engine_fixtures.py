"""The repository's own plugins for the real eKuiper engine, and a sink for its rules' output.

The engine itself (kuiperd 2.4.0 built from Go modules, cached once per machine) and the fixtures that run
it (`kuiperd_build`, `start_kuiperd`, `kuiperd`, `sdk_python`) are kuiper_plugins.testing's, the pytest
plugin the package ships. The plugins here are built inside the engine's Go module by that plugin's
`build_go_package`, so they link exactly the package versions the engine links, as Go's plugin.Open
demands; their sources are in tests/go/kuiperd/<package>.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from kuiper_plugins.testing.engine import (
    PLUGIN_FLAGS,
    PORTABLE_FLAGS,
    BuildCache,
    Say,
    build_go_package,
    cache_root,
    engine_go,
    go_package_key,
    go_version,
    terminal,
)

__all__ = [
    "go_portable",
    "mixed_plugin",
    "multi_plugin",
    "multi_plugin_v2",
    "sink_server",
]

SOURCES = Path(__file__).resolve().parent / "go" / "kuiperd"


@dataclass(frozen=True)
class NativePlugin:
    """A native plugin packaged as eKuiper expects: the zip, the .so file name in it, its functions."""

    zip_path: Path
    so_name: str
    functions: tuple[str, ...]
    built_in: float | None


def build_native_plugin(request, package: str, functions: tuple[str, ...], version: str = "1.0.0",
                        tags: tuple[str, ...] = ()) -> NativePlugin:
    """Build tests/go/kuiperd/<package> (with the build tags given) as <Package>@v<version>.so in <package>.zip.

    Cached like kuiperd; the key is the engine's, the package's Go files and the plugin flags: a plugin is
    rebuilt whenever the engine it must load into is.
    """
    return native_plugin(terminal(request), package, functions, version, tags)


def native_plugin(say: Say, package: str, functions: tuple[str, ...], version: str = "1.0.0",
                  tags: tuple[str, ...] = ()) -> NativePlugin:
    """`build_native_plugin` outside pytest: `say` reports progress (bench/kuiperd.py builds with it)."""
    flags = (*PLUGIN_FLAGS, *(("-tags", ",".join(tags)) if tags else ()))
    folder = cache_root() / "plugins" / f"{package}-{go_package_key(go_version(engine_go()), SOURCES / package, flags)}"
    # eKuiper's naming: the plugin name, first letter upper-cased, @v<version>
    so_name = f"{package[0].upper()}{package[1:]}@v{version}.so"
    packaged = folder / f"{package}.zip"
    what = f"the {package} plugin{' (' + ','.join(tags) + ')' if tags else ''}"
    seconds = build_go_package(say, SOURCES / package, folder / so_name, flags, what)
    with BuildCache(say).locked(what):
        if not packaged.exists():
            with zipfile.ZipFile(folder / f"{package}.zip.partial", "w", zipfile.ZIP_DEFLATED) as archive:
                archive.write(folder / so_name, so_name)
            os.replace(folder / f"{package}.zip.partial", packaged)
    return NativePlugin(packaged, so_name, functions, seconds)


@pytest.fixture(scope="session")
def multi_plugin(request, kuiperd_build) -> NativePlugin:
    """Build tests/go/kuiperd/multi (functions twice and shout) as Multi@v1.0.0.so in multi.zip, cached."""
    return build_native_plugin(request, "multi", ("twice", "shout"))


@pytest.fixture(scope="session")
def multi_plugin_v2(request, kuiperd_build) -> NativePlugin:
    """The same plugin's next version, Multi@v2.0.0.so: built with the tag `loud`, its shout ends with "!"."""
    return build_native_plugin(request, "multi", ("twice", "shout"), version="2.0.0", tags=("loud",))


@pytest.fixture(scope="session")
def mixed_plugin(request, kuiperd_build) -> NativePlugin:
    """Build tests/go/kuiperd/mixed as Mixed@v1.0.0.so in mixed.zip, cached: `good` is callable, `stale` is not.

    Stale's Exec has the argument order of the contract before v2, so the symbol is not an api.Function.
    """
    return build_native_plugin(request, "mixed", ("good", "stale"))


@dataclass(frozen=True)
class GoPortable:
    """A real Go portable plugin executable (tests/go/kuiperd/goportable); its name is its file name."""

    binary: Path
    built_in: float | None


@pytest.fixture(scope="session")
def go_portable(request) -> GoPortable:
    """Build tests/go/kuiperd/goportable once per machine, cached by the module's go.mod, go.sum and its source.

    It needs no engine: it is built in the engine's module only so that its mangos is the engine's.
    """
    folder = cache_root() / "plugins"
    key = go_package_key(go_version(engine_go()), SOURCES / "goportable", PORTABLE_FLAGS)
    binary = folder / f"goportable-{key}" / "goportable"
    seconds = build_go_package(terminal(request), SOURCES / "goportable", binary, PORTABLE_FLAGS,
                               "the Go portable plugin")
    return GoPortable(binary, seconds)


# ---------------------------------------------------------------------------- where the rules' output goes

class SinkServer:
    """A loopback HTTP server that keeps the JSON body of every POST, for eKuiper's REST sink."""

    def __init__(self):
        self.received: list[tuple[str, object]] = []
        self.arrived = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # keep pytest output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.arrived:
                    server.received.append((self.path, json.loads(body)))
                    server.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def bodies(self, path: str) -> list[object]:
        """What was posted to `path` so far."""
        with self.arrived:
            return [body for at, body in self.received if at == f"/{path.lstrip('/')}"]

    def wait_for(self, path: str, count: int, timeout: float) -> list[object]:
        """Wait (bounded) until `count` bodies came to `path`; return what came."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.bodies(path)) < count and time.monotonic() < deadline:
                self.arrived.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self.bodies(path)

    def start(self) -> SinkServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def sink_server():
    """A started SinkServer, stopped at teardown."""
    server = SinkServer().start()
    yield server
    server.stop()
