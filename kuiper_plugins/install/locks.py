"""Per-plugin locks shared by every worker process: flock on a file under the layout's locks folder.

The kernel drops a flock when its holder dies, so a SIGKILLed worker never
leaves a stale lock behind; holding the lock is also the proof that nobody
else is working on that plugin, which start-up recovery relies on.

A plugin's lock file exists only while the lock is held: the holder removes
it before letting go, so refused and finished operations leave no file per
name. Whoever takes a lock checks, after flock, that the file it locked is
still the one at the path (not one a releasing holder just unlinked), and
otherwise tries again; a dead holder's file is removed by start-up.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kuiper_plugins.errors import PluginBusy

_LONGEST_KEY = 200  # "<type>.<key>.lock" stays well inside 255 bytes
_ATTEMPTS = 100  # a lock file removed under us this often in a row means it is in heavy use: busy


class PluginLock:
    """An exclusive, non-blocking lock on one (type, name), released by `release` or process death."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; return whether it was taken."""
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            if _same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)  # its holder removed it as we opened it: the lock is free, take it anew
        return False

    def release(self) -> None:
        """Remove the lock file, then let go of the lock."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def acquire_or_refuse(self, description: str) -> PluginLock:
        if not self.try_acquire():
            raise PluginBusy(f"{description} is busy: another install, update or delete of it is in progress")
        return self

    def __enter__(self) -> PluginLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def plugin_lock(locks_dir: Path, plugin_type: str, name: str) -> PluginLock:
    """The lock of one plugin; names differing only in case share it, as they share a registry key.

    A name too long for a file name of its own is locked under its digest.
    """
    key = name.lower()
    if len(key) > _LONGEST_KEY:
        key = "sha256-" + hashlib.sha256(key.encode()).hexdigest()
    return PluginLock(locks_dir / f"{plugin_type}.{key}.lock")


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for a with-block, waiting for it, by the plugin locks' rules.

    As for a plugin's lock, the file exists only while the lock is held (whoever finds it unlinked after
    flock tries again), so a lock taken and let go leaves nothing behind.
    """
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it as we waited: take it anew
    else:
        raise PluginBusy(f"{path.name} is busy: it was taken and let go {_ATTEMPTS} times while this waited")
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def blocking_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for a with-block, waiting for it (start-up recovery)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
