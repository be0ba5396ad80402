"""eKuiper's own engine for the bench: kuiperd built as the tests build it, holding the plugins the service holds.

The build and the runner are the tests' own (kuiper_plugins.testing's `build_kuiperd` and `Kuiperd`, and
tests/engine_fixtures.py's `native_plugin`), cached once per machine; a warm cache builds nothing. The plugins
are real Go plugins built against that engine, so that kuiperd's install opens each one as it opens any: a
source (`random`, with its yaml) and two function plugins (`multi`: twice and shout; `mixed`: good and stale).
Both sides install them through their own REST API, by file:// URLs from their own data/uploads.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import harness

sys.path.insert(0, str(harness.REPO / "tests"))

import engine_fixtures  # noqa: E402  (the tests' own plugin builds, from tests/)

from kuiper_plugins.testing.engine import Kuiperd, KuiperdBuild, build_kuiperd  # noqa: E402

RANDOM_YAML = "default:\n  max: 100\n"


@dataclass(frozen=True)
class Package:
    """One plugin as both sides install it: its type, its install body (file:// filled in per side), its zip."""

    plugin_type: str
    name: str
    zip_name: str
    functions: tuple[str, ...] = ()

    def body(self, uploads: Path) -> dict:
        body: dict = {"name": self.name, "file": f"file://{uploads / self.zip_name}"}
        if self.functions:
            body["functions"] = list(self.functions)
        return body


PACKAGES = (
    Package("sources", "random", "random.zip"),
    Package("functions", "multi", "multi.zip", ("twice", "shout")),
    Package("functions", "mixed", "mixed.zip", ("good", "stale")),
)
INSTALL_TIMED = Package("functions", "multi", "multi.zip", ("twice", "shout"))  # the small native install timed


def say(text: str) -> None:
    print(f"  [engine build] {text}", flush=True)


def build(packages_dir: Path) -> KuiperdBuild:
    """kuiperd and the plugin zips (cached builds), the zips copied into `packages_dir` as the bench uses them."""
    engine = build_kuiperd(say)
    packages_dir.mkdir(parents=True, exist_ok=True)
    random_plugin = engine_fixtures.native_plugin(say, "random", ())
    with zipfile.ZipFile(random_plugin.zip_path) as built, \
            zipfile.ZipFile(packages_dir / "random.zip", "w", zipfile.ZIP_DEFLATED) as packaged:
        packaged.writestr(random_plugin.so_name, built.read(random_plugin.so_name))
        packaged.writestr("random.yaml", RANDOM_YAML)  # a source plugin ships its configuration
    for name, functions in (("multi", ("twice", "shout")), ("mixed", ("good", "stale"))):
        shutil.copyfile(engine_fixtures.native_plugin(say, name, functions).zip_path, packages_dir / f"{name}.zip")
    return engine


def place(packages_dir: Path, uploads: Path) -> None:
    """Put the plugin zips in a side's data/uploads, where its file:// URLs point."""
    uploads.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        shutil.copyfile(packages_dir / package.zip_name, uploads / package.zip_name)


def start(engine: KuiperdBuild, home: Path, log_path: Path) -> Kuiperd:
    """A kuiperd on loopback with a home of its own (the tests' runner); no Python portable plugin is used."""
    return Kuiperd(engine, home, log_path, Path(sys.executable)).start()
