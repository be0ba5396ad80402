"""The running engine's REST API (`engine.url`): who it is, and its portable plugins' status.

Reads: `GET <engine.url>/` for the engine's version, OS and architecture (the
prebuilt catalogue asks for plugins built for exactly that engine), and
`GET <engine.url>/plugins/portables/<name>/status`, relayed as it is. The
engine being down never fails an install: the last answer is kept, and
without one the configured `kuiperVersion` is used, with a warning. The
plugin calls that make a change live go through `send` (see engine/live.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import requests
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

from kuiper_plugins.errors import EngineUnavailable

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
# A plugin call makes the engine copy the package and open a native .so or start a portable process.
CHANGE_TIMEOUT_SECONDS = 120.0
REFRESH_SECONDS = 60.0  # how long an answer of the engine's GET / is taken as current


@dataclass(frozen=True)
class EngineInfo:
    """What the engine says of itself in `GET /`."""

    version: str
    os: str
    arch: str
    up_time_seconds: int | None = None
    started_at: float | None = None  # when the engine started (epoch seconds): now minus upTimeSeconds, at the answer


@dataclass(frozen=True)
class Relayed:
    """An answer of the engine, to be passed on as it is."""

    status: int
    body: bytes
    content_type: str


class EngineClient:
    """Talk to the engine at `url` (no trailing slash), with an optional JWT."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_SECONDS):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._lock = threading.Lock()
        self._info: EngineInfo | None = None
        self._fetched_at = 0.0

    def _get(self, path: str) -> requests.Response:
        headers = {"Authorization": self.token} if self.token else {}
        return requests.get(f"{self.url}{path}", headers=headers, timeout=self.timeout, allow_redirects=False)

    def send(self, method: str, path: str, body: dict | None = None,
             read_timeout: float = CHANGE_TIMEOUT_SECONDS) -> requests.Response:
        """Make one plugin call on the engine; EngineUnavailable when nothing reached it (refused, no route).

        Any other failure (no answer in time) leaves it unknown whether the engine acted, and is raised as it is.
        """
        headers = {"Authorization": self.token} if self.token else {}
        try:
            return requests.request(method, f"{self.url}{path}", json=body, headers=headers,
                                    timeout=(self.timeout, read_timeout), allow_redirects=False)
        except requests.ConnectionError as exc:
            if not _never_connected(exc):
                raise  # the request may have reached the engine
            raise EngineUnavailable(f"the engine at {self.url} did not answer ({exc})") from exc

    def info(self) -> EngineInfo | None:
        """The engine's version, OS and arch; the last known answer while it is down; None if never known."""
        with self._lock:
            if self._fetched_at and time.monotonic() - self._fetched_at < REFRESH_SECONDS:
                return self._info
        try:
            response = self._get("/")
            response.raise_for_status()
            body = response.json()
            info = EngineInfo(
                version=str(body["version"]).removeprefix("v"), os=str(body["os"]), arch=str(body["arch"]),
                up_time_seconds=body.get("upTimeSeconds"),
                started_at=_started_at(body.get("upTimeSeconds")),
            )
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            with self._lock:
                known = self._info
                # Ask again only after REFRESH_SECONDS: a down engine must not cost every request a timeout.
                self._fetched_at = time.monotonic()
            log.warning("the engine at %s did not say who it is (%s); using %s", self.url, exc,
                        f"its last answer, version {known.version}" if known else "basic.kuiperVersion")
            return known
        with self._lock:
            self._info, self._fetched_at = info, time.monotonic()
        return info

    def fresh_info(self) -> EngineInfo | None:
        """Ask the engine's GET / now, whatever the cache holds; its answer, or None when it did not give one."""
        with self._lock:
            known, self._info, self._fetched_at = self._info, None, 0.0
        info = self.info()
        if info is None:
            with self._lock:
                self._info = self._info or known  # keep the last answer for the version, as info() does
            return None
        return info

    def portable_status(self, name: str) -> Relayed:
        """The engine's answer to `GET /plugins/portables/<name>/status`, status and body as they are."""
        try:
            response = self._get(f"/plugins/portables/{quote(name, safe='')}/status")
        except requests.RequestException as exc:
            raise EngineUnavailable(f"portable plugin status comes from the engine: {self.url} did not answer ({exc})")
        return Relayed(response.status_code, response.content,
                       response.headers.get("Content-Type", "application/json"))


def _started_at(up_time_seconds: object) -> float | None:
    if isinstance(up_time_seconds, bool) or not isinstance(up_time_seconds, (int, float)) or up_time_seconds < 0:
        return None
    return time.time() - float(up_time_seconds)


def _never_connected(exc: requests.ConnectionError) -> bool:
    """Whether the connection itself failed (refused, unreachable, connect timeout): nothing was sent."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0].reason if exc.args and isinstance(exc.args[0], MaxRetryError) else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))
