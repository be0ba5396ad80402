"""JWT authentication as eKuiper does it: an RS256 token whose issuer names a public key in etc/mgmt/.

A request carries ``Authorization: <jwt>`` (``Bearer <jwt>`` is accepted too).
The token's ``iss`` claim names the PEM file holding the RSA public key that
must have signed it; the file is found by listing the keys folder and
comparing names case-insensitively, so an issuer such as ``../../x`` can
only ever fail to match. The algorithm is fixed to RS256 here, never taken
from the token: ``none`` and an HS256 token "signed" with the public key as
an HMAC secret are both refused. ``aud`` must contain ``eKuiper``; ``exp``
and ``nbf`` are checked when present, as eKuiper's golang-jwt does.

Unlike eKuiper, a token's lifetime is bounded (``basic.maxTokenLifetime``;
0 keeps eKuiper's unbounded tokens): a token must carry ``exp``, and its
lifetime may not exceed the limit. The lifetime is ``exp - iat`` when the
token says when it was issued, else ``exp - now``, what is left of it. A
token issued in the future is refused by the ``iat`` check before this one,
so either way no accepted token stays valid longer than the limit from now.

Whoever can change a key file can mint tokens, and a token can install a
plugin whose install.sh runs as this service's user. So the keys are only
trusted when no one but root and this service's user could have changed
them: with authentication on, `check_key_files` refuses to start when a
key file in etc/mgmt, etc/mgmt itself, or a folder above it is owned by
another user or writable by group or others (a folder above may be
world-writable with the sticky bit, as /tmp is: others cannot rename what
is not theirs there). Keys are read on every request, so each key file and
etc/mgmt are checked again then, and a key that became unsafe is a 401.

Every refusal is an `Unauthorized` (401) in eKuiper's words: ``missing_token``,
``validate token error: <why>`` or ``audience field should contain eKuiper,
but got <aud>``. Anything of the token quoted in a message is escaped, so a
hostile claim cannot forge log lines or break the response's encoding.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kuiper_plugins.errors import Unauthorized
from kuiper_plugins.settings import SettingsError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
AUDIENCE = "eKuiper"
MIN_KEY_BITS = 2048
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 16 * 1024
_SHOWN_CHARS = 100
_BEARER = "bearer"

_SHOWN_PROBLEMS = 10  # unsafe paths named in the start-up error; the rest are counted


class UnsafeKeyFiles(SettingsError):
    """Users other than root and this service's could change the keys tokens are checked with."""


def _jwt():
    """PyJWT, imported once tokens are to be checked: with basic.authentication off the service never needs it,
    nor the cryptography it imports (4 MB of the service's memory)."""
    import jwt

    return jwt


def _token_errors() -> tuple[type[BaseException], ...]:
    """What PyJWT and the key loader raise on hostile input; each becomes a 401."""
    return _jwt().PyJWTError, ValueError, TypeError, OverflowError, UnicodeError, json.JSONDecodeError


def check_key_files(keys_dir: Path) -> None:
    """Raise UnsafeKeyFiles naming every key file or folder that another user could change."""
    keys_dir = Path(keys_dir)
    problems = _unsafe_folders(keys_dir)
    try:
        names = sorted(os.listdir(keys_dir))
    except FileNotFoundError:
        names = []  # made when the service starts (0755 at most); until a key is put there, no token is valid
    except OSError as exc:
        raise UnsafeKeyFiles(f"cannot list the JWT key folder {keys_dir}: {exc.strerror}") from None
    for name in names:
        path = keys_dir / name
        try:
            info = os.stat(path)  # through a symlink: the file that would be read is the one that counts
        except OSError:
            continue  # a dangling link is no key; should its target appear, the check at each request sees it
        why = _unsafe(info) if stat.S_ISREG(info.st_mode) else None
        if why:
            problems.append(f"{_described(path, info)} {why}")
    if problems:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        service_user = _user_name(os.geteuid())
        raise UnsafeKeyFiles(
            f"basic.authentication is on and the JWT keys in {keys_dir} could be changed by users other than"
            f" root and this service's ({service_user}), who could then sign their own tokens: {shown}{more}"
            f" (fix each with `chown {service_user} PATH` and `chmod go-w PATH`, or remove the key files you"
            " do not use)"
        )


def _unsafe_folders(keys_dir: Path) -> list[str]:
    """etc/mgmt and every folder above it, as named and as resolved, that another user could change."""
    resolved = Path(os.path.realpath(keys_dir))
    checked: set[Path] = set()
    problems = []
    for folder in [keys_dir, *keys_dir.parents, resolved, *resolved.parents]:
        if folder in checked:
            continue
        checked.add(folder)
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            continue  # etc/mgmt not made yet: the service makes it, 0755 at most
        except OSError as exc:
            problems.append(f"{folder} cannot be checked: {exc.strerror}")
            continue
        why = _unsafe(info, sticky_ok=folder not in (keys_dir, resolved))
        if why:
            problems.append(f"{_described(folder, info)} {why}")
    return problems


def _unsafe(info: os.stat_result, *, sticky_ok: bool = False) -> str | None:
    """Why a user other than root and this service's could change this file or folder; None if none could."""
    reasons = []
    if info.st_uid not in (0, os.geteuid()):
        reasons.append("is owned by another user")
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if info.st_mode & bit]
    # In a sticky folder (/tmp) others may add entries but not rename or remove those of others.
    if writers and not (sticky_ok and info.st_mode & stat.S_ISVTX):
        reasons.append("is writable by " + " and ".join(writers))
    return " and ".join(reasons) or None


def _described(path: Path | str, info: os.stat_result) -> str:
    return f"{path} (owner {_user_shown(info.st_uid)}, mode {stat.S_IMODE(info.st_mode):04o})"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_shown(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name}, uid {uid}"


class JwtAuthenticator:
    """Check the Authorization header of a request against the public keys in one folder."""

    def __init__(self, keys_dir: Path, *, max_lifetime: int = 0):
        self.keys_dir = Path(keys_dir)
        self.max_lifetime = max_lifetime  # seconds; 0: any lifetime, and exp may be left out, as in eKuiper
        _jwt()  # now, where the app is built (the gunicorn master), not in each worker at its first token

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """Return the token's verified claims, or raise Unauthorized saying why not."""
        jwt = _jwt()
        token = _token_from_header(authorization)
        issuer = _unverified_issuer(token)
        key = self._public_key(issuer)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=issuer,
                options={"require": ["iss", "aud"], "verify_signature": True},
            )
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"audience field should contain {AUDIENCE}, but got {_audience_of(token)}")
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "aud":
                raise Unauthorized(f"audience field should contain {AUDIENCE}, but got ")
            raise Unauthorized(f"validate token error: {_shown(str(exc))}")
        except _token_errors() as exc:
            raise Unauthorized(f"validate token error: {_reason(exc)}")
        if self.max_lifetime:
            self._check_lifetime(claims)
        return claims

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        """Refuse a token without exp, or one living longer than max_lifetime (exp - iat, else exp - now)."""
        limit = f"basic.maxTokenLifetime is {self.max_lifetime} s"
        if "exp" not in claims:
            raise Unauthorized(
                "validate token error: token is missing required claim: exp claim is required"
                f" ({limit}: sign tokens with an exp, or set it to 0 to accept tokens that never expire)"
            )
        # PyJWT has read exp and iat with int() already, so these cannot fail here.
        expires = int(claims["exp"])
        if "iat" in claims:
            lifetime, since = expires - int(claims["iat"]), "after its iat"
        else:
            lifetime, since = expires - int(time.time()), "from now, and it has no iat"
        if lifetime > self.max_lifetime:
            raise Unauthorized(
                "validate token error: token lifetime is too long"
                f" (its exp is {lifetime} s {since}; {limit}: sign tokens that expire sooner, or raise it)"
            )

    def _public_key(self, issuer: str) -> RSAPublicKey:
        """Load the RSA public key of `issuer` from the file of that name (case-insensitively)."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        path = self._key_file(issuer)
        try:
            # Non-blocking: opening a FIFO that happens to carry the issuer's name must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise ValueError("not a regular file")
                unsafe = _unsafe(info)
                if unsafe:
                    log.warning("refusing the key file of issuer %s: %s %s; run chown and chmod go-w on it",
                                _shown(issuer), _described(path, info), unsafe)
                    raise Unauthorized(
                        f"validate token error: key file of issuer {_shown(issuer)} could be changed by other"
                        " users (it must be owned by root or the service's user and writable by no one else)"
                    )
                pem = b""
                while len(pem) <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1)):
                    pem += chunk
            finally:
                os.close(fd)
            if len(pem) > MAX_KEY_FILE_BYTES:
                raise ValueError(f"larger than {MAX_KEY_FILE_BYTES} bytes")
            key = load_pem_public_key(pem)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            log.warning("cannot use the key file %s of issuer %s: %s", path, _shown(issuer), exc)
            raise Unauthorized(f"validate token error: key file of issuer {_shown(issuer)} is not a usable public key")
        if not isinstance(key, RSAPublicKey):
            raise Unauthorized(f"validate token error: key file of issuer {_shown(issuer)} is not an RSA public key")
        if key.key_size < MIN_KEY_BITS:
            raise Unauthorized(
                f"validate token error: key file of issuer {_shown(issuer)} holds a {key.key_size}-bit key;"
                f" at least {MIN_KEY_BITS} bits are required"
            )
        return key

    def _key_file(self, issuer: str) -> Path:
        """The file in the keys folder named `issuer`: an exact match, else the one equal ignoring case."""
        try:
            info = os.stat(self.keys_dir)
            names = os.listdir(self.keys_dir)
        except OSError:
            info, names = None, []
        unsafe = _unsafe(info) if info else None
        if unsafe:
            log.warning("refusing the JWT key folder %s %s; run chown and chmod go-w on it",
                        _described(self.keys_dir, info), unsafe)
            raise Unauthorized(
                "validate token error: the key folder etc/mgmt could be changed by other users"
                " (it must be owned by root or the service's user and writable by no one else)"
            )
        if issuer in names:
            return self.keys_dir / issuer
        folded = issuer.casefold()
        matches = sorted(name for name in names if name.casefold() == folded)
        if len(matches) == 1:
            return self.keys_dir / matches[0]
        if matches:
            raise Unauthorized(
                f"validate token error: several key files match {_shown(issuer)} ignoring case in etc/mgmt"
            )
        raise Unauthorized(f"validate token error: not found target key file {_shown(issuer)} in etc/mgmt")


def _token_from_header(authorization: str | None) -> str:
    token = (authorization or "").strip()
    scheme, _, rest = token.partition(" ")
    if scheme.lower() == _BEARER:
        token = rest.strip()
    if not token:
        raise Unauthorized("missing_token")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized(f"validate token error: token longer than {MAX_TOKEN_CHARS} characters")
    return token


def _unverified_issuer(token: str) -> str:
    """Read `iss` before the signature is checked: only to choose the key that must have signed the token."""
    jwt = _jwt()
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise jwt.InvalidAlgorithmError(f"signing method {_shown(str(header.get('alg')))} is invalid")
        claims = jwt.decode(token, options={"verify_signature": False})
    except _token_errors() as exc:
        raise Unauthorized(f"validate token error: {_reason(exc)}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise Unauthorized("validate token error: issuer field not exist in jwt payload")
    return issuer


def _audience_of(token: str) -> str:
    try:
        audience = _jwt().decode(token, options={"verify_signature": False}).get("aud")
    except _token_errors():
        return ""
    if isinstance(audience, list):
        return _shown("[" + " ".join(str(item) for item in audience) + "]")
    return _shown("" if audience is None else str(audience))


def _reason(exc: BaseException) -> str:
    jwt = _jwt()
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature is invalid"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token is expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not valid yet"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return _shown(str(exc)) or "signing method is invalid"
    if isinstance(exc, jwt.DecodeError):
        return f"token is malformed: {_shown(str(exc))}"
    return _shown(str(exc)) or type(exc).__name__


def _shown(text: str) -> str:
    """Printable ASCII only, at most _SHOWN_CHARS characters: safe for a log line and any encoding."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
                   for c in text)
