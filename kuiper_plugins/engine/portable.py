"""Would eKuiper's runtime get a portable plugin running? Start it as eKuiper does and wait for its handshake.

eKuiper's runtime, for every portable plugin it loads, listens on ``ipc:///tmp/plugin_<name>.ipc`` with an
nng Rep0 socket, starts ``<pythonBin> -u <exe> <json>`` (python) or ``<exe> <json>`` (go) in the
executable's folder, where ``<json>`` is ``{"sendTimeout":1000}``, and waits up to ``portable.initTimeout``
for one message from the plugin's Req0 socket: the SDKs send ``handshake``, and any message counts. It
does not answer the handshake; its first command later is the reply. `verify_handshake` does the same, then
stops the plugin and everything it started.

Confinement: the check runs in namespaces of its own, made by util-linux's ``unshare --pid --fork
--kill-child --mount --propagation private``. PID 1 there is a small Python program (``_HELPER``, run by
this Python, which has pynng) that mounts a fresh tmpfs on ``/tmp`` (so the socket can never meet a running
engine's sockets in the host's ``/tmp``), listens, starts the plugin, waits, and writes one JSON line with
the outcome on its stdout. When it exits, the kernel kills every other process in its PID namespace and
``unshare`` returns only once they are gone. The helper keeps its own deadline; past that plus a grace the
host kills ``unshare``, whose ``--kill-child`` takes the helper, and so the namespace, with it. Whether the
namespaces can be made here is probed once per process; where they cannot, every check is refused, never
run unconfined. This is not a sandbox: the plugin runs as the service's user and can write wherever that
user can, as it will when the engine starts it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kuiper_plugins.errors import PackageInvalid

log = logging.getLogger(__name__)

DEFAULT_PYTHON_BIN = "python"  # eKuiper's default for portable.pythonBin
DEFAULT_INIT_TIMEOUT = "60s"  # eKuiper's etc/kuiper.yaml value for portable.initTimeout
CONFIG_ARGUMENT = '{"sendTimeout":1000}'  # what eKuiper passes: its PortableConfig, marshalled by Go
MAX_INIT_TIMEOUT = 3600.0  # seconds; an install request waits this long at most for one plugin
TMPFS_OPTIONS = "mode=1777,size=64m"  # the plugin's private /tmp
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # when the service has no PATH
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")  # what the plugin gets of the service's environment
OUTPUT_LIMIT = 64 * 1024  # bytes of the plugin's output kept (the last ones)
TAIL_LINES = 20  # lines of output quoted in an error message
TAIL_CHARS = 2048  # characters of output quoted in an error message, at most

_SETUP_GRACE = 15.0  # seconds beyond init_timeout for the namespace, the mount and the listener
_REAP_TIMEOUT = 10.0  # waiting for a killed unshare to be reaped
_PROBE_TIMEOUT = 15.0
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

# unshare's options, tried in this order: as root; in a user namespace of its own (mapping the service's
# user to root there, which a mount needs) for anyone else; each with and without a /proc of its own.
_PRIVATE = ("--pid", "--fork", "--kill-child", "--mount", "--propagation", "private")
UNSHARE_OPTIONS = (
    (*_PRIVATE, "--mount-proc"),
    ("--user", "--map-root-user", *_PRIVATE, "--mount-proc"),
    _PRIVATE,
    ("--user", "--map-root-user", *_PRIVATE),
)

# PID 1 of the check's namespaces, run as `python -I -c _HELPER <spec json>`. It reports one JSON object
# on stdout. It never signals -1 unless it is PID 1, where that means "everyone in this PID namespace".
_HELPER = r"""
import ctypes, json, os, selectors, signal, subprocess, sys, time

spec = json.loads(sys.argv[1])
started = time.monotonic()


def finish(**report):
    report["elapsed"] = round(time.monotonic() - started, 3)
    data = json.dumps(report, ensure_ascii=False).encode()
    while data:
        data = data[os.write(1, data):]
    if os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


if os.getpid() != 1:
    finish(outcome="setup", error="not the first process of a PID namespace of its own")
host_tmp = os.stat("/tmp").st_dev
# Folders of the plugin that live below the host's /tmp are held open now and bound back at the same path
# once the private /tmp hides them.
kept = []
for path in spec.get("keep", ()):
    try:
        kept.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    except OSError as exc:
        finish(outcome="setup", error="cannot open " + path + ": " + exc.strerror)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 2 | 4, spec["tmpfs"].encode()) != 0:  # MS_NOSUID | MS_NODEV
    finish(outcome="setup", error="cannot mount a private /tmp: " + os.strerror(ctypes.get_errno()))
if os.stat("/tmp").st_dev == host_tmp or os.listdir("/tmp"):
    finish(outcome="setup", error="the private /tmp is not a fresh file system")
for path, fd in kept:
    os.makedirs(path, exist_ok=True)
    if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND|MS_REC
        finish(outcome="setup", error="cannot bind " + path + " into the private /tmp: "
               + os.strerror(ctypes.get_errno()))
    os.close(fd)
try:
    import pynng
except ImportError as exc:
    finish(outcome="setup", error="pynng cannot be imported: " + str(exc))
if spec["mode"] == "probe":
    finish(outcome="probed")

sock = pynng.Rep0()
try:
    sock.listen(spec["url"])
except pynng.NNGException as exc:
    finish(outcome="listen", error=str(exc))

output = bytearray()
total = 0
out_read, out_write = os.pipe()
try:
    plugin = subprocess.Popen(
        spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
        stdout=out_write, stderr=out_write, close_fds=True,
    )
except OSError as exc:
    finish(outcome="start", errno=exc.errno, filename=exc.filename)
os.close(out_write)
os.set_blocking(out_read, False)
started = time.monotonic()  # eKuiper's clock, too, starts once the process is started


def read_output():
    # One chunk of the plugin's output: its size (0 at the end), None if nothing is there now.
    global total
    try:
        data = os.read(out_read, 65536)
    except BlockingIOError:
        return None
    total += len(data)
    output.extend(data)
    if len(output) > spec["output_limit"]:
        del output[: len(output) - spec["output_limit"]]
    return len(data)


def drain():
    # Only what is already written: a process still holding the pipe must not keep us here.
    for _ in range(1024):
        if not read_output():
            return


def text():
    return {"output": output.decode("utf-8", errors="replace"), "output_bytes": total}


selector = selectors.DefaultSelector()
selector.register(sock.recv_fd, selectors.EVENT_READ, "control")
selector.register(out_read, selectors.EVENT_READ, "output")
deadline = started + spec["timeout"]
status = None
while True:
    # Reap the plugin and any orphan handed to us. Once the plugin is gone and nobody is left who could
    # still dial in, waiting on would only show eKuiper's timeout later.
    alone = False
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            alone = True
            break
        if pid == 0:
            break
        if pid == plugin.pid:
            status = wait_status
    if status is not None and alone:
        drain()
        finish(outcome="exited", status=os.waitstatus_to_exitcode(status), **text())
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        drain()
        finish(outcome="timeout", **text())
    for key, _ in selector.select(min(remaining, 0.05)):
        if key.data == "output":
            if read_output() == 0:
                selector.unregister(out_read)
            continue
        try:
            message = sock.recv(block=False)
        except pynng.TryAgain:
            continue
        drain()
        finish(outcome="handshake", message=message[:256].decode("latin-1"), **text())
"""


@dataclass(frozen=True)
class Handshake:
    """What a plugin did before it was stopped: its first control message and its output."""

    message: bytes
    elapsed: float  # seconds from the plugin's start to its handshake
    output: str


@dataclass(frozen=True)
class Namespaces:
    """How the check is confined on this machine: the command put before the helper, or why there is none."""

    command: tuple[str, ...]
    description: str

    @property
    def available(self) -> bool:
        return bool(self.command)


# ---------------------------------------------------------------------------- portable.initTimeout

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_MAX_GO_DURATION = (2**63 - 1) / 1e9


def parse_duration(value: str | int | float) -> float:
    """Return the seconds in `value`, a portable.initTimeout as eKuiper reads it; ValueError if it is not one.

    A text is read as Go's time.ParseDuration reads it (``60s``, ``1m30s``, ``500ms``); a whole number is
    milliseconds, as eKuiper reads a number in its YAML. The duration must be above zero and at most
    MAX_INIT_TIMEOUT (eKuiper turns zero or less into 5 µs, which no plugin can meet).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"portable.initTimeout must be a duration such as 60s, not {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"portable.initTimeout: duration {value!r} is not an integer (a number is milliseconds)")
        value = int(value)
    seconds = value / 1000 if isinstance(value, int) else _go_parse_duration(value)
    if not 0 < seconds <= MAX_INIT_TIMEOUT:
        raise ValueError(
            f"portable.initTimeout must be above 0 and at most {MAX_INIT_TIMEOUT:g}s, not {value!r}"
        )
    return seconds


def _go_parse_duration(text: str) -> float:
    """Go's time.ParseDuration: the same inputs accepted, the same error text for those refused."""
    quoted = _go_quote(text)
    invalid = ValueError(f"portable.initTimeout: time: invalid duration {quoted}")
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise invalid
    total = 0.0
    while rest:
        match = _DURATION_PART.match(rest)
        whole, fraction, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not fraction:
            raise invalid  # no digits at all, e.g. ".s" or "s"
        if not unit:
            raise ValueError(f"portable.initTimeout: time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            # Go takes as the unit everything up to the next digit or dot.
            raise ValueError(f"portable.initTimeout: time: unknown unit {_go_quote(unit)} in duration {quoted}")
        total += float(f"{whole or 0}.{fraction or 0}") * _DURATION_UNITS[unit]
        if total > _MAX_GO_DURATION:
            raise invalid
        rest = rest[match.end():]
    return -total if negative else total


def _go_quote(text: str) -> str:
    """strconv.Quote for the texts a setting can hold: backslash and double quote escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------- the command eKuiper runs

def control_url(name: str) -> str:
    """The control channel eKuiper listens on for plugin `name`."""
    return f"ipc:///tmp/plugin_{name}.ipc"


def plugin_command(
    name: str, language: str, executable: Path, *, python_bin: str,
    virtual_env_type: str | None = None, env_name: str | None = None, path: str = PLUGIN_PATH,
) -> list[str]:
    """Return the argument list eKuiper's runtime starts plugin `name` with; PackageInvalid where it would fail.

    `executable` is the absolute path of the descriptor's executable. A command without a slash is looked
    up in `path`, as Go's exec.Command does.
    """
    if language == "go":
        return [str(executable), CONFIG_ARGUMENT]
    if language != "python":
        raise PackageInvalid(f"fail to start plugin {name}: unsupported language: {language}")
    if virtual_env_type is not None:
        if virtual_env_type != "conda":
            raise PackageInvalid(f"fail to start plugin {name}: unsupported virtual type: {virtual_env_type}")
        conda = _look_path("conda", path, executable)
        return [conda, "run", "-n", env_name or "", python_bin, str(executable), CONFIG_ARGUMENT]
    return [_look_path(python_bin, path, executable), "-u", str(executable), CONFIG_ARGUMENT]


def _look_path(command: str, path: str, executable: Path) -> str:
    if "/" in command:
        return command
    found = shutil.which(command, path=path)
    if found is None:
        raise PackageInvalid(
            f'plugin executable {executable} stops with error exec: "{command}": executable file not found'
            f" in $PATH (the service looked in {path}; set portable.pythonBin to an absolute path)"
        )
    return found


# ---------------------------------------------------------------------------- confinement

def probe_namespaces(unshare: str = "unshare") -> Namespaces:
    """Find out whether `unshare` can make the check's namespaces here (PID, mount, a fresh /tmp)."""
    found = unshare if "/" in unshare else shutil.which(unshare, path=PLUGIN_PATH)
    if found is None or not os.access(found, os.X_OK):
        return Namespaces((), f"util-linux's unshare was not found ({unshare} is not an executable file)")
    failures = []
    for options in UNSHARE_OPTIONS:
        command = (found, *options, "--")
        report, problem = _run_helper(
            command, {"mode": "probe", "tmpfs": TMPFS_OPTIONS, "keep": _below_tmp(*_own_python())}, _PROBE_TIMEOUT
        )
        if report.get("outcome") == "probed":
            return Namespaces(command, f"namespaces of its own with a private /tmp ({' '.join(command[:-1])})")
        failures.append(f"{' '.join(options)}: {report.get('error') or problem}")
    return Namespaces((), f"{found} cannot make the namespaces here ({'; '.join(failures)})")


_probe_lock = threading.Lock()
_probed: dict[int, Namespaces] = {}  # this process's pid -> its probe's result (a forked child probes again)


def namespaces() -> Namespaces:
    """Return this machine's confinement for the check, probed once per process and logged when probed."""
    pid = os.getpid()
    with _probe_lock:
        found = _probed.get(pid)
        if found is None:
            found = probe_namespaces()
            _probed.clear()
            _probed[pid] = found
            if found.available:
                log.info("portable plugins will be started for their handshake in %s", found.description)
            else:
                log.warning("portable plugins cannot be checked for their handshake: %s", found.description)
    return found


# ---------------------------------------------------------------------------- the check

def verify_descriptor(
    plugin_dir: Path, name: str, descriptor: Mapping, *, python_bin: str, init_timeout: float,
    display_dir: Path | None = None,
) -> Handshake:
    """Run `verify_handshake` for a portable package unpacked in `plugin_dir`, its descriptor as read.

    `descriptor` is the package's ``<name>.json`` (``language``, ``executable``, optional ``virtualEnvType``
    and ``env``); the other arguments are verify_handshake's.
    """
    return verify_handshake(
        plugin_dir, name, str(descriptor.get("language", "")), str(descriptor.get("executable", "")),
        python_bin=python_bin, init_timeout=init_timeout, virtual_env_type=descriptor.get("virtualEnvType"),
        env_name=descriptor.get("env"), display_dir=display_dir,
    )


def verify_handshake(
    plugin_dir: Path, name: str, language: str, executable: str, *, python_bin: str, init_timeout: float,
    virtual_env_type: str | None = None, env_name: str | None = None, display_dir: Path | None = None,
    confined: Namespaces | None = None,
) -> Handshake:
    """Start plugin `name` from `plugin_dir` as eKuiper's runtime does and return its handshake.

    `language`, `executable`, `virtual_env_type` and `env_name` are the descriptor's ``language``,
    ``executable``, ``virtualEnvType`` and ``env``; `python_bin` is portable.pythonBin and `init_timeout`
    portable.initTimeout in seconds. Raise PackageInvalid, in eKuiper's words followed by the plugin's last
    output lines, when the plugin cannot be started, exits, or sends nothing within `init_timeout`; also
    when this machine cannot confine the check. Messages name the executable as if `plugin_dir` were
    `display_dir` (say, the plugin's final folder while it is checked in a staging one). Whatever the
    outcome, nothing the plugin started is left running, and the host's /tmp is not touched.
    """
    if not 0 < init_timeout <= MAX_INIT_TIMEOUT:
        raise ValueError(f"init_timeout must be above 0 and at most {MAX_INIT_TIMEOUT:g} seconds")
    exe = Path(os.path.normpath(os.path.join(os.path.abspath(plugin_dir), executable)))
    shown = Path(os.path.normpath(os.path.join(os.path.abspath(display_dir or plugin_dir), executable)))
    env = _plugin_env(os.environ)
    try:
        argv = plugin_command(
            name, language, exe, python_bin=python_bin, virtual_env_type=virtual_env_type, env_name=env_name,
            path=env["PATH"],
        )
    except PackageInvalid as exc:
        raise PackageInvalid(exc.message.replace(str(exe), str(shown)))
    confined = confined if confined is not None else namespaces()
    if not confined.available:
        raise PackageInvalid(
            f"portable plugin {name} cannot be started for its handshake check on this machine"
            f" ({confined.description}; set portable.verifyOnInstall to false to install without the check)"
        )
    spec = {
        "mode": "run", "url": control_url(name), "argv": argv, "cwd": str(exe.parent), "env": env,
        "timeout": init_timeout, "tmpfs": TMPFS_OPTIONS, "output_limit": OUTPUT_LIMIT,
        "keep": _below_tmp(Path(os.path.abspath(plugin_dir)), exe.parent, _home_of(Path(argv[0])),
                           *_interpreter_homes(exe), *_own_python()),
    }
    log.info("starting portable plugin %s for its handshake: %s (in %s), timeout %g s",
             name, " ".join(argv), exe.parent, init_timeout)
    report, problem = _run_helper(confined.command, spec, init_timeout + _SETUP_GRACE)
    outcome = report.get("outcome")
    elapsed = float(report.get("elapsed", 0.0))
    output = _sanitize(str(report.get("output", "")))
    log.info("portable plugin %s: %s after %.2f s, %s bytes of output", name, outcome or problem, elapsed,
             report.get("output_bytes", 0))
    if output:
        log.info("portable plugin %s printed:\n%s", name, output[-8192:])
    if outcome == "handshake":
        return Handshake(str(report.get("message", "")).encode("latin-1"), elapsed, output)
    raise PackageInvalid(_refusal(name, exe, shown, argv, init_timeout, report, problem, output))


def _refusal(
    name: str, exe: Path, shown: Path, argv: list[str], init_timeout: float, report: Mapping, problem: str,
    output: str,
) -> str:
    """The message for a plugin that did not shake hands: eKuiper's words first, then ours in parentheses.

    `exe` is the executable as it was run, `shown` as the message names it.
    """
    outcome = report.get("outcome")
    elapsed = float(report.get("elapsed", 0.0))
    said = _said(output)
    if outcome == "start":
        errno = int(report.get("errno") or 0)
        reason = _go_errno(errno)
        if report.get("filename") == str(exe.parent):
            what = f"chdir {shown.parent}"
        else:
            what = f"fork/exec {shown if argv[0] == str(exe) else argv[0]}"
        if errno == 13 and argv[0] == str(exe) and not os.access(exe, os.X_OK):
            hint = "the executable has no run bit; the service does not add one"
        else:
            hint = "the plugin could not be started"
        return f"plugin executable {shown} stops with error {what}: {reason} ({hint}; {said})"
    if outcome == "exited":
        status = int(report.get("status", 0))
        if status != 0:
            return (
                f"plugin executable {shown} stops with error {_go_exit(status)}"
                f" (it ended after {elapsed:.1f} s without its handshake; {said})"
            )
        return (
            f"plugin {shown} control handshake error: receive time out"
            f" (it exited with status 0 after {elapsed:.1f} s without its handshake; {said})"
        )
    if outcome == "timeout":
        return (
            f"plugin {shown} control handshake error: receive time out (no handshake on {control_url(name)}"
            f" within portable.initTimeout, {init_timeout:g} s; the plugin was stopped; {said})"
        )
    if outcome == "listen":
        return (
            f"can't create new control channel: can't listen on rep socket: {report.get('error')}"
            f" ({control_url(name)})"
        )
    reason = report.get("error") or problem
    return (
        f"portable plugin {name} cannot be started for its handshake check on this machine"
        f" ({reason}; set portable.verifyOnInstall to false to install without the check)"
    )


def _run_helper(command: tuple[str, ...], spec: dict, timeout: float) -> tuple[dict, str]:
    """Run _HELPER under `command`; return its report (empty if it gave none) and, if so, why not."""
    try:
        proc = subprocess.Popen(
            [*command, sys.executable, "-I", "-c", _HELPER, json.dumps(spec)],
            cwd="/", env={"PATH": PLUGIN_PATH, "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        return {}, f"{command[0]} could not be started: {exc.strerror or exc}"
    overran = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        overran = True
        # unshare leads its own group; with --kill-child its death takes the helper and the namespace along.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            stdout, stderr = proc.communicate(timeout=_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = b"", b""
            log.error("the handshake check (pid %d) did not end within %g s of SIGKILL", proc.pid, _REAP_TIMEOUT)
    try:
        # Only the helper writes here (the plugin's output goes to a pipe of its own), so it is bounded.
        report = json.loads(stdout)
    except ValueError:
        report = None
    if isinstance(report, dict):
        return report, ""
    detail = _tail(_sanitize(stderr.decode("utf-8", errors="replace")))
    if overran:
        return {}, f"the check did not end within {timeout:g} s and was killed: {detail}"
    return {}, f"the check ended without a verdict (exit status {proc.returncode}): {detail}"


def _home_of(command: Path) -> Path:
    """The folder an interpreter needs beside it: a venv's root for ``<venv>/bin/python``, else its folder."""
    folder = command.parent
    return folder.parent if folder.name == "bin" else folder


def _interpreter_homes(executable: Path) -> tuple[Path, ...]:
    """For a script, the home of the interpreter its `#!` line names (a venv below /tmp must stay visible)."""
    try:
        with open(executable, "rb") as script:
            first = script.readline(4096)
    except OSError:
        return ()
    if not first.startswith(b"#!"):
        return ()
    words = first[2:].decode("utf-8", "replace").split()
    return (_home_of(Path(words[0])),) if words and words[0].startswith("/") else ()


def _own_python() -> tuple[Path, ...]:
    """The folders this service's Python runs from (its venv, with pynng): the helper imports from them."""
    return tuple(Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})


def _below_tmp(*folders: Path) -> list[str]:
    """The folders (outermost first, none inside another) that the private /tmp would hide."""
    below = sorted({
        folder for folder in folders
        if folder.is_relative_to("/tmp") and folder != Path("/tmp") and folder.is_dir()
    })
    return [str(folder) for index, folder in enumerate(below)
            if not any(folder.is_relative_to(outer) for outer in below[:index])]


def _plugin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The plugin's environment: a few of the service's variables, the private /tmp as TMPDIR, no bytecode."""
    env = {key: environ[key] for key in PASSED_ENV if environ.get(key)}
    env.setdefault("PATH", PLUGIN_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["TMPDIR"] = "/tmp"
    # A python plugin must not leave __pycache__ folders in files the registry does not record as its own.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _go_errno(number: int) -> str:
    """An errno as Go's syscall package spells it: the C library's text with a lower-case first letter."""
    text = os.strerror(number) if number else "unknown error"
    return text[:1].lower() + text[1:]


def _go_exit(status: int) -> str:
    """A non-zero exit as Go's exec.ExitError spells it: ``exit status 3``, ``signal: killed``."""
    if status > 0:
        return f"exit status {status}"
    text = signal.strsignal(-status) or f"signal {-status}"
    return f"signal: {text[:1].lower() + text[1:]}"


def _said(output: str) -> str:
    tail = _tail(output)
    return f"its last output:\n{tail}" if tail else "it printed nothing"


def _sanitize(text: str) -> str:
    """Remove terminal escapes and control characters other than newline and tab."""
    return _CONTROL_CHARS.sub("", _ANSI_ESCAPE.sub("", text.replace("\r\n", "\n")))


def _tail(text: str) -> str:
    """The last lines of output, for an error message."""
    lines = text.rstrip().splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]
