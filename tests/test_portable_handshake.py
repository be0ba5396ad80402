"""A portable plugin is started as eKuiper's runtime starts it and must shake hands (engine/portable.py).

Real parts only: a plugin in eKuiper's documented layout run on eKuiper's own Python SDK from PyPI (a venv
built once and cached under the pytest cache dir), a Go executable dialling with mangos as eKuiper's Go SDK
does (tests/go/kuiperd/goportable, built once per machine), shell-script plugins, a real binary without its
run bit, util-linux's unshare, pynng, and Go's own time.ParseDuration for the duration rules.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pynng
import pytest
import requests
from conftest import disk_state

from kuiper_plugins.engine import portable
from kuiper_plugins.engine.portable import parse_duration, verify_descriptor, verify_handshake
from kuiper_plugins.errors import PackageInvalid

FIXTURES = Path(__file__).resolve().parent / "portable"


# ---------------------------------------------------------------------------- fixtures

# sdk_python (eKuiper's Python SDK in a cached venv) comes from engine_fixtures, through conftest.


@pytest.fixture
def token() -> str:
    """A mark in the plugin's folder name: every process the plugin starts carries it in its command or cwd."""
    return f"kp-{uuid.uuid4().hex[:12]}"


def place(fixture: str, tmp_path: Path, token: str) -> Path:
    """Copy tests/portable/<fixture> (modes kept) to a folder of its own below tmp_path; return that folder."""
    target = tmp_path / token / fixture
    shutil.copytree(FIXTURES / fixture, target)
    return target


def processes_with(token: str) -> list[str]:
    """Every live process on the machine whose command line or working directory holds `token`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(info["cmdline"] or []) + " " + (info["cwd"] or "")
        if token in text:
            found.append(f"{info['pid']}: {text}")
    return found


def _own_prefixes() -> list[Path]:
    """The folders this test's Python runs from; the check binds them into the plugin's /tmp when below /tmp."""
    return [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)]


def _top_folders_below_tmp(*folders: Path) -> set[str]:
    """The first path component below /tmp of each folder that lies there."""
    return {folder.relative_to("/tmp").parts[0] for folder in folders
            if folder.is_relative_to("/tmp") and folder != Path("/tmp")}


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file below folder with its size and mode, to show the check changed nothing."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, stat.S_IMODE(path.stat().st_mode))
        for path in sorted(folder.rglob("*"))
    }


def refusal(plugin_dir: Path, name: str, language: str, executable: str, **options) -> tuple[str, float]:
    """Run the check, expecting a refusal; return its message and how long it took."""
    options.setdefault("python_bin", "python")
    options.setdefault("init_timeout", 30.0)
    started = time.monotonic()
    with pytest.raises(PackageInvalid) as caught:
        verify_handshake(plugin_dir, name, language, executable, **options)
    assert caught.value.status == 400
    return caught.value.message, time.monotonic() - started


# ---------------------------------------------------------------------------- plugins that shake hands

def test_a_real_python_plugin_on_ekuipers_sdk_shakes_hands(sdk_python, tmp_path, token):
    plugin_dir = place("pygreet", tmp_path, token)
    descriptor = json.loads((plugin_dir / "pygreet.json").read_text())
    before = tree(plugin_dir)

    shook = verify_descriptor(plugin_dir, "pygreet", descriptor, python_bin=str(sdk_python), init_timeout=30.0)

    assert shook.message == b"handshake"  # what eKuiper's Python SDK sends
    # Started as eKuiper starts it: `<pythonBin> -u pygreet.py {"sendTimeout":1000}` in its folder.
    assert f"pygreet started in {plugin_dir} with ['{{\"sendTimeout\":1000}}'], unbuffered: True" in shook.output
    assert "dialing ipc:///tmp/plugin_pygreet.ipc" in shook.output
    assert 0 < shook.elapsed < 30
    assert processes_with(token) == []
    assert not Path("/tmp/plugin_pygreet.ipc").exists()
    assert tree(plugin_dir) == before  # nothing written: no __pycache__ beside the plugin's own files


def helpers_of_this_process() -> list[str]:
    """The handshake checks this test process started that are still running (unshare leads each)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and command and os.path.basename(command[0]) == "unshare":
                found.append(f"{child.pid}: {' '.join(command)[:120]}")
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_check_started_before_its_plugin_exists_waits_for_it_then_shakes_hands(sdk_python, tmp_path, token):
    """An install starts the check as the package begins to unpack; the plugin is put in place only later."""
    ahead = portable.check_ahead()
    assert ahead is not None and ahead.proc.poll() is None  # waiting for its spec
    plugin_dir = place("pygreet", tmp_path, token)
    descriptor = json.loads((plugin_dir / "pygreet.json").read_text())

    shook = verify_descriptor(plugin_dir, "pygreet", descriptor, python_bin=str(sdk_python), init_timeout=30.0,
                              ahead=ahead)

    assert shook.message == b"handshake"
    assert f"pygreet started in {plugin_dir}" in shook.output
    assert ahead.used and ahead.proc.returncode is not None
    assert processes_with(token) == [] and helpers_of_this_process() == []


def test_a_check_started_ahead_and_never_given_its_plugin_is_stopped_when_the_install_ends(tmp_path):
    ahead = portable.check_ahead()
    assert ahead is not None and helpers_of_this_process() != []
    ahead.close()
    assert ahead.proc.returncode is not None
    assert helpers_of_this_process() == []
    with pytest.raises(RuntimeError):
        ahead.run({"mode": "run"}, 5)  # a stopped helper runs no check


def test_a_check_started_ahead_that_died_meanwhile_refuses_the_plugin_and_says_so(tmp_path, token):
    plugin_dir = place("silent", tmp_path, token)
    ahead = portable.check_ahead()
    os.killpg(ahead.proc.pid, signal.SIGKILL)
    ahead.proc.wait(timeout=10)

    message, _ = refusal(plugin_dir, "silent", "go", "silent.sh", ahead=ahead)

    assert message.startswith("portable plugin silent cannot be started for its handshake check on this machine"
                              " (the check ended without a verdict (exit status -9)")
    assert processes_with(token) == [] and helpers_of_this_process() == []


def test_the_check_never_meets_a_running_engine_socket(sdk_python, tmp_path, token):
    """An engine already listening on the host's /tmp/plugin_pygreet.ipc is neither used nor disturbed."""
    plugin_dir = place("pygreet", tmp_path, token)
    with pynng.Rep0(listen=portable.control_url("pygreet"), recv_timeout=300) as engine:
        assert Path("/tmp/plugin_pygreet.ipc").exists()

        shook = verify_handshake(
            plugin_dir, "pygreet", "python", "pygreet.py", python_bin=str(sdk_python), init_timeout=30.0,
        )

        assert shook.message == b"handshake"
        with pytest.raises(pynng.Timeout):
            engine.recv()  # the plugin dialled its own private /tmp, not this one
        assert Path("/tmp/plugin_pygreet.ipc").exists()
    assert processes_with(token) == []


def test_a_go_plugin_is_run_directly_and_any_first_message_is_its_handshake(sdk_python, tmp_path, token):
    plugin_dir = tmp_path / token / "gohand"
    plugin_dir.mkdir(parents=True)
    executable = plugin_dir / "gohand"
    executable.write_text(f"#!{sdk_python} -u\n" + (FIXTURES / "gohand" / "gohand.py").read_text())
    executable.chmod(0o755)

    shook = verify_handshake(plugin_dir, "gohand", "go", "gohand", python_bin="no-python-needed", init_timeout=30)

    assert shook.message == b"hello from gohand"
    assert f"gohand started in {plugin_dir} with ['{{\"sendTimeout\":1000}}']" in shook.output
    assert processes_with(token) == []


# ---------------------------------------------------------------------------- plugins that are refused

def test_a_plugin_that_never_shakes_hands_is_stopped_at_init_timeout(tmp_path, token):
    plugin_dir = place("silent", tmp_path, token)
    executable = plugin_dir / "silent.sh"
    host_marker = Path(f"/tmp/host-only-{token}")  # in the host's /tmp: the plugin must not see it
    host_marker.touch()
    try:
        message, took = refusal(plugin_dir, "silent", "go", "silent.sh", init_timeout=2.0)
    finally:
        host_marker.unlink()

    assert message.startswith(f"plugin {executable} control handshake error: receive time out (")
    assert "no handshake on ipc:///tmp/plugin_silent.ipc within portable.initTimeout, 2 s" in message
    assert 'silent plugin started with {"sendTimeout":1000}' in message
    assert "silent plugin left child" in message
    # Its /tmp was a private one: it held the control socket and, bound back at their own paths, the
    # folders below the host's /tmp that the plugin and the check need (the plugin's folder under pytest's
    # base temp, this Python's venv when the clone lives in /tmp), and nothing else of the host's /tmp.
    # `ls` sorts by the plugin's locale and those folders' names vary (TMPDIR, where the clone is), so
    # the listing is compared as a set, not by its first word.
    listing = message.split("its /tmp holds: ", 1)[1].split("\n", 1)[0].split()
    assert "plugin_silent.ipc" in listing
    assert set(listing) <= {"plugin_silent.ipc", *_top_folders_below_tmp(plugin_dir, *_own_prefixes())}
    assert host_marker.name not in listing
    assert took >= 2.0
    assert not Path(f"/tmp/left-by-{token}").exists()
    assert not Path("/tmp/plugin_silent.ipc").exists()
    assert processes_with(token) == []  # the plugin and the child it left are gone


def test_a_binary_without_its_run_bit_is_refused_with_permission_denied(tmp_path, token):
    plugin_dir = tmp_path / token / "mirror"
    plugin_dir.mkdir(parents=True)
    executable = plugin_dir / "mirror"
    shutil.copyfile(shutil.which("sleep"), executable)  # a real ELF executable, copied without its mode
    executable.chmod(0o644)

    message, _ = refusal(plugin_dir, "mirror", "go", "mirror")

    # eKuiper's own test expects exactly this for its mirror.zip, whose executable has no run bit.
    expected = f"plugin executable {executable} stops with error fork/exec {executable}: permission denied ("
    assert message.startswith(expected)
    assert "has no run bit; the service does not add one" in message
    assert stat.S_IMODE(executable.stat().st_mode) == 0o644


def test_messages_name_the_executable_where_it_will_be_installed(tmp_path, token):
    """Checked in a staging folder, the plugin is named by its final path, as eKuiper would name it."""
    staging = tmp_path / token / "staging"
    staging.mkdir(parents=True)
    shutil.copyfile(shutil.which("sleep"), staging / "mirror")
    (staging / "mirror").chmod(0o644)
    final = tmp_path / "plugins" / "portable" / "mirror"
    descriptor = {"language": "go", "executable": "mirror"}

    with pytest.raises(PackageInvalid) as caught:
        verify_descriptor(staging, "mirror", descriptor, python_bin="python", init_timeout=5, display_dir=final)

    expected = f"plugin executable {final / 'mirror'} stops with error fork/exec {final / 'mirror'}: permission denied"
    assert caught.value.message.startswith(expected)
    assert str(staging) not in caught.value.message

    with pytest.raises(PackageInvalid) as caught:
        verify_descriptor(
            staging, "mirror", {"language": "python", "executable": "mirror"}, python_bin="no-such-python3",
            init_timeout=5, display_dir=final,
        )
    assert caught.value.message.startswith(f"plugin executable {final / 'mirror'} stops with error exec:")


def test_a_script_without_its_interpreter_line_is_refused_as_exec_format_error(tmp_path, token):
    plugin_dir = place("chatty", tmp_path, token)
    executable = plugin_dir / "noshebang.sh"

    message, _ = refusal(plugin_dir, "chatty", "go", "noshebang.sh")

    expected = f"plugin executable {executable} stops with error fork/exec {executable}: exec format error ("
    assert message.startswith(expected)


@pytest.mark.parametrize(
    ("fixture", "executable", "words", "said"),
    [
        ("quitter", "quit.sh", "stops with error exit status 3 (", "quitter: no settings found, giving up"),
        ("finisher", "finish.sh", "control handshake error: receive time out (it exited with status 0",
         "finisher: nothing to do"),
        ("crasher", "crash.sh", "stops with error signal: killed (", "crasher: about to be killed"),
    ],
)
def test_a_plugin_that_exits_at_once_is_refused_with_its_output_without_waiting(
    tmp_path, token, fixture, executable, words, said,
):
    plugin_dir = place(fixture, tmp_path, token)
    path = plugin_dir / executable

    message, took = refusal(plugin_dir, fixture, "go", executable, init_timeout=60.0)

    kind = "plugin executable" if "stops with error" in words else "plugin"
    assert message.startswith(f"{kind} {path} {words}")
    assert "its last output:\n" in message and said in message
    assert took < 30  # refused when it ended, not at the 60 s initTimeout
    assert processes_with(token) == []


def test_a_python_plugin_without_the_sdk_is_refused_with_pythons_own_words(tmp_path, token):
    plugin_dir = place("pygreet", tmp_path, token)
    executable = plugin_dir / "pygreet.py"

    # The service's own Python has pynng but no `ekuiper`, like a pythonBin the SDK was never installed for.
    message, _ = refusal(plugin_dir, "pygreet", "python", "pygreet.py", python_bin=sys.executable)

    assert message.startswith(f"plugin executable {executable} stops with error exit status 1 (")
    assert "ModuleNotFoundError: No module named 'ekuiper'" in message


def test_the_output_quoted_is_bounded_to_the_last_lines(tmp_path, token):
    plugin_dir = place("chatty", tmp_path, token)

    message, _ = refusal(plugin_dir, "chatty", "go", "chatty.sh")

    quoted = message.split("its last output:\n", 1)[1].rstrip(")").splitlines()
    assert quoted == [str(number) for number in range(200000 - portable.TAIL_LINES + 1, 200001)]
    assert len(message) < portable.TAIL_CHARS + 1024


def test_output_that_is_not_text_is_quoted_cleaned(tmp_path, token):
    plugin_dir = place("chatty", tmp_path, token)

    message, _ = refusal(plugin_dir, "chatty", "go", "noisy.sh")

    assert message.startswith(f"plugin executable {plugin_dir / 'noisy.sh'} stops with error exit status 1 (")
    assert message.endswith("noisy: the last line)")  # terminal escapes removed
    assert not any(ord(char) < 32 and char not in "\n\t" for char in message)
    assert len(message) < portable.TAIL_CHARS + 1024


def test_two_checks_of_one_plugin_at_once_each_get_their_own_socket(sdk_python, tmp_path, token):
    """Two workers checking the same name at the same moment: each plugin meets its own listener."""
    plugin_dir = place("pygreet", tmp_path, token)
    results: list[object] = []

    def check() -> None:
        try:
            results.append(verify_handshake(
                plugin_dir, "pygreet", "python", "pygreet.py", python_bin=str(sdk_python), init_timeout=30.0,
            ))
        except Exception as exc:  # reported below, with its message
            results.append(exc)

    threads = [threading.Thread(target=check) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [getattr(result, "message", result) for result in results] == [b"handshake", b"handshake"]
    assert processes_with(token) == []


def test_a_python_bin_that_is_not_on_the_path_is_refused_in_gos_words(tmp_path, token):
    plugin_dir = place("pygreet", tmp_path, token)

    message, _ = refusal(plugin_dir, "pygreet", "python", "pygreet.py", python_bin="no-such-python3")

    assert message.startswith(
        f'plugin executable {plugin_dir / "pygreet.py"} stops with error exec: "no-such-python3":'
        " executable file not found in $PATH ("
    )


def test_a_missing_python_bin_path_is_refused_as_fork_exec(tmp_path, token):
    plugin_dir = place("pygreet", tmp_path, token)
    missing = tmp_path / "nowhere" / "python"

    message, _ = refusal(plugin_dir, "pygreet", "python", "pygreet.py", python_bin=str(missing))

    assert message.startswith(
        f"plugin executable {plugin_dir / 'pygreet.py'} stops with error fork/exec {missing}:"
        " no such file or directory ("
    )


@pytest.mark.parametrize(
    ("language", "virtual_env_type", "expected"),
    [
        ("java", None, "fail to start plugin silent: unsupported language: java"),
        ("python", "venv", "fail to start plugin silent: unsupported virtual type: venv"),
    ],
)
def test_what_ekuiper_cannot_start_is_refused_before_anything_runs(
    tmp_path, token, language, virtual_env_type, expected,
):
    plugin_dir = place("silent", tmp_path, token)

    message, _ = refusal(plugin_dir, "silent", language, "silent.sh", virtual_env_type=virtual_env_type)

    assert message == expected
    assert processes_with(token) == []


def test_a_name_too_long_for_the_control_socket_is_refused_as_ekuiper_would_fail_to_listen(tmp_path, token):
    plugin_dir = place("silent", tmp_path, token)
    name = "n" * 120  # /tmp/plugin_<name>.ipc no longer fits a unix socket address (108 bytes)

    message, _ = refusal(plugin_dir, name, "go", "silent.sh")

    assert message.startswith("can't create new control channel: can't listen on rep socket: ")
    assert message.endswith(f"(ipc:///tmp/plugin_{name}.ipc)")
    assert processes_with(token) == []  # the plugin was never started


def test_without_namespaces_the_check_is_refused_and_nothing_runs(tmp_path, token):
    plugin_dir = place("silent", tmp_path, token)
    missing = portable.probe_namespaces(str(tmp_path / "no-unshare"))
    assert not missing.available

    message, _ = refusal(plugin_dir, "silent", "go", "silent.sh", confined=missing)

    assert message.startswith("portable plugin silent cannot be started for its handshake check on this machine (")
    assert "set portable.verifyOnInstall to false" in message
    assert processes_with(token) == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("[a for a in args if a != '--net']", "not in a network namespace of its own"),
        ("['--user', '--map-root-user', *args]", "cannot become nobody: "),
    ],
    ids=["host-network", "no-nobody"],
)
def test_where_the_network_or_nobody_cannot_be_had_the_check_is_refused(tmp_path, token, change, why):
    """An unshare that leaves the host's network, or one in a user namespace of the service's own (all a
    service not run as root could have): the probe must say so, and no check runs with fewer walls."""
    wrapper = tmp_path / "unshare"
    wrapper.write_text(
        f"#!{shutil.which('python3', path='/usr/bin:/bin')}\nimport os, sys\nargs = sys.argv[1:]\n"
        f"os.execv({shutil.which('unshare')!r}, ['unshare', *{change}])\n"
    )
    wrapper.chmod(0o755)
    plugin_dir = place("silent", tmp_path, token)

    found = portable.probe_namespaces(str(wrapper))

    assert not found.available
    assert why in found.description, found.description
    message, _ = refusal(plugin_dir, "silent", "go", "silent.sh", confined=found)
    assert message.startswith("portable plugin silent cannot be started for its handshake check on this machine (")
    assert processes_with(token) == []


def test_this_machine_can_confine_the_check():
    """CI runs as root with util-linux: the check must be available there, not silently refused."""
    found = portable.namespaces()
    assert found.available, found.description
    assert portable.namespaces() is found  # probed once per process


def test_init_timeout_must_be_a_sane_number_of_seconds(tmp_path, token):
    plugin_dir = place("silent", tmp_path, token)
    for bad in (0, -1, portable.MAX_INIT_TIMEOUT + 1):
        with pytest.raises(ValueError):
            verify_handshake(plugin_dir, "silent", "go", "silent.sh", python_bin="python", init_timeout=bad)
    assert processes_with(token) == []


# ---------------------------------------------------------------------------- what the plugin may do

NOBODY = 65534  # the uid and gid the check runs the plugin as
NOBODY_NAME = pwd.getpwuid(NOBODY).pw_name  # "nobody"


@pytest.fixture
def listener():
    """A TCP socket listening on 127.0.0.1: a connection to it completes in the kernel, even unaccepted."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def pending_connections(server: socket.socket) -> int:
    """How many connections reached `server` (accepting each, without waiting for more)."""
    count = 0
    for _ in range(64):
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1
    return count


HOSTILE = """#!/bin/sh
# Everything it tries must fail: it runs as nobody, without the host's network, /tmp or the service's files.
echo "uid $(id -u) gid $(id -g) groups $(id -G)"
grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -s '\\t' ' '
umount /tmp 2>/dev/null && echo "umount /tmp: done" || echo "umount /tmp: refused"
( : > /proc/1/fd/1 ) 2>/dev/null && echo "/proc/1/fd/1: opened" || echo "/proc/1/fd/1: refused"
{curl} -s -m 3 -o /dev/null http://127.0.0.1:{port}/ && echo "curl: connected" || echo "curl: refused"
{python} -c 'import socket; socket.create_connection(("127.0.0.1", {port}), timeout=3)' 2>/dev/null \\
    && echo "python: connected" || echo "python: refused"
{python} -c 'import socket; s = socket.create_server(("127.0.0.1", 0)); socket.create_connection(s.getsockname())' \\
    && echo "own loopback: works" || echo "own loopback: broken"
touch written-by-plugin 2>/dev/null && echo "own folder: written" || echo "own folder: refused"
echo x 2>/dev/null >> {registry} && echo "registry: written" || echo "registry: refused"
touch /var/tmp/left-by-{token} /dev/shm/left-by-{token} && ipcmk -M {segment} >/dev/null && echo "scratch: written"
exit 3
"""


def shared_memory_of_size(size: int) -> list[str]:
    """The host's System V shared memory segments of `size` bytes (/proc/sysvipc/shm)."""
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return [row for row in rows if row.split()[3] == str(size)]


def hostile_plugin(folder: Path, port: int, registry: Path, token: str, segment: int) -> Path:
    """Write the HOSTILE executable into `folder` as run.sh, aimed at `port`, the file `registry` and more."""
    folder.mkdir(parents=True)
    script = HOSTILE.format(curl=shutil.which("curl"), python=shutil.which("python3", path="/usr/bin:/bin"),
                            port=port, registry=registry, token=token, segment=segment)
    (folder / "run.sh").write_text(script)
    (folder / "run.sh").chmod(0o755)
    return folder


def test_the_plugin_runs_as_nobody_without_the_hosts_network_tmp_or_the_service_files(tmp_path, token, listener):
    home = tmp_path / token / "home"
    registry = home / "data" / "kuiper-plugins.db"
    registry.parent.mkdir(parents=True)
    registry.write_bytes(b"SQLite format 3\x00")
    segment = 40000 + uuid.uuid4().int % 20000  # a size no other segment on the host has (checked below)
    assert shared_memory_of_size(segment) == []
    plugin_dir = hostile_plugin(home / "plugins" / "portable" / "hostile", listener.getsockname()[1], registry,
                                token, segment)
    before = tree(home)

    message, _ = refusal(plugin_dir, "hostile", "go", "run.sh")

    assert message.startswith(f"plugin executable {plugin_dir / 'run.sh'} stops with error exit status 3 (")
    said = message.split("its last output:\n", 1)[1]
    assert f"uid {NOBODY} gid {NOBODY} groups {NOBODY}\n" in said
    for field in ("CapPrm", "CapEff", "CapBnd"):
        assert f"{field}: 0000000000000000\n" in said
    assert "NoNewPrivs: 1\n" in said
    for attempt in ("umount /tmp", "/proc/1/fd/1", "curl", "python", "own folder", "registry"):
        assert f"{attempt}: refused" in said, said
    assert "own loopback: works" in said  # a network of its own, with a loopback of its own
    # The scratch folders anyone may write to, and System V IPC, were its own, and went with it.
    assert "scratch: written" in said
    assert not Path(f"/var/tmp/left-by-{token}").exists() and not Path(f"/dev/shm/left-by-{token}").exists()
    assert shared_memory_of_size(segment) == []
    assert pending_connections(listener) == 0
    assert tree(home) == before
    assert registry.read_bytes() == b"SQLite format 3\x00"
    assert processes_with(token) == []


def test_a_plugin_writing_into_the_checks_own_output_is_refused_its_own_words_and_the_worker_stays_small(
    tmp_path, token,
):
    """Round 3's P6, scaled down: 64 MiB into /proc/1/fd/1, the helper's report channel. The plugin, as nobody,
    cannot even open it. Measured in a Python of its own, whose peak RSS is this check's alone: VmHWM, as
    ru_maxrss would carry over the RSS of the pytest process it was forked from."""
    plugin_dir = tmp_path / token / "spill"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "run.sh").write_text("#!/bin/sh\nhead -c 64M /dev/zero > /proc/1/fd/1\nexit 4\n")
    (plugin_dir / "run.sh").chmod(0o755)
    program = (
        "import json, sys, psutil\n"
        "from kuiper_plugins.engine.portable import verify_handshake\n"
        "from kuiper_plugins.errors import PackageInvalid\n"
        "start = psutil.Process().memory_info().rss\n"
        "try:\n"
        "    verify_handshake(sys.argv[1], 'spill', 'go', 'run.sh', python_bin='python', init_timeout=30)\n"
        "    message = 'no refusal'\n"
        "except PackageInvalid as exc:\n"
        "    message = exc.message\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "peak = int(status['VmHWM'].split()[0]) * 1024\n"
        "print(json.dumps({'message': message, 'growth': peak - start}))\n"
    )
    done = subprocess.run([sys.executable, "-c", program, str(plugin_dir)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result = json.loads(done.stdout)

    executable = plugin_dir / "run.sh"
    assert result["message"].startswith(f"plugin executable {executable} stops with error exit status 4 ("), result
    assert "cannot create /proc/1/fd/1: Permission denied" in result["message"]
    assert result["growth"] < 16 * 1024 * 1024, result  # before: 200 MiB and more for 64 MiB written
    assert processes_with(token) == []


def test_a_check_whose_report_overflows_is_killed_and_refused_for_that(tmp_path, token):
    """Should anything write into the helper's stdout after all, the service reads at most REPORT_LIMIT bytes.

    The "confinement" here is a shell that spills 8 MiB on the helper's stdout and then sleeps: it stands for
    a writer the plugin's uid no longer allows. The check is killed at the cap, not at its deadline.
    """
    plugin_dir = place("silent", tmp_path, token)
    spilling = portable.Namespaces(
        ("/bin/sh", "-c", 'head -c 8M /dev/zero; sleep 60; exec "$@"', token), "a shell that spills 8 MiB",
    )

    message, took = refusal(plugin_dir, "silent", "go", "silent.sh", init_timeout=30.0, confined=spilling)

    assert message == (
        "portable plugin silent was stopped during its handshake check (more than 1048576 bytes"
        " came on the check's own stdout, where only the check writes its one-line report: the plugin or something"
        " it started wrote into it)"
    )
    assert took < 30  # killed at the cap; its sleep 60 and the 45 s deadline never came
    assert processes_with(token) == []


def test_an_executable_nobody_may_not_run_is_refused_with_ekuipers_words_and_why(tmp_path, token):
    plugin_dir = tmp_path / token / "private"
    plugin_dir.mkdir(parents=True)
    executable = plugin_dir / "run.sh"
    executable.write_text("#!/bin/sh\necho started\nexit 3\n")
    executable.chmod(0o700)

    message, _ = refusal(plugin_dir, "private", "go", "run.sh")

    assert message == (
        f"plugin executable {executable} stops with error fork/exec {executable}: permission denied"
        f" (the check runs the plugin as the user nobody, who may not read {executable} (mode 0700); it printed"
        " nothing)"
    )
    assert stat.S_IMODE(executable.stat().st_mode) == 0o700  # the service does not open it up
    assert processes_with(token) == []


def test_a_python_plugin_with_a_module_nobody_may_read_is_refused_with_why(sdk_python, tmp_path, token):
    plugin_dir = place("pygreet", tmp_path, token)
    (plugin_dir / "greeting.py").chmod(0o600)

    message, _ = refusal(plugin_dir, "pygreet", "python", "pygreet.py", python_bin=str(sdk_python))

    assert message.startswith(
        f"plugin executable {plugin_dir / 'pygreet.py'} stops with error exit status 1 (the check runs the plugin"
        f" as the user nobody, who may not read {plugin_dir / 'greeting.py'} (mode 0600); it ended after "
    )
    assert "PermissionError: [Errno 13] Permission denied" in message


@pytest.fixture
def closed_folder(token):
    """A folder like `mktemp -d` makes, 0700, outside /tmp (which the check covers anyway); removed after."""
    folder = Path(tempfile.mkdtemp(prefix=f"{token}-", dir="/var/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_the_sdk_plugin_shakes_hands_as_nobody_from_folders_closed_to_others(sdk_python, closed_folder, token):
    """The plugin's folder sits below a 0700 folder outside /tmp, and its Python below /root (0700 here: the
    SDK venv's python links to a pyenv one there); both are reachable as nobody, at their real paths."""
    assert stat.S_IMODE(closed_folder.stat().st_mode) == 0o700
    plugin_dir = closed_folder / "plugins" / "portable" / "pygreet"
    shutil.copytree(FIXTURES / "pygreet", plugin_dir)
    (plugin_dir / "whoami.py").write_text("import os\nprint(f'pygreet runs as uid {os.getuid()}')\n")
    (plugin_dir / "pygreet.py").write_text("import whoami\n" + (FIXTURES / "pygreet" / "pygreet.py").read_text())
    before = tree(closed_folder)

    shook = verify_handshake(
        plugin_dir, "pygreet", "python", "pygreet.py", python_bin=str(sdk_python), init_timeout=30.0,
    )

    assert shook.message == b"handshake"
    assert f"pygreet runs as uid {NOBODY}" in shook.output
    assert f"pygreet started in {plugin_dir} with" in shook.output
    assert tree(closed_folder) == before
    assert stat.S_IMODE(closed_folder.stat().st_mode) == 0o700
    assert processes_with(token) == []


def test_a_real_go_plugin_shakes_hands_as_nobody_from_a_folder_closed_to_others(go_portable, closed_folder, token):
    """A Go executable dialling with mangos (the engine's nanomsg library) as eKuiper's Go SDK does; its
    folder sits below a 0700 folder outside /tmp. It prints os.Getuid() and os.Getgid() before it dials."""
    plugin_dir = closed_folder / "plugins" / "portable" / "gomirror"
    plugin_dir.mkdir(parents=True)
    shutil.copyfile(go_portable.binary, plugin_dir / "gomirror")
    (plugin_dir / "gomirror").chmod(0o755)
    before = tree(closed_folder)

    shook = verify_handshake(plugin_dir, "gomirror", "go", "gomirror", python_bin="no-python-needed",
                             init_timeout=30.0)

    assert shook.message == b"handshake"  # what eKuiper's Go SDK sends
    # Started as eKuiper starts a Go plugin: `<executable> {"sendTimeout":1000}` in its folder.
    assert f'gomirror started in {plugin_dir} with ["{{\\"sendTimeout\\":1000}}"]\n' in shook.output
    assert "gomirror config parsed: sendTimeout 1000\n" in shook.output
    assert f"gomirror runs as uid {NOBODY} gid {NOBODY}\n" in shook.output
    assert "gomirror dialing ipc:///tmp/plugin_gomirror.ipc\n" in shook.output
    assert 0 < shook.elapsed < 30
    assert tree(closed_folder) == before
    assert stat.S_IMODE(closed_folder.stat().st_mode) == 0o700
    assert not Path("/tmp/plugin_gomirror.ipc").exists()
    assert processes_with(token) == []  # the plugin was blocked in its receive: it was stopped, not left


# ---------------------------------------------------------------------------- portable.initTimeout

GO_DURATION_TEXTS = [
    "60s", "1m30s", "500ms", "1h", "2h45m", "1.5s", ".5s", "1h2m3.5s", "300us", "1\u00b5s", "1\u03bcs",
    "1000000ns", "0.001h", "+90s", "3600s", "3601s",
    "", "5", "abc", "5x", "1.", ".", "s", "-1s", "0", "+0", "-0", "0s", "1 s", "1.5.5s", "1s2", "9999999999h",
    "1e3s", "--1s", "1sm",
]


@pytest.fixture(scope="session")
def go_durations(request, tmp_path_factory) -> dict[str, dict]:
    """Go's own time.ParseDuration verdict on each of GO_DURATION_TEXTS (tests/portable/durationcheck)."""
    known = ("/usr/lib/go/bin/go", "/usr/local/go/bin/go")  # Debian's golang-go, the upstream tarball
    go = shutil.which("go") or next((path for path in known if os.path.exists(path)), None)
    assert go, "the go command is needed (make system-deps installs Debian's golang-go)"
    work = tmp_path_factory.mktemp("durationcheck")
    cache = request.config.cache.mkdir("go-build") if getattr(request.config, "cache", None) else work / "go-build"
    env = {
        **os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "", "GOWORK": "off",
        "GO111MODULE": "on", "CGO_ENABLED": "0", "GOCACHE": str(cache), "GOPATH": str(work / "gopath"),
    }
    binary = work / "durationcheck"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=FIXTURES / "durationcheck", env=env, capture_output=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr.decode(errors="replace")
    done = subprocess.run(
        [str(binary)], input=json.dumps(GO_DURATION_TEXTS).encode(), capture_output=True, timeout=60, check=True,
    )
    return dict(zip(GO_DURATION_TEXTS, json.loads(done.stdout), strict=True))


@pytest.mark.parametrize("text", GO_DURATION_TEXTS)
def test_init_timeout_reads_durations_as_go_does(go_durations, text):
    go = go_durations[text]
    if "error" in go:
        with pytest.raises(ValueError) as caught:
            parse_duration(text)
        assert str(caught.value) == f"portable.initTimeout: {go['error']}"
    elif 0 < go["ns"] <= portable.MAX_INIT_TIMEOUT * 1e9:
        assert parse_duration(text) == pytest.approx(go["ns"] / 1e9, rel=1e-12, abs=1e-12)
    else:
        with pytest.raises(ValueError, match=r"^portable.initTimeout must be above 0 and at most 3600s"):
            parse_duration(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("60s", 60.0), ("1m30s", 90.0), ("500ms", 0.5), (5000, 5.0), (60000, 60.0), (2000.0, 2.0)],
)
def test_init_timeout_as_ekuiper_writes_it(value, seconds):
    # A number is milliseconds, as eKuiper reads a number in its kuiper.yaml.
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [True, None, [], 1.5, "1.5", 0, -5])
def test_init_timeout_refusals_name_the_key(value):
    with pytest.raises(ValueError, match=r"^portable\.initTimeout"):
        parse_duration(value)


def test_the_default_init_timeout_is_ekuipers():
    assert parse_duration(portable.DEFAULT_INIT_TIMEOUT) == 60.0


# ---------------------------------------------------------------------------- through the API


def zip_folder(folder: Path, target: Path, extra: dict[str, tuple[bytes, int]] | None = None) -> Path:
    """Zip a plugin folder with each file's mode (the run bit included), as a packager would."""
    import zipfile

    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(str(path.relative_to(folder)))
                info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
                archive.writestr(info, path.read_bytes())
        for name, (data, mode) in (extra or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(info, data)
    return target


def test_a_real_python_plugin_installs_through_the_api_after_its_handshake(make_service, file_server, sdk_python):
    service = make_service(portable_verify_on_install=True, portable_python_bin=str(sdk_python))
    zip_folder(FIXTURES / "pygreet", file_server.root / "pygreet.zip")
    response = service.post("portables", {"name": "pygreet", "file": file_server.url("pygreet.zip")})
    assert response.status_code == 201, response.data
    described = service.client.get("/plugins/portables/pygreet").get_json()
    assert described["executable"] == str(service.layout.portable_dir("pygreet") / "pygreet.py")
    assert (service.home / "etc/sources/greeting.yaml").exists()
    assert not Path("/tmp/plugin_pygreet.ipc").exists()
    assert helpers_of_this_process() == []  # the check started ahead ran, and ended with it


def test_a_portable_with_install_sh_is_checked_after_its_script_and_leaves_no_check_running(
        make_service, file_server, sdk_python):
    """The check started on download is stopped once install.sh shows up; a new one runs after the script."""
    service = make_service(portable_verify_on_install=True, portable_python_bin=str(sdk_python))
    zip_folder(FIXTURES / "pygreet", file_server.root / "pygreet.zip",
               {"install.sh": (b"#!/bin/sh\ntouch installed.txt\n", 0o755)})
    response = service.post("portables", {"name": "pygreet", "file": file_server.url("pygreet.zip")})
    assert response.status_code == 201, response.data
    assert (service.layout.portable_dir("pygreet") / "installed.txt").is_file()
    assert helpers_of_this_process() == []


def test_a_real_go_plugin_installs_through_gunicorn_after_its_handshake(start_gunicorn, file_server, go_portable):
    server = start_gunicorn(KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL="true",
                            KUIPER_PLUGINS__PORTABLE__INITTIMEOUT="20s")
    descriptor = {"version": "v1.0.0", "language": "go", "executable": "gomirror", "sources": ["goticks"],
                  "sinks": ["goprint"]}
    packaged = file_server.root / "gomirror-src"
    (packaged / "sources").mkdir(parents=True)
    (packaged / "gomirror.json").write_text(json.dumps(descriptor))
    (packaged / "sources" / "goticks.yaml").write_text("default:\n  interval: 1000\n")
    shutil.copyfile(go_portable.binary, packaged / "gomirror")
    (packaged / "gomirror").chmod(0o755)
    zip_folder(packaged, file_server.root / "gomirror.zip")

    response = requests.post(f"{server.url}/plugins/portables",
                             json={"name": "gomirror", "file": file_server.url("gomirror.zip")}, timeout=60)

    assert response.status_code == 201, response.text
    folder = server.home / "plugins" / "portable" / "gomirror"
    described = requests.get(f"{server.url}/plugins/portables/gomirror", timeout=10).json()
    assert described["language"] == "go"
    assert described["executable"] == str(folder / "gomirror")
    assert (folder / "gomirror").read_bytes() == go_portable.binary.read_bytes()
    assert stat.S_IMODE((folder / "gomirror").stat().st_mode) == 0o755
    assert (server.home / "etc" / "sources" / "goticks.yaml").exists()
    log = server.log_path.read_text(errors="replace")
    # The check's own log: the plugin shook hands, having run as nobody.
    assert "portable plugin gomirror: handshake after" in log
    assert f"gomirror runs as uid {NOBODY} gid {NOBODY}" in log
    assert not Path("/tmp/plugin_gomirror.ipc").exists()
    assert processes_with(str(folder)) == []


def install_silent(make_service, file_server, language: str):
    """Install tests/portable/silent, declared a `language` plugin, with the check on; the service, its state
    before, and the answer."""
    service = make_service(portable_verify_on_install=True, portable_init_timeout=2.0)
    descriptor = {"version": "v1", "language": language, "executable": "silent.sh", "sinks": ["hush"]}
    zip_folder(FIXTURES / "silent", file_server.root / f"silent-{language}.zip",
               {"silent.json": (json.dumps(descriptor).encode(), 0o644)})
    before = service.snapshot()
    response = service.post("portables", {"name": "silent", "file": file_server.url(f"silent-{language}.zip")})
    return service, before, response


def test_a_plugin_that_never_shakes_hands_is_refused_through_the_api_and_nothing_is_written(make_service, file_server):
    service, before, response = install_silent(make_service, file_server, "go")
    assert response.status_code == 400
    message = response.get_json()["message"]
    exe = service.layout.portable_dir("silent") / "silent.sh"
    assert message.startswith(f"portable plugin create command error: fail to install plugin: plugin {exe} control"
                              " handshake error: receive time out")
    assert helpers_of_this_process() == []
    service.assert_unchanged(before)


def test_a_portable_refused_by_its_plan_leaves_no_check_running_and_nothing_written(make_service, file_server):
    """The check starts as soon as the package is downloaded: a package refused by the rules ends it."""
    service, before, response = install_silent(make_service, file_server, "java")
    assert response.status_code == 400, response.data
    assert helpers_of_this_process() == []
    service.assert_unchanged(before)


def test_a_portable_refused_while_it_unpacks_leaves_no_check_running_and_nothing_written(make_service, file_server):
    """The check starts once the package is planned, before it unpacks: a member found corrupt then ends it."""
    service = make_service(portable_verify_on_install=True, portable_init_timeout=2.0)
    descriptor = {"version": "v1", "language": "go", "executable": "silent.sh", "sinks": ["hush"]}
    target = zip_folder(FIXTURES / "silent", file_server.root / "torn.zip", {
        "silent.json": (json.dumps(descriptor).encode(), 0o644),
        "lib/data.txt": (b"CORRUPT-ME " * 50, 0o644),  # stored: its bytes stand as they are in the zip
    })
    target.write_bytes(target.read_bytes().replace(b"CORRUPT-ME", b"CORRUPT-MF", 1))  # its CRC no longer holds
    before = service.snapshot()

    response = service.post("portables", {"name": "silent", "file": file_server.url("torn.zip")})

    assert response.status_code == 400
    assert response.get_json()["message"] == ('portable plugin create command error: fail to install plugin: invalid'
                                              ' zip file: entry "lib/data.txt" is corrupt: Bad CRC-32 (what it unpacks'
                                              ' to does not match the checksum the archive declares)')
    assert helpers_of_this_process() == []
    service.assert_unchanged(before)


def test_an_executable_without_its_run_bit_is_refused_with_permission_denied(make_service, file_server):
    service = make_service(portable_verify_on_install=True)
    descriptor = {"version": "v1", "language": "go", "executable": "mirror", "sinks": ["echo"]}
    zip_folder(FIXTURES / "silent", file_server.root / "mirror.zip", {
        "mirror.json": (json.dumps(descriptor).encode(), 0o644), "mirror": (b"#!/bin/sh\nexit 0\n", 0o644)})
    before = service.snapshot()
    response = service.post("portables", {"name": "mirror", "file": file_server.url("mirror.zip")})
    assert response.status_code == 400
    exe = service.layout.portable_dir("mirror") / "mirror"
    assert (f"fail to install plugin: plugin executable {exe} stops with error fork/exec {exe}: permission denied"
            in response.get_json()["message"])
    service.assert_unchanged(before)


def portable_script_package(file_server, zip_name: str, script: str, version: str = "v1") -> str:
    descriptor = {"version": version, "language": "go", "executable": "run.sh", "sinks": ["echo"]}
    zip_folder(FIXTURES / "silent", file_server.root / zip_name, {
        "mirror.json": (json.dumps(descriptor).encode(), 0o644), "run.sh": (b"#!/bin/sh\nexit 0\n", 0o755),
        "install.sh": (script.encode(), 0o644)})
    return file_server.url(zip_name)


def test_a_portable_install_sh_runs_in_the_plugins_own_folder_with_the_proxy(make_service, file_server, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("no_proxy", "localhost")
    monkeypatch.setenv("SECRET_TOKEN", "not for scripts")
    service = make_service()
    script = ('pwd > where.txt\nenv | sort > env.txt\nmkdir venv && ln -s "$PWD/venv" venv-link\n')
    url = portable_script_package(file_server, "mirror.zip", script)
    assert service.post("portables", {"name": "mirror", "file": url}).status_code == 201
    folder = service.layout.portable_dir("mirror")
    assert (folder / "where.txt").read_text().strip() == str(folder)
    env = (folder / "env.txt").read_text()
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in env and "no_proxy=localhost" in env
    assert "SECRET_TOKEN" not in env
    assert (folder / "venv-link").resolve() == folder / "venv"  # an absolute link made in place stays valid


def test_a_failing_portable_install_sh_takes_the_folder_away_and_an_update_puts_the_old_one_back(
        make_service, file_server):
    service = make_service()
    before = service.snapshot()
    failing = portable_script_package(file_server, "bad.zip", "mkdir made-here\necho broken >&2\nexit 4\n", "v2")
    response = service.post("portables", {"name": "mirror", "file": failing})
    assert response.status_code == 400 and "exit status 4" in response.get_json()["message"]
    service.assert_unchanged(before)
    good = portable_script_package(file_server, "good.zip", "touch installed-v1\n")
    assert service.post("portables", {"name": "mirror", "file": good}).status_code == 201
    before = service.snapshot()
    response = service.client.put("/plugins/portables/mirror", json={"file": failing})
    assert response.status_code == 400
    service.assert_unchanged(before)
    assert (service.layout.portable_dir("mirror") / "installed-v1").exists()
    assert service.client.get("/plugins/portables/mirror").get_json()["version"] == "v1"


def test_without_install_scripts_a_hostile_portable_runs_as_nobody_and_cannot_call_the_api(
        start_gunicorn, file_server, tmp_path, token):
    """Round 3's P2: installScripts off, the check on. The package's executable records `id` and calls the
    service's own API on its port; it must have run as nobody, and no request of its reached gunicorn."""
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__INSTALLSCRIPTS="false",
                            KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL="true",
                            KUIPER_PLUGINS__PORTABLE__INITTIMEOUT="20s")
    curl, python = shutil.which("curl"), shutil.which("python3", path="/usr/bin:/bin")
    api = f"http://127.0.0.1:{server.port}/plugins/portables?from={token}"
    script = (
        "#!/bin/sh\n"
        'echo "id: $(id)"\n'
        f"{curl} -s -m 3 -o /dev/null '{api}' && echo 'curl: reached the API' || echo 'curl: refused'\n"
        f"{python} -c 'import urllib.request; urllib.request.urlopen(\"{api}\", timeout=3)' 2>/dev/null"
        " && echo 'python: reached the API' || echo 'python: refused'\n"
        "exit 3\n"
    )
    descriptor = {"version": "v1", "language": "go", "executable": "run.sh", "sinks": ["hostile"]}
    zip_folder(FIXTURES / "silent", file_server.root / "hostile.zip", {
        "hostile.json": (json.dumps(descriptor).encode(), 0o644), "run.sh": (script.encode(), 0o755)})
    before = disk_state(server.home)

    response = requests.post(f"{server.url}/plugins/portables",
                             json={"name": "hostile", "file": file_server.url("hostile.zip")}, timeout=60)

    assert response.status_code == 400, response.text
    message = response.json()["message"]
    exe = server.home / "plugins" / "portable" / "hostile" / "run.sh"
    assert message.startswith(
        f"portable plugin create command error: fail to install plugin: plugin executable {exe} stops with error"
        " exit status 3 ("
    ), message
    group = grp.getgrgid(NOBODY).gr_name
    assert f"id: uid={NOBODY}({NOBODY_NAME}) gid={NOBODY}({group})" in message
    assert "curl: refused" in message and "python: refused" in message
    assert requests.get(f"{server.url}/plugins/portables", timeout=10).json() == []
    assert disk_state(server.home) == before
    log = server.log_path.read_text(errors="replace")
    assert '"POST /plugins/portables HTTP/1.1" 400' in log  # the access log is on, and holds the install
    assert token not in log  # and no request of the plugin's
    assert processes_with(token) == []
