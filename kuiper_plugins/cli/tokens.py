"""Mint the JWT a service with basic.authentication on accepts, from the private half of a key in etc/mgmt.

The service (web/auth.py) takes an RS256 token whose `iss` names a PEM public
key file in `<etc>/mgmt/`, whose `aud` contains `eKuiper`, and which expires
within `basic.maxTokenLifetime` (24 h by default) of its `iat`. The algorithm,
audience and smallest key size are imported from there, so that what is minted
here is what is checked there. Only this command imports PyJWT and
cryptography.
"""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path
from typing import Any

from kuiper_plugins.cli.client import EXIT_USAGE, Failure

MAX_KEY_FILE_BYTES = 64 * 1024


def default_issuer(key_path: Path) -> str:
    """The public key's file name the token names when --issuer is not given: `admin.pem` -> `admin.pub`."""
    return key_path.stem + ".pub" if key_path.suffix in (".pem", ".key") else key_path.name + ".pub"


def mint(key_path: Path, *, issuer: str | None, subject: str | None, lifetime: int) -> tuple[str, dict[str, Any]]:
    """Sign a token with the RSA private key in `key_path`; return it and its claims."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from kuiper_plugins.web.auth import ALGORITHM, AUDIENCE, MIN_KEY_BITS

    if lifetime <= 0:
        raise Failure(f"--lifetime must be a whole number of seconds above 0, got {lifetime}", EXIT_USAGE)
    try:
        with open(key_path, "rb") as key_file:
            pem = key_file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise Failure(f"cannot read the private key {key_path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        if len(pem) > MAX_KEY_FILE_BYTES:
            raise ValueError(f"larger than {MAX_KEY_FILE_BYTES} bytes")
        key = load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's word for a key that needs a password
        raise Failure(f"the private key {key_path} is encrypted (decrypt a copy for this command with"
                      " `openssl pkey -in KEY -out PLAIN.pem`, and keep it as safe as the key)", EXIT_USAGE) from None
    except ValueError as exc:
        raise Failure(f"{key_path} is not a PEM private key ({' '.join(str(exc).split())[:200]}; the public half"
                      " goes into etc/mgmt, the private half is given here)", EXIT_USAGE) from None
    if not isinstance(key, RSAPrivateKey) or key.key_size < MIN_KEY_BITS:
        kind = f"a {key.key_size}-bit RSA key" if isinstance(key, RSAPrivateKey) else "not an RSA key"
        raise Failure(f"{key_path} holds {kind}: the service accepts {ALGORITHM} tokens only, signed with an RSA"
                      f" key of at least {MIN_KEY_BITS} bits (`openssl genrsa -out KEY.pem {MIN_KEY_BITS}`)",
                      EXIT_USAGE)
    now = int(time.time())
    claims = {
        "iss": issuer or default_issuer(key_path),
        "aud": AUDIENCE,
        "sub": subject or _local_user(),
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM), claims


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid, and no LOGNAME or USER
        return str(os.getuid())
