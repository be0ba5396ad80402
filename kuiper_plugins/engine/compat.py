"""Would the engine load this native plugin? The check Go's ``plugin.Open`` makes, made from the ELF files.

Go's linker gives every package it links, in a plugin and in a host that can load plugins, an 8-byte
link-time hash: the bytes are the symbol ``go:link.pkghashbytes.<pkg>`` (``go.link.`` before Go 1.20)
and ``go:link.pkghash.<pkg>`` is a Go string pointing at them. Both are exported, so they are in
``.dynsym`` even in a binary linked with ``-s -w``, as eKuiper's release ``kuiperd`` is. When the
engine calls ``plugin.Open``, the dynamic linker binds the plugin's references to ``go:link.pkghash.*``
to the engine's own symbols wherever the engine has the package, and the Go runtime
(``plugin.lastmoduleinit``) walks the plugin's table of packages, in the plugin's link order, and
refuses at the first package whose hash in the plugin differs from the one bound: "plugin was built
with a different version of package <pkg>".

Before the hashes come the reasons the dynamic linker itself refuses (not an ELF file, another machine
or class, another libc), and after them the Go version and module versions each file was built with,
read from the ``.go.buildinfo`` section (what ``go version -m`` prints), to say why the hashes differ.

The check reads two files and decides nothing about what is installed: ``check`` answers with a
``Verdict`` and the installer refuses with its message.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kuiper_plugins.settings import SettingsError

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

log = logging.getLogger(__name__)

HASH_BYTES_PREFIXES = ("go:link.pkghashbytes.", "go.link.pkghashbytes.")
HASH_STRING_PREFIXES = ("go:link.pkghash.", "go.link.pkghash.")
BUILDINFO_MAGIC = b"\xff Go buildinf:"
PLUGIN_STUB_ERROR = b"plugin: not implemented"

# Go's names for the machines Go builds plugins for; anything else is shown as pyelftools names it.
GOARCH_BY_MACHINE = {
    "EM_X86_64": "amd64",
    "EM_386": "386",
    "EM_AARCH64": "arm64",
    "EM_ARM": "arm",
    "EM_RISCV": "riscv64",
    "EM_PPC64": "ppc64",
    "EM_S390": "s390x",
    "EM_MIPS": "mips",
    "EM_LOONGARCH": "loong64",
}

# Build settings (``go version -m``'s ``build`` lines) that change every package's hash when they differ.
HASH_RELEVANT_SETTINGS = (
    "-trimpath",
    "-tags",
    "-gcflags",
    "-asmflags",
    "-race",
    "-msan",
    "-asan",
    "GOEXPERIMENT",
    "GOAMD64",
    "GOARM64",
    "GOARM",
    "GO386",
    "GORISCV64",
)
FLAG_DEFAULTS = {"-trimpath": "false", "-race": "false", "-msan": "false", "-asan": "false"}

PREFIX = "fail to install plugin: cannot open"


class UnusableEngine(SettingsError):
    """``engine.binary`` is missing, not an ELF file, or not a Go program that can load plugins."""


class NotReadable(Exception):
    """The file is not something the dynamic linker would open; the message is its words (glibc's)."""


# ---------------------------------------------------------------------------- what a file holds


@dataclass(frozen=True)
class Module:
    """One module of a Go build, as ``go version -m`` lists it (a ``=>`` line is its replacement)."""

    path: str
    version: str
    replaced_by: Module | None = None

    def describe(self) -> str:
        """Return the version the way ``go version -m`` shows it, with its replacement after ``=>``."""
        if self.replaced_by is None:
            return self.version
        target = self.replaced_by
        where = target.path if target.version in ("", "(devel)") else f"{target.path} {target.version}"
        return f"{self.version} => {where}"


@dataclass(frozen=True)
class BuildInfo:
    """The ``.go.buildinfo`` of a Go binary: toolchain version, main module, dependencies, build settings."""

    go_version: str
    main: Module | None = None
    deps: dict[str, Module] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)

    def module_of(self, package: str) -> Module | None:
        """Return the module that provides ``package`` (the longest module path that is a prefix of it)."""
        best = None
        for module in [self.main, *self.deps.values()]:
            if module is None:
                continue
            if package == module.path or package.startswith(module.path + "/"):
                if best is None or len(module.path) > len(best.path):
                    best = module
        return best

    def setting(self, key: str) -> str:
        """Return one build setting, with Go's default for a flag that is recorded only when set."""
        return self.settings.get(key, FLAG_DEFAULTS.get(key, ""))


@dataclass(frozen=True)
class GoBinary:
    """What the check needs from one ELF file: machine, class, libc, package hashes, build info."""

    path: Path
    elf_type: str
    machine: str
    elf_class: int
    libc: str | None
    libc_name: str | None
    package_hashes: dict[str, bytes]
    build_info: BuildInfo | None
    plugin_stub: bool = False  # built without cgo, with Go's plugin package that only says "not implemented"

    @property
    def arch(self) -> str:
        """Return Go's name for the machine (amd64, arm64, ...), or the ELF name when Go has none."""
        return GOARCH_BY_MACHINE.get(self.machine, self.machine)

    @property
    def go_version(self) -> str | None:
        """Return the Go toolchain version the file was built with (go1.24.1), when it says."""
        return self.build_info.go_version if self.build_info else None


def read_binary(path: Path) -> GoBinary:
    """Read machine, class, libc, package hashes and build info of one ELF file; raise NotReadable if not ELF."""
    with open(path, "rb") as stream:
        head = stream.read(64)
        if len(head) < 64:
            # glibc's words when the file is shorter than an ELF header
            raise NotReadable("file too short")
        if head[:4] != b"\x7fELF":
            raise NotReadable("invalid ELF header")
        stream.seek(0)
        # pyelftools is needed only with engine.binary set, which reads that binary when the settings load (in
        # the gunicorn master, before it forks): a standalone service never imports it.
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            elf = ELFFile(stream)
            return _read_elf(path, elf)
        except (ELFError, ValueError, KeyError, OSError) as exc:
            # a damaged header or table: the dynamic linker refuses it as well
            log.info("cannot read %s as ELF: %s", path, exc)
            raise NotReadable("invalid ELF header") from exc


def _read_elf(path: Path, elf: ELFFile) -> GoBinary:
    from elftools.elf.sections import SymbolTableSection

    hash_addresses: dict[str, tuple[int, int]] = {}
    string_symbols: dict[int, str] = {}
    for table_name in (".dynsym", ".symtab"):
        table = elf.get_section_by_name(table_name)
        if not isinstance(table, SymbolTableSection):
            continue
        for index, name, value, size in _go_link_symbols(elf, table):
            package = _strip_prefix(name, HASH_BYTES_PREFIXES)
            if package is not None:
                hash_addresses.setdefault(package, (value, size or 8))
            elif table_name == ".dynsym":
                package = _strip_prefix(name, HASH_STRING_PREFIXES)
                if package is not None:
                    string_symbols[index] = package
    link_order = _link_order(elf, string_symbols)
    info = _build_info(elf)
    libc, libc_name = _libc(elf)
    hashes = {}
    for package in sorted(hash_addresses, key=lambda pkg: (link_order.get(pkg, len(link_order)), pkg)):
        address, size = hash_addresses[package]
        data = _read_at(elf, address, size)
        if data is not None:
            hashes[package] = data
    return GoBinary(
        path=path,
        elf_type=elf["e_type"],
        machine=elf["e_machine"],
        elf_class=elf.elfclass,
        libc=libc,
        libc_name=libc_name,
        package_hashes=hashes,
        build_info=info,
        plugin_stub=not hashes and _is_plugin_stub(elf, info),
    )


def _is_plugin_stub(elf: ELFFile, info: BuildInfo | None) -> bool:
    """Tell a Go program built with CGO_ENABLED=0 that links the plugin package: its Open only refuses."""
    if info is None or info.settings.get("CGO_ENABLED") != "0":
        return False
    elf.stream.seek(0)
    with mmap.mmap(elf.stream.fileno(), 0, access=mmap.ACCESS_READ) as whole:
        return whole.find(PLUGIN_STUB_ERROR) != -1


def _go_link_symbols(elf: ELFFile, table: SymbolTableSection) -> list[tuple[int, str, int, int]]:
    """Return (index, name, value, size) of the table's ``go?link.pkghash*`` symbols.

    A Go engine exports tens of thousands of symbols; pyelftools builds an object for each, so the
    table is read here with struct, after finding the few names wanted in the string table.
    """
    strings = elf.get_section(table["sh_link"]).data()
    wanted: dict[int, str] = {}
    for prefix in (b"go:link.pkghash", b"go.link.pkghash"):
        start = strings.find(prefix)
        while start != -1:
            end = strings.find(b"\0", start)
            wanted[start] = strings[start:end].decode("utf-8", "replace")
            start = strings.find(prefix, end)
    if not wanted:
        return []
    little = elf.little_endian
    if elf.elfclass == 64:
        layout, name_at, value_at, size_at = struct.Struct("<IBBHQQ" if little else ">IBBHQQ"), 0, 4, 5
    else:
        layout, name_at, value_at, size_at = struct.Struct("<IIIBBH" if little else ">IIIBBH"), 0, 1, 2
    found = []
    for index, entry in enumerate(layout.iter_unpack(_whole_entries(table.data(), layout.size))):
        name = wanted.get(entry[name_at])
        if name is not None:
            found.append((index, name, entry[value_at], entry[size_at]))
    return found


def _whole_entries(data: bytes, size: int) -> bytes:
    return data[: len(data) - len(data) % size]


def _strip_prefix(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def _link_order(elf: ELFFile, string_symbols: dict[int, str]) -> dict[str, int]:
    """Return each package's place in the plugin's own table of packages, the order the runtime checks them.

    The table (``go:link.pkghashes``) is local, but each entry's pointer to ``go:link.pkghash.<pkg>`` needs
    a dynamic relocation against that exported symbol, so the relocations' offsets give the order.
    """
    if not string_symbols:
        return {}
    little = elf.little_endian
    offsets: dict[str, int] = {}
    for section in elf.iter_sections():
        if section["sh_type"] not in ("SHT_RELA", "SHT_REL") or not section["sh_link"]:
            continue
        if elf.get_section(section["sh_link"]).name != ".dynsym":
            continue
        rela = section["sh_type"] == "SHT_RELA"
        if elf.elfclass == 64:
            layout, shift = struct.Struct(("<" if little else ">") + ("QQq" if rela else "QQ")), 32
        else:
            layout, shift = struct.Struct(("<" if little else ">") + ("IIi" if rela else "II")), 8
        for entry in layout.iter_unpack(_whole_entries(section.data(), layout.size)):
            package = string_symbols.get(entry[1] >> shift)
            if package is not None and entry[0] < offsets.get(package, entry[0] + 1):
                offsets[package] = entry[0]
    return {package: place for place, package in enumerate(sorted(offsets, key=offsets.__getitem__))}


def _read_at(elf: ELFFile, address: int, size: int) -> bytes | None:
    """Return ``size`` bytes at virtual ``address`` from the loadable segment that holds them."""
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_LOAD":
            continue
        start = segment["p_vaddr"]
        if start <= address and address + size <= start + segment["p_filesz"]:
            elf.stream.seek(segment["p_offset"] + address - start)
            data = elf.stream.read(size)
            return data if len(data) == size else None
    return None


def _libc(elf: ELFFile) -> tuple[str | None, str | None]:
    """Return the C library the file is linked against (glibc or musl) and the name it is needed by.

    Read from PT_INTERP and DT_NEEDED: Alpine's musl is ``libc.musl-<arch>.so.1`` and its loader
    ``/lib/ld-musl-<arch>.so.1``; musl elsewhere (Debian's musl-gcc) has the soname ``libc.so``, which
    glibc never has (its ``libc.so`` is a linker script); glibc is ``libc.so.6`` and ``ld-linux*``.
    """
    names = []
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_INTERP":
            names.append(segment.get_interp_name())
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is not None and hasattr(dynamic, "iter_tags"):
        names.extend(tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED")
    for name in names:
        base = os.path.basename(name)
        if "musl" in base or base == "libc.so":
            return "musl", name
        if base.startswith("libc.so.") or base.startswith("ld-linux"):
            return "glibc", name
    return None, None


def _build_info(elf: ELFFile) -> BuildInfo | None:
    """Parse ``.go.buildinfo`` (Go 1.18 and later keep the two strings inline after a 32-byte header)."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None:
        return None
    data = section.data()
    if not data.startswith(BUILDINFO_MAGIC) or len(data) < 32:
        return None
    flags = data[15]
    if not flags & 0x2:
        # Before Go 1.18 the header held pointers to the strings; plugins that old are not told apart.
        return None
    position = 32
    strings = []
    for _ in range(2):
        length, position = _uvarint(data, position)
        strings.append(data[position : position + length].decode("utf-8", "replace"))
        position += length
    version, modinfo = strings
    if len(modinfo) >= 33 and modinfo[-17] == "\n":
        modinfo = modinfo[16:-16]  # the runtime's sentinels around the text
    return _parse_modinfo(version, modinfo)


def _uvarint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    return 0, position


def _parse_modinfo(version: str, text: str) -> BuildInfo:
    main = None
    deps: dict[str, Module] = {}
    settings: dict[str, str] = {}
    last: Module | None = None
    for line in text.splitlines():
        fields = line.split("\t")
        kind = fields[0]
        if kind in ("mod", "dep") and len(fields) >= 3:
            last = Module(fields[1], fields[2])
            if kind == "mod":
                main = last
            else:
                deps[last.path] = last
        elif kind == "=>" and len(fields) >= 3 and last is not None:
            replaced = Module(last.path, last.version, Module(fields[1], fields[2]))
            if main is last:
                main = replaced
            else:
                deps[last.path] = replaced
            last = None
        elif kind == "build" and len(fields) >= 2 and "=" in fields[1]:
            key, _, value = fields[1].partition("=")
            settings[key] = value
    return BuildInfo(go_version=version, main=main, deps=deps, settings=settings)


# ---------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class ModuleDifference:
    """A module that provides a differing package, at the version each side was built with."""

    path: str
    plugin: str | None
    engine: str | None


@dataclass(frozen=True)
class Verdict:
    """Would the engine load the plugin, and if not why, in the words the engine would log."""

    ok: bool
    message: str = ""  # the refusal: eKuiper's and Go's words, then the reasons in parentheses
    reasons: tuple[str, ...] = ()  # ours, each on its own
    differing_packages: tuple[str, ...] = ()
    differing_modules: tuple[ModuleDifference, ...] = ()
    plugin_go_version: str | None = None
    engine_go_version: str | None = None
    engine_version: str | None = None

    def as_description(self) -> dict:
        """Return describe's ``compatibility`` object for this verdict."""
        return {
            "verdict": "compatible" if self.ok else "incompatible",
            "goVersion": self.plugin_go_version,
            "engineGoVersion": self.engine_go_version,
            "engineVersion": self.engine_version,
        }


def read_engine(engine_binary: Path) -> GoBinary:
    """Read the engine binary; raise UnusableEngine when it cannot be the Go program that loads plugins."""
    try:
        engine = _cached_read(Path(engine_binary))
    except OSError as exc:
        raise UnusableEngine(f"engine.binary {engine_binary}: {exc.strerror or exc}") from exc
    except NotReadable as exc:
        raise UnusableEngine(f"engine.binary {engine_binary} is not an ELF program: {exc}") from exc
    if not engine.package_hashes and not engine.plugin_stub:
        raise UnusableEngine(
            f"engine.binary {engine_binary} holds no go:link.pkghash symbols: it is not a Go program "
            "that can load native plugins (eKuiper's engine is kuiperd)"
        )
    return engine


def check(
    plugin_so: Path, engine_binary: Path, engine_version: str | None = None, shown_as: Path | None = None
) -> Verdict:
    """Decide, from the two ELF files, whether the engine's ``plugin.Open`` would load the plugin.

    ``engine_version`` names the engine in the verdict when its build info does not (a release's
    ``-X ...cmd.Version`` is not recorded under ``-trimpath``). ``shown_as`` is the path to name in the
    messages, the one the engine would open (the final path, when ``plugin_so`` is still in staging).
    Raise UnusableEngine when ``engine_binary`` cannot be an engine at all.
    """
    engine = read_engine(engine_binary)
    version = engine_version or _engine_version(engine.build_info)
    plugin_so = Path(plugin_so)
    shown = Path(shown_as) if shown_as is not None else plugin_so
    opening = f'{PREFIX} {shown}: plugin.Open("{shown}"):'
    if engine.plugin_stub:
        # without cgo Go's plugin.Open refuses every file at once, before looking at it
        reason = "the engine was built with CGO_ENABLED=0"
        return _refused(f"{PREFIX} {shown}: plugin: not implemented", [reason], engine, version)
    try:
        plugin = read_binary(plugin_so)
    except NotReadable as exc:
        words = f"{opening} {shown}: {exc.args[0]}"
        return _refused(words, ["not a shared object: not a Go plugin"], engine, version)
    except OSError as exc:
        # plugin.Open resolves the path with realpath(3) before dlopen(3)
        if not os.path.exists(plugin_so):
            return _refused(f"{opening} realpath failed", ["no such file"], engine, version)
        return _refused(f"{opening} {shown}: {exc.strerror or exc}", [], engine, version)
    built = _built_with(plugin, engine)

    refusal = _loader_refusal(plugin, engine, shown)
    if refusal:
        words, why = refusal
        return _refused(f"{opening} {words}", [why, built], engine, version, plugin)

    mode = plugin.build_info.settings.get("-buildmode") if plugin.build_info else None
    if not plugin.package_hashes or plugin.elf_type != "ET_DYN" or mode not in (None, "plugin"):
        what = f"it was built with -buildmode={mode}" if mode and mode != "plugin" else "no go:link.pkghash symbols"
        reasons = [what, "build it with go build -buildmode=plugin"]
        return _refused(f"{PREFIX} {shown}: not a Go plugin", reasons, engine, version, plugin)

    differing = tuple(
        package
        for package, digest in plugin.package_hashes.items()
        if package in engine.package_hashes and engine.package_hashes[package] != digest
    )
    if not differing:
        return Verdict(
            ok=True,
            plugin_go_version=plugin.go_version,
            engine_go_version=engine.go_version,
            engine_version=version,
        )
    modules = _differing_modules(differing, plugin.build_info, engine.build_info)
    reasons = ["also " + ", ".join(differing[1:])] if len(differing) > 1 else []
    reasons.append(built)
    reasons.extend(
        f"{m.path} {m.plugin or 'absent'} in the plugin, {m.engine or 'absent'} in the engine" for m in modules
    )
    flags = _differing_settings(plugin.build_info, engine.build_info)
    if flags:
        reasons.append("build settings differ: " + ", ".join(flags))
    # once dlopen has succeeded, plugin.Open names the file without its .so
    words = (
        f'{PREFIX} {shown}: plugin.Open("{_without_so(shown)}"): '
        f"plugin was built with a different version of package {differing[0]}"
    )
    return _refused(words, reasons, engine, version, plugin, differing, modules)


def _refused(
    words: str,
    reasons: list[str],
    engine: GoBinary,
    engine_version: str | None,
    plugin: GoBinary | None = None,
    differing: tuple[str, ...] = (),
    modules: tuple[ModuleDifference, ...] = (),
) -> Verdict:
    return Verdict(
        ok=False,
        message=f"{words} ({'; '.join(reasons)})" if reasons else words,
        reasons=tuple(reasons),
        differing_packages=differing,
        differing_modules=modules,
        plugin_go_version=plugin.go_version if plugin else None,
        engine_go_version=engine.go_version,
        engine_version=engine_version,
    )


def verdict_for(
    plugin_so: Path, engine_binary: Path, engine_version: str | None = None, shown_as: Path | None = None
) -> Verdict:
    """Check one plugin against the engine and log the outcome, for the installer."""
    verdict = check(plugin_so, engine_binary, engine_version, shown_as)
    if verdict.ok:
        log.info("native plugin %s is compatible with %s (%s)", plugin_so, engine_binary, verdict.engine_go_version)
    else:
        log.info("native plugin %s refused against %s: %s", plugin_so, engine_binary, verdict.message)
    return verdict


def _loader_refusal(plugin: GoBinary, engine: GoBinary, path: Path) -> tuple[str, str] | None:
    """Return glibc's dlopen words and our reason when the file is for another class, machine or C library."""
    if plugin.elf_class != engine.elf_class:
        return (
            f"{path}: wrong ELF class: ELFCLASS{plugin.elf_class}",
            f"the plugin is a {plugin.elf_class}-bit file, the engine a {engine.elf_class}-bit program",
        )
    if plugin.machine != engine.machine:
        # glibc's dlopen reports a file for another machine as if it were missing
        return (
            f"{path}: cannot open shared object file: No such file or directory",
            f"the plugin is built for {plugin.arch}, the engine for {engine.arch}",
        )
    if plugin.libc and engine.libc and plugin.libc != engine.libc:
        why = f"the plugin is linked against {plugin.libc} ({plugin.libc_name}), the engine against {engine.libc}"
        if engine.libc == "musl":
            return f"Error loading shared library {plugin.libc_name}: No such file or directory (needed by {path})", why
        # glibc's words when the library is not on its path; a path holding another file gives other words
        return f"{plugin.libc_name}: cannot open shared object file: No such file or directory", why
    return None


def _built_with(plugin: GoBinary, engine: GoBinary) -> str:
    unknown = "an unknown Go"
    return f"plugin built with {plugin.go_version or unknown}, engine with {engine.go_version or unknown}"


def _without_so(path: Path) -> str:
    text = str(path)
    return text[:-3] if len(text) > 3 and text.endswith(".so") else text


def _differing_modules(
    packages: tuple[str, ...], plugin: BuildInfo | None, engine: BuildInfo | None
) -> tuple[ModuleDifference, ...]:
    if plugin is None or engine is None:
        return ()
    seen: dict[str, ModuleDifference] = {}
    for package in packages:
        mine, theirs = plugin.module_of(package), engine.module_of(package)
        module = mine or theirs
        if module is None or module.path in seen:
            continue  # the standard library: the Go versions say it
        mine = mine if mine and mine.path == module.path else None
        theirs = theirs if theirs and theirs.path == module.path else None
        seen[module.path] = ModuleDifference(
            module.path, mine.describe() if mine else None, theirs.describe() if theirs else None
        )
    return tuple(difference for difference in seen.values() if difference.plugin != difference.engine)


def _differing_settings(plugin: BuildInfo | None, engine: BuildInfo | None) -> list[str]:
    if plugin is None or engine is None:
        return []
    return [
        f"{key}={plugin.setting(key) or '(unset)'} in the plugin, {engine.setting(key) or '(unset)'} in the engine"
        for key in HASH_RELEVANT_SETTINGS
        if plugin.setting(key) != engine.setting(key)
    ]


_VERSION_FLAG = re.compile(r"-X[= ]?\S*\.[Vv]ersion=(\S+)")


def _engine_version(info: BuildInfo | None) -> str | None:
    """Return the engine's version from ``-X ...Version=`` (kept without -trimpath) or its main module."""
    if info is None:
        return None
    found = _VERSION_FLAG.search(info.settings.get("-ldflags", ""))
    if found:
        return found.group(1).strip("'\"")
    if info.main and info.main.version not in ("", "(devel)"):
        return info.main.version
    return None


# ---------------------------------------------------------------------------- the engine, read once

_cache_lock = threading.Lock()
_cache: dict[tuple, GoBinary] = {}


def _cached_read(path: Path) -> GoBinary:
    """Read the engine once per file version: it is large and every native install checks against it."""
    status = os.stat(path)
    key = (str(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    with _cache_lock:
        found = _cache.get(key)
    if found is not None:
        return found
    binary = read_binary(path)
    with _cache_lock:
        _cache.clear()  # only the engine in use is worth keeping
        _cache[key] = binary
    return binary
