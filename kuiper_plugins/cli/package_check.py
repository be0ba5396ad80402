"""Check a local plugin zip with the server's own package rules, before a byte of it is uploaded.

`create --zip` and `update --zip` would otherwise send the whole package
(143 MB for some) only to hear that its binary is misnamed. The rules are
not copied here: the zip is read by `install/archive.py` and judged by
`install/packages.py`, the modules the server plans every install with, in
the server's order: the name's ID rule (`check_id`); for an update, the
plugin it replaces (asked of the server by the caller); then the name's
other rules, the archive and the package (`check_zip`). Those modules need
nothing beyond the standard library, and are imported only when a `--zip`
is given, which keeps the client's start fast.

What this machine cannot know is left to the server: its size and entry
limits (its settings), the functions other plugins own, and whether the
engine would load the binary.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kuiper_plugins.cli.client import EXIT_REFUSED, Failure

NOT_SENT = "checked on this machine before uploading: nothing was sent"


def command_prefix(plugin_type: str, action: str) -> str:
    """eKuiper's prefix of a refused create or update: `sources plugins create command error`."""
    if plugin_type == "portables":
        return f"portable plugin {action} command error"
    return f"{plugin_type} plugins {action} command error"


def check_id(name: str) -> None:
    """Refuse a name outside eKuiper's ID rule, as the server does first, without a command's prefix."""
    from kuiper_plugins.errors import PluginError
    from kuiper_plugins.install import packages

    try:
        packages.check_name(name)
    except PluginError as exc:
        raise Failure(f"{exc.message} ({NOT_SENT})", EXIT_REFUSED) from None


def check_zip(plugin_type: str, name: str, zip_path: Path, action: str, *, shell_paras: Sequence[str] = (),
              functions: Sequence[str] = ()) -> None:
    """Refuse, as the server would, a name or zip that cannot be `name`'s package; return when it can."""
    from kuiper_plugins.errors import PluginError
    from kuiper_plugins.install import archive, packages

    prefix = command_prefix(plugin_type, action)
    functions = list(functions) or ([name] if plugin_type == "functions" else [])  # the server's default list
    try:
        packages.check_plugin_name(plugin_type, name)
        for function in functions:
            packages.check_function_name(function)
    except PluginError as exc:
        raise Failure(f"{prefix}: {exc.message} ({NOT_SENT})", EXIT_REFUSED) from None
    try:
        # The server's limits are its settings, which this machine does not know: it applies them itself.
        entries = archive.inspect(zip_path, max_entries=sys.maxsize, max_unpacked_size=sys.maxsize)
        packages.plan_package(
            plugin_type, name, entries,
            archive.member_reader(zip_path, entries),
            shell_paras=shell_paras, functions=functions,
        )
    except PluginError as exc:
        raise Failure(f"{prefix}: fail to install plugin: {exc.message} ({NOT_SENT})", EXIT_REFUSED) from None
    except OSError as exc:
        raise Failure(f"cannot read {zip_path}: {exc.strerror or exc}", EXIT_REFUSED) from None
