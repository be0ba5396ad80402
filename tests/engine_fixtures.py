"""A real eKuiper engine for the tests: kuiperd 2.4.0 built from Go modules, plugins for it, and a runner.

kuiperd is built as an ordinary dependency of a test-only Go module of ours (tests/go/kuiperd: its go.mod
requires github.com/lf-edge/ekuiper/v2 and nothing of eKuiper is kept in this repository). The test
plugins are built in that same module, so they link exactly the package versions the engine links, as
Go's plugin.Open demands. Builds go through the Go module proxy and the machine's Go; their results are
cached once per machine outside the clone (``$XDG_CACHE_HOME/kuiper-plugins``, else ``~/.cache``) under a
key of what went into them, and a file lock makes concurrent pytest processes build each key once. A cold
kuiperd build takes minutes, so it reports its progress on the terminal; a warm run builds nothing.

Every engine gets a home of its own (``KuiperBaseKey``), listens only on loopback, and runs with a private
/tmp (tests/private_tmp.py) so its portable-plugin sockets cannot meet another engine's.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

__all__ = [
    "go_portable",
    "kuiperd",
    "kuiperd_build",
    "mixed_plugin",
    "multi_plugin",
    "multi_plugin_v2",
    "sdk_python",
    "sink_server",
    "start_kuiperd",
]

TESTS = Path(__file__).resolve().parent
MODULE = TESTS / "go" / "kuiperd"
EKUIPER = "github.com/lf-edge/ekuiper/v2"
EKUIPER_VERSION = "2.4.0"
# The flags eKuiper's release build uses for kuiperd; the plugins share -trimpath with it.
KUIPERD_FLAGS = (
    "-trimpath",
    "-ldflags",
    f"-X {EKUIPER}/cmd.Version={EKUIPER_VERSION} -X {EKUIPER}/cmd.LoadFileType=relative",
)
PLUGIN_FLAGS = ("-trimpath", "-buildmode=plugin")
PORTABLE_FLAGS = ("-trimpath",)  # a portable plugin is an ordinary executable, built as eKuiper's docs build one
BUILD_TIMEOUT = 1800  # a cold kuiperd build is ~4 min on 2 idle cores; a shared, loaded machine is slower
PROGRESS_EVERY = 15.0
START_TIMEOUT = 60
STOP_TIMEOUT = 20  # kuiperd's shipped gracefulShutdownTimeout is 10 s
SDK_REQUIREMENT = "ekuiper>=2,<3"  # eKuiper's Python SDK; it brings the pynng version it was made with


# ---------------------------------------------------------------------------- building, once per machine

def cache_root() -> Path:
    """The machine's cache folder for what these tests build: outside any clone, shared by all of them."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kuiper-plugins"


def go_build_env() -> dict[str, str]:
    """The environment of every engine build: this machine's Go and C compiler, go.mod and go.sum as given."""
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOWORK": "off",
        "GO111MODULE": "on",
        # a build never edits go.mod or go.sum: what is committed is what is built
        "GOFLAGS": "-mod=readonly",
        # Go's plugin package needs cgo, in the engine and in every plugin
        "CGO_ENABLED": "1",
    }
    for key in ("GOOS", "GOARCH", "CC", "GOAMD64", "GOEXPERIMENT"):
        env.pop(key, None)  # built for this machine, as the engine that loads the plugins is
    return env


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[bytes]:
    return [str(path.relative_to(MODULE)).encode() + b"\0" + path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name.endswith(suffixes)]


def kuiperd_key(go_version: str) -> str:
    """The cache key of the engine: go.mod, go.sum, the stub modules, `go version` and the build flags."""
    return _digest(
        (MODULE / "go.mod").read_bytes(),
        (MODULE / "go.sum").read_bytes(),
        *_files(MODULE / "stubs", (".go", ".mod")),
        go_version.encode(),
        repr(KUIPERD_FLAGS).encode(),
    )


class BuildCache:
    """The machine's cache of engine builds: one lock for all of it, and go builds that report progress."""

    def __init__(self, say: Callable[[str], None]):
        self.root = cache_root()
        self.say = say

    @contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """Hold the cache-wide lock: one engine build on the machine at a time, each key built once."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another test process that is building in {self.root} (for {what})")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def run_go(self, what: str, command: list[str], log_path: Path) -> float:
        """Run a go build, saying on the terminal how it is going; fail with the end of its output."""
        started = time.monotonic()
        with open(log_path, "wb") as log:
            build = subprocess.Popen(
                ["nice", "-n", "10", *command], cwd=MODULE, env=go_build_env(),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            said = started
            while True:
                try:
                    build.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now - started > BUILD_TIMEOUT:
                    os.killpg(build.pid, signal.SIGKILL)
                    build.wait(timeout=30)
                    pytest.fail(f"{what}: no result within {BUILD_TIMEOUT} s:\n{_tail(log_path)}")
                if now - said >= PROGRESS_EVERY:
                    said = now
                    # with -v go names each package it builds, one a line
                    built = sum(1 for line in log_path.read_text(errors="replace").splitlines()
                                if line and not line.startswith("go: "))
                    self.say(f"{what}: {now - started:.0f} s, {built} packages so far")
        if build.returncode != 0:
            pytest.fail(f"{what} failed (exit status {build.returncode}); the end of its output:\n{_tail(log_path)}")
        return time.monotonic() - started


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _go() -> str:
    from conftest import find_go

    return find_go()


def _go_version(go: str) -> str:
    done = subprocess.run([go, "version"], env=go_build_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _terminal(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """A function printing a line on the terminal, past pytest's output capture."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def say(text: str) -> None:
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            if reporter is not None:
                reporter.write_line(f"[engine build] {text}")
            else:
                print(f"[engine build] {text}", file=sys.stderr, flush=True)

    return say


@dataclass(frozen=True)
class KuiperdBuild:
    """The built engine and eKuiper's shipped etc/ folder of the same version (kuiper.yaml and its defaults)."""

    binary: Path
    shipped_etc: Path
    built_in: float | None


@pytest.fixture(scope="session")
def kuiperd_build(request) -> KuiperdBuild:
    """Build kuiperd once per machine (cached outside the clone by go.mod, go.sum and `go version`)."""
    return build_kuiperd(_terminal(request))


def build_kuiperd(say: Callable[[str], None]) -> KuiperdBuild:
    """Build kuiperd once per machine, or find it built; `say` reports progress (the fixture, and bench/run.py)."""
    assert shutil.which("cc"), "a C compiler is needed: Go plugins need cgo (Debian's gcc)"
    go = _go()
    cache = BuildCache(say)
    folder = cache.root / "kuiperd" / kuiperd_key(_go_version(go))
    binary, shipped_etc = folder / "kuiperd", folder / "etc"
    with cache.locked("kuiperd"):
        folder.mkdir(parents=True, exist_ok=True)
        if not shipped_etc.is_dir():
            # eKuiper's etc/ as released (kuiper.yaml, the sources' default settings, the sinks' metadata),
            # from the module the engine is built from: an engine home starts as an installed eKuiper's does
            done = subprocess.run(
                [go, "list", "-m", "-f", "{{.Dir}}", EKUIPER], cwd=MODULE, env=go_build_env(),
                capture_output=True, text=True, timeout=120,
            )
            assert done.returncode == 0, done.stderr
            shutil.rmtree(folder / "etc.partial", ignore_errors=True)
            # copyfile, not copy: the module cache's files and folders are read-only, ours must not be
            shutil.copytree(Path(done.stdout.strip()) / "etc", folder / "etc.partial", copy_function=shutil.copyfile)
            for path in (folder / "etc.partial").rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            (folder / "etc.partial").chmod(0o755)
            os.replace(folder / "etc.partial", shipped_etc)
        if binary.exists():
            return KuiperdBuild(binary, shipped_etc, None)
        say(f"building kuiperd {EKUIPER_VERSION} into {folder} (a few minutes on a cold cache; done once)")
        partial = folder / "kuiperd.partial"
        seconds = cache.run_go(
            "building kuiperd",
            [go, "build", "-v", *KUIPERD_FLAGS, "-o", str(partial), f"{EKUIPER}/cmd/kuiperd"],
            folder / "build.log",
        )
        os.replace(partial, binary)
        say(f"built kuiperd in {seconds:.0f} s")
        return KuiperdBuild(binary, shipped_etc, seconds)


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
    return native_plugin(_terminal(request), package, functions, version, tags)


def native_plugin(say: Callable[[str], None], package: str, functions: tuple[str, ...], version: str = "1.0.0",
                  tags: tuple[str, ...] = ()) -> NativePlugin:
    """`build_native_plugin` outside pytest: `say` reports progress (bench/run.py builds with it)."""
    go = _go()
    cache = BuildCache(say)
    flags = (*PLUGIN_FLAGS, *(("-tags", ",".join(tags)) if tags else ()))
    key = _digest(kuiperd_key(_go_version(go)).encode(), *_files(MODULE / package, (".go",)), repr(flags).encode())
    folder = cache.root / "plugins" / f"{package}-{key}"
    # eKuiper's naming: the plugin name, first letter upper-cased, @v<version>
    so_name = f"{package[0].upper()}{package[1:]}@v{version}.so"
    packaged = folder / f"{package}.zip"
    what = f"the {package} plugin{' (' + ','.join(tags) + ')' if tags else ''}"
    with cache.locked(what):
        if packaged.exists():
            return NativePlugin(packaged, so_name, functions, None)
        folder.mkdir(parents=True, exist_ok=True)
        say(f"building {what} into {folder}")
        partial = folder / f"{package}.so.partial"
        seconds = cache.run_go(f"building {what}", [go, "build", "-v", *flags, "-o", str(partial), f"./{package}"],
                               folder / "build.log")
        with zipfile.ZipFile(folder / f"{package}.zip.partial", "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(partial, so_name)
        os.replace(folder / f"{package}.zip.partial", packaged)
        partial.unlink()
        say(f"built {what} in {seconds:.0f} s")
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
    go = _go()
    say = _terminal(request)
    cache = BuildCache(say)
    key = _digest(
        kuiperd_key(_go_version(go)).encode(), *_files(MODULE / "goportable", (".go",)), repr(PORTABLE_FLAGS).encode()
    )
    folder = cache.root / "plugins" / f"goportable-{key}"
    binary = folder / "goportable"
    with cache.locked("the Go portable plugin"):
        if binary.exists():
            return GoPortable(binary, None)
        folder.mkdir(parents=True, exist_ok=True)
        say(f"building the Go portable plugin into {folder}")
        partial = folder / "goportable.partial"
        seconds = cache.run_go(
            "building the Go portable plugin",
            [go, "build", "-v", *PORTABLE_FLAGS, "-o", str(partial), "./goportable"],
            folder / "build.log",
        )
        os.replace(partial, binary)
        say(f"built the Go portable plugin in {seconds:.0f} s")
        return GoPortable(binary, seconds)


# ---------------------------------------------------------------------------- eKuiper's Python SDK

@pytest.fixture(scope="session")
def sdk_python(request, tmp_path_factory) -> Path:
    """A Python with eKuiper's SDK (`ekuiper` from PyPI) installed: built once, kept in the pytest cache."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    root = cache.mkdir("portable-sdk-venv") if cache is not None else tmp_path_factory.mktemp("sdk")
    venv = root / "venv"
    python = venv / "bin" / "python"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building it
        if not _has_sdk(python):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True)
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", SDK_REQUIREMENT],
                timeout=600, capture_output=True, text=True,
            )
            assert done.returncode == 0, f"pip install {SDK_REQUIREMENT} failed:\n{done.stdout}\n{done.stderr}"
            assert _has_sdk(python)
    return python


def _has_sdk(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", "import ekuiper, pynng"], capture_output=True, timeout=60)
    return done.returncode == 0


# ---------------------------------------------------------------------------- a running kuiperd

class Kuiperd:
    """A real kuiperd on loopback ports, with a home of its own and a private /tmp; its output in a log file."""

    def __init__(self, build: KuiperdBuild, home: Path, log_path: Path, python_bin: Path):
        from conftest import free_port

        self.build = build
        self.home = home
        self.log_path = log_path
        self.python_bin = python_bin
        self.rest_port = free_port()
        self.cli_port = free_port()
        self.http_server_port = free_port()
        self.url = f"http://127.0.0.1:{self.rest_port}"
        self.process: subprocess.Popen | None = None

    @property
    def uploads(self) -> Path:
        """The engine's data/uploads folder, where files named by file:// URLs are put."""
        return self.home / "data" / "uploads"

    @property
    def push_url(self) -> str:
        """The base of the engine's HTTP data server (httppush sources' endpoints)."""
        return f"http://127.0.0.1:{self.http_server_port}"

    def config(self) -> dict:
        """eKuiper's shipped kuiper.yaml, changed so that the engine binds loopback only and runs our SDK."""
        config = yaml.safe_load((self.build.shipped_etc / "kuiper.yaml").read_text())
        config["basic"].update(
            ip="127.0.0.1", port=self.cli_port,
            restIp="127.0.0.1", restPort=self.rest_port,
            pprof=False, pprofIp="127.0.0.1",
            prometheus=False,
            # one stream for the engine's log and a Go panic, read by log() when an assertion fails
            consoleLog=True, fileLog=False,
            # eKuiper refuses to connect to loopback and private addresses unless told to (its SSRF guard);
            # the REST sinks of these tests post to a server on 127.0.0.1, which is the only place they reach
            enablePrivateNet=True,
            # where the engine lists prebuilt plugins from (only when asked): kept on this machine
            pluginHosts="http://127.0.0.1:9",
        )
        config["basic"]["syslog"]["enable"] = False
        config["source"].update(httpServerIp="127.0.0.1", httpServerPort=self.http_server_port)
        config["portable"]["pythonBin"] = str(self.python_bin)
        return config

    def prepare(self) -> None:
        """Lay out the engine's home: eKuiper's shipped etc/ with our kuiper.yaml, and the folders it expects."""
        shutil.copytree(self.build.shipped_etc, self.home / "etc", dirs_exist_ok=True)
        # kuiperd looks for each missing folder in the parents of its home too: all are made here
        for folder in ("data/uploads", "log", "plugins/sources", "plugins/sinks", "plugins/functions",
                       "plugins/portable", "plugins/wasm"):
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        (self.home / "etc" / "kuiper.yaml").write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def command(self) -> list[str]:
        """kuiperd in a mount namespace of its own, behind tests/private_tmp.py's fresh /tmp."""
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare.append("--map-root-user")  # an unprivileged user may mount in a user namespace of its own
        keep = [self.home, self.python_bin.parent.parent, self.build.binary.parent]
        return [*unshare, sys.executable, str(TESTS / "private_tmp.py"), *map(str, keep), "--",
                str(self.build.binary)]

    def start(self) -> Kuiperd:
        """Start kuiperd and wait (bounded) until its REST API answers; fail with its log if it does not."""
        self.prepare()
        # KUIPER__* variables would override the engine's kuiper.yaml (they are its own), and KUIPER_HOME and
        # KUIPER_PLUGINS* are the service's
        env = {key: value for key, value in os.environ.items() if not key.startswith("KUIPER")}
        env["KuiperBaseKey"] = str(self.home)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.home, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kuiperd exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/", timeout=5).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)  # polling for readiness, bounded by the deadline
        raise AssertionError(f"kuiperd did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; then end whatever it started (portable plugins)."""
        if self.process is None:
            return
        if self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            if not self._exited(STOP_TIMEOUT):
                self._log.write(f"\n[test] kuiperd did not stop within {STOP_TIMEOUT} s of SIGTERM\n".encode())
                os.killpg(self.process.pid, signal.SIGKILL)
            # The plugin processes the engine started are in its process group (start_new_session made it the
            # leader). Until kuiperd is reaped its id, and so the group's, cannot be given to anyone else.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        self._log.close()

    def _exited(self, timeout: float) -> bool:
        """Wait (bounded) until kuiperd has exited, leaving it unreaped; say whether it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.05)  # polling the exit, bounded by the deadline
        return False

    def log(self) -> str:
        """The end of the engine's output."""
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: dict) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=60)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(f"{self.url}{path}", timeout=60)


@pytest.fixture
def start_kuiperd(tmp_path, kuiperd_build, sdk_python):
    """Start kuiperd engines (on a home given, else tmp_path/engine); each is stopped at teardown.

    A test fails if an engine's output shows a Go panic or a fatal runtime error.
    """
    started: list[Kuiperd] = []

    def start(home: Path | None = None) -> Kuiperd:
        index = len(started)
        engine = Kuiperd(kuiperd_build, home or tmp_path / f"engine{index or ''}",
                         tmp_path / f"kuiperd{index or ''}.log", sdk_python)
        started.append(engine)  # stopped at teardown even when it fails to start
        return engine.start()

    yield start
    for engine in started:
        engine.stop()
    for engine in started:
        output = engine.log_path.read_text(errors="replace") if engine.log_path.exists() else ""
        assert "panic:" not in output and "fatal error:" not in output, engine.log()


@pytest.fixture
def kuiperd(start_kuiperd) -> Kuiperd:
    """One running kuiperd on a fresh home."""
    return start_kuiperd()


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
