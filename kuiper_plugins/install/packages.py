"""The package rules: a zip's listing -> an install plan. Pure: no disk, no network.

`plan_native` and `plan_portable` decide which zip members become which
installed files; the installer carries the plan out. Every refusal is a
PackageInvalid whose message names the plugin's problem.

The same rules decide what start-up adopts from disk and from eKuiper's
store (`check_plugin_name`, `check_function_name`, `adoptable_functions`,
`parse_descriptor`): a plugin the API would refuse is not listed because
eKuiper or a user put it there. `claims_copy` decides which config files
found beside an adopted plugin are its own, for its DELETE to remove.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kuiper_plugins.engine import builtins
from kuiper_plugins.errors import InvalidRequest, PackageInvalid
from kuiper_plugins.install.archive import Entry
from kuiper_plugins.layout import PORTABLE

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # eKuiper's ValidateID rule
# The longest file name a plugin's name becomes is `<name>.yaml`/`<name>.json` (and `<Name>@<version>.so`):
# the file system allows 255 bytes, so a name may have 250.
MAX_NAME_BYTES = 250
# A portable plugin's `<name>.json`, read from a package or from a folder found on disk, is read up to this size.
DESCRIPTOR_MAX_BYTES = 1024 * 1024
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
INSTALL_SCRIPT = "install.sh"
PORTABLE_LANGUAGES = ("go", "python")
PORTABLE_SYMBOL_KINDS = ("sources", "sinks", "functions")
# The most functions one plugin may export: a function plugin's list (a request's, or eKuiper's pluginFuncs
# row found at start-up), and each symbol list of a portable descriptor. eKuiper has no limit; a thousand
# is far beyond any real plugin and keeps a hostile list from filling the registry and every listing.
MAX_FUNCTIONS = 1000
_SYMBOL_WORD = {"sources": "source", "sinks": "sink", "functions": "function"}


def check_name(name: Any, what: str = "name") -> str:
    """Return `name` if it follows eKuiper's ID rule (letters, digits, `_`, `-`), else refuse it in eKuiper's words."""
    if not isinstance(name, str) or name == "":
        raise InvalidRequest("id cannot be empty")
    if name != name.strip():
        raise InvalidRequest(f"id '{name}' contains leading or trailing whitespace")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"id '{name}' contains invalid characters: only alphanumeric, hyphens and underscores are allowed"
        )
    if len(name) > MAX_NAME_BYTES:
        raise InvalidRequest(
            f"id '{name[:20]}...' is too long ({len(name)} characters; a {what} becomes file names, which may"
            f" have at most 255 bytes: {MAX_NAME_BYTES} characters are left for it)"
        )
    return name


def check_plugin_name(plugin_type: str, name: Any) -> str:
    """Return `name` if the API takes it for a plugin of `plugin_type`: the ID rule, and no built-in name.

    A native plugin named after one of eKuiper's built-ins (source `mqtt`, function `abs`) could never be
    used: eKuiper looks its built-ins up first. Portable plugin names are not symbols and are not checked.
    """
    check_name(name)
    if plugin_type in builtins.BY_KIND and builtins.builtin_name(plugin_type, name):
        raise InvalidRequest(f"invalid name {name}: {builtins.describe(plugin_type, name)}")
    return name


def check_function_name(name: Any) -> str:
    """Return `name` if a plugin may export a function of that name: the ID rule, and not an eKuiper built-in."""
    check_name(name)
    if builtins.builtin_name("functions", name):
        raise InvalidRequest(f"invalid function name {name}: {builtins.describe('functions', name)}")
    return name


@dataclass(frozen=True)
class FunctionListVerdict:
    """What a function list found outside the API (eKuiper's pluginFuncs) may register, and what not."""

    kept: list[str]  # in the list's order, each once, at most MAX_FUNCTIONS
    refused: int  # names the API would refuse (repeats not counted)
    examples: list[str]  # the first few refusals, each with its reason, for one log line
    past_limit: int  # valid names beyond the first MAX_FUNCTIONS


def adoptable_functions(listed: Sequence[str], example_count: int = 3) -> FunctionListVerdict:
    """Split a function list found on disk into the names the API would register and the rest.

    Each name must pass `check_function_name`; a name listed again counts once; the first
    MAX_FUNCTIONS valid names are kept, in order.
    """
    kept: list[str] = []
    seen: set[str] = set()
    refused, past_limit = 0, 0
    examples: list[str] = []
    for name in listed:
        if name in seen:
            continue
        seen.add(name)
        try:
            check_function_name(name)
        except InvalidRequest as exc:
            refused += 1
            if len(examples) < example_count:
                examples.append(f"'{_printable(name, 40)}' ({_printable(exc.message, 100)})")
            continue
        if len(kept) < MAX_FUNCTIONS:
            kept.append(name)
        else:
            past_limit += 1
    return FunctionListVerdict(kept, refused, examples, past_limit)


def _printable(text: str, limit: int) -> str:
    """Text for one log line: cut at `limit` characters, every non-ASCII or control character escaped."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return ascii(cut)[1:-1]


@dataclass(frozen=True)
class Unit:
    """One thing to install: a staged file or folder `src` (relative to the unpacked tree) at `dest`.

    Units sharing a `group` are written all or none: when any of their
    destinations already exists, the whole group is kept as it is on disk
    (a user's edited source yaml survives a reinstall).
    """

    src: str
    dest: str
    is_dir: bool = False
    group: str | None = None


@dataclass(frozen=True)
class InstallPlan:
    plugin_type: str
    name: str
    version: str
    units: list[Unit]
    script: str | None = None
    functions: list[str] = field(default_factory=list)
    descriptor: dict[str, Any] | None = None
    executable: str | None = None  # member to give the run bit (portable)


def _root_files(entries: Sequence[Entry]) -> dict[str, Entry]:
    return {e.name: e for e in entries if not e.is_dir and "/" not in e.name}


def _zip_files(entries: Sequence[Entry], limit: int = 20) -> str:
    """The zip's entry names as Go prints a []string (a folder keeps its trailing slash), the first `limit`."""
    names = [e.name + ("/" if e.is_dir else "") for e in entries]
    shown = " ".join(names[:limit])
    return shown + (f" ...and {len(names) - limit} more" if len(names) > limit else "")


def _go_bool(value: bool) -> str:
    return "true" if value else "false"


def _check_script(has_script: bool, shell_paras: Sequence[str]) -> None:
    if shell_paras and not has_script:
        raise PackageInvalid(f"have shell parameters : [{' '.join(shell_paras)}] but no install.sh file")


def plan_native(
    plugin_type: str, name: str, entries: Sequence[Entry], *, shell_paras: Sequence[str] = (),
    functions: Sequence[str] = (), shown: Callable[[str], str] = str,
) -> InstallPlan:
    """Plan a native source, sink or function plugin from its zip listing.

    `shown` maps a recorded path (`plugins/sources/x.so`) to the one messages name (absolute, as eKuiper's).
    """
    root = _root_files(entries)
    has_script = INSTALL_SCRIPT in root
    _check_script(has_script, shell_paras)

    capitalised = name[0].upper() + name[1:]
    so_pattern = re.compile(rf"(?:{re.escape(name)}|{re.escape(capitalised)})(?:@(.*))?\.so")
    binaries = [(n, m) for n in sorted(root) if (m := so_pattern.fullmatch(n))]
    yaml_name = f"{name}.yaml"
    needs_yaml = plugin_type == "sources"
    problems = []
    if not binaries:
        problems.append(f"no {name}.so or {capitalised}.so (optionally @version) at the zip root")
    if len(binaries) > 1:
        problems.append(f"more than one binary for plugin {name}: {', '.join(n for n, _ in binaries)}")
    if needs_yaml and yaml_name not in root:
        problems.append(f"source plugin {name} needs {yaml_name} at the zip root")
    if problems:
        filenames = [shown(f"plugins/{plugin_type}/{n}") for n, _ in binaries]
        if needs_yaml and yaml_name in root:
            filenames += [shown(f"{folder}/sources/{yaml_name}") for folder in ("etc", "data")]
        # eKuiper's first words, which a client may match, then the reason, then eKuiper's own account of its
        # check, which alone says little to a person and can run long.
        raise PackageInvalid(
            f"invalid zip file ({'; '.join(problems)}; eKuiper's check: expectFiles: {3 if needs_yaml else 1},"
            f" got filenames:[{' '.join(filenames)}], zipFiles: [{_zip_files(entries)}],"
            f" yamlFileChecked:{_go_bool(yaml_name in root and needs_yaml)}, soFileChecked:{_go_bool(bool(binaries))})"
        )
    so_name, match = binaries[0]
    version = match.group(1) or ""
    if match.group(1) is not None and (not VERSION_PATTERN.fullmatch(version) or ".." in version):
        raise PackageInvalid(f"invalid zip file: binary {so_name} has an invalid version {version!r}")

    etc_dir, data_dir = f"etc/{plugin_type}", f"data/{plugin_type}"
    units = [Unit(so_name, f"plugins/{plugin_type}/{so_name}")]
    if plugin_type == "sources":
        units += [Unit(yaml_name, f"{etc_dir}/{yaml_name}", group="yaml"),
                  Unit(yaml_name, f"{data_dir}/{yaml_name}", group="yaml")]
    json_name = f"{name}.json"
    if json_name in root:
        units += [Unit(json_name, f"{etc_dir}/{json_name}"), Unit(json_name, f"{data_dir}/{json_name}")]
    if any(e.name == "etc" or e.name.startswith("etc/") for e in entries):
        if "etc" in root:
            raise PackageInvalid("invalid zip file: etc must be a folder")
        units += [Unit("etc", f"{etc_dir}/{name}", is_dir=True), Unit("etc", f"{data_dir}/{name}", is_dir=True)]

    return InstallPlan(
        plugin_type=plugin_type,
        name=name,
        version=version.removeprefix("v"),
        units=units,
        script=INSTALL_SCRIPT if has_script else None,
        functions=list(functions) if plugin_type == "functions" else [],
    )


def type_label(plugin_type: str) -> str:
    """How eKuiper names a type in messages: `sources`, `sinks`, `functions`, `portable`."""
    return "portable" if plugin_type == PORTABLE else plugin_type


def main_file(plugin_type: str, name: str, recorded: Sequence[str]) -> str | None:
    """The recorded file a plugin stands on: a native plugin's .so, a portable plugin's folder."""
    if plugin_type == PORTABLE:
        folder = f"plugins/portable/{name}"
        return folder if folder in recorded else None
    return so_file(plugin_type, recorded)


def so_file(plugin_type: str, recorded: Sequence[str]) -> str | None:
    """The recorded .so of a native plugin (the file eKuiper's delete looks the plugin up by)."""
    folder = f"plugins/{plugin_type}/"
    return next((f for f in recorded if f.startswith(folder) and f.endswith(".so")), None)


def kept_on_delete(plugin_type: str, name: str) -> list[str]:
    """Recorded files a delete leaves in place: a source's yaml, which holds the user's configuration."""
    if plugin_type != "sources":
        return []
    return [f"etc/sources/{name}.yaml", f"data/sources/{name}.yaml"]


def descriptor_member(name: str) -> str:
    return f"{name}.json"


def plan_portable(
    name: str, entries: Sequence[Entry], descriptor_bytes: bytes | None, *, shell_paras: Sequence[str] = ()
) -> InstallPlan:
    """Plan a portable plugin from its zip listing and the bytes of its `<name>.json` descriptor."""
    root = _root_files(entries)
    json_name = descriptor_member(name)
    if json_name not in root or descriptor_bytes is None:
        raise PackageInvalid(f"missing or invalid json file {json_name}, found {len(entries)} files in total")
    has_script = INSTALL_SCRIPT in root
    _check_script(has_script, shell_paras)
    info = parse_descriptor(name, descriptor_bytes)

    executable = info["executable"]
    files = {e.name for e in entries if not e.is_dir}
    if executable not in files:
        raise PackageInvalid(f"missing {executable}")
    for source in info["sources"]:
        if f"sources/{source}.yaml" not in files:
            raise PackageInvalid(f"missing sources/{source}.yaml")

    units: list[Unit] = []
    for entry in entries:
        top, _, rest = entry.name.partition("/")
        if top not in PORTABLE_SYMBOL_KINDS or not rest:
            continue
        if entry.is_dir:
            continue  # its files are units of their own; their folders are made as they are placed
        units += [Unit(entry.name, f"etc/{entry.name}"), Unit(entry.name, f"data/{entry.name}")]
    # The rest of the unpacked tree becomes the plugin's own folder; it must come last.
    units.append(Unit("", f"plugins/portable/{name}", is_dir=True))

    return InstallPlan(
        plugin_type="portables",
        name=name,
        version=info["version"],
        units=units,
        script=INSTALL_SCRIPT if has_script else None,
        functions=list(info["functions"]),
        descriptor=info,
        executable=executable,
    )


def plan_package(
    plugin_type: str, name: str, entries: Sequence[Entry], read_member: Callable[[str, int], bytes], *,
    shell_paras: Sequence[str] = (), functions: Sequence[str] = (), shown: Callable[[str], str] = str,
) -> InstallPlan:
    """Plan any plugin from its zip listing; `read_member(name, max_size)` reads a portable's descriptor.

    The one entry point for a package's rules: the server plans with it after `archive.inspect`, and the
    command-line client checks a local zip with it before uploading, so both refuse the same packages.
    """
    if plugin_type == PORTABLE:
        member = descriptor_member(name)
        present = any(e.name == member and not e.is_dir for e in entries)
        raw = read_member(member, DESCRIPTOR_MAX_BYTES) if present else None
        return plan_portable(name, entries, raw, shell_paras=shell_paras)
    return plan_native(plugin_type, name, entries, shell_paras=shell_paras, functions=functions or [name],
                       shown=shown)


def parse_descriptor(name: str, descriptor_bytes: bytes) -> dict[str, Any]:
    """Parse and check a portable plugin's `<name>.json` in eKuiper's order; return it normalised."""
    json_name = descriptor_member(name)
    try:
        raw = json.loads(descriptor_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackageInvalid(f"invalid json file {json_name}: {exc}")
    if not isinstance(raw, dict):
        raise PackageInvalid(f"invalid json file {json_name}: expected an object")
    return _validate_descriptor(name, raw, json_name)


@dataclass(frozen=True)
class ConfigCopy:
    """A config file or folder eKuiper keeps for a plugin outside the plugin's own binary or folder."""

    path: str  # as recorded: etc/sources/random.yaml
    packaged_as: str | None  # where eKuiper's install took it from in the package: sources/random.yaml (portable)
    is_dir: bool = False  # a native plugin's etc/<type>/<name>/ folder
    settings: bool = False  # a source's yaml: once installed, it holds the user's configuration
    builtin: bool = False  # named after an eKuiper built-in (a portable's sink `file`): eKuiper's own file


def config_copies(plugin_type: str, name: str, descriptor: dict[str, Any] | None = None) -> list[ConfigCopy]:
    """The config files and folders eKuiper keeps for a plugin, whoever installed it (its delete removes them).

    Native: `<name>.json` (and a sink's `<name>.yaml`, a source's `<name>.yaml`) in etc/<type> and
    data/<type>, and the `<name>/` folders there. Portable: the yaml and json of each symbol it declares,
    which eKuiper's install writes from the package's `<kind>/<symbol>.<suffix>`.
    """
    copies: list[ConfigCopy] = []
    if plugin_type == "portables":
        for kind in PORTABLE_SYMBOL_KINDS:
            for symbol in (descriptor or {}).get(kind, []):
                builtin = bool(builtins.builtin_name(kind, symbol))
                for suffix in ("yaml", "json") if kind != "functions" else ("json",):
                    packaged = f"{kind}/{symbol}.{suffix}"
                    copies += [ConfigCopy(f"{root}/{packaged}", packaged, settings=kind == "sources" and
                                          suffix == "yaml", builtin=builtin) for root in ("etc", "data")]
        return copies
    suffixes = ("json", "yaml") if plugin_type in ("sources", "sinks") else ("json",)
    for root in ("etc", "data"):
        copies += [ConfigCopy(f"{root}/{plugin_type}/{name}.{suffix}", None,
                              settings=plugin_type == "sources" and suffix == "yaml") for suffix in suffixes]
        copies.append(ConfigCopy(f"{root}/{plugin_type}/{name}", None, is_dir=True))
    return copies


def claims_copy(copy: ConfigCopy, *, same_as_packaged: bool | None, installed_by_engine: bool) -> bool:
    """Whether a plugin found on disk owns a config copy of its name that is there, and a DELETE may remove it.

    Only what eKuiper's install of this plugin would have written is the plugin's:
    - a copy of a file the plugin's folder still holds (`same_as_packaged` is not None) is its own only
      when it has the folder's bytes exactly: any other content is someone's edit, or someone's file;
    - without that evidence, only a plugin whose install eKuiper's store records (its nativePlugin or
      portablePlugin row) owns its metadata json and `<name>/` folders, as eKuiper's own delete assumes;
      a source's yaml never, since it holds the user's configuration;
    - a copy named after a built-in is eKuiper's own, whatever else holds.
    """
    if copy.builtin:
        return False
    if same_as_packaged is not None:
        return same_as_packaged
    return installed_by_engine and not copy.settings


def _validate_descriptor(name: str, raw: dict[str, Any], json_name: str) -> dict[str, Any]:
    """Check a portable descriptor in eKuiper's order and return it normalised."""

    def text(key: str) -> str:
        value = raw.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise PackageInvalid(f"invalid json file {json_name}: {key} must be a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: SQLite and responses cannot hold it
            raise PackageInvalid(f"invalid json file {json_name}: {key} is not valid Unicode text")
        return value

    def symbols(key: str) -> list[str]:
        value = raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PackageInvalid(f"invalid json file {json_name}: {key} must be a list of names")
        if len(value) > MAX_FUNCTIONS:
            raise PackageInvalid(f"invalid json file {json_name}: {key} lists {len(value)} names (at most"
                                 f" {MAX_FUNCTIONS})")
        for symbol in value:
            if not NAME_PATTERN.fullmatch(symbol):
                raise PackageInvalid(f"invalid json file {json_name}: invalid {key} name {_quoted(symbol)}")
            if len(symbol) > MAX_NAME_BYTES:
                raise PackageInvalid(
                    f"invalid json file {json_name}: invalid {key} name {_quoted(symbol)}: it is too long"
                    f" ({len(symbol)} characters; a symbol becomes file names: {MAX_NAME_BYTES} are left for it)"
                )
        if len(set(value)) != len(value):
            raise PackageInvalid(f"invalid json file {json_name}: {key} lists a name twice")
        return list(value)

    declared = text("name")
    if declared and declared != name:
        raise PackageInvalid(f"invalid plugin, expect name '{name}' but got '{declared}'")
    language = text("language")
    if not language:
        raise PackageInvalid("invalid plugin, missing language")
    executable = text("executable")
    if not executable:
        raise PackageInvalid("invalid plugin, missing executable")
    sources, sinks, functions = symbols("sources"), symbols("sinks"), symbols("functions")
    if not (sources or sinks or functions):
        raise PackageInvalid("invalid plugin, must define at lease one source, sink or function")
    if language not in PORTABLE_LANGUAGES:
        raise PackageInvalid(f"invalid plugin, language '{language}' is not supported")
    parts = executable.split("/")
    if executable.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] in PORTABLE_SYMBOL_KINDS:
        raise PackageInvalid(f"invalid plugin, executable '{executable}' must be a file inside the plugin folder")

    info: dict[str, Any] = {
        "name": name,
        "version": text("version"),
        "language": language,
        "executable": executable,
    }
    for optional in ("virtualEnvType", "env"):
        if raw.get(optional) is not None:
            info[optional] = text(optional)
    info.update(sources=sources, sinks=sinks, functions=functions)
    # Ours, after eKuiper's checks. A built-in function would make the one function namespace name this
    # plugin as the owner of eKuiper's own `abs`; a built-in source's yaml is eKuiper's configuration of
    # it. Sinks are left out: eKuiper's own sample plugin declares a sink `file`, and a sink brings no
    # configuration of its own (its json is refused where a file not ours is already there).
    for kind in ("functions", "sources"):
        for symbol in info[kind]:
            if builtins.builtin_name(kind, symbol):
                raise PackageInvalid(f"invalid json file {json_name}: invalid {_SYMBOL_WORD[kind]} name {symbol}:"
                                     f" {builtins.describe(kind, symbol)}")
    return info


def _quoted(symbol: str) -> str:
    return f"'{symbol}'" if len(symbol) <= 40 else f"'{symbol[:20]}...'"
