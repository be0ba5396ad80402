"""The attack catalogue (shared/reference/security-catalogue.md, section 8), black-box through the API.

Each test names its catalogue case (``c17`` is case 17). Every refusal goes through one check,
`Attack.refused`: the status and the JSON envelope, then *nothing written* -- the home exactly as before
(files, folders, modes, no staging debris), the registry's dump unchanged, the canary tree outside the
home untouched (traversal payloads aim at it), and no process left alive that carries an install marker
from this home. Every archive attack also has its control: the same package without the attack
installs, so the refusal was for the attack and not for something else.

Status codes follow SPEC.md: every rejected request or artifact is 400 (the catalogue's 409, 415, 422,
502 and 504 among them), unknown plugins 404, a refused Host/Origin/client 403, a body too large 413.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import requests
from conftest import REAL_GETADDRINFO, FileServer, Gunicorn, loopback_only_resolver, make_zip, registry_dump
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuiper_plugins.errors import InvalidRequest
from kuiper_plugins.install import fetch, packages
from kuiper_plugins.install.scripts import MARKER_ENV

SO = b"\x7fELF not really a shared object"
YAML = b"default:\n  interval: 1000\n"
MiB = 1024 * 1024


# ============================================================================ nothing written

# Not compared: the registry's files (compared by their dump instead) and the per-plugin lock files, which
# are created on first use of a name and kept (flock needs a file; an empty one says nothing).
# The registry and eKuiper's store (compared as rows elsewhere); lock files are compared: none may remain.
# The progress file (GET /operations) is bookkeeping every write request adds to, a refused one too, as the audit.
UNCOMPARED = ("data/kuiper-plugins.db", "data/sqliteKV.db", "data/checkpoint.db", "data/.kuiper-plugins/progress.db")


def tree_state(root: Path, uncompared: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every entry under root, links never followed: type, mode, and size and digest of regular files.

    FIFOs, sockets and devices are recorded by type and never opened (reading a FIFO would block).
    """
    state: dict[str, tuple] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if relative.startswith(uncompared):
                continue
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                state[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                state[relative] = ("dir", mode)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    state[relative] = ("file", info.st_size, hashlib.file_digest(f, "sha256").hexdigest(), mode)
            else:
                state[relative] = ("special", stat.S_IFMT(info.st_mode), mode)
    return state


def home_state(home: Path) -> tuple[dict, list[str]]:
    return tree_state(home, UNCOMPARED), registry_dump(home)


def marked_processes(home: Path) -> list[int]:
    """Live processes carrying the install marker whose scrubbed environment points into `home`.

    install.sh gets HOME and TMPDIR inside the operation's staging folder, and every child inherits
    them with the marker, even one that left the session (setsid) and was re-parented; a marked child
    of the test process counts too, whatever its HOME says.
    """
    home_prefix = os.fsencode(str(home))
    own = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path("/proc", entry, "environ").read_bytes().split(b"\0")
            parent = int(Path("/proc", entry, "stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread
        marked = any(item.startswith(MARKER_ENV.encode() + b"=") for item in environ)
        ours = parent == own or any(
            item.startswith((b"HOME=", b"TMPDIR=")) and item.split(b"=", 1)[1].startswith(home_prefix)
            for item in environ
        )
        if marked and ours:
            found.append(int(entry))
    return found


@pytest.fixture
def canary(tmp_path) -> Path:
    """A tree outside the home where traversal payloads aim; it must never change."""
    root = tmp_path / "canary"
    (root / "sub").mkdir(parents=True)
    (root / "keep.txt").write_text("do not touch\n")
    (root / "sub" / "keep.yaml").write_text("a: 1\n")
    make_zip(root / "outside.zip", {"Random.so": SO, "random.yaml": YAML})
    return root


class Attack:
    """The service under attack, and the one check every refusal must pass."""

    def __init__(self, make_service, home: Path, canary: Path, file_server: FileServer):
        self._make_service = make_service
        self.home = home
        self.canary = canary
        self.file_server = file_server
        self.service = None
        self._before = None
        self._in_flight = False

    def start(self, **overrides):
        """Build the service (again, on the same home: a restart) with these settings."""
        self.service = self._make_service(**overrides)
        return self.service

    @property
    def client(self):
        return self.service.client

    def arm(self, *, in_flight: bool = False) -> None:
        """Take the snapshot refusals are compared with.

        `in_flight`: another operation is running (and holds its staging folder and registry row) meanwhile;
        the refusal must leave even those exactly as they were.
        """
        self._in_flight = in_flight
        self._before = (home_state(self.home), tree_state(self.canary))

    def refused(self, response, status: int = 400, *fragments: str) -> str:
        """Assert a refusal with `status` in the JSON envelope, naming `fragments`; then nothing written."""
        assert response.status_code == status, (response.status_code, response.data[:500])
        assert response.mimetype == "application/json", response.data[:200]
        body = json.loads(response.data)
        assert set(body) == {"error", "message"}, body
        assert body["error"] == (1002 if status == 404 else 1000)
        for fragment in fragments:
            assert fragment in body["message"], (fragment, body["message"])
        self.assert_nothing_written()
        return body["message"]

    def assert_nothing_written(self) -> None:
        assert self._before is not None, "arm() before the attack"
        (files_before, dump_before), canary_before = self._before
        files_after, dump_after = home_state(self.home)
        added = sorted(set(files_after) - set(files_before))
        removed = sorted(set(files_before) - set(files_after))
        changed = sorted(k for k in set(files_before) & set(files_after) if files_before[k] != files_after[k])
        assert (added, removed, changed) == ([], [], []), f"home changed: {added=} {removed=} {changed=}"
        assert dump_after == dump_before, "the registry changed"
        if not self._in_flight:
            assert list(self.service.layout.staging.iterdir()) == [], "staging debris"
        assert tree_state(self.canary) == canary_before, "the canary tree outside the home changed"
        assert marked_processes(self.home) == [], "install.sh processes survived"

    def serve(self, data: bytes, name: str = "p.zip") -> str:
        (self.file_server.root / name).write_bytes(data)
        return self.file_server.url(name)

    def install(self, url: str, name: str = "random", plugin_type: str = "sources", **extra):
        return self.service.post(plugin_type, {"name": name, "file": url, **extra})


@pytest.fixture
def attack(make_service, home, canary, file_server):
    """An Attack on a fresh service (default settings, downloads allowed from the fixture server only)."""
    attack = Attack(make_service, home, canary, file_server)
    attack.start()
    yield attack
    survivors = marked_processes(home)
    for pid in survivors:  # never leave a stray behind, even when the test failed
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert survivors == [], "install.sh processes survived the test"


# ============================================================================ zips built byte by byte

LOCAL = struct.Struct("<4s5H3L2H")
CENTRAL = struct.Struct("<4s6H3L5H2L")
END = struct.Struct("<4s4H2LH")
UNIX_MADE_BY = (3 << 8) | 20
UTF8 = 0x800


@dataclass(frozen=True)
class Member:
    """One entry as it will be written; every field the attacks lie about can be set."""

    name: str | bytes
    data: bytes = b""
    method: int = 8
    mode: int | None = None  # Unix mode; default: a 0644 file, or a 0755 folder for names ending in "/"
    flags: int = 0
    crc: int | None = None  # declared CRC-32, default the true one
    size: int | None = None  # declared unpacked size, default the true one
    local_name: bytes | None = None  # name in the local header, default the central one


def _name_bytes(member: Member) -> tuple[bytes, int]:
    if isinstance(member.name, bytes):
        return member.name, member.flags
    raw = member.name.encode("utf-8")
    return raw, member.flags | (0 if member.name.isascii() else UTF8)


def _packed(member: Member) -> bytes:
    if member.method == 8:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return packer.compress(member.data) + packer.flush()
    return member.data  # stored, or a method nobody here can unpack: the bytes as they are


def local_record(member: Member) -> bytes:
    name, flags = _name_bytes(member)
    local_name = member.local_name if member.local_name is not None else name
    packed = _packed(member)
    crc = zlib.crc32(member.data) if member.crc is None else member.crc
    size = len(member.data) if member.size is None else member.size
    return LOCAL.pack(b"PK\x03\x04", 20, flags, member.method, 0, 0x5821, crc, len(packed), size,
                      len(local_name), 0) + local_name + packed


def central_record(member: Member, offset: int) -> bytes:
    name, flags = _name_bytes(member)
    is_dir = name.endswith(b"/")
    mode = member.mode if member.mode is not None else (0o40755 if is_dir else 0o100644)
    crc = zlib.crc32(member.data) if member.crc is None else member.crc
    size = len(member.data) if member.size is None else member.size
    return CENTRAL.pack(b"PK\x01\x02", UNIX_MADE_BY, 20, flags, member.method, 0, 0x5821, crc,
                        len(_packed(member)), size, len(name), 0, 0, 0, 0,
                        (mode << 16) | (0x10 if is_dir else 0), offset) + name


def end_record(count: int, directory_size: int, directory_offset: int) -> bytes:
    return END.pack(b"PK\x05\x06", 0, 0, count, count, directory_size, directory_offset, 0)


def build_zip(members: list[Member], *, prefix: bytes = b"", offsets_include_prefix: bool = True) -> bytes:
    """A zip of `members`; `prefix` is put before it, counted in the offsets or not."""
    body, directory = bytearray(prefix), bytearray()
    shift = 0 if offsets_include_prefix else len(prefix)
    for member in members:
        directory += central_record(member, len(body) - shift)
        body += local_record(member)
    return bytes(body + directory + end_record(len(members), len(directory), len(body) - shift))


BASE = [Member("Random@v1.0.0.so", SO), Member("random.yaml", YAML)]


# ============================================================================ archive attacks (c31-c45)


@dataclass
class Aim:
    """Where traversal payloads point: the canary tree, from inside the home's staging folder."""

    canary: Path
    depth_from_staging: int = 6  # unpacked/<op>/staging/.kuiper-plugins/data/home -> tmp_path

    @property
    def relative(self) -> str:
        return "../" * self.depth_from_staging + "canary/evil"


@dataclass
class ArchiveCase:
    id: str
    hostile: Callable[[Aim], bytes]
    expect: str  # a fragment of the refusal's message
    control: Callable[[Aim], bytes] = field(default=lambda aim: build_zip(BASE))
    settings: dict = field(default_factory=dict)


def with_extra(*members: Member) -> Callable[[Aim], bytes]:
    return lambda aim: build_zip(BASE + list(members))


def with_aimed(make: Callable[[Aim], list[Member]]) -> Callable[[Aim], bytes]:
    return lambda aim: build_zip(BASE + make(aim))


def changed_base(index: int, **changes) -> Callable[[Aim], bytes]:
    def build(aim: Aim) -> bytes:
        members = list(BASE)
        members[index] = replace(members[index], **changes)
        return build_zip(members)

    return build


def _quoted_overlap(aim: Aim) -> bytes:
    """Fifield's quoted overlap: a stored entry whose data is another entry's local header and data."""
    inner = Member("b.txt", b"quoted payload", method=0)
    outer = Member("a.bin", local_record(inner), method=0)
    body = bytearray()
    directory = bytearray()
    for member in BASE:
        directory += central_record(member, len(body))
        body += local_record(member)
    outer_offset = len(body)
    directory += central_record(outer, outer_offset)
    body += local_record(outer)
    inner_offset = outer_offset + LOCAL.size + len(b"a.bin")
    directory += central_record(inner, inner_offset)
    return bytes(body + directory + end_record(len(BASE) + 2, len(directory), len(body)))


def _shared_local_header(aim: Aim) -> bytes:
    """Two central entries pointing at one local header (the second with its own name)."""
    body = bytearray()
    directory = bytearray()
    offsets = []
    for member in BASE:
        offsets.append(len(body))
        directory += central_record(member, len(body))
        body += local_record(member)
    directory += central_record(replace(BASE[1], name="copy.yaml"), offsets[1])
    return bytes(body + directory + end_record(len(BASE) + 1, len(directory), len(body)))


def _lying_central_size(aim: Aim) -> bytes:
    """random.yaml declares 4 bytes in the directory (and in its local header) but inflates to more."""
    return build_zip([BASE[0], replace(BASE[1], size=4, crc=zlib.crc32(YAML[:4]))])


def _over_declared(aim: Aim) -> bytes:
    return build_zip([BASE[0], replace(BASE[1], size=len(YAML) + 100)])


def randomish(size: int) -> bytes:
    """Bytes deflate can hardly shrink, the same on every run."""
    import random

    return random.Random(7).randbytes(size)

ARCHIVE_CASES = [
    # c31: not a zip, or not a whole one
    ArchiveCase("c31-random-bytes", lambda aim: bytes(range(256)) * 40, "zip: not a valid zip file"),
    ArchiveCase("c31-empty-file", lambda aim: b"", "zip: not a valid zip file"),
    ArchiveCase("c31-html-page", lambda aim: b"<!doctype html><html><body>Not Found</body></html>",
                "zip: not a valid zip file"),
    ArchiveCase("c31-first-half", lambda aim: build_zip(BASE)[: len(build_zip(BASE)) // 2],
                "zip: not a valid zip file"),
    ArchiveCase("c31-truncated-directory", lambda aim: build_zip(BASE)[:-30], "zip: not a valid zip file"),
    ArchiveCase("c31-prepended-script",
                lambda aim: build_zip(BASE, prefix=b"#!/bin/sh\ntouch /tmp/x\nexit 0\n", offsets_include_prefix=False),
                "data before the first entry"),
    ArchiveCase("c31-prepended-script-offsets-fixed",
                lambda aim: build_zip(BASE, prefix=b"#!/bin/sh\ntouch /tmp/x\nexit 0\n"),
                "data before the first entry"),
    ArchiveCase("c31-data-after-the-end", lambda aim: build_zip(BASE) + b"trailing", "invalid zip file"),
    # c32: names that leave the folder -- the whole archive is refused, nothing is stripped or skipped
    ArchiveCase("c32-dotdot", with_extra(Member("../evil", b"x")), "leaves the plugin folder"),
    ArchiveCase("c32-inner-dotdot", with_extra(Member("a/../../evil", b"x")), "leaves the plugin folder"),
    ArchiveCase("c32-dotdot-to-canary", with_aimed(lambda aim: [Member(aim.relative, b"x")]), "leaves the plugin"),
    ArchiveCase("c32-dotdot-in-etc", with_aimed(lambda aim: [Member("etc/" + aim.relative, b"x")]), "leaves the"),
    ArchiveCase("c32-absolute", with_aimed(lambda aim: [Member(str(aim.canary / "evil"), b"x")]), "absolute path"),
    ArchiveCase("c32-drive-slash", with_extra(Member("C:/evil", b"x")), "drive letter"),
    ArchiveCase("c32-drive-backslash", with_extra(Member("C:\\evil", b"x")), "backslash"),
    ArchiveCase("c32-unc", with_extra(Member("\\\\host\\share\\evil", b"x")), "backslash"),
    ArchiveCase("c32-backslash-dotdot", with_extra(Member("..\\..\\evil", b"x")), "backslash"),
    ArchiveCase("c32-dot-segment", with_extra(Member("./evil", b"x")), '"." path segment'),
    ArchiveCase("c32-empty-segment", with_extra(Member("a//evil", b"x")), "empty"),
    ArchiveCase("c32-dotdot-in-so-version", with_extra(Member("Random@../../evil.so", SO)), "leaves the plugin"),
    # c33: links, devices and other non-files in the external attributes
    ArchiveCase("c33-symlink-to-canary",
                with_aimed(lambda aim: [Member("link", str(aim.canary).encode(), mode=0o120777)]), "symbolic link"),
    ArchiveCase("c33-symlinked-etc-folder",
                with_aimed(lambda aim: [Member("etc", str(aim.canary).encode(), mode=0o120777),
                                        Member("etc/evil.yaml", b"x")]), "symbolic link"),
    ArchiveCase("c33-symlinked-so", changed_base(0, mode=0o120777), "symbolic link"),
    ArchiveCase("c33-char-device", with_extra(Member("null", mode=0o20666)), "character device"),
    ArchiveCase("c33-block-device", with_extra(Member("sda", mode=0o60660)), "block device"),
    ArchiveCase("c33-fifo", with_extra(Member("pipe", mode=0o10644)), "FIFO"),
    ArchiveCase("c33-socket", with_extra(Member("sock", mode=0o140755)), "socket"),
    ArchiveCase("c33-unknown-type", with_extra(Member("odd", mode=0o70644)), "unknown Unix file type"),
    ArchiveCase("c33-folder-mode-on-a-file-name", with_extra(Member("etc", mode=0o40755)), "marked as a folder"),
    # c35: duplicates and names equal after case folding or Unicode normalisation
    ArchiveCase("c35-duplicate", with_extra(Member("random.yaml", b"evil: 1\n")), "appears twice"),
    ArchiveCase("c35-case-so", with_extra(Member("random@v1.0.0.so", SO)), "collide"),
    ArchiveCase("c35-nfc-nfd", with_extra(Member("caf\u00e9.txt", b"x"), Member("cafe\u0301.txt", b"y")), "collide"),
    ArchiveCase("c35-install-sh-case", with_extra(Member("install.sh", b"exit 0\n"), Member("INSTALL.SH", b"x")),
                "collide"),
    ArchiveCase("c35-file-and-folder-same-name", with_extra(Member("data", b"x"), Member("data/")), "collide"),
    # c36: names that mean different things to different readers
    ArchiveCase("c36-nul-in-name", with_extra(Member(b"random.so\x00.txt", b"x")), "control character"),
    ArchiveCase("c36-local-name-differs", changed_base(1, local_name=b"random.yml"), "different name"),
    ArchiveCase("c36-newline-in-name", with_extra(Member("evil\n.txt", b"x")), "control character"),
    ArchiveCase("c36-bad-utf8-name", with_extra(Member(b"caf\xc3.txt", b"x", flags=UTF8)), "not valid UTF-8"),
    # c37: a file used as a folder
    ArchiveCase("c37-file-then-child", with_extra(Member("a", b"x"), Member("a/b", b"y")), "which is a file"),
    ArchiveCase("c37-etc-file-and-folder", with_extra(Member("etc", b"x"), Member("etc/a.yaml", b"y")), "a file"),
    # c38: names too long or too deep for the file system
    ArchiveCase("c38-300-char-segment", with_extra(Member("x" * 300, b"x")), "longer than 255"),
    ArchiveCase("c38-2000-nested-folders", with_extra(Member("d/" * 2000 + "f", b"x")), "longer than 1024"),
    ArchiveCase("c38-40-levels", with_extra(Member("d/" * 40 + "f", b"x")), "nested deeper"),
    # c39: sizes over the caps, declared, before anything is written
    ArchiveCase("c39-sum-over-cap", lambda aim: build_zip(BASE + [Member("blob.bin", randomish(MiB + MiB // 2))]),
                "more than the limit",
                settings={"max_unpacked_size": MiB}),
    ArchiveCase("c39-ratio-bomb", lambda aim: build_zip(BASE + [Member("zeros.bin", bytes(50 * MiB))]),
                "compression ratio"),
    ArchiveCase("c39-declared-huge", with_extra(Member("lie.bin", b"x", method=0, size=3 * 1024**3)), "stored but"),
    ArchiveCase("c39-nested-zip-over-cap",
                lambda aim: build_zip(BASE + [Member("inner.zip", build_zip(
                    [Member("blob.bin", randomish(MiB + MiB // 2), method=0)]), method=0)]),
                "more than the limit", settings={"max_unpacked_size": MiB}),
    # c40: data that lies about its size or checksum, found while unpacking
    ArchiveCase("c40-under-declared-size", _lying_central_size, "entry \"random.yaml\""),
    ArchiveCase("c40-over-declared-size", _over_declared, "fewer than"),
    ArchiveCase("c40-bad-crc", changed_base(1, crc=0xDEADBEEF), "corrupt"),
    ArchiveCase("c40-bad-crc-stored", changed_base(1, crc=0xDEADBEEF, method=0), "corrupt"),
    # c41: entries sharing bytes
    ArchiveCase("c41-quoted-overlap", _quoted_overlap, "overlap"),
    ArchiveCase("c41-shared-local-header", _shared_local_header, "different name"),
    # c42 (the small form; the 200 000-entry archive has its own timed test)
    ArchiveCase("c42-more-entries-than-allowed", with_extra(*[Member(f"f{i}", b"") for i in range(20)]),
                "more than the limit of 10", settings={"max_archive_entries": 10}),
    # c43: encryption and compression methods other than stored and deflate
    ArchiveCase("c43-encrypted", with_extra(Member("secret.txt", b"x" * 12, method=0, flags=0x1)), "is encrypted"),
    ArchiveCase("c43-strong-encryption", with_extra(Member("secret.txt", b"x", method=0, flags=0x41)),
                "strong encryption"),
    ArchiveCase("c43-deflate64", with_extra(Member("d64.bin", b"x", method=9)), "compression method 9"),
    ArchiveCase("c43-bzip2", with_extra(Member("bz.bin", b"x", method=12)), "compression method 12"),
    ArchiveCase("c43-lzma", with_extra(Member("lz.bin", b"x", method=14)), "compression method 14"),
    ArchiveCase("c43-aes", with_extra(Member("aes.bin", b"x", method=99, flags=0x1)), "is encrypted"),
    ArchiveCase("c43-aes-unflagged", with_extra(Member("aes.bin", b"x", method=99)), "compression method 99"),
    # c44: the package rules: which binary is the plugin
    ArchiveCase("c44-two-binaries", with_extra(Member("random@v2.so", SO)), "more than one binary"),
    ArchiveCase("c44-binary-for-another-name", lambda aim: build_zip([Member("Other.so", SO), BASE[1]]),
                "no random.so or Random.so"),
    ArchiveCase("c44-version-with-slash", lambda aim: build_zip([Member("Random@v1/x.so", SO), BASE[1]]),
                "no random.so or Random.so"),
    ArchiveCase("c44-version-with-dotdot", lambda aim: build_zip([Member("Random@v1..0.so", SO), BASE[1]]),
                "invalid version"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ARCHIVE_CASES])
def test_hostile_archive_is_refused_whole_and_without_the_attack_installs(case, attack, canary):
    """The hostile archive: 400 naming the attack, nothing written. Then, on the same service, the same
    package without the attack: 201. The refusal was for the attack, and it left the service able to work."""
    if case.settings:
        attack.start(**case.settings)
    attack.arm()
    message = attack.refused(attack.install(attack.serve(case.hostile(Aim(canary)), "hostile.zip")), 400, case.expect)
    assert message.startswith("sources plugins create command error: ")
    response = attack.install(attack.serve(case.control(Aim(canary)), "control.zip"))
    assert response.status_code == 201, response.data
    assert attack.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "1.0.0"}
    assert tree_state(canary) == attack._before[1]


def test_archive_case_ids_are_unique():
    ids = [c.id for c in ARCHIVE_CASES]
    assert len(ids) == len(set(ids))


def test_c42_200000_empty_entries_are_refused_from_the_end_record_quickly(attack):
    """About 17 MiB of directory; the count is read from the end record before any entry is parsed."""
    count = 200_000
    body, directory = bytearray(), bytearray()
    for index in range(count):
        name = b"e%06d" % index
        directory += CENTRAL.pack(b"PK\x01\x02", UNIX_MADE_BY, 20, 0, 0, 0, 0x5821, 0, 0, 0, len(name), 0, 0, 0, 0,
                                  0o100644 << 16, len(body)) + name
        body += LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0x5821, 0, 0, 0, len(name), 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory), len(body), 0)
    # More than 65535 entries needs the ZIP64 end record, as real tools write it.
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), len(body))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body) + len(directory), 1)
    url = attack.serve(bytes(body + directory + zip64_end + locator + end))
    attack.arm()
    started = time.monotonic()
    response = attack.install(url)
    elapsed = time.monotonic() - started
    attack.refused(response, 400, "200000 entries, more than the limit of 10000")
    assert elapsed < 5, f"took {elapsed:.2f}s (a 17 MiB download, then the refusal)"


def test_c34_a_planted_link_in_the_config_folder_is_never_followed(attack, canary):
    """etc/sources/random -> the canary: the package's etc/ folder would be written through it."""
    (attack.home / "etc/sources/random").symlink_to(canary, target_is_directory=True)
    url = attack.serve(build_zip(BASE + [Member("etc/evil.yaml", b"evil: 1\n")]))
    attack.arm()
    # Not recorded as the plugin's, so never replaced, and never written through either.
    attack.refused(attack.install(url), 400, "etc/sources/random already exists and was not installed")
    (attack.home / "etc/sources/random").unlink()
    assert attack.install(url).status_code == 201
    assert (attack.home / "etc/sources/random/evil.yaml").read_bytes() == b"evil: 1\n"


def test_c34_a_planted_link_as_the_source_yaml_is_kept_not_written_through(attack, canary):
    """A user's config file is kept on reinstall (SPEC); kept as a link it is still never written through."""
    for folder in ("etc", "data"):
        (attack.home / folder / "sources/random.yaml").symlink_to(canary / "keep.txt")
    url = attack.serve(build_zip(BASE))
    canary_before = tree_state(canary)
    assert attack.install(url).status_code == 201
    assert tree_state(canary) == canary_before
    assert (canary / "keep.txt").read_text() == "do not touch\n"


def test_c45_a_nested_zip_is_not_unpacked(attack):
    inner = build_zip([Member("Evil.so", SO), Member("evil.yaml", YAML)])
    url = attack.serve(build_zip(BASE + [Member("inner.zip", inner)]))
    assert attack.install(url).status_code == 201
    names = {p.name for p in attack.home.rglob("*")}
    assert not {"inner.zip", "Evil.so", "evil.yaml"} & names
    assert attack.client.get("/plugins/sources").get_json() == ["random"]


# ---------------------------------------------------------------------------- portable descriptors


def portable_zip(descriptor: dict | bytes, extra: list[Member] = ()) -> bytes:
    raw = descriptor if isinstance(descriptor, bytes) else json.dumps(descriptor).encode()
    return build_zip([Member("mirror.json", raw), Member("mirror", b"#!/bin/sh\nexit 0\n"),
                      Member("sources/random.yaml", YAML), *extra])


GOOD_DESCRIPTOR = {"version": "v1.0.0", "language": "go", "executable": "mirror", "sources": ["random"]}


@pytest.mark.parametrize("changes, expect", [
    ({"executable": "../../../canary/evil"}, "must be a file inside the plugin folder"),
    ({"executable": "/bin/sh"}, "must be a file inside the plugin folder"),
    ({"executable": "sources/random.yaml"}, "must be a file inside the plugin folder"),
    ({"sources": ["../x"]}, "invalid sources name"),
    ({"sources": ["random", "random"]}, "lists a name twice"),
    ({"functions": ["caf\u00e9"]}, "invalid functions name"),
    ({"name": "other"}, "expect name 'mirror'"),
    ({"language": "sh"}, "not supported"),
    ({"version": 1}, "version must be a string"),
    ({"version": "\ud800"}, "invalid json file"),
    ({"env": "\udfff"}, "invalid json file"),
], ids=["exe-dotdot", "exe-absolute", "exe-in-sources", "source-dotdot", "source-twice", "function-unicode",
        "other-name", "language", "version-type", "version-surrogate", "env-surrogate"])
def test_hostile_portable_descriptor_is_refused(attack, changes, expect):
    url = attack.serve(portable_zip({**GOOD_DESCRIPTOR, **changes}))
    attack.arm()
    attack.refused(attack.install(url, name="mirror", plugin_type="portables"), 400, expect)


@pytest.mark.parametrize("raw, expect", [
    (b"{" * 100000 + b"}" * 100000, "invalid json file"),
    (json.dumps(GOOD_DESCRIPTOR).replace('"v1.0.0"', "NaN").encode(), "version must be a string"),
    (b"\xff\xfe", "invalid json file"),
    (b"[]", "expected an object"),
    (b" " * (1024 * 1024 + 1), "more than the limit"),
], ids=["deep", "nan", "not-utf8", "array", "over-1MiB"])
def test_hostile_portable_descriptor_bytes_are_refused(attack, raw, expect):
    url = attack.serve(portable_zip(raw))
    attack.arm()
    attack.refused(attack.install(url, name="mirror", plugin_type="portables"), 400, expect)


def test_the_good_portable_descriptor_installs(attack):
    url = attack.serve(portable_zip(GOOD_DESCRIPTOR))
    assert attack.install(url, name="mirror", plugin_type="portables").status_code == 201
    assert attack.client.get("/plugins/portables/mirror").status_code == 200


# ============================================================================ HTTP and JSON (c1-c9)


MALFORMED_BODIES = [b'{"name":', b"null", b"[]", b'"x"', b"42", b"true", b"", b"   ", b"{}", b"\xff\xfe{}",
                    b'{"name": "random"} x', b'{"name": "random",}', b"{'name': 'random'}"]


@pytest.mark.parametrize("path", ["/plugins/sources", "/plugins/portables", "/plugins/functions/echo/register",
                                  "/config/uploads"])
def test_c1_malformed_or_non_object_bodies(attack, path):
    attack.arm()
    for raw in MALFORMED_BODIES:
        response = attack.client.post(path, data=raw, content_type="application/json")
        attack.refused(response, 404 if response.status_code == 404 else 400)
        if response.status_code == 404:
            assert path.endswith("/register"), raw  # echo is not installed: 404 before or after the body


WRONG_TYPES = [
    {"name": 42, "file": "http://a.example/a.zip"},
    {"name": [], "file": "http://a.example/a.zip"},
    {"name": None, "file": "http://a.example/a.zip"},
    {"name": {"a": 1}, "file": "http://a.example/a.zip"},
    {"name": "random", "file": ["u"]},
    {"name": "random", "file": None},
    {"name": "random", "file": 7},
    {"name": "random", "file": "http://a.example/a.zip", "shellParas": "a b"},
    {"name": "random", "file": "http://a.example/a.zip", "shellParas": [1]},
    {"name": "random", "file": "http://a.example/a.zip", "shellParas": [None]},
    {"name": "random", "file": "http://a.example/a.zip", "functions": {}},
    {"name": "random", "file": "http://a.example/a.zip", "functions": "random"},
    {"name": "random", "file": "http://a.example/a.zip", "sha256": 5},
    {"name": "random", "file": "http://a.example/a.zip", "sha256": "abc"},
]


def test_c3_wrong_types(attack):
    attack.arm()
    for body in WRONG_TYPES:
        attack.refused(attack.service.post("sources", body), 400)
    assert attack.file_server.requests == []


def test_c4_keys_differing_only_in_case_are_ambiguous(attack, file_server):
    url = attack.serve(build_zip(BASE))
    attack.arm()
    raw = json.dumps({"name": "random", "NAME": "other", "file": url}).encode()
    attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 400)


def test_c4_duplicate_keys_are_ambiguous(attack):
    """{"name": "a", "name": "b"}: a proxy may read the first, Python the last; refuse rather than guess."""
    url = attack.serve(build_zip(BASE))
    attack.arm()
    raw = b'{"name": "innocent", "name": "random", "file": "' + url.encode() + b'"}'
    attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 400)
    assert attack.file_server.requests == []


def test_c4_unknown_keys_are_ignored_as_ekuiper_does(attack):
    url = attack.serve(build_zip(BASE))
    response = attack.service.post("sources", {"name": "random", "file": url, "fiel": "x", "script": "rm -rf /"})
    assert response.status_code == 201


NESTED = b"[" * 30000 + b"]" * 30000


@pytest.mark.parametrize("raw", [
    NESTED,
    b'{"name": ' + NESTED + b"}",
    b'{"name": "random", "file": "x", "shellParas": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b"{" + b'"a":{' * 20000 + b"}" * 20001,
], ids=["array", "in-name", "in-shellParas", "objects"])
def test_c5_deep_nesting_is_a_400(attack, raw):
    assert len(raw) < MiB
    attack.arm()
    attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 400)


@pytest.mark.parametrize("size", [MiB + 1, 4 * MiB])
def test_c6_bodies_over_1_MiB_are_413_with_content_length(attack, size):
    raw = b'{"name": "random", "file": "http://a.example/a.zip"}'
    raw = raw[:-1] + b" " * (size - len(raw)) + b"}"
    assert len(raw) == size
    attack.arm()
    attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 413)


def test_c6_a_body_of_exactly_1_MiB_is_read(attack):
    raw = b'{"name": "random", "file": "http://a.example/a.zip", "pad": "' + b"a" * MiB + b'"}'
    raw = raw[: MiB - 2] + b'"}'
    assert len(raw) == MiB
    attack.arm()
    # Read and refused for what it says (a URL nobody can resolve), not for its size.
    attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 400,
                   "cannot resolve host")


@pytest.mark.parametrize("padding", ["inside-a-string", "trailing-blanks"])
def test_c6_chunked_bodies_over_1_MiB_are_413(attack, padding):
    """No Content-Length: the server must count while reading (wsgi.input_terminated, as gunicorn sets it).

    A body whose first MiB is a whole valid request must not pass either: it is over the limit.
    """
    url = attack.serve(build_zip(BASE))
    if padding == "inside-a-string":
        raw = b'{"name": "random", "file": "' + b"a" * (2 * MiB) + b'.zip"}'
    else:
        raw = json.dumps({"name": "random", "file": url}).encode() + b" " * (2 * MiB)
    attack.arm()
    response = attack.client.post("/plugins/sources", input_stream=io.BytesIO(raw), content_type="application/json",
                                  environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
                                  headers={"Transfer-Encoding": "chunked"})
    attack.refused(response, 413)
    assert attack.file_server.requests == []


@pytest.mark.parametrize("field_name", ["name", "file", "shellParas", "functions", "sha256", "unknown"])
def test_c7_surrogates_nan_infinity_huge_numbers(attack, field_name):
    url = attack.serve(build_zip(BASE))
    attack.arm()
    for value in ('"\\ud800"', '"a\\udfffb"', '"\\udc80\\ud800"', "NaN", "Infinity", "-Infinity",
                  "1" + "0" * 5000, "-" + "9" * 4301, "1e999999", "-1.5e400"):
        body = {"name": '"random"', "file": f'"{url}"'}
        body[field_name] = f"[{value}]" if field_name in ("shellParas", "functions") else value
        raw = ("{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}").encode()
        attack.refused(attack.client.post("/plugins/sources", data=raw, content_type="application/json"), 400)
    assert attack.file_server.requests == []


def test_c8_methods_a_path_does_not_take_are_405_with_allow(attack):
    attack.arm()
    for method in ("PATCH", "TRACE", "PROPFIND", "CONNECT"):
        for path in ("/plugins/sources", "/plugins/sources/random", "/plugins/udfs", "/ping"):
            response = attack.client.open(path, method=method)
            attack.refused(response, 405)
            assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize("name", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"'><svg>"])
def test_c9_markup_in_names_comes_back_as_json_never_html(attack, name):
    attack.arm()
    response = attack.service.post("sources", {"name": name, "file": "http://a.example/a.zip"})
    attack.refused(response, 400, "contains invalid characters")
    assert response.headers["Content-Type"] == "application/json"
    for path in ("/plugins/sources/%3Cscript%3E", "/plugins/udfs/%3Cscript%3E"):
        page = attack.client.get(path)
        attack.refused(page, 400)
        assert page.headers["Content-Type"] == "application/json"


# ============================================================================ names and path parameters (c10-c16)


BAD_NAMES = ["../../x", "a/b", "a\\b", ".", "..", "", " a", "a ", "x" * 251, "random\n", "\uff52andom", "caf\u00e9",
             "ran\u200bdom", "random\u202e", "ran\x00dom", "a.so", "random;rm -rf /", "$(id)", "\u0130"]


@pytest.mark.parametrize("plugin_type", ["sources", "sinks", "functions", "portables"])
def test_c10_c11_bad_names_in_bodies(attack, plugin_type):
    url = attack.serve(build_zip(BASE))
    attack.arm()
    for name in BAD_NAMES:
        attack.refused(attack.service.post(plugin_type, {"name": name, "file": url}), 400, "id ")
        attack.refused(attack.client.put(f"/plugins/{plugin_type}/random", json={"name": name, "file": url}), 400)
    assert attack.file_server.requests == []


def test_c12_a_name_differing_only_in_case_is_a_duplicate(attack):
    assert attack.install(attack.serve(build_zip(BASE), "random.zip")).status_code == 201
    other = build_zip([Member("Random@v2.0.0.so", b"other binary"), Member("Random.yaml", b"other: 1\n")])
    url = attack.serve(other, "Random.zip")
    attack.arm()
    attack.refused(attack.install(url, name="Random"), 400, "invalid name Random: duplicate")
    assert (attack.home / "plugins/sources/Random@v1.0.0.so").read_bytes() == SO


def test_c13_reserved_looking_names_stay_inside_their_own_paths(attack):
    """Not refused: the service's own folders live under data/.kuiper-plugins (a name cannot start with a dot),
    and there is no Windows device namespace here. A plugin named like them writes exactly its own files and
    nothing of the service's. eKuiper's built-in names are refused (test_builtin_names_are_refused)."""
    for name in ("staging", "locks", "incoming", "trash", "tmp", "temp", "con", "nul", "aux", "prn", "com1", "lpt1",
                 "kuiper-plugins", "uploads", "mgmt", "portable"):
        capitalised = name[0].upper() + name[1:]
        url = attack.serve(build_zip([Member(f"{capitalised}.so", SO), Member(f"{name}.yaml", YAML)]), f"{name}.zip")
        before = tree_state(attack.home, UNCOMPARED)
        assert attack.install(url, name=name).status_code == 201, name
        after = tree_state(attack.home, UNCOMPARED)
        assert set(after) - set(before) == {
            f"plugins/sources/{capitalised}.so", f"etc/sources/{name}.yaml", f"data/sources/{name}.yaml"}, name
        assert {k: v for k, v in after.items() if k in before} == before, name
        assert attack.client.delete(f"/plugins/sources/{name}").status_code == 200


@pytest.fixture
def installed(attack):
    """The attack's service with source plugin random installed."""
    assert attack.install(attack.serve(build_zip(BASE), "random.zip")).status_code == 201
    return attack


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_c14_hostile_path_names_never_500_and_delete_nothing(installed, method):
    attack = installed
    attack.arm()
    for path in ("%2e%2e", "..", "%2e", "a%00b", "a%2Fb", "..%2F..%2Fetc", "random%0A", "%EF%BD%92andom",
                 "random%E2%80%AE", "r%C3%A9", "%FF", "x" * 65, "%20random", "random%00", "RANDOM%0D%0A"):
        response = attack.client.open(f"/plugins/sources/{path}", method=method,
                                      json={"file": attack.file_server.url("random.zip")})
        attack.refused(response, 404 if response.status_code == 404 else 400)
    assert attack.client.get("/plugins/sources").get_json() == ["random"]


@pytest.mark.parametrize("path", ["/plugins/udfs/a%00b", "/plugins/functions/a%00b/register",
                                  "/plugins/functions/..%2F/register", "/plugins/udfs/%2e%2e"])
def test_c14_hostile_names_in_the_other_routes(installed, path):
    attack = installed
    attack.arm()
    method = "POST" if path.endswith("/register") else "GET"
    response = attack.client.open(path, method=method, json={"functions": ["a"]})
    attack.refused(response, 404 if response.status_code == 404 else 400)


def test_c15_put_with_another_name_in_the_body(installed):
    attack = installed
    other = attack.serve(build_zip([Member("B.so", SO), Member("b.yaml", YAML)]), "b.zip")
    attack.arm()
    response = attack.client.put("/plugins/sources/random", json={"name": "b", "file": other})
    attack.refused(response, 400, "does not match")
    assert attack.client.get("/plugins/sources").get_json() == ["random"]


@pytest.fixture
def function_plugin(attack):
    """Function plugins echo (functions echo, echo2) and calc (calc) installed."""
    for name, functions in (("echo", ["echo", "echo2"]), ("calc", ["calc"])):
        url = attack.serve(build_zip([Member(f"{name.capitalize()}.so", SO)]), f"{name}.zip")
        response = attack.service.post("functions", {"name": name, "file": url, "functions": functions})
        assert response.status_code == 201, response.data
    return attack


@pytest.mark.parametrize("functions, expect", [
    (["f1", "f1"], "listed twice"),
    (["f\u00e9"], "contains invalid characters"),
    (["a.b"], "contains invalid characters"),
    (["../x"], "contains invalid characters"),
    ([f"f{i}" for i in range(10000)], "at most"),
    (["echo2"], "already exists"),
    (["fresh", "echo"], "already exists"),
    ([""], "id cannot be empty"),
    ([], "must not be empty"),
], ids=["twice", "unicode", "dot", "dotdot", "10000", "owned", "one-owned", "empty-name", "empty-list"])
def test_c16_hostile_function_lists_register_nothing(function_plugin, functions, expect):
    attack = function_plugin
    url = attack.serve(build_zip([Member("Mult.so", SO)]), "mult.zip")
    attack.arm()
    if functions:  # an empty list on create means the default, [name]
        response = attack.service.post("functions", {"name": "mult", "file": url, "functions": functions})
        attack.refused(response, 400, expect)
    attack.refused(attack.client.post("/plugins/functions/calc/register", json={"functions": functions}), 400, expect)
    assert attack.client.get("/plugins/udfs").get_json() == ["calc", "echo", "echo2"]


def test_c16_a_function_owned_by_a_portable_plugin(function_plugin):
    attack = function_plugin
    url = attack.serve(portable_zip({**GOOD_DESCRIPTOR, "functions": ["echo"]}), "mirror.zip")
    attack.arm()
    attack.refused(attack.install(url, name="mirror", plugin_type="portables"), 400, "already exists")


# ============================================================================ URL, SSRF and download (c17-c30)


@pytest.fixture
def server_b(tmp_path):
    """Server B: a loopback server no download may ever reach; it counts what it is asked."""
    root = tmp_path / "served_b"
    root.mkdir()
    make_zip(root / "p.zip", {"Random.so": SO, "random.yaml": YAML})
    server = FileServer(root).start()
    yield server
    server.stop()


OTHER_SCHEMES_AND_SHAPES = [
    "ftp://127.0.0.1:{b}/p.zip", "gopher://127.0.0.1:{b}/p.zip", "dict://127.0.0.1:{b}/p.zip",
    "data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==.zip", "jar:http://127.0.0.1:{b}/p.zip!/x.zip",
    "javascript:alert(1)//.zip", "ldap://127.0.0.1:{b}/p.zip", "HTTP://127.0.0.1:{b}/p.zip?x=.zip#.zip",
    "//127.0.0.1:{b}/p.zip", "127.0.0.1:{b}/p.zip", "http:///p.zip", "http://:{b}/p.zip",
]


def test_c17_other_schemes_and_shapes_make_no_connection(attack, server_b):
    attack.arm()
    for template in OTHER_SCHEMES_AND_SHAPES:
        attack.refused(attack.install(template.format(b=server_b.port)), 400)
    assert server_b.requests == []


def test_c18_a_private_target_is_refused_without_a_request(attack, server_b):
    attack.arm()
    attack.refused(attack.install(server_b.url("p.zip")), 400, "is in internal network")
    assert server_b.requests == []


LOOPBACK_SPELLINGS = [
    "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "0x7f.0.0.1", "127.1", "127.000.000.001", "0",
    "0.0.0.0", "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "LOCALHOST", "localhost", "localhost.", "[::1%25lo]",
    "127.0.0.2", "127.255.255.254",
]


def test_c19_loopback_spellings(attack, server_b):
    attack.arm()
    for spelling in LOOPBACK_SPELLINGS:
        attack.refused(attack.install(f"http://{spelling}:{server_b.port}/p.zip"), 400)
    assert server_b.requests == []


CONFUSING_URLS = [
    "http://a.example@127.0.0.1:{b}/p.zip", "http://127.0.0.1:{b}\\@a.example/p.zip",
    "http://a.example#@127.0.0.1:{b}/p.zip", "http://127.0.0.1:{b}#@a.example/p.zip", " http://127.0.0.1:{b}/p.zip",
    "\thttp://127.0.0.1:{b}/p.zip", "\r\nhttp://127.0.0.1:{b}/p.zip", "http://127.0.0.1:{b}/\r\nHost: x/p.zip",
    "http://127.0.0.1%3a{b}/p.zip", "http://user:pass@127.0.0.1:{b}/p.zip", "http://127.0.0.1:{b}:80/p.zip",
    "http://[127.0.0.1]:{b}/p.zip", "http://127.0.0.1:{b}/p.zip\x00.zip", "http://\uff11\uff12\uff17.0.0.1:{b}/p.zip",
]


def test_c20_parser_confusion(attack, server_b):
    attack.arm()
    for template in CONFUSING_URLS:
        attack.refused(attack.install(template.format(b=server_b.port)), 400)
    assert server_b.requests == []


def redirect_to(location: str, status: int = 302):
    def answer(handler):
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


@pytest.mark.parametrize("target", ["http://127.0.0.1:{b}/p.zip", "http://[::1]:{b}/p.zip",
                                    "http://2130706433:{b}/p.zip", "file:///etc/passwd", "ftp://127.0.0.1:{b}/p.zip",
                                    "http://169.254.169.254/latest/meta-data/"])
def test_c21_redirects_into_forbidden_places(attack, server_b, target):
    attack.arm()
    for status in (301, 302, 303, 307, 308):
        attack.file_server.routes["/p.zip"] = redirect_to(target.format(b=server_b.port), status)
        attack.refused(attack.install(attack.file_server.url("p.zip")), 400, "fail to download file")
    assert server_b.requests == []


def test_c21_redirect_loops_and_too_many_hops(attack, server_b):
    routes = attack.file_server.routes
    routes["/loop.zip"] = redirect_to(attack.file_server.url("loop.zip"))
    for hop in range(7):
        routes[f"/hop{hop}.zip"] = redirect_to(attack.file_server.url(f"hop{hop + 1}.zip"))
    attack.arm()
    started = time.monotonic()
    attack.refused(attack.install(attack.file_server.url("loop.zip")), 400, "too many redirects")
    attack.refused(attack.install(attack.file_server.url("hop0.zip")), 400, "too many redirects")
    assert time.monotonic() - started < 10
    assert len(attack.file_server.requests) == 12  # 6 requests each: the first and 5 redirects, then refused
    assert server_b.requests == []


def test_c21_five_redirects_are_followed(attack):
    routes = attack.file_server.routes
    for hop in range(5):
        routes[f"/hop{hop}.zip"] = redirect_to(attack.file_server.url(f"hop{hop + 1}.zip"))
    (attack.file_server.root / "hop5.zip").write_bytes(build_zip(BASE))
    assert attack.install(attack.file_server.url("hop0.zip")).status_code == 201


class PayloadServer:
    """A loopback HTTP server on a chosen address and port that answers every GET with one payload."""

    def __init__(self, host: str, port: int, payload: bytes):
        import http.server

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.requests: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_c22_dns_rebinding_connects_only_to_the_address_checked(attack, monkeypatch):
    """A name answers an allowed address to the check and 127.0.0.1 afterwards: only the checked one is used.

    Server B (forbidden) listens on 127.0.0.1, server A (allow-listed) on 127.0.0.2 on the same port, so
    the URL cannot tell them apart: only the address the check saw can.
    """
    server_b = PayloadServer("127.0.0.1", 0, build_zip([Member("Random@v6.6.6.so", b"evil"), BASE[1]]))
    try:
        server_a = PayloadServer("127.0.0.2", server_b.port, build_zip(BASE))
        try:
            port = server_b.port
            answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)
            lookups = []

            def rebinding(host, port_, *args, **kwargs):
                if host == "rebind.test":
                    address = next(answers)
                    lookups.append(address)
                    return REAL_GETADDRINFO(address, port_, *args, **kwargs)
                return loopback_only_resolver(host, port_, *args, **kwargs)

            monkeypatch.setattr(socket, "getaddrinfo", rebinding)
            attack.start(private_net_allow_list=(f"127.0.0.2:{port}",))
            response = attack.install(f"http://rebind.test:{port}/p.zip")
            assert response.status_code == 201, response.data
            assert lookups == ["127.0.0.2"]
            assert server_a.requests == ["/p.zip"] and server_b.requests == []
            assert attack.client.get("/plugins/sources/random").get_json()["version"] == "1.0.0"
            # Now the name answers the forbidden address first: refused, nothing asked of anyone.
            assert attack.client.delete("/plugins/sources/random").status_code == 200
            attack.arm()
            attack.refused(attack.install(f"http://rebind.test:{port}/p.zip"), 400, "internal network")
            assert server_b.requests == [] and server_a.requests == ["/p.zip"]
        finally:
            server_a.stop()
    finally:
        server_b.stop()


@pytest.mark.parametrize("address", [
    "169.254.169.254", "100.64.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00:808:808", "2002:7f00:1::",
    "::127.0.0.1", "2001:0:4136:e378:8000:63bf:5601:5601", "fe80::1%eth0", "fd00:ec2::254", "::ffff:169.254.169.254",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "ff02::1", "::", "10.0.0.1", "172.16.0.1", "192.168.1.1",
])
def test_c23_address_policy_without_sockets(address):
    assert fetch.address_allowed(ipaddress.ip_address(address)) is False


def test_c24_proxies_from_the_environment_are_ignored(attack, server_b, monkeypatch, tmp_path):
    proxy_root = tmp_path / "proxy"
    proxy_root.mkdir()
    proxy = FileServer(proxy_root).start()
    try:
        for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("NO_PROXY", "")
        (tmp_path / "netrc").write_text("machine 127.0.0.1 login stolen password secret\n")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
        attack.arm()
        attack.refused(attack.install(server_b.url("p.zip")), 400, "internal network")
        seen = {}
        attack.file_server.routes["/p.zip"] = lambda handler: (
            seen.setdefault("authorization", handler.headers.get("Authorization")),
            answer_with(200, {"Content-Length": str(len(build_zip(BASE)))}, build_zip(BASE))(handler))
        assert attack.install(attack.file_server.url("p.zip")).status_code == 201
        assert seen == {"authorization": None}
        assert proxy.requests == [] and server_b.requests == []
    finally:
        proxy.stop()


def answer_with(status: int, headers: dict, body: bytes = b""):
    def answer(handler):
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass

    return answer


def test_c25_a_huge_content_length_is_refused_before_the_body(attack):
    attack.file_server.routes["/p.zip"] = answer_with(200, {"Content-Length": str(10 * 1024**3)}, b"PK" * 10)
    attack.arm()
    attack.refused(attack.install(attack.file_server.url("p.zip")), 400, "the server announces 10737418240 bytes")


def test_c25_an_endless_chunked_body_is_cut_at_the_cap(attack):
    def endless(handler):
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(1000):  # 64 MiB at most; the client hangs up at its 1 MiB cap long before
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass

    attack.start(max_plugin_size=MiB)
    attack.file_server.routes["/p.zip"] = endless
    attack.arm()
    attack.refused(attack.install(attack.file_server.url("p.zip")), 400, f"larger than the limit of {MiB} bytes")


def test_c26_a_slow_drip_is_cut_at_the_total_deadline_and_the_service_goes_on(attack):
    release = threading.Event()

    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(1000):  # one byte per 0.2 s: each read succeeds, the whole never ends in time
                handler.wfile.write(b"P")
                handler.wfile.flush()
                if release.wait(0.2):
                    return
        except OSError:
            pass

    attack.start(download_timeout=1.5)
    attack.file_server.routes["/p.zip"] = drip
    attack.arm()
    started = time.monotonic()
    try:
        response = attack.install(attack.file_server.url("p.zip"))
    finally:
        release.set()
    elapsed = time.monotonic() - started
    attack.refused(response, 400, "did not finish within the timeout of 1.5 s")
    assert 1.4 < elapsed < 5, elapsed
    assert attack.client.get("/ping").status_code == 200
    assert attack.install(attack.serve(build_zip(BASE), "good.zip")).status_code == 201


def test_c27_a_gzip_content_encoding_is_refused(attack):
    bomb = zlib.compress(b"\0" * (8 * MiB))
    attack.file_server.routes["/p.zip"] = answer_with(
        200, {"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}, bomb)
    attack.arm()
    attack.refused(attack.install(attack.file_server.url("p.zip")), 400, "Content-Encoding gzip")


def test_c28_upstream_failures(attack):
    attack.arm()
    for status in (404, 500, 403, 204, 206, 401, 502):
        attack.file_server.routes["/p.zip"] = answer_with(status, {"Content-Length": "0"})
        attack.refused(attack.install(attack.file_server.url("p.zip")), 400, f"status: {status}")


def test_c28_a_200_html_page_is_not_a_zip(attack):
    page = b"<html><body>Welcome</body></html>"
    attack.file_server.routes["/p.zip"] = answer_with(200, {"Content-Type": "text/html",
                                                            "Content-Length": str(len(page))}, page)
    attack.arm()
    attack.refused(attack.install(attack.file_server.url("p.zip")), 400, "zip: not a valid zip file")


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    """A throwaway CA, a certificate for 127.0.0.1 and one for another name, made with `cryptography`."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kuiper-plugins test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(file_name: str, san: x509.GeneralName) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        path = folder / file_name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return path

    return {
        "ca": folder / "ca.pem",
        "right": leaf("right.pem", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        "wrong": leaf("wrong.pem", x509.DNSName("other.test")),
    }


@pytest.fixture
def tls_server(tmp_path):
    import ssl

    started = []

    def start(cert: Path) -> FileServer:
        root = tmp_path / f"tls{len(started)}"
        root.mkdir()
        (root / "p.zip").write_bytes(build_zip(BASE))
        server = FileServer(root)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert)
        server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize("cert, trusted, expect", [
    ("right", False, "certificate verify failed"),
    ("wrong", True, "certificate verify failed"),
    ("wrong", False, "certificate verify failed"),
])
def test_c28_tls_unknown_ca_or_wrong_host_name(attack, tls_server, tls_material, monkeypatch, cert, trusted, expect):
    server = tls_server(tls_material[cert])
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_material["ca"]))
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_material["right"]))  # trusts nothing that signs servers
    attack.start(private_net_allow_list=(f"127.0.0.1:{server.port}",))
    attack.arm()
    attack.refused(attack.install(f"https://127.0.0.1:{server.port}/p.zip"), 400, expect)


def test_c28_tls_with_its_ca_configured_installs(attack, tls_server, tls_material, monkeypatch):
    server = tls_server(tls_material["right"])
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_material["ca"]))
    attack.start(private_net_allow_list=(f"127.0.0.1:{server.port}",))
    assert attack.install(f"https://127.0.0.1:{server.port}/p.zip").status_code == 201


def test_c29_file_urls_outside_the_uploads_folder(attack, canary):
    uploads = attack.service.layout.uploads
    make_zip(uploads / "random.zip", {"Random.so": SO, "random.yaml": YAML})
    assert os.path.relpath(canary, uploads) == "../../../canary"
    urls = [
        "file:///etc/passwd", "file:///etc/passwd.zip", (canary / "outside.zip").as_uri(),
        f"file://{uploads}/../../../canary/outside.zip", f"file://{uploads}/%2e%2e/%2e%2e/%2e%2e/canary/outside.zip",
        f"file://{uploads}/sub/../../../../canary/outside.zip", f"file://otherhost{uploads}/random.zip",
        f"file://127.0.0.1{uploads}/random.zip", f"file://{uploads}/random.zip%00.zip",
        f"file://{uploads}/./../uploads/../../../../canary/outside.zip", "file:///proc/self/environ.zip",
        f"file://{uploads}/%2e%2e%2f%2e%2e%2f%2e%2e%2fcanary/outside.zip", "file:///dev/zero.zip",
    ]
    attack.arm()
    for url in urls:
        attack.refused(attack.install(url), 400)
    assert attack.install((uploads / "random.zip").as_uri()).status_code == 201


def test_c30_links_fifos_devices_and_folders_inside_uploads(attack, canary):
    uploads = attack.service.layout.uploads
    (uploads / "link.zip").symlink_to(canary / "outside.zip")
    (uploads / "zero.zip").symlink_to("/dev/zero")
    (uploads / "null.zip").symlink_to("/dev/null")
    os.mkfifo(uploads / "fifo.zip")
    (uploads / "folder.zip").mkdir()
    (uploads / "dangling.zip").symlink_to(uploads / "gone.zip")
    attack.arm()
    for name, expect in [("link.zip", "file access denied"), ("zero.zip", "file access denied"),
                         ("null.zip", "file access denied"), ("fifo.zip", "not a regular file"),
                         ("folder.zip", "not a regular file"), ("dangling.zip", "does not exist")]:
        started = time.monotonic()
        attack.refused(attack.install((uploads / name).as_uri()), 400, expect)
        assert time.monotonic() - started < 1, f"{name}: no hang"


# ============================================================================ install.sh (c46-c51)


def script_zip(script: bytes | str, extra: list[Member] = ()) -> bytes:
    data = script.encode() if isinstance(script, str) else script
    return build_zip(BASE + [Member("install.sh", data), *extra])


def test_c46_scripts_switched_off_refuse_the_package_before_it_runs(attack, canary, tmp_path):
    attack.start(install_scripts=False)
    url = attack.serve(script_zip(f"touch {canary}/script-ran\n"))
    attack.arm()
    attack.refused(attack.install(url), 400, "installScripts is false")
    assert not (canary / "script-ran").exists()
    assert attack.install(attack.serve(build_zip(BASE), "plain.zip")).status_code == 201


def test_c46_control_with_scripts_on_the_script_does_run(attack, tmp_path):
    ran = tmp_path / "ran"
    assert attack.install(attack.serve(script_zip(f"touch {ran}\n"))).status_code == 201
    assert ran.exists()


@pytest.mark.parametrize("paras, expect", [
    (["a"], "no install.sh"),
    ([f"p{i}" for i in range(33)], "at most 32"),
    (["a\u0000b"], "NUL"),
    ([1], "string"),
    ([None], "shellParas"),
    ([["nested"]], "string"),
    ("a b", "list"),
], ids=["without-script", "33-items", "nul", "int", "null", "list", "string"])
def test_c47_bad_shell_paras(attack, paras, expect):
    with_script = expect != "no install.sh"
    url = attack.serve(script_zip("exit 0\n") if with_script else build_zip(BASE))
    attack.arm()
    attack.refused(attack.install(url, shellParas=paras), 400, expect)


def test_c47_32_shell_paras_are_fine(attack):
    url = attack.serve(script_zip('[ "$#" -eq 32 ] || exit 3\n'))
    assert attack.install(url, shellParas=[f"p{i}" for i in range(32)]).status_code == 201


def test_c47_shell_paras_reach_the_script_as_literal_arguments(attack, canary):
    hostile = [f"; touch {canary}/pwned1", f"$(touch {canary}/pwned2)", f"`touch {canary}/pwned3`",
               f"&& touch {canary}/pwned4", "-c", "--", "*", "$HOME"]
    url = attack.serve(script_zip('for a in "$@"; do printf "arg[%s]\\n" "$a"; done\nexit 1\n'))
    attack.arm()
    message = attack.refused(attack.install(url, shellParas=hostile), 400, "exit status 1")
    for argument in hostile:
        assert f"arg[{argument}]" in message, (argument, message)


SCRIPTS_THAT_OVERRUN = {
    "sleeps-trapping-term": "trap '' TERM\nsleep 600\n",
    "setsid-nohup-double-fork": "setsid sleep 600 &\nnohup sh -c 'sleep 600' >/dev/null 2>&1 &\n"
                                "( ( sleep 600 & ) & )\nsleep 600\n",
    "fan-out": "i=0\nwhile [ $i -lt 30 ]; do ( sleep 600 & sleep 600 ) & i=$((i+1)); done\nsleep 600\n",
    "busy-loop": "while :; do :; done\n",
}


@pytest.mark.parametrize("script", list(SCRIPTS_THAT_OVERRUN.values()), ids=list(SCRIPTS_THAT_OVERRUN))
def test_c48_an_overrunning_script_is_killed_with_everything_it_started(attack, script):
    """A bounded fan-out stands in for the catalogue's fork bomb: root ignores RLIMIT_NPROC on a shared box."""
    attack.start(install_script_timeout=0.5)
    url = attack.serve(script_zip(script))
    attack.arm()
    started = time.monotonic()
    response = attack.install(url)
    elapsed = time.monotonic() - started
    attack.refused(response, 400, "install.sh")
    assert elapsed < 12, elapsed


def test_c48_the_service_answers_while_a_script_runs(attack, tmp_path):
    release = tmp_path / "release"
    attack.start(install_script_timeout=30)
    url = attack.serve(script_zip(f"while [ ! -e {release} ]; do sleep 0.05; done\nexit 1\n"))
    attack.arm()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("response", attack.install(url)))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not marked_processes(attack.home) and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for the script to start, bounded by the deadline
        assert marked_processes(attack.home), "install.sh never started"
        for _ in range(5):
            assert attack.client.get("/ping").status_code == 200
            assert attack.client.get("/plugins/sources").get_json() == []
    finally:
        release.touch()
        worker.join(timeout=30)
    attack.refused(result["response"], 400, "exit status 1")


def test_c48_a_daemon_left_by_a_successful_script_does_not_survive(attack):
    url = attack.serve(script_zip("setsid sleep 600 &\nnohup sleep 600 >/dev/null 2>&1 &\nexit 0\n"))
    assert attack.install(url).status_code == 201
    assert marked_processes(attack.home) == []


@pytest.mark.parametrize("exit_status, expected", [(0, 201), (1, 400)])
def test_c49_100_MB_of_output_is_bounded_and_only_the_exit_status_counts(attack, exit_status, expected):
    url = attack.serve(script_zip(f"head -c 100000000 /dev/zero | tr '\\0' 'x'\necho\necho done\nexit {exit_status}\n"))
    attack.arm()
    response = attack.install(url)
    if expected == 201:
        assert response.status_code == 201, response.data[:300]
        return
    message = attack.refused(response, 400, "exit status 1", "done")
    assert len(message) < 8192


def test_c50_a_failing_script_leaves_nothing_even_after_a_restart(attack):
    url = attack.serve(script_zip("echo about to fail\nexit 1\n", [Member("etc/conf.yaml", b"a: 1\n")]))
    attack.arm()
    attack.refused(attack.install(url), 400, "exit status 1", "about to fail")
    attack.start()  # a restart on the same home: start-up recovery runs
    assert attack.client.get("/plugins/sources").get_json() == []
    attack.assert_nothing_written()
    assert attack.install(attack.serve(build_zip(BASE), "good.zip")).status_code == 201


def test_c51_the_script_sees_a_scrubbed_environment(attack, monkeypatch):
    """Only PATH, HOME, LANG, LC_ALL, TMPDIR and the marker; nothing of the service's environment.

    Writes outside and network connections are not sandboxed (install.sh is eKuiper's installer hook and
    may need both, e.g. apt install); see the report.
    """
    monkeypatch.setenv("KUIPER_TEST_SECRET", "canary-secret-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-aws")
    url = attack.serve(script_zip("env | sort\nexit 1\n"))
    attack.arm()
    message = attack.refused(attack.install(url), 400, "exit status 1")
    assert "canary-secret-value" not in message and "canary-aws" not in message
    names = {match[1] for match in re.finditer(r"(?:^|: |\n)([A-Za-z_][A-Za-z0-9_]*)=", message)}
    assert {"PATH", "HOME", "LANG"} <= names
    assert names <= {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", MARKER_ENV, "PWD", "SHLVL", "_", "OLDPWD"}, names


# ============================================================================ concurrency and delete (c52, c56, c57)


@pytest.fixture
def held_download(attack):
    """A package whose download stalls until released: an install holds its plugin's lock meanwhile."""
    release = threading.Event()
    data = build_zip(BASE)

    def held(handler):
        release.wait(30)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    attack.file_server.routes["/held.zip"] = held
    yield release, attack.file_server.url("held.zip")
    release.set()


def wait_for_request(server: FileServer, path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while path not in server.requests and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the held request to arrive, bounded by the deadline
    assert path in server.requests, f"{path} never requested"


def test_c52_a_second_install_of_the_same_name_is_refused_while_one_runs(attack, held_download):
    release, url = held_download
    result = {}
    first = threading.Thread(target=lambda: result.setdefault("first", attack.install(url)))
    first.start()
    try:
        wait_for_request(attack.file_server, "/held.zip")
        attack.arm(in_flight=True)
        other = attack.serve(build_zip(BASE), "other.zip")
        for name in ("random", "Random", "RANDOM"):
            attack.refused(attack.install(other, name=name), 400, "is busy")
    finally:
        release.set()
        first.join(timeout=30)
    assert result["first"].status_code == 201
    assert attack.client.get("/plugins/sources").get_json() == ["random"]


def test_c56_an_update_with_a_bad_archive_keeps_the_old_plugin_byte_for_byte(installed):
    attack = installed
    bad = attack.serve(build_zip(BASE + [Member("../evil", b"x")]), "bad.zip")
    attack.arm()
    attack.refused(attack.client.put("/plugins/sources/random", json={"file": bad}), 400, "leaves the plugin")
    assert attack.client.get("/plugins/sources/random").get_json() == {"name": "random", "version": "1.0.0"}


def test_c57_delete_unknown_twice_and_with_files_gone(installed):
    attack = installed
    attack.arm()
    attack.refused(attack.client.delete("/plugins/sources/ghost"), 404)
    attack.refused(attack.client.delete("/plugins/portables/ghost"), 404)
    (attack.home / "plugins/sources/Random@v1.0.0.so").unlink()
    assert attack.client.delete("/plugins/sources/random").status_code == 200
    assert attack.client.get("/plugins/sources").get_json() == []
    attack.arm()
    attack.refused(attack.client.delete("/plugins/sources/random"), 404)


def test_c57_delete_during_an_update_of_the_same_name_is_refused(installed, held_download):
    attack = installed
    release, url = held_download
    result = {}
    update = threading.Thread(target=lambda: result.setdefault(
        "update", attack.client.put("/plugins/sources/random", json={"file": url})))
    update.start()
    try:
        wait_for_request(attack.file_server, "/held.zip")
        attack.arm(in_flight=True)
        attack.refused(attack.client.delete("/plugins/sources/random"), 400, "is busy")
    finally:
        release.set()
        update.join(timeout=30)
    assert result["update"].status_code == 200
    assert attack.client.get("/plugins/sources").get_json() == ["random"]


# ============================================================================ Host, Origin, protected mode (c59)


def test_c59_a_foreign_host_header_is_403(attack):
    attack.arm()
    for host, (method, path) in itertools.product(FOREIGN_HOSTS, ROUTES_TO_GUARD):
        response = attack.client.open(path, method=method, headers={"Host": host},
                                      json={"name": "random", "file": attack.file_server.url("p.zip")})
        attack.refused(response, 403)
    assert attack.file_server.requests == []


FOREIGN_HOSTS = ["evil.example", "evil.example:9081", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0",
                 "10.0.0.1", "[::ffff:127.0.0.1]", "localhost.", "LOCALHOST@evil", "", "localhost:9081:1",
                 "local host", "[::1]evil"]
ROUTES_TO_GUARD = [("POST", "/plugins/sources"), ("GET", "/plugins/sources"), ("GET", "/ping"), ("GET", "/"),
                   ("DELETE", "/plugins/sources/random")]


def test_c59_loopback_host_headers_are_accepted(attack):
    for host in ("localhost", "LOCALHOST:9081", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:9081"):
        assert attack.client.get("/plugins/sources", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json"])
def test_c59_a_cross_site_post_is_403(attack, content_type):
    """The browser's simple-request shapes (text/plain, form) carry the attacker's Origin: refused on it."""
    url = attack.serve(build_zip(BASE))
    attack.arm()
    for origin in ("http://evil.example", "https://evil.example:443", "null", "NULL", "file://",
                   "chrome-extension://abcdef", "http://localhost.evil.example", "http://127.0.0.1@evil.example",
                   "garbage", "http://localhost:9081 http://evil.example", ""):
        response = attack.client.post("/plugins/sources", data=json.dumps({"name": "random", "file": url}),
                                      content_type=content_type, headers={"Origin": origin})
        attack.refused(response, 403)
    assert attack.file_server.requests == []


def test_c59_same_origin_posts_are_fine(attack):
    url = attack.serve(build_zip(BASE))
    response = attack.client.post("/plugins/sources", json={"name": "random", "file": url},
                                  headers={"Origin": "http://localhost:9081"})
    assert response.status_code == 201


def test_protected_mode_refuses_remote_clients(attack):
    attack.arm()
    for client, (method, path) in itertools.product(
            ["10.1.2.3", "192.168.1.20", "203.0.113.9", "::ffff:10.0.0.1", "fe80::1", "2001:db8::1", ""],
            [("GET", "/plugins/sources"), ("POST", "/plugins/sources"), ("GET", "/plugins/udfs"),
             ("DELETE", "/plugins/sources/random"), ("POST", "/config/uploads")]):
        response = attack.client.open(path, method=method, environ_base={"REMOTE_ADDR": client},
                                      json={"name": "random", "file": attack.file_server.url("p.zip")})
        attack.refused(response, 403, "protected mode")
        for open_path in ("/", "/ping"):
            assert attack.client.get(open_path, environ_base={"REMOTE_ADDR": client}).status_code == 200


def test_protected_mode_lets_loopback_clients_in(attack, loopback_peer):
    """Each from a real connection of this test's user (root) on that loopback address."""
    for client, spelled in (("127.0.0.1", "127.0.0.1"), ("127.8.9.10", "127.8.9.10"), ("::1", "::1"),
                            ("127.0.0.1", "::ffff:127.0.0.1")):
        environ = {**loopback_peer(client).environ, "REMOTE_ADDR": spelled}
        assert attack.client.get("/plugins/sources", environ_base=environ).status_code == 200


def test_protected_mode_off_lets_remote_clients_in_but_not_foreign_hosts(attack):
    attack.start(protected_mode=False)
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert attack.client.get("/plugins/sources", environ_base=remote).status_code == 200
    attack.arm()
    attack.refused(attack.client.get("/plugins/sources", environ_base=remote, headers={"Host": "evil.example"}), 403)


def test_allowed_hosts_replaces_the_loopback_names(attack):
    attack.start(allowed_hosts=("plugins.example.com",))
    assert attack.client.get("/plugins/sources", headers={"Host": "plugins.example.com:8443"}).status_code == 200
    attack.arm()
    attack.refused(attack.client.get("/plugins/sources", headers={"Host": "localhost"}), 403)


# ============================================================================ uploads: the other writing endpoint


def test_upload_names_cannot_leave_the_uploads_folder(attack):
    attack.arm()
    for name in ("../x.zip", "../../canary/evil.zip", "/abs.zip", "a/../../x.zip", ".hidden.zip", "a//b.zip",
                 "a\\b.zip", "x\x00.zip", "caf\u00e9.zip", "a/./b.zip", "", "a/" * 9 + "b", "..", "."):
        attack.refused(attack.client.post("/config/uploads", json={"name": name, "content": "x"}), 400)
        if "\\" not in name:  # in a multipart header a backslash only escapes the next character (a\b is ab)
            part = {"uploadFile": (io.BytesIO(b"x"), name)}
            attack.refused(attack.client.post("/config/uploads", data=part, content_type="multipart/form-data"),
                           400)


def test_upload_delete_cannot_leave_the_uploads_folder(attack):
    attack.arm()
    for path in ("..%2F..%2F..%2F..%2Fcanary%2Fkeep.txt", "../../../../canary/keep.txt", "%2e%2e/keep.txt", "a%00b",
                 "sub/../../../../../canary/keep.txt", "%2e%2e%2f%2e%2e%2fkuiper-plugins.db", "..", "x/.."):
        response = attack.client.delete(f"/config/uploads/{path}")
        attack.refused(response, 404 if response.status_code == 404 else 400)


def test_an_upload_url_is_guarded_like_a_plugin_url(attack, server_b):
    attack.arm()
    response = attack.client.post("/config/uploads", json={"name": "p.zip", "file": server_b.url("p.zip")})
    attack.refused(response, 400, "internal network")
    assert server_b.requests == []


# ============================================================================ the catalogue (c60)


def test_c60_a_catalogue_url_aimed_at_a_private_host_is_still_refused(attack, server_b):
    attack.start(plugin_hosts=(f"http://127.0.0.1:{server_b.port}",))
    urls = attack.client.get("/plugins/sources/prebuild").get_json()
    assert server_b.requests == []  # the catalogue is computed, never fetched
    attack.arm()
    attack.refused(attack.install(urls["random"]), 400, "internal network")
    assert server_b.requests == []


# ============================================================================ names as properties (hypothesis)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_the_name_rule_is_ascii_fullmatch(name):
    expected = len(name) in range(1, 65) and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    try:
        packages.check_name(name)
        accepted = True
    except InvalidRequest:
        accepted = False
    assert accepted == expected, repr(name)


NAME_ALPHABET = st.one_of(st.characters(codec="utf-8"), st.sampled_from(list("._-/\\%\n\x00 ") + ["..", "%2e"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.lists(NAME_ALPHABET, min_size=1, max_size=12).map("".join))
def test_any_name_in_a_path_is_refused_or_unknown_never_a_500(attack, name):
    from urllib.parse import quote

    attack.arm()
    for method in ("GET", "DELETE"):
        response = attack.client.open(f"/plugins/sources/{quote(name, safe='')}", method=method)
        assert response.status_code in (400, 404), (name, response.status_code, response.data[:200])
        attack.refused(response, response.status_code)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.lists(NAME_ALPHABET, min_size=0, max_size=12).map("".join))
def test_any_name_in_a_body_is_refused_or_downloads_nothing_unsafe(attack, name):
    attack.arm()
    response = attack.service.post("sources", {"name": name, "file": "http://a.example/a.zip"})
    assert response.status_code == 400
    message = attack.refused(response, 400)
    valid = packages.NAME_PATTERN.fullmatch(name) is not None
    assert message.startswith("id ") != valid, (name, message)


# ============================================================================ through real gunicorn


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    """One real gunicorn (2 workers) for the module, speaking the PROXY protocol when a client starts with it,
    so a test can claim a remote client address while every byte stays on the loopback."""
    folder = tmp_path_factory.mktemp("gunicorn")
    server = Gunicorn(folder / "home", folder / "gunicorn.log", workers=2,
                      env={"GUNICORN_CMD_ARGS": "--proxy-protocol v1 --proxy-allow-from 127.0.0.1"}).start()
    yield server
    server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MiB:
                break
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.slow
def test_gunicorn_c8_oversized_request_lines_and_headers_are_4xx(gunicorn):
    port = gunicorn.port
    long_line = b"GET /plugins/sources?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    many_headers = b"GET /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"
    big_header = b"GET /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8191 + b"\r\n\r\n"
    for request in (long_line, many_headers, big_header):
        status = status_of(raw_exchange(port, request))
        assert 400 <= status < 500, status
    assert requests.get(f"{gunicorn.url}/plugins/sources", timeout=10).status_code == 200


@pytest.mark.slow
def test_gunicorn_c6_chunked_and_declared_bodies_over_1_MiB_are_413(gunicorn):
    """Through gunicorn's own chunked decoding; the second body's first MiB is a whole, valid request."""
    def in_a_string():
        yield b'{"name": "random", "file": "'
        for _ in range(16):
            yield b"a" * 131072
        yield b'.zip"}'

    def after_a_valid_request():
        yield b'{"name": "random", "file": "http://127.0.0.1:9/random.zip"}'  # refused by policy, no DNS
        for _ in range(16):
            yield b" " * 131072

    for body in (in_a_string, after_a_valid_request):
        chunked = requests.post(f"{gunicorn.url}/plugins/sources", data=body(), timeout=30,
                                headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413, (body.__name__, chunked.status_code, chunked.text[:200])
        assert chunked.json()["error"] == 1000
    declared = requests.post(f"{gunicorn.url}/plugins/sources", data=b"{" + b" " * (MiB + 10) + b"}", timeout=30,
                             headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert requests.get(f"{gunicorn.url}/plugins/sources", timeout=10).json() == []


@pytest.mark.slow
def test_gunicorn_c59_host_and_origin_guards(gunicorn):
    url = f"{gunicorn.url}/plugins/sources"
    assert requests.get(url, headers={"Host": "evil.example"}, timeout=10).status_code == 403
    assert requests.post(url, data="{}", timeout=10, headers={"Origin": "http://evil.example",
                                                              "Content-Type": "text/plain"}).status_code == 403
    assert requests.get(url, headers={"Host": f"localhost:{gunicorn.port}"}, timeout=10).status_code == 200


@pytest.mark.slow
def test_gunicorn_protected_mode_refuses_a_remote_client(gunicorn):
    """The PROXY line tells gunicorn the client is 203.0.113.9; the bytes go to 127.0.0.1 only."""
    request = b"GET /plugins/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    remote = raw_exchange(gunicorn.port, b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n" + request)
    assert status_of(remote) == 403, remote[:300]
    assert b"protected mode" in remote
    open_path = raw_exchange(gunicorn.port, b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n"
                             + request.replace(b"/plugins/sources", b"/ping"))
    assert status_of(open_path) == 200
    local = raw_exchange(gunicorn.port, b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 80\r\n" + request)
    assert status_of(local) == 200


def test_the_nothing_written_check_sees_every_kind_of_change(attack, canary):
    """The check itself must be able to fail: a chmod, a new FIFO, a touched canary, a registry row."""
    attack.arm()
    attack.assert_nothing_written()
    changes = [
        lambda: os.chmod(attack.home / "plugins", 0o700),
        lambda: os.mkfifo(attack.home / "data/uploads/fifo"),
        lambda: (attack.home / "etc/sources/x.yaml").write_text("x"),
        lambda: (canary / "sub/keep.yaml").write_text("a: 2\n"),
        lambda: (attack.service.layout.staging / "debris").mkdir(),
        lambda: attack.install(attack.serve(build_zip(BASE))),
    ]
    for change in changes:
        attack.arm()
        change()
        with pytest.raises(AssertionError):
            attack.assert_nothing_written()
