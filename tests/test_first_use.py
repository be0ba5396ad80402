"""What a new user and an operator meet first: the start-up log, `make run`, `make test`'s system packages and the
README's first screens (issue 22, point 5)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys

import pytest
from conftest import REPO
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

START_LINE = re.compile(r"\[INFO\] kuiper_plugins\.web\.gunicorn_hooks: (basic\.authentication .*)$", re.M)


def public_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def authentication_lines(server) -> list[str]:
    return START_LINE.findall(server.log_path.read_text(errors="replace"))


@pytest.mark.slow
def test_the_start_up_log_says_authentication_is_on_and_names_the_keys(start_gunicorn, tmp_path):
    mgmt = tmp_path / "home" / "etc" / "mgmt"
    mgmt.mkdir(parents=True, mode=0o755)
    for name in ("ci.pub", "admin.pem"):
        (mgmt / name).write_bytes(public_key_pem())
    (mgmt / "old").mkdir()  # a folder is no key
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    assert authentication_lines(server) == [
        f"basic.authentication is on: every request but / and /ping needs a JWT whose iss names one of the keys in"
        f" {mgmt}: admin.pem, ci.pub"]


@pytest.mark.slow
def test_the_start_up_log_says_when_no_key_is_there_yet(start_gunicorn, tmp_path):
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    assert authentication_lines(server) == [
        f"basic.authentication is on: every request but / and /ping needs a JWT, and {tmp_path / 'home/etc/mgmt'}"
        " holds no key yet, so every token is refused until a PEM public key named as the tokens' iss is put there"]


@pytest.mark.slow
def test_the_start_up_log_says_authentication_is_off_and_who_is_served(start_gunicorn, tmp_path):
    mgmt = tmp_path / "home" / "etc" / "mgmt"
    mgmt.mkdir(parents=True, mode=0o755)
    (mgmt / "ci.pub").write_bytes(public_key_pem())
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__ALLOWEDUSERS="nobody")
    assert authentication_lines(server) == [
        "basic.authentication is off: no token is asked for; local callers are served when their user is one of"
        " root, this service's user, nobody; remote callers are refused (basic.protectedMode);"
        f" {mgmt} holds ci.pub, unused while it is off"]


# ---------------------------------------------------------------------------- make run, make test, make install

def make_variable(name: str) -> list[str]:
    """The words of a `NAME := ...` or `NAME ?= ...` line of the Makefile."""
    text = (REPO / "Makefile").read_text()
    found = re.search(rf"^{name} [:?]?= (.*)$", text, re.M)
    assert found, name
    return found.group(1).split()


def test_make_run_installs_only_what_serving_needs():
    """`make run` on a fresh clone installs the package with its `run` extra (gunicorn), not the test tools."""
    planned = subprocess.run(["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0, planned.stderr
    installs = [line for line in planned.stdout.splitlines() if " install " in line]
    assert installs == [".venv/bin/pip install --quiet --disable-pip-version-check -e '.[run]'"], planned.stdout
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = {name: [line.split(">")[0].split("[")[0] for line in value.split("\n") if line]
              for name, value in setup["options.extras_require"].items()}
    assert extras["run"] == ["gunicorn"]
    required = {line.split(">")[0].split("[")[0].lower() for line in setup["options"]["install_requires"].split()}
    assert not required & {name.lower() for name in extras["test"]}, "a test tool is installed to serve"
    assert "pytest" in extras["test"] and "gunicorn" not in required
    # make test installs both
    tested = subprocess.run(["make", "-n", "-B", "test"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ".venv/bin/pip install --quiet --disable-pip-version-check -e '.[run,test]'" in tested.stdout.splitlines()


def test_make_install_links_the_command_line_client(tmp_path):
    # The venv the tests run in is made already: make is told so (-o), and links its client.
    done = subprocess.run(["make", "-o", ".venv/bin/.installed", "install", f"PREFIX={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = tmp_path / "bin" / "kuiper-plugins"
    assert link.is_symlink() and link.resolve() == (REPO / ".venv/bin/kuiper-plugins").resolve()
    helped = subprocess.run([str(link), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "usage: kuiper-plugins" in helped.stdout


class LockHolder:
    """Another process holding a POSIX lock on `path`, as apt holds dpkg's, until released."""

    def __init__(self, path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, sys\n"
             f"lock = open({str(path)!r}, 'w')\nfcntl.lockf(lock, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
             "sys.stdin.readline()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "held\n"  # locked before anyone looks

    def release(self) -> None:
        if not self.process.stdin.closed:
            self.process.stdin.write("go\n")
            self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


@pytest.fixture
def apt_stand_in(tmp_path):
    """A lock file and an apt-get that records its arguments, for `make system-deps` with a tool missing."""
    lock = tmp_path / "lock-frontend"
    lock.touch()
    calls = tmp_path / "apt-calls"
    apt_get = tmp_path / "apt-get"
    apt_get.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    apt_get.chmod(0o755)
    holders: list[LockHolder] = []

    def run_make(timeout: int) -> subprocess.Popen:
        return subprocess.Popen(
            ["make", "-s", "system-deps", "TEST_TOOLS=kp-no-such-tool", "TEST_TOOLS_IN=", f"APT_GET={apt_get}",
             f"APT_LOCKS={lock}", f"APT_LOCK_TIMEOUT={timeout}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def hold() -> LockHolder:
        holders.append(LockHolder(lock))
        return holders[-1]

    yield lock, calls, run_make, hold
    for holder in holders:
        holder.release()


def test_system_deps_waits_for_another_apt_then_installs(apt_stand_in):
    lock, calls, run_make, hold = apt_stand_in
    holder = hold()
    make = run_make(timeout=60)
    try:
        first = make.stdout.readline()
        assert first == "installing kp-no-such-tool with %s (Debian packages the tests drive; this needs root)\n" % (
            calls.parent / "apt-get")
        waiting = make.stdout.readline()
        assert waiting.startswith(f"waiting for {lock}, held by process {holder.process.pid} ("), waiting
        assert "another apt is at work (at most" in waiting
        assert not calls.exists()  # apt-get waits too: not run while the lock is held
        holder.release()
        out, err = make.communicate(timeout=60)  # the next look, at most 5 s later, finds it free
    finally:
        if make.poll() is None:
            make.kill()
            make.wait(timeout=10)
    assert make.returncode == 0, err
    assert calls.read_text().splitlines() == [
        "-o DPkg::Lock::Timeout=60 update -qq", "-o DPkg::Lock::Timeout=60 install -y -qq kp-no-such-tool"]


def test_system_deps_gives_up_on_a_lock_held_too_long(apt_stand_in):
    lock, calls, run_make, hold = apt_stand_in
    holder = hold()
    make = run_make(timeout=2)
    out, err = make.communicate(timeout=60)
    assert make.returncode != 0
    assert (f"{lock} is still held by process {holder.process.pid} (") in err
    assert "after 2 s: giving up; run make test again once that apt has finished" in err
    assert not calls.exists()


# ---------------------------------------------------------------------------- the README's first screens

def readme_section(start: str, end: str) -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(start):text.index(end, text.index(start))]


def test_the_first_screen_says_what_make_test_needs():
    first = readme_section("# kuiper-plugins", "## A first session")
    assert "root and apt" in first and "10 minutes" in first
    packages = make_variable("TEST_TOOLS") + [pair.split(":")[1] for pair in make_variable("TEST_TOOLS_IN")]
    for package in packages:
        assert f"`{package}`" in first, package
    assert make_variable("APT_LOCK_TIMEOUT") == ["600"]


@pytest.mark.slow
def test_the_first_session_works_as_written(start_gunicorn, tmp_path):
    """The README's first session, pasted as it is into bash from a checkout whose `make run` is going (only its
    address and scratch folder are this test's): every answer is the one the README shows."""
    session = readme_section("## A first session", "## The command-line client")
    script = session[session.index("```sh\n") + 6:session.index("```\n", session.index("```sh\n"))]
    shown = "What you should see:\n\n```\n"
    expected = session[session.index(shown) + len(shown):]
    expected = expected[:expected.index("```")]
    assert script.count("http://127.0.0.1:9081") == 1 and script.startswith("KP=http://127.0.0.1:9081\n")
    assert "9081" not in script.replace("KP=http://127.0.0.1:9081\n", "", 1)  # one variable for the address
    server = start_gunicorn()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "var").symlink_to(server.home)  # make run's KUIPER_HOME is the checkout's var
    script = script.replace("KP=http://127.0.0.1:9081", f"KP={server.url}", 1)
    script = script.replace("/tmp/kp-demo", str(tmp_path / "kp-demo"))
    done = subprocess.run(["bash", "-e", "-c", script], cwd=checkout, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_the_portable_descriptor_page_covers_every_field():
    """docs/portable-descriptor.md: its example is a descriptor the install takes, and its table has a row for every
    field the install reads (those it keeps, and `name`, which it checks)."""
    import json

    from kuiper_plugins.install.packages import parse_descriptor

    page = (REPO / "docs/portable-descriptor.md").read_text()
    example = json.loads(page[page.index("```json\n") + 8:page.index("```", page.index("```json\n") + 8)])
    kept = parse_descriptor("pysam", json.dumps(example).encode())
    rows = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    every = {**kept, "virtualEnvType": "conda", "env": "demo"}
    assert rows == set(parse_descriptor("pysam", json.dumps({**example, "virtualEnvType": "conda", "env": "demo"})
                                        .encode())) == set(every), rows
    assert "(docs/portable-descriptor.md)" in (REPO / "README.md").read_text()
