"""The prebuilt plugin catalogue: where each official plugin zip for this machine can be downloaded.

No request is made: like eKuiper, the URLs are built from the configured
hosts, the eKuiper version, the OS family and the CPU architecture.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from kuiper_plugins.errors import InvalidRequest
from kuiper_plugins.settings import Settings

NOT_LINUX = (
    "It's strongly recommended to install plugins at linux. If you choose to proceed to install plugin, "
    "please make sure the plugin is already validated in your own build."
)
GO_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
    "armv6l": "arm", "armv8l": "arm", "i386": "386", "i686": "386", "x86": "386", "ppc64le": "ppc64le",
    "s390x": "s390x", "riscv64": "riscv64",
}
OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))


def os_family(files: tuple[Path, ...] = OS_RELEASE_FILES) -> str:
    """`alpine` when os-release's PRETTY_NAME says Alpine, else `debian` (as eKuiper labels every other Linux)."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key == "PRETTY_NAME" and "ALPINE" in value.strip().strip("\"'").upper():
                return "alpine"
        return "debian"
    return "debian"


def go_arch(machine: str | None = None) -> str:
    """The CPU architecture in Go's names (amd64, arm64, arm, 386)."""
    machine = (machine or platform.machine()).lower()
    return GO_ARCH.get(machine, machine)


def prebuilt(settings: Settings, plugin_type: str, *, version: str | None = None, system: str | None = None,
             family: str | None = None, arch: str | None = None) -> dict[str, str]:
    """Map each prebuilt plugin of a type to its download URL; the first configured host wins.

    `version`, `system` and `arch` are the engine's own when it is known (engine.url); else
    basic.kuiperVersion and this machine's.
    """
    if (system or sys.platform) != "linux":
        raise InvalidRequest(NOT_LINUX)
    family = family or os_family()
    arch = arch or go_arch()
    version = version or settings.kuiper_version
    host = settings.plugin_hosts[0]
    return {
        plugin: f"{host}/kuiper-plugins/{version}/{family}/{plugin_type}/{plugin}_{arch}.zip"
        for plugin in settings.prebuild.get(plugin_type, ())
    }
