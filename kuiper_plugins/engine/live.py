"""Hand the running engine what we verified, through its own REST API, so a change is live before our answer.

A running eKuiper learns of a plugin only through its REST API or when it boots, so with `engine.url` set
and the engine answering, each native change is also made through that API, inside our transaction:

* install: after our checks and the durable publish of the files, and before our commit, the engine is
  asked to install a zip of the verified files that it needs (the .so, and a source's yaml, which it
  skips because ours is already in place), never install.sh. The zip sits in data/uploads, where the
  engine's own file:// reads are confined, under a dot-name our listing hides; it is removed at once.
  The engine removes and rewrites the .so (same bytes, not fsynced): our fsynced file is hard-linked
  aside before the call and put back after it, so the file at the path is the one we sealed. A refusal
  is the engine's, in its words, and undoes our moves as any failure before the commit does.
* delete: the engine's own delete needs the .so present and removes more than ours does (a source's
  yaml, a config folder nobody recorded). So before the call the .so is hard-linked aside and every
  other path the engine's delete would remove is moved aside, listed in `engine-aside.json` in the
  operation's staging folder (fsynced first); after the call each is put back where it was missing,
  and our own delete goes on as without an engine, removing exactly what it recorded. A crash between
  the two leaves the list, and recovery puts the files back (`restore_set_aside`) before its undo.
* register: the engine's function list is changed before our commit; a refusal changes nothing.
* portable install: after our checks (install.sh confined, handshake) and the durable publish, the
  engine is asked to install a zip of what it needs to register the plugin (its `<name>.json`, its
  executable, each source's yaml), never install.sh, from data/uploads as for a native plugin; it
  registers the plugin and starts its process. Its install rewrites every member, and a source's yaml in
  both etc/ and data/, unconditionally: each of those paths is hard-linked aside first (the list
  `engine-handed.json` fsynced before the call) and our file put back over the engine's after it, so
  every file is the one we sealed (a user's kept yaml included). Recovery puts them back too.
* portable update: the engine's own update is its delete then its install, and its delete removes the
  whole plugin folder: so it is made of our two steps, the delete (stopping the old process) with our
  new files set aside around it, then the install (starting the new process).
* portable delete: the engine's delete stops the process and forgets the plugin; it removes the
  plugin's folder and the config files of the symbols it knows (a source's yaml too): all are moved
  aside around the call, as for a native delete, and our own delete removes what it recorded.
* callable: opening a .so proves only that it links. After the engine installed a function plugin, or
  took a new function list, each function is resolved as the engine resolves it when a rule is
  validated: `POST /rules/validate` parses a rule calling it (its SQL is parsed, and every function
  looked up and type-checked, before its stream is; nothing is stored). A function the engine cannot
  call refuses the change in the engine's words: an install is withdrawn from the engine with its own
  delete (files shielded as for a delete) before our moves are undone, a register gives the engine
  the old list back.

When nothing reaches the engine (refused connection, no route), today's path applies: files and rows for
its next start. `state` tells which of the two a plugin is in, for describe.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import requests

from kuiper_plugins.engine.client import EngineClient
from kuiper_plugins.errors import EngineUnavailable, InstallFailed, InvalidRequest
from kuiper_plugins.install import durable
from kuiper_plugins.layout import PORTABLE, Layout

log = logging.getLogger(__name__)

LOADED = "loaded"
PENDING = "pending restart"
UNKNOWN = "unknown"
DELETED = "$deleted"  # the version eKuiper's native manager reports for a plugin it deleted, until it restarts

ASIDE_LIST = "engine-aside.json"
ASIDE_FOLDER = "engine-aside"
HANDED_LINK = "engine-handed.so"
HANDED_LIST = "engine-handed.json"  # a portable hand-over: the files the engine's install rewrites, kept aside
HANDED_FOLDER = "engine-handed"
HANDED_PACKAGE = "engine-handed.zip"
# eKuiper's answer is "<type> plugins <verb> command error: <reason>"; our views put the same prefix back.
COMMAND_PREFIX = re.compile(r"^\S+ plugins? \S+ command error: ")
# A rule only parsed, never created: its SQL names a function and a stream nobody is expected to have.
PROBE_RULE = "kuiper_plugins_probe"
PROBE_STREAM = "kuiper_plugins_probe"
# When the engine finds no function of a name it says why in one line per function factory, "<factory>:<why>";
# a function it found and asked to validate our probe's arguments answers in its own words instead.
FACTORY_LINE = re.compile(r"^(built-in|native plugin|portable plugin|javascript function|external service"
                          r"|wasm plugin):")


class LiveEngine:
    """The running engine's plugin calls, made inside our operations on one KUIPER_HOME."""

    def __init__(self, client: EngineClient, layout: Layout):
        self.client = client
        self.layout = layout

    # ---------------------------------------------------------------- install

    def install_native(self, workdir: Path, plugin_type: str, name: str, so_dest: str,
                       functions: Sequence[str]) -> str:
        """Have the engine install and open the native plugin we published; return LOADED or PENDING.

        `workdir` is the operation's staging folder; the caller has not committed yet, and undoes its
        moves when this raises.
        """
        so_path = self.layout.absolute(so_dest)
        # Where the engine downloads the package to, and its scratch folder: it replaces, then removes both.
        scratch = [self.layout.plugins / f"{name}.zip", self.layout.plugins / "temp" / plugin_type / name]
        taken = [path for path in scratch if os.path.lexists(path)]
        if taken:
            log.warning("not handing %s plugin %s to the running engine: its install would replace and remove"
                        " %s, which is not ours; the plugin takes effect at the engine's next start", plugin_type,
                        name, taken[0])
            return PENDING
        handed = workdir / HANDED_LINK
        os.link(so_path, handed)
        package = handover_package(self.layout, workdir)
        members = [(so_path, so_path.name)]
        if plugin_type == "sources":
            # eKuiper counts the yaml in; it writes it only where none exists, and ours is in place.
            members.append((self.layout.absolute(f"etc/sources/{name}.yaml"), f"{name}.yaml"))
        _write_zip(package, members)
        # Kept beside the operation: should it crash, recovery knows the engine's download of it by its bytes.
        os.link(package, workdir / HANDED_PACKAGE)
        body: dict = {"name": name, "file": package.as_uri()}
        if plugin_type == "functions":
            body["functions"] = list(functions)
        try:
            response = self.client.send("POST", f"/plugins/{plugin_type}", body)
        except EngineUnavailable as exc:
            log.warning("%s plugin %s takes effect at the engine's next start: %s", plugin_type, name, exc.message)
            return PENDING
        except requests.RequestException as exc:
            raise InstallFailed(f"fail to install plugin: the engine did not answer ({exc})") from exc
        finally:
            package.unlink(missing_ok=True)
            # The engine removed our file and wrote its own copy; the sealed one goes back to its path.
            os.replace(handed, so_path)
            handed.unlink(missing_ok=True)  # still there when the engine left our file in place
            durable.sync_folders([so_path.parent])
        if response.status_code != 201:
            raise InstallFailed(_engine_words(response))
        log.info("the running engine loaded %s plugin %s", plugin_type, name)
        return LOADED

    # ---------------------------------------------------------------- delete

    def delete_native(self, workdir: Path, plugin_type: str, name: str, so_dest: str | None) -> str:
        """Have the engine stop offering a native plugin, keeping every file in place for our own delete."""
        if so_dest is None or not os.path.lexists(self.layout.absolute(so_dest)):
            return PENDING  # the engine's delete finds the plugin by its .so; without it, restart decides
        aside = workdir / ASIDE_FOLDER
        aside.mkdir()
        entries = []
        for index, recorded in enumerate([so_dest, *engine_delete_removes(plugin_type, name)]):
            path = self.layout.absolute(recorded)
            if not os.path.lexists(path):
                continue
            entries.append({"dest": recorded, "aside": str(index), "linked": recorded == so_dest})
        _write_aside_list(workdir, entries)
        for entry in entries:
            path, kept = self.layout.absolute(entry["dest"]), aside / entry["aside"]
            if entry["linked"]:
                os.link(path, kept)  # the engine's delete looks for the .so: it stays in place
            else:
                os.replace(path, kept)
        durable.sync_folders([aside, *{self.layout.absolute(e["dest"]).parent for e in entries}])
        if self._engine_delete(workdir, f"/plugins/{plugin_type}/{quote(name, safe='')}",
                               f"{plugin_type} plugin {name}") == PENDING:
            return PENDING
        log.info("the running engine no longer offers %s plugin %s", plugin_type, name)
        return LOADED

    def _engine_delete(self, workdir: Path, path: str, what: str) -> str:
        """Call the engine's delete, then put back every file set aside from it; LOADED when it deleted."""
        try:
            response = self.client.send("DELETE", path)
        except EngineUnavailable as exc:
            log.warning("%s stays in the running engine until it restarts: %s", what, exc.message)
            return PENDING
        except requests.RequestException as exc:
            log.warning("the engine did not answer the delete of %s (%s)", what, exc)
            return PENDING
        finally:
            restore_set_aside(self.layout, workdir)
        if response.status_code != 200:
            log.warning("the running engine did not delete %s: %s", what, _engine_words(response))
            return PENDING
        return LOADED

    # ---------------------------------------------------------------- register

    def register_functions(self, name: str, functions: Sequence[str]) -> str:
        """Set the engine's function list of a function plugin; raise its refusal; LOADED or PENDING."""
        try:
            response = self.client.send("POST", f"/plugins/functions/{quote(name, safe='')}/register",
                                        {"functions": list(functions)})
        except EngineUnavailable as exc:
            log.warning("the function list of %s takes effect at the engine's next start: %s", name, exc.message)
            return PENDING
        except requests.RequestException as exc:
            raise InvalidRequest(f"function plugins {name} regiser functions error: the engine did not answer"
                                 f" ({exc})") from exc
        if response.status_code == 404:
            return PENDING  # installed while the engine was down: its next start reads our rows
        if response.status_code != 200:
            raise InvalidRequest(_engine_words(response))
        return LOADED

    # ---------------------------------------------------------------- portable

    def portable_blocked(self, name: str) -> bool:
        """Whether the engine's install would replace and remove a file that is not ours (its download)."""
        scratch = self.layout.plugins / "portable" / f"{name}.zip"
        if os.path.lexists(scratch):
            log.warning("not handing portable plugin %s to the running engine: its install would replace and"
                        " remove %s, which is not ours; the change takes effect at the engine's next start", name,
                        scratch)
            return True
        return False

    def install_portable(self, workdir: Path, name: str, descriptor: dict) -> str:
        """Have the engine register the portable plugin we published and start its process; LOADED or PENDING.

        `descriptor` is the plugin's `<name>.json` as checked, its executable relative to the plugin's folder.
        `workdir` is the operation's staging folder; the caller has not committed yet, and undoes its moves
        when this raises.
        """
        if self.portable_blocked(name):
            return PENDING
        folder = f"plugins/portable/{name}"
        members = [(f"{folder}/{name}.json", f"{name}.json"),
                   (f"{folder}/{descriptor['executable']}", descriptor["executable"])]
        written = [recorded for recorded, _member in members]
        for source in descriptor.get("sources") or ():
            copies = [f"{top}/sources/{source}.yaml" for top in ("etc", "data")]
            written += copies
            # eKuiper requires the yaml in the package; what it writes is put back at once, so any copy will do.
            present = next((c for c in copies if stat.S_ISREG(_lstat_mode(self.layout.absolute(c)))), None)
            if present is None:
                log.warning("not handing portable plugin %s to the running engine: no regular file %s",
                            name, copies[0])
                return PENDING
            members.append((present, f"sources/{source}.yaml"))
        for recorded in written:
            mode = _lstat_mode(self.layout.absolute(recorded))
            if mode and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                log.warning("not handing portable plugin %s to the running engine: its install would replace %s,"
                            " which is not a file", name, recorded)
                return PENDING
        self._keep_handed(workdir, written)
        package = handover_package(self.layout, workdir)
        try:
            _write_zip(package, [(self.layout.absolute(recorded), member) for recorded, member in members])
            response = self.client.send("POST", "/plugins/portables", {"name": name, "file": package.as_uri()})
        except EngineUnavailable as exc:
            log.warning("portable plugin %s takes effect at the engine's next start: %s", name, exc.message)
            return PENDING
        except requests.RequestException as exc:
            raise InstallFailed(f"fail to install plugin: the engine did not answer ({exc})") from exc
        finally:
            package.unlink(missing_ok=True)
            # The engine removed and rewrote each member (not fsynced): ours go back over its copies.
            restore_handed(self.layout, workdir)
        if response.status_code != 201:
            raise InstallFailed(_engine_words(response))
        log.info("the running engine registered portable plugin %s and started its process", name)
        return LOADED

    def _keep_handed(self, workdir: Path, written: list[str]) -> None:
        """Hard-link aside each file the engine's install will rewrite; the list is durable before any link."""
        kept = workdir / HANDED_FOLDER
        shutil.rmtree(kept, ignore_errors=True)  # what an earlier hand-over of this operation left, if anything
        kept.mkdir()
        entries = [{"dest": recorded, "kept": str(index) if os.path.lexists(self.layout.absolute(recorded)) else None}
                   for index, recorded in enumerate(written)]
        _write_list(workdir, HANDED_LIST, entries)
        for entry in entries:
            if entry["kept"] is not None:
                os.link(self.layout.absolute(entry["dest"]), kept / entry["kept"], follow_symlinks=False)
        durable.sync_folders([kept])

    def delete_portable(self, workdir: Path, name: str) -> str:
        """Have the engine stop a portable plugin's process and forget it, keeping every file in place.

        LOADED when the engine no longer offers the plugin (stopped now, or it never had it), PENDING when
        it could not be asked or did not delete it: then its next start decides.
        """
        path = f"/plugins/portables/{quote(name, safe='')}"
        try:
            response = self.client.send("GET", path, read_timeout=self.client.timeout)
        except (EngineUnavailable, requests.RequestException) as exc:
            log.warning("portable plugin %s stays in the running engine until it restarts: %s", name, exc)
            return PENDING
        if response.status_code == 404:
            return LOADED  # not in the engine: no process to stop
        symbols = _portable_symbols(response) if response.status_code == 200 else None
        if symbols is None:
            log.warning("the running engine did not describe portable plugin %s: %s", name, _engine_words(response))
            return PENDING
        # What the engine's delete removes is what it knows of the plugin, which may be an older version.
        self._set_aside(workdir, [f"plugins/portable/{name}", *portable_delete_removes(symbols)])
        if self._engine_delete(workdir, path, f"portable plugin {name}") == PENDING:
            return PENDING
        log.info("the running engine stopped portable plugin %s and no longer offers it", name)
        return LOADED

    def _set_aside(self, workdir: Path, removed: list[str]) -> None:
        """Move every existing path of `removed` into the operation's aside folder, listed durably first."""
        aside = workdir / ASIDE_FOLDER
        shutil.rmtree(aside, ignore_errors=True)  # what an earlier delete of this operation dropped, if anything
        aside.mkdir()
        entries = [{"dest": recorded, "aside": str(index), "linked": False}
                   for index, recorded in enumerate(removed) if os.path.lexists(self.layout.absolute(recorded))]
        _write_aside_list(workdir, entries)
        for entry in entries:
            os.replace(self.layout.absolute(entry["dest"]), aside / entry["aside"])
        durable.sync_folders([aside, *{self.layout.absolute(e["dest"]).parent for e in entries}])

    def withdraw_native(self, workdir: Path, plugin_type: str, name: str, so_dest: str) -> None:
        """Have the engine drop a plugin it installed in this operation, which is being undone (logged if not)."""
        if self.delete_native(workdir, plugin_type, name, so_dest) != LOADED:
            log.error("the running engine keeps %s plugin %s, which was not installed, until it restarts",
                      plugin_type, name)

    # ---------------------------------------------------------------- callable

    def uncallable(self, functions: Sequence[str]) -> tuple[str, str] | None:
        """The first function the engine cannot call, with the engine's words for it; None when it can call all.

        Each is resolved as a rule's validation resolves it (POST /rules/validate, which stores nothing).
        An engine that does not answer that call is not a refusal: logged, and taken as callable.
        """
        for function in functions:
            rule = {"id": PROBE_RULE, "sql": f"SELECT `{function}`() FROM {PROBE_STREAM}",
                    "actions": [{"log": {}}]}
            try:
                response = self.client.send("POST", "/rules/validate", rule, read_timeout=self.client.timeout)
            except (EngineUnavailable, requests.RequestException) as exc:
                log.warning("could not ask the running engine whether it can call function %s: %s", function, exc)
                continue
            if response.status_code == 200:
                continue  # parsed whole: a stream of that name exists, and the function resolved
            if response.status_code != 422:
                log.warning("could not ask the running engine whether it can call function %s: it answered %s %s",
                            function, response.status_code, response.text[:200])
                continue
            words = _resolution_failure(function, response.text)
            if words is not None:
                return function, words
        return None

    # ---------------------------------------------------------------- describe

    def state(self, plugin_type: str, name: str, version: str | None = None) -> str:
        """Whether the running engine offers the plugin now: LOADED, PENDING (at its restart) or UNKNOWN.

        With our `version`, an engine offering another one has the change pending: a portable update made
        while the engine could not be reached, or a native update, which waits for the engine's restart (Go
        cannot unload the old code).
        """
        path = "portables" if plugin_type == PORTABLE else plugin_type
        try:
            # a read: a describe must not wait on a hung engine as long as a change may
            response = self.client.send("GET", f"/plugins/{path}/{quote(name, safe='')}",
                                        read_timeout=self.client.timeout)
        except (EngineUnavailable, requests.RequestException):
            return UNKNOWN
        if response.status_code == 404:
            return PENDING
        if response.status_code != 200:
            return UNKNOWN
        try:
            offered = response.json().get("version")
        except (ValueError, AttributeError):
            return UNKNOWN
        deleted = offered == DELETED
        return PENDING if deleted or (version is not None and offered != version) else LOADED


def engine_delete_removes(plugin_type: str, name: str) -> list[str]:
    """What eKuiper's own native delete removes besides the .so (recorded paths), whoever owns it."""
    paths = [f"etc/{plugin_type}/{name}"]
    if plugin_type in ("sources", "sinks"):
        paths += [f"{top}/{plugin_type}/{name}.{ext}" for top in ("etc", "data") for ext in ("yaml", "json")]
    else:
        paths += [f"{top}/functions/{name}.json" for top in ("etc", "data")]
    return paths


def portable_delete_removes(symbols: dict[str, list[str]]) -> list[str]:
    """What eKuiper's own portable delete removes besides the plugin's folder: its symbols' config files."""
    paths = []
    for kind in ("sources", "sinks", "functions"):
        suffixes = ("json",) if kind == "functions" else ("yaml", "json")
        # A name that is not one file name is not shielded: we never move a path outside the symbol folders.
        named = [symbol for symbol in symbols.get(kind, ()) if "/" not in symbol and symbol not in ("", ".", "..")]
        paths += [f"{top}/{kind}/{symbol}.{ext}" for symbol in named for top in ("etc", "data") for ext in suffixes]
    return paths


def restore_handed(layout: Layout, workdir: Path) -> None:
    """Put our files back over what the engine's portable install wrote; remove what it made where none was.

    Safe to repeat: recovery calls it for an operation that crashed around a hand-over.
    """
    listed = workdir / HANDED_LIST
    entries = _read_list(listed)
    if entries is None:
        return
    touched = set()
    for entry in entries:
        path = layout.absolute(entry["dest"])
        if entry["kept"] is None:
            if os.path.lexists(path) and not os.path.isdir(path):
                os.unlink(path)  # written from our hand-over where nothing was: the engine's, not ours
                touched.add(path.parent)
            continue
        kept = workdir / HANDED_FOLDER / str(entry["kept"])
        if not os.path.lexists(kept):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, path)
        kept.unlink(missing_ok=True)  # still there when the engine left our file in place (same inode)
        touched.add(path.parent)
    durable.sync_folders(touched)
    listed.unlink()
    durable.sync_folders([workdir])


def handover_package(layout: Layout, workdir: Path) -> Path:
    """Where the operation of this staging folder puts the zip the engine installs from."""
    return layout.uploads / f".kuiper-plugins-{workdir.name}.zip"


def remove_handover(layout: Layout, workdir: Path, plugin_name: str | None) -> None:
    """Remove what a hand-over cut short by a crash left: our zip in data/uploads, the engine's copy of it.

    The engine downloads the zip to plugins/<name>.zip and removes it when its install ends; a copy there
    with exactly our zip's bytes is that download (anything else is not ours, and stays).
    """
    handover_package(layout, workdir).unlink(missing_ok=True)
    kept = workdir / HANDED_PACKAGE
    download = layout.plugins / f"{plugin_name}.zip"
    if plugin_name is None or not kept.is_file() or not download.is_file() or download.is_symlink():
        return
    if durable.fingerprint(download) == durable.fingerprint(kept):
        download.unlink()
        durable.sync_folders([download.parent])
        log.warning("removed %s: the engine's download of an install that a crash cut short", download)


def restore_set_aside(layout: Layout, workdir: Path) -> None:
    """Put back every file the engine's delete was shielded from, where it is missing; then drop the list.

    Safe to repeat: recovery calls it for an operation that crashed around the engine's delete.
    """
    listed = workdir / ASIDE_LIST
    entries = _read_list(listed)
    if entries is None:
        return
    touched = set()
    for entry in entries:
        path, kept = layout.absolute(entry["dest"]), workdir / ASIDE_FOLDER / str(entry["aside"])
        if not os.path.lexists(kept):
            continue
        if os.path.lexists(path):
            if not entry.get("linked"):
                log.warning("%s reappeared while it was set aside; the one set aside is dropped", entry["dest"])
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, path)
        touched.add(path.parent)
    durable.sync_folders(touched)
    listed.unlink()
    durable.sync_folders([workdir])


def _read_list(listed: Path) -> list[dict] | None:
    """The entries of a set-aside list; None when there is none (or it is unreadable, logged)."""
    try:
        return json.loads(listed.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        log.error("%s is unreadable: nothing put back from it", listed)
        return None


def _write_aside_list(workdir: Path, entries: list[dict]) -> None:
    _write_list(workdir, ASIDE_LIST, entries)


def _write_list(workdir: Path, name: str, entries: list[dict]) -> None:
    """Write a list of files set aside, whole and fsynced, before the first of them moves."""
    partial = workdir / (name + ".partial")
    with open(partial, "w") as out:
        json.dump(entries, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, workdir / name)
    durable.sync_folders([workdir])


def _portable_symbols(response: requests.Response) -> dict[str, list[str]] | None:
    """The sources, sinks and functions of the engine's description of a portable plugin; None if unreadable."""
    try:
        offered = response.json()
        return {kind: [str(symbol) for symbol in offered.get(kind) or ()] for kind in ("sources", "sinks", "functions")}
    except (ValueError, AttributeError, TypeError):
        return None


def _lstat_mode(path: Path) -> int:
    """The file type and mode of `path` itself (0 when it does not exist)."""
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return 0


def _write_zip(package: Path, members: list[tuple[Path, str]]) -> None:
    """Zip the verified files for the engine, each with its mode (the engine creates files with it)."""
    with zipfile.ZipFile(package, "w", zipfile.ZIP_STORED) as archive:
        for path, arcname in members:
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
            with open(path, "rb") as source, archive.open(info, "w") as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)


def _resolution_failure(function: str, answer: str) -> str | None:
    """The engine's words when its answer to the probe says it could not resolve `function`, else None.

    Any other refusal (the function's own check of the probe's missing arguments, the probe's unknown
    stream) means the function was found and is an api.Function.
    """
    unknown = f"function {function} not found"
    marker = f"validate function {function} error: "
    at = answer.find(marker)
    if at < 0:
        return unknown if f"error: {unknown}" in answer else None
    reason = answer[at + len(marker):].strip().removesuffix(".")
    lines = reason.splitlines()
    if reason == unknown:
        return marker + reason
    if lines and all(FACTORY_LINE.match(line) for line in lines):
        # the native manager's line says why; the other factories only that they have no such function
        native = [line for line in lines if line.startswith("native plugin:")]
        return marker + (native[0] if native else lines[0])
    return None


def _engine_words(response: requests.Response) -> str:
    """The engine's message for a refusal, without its command prefix (our view adds the same one)."""
    try:
        message = str(response.json()["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or f"the engine answered {response.status_code}"
    return COMMAND_PREFIX.sub("", message.strip())

