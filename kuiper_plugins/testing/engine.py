"""A real eKuiper engine for tests: kuiperd 2.4.0 built from Go modules, plugins built against it, and a runner.

kuiperd is built as an ordinary dependency of a Go module shipped in this package (`kuiperd/`: its go.mod
requires github.com/lf-edge/ekuiper/v2, two empty stand-ins replace modules the proxy refuses; nothing of
eKuiper is kept here). The build happens in a copy of that module in the machine's cache, since the
installed package may be read-only, and plugins for the engine are built in the same copy (their source
folder placed beside go.mod), so they link exactly the package versions the engine links, as Go's
plugin.Open demands. Builds go through the Go module proxy and the machine's Go; their results are cached
once per machine, outside any clone (``$XDG_CACHE_HOME/kuiper-plugins``, else ``~/.cache``), under a key
of what went into them, and a file lock makes concurrent pytest processes build each key once. A cold
kuiperd build takes minutes, so it reports its progress; a warm run builds nothing.

Every engine gets a home of its own (``KuiperBaseKey``), listens only on loopback, and runs with a private
/tmp (private_tmp.py) so its portable-plugin sockets cannot meet another engine's. Its portable Python
plugins run on a Python with eKuiper's SDK, installed from PyPI once per machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from kuiper_plugins.testing.service import free_port

MODULE = Path(__file__).resolve().parent / "kuiperd"
PRIVATE_TMP = Path(__file__).resolve().parent / "private_tmp.py"
MODULE_FILES = ("go.mod", "go.sum", "tools.go", "stubs")  # the module as shipped; plugin folders join a copy
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
PORT_ATTEMPTS = 3  # starts of kuiperd on ports picked anew, when one was taken before it bound it
PORT_TAKEN = "bind: address already in use"  # Go's words, in kuiperd's fatal line (rpc port) or panic (REST port)
RESTARTED = "[test] a port was taken before kuiperd bound it"  # the fixture's line before it starts kuiperd again
STOP_TIMEOUT = 20  # kuiperd's shipped gracefulShutdownTimeout is 10 s
SDK_REQUIREMENT = "ekuiper>=2,<3"  # eKuiper's Python SDK; it brings the pynng version it was made with

Say = Callable[[str], None]


# ---------------------------------------------------------------------------- Go, and the machine's cache

def cache_root() -> Path:
    """The machine's cache folder for what these tests build: outside any clone, shared by all of them."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kuiper-plugins"


def find_go() -> str:
    """Return the go command: on PATH, else Debian's golang-go or the upstream tarball's place; fail without it."""
    known = ("/usr/lib/go/bin/go", "/usr/local/go/bin/go")
    go = shutil.which("go") or next((path for path in known if os.path.exists(path)), None)
    if not go:
        pytest.fail(f"no go command found (on PATH, nor {' or '.join(known)}): {go_install_hint()}", pytrace=False)
    return go


def required_go() -> str:
    """The Go version the engine's module asks for (its go.mod's `go` line)."""
    return re.search(r"^go (\d+(?:\.\d+)*)$", (MODULE / "go.mod").read_text(), re.MULTILINE).group(1)


def go_install_hint() -> str:
    """What to install to build the engine, in words."""
    return (f"install Go {required_go()} or later (https://go.dev/dl, or a distribution's golang-go of that "
            "version) and put its go command first on PATH")


def go_build_env() -> dict[str, str]:
    """The environment of every engine build: this machine's Go and C compiler, go.mod and go.sum as given."""
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOWORK": "off",
        "GO111MODULE": "on",
        # a build never edits go.mod or go.sum: what is shipped is what is built
        "GOFLAGS": "-mod=readonly",
        # Go's plugin package needs cgo, in the engine and in every plugin
        "CGO_ENABLED": "1",
    }
    for key in ("GOOS", "GOARCH", "CC", "GOAMD64", "GOEXPERIMENT"):
        env.pop(key, None)  # built for this machine, as the engine that loads the plugins is
    return env


def go_version(go: str) -> str:
    """`go version`'s line, which goes into every cache key."""
    done = subprocess.run([go, "version"], env=go_build_env(), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"`{go} version` failed: {done.stderr.strip()}", pytrace=False)
    return done.stdout.strip()


def engine_go() -> str:
    """The go command, checked to be as recent as the engine's module asks; fail saying what to install."""
    if not shutil.which("cc"):
        pytest.fail("a C compiler is needed: Go plugins need cgo, in kuiperd and in every plugin (on Debian: "
                    "apt-get install gcc)", pytrace=False)
    go = find_go()
    found = re.search(r"go(\d+(?:\.\d+)*)", go_version(go))
    if found is None or _numbers(found.group(1)) < _numbers(required_go()):
        pytest.fail(f"kuiperd {EKUIPER_VERSION} is built with Go {required_go()} or later, and {go} is "
                    f"{'Go ' + found.group(1) if found else 'of an unknown version'}: {go_install_hint()}",
                    pytrace=False)
    return go


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[bytes]:
    """Each file's path below `folder`'s parent and its bytes, for a cache key."""
    return [str(path.relative_to(folder.parent)).encode() + b"\0" + path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name.endswith(suffixes)]


def kuiperd_key(version: str) -> str:
    """The cache key of the engine: go.mod, go.sum, the stub modules, `go version` and the build flags."""
    return _digest(
        (MODULE / "go.mod").read_bytes(),
        (MODULE / "go.sum").read_bytes(),
        *_files(MODULE / "stubs", (".go", ".mod")),
        version.encode(),
        repr(KUIPERD_FLAGS).encode(),
    )


def go_package_key(version: str, source: Path, flags: tuple[str, ...]) -> str:
    """The cache key of a Go package built in the engine's module: the engine's key, its Go files, the flags.

    A plugin is rebuilt whenever the engine it must load into is.
    """
    return _digest(kuiperd_key(version).encode(), *_files(source, (".go",)), repr(flags).encode())


class BuildCache:
    """The machine's cache of engine builds: one lock for all of it, and go builds that report progress."""

    def __init__(self, say: Say):
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

    def module(self, version: str) -> Path:
        """A copy of the shipped Go module to build in, made once per key (hold the lock)."""
        tree = self.root / "module" / kuiperd_key(version)
        if not (tree / "go.mod").exists():
            partial = tree.with_name(tree.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in MODULE_FILES:
                source = MODULE / name
                if source.is_dir():
                    shutil.copytree(source, partial / name, copy_function=shutil.copyfile,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copyfile(source, partial / name)
            os.replace(partial, tree)
        return tree

    def run_go(self, what: str, command: list[str], log_path: Path, cwd: Path) -> float:
        """Run a go build in `cwd`, saying on the terminal how it is going; fail with the end of its output."""
        started = time.monotonic()
        with open(log_path, "wb") as log:
            build = subprocess.Popen(
                ["nice", "-n", "10", *command], cwd=cwd, env=go_build_env(),
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


def terminal(request: pytest.FixtureRequest) -> Say:
    """A function printing a line on the terminal, past pytest's output capture (a build's progress)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def say(text: str) -> None:
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            if reporter is not None:
                reporter.write_line(f"[engine build] {text}")
            else:
                print(f"[engine build] {text}", file=sys.stderr, flush=True)

    return say


# ---------------------------------------------------------------------------- building, once per machine

@dataclass(frozen=True)
class KuiperdBuild:
    """The built engine and eKuiper's shipped etc/ folder of the same version (kuiper.yaml and its defaults)."""

    binary: Path
    shipped_etc: Path
    built_in: float | None


def build_kuiperd(say: Say) -> KuiperdBuild:
    """Build kuiperd once per machine (cached outside the clone by go.mod, go.sum and `go version`)."""
    go = engine_go()
    version = go_version(go)
    cache = BuildCache(say)
    folder = cache.root / "kuiperd" / kuiperd_key(version)
    binary, shipped_etc = folder / "kuiperd", folder / "etc"
    with cache.locked("kuiperd"):
        module = cache.module(version)
        folder.mkdir(parents=True, exist_ok=True)
        if not (shipped_etc / "kuiper.yaml").is_file():
            # eKuiper's etc/ as released (kuiper.yaml, the sources' default settings, the sinks' metadata),
            # from the module the engine is built from: an engine home starts as an installed eKuiper's does.
            # `go mod download` fetches the module first; `go list -m` names no folder for a module not yet
            # downloaded, which on a cold cache once copied the clone's own etc/ here.
            done = subprocess.run(
                [go, "mod", "download", "-json", EKUIPER], cwd=module, env=go_build_env(),
                capture_output=True, text=True, timeout=600,
            )
            try:
                source = Path(json.loads(done.stdout)["Dir"]) / "etc"
            except (ValueError, KeyError, TypeError):
                source = None
            if done.returncode != 0 or source is None or not (source / "kuiper.yaml").is_file():
                pytest.fail(f"fetching {EKUIPER} {EKUIPER_VERSION} through the Go module proxy failed:\n"
                            f"{done.stdout}{done.stderr}")
            shutil.rmtree(shipped_etc, ignore_errors=True)  # a copy of something else, from before that fix
            shutil.rmtree(folder / "etc.partial", ignore_errors=True)
            # copyfile, not copy: the module cache's files and folders are read-only, ours must not be
            shutil.copytree(source, folder / "etc.partial", copy_function=shutil.copyfile)
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
            folder / "build.log", module,
        )
        os.replace(partial, binary)
        say(f"built kuiperd in {seconds:.0f} s")
        return KuiperdBuild(binary, shipped_etc, seconds)


def build_go_package(say: Say, source: Path, output: Path, flags: tuple[str, ...], what: str) -> float | None:
    """Build the Go package in the folder `source` inside the engine's module, into `output`, once per key.

    `flags` are go build's (PLUGIN_FLAGS for a native plugin, PORTABLE_FLAGS for a portable executable);
    `output` should lie in a folder named by `go_package_key`, so a changed engine or source builds anew.
    Returns the seconds the build took, None when `output` was already there.
    """
    if source.name in MODULE_FILES:
        raise ValueError(f"a Go package to build in the engine's module cannot be named {source.name!r}: the "
                         "module's own files have that name")
    go = engine_go()
    version = go_version(go)
    cache = BuildCache(say)
    with cache.locked(what):
        if output.exists():
            return None
        module = cache.module(version)
        # The package joins the module as a folder beside go.mod, as it would in a checkout of the module.
        placed = module / source.name
        shutil.rmtree(placed, ignore_errors=True)
        shutil.copytree(source, placed, copy_function=shutil.copyfile)
        output.parent.mkdir(parents=True, exist_ok=True)
        say(f"building {what} into {output.parent}")
        partial = output.with_name(output.name + ".partial")
        seconds = cache.run_go(f"building {what}", [go, "build", "-v", *flags, "-o", str(partial), f"./{source.name}"],
                               output.with_name(output.name + ".build.log"), module)
        os.replace(partial, output)
        say(f"built {what} in {seconds:.0f} s")
        return seconds


# ---------------------------------------------------------------------------- eKuiper's Python SDK

def sdk_python(say: Say) -> Path:
    """A Python with eKuiper's SDK (`ekuiper` from PyPI) installed: made once per machine and Python, cached."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    key = _digest(base.encode(), sys.version.encode(), SDK_REQUIREMENT.encode())
    cache = BuildCache(say)
    venv = cache.root / "sdk-python" / key
    python = venv / "bin" / "python"
    with cache.locked("eKuiper's Python SDK"):
        if _has_sdk(python):
            return python
        say(f"installing eKuiper's Python SDK ({SDK_REQUIREMENT}) into {venv}")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", SDK_REQUIREMENT],
            timeout=600, capture_output=True, text=True,
        )
        if done.returncode != 0 or not _has_sdk(python):
            pytest.fail(f"pip install {SDK_REQUIREMENT} failed:\n{done.stdout}\n{done.stderr}")
        return python


def _has_sdk(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", "import ekuiper, pynng"], capture_output=True, timeout=60)
    return done.returncode == 0


# ---------------------------------------------------------------------------- a running kuiperd

class _PortTaken(Exception):
    """kuiperd exited at start because a port picked for it was taken meanwhile."""


class Kuiperd:
    """A real kuiperd on loopback ports, with a home of its own and a private /tmp; its output in a log file."""

    def __init__(self, build: KuiperdBuild, home: Path, log_path: Path, python_bin: Path):
        self.build = build
        self.home = home
        self.log_path = log_path
        self.python_bin = python_bin
        self._pick_ports()
        self.process: subprocess.Popen | None = None

    def _pick_ports(self) -> None:
        self.rest_port = free_port()
        self.cli_port = free_port()
        self.http_server_port = free_port()
        self.url = f"http://127.0.0.1:{self.rest_port}"

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
        """kuiperd in a mount namespace of its own, behind private_tmp.py's fresh /tmp."""
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare.append("--map-root-user")  # an unprivileged user may mount in a user namespace of its own
        keep = [self.home, self.python_bin.parent.parent, self.build.binary.parent]
        return [*unshare, sys.executable, str(PRIVATE_TMP), *map(str, keep), "--", str(self.build.binary)]

    def start(self) -> Kuiperd:
        """Start kuiperd and wait (bounded) until its REST API answers; fail with its log if it does not.

        A port found free can be taken by another process (a client's outgoing connection gets one from the
        same range) before kuiperd binds it: kuiperd then exits at once, saying so, and is started again on
        ports picked anew, PORT_ATTEMPTS times at most.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start_once()
            except _PortTaken:
                if attempt == PORT_ATTEMPTS:
                    raise AssertionError(f"kuiperd found a port taken {PORT_ATTEMPTS} times:\n{self.log()}") from None
                self._log.write(f"\n{RESTARTED}: new ports, attempt {attempt + 1}\n".encode())
                self._log.close()
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start_once(self) -> Kuiperd:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
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
                if PORT_TAKEN in self.log_path.read_text(errors="replace")[log_start:]:
                    raise _PortTaken()
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

    def last_run_output(self) -> str:
        """The engine's output since its last start: a start that found its port taken ended in a panic or
        fatal line by design, and is not the engine's fault."""
        output = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return output.rpartition(RESTARTED)[2]

    def log(self) -> str:
        """The end of the engine's output."""
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def get(self, path: str) -> requests.Response:
        """GET from the engine's own REST API."""
        return requests.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: dict) -> requests.Response:
        """POST a JSON body to the engine's own REST API."""
        return requests.post(f"{self.url}{path}", json=body, timeout=60)

    def delete(self, path: str) -> requests.Response:
        """DELETE on the engine's own REST API."""
        return requests.delete(f"{self.url}{path}", timeout=60)


class Engines:
    """The engines one test starts; `stop_all` ends them and fails on a Go panic in their output."""

    def __init__(self, build: KuiperdBuild, python_bin: Path, folder: Path):
        self.build = build
        self.python_bin = python_bin
        self.folder = folder
        self.started: list[Kuiperd] = []

    def start(self, home: Path | None = None) -> Kuiperd:
        """Start kuiperd on `home` (else a fresh one in the test's folder) and wait until it answers."""
        index = len(self.started)
        engine = Kuiperd(self.build, home or self.folder / f"engine{index or ''}",
                         self.folder / f"kuiperd{index or ''}.log", self.python_bin)
        self.started.append(engine)  # stopped at the end even when it fails to start
        return engine.start()

    def stop_all(self) -> None:
        """Stop every engine started; then fail if an engine's output shows a Go panic or a fatal runtime error
        (since its last start: a start on a port taken meanwhile ends in one, and is retried)."""
        for engine in self.started:
            engine.stop()
        for engine in self.started:
            output = engine.last_run_output()
            assert "panic:" not in output and "fatal error:" not in output, engine.log()
