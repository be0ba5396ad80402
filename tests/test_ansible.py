"""Real Ansible against three real nodes: contrib/ansible's rollout playbook drives kuiper_plugins_state.

Each node is a real gunicorn (two workers) with its own home and loopback port; the packages come from the
loopback file server, which counts downloads. `ansible-playbook` runs from the venv with `connection: local`
and the venv's Python, in an environment of its own: no user configuration, its temporary folders under the
test's tmp, no retry files, no colour. What is asserted is what an operator checks: the PLAY RECAP, each
node's `GET /config/plugins`, and the files and registry under each home.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests
from conftest import REPO, Gunicorn, disk_state, engine_dump, make_zip, registry_dump, registry_tables
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytestmark = pytest.mark.slow

ANSIBLE_DIR = REPO / "contrib/ansible"
VENV_BIN = Path(sys.executable).parent
NODES = ("node1", "node2", "node3")
RUN_TIMEOUT = 180  # one playbook run over three nodes takes a few seconds; this bounds a hung one

# The document the playbook templates per host; the sink's `file` may be a template too.
DOCUMENT = """\
sources:
  random:
    file: {random_url}
    sha256: {random_sha}
sinks:
  echo:
    file: "{echo_file}"
functions:
  misc:
    file: {misc_url}
    functions: {functions}
"""

RECAP_LINE = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                        r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.MULTILINE)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(file_server, name: str, members: dict) -> tuple[str, str]:
    """Serve a zip of `members` as `name`; its URL and sha256."""
    path = make_zip(file_server.root / name, members)
    return file_server.url(name), sha(path)


@pytest.fixture
def start_node(tmp_path, file_server):
    """Start real services, each with its own home, port and log; at the end, stop them: no log may hold a
    traceback."""
    started: dict[str, Gunicorn] = {}

    def start(name: str, **env: str) -> Gunicorn:
        env.setdefault("KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST", f"127.0.0.1:{file_server.port}")
        env.setdefault("KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL", "false")  # stub portable packages
        started[name] = Gunicorn(tmp_path / name, tmp_path / f"{name}.log", workers=2, env=env)
        return started[name].start()

    try:
        yield start
    finally:
        for server in started.values():
            server.stop()
    for name in started:
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in log, f"{name}: {log[-4000:]}"


@pytest.fixture
def nodes(start_node) -> dict[str, Gunicorn]:
    """Three real services with two workers each."""
    return {name: start_node(name) for name in NODES}


class Ansible:
    """`ansible-playbook` and `ansible` from the venv, hermetic, with an inventory of the three nodes."""

    def __init__(self, tmp_path: Path, nodes: dict[str, Gunicorn], host_vars: dict[str, dict]):
        self.work = tmp_path / "ansible"
        for folder in ("home", "local-tmp", "remote-tmp", "collections"):
            (self.work / folder).mkdir(parents=True, exist_ok=True)
        config = self.work / "ansible.cfg"
        config.write_text("[defaults]\n")  # ours and empty: nothing from /etc/ansible or ~/.ansible.cfg
        self.inventory = self.work / "inventory.json"
        self.inventory.write_text(json.dumps({"kuiper": {
            "hosts": {name: {"kuiper_plugins_url": node.url, **host_vars.get(name, {})}
                      for name, node in nodes.items()},
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        }}))
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.work / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_HOME": str(self.work / "home"),
            "ANSIBLE_LOCAL_TEMP": str(self.work / "local-tmp"),
            "ANSIBLE_REMOTE_TEMP": str(self.work / "remote-tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(self.work / "collections"),
            "ANSIBLE_LIBRARY": str(ANSIBLE_DIR / "library"),
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_HOST_KEY_CHECKING": "false",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_STDOUT_CALLBACK": "default",
        }

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / program), "-i", str(self.inventory), *args], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    def rollout(self, document: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
        """Run the real contrib/ansible/rollout.yml on `document`; the run and its recap, by host."""
        done = self.run("ansible-playbook", str(ANSIBLE_DIR / "rollout.yml"),
                        "-e", f"kuiper_plugins_document={document}", *args)
        return done, recap(done.stdout)


def recap(stdout: str) -> dict[str, dict]:
    """The PLAY RECAP's counts by host (printed, so a run of this test shows them)."""
    tail = stdout[stdout.rindex("PLAY RECAP"):] if "PLAY RECAP" in stdout else ""
    print(tail)
    return {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP_LINE.finditer(tail)}


def plugin_set(node: Gunicorn) -> dict:
    answer = requests.get(f"{node.url}/config/plugins", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def snapshot(node: Gunicorn) -> tuple[dict, list[str], list[str], dict]:
    """Everything a run could write on a node: files, registry, eKuiper's store, and the plugin set it answers."""
    return disk_state(node.home), registry_dump(node.home), engine_dump(node.home), plugin_set(node)


def installed_state(node: Gunicorn) -> tuple:
    """What an undone apply must give back: files, eKuiper's store, the plugin set, and the registry's plugins,
    files, functions and kept versions. The history keeps the update and its rollback, as the audit trail
    keeps every request: they record what happened (docs/plugin-set.md)."""
    return disk_state(node.home), sorted(engine_dump(node.home)), plugin_set(node), registry_tables(node.home)


def test_rollout_converges_is_idempotent_checks_without_writing_and_stops_at_a_failing_node(
        tmp_path, file_server, nodes):
    random1, random1_sha = served(file_server, "random1.zip", {"Random@v1.0.0.so": b"\x7fELF random 1",
                                                               "random.yaml": "default: {}\n"})
    random2, random2_sha = served(file_server, "random2.zip", {"Random@v2.0.0.so": b"\x7fELF random 2",
                                                               "random.yaml": "default: {}\n"})
    echo1, _ = served(file_server, "echo1.zip", {"Echo@v1.0.0.so": b"\x7fELF echo 1"})
    echo2, _ = served(file_server, "echo2.zip", {"Echo@v2.0.0.so": b"\x7fELF echo 2"})
    misc, _ = served(file_server, "misc.zip", {"Misc@v1.0.0.so": b"\x7fELF misc"})
    (file_server.root / "broken.zip").write_bytes(b"this is not a zip archive")

    first = tmp_path / "first.yml"
    first.write_text(DOCUMENT.format(random_url=random1, random_sha=random1_sha, echo_file=echo1, misc_url=misc,
                                     functions='["f1", "f2"]'))
    # In the next set, a host variable may give a node its own sink package: node 2 gets a broken one, in a
    # document that also re-registers the functions and updates the source, which the service applies
    # before the sinks' updates (docs/plugin-set.md: re-registers, then updates, by type), so node 2 has
    # changes to roll back when its sink fails.
    second = tmp_path / "second.yml"
    second.write_text(DOCUMENT.format(random_url=random2, random_sha=random2_sha, misc_url=misc,
                                      echo_file=f"{{{{ echo_url | default('{echo2}') }}}}",
                                      functions='["f1", "f2", "f3"]'))
    ansible = Ansible(tmp_path, nodes, {"node2": {"echo_url": file_server.url("broken.zip")}})

    # 1. The first run installs the set everywhere.
    done, counts = ansible.rollout(first)
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts == {name: {"ok": 1, "changed": 1, "unreachable": 0, "failed": 0} for name in NODES}
    for name, node in nodes.items():
        answer = plugin_set(node)
        assert answer["sources"]["random"]["file"] == random1
        assert answer["sources"]["random"]["sha256"] == random1_sha
        assert answer["sinks"]["echo"]["file"] == echo1
        assert answer["functions"]["misc"]["functions"] == ["f1", "f2"]
        assert answer["portables"] == {}
        assert (node.home / "plugins/sources/Random@v1.0.0.so").read_bytes() == b"\x7fELF random 1", name
        assert (node.home / "plugins/sinks/Echo@v1.0.0.so").read_bytes() == b"\x7fELF echo 1", name
    downloads = list(file_server.requests)
    assert sorted(downloads) == sorted(["/random1.zip", "/echo1.zip", "/misc.zip"] * 3)

    # 2. The same document again: nothing changes anywhere and nothing is downloaded.
    before = {name: snapshot(node) for name, node in nodes.items()}
    done, counts = ansible.rollout(first)
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts == {name: {"ok": 1, "changed": 0, "unreachable": 0, "failed": 0} for name in NODES}
    assert file_server.requests == downloads
    assert {name: snapshot(node) for name, node in nodes.items()} == before

    # 3. --check --diff on the next set: every node would change, the diff shows the plan, nothing is written.
    # Node 2's broken package is not fetched by a plan that compares URLs, so it too plans a change.
    done, counts = ansible.rollout(second, "--check", "--diff")
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts == {name: {"ok": 1, "changed": 1, "unreachable": 0, "failed": 0} for name in NODES}
    assert f'+file: "{random2}"' in done.stdout
    assert f'-file: "{random1}"' in done.stdout
    assert "+sha256: unknown" in done.stdout  # the sink's set gives no digest, and a plan downloads nothing
    assert file_server.requests == downloads  # a plan reads the registry only
    assert {name: snapshot(node) for name, node in nodes.items()} == before

    # 4. The rollout of that set: node 1 converges, node 2 fails and is rolled back, node 3 is not touched.
    # The nodes are asked one after the other, in the inventory's order: `serial: 1` in rollout.yml.
    fetched_before = len(file_server.requests)
    node2_before = installed_state(nodes["node2"])
    done, counts = ansible.rollout(second)
    assert done.returncode != 0, done.stdout + done.stderr
    assert counts["node1"] == {"ok": 1, "changed": 1, "unreachable": 0, "failed": 0}
    assert counts["node2"] == {"ok": 0, "changed": 0, "unreachable": 0, "failed": 1}
    assert "node3" not in counts  # the recap lists only the hosts the play reached: serial stopped before it
    # The task's result, as the default callback prints it: the service's message, the failed step, the undo.
    assert "fatal: [node2]: FAILED! => {" in done.stdout, done.stdout
    failure, _ = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("fatal: [node2]: FAILED! => ") + 27)
    assert failure["msg"].startswith("sinks plugins update command error: "), failure
    assert "sinks plugin echo failed" in failure["msg"], failure
    assert failure["failed_plugin"] == {"type": "sink", "name": "echo", "action": "update"}
    assert [(c["action"], c["type"], c["name"]) for c in failure["rolled_back"]] == [
        ("update", "source", "random"), ("register", "function", "misc")]
    assert failure["changed"] is False and failure["status"] == 400
    converged = plugin_set(nodes["node1"])
    assert converged["sources"]["random"]["file"] == random2
    assert converged["sinks"]["echo"]["file"] == echo2
    assert converged["functions"]["misc"]["functions"] == ["f1", "f2", "f3"]
    # Node 2 is back exactly where it was; its history tells the update and its rollback, newest first.
    assert installed_state(nodes["node2"]) == node2_before
    history = requests.get(f"{nodes['node2'].url}/plugins/sources/random/history", timeout=30).json()
    assert [(h["operation"], h["version"]) for h in history[:3]] == [
        ("rollback", "1.0.0"), ("update", "2.0.0"), ("install", "1.0.0")]
    # Node 3 was never asked: not a row, not a file written.
    assert snapshot(nodes["node3"]) == before["node3"]
    # Nodes 1 and 2 fetched the new source, node 1 the new sink and node 2 its broken one; node 3 nothing.
    # Node 2's rollback fetched nothing either: it swapped back the version its update kept.
    fetched = file_server.requests[fetched_before:]
    assert sorted(fetched) == ["/broken.zip", "/echo2.zip", "/random2.zip", "/random2.zip"]

    # 5. The module alone, ad hoc, in check mode, with the set as a YAML file on the node and prune on:
    # node 1 would remove only the function plugin that file leaves out.
    only_two = tmp_path / "only-two.yml"
    only_two.write_text(f"sources:\n  random:\n    file: {random2}\n    sha256: {random2_sha}\n"
                        f"sinks:\n  echo:\n    file: {echo2}\n")
    node1 = snapshot(nodes["node1"])
    args = json.dumps({"url": nodes["node1"].url, "state": str(only_two), "prune": True})
    done = ansible.run("ansible", "node1", "-m", "kuiper_plugins_state", "-a", args, "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert done.stdout.startswith("node1 | CHANGED"), done.stdout
    assert [(c["action"], c["type"], c["name"]) for c in result["changes"]] == [("remove", "function", "misc")]
    assert result["dry_run"] is True
    assert snapshot(nodes["node1"]) == node1


def test_the_module_sends_its_token_and_never_shows_it(tmp_path, file_server, start_node):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mgmt = tmp_path / "node1/etc/mgmt"
    mgmt.mkdir(parents=True)
    (mgmt / "fleet.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    node = start_node("node1", KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    now = int(time.time())
    token = jwt.encode({"iss": "fleet.pub", "aud": "eKuiper", "iat": now - 10, "exp": now + 600}, key,
                       algorithm="RS256")
    echo1, _ = served(file_server, "echo1.zip", {"Echo@v1.0.0.so": b"\x7fELF echo 1"})
    document = tmp_path / "plugins.yml"
    document.write_text(f"sinks:\n  echo:\n    file: {echo1}\n")
    ansible = Ansible(tmp_path, {"node1": node}, {})

    # Without a token the service refuses in eKuiper's words, and the task fails with them.
    done, counts = ansible.rollout(document)
    assert counts == {"node1": {"ok": 0, "changed": 0, "unreachable": 0, "failed": 1}}, done.stdout
    assert '"msg": "missing_token"' in done.stdout and '"status": 401' in done.stdout, done.stdout
    assert not (node.home / "plugins/sinks/Echo@v1.0.0.so").exists()

    # With it (as a vault would pass it), the set is applied; even at -vvv the token is not printed.
    done, counts = ansible.rollout(document, "-vvv", "-e", f"kuiper_plugins_token={token}")
    assert counts == {"node1": {"ok": 1, "changed": 1, "unreachable": 0, "failed": 0}}, done.stdout
    assert (node.home / "plugins/sinks/Echo@v1.0.0.so").read_bytes() == b"\x7fELF echo 1"
    assert '"token": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"' in done.stdout  # the module's arguments, censored
    assert token not in done.stdout + done.stderr


def test_ansible_doc_reads_the_module_documentation(tmp_path):
    ansible = Ansible(tmp_path, {}, {})
    done = subprocess.run([str(VENV_BIN / "ansible-doc"), "--json", "-t", "module", "kuiper_plugins_state"],
                          cwd=ansible.work, env=ansible.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["kuiper_plugins_state"]
    assert sorted(doc["doc"]["options"]) == ["prune", "state", "timeout", "token", "url", "use_proxy",
                                             "validate_certs"]
    assert doc["doc"]["options"]["url"]["required"] is True
    assert sorted(doc["return"]) == ["changes", "dry_run", "failed_plugin", "rolled_back", "status"]
