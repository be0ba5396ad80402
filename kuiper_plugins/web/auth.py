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

Every refusal is an `Unauthorized` (401) in eKuiper's words: ``missing_token``,
``validate token error: <why>`` or ``audience field should contain eKuiper,
but got <aud>``. Anything of the token quoted in a message is escaped, so a
hostile claim cannot forge log lines or break the response's encoding.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kuiper_plugins.errors import Unauthorized

log = logging.getLogger(__name__)

ALGORITHM = "RS256"
AUDIENCE = "eKuiper"
MIN_KEY_BITS = 2048
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 16 * 1024
_SHOWN_CHARS = 100
_BEARER = "bearer"

# What PyJWT and the key loader raise on hostile input; each becomes a 401.
_TOKEN_ERRORS = (jwt.PyJWTError, ValueError, TypeError, OverflowError, UnicodeError, json.JSONDecodeError)


class JwtAuthenticator:
    """Check the Authorization header of a request against the public keys in one folder."""

    def __init__(self, keys_dir: Path, *, max_lifetime: int = 0):
        self.keys_dir = Path(keys_dir)
        self.max_lifetime = max_lifetime  # seconds; 0: any lifetime, and exp may be left out, as in eKuiper

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """Return the token's verified claims, or raise Unauthorized saying why not."""
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
        except _TOKEN_ERRORS as exc:
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
        path = self._key_file(issuer)
        try:
            # Non-blocking: opening a FIFO that happens to carry the issuer's name must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
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
            names = os.listdir(self.keys_dir)
        except OSError:
            names = []
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
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise jwt.InvalidAlgorithmError(f"signing method {_shown(str(header.get('alg')))} is invalid")
        claims = jwt.decode(token, options={"verify_signature": False})
    except _TOKEN_ERRORS as exc:
        raise Unauthorized(f"validate token error: {_reason(exc)}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise Unauthorized("validate token error: issuer field not exist in jwt payload")
    return issuer


def _audience_of(token: str) -> str:
    try:
        audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
    except _TOKEN_ERRORS:
        return ""
    if isinstance(audience, list):
        return _shown("[" + " ".join(str(item) for item in audience) + "]")
    return _shown("" if audience is None else str(audience))


def _reason(exc: BaseException) -> str:
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
