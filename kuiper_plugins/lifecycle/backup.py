"""One consistent copy of a home (registry, eKuiper's store, every recorded file), and its offline restore.

Consistency: every install, update and delete reserves its name with a registry write and ends with a
registry commit, moving files only in between. A backup therefore holds the registry's write lock (BEGIN
IMMEDIATE, which is what a reservation and a commit wait on) at a moment when no operation is in flight,
and while it holds it, it copies the registry with SQLite's online backup API, eKuiper's store the same
way, and hard-links every recorded file into a snapshot folder (copies when a root lies on another
filesystem). The installer never writes into a file in place (it renames new files over old ones), so a
hard link keeps the bytes of that moment. Writers wait only for those links (milliseconds), not for the
download: the tar.gz is streamed from the snapshot afterwards, and the snapshot removed. A snapshot left
by a killed worker is swept at start-up (its folder's flock is free).

Restore is offline: it refuses while a service holds the home's service lock (each worker and the
gunicorn master hold it shared for their lifetime), takes that lock itself, puts the registry, eKuiper's
store (only when the home has none: that file is eKuiper's) and every recorded file in place, runs
start-up recovery on the result (which also projects our rows into eKuiper's store), then verifies.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import shutil
import sqlite3
import stat
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from kuiper_plugins import __version__
from kuiper_plugins.engine import kv
from kuiper_plugins.errors import RegistryUnavailable
from kuiper_plugins.install import durable
from kuiper_plugins.install.installer import Installer, recover_home
from kuiper_plugins.layout import ROOTS, Layout
from kuiper_plugins.lifecycle import verify
from kuiper_plugins.settings import Settings
from kuiper_plugins.store import db, registry

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
REGISTRY_MEMBER = "registry/kuiper-plugins.db"
ENGINE_PREFIX = "engine/"
FILES_PREFIX = "files/"
SERVICE_LOCK = "service.lock"
QUIET_WAIT_SECONDS = 30.0  # how long a backup waits for the operations in flight to end before a 503
_QUIET_POLL_SECONDS = 0.05
_STREAM_CHUNK = 256 * 1024
MANIFEST_MAX_BYTES = 64 * 1024 * 1024


class RestoreRefused(Exception):
    """A restore that cannot go ahead; nothing was written."""


# ------------------------------------------------------------------ the service lock


def service_lock_path(layout: Layout) -> Path:
    return layout.work / SERVICE_LOCK


def hold_service_lock(layout: Layout) -> int:
    """Hold the home's service lock shared, for as long as the returned descriptor is open (waits out a restore)."""
    fd = os.open(service_lock_path(layout), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _take_exclusively(layout: Layout) -> IO[bytes] | None:
    """The service lock held exclusively, or None when a service holds it."""
    layout.work.mkdir(parents=True, exist_ok=True)
    handle = open(service_lock_path(layout), "a+b")  # noqa: SIM115 - closed by the caller
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return handle


# ------------------------------------------------------------------ taking a snapshot


@dataclass
class Snapshot:
    """A consistent copy of a home in a folder of its own, held (flock on the folder) until removed."""

    folder: Path
    manifest: dict[str, Any]
    _fd: int

    def remove(self) -> None:
        """Remove the snapshot folder, then let go of its flock (once: the stream and the response both ask)."""
        if self._fd < 0:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._fd)
        self._fd = -1


def snapshots_folder(layout: Layout) -> Path:
    return layout.work / "backups"


def sweep_snapshots(layout: Layout) -> None:
    """Remove the snapshot folders that killed workers left (one in use holds its flock)."""
    root = snapshots_folder(layout)
    if not root.is_dir():
        return
    for folder in root.iterdir():
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a backup being streamed
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
        log.info("removed %s, a backup snapshot left by a worker that stopped", folder)


def take_snapshot(installer: Installer, *, wait: float = QUIET_WAIT_SECONDS) -> Snapshot:
    """Copy the registry, eKuiper's store and every recorded file while no operation is in flight."""
    layout = installer.layout
    root = snapshots_folder(layout)
    root.mkdir(exist_ok=True)
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    snapshot = Snapshot(folder, {}, fd)
    try:
        conn = db.connect(layout.registry_file)
        try:
            _hold_quiet_registry(conn, wait)
            try:
                snapshot.manifest = _copy_home(conn, installer, folder)
            finally:
                conn.execute("ROLLBACK")  # nothing was written: the write lock was held only to keep writers out
        finally:
            conn.close()
    except BaseException:
        snapshot.remove()
        raise
    return snapshot


def _hold_quiet_registry(conn: sqlite3.Connection, wait: float) -> None:
    """Take the registry's write lock at a moment no operation is in flight (BEGIN IMMEDIATE, left open)."""
    deadline = time.monotonic() + wait
    logged = False
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            in_flight = conn.execute("SELECT COUNT(*) FROM operations").fetchone()[0]
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise db.unavailable(exc) from None
        if not in_flight:
            return
        conn.execute("ROLLBACK")  # let the operations in flight commit
        if not logged:
            log.info("backup waits for %d operation(s) in flight to end", in_flight)
            logged = True
        if time.monotonic() >= deadline:
            raise RegistryUnavailable(
                f"backup error: {in_flight} install, update or delete operation(s) still in flight after"
                f" {wait:g} s (a backup holds no half operation; retry when they have ended)")
        time.sleep(_QUIET_POLL_SECONDS)  # an operation ends when its download and moves are done


def _copy_home(conn: sqlite3.Connection, installer: Installer, folder: Path) -> dict[str, Any]:
    """Copy the registry, eKuiper's store and the recorded files into `folder`; return the manifest."""
    layout = installer.layout
    registry_copy = folder / REGISTRY_MEMBER
    registry_copy.parent.mkdir()
    # From a second connection: a backup read through the one holding the write lock never ends (SQLITE_BUSY),
    # and in WAL mode a reader sees the last commit, which no writer can move while that lock is held.
    reader = db.connect(layout.registry_file)
    try:
        _sqlite_copy(reader, registry_copy)
    finally:
        reader.close()
    engine_name = None
    engine_file = installer.engine_store.path
    if engine_file.exists():
        engine_name = ENGINE_PREFIX + engine_file.name
        (folder / ENGINE_PREFIX).mkdir()
        source = sqlite3.connect(f"file:{engine_file}?mode=ro", uri=True, timeout=db.BUSY_TIMEOUT_SECONDS)
        try:
            _sqlite_copy(source, folder / engine_name)
        finally:
            source.close()
    files, missing = [], []
    for path in sorted(registry.all_recorded_files(conn)):
        source_path = layout.absolute(path)
        if not os.path.lexists(source_path):
            missing.append(path)
            continue
        _link_tree(source_path, folder / FILES_PREFIX / path)
        files.append(path)
    return {"format": FORMAT, "createdAt": time.time(), "serviceVersion": __version__,
            "registry": REGISTRY_MEMBER, "engineStore": engine_name, "files": files, "missing": missing}


def _sqlite_copy(source: sqlite3.Connection, target: Path) -> None:
    """Copy a database with SQLite's online backup API (a consistent copy while others read and write)."""
    dest = sqlite3.connect(target)
    try:
        source.backup(dest)
    finally:
        dest.close()


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link a file (a folder: each of its files) to `target`; copy across filesystems; keep links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = os.lstat(source).st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(mode):
        target.mkdir()
        for entry in sorted(os.listdir(source)):
            _link_tree(source / entry, target / entry)
        shutil.copystat(source, target, follow_symlinks=False)
    elif stat.S_ISREG(mode):
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(source, target, follow_symlinks=False)
    # a FIFO, socket or device is nothing an install wrote: left out


# ------------------------------------------------------------------ streaming it


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out by the generator that streams them."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out, self.buffer = bytes(self.buffer), bytearray()
        return out


def stream(snapshot: Snapshot) -> Iterator[bytes]:
    """The snapshot as a tar.gz, chunk by chunk; the snapshot is removed once it has been sent (or not)."""
    try:
        chunks = _Chunks()
        with tarfile.open(fileobj=chunks, mode="w|gz") as tar:
            manifest = json.dumps(snapshot.manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(manifest))
            members = [snapshot.manifest["registry"], snapshot.manifest["engineStore"]]
            members += [FILES_PREFIX + path for path in snapshot.manifest["files"]]
            for member in filter(None, members):
                for path in _walk(snapshot.folder / member):
                    tar.add(path, arcname=path.relative_to(snapshot.folder).as_posix(), recursive=False)
                    if len(chunks.buffer) >= _STREAM_CHUNK:
                        yield chunks.take()
        yield chunks.take()
    finally:
        snapshot.remove()


def _walk(path: Path) -> Iterator[Path]:
    yield path
    if path.is_dir() and not path.is_symlink():
        for entry in sorted(path.iterdir()):
            yield from _walk(entry)


# ------------------------------------------------------------------ restoring


def restore(archive: Path, settings: Settings) -> list[verify.Problem]:
    """Put a backup's registry, store and files into an offline home, settle it, and verify it."""
    layout = Layout.of(settings)
    layout.create()
    held = _take_exclusively(layout)
    if held is None:
        raise RestoreRefused(f"kuiper-plugins is running on {settings.home} (it holds"
                             f" {service_lock_path(layout)}): stop it before a restore")
    try:
        if layout.registry_file.exists():
            raise RestoreRefused(f"{layout.registry_file} exists: a restore goes into a home without a"
                                 " registry (move the old one aside first)")
        unpacked = layout.work / f"restore-{uuid.uuid4().hex}"
        try:
            manifest = _unpack(archive, unpacked)
            _put_in_place(layout, settings, unpacked, manifest)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
        installer = recover_home(settings)  # settles, adopts nothing of ours twice, projects our rows
        try:
            return verify.verify(installer)
        finally:
            installer.close()
    finally:
        held.close()


def _unpack(archive: Path, folder: Path) -> dict[str, Any]:
    """Extract a backup into `folder` (no member outside it, no device), and return its manifest."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            if MANIFEST not in names or REGISTRY_MEMBER not in names:
                raise RestoreRefused(f"{archive} is not a kuiper-plugins backup (no {MANIFEST} or registry)")
            for member in members:
                if member.name != MANIFEST and not member.name.startswith(
                        (REGISTRY_MEMBER, ENGINE_PREFIX, FILES_PREFIX)):
                    raise RestoreRefused(f"{archive} holds {member.name!r}, which no backup holds")
            tar.extractall(folder, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, RestoreRefused):
            raise
        raise RestoreRefused(f"{archive} cannot be read as a backup: {exc}") from None
    manifest = json.loads((folder / MANIFEST).read_bytes()[:MANIFEST_MAX_BYTES])
    if manifest.get("format") != FORMAT:
        raise RestoreRefused(f"{archive} is a backup of format {manifest.get('format')!r}; this version reads {FORMAT}")
    for path in manifest.get("files", []):
        root = PurePosixPath(path).parts[0] if path else ""
        if root not in ROOTS or ".." in PurePosixPath(path).parts:
            raise RestoreRefused(f"{archive} records the file {path!r}, outside etc/, data/ and plugins/")
    return manifest


def _put_in_place(layout: Layout, settings: Settings, unpacked: Path, manifest: dict[str, Any]) -> None:
    """Move the unpacked files to their homes, refusing before any move a path that holds something else."""
    moves = []
    for path in manifest["files"]:
        source, target = unpacked / FILES_PREFIX / path, layout.absolute(path)
        if os.path.lexists(target):
            if durable.fingerprint(target) != durable.fingerprint(source):
                raise RestoreRefused(f"{target} exists and differs from the backup's copy: it is left as it is,"
                                     " and nothing was restored")
            continue
        moves.append((source, target))
    engine_target = kv.store_path(layout.data, settings.store_sqlite_name)
    if manifest.get("engineStore") and not engine_target.exists():
        moves.append((unpacked / manifest["engineStore"], engine_target))
    touched = set()
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        durable.seal(source)
        os.replace(source, target)
        touched.update({target.parent, target.parent.parent})
    durable.sync_folders(touched)
    registry_copy = unpacked / REGISTRY_MEMBER
    durable.seal(registry_copy)
    os.replace(registry_copy, layout.registry_file)  # last: a restore cut short leaves no registry, so can run again
    durable.sync_folders([layout.registry_file.parent])
    log.info("restored %d files and the registry into %s", len(manifest["files"]), settings.home)

