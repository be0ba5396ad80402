"""Shell completion: `kuiper-plugins completion bash|zsh`, loaded into a real bash and a real zsh on a terminal.

Each shell runs interactively on a pseudo-terminal, as a person's would; the test types a line with a TAB in
it and presses Enter. A completed line runs, so what it prints shows what the TAB made of it: `li<TAB>
sources` lists the sources only once `li` has become `list`, and `describe source ra<TAB>` describes plugin
`random` only once its name came from the live service (test_cli.py's `server`, the real app on a loopback
port). Every wait is for a marker the shell prints after the line, bounded in time.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

from test_cli import (
    CLI,
    cli_env,
    run,
    served_source,
    server,  # noqa: F401  (the fixture: the real app on a loopback port)
)

WAIT = 30  # seconds a typed line may take: a TAB that asks the service runs the CLI once more


class Shell:
    """An interactive shell on a pseudo-terminal, fed lines, read up to a marker each line echoes."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.controller, terminal = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env,
                                        start_new_session=True)
        os.close(terminal)
        self.shown = b""
        self.lines = 0
        self.done_at = 0  # where what the last line showed ends (the next prompt is the next line's)

    def type(self, line: str) -> str:
        """Type `line` (a "\\t" in it is a TAB) and Enter; return what the shell showed until it was done."""
        self.lines += 1
        # The whole line is written at once: the shell's line editor reads it in order, so a TAB's completion
        # (which may run the CLI against the service) is done before the rest of the line is read, and Enter
        # comes last. The marker is computed by the shell, so the echoed line itself does not hold it.
        marker = f"DONE-{self.lines}"
        os.write(self.controller, f"{line}; echo DONE-$((0+{self.lines}))\n".encode())
        start, wanted = self.done_at, f"\n{marker}\r\n".encode()
        deadline = time.monotonic() + WAIT
        while wanted not in self.shown[start:]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, self.shown[start:].decode(errors="replace")
            ready, _, _ = select.select([self.controller], [], [], remaining)
            if ready:
                chunk = os.read(self.controller, 4096)
                assert chunk, self.shown[start:].decode(errors="replace")
                self.shown += chunk
        self.done_at = self.shown.index(wanted, start) + len(wanted)
        return self.shown[start:self.done_at].decode(errors="replace")

    def close(self) -> None:
        try:
            os.write(self.controller, b"exit\n")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self.controller)


def shell_env(url: str, home: Path) -> dict[str, str]:
    env = cli_env(url)
    env.update(PATH=f"{CLI.parent}{os.pathsep}{env['PATH']}", HOME=str(home), TERM="dumb", PS1="$ ",
               INPUTRC="/dev/null")
    return env


def printed(shown: str) -> list[str]:
    """The lines a command printed: those after the line as the shell last drew it, less the marker."""
    lines = shown.replace("\r", "").split("\n")
    drawn = max(index for index, line in enumerate(lines) if "echo DONE-$((" in line)
    return [line for line in lines[drawn + 1:] if line and not line.startswith("DONE-")]


def test_bash_completes_a_command_and_a_plugin_name_from_the_live_service(server, file_server, capsys,  # noqa: F811
                                                                           tmp_path):
    assert run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))[0] == 0
    script = subprocess.run([str(CLI), "completion", "bash"], capture_output=True, text=True, timeout=60)
    assert (script.returncode, script.stderr) == (0, "")
    (tmp_path / "kuiper-plugins.bash").write_text(script.stdout)

    bash = Shell(["bash", "--norc", "--noprofile", "-i"], shell_env(server.url, tmp_path))
    try:
        bash.type(f"source {tmp_path / 'kuiper-plugins.bash'}")
        # `li` becomes `list`, so the line lists the sources.
        assert printed(bash.type("kuiper-plugins li\t sources")) == ["random"]
        # The type is completed from the parser, the name from the service.
        shown = bash.type("kuiper-plugins describe sou\tra\t")
        assert "kuiper-plugins describe source random" in shown
        assert printed(shown) == ["name     random", "version  1.0.0"]
        # The name comes from the service the line names with --url, not from $KUIPER_PLUGINS_URL.
        bash.type("export KUIPER_PLUGINS_URL=http://127.0.0.1:9")
        shown = bash.type(f"kuiper-plugins --url {server.url} drop source ra\t --dry-run")
        assert any(line.startswith("plan            delete sources plugin random") for line in printed(shown)), shown
    finally:
        bash.close()


def test_zsh_completes_a_command_and_a_plugin_name_from_the_live_service(server, file_server, capsys,  # noqa: F811
                                                                          tmp_path):
    assert run(capsys, server.url, "create", "source", "random", "--file", served_source(file_server))[0] == 0
    script = subprocess.run([str(CLI), "completion", "zsh"], capture_output=True, text=True, timeout=60)
    assert (script.returncode, script.stderr) == (0, "")
    path = tmp_path / "_kuiper-plugins"
    path.write_text(script.stdout)
    checked = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert (checked.returncode, checked.stderr) == (0, "")
    # Every command is offered, with its help.
    for command in ("create", "list", "udfs", "uploads", "status", "token", "completion"):
        assert re.search(rf"^\s+{command}:'", script.stdout, re.MULTILINE), command

    zsh = Shell(["zsh", "-f", "-i"], shell_env(server.url, tmp_path))
    try:
        zsh.type("autoload -U compinit && compinit -u")
        zsh.type(f'eval "$(<{path})"')
        assert printed(zsh.type("kuiper-plugins li\t sources")) == ["random"]
        assert printed(zsh.type("kuiper-plugins describe sou\tra\t")) == ["name     random", "version  1.0.0"]
    finally:
        zsh.close()


def test_completion_needs_no_service(tmp_path):
    """The script is printed offline: no URL is looked up, and a shell it does not know is a usage error."""
    env = cli_env("http://127.0.0.1:9")
    env["KUIPER_PLUGINS_URL"] = "ftp://not-a-service"  # any request would fail on it first
    done = subprocess.run([str(CLI), "completion", "bash"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "complete -o bashdefault -F _shtab_kuiper_plugins kuiper-plugins" in done.stdout
    done = subprocess.run([str(CLI), "completion", "fish"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'fish'" in done.stderr


def test_a_reader_that_leaves_early_ends_the_script_quietly():
    """`kuiper-plugins completion zsh | head -3`: the reader gone, the CLI exits 141 (128 + SIGPIPE), no traceback.

    The pipe's reading end is closed before the CLI starts, so its first write meets a pipe nobody reads, as
    the writes after `head` has its lines do: no ordering between the two processes is left to chance.
    """
    env = cli_env("http://127.0.0.1:9")
    reading, writing = os.pipe()
    os.close(reading)
    try:
        done = subprocess.run([str(CLI), "completion", "zsh"], env=env, stdout=writing, stderr=subprocess.PIPE,
                              timeout=60)
    finally:
        os.close(writing)
    assert done.returncode == 141, done.stderr.decode()
    assert done.stderr == b""
