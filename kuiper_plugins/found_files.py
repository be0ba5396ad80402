"""Reading files found in the tree, which eKuiper, a user or a package put there and nobody checked.

A name under KUIPER_HOME may hold anything: a FIFO whose open() waits for a writer that never comes, a
socket, a device that never ends, a link to somewhere else, a file of gigabytes. Start-up reads such
files (portable descriptors, journals, config copies, settings) before it can answer anyone, so one of
them must never be able to hold it. Every read here therefore:

- looks at the name first (lstat, or stat where a link is expected) and opens nothing but a regular file,
  so no device or FIFO is ever opened for what its open alone would do;
- opens without blocking (O_NONBLOCK: a FIFO swapped in meanwhile opens at once) and, where no link is
  expected, without following one (O_NOFOLLOW);
- checks the opened descriptor (fstat), not the name, so that nothing swapped in between is read;
- reads at most the stated number of bytes, and refuses a larger file rather than cutting it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class NotARegularFile(OSError):
    """A file found in the tree is a folder, a link, a FIFO, a socket or a device where a file was expected."""


class FileTooLarge(OSError):
    """A file found in the tree is larger than a read of it may take."""


def kind_of(mode: int) -> str:
    """What a file of this mode is, in words: `regular file`, `FIFO`, `symbolic link`, ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((word for test, word in _KINDS if test(mode)), "special file")


def open_regular(path: Path | str, *, follow_links: bool = False) -> int:
    """Open a regular file read-only without blocking and return its descriptor; refuse anything else.

    Raise NotARegularFile for a folder, FIFO, socket or device (and for a link unless `follow_links`),
    and OSError when it cannot be opened at all.
    """
    mode = (os.stat(path) if follow_links else os.lstat(path)).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is a {kind_of(mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or a socket since the lstat
            raise NotARegularFile(f"{path} is no longer a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is a {kind_of(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, max_bytes: int, *, follow_links: bool = False) -> bytes:
    """Return the bytes of a regular file of at most `max_bytes`; refuse anything else (see `open_regular`)."""
    fd = open_regular(path, follow_links=follow_links)
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise FileTooLarge(f"{path} is larger than {max_bytes} bytes")
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - size)):  # a file growing meanwhile
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise FileTooLarge(f"{path} is larger than {max_bytes} bytes")
    return b"".join(chunks)
