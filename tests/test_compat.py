"""engine/compat's verdict, proved against Go itself: real plugins, a real host calling plugin.Open.

The Go sources are in tests/go/compat: a host standing in for the engine (it links the local module
example.com/dep and prints plugin.Open's answer the way eKuiper's native manager wraps it), a plugin,
and example.com/dep in three directories wired with ``replace``. Everything is built once and kept in
the pytest cache under a key of the sources, ``go version`` and the C cross compiler, so a warm run
builds nothing. No network: GOPROXY=off, GOTOOLCHAIN=local, local modules only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import find_go, make_zip
from elftools.elf.elffile import ELFFile

from kuiper_plugins.engine import compat

SOURCE = Path(__file__).resolve().parent / "go" / "compat"
ARM64_CC = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu, installed by make system-deps
MUSL_CC = "musl-gcc"  # Debian's musl-tools, installed by make system-deps


@dataclass(frozen=True)
class Build:
    """One artefact: its file name, the folder it is built in, the go build flags, extra environment."""

    name: str
    folder: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


BUILDS = (
    Build("host", "host", ()),
    # eKuiper's release kuiperd: -trimpath -ldflags "-s -w", so no .symtab
    Build("host-release", "host", ("-trimpath", "-ldflags=-s -w")),
    # without cgo Go's plugin package is a stub: a static binary, no .dynsym, every Open refused
    Build("host-nocgo", "host", (), (("CGO_ENABLED", "0"),)),
    Build("same.so", "plugin", ("-buildmode=plugin",)),
    Build("dep-edited.so", "plugin", ("-buildmode=plugin", "-modfile=go.edited.mod")),
    Build("dep-v1.1.0.so", "plugin", ("-buildmode=plugin", "-modfile=go.v1.1.0.mod")),
    Build("trimpath.so", "plugin", ("-buildmode=plugin", "-trimpath")),
    Build("arm64.so", "plugin", ("-buildmode=plugin",), (("GOARCH", "arm64"), ("CC", ARM64_CC))),
    Build("musl.so", "plugin", ("-buildmode=plugin",), (("CC", MUSL_CC),)),
)


@dataclass(frozen=True)
class Case:
    """A plugin against an engine, and what plugin.Open is expected to say (the test asks it)."""

    name: str
    engine: str
    plugin: str
    opens: bool
    # False where the dynamic linker's own words depend on the machine's files, not on the plugin
    same_words: bool = True


CASES = (
    Case("same build", "host", "same.so", True),
    Case("example.com/dep: same version, other content", "host", "dep-edited.so", False),
    Case("example.com/dep: v1.1.0 instead of v1.0.0", "host", "dep-v1.1.0.so", False),
    Case("-trimpath on the plugin only", "host", "trimpath.so", False),
    Case("release engine (-trimpath -s -w), plugin -trimpath", "host-release", "trimpath.so", True),
    Case("release engine (-trimpath -s -w), plugin without", "host-release", "same.so", False),
    Case("GOARCH=arm64 plugin", "host", "arm64.so", False),
    Case("plugin linked against musl (musl-gcc)", "host", "musl.so", False, same_words=False),
    Case("C shared object, not a Go plugin", "host", "clib.so", False),
    Case("not ELF (a text file named .so)", "host", "not-elf.so", False),
    Case("engine built with CGO_ENABLED=0", "host-nocgo", "same.so", False),
)


class GoCompat:
    """The built artefacts and the go command that built them."""

    def __init__(self, go: str, env: dict[str, str], out: Path, built_in: float | None):
        self.go = go
        self.env = env
        self.out = out
        self.built_in = built_in

    def path(self, name: str) -> Path:
        return self.out / name

    def plugin_open(self, engine: str, plugin: str) -> tuple[bool, str]:
        """Run the host on one plugin in a fresh process; return (opened, its line or its crash)."""
        done = subprocess.run(
            [str(self.path(engine)), str(self.path(plugin))], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            # the Go runtime throws (the whole engine stops) on a shared object without Go module data
            fatal = [line for line in done.stderr.splitlines() if line.startswith("fatal error")]
            return False, f"crashed: {fatal[0] if fatal else done.stderr.strip()[:200]}"
        line = done.stdout.strip()
        return line == "ok", line

    def version_m(self, name: str) -> str:
        done = subprocess.run(
            [self.go, "version", "-m", str(self.path(name))], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


def _source_key(go: str, env: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(SOURCE)).encode() + b"\0" + path.read_bytes() + b"\0")
    for command in ([go, "version"], [ARM64_CC, "--version"], ["cc", "--version"], [MUSL_CC, "--version"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        digest.update(done.stdout.encode())
    digest.update(repr(BUILDS).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def go_compat(request, tmp_path_factory) -> GoCompat:
    """Build host, plugins, a C shared object and a stub once, cached across sessions by source key."""
    go = find_go()
    assert shutil.which(ARM64_CC), f"{ARM64_CC} is needed for the arm64 plugin (make system-deps installs it)"
    assert shutil.which(MUSL_CC), f"{MUSL_CC} is needed for the musl plugin (make system-deps installs it)"
    assert shutil.which("cc"), "a C compiler is needed for cgo (Debian's gcc)"
    pytest_cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache = Path(pytest_cache.mkdir("go-compat")) if pytest_cache else tmp_path_factory.mktemp("gc")
    go_cache = Path(pytest_cache.mkdir("go-build")) if pytest_cache else cache / "go-build"
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "-mod=mod",
        "GOWORK": "off",
        "GO111MODULE": "on",
        "GOSUMDB": "off",
        "CGO_ENABLED": "1",
        "GOCACHE": str(go_cache),
        "GOPATH": str(cache / "gopath"),
    }
    for key in ("GOOS", "GOARCH", "CC", "GOAMD64", "GOEXPERIMENT"):
        env.pop(key, None)
    key = _source_key(go, env)
    work = cache / key
    out = work / "out"
    if (work / "done").exists():
        return GoCompat(go, env, out, None)

    started = time.monotonic()
    for stale in cache.iterdir():
        if stale.is_dir() and stale.name != "gopath":
            shutil.rmtree(stale, ignore_errors=True)  # other sources' builds, and a half-done one of these
    src = work / "src"
    # build from a copy: paths are part of a non-trimpath build, so host and plugins share this one
    shutil.copytree(SOURCE, src)
    out.mkdir(parents=True)
    for build in BUILDS:
        command = [go, "build", *build.args, "-o", str(out / build.name), "."]
        done = subprocess.run(
            command, cwd=src / build.folder, env={**env, **dict(build.env)}, capture_output=True, timeout=600
        )
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr.decode(errors='replace')}"
    done = subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(out / "clib.so"), str(src / "clib" / "clib.c")],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (out / "not-elf.so").write_text(
        "#!/bin/sh\n# a shell script named like a plugin, longer than an ELF header\nexit 0\n"
    )
    (work / "done").write_text("")
    return GoCompat(go, env, out, time.monotonic() - started)


@pytest.fixture(scope="session")
def answers(go_compat) -> dict[str, tuple[bool, str, compat.Verdict]]:
    """Ask plugin.Open and engine/compat about every case: {case: (opened, Go's line, our verdict)}."""
    found = {}
    for case in CASES:
        opened, line = go_compat.plugin_open(case.engine, case.plugin)
        verdict = compat.check(go_compat.path(case.plugin), go_compat.path(case.engine))
        found[case.name] = (opened, line, verdict)
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_our_verdict_equals_plugin_open(answers, go_compat, case):
    opened, line, verdict = answers[case.name]
    assert opened is case.opens, line
    assert verdict.ok is opened, (line, verdict.message)
    if opened:
        assert verdict.message == ""
    elif line.startswith("crashed"):
        # no error to repeat: the Go runtime stopped the whole process
        assert verdict.message.startswith(f"fail to install plugin: cannot open {go_compat.path(case.plugin)}: ")
    elif case.same_words:
        # eKuiper logs "fail to install plugin: " + the native manager's "cannot open <path>: <plugin.Open's error>"
        assert verdict.message.startswith(f"fail to install plugin: {line}"), (line, verdict.message)
    else:
        opening = line[: line.index("): ") + 3]
        assert verdict.message.startswith(f"fail to install plugin: {opening}"), (line, verdict.message)


def test_verdict_table(answers, go_compat, capsys):
    rows = [("case", "plugin.Open", "ours")]
    for case in CASES:
        opened, line, verdict = answers[case.name]
        said = line.split("): ", 1)[-1].replace(f"{go_compat.out}/", "")
        rows.append((case.name, "opens" if opened else f"refuses: {said}", "compatible" if verdict.ok else "refused"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    text = "\n".join(" | ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows)
    built = "warm cache, nothing built" if go_compat.built_in is None else f"built in {go_compat.built_in:.1f} s"
    with capsys.disabled():
        print(f"\n\nnative compatibility, engine/compat against Go's plugin.Open ({built}):\n{text}\n")
    assert all((answers[c.name][0] is answers[c.name][2].ok) for c in CASES)


# ---------------------------------------------------------------------------- the messages


def test_a_differing_module_is_named_with_both_versions(answers, go_compat):
    _, _, edited = answers["example.com/dep: same version, other content"]
    assert edited.differing_packages == ("example.com/dep",)
    version = edited.engine_go_version
    assert version and version == edited.plugin_go_version
    assert edited.message.endswith(
        f"(plugin built with {version}, engine with {version}; "
        "example.com/dep v1.0.0 => ../dep-edited in the plugin, v1.0.0 => ../dep in the engine)"
    )
    _, _, newer = answers["example.com/dep: v1.1.0 instead of v1.0.0"]
    assert "example.com/dep v1.1.0 => ../dep-v1.1.0 in the plugin, v1.0.0 => ../dep in the engine" in newer.message


def test_trimpath_lists_every_differing_package_and_the_setting(answers, go_compat):
    _, line, verdict = answers["-trimpath on the plugin only"]
    assert line.endswith(f"plugin was built with a different version of package {verdict.differing_packages[0]}")
    assert len(verdict.differing_packages) > 10
    assert "runtime" in verdict.differing_packages
    also = "(also " + ", ".join(verdict.differing_packages[1:]) + ";"
    assert also in verdict.message
    assert "build settings differ: -trimpath=true in the plugin, false in the engine)" in verdict.message
    assert verdict.reasons[-1] == "build settings differ: -trimpath=true in the plugin, false in the engine"
    assert verdict.message.endswith(f"({'; '.join(verdict.reasons)})")


def test_another_machine_is_named(answers, go_compat):
    _, _, verdict = answers["GOARCH=arm64 plugin"]
    engine = compat.read_binary(go_compat.path("host"))
    assert f"(the plugin is built for arm64, the engine for {engine.arch};" in verdict.message


def test_another_libc_is_named(answers, go_compat):
    opened, line, verdict = answers["plugin linked against musl (musl-gcc)"]
    plugin, engine = compat.read_binary(go_compat.path("musl.so")), compat.read_binary(go_compat.path("host"))
    assert (plugin.libc, plugin.libc_name, engine.libc) == ("musl", "libc.so", "glibc")
    assert "libc.so" in line  # glibc looked for musl's libc.so and found its own linker script or nothing
    assert "(the plugin is linked against musl (libc.so), the engine against glibc;" in verdict.message


def test_a_c_library_is_not_a_go_plugin(answers, go_compat):
    opened, line, verdict = answers["C shared object, not a Go plugin"]
    assert line == "crashed: fatal error: runtime: no plugin module data"
    assert verdict.message.startswith(
        f"fail to install plugin: cannot open {go_compat.path('clib.so')}: not a Go plugin (no go:link.pkghash symbols"
    )


def test_a_go_program_is_not_a_go_plugin(go_compat):
    verdict = compat.check(go_compat.path("host-release"), go_compat.path("host"))
    assert not verdict.ok
    assert "not a Go plugin (it was built with -buildmode=exe" in verdict.message


def test_describe_object(answers):
    _, _, same = answers["same build"]
    assert same.as_description() == {
        "verdict": "compatible",
        "goVersion": same.plugin_go_version,
        "engineGoVersion": same.engine_go_version,
        "engineVersion": None,
    }
    _, _, stub = answers["not ELF (a text file named .so)"]
    assert stub.as_description()["verdict"] == "incompatible"
    assert stub.as_description()["goVersion"] is None


def test_the_engine_version_given_is_kept(go_compat):
    verdict = compat.check(go_compat.path("same.so"), go_compat.path("host"), engine_version="2.1.0")
    assert verdict.ok and verdict.as_description()["engineVersion"] == "2.1.0"


# ---------------------------------------------------------------------------- what is read from the files


def _go_version_m(text: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """Parse ``go version -m``: (go version, {dep: version [=> replacement]}, build settings)."""
    lines = text.splitlines()
    version = lines[0].split(": ", 1)[1].strip()
    deps: dict[str, str] = {}
    settings: dict[str, str] = {}
    last = None
    for line in lines[1:]:
        fields = line.strip("\t").split("\t")
        if fields[0] == "dep":
            last = fields[1]
            deps[last] = fields[2]
        elif fields[0] == "=>" and last:
            deps[last] += " => " + (fields[1] if fields[2] == "(devel)" else f"{fields[1]} {fields[2]}")
        elif fields[0] == "build":
            key, _, value = fields[1].partition("=")
            settings[key] = value
    return version, deps, settings


@pytest.mark.parametrize("name", [build.name for build in BUILDS])
def test_build_info_equals_go_version_m(go_compat, name):
    version, deps, settings = _go_version_m(go_compat.version_m(name))
    binary = compat.read_binary(go_compat.path(name))
    info = binary.build_info
    assert info is not None
    assert info.go_version == version
    assert {path: module.describe() for path, module in info.deps.items()} == deps
    assert info.settings == settings


def test_the_release_engine_has_no_symtab_and_its_hashes_come_from_dynsym(go_compat):
    release, plain = go_compat.path("host-release"), go_compat.path("host")
    with open(release, "rb") as stream:
        assert ELFFile(stream).get_section_by_name(".symtab") is None
    with open(plain, "rb") as stream:
        assert ELFFile(stream).get_section_by_name(".symtab") is not None
    stripped, unstripped = compat.read_binary(release), compat.read_binary(plain)
    assert set(stripped.package_hashes) == set(unstripped.package_hashes)
    assert "example.com/dep" in stripped.package_hashes
    assert all(len(digest) == 8 for digest in stripped.package_hashes.values())
    assert stripped.libc == "glibc" and stripped.elf_type == "ET_EXEC"


def test_a_plugins_packages_come_in_its_link_order(go_compat):
    # the runtime names the first package of the plugin's own table that differs; the table starts with
    # the packages the plugin's main package imports, before the standard library's
    plugin = compat.read_binary(go_compat.path("same.so"))
    packages = list(plugin.package_hashes)
    assert packages.index("example.com/dep") < packages.index("runtime")
    assert "example.com/plugin" in packages
    # arm64's relocations (R_AARCH64_ABS64) give the same order as amd64's (R_X86_64_64)
    assert list(compat.read_binary(go_compat.path("arm64.so")).package_hashes)[:3] == packages[:3]


@pytest.mark.parametrize("engine", ["missing", "not-elf.so", "clib.so"])
def test_an_engine_that_cannot_load_plugins_is_a_settings_error(go_compat, tmp_path, engine):
    path = tmp_path / "kuiperd" if engine == "missing" else go_compat.path(engine)
    with pytest.raises(compat.UnusableEngine, match=r"^engine\.binary "):
        compat.check(go_compat.path("same.so"), path)


def test_the_path_shown_is_the_one_the_engine_would_open(go_compat):
    final = Path("/var/lib/kuiper/plugins/sinks/Edited.so")
    verdict = compat.check(go_compat.path("dep-edited.so"), go_compat.path("host"), shown_as=final)
    assert verdict.message.startswith(
        f'fail to install plugin: cannot open {final}: plugin.Open("/var/lib/kuiper/plugins/sinks/Edited"): '
        "plugin was built with a different version of package example.com/dep ("
    )
    assert str(go_compat.out) not in verdict.message


def test_a_missing_plugin_is_refused_as_dlopen_would(go_compat, tmp_path):
    missing = tmp_path / "Missing.so"
    verdict = compat.check(missing, go_compat.path("host"))
    assert not verdict.ok
    assert verdict.message.startswith(f'fail to install plugin: cannot open {missing}: plugin.Open("{missing}"): ')
    opened, line = go_compat.plugin_open("host", str(missing))
    assert not opened
    assert verdict.message.startswith(f"fail to install plugin: {line}")


# ---------------------------------------------------------------------------- through the API (engine.binary)


def test_an_install_checked_against_the_engine_is_described_with_its_verdict(make_service, file_server, go_compat):
    service = make_service(engine_binary=go_compat.path("host"))
    make_zip(file_server.root / "echo.zip", {"Echo@v1.0.0.so": go_compat.path("same.so").read_bytes()})
    response = service.post("functions", {"name": "echo", "file": file_server.url("echo.zip")})
    assert response.status_code == 201, response.data
    described = service.client.get("/plugins/functions/echo").get_json()
    assert described["name"] == "echo" and described["version"] == "1.0.0"
    assert described["compatibility"]["verdict"] == "compatible"
    assert described["compatibility"]["goVersion"].startswith("go1.")
    assert described["compatibility"]["engineGoVersion"] == described["compatibility"]["goVersion"]
    assert described["compatibility"]["engineVersion"] == "2.4.0"  # basic.kuiperVersion: no engine.url here


@pytest.mark.parametrize("plugin", ["dep-edited.so", "dep-v1.1.0.so", "trimpath.so", "arm64.so", "not-elf.so"])
def test_an_install_the_engine_would_not_load_is_refused_and_writes_nothing(make_service, file_server, go_compat,
                                                                          plugin):
    service = make_service(engine_binary=go_compat.path("host"))
    make_zip(file_server.root / "echo.zip", {"Echo@v1.0.0.so": go_compat.path(plugin).read_bytes()})
    before = service.snapshot()
    response = service.post("functions", {"name": "echo", "file": file_server.url("echo.zip")})
    assert response.status_code == 400
    message = response.get_json()["message"]
    final = service.home.resolve() / "plugins/functions/Echo@v1.0.0.so"
    assert message.startswith(f"functions plugins create command error: fail to install plugin: cannot open {final}")
    if plugin.startswith(("dep", "trimpath")):
        assert "plugin was built with a different version of package example.com/dep" in message
    service.assert_unchanged(before)


def test_an_update_the_engine_would_not_load_keeps_the_old_plugin(make_service, file_server, go_compat):
    service = make_service(engine_binary=go_compat.path("host"))
    make_zip(file_server.root / "v1.zip", {"Echo@v1.0.0.so": go_compat.path("same.so").read_bytes()})
    make_zip(file_server.root / "v2.zip", {"Echo@v2.0.0.so": go_compat.path("dep-v1.1.0.so").read_bytes()})
    assert service.post("functions", {"name": "echo", "file": file_server.url("v1.zip")}).status_code == 201
    before = service.snapshot()
    response = service.client.put("/plugins/functions/echo", json={"file": file_server.url("v2.zip")})
    assert response.status_code == 400
    message = response.get_json()["message"]
    assert "example.com/dep v1.1.0 => ../dep-v1.1.0 in the plugin, v1.0.0 => ../dep in the engine" in message
    service.assert_unchanged(before)
