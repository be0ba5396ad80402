"""Plugin packages for tests, laid out as eKuiper expects and checked by the service's own package rules.

`native_plugin_zip` and `portable_plugin_zip` write a zip a test can serve from the file server; each is
then read back through `kuiper_plugins.install.archive` and planned by `kuiper_plugins.install.packages`,
the very code an install runs, so a builder never hands a test a package the service would refuse for its
layout. A refusal comes out as the service's own error (PackageInvalid, ArchiveRejected, InvalidRequest),
in its words. `make_zip` writes any zip at all, for tests of what the service refuses.

The binaries are stand-ins unless a test passes real ones: a native `.so` of a few bytes (enough for a
service without `engine.binary`, which checks only names), a portable executable that prints a line and
exits (enough with `portable.verifyOnInstall` off and no engine, which would start it).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from kuiper_plugins.install import archive, packages
from kuiper_plugins.layout import PORTABLE
from kuiper_plugins.settings import Settings

Content = bytes | str | Path

# Not a loadable plugin: a service that checks binaries against an engine (engine.binary) refuses it.
STAND_IN_SO = b"\x7fELF stand-in for a native plugin built by kuiper_plugins.testing; not loadable\n"
STAND_IN_PROGRAMS = {
    "python": 'print("stand-in for a portable plugin built by kuiper_plugins.testing: it cannot shake hands")\n',
    "go": "#!/bin/sh\necho 'stand-in for a portable plugin built by kuiper_plugins.testing: it cannot shake hands'\n",
}
# A source's configuration as eKuiper's own plugins ship it: a `default` section, empty.
DEFAULT_SOURCE_YAML = "default: {}\n"
_LIMITS = {field.name: field.default for field in dataclasses.fields(Settings)}
_FILE_MODE = 0o100644
_EXECUTABLE_MODE = 0o100755


def make_zip(path: Path, members: Mapping[str, bytes | str], *, modes: Mapping[str, int] | None = None) -> Path:
    """Write a zip at `path` holding `members` (name -> content; a name ending in "/" is a folder).

    `modes` sets the Unix mode of chosen members (e.g. {"mirror": 0o100755}). Nothing is checked.
    """
    modes = modes or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            if name.endswith("/"):
                info.external_attr = (0o40755 << 16) | 0x10
            else:
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = modes.get(name, _FILE_MODE) << 16
            data = content.encode() if isinstance(content, str) else content
            zf.writestr(info, data)
    return path


def native_plugin_zip(
    path: Path, plugin_type: str, name: str, version: str | None = None, *, so: Content = STAND_IN_SO,
    config: Content | None = None, files: Mapping[str, Content] | None = None,
    install_script: Content | None = None,
) -> Path:
    """Write a native source, sink or function plugin package at `path`; return `path`.

    The binary is `<Name>@v<version>.so` (`<Name>.so` without a version), eKuiper's naming, holding `so`.
    `config` is the plugin's `<name>.yaml` (a source needs one: an empty `default` section unless given);
    `files` adds members (`<name>.json`, `etc/...`); `install_script` becomes `install.sh`.
    """
    if plugin_type not in ("sources", "sinks", "functions"):
        raise ValueError(f"plugin_type must be sources, sinks or functions, not {plugin_type!r}")
    packages.check_plugin_name(plugin_type, name)
    capitalised = name[0].upper() + name[1:]
    so_name = f"{capitalised}@v{version.removeprefix('v')}.so" if version else f"{capitalised}.so"
    members: dict[str, Content] = {so_name: so}
    if config is None and plugin_type == "sources":
        config = DEFAULT_SOURCE_YAML
    if config is not None:
        members[f"{name}.yaml"] = config
    members.update(files or {})
    if install_script is not None:
        members[packages.INSTALL_SCRIPT] = install_script
    _write(path, members, script=packages.INSTALL_SCRIPT if install_script is not None else None)
    _keep_if_accepted(path, plugin_type, name)
    return path


def portable_plugin_zip(
    path: Path, name: str, language: str, *, version: str = "v1.0.0", functions: Sequence[str] = (),
    sources: Sequence[str] = (), sinks: Sequence[str] = (), executable: str | None = None,
    program: Content | None = None, files: Mapping[str, Content] | None = None,
    install_script: Content | None = None,
) -> Path:
    """Write a portable plugin package at `path`: its `<name>.json` descriptor, its executable and its files.

    Without symbols it declares one function named after the plugin. The executable is `<name>.py`
    (python) or `<name>` (go) unless named, holding `program` (a stand-in unless given) with its run bit;
    each source gets `sources/<source>.yaml` (an empty `default` section) unless `files` holds one.
    """
    if not (functions or sources or sinks):
        functions = (name,)
    executable = executable or (f"{name}.py" if language == "python" else name)
    descriptor = {"name": name, "version": version, "language": language, "executable": executable,
                  "sources": list(sources), "sinks": list(sinks), "functions": list(functions)}
    members: dict[str, Content] = {
        packages.descriptor_member(name): json.dumps(descriptor, indent=2) + "\n",
        executable: program if program is not None else STAND_IN_PROGRAMS.get(language, STAND_IN_PROGRAMS["go"]),
    }
    for source in sources:
        members[f"sources/{source}.yaml"] = DEFAULT_SOURCE_YAML
    members.update(files or {})
    if install_script is not None:
        members[packages.INSTALL_SCRIPT] = install_script
    _write(path, members, executable=executable,
           script=packages.INSTALL_SCRIPT if install_script is not None else None)
    _keep_if_accepted(path, PORTABLE, name)
    return path


def check_plugin_zip(path: Path, plugin_type: str, name: str) -> packages.InstallPlan:
    """Apply the service's archive and package rules (at its default limits) to a zip; return the plan.

    Raises what an install of it would: ArchiveRejected, PackageInvalid or InvalidRequest, in the service's words.
    """
    packages.check_plugin_name(plugin_type, name)
    entries = archive.inspect(path, max_entries=_LIMITS["max_archive_entries"],
                              max_unpacked_size=_LIMITS["max_unpacked_size"])
    # The planner's own entry point, as the server and the CLI's --zip check call it.
    return packages.plan_package(plugin_type, name, entries,
                                 archive.member_reader(path, entries))


def _keep_if_accepted(path: Path, plugin_type: str, name: str) -> None:
    """Check the zip just written; remove it when the rules refuse it, so no test serves it by mistake."""
    try:
        check_plugin_zip(path, plugin_type, name)
    except Exception:
        path.unlink()
        raise


def _write(path: Path, members: Mapping[str, Content], *, executable: str | None = None,
           script: str | None = None) -> None:
    """Write the members (a Path is read, keeping its run bit) with the executable and script runnable."""
    data: dict[str, bytes | str] = {}
    modes: dict[str, int] = {}
    for member, content in members.items():
        if isinstance(content, Path):
            data[member] = content.read_bytes()
            modes[member] = _EXECUTABLE_MODE if content.stat().st_mode & 0o111 else _FILE_MODE
        else:
            data[member] = content
    for runnable in (executable, script):
        if runnable is not None:
            modes[runnable] = _EXECUTABLE_MODE
    make_zip(path, data, modes=modes)
