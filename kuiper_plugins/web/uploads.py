"""Files uploaded into data/uploads, the one folder file:// plugin URLs may point into by default.

Names may hold sub-folders (`team/random.zip`) but every segment must be a
plain name: no `..`, no hidden or empty segments, no links followed. A file
appears under its name only once it is complete (written in staging, then
moved into place, durably: fsynced, renamed, the folder fsynced). A refused
upload leaves no file and no folder behind.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from kuiper_plugins.errors import DiskFull, InvalidRequest, PluginNotFound
from kuiper_plugins.install import durable, fetch

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = "upload-"  # files being written are named upload-<pid>-*: start-up removes a dead worker's
SEGMENT = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}")
MAX_DEPTH = 8
CHUNK = 1024 * 1024


def check_upload_name(name: object) -> list[str]:
    """Return the name's segments, or refuse a name that could leave the uploads folder."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("invalid body: name is required")
    segments = name.split("/")
    if len(segments) > MAX_DEPTH or not all(SEGMENT.fullmatch(s) for s in segments):
        raise InvalidRequest(
            f"invalid upload name '{name}': use up to {MAX_DEPTH} '/'-separated segments of letters, digits and"
            " . _ - @ +, none starting with a dot"
        )
    return segments


class Uploads:
    """The uploads folder; staging holds files while they are being written."""

    def __init__(self, folder: Path, staging: Path, max_size: int):
        self.folder = folder
        self.staging = staging
        self.max_size = max_size

    def path_of(self, name: str) -> Path:
        return self.folder.joinpath(*check_upload_name(name))

    def save_stream(self, name: str, stream: BinaryIO) -> Path:
        """Write `stream` under `name` (replacing a file of that name) and return its absolute path."""
        self._check_target(name)
        fd, temporary = tempfile.mkstemp(dir=self.staging, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as out:
                self._copy(stream, out)
            os.chmod(temporary, 0o644)
        except BaseException as exc:
            os.unlink(temporary)
            _raise_if_disk_full(exc, name)
            raise
        return self.adopt(name, Path(temporary))

    def save_bytes(self, name: str, content: bytes) -> Path:
        """Write `content` under `name`, as save_stream does."""
        return self.save_stream(name, io.BytesIO(content))

    def adopt(self, name: str, local_file: Path) -> Path:
        """Move a complete file from staging to `name`, durably; the file is removed if that is refused."""
        try:
            durable.fsync_path(local_file)
            target, created = self._make_target(name)
            os.replace(local_file, target)
            durable.sync_folders([target.parent, *(folder.parent for folder in created)])
        except BaseException as exc:
            local_file.unlink(missing_ok=True)
            _raise_if_disk_full(exc, name)
            raise
        return target

    def sweep(self) -> int:
        """Remove what dead workers were writing into staging (uploads and downloads); return how many."""
        removed = 0
        for path in self.staging.iterdir():
            if fetch.is_orphan(path.name, TEMPORARY_PREFIX) or fetch.is_orphan(path.name):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d unfinished upload(s) that stopped workers left in %s", removed, self.staging)
        return removed

    def list(self) -> list[str]:
        """Absolute paths of the top-level entries, sorted (as eKuiper lists them)."""
        return sorted(str(p) for p in self.folder.iterdir() if not p.name.startswith("."))

    def delete(self, name: str) -> None:
        """Remove an uploaded file or folder; no link on the way is followed, nothing outside is touched."""
        segments = check_upload_name(name)
        parent_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for index, segment in enumerate(segments[:-1]):
                try:
                    child = os.open(segment, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    dir_fd=parent_fd)
                except FileNotFoundError:
                    raise PluginNotFound(f"upload {name} not found") from None
                except OSError:
                    raise InvalidRequest(
                        f"invalid upload name '{name}': {'/'.join(segments[:index + 1])} is not a folder"
                        " (links are not followed)"
                    ) from None
                os.close(parent_fd)
                parent_fd = child
            last = segments[-1]
            try:
                info = os.stat(last, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise PluginNotFound(f"upload {name} not found") from None
            if stat.S_ISLNK(info.st_mode):
                raise InvalidRequest(f"invalid upload name '{name}': it is a link (links are not followed)")
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(last, dir_fd=parent_fd)
            else:
                os.unlink(last, dir_fd=parent_fd)
            os.fsync(parent_fd)
        finally:
            os.close(parent_fd)

    def _copy(self, stream: BinaryIO, out: BinaryIO) -> None:
        total = 0
        while chunk := stream.read(CHUNK):
            total += len(chunk)
            if total > self.max_size:
                raise InvalidRequest(f"upload is larger than the limit of {self.max_size} bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())

    def _check_target(self, name: str) -> None:
        """Refuse, before anything is written, a name whose folders are links or files."""
        segments = check_upload_name(name)
        parent = self.folder
        for segment in segments[:-1]:
            parent = parent / segment
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise InvalidRequest(f"invalid upload name '{name}': {segment} is not a folder")
        target = parent / segments[-1]
        if target.is_symlink() or target.is_dir():
            raise InvalidRequest(f"invalid upload name '{name}': a folder or link of that name exists")

    def _make_target(self, name: str) -> tuple[Path, list[Path]]:
        """The target path of `name`, with the folders made for it (each checked again as it is made)."""
        self._check_target(name)
        segments = check_upload_name(name)
        parent, created = self.folder, []
        for segment in segments[:-1]:
            parent = parent / segment
            try:
                parent.mkdir()
                created.append(parent)
            except FileExistsError:
                if parent.is_symlink() or not parent.is_dir():
                    raise InvalidRequest(f"invalid upload name '{name}': {segment} is not a folder") from None
        return parent / segments[-1], created


def _raise_if_disk_full(exc: BaseException, name: str) -> None:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(f"disk full while saving upload {name}") from exc
