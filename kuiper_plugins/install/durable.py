"""Making files and folders durable, and fingerprinting what was written.

A rename survives a power cut only once the folder holding the new name is
fsynced, and the renamed file keeps its bytes only if they were fsynced
before the rename. The installer calls `seal` on everything it is about to
move into place, `sync_folders` on every folder a move touched, and only
then commits; `fingerprint` is what the registry records of each file.

A package of many files is sealed in two passes: every file is read for its
fingerprint, then all of them are flushed at once. One fsync per file costs
a journal commit each (ten thousand of them for a Python plugin with its
dependencies vendored); one syncfs(2) of the file system holding them makes
every byte and every name durable with a single commit (`FileSystemSync`).
Few files, or a file system where that is not known to hold, keep one fsync
per file and folder; those are issued several at a time (`fsync_each`): the
file system commits fsyncs that wait together in one journal commit, where
one after the other each waits for its own. The threads that issue them are
kept for the process's life, and the flush of an install's files can run
while its caller writes the journal that must be durable with them
(`Unflushed.flush`): one wait for the disk, where there were two.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# From this many files and folders on, one syncfs; below, an fsync each. A syncfs also waits for whatever
# else is waiting to be written on the file system (another process's large write), where fsyncs cost only
# what the operation wrote, and a few of them cost little (on the bench machine, 64 new 2 KiB files took
# 80 to 280 ms to fsync one by one, one syncfs 7 to 15 ms; 4 of them 6 to 37 ms).
SYNCFS_MIN_ENTRIES = 64
# File systems whose syncfs is known to commit everything written before it, names included (statfs
# f_type): ext2/3/4 (the journal is committed and waited for), XFS (the log is forced), Btrfs (the
# transaction is committed). Anywhere else (FUSE, network or stacked file systems) each file is fsynced.
SYNCFS_FILE_SYSTEMS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs"}
# syncfs reports writeback errors (EIO, ENOSPC) only since Linux 5.8; before, it returned 0 regardless.
SYNCFS_MIN_KERNEL = (5, 8)
# At most this many fsyncs waiting at once (`fsync_each`): a small install's files, or its folders, all go
# together (on the bench machine, with a test run beside it, 3 new 16 KiB files took a median of 0.75 to 8.2 ms
# to fsync one by one over three tries, 0.49 to 0.68 ms at once: one by one, each waits for its own commit).
FSYNC_THREADS = 8


@dataclass(frozen=True)
class Fingerprint:
    """Size and sha256 of a file; of a folder, its total size and the sha256 of its sorted listing."""

    size: int
    sha256: str


def fsync_path(path: Path | str) -> None:
    """Flush one file's or folder's data and metadata to disk (links are not followed)."""
    # O_NONBLOCK: a FIFO swapped in for a file is refused by fsync (EINVAL) instead of hanging the open.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    if os.path.isdir(path) and not os.path.islink(path):
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_each(paths: Sequence[Path | str], alongside: Callable[[], None] | None = None) -> None:
    """`fsync_path` each path, up to FSYNC_THREADS at once; return when all are done, raising the first error.

    The fsyncs are shared out among this process's fsync threads (kept; see `_FsyncThreads`) and this one;
    with `alongside`, this thread runs it meanwhile instead. Every fsync is waited for, even after another
    failed, or `alongside` did.
    """
    lanes = [paths[first::FSYNC_THREADS] for first in range(min(FSYNC_THREADS, len(paths)))]
    if alongside is None and len(lanes) < 2:
        for path in paths:
            fsync_path(path)
        return
    here = lanes.pop(0) if alongside is None else None
    futures = [_fsync_threads.submit(_fsync_lane, lane) for lane in lanes]
    _run_beside(futures, alongside or (lambda: _fsync_lane(here)))


def _fsync_lane(paths: Sequence[Path | str]) -> None:
    for path in paths:
        fsync_path(path)


def _run_beside(futures: list[Future], work: Callable[[], None]) -> None:
    """Run `work` in this thread, then wait for every future; raise work's error, else the first future's."""
    try:
        work()
    finally:
        wait(futures)
    for future in futures:
        future.result()


class _FsyncThreads:
    """This process's threads for `fsync_each` and deferred flushes, started on first use.

    Kept between calls: starting a thread for each fsync cost more than a small install's fsyncs waited
    (py-spy). A forked child (a gunicorn worker) starts its own, since threads do not cross a fork.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def submit(self, function: Callable[..., None], *args: object) -> Future:
        with self._lock:
            if self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
                self._pid = os.getpid()
            return self._pool.submit(function, *args)


_fsync_threads = _FsyncThreads()
# A fork while another thread held the lock (only for the moment of a submit) must not leave it held in the child.
os.register_at_fork(after_in_child=lambda: setattr(_fsync_threads, "_lock", threading.Lock()))


def sync_folders(folders: Iterable[Path]) -> None:
    """Fsync each folder once, so the renames and removals made in it survive a power cut."""
    fsync_each([folder for folder in sorted({Path(f) for f in folders}) if os.path.isdir(folder)])


class FileSystemSync:
    """A descriptor on an operation's staging folder, opened before the operation writes: one syncfs through
    it makes durable everything written on that file system since, in place of an fsync per file and folder.

    Why one syncfs is enough: it writes back every dirty page and inode of the whole file system holding
    the folder and waits for them, then has the file system commit its metadata (on the file systems of
    SYNCFS_FILE_SYSTEMS: the journal, the log, the transaction) with a cache flush, so every byte written
    and every name created or renamed on that file system before the call is on disk when it returns: what
    an fsync of each file and of each folder holding a new name gives, all at once. It covers only that
    file system: `seal` compares each entry's device with the folder's and fsyncs any that is elsewhere
    (the staging folder and the destinations share one file system, or the moves into place could not be
    renames). And it tells of a failed write through the descriptor's own error cursor, which starts when
    the descriptor is opened (Linux 5.8 on): opened before the first write, it misses no error, even one
    another process's syncfs has already seen.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.device = os.fstat(self.fd).st_dev
            self.file_system = _file_system_type(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.usable = self.file_system in SYNCFS_FILE_SYSTEMS and _kernel() >= SYNCFS_MIN_KERNEL \
            and _syncfs is not None

    def covers(self, device: int) -> bool:
        """Whether one syncfs through this descriptor flushes what lives on `device`."""
        return self.usable and device == self.device

    def sync(self) -> None:
        """Flush the whole file system: every write since the descriptor was opened; raise OSError if one failed."""
        if _syncfs is None or _syncfs(self.fd) != 0:
            code = ctypes.get_errno() if _syncfs is not None else errno.ENOSYS
            raise OSError(code, os.strerror(code), f"syncfs of the file system holding {self.folder}")

    def close(self) -> None:
        """Close the descriptor (the operation is over)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _load_syncfs():
    """libc's syncfs, which the os module does not wrap; None where libc has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _load_fstatfs():
    try:
        function = ctypes.CDLL(None, use_errno=True).fstatfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()
_fstatfs = _load_fstatfs()


def _file_system_type(fd: int) -> int | None:
    """statfs's f_type (the file system's magic number) of the one holding `fd`; None when unknown."""
    if _fstatfs is None:
        return None
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buffer) != 0:
        return None
    return struct.unpack_from("@l", buffer.raw)[0] & 0xFFFFFFFF  # f_type comes first (a long)


def _kernel() -> tuple[int, int]:
    numbers = os.uname().release.split("-")[0].split(".")
    try:
        return int(numbers[0]), int(numbers[1])
    except (IndexError, ValueError):
        return (0, 0)


def seal_all(
    paths: Iterable[Path], batch: FileSystemSync | None = None, *, unread: Collection[Path] = (),
) -> list[Fingerprint | None]:
    """`seal` each path; the fingerprints come back in the order of `paths`.

    With `batch`, every file is read first and all are made durable together at the end (see `seal`).
    A path in `unread` is made durable with the others but not read, and its fingerprint is None: for
    a tree that will change before it is recorded (a portable plugin's folder, which install.sh and the
    handshake run in), whose fingerprint is taken then.
    """
    prints, unflushed = read_all(paths, batch, unread=unread)
    unflushed.flush()
    return prints


def read_all(
    paths: Iterable[Path], batch: FileSystemSync | None, *, unread: Collection[Path] = (),
    known: Mapping[Path, Fingerprint] | None = None,
) -> tuple[list[Fingerprint | None], Unflushed]:
    """`seal_all` with `batch`, but with the flush left to the caller: `Unflushed.flush` does it.

    `known` gives the fingerprints of files whose content the caller knows (it wrote them, and nothing
    can have written since): such a file is made durable with the others but not read, when it is still
    a regular file of the known size (see `read_fingerprint`).
    """
    pending: list[_Entry] = []
    prints: list[Fingerprint | None] = []
    for path in paths:
        if path in unread:
            _add_unread(path, pending)
            prints.append(None)
        elif known is not None and path in known and _add_known(path, known[path], pending, batch is not None):
            prints.append(known[path])
        else:
            prints.append(_seal(path, pending if batch is not None else None))
    return prints, Unflushed(pending, batch)


def _add_known(path: Path, print_: Fingerprint, pending: list[_Entry], batched: bool) -> bool:
    """Add a file of known content to `pending` (or fsync it, unbatched); False, doing nothing, when it is
    not a regular file of the known size (it is then read)."""
    status = os.lstat(path)
    if not stat.S_ISREG(status.st_mode) or status.st_size != print_.size:
        return False
    if batched:
        pending.append(_Entry(os.fspath(path), status.st_dev))
    else:
        fsync_path(path)
    return True


def seal(path: Path, batch: FileSystemSync | None = None) -> Fingerprint:
    """Fsync a file, or every file and folder of a tree, and return its fingerprint.

    Each regular file is read once for its digest; links are fingerprinted by their target text and never
    followed. Without `batch`, each file is fsynced through the descriptor it was read by, and each folder
    in turn. With `batch` (opened before any of them was written), every file is read first, then all are
    flushed at once: by one syncfs when there are SYNCFS_MIN_ENTRIES or more and the batch's file system
    holds them all, otherwise by an fsync of each file, then of each folder.
    """
    pending: list[_Entry] = []
    print_ = _seal(path, pending if batch is not None else None)
    _flush(pending, batch)
    return print_


@dataclass(frozen=True)
class Unflushed:
    """Files and folders read by `read_all` and not yet made durable."""

    entries: list[_Entry]
    batch: FileSystemSync | None

    def flush(self, alongside: Callable[[], None] | None = None) -> None:
        """Make them all durable (see `seal`); with `alongside`, run it in this thread meanwhile (the writing of
        the journal that must be durable with them, before anything moves); return when both are done."""
        _flush(self.entries, self.batch, alongside)


@dataclass(frozen=True)
class _Entry:
    """A file or folder read but not yet flushed, and the device it lives on."""

    path: str
    device: int
    is_dir: bool = False


def _seal(path: Path, pending: list[_Entry] | None) -> Fingerprint:
    """Fingerprint `path`, fsyncing as it goes, or, given `pending`, adding what needs a flush to it."""
    status = os.lstat(path)
    if stat.S_ISDIR(status.st_mode):
        return _tree(path, sync=True, pending=pending)
    if stat.S_ISLNK(status.st_mode):
        return _link(path)
    return _file(path, sync=True, pending=pending)


def _add_unread(path: Path, pending: list[_Entry]) -> None:
    """Add a file, or every file and folder of a tree, to `pending` without reading any (links need nothing).

    Such a tree is one this service has just unpacked into its own staging folder, so every file and folder
    in it is on the tree's own file system (only root could mount something inside it meanwhile): the kind of
    each entry is known from its folder's listing, without a stat call per file (they were a twentieth of the
    time a package of 10,000 files took to install).
    """
    status = os.lstat(path)
    if stat.S_ISREG(status.st_mode):
        pending.append(_Entry(os.fspath(path), status.st_dev))
    if not stat.S_ISDIR(status.st_mode):
        return
    device = status.st_dev
    folders = [os.fspath(path)]
    pending.append(_Entry(folders[0], device, is_dir=True))
    while folders:  # bounded: each folder of the tree is listed once
        with os.scandir(folders.pop()) as listing:
            for child in listing:
                if child.is_dir(follow_symlinks=False):
                    folders.append(child.path)
                    pending.append(_Entry(child.path, device, is_dir=True))
                elif child.is_file(follow_symlinks=False):
                    pending.append(_Entry(child.path, device))


def _flush(pending: list[_Entry], batch: FileSystemSync | None,
           alongside: Callable[[], None] | None = None) -> None:
    """Make every pending file, then every pending folder, durable: by one syncfs, or one by one; run
    `alongside` in this thread while the files' flush runs."""
    if not pending:
        if alongside is not None:
            alongside()
        return
    if batch is not None and len(pending) >= SYNCFS_MIN_ENTRIES \
            and all(batch.covers(entry.device) for entry in pending):
        if alongside is None:
            batch.sync()
        else:
            _run_beside([_fsync_threads.submit(batch.sync)], alongside)
        return
    if batch is not None and len(pending) >= SYNCFS_MIN_ENTRIES:
        log.info("fsyncing %d files and folders one by one: %s", len(pending),
                 "not all on the staging folder's file system" if batch.usable
                 else "syncfs is not known to commit everything on this file system or kernel")
    # Files first, then their folders: a folder's fsync makes its names durable, its files' fsyncs their bytes.
    fsync_each([entry.path for entry in pending if not entry.is_dir], alongside)
    fsync_each([entry.path for entry in pending if entry.is_dir])


def read_fingerprint(path: Path, *, known: Mapping[str, Fingerprint] | None = None) -> Fingerprint:
    """The fingerprint of what is at `path` now, without syncing anything; OSError where it cannot be read.

    `known` gives, for a tree, the fingerprints of files whose content the caller knows (it wrote them and
    nothing can have written since), by path relative to the tree: such a file is not read when its size is
    the known one. Every file is still looked at (kind, mode, size), and any other file is read.
    """
    if known:
        status = os.lstat(path)
        if stat.S_ISDIR(status.st_mode):
            return _tree(path, sync=False, known=known)
    return _seal(path, pending=[])  # collects what a flush would need, and flushes none of it


def fingerprint(path: Path) -> Fingerprint | None:
    """The fingerprint of what is at `path` now, without syncing anything; None when it cannot be read."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            return _tree(path, sync=False)
        if stat.S_ISLNK(mode):
            return _link(path)
        if not stat.S_ISREG(mode):
            return None
        return _file(path, sync=False)
    except OSError:
        return None


def _link(path: Path | str) -> Fingerprint:
    target = os.readlink(path).encode("utf-8", "surrogateescape")
    return Fingerprint(len(target), hashlib.sha256(target).hexdigest())


def _file(path: Path | str, *, sync: bool, pending: list[_Entry] | None = None) -> Fingerprint:
    """A file's fingerprint; with `sync`, fsynced through the same descriptor, or added to `pending` when given."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):  # swapped since the lstat: a FIFO or device never ends
            raise OSError(errno.EINVAL, "not a regular file any more", str(path))
        digest, size = hashlib.sha256(), 0
        while chunk := os.read(fd, CHUNK_SIZE):
            size += len(chunk)
            digest.update(chunk)
        if sync and pending is not None:
            pending.append(_Entry(os.fspath(path), status.st_dev))
        elif sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return Fingerprint(size, digest.hexdigest() if size else _EMPTY_SHA256)


def _tree(root: Path, *, sync: bool, pending: list[_Entry] | None = None,
          known: Mapping[str, Fingerprint] | None = None) -> Fingerprint:
    """A folder's fingerprint: one line per entry (path, kind, mode, size, digest), sorted, hashed.

    With `sync`, every file and folder is fsynced, or added to `pending` when given. A file in `known` (by
    path relative to `root`) whose size is the known one is not read (see `read_fingerprint`). Paths are
    plain strings here: building a Path per entry costs more than reading a small file.
    """
    top = os.fspath(root)
    lines: list[str] = []
    total = 0
    folders = [top]
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        prefix = folder[len(top) + 1:] + "/" if folder != top else ""
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            path = os.path.join(folder, name)
            status = os.lstat(path)
            mode = status.st_mode
            if stat.S_ISLNK(mode):
                print_ = _link(path)
                kind = "link"
            elif stat.S_ISREG(mode):
                print_ = known.get(prefix + name) if known else None
                if print_ is None or print_.size != status.st_size:
                    print_ = _file(path, sync=sync, pending=pending)
                kind = "file"
            else:
                print_ = Fingerprint(0, _EMPTY_SHA256)
                kind = "special"
            total += print_.size
            lines.append(f"{prefix}{name}\0{kind}\0{stat.S_IMODE(mode):o}\0{print_.size}\0{print_.sha256}\n")
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                folders.append(path)
                lines.append(f"{prefix}{name}/\0dir\n")
    if sync and pending is not None:
        pending += [_Entry(folder, os.lstat(folder).st_dev, is_dir=True) for folder in folders]
    elif sync:
        for folder in folders:
            fsync_path(folder)
    digest = hashlib.sha256("".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()
    return Fingerprint(total, digest)
