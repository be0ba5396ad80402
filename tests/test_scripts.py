"""install.sh runs for real: arguments, environment, deadline, leftovers, bounded output, kill_marked."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import psutil
import pytest

from kuiper_plugins.errors import InvalidRequest, ScriptFailed
from kuiper_plugins.install.scripts import (
    MARKER_ENV,
    SCRIPT_PATH,
    UNSHARE_OPTIONS,
    check_shell_paras,
    kill_marked,
    probe_confinement,
    run_install_script,
)

MAIN = Path(__file__).resolve().parents[1]


def marked_pids(marker: str) -> list[int]:
    """Scan /proc on our own for live processes whose environment holds MARKER_ENV=marker."""
    entry = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path("/proc", name, "environ").read_bytes()
        except OSError:
            continue
        if entry in data.split(b"\0"):
            pids.append(int(name))
    return pids


def assert_no_survivors(marker: str) -> None:
    assert marked_pids(marker) == []
    assert kill_marked(marker) == 0


@pytest.fixture
def marker():
    value = uuid.uuid4().hex
    yield value
    for pid in marked_pids(value):  # never leave a stray behind, even when a test failed
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


def run(workdir: Path, marker: str, body: str, args=(), timeout: float = 10) -> str:
    script = workdir / "install.sh"
    script.write_text(body)
    return run_install_script(script, list(args), cwd=workdir, timeout=timeout, marker=marker)


def test_arguments_reach_the_script_verbatim(workdir, marker, tmp_path):
    pwned = [tmp_path / f"pwned{i}" for i in range(3)]
    args = [
        f"; touch {pwned[0]}",
        f"$(touch {pwned[1]})",
        f"`touch {pwned[2]}`",
        "two  words",
        "",
        "*",
        "-n",
        "line\nbreak",
        "ünïcode '\"",
    ]
    body = 'for a in "$@"; do printf "[%s]\\n" "$a"; done\nprintf "count=%s\\n" "$#"\n'
    out = run(workdir, marker, body, args)
    assert out == "".join(f"[{a}]\n" for a in args) + f"count={len(args)}\n"
    assert not any(path.exists() for path in pwned)


def test_runs_in_cwd_with_stdin_at_eof(workdir, marker):
    (workdir / "payload.txt").write_text("x")
    body = 'pwd -P\nreadlink /proc/$$/fd/0\nif read line; then echo "read:$line"; else echo "stdin:eof"; fi\nls\n'
    # Give this process a stdin with data in it, so an inherited stdin would show.
    read_end, write_end = os.pipe()
    os.write(write_end, b"leaked\n")
    os.close(write_end)
    saved_stdin = os.dup(0)
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        out = run(workdir, marker, body, timeout=5)
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
    lines = [os.path.realpath(workdir), "/dev/null", "stdin:eof", "install.sh", "payload.txt"]
    assert out.splitlines() == lines


def test_environment_is_built_from_scratch(workdir, marker, monkeypatch):
    monkeypatch.setenv("KUIPER_CANARY", "canary-secret-value")
    out = run(workdir, marker, "env\n")
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert "canary-secret-value" not in out
    home = os.path.abspath(workdir)
    assert env.pop("PWD", home) == home  # dash exports its own PWD
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": home,
        MARKER_ENV: marker,
    }


def test_exit_zero_returns_the_output(workdir, marker):
    assert run(workdir, marker, "echo hello\necho oops >&2\nexit 0\n") == "hello\noops\n"


def test_nonzero_exit_fails_with_status_and_last_lines(workdir, marker):
    body = 'i=1\nwhile [ $i -le 30 ]; do echo "row-$i"; i=$((i+1)); done\necho "to stderr" >&2\nexit 3\n'
    with pytest.raises(ScriptFailed) as failed:
        run(workdir, marker, body)
    message = failed.value.message
    assert message.startswith("install.sh failed with exit status 3: ")
    assert "row-30\n" in message and "row-12\n" in message and message.endswith("to stderr")
    assert "row-11\n" not in message


def test_failure_message_is_bounded_for_one_huge_line(workdir, marker):
    with pytest.raises(ScriptFailed) as failed:
        run(workdir, marker, "head -c 100000 /dev/zero | tr '\\0' x\nexit 1\n")
    assert "exit status 1" in failed.value.message
    assert len(failed.value.message) < 2200


def test_killed_by_a_signal_names_it(workdir, marker):
    with pytest.raises(ScriptFailed) as failed:
        run(workdir, marker, "echo before\nkill -9 $$\necho after\n")
    assert "signal 9 (SIGKILL)" in failed.value.message
    assert "before" in failed.value.message and "after" not in failed.value.message


def test_timeout_kills_the_script_and_everything_it_started(workdir, marker):
    body = (
        "echo started\n"
        "sleep 3600 &\n"
        "nohup sleep 3600 >/dev/null 2>&1 &\n"
        "setsid sh -c 'while :; do sleep 1; done' &\n"
        "setsid sleep 3600 &\n"
        "while :; do :; done\n"
    )
    started = time.monotonic()
    with pytest.raises(ScriptFailed) as failed:
        run(workdir, marker, body, timeout=1)
    elapsed = time.monotonic() - started
    assert failed.value.message.startswith("install.sh did not finish within 1 seconds and was killed: ")
    assert "started" in failed.value.message
    assert 1 <= elapsed < 5
    assert_no_survivors(marker)


def with_token(token: str) -> list[int]:
    """Live (not zombie) processes on this machine with `token` in their command line, seen through psutil.

    The script's processes live in a PID namespace with its own /proc: a pid they write down means
    nothing out here, so leftovers are found by a word in their command line instead.
    """
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(token in part for part in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


@pytest.fixture
def token():
    value = f"leftover-{uuid.uuid4().hex}"
    yield value
    for pid in with_token(value):  # never leave a stray behind, even when a test failed
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


WAIT_FOR_PIDFILE = 'i=0\nwhile [ ! -s {name} ] && [ "$i" -lt 500 ]; do sleep 0.01; i=$((i+1)); done\n'
LOOP = "while :; do sleep 1; done"  # a shell that stays (exec sleep would drop the token from its cmdline)


@pytest.mark.parametrize(
    "leftover",
    [
        "setsid sh -c '{record}; {loop}' {token} &",
        "nohup sh -c '{record}; {loop}' {token} &",
        "sh -c '{record}; {loop}' {token} &",
        "setsid sh -c '{record}; while :; do echo spam; done' {token} &",
    ],
    ids=["setsid", "nohup", "background", "setsid-writer"],
)
def test_leftovers_are_killed_after_success(workdir, marker, token, leftover):
    # The leftover records its pid once in place (after setsid), and the script waits for that.
    start = leftover.format(record="echo $$ > leftover.pid", loop=LOOP, token=token)
    body = start + "\n" + WAIT_FOR_PIDFILE.format(name="leftover.pid")
    started = time.monotonic()
    run(workdir, marker, body + "echo done\n")
    assert time.monotonic() - started < 5
    assert (workdir / "leftover.pid").read_text().strip().isdigit()  # it did start
    assert with_token(token) == []
    assert_no_survivors(marker)


OWN_GROUP = (
    "import os, sys; os.setpgid(0, 0); open('member.pid', 'w').write(str(os.getpid())); "
    "os.execv('/bin/sh', ['sh', '-c', 'while :; do sleep 1; done', sys.argv[1]])"
)


@pytest.mark.parametrize(
    "start",
    [
        "env -i /bin/sh -c 'echo $$ > member.pid; {loop}' {token} &",  # in the script's group
        f'env -i {sys.executable} -c "{OWN_GROUP}" {{token}} &',  # its own group, still in the session
        "env -i setsid /bin/sh -c 'echo $$ > member.pid; {loop}' {token} &",  # no marker, left the session
        "env -u KUIPER_PLUGINS_OPERATION setsid /bin/sh -c 'echo $$ > member.pid; {loop}' {token} &",
    ],
    ids=["same-group", "own-group", "env-i-setsid", "env-u-setsid"],
)
def test_a_process_without_the_marker_is_killed(workdir, marker, token, start):
    run(workdir, marker, start.format(loop=LOOP, token=token) + "\n" + WAIT_FOR_PIDFILE.format(name="member.pid"))
    assert (workdir / "member.pid").read_text().strip().isdigit()  # it did start
    assert with_token(token) == []


@pytest.mark.parametrize("exit_status", [0, 1])
def test_an_escaped_pipe_holder_is_killed_and_does_not_keep_us_waiting(workdir, marker, token, exit_status):
    # `env -i` drops the marker and setsid leaves the group: only the PID namespace catches it.
    body = (
        f"env -i setsid /bin/sh -c 'echo $$ > escaped.pid; {LOOP}' {token} &\n"
        + WAIT_FOR_PIDFILE.format(name="escaped.pid")
        + f"echo done\nexit {exit_status}\n"
    )
    started = time.monotonic()
    if exit_status == 0:
        assert run(workdir, marker, body) == "done\n"
    else:
        with pytest.raises(ScriptFailed, match="exit status 1"):
            run(workdir, marker, body)
    assert time.monotonic() - started < 5
    assert with_token(token) == []


def test_a_script_that_closes_its_output_is_still_awaited(workdir, marker):
    assert run(workdir, marker, "echo first\nexec >&- 2>&-\nsleep 0.3\nexit 0\n") == "first\n"


@pytest.mark.parametrize("status", [0, 1])
def test_hundred_megabytes_of_output_are_bounded(workdir, marker, status):
    body = f"yes | head -c 100000000\necho last-line\nexit {status}\n"
    tracemalloc.start()
    started = time.monotonic()
    try:
        try:
            out = run(workdir, marker, body, timeout=60)
            failure = None
        except ScriptFailed as exc:
            out, failure = None, exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 15
    assert peak < 4 * 1024 * 1024
    if status == 0:
        assert failure is None
        assert len(out.encode()) <= 64 * 1024
        assert out.endswith("y\ny\nlast-line\n")
    else:
        assert "exit status 1" in failure.message and failure.message.endswith("last-line")


def test_control_characters_are_removed(workdir, marker):
    assert run(workdir, marker, "printf '\\033[31mred\\033[0m\\a\\r\\nplain\\tok\\n'\n") == "red\nplain\tok\n"


def test_output_is_logged(workdir, marker, caplog):
    with caplog.at_level(logging.INFO, logger="kuiper_plugins.install.scripts"):
        run(workdir, marker, "echo something-to-log\n")
    assert "something-to-log" in caplog.text
    assert "exited with status 0" in caplog.text


def test_a_script_that_cannot_start_fails_cleanly(workdir, marker):
    with pytest.raises(ScriptFailed) as failed:
        run_install_script(workdir / "install.sh", [], cwd=workdir / "missing", timeout=5, marker=marker)
    assert failed.value.message.startswith("install.sh could not be started: ")


def test_bad_parameters_are_refused_before_anything_runs(workdir, marker):
    with pytest.raises(InvalidRequest, match="NUL"):
        run(workdir, marker, "touch ran\n", ["a\0b"])
    assert not (workdir / "ran").exists()


@pytest.mark.parametrize("bad", [{"marker": ""}, {"marker": "a\0b"}, {"timeout": 0}])
def test_bad_marker_or_timeout_is_a_programming_error(workdir, marker, bad):
    options = {"cwd": workdir, "timeout": 5, "marker": marker, **bad}
    with pytest.raises(ValueError):
        run_install_script(workdir / "install.sh", [], **options)


def start_sleeper(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"], **env})


def test_kill_marked_kills_exact_matches_only(marker):
    target = start_sleeper({MARKER_ENV: marker})
    longer = start_sleeper({MARKER_ENV: marker + "0"})
    embedded = start_sleeper({"OTHER": f"{MARKER_ENV}={marker}"})
    bystanders = [longer, embedded]
    try:
        assert kill_marked(marker) == 1
        assert target.wait(timeout=5) == -signal.SIGKILL
        assert all(proc.poll() is None for proc in bystanders)
        assert marked_pids(marker) == []
    finally:
        for proc in [target, *bystanders]:
            proc.kill()
            proc.wait(timeout=5)


def test_kill_marked_spares_itself_and_its_parents(marker):
    # The shell and the python it starts both carry the marker; neither may be killed by that python.
    code = "from kuiper_plugins.install.scripts import kill_marked; import sys; print(kill_marked(sys.argv[1]))"
    command = f'{sys.executable} -c "{code}" {marker}; echo alive'
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        env={"PATH": os.environ["PATH"], MARKER_ENV: marker},
        cwd=MAIN,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\nalive\n"


@pytest.mark.parametrize("bad", ["", "a\0b", None])
def test_kill_marked_refuses_an_empty_marker(bad):
    with pytest.raises(ValueError):
        kill_marked(bad)


def test_kill_marked_without_matches_returns_zero(marker):
    assert kill_marked(marker) == 0


@pytest.mark.parametrize("paras", [[], ["x"] * 32, ("a", ""), ["ünï", "; rm -rf /"]])
def test_check_shell_paras_accepts(paras):
    check_shell_paras(paras)


@pytest.mark.parametrize(
    "paras, problem",
    [
        (["x"] * 33, "at most 32"),
        (["ok", "a\0b"], r"shellParas\[1\] contains a NUL"),
        (["ok", 5], r"shellParas\[1\] must be a string, not int"),
        ([None], "must be a string"),
        ([b"bytes"], "must be a string"),
        (["\ud800"], "not valid Unicode"),
        ("a string", "must be a list"),
        ({"a": "b"}, "must be a list"),
    ],
)
def test_check_shell_paras_refuses(paras, problem):
    with pytest.raises(InvalidRequest, match=problem):
        check_shell_paras(paras)


# ---------------------------------------------------------------------------- confinement: probe and refusal


def test_the_probe_finds_a_pid_namespace_on_this_machine(workdir, marker):
    confined = probe_confinement()
    assert confined.available, confined.description
    assert os.path.isabs(confined.command[0]) and confined.command[1:] == (*UNSHARE_OPTIONS[0], "--")
    # The script sees its own namespace: the init is PID 1, the script 2, and /proc is the namespace's.
    out = run_install_script(
        _write(workdir, "echo $$\nreadlink /proc/self/ns/pid\nls /proc | grep -c '^[0-9]'\n"), [],
        cwd=workdir, timeout=10, marker=marker, confined=confined,
    )
    pid, namespace, count = out.split()
    assert pid == "2"
    assert namespace.startswith("pid:[") and namespace != os.readlink("/proc/self/ns/pid")
    assert int(count) <= 4  # init, script, ls, grep: nothing of the host


def _write(workdir: Path, body: str) -> Path:
    script = workdir / "install.sh"
    script.write_text(body)
    return script


@pytest.mark.parametrize("unshare", ["missing", "/bin/false", "not-executable"])
def test_without_a_pid_namespace_every_script_is_refused(workdir, marker, tmp_path, unshare):
    path = str(tmp_path / unshare) if unshare != "/bin/false" else unshare
    if unshare == "not-executable":
        Path(path).write_text("#!/bin/sh\nexit 0\n")
    confined = probe_confinement(unshare=path)
    assert not confined.available
    assert confined.command == ()
    ran = tmp_path / "ran"
    with pytest.raises(ScriptFailed) as refused:
        run_install_script(_write(workdir, f"touch {ran}\n"), [], cwd=workdir, timeout=5, marker=marker,
                           confined=confined)
    message = refused.value.message
    assert message.startswith("install.sh is refused: this machine cannot end every process it starts (needs a PID")
    if unshare == "/bin/false":
        assert "/bin/false cannot make a PID namespace here" in message and "exit status 1" in message
    else:
        assert "unshare was not found" in message and path in message
    assert not ran.exists()
    assert_no_survivors(marker)


AS_NOBODY = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from kuiper_plugins.errors import ScriptFailed
from kuiper_plugins.install import scripts
work, token = Path(sys.argv[1]), sys.argv[2]
confined = scripts.probe_confinement()
script = work / "install.sh"
script.write_text(
    f"env -i setsid /bin/sh -c 'echo up > started; while :; do sleep 1; done' {token} &\\n"
    "i=0; while [ ! -e started ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done\\nid -u\\n"
)
try:
    result = {"output": scripts.run_install_script(script, [], cwd=work, timeout=10, marker=token, confined=confined)}
except ScriptFailed as exc:
    result = {"refused": exc.message}
print(json.dumps({"command": confined.command, "description": confined.description, **result}))
"""


def python_for(uid: int) -> str:
    """This Python if `uid` may run it (every folder on its path searchable, the file executable), else the system's."""
    real = Path(os.path.realpath(sys.executable))
    if all(folder.stat().st_mode & 0o001 for folder in real.parents) and real.stat().st_mode & 0o001:
        return sys.executable
    system = shutil.which("python3", path="/usr/bin:/bin")
    assert system, f"{real} is not executable by uid {uid} and there is no /usr/bin/python3"
    return system


def test_a_service_that_is_not_root_is_confined_by_a_user_namespace_or_refuses(token):
    """As nobody, the plain PID namespace is not allowed; a user namespace of its own works where permitted."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    python = python_for(65534)
    with tempfile.TemporaryDirectory(prefix="kp-nobody-") as folder:
        os.chmod(folder, 0o777)
        # A copy of the package nobody can read, wherever this checkout lives (a clone in a 0700 folder).
        source = Path(folder) / "src"
        shutil.copytree(MAIN / "kuiper_plugins", source / "kuiper_plugins",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [source, *source.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        done = subprocess.run(
            [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-I", "-c", AS_NOBODY,
             folder, token, str(source)],
            cwd=folder, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        if result["command"]:
            assert "--user" in result["command"] and "--map-current-user" in result["command"]
            assert result["output"] == "65534\n"  # the script runs as the service's user
            assert Path(folder, "started").exists()
        else:
            assert result["refused"].startswith("install.sh is refused: ")
            assert "--pid --fork --kill-child --mount-proc: " in result["refused"]
        assert with_token(token) == []


def test_the_mechanism_is_probed_and_logged_once_per_process():
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s'); "
        "from kuiper_plugins.install import scripts; first = scripts.confinement(); "
        "print(all(scripts.confinement() is first for _ in range(3)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=MAIN, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    unshare = shutil.which("unshare", path=SCRIPT_PATH)
    mechanism = f"a PID namespace of its own ({unshare} --pid --fork --kill-child --mount-proc)"
    assert lines == [f"install.sh will run in {mechanism}", "True"]
