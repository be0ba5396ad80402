"""Write a zip's accepted members into a folder: in this process, or shared with a second one for many files.

`archive.extract` decides what is written (only what `archive.inspect` accepted, folders made first) and
maps what goes wrong to the archive's refusals; this module does the writing. Each member is read from where
`inspect` found its data, inflated, counted against its declared size, checked against its CRC-32, written
to a file created with O_EXCL and never through a link, and its sha256 taken from the bytes as written, so
that nothing has to read the file back for its fingerprint.

Python runs one thread at a time: two threads writing 10,000 small files spent more handing that lock to
each other than they saved (a 9,990-file package unpacked in 0.35 s with two threads, 0.32 s with one).
A second process has a lock of its own. From SECOND_PROCESS_MIN_FILES members on, `write_members` starts
this file as a program (``python -I -S unpack.py``: the standard library only, no site packages, nothing
of the service imported) and hands it the last members (FIRST_SHARE are its own) through a memfd, with the descriptors
of the archive and of the destination folder; it writes them while this process writes the first ones, and
reports each file's digest, or the first member it could not write and why, through another memfd. It
checks between files that its parent is still there and stops when it is not; its parent stops it on its
own first error, and stops writing at the child's first error. Nothing else crosses: the child opens no
path by name but the folders below the descriptor it was given, each segment without following a link.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import marshal
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence

CHUNK_SIZE = 1 << 20  # a member up to this size, packed and unpacked, is read, inflated and written at once
OPEN_FOLDERS = 64  # folder descriptors kept open while writing, by each process
PROGRESS_BYTES = 1 << 20  # bytes of small files written between two reports of progress
# From this many members on, a second process writes some of them: below, its start (some 15 ms of a
# Python's) would cost more than it saves.
SECOND_PROCESS_MIN_FILES = 1024
# The share of the members this process writes: a little more than half, as the second one starts later (on
# the bench machine, this process waited for it some 25 ms at an even split of 10,000 small files).
FIRST_SHARE = 0.55
CHECK_CHILD_EVERY = 256  # members this process writes between two looks at whether the second one failed

FILE_MODE = 0o644
EXECUTABLE_MODE = 0o755
FOLDER_MODE = 0o755

FOLDER_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_MEMBER_FAILED = 3  # the second process's exit status when a member failed (its report says which and why)

# One member to write: its folder's path segments, its file name, where its data starts in the archive, its
# packed size, whether it is deflated (else stored), its CRC-32, its unpacked size and whether it is executable.
# A plain tuple: it crosses to the second process with marshal.
Member = tuple[tuple[str, ...], str, int, int, bool, int, int, bool]


class Refused(Exception):
    """A member's data is not what the archive declares (its size, its CRC-32, its end); the text says how."""


class MemberFailed(Exception):
    """Writing member `index` (of the sequence given) raised `error`."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(index, error)
        self.index = index
        self.error = error


class UnpackerFailed(Exception):
    """The second process ended without a report: killed, or a fault of its own (its stderr's end is quoted)."""


# --- writing -----------------------------------------------------------------------


def write_members(archive_fd: int, root_fd: int, members: Sequence[Member],
                  advance: Callable[[int], None] = lambda count: None) -> list[str]:
    """Write every member under `root_fd` (its folders already made); return their sha256s (hex), in order.

    `advance` is told of the bytes written as they go. The first member that fails raises MemberFailed.
    From SECOND_PROCESS_MIN_FILES members on, a second process writes the last ones (see the docstring).
    """
    if len(members) < SECOND_PROCESS_MIN_FILES or not hasattr(os, "memfd_create"):
        return _write_run(archive_fd, root_fd, members, advance)
    cut = int(len(members) * FIRST_SHARE)
    import logging  # here, not above: the second process, which runs this file, starts without it (15 ms)

    try:
        child = _SecondProcess(archive_fd, root_fd, members[cut:])
    except OSError as error:  # no memfd, no Python to start (an embedded interpreter), no descriptor left
        logging.getLogger(__name__).warning("writing %d files in one process: the second could not be started: %s",
                                            len(members), error)
        return _write_run(archive_fd, root_fd, members, advance)
    try:
        first = _write_run(archive_fd, root_fd, members[:cut], advance, stop=child.failed)
    except BaseException:
        child.stop()
        raise
    second = child.result(offset=cut)
    advance(sum(member[6] for member in members[cut:]))
    return first + second


def _write_run(archive_fd: int, root_fd: int, members: Sequence[Member], advance: Callable[[int], None],
               stop: Callable[[], bool] = lambda: False) -> list[str]:
    """Write `members` in this process, in order; stop early (returning what was written) once `stop()` says so."""
    folders = OpenFolders(root_fd)
    digests: list[str] = []
    counted = 0  # bytes of small files not yet told to `advance`
    try:
        for index, member in enumerate(members):
            if index % CHECK_CHILD_EVERY == CHECK_CHILD_EVERY - 1 and stop():
                break
            try:
                digests.append(_write_file(archive_fd, folders.get(member[0]), member, advance))
            except BaseException as error:
                raise MemberFailed(index, error) from error
            if member[6] <= CHUNK_SIZE and member[3] <= CHUNK_SIZE:  # a larger one told its bytes as it went
                counted += member[6]
                if counted >= PROGRESS_BYTES:
                    advance(counted)
                    counted = 0
        advance(counted)
    finally:
        folders.close()
    return digests


def _write_file(archive_fd: int, folder_fd: int, member: Member, advance: Callable[[int], None]) -> str:
    """Create the member's file in `folder_fd` and write it; return the sha256 (hex) of what it holds."""
    _folder, name, _start, packed_size, _deflated, _crc, size, executable = member
    file_fd = os.open(name, FILE_OPEN_FLAGS, FILE_MODE, dir_fd=folder_fd)
    try:
        # The zip's run bit is kept, as eKuiper keeps the entry's mode; the rest is fixed, whatever the umask.
        os.fchmod(file_fd, EXECUTABLE_MODE if executable else FILE_MODE)
        if size <= CHUNK_SIZE and packed_size <= CHUNK_SIZE:
            # A small member (most of a package of many files) in one read, one inflate and one write.
            data = _small_member(archive_fd, member)
            _write_all(file_fd, data)
            return hashlib.sha256(data).hexdigest()
        digest, offset = hashlib.sha256(), 0
        for chunk in checked_chunks(archive_fd, member):
            digest.update(chunk)
            _write_all(file_fd, chunk)
            _start_writeback(file_fd, offset, len(chunk))
            offset += len(chunk)
            advance(len(chunk))
        return digest.hexdigest()
    finally:
        os.close(file_fd)


_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages out, without waiting for them


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing `length` bytes at `offset` to disk now, and return at once.

    A large member is written a chunk at a time while the next is inflated, and the install flushes it
    only once everything is staged: a 5 MB plugin's fsync then waited for all 5 MB (6 ms on the bench
    machine). Started chunk by chunk, the writing overlaps the inflating, and the flush waits for the last
    chunk alone. Nothing is promised here: the fsync still decides. Where libc has no sync_file_range(2),
    this does nothing.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is not None:
        sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only leaves it to the fsync


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2), looked up once per process; None where there is none."""
    try:
        import ctypes  # here, not above: only a member larger than a chunk needs it

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def _small_member(archive_fd: int, member: Member) -> bytes:
    """What `checked_chunks` yields, at once, for a member of at most CHUNK_SIZE bytes, packed and unpacked."""
    _folder, _name, start, packed_size, deflated, _crc, size, _executable = member
    packed = os.pread(archive_fd, packed_size, start)
    if len(packed) < packed_size:
        raise Refused("is corrupt: the archive ends inside its data")
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(packed, size + 1)  # one byte more than declared shows a lie
        if len(data) <= size and not inflater.eof:
            data += inflater.flush()  # all input is in: what it still holds (nothing, for a whole stream)
    else:
        data = packed
    _check_unpacked(member, len(data), zlib.crc32(data))
    return data


def _check_unpacked(member: Member, size: int, crc: int) -> None:
    """Refuse a member whose bytes went past its declared size, fell short of it, or have another CRC-32."""
    declared = member[6]
    if size > declared:
        raise Refused(f"unpacks to more than the {declared} bytes declared")
    if size != declared:
        raise Refused(f"unpacks to {size} bytes, fewer than the {declared} declared")
    if crc != member[5]:
        raise Refused("is corrupt: Bad CRC-32 (what it unpacks to does not match the checksum the archive declares)")


def checked_chunks(archive_fd: int, member: Member) -> Iterator[bytes]:
    """The member's unpacked bytes, CHUNK_SIZE at most at a time, refused as soon as they go past its declared
    size, and at the end if they fell short of it or their CRC-32 differs."""
    crc = written = 0
    for chunk in _unpacked_chunks(archive_fd, member):
        written += len(chunk)
        if written > member[6]:
            _check_unpacked(member, written, crc)
        crc = zlib.crc32(chunk, crc)
        yield chunk
    _check_unpacked(member, written, crc)


def _unpacked_chunks(archive_fd: int, member: Member) -> Iterator[bytes]:
    """The member's data, read from where `inspect` found it and inflated when deflated, CHUNK_SIZE at most at a
    time. Bytes after the end of a deflate stream, within the member's packed size, are ignored, as zipfile does."""
    _folder, _name, position, packed_left, deflated, _crc, _size, _executable = member
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
    while packed_left or (inflater is not None and inflater.unconsumed_tail):
        if inflater is not None and inflater.eof:
            return
        if inflater is not None and inflater.unconsumed_tail:
            yield inflater.decompress(inflater.unconsumed_tail, CHUNK_SIZE)
            continue
        packed = os.pread(archive_fd, min(packed_left, CHUNK_SIZE), position)
        if not packed:
            raise Refused("is corrupt: the archive ends inside its data")
        position += len(packed)
        packed_left -= len(packed)
        yield packed if inflater is None else inflater.decompress(packed, CHUNK_SIZE)
    if inflater is not None and not inflater.eof:
        yield inflater.flush()  # what the last input holds beyond the last chunk's limit (all input is in)


# --- folders -----------------------------------------------------------------------


class OpenFolders:
    """The descriptors of the folders files were last written into, kept open for the next files there.

    A zip lists a tree folder by folder, so thousands of files share a few folders: opening each one
    once, not once per file, saves walking (and trying to make) the same path again and again. At most
    OPEN_FOLDERS stay open (the least recently used goes), well below any descriptor limit.
    """

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.open: dict[tuple[str, ...], int] = {}  # in order of use, the last used last
        self._last: tuple[tuple[str, ...], int] = ((), root_fd)

    def get(self, segments: Sequence[str]) -> int:
        """A descriptor of root/segments, made where missing and kept open: the caller must not close it."""
        key = tuple(segments)
        if key == self._last[0]:  # the folder of the file before: most files of a zip
            return self._last[1]
        if not key:
            fd = self.root_fd
        else:
            fd = self.open.pop(key, None)
            if fd is None:
                fd = open_folder(self.root_fd, key)
                if len(self.open) >= OPEN_FOLDERS:
                    os.close(self.open.pop(next(iter(self.open))))
            self.open[key] = fd
        self._last = (key, fd)
        return fd

    def close(self) -> None:
        """Close every descriptor kept open (not the root's)."""
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()
        self._last = ((), self.root_fd)


def open_folder(root_fd: int, segments: Sequence[str]) -> int:
    """Return a descriptor of root_fd/segments, creating missing folders; never follows a link.

    Returns root_fd itself when segments is empty; any other descriptor is the caller's to close.
    """
    folder_fd = root_fd
    try:
        for segment in segments:
            try:
                os.mkdir(segment, FOLDER_MODE, dir_fd=folder_fd)
                created = True
            except FileExistsError:
                created = False
            child_fd = os.open(segment, FOLDER_OPEN_FLAGS, dir_fd=folder_fd)
            if folder_fd != root_fd:
                os.close(folder_fd)
            folder_fd = child_fd
            if created:
                os.fchmod(folder_fd, FOLDER_MODE)  # whatever the umask
    except BaseException:
        if folder_fd != root_fd:
            os.close(folder_fd)
        raise
    return folder_fd


# --- the second process -------------------------------------------------------------


class _SecondProcess:
    """This file run as a program on some of the members (see the module's docstring)."""

    def __init__(self, archive_fd: int, root_fd: int, members: Sequence[Member]):
        import subprocess  # here, not above: the second process itself never needs it

        self.count = len(members)
        self.given = os.memfd_create("kuiper-plugins-unpack-members", os.MFD_CLOEXEC)
        self.report = os.memfd_create("kuiper-plugins-unpack-report", os.MFD_CLOEXEC)
        self.errors = os.memfd_create("kuiper-plugins-unpack-errors", os.MFD_CLOEXEC)
        try:
            _write_all(self.given, marshal.dumps(list(members)))
            fds = (archive_fd, root_fd, self.given, self.report)
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), *map(str, fds), str(os.getpid())],
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.errors,
                close_fds=True, cwd="/", env={"LC_ALL": "C.UTF-8"},
            )
        except BaseException:
            self._close()
            raise

    def failed(self) -> bool:
        """Whether it has already ended on a member it could not write (then this process stops writing too)."""
        return self.proc.poll() == _MEMBER_FAILED

    def stop(self) -> None:
        """Kill it and reap it (this process failed first)."""
        self.proc.kill()
        self.proc.wait()
        self._close()

    def result(self, offset: int) -> list[str]:
        """Wait for it; its digests, or MemberFailed with the index among all members (`offset` + its own)."""
        try:
            status = self.proc.wait()
            report = _read_all(self.report)
        finally:
            errors = _read_all(self.errors)
            self._close()
        try:
            outcome = marshal.loads(report) if report else None
        except (EOFError, ValueError, TypeError):
            outcome = None
        if status == 0 and isinstance(outcome, list) and len(outcome) == self.count:
            return outcome
        if status == _MEMBER_FAILED and isinstance(outcome, tuple) and len(outcome) == 5:
            index, kind, detail, number, filename = outcome
            raise MemberFailed(offset + index, _rebuilt(kind, detail, number, filename))
        said = errors.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise UnpackerFailed(f"the second unpacking process ended with status {status} without its report"
                             f"{': ' + ' | '.join(said) if said else ''}")

    def _close(self) -> None:
        for fd in (self.given, self.report, self.errors):
            if fd >= 0:
                os.close(fd)
        self.given = self.report = self.errors = -1


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _described(error: BaseException) -> tuple[str, str, int | None, str | None]:
    """What crosses back of a member's failure: its kind, its text, an OSError's errno and file name."""
    if isinstance(error, Refused):
        return "refused", str(error), None, None
    if isinstance(error, zlib.error):
        return "zlib", str(error), None, None
    if isinstance(error, OSError):
        return "os", error.strerror or str(error), error.errno, error.filename
    return "other", f"{type(error).__name__}: {error}", None, None


def _rebuilt(kind: str, detail: str, number: int | None, filename: str | None) -> BaseException:
    """The exception the second process met, as this one would have met it."""
    if kind == "refused":
        return Refused(detail)
    if kind == "zlib":
        return zlib.error(detail)
    if kind == "os":
        return OSError(number or errno.EIO, detail, filename) if filename else OSError(number or errno.EIO, detail)
    return UnpackerFailed(f"the second unpacking process failed: {detail}")


def _main(arguments: list[str]) -> int:
    """The second process: write the members handed over; report their digests, or the first failure."""
    archive_fd, root_fd, given, report, parent = (int(argument) for argument in arguments)
    members = marshal.loads(_read_all(given))

    def parent_gone() -> bool:  # re-parented: the service's worker died, and nobody waits for these files
        return os.getppid() != parent

    try:
        digests = _write_run(archive_fd, root_fd, members, lambda count: None, stop=parent_gone)
    except MemberFailed as failure:
        _write_all(report, marshal.dumps((failure.index, *_described(failure.error))))
        return _MEMBER_FAILED
    if len(digests) < len(members):
        return 1  # stopped: its parent is gone
    _write_all(report, marshal.dumps(digests))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
