"""What the benchmarks run against: KUIPER_HOMEs with a populated registry, and plugin zips.

A read benchmark needs thousands of registered plugins; installing 10,000 of
them through the API would take longer than the whole benchmark. The registry
rows are written instead through the project's own `db` and `registry`
functions, in one transaction, exactly as an install records them, and every file
recorded (each native plugin's .so, each source's two yaml files) is put on
disk, so that start-up sees a real, undamaged installation.
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kuiper_plugins.layout import Layout
from kuiper_plugins.store import db, registry

FUNCTIONS_PER_PLUGIN = 4
SOURCE_YAML = "default:\n  interval: 1000\n"


@dataclass(frozen=True)
class Population:
    """What a populated home holds: `size` sources and as many function names, and what to ask for."""

    home: Path
    size: int
    sources: dict[str, str]  # source plugin name -> described version
    functions: dict[str, str]  # function name -> owning plugin

    @property
    def probe_source(self) -> str:
        """The source plugin the describe benchmark asks for: one from the middle of the list."""
        return sorted(self.sources)[len(self.sources) // 2]

    @property
    def probe_function(self) -> str:
        return sorted(self.functions)[len(self.functions) // 2]

    def write_bare_data(self, path: Path) -> Path:
        """Write the same content for bench/bare_app.py to serve from memory."""
        path.write_text(json.dumps({"sources": self.sources, "functions": self.functions}), encoding="utf-8")
        return path


def capitalised(name: str) -> str:
    return name[0].upper() + name[1:]


def populate(home: Path, size: int) -> Population:
    """Register `size` source plugins and size/4 function plugins of 4 functions each under `home`."""
    layout = Layout(home)
    layout.create()
    db.initialise(layout.registry_file)
    sources = {f"src{i:05d}": "1.0.0" for i in range(size)}
    function_plugins = max(size // FUNCTIONS_PER_PLUGIN, 1)
    functions: dict[str, str] = {}
    conn = db.connect(layout.registry_file)
    try:
        with db.transaction(conn):
            for name in sources:
                so_name = f"{capitalised(name)}@v1.0.0.so"
                (layout.native_dir("sources") / so_name).write_bytes(b"\0")
                for config in layout.config_dirs("sources"):  # the files recorded below are all there
                    (config / f"{name}.yaml").write_text(SOURCE_YAML)
                registry.save(
                    conn, plugin_type="sources", name=name, version="1.0.0", descriptor=None,
                    request={"name": name, "file": f"file://{layout.uploads}/{name}.zip"}, sha256=None,
                    files=[registry.RecordedFile(f"plugins/sources/{so_name}"),
                           registry.RecordedFile(f"etc/sources/{name}.yaml"),
                           registry.RecordedFile(f"data/sources/{name}.yaml")],
                    functions=[],
                )
            for i in range(function_plugins):
                name = f"fn{i:05d}"
                so_name = f"{capitalised(name)}@v1.0.0.so"
                (layout.native_dir("functions") / so_name).write_bytes(b"\0")
                exported = [f"{name}f{k}" for k in range(FUNCTIONS_PER_PLUGIN)]
                registry.save(
                    conn, plugin_type="functions", name=name, version="1.0.0", descriptor=None,
                    request={"name": name, "file": f"file://{layout.uploads}/{name}.zip", "functions": exported},
                    sha256=None, files=[registry.RecordedFile(f"plugins/functions/{so_name}")], functions=exported,
                )
                functions.update((function, name) for function in exported)
    finally:
        conn.close()
    return Population(home=home, size=size, sources=sources, functions=functions)


def write_source_zip(path: Path, name: str, so_bytes: int, *, chunk: int = 1 << 20) -> Path:
    """Write a native source plugin zip for `name` whose .so is `so_bytes` random bytes (stored, as
    `zip` stores what does not compress), without holding the .so in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo(f"{capitalised(name)}@v1.0.0.so", date_time=(2024, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        info.file_size = so_bytes
        with archive.open(info, "w", force_zip64=so_bytes > (1 << 31)) as member:
            left = so_bytes
            while left:
                step = min(chunk, left)
                member.write(os.urandom(step))
                left -= step
        yaml = zipfile.ZipInfo(f"{name}.yaml", date_time=(2024, 1, 1, 0, 0, 0))
        yaml.external_attr = 0o100644 << 16
        archive.writestr(yaml, SOURCE_YAML)
    return path


# A Python portable plugin whose dependencies are vendored: what issue 21 measured (9,990 small files in 20
# folders). Its script sends eKuiper's handshake itself with pynng (the SDK's part of it: dial the control
# channel, send one message), so the install's handshake check starts it for real.
PORTABLE_SCRIPT = """import sys

import pynng

with pynng.Req0(recv_timeout=600_000) as sock:
    sock.dial("ipc:///tmp/plugin_{name}.ipc", block=True)
    sock.send(b"handshake")
    sock.recv()
"""


def write_many_files_portable_zip(path: Path, name: str, files: int, folders: int = 20, *,
                                  seed: int = 21) -> Path:
    """Write a Python portable plugin zip of `files` members in all: its descriptor, script and sink
    metadata, and the rest as small text modules (256 B to 4 KiB) spread over `folders` vendored folders.

    Deflated, with no folder entries (as `zip -r -D` writes), so 10,000 members stay within the
    service's default maxArchiveEntries.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pick = random.Random(seed)
    descriptor = {"version": "v1.0.0", "language": "python", "executable": f"{name}.py", "sinks": [name]}
    own = {f"{name}.json": json.dumps(descriptor), f"{name}.py": PORTABLE_SCRIPT.format(name=name),
           f"sinks/{name}.json": json.dumps({"about": {"trial": False}})}
    stamp = (2024, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, text in own.items():
            info = zipfile.ZipInfo(member, date_time=stamp)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
        modules = files - len(own)
        for index in range(modules):
            folder = index * folders // modules  # folder by folder, as `zip -r` lists a tree
            info = zipfile.ZipInfo(f"vendor/pkg{folder:02d}/mod{index:05d}.py", date_time=stamp)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            size = pick.randrange(256, 4097)
            # Source-like text: compresses about as well as real Python does.
            words = [f"value_{pick.randrange(10_000)} = {pick.randrange(1 << 30)}\n" for _ in range(size // 24 + 1)]
            archive.writestr(info, "".join(words)[:size])
    return path
