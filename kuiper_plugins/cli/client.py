"""Talking to the server: one requests session, answers parsed, refusals raised as Failure, uploads streamed.

A refusal keeps what the server said: its message (eKuiper's words first),
its status and its parsed body, for a command that shows more of it and for
the JSON form of errors (`--json`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import requests

from kuiper_plugins import __version__
from kuiper_plugins.cli import progress

CONNECT_TIMEOUT = 10
READ_TIMEOUT = 900  # an install downloads, unpacks and may run install.sh before it answers
UPLOAD_FIELD = "uploadFile"
TOKEN_ENV = "KUIPER_PLUGINS_TOKEN"
MISSING_TOKEN = "missing_token"  # the server's 401 when authentication is on and no token came
CHUNK_SIZE = 256 * 1024

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool its reader left (`| head`)


class Failure(Exception):
    """A command that cannot succeed: the message for stderr and the exit status to end with."""

    def __init__(self, message: str, exit_status: int, answer: Any = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
        self.answer = answer  # a refusal's parsed body, for a command that shows more of it
        self.status = status  # the HTTP status of the server's refusal; None when the server said nothing


class Client:
    """The server's REST API over one requests session: answers come back parsed, refusals as Failure."""

    def __init__(self, base_url: str, token: str | None, session: requests.Session):
        self.base_url = base_url.rstrip("/")
        self.session = session
        session.headers["User-Agent"] = f"kuiper-plugins-cli/{__version__}"
        if token:
            session.headers["Authorization"] = token  # the raw token, as eKuiper reads it

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the JSON answer, or the text of a text answer."""
        url = self.base_url + path
        try:
            response = self.session.request(method, url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs)
        except requests.ConnectTimeout:
            raise Failure(f"cannot reach kuiper-plugins at {self.base_url}: no connection within "
                          f"{CONNECT_TIMEOUT} s", EXIT_USAGE)
        except requests.ReadTimeout:
            raise Failure(f"kuiper-plugins at {self.base_url} did not answer within {READ_TIMEOUT} s",
                          EXIT_USAGE)
        except requests.ConnectionError as exc:
            raise Failure(f"cannot reach kuiper-plugins at {self.base_url}: {network_reason(exc)}", EXIT_USAGE)
        except requests.RequestException as exc:
            raise Failure(f"request to {url} failed: {exc}", EXIT_USAGE)
        with response:
            if response.status_code >= 400:
                raise Failure(refusal_message(response), EXIT_REFUSED, _answer_of(response), response.status_code)
            return _answer_of(response)


def _answer_of(response: requests.Response) -> Any:
    if _is_json(response):
        try:
            return response.json()
        except ValueError:
            pass
    return response.text


def _is_json(response: requests.Response) -> bool:
    media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def refusal_message(response: requests.Response) -> str:
    """The server's own words from the {"error", "message"} envelope, or the status when there are none."""
    answer = _answer_of(response)
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        if response.status_code == 401 and answer["message"] == MISSING_TOKEN:
            # The server's word is eKuiper's, which says nothing of how to give one.
            return (f"{MISSING_TOKEN} (the service has basic.authentication on: give a token with --token or"
                    f" ${TOKEN_ENV}; `kuiper-plugins token --key KEY.pem` mints one from a private key)")
        return answer["message"]
    status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    first_line = answer.strip().splitlines()[0] if isinstance(answer, str) and answer.strip() else ""
    if first_line and len(first_line) <= 200 and not first_line.startswith("<"):
        return f"{status}: {first_line}"
    return f"{status} from {response.url}"


def network_reason(exc: BaseException) -> str:
    """The innermost OS-level cause of a connection failure (refused, unknown host...) in a few words."""
    reason = "connection failed"
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return reason


# ------------------------------------------------------------------ uploading a local file


class ProgressBar:
    """A one-line text bar on a terminal, redrawn each time another whole percent has gone."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label = label
        self.total = total
        self.stream = stream
        self.shown = -1
        self.finished = False

    def update(self, done: int) -> None:
        percent = 100 if self.total == 0 else done * 100 // self.total
        if percent == self.shown:
            return
        self.shown = percent
        filled = self.WIDTH * percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {progress.size(done)}/{progress.size(self.total)}")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line, once, so what is printed next starts on a line of its own."""
        if self.shown >= 0 and not self.finished:
            self.finished = True
            self.stream.write("\n")
            self.stream.flush()


class NoProgress:
    """Stands in for ProgressBar when stderr is not a terminal."""

    def update(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


class MultipartUpload:
    """A multipart/form-data body holding one file, read from disk chunk by chunk as it is sent.

    requests sends an iterable body as it comes and takes Content-Length from
    len(), so the file is never held in memory whole. The sha256 of what was
    sent is known once the body has been sent.
    """

    def __init__(self, path: Path, field: str, progress: ProgressBar | NoProgress):
        self.path = path
        self.size = path.stat().st_size
        self.progress = progress
        self.boundary = uuid.uuid4().hex
        self.sha256 = hashlib.sha256()
        filename = _form_quote(path.name)
        self.head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        sent = 0
        self.progress.update(0)
        with open(self.path, "rb") as file:
            while sent < self.size:
                chunk = file.read(min(CHUNK_SIZE, self.size - sent))
                if not chunk:
                    raise Failure(f"{self.path} shrank while it was being uploaded", EXIT_REFUSED)
                sent += len(chunk)
                self.sha256.update(chunk)
                self.progress.update(sent)
                yield chunk
        self.progress.finish()
        yield self.tail


def _form_quote(filename: str) -> str:
    """Escape a file name for a Content-Disposition header as browsers do (HTML's form encoding)."""
    return filename.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def readable_file(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        reason = "no such file" if not path.exists() else "not a regular file"
        raise Failure(f"cannot upload {name}: {reason}", EXIT_USAGE)
    if not os.access(path, os.R_OK):
        raise Failure(f"cannot upload {name}: permission denied", EXIT_USAGE)
    return path


def upload(client: Client, local: Path) -> tuple[str, str]:
    """Send a local file to /config/uploads; return the path the server saved it at and its sha256."""
    progress = ProgressBar(f"uploading {local.name}", local.stat().st_size, sys.stderr) if on_terminal() \
        else NoProgress()
    body = MultipartUpload(local, UPLOAD_FIELD, progress)
    try:
        answer = client.call("POST", "/config/uploads", data=body, headers={"Content-Type": body.content_type})
    finally:
        progress.finish()
    saved = answer.strip() if isinstance(answer, str) else answer
    if not isinstance(saved, str) or not saved:
        raise Failure(f"the server did not say where it saved {local.name} (answer: {answer!r})", EXIT_REFUSED)
    return saved, body.sha256.hexdigest()


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def asks_on_terminal() -> bool:
    """Whether a question can be put to a person: stdin to read the answer from and stderr to ask on are terminals."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
