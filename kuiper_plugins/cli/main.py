"""kuiper-plugins: a command-line client for the plugin-management REST API.

Most commands are one request to the server. `create --zip` and `update
--zip` check the local zip with the server's own package rules first (an
update also asks whether the plugin is there), ask before replacing an
upload of the same name, upload it to `/config/uploads`, install it from the
`file://` path the server saved it at, and remove that upload again when the
install is refused. `list` without a type, and `udfs`, read the plugin set
to show versions and owners. `token` and `completion` send nothing.

Output is meant for people by default (messages as the server words them,
names one per line, tables) and for scripts with `--json` (the server's
JSON, or `{"message": text}` for a text answer; an error as `{"status",
"message", "body"}` on stderr).

Exit status: 0 when the server did what was asked, 1 when it refused (its
message goes to stderr), 2 for a usage error or a server that cannot be
reached.

This module holds the arguments and the entry point; `client` talks to the
server, `commands` holds one function per command, `output` what they print,
`completion` the shell functions shtab's scripts call, `package_check` the
local check of a zip, `tokens` the minting of a JWT, `progress` the server's
phases drawn while `create` and `update` wait.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import requests

from kuiper_plugins import __version__
from kuiper_plugins.cli import completion
from kuiper_plugins.cli.client import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TOKEN_ENV,
    Client,
    Failure,
)
from kuiper_plugins.cli.commands import (
    EXPORT_FORMATS,
    cmd_apply,
    cmd_audit,
    cmd_backup,
    cmd_create,
    cmd_describe,
    cmd_drop,
    cmd_export,
    cmd_history,
    cmd_list,
    cmd_prebuild,
    cmd_register,
    cmd_repair,
    cmd_restore,
    cmd_rollback,
    cmd_status,
    cmd_token,
    cmd_udf,
    cmd_udfs,
    cmd_update,
    cmd_upload,
    cmd_uploads,
    cmd_verify,
)
from kuiper_plugins.cli.output import as_json
from kuiper_plugins.settings import SettingsError, service_url

# Without --url or KUIPER_PLUGINS_URL, the service on this machine, where its settings say it listens:
# http://127.0.0.1:9081 standalone, 9091 beside an engine (basic.restIp and restPort, KUIPER_PLUGINS__BASIC__*).
URL_DEFAULT_HELP = "this machine's service, by its settings: http://127.0.0.1:9081, or :9091 beside an engine"
URL_ENV = "KUIPER_PLUGINS_URL"
PROG = "kuiper-plugins"
GLOBAL_OPTIONS_WITH_VALUE = ("--url", "--token")
LIST_OUTPUTS = ("wide", "json", "yaml", "name")
DEFAULT_TOKEN_LIFETIME = 3600  # seconds: an hour, well within the service's default limit of a day

PLUGIN_TYPES = {
    "source": "sources", "sources": "sources",
    "sink": "sinks", "sinks": "sinks",
    "function": "functions", "functions": "functions",
    "portable": "portables", "portables": "portables",
}
NATIVE_TYPES = ("sources", "sinks", "functions")

EXAMPLES = """\
examples:
  kuiper-plugins create source random --file https://example.com/random_amd64.zip
  kuiper-plugins export -o plugins.yaml                 (the plugin set, to edit or to apply elsewhere)
  kuiper-plugins apply -f plugins.yaml --dry-run        (what would change; then without --dry-run)
  kuiper-plugins create function echo --zip ./echo.zip --function echo --function echo2
  kuiper-plugins list                                   (every plugin of every type, with its version)
  kuiper-plugins list sources -o wide
  kuiper-plugins --json describe portable mirror
  kuiper-plugins drop sink influx --stop
  kuiper-plugins audit --limit 5
  kuiper-plugins backup /var/backups/kuiper-plugins.tar.gz
  kuiper-plugins restore /var/backups/kuiper-plugins.tar.gz   (offline: the service stopped)
  kuiper-plugins uploads rm random.zip
  export KUIPER_PLUGINS_TOKEN=$(kuiper-plugins token --key admin.pem)   (admin.pub in the service's etc/mgmt)
  source <(kuiper-plugins completion bash)              (in ~/.bashrc; zsh: kuiper-plugins completion zsh)

environment:
  KUIPER_PLUGINS_URL    server URL when --url is not given (default: this machine's service, where its
                        settings say it listens: http://127.0.0.1:9081, or :9091 beside an engine)
  KUIPER_PLUGINS_TOKEN  token sent in the Authorization header when --token is not given

exit status: 0 done, 1 refused by the server, 2 usage error or server unreachable
"""


# ------------------------------------------------------------------ arguments


def plugin_type(value: str) -> str:
    """Map a type given singular or plural to the API's path segment."""
    try:
        return PLUGIN_TYPES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown plugin type '{value}' (choose from source, sink, function, portable)"
        )


def native_type(value: str) -> str:
    resolved = plugin_type(value)
    if resolved not in NATIVE_TYPES:
        raise argparse.ArgumentTypeError(f"'{value}' has no prebuilt plugins (choose from source, sink, function)")
    return resolved


class UsageError(Exception):
    """A command line argparse refuses: its message, and the usage of the (sub-)command it was refused by."""

    def __init__(self, message: str, usage: str, prog: str):
        super().__init__(message)
        self.message = message
        self.usage = usage
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are raised to main(), which words them (as text or as JSON)."""

    command_names: tuple[str, ...] = ()  # the top-level parser's commands, for "did you mean"

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)


def build_parser() -> Parser:
    """The argument parser: global options, then one sub-command per API operation."""
    # The global options are accepted after the command too; SUPPRESS keeps a sub-command from
    # overwriting a value given before it with its own default.
    shared = Parser(add_help=False)
    shared.add_argument("--url", default=argparse.SUPPRESS, help=f"server URL (${URL_ENV}, default {URL_DEFAULT_HELP})")
    shared.add_argument("--token", default=argparse.SUPPRESS,
                        help=f"token sent in the Authorization header (${TOKEN_ENV})")
    shared.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the server's JSON, for scripts (errors too, on stderr)")

    parser = Parser(
        prog=PROG, description="Manage the plugins of an eKuiper installation through kuiper-plugins.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=None, help=f"server URL (${URL_ENV}, default {URL_DEFAULT_HELP})")
    parser.add_argument("--token", default=None, help=f"token sent in the Authorization header (${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the server's JSON, for scripts (errors too, on stderr)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help_text: str, within=commands) -> argparse.ArgumentParser:
        sub = within.add_parser(name, parents=[shared], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def typed(sub: argparse.ArgumentParser, names: dict | None = completion.PLUGIN_NAMES) -> None:
        """TYPE and NAME, each completed: the name from the plugins of the type given before it."""
        sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help).complete = completion.TYPES
        name = sub.add_argument("name", metavar="NAME")
        if names is not None:
            name.complete = names

    type_help = "source, sink, function or portable (singular or plural)"
    for name, handler, help_text in (
        ("create", cmd_create, "install a plugin from a URL or a local zip"),
        ("update", cmd_update, "replace an installed plugin with a new package"),
    ):
        sub = command(name, handler, help_text)
        typed(sub, None if name == "create" else completion.PLUGIN_NAMES)  # a new plugin's name is the user's
        package = sub.add_mutually_exclusive_group(required=True)
        package.add_argument("--file", metavar="URL", help="http(s) or file:// URL of the plugin zip")
        package.add_argument("--zip", metavar="LOCAL.zip",
                             help="check this local zip with the server's package rules, upload it, then install"
                                  " it (a refused install removes the upload)").complete = shtab_file()
        sub.add_argument("--force", action="store_true",
                         help="with --zip: replace an upload of the same name on the server without asking")
        sub.add_argument("--shell-para", action="append", default=[], metavar="P",
                         help="argument for the package's install.sh; repeat for several (--shell-para=-x for "
                              "one starting with -)")
        sub.add_argument("--function", action="append", default=[], metavar="F",
                         help="function the plugin exports (function plugins); repeat for several")
        sub.add_argument("--sha256", metavar="HEX", help="digest the package must have")
        sub.add_argument("--dry-run", action="store_true",
                         help="show what it would write, remove and run, and do nothing (with --zip, the zip is"
                              " still uploaded)")

    sub = command("drop", cmd_drop, "delete an installed plugin")
    typed(sub)
    sub.add_argument("--stop", action="store_true", help="stop the service once the plugin is deleted")
    sub.add_argument("--dry-run", action="store_true", help="show what it would remove, and do nothing")

    typed(command("describe", cmd_describe, "show an installed plugin"))
    typed(command("history", cmd_history, "show every install, update and rollback of a plugin, newest first"))

    sub = command("rollback", cmd_rollback, "swap the previous version of a plugin back in")
    typed(sub)
    sub.add_argument("--version", metavar="X",
                     help="the kept version to go back to (history --json marks them kept); default: the newest")
    sub.add_argument("--stop", action="store_true",
                     help="native plugins: restart the engine (engine.restartCommand) once rolled back")

    sub = command("list", cmd_list, "list the installed plugins: every type in one table, or one type's names")
    sub.add_argument("type", type=plugin_type, nargs="?", metavar="TYPE",
                     help=f"{type_help}; left out, every type").complete = completion.TYPES
    sub.add_argument("-o", "--output", choices=LIST_OUTPUTS,
                     help="wide: add functions, sha256 and package URL; json or yaml: the rows; name: names only"
                          " (type/name without a TYPE)")

    sub = command("register", cmd_register, "set the function list of a function plugin")
    sub.add_argument("name", metavar="NAME", help="function plugin").complete = completion.FUNCTION_PLUGINS
    sub.add_argument("functions", nargs="+", metavar="F", help="function names")

    sub = command("udfs", cmd_udfs, "list every user-defined function and the plugin that owns it")
    sub.add_argument("-o", "--output", choices=("json", "yaml", "name"),
                     help="json or yaml: the rows; name: the function names only (--json: the server's list)")

    sub = command("udf", cmd_udf, "show which plugin provides a function")
    sub.add_argument("name", metavar="NAME", help="function name").complete = completion.FUNCTION_NAMES

    sub = command("prebuild", cmd_prebuild, "list the prebuilt plugins offered for the server's machine")
    sub.add_argument("type", type=native_type, metavar="TYPE",
                     help="source, sink or function").complete = completion.NATIVE_TYPES

    command("status", cmd_status, "say how the service is: versions, uptime, plugin counts, what needs a look")
    command("verify", cmd_verify, "compare every recorded file and eKuiper's store with the registry")
    command("repair", cmd_repair, "reinstall each damaged plugin from its recorded URL and sha256")
    sub = command("backup", cmd_backup, "save one consistent tar.gz of the registry, eKuiper's store and the files")
    sub.add_argument("output", metavar="FILE", help="where to save the tar.gz").complete = shtab_file()
    sub = command("restore", cmd_restore, "offline: restore a backup into this machine's KUIPER_HOME, then verify")
    sub.add_argument("archive", metavar="FILE", help="a tar.gz saved by backup").complete = shtab_file()

    sub = command("upload", cmd_upload, "upload a local file to the server's uploads folder; print where it went")
    sub.add_argument("local_file", metavar="LOCAL_FILE").complete = shtab_file()
    sub = command("uploads", cmd_uploads, "list the server's uploads; `uploads rm NAME...` removes some")
    sub.add_argument("-o", "--output", choices=("name",), help="name: the names only, one per line")
    removing = sub.add_subparsers(dest="uploads_command", metavar="rm", required=False)
    sub = command("rm", cmd_uploads, "remove uploads from the server's uploads folder", within=removing)
    sub.add_argument("remove", nargs="+", metavar="NAME", help="as `uploads` lists it (a sub-folder's file as"
                                                              " folder/name)").complete = completion.UPLOAD_NAMES

    sub = command("export", cmd_export, "print the plugin set: every installed plugin, its package and functions")
    sub.add_argument("-o", "--output", metavar="FILE", help="save it to FILE instead").complete = shtab_file()
    sub.add_argument("--format", choices=EXPORT_FORMATS, default="yaml",
                     help="yaml (default; json with --json), json, or ekuiper: the plugin part of eKuiper's export,"
                          " function lists added")
    sub = command("apply", cmd_apply, "make the server's plugins what a plugin set says, all or nothing")
    sub.add_argument("-f", "--file", required=True, metavar="FILE",
                     help="the plugin set (YAML or JSON, as export writes it) or eKuiper's export; - for stdin"
                     ).complete = shtab_file()
    sub.add_argument("--prune", action="store_true", help="also remove the installed plugins FILE does not name")
    sub.add_argument("--dry-run", action="store_true", help="show what would change, and change nothing")

    sub = command("audit", cmd_audit, "show the audit trail: who changed which plugin, newest first")
    sub.add_argument("--limit", type=int, default=20, metavar="N", help="most rows shown (1 to 1000; default 20)")
    sub.add_argument("--since", metavar="TIME",
                     help="only rows at or after this RFC 3339 time, e.g. 2024-05-01T00:00:00Z")

    # Commands that send nothing: no server URL is needed for them.
    sub = command("token", cmd_token, "mint a JWT for a service with basic.authentication on, from a private key")
    sub.set_defaults(offline=True)
    sub.add_argument("--key", required=True, metavar="KEY.pem",
                     help="PEM RSA private key whose public half is in the service's etc/mgmt").complete = shtab_file()
    sub.add_argument("--issuer", metavar="NAME",
                     help="the public key's file name in etc/mgmt (default: KEY's name with .pub for .pem or .key)")
    sub.add_argument("--subject", metavar="SUB", help="who the token is for, as the audit trail shows it"
                                                      " (default: your user name)")
    sub.add_argument("--lifetime", type=int, default=DEFAULT_TOKEN_LIFETIME, metavar="SECONDS",
                     help=f"seconds until it expires (default {DEFAULT_TOKEN_LIFETIME}; the service refuses more"
                          " than basic.maxTokenLifetime, a day by default)")
    sub = command("completion", cmd_completion, "print the shell completion script for bash or zsh")
    sub.set_defaults(offline=True)
    sub.add_argument("shell", choices=completion.SHELLS, metavar="SHELL", help="bash or zsh")
    parser.command_names = tuple(commands.choices)
    return parser


def shtab_file() -> dict[str, str]:
    """Complete a local file name, as shtab's own FILE does (written out: shtab is imported only to print)."""
    return {"bash": "_shtab_compgen_files", "zsh": "_files"}


def cmd_completion(client: Client | None, args: argparse.Namespace) -> None:
    print(completion.script(build_parser(), args.shell))


def _server_url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get(URL_ENV) or _local_service_url()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Failure(f"the server URL must be http:// or https:// with a host, got '{url}'", EXIT_USAGE)
    return url


def _local_service_url() -> str:
    """Where the service on this machine listens, read from its settings as the service reads them."""
    try:
        return service_url()
    except SettingsError as exc:
        raise Failure(f"cannot tell where kuiper-plugins listens: {exc} (give --url or ${URL_ENV})",
                      EXIT_USAGE) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status (EXIT_BROKEN_PIPE when a reader such as `head` left early)."""
    try:
        status = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe could only print a warning
        return status
    except BrokenPipeError:
        # The reader has what it wanted: the rest of the output goes nowhere, quietly, as for a shell tool
        # ended by SIGPIPE; stdout is pointed at /dev/null so that Python's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(argv: list[str]) -> int:
    """Parse `argv` and run its command; the exit status."""
    json_asked = "--json" in argv  # known before parsing, so that a usage error is worded as asked
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as error:
        report_usage_error(error, argv, parser, json_asked)
        return EXIT_USAGE
    try:
        if getattr(args, "offline", False):
            args.handler(None, args)
            return EXIT_OK
        base_url = _server_url(args)
        token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
        with requests.Session() as session:
            args.handler(Client(base_url, token, session), args)
    except Failure as failure:
        if args.json:
            print(as_json({"status": failure.status, "message": failure.message, "body": failure.answer}),
                  file=sys.stderr)
        else:
            print(f"error: {failure.message}", file=sys.stderr)
        return failure.exit_status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def report_usage_error(error: UsageError, argv: list[str], parser: Parser, json_asked: bool) -> None:
    """Print a usage error as argparse does (or as JSON), with the command meant when one was mistyped."""
    message = error.message
    if error.prog == PROG:
        word = _command_word(argv)
        known = parser.command_names
        meant = difflib.get_close_matches(word, known, n=1) if word is not None and word not in known else []
        if meant:
            message = f"argument COMMAND: invalid choice: '{word}' (did you mean `{meant[0]}`?)"
    if json_asked:
        print(as_json({"status": None, "message": message, "usage": error.usage.strip()}), file=sys.stderr)
    else:
        sys.stderr.write(f"{error.usage}{error.prog}: error: {message}\n")


def _command_word(argv: list[str]) -> str | None:
    """The word in the command's place: the first that is neither an option nor a global option's value."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_OPTIONS_WITH_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


if __name__ == "__main__":
    sys.exit(main())
