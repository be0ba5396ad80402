"""Read a plugin zip's directory, refuse unsafe entries, and extract within limits.

A downloaded zip is hostile input. `inspect` reads only the archive's
directory and refuses the whole archive at the first unsafe or ambiguous
entry; it never skips or rewrites a name and it writes nothing. It works in
three passes, cheapest first:

1. the end records: where the central directory lies and how many entries it
   holds, so a 200 000-entry archive is refused before `zipfile` builds a
   `ZipInfo` for each of them;
2. each entry: its name, Unix file type, flags, compression method, sizes,
   and the local header it points to;
3. the entries together: colliding names, files used as folders, overlapping
   data and the total unpacked size.

`extract` then writes exactly the accepted entries under a fresh folder. It
walks that folder by file descriptor with ``O_NOFOLLOW`` so no link is ever
followed, sets fixed modes (0644, or 0755 for an entry with a run bit), and counts every byte against the size `inspect`
accepted. `zipfile` parses the central directory; the byte-level checks here
make sure it has nothing ambiguous to interpret. Each accepted entry carries
where its data lies, as `inspect` found it from the entry's local header (the
same sum zipfile makes when it opens a member), so `extract` and `read_member`
inflate it from there, checking its size and CRC-32, without parsing the
directory again or building a reader object per member: for a package of
10,000 small files, that was a third of the install's time.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO, NoReturn

from kuiper_plugins.errors import ArchiveRejected, DiskFull
from kuiper_plugins.install import unpack
from kuiper_plugins.lifecycle import progress

MAX_NAME_BYTES = 1024
MAX_SEGMENT_BYTES = 255  # NAME_MAX of ext4 and most other filesystems
MAX_DEPTH = 32
MAX_RATIO = 1000
RATIO_FREE_SIZE = 1 << 20  # entries up to 1 MiB may compress as well as they like
FOLDER_MODE = unpack.FOLDER_MODE  # every folder extract makes, whatever the umask

# Record layouts from PKWARE's APPNOTE.TXT, section 4.3; all little-endian, signature first.
# End record: disk, directory's disk, entries on this disk, entries, directory size and offset, comment size.
_END_RECORD = struct.Struct("<4s4H2LH")
# ZIP64 locator: the ZIP64 end record's disk and offset, disk count.
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
# ZIP64 end record: its size, 2 versions, 2 disks, 2 entry counts, directory size and offset.
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
# Local header: version, flags, method, time, date, CRC, 2 sizes, name and extra field lengths.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")

_END_RECORD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_END_RECORD_SIG = b"PK\x06\x06"
_CENTRAL_HEADER_SIG = b"PK\x01\x02"
_LOCAL_HEADER_SIG = b"PK\x03\x04"
_MAX_COMMENT = 0xFFFF

_FLAG_ENCRYPTED = 0x0001
_FLAG_PATCHED_DATA = 0x0020
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_MASKED_HEADERS = 0x2000
_REFUSED_FLAGS = (
    (_FLAG_STRONG_ENCRYPTION, "uses strong encryption"),
    (_FLAG_ENCRYPTED, "is encrypted"),
    (_FLAG_PATCHED_DATA, "holds compressed patched data"),
    (_FLAG_MASKED_HEADERS, "has masked (encrypted) headers"),
)
# Flags the local header must repeat: zipfile reads them from the central
# directory, other tools from the local header.
_FLAGS_BOTH_HEADERS_SHARE = _FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_UTF8

_ALLOWED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_REFUSED_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")

# What zipfile, zlib and struct raise on a malformed archive.
_MALFORMED = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_FOLDER_OPEN_FLAGS = unpack.FOLDER_OPEN_FLAGS


@dataclass(frozen=True)
class Location:
    """Where an accepted entry's data lies in the archive `inspect` read, and what it must unpack to."""

    start: int  # the offset of its first byte of (packed) data
    packed_size: int
    deflated: bool  # else stored
    crc: int  # the CRC-32 the central directory declares


@dataclass(frozen=True)
class Entry:
    """One accepted archive entry."""

    name: str  # "/"-separated, without the trailing "/" of a folder
    is_dir: bool
    size: int  # declared uncompressed size, 0 for folders
    executable: bool  # the Unix mode has an x bit (files only)
    # Set by `inspect` only: an entry made any other way is not read from any archive.
    at: Location | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Directory:
    """Where the central directory lies, as the end records describe it."""

    offset: int
    size: int
    entry_count: int


def inspect(zip_path: Path, *, max_entries: int, max_unpacked_size: int) -> list[Entry]:
    """Read the zip's directory and refuse the whole archive on any unsafe or malformed entry."""
    progress.phase("inspect")
    with open(zip_path, "rb") as archive:
        file_size = os.fstat(archive.fileno()).st_size
        directory = _locate_directory(archive, file_size, max_entries)
        _count_central_headers(archive, directory)
        with _refusing_malformed("the central directory cannot be read"):
            with zipfile.ZipFile(archive) as parsed:
                infos = parsed.infolist()
        if len(infos) != directory.entry_count:
            raise _rejected("the central directory cannot be read")

        # The local headers are read from a mapping of the file: a read call for each costs more than the check.
        with mmap.mmap(archive.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            extents = [_data_extent(mapped, info, directory.offset) for info in infos]
        entries = [_check_entry(info, extent[3]) for info, extent in zip(infos, extents, strict=True)]

    _refuse_overlaps(extents)
    _refuse_collisions(entries, infos)
    unpacked_size = sum(entry.size for entry in entries)
    if unpacked_size > max_unpacked_size:
        raise _rejected(
            f"entries unpack to {unpacked_size} bytes, more than the limit of {max_unpacked_size}"
        )
    return entries


def extract(zip_path: Path, entries: Sequence[Entry], dest_dir: Path) -> dict[str, str]:
    """Unpack exactly `entries` (as returned by `inspect` for this zip) under `dest_dir`, an existing empty folder;
    return the sha256 (hex) of each file written, by entry name: what it holds, without reading it back.

    Every folder is made first, in archive order; then the files are written (`unpack.write_members`: a
    package of many files by this process and a second one, each taking a run of them in archive order). The
    first error stops both and is raised; what was written is the caller's to remove, as after any failed
    extraction.
    """
    progress.phase("unpack", sum(entry.size for entry in entries if not entry.is_dir))
    root_fd = os.open(os.path.realpath(dest_dir), _FOLDER_OPEN_FLAGS)
    try:
        archive_fd = os.open(zip_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            files: list[Entry] = []
            members: list[unpack.Member] = []
            folders = unpack.OpenFolders(root_fd)
            try:
                for entry in entries:
                    segments = _make_folders(entry, folders)
                    if segments is not None:
                        files.append(entry)
                        members.append(_member(entry, segments))
            finally:
                folders.close()
            try:
                digests = unpack.write_members(archive_fd, root_fd, members, progress.advance)
            except unpack.MemberFailed as failure:
                _raise_unpacking_error(files[failure.index], failure.error)
            return {entry.name: digest for entry, digest in zip(files, digests, strict=True)}
        finally:
            os.close(archive_fd)
    finally:
        os.close(root_fd)


def _member(entry: Entry, segments: list[str]) -> unpack.Member:
    """What `unpack` needs of an accepted file entry: where it goes, where its data is and what it must be."""
    at = entry.at
    return (tuple(segments[:-1]), segments[-1], at.start, at.packed_size, at.deflated, at.crc, entry.size,
            entry.executable)


def member_reader(zip_path: Path, entries: Sequence[Entry]) -> Callable[[str, int], bytes]:
    """`read_member` of this zip and its entries (as `inspect` returned them), as `packages.plan_package` takes
    it: (name, max_size) -> bytes."""
    return lambda name, max_size: read_member(zip_path, entries, name, max_size=max_size)


def read_member(zip_path: Path, entries: Sequence[Entry], name: str, *, max_size: int) -> bytes:
    """Return the bytes of the member `name` of `entries` (as `inspect` returned them for this zip), refusing
    one larger than `max_size`."""
    entry = next((entry for entry in entries if entry.name == name.removesuffix("/")), None)
    if entry is None or entry.at is None:
        raise _rejected(f"entry {_shown(name)} is not in the archive")
    if entry.is_dir:
        raise _rejected(f"entry {_shown(name)} is a folder")
    if entry.size > max_size:
        raise _rejected(f"entry {_shown(name)} is {entry.size} bytes, more than the limit of {max_size}")
    archive_fd = os.open(zip_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _unpacking(entry):
            return b"".join(unpack.checked_chunks(archive_fd, _member(entry, entry.name.split("/"))))
    finally:
        os.close(archive_fd)


# --- pass 1: the end records -------------------------------------------------


def _locate_directory(archive: BinaryIO, file_size: int, max_entries: int) -> _Directory:
    """Read the end record (and the ZIP64 one) and check the directory sits right before it."""
    end_offset = _find_end_record(archive, file_size)
    archive.seek(end_offset)
    _, disk, directory_disk, disk_entries, entry_count, size, offset, comment_size = _END_RECORD.unpack(
        archive.read(_END_RECORD.size)
    )
    if end_offset + _END_RECORD.size + comment_size != file_size:
        raise _rejected("data after the end of the archive")
    directory_end = end_offset

    locator_offset = end_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0:
        archive.seek(locator_offset)
        locator_sig, zip64_disk, zip64_offset, disk_count = _ZIP64_LOCATOR.unpack(
            archive.read(_ZIP64_LOCATOR.size)
        )
        if locator_sig == _ZIP64_LOCATOR_SIG:
            # zipfile reads the ZIP64 record right before the locator, whatever the locator says.
            record_offset = locator_offset - _ZIP64_END_RECORD.size
            if record_offset < 0 or zip64_offset != record_offset or zip64_disk != 0 or disk_count > 1:
                raise _rejected("the ZIP64 end record is missing or misplaced")
            archive.seek(record_offset)
            record = _ZIP64_END_RECORD.unpack(archive.read(_ZIP64_END_RECORD.size))
            if record[0] != _ZIP64_END_RECORD_SIG:
                raise _rejected("the ZIP64 end record is missing or misplaced")
            disk, directory_disk, disk_entries, entry_count, size, offset = record[4:]
            directory_end = record_offset

    if disk != 0 or directory_disk != 0 or disk_entries != entry_count:
        raise _rejected("the archive spans several disks")
    if entry_count > max_entries:
        raise _rejected(f"{entry_count} entries, more than the limit of {max_entries}")
    if offset + size < directory_end:
        raise _rejected("data before the first entry")
    if offset + size > directory_end:
        raise _rejected("truncated or corrupt archive: the central directory overruns its end record")
    return _Directory(offset=offset, size=size, entry_count=entry_count)


def _find_end_record(archive: BinaryIO, file_size: int) -> int:
    """Return the end record's offset, found the way zipfile finds it."""
    if file_size < _END_RECORD.size:
        raise _not_a_zip()
    archive.seek(file_size - _END_RECORD.size)
    last = archive.read(_END_RECORD.size)
    if last.startswith(_END_RECORD_SIG) and last.endswith(b"\0\0"):
        return file_size - _END_RECORD.size
    search_start = max(file_size - _MAX_COMMENT - 1 - _END_RECORD.size, 0)
    archive.seek(search_start)
    tail = archive.read()
    found = tail.rfind(_END_RECORD_SIG)
    if found < 0 or found + _END_RECORD.size > len(tail):
        raise _not_a_zip()
    return search_start + found


def _count_central_headers(archive: BinaryIO, directory: _Directory) -> None:
    """Walk the central directory's headers, stopping as soon as there are more than the end record says.

    zipfile reads headers until the directory's byte size is used up, whatever the
    count says; this walk makes sure the count it was checked against is true.
    """
    archive.seek(directory.offset)
    data = archive.read(directory.size)
    if len(data) != directory.size:
        raise _rejected("truncated archive: the central directory ends past the end of the file")
    position = count = 0
    while position < len(data):
        if count == directory.entry_count:
            raise _rejected(
                f"the central directory holds more than the {count} entries its end record counts"
            )
        if position + _CENTRAL_HEADER.size > len(data):
            raise _rejected("the central directory is corrupt")
        header = _CENTRAL_HEADER.unpack_from(data, position)
        if header[0] != _CENTRAL_HEADER_SIG:
            raise _rejected("the central directory is corrupt")
        flags, name_size, extra_size, comment_size = header[5], header[12], header[13], header[14]
        name_start = position + _CENTRAL_HEADER.size
        raw_name = data[name_start : name_start + name_size]
        if flags & _FLAG_UTF8:
            try:
                raw_name.decode("utf-8")
            except UnicodeDecodeError:
                shown = _shown(raw_name.decode("utf-8", "backslashreplace"))
                raise _rejected(f"entry {shown} is marked UTF-8 but its name is not valid UTF-8")
        position = name_start + name_size + extra_size + comment_size
        count += 1
    if position != len(data) or count != directory.entry_count:
        raise _rejected(
            f"the end record counts {directory.entry_count} entries but the central directory holds {count}"
        )


# --- pass 2: each entry ------------------------------------------------------


def _check_entry(info: zipfile.ZipInfo, data_start: int) -> Entry:
    """Refuse an unsafe entry; return what `extract` needs to know about a safe one."""
    name = info.orig_filename
    segments = _path_segments(name)
    is_dir = name.endswith("/")
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)
    if file_type in _REFUSED_TYPES:
        raise _entry_rejected(name, f"is {_REFUSED_TYPES[file_type]}")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _entry_rejected(name, f"has an unknown Unix file type {file_type:#o}")
    if file_type == stat.S_IFDIR and not is_dir:
        raise _entry_rejected(name, 'is marked as a folder but its name does not end with "/"')
    for flag, refusal in _REFUSED_FLAGS:
        if info.flag_bits & flag:
            raise _entry_rejected(name, refusal)
    if info.compress_type not in _ALLOWED_METHODS:
        raise _entry_rejected(
            name, f"uses compression method {info.compress_type}; only stored (0) and deflate (8) are allowed"
        )
    if is_dir and info.file_size:
        raise _entry_rejected(name, "is a folder that holds data")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _entry_rejected(
            name, f"is stored but declares {info.file_size} bytes unpacked and {info.compress_size} packed"
        )
    if info.file_size > RATIO_FREE_SIZE and info.file_size > MAX_RATIO * info.compress_size:
        ratio = info.file_size // max(info.compress_size, 1)
        raise _entry_rejected(
            name, f"has a compression ratio of {ratio}:1, more than the limit of {MAX_RATIO}:1"
        )
    return Entry(
        name="/".join(segments),
        is_dir=is_dir,
        size=info.file_size,
        executable=not is_dir and bool(mode & 0o111),
        at=Location(data_start, info.compress_size, info.compress_type == zipfile.ZIP_DEFLATED, info.CRC),
    )


def _path_segments(name: str) -> list[str]:
    """Split an entry name into its path segments, refusing any name that is not a plain relative path.

    A folder's single trailing "/" is allowed and dropped.
    """
    if not name:
        raise _rejected("an entry has an empty name")
    if _CONTROL_CHARACTER.search(name):
        raise _entry_rejected(name, "has a control character in its name")
    if "\\" in name:
        raise _entry_rejected(name, "contains a backslash")
    if name.startswith("/"):
        raise _entry_rejected(name, "is an absolute path")
    if _DRIVE_LETTER.match(name):
        raise _entry_rejected(name, "starts with a drive letter")
    segments = name.removesuffix("/").split("/")
    if ".." in segments:
        raise _entry_rejected(name, "leaves the plugin folder")
    if "" in segments or "." in segments:
        raise _entry_rejected(name, 'has an empty or "." path segment')
    name_bytes = len(name.encode())
    if name_bytes > MAX_NAME_BYTES:
        raise _entry_rejected(name, f"is longer than {MAX_NAME_BYTES} bytes")
    if name_bytes > MAX_SEGMENT_BYTES and any(len(segment.encode()) > MAX_SEGMENT_BYTES for segment in segments):
        raise _entry_rejected(name, f"has a path segment longer than {MAX_SEGMENT_BYTES} bytes")
    if len(segments) > MAX_DEPTH:
        raise _entry_rejected(name, f"is nested deeper than {MAX_DEPTH} levels")
    return segments


def _data_extent(mapped: mmap.mmap, info: zipfile.ZipInfo, directory_offset: int) -> tuple[int, int, str, int]:
    """Check the entry's local header; return (start, end, name) of its header and data in the file, and where
    its data starts.

    A data descriptor after the data is not counted, as in zipfile's own overlap check.
    """
    name = info.orig_filename
    start = info.header_offset
    if start + _LOCAL_HEADER.size > directory_offset:
        raise _entry_rejected(name, "points past the entries' data")
    # (an ASCII name is the same bytes in both encodings, and encodes much faster as ASCII)
    central_name = name.encode("ascii" if name.isascii() else "utf-8" if info.flag_bits & _FLAG_UTF8 else "cp437")
    # the header and, when it names the entry as the central directory does, the name, in one slice
    read = mapped[start:start + _LOCAL_HEADER.size + len(central_name)]
    header = _LOCAL_HEADER.unpack_from(read)
    if header[0] != _LOCAL_HEADER_SIG:
        raise _entry_rejected(name, "points to no local header")
    flags, method, name_size, extra_size = header[2], header[3], header[9], header[10]
    if name_size != len(central_name) or read[_LOCAL_HEADER.size:] != central_name:
        raise _entry_rejected(name, "has a different name in its local header")
    if method != info.compress_type or (flags ^ info.flag_bits) & _FLAGS_BOTH_HEADERS_SHARE:
        raise _entry_rejected(name, "has a local header that disagrees with the central directory")
    data_start = start + _LOCAL_HEADER.size + name_size + extra_size
    end = data_start + info.compress_size
    if end > directory_offset:
        raise _entry_rejected(name, "runs into the central directory")
    return start, end, name, data_start


# --- pass 3: the entries together ----------------------------------------------


def _refuse_overlaps(extents: list[tuple[int, int, str, int]]) -> None:
    """Refuse entries sharing bytes (overlapping zip bombs) and data before the first entry."""
    extents = sorted(extents)
    if extents and extents[0][0] != 0:
        raise _rejected("data before the first entry")
    for (_, previous_end, previous_name, _), (start, _, name, _) in pairwise(extents):
        if start < previous_end:
            raise _rejected(f"entries {_shown(previous_name)} and {_shown(name)} overlap in the archive")


def _refuse_collisions(entries: list[Entry], infos: list[zipfile.ZipInfo]) -> None:
    """Refuse names equal up to case, Unicode form or a folder's "/", and files used as folders."""
    names_by_key: dict[str, str] = {}
    file_names_by_key: dict[str, str] = {}
    keys = [_collision_key(entry.name) for entry in entries]
    for entry, info, key in zip(entries, infos, keys, strict=True):
        if key in names_by_key:
            first = names_by_key[key]
            if first == info.orig_filename:
                raise _entry_rejected(first, "appears twice")
            raise _rejected(
                f"entries {_shown(first)} and {_shown(info.orig_filename)} collide "
                "(same name ignoring case, Unicode form and a folder's trailing /)"
            )
        names_by_key[key] = info.orig_filename
        if not entry.is_dir:
            file_names_by_key[key] = info.orig_filename
    for info, key in zip(infos, keys, strict=True):
        parent = key
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in file_names_by_key:
                raise _entry_rejected(
                    info.orig_filename, f"is inside {_shown(file_names_by_key[parent])}, which is a file"
                )


def _collision_key(name: str) -> str:
    if name.isascii():
        return name.lower()  # what the line below gives an ASCII name, at a fraction of its cost
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


# --- extraction ------------------------------------------------------------------


def _make_folders(entry: Entry, folders: unpack.OpenFolders) -> list[str] | None:
    """Make a folder entry, or a file entry's folder; return a file's path segments (None for a folder)."""
    segments = _path_segments(entry.name)  # an entry from `inspect` passes; any other is refused below
    if entry.at is None:
        raise _entry_rejected(entry.name, "is not in the archive")
    try:
        if entry.is_dir:
            folders.get(segments)
            return None
        folders.get(segments[:-1])
    except OSError as error:
        _raise_unpacking_error(entry, error)
    return segments


@contextmanager
def _unpacking(entry: Entry) -> Iterator[None]:
    """Map what unpacking one entry can raise: a corrupt archive, a full disk (see `_unpacking_error`)."""
    try:
        yield
    except BaseException as error:
        _raise_unpacking_error(entry, error)


def _raise_unpacking_error(entry: Entry, error: BaseException) -> NoReturn:
    """Raise what `_unpacking_error` makes of `error`, or `error` itself as it came."""
    mapped = _unpacking_error(entry, error)
    if mapped is error:
        raise error
    raise mapped from error


def _unpacking_error(entry: Entry, error: BaseException) -> BaseException:
    """What to raise for `error`, met unpacking `entry`: a corrupt archive's or a full disk's refusal, else itself."""
    if isinstance(error, unpack.Refused):
        return _entry_rejected(entry.name, str(error))
    if isinstance(error, _MALFORMED):
        return _entry_rejected(entry.name, f"is corrupt: {_escaped(str(error)) or type(error).__name__}")
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return DiskFull(f"disk full while unpacking {_shown(entry.name)}")
    return error


# --- messages ------------------------------------------------------------------


def _not_a_zip() -> ArchiveRejected:
    """Go's archive/zip words for a file without an end record, which eKuiper passes on."""
    return ArchiveRejected("zip: not a valid zip file (no zip end record found: the file is not a zip archive)")


def _rejected(detail: str) -> ArchiveRejected:
    return ArchiveRejected(f"invalid zip file: {detail}")


def _entry_rejected(name: str, detail: str) -> ArchiveRejected:
    return _rejected(f"entry {_shown(name)} {detail}")


@contextmanager
def _refusing_malformed(subject: str) -> Iterator[None]:
    """Turn what zipfile, zlib and struct raise on a malformed archive into ArchiveRejected."""
    try:
        yield
    except _MALFORMED as error:
        raise _rejected(f"{subject}: {_escaped(str(error)) or type(error).__name__}")


def _shown(name: str) -> str:
    """Quote a name for a message, with anything invisible, reordering or control escaped."""
    return f'"{_escaped(name)}"'


def _escaped(text: str, limit: int = 200) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    escaped = []
    for character in text:
        if character in '"\\':
            escaped.append("\\" + character)
        elif character != " " and unicodedata.category(character)[0] in "CZ":
            code = ord(character)
            escaped.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            escaped.append(character)
    return "".join(escaped)
