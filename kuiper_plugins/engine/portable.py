"""Would eKuiper's runtime get a portable plugin running? Start it as eKuiper does and wait for its handshake.

eKuiper's runtime, for every portable plugin it loads, listens on ``ipc:///tmp/plugin_<name>.ipc`` with an
nng Rep0 socket, starts ``<pythonBin> -u <exe> <json>`` (python) or ``<exe> <json>`` (go) in the
executable's folder, where ``<json>`` is ``{"sendTimeout":1000}``, and waits up to ``portable.initTimeout``
for one message from the plugin's Req0 socket: the SDKs send ``handshake``, and any message counts. It
does not answer the handshake; its first command later is the reply. `verify_handshake` does the same, then
stops the plugin and everything it started.

Confinement: the package's code is never trusted with anything, whoever installs it. The check runs in
namespaces of its own, made by util-linux's ``unshare --pid --fork --kill-child --mount --net --ipc
--propagation private``. PID 1 there is a small Python program (``_HELPER``, run as root by this Python,
which has pynng) that prepares the plugin's view and then starts the plugin as the user ``nobody`` (uid and
gid 65534, no other groups, no capabilities, no_new_privs so that setuid programs cannot raise it):

- a fresh tmpfs on ``/tmp``, so the socket never meets a running engine's sockets in the host's ``/tmp``
  and the plugin sees nothing of the host's ``/tmp``; fresh ones, too, on the other folders anyone may
  write to (``/var/tmp``, ``/dev/shm``, ``/run/lock``), and System V IPC of its own, so that nothing the
  plugin leaves there outlives the check;
- a network of its own with only a loopback interface: the plugin reaches neither this service's API nor
  anything else;
- the folders the plugin needs (its own, its interpreter's) at their real paths even where a folder above
  them is closed to others: such a folder is covered with an empty tmpfs and the needed ones are bound
  back into it, so nobody gains exactly those folders and loses nothing it could see before.

The helper listens, starts the plugin, waits, and writes one JSON line with the outcome on its stdout,
which the service reads with a size cap. When the helper exits, the kernel kills every other process in
its PID namespace and ``unshare`` returns only once they are gone. The helper keeps its own deadline; past
that plus a grace the host kills ``unshare``, whose ``--kill-child`` takes the helper, and so the
namespace, with it. Whether all this can be done here is probed once per process; where it cannot
(without root, for one), every check is refused, never run with fewer walls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kuiper_plugins.errors import PackageInvalid
from kuiper_plugins.lifecycle import progress

log = logging.getLogger(__name__)

DEFAULT_PYTHON_BIN = "python"  # eKuiper's default for portable.pythonBin
DEFAULT_INIT_TIMEOUT = "60s"  # eKuiper's etc/kuiper.yaml value for portable.initTimeout
CONFIG_ARGUMENT = '{"sendTimeout":1000}'  # what eKuiper passes: its PortableConfig, marshalled by Go
MAX_INIT_TIMEOUT = 3600.0  # seconds; an install request waits this long at most for one plugin
TMPFS_OPTIONS = "mode=1777,size=64m"  # the plugin's private /tmp
# The host's other folders that anyone may write to: the plugin gets fresh, empty ones, which go with it.
SCRATCH_FOLDERS = ("/var/tmp", "/dev/shm", "/run/lock")
SCRATCH_OPTIONS = "mode=1777,size=16m"
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # when the service has no PATH
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")  # what the plugin gets of the service's environment
NOBODY = 65534  # the uid and gid the plugin runs as: the user nobody and its group
COVER_OPTIONS = "mode=0755,size=1m"  # an empty tmpfs over a folder closed to others; only we make folders in it
OUTPUT_LIMIT = 64 * 1024  # bytes of the plugin's output kept (the last ones)
REPORT_LIMIT = 1024 * 1024  # bytes read, at most, of the helper's stdout (its one-line report) and stderr
TAIL_LINES = 20  # lines of output quoted in an error message
TAIL_CHARS = 2048  # characters of output quoted in an error message, at most

_SETUP_GRACE = 15.0  # seconds beyond init_timeout for the namespace, the mount and the listener
_REAP_TIMEOUT = 10.0  # waiting for a killed unshare to be reaped
_PROBE_TIMEOUT = 15.0
_READ_SIZE = 64 * 1024
_SCAN_LIMIT = 10000  # entries of a refused plugin's folder looked at for files nobody cannot read
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

# unshare's options, tried in this order: with a /proc of its own, then without one (some containers
# cannot mount /proc). Both need root: a user namespace of the service's own could not hold nobody.
_PRIVATE = ("--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--propagation", "private")
UNSHARE_OPTIONS = ((*_PRIVATE, "--mount-proc"), _PRIVATE)

# PID 1 of the check's namespaces, run as root as `python -I -c _HELPER <mode>`, its spec then sent as one JSON
# line on its stdin (it may be started ahead: see `CheckAhead`). It reports one JSON object on stdout. It never
# signals -1 unless it is PID 1, where that means "everyone in this PID namespace". Everything that needs root
# happens here, before the plugin starts: the plugin itself runs as nobody.
_HELPER = r"""
import ctypes, fcntl, json, os, selectors, signal, socket, struct, subprocess, sys, time

pynng = None
if sys.argv[1] == "run":
    # Imported while the spec may still be awaited. (A probe forks first: no thread may hold a lock then.)
    try:
        import pynng
    except ImportError as exc:
        pynng_missing = str(exc)
line = sys.stdin.buffer.readline()
if not line:
    os._exit(0)  # no spec: the install ended before its plugin was in place
spec = json.loads(line)
started = time.monotonic()
nobody = spec["nobody"]


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
net = os.stat("/proc/self/ns/net")
if [net.st_dev, net.st_ino] == spec["host_net"]:
    finish(outcome="setup", error="not in a network namespace of its own")
host_tmp = os.stat("/tmp").st_dev
# The folders the plugin needs that a cover would hide are held open now and bound back at the same path.
kept = []
for path in spec["bind"]:
    try:
        kept.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    except OSError as exc:
        finish(outcome="setup", error="cannot open " + path + ": " + exc.strerror)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
libc.prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
umask = os.umask(0o022)  # the folders made on our own tmpfs must let nobody pass, whatever the service's umask
for path, options in spec["cover"]:
    os.makedirs(path, 0o755, exist_ok=True)  # one cover may lie in another (/var/tmp in a closed /var)
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, options.encode()) != 0:  # MS_NOSUID | MS_NODEV
        finish(outcome="setup", error="cannot mount a private " + path + ": " + os.strerror(ctypes.get_errno()))
if os.stat("/tmp").st_dev == host_tmp or os.listdir("/tmp"):
    finish(outcome="setup", error="the private /tmp is not a fresh file system")
for path, fd in kept:
    os.makedirs(path, 0o755, exist_ok=True)
    if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND|MS_REC
        finish(outcome="setup", error="cannot bind " + path + " into the plugin's view: "
               + os.strerror(ctypes.get_errno()))
    os.close(fd)
os.umask(umask)
try:
    # A fresh network namespace has only a loopback interface, down: bring it up for the plugin's own use.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(probe, 0x8913, request))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(probe, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
except OSError as exc:
    finish(outcome="setup", error="cannot bring up the loopback interface of its own network: " + exc.strerror)
# No program the plugin runs may gain rights (setuid bits and file capabilities are ignored), and no
# capability is left in the bounding set. The uid and gid change happens as the plugin is started.
for capability in range(64):
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        if ctypes.get_errno() == 22:  # EINVAL: past the last capability this kernel knows
            break
        finish(outcome="setup", error="cannot empty the capability bounding set: " + os.strerror(ctypes.get_errno()))
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    finish(outcome="setup", error="cannot set no_new_privs: " + os.strerror(ctypes.get_errno()))
if spec["mode"] == "probe":
    # Become nobody in a child, as the plugin will, and look at what is left. (Before pynng is imported: no
    # other thread may hold a lock the child would need.)
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.setgroups([])
            os.setresgid(nobody, nobody, nobody)
            os.setresuid(nobody, nobody, nobody)
            with open("/proc/self/status") as status:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
            left = [key for key in ("CapPrm", "CapEff", "CapBnd", "CapAmb") if int(fields.get(key, "1"), 16)]
            if os.getresuid() != (nobody,) * 3 or os.getgroups() not in ([], [nobody]) or left \
                    or fields.get("NoNewPrivs") != "1":
                code = 255
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if code == 255:
        finish(outcome="setup", error="a process made nobody still holds rights")
    if code != 0:
        why = os.strerror(code) if code > 0 else "killed by signal " + str(-code)
        finish(outcome="setup", error="cannot become nobody: " + why)
if spec["mode"] == "probe":
    try:
        import pynng
    except ImportError as exc:
        finish(outcome="setup", error="pynng cannot be imported: " + str(exc))
    finish(outcome="probed")
if pynng is None:
    finish(outcome="setup", error="pynng cannot be imported: " + pynng_missing)

sock = pynng.Rep0()
try:
    sock.listen(spec["url"])
except pynng.NNGException as exc:
    finish(outcome="listen", error=str(exc))
try:
    os.chmod(spec["socket"], 0o666)  # the plugin, as nobody, dials it: connecting needs write permission
except OSError as exc:
    finish(outcome="setup", error="cannot open the control socket to the plugin: " + exc.strerror)

output = bytearray()
total = 0
out_read, out_write = os.pipe()
try:
    plugin = subprocess.Popen(
        spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
        stdout=out_write, stderr=out_write, close_fds=True, user=nobody, group=nobody, extra_groups=[],
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
    """Find out whether `unshare` can make the check's namespaces here and the helper can make nobody in them."""
    found = unshare if "/" in unshare else shutil.which(unshare, path=PLUGIN_PATH)
    if found is None or not os.access(found, os.X_OK):
        return Namespaces((), f"util-linux's unshare was not found ({unshare} is not an executable file)")
    failures = []
    for options in UNSHARE_OPTIONS:
        command = (found, *options, "--")
        report, problem = _run_helper(command, {"mode": "probe", **_private_view(_own_python())}, _PROBE_TIMEOUT)
        if report.get("outcome") == "probed":
            return Namespaces(
                command, f"namespaces of its own with a private /tmp and network, as nobody ({' '.join(command[:-1])})"
            )
        failures.append(f"{' '.join(options)}: {report.get('error') or problem}")
    if os.geteuid() != 0:
        failures.append(f"the plugin is run as nobody, which needs the service to run as root, not uid {os.geteuid()}")
    return Namespaces((), f"{found} cannot confine the check here ({'; '.join(failures)})")


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
    display_dir: Path | None = None, ahead: CheckAhead | None = None,
) -> Handshake:
    """Run `verify_handshake` for a portable package unpacked in `plugin_dir`, its descriptor as read.

    `descriptor` is the package's ``<name>.json`` (``language``, ``executable``, optional ``virtualEnvType``
    and ``env``); the other arguments are verify_handshake's.
    """
    return verify_handshake(
        plugin_dir, name, str(descriptor.get("language", "")), str(descriptor.get("executable", "")),
        python_bin=python_bin, init_timeout=init_timeout, virtual_env_type=descriptor.get("virtualEnvType"),
        env_name=descriptor.get("env"), display_dir=display_dir, ahead=ahead,
    )


def verify_handshake(
    plugin_dir: Path, name: str, language: str, executable: str, *, python_bin: str, init_timeout: float,
    virtual_env_type: str | None = None, env_name: str | None = None, display_dir: Path | None = None,
    confined: Namespaces | None = None, ahead: CheckAhead | None = None,
) -> Handshake:
    """Start plugin `name` from `plugin_dir` as eKuiper's runtime does and return its handshake.

    `language`, `executable`, `virtual_env_type` and `env_name` are the descriptor's ``language``,
    ``executable``, ``virtualEnvType`` and ``env``; `python_bin` is portable.pythonBin and `init_timeout`
    portable.initTimeout in seconds. Raise PackageInvalid, in eKuiper's words followed by the plugin's last
    output lines, when the plugin cannot be started, exits, or sends nothing within `init_timeout`; also
    when this machine cannot confine the check. Messages name the executable as if `plugin_dir` were
    `display_dir` (say, the plugin's final folder while it is checked in a staging one). The plugin runs
    as nobody, without the host's network or scratch folders (see the module's docstring). Whatever the
    outcome, nothing the plugin started is left running, and the host's /tmp is not touched. `ahead`, a
    helper `check_ahead` started earlier, runs the check when it has not run one (else a new one does).
    """
    if not 0 < init_timeout <= MAX_INIT_TIMEOUT:
        raise ValueError(f"init_timeout must be above 0 and at most {MAX_INIT_TIMEOUT:g} seconds")
    progress.phase("handshake")
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
    package = Path(os.path.abspath(plugin_dir))
    needed = (package, exe.parent, *_homes(Path(argv[0])), *_interpreter_homes(exe))
    spec = {
        "mode": "run", "url": control_url(name), "socket": control_url(name).removeprefix("ipc://"),
        "argv": argv, "cwd": str(exe.parent), "env": env, "timeout": init_timeout, "output_limit": OUTPUT_LIMIT,
        # The package's own folders are bound as they are: inside it, nothing is opened up for nobody.
        **_private_view((package, *(f for f in needed if not f.is_relative_to(package)), *_own_python())),
    }
    log.info("starting portable plugin %s for its handshake: %s (in %s), timeout %g s",
             name, " ".join(argv), exe.parent, init_timeout)
    if ahead is None or ahead.used or ahead.command != confined.command:
        ahead = CheckAhead(confined.command)
    report, problem = ahead.run(spec, init_timeout + _SETUP_GRACE)
    outcome = report.get("outcome")
    elapsed = float(report.get("elapsed", 0.0))
    output = _sanitize(str(report.get("output", "")))
    log.info("portable plugin %s: %s after %.2f s, %s bytes of output", name, outcome or problem, elapsed,
             report.get("output_bytes", 0))
    if output:
        log.info("portable plugin %s printed:\n%s", name, output[-8192:])
    if outcome == "handshake":
        return Handshake(str(report.get("message", "")).encode("latin-1"), elapsed, output)
    refused = _Refused(name, package, exe, shown, argv)
    raise PackageInvalid(_refusal(refused, init_timeout, report, problem, output))


@dataclass(frozen=True)
class _Refused:
    """The plugin a refusal is about: its name, folder, executable as run and as shown, and its command."""

    name: str
    package: Path
    exe: Path
    shown: Path
    argv: list[str]

    def as_shown(self, path: Path) -> Path:
        """`path`, a file of the package or its interpreter, named as the message names the executable."""
        if path.is_relative_to(self.package):
            return Path(os.path.normpath(self.shown.parent / os.path.relpath(path, self.exe.parent)))
        return path


def _refusal(refused: _Refused, init_timeout: float, report: Mapping, problem: str, output: str) -> str:
    """The message for a plugin that did not shake hands: eKuiper's words first, then ours in parentheses."""
    name, exe, shown, argv = refused.name, refused.exe, refused.shown, refused.argv
    outcome = report.get("outcome")
    elapsed = float(report.get("elapsed", 0.0))
    said = _said(output)
    if outcome in ("start", "exited", "timeout"):
        closed = _closed_to_nobody(refused)
        as_nobody = f"the check runs the plugin as the user nobody, who may not {closed}; " if closed else ""
    if outcome == "start":
        errno = int(report.get("errno") or 0)
        reason = _go_errno(errno)
        if report.get("filename") == str(exe.parent):
            what = f"chdir {shown.parent}"
        else:
            what = f"fork/exec {shown if argv[0] == str(exe) else argv[0]}"
        if errno == 13 and argv[0] == str(exe) and not os.access(exe, os.X_OK):
            hint = "the executable has no run bit; the service does not add one"
        elif as_nobody:
            hint = as_nobody.removesuffix("; ")
        else:
            hint = "the plugin could not be started"
        return f"plugin executable {shown} stops with error {what}: {reason} ({hint}; {said})"
    if outcome == "exited":
        status = int(report.get("status", 0))
        if status != 0:
            return (
                f"plugin executable {shown} stops with error {_go_exit(status)}"
                f" ({as_nobody}it ended after {elapsed:.1f} s without its handshake; {said})"
            )
        return (
            f"plugin {shown} control handshake error: receive time out"
            f" ({as_nobody}it exited with status 0 after {elapsed:.1f} s without its handshake; {said})"
        )
    if outcome == "timeout":
        return (
            f"plugin {shown} control handshake error: receive time out ({as_nobody}no handshake on"
            f" {control_url(name)} within portable.initTimeout, {init_timeout:g} s; the plugin was stopped; {said})"
        )
    if outcome == "overflow":
        return (
            f"portable plugin {name} was stopped during its handshake check (more than {REPORT_LIMIT} bytes came"
            f" on the check's own {report.get('stream')}, where only the check writes its one-line report:"
            " the plugin or something it started wrote into it)"
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
    """Run _HELPER under `command`; return its report (empty if it gave none) and, if so, why not.

    The helper's stdout and stderr are read with a cap of REPORT_LIMIT bytes each: past it, or past
    `timeout`, the check is killed. An overflow is reported as outcome ``overflow``.
    """
    return CheckAhead(command, spec["mode"]).run(spec, timeout)


class CheckAhead:
    """A handshake check's helper, started before its plugin is in place: it imports what it needs meanwhile.

    Starting the helper (unshare, a Python, pynng) took about half of a handshake check. An install starts
    it as soon as it knows the package is a portable plugin whose handshake it checks, and hands it the
    plugin's spec once the plugin is in place (`run`, through `verify_handshake`); one never run is stopped
    by `close`, which the install calls whatever its outcome. Until it is given its spec, the helper, in the
    namespaces unshare made for it, only imports: it mounts nothing, drops nothing and starts nothing.
    """

    def __init__(self, command: tuple[str, ...], mode: str = "run"):
        self.command = command
        self.used = False
        self.problem = ""
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [*command, sys.executable, "-I", "-c", _HELPER, mode],
                cwd="/", env={"PATH": PLUGIN_PATH, "LC_ALL": "C.UTF-8"},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            self.proc = None
            self.problem = f"{command[0]} could not be started: {exc.strerror or exc}"

    def run(self, spec: dict, timeout: float) -> tuple[dict, str]:
        """Hand the helper its spec and wait for its report (see `_run_helper`); once only."""
        if self.used:
            raise RuntimeError("a handshake check's helper runs one check")
        self.used = True
        proc = self.proc
        if proc is None:
            return {}, self.problem
        spec = {**spec, "nobody": NOBODY, "host_net": _network_namespace()}
        try:
            try:
                proc.stdin.write(json.dumps(spec).encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it ended before it read its spec: its report, or its exit, says why
            (stdout, stderr), cut = _read_capped(proc, timeout)
            if cut is None:
                try:
                    # Both pipes are closed: unshare, which holds them too, is gone or about to be.
                    proc.wait(timeout=_REAP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    cut = "timeout"
            if cut is not None:
                _kill(proc)
        finally:
            self._close_pipes()
        detail = _tail(_sanitize(stderr.decode("utf-8", errors="replace")))
        if cut == "timeout":
            return {}, f"the check did not end within {timeout:g} s and was killed: {detail}"
        if cut is not None:
            return {"outcome": "overflow", "stream": cut}, (
                f"the check wrote more than {REPORT_LIMIT} bytes to its {cut} and was killed"
            )
        try:
            report = json.loads(stdout)
        except ValueError:
            report = None
        if isinstance(report, dict):
            return report, ""
        return {}, f"the check ended without a verdict (exit status {proc.returncode}): {detail}"

    def close(self) -> None:
        """Stop a helper that was never run (an install that ended before its check); nothing if it was."""
        if self.used or self.proc is None:
            return
        self.used = True
        _kill(self.proc)  # unshare leads its group; its --kill-child takes the helper
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass  # the stdin a helper gone early left unread: nothing to flush


def check_ahead() -> CheckAhead | None:
    """Start a handshake check's helper now, to be given its plugin later; None where checks cannot be confined."""
    confined = namespaces()
    return CheckAhead(confined.command) if confined.available else None


def _read_capped(proc: subprocess.Popen, timeout: float) -> tuple[tuple[bytes, bytes], str | None]:
    """Read `proc`'s stdout and stderr to their end; stop early at `timeout` or when one exceeds REPORT_LIMIT.

    Return what was read of each and why reading stopped early: ``timeout``, ``stdout``, ``stderr``, or None.
    """
    read = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    names = {proc.stdout: "stdout", proc.stderr: "stderr"}
    deadline = time.monotonic() + timeout
    cut = None
    with selectors.DefaultSelector() as selector:
        for stream in read:
            selector.register(stream, selectors.EVENT_READ)
        while cut is None and selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cut = "timeout"
                break
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, _READ_SIZE)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                read[key.fileobj] += data
                if len(read[key.fileobj]) > REPORT_LIMIT:
                    cut = names[key.fileobj]
                    break
    return (bytes(read[proc.stdout]), bytes(read[proc.stderr])), cut


def _kill(proc: subprocess.Popen) -> None:
    """Kill the check: unshare leads its own group, and with --kill-child its death takes the namespace along."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        log.error("the handshake check (pid %d) did not end within %g s of SIGKILL", proc.pid, _REAP_TIMEOUT)


def _network_namespace() -> list[int]:
    """This process's network namespace, as the helper can compare it with its own."""
    found = os.stat("/proc/self/ns/net")
    return [found.st_dev, found.st_ino]


def _home_of(command: Path) -> Path:
    """The folder an interpreter needs beside it: a venv's root for ``<venv>/bin/python``, else its folder."""
    folder = command.parent
    return folder.parent if folder.name == "bin" else folder


def _homes(command: Path) -> tuple[Path, ...]:
    """The homes of a command as named and as its links resolve (a venv's python links to its base Python)."""
    return (_home_of(command), _home_of(Path(os.path.realpath(command))))


def _interpreter_homes(executable: Path) -> tuple[Path, ...]:
    """For a script, the homes of the interpreter its `#!` line names (it must stay reachable for nobody)."""
    try:
        # Not blocking, and only a regular file: a FIFO in the package must not hold the worker here.
        fd = os.open(executable, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ()
    with open(fd, "rb") as script:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ()
        first = script.readline(4096)
    if not first.startswith(b"#!"):
        return ()
    words = first[2:].decode("utf-8", "replace").split()
    return _homes(Path(words[0])) if words and words[0].startswith("/") else ()


def _own_python() -> tuple[Path, ...]:
    """The folders this service's Python runs from (its venv, with pynng): the helper imports from them."""
    return tuple(Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})


def _private_view(folders: tuple[Path, ...]) -> dict[str, list]:
    """The mounts that give the plugin `folders` at their real paths: ``cover`` with a tmpfs, then ``bind`` back.

    /tmp and the SCRATCH_FOLDERS are always covered, with fresh ones of the plugin's own. Above each other
    folder, the outermost folder nobody may not pass through is covered with an empty tmpfs: nobody could not
    reach anything below it anyway. Each folder below a cover (only the outermost of nested ones) is bound
    back at its path, through folders the helper makes passable. A folder itself closed to nobody stays closed.
    """
    covers = {Path("/tmp"): TMPFS_OPTIONS}
    covers.update((Path(folder), SCRATCH_OPTIONS) for folder in SCRATCH_FOLDERS
                  if os.path.isdir(folder) and not os.path.islink(folder))
    scratch = tuple(covers)
    wanted = sorted({folder for folder in folders if folder.is_absolute() and folder.is_dir()})
    for folder in wanted:
        if not any(folder.is_relative_to(place) for place in scratch):
            closed = next((above for above in reversed(folder.parents)
                           if above != Path("/") and not _nobody_may(above, 1)), None)
            if closed is not None:
                covers[closed] = COVER_OPTIONS
    below = [folder for folder in wanted if any(folder.is_relative_to(c) and folder != c for c in covers)]
    bind = [folder for index, folder in enumerate(below)
            if not any(folder.is_relative_to(outer) for outer in below[:index])]
    return {
        "cover": [[str(folder), options] for folder, options in sorted(covers.items())],
        "bind": [str(folder) for folder in bind],
    }


def _nobody_may(path: Path, bits: int, status: os.stat_result | None = None) -> bool:
    """Whether the user nobody (no groups but its own) has all `bits` (4 read, 2 write, 1 run/enter) on `path`.

    Judged by the mode bits alone; a file that cannot be looked at counts as closed.
    """
    try:
        status = status or os.stat(path)
    except OSError:
        return False
    shift = 6 if status.st_uid == NOBODY else 3 if status.st_gid == NOBODY else 0
    return (status.st_mode >> shift) & bits == bits


def _closed_to_nobody(refused: _Refused) -> str:
    """What nobody may not do that the plugin needs (``read <file> (mode 0600)``), or "" if nothing is found.

    Looked at: the executable (run, or read for a script or a python plugin), the folders from the
    package's to the executable's, the interpreter, then the package's other files (a bounded walk).
    """
    exe, package = refused.exe, refused.package
    needs: list[tuple[Path, int]] = []
    if exe.is_relative_to(package):
        needs += [(folder, 1) for folder in reversed(exe.parents) if folder.is_relative_to(package)]
    interpreted = refused.argv[0] != str(exe)  # python: the interpreter reads the file
    needs.append((exe, 4 if interpreted else 5 if _interpreter_homes(exe) else 1))
    if interpreted:
        needs.append((Path(os.path.realpath(refused.argv[0])), 1))
    for path, bits in needs:
        if path.exists() and not _nobody_may(path, bits):
            return _closed(refused, path, bits)
    pending = [package]
    seen = 0
    while pending and seen < _SCAN_LIMIT:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                seen += 1
                if seen > _SCAN_LIMIT:
                    break
                if entry.is_symlink():
                    continue  # what a link points at is not the package's own
                folder = entry.is_dir()
                if not _nobody_may(Path(entry.path), 5 if folder else 4, entry.stat()):
                    return _closed(refused, Path(entry.path), 5 if folder else 4)
                if folder:
                    pending.append(Path(entry.path))
    return ""


def _closed(refused: _Refused, path: Path, bits: int) -> str:
    """``<verb> <path> (mode <mode>)`` for the first of `bits` that nobody lacks on `path`."""
    if bits & 4 and not _nobody_may(path, 4):
        verb = "read"
    else:
        verb = "enter" if path.is_dir() else "run"
    try:
        mode = f" (mode {stat.S_IMODE(os.stat(path).st_mode):04o})"
    except OSError:
        mode = ""
    return f"{verb} {refused.as_shown(path)}{mode}"


def _plugin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The plugin's environment: a few of the service's variables, the private /tmp as HOME and TMPDIR."""
    env = {key: environ[key] for key in PASSED_ENV if environ.get(key)}
    env.setdefault("PATH", PLUGIN_PATH)
    env.setdefault("LANG", "C.UTF-8")
    # nobody has no home of its own; what a plugin writes to its home at start lands in the private /tmp.
    env["HOME"] = "/tmp"
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
