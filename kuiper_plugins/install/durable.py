"""Making files and folders durable, and fingerprinting what was written.

A rename survives a power cut only once the folder holding the new name is
fsynced, and the renamed file keeps its bytes only if they were fsynced
before the rename. The installer calls `seal` on everything it is about to
move into place, `sync_folders` on every folder a move touched, and only
then commits; `fingerprint` is what the registry records of each file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHUNK_SIZE = 1024 * 1024
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Size and sha256 of a file; of a folder, its total size and the sha256 of its sorted listing."""

    size: int
    sha256: str


def fsync_path(path: Path) -> None:
    """Flush one file's or folder's data and metadata to disk (links are not followed)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    if os.path.isdir(path) and not os.path.islink(path):
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folders(folders: Iterable[Path]) -> None:
    """Fsync each folder once, so the renames and removals made in it survive a power cut."""
    for folder in sorted({Path(f) for f in folders}):
        if os.path.isdir(folder):
            fsync_path(folder)


def seal_all(paths: Iterable[Path]) -> list[Fingerprint]:
    """`seal` each path in turn; the fingerprints come back in the order of `paths`."""
    return [seal(path) for path in paths]


def seal(path: Path) -> Fingerprint:
    """Fsync a file, or every file and folder of a tree, and return its fingerprint.

    Each regular file is read once for its digest and fsynced through the same descriptor; links
    are fingerprinted by their target text and never followed.
    """
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode):
        return _tree(path, sync=True)
    if stat.S_ISLNK(mode):
        return _link(path)
    return _file(path, sync=True)


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


def _link(path: Path) -> Fingerprint:
    target = os.readlink(path).encode("utf-8", "surrogateescape")
    return Fingerprint(len(target), hashlib.sha256(target).hexdigest())


def _file(path: Path, *, sync: bool) -> Fingerprint:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the lstat: a FIFO or device never ends
            raise OSError(errno.EINVAL, "not a regular file any more", str(path))
        digest, size = hashlib.sha256(), 0
        while chunk := os.read(fd, CHUNK_SIZE):
            size += len(chunk)
            digest.update(chunk)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return Fingerprint(size, digest.hexdigest() if size else _EMPTY_SHA256)


def _tree(root: Path, *, sync: bool) -> Fingerprint:
    """A folder's fingerprint: one line per entry (path, kind, mode, size, digest), sorted, hashed."""
    lines: list[str] = []
    total = 0
    folders = [root]
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            path = Path(folder, name)
            mode = os.lstat(path).st_mode
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                print_ = _link(path)
                kind = "link"
            elif stat.S_ISREG(mode):
                print_ = _file(path, sync=sync)
                kind = "file"
            else:
                print_ = Fingerprint(0, _EMPTY_SHA256)
                kind = "special"
            total += print_.size
            lines.append(f"{relative}\0{kind}\0{stat.S_IMODE(mode):o}\0{print_.size}\0{print_.sha256}\n")
        for name in dirs:
            path = Path(folder, name)
            if not os.path.islink(path):
                folders.append(path)
                lines.append(f"{path.relative_to(root).as_posix()}/\0dir\n")
    if sync:
        for folder in folders:
            fsync_path(folder)
    digest = hashlib.sha256("".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()
    return Fingerprint(total, digest)
