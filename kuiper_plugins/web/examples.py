"""The OpenAPI document's examples, made to work as they are against this very service (`make run`).

A first user's "Try it out" must get the answer the document promises, without preparing anything. So the
examples form one session: upload two small packages (`random.zip`, a source, and `misc.zip`, a function plugin
with `f1` and `f2`) with `POST /config/uploads`, install them from the uploads folder of this service, read,
update, register and remove them. Their URLs name this service's own uploads folder, which is why the document
is made per service.

An upload in JSON carries its file as text, and a zip holds binary fields (CRCs, sizes, offsets). These two
zips are written so that every byte of them is ASCII: stored, not deflated, with a DOS file attribute instead
of a Unix mode, and their text padded until each CRC and offset has no byte of 0x80 or more. JSON can then
carry them as they are, and the service unpacks them as any other package.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

MAX_PADDING = 400  # filler characters tried per member: enough to find CRCs and offsets of ASCII bytes only
DOS_ARCHIVE = 0x20  # a file attribute without a Unix mode, whose bytes are all below 0x80

SHARED_OBJECT = "not really a shared object\n"  # without engine.binary, a native binary is not looked into
RANDOM_YAML = "default:\n  interval: 1000\n"


@dataclass(frozen=True)
class ExamplePackage:
    """One package of the examples: its upload name, its bytes (ASCII only), and what installs it."""

    file_name: str
    plugin_type: str
    plugin_name: str
    content: bytes
    functions: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The zip as the `content` of a JSON upload."""
        return self.content.decode("ascii")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def _crc_is_ascii(data: bytes) -> bool:
    return max(zlib.crc32(data).to_bytes(4, "little")) < 0x80


def _stored_zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 0  # MS-DOS: the attribute below is not read as a Unix mode
            info.external_attr = DOS_ARCHIVE
            archive.writestr(info, data)
    return buffer.getvalue()


def ascii_zip(files: Mapping[str, str]) -> bytes:
    """A stored zip of `files` (name to text) whose every byte is ASCII; each text may get trailing filler.

    A text ending in a YAML document gets `#` comments, any other one spaces. Raises ValueError when no padding
    up to MAX_PADDING gives one (it never happens for short names and texts).
    """
    names = list(files)
    candidates = []
    for name in names:
        filler = "#" if name.endswith(".yaml") else " "
        candidates.append([padded for pad in range(MAX_PADDING)
                           if _crc_is_ascii(padded := (files[name] + filler * pad).encode("ascii"))])
    for texts in itertools.product(*candidates):
        content = _stored_zip(list(zip(names, texts, strict=True)))
        if max(content) < 0x80:
            return content
    raise ValueError(f"no ASCII-only zip of {', '.join(names)} within {MAX_PADDING} characters of padding")


@cache
def packages() -> tuple[ExamplePackage, ExamplePackage]:
    """The two packages of the examples: source plugin random and function plugin misc (f1, f2)."""
    random_zip = ascii_zip({"Random@v1.0.0.so": SHARED_OBJECT, "random.yaml": RANDOM_YAML})
    misc_zip = ascii_zip({"Misc@v2.so": SHARED_OBJECT})
    return (ExamplePackage("random.zip", "sources", "random", random_zip),
            ExamplePackage("misc.zip", "functions", "misc", misc_zip, ("f1", "f2")))
