"""Every path under KUIPER_HOME, in one place, laid out as an eKuiper installation is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NATIVE_TYPES = ("sources", "sinks", "functions")
PORTABLE = "portables"
PLUGIN_TYPES = (*NATIVE_TYPES, PORTABLE)


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def plugins(self) -> Path:
        return self.home / "plugins"

    @property
    def etc(self) -> Path:
        return self.home / "etc"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def uploads(self) -> Path:
        return self.data / "uploads"

    @property
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
        out += [self.uploads, self.mgmt_keys, self.staging, self.locks, self.incoming]
        return out

    def create(self) -> None:
        """Create every folder of the layout that is missing."""
        for folder in self.folders():
            folder.mkdir(parents=True, exist_ok=True)

    def relative(self, path: Path) -> str:
        """The path as recorded in the registry: relative to KUIPER_HOME, "/"-separated."""
        return path.relative_to(self.home).as_posix()

    def absolute(self, recorded: str) -> Path:
        return self.home / recorded
