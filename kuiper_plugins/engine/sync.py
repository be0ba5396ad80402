"""What the engine has, we have: plugins installed or deleted at the engine itself, through its own API.

A running eKuiper takes plugin calls from whoever reaches its REST API, not only from this service. A
plugin installed there lands on disk and in eKuiper's store, but not in our registry, which meanwhile
refuses its name as a duplicate of files it does not know; one deleted there loses its files while our
registry still lists it. This module brings the registry in step with the engine, by the rules of
start-up adoption (docs/adoption.md), while the service runs:

* adopted: a plugin the engine offers live (in its list, and for a native plugin not marked deleted in
  its describe: eKuiper keeps a deleted native plugin listed, as `$deleted`, until it restarts) whose
  files are on disk and that the registry lacks. It is recorded as adopted, as at start-up: the config
  copies eKuiper's install wrote become its, a source's yaml never does.
* forgotten: a plugin of the registry whose binary (a portable plugin's folder) is gone from disk while
  the engine does not offer it live. Only the registry row goes: no file and no row of eKuiper's store
  is touched, and what the engine's delete left is logged. A plugin the engine replaced through its own
  PUT (its binary is another file now) is forgotten and adopted anew in the same look.

When: a look over everything every `engine.syncInterval` seconds, from a thread of each gunicorn worker,
of which one worker at a time looks (a flock on `locks/engine-sync.lock`, whose mtime says when the last
look ended, so that any number of workers make about one look per interval); and, before each write on
one plugin, a look at that name alone (`settle`), which asks the engine only when the registry and the
disk disagree about it.

Races: each change is made under the plugin's own lock, taken without waiting. An operation of ours in
flight on the name holds it (an install's hand-over makes the engine offer the plugin before our commit;
a delete's makes the engine mark it deleted before ours), so the name is left for a later look; inside
the lock the registry and the disk are read again, so a commit or a file that came in between wins, and
the registry's own checks refuse a second adoption of a name, so two workers never adopt one plugin
twice. When the engine does not answer, nothing changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import requests

from kuiper_plugins.engine.client import EngineClient
from kuiper_plugins.errors import EngineUnavailable
from kuiper_plugins.install.installer import Installer, main_file, native_binaries, type_label
from kuiper_plugins.layout import NATIVE_TYPES, PORTABLE
from kuiper_plugins.store import db, registry

log = logging.getLogger(__name__)

SYNC_LOCK = "engine-sync.lock"
# What eKuiper's native describe says of a plugin it deleted and still lists until it restarts (its
# "$deleted"; its describe strips a leading "v" only).
DELETED_VERSIONS = frozenset({"$deleted", "DELETED"})
STOP_TIMEOUT = 10.0  # seconds `stop` waits for a look in progress


class _NoAnswer(Exception):
    """The engine did not answer a look usably: nothing is changed on its account."""


@dataclass
class Look:
    """What one look changed in the registry, as `type/name` strings."""

    adopted: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


class EngineSync:
    """Adopt what the running engine installed and forget what it deleted, for one KUIPER_HOME."""

    def __init__(self, installer: Installer, client: EngineClient, interval: float):
        self.installer = installer
        self.client = client
        self.layout = installer.layout
        self.interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # An adoption refused by the rules is logged once, and tried again only when its files change.
        self._tried: dict[tuple[str, str], tuple] = {}

    # ---------------------------------------------------------------- the periodic look

    def start(self) -> None:
        """Start this process's thread of periodic looks (in each gunicorn worker); nothing when interval is 0."""
        if self.interval <= 0 or self._thread is not None:
            return
        # The lock file is made now, before this worker serves, not at the first look an interval later:
        # a home must not gain a file while the service idles (an operator's, or a test's, before and after).
        os.close(os.open(self.layout.locks / SYNC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        self._thread = threading.Thread(target=self._run, name="engine-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic looks, waiting a bounded while for one in progress."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.look_if_due()
            except Exception as exc:  # noqa: BLE001  the thread must outlive one failed look; the next one retries
                log.error("the look at the engine's plugins failed: %r", exc)

    def look_if_due(self) -> Look | None:
        """Look, unless another worker is looking or looked less than half an interval ago; None if not."""
        fd = os.open(self.layout.locks / SYNC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if time.time() - os.fstat(fd).st_mtime < self.interval / 2:
                return None
            try:
                return self.look()
            finally:
                os.utime(fd)  # the end of this look, for the other workers
        finally:
            os.close(fd)

    def look(self) -> Look | None:
        """Bring the whole registry in step with what the engine offers now; None when it did not answer."""
        try:
            listed = {plugin_type: self._native_names(plugin_type) for plugin_type in NATIVE_TYPES}
            listed[PORTABLE] = self._portable_names()
        except _NoAnswer:
            return None
        conn = db.reader(self.layout.registry_file)
        with db.snapshot(conn):
            plugins = [plugin for plugin, _functions in registry.all_plugins(conn)]
            files = registry.files_by_plugin(conn)
        look = Look()
        known = {(plugin.type, registry.name_key(plugin.name)) for plugin in plugins}
        try:
            for plugin in plugins:
                main = main_file(plugin.type, plugin.name, files.get(plugin.id, []))
                if main is None or os.path.lexists(self.layout.absolute(main)):
                    continue
                if self._forget(plugin.type, plugin.name, listed[plugin.type], look):
                    known.discard((plugin.type, registry.name_key(plugin.name)))
            for plugin_type, names in listed.items():
                for key, name in names.items():
                    if (plugin_type, key) not in known:
                        self._adopt(plugin_type, name, names, look)
        except _NoAnswer:
            pass  # what was done stays done; the rest waits for the next look
        return look

    # ---------------------------------------------------------------- one plugin, before a write

    def settle(self, plugin_type: str, name: str) -> None:
        """Before a write on one plugin: adopt or forget it now if the engine installed or deleted it.

        Costs no call to the engine unless the registry and the disk disagree about the name.
        """
        conn = db.reader(self.layout.registry_file)
        with db.snapshot(conn):
            plugin = registry.find_by_key(conn, plugin_type, name)
            files = registry.files_of(conn, plugin.id) if plugin is not None else []
        try:
            if plugin is None:
                if self._present(plugin_type, name) is not None:
                    self._adopt(plugin_type, name, None, Look())
                return
            main = main_file(plugin_type, plugin.name, files)
            if main is not None and not os.path.lexists(self.layout.absolute(main)):
                self._forget(plugin_type, plugin.name, None, Look())
        except _NoAnswer:
            return
        except OSError as exc:  # the write itself meets the same folder and says so
            log.warning("could not look at %s plugin %s beside the engine: %s", type_label(plugin_type), name, exc)

    # ---------------------------------------------------------------- the two changes

    def _forget(self, plugin_type: str, name: str, names: dict[str, str] | None, look: Look) -> bool:
        """Forget a plugin whose binary is gone, unless the engine still offers it from memory alone."""
        offered = self._offers(plugin_type, name, names)
        replaced = offered and self._present(plugin_type, name) is not None
        if offered and not replaced:
            return False  # the engine runs it from memory; its next start decides
        if not self.installer.forget_removed(plugin_type, name):
            return False
        look.forgotten.append(f"{type_label(plugin_type)}/{name}")
        if replaced:
            self._adopt(plugin_type, name, names, look)
        return True

    def _adopt(self, plugin_type: str, name: str, names: dict[str, str] | None, look: Look) -> None:
        """Adopt a plugin the engine offers live whose files are on disk; a refusal is logged once per files."""
        present = self._present(plugin_type, name)
        if present is None:
            return
        key = (plugin_type, registry.name_key(name))
        if self._tried.get(key) == present:
            return
        if not self._offers(plugin_type, name, names):
            return
        adopted = self.installer.adopt_offered(plugin_type, name)
        if adopted:
            self._tried.pop(key, None)
            look.adopted.append(f"{type_label(plugin_type)}/{name}")
            log.info("the engine installed %s plugin %s itself: adopted", type_label(plugin_type), name)
        elif adopted is False:
            self._tried[key] = present  # refused: asked again only once its files change
        # None: an operation of ours holds the name; the next look asks again

    def _present(self, plugin_type: str, name: str) -> tuple | None:
        """What is on disk for the name (binaries or the folder's descriptor, with sizes and times); None: nothing."""
        if plugin_type == PORTABLE:
            folder = self.layout.portable_dir(name)
            if not folder.is_dir() or folder.is_symlink():
                return None
            try:
                descriptor = os.lstat(folder / f"{name}.json")
            except OSError:
                return ()
            return ((descriptor.st_size, descriptor.st_mtime_ns, descriptor.st_ino),)
        found = []
        for path in native_binaries(self.layout, plugin_type, name):
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(found) or None

    # ---------------------------------------------------------------- the engine's answers

    def _offers(self, plugin_type: str, name: str, names: dict[str, str] | None) -> bool:
        """Whether the engine offers the plugin live; `names` is its list when one was just read."""
        if names is not None:
            spelled = names.get(registry.name_key(name))
            if spelled is None:
                return False
            if plugin_type == PORTABLE:
                return True  # eKuiper's portable list holds installed plugins only
            name = spelled
        path = "portables" if plugin_type == PORTABLE else plugin_type
        status, body = self._get(f"/plugins/{path}/{quote(name, safe='')}")
        if status == 404:
            return False
        if status != 200 or not isinstance(body, dict):
            raise _NoAnswer()
        return plugin_type == PORTABLE or str(body.get("version")) not in DELETED_VERSIONS

    def _native_names(self, plugin_type: str) -> dict[str, str]:
        """The engine's list of native plugins of a type (deleted ones included), by registry key."""
        status, body = self._get(f"/plugins/{plugin_type}")
        if status != 200 or not isinstance(body, list):
            raise _NoAnswer()
        return {registry.name_key(name): name for name in body if isinstance(name, str) and name}

    def _portable_names(self) -> dict[str, str]:
        """The engine's list of portable plugins, by registry key."""
        status, body = self._get("/plugins/portables")
        if status != 200 or not isinstance(body, list):
            raise _NoAnswer()
        names = (item.get("name") for item in body if isinstance(item, dict))
        return {registry.name_key(name): name for name in names if isinstance(name, str) and name}

    def _get(self, path: str) -> tuple[int, object]:
        """The engine's status and JSON body for a GET (None for a body that is not JSON); _NoAnswer if none."""
        try:
            response = self.client.send("GET", path, read_timeout=self.client.timeout)
        except (EngineUnavailable, requests.RequestException) as exc:
            raise _NoAnswer() from exc
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None
