"""Archive safety: every refusal of `inspect`, each shown to be about the attack, and safe extraction.

Hostile archives are built with zipfile and then byte-patched (security catalogue 1.5), or written
header by header where zipfile cannot produce them (empty or NUL names, 200 000 entries, ZIP64 end
records). Each refusal case also builds the same archive without its hostile part and checks that it
installs, so a case cannot pass by refusing everything.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import make_zip
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kuiper_plugins.errors import ArchiveRejected, DiskFull
from kuiper_plugins.install import unpack
from kuiper_plugins.install.archive import Entry, extract, inspect, read_member
from kuiper_plugins.install.unpack import SECOND_PROCESS_MIN_FILES

MiB = 1 << 20
LIMITS = {"max_entries": 100, "max_unpacked_size": 16 * MiB}
BASE = [
    ("Random@v1.0.0.so", b"\x7fELF" + bytes(range(256)) * 16),
    ("random.yaml", "default:\n  interval: 1000\n"),
    ("etc/conf.yaml", "a: 1\n"),
]
FIXED_TIME = (2024, 1, 1, 0, 0, 0)

Members = Sequence[tuple[str, bytes | str]]


def noise(size: int, seed: int = 7) -> bytes:
    """Incompressible bytes, the same on every run."""
    return random.Random(seed).randbytes(size)


def write_members(
    path: Path, members: Members, *, modes: dict[str, int] | None = None, methods: dict[str, int] | None = None
) -> Path:
    """Write `members` in order with zipfile, duplicates included; folders end with "/"."""
    modes = modes or {}
    methods = methods or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicates some cases need
        with zipfile.ZipFile(path, "w") as zf:
            for name, content in members:
                info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                is_folder = name.endswith("/")
                info.external_attr = modes.get(name, 0o40755 if is_folder else 0o100644) << 16
                default_method = zipfile.ZIP_STORED if is_folder else zipfile.ZIP_DEFLATED
                info.compress_type = methods.get(name, default_method)
                zf.writestr(info, content)
    return path


# --- byte patching ------------------------------------------------------------------

LOCAL_FIELDS = {"flags": 6, "method": 8, "crc": 14, "compress_size": 18, "file_size": 22}
CENTRAL_FIELDS = {
    "flags": 8, "method": 10, "crc": 16, "compress_size": 20, "file_size": 24,
    "external_attr": 38, "header_offset": 42,
}
FIELD_FORMATS = {"flags": "<H", "method": "<H"}  # every other field is 4 bytes
EOCD_FIELDS = {"disk": (4, "<H"), "directory_disk": (6, "<H"), "disk_entries": (8, "<H"),
               "entries": (10, "<H"), "directory_size": (12, "<L"), "directory_offset": (16, "<L")}


def end_record_offset(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def headers(data: bytes) -> list[tuple[bytes, int, int]]:
    """(name, central header offset, local header offset) of every entry of a comment-free zip."""
    count, _, offset = struct.unpack_from("<H2L", data, end_record_offset(data) + 10)
    found = []
    for _ in range(count):
        name_size, extra_size, comment_size = struct.unpack_from("<3H", data, offset + 28)
        (local,) = struct.unpack_from("<L", data, offset + 42)
        found.append((data[offset + 46 : offset + 46 + name_size], offset, local))
        offset += 46 + name_size + extra_size + comment_size
    return found


def header_of(data: bytes, name: str) -> tuple[int, int]:
    (match,) = [(central, local) for raw, central, local in headers(data) if raw == name.encode()]
    return match


def patch_entry(path: Path, name: str, *, where: str = "both", **fields: int | Callable[[int], int]) -> None:
    """Rewrite header fields of entry `name`: in its local header, its central header or both.

    A field's value is a number or a function of the old number.
    """
    data = bytearray(path.read_bytes())
    central, local = header_of(data, name)
    for field_name, value in fields.items():
        fmt = FIELD_FORMATS.get(field_name, "<L")
        places = []
        if where in ("both", "central"):
            places.append(central + CENTRAL_FIELDS[field_name])
        if where in ("both", "local") and field_name in LOCAL_FIELDS:
            places.append(local + LOCAL_FIELDS[field_name])
        for place in places:
            old = struct.unpack_from(fmt, data, place)[0]
            struct.pack_into(fmt, data, place, value(old) if callable(value) else value)
    path.write_bytes(data)


def rename_entry(path: Path, name: str, new_name: bytes, *, where: str = "both") -> None:
    """Overwrite an entry's name bytes in place (same length) in its local and/or central header."""
    assert len(new_name) == len(name.encode())
    data = bytearray(path.read_bytes())
    central, local = header_of(data, name)
    if where in ("both", "central"):
        data[central + 46 : central + 46 + len(new_name)] = new_name
    if where in ("both", "local"):
        data[local + 30 : local + 30 + len(new_name)] = new_name
    path.write_bytes(data)


def data_start(path: Path, name: str) -> int:
    data = path.read_bytes()
    _, local = header_of(data, name)
    name_size, extra_size = struct.unpack_from("<2H", data, local + 26)
    return local + 30 + name_size + extra_size


def patch_end_record(path: Path, **fields: int | Callable[[int], int]) -> None:
    data = bytearray(path.read_bytes())
    end = end_record_offset(data)
    for field_name, value in fields.items():
        offset, fmt = EOCD_FIELDS[field_name]
        old = struct.unpack_from(fmt, data, end + offset)[0]
        struct.pack_into(fmt, data, end + offset, value(old) if callable(value) else value)
    path.write_bytes(data)


def prepend(path: Path, prefix: bytes, *, fix_offsets: bool) -> None:
    """Put `prefix` before the zip, like `cat script zip`, or like `zip -A` when fix_offsets is set."""
    data = bytearray(path.read_bytes())
    if fix_offsets:
        for _, central, _ in headers(data):
            struct.pack_into("<L", data, central + 42, struct.unpack_from("<L", data, central + 42)[0] + len(prefix))
        end = end_record_offset(data)
        struct.pack_into("<L", data, end + 16, struct.unpack_from("<L", data, end + 16)[0] + len(prefix))
    path.write_bytes(prefix + data)


def overwrite_data(path: Path, name: str, garbage: bytes) -> None:
    start = data_start(path, name)
    data = path.read_bytes()
    path.write_bytes(data[:start] + garbage + data[start + len(garbage) :])


def cut_out(path: Path, start: int, stop: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:start] + data[stop:])


def local_entry_bytes(name: str, content: bytes) -> bytes:
    """The local header and data zipfile writes for a stored member, to quote inside another member."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
        info.external_attr = 0o100644 << 16
        zf.writestr(info, content)
    return buffer.getvalue()[: 30 + len(name) + len(content)]


# --- archives written header by header --------------------------------------------

LOCAL_HEADER = struct.Struct("<4s5H3L2H")
CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
END_RECORD = struct.Struct("<4s4H2LH")
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
ZIP64_LOCATOR = struct.Struct("<4sLQL")


def raw_zip(
    path: Path, members: Sequence[tuple[bytes, bytes]], *, utf8: bool = True, zip64: bool = False,
    declared_count: int | None = None,
) -> Path:
    """Write stored members with any name bytes; a name ending in b"/" is a folder.

    `zip64` adds a ZIP64 end record (the classic one then holds 0xFFFF markers); otherwise the
    classic count is the real one modulo 2**16, as a naive writer would store it.
    """
    flags = 0x800 if utf8 else 0
    local_parts: list[bytes] = []
    central_parts: list[bytes] = []
    offset = 0
    for name, content in members:
        crc = zlib.crc32(content)
        mode = 0o40755 if name.endswith(b"/") else 0o100644
        header = LOCAL_HEADER.pack(b"PK\x03\x04", 20, flags, 0, 0, 0x5821, crc, len(content), len(content),
                                   len(name), 0)
        local_parts += (header, name, content)
        central_parts += (
            CENTRAL_HEADER.pack(b"PK\x01\x02", 30, 3, 20, 0, flags, 0, 0, 0x5821, crc, len(content),
                                len(content), len(name), 0, 0, 0, 0, mode << 16, offset),
            name,
        )
        offset += len(header) + len(name) + len(content)
    directory = b"".join(central_parts)
    count = len(members) if declared_count is None else declared_count
    if zip64:
        tail = (
            ZIP64_END_RECORD.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), offset)
            + ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, offset + len(directory), 1)
            + END_RECORD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        )
    else:
        tail = END_RECORD.pack(b"PK\x05\x06", 0, 0, count & 0xFFFF, count & 0xFFFF, len(directory), offset, 0)
    path.write_bytes(b"".join(local_parts) + directory + tail)
    return path


def as_raw(members: Members) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), content.encode() if isinstance(content, str) else content) for name, content in members]


# --- checking an accepted archive -----------------------------------------------------


def as_bytes(content: bytes | str) -> bytes:
    return content.encode() if isinstance(content, str) else content


def all_paths(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_installs(zip_path: Path, members: Members, dest: Path, **limits: int) -> list[Entry]:
    """inspect accepts the zip, and extract writes exactly `members` under dest with fixed modes, and returns the
    sha256 of every file it wrote.

    Folders are 0755, files 0644, or 0755 when their entry has a run bit (kept, as eKuiper keeps it).
    """
    entries = inspect(zip_path, **{**LIMITS, **limits})
    assert [e.name for e in entries] == [name.removesuffix("/") for name, _ in members]
    dest.mkdir()
    digests = extract(zip_path, entries, dest)
    assert digests == {name: hashlib.sha256(as_bytes(content)).hexdigest()
                       for name, content in members if not name.endswith("/")}
    expected_paths = set()
    for name, content in members:
        parts = name.removesuffix("/").split("/")
        expected_paths.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        target = dest / name
        if name.endswith("/"):
            assert target.is_dir() and not target.is_symlink()
        else:
            assert target.read_bytes() == as_bytes(content)
    assert all_paths(dest) == expected_paths
    executable = {e.name for e in entries if e.executable}
    for path in dest.rglob("*"):
        assert not path.is_symlink()
        run_bit = path.is_dir() or path.relative_to(dest).as_posix() in executable
        assert stat.S_IMODE(path.lstat().st_mode) == (0o755 if run_bit else 0o644)
    return entries


# --- the refusal cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """An attack: BASE + extra + hostile members, then an optional byte patch.

    The control archive is BASE + extra, unpatched: it must install.
    """

    id: str
    expect: str  # a part of the refusal message
    hostile: Members = ()
    extra: Members = ()
    modes: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    patch: Callable[[Path], None] | None = None
    limits: dict[str, int] = field(default_factory=dict)


QUOTED = local_entry_bytes("b.bin", b"quoted payload")
STORED = zipfile.ZIP_STORED

CASES = [
    # names (catalogue 32, 36, 38)
    Case("dotdot", 'entry "../evil" leaves the plugin folder', [("../evil", "x")]),
    Case("dotdot-nested", 'entry "a/../../evil" leaves the plugin folder', [("a/../../evil", "x")]),
    Case("dotdot-inside", 'entry "etc/../x.yaml" leaves the plugin folder', [("etc/../x.yaml", "x")]),
    Case("dotdot-folder", 'entry "../" leaves the plugin folder', [("../", "")]),
    Case("absolute", 'entry "/abs/evil" is an absolute path', [("/abs/evil", "x")]),
    Case("absolute-root", 'entry "/" is an absolute path', [("/", "")]),
    Case("drive-slash", 'entry "C:/evil" starts with a drive letter', [("C:/evil", "x")]),
    Case("drive-relative", 'entry "c:evil" starts with a drive letter', [("c:evil", "x")]),
    Case("drive-backslash", r'entry "C:\\evil" contains a backslash', [("C:\\evil", "x")]),
    Case("unc", r'entry "\\\\host\\share\\evil" contains a backslash', [("\\\\host\\share\\evil", "x")]),
    Case("backslash-dotdot", r'entry "..\\..\\evil" contains a backslash', [("..\\..\\evil", "x")]),
    Case("backslash-inner", r'entry "etc\\x.yaml" contains a backslash', [("etc\\x.yaml", "x")]),
    Case("empty-segment", 'entry "a//b" has an empty or "." path segment', [("a//b", "x")]),
    Case("empty-segment-folder", 'entry "a//" has an empty or "." path segment', [("a//", "")]),
    Case("dot-segment", 'entry "./x.yaml" has an empty or "." path segment', [("./x.yaml", "x")]),
    Case("dot-inner", 'entry "etc/./x.yaml" has an empty or "." path segment', [("etc/./x.yaml", "x")]),
    Case(
        "nul", r'entry "random.so\u0000.txt" has a control character', [("random.so_.txt", "x")],
        patch=lambda p: rename_entry(p, "random.so_.txt", b"random.so\x00.txt"),
    ),
    Case("control-soh", r'entry "a\u0001b" has a control character', [("a\x01b", "x")]),
    Case("control-newline", r'entry "evil\u000a.so" has a control character', [("evil\n.so", "x")]),
    Case("control-del", r'entry "x\u007f" has a control character', [("x\x7f", "x")]),
    Case("control-c1", r'entry "x\u0085" has a control character', [("x\x85", "x")]),
    Case(
        "not-utf8", "is marked UTF-8 but its name is not valid UTF-8", [("café.txt", "x")],
        patch=lambda p: rename_entry(p, "café.txt", b"caf\xff\xfe.txt"),
    ),
    Case(
        "local-name-differs", 'entry "good.txt" has a different name in its local header', [("good.txt", "x")],
        patch=lambda p: rename_entry(p, "good.txt", b"evil.txt", where="local"),
    ),
    Case("long-segment", "has a path segment longer than 255 bytes", [("a" * 256, "x")]),
    Case("long-segment-utf8", "has a path segment longer than 255 bytes", [("é" * 128, "x")]),
    Case("long-name", "is longer than 1024 bytes", [("/".join(["d" * 200] * 6), "x")]),
    Case("deep", "is nested deeper than 32 levels", [("d/" * 32 + "f", "x")]),
    Case("deep-2000", "is longer than 1024 bytes", [("a/" * 2000 + "f", "x")]),
    # Unix file types (catalogue 33)
    Case("symlink", 'entry "link" is a symbolic link', [("link", "/etc/passwd")], modes={"link": 0o120777}),
    Case("symlink-folder", 'entry "linkdir/" is a symbolic link', [("linkdir/", "")], modes={"linkdir/": 0o120755}),
    Case("char-device", "is a character device", [("tty", "")], modes={"tty": 0o020666}),
    Case("block-device", "is a block device", [("sda", "")], modes={"sda": 0o060660}),
    Case("fifo", "is a FIFO", [("pipe", "")], modes={"pipe": 0o010644}),
    Case("socket", "is a socket", [("sock", "")], modes={"sock": 0o140755}),
    Case("whiteout", "has an unknown Unix file type 0o160000", [("odd", "")], modes={"odd": 0o160644}),
    Case("unknown-type", "has an unknown Unix file type 0o30000", [("odd", "")], modes={"odd": 0o030644}),
    Case("folder-mode-file", 'is marked as a folder but its name does not end with "/"', [("x", "")],
         modes={"x": 0o40755}),
    # encryption and methods (catalogue 43)
    Case("encrypted", 'entry "secret.bin" is encrypted', [("secret.bin", "x")],
         patch=lambda p: patch_entry(p, "secret.bin", flags=lambda f: f | 0x1)),
    Case("strong-encryption", "uses strong encryption", [("secret.bin", "x")],
         patch=lambda p: patch_entry(p, "secret.bin", flags=lambda f: f | 0x40)),
    Case("patched-data", "holds compressed patched data", [("patch.bin", "x")],
         patch=lambda p: patch_entry(p, "patch.bin", flags=lambda f: f | 0x20)),
    Case("deflate64", "uses compression method 9;", [("d64.bin", "x")],
         patch=lambda p: patch_entry(p, "d64.bin", method=9)),
    Case("aes", "uses compression method 99;", [("aes.bin", "x")],
         patch=lambda p: patch_entry(p, "aes.bin", method=99)),
    Case("bzip2", "uses compression method 12;", [("b.bin", "x" * 100)], methods={"b.bin": zipfile.ZIP_BZIP2}),
    Case("lzma", "uses compression method 14;", [("l.bin", "x" * 100)], methods={"l.bin": zipfile.ZIP_LZMA}),
    # duplicates and collisions (catalogue 35, 37)
    Case("duplicate", 'entry "random.yaml" appears twice', [("random.yaml", "again")]),
    Case("duplicate-folder", 'entry "docs/" appears twice', [("docs/", "")], extra=[("docs/", "")]),
    Case("case-so", 'entries "Random@v1.0.0.so" and "random@v1.0.0.so" collide', [("random@v1.0.0.so", "x")]),
    Case("case-yaml", "collide", [("RANDOM.YAML", "x")]),
    Case("case-install-sh", 'entries "install.sh" and "INSTALL.SH" collide', [("INSTALL.SH", "x")],
         extra=[("install.sh", "exit 0\n")]),
    Case("nfc-nfd", "collide", [("cafe\u0301.txt", "x")], extra=[("café.txt", "x")]),
    Case("sharp-s", "collide", [("STRASSE.txt", "x")], extra=[("straße.txt", "x")]),
    Case("kelvin-sign", "collide", [("\u212a.txt", "x")], extra=[("k.txt", "x")]),
    Case("file-then-folder", 'entries "docs" and "docs/" collide', [("docs/", "")], extra=[("docs", "x")]),
    Case("folder-then-file", 'entries "docs/" and "docs" collide', [("docs", "x")], extra=[("docs/", "")]),
    Case("file-as-parent", 'entry "a/b" is inside "a", which is a file', [("a/b", "x")], extra=[("a", "x")]),
    Case("file-after-child", 'entry "a/b" is inside "a", which is a file', [("a", "x")], extra=[("a/b", "x")]),
    Case("file-as-grandparent", 'entry "etc/conf.yaml" is inside "etc"', [("etc", "x")]),
    Case("file-as-parent-case", 'entry "a/b" is inside "A", which is a file', [("a/b", "x")], extra=[("A", "x")]),
    # sizes and bombs (catalogue 39, 42)
    Case("too-many-entries", "23 entries, more than the limit of 10",
         [(f"many/{i:02}", "x") for i in range(20)], limits={"max_entries": 10}),
    Case("sum-over-cap", "more than the limit of 1048576", [("blob.bin", noise(MiB + 1))],
         limits={"max_unpacked_size": MiB}),
    Case("ratio", 'entry "zeros.bin" has a compression ratio of', [("zeros.bin", bytes(4 * MiB))]),
    Case("declared-bomb", "has a compression ratio of", [("bomb.bin", "x" * 1000)],
         patch=lambda p: patch_entry(p, "bomb.bin", file_size=1 << 30)),
    Case("declared-sum", "entries unpack to", [("claim.bin", noise(64 * 1024))],
         patch=lambda p: patch_entry(p, "claim.bin", file_size=10 * MiB), limits={"max_unpacked_size": 8 * MiB}),
    Case("stored-size-lie", "is stored but declares 200 bytes unpacked and 100 packed", [("s.bin", "x" * 100)],
         methods={"s.bin": STORED}, patch=lambda p: patch_entry(p, "s.bin", file_size=200)),
    Case("folder-with-data", 'entry "data/" is a folder that holds data', [("data/", "")],
         patch=lambda p: patch_entry(p, "data/", file_size=10)),
    # structure (catalogue 31, 41, 42)
    Case("not-a-zip", "zip: not a valid zip file",
         patch=lambda p: p.write_bytes(b"this is not a zip file\n" * 10)),
    Case("empty-file", "zip: not a valid zip file", patch=lambda p: p.write_bytes(b"")),
    Case("html-page", "zip: not a valid zip file",
         patch=lambda p: p.write_bytes(b"<!doctype html><html><body>Not Found</body></html>\n")),
    Case("first-half", "zip: not a valid zip file",
         patch=lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    Case("last-byte-missing", "zip: not a valid zip file",
         patch=lambda p: p.write_bytes(p.read_bytes()[:-1])),
    Case("middle-cut-out", "truncated or corrupt archive", patch=lambda p: cut_out(p, 40, 60)),
    Case("prepended-script", "data before the first entry",
         patch=lambda p: prepend(p, b"#!/bin/sh\necho pwned\nexit 0\n", fix_offsets=False)),
    Case("prepended-script-fixed-offsets", "data before the first entry",
         patch=lambda p: prepend(p, b"#!/bin/sh\necho pwned\nexit 0\n", fix_offsets=True)),
    Case("trailing-data", "data after the end of the archive",
         patch=lambda p: p.write_bytes(p.read_bytes() + b"trailing")),
    Case("several-disks", "the archive spans several disks", patch=lambda p: patch_end_record(p, disk=1)),
    Case("count-too-low", "the central directory holds more than the 2 entries its end record counts",
         patch=lambda p: patch_end_record(p, entries=2, disk_entries=2)),
    Case("count-too-high", "the end record counts 4 entries but the central directory holds 3",
         patch=lambda p: patch_end_record(p, entries=4, disk_entries=4)),
    Case("quoted-overlap", 'entries "a.bin" and "b.bin" overlap in the archive',
         [("a.bin", QUOTED), ("b.bin", b"quoted payload")], methods={"a.bin": STORED, "b.bin": STORED},
         patch=lambda p: patch_entry(p, "b.bin", where="central", header_offset=data_start(p, "a.bin"))),
    Case("size-overlap", 'entries "a.bin" and "b.bin" overlap in the archive', [("a.bin", "a" * 50), ("b.bin", "b")],
         patch=lambda p: patch_entry(p, "a.bin", where="central", compress_size=lambda s: s + 10)),
    Case("into-directory", 'entry "last.bin" runs into the central directory', [("last.bin", "x" * 50)],
         patch=lambda p: patch_entry(p, "last.bin", where="central", compress_size=lambda s: s + 100)),
    Case("offset-past-data", 'entry "b.bin" points past the entries\' data', [("b.bin", "x")],
         patch=lambda p: patch_entry(p, "b.bin", where="central", header_offset=0x7FFFFFF0)),
    Case("offset-misaligned", 'entry "b.bin" points to no local header', [("a.bin", "a"), ("b.bin", "b")],
         patch=lambda p: patch_entry(p, "b.bin", where="central", header_offset=lambda o: o - 1)),
    Case("local-method-differs", "has a local header that disagrees with the central directory", [("m.bin", "x")],
         patch=lambda p: patch_entry(p, "m.bin", where="local", method=0)),
    Case("local-encrypted-only", "has a local header that disagrees", [("m.bin", "x")],
         patch=lambda p: patch_entry(p, "m.bin", where="local", flags=lambda f: f | 0x1)),
]


def build_attack(case: Case, path: Path) -> Path:
    write_members(path, [*BASE, *case.extra, *case.hostile], modes=case.modes, methods=case.methods)
    if case.patch is not None:
        case.patch(path)
    return path


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_inspect_refuses_the_whole_archive(case, tmp_path):
    zip_path = build_attack(case, tmp_path / "plugin.zip")
    before = all_paths(tmp_path)
    with pytest.raises(ArchiveRejected) as refusal:
        inspect(zip_path, **{**LIMITS, **case.limits})
    assert refusal.value.message.startswith(("invalid zip file: ", "zip: not a valid zip file"))
    assert case.expect in refusal.value.message
    assert all_paths(tmp_path) == before


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_the_same_archive_without_the_attack_installs(case, tmp_path):
    members = [*BASE, *case.extra]
    zip_path = write_members(tmp_path / "plugin.zip", members, modes=case.modes, methods=case.methods)
    assert_installs(zip_path, members, tmp_path / "dest", **case.limits)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --- accepted archives -----------------------------------------------------------------------


def test_inspect_lists_entries_as_the_interface_says(tmp_path):
    zip_path = make_zip(
        tmp_path / "p.zip",
        {"Random@v1.0.0.so": b"\x7fELF", "bin/": "", "bin/run": "#!/bin/sh\n", "bin/suid": "", "raw": "x"},
        modes={"bin/run": 0o100755, "bin/suid": 0o104750, "raw": 0},
    )
    assert inspect(zip_path, **LIMITS) == [
        Entry(name="Random@v1.0.0.so", is_dir=False, size=4, executable=False),
        Entry(name="bin", is_dir=True, size=0, executable=False),
        Entry(name="bin/run", is_dir=False, size=10, executable=True),
        Entry(name="bin/suid", is_dir=False, size=0, executable=True),
        Entry(name="raw", is_dir=False, size=1, executable=False),
    ]


@pytest.mark.parametrize("mode", [0, 0o100644, 0o100755])
def test_a_name_ending_in_slash_is_a_folder_whatever_its_mode(mode, tmp_path):
    zip_path = write_members(tmp_path / "p.zip", [*BASE, ("docs/", "")], modes={"docs/": mode})
    entries = assert_installs(zip_path, [*BASE, ("docs/", "")], tmp_path / "dest")
    assert entries[-1] == Entry(name="docs", is_dir=True, size=0, executable=False)


def test_names_at_the_limits_are_accepted(tmp_path):
    members = [
        *BASE,
        ("s" * 255, "longest segment"),
        ("/".join(["d"] * 31 + ["f"]), "deepest"),
        ("/".join(["n" * 204] * 5), "longest name"),
        ("é" * 127 + "e", "a 255-byte segment in UTF-8"),
        ("unicode \u202e name ü ☃", "odd but harmless"),
    ]
    assert len(members[5][0].encode()) == 1024
    assert_installs(write_members(tmp_path / "p.zip", members), members, tmp_path / "dest")


def test_counts_and_sizes_at_the_limits_are_accepted(tmp_path):
    members = [*BASE, ("zeros.bin", bytes(MiB)), ("pad.bin", noise(1000))]
    total = sum(len(as_bytes(c)) for _, c in members)
    zip_path = write_members(tmp_path / "p.zip", members)
    assert_installs(zip_path, members, tmp_path / "dest", max_entries=len(members), max_unpacked_size=total)
    with pytest.raises(ArchiveRejected, match=f"more than the limit of {len(members) - 1}$"):
        inspect(zip_path, max_entries=len(members) - 1, max_unpacked_size=total)
    with pytest.raises(ArchiveRejected, match=f"more than the limit of {total - 1}$"):
        inspect(zip_path, max_entries=len(members), max_unpacked_size=total - 1)


class Unseekable:
    """A write-only stream without seek(), so zipfile writes data descriptors."""

    def __init__(self):
        self.buffer = io.BytesIO()

    def write(self, data):
        return self.buffer.write(data)

    def tell(self):
        return self.buffer.tell()

    def flush(self):
        pass


def test_legal_variants_are_accepted(tmp_path):
    """An archive comment, data descriptors, ZIP64 extra fields and cp437 names are all fine."""
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as zf:  # writes data descriptors
        zf.comment = b"built by a test"
        for name, content in BASE:
            zf.writestr(zipfile.ZipInfo(name, date_time=FIXED_TIME), content)
        with zf.open("big.txt", "w", force_zip64=True) as member:
            member.write(b"zip64 extra field")
    zip_path = tmp_path / "variants.zip"
    zip_path.write_bytes(stream.buffer.getvalue())
    with zipfile.ZipFile(zip_path) as written:
        assert written.infolist()[0].flag_bits & 0x8
    assert_installs(zip_path, [*BASE, ("big.txt", "zip64 extra field")], tmp_path / "dest")

    cp437 = raw_zip(tmp_path / "cp437.zip", [*as_raw(BASE), (b"caf\x82.txt", b"x")], utf8=False)
    assert_installs(cp437, [*BASE, ("caf\u00e9.txt", "x")], tmp_path / "dest-cp437")


def test_zip64_end_record_is_read(tmp_path):
    zip_path = raw_zip(tmp_path / "z64.zip", [*as_raw(BASE), (b"docs/", b"")], zip64=True)
    assert_installs(zip_path, [*BASE, ("docs/", "")], tmp_path / "dest")


def test_empty_archive_has_no_entries(tmp_path):
    zip_path = write_members(tmp_path / "empty.zip", [])
    assert inspect(zip_path, **LIMITS) == []


@pytest.mark.parametrize("name", [b"", b"/", b"a\x00b", b"\x00"])
def test_names_zipfile_cannot_write_are_refused(name, tmp_path):
    """Names zipfile rewrites when writing, so the raw writer puts them in the archive."""
    control = raw_zip(tmp_path / "control.zip", as_raw(BASE))
    assert_installs(control, BASE, tmp_path / "dest")
    zip_path = raw_zip(tmp_path / "p.zip", [*as_raw(BASE), (name, b"x")])
    with pytest.raises(ArchiveRejected, match="^invalid zip file: .*(empty name|absolute|control character)"):
        inspect(zip_path, **LIMITS)


# --- the entry count is read before zipfile builds the directory (catalogue 42) --------


@pytest.fixture(scope="module")
def many_entries():
    """200 000 empty members (about 17 MiB), written header by header."""
    return [(b"%06d" % i, b"") for i in range(200_000)]


@pytest.mark.parametrize(
    ("zip64", "count", "expect"),
    [
        pytest.param(True, 200_000, "200000 entries, more than the limit of 10000", id="zip64-end-record"),
        pytest.param(False, 200_000, "holds more than the 3392 entries its end record counts", id="count-wrapped"),
        pytest.param(False, 20_000, "20000 entries, more than the limit of 10000", id="classic-end-record"),
    ],
)
def test_huge_entry_counts_are_refused_quickly(zip64, count, expect, many_entries, tmp_path):
    zip_path = raw_zip(tmp_path / "many.zip", many_entries[:count], zip64=zip64)
    started = time.perf_counter()
    with pytest.raises(ArchiveRejected, match=expect):
        inspect(zip_path, max_entries=10_000, max_unpacked_size=MiB)
    assert time.perf_counter() - started < 5  # a generous bound; the refusal takes milliseconds


def test_the_same_count_within_the_limit_is_accepted(many_entries, tmp_path):
    zip_path = raw_zip(tmp_path / "many.zip", many_entries[:10_000], zip64=True)
    entries = inspect(zip_path, max_entries=10_000, max_unpacked_size=MiB)
    assert len(entries) == 10_000 and entries[-1] == Entry(name="009999", is_dir=False, size=0, executable=False)


def test_a_lying_count_cannot_smuggle_entries_past_the_walk(many_entries, tmp_path):
    """The end record says 5 entries; the directory holds 200 000."""
    zip_path = raw_zip(tmp_path / "many.zip", many_entries, declared_count=5)
    started = time.perf_counter()
    with pytest.raises(ArchiveRejected, match="holds more than the 5 entries"):
        inspect(zip_path, max_entries=10_000, max_unpacked_size=MiB)
    assert time.perf_counter() - started < 5


# --- extraction ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A canary folder beside the destination, where traversal payloads aim."""
    canary = tmp_path / "outside"
    canary.mkdir()
    (canary / "canary.txt").write_text("untouched")
    return canary


def assert_untouched(canary: Path) -> None:
    assert all_paths(canary) == {"canary.txt"}
    assert (canary / "canary.txt").read_text() == "untouched"


def test_extract_writes_contents_with_fixed_modes_whatever_the_umask(tmp_path, outside):
    members = [
        *BASE,
        ("docs/", ""),
        ("bin/tool", "#!/bin/sh\n"),
        ("bin/setuid", "x"),
        ("empty.txt", ""),
        ("etc/sub/deep.yaml", "b: 2\n"),
        ("big.bin", noise(3 * MiB)),
    ]
    zip_path = write_members(tmp_path / "p.zip", members, modes={"bin/tool": 0o100777, "bin/setuid": 0o106755})
    old_umask = os.umask(0o077)
    try:
        entries = assert_installs(zip_path, members, tmp_path / "dest")
    finally:
        os.umask(old_umask)
    assert [e.name for e in entries if e.executable] == ["bin/tool", "bin/setuid"]
    assert all_paths(tmp_path) - {"p.zip", "outside", "outside/canary.txt"} == {
        "dest", *(f"dest/{p}" for p in all_paths(tmp_path / "dest"))
    }
    assert_untouched(outside)


def test_extract_writes_only_the_entries_given(tmp_path):
    members = [*BASE, ("install.sh", "exit 0\n")]
    zip_path = write_members(tmp_path / "p.zip", members)
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(zip_path, [e for e in entries if e.name.startswith("etc/")], dest)
    assert all_paths(dest) == {"etc", "etc/conf.yaml"}


def many_members(count: int) -> list[tuple[str, bytes]]:
    """`count` small files in 8 folders, listed folder by folder as `zip -r` lists a tree, deflated."""
    return [(f"vendor/pkg{index * 8 // count}/mod{index:04d}.py", f"value_{index} = {index}\n".encode() * 20)
            for index in range(count)]


def unpackers_running() -> list[str]:
    """The second unpacking processes this test process started that are still running."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any(a.endswith("unpack.py") for a in child.cmdline()):
                found.append(f"{child.pid}: {' '.join(child.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return found


def test_extract_writes_a_package_of_many_files_whole_from_both_processes(tmp_path, outside):
    members = many_members(2 * SECOND_PROCESS_MIN_FILES)
    zip_path = write_members(tmp_path / "p.zip", members)
    assert_installs(zip_path, members, tmp_path / "dest", max_entries=len(members))
    assert unpackers_running() == []
    assert_untouched(outside)


def test_where_no_second_process_can_start_the_worker_writes_every_file_and_says_so(tmp_path, monkeypatch, caplog):
    def cannot_start(*args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(unpack, "_SecondProcess", cannot_start)
    members = many_members(2 * SECOND_PROCESS_MIN_FILES)
    zip_path = write_members(tmp_path / "p.zip", members)
    assert_installs(zip_path, members, tmp_path / "dest", max_entries=len(members))
    assert f"writing {len(members)} files in one process: the second could not be started: [Errno 24]" in caplog.text


def second_process_members(zip_path: Path, entries: list[Entry]) -> list[unpack.Member]:
    return [(tuple(e.name.split("/")[:-1]), e.name.split("/")[-1], e.at.start, e.at.packed_size, e.at.deflated,
             e.at.crc, e.size, e.executable) for e in entries]


def test_the_second_process_alone_writes_the_members_it_is_given_and_reports_their_digests(tmp_path):
    members = [*many_members(40), ("bin/run", b"#!/bin/sh\nexit 0\n")]
    zip_path = write_members(tmp_path / "p.zip", members, modes={"bin/run": 0o100755})
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    for folder in ("vendor/pkg0", "vendor/pkg1", "vendor/pkg2", "vendor/pkg3", "vendor/pkg4", "vendor/pkg5",
                   "vendor/pkg6", "vendor/pkg7", "bin"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    archive_fd, root_fd = os.open(zip_path, os.O_RDONLY), os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        digests = unpack._SecondProcess(archive_fd, root_fd, second_process_members(zip_path, entries)).result(0)
    finally:
        os.close(archive_fd)
        os.close(root_fd)
    assert digests == [hashlib.sha256(content).hexdigest() for _name, content in members]
    for name, content in members:
        assert (dest / name).read_bytes() == content
    assert stat.S_IMODE((dest / "bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "vendor/pkg0/mod0000.py").stat().st_mode) == 0o644
    assert unpackers_running() == []


@pytest.mark.parametrize(("patch", "kind", "expect"), [
    (lambda p, name: patch_entry(p, name, crc=lambda c: c ^ 1), unpack.Refused, "is corrupt: Bad CRC-32"),
    (lambda p, name: overwrite_data(p, name, b"\xff" * 16), zlib.error, "invalid"),
], ids=["bad-crc", "corrupt-deflate"])
def test_the_second_process_reports_the_member_it_could_not_write_and_why(patch, kind, expect, tmp_path):
    members = many_members(40)
    zip_path = write_members(tmp_path / "p.zip", members)
    patch(zip_path, members[17][0])
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    for folder in range(8):
        (dest / f"vendor/pkg{folder}").mkdir(parents=True)
    archive_fd, root_fd = os.open(zip_path, os.O_RDONLY), os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(unpack.MemberFailed) as failure:
            unpack._SecondProcess(archive_fd, root_fd, second_process_members(zip_path, entries)).result(offset=100)
    finally:
        os.close(archive_fd)
        os.close(root_fd)
    assert failure.value.index == 117
    assert isinstance(failure.value.error, kind) and expect in str(failure.value.error)
    assert not (dest / members[18][0]).exists()  # it stopped at the first failure
    assert unpackers_running() == []


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED], ids=["deflated", "stored"])
def test_extract_writes_members_larger_than_a_read_whole_and_returns_their_digests(method, tmp_path):
    """Members past one read (a megabyte) are unpacked chunk by chunk; the digest covers every chunk."""
    pick = random.Random(3)
    members = [("lib/big.so", pick.randbytes(3 << 20)), ("lib/text.txt", b"0123456789abcdef" * (1 << 17) + b"end"),
               ("small.txt", b"small\n")]
    zip_path = write_members(tmp_path / "p.zip", members, methods=dict.fromkeys(("lib/big.so", "lib/text.txt"), method))
    assert_installs(zip_path, members, tmp_path / "dest")


@pytest.mark.parametrize("corrupt", [5, SECOND_PROCESS_MIN_FILES + 5, 2 * SECOND_PROCESS_MIN_FILES - 5],
                         ids=["this-process", "second-process-first", "second-process-last"])
def test_extract_refuses_a_corrupt_member_whichever_process_writes_it(corrupt, tmp_path, outside):
    members = many_members(2 * SECOND_PROCESS_MIN_FILES)
    zip_path = write_members(tmp_path / "p.zip", members)
    entries = inspect(zip_path, **{**LIMITS, "max_entries": len(members)})
    overwrite_data(zip_path, members[corrupt][0], b"\xff" * 16)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveRejected) as refusal:
        extract(zip_path, entries, dest)
    assert refusal.value.message.startswith(f'invalid zip file: entry "{members[corrupt][0]}" is corrupt: ')
    assert unpackers_running() == []
    assert_untouched(outside)


def accepted_then_patched(tmp_path: Path, patch: Callable[[Path], None]) -> tuple[Path, list[Entry]]:
    """A zip whose directory is sound but whose member data lies: inspect accepts it."""
    zip_path = write_members(tmp_path / "p.zip", [*BASE, ("liar.bin", noise(5000) + bytes(5000))])
    patch(zip_path)
    return zip_path, inspect(zip_path, **LIMITS)


def test_the_same_member_without_the_lie_extracts(tmp_path):
    zip_path, entries = accepted_then_patched(tmp_path, lambda p: None)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(zip_path, entries, dest)
    assert (dest / "liar.bin").read_bytes() == noise(5000) + bytes(5000)


@pytest.mark.parametrize(
    ("patch", "expect"),
    [
        pytest.param(
            lambda p: patch_entry(p, "liar.bin", file_size=4000), "unpacks to more than the 4000 bytes declared",
            id="inflates-past-size",
        ),
        pytest.param(lambda p: patch_entry(p, "liar.bin", crc=lambda c: c ^ 1), "Bad CRC-32", id="bad-crc"),
        # Declared larger than the data, with the data's own CRC: only the byte count catches it.
        pytest.param(
            lambda p: patch_entry(p, "liar.bin", file_size=12000),
            "unpacks to 10000 bytes, fewer than the 12000 declared", id="fewer-than-declared",
        ),
        pytest.param(lambda p: overwrite_data(p, "liar.bin", b"\xff" * 64), "is corrupt", id="corrupt-deflate"),
    ],
)
def test_extract_refuses_member_data_that_lies(patch, expect, tmp_path, outside):
    zip_path, entries = accepted_then_patched(tmp_path, patch)
    assert_liar_refused(zip_path, entries, expect, tmp_path)
    assert_untouched(outside)


def assert_liar_refused(zip_path: Path, entries: list[Entry], expect: str, tmp_path: Path) -> None:
    """extract refuses the member liar.bin, saying `expect` of it."""
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveRejected) as refusal:
        extract(zip_path, entries, dest)
    assert refusal.value.message.startswith('invalid zip file: entry "liar.bin" ')
    assert expect in refusal.value.message


BIG_LIAR = 5 * MiB // 2  # past one read (CHUNK_SIZE) packed and unpacked: unpacked chunk by chunk


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        pytest.param({"file_size": 2 * MiB}, f"unpacks to more than the {2 * MiB} bytes declared",
                     id="inflates-past-size"),
        pytest.param({"crc": lambda c: c ^ 1}, "Bad CRC-32", id="bad-crc"),
        pytest.param({"file_size": BIG_LIAR + 1000}, f"unpacks to {BIG_LIAR} bytes, fewer than the"
                     f" {BIG_LIAR + 1000} declared", id="fewer-than-declared"),
    ],
)
def test_extract_refuses_a_large_member_that_lies(fields, expect, tmp_path, outside):
    zip_path = write_members(tmp_path / "p.zip", [*BASE, ("liar.bin", noise(BIG_LIAR - MiB) + bytes(MiB))])
    patch_entry(zip_path, "liar.bin", **fields)
    assert_liar_refused(zip_path, inspect(zip_path, **LIMITS), expect, tmp_path)
    assert_untouched(outside)


@pytest.mark.parametrize(
    "entry",
    [
        Entry(name="../evil", is_dir=False, size=1, executable=False),
        Entry(name="/tmp/evil", is_dir=False, size=1, executable=False),
        Entry(name="a/../../evil", is_dir=True, size=0, executable=False),
        Entry(name="not-there", is_dir=False, size=1, executable=False),
        Entry(name="random.yaml", is_dir=False, size=1, executable=False),  # size differs from the archive
    ],
    ids=["dotdot", "absolute", "dotdot-folder", "missing", "size-differs"],
)
def test_extract_refuses_entries_not_from_inspect(entry, tmp_path, outside):
    zip_path = write_members(tmp_path / "p.zip", BASE)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveRejected, match="^invalid zip file: entry "):
        extract(zip_path, [entry], dest)
    assert_untouched(outside)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("planted", ["etc", "random.yaml"])
def test_extract_never_follows_a_link_already_in_the_destination(planted, tmp_path, outside):
    """dest_dir should be empty; if something planted a link there anyway, nothing is written through it."""
    zip_path = write_members(tmp_path / "p.zip", BASE)
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    dest.mkdir()
    target = outside if planted == "etc" else outside / "canary.txt"
    (dest / planted).symlink_to(target)
    with pytest.raises(OSError) as failure:
        extract(zip_path, entries, dest)
    assert failure.value.errno in (errno.ELOOP, errno.EEXIST, errno.ENOTDIR)
    assert_untouched(outside)


class FailingWrites:
    """Stands in for the os module inside unpack.py, failing every os.write with one errno."""

    def __init__(self, error_number: int):
        self.error_number = error_number

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        raise OSError(self.error_number, os.strerror(self.error_number))


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_disk_full(error_number, tmp_path, monkeypatch):
    zip_path = write_members(tmp_path / "p.zip", BASE)
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(unpack, "os", FailingWrites(error_number))
    with pytest.raises(DiskFull, match='^disk full while unpacking "Random@v1.0.0.so"$'):
        extract(zip_path, entries, dest)


FULL_DISK_CHILD = """
import json, sys
from pathlib import Path
from kuiper_plugins.errors import DiskFull
from kuiper_plugins.install.archive import extract, inspect
zip_path, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir()
try:
    extract(zip_path, inspect(zip_path, max_entries=10000, max_unpacked_size=1 << 30), dest)
    print(json.dumps({"outcome": "written"}))
except DiskFull as refusal:
    print(json.dumps({"outcome": "disk full", "message": refusal.message}))
"""


def test_a_full_disk_met_by_the_second_process_is_disk_full(tmp_path):
    """A real full file system (a 16 MiB tmpfs in a mount namespace of the test's own): the first half of the
    files is small and fits, the second half, written by the second process, does not."""
    count = 2 * SECOND_PROCESS_MIN_FILES
    members = [(f"small/f{index:04d}", b"s" * 10) for index in range(count // 2)]
    members += [(f"large/f{index:04d}", bytes(64 * 1024)) for index in range(count // 2, count)]
    zip_path = write_members(tmp_path / "p.zip", members)
    mounted = tmp_path / "full"
    mounted.mkdir()
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"', str(mounted),
               sys.executable, "-c", FULL_DISK_CHILD, str(zip_path), str(mounted / "dest")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["outcome"] == "disk full"
    assert outcome["message"].startswith('disk full while unpacking "large/f')
    assert unpackers_running() == []


def test_other_os_errors_propagate(tmp_path, monkeypatch):
    zip_path = write_members(tmp_path / "p.zip", BASE)
    entries = inspect(zip_path, **LIMITS)
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(unpack, "os", FailingWrites(errno.EIO))
    with pytest.raises(OSError) as failure:
        extract(zip_path, entries, dest)
    assert failure.value.errno == errno.EIO and not isinstance(failure.value, ArchiveRejected)


# --- read_member ---------------------------------------------------------------------------


def test_read_member_returns_the_bytes(tmp_path):
    zip_path = make_zip(tmp_path / "p.zip", {"random.json": '{"about": {}}', "docs/": ""})
    assert read_member(zip_path, inspect(zip_path, **LIMITS), "random.json", max_size=13) == b'{"about": {}}'


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("random.json", 'entry "random.json" is 13 bytes, more than the limit of 12'),
        ("missing.json", 'entry "missing.json" is not in the archive'),
        ("docs/", 'entry "docs/" is a folder'),
    ],
)
def test_read_member_refuses(name, expect, tmp_path):
    zip_path = make_zip(tmp_path / "p.zip", {"random.json": '{"about": {}}', "docs/": ""})
    with pytest.raises(ArchiveRejected, match=f"^invalid zip file: {expect}$"):
        read_member(zip_path, inspect(zip_path, **LIMITS), name, max_size=12)


def test_read_member_refuses_a_bad_crc_and_a_zip_cut_short_since_it_was_inspected(tmp_path):
    zip_path = make_zip(tmp_path / "p.zip", {"random.json": '{"about": {}}'})
    patch_entry(zip_path, "random.json", crc=lambda c: c ^ 1)
    with pytest.raises(ArchiveRejected, match='^invalid zip file: entry "random.json" is corrupt: Bad CRC-32'):
        read_member(zip_path, inspect(zip_path, **LIMITS), "random.json", max_size=100)
    entries = inspect(make_zip(zip_path, {"random.json": '{"about": {}}'}), **LIMITS)
    zip_path.write_bytes(b"not a zip")
    with pytest.raises(ArchiveRejected, match='^invalid zip file: entry "random.json" is corrupt: the archive ends'):
        read_member(zip_path, entries, "random.json", max_size=100)


def test_read_member_refuses_member_data_that_does_not_inflate(tmp_path):
    zip_path, entries = accepted_then_patched(tmp_path, lambda p: overwrite_data(p, "liar.bin", b"\xff" * 64))
    with pytest.raises(ArchiveRejected, match='^invalid zip file: entry "liar.bin" is corrupt: '):
        read_member(zip_path, entries, "liar.bin", max_size=20_000)


def test_read_member_refuses_an_entry_that_inspect_did_not_return(tmp_path):
    zip_path = make_zip(tmp_path / "p.zip", {"random.json": '{"about": {}}'})
    made = [Entry(name="random.json", is_dir=False, size=13, executable=False)]
    with pytest.raises(ArchiveRejected, match='^invalid zip file: entry "random.json" is not in the archive$'):
        read_member(zip_path, made, "random.json", max_size=100)


# --- properties ----------------------------------------------------------------------------

HOSTILE_SEGMENTS = ["..", ".", "", "C:", "c:", "\x00", "\\", "a\\b", "\n", "\x7f", "\x85", "x" * 256]
ODD_SEGMENTS = ["\u202e", "é", "e\u0301", "É", "\u212a", " ", "~", "etc", "Random@v1.0.0.so", "random.yaml",
                "..a", ".hidden", "a:b", "\u2026", "\ufeff", "CON", "nul"]
SEGMENTS = st.one_of(
    st.sampled_from(HOSTILE_SEGMENTS),
    st.sampled_from(ODD_SEGMENTS),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=8),  # HOSTILE has controls
    st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8),
)
NAMES = st.builds(
    lambda lead, segments, trail: lead + "/".join(segments) + trail,
    st.sampled_from(["", "", "", "", "", "/", "//", "C:", "\\", "./"]),
    st.lists(SEGMENTS, min_size=1, max_size=4),
    st.sampled_from(["", "", "/"]),
)


def check_extracts_only_inside(zip_path: Path, scratch: Path, *, data_may_lie: bool = False) -> None:
    """inspect refuses with ArchiveRejected or accepts; an accepted archive unpacks only under dest.

    With data_may_lie, extract may also refuse a member whose data does not match its header.
    """
    try:
        entries = inspect(zip_path, **LIMITS)
    except ArchiveRejected as refusal:
        assert refusal.message.startswith(("invalid zip file: ", "zip: not a valid zip file"))
        event("refused by inspect")
        return
    for entry in entries:
        segments = entry.name.split("/")
        assert not entry.name.startswith("/") and "\\" not in entry.name
        assert not {"", ".", ".."} & set(segments)
        assert not any(unicodedata.category(c) == "Cc" for c in entry.name)
    dest = scratch / "dest"
    dest.mkdir()
    try:
        extract(zip_path, entries, dest)
        completed = True
    except ArchiveRejected as refusal:
        if not data_may_lie:
            raise
        assert refusal.message.startswith("invalid zip file: entry ")
        completed = False
    event("extracted" if completed else "refused by extract")
    root = os.path.realpath(dest)
    for folder, folders, files in os.walk(dest):
        for name in folders + files:
            path = os.path.join(folder, name)
            assert not os.path.islink(path)
            assert os.path.commonpath([root, os.path.realpath(path)]) == root
    assert sorted(os.listdir(scratch)) == ["dest", "p.zip"]
    if completed:
        written = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
        assert written == {e.name for e in entries if not e.is_dir}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(NAMES, min_size=1, max_size=2))
def test_any_name_is_refused_or_extracted_inside(names):
    with tempfile.TemporaryDirectory() as scratch:
        members = [*as_raw(BASE), *((name.encode(), b"" if name.endswith("/") else b"payload") for name in names)]
        zip_path = raw_zip(Path(scratch) / "p.zip", members)
        check_extracts_only_inside(zip_path, Path(scratch))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.binary(max_size=24), utf8=st.booleans())
def test_any_name_bytes_are_refused_or_extracted_inside(name, utf8):
    with tempfile.TemporaryDirectory() as scratch:
        zip_path = raw_zip(Path(scratch) / "p.zip", [*as_raw(BASE), (name, b"payload")], utf8=utf8)
        check_extracts_only_inside(zip_path, Path(scratch))


@pytest.fixture(scope="module")
def sound_zip_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("sound") / "p.zip"
    return write_members(path, [*BASE, ("docs/", ""), ("bin/tool", noise(300))]).read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_bytes_only_ever_raise_archive_rejected(data, sound_zip_bytes):
    """Overwrite a few bytes anywhere: inspect and extract refuse cleanly or unpack inside dest."""
    corrupted = bytearray(sound_zip_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as scratch:
        zip_path = Path(scratch) / "p.zip"
        zip_path.write_bytes(bytes(corrupted))
        check_extracts_only_inside(zip_path, Path(scratch), data_may_lie=True)
