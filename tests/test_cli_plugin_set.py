"""`kuiper-plugins export` and `kuiper-plugins apply`: the plugin set from the command line, against the real app
served on a loopback port (test_cli.py's `server`), the CLI run in-process."""

from __future__ import annotations

import json

import requests
import yaml
from test_cli import (
    SO,
    run,
    served_source,
    served_zip,
    server,  # noqa: F401  (the fixture: the real app on a loopback port)
)


def installed(server_url: str) -> dict:
    answer = requests.get(f"{server_url}/config/plugins", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_export_prints_yaml_json_or_ekuipers_format_and_saves_to_a_file(server, file_server, capsys,  # noqa: F811
                                                                        tmp_path):
    random_url = served_source(file_server)
    misc_url = served_zip(file_server, "misc.zip", {"misc.so": SO})
    status, _, err = run(capsys, server.url, "apply", "-f", str(_written(tmp_path / "set.json", {
        "sources": {"random": {"file": random_url}},
        "functions": {"misc": {"file": misc_url, "functions": ["f1", "f2"]}}})))
    assert status == 0, err
    document = installed(server.url)

    status, out, _ = run(capsys, server.url, "export")
    assert status == 0 and yaml.safe_load(out) == document
    assert out.startswith("sources:\n  random:\n")
    for argv in (("export", "--format", "json"), ("--json", "export")):
        status, out, _ = run(capsys, server.url, *argv)
        assert status == 0 and json.loads(out) == document
    status, out, _ = run(capsys, server.url, "export", "--format", "ekuiper")
    assert status == 0
    assert json.loads(out) == {
        "nativePlugins": {"functions_misc": json.dumps({"name": "misc", "file": misc_url}, separators=(",", ":")),
                          "sources_random": json.dumps({"name": "random", "file": random_url},
                                                       separators=(",", ":"))},
        "portablePlugins": {}, "functionLists": {"misc": ["f1", "f2"]}}

    target = tmp_path / "out" / "exported.yaml"
    target.parent.mkdir()
    status, out, _ = run(capsys, server.url, "export", "-o", str(target))
    assert status == 0 and out.strip() == str(target)
    assert yaml.safe_load(target.read_text()) == document
    assert [p.name for p in target.parent.iterdir()] == ["exported.yaml"]  # no .partial left


def test_apply_shows_the_plan_then_the_changes_then_that_nothing_is_left(server, file_server, capsys,  # noqa: F811
                                                                         tmp_path):
    random_url = served_source(file_server)
    echo_url = served_zip(file_server, "echo.zip", {"Echo@v1.0.0.so": SO})
    document = tmp_path / "plugins.yaml"
    document.write_text(f"sources:\n  random:\n    file: {random_url}\nsinks:\n  echo:\n    file: {echo_url}\n")

    status, out, err = run(capsys, server.url, "apply", "-f", str(document), "--dry-run")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ACTION", "TYPE", "NAME", "FROM", "TO", "REASON"]
    assert lines[1].split()[:3] == ["install", "source", "random"]
    assert lines[2].split()[:3] == ["install", "sink", "echo"]
    assert lines[-1] == "dry run: 2 changes planned, nothing was changed"
    assert installed(server.url)["sources"] == {}

    status, out, err = run(capsys, server.url, "apply", "-f", str(document))
    assert status == 0, err
    assert out.splitlines()[1].split()[:5] == ["install", "source", "random", "-", "1.0.0"]
    assert out.splitlines()[-1] == "2 changes made"
    assert set(installed(server.url)["sinks"]) == {"echo"}

    status, out, _ = run(capsys, server.url, "apply", "-f", str(document))
    assert status == 0 and out.strip() == "no change: the plugins are as the document says"
    status, out, _ = run(capsys, server.url, "--json", "apply", "-f", str(document))
    assert status == 0 and json.loads(out) == {"changed": False, "changes": []}


def test_apply_prune_removes_what_the_file_does_not_name(server, file_server, capsys, tmp_path):  # noqa: F811
    random_url = served_source(file_server)
    echo_url = served_zip(file_server, "echo.zip", {"Echo@v1.0.0.so": SO})
    both = _written(tmp_path / "both.json", {"sources": {"random": {"file": random_url}},
                                             "sinks": {"echo": {"file": echo_url}}})
    assert run(capsys, server.url, "apply", "-f", str(both))[0] == 0
    only_echo_json = _written(tmp_path / "echo.json", {"sinks": {"echo": {"file": echo_url}}, "Prune": False})
    only_echo_yaml = tmp_path / "echo.yml"
    only_echo_yaml.write_text(f"sinks:\n  echo:\n    file: {echo_url}\n")

    status, out, _ = run(capsys, server.url, "apply", "-f", str(only_echo_json))
    assert status == 0 and out.startswith("no change")
    status, out, err = run(capsys, server.url, "apply", "-f", str(only_echo_json), "--prune", "--dry-run")
    assert status == 0, err
    assert out.splitlines()[1].split()[:3] == ["remove", "source", "random"]
    status, out, err = run(capsys, server.url, "apply", "-f", str(only_echo_yaml), "--prune")
    assert status == 0, err
    assert out.splitlines()[1].split()[:3] == ["remove", "source", "random"]
    assert installed(server.url)["sources"] == {} and set(installed(server.url)["sinks"]) == {"echo"}


def test_a_refused_apply_exits_1_with_the_servers_message_and_what_was_rolled_back(server, file_server,  # noqa: F811
                                                                                    capsys, tmp_path):
    echo_url = served_zip(file_server, "echo.zip", {"Echo@v1.0.0.so": SO})
    document = _written(tmp_path / "set.json", {"sinks": {"echo": {"file": echo_url},
                                                          "zz": {"file": file_server.url("missing.zip")}}})

    status, out, err = run(capsys, server.url, "apply", "-f", str(document))

    assert status == 1 and out == ""
    assert "error: sinks plugins create command error: fail to download file" in err
    assert "the install of sinks plugin zz failed; 1 earlier change was rolled back" in err
    rolled_back = err.splitlines()
    assert rolled_back[1].split()[:3] == ["install", "sink", "echo"]
    assert "(the changes above were made, then rolled back)" in err
    assert installed(server.url)["sinks"] == {}

    status, out, err = run(capsys, server.url, "--json", "apply", "-f", str(document))
    assert status == 1
    assert json.loads(out)["failed"] == {"type": "sink", "name": "zz", "action": "install"}


def test_apply_of_a_file_that_cannot_be_read_is_a_usage_error(capsys, tmp_path):
    status, _, err = run(capsys, "http://127.0.0.1:9", "apply", "-f", str(tmp_path / "absent.yaml"))
    assert status == 2 and err.startswith(f"error: cannot read {tmp_path / 'absent.yaml'}: No such file")
    listed = tmp_path / "list.yaml"
    listed.write_text("- sources\n")
    status, _, err = run(capsys, "http://127.0.0.1:9", "apply", "-f", str(listed), "--prune")
    assert status == 2 and "does not hold a mapping" in err


def _written(path, document: dict):
    path.write_text(json.dumps(document))
    return path
