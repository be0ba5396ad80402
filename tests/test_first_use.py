"""What a new user and an operator meet first: the start-up log, `make run`, `make test`'s system packages and the
README's first screens (issue 22, point 5)."""

from __future__ import annotations

import re

import pytest
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
