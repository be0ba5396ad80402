"""Files uploaded into data/uploads, the one folder file:// plugin URLs may point into by default.

Names may hold sub-folders (`team/random.zip`) but every segment must be a
plain name: no `..`, no hidden or empty segments, no links followed. A file
appears under its name only once it is complete (written in staging, then
moved into place).
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from kuiper_plugins.errors import DiskFull, InvalidRequest, PluginNotFound

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
        return self._place(name, lambda out: self._copy(stream, out))

    def save_bytes(self, name: str, content: bytes) -> Path:
        """Write `content` under `name`, as save_stream does."""
        return self.save_stream(name, io.BytesIO(content))

    def adopt(self, name: str, local_file: Path) -> Path:
        """Move a file already downloaded into staging under `name`."""
        target = self._target(name)
        os.replace(local_file, target)
        return target

    def list(self) -> list[str]:
        """Absolute paths of the top-level entries, sorted (as eKuiper lists them)."""
        return sorted(str(p) for p in self.folder.iterdir() if not p.name.startswith("."))

    def delete(self, name: str) -> None:
        target = self.path_of(name)
        if target.is_symlink() or not target.exists():
            raise PluginNotFound(f"upload {name} not found")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def _copy(self, stream: BinaryIO, out: BinaryIO) -> None:
        total = 0
        while chunk := stream.read(CHUNK):
            total += len(chunk)
            if total > self.max_size:
                raise InvalidRequest(f"upload is larger than the limit of {self.max_size} bytes")
            out.write(chunk)

    def _target(self, name: str) -> Path:
        segments = check_upload_name(name)
        parent = self.folder
        for segment in segments[:-1]:
            parent = parent / segment
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise InvalidRequest(f"invalid upload name '{name}': {segment} is not a folder")
            parent.mkdir(exist_ok=True)
        target = parent / segments[-1]
        if target.is_symlink() or target.is_dir():
            raise InvalidRequest(f"invalid upload name '{name}': a folder or link of that name exists")
        return target

    def _place(self, name: str, write) -> Path:
        target = self._target(name)
        fd, temporary = tempfile.mkstemp(dir=self.staging, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except OSError as exc:
            os.unlink(temporary)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full while saving upload {name}")
            raise
        except BaseException:
            os.unlink(temporary)
            raise
        return target
