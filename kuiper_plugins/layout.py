"""Every path of the managed eKuiper installation, in one place, laid out as eKuiper lays it out.

eKuiper keeps three folders: `etc`, `data` and `plugins`. By default they sit
in one base folder (`KUIPER_HOME`, eKuiper's `KuiperBaseKey`), as in eKuiper's
Docker image (`/kuiper/{etc,data,plugins}`); each may be placed on its own, as
eKuiper's `-etc`, `-data` and `-plugins` flags and its deb package do
(`/etc/kuiper`, `/var/lib/kuiper/data`, `/var/lib/kuiper/plugins`). The
registry records paths as `etc/...`, `data/...` and `plugins/...`, whatever
the folders are: `absolute` and `relative` map between the two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath

NATIVE_TYPES = ("sources", "sinks", "functions")
PORTABLE = "portables"
PLUGIN_TYPES = (*NATIVE_TYPES, PORTABLE)


ROOTS = ("etc", "data", "plugins")


@dataclass(frozen=True)
class Layout:
    home: Path
    etc_dir: Path | None = None
    data_dir: Path | None = None
    plugins_dir: Path | None = None

    @classmethod
    def of(cls, settings) -> Layout:
        """The layout a Settings object describes."""
        return cls(settings.home, settings.etc_dir, settings.data_dir, settings.plugins_dir)

    # A frozen layout's paths never change: each is worked out once (reads, start-up's check of every recorded
    # file and the engine's looks ask for them thousands of times).
    @cached_property
    def plugins(self) -> Path:
        return self.plugins_dir or self.home / "plugins"

    @cached_property
    def etc(self) -> Path:
        return self.etc_dir or self.home / "etc"

    @cached_property
    def data(self) -> Path:
        return self.data_dir or self.home / "data"

    @cached_property
    def _roots(self) -> tuple[tuple[str, Path, str], ...]:
        """The three folders: (the name the registry records them with, folder, the folder as a string)."""
        return tuple((name, root, os.fspath(root)) for name, root in
                     (("etc", self.etc), ("data", self.data), ("plugins", self.plugins)))

    @property
    def uploads(self) -> Path:
        return self.data / "uploads"

    @cached_property
    def registry_file(self) -> Path:
        return self.data / "kuiper-plugins.db"

    @property
    def work(self) -> Path:
        """Private scratch space of this service: staging folders and per-plugin locks."""
        return self.data / ".kuiper-plugins"

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def locks(self) -> Path:
        return self.work / "locks"

    @property
    def versions(self) -> Path:
        """Previous versions' files, kept for a rollback (never where the engine scans)."""
        return self.work / "versions"

    @property
    def incoming(self) -> Path:
        """Uploads being written; a file is moved into data/uploads once complete."""
        return self.work / "incoming"

    @property
    def mgmt_keys(self) -> Path:
        """PEM public keys for JWT authentication, one per issuer."""
        return self.etc / "mgmt"

    def native_dir(self, plugin_type: str) -> Path:
        return self.plugins / plugin_type

    def portable_dir(self, name: str) -> Path:
        return self.plugins / "portable" / name

    def config_dirs(self, plugin_type: str) -> tuple[Path, Path]:
        """The etc and data folders a type's config files are copied to (eKuiper v2 reads data first)."""
        return self.etc / plugin_type, self.data / plugin_type

    def folders(self) -> list[Path]:
        """Every folder the runtime layout needs, in creation order."""
        out = [self.plugins / t for t in NATIVE_TYPES] + [self.plugins / "portable"]
        for t in NATIVE_TYPES:
            out.extend(self.config_dirs(t))
        out += [self.uploads, self.mgmt_keys, self.staging, self.locks, self.incoming, self.versions]
        return out

    def create(self) -> None:
        """Create every folder of the layout that is missing."""
        for folder in self.folders():
            # The JWT keys folder is made writable by its owner alone, whatever the umask (see web/auth.py).
            folder.mkdir(parents=True, exist_ok=True, mode=0o755 if folder == self.mgmt_keys else 0o777)

    def relative(self, path: Path) -> str:
        """The path as recorded in the registry: `etc/...`, `data/...` or `plugins/...`, "/"-separated."""
        # Lexical, as PurePath.relative_to is; on the path's normal form (a Path is already in it).
        text = os.fspath(path) if isinstance(path, PurePath) else os.fspath(PurePath(path))
        for name, _root, root_text in self._roots:
            if text == root_text:
                return name
            prefix = root_text.rstrip("/") + "/"
            if text.startswith(prefix):
                return f"{name}/{text[len(prefix):]}"
        raise ValueError(f"{path} is in none of the folders of {self.home}")

    def absolute(self, recorded: str) -> Path:
        """The absolute path of a recorded one."""
        base, _text, rest = self._root_of(recorded)
        return base / rest if rest else base

    def absolute_text(self, recorded: str) -> str:
        """`absolute` as a string, without building a Path (a check of every recorded file asks 10,000s)."""
        _base, text, rest = self._root_of(recorded)
        return os.path.join(text, rest) if rest else text

    def _root_of(self, recorded: str) -> tuple[Path, str, str]:
        """The folder a recorded path starts with (as a Path and as a string), and the rest of the path."""
        root, _, rest = recorded.partition("/")
        for name, base, text in self._roots:
            if name == root:
                return base, text, rest
        raise ValueError(f"{recorded!r} does not start with etc/, data/ or plugins/")

    def contains(self, path: Path) -> bool:
        """Whether `path`, links resolved, lies inside one of the three folders."""
        real = os.path.realpath(path)
        for _name, root, _text in self._roots:
            base = os.path.realpath(root)
            if os.path.commonpath([base, real]) == base:
                return True
        return False
