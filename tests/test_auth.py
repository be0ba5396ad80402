"""JWT authentication (basic.authentication): RS256 tokens whose issuer names a public key in etc/mgmt/.

Keys are generated with `cryptography` when the tests run; tokens are signed with PyJWT, or put together
by hand where PyJWT refuses to make the hostile ones (alg "none", HS256 keyed with the public key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from kuiper_plugins import create_app
from kuiper_plugins.errors import Unauthorized
from kuiper_plugins.layout import Layout
from kuiper_plugins.settings import Settings, SettingsError
from kuiper_plugins.web.auth import JwtAuthenticator, UnsafeKeyFiles

ISSUER = "sample_key.pub"
OPEN_ROUTE = "/plugins/sources"


def _rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keys():
    """The issuer's key, a stranger's key, a short RSA key and an EC key, made once for the module."""
    return {"issuer": _rsa(), "stranger": _rsa(), "short": _rsa(1024), "ec": ec.generate_private_key(ec.SECP256R1())}


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": "eKuiper", "exp": now + 600, "nbf": now - 10, "iat": now - 10, "sub": "tester"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(private_key, payload: dict | None = None, algorithm: str = "RS256", headers: dict | None = None) -> str:
    return jwt.encode(claims() if payload is None else payload, private_key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, payload: dict, signature: bytes = b"", *, hmac_key: bytes | None = None,
              rsa_key: rsa.RSAPrivateKey | None = None) -> str:
    """A token built by hand: HS256-signed with hmac_key, RS256-signed with rsa_key, or with `signature`."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    if rsa_key is not None:
        signature = rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def rs256_by_hand(private_key, payload: dict) -> str:
    """RS256 without PyJWT's own checks (it refuses a non-string iss and warns about short keys)."""
    return hand_made({"alg": "RS256", "typ": "JWT"}, payload, rsa_key=private_key)


@pytest.fixture
def authed(make_service, keys):
    """The service with authentication on and the issuer's public key in etc/mgmt/."""
    service = make_service(authentication=True)
    (service.layout.mgmt_keys / ISSUER).write_bytes(public_pem(keys["issuer"]))
    return service


def get(service, token: str | None = None, path: str = OPEN_ROUTE, **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = token
    return service.client.get(path, headers=headers, **kw)


def assert_401(response, message_start: str) -> str:
    assert response.status_code == 401, response.data
    assert response.mimetype == "application/json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = response.get_json()
    assert set(body) == {"error", "message"} and body["error"] == 1000
    assert body["message"].startswith(message_start), body["message"]
    assert body["message"].isascii()
    return body["message"]


# ---------------------------------------------------------------------------- what is accepted


def test_a_valid_token_is_accepted_raw_and_with_bearer(authed, keys):
    token = sign(keys["issuer"])
    for value in (token, f"Bearer {token}", f"bearer {token}", f"  Bearer   {token}  "):
        response = get(authed, value)
        assert response.status_code == 200, (value[:20], response.data)
        assert response.get_json() == []


def test_open_paths_need_no_token(authed):
    assert authed.client.get("/ping").status_code == 200
    assert authed.client.get("/").status_code == 200
    assert authed.client.get("/openapi.json").status_code == 200
    assert authed.client.get("/docs/").status_code == 200


def test_the_issuer_file_is_matched_ignoring_case(authed, keys):
    assert get(authed, sign(keys["issuer"], claims(iss="SAMPLE_KEY.PUB"))).status_code == 200


def test_aud_may_be_a_list_holding_ekuiper(authed, keys):
    assert get(authed, sign(keys["issuer"], claims(aud=["grafana", "eKuiper"]))).status_code == 200


def test_without_a_lifetime_limit_exp_and_nbf_are_optional_as_in_ekuiper(make_service, keys):
    # basic.maxTokenLifetime 0 keeps eKuiper's behaviour; the default limit needs exp (tests below).
    service = make_service(authentication=True, max_token_lifetime=0)
    (service.layout.mgmt_keys / ISSUER).write_bytes(public_pem(keys["issuer"]))
    assert get(service, sign(keys["issuer"], claims(exp=None, nbf=None, iat=None))).status_code == 200
    assert get(service, sign(keys["issuer"], claims(exp=10**18))).status_code == 200


def test_several_issuers_each_use_their_own_key(authed, keys):
    (authed.layout.mgmt_keys / "other_issuer").write_bytes(public_pem(keys["stranger"]))
    assert get(authed, sign(keys["stranger"], claims(iss="other_issuer"))).status_code == 200
    assert get(authed, sign(keys["issuer"])).status_code == 200
    assert_401(get(authed, sign(keys["stranger"], claims(iss=ISSUER))), "validate token error: signature")


def test_a_key_dropped_in_later_is_used_without_restart(authed, keys):
    token = sign(keys["stranger"], claims(iss="late.pub"))
    assert_401(get(authed, token), "validate token error: not found target key file")
    (authed.layout.mgmt_keys / "late.pub").write_bytes(public_pem(keys["stranger"]))
    assert get(authed, token).status_code == 200


# ---------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("value", [None, "", "   ", "Bearer", "Bearer ", "bearer    "])
def test_missing_token(authed, value):
    assert assert_401(get(authed, value), "missing_token") == "missing_token"


@pytest.mark.parametrize("query", ["token", "access_token", "jwt", "Authorization", "authorization"])
def test_a_token_in_the_query_string_is_not_accepted(authed, keys, query):
    token = sign(keys["issuer"])
    assert_401(authed.client.get(f"{OPEN_ROUTE}?{query}={token}"), "missing_token")


@pytest.mark.parametrize("value", [
    "abc", "a.b.c", "a.b", "....", "Basic dXNlcjpwYXNz", "Bearer Bearer x.y.z", "e30.e30.e30", "\u00e9\u00e8.x.y",
    "x" * 20000,
])
def test_malformed_tokens(authed, value):
    assert_401(get(authed, value), "validate token error")


def test_alg_none_is_refused(authed):
    token = hand_made({"alg": "none", "typ": "JWT"}, claims())
    assert "signing method" in assert_401(get(authed, token), "validate token error")
    no_alg = hand_made({"typ": "JWT"}, claims(), b"sig")
    assert_401(get(authed, no_alg), "validate token error")


def test_hs256_keyed_with_the_public_key_is_refused(authed, keys):
    pem = public_pem(keys["issuer"])
    for secret in (pem, pem.strip(), pem.replace(b"\n", b"")):
        token = hand_made({"alg": "HS256", "typ": "JWT"}, claims(), hmac_key=secret)
        assert_401(get(authed, token), "validate token error")


@pytest.mark.parametrize("algorithm", ["RS384", "RS512", "PS256"])
def test_only_rs256_even_with_the_right_key(authed, keys, algorithm):
    assert_401(get(authed, sign(keys["issuer"], algorithm=algorithm)), "validate token error")


def test_a_token_signed_by_another_key(authed, keys):
    assert "signature is invalid" in assert_401(get(authed, sign(keys["stranger"])), "validate token error")


def test_a_tampered_payload(authed, keys):
    header, _payload, signature = sign(keys["issuer"]).split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert_401(get(authed, forged), "validate token error: signature is invalid")


@pytest.mark.parametrize("payload, expect", [
    (claims(exp=int(time.time()) - 60), "validate token error: token is expired"),
    (claims(nbf=int(time.time()) + 3600), "validate token error: token is not valid yet"),
    (claims(exp="tomorrow"), "validate token error"),
    (claims(exp=float("inf")), "validate token error"),
    (claims(nbf=[1]), "validate token error"),
])
def test_time_claims_are_enforced(authed, keys, payload, expect):
    assert_401(get(authed, sign(keys["issuer"], payload)), expect)


# ---------------------------------------------------------------------------- lifetime (basic.maxTokenLifetime)

DAY = 86400  # the default basic.maxTokenLifetime


@pytest.mark.parametrize("payload", [claims(exp=None), claims(exp=None, iat=None, nbf=None)])
def test_a_token_without_exp_is_refused_by_default(authed, keys, payload):
    message = assert_401(get(authed, sign(keys["issuer"], payload)),
                         "validate token error: token is missing required claim: exp claim is required (")
    assert "basic.maxTokenLifetime is 86400 s" in message and "set it to 0" in message


def test_lifetime_is_exp_minus_iat_when_iat_is_present(authed, keys):
    issued = int(time.time()) - 10
    at_the_limit = claims(iat=issued, exp=issued + DAY)
    assert get(authed, sign(keys["issuer"], at_the_limit)).status_code == 200
    message = assert_401(get(authed, sign(keys["issuer"], claims(iat=issued, exp=issued + DAY + 1))),
                         "validate token error: token lifetime is too long (")
    assert "its exp is 86401 s after its iat; basic.maxTokenLifetime is 86400 s" in message
    # A token signed for two days is refused even on its last hour: the lifetime is what it was signed for.
    two_days_ago = int(time.time()) - 2 * DAY
    last_hour = claims(iat=two_days_ago, nbf=two_days_ago, exp=two_days_ago + 2 * DAY + 3600)
    assert_401(get(authed, sign(keys["issuer"], last_hour)), "validate token error: token lifetime is too long")
    # An iat set in the future cannot shorten the lifetime of a token that is valid now: it is refused first.
    later = int(time.time()) + 30 * DAY
    message = assert_401(get(authed, sign(keys["issuer"], claims(iat=later, exp=later + 60))), "validate token error")
    assert message == "validate token error: token is not valid yet"


def test_lifetime_is_exp_minus_now_without_iat(authed, keys):
    # 120 s on either side of the limit: far more than the time between signing and checking.
    now = int(time.time())
    assert get(authed, sign(keys["issuer"], claims(iat=None, exp=now + DAY - 120))).status_code == 200
    message = assert_401(get(authed, sign(keys["issuer"], claims(iat=None, exp=now + DAY + 120))),
                         "validate token error: token lifetime is too long (")
    assert "s from now, and it has no iat; basic.maxTokenLifetime is 86400 s" in message


def test_a_token_that_never_expires_in_practice_is_refused(authed, keys):
    for payload in (claims(exp=10**18), claims(exp=10**18, iat=None), claims(exp=str(10**18))):
        assert_401(get(authed, sign(keys["issuer"], payload)), "validate token error: token lifetime is too long")


def test_the_limit_follows_the_setting(make_service, keys):
    service = make_service(authentication=True, max_token_lifetime=600)
    (service.layout.mgmt_keys / ISSUER).write_bytes(public_pem(keys["issuer"]))
    now = int(time.time())
    assert get(service, sign(keys["issuer"], claims(iat=now, exp=now + 600))).status_code == 200
    message = assert_401(get(service, sign(keys["issuer"], claims(iat=now, exp=now + 601))),
                         "validate token error: token lifetime is too long")
    assert "basic.maxTokenLifetime is 600 s" in message


def test_a_refused_lifetime_changes_nothing(authed, keys, file_server):
    from conftest import make_zip

    make_zip(file_server.root / "random.zip", {"Random.so": b"so", "random.yaml": "a: 1\n"})
    body = {"name": "random", "file": file_server.url("random.zip")}
    before = authed.snapshot()
    for payload in (claims(exp=None), claims(exp=10**18)):
        headers = {"Authorization": sign(keys["issuer"], payload)}
        assert authed.client.post("/plugins/sources", json=body, headers=headers).status_code == 401
    authed.assert_unchanged(before)
    assert file_server.requests == []


@pytest.mark.parametrize("aud, shown", [
    (None, ""), ("other", "other"), ("ekuiper", "ekuiper"), (["a", "b"], "[a b]"), ("", ""), (42, None), ([1], None),
])
def test_audience_must_contain_ekuiper(authed, keys, aud, shown):
    message = assert_401(get(authed, sign(keys["issuer"], claims(aud=aud))), "audience field should contain eKuiper")
    if shown is not None:
        assert message == f"audience field should contain eKuiper, but got {shown}"


@pytest.mark.parametrize("iss", [None, "", 42, ["sample_key.pub"], {"a": 1}])
def test_issuer_must_be_a_name(authed, keys, iss):
    message = assert_401(get(authed, rs256_by_hand(keys["issuer"], claims(iss=iss))), "validate token error")
    assert message == "validate token error: issuer field not exist in jwt payload"


@pytest.fixture
def outside_key(tmp_path, keys):
    """The issuer's public key also lies outside etc/mgmt/: a traversal in iss would find it."""
    path = tmp_path / "outside.pub"
    path.write_bytes(public_pem(keys["stranger"]))
    return path


def traversal_issuers(authed, outside_key) -> list[str]:
    mgmt = authed.layout.mgmt_keys
    relative = os.path.relpath(outside_key, mgmt)
    return [relative, str(outside_key), f"./{relative}", f"{ISSUER}/../{relative}", "../mgmt/" + ISSUER,
            f"./{ISSUER}", f"{ISSUER}/", ".", "..", "/", f"{ISSUER}\x00", "\\..\\outside.pub", "outside.pub"]


def test_the_issuer_cannot_traverse_out_of_etc_mgmt(authed, keys, outside_key):
    for iss in traversal_issuers(authed, outside_key):
        token = sign(keys["stranger"], claims(iss=iss))
        message = assert_401(get(authed, token), "validate token error")
        assert "not found target key file" in message, (iss, message)


def test_a_hostile_issuer_is_quoted_safely(authed, keys):
    for iss in ("a\nb", "\u202eevil", "\ud800", "x" * 5000, "\x1b[31m"):
        message = assert_401(get(authed, sign(keys["issuer"], claims(iss=iss))), "validate token error")
        assert "\n" not in message and "\x1b" not in message and len(message) < 300


def test_unusable_key_files(authed, keys):
    mgmt = authed.layout.mgmt_keys
    (mgmt / "ec.pub").write_bytes(public_pem(keys["ec"]))
    (mgmt / "short.pub").write_bytes(public_pem(keys["short"]))
    (mgmt / "garbage.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    (mgmt / "private.pem").write_bytes(keys["issuer"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (mgmt / "huge.pub").write_bytes(public_pem(keys["issuer"]) + b"\n" * (128 * 1024))
    (mgmt / "folder.pub").mkdir()
    os.mkfifo(mgmt / "fifo.pub")
    expectations = {
        "ec.pub": "is not an RSA public key", "short.pub": "1024-bit key", "garbage.pub": "not a usable public key",
        "private.pem": "not a usable public key", "huge.pub": "not a usable public key",
        "folder.pub": "not a usable public key", "fifo.pub": "not a usable public key",
    }
    for name, expect in expectations.items():
        started = time.monotonic()
        token = rs256_by_hand(keys["short" if name == "short.pub" else "issuer"], claims(iss=name))
        message = assert_401(get(authed, token), "validate token error")
        assert expect in message, (name, message)
        assert time.monotonic() - started < 5, f"{name} took too long (a FIFO must never be waited on)"


def test_case_insensitive_ambiguity_is_refused_but_an_exact_name_wins(authed, keys):
    mgmt = authed.layout.mgmt_keys
    (mgmt / "Twin.pub").write_bytes(public_pem(keys["issuer"]))
    (mgmt / "twin.pub").write_bytes(public_pem(keys["stranger"]))
    assert get(authed, sign(keys["issuer"], claims(iss="Twin.pub"))).status_code == 200
    assert get(authed, sign(keys["stranger"], claims(iss="twin.pub"))).status_code == 200
    assert "several key files" in assert_401(get(authed, sign(keys["issuer"], claims(iss="TWIN.PUB"))),
                                             "validate token error")


def test_no_keys_folder_at_all(authed, keys):
    (authed.layout.mgmt_keys / ISSUER).unlink()
    authed.layout.mgmt_keys.rmdir()
    assert_401(get(authed, sign(keys["issuer"])), "validate token error: not found target key file")


# ---------------------------------------------------------------------------- key files others could change

NOBODY = pwd.getpwnam("nobody").pw_uid


def planted_home(tmp_path: Path, keys, spoil) -> tuple[Path, Path]:
    """A home whose etc/mgmt holds the issuer's key, then `spoil(home, key_file)`; return (home, what is named)."""
    home = tmp_path / "home"
    mgmt = Layout(home).mgmt_keys
    mgmt.mkdir(parents=True)
    key_file = mgmt / ISSUER
    key_file.write_bytes(public_pem(keys["issuer"]))
    return home, spoil(home, key_file)


def _chmod(mode: int, which=lambda home, key: key):
    def spoil(home: Path, key: Path) -> Path:
        os.chmod(which(home, key), mode)
        return which(home, key)

    return spoil


def _owned_by_nobody(home: Path, key: Path) -> Path:
    os.chown(key, NOBODY, -1)
    return key


def _link_to_a_writable_key(home: Path, key: Path) -> Path:
    outside = home.parent / "elsewhere.pub"
    outside.write_bytes(key.read_bytes())
    outside.chmod(0o666)
    key.unlink()
    key.symlink_to(outside)
    return key


UNSAFE_KEYS = {
    "key-world-writable": (_chmod(0o666), "(owner root, uid 0, mode 0666) is writable by its group and others"),
    "key-group-writable": (_chmod(0o664), "(owner root, uid 0, mode 0664) is writable by its group"),
    "key-owned-by-nobody": (_owned_by_nobody, f"(owner nobody, uid {NOBODY}, mode 0644) is owned by another user"),
    "key-linked-to-a-writable-file": (_link_to_a_writable_key, "(owner root, uid 0, mode 0666) is writable by"),
    "mgmt-world-writable": (_chmod(0o777, lambda home, key: key.parent), "(owner root, uid 0, mode 0777) is writable"),
    "mgmt-sticky-still-refused": (_chmod(0o1777, lambda home, key: key.parent), "(owner root, uid 0, mode 1777) is"),
    "home-world-writable": (_chmod(0o777, lambda home, key: home), "(owner root, uid 0, mode 0777) is writable by"),
    "etc-group-writable": (_chmod(0o775, lambda home, key: home / "etc"), "(owner root, uid 0, mode 0775) is writable"),
}


@pytest.mark.parametrize("case", UNSAFE_KEYS)
def test_create_app_refuses_key_files_others_could_change(tmp_path, keys, case):
    spoil, why = UNSAFE_KEYS[case]
    home, named = planted_home(tmp_path, keys, spoil)
    settings = Settings(home=home, authentication=True)
    before = sorted(str(path.relative_to(home)) for path in home.rglob("*"))
    with pytest.raises(UnsafeKeyFiles) as refused:
        create_app(settings, stop_service=lambda: None)
    message = str(refused.value)
    assert isinstance(refused.value, SettingsError)
    assert message.startswith(f"basic.authentication is on and the JWT keys in {Layout(home).mgmt_keys} could be")
    assert f"{named} {why}" in message, message
    assert "chown root PATH" in message and "chmod go-w PATH" in message
    assert sorted(str(path.relative_to(home)) for path in home.rglob("*")) == before  # nothing written
    # With authentication off the keys are never read, and the same home serves.
    app = create_app(settings.with_overrides(authentication=False), stop_service=lambda: None)
    assert app.test_client().get("/ping").status_code == 200
    app.extensions["kuiper_plugins"].installer.close()


def test_keys_under_a_sticky_world_writable_folder_are_accepted(tmp_path, keys, loopback_peer):
    # As /tmp: others may create entries in it, but not rename or remove the home that root owns there.
    tmp_path.chmod(0o1777)
    home, _ = planted_home(tmp_path, keys, lambda home, key: key)
    app = create_app(Settings(home=home, authentication=True), stop_service=lambda: None)
    try:
        key_file = Layout(home).mgmt_keys / ISSUER
        key_file.chmod(0o666)
        refused = app.test_client().get(OPEN_ROUTE, headers={"Authorization": sign(keys["issuer"])})
        assert_401(refused, "validate token error: key file of issuer sample_key.pub could be changed by other users")
        key_file.chmod(0o644)
        accepted = app.test_client().get(OPEN_ROUTE, headers={"Authorization": sign(keys["issuer"])})
        assert accepted.status_code == 200, accepted.data
    finally:
        app.extensions["kuiper_plugins"].installer.close()


def test_a_key_that_became_unsafe_after_start_is_refused(authed, keys, caplog):
    key_file = authed.layout.mgmt_keys / ISSUER
    token = sign(keys["issuer"])
    assert get(authed, token).status_code == 200
    for spoil, undo in ((lambda: key_file.chmod(0o666), lambda: key_file.chmod(0o644)),
                        (lambda: os.chown(key_file, NOBODY, -1), lambda: os.chown(key_file, 0, -1))):
        spoil()
        message = assert_401(get(authed, token), "validate token error: key file of issuer sample_key.pub could be")
        assert message.endswith("(it must be owned by root or the service's user and writable by no one else)")
        undo()
        assert get(authed, token).status_code == 200
    assert f"of issuer sample_key.pub: {key_file} (owner root, uid 0, mode 0666) is writable by" in caplog.text
    authed.layout.mgmt_keys.chmod(0o777)
    assert_401(get(authed, token), "validate token error: the key folder etc/mgmt could be changed by other users (")
    authed.layout.mgmt_keys.chmod(0o755)
    assert get(authed, token).status_code == 200


def test_the_service_makes_etc_mgmt_writable_by_its_owner_alone_whatever_the_umask(tmp_path, keys):
    home = tmp_path / "home"
    (home / "etc").mkdir(parents=True)  # an installation's folders, without etc/mgmt yet
    old = os.umask(0o002)  # restored below: a group-writable umask, as some distributions give users
    try:
        app = create_app(Settings(home=home, authentication=True), stop_service=lambda: None)
    finally:
        os.umask(old)
    app.extensions["kuiper_plugins"].installer.close()
    assert Layout(home).mgmt_keys.stat().st_mode & 0o777 == 0o755
    assert Layout(home).uploads.stat().st_mode & 0o777 == 0o775  # the other folders follow the umask


# ---------------------------------------------------------------------------- every route, nothing written


def every_route(app) -> list[tuple[str, str]]:
    """(method, path) for every rule of the app, with sample values in its variables."""
    samples = {"plugin_type": "sources", "name": "random", "path": "a.zip", "filename": "a.zip"}
    routes = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<{argument}>", samples.get(argument, "x"))
        while "<" in path:  # converters with arguments: <any(...):plugin_type>, <path:name>
            start, end = path.index("<"), path.index(">")
            argument = path[start + 1:end].rsplit(":", 1)[-1]
            path = path[:start] + samples.get(argument, "x") + path[end + 1:]
        for method in sorted(rule.methods):
            routes.append((method, path))
    return routes


def test_every_route_but_health_and_docs_needs_a_token(authed):
    routes = every_route(authed.app)
    assert ("POST", "/plugins/sources") in routes and ("DELETE", "/plugins/sources/random") in routes
    before = authed.snapshot()
    for method, path in routes:
        response = authed.client.open(path, method=method, json={"name": "random", "file": "http://127.0.0.1:9/a.zip"})
        if path in ("/", "/ping", "/openapi.json", "/docs") or path.startswith("/docs/"):
            assert response.status_code < 400 or response.status_code == 404, (method, path)
        else:
            assert response.status_code == 401, (method, path, response.status_code)
    for method, path in [("GET", "/no/such/route"), ("PATCH", "/plugins/sources"), ("GET", "/plugins/wasm")]:
        assert authed.client.open(path, method=method).status_code == 401, (method, path)
    authed.assert_unchanged(before)


def test_a_refused_install_writes_nothing(authed, keys, file_server):
    from conftest import make_zip

    make_zip(file_server.root / "random.zip", {"Random.so": b"so", "random.yaml": "a: 1\n"})
    body = {"name": "random", "file": file_server.url("random.zip")}
    before = authed.snapshot()
    for token in (None, "garbage", sign(keys["stranger"]), sign(keys["issuer"], claims(aud="x"))):
        headers = {"Authorization": token} if token else {}
        assert authed.client.post("/plugins/sources", json=body, headers=headers).status_code == 401
    authed.assert_unchanged(before)
    assert file_server.requests == []
    created = authed.client.post("/plugins/sources", json=body, headers={"Authorization": sign(keys["issuer"])})
    assert created.status_code == 201, created.data


def test_with_authentication_a_remote_client_needs_a_token_not_loopback(authed, keys):
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert_401(get(authed, environ_base=remote), "missing_token")
    assert get(authed, sign(keys["issuer"]), environ_base=remote).status_code == 200


def test_the_host_check_comes_before_authentication(authed, keys):
    response = get(authed, sign(keys["issuer"]), headers={"Host": "evil.example"})
    assert response.status_code == 403


def test_the_authenticator_alone(tmp_path, keys):
    (tmp_path / ISSUER).write_bytes(public_pem(keys["issuer"]))
    authenticator = JwtAuthenticator(tmp_path)
    verified = authenticator.verify(sign(keys["issuer"], claims(sub="alice")))
    assert verified["sub"] == "alice" and verified["iss"] == ISSUER
    with pytest.raises(Unauthorized, match="missing_token"):
        authenticator.verify(None)


@pytest.mark.slow
def test_authentication_through_real_gunicorn(start_gunicorn, tmp_path, keys):
    mgmt = tmp_path / "home/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / ISSUER).write_bytes(public_pem(keys["issuer"]))
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    refused = requests.get(f"{server.url}/plugins/sources", timeout=10)
    assert refused.status_code == 401
    assert refused.json() == {"error": 1000, "message": "missing_token"}
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    token = sign(keys["issuer"])
    accepted = requests.get(f"{server.url}/plugins/sources", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert accepted.status_code == 200 and accepted.json() == []
    in_query = requests.get(f"{server.url}/plugins/sources", params={"token": token}, timeout=10)
    assert in_query.status_code == 401


@pytest.mark.slow
def test_max_token_lifetime_from_the_environment_through_real_gunicorn(start_gunicorn, tmp_path, keys):
    mgmt = tmp_path / "home/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / ISSUER).write_bytes(public_pem(keys["issuer"]))
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true",
                            KUIPER_PLUGINS__BASIC__MAXTOKENLIFETIME="300")
    now = int(time.time())
    short = {"Authorization": sign(keys["issuer"], claims(iat=now, exp=now + 300))}
    assert requests.get(f"{server.url}/plugins/sources", headers=short, timeout=10).status_code == 200
    long = {"Authorization": sign(keys["issuer"], claims(iat=now, exp=now + 301))}
    refused = requests.get(f"{server.url}/plugins/sources", headers=long, timeout=10)
    assert refused.status_code == 401
    assert refused.json()["message"].startswith("validate token error: token lifetime is too long"
                                                " (its exp is 301 s after its iat; basic.maxTokenLifetime is 300 s")


@pytest.mark.slow
def test_gunicorn_refuses_to_start_on_a_key_file_others_could_change(tmp_path, keys):
    from conftest import GUNICORN, REPO, free_port

    home, key_file = planted_home(tmp_path, keys, _owned_by_nobody)
    key_file.chmod(0o666)
    env = {**os.environ, "KUIPER_HOME": str(home), "KUIPER_PLUGINS__BASIC__RESTPORT": str(free_port()),
           "KUIPER_PLUGINS__BASIC__AUTHENTICATION": "true", "WEB_CONCURRENCY": "2"}
    process = subprocess.Popen([str(GUNICORN), "-c", "etc/gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it started after all: stop it and its workers
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)
    assert process.returncode != 0
    assert "kuiper-plugins cannot start: basic.authentication is on and the JWT keys in" in stderr
    assert (f"{key_file} (owner nobody, uid {NOBODY}, mode 0666) is owned by another user and is writable by its"
            " group and others") in stderr
    assert "Traceback" not in stderr
    assert not Layout(home).registry_file.exists()  # refused before anything was written
    assert key_file.read_bytes() == public_pem(keys["issuer"])


@pytest.mark.slow
def test_a_worker_started_after_a_key_went_unsafe_stops_the_service(start_gunicorn, tmp_path, keys):
    import psutil

    mgmt = tmp_path / "home/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / ISSUER).write_bytes(public_pem(keys["issuer"]))
    server = start_gunicorn(workers=1, KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    (mgmt / ISSUER).chmod(0o666)
    (worker,) = psutil.Process(server.process.pid).children()
    os.kill(worker.pid, signal.SIGKILL)
    # The master forks a new worker once it reaps this one; its post_fork finds the key unsafe and stops
    # the service, which wait_exit awaits (bounded).
    assert server.wait_exit() != 0
    assert "kuiper-plugins cannot start: basic.authentication is on and the JWT keys in" in server.log()
    assert f"{mgmt / ISSUER} (owner root, uid 0, mode 0666) is writable by its group and others" in server.log()
