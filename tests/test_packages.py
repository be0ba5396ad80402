"""The package rules, as pure functions over a zip listing."""

from __future__ import annotations

import json

import pytest

from kuiper_plugins.errors import InvalidRequest, PackageInvalid
from kuiper_plugins.install.archive import Entry
from kuiper_plugins.install.packages import Unit, check_name, plan_native, plan_portable


def listing(*names: str, executable: tuple[str, ...] = ()) -> list[Entry]:
    return [
        Entry(name=n.rstrip("/"), is_dir=n.endswith("/"), size=0 if n.endswith("/") else 10,
              executable=n in executable)
        for n in names
    ]


@pytest.mark.parametrize("name", ["random", "Random", "a", "my_plugin-2", "x" * 65, "x" * 250])
def test_name_rule_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a/b", "..", "a.b", "x" * 251, "café", "ｒandom", "a\n", 7, None])
def test_name_rule_refuses(name):
    with pytest.raises(InvalidRequest, match=r"^id (cannot be empty|'(.|\n)*' (contains|is too long))"):
        check_name(name)


def test_native_source_plan():
    plan = plan_native("sources", "random", listing(
        "Random@v1.0.0.so", "random.yaml", "random.json", "install.sh", "dep.zip", "etc/", "etc/a.conf",
    ))
    assert plan.version == "1.0.0"
    assert plan.script == "install.sh"
    assert plan.functions == []
    assert plan.units == [
        Unit("Random@v1.0.0.so", "plugins/sources/Random@v1.0.0.so"),
        Unit("random.yaml", "etc/sources/random.yaml", group="yaml"),
        Unit("random.yaml", "data/sources/random.yaml", group="yaml"),
        Unit("random.json", "etc/sources/random.json"),
        Unit("random.json", "data/sources/random.json"),
        Unit("etc", "etc/sources/random", is_dir=True),
        Unit("etc", "data/sources/random", is_dir=True),
    ]


@pytest.mark.parametrize(
    "so, version",
    [("random.so", ""), ("Random.so", ""), ("random@v2.so", "2"), ("Random@20200331.so", "20200331"),
     ("Random@1.14.0.so", "1.14.0")],
)
def test_binary_names_and_versions(so, version):
    plan = plan_native("sinks", "random", listing(so))
    assert plan.version == version
    assert plan.units == [Unit(so, f"plugins/sinks/{so}")]


def test_name_is_matched_literally_not_as_a_pattern():
    with pytest.raises(PackageInvalid):
        plan_native("sinks", "a-b", listing("aXb.so"))


@pytest.mark.parametrize(
    "names, expected",
    [
        (("random.yaml",), "no random.so or Random.so"),
        (("Random.so",), "needs random.yaml"),
        (("Random.so", "random@v2.so", "random.yaml"), "more than one binary"),
        (("Random@v1..2.so", "random.yaml"), "invalid version"),
        (("Random@.so", "random.yaml"), "invalid version"),
        (("sub/Random.so", "random.yaml"), "no random.so"),
        (("Random.so", "random.yaml", "etc"), "etc must be a folder"),
    ],
)
def test_native_refusals(names, expected):
    with pytest.raises(PackageInvalid, match=expected):
        plan_native("sources", "random", listing(*names))


def test_shell_paras_need_a_script():
    with pytest.raises(PackageInvalid, match=r"have shell parameters : \[a b\] but no install.sh file"):
        plan_native("sinks", "file", listing("file.so"), shell_paras=["a", "b"])
    assert plan_native("sinks", "file", listing("file.so", "install.sh"), shell_paras=["a"]).script == "install.sh"


def test_function_plugin_keeps_its_function_list():
    plan = plan_native("functions", "misc", listing("misc.so"), functions=["f1", "f2"])
    assert plan.functions == ["f1", "f2"]


DESCRIPTOR = {"version": "v1.0.0", "language": "python", "executable": "pysam.py",
              "sources": ["pyjson"], "sinks": ["print"], "functions": ["revert"]}
PORTABLE = ("pysam.json", "pysam.py", "lib/", "lib/util.py", "sources/pyjson.yaml", "sources/pyjson.json",
            "sinks/print.json", "functions/revert.json")


def test_portable_plan():
    plan = plan_portable("pysam", listing(*PORTABLE), json.dumps(DESCRIPTOR).encode())
    assert plan.version == "v1.0.0"
    assert plan.functions == ["revert"]
    assert plan.executable == "pysam.py"
    assert plan.descriptor == {"name": "pysam", **DESCRIPTOR}
    assert list(plan.descriptor) == ["name", "version", "language", "executable", "sources", "sinks", "functions"]
    dests = [u.dest for u in plan.units]
    assert dests == [
        "etc/sources/pyjson.yaml", "data/sources/pyjson.yaml", "etc/sources/pyjson.json",
        "data/sources/pyjson.json", "etc/sinks/print.json", "data/sinks/print.json",
        "etc/functions/revert.json", "data/functions/revert.json", "plugins/portable/pysam",
    ]
    assert plan.units[-1] == Unit("", "plugins/portable/pysam", is_dir=True)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"name": "other"}, "expect name 'pysam' but got 'other'"),
        ({"language": None}, "missing language"),
        ({"executable": None}, "missing executable"),
        ({"sources": [], "sinks": [], "functions": []}, "at lease one source, sink or function"),
        ({"language": "rust"}, "language 'rust' is not supported"),
        ({"executable": "nope.py"}, "missing nope.py"),
        ({"sources": ["pyjson", "other"]}, "missing sources/other.yaml"),
        ({"executable": "../evil"}, "must be a file inside the plugin folder"),
        ({"sources": ["../x"]}, "invalid sources name"),
        ({"functions": "revert"}, "functions must be a list"),
        ({"version": 1}, "version must be a string"),
    ],
)
def test_portable_descriptor_refusals(change, expected):
    descriptor = {k: v for k, v in {**DESCRIPTOR, **change}.items() if v is not None}
    with pytest.raises(PackageInvalid, match=expected):
        plan_portable("pysam", listing(*PORTABLE), json.dumps(descriptor).encode())


def test_portable_without_descriptor():
    with pytest.raises(PackageInvalid, match="missing or invalid json file pysam.json, found 1 files in total"):
        plan_portable("pysam", listing("pysam.py"), None)


def test_portable_files_nested_below_symbol_kinds_are_copied_as_ekuiper_copies_them():
    names = (*PORTABLE, "sources/deep/", "sources/deep/x.yaml")
    plan = plan_portable("pysam", listing(*names), json.dumps(DESCRIPTOR).encode())
    dests = {unit.dest for unit in plan.units}
    assert {"etc/sources/deep/x.yaml", "data/sources/deep/x.yaml"} <= dests
    assert "etc/sources/deep" not in dests  # the folder is made as its file is placed
