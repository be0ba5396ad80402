"""kuiper-plugins: a command-line client for the plugin-management REST API.

Each command is one request to the server (`create --zip` and `update --zip`
are two: the local zip is uploaded to `/config/uploads`, then installed from
the `file://` path the server saved it at). Output is meant for people by
default (messages as the server words them, names one per line, tables) and
for scripts with `--json` (the server's JSON, or `{"message": text}` for a
text answer).

Exit status: 0 when the server did what was asked, 1 when it refused (its
message goes to stderr), 2 for a usage error or a server that cannot be
reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

import requests
import yaml

from kuiper_plugins import __version__
from kuiper_plugins.cli import progress
from kuiper_plugins.settings import SettingsError, service_url

# Without --url or KUIPER_PLUGINS_URL, the service on this machine, where its settings say it listens:
# http://127.0.0.1:9081 standalone, 9091 beside an engine (basic.restIp and restPort, KUIPER_PLUGINS__BASIC__*).
URL_DEFAULT_HELP = "this machine's service, by its settings: http://127.0.0.1:9081, or :9091 beside an engine"
URL_ENV = "KUIPER_PLUGINS_URL"
TOKEN_ENV = "KUIPER_PLUGINS_TOKEN"
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 900  # an install downloads, unpacks and may run install.sh before it answers
UPLOAD_FIELD = "uploadFile"
CHUNK_SIZE = 256 * 1024

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PLUGIN_TYPES = {
    "source": "sources", "sources": "sources",
    "sink": "sinks", "sinks": "sinks",
    "function": "functions", "functions": "functions",
    "portable": "portables", "portables": "portables",
}
NATIVE_TYPES = ("sources", "sinks", "functions")
NO_PLUGIN = "No plugin is found."
NO_UDF = "No udf is found."

EXAMPLES = """\
examples:
  kuiper-plugins create source random --file https://example.com/random_amd64.zip
  kuiper-plugins export -o plugins.yaml                 (the plugin set, to edit or to apply elsewhere)
  kuiper-plugins apply -f plugins.yaml --dry-run        (what would change; then without --dry-run)
  kuiper-plugins create function echo --zip ./echo.zip --function echo --function echo2
  kuiper-plugins list sources
  kuiper-plugins --json describe portable mirror
  kuiper-plugins drop sink influx --stop
  kuiper-plugins audit --limit 5
  kuiper-plugins backup /var/backups/kuiper-plugins.tar.gz
  kuiper-plugins restore /var/backups/kuiper-plugins.tar.gz   (offline: the service stopped)

environment:
  KUIPER_PLUGINS_URL    server URL when --url is not given (default: this machine's service, where its
                        settings say it listens: http://127.0.0.1:9081, or :9091 beside an engine)
  KUIPER_PLUGINS_TOKEN  token sent in the Authorization header when --token is not given

exit status: 0 done, 1 refused by the server, 2 usage error or server unreachable
"""


class Failure(Exception):
    """A command that cannot succeed: the message for stderr and the exit status to end with."""

    def __init__(self, message: str, exit_status: int, answer: Any = None):
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
        self.answer = answer  # a refusal's parsed body, for a command that shows more of it


# ------------------------------------------------------------------ talking to the server


class Client:
    """The server's REST API over one requests session: answers come back parsed, refusals as Failure."""

    def __init__(self, base_url: str, token: str | None, session: requests.Session):
        self.base_url = base_url.rstrip("/")
        self.session = session
        session.headers["User-Agent"] = f"kuiper-plugins-cli/{__version__}"
        if token:
            session.headers["Authorization"] = token  # the raw token, as eKuiper reads it

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the JSON answer, or the text of a text answer."""
        url = self.base_url + path
        try:
            response = self.session.request(method, url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs)
        except requests.ConnectTimeout:
            raise Failure(f"cannot reach kuiper-plugins at {self.base_url}: no connection within "
                          f"{CONNECT_TIMEOUT} s", EXIT_USAGE)
        except requests.ReadTimeout:
            raise Failure(f"kuiper-plugins at {self.base_url} did not answer within {READ_TIMEOUT} s",
                          EXIT_USAGE)
        except requests.ConnectionError as exc:
            raise Failure(f"cannot reach kuiper-plugins at {self.base_url}: {_network_reason(exc)}", EXIT_USAGE)
        except requests.RequestException as exc:
            raise Failure(f"request to {url} failed: {exc}", EXIT_USAGE)
        with response:
            if response.status_code >= 400:
                raise Failure(_refusal_message(response), EXIT_REFUSED, _answer_of(response))
            return _answer_of(response)


def _answer_of(response: requests.Response) -> Any:
    if _is_json(response):
        try:
            return response.json()
        except ValueError:
            pass
    return response.text


def _is_json(response: requests.Response) -> bool:
    media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _refusal_message(response: requests.Response) -> str:
    """The server's own words from the {"error", "message"} envelope, or the status when there are none."""
    answer = _answer_of(response)
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return answer["message"]
    status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    first_line = answer.strip().splitlines()[0] if isinstance(answer, str) and answer.strip() else ""
    if first_line and len(first_line) <= 200 and not first_line.startswith("<"):
        return f"{status}: {first_line}"
    return f"{status} from {response.url}"


def _network_reason(exc: BaseException) -> str:
    """The innermost OS-level cause of a connection failure (refused, unknown host...) in a few words."""
    reason = "connection failed"
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return reason


# ------------------------------------------------------------------ uploading a local file


class ProgressBar:
    """A one-line text bar on a terminal, redrawn each time another whole percent has gone."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label = label
        self.total = total
        self.stream = stream
        self.shown = -1
        self.finished = False

    def update(self, done: int) -> None:
        percent = 100 if self.total == 0 else done * 100 // self.total
        if percent == self.shown:
            return
        self.shown = percent
        filled = self.WIDTH * percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {progress.size(done)}/{progress.size(self.total)}")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line, once, so what is printed next starts on a line of its own."""
        if self.shown >= 0 and not self.finished:
            self.finished = True
            self.stream.write("\n")
            self.stream.flush()


class NoProgress:
    """Stands in for ProgressBar when stderr is not a terminal."""

    def update(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


class MultipartUpload:
    """A multipart/form-data body holding one file, read from disk chunk by chunk as it is sent.

    requests sends an iterable body as it comes and takes Content-Length from
    len(), so the file is never held in memory whole. The sha256 of what was
    sent is known once the body has been sent.
    """

    def __init__(self, path: Path, field: str, progress: ProgressBar | NoProgress):
        self.path = path
        self.size = path.stat().st_size
        self.progress = progress
        self.boundary = uuid.uuid4().hex
        self.sha256 = hashlib.sha256()
        filename = _form_quote(path.name)
        self.head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        sent = 0
        self.progress.update(0)
        with open(self.path, "rb") as file:
            while sent < self.size:
                chunk = file.read(min(CHUNK_SIZE, self.size - sent))
                if not chunk:
                    raise Failure(f"{self.path} shrank while it was being uploaded", EXIT_REFUSED)
                sent += len(chunk)
                self.sha256.update(chunk)
                self.progress.update(sent)
                yield chunk
        self.progress.finish()
        yield self.tail


def _form_quote(filename: str) -> str:
    """Escape a file name for a Content-Disposition header as browsers do (HTML's form encoding)."""
    return filename.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _readable_file(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        reason = "no such file" if not path.exists() else "not a regular file"
        raise Failure(f"cannot upload {name}: {reason}", EXIT_USAGE)
    if not os.access(path, os.R_OK):
        raise Failure(f"cannot upload {name}: permission denied", EXIT_USAGE)
    return path


def upload(client: Client, local: Path) -> tuple[str, str]:
    """Send a local file to /config/uploads; return the path the server saved it at and its sha256."""
    progress = ProgressBar(f"uploading {local.name}", local.stat().st_size, sys.stderr) if _on_terminal() \
        else NoProgress()
    body = MultipartUpload(local, UPLOAD_FIELD, progress)
    try:
        answer = client.call("POST", "/config/uploads", data=body, headers={"Content-Type": body.content_type})
    finally:
        progress.finish()
    saved = answer.strip() if isinstance(answer, str) else answer
    if not isinstance(saved, str) or not saved:
        raise Failure(f"the server did not say where it saved {local.name} (answer: {answer!r})", EXIT_REFUSED)
    return saved, body.sha256.hexdigest()


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ output


def _cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Align rows in columns two spaces apart; the last column is not padded."""
    lines = [list(header)] if header else []
    lines += [list(row) for row in rows]
    if not lines:
        return ""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]) - 1)]
    return "\n".join(
        "  ".join([cell.ljust(width) for cell, width in zip(line, widths, strict=False)] + [line[-1]])
        for line in lines
    )


def key_values(answer: Any) -> str:
    """A JSON object as KEY  VALUE rows, name and version first."""
    if not isinstance(answer, dict):
        return _as_json(answer)
    first = [key for key in ("name", "version") if key in answer]
    keys = first + [key for key in answer if key not in first]
    return table([(key, _cell(answer[key])) for key in keys])


def names(empty: str) -> Callable[[Any], str]:
    """Render a JSON array of names one per line, or `empty` when there are none."""

    def render(answer: Any) -> str:
        if not isinstance(answer, list):
            return _as_json(answer)
        return "\n".join(str(name) for name in answer) if answer else empty

    return render


def portable_table(answer: Any) -> str:
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        return _as_json(answer)
    if not answer:
        return NO_PLUGIN
    rows = [(_cell(p.get("name")), _cell(p.get("version")), _cell(p.get("language"))) for p in answer]
    return table(rows, header=("NAME", "VERSION", "LANGUAGE"))


def prebuild_table(answer: Any) -> str:
    if not isinstance(answer, dict):
        return _as_json(answer)
    if not answer:
        return NO_PLUGIN
    return table([(name, _cell(url)) for name, url in answer.items()], header=("NAME", "URL"))


def actor_text(actor: Any) -> str:
    """An audit row's actor in a few words: the token's issuer/subject, the local user, the address."""
    if not isinstance(actor, dict):
        return _cell(actor)
    parts = []
    if actor.get("iss") is not None:
        parts.append(f"{actor['iss']}/{actor.get('sub') or '-'}")
    if actor.get("user") is not None:
        parts.append(str(actor["user"]))
    if actor.get("address") is not None:
        parts.append(str(actor["address"]) + (f" via {actor['proxy']}" if actor.get("proxy") else ""))
    return " ".join(parts) or "-"


def audit_table(answer: Any) -> str:
    """The audit rows, newest first, one per line."""
    if not isinstance(answer, list) or not all(isinstance(row, dict) for row in answer):
        return _as_json(answer)
    if not answer:
        return "No audit row is found."
    rows = []
    for row in answer:
        target = f"{row.get('type') or '-'}/{row.get('name') or '-'}" if row.get("name") else _cell(row.get("path"))
        versions = f"{row.get('versionBefore') or '-'} -> {row.get('versionAfter') or '-'}"
        rows.append((_cell(row.get("time")), _cell(row.get("operation")), target, versions,
                     f"{_cell(row.get('outcome'))} {_cell(row.get('status'))}", actor_text(row.get("actor")),
                     _cell(row.get("requestId"))))
    return table(rows, header=("TIME", "OPERATION", "PLUGIN", "VERSIONS", "OUTCOME", "ACTOR", "REQUEST ID"))


def plan_table(answer: Any) -> str:
    """A dry run's plan: what it is, then each file written or removed, then the head of install.sh."""
    if not isinstance(answer, dict) or "writes" not in answer:
        return _as_json(answer)
    source = answer.get("source") or {}
    script = answer.get("installScript")
    summary = [
        ("plan", f"{answer.get('kind')} {answer.get('type')} plugin {answer.get('name')} (dry run: nothing written)"),
        ("version", _cell(answer.get("version"))),
        ("source", _cell(source.get("url"))),
        ("size", _cell(source.get("size"))),
        ("sha256", _cell(source.get("sha256"))),
        ("functions", _cell(answer.get("functions"))),
        ("clashes", _cell([f"{c['function']} ({c['plugin']})" for c in answer.get("functionClashes") or []])),
        ("install.sh", "runs, sha256 " + _cell(script.get("sha256")) if script else "none"),
        ("restart needed", "yes" if answer.get("restartNeeded") else "no"),
    ]
    if answer.get("compatibility") is not None:
        summary.append(("compatibility", _cell(answer["compatibility"])))
    files = [("write", f["path"], _cell(f.get("size")), _cell(f.get("sha256"))) for f in answer["writes"]]
    files += [("remove", path, "-", "-") for path in answer.get("removes") or []]
    parts = [table(summary), ""]
    parts.append(table(files, header=("ACTION", "PATH", "SIZE", "SHA256")) if files else "no file written or removed")
    if script and script.get("head"):
        parts += ["", "install.sh, first lines:"] + [f"  {line}" for line in script["head"]]
    return "\n".join(parts)


def message(answer: Any) -> str:
    return answer if isinstance(answer, str) else _as_json(answer)


def _as_json(answer: Any) -> str:
    return json.dumps(answer, indent=2, ensure_ascii=False)


def show(args: argparse.Namespace, answer: Any, human: Callable[[Any], str]) -> None:
    """Print an answer for people, or with --json for scripts (a text answer as {"message": text})."""
    if args.json:
        print(_as_json({"message": answer} if isinstance(answer, str) else answer))
    else:
        print(human(answer))


# ------------------------------------------------------------------ commands


def _segment(name: str) -> str:
    return quote(name, safe="")


def _install_body(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """The create/update body; with --zip, upload the file first and install it from where it was saved."""
    if args.function and args.type != "functions":
        raise Failure("--function applies to function plugins only", EXIT_USAGE)
    sha256 = args.sha256
    if args.zip is not None:
        local = _readable_file(args.zip)
        if not local.name.endswith(".zip"):
            raise Failure(f"--zip expects a file whose name ends in .zip, got {args.zip}", EXIT_USAGE)
        saved, digest = upload(client, local)
        file_url = PurePosixPath(saved).as_uri() if saved.startswith("/") else None
        if file_url is None:
            raise Failure(f"the server saved {local.name} at {saved!r}, which is not an absolute path",
                          EXIT_REFUSED)
        sha256 = sha256 or digest  # what is installed is exactly what was sent
    else:
        file_url = args.file
    body: dict[str, Any] = {"name": args.name, "file": file_url}
    if args.shell_para:
        body["shellParas"] = args.shell_para
    if args.function:
        body["functions"] = args.function
    if sha256:
        body["sha256"] = sha256
    return body


def _dry_run(args: argparse.Namespace) -> dict[str, str] | None:
    return {"dryRun": "1"} if args.dry_run else None


def _watched_call(client: Client, args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """Send a write under the CLI's own X-Request-Id; on a terminal, draw the server's phases while it runs."""
    request_id = progress.new_request_id()
    stream = sys.stderr if _on_terminal() and not args.json else None
    asking = {key: value for key, value in client.session.headers.items() if key in ("User-Agent", "Authorization")}
    with progress.watched(client.base_url, asking, request_id, stream, READ_TIMEOUT):
        return client.call(method, path, headers={progress.REQUEST_ID_HEADER: request_id}, **kwargs)


def cmd_create(client: Client, args: argparse.Namespace) -> None:
    body = _install_body(client, args)
    answer = _watched_call(client, args, "POST", f"/plugins/{args.type}", json=body, params=_dry_run(args))
    show(args, answer, plan_table if args.dry_run else message)


def cmd_update(client: Client, args: argparse.Namespace) -> None:
    body = _install_body(client, args)
    answer = _watched_call(client, args, "PUT", f"/plugins/{args.type}/{_segment(args.name)}", json=body,
                           params=_dry_run(args))
    show(args, answer, plan_table if args.dry_run else message)


def cmd_drop(client: Client, args: argparse.Namespace) -> None:
    if args.dry_run:
        answer = client.call("DELETE", f"/plugins/{args.type}/{_segment(args.name)}", params=_dry_run(args))
        show(args, answer, plan_table)
        return
    params = {"stop": "1"} if args.stop else None
    show(args, client.call("DELETE", f"/plugins/{args.type}/{_segment(args.name)}", params=params), message)


def history_table(answer: Any) -> str:
    """A plugin's history, newest first: when (UTC), operation, version, outcome, sha256 and URL."""
    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"])), entry["operation"], entry["version"],
             entry["outcome"], _cell(entry["sha256"]), _cell(entry["url"])] for entry in answer]
    return table(rows, ["WHEN (UTC)", "OPERATION", "VERSION", "OUTCOME", "SHA256", "URL"])


def cmd_history(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/{args.type}/{_segment(args.name)}/history"), history_table)


def cmd_rollback(client: Client, args: argparse.Namespace) -> None:
    params = {"stop": "1"} if args.stop else {}
    if args.version is not None:
        params["version"] = args.version
    answer = client.call("POST", f"/plugins/{args.type}/{_segment(args.name)}/rollback", params=params)
    show(args, answer, lambda a: f"{a['type']} plugin {a['name']} is rolled back to version {a['version']}")


def cmd_describe(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/{args.type}/{_segment(args.name)}"), key_values)


def cmd_list(client: Client, args: argparse.Namespace) -> None:
    render = portable_table if args.type == "portables" else names(NO_PLUGIN)
    show(args, client.call("GET", f"/plugins/{args.type}"), render)


def cmd_register(client: Client, args: argparse.Namespace) -> None:
    path = f"/plugins/functions/{_segment(args.name)}/register"
    show(args, client.call("POST", path, json={"functions": args.functions}), message)


def cmd_udfs(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", "/plugins/udfs"), names(NO_UDF))


def cmd_udf(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/udfs/{_segment(args.name)}"), key_values)


def cmd_prebuild(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/{args.type}/prebuild"), prebuild_table)


def cmd_upload(client: Client, args: argparse.Namespace) -> None:
    saved, _ = upload(client, _readable_file(args.local_file))
    show(args, saved, message)


def cmd_audit(client: Client, args: argparse.Namespace) -> None:
    params = {"limit": str(args.limit)}
    if args.since:
        params["since"] = args.since
    show(args, client.call("GET", "/audit", params=params), audit_table)
def problems_table(answer: Any) -> str:
    """Verify's and repair's problems as a table, one row per plugin and path."""
    if not isinstance(answer, dict) or not isinstance(answer.get("problems"), list):
        return _as_json(answer)
    lines = []
    for key, label in (("repaired", "repaired"), ("notRepaired", "not repaired")):
        for item in answer.get(key) or []:
            lines.append(f"{label}: {_cell(item.get('type'))} {_cell(item.get('name'))}"
                         f" ({_cell(item.get('reason') or item.get('file'))})")
    if answer["problems"]:
        rows = [(_cell(p.get("type")), _cell(p.get("name")), _cell(p.get("path")), _cell(p.get("problem")),
                 _cell(p.get("detail"))) for p in answer["problems"]]
        lines.append(table(rows, header=("TYPE", "NAME", "PATH", "PROBLEM", "DETAIL")))
    else:
        lines.append("ok: every recorded file and eKuiper's store agree with the registry")
    return "\n".join(lines)


def _fail_unless_ok(answer: Any) -> None:
    if isinstance(answer, dict) and answer.get("ok") is False:
        raise Failure(f"{len(answer.get('problems') or [])} problem(s) remain", EXIT_REFUSED)


# ------------------------------------------------------------------ the plugin set

EXPORT_FORMATS = ("yaml", "json", "ekuiper")
YAML_SUFFIXES = (".yaml", ".yml")


def _side(change: dict[str, Any], key: str) -> str:
    """One side of a change in a few words: the function list of a register, else version and digest."""
    state = change.get(key)
    if not isinstance(state, dict):
        return "-"
    if change.get("action") == "register":
        return _cell(state.get("functions"))
    digest = state.get("sha256")
    return _cell(state.get("version")) + (f" ({digest[:12]})" if isinstance(digest, str) else "")


def changes_table(answer: Any) -> str:
    """What an apply changed (or with --dry-run would change), one row per plugin, in the order it was done."""
    if not isinstance(answer, dict) or not isinstance(answer.get("changes"), list):
        return _as_json(answer)
    dry_run = bool(answer.get("dryRun"))
    if not answer["changes"]:
        return "no change: the plugins are as the document says" + (" (dry run)" if dry_run else "")
    rows = [(_cell(c.get("action")), _cell(c.get("type")), _cell(c.get("name")), _side(c, "from"), _side(c, "to"),
             _cell(c.get("reason"))) for c in answer["changes"]]
    count = len(rows)
    done = f"{count} change{'s' if count != 1 else ''}"
    footer = f"dry run: {done} planned, nothing was changed" if dry_run else f"{done} made"
    return table(rows, header=("ACTION", "TYPE", "NAME", "FROM", "TO", "REASON")) + "\n" + footer


def cmd_export(client: Client, args: argparse.Namespace) -> None:
    """Print the plugin set, or save it with -o (written aside and renamed once whole)."""
    chosen = "json" if args.json and args.format == "yaml" else args.format
    if chosen == "yaml":
        text = client.call("GET", "/config/plugins", headers={"Accept": "application/yaml"})
        if not isinstance(text, str):  # a server that answered JSON all the same: the same document, as YAML
            text = yaml.safe_dump(text, sort_keys=False, allow_unicode=True)
    else:
        params = {"format": "ekuiper"} if chosen == "ekuiper" else None
        text = _as_json(client.call("GET", "/config/plugins", params=params)) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return
    target = Path(args.output)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise Failure(f"cannot write {target}: {exc.strerror or exc}", EXIT_USAGE)
    show(args, str(target), message)


def _document_body(args: argparse.Namespace) -> tuple[bytes, str]:
    """The file to apply as it is, with its media type; with --prune, with `"prune": true` set in it."""
    name = args.file
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).expanduser().read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE)
    suffix = Path(name).suffix.lower()
    as_yaml = suffix in YAML_SUFFIXES or (suffix != ".json" and not raw.lstrip().startswith((b"{", b"[")))
    media_type = "application/yaml" if as_yaml else "application/json"
    if not args.prune:
        return raw, media_type  # the server reads it, and refuses what is wrong in it, in its own words
    try:
        document = yaml.safe_load(raw) if as_yaml else json.loads(raw, object_pairs_hook=_no_repeated_keys)
    except (ValueError, yaml.YAMLError) as exc:
        raise Failure(f"cannot read {name}: {' '.join(str(exc).split())}", EXIT_USAGE)
    if not isinstance(document, dict):
        raise Failure(f"cannot apply {name}: it does not hold a mapping (the plugin set, or eKuiper's export)",
                      EXIT_USAGE)
    document = {key: value for key, value in document.items() if str(key).lower() != "prune"}
    document["prune"] = True
    if as_yaml:
        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode(), media_type
    return json.dumps(document, ensure_ascii=False).encode(), media_type


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} is given more than once")
    return dict(pairs)


def cmd_apply(client: Client, args: argparse.Namespace) -> None:
    """Converge the server's plugins to a document; print the changes (a refusal: what was rolled back too)."""
    body, media_type = _document_body(args)
    try:
        answer = client.call("PUT", "/config/plugins", data=body, headers={"Content-Type": media_type},
                             params=_dry_run(args))
    except Failure as failure:
        refusal = failure.answer
        if isinstance(refusal, dict) and "rolledBack" in refusal:
            if args.json:
                print(_as_json(refusal))
            else:
                undone = refusal.get("rolledBack") or []
                print(changes_table({"changes": undone}) if undone else "nothing had been changed",
                      file=sys.stderr)
                if undone:
                    print("(the changes above were made, then rolled back)", file=sys.stderr)
        raise
    show(args, answer, changes_table)


def cmd_verify(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("GET", "/registry/verify")
    show(args, answer, problems_table)
    _fail_unless_ok(answer)


def cmd_repair(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("POST", "/registry/repair")
    show(args, answer, problems_table)
    _fail_unless_ok(answer)


def cmd_backup(client: Client, args: argparse.Namespace) -> None:
    """Save GET /registry/backup to a file, written aside and renamed once complete."""
    target = Path(args.output)
    partial = target.with_name(target.name + ".partial")
    url = client.base_url + "/registry/backup"
    try:
        with client.session.get(url, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
            if response.status_code >= 400:
                raise Failure(_refusal_message(response), EXIT_REFUSED)
            with open(partial, "wb") as out:
                for chunk in response.iter_content(CHUNK_SIZE):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise Failure(f"cannot reach kuiper-plugins at {client.base_url}: {_network_reason(exc)}", EXIT_USAGE)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise Failure(f"cannot write {target}: {exc.strerror or exc}", EXIT_USAGE)
    os.replace(partial, target)
    show(args, str(target), message)


def cmd_restore(client: Client, args: argparse.Namespace) -> None:
    """Restore a backup into this machine's home, offline; then verify it."""
    from kuiper_plugins.lifecycle import backup  # the server's code: only this command needs it
    from kuiper_plugins.settings import load_settings

    archive = _readable_file(args.archive)
    try:
        answered = client.session.get(client.base_url + "/ping", timeout=CONNECT_TIMEOUT).status_code == 200
    except requests.RequestException:
        answered = False
    if answered:
        raise Failure(f"kuiper-plugins answers at {client.base_url}: stop it before a restore", EXIT_REFUSED)
    try:
        problems = backup.restore(archive, load_settings())
    except (backup.RestoreRefused, SettingsError) as exc:
        raise Failure(str(exc), EXIT_REFUSED) from None
    answer = {"ok": not problems, "problems": [p.as_dict() for p in problems]}
    show(args, answer, problems_table)
    _fail_unless_ok(answer)


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: global options, then one sub-command per API operation."""
    # The global options are accepted after the command too; SUPPRESS keeps a sub-command from
    # overwriting a value given before it with its own default.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--url", default=argparse.SUPPRESS, help=f"server URL (${URL_ENV}, default {URL_DEFAULT_HELP})")
    shared.add_argument("--token", default=argparse.SUPPRESS,
                        help=f"token sent in the Authorization header (${TOKEN_ENV})")
    shared.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the server's JSON, for scripts")

    parser = argparse.ArgumentParser(
        prog="kuiper-plugins", description="Manage the plugins of an eKuiper installation through kuiper-plugins.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=None, help=f"server URL (${URL_ENV}, default {URL_DEFAULT_HELP})")
    parser.add_argument("--token", default=None, help=f"token sent in the Authorization header (${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", default=False, help="print the server's JSON, for scripts")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[shared], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    type_help = "source, sink, function or portable (singular or plural)"
    for name, handler, help_text in (
        ("create", cmd_create, "install a plugin from a URL or a local zip"),
        ("update", cmd_update, "replace an installed plugin with a new package"),
    ):
        sub = command(name, handler, help_text)
        sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)
        sub.add_argument("name", metavar="NAME")
        package = sub.add_mutually_exclusive_group(required=True)
        package.add_argument("--file", metavar="URL", help="http(s) or file:// URL of the plugin zip")
        package.add_argument("--zip", metavar="LOCAL.zip", help="upload this local zip, then install it")
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
    sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--stop", action="store_true", help="stop the service once the plugin is deleted")
    sub.add_argument("--dry-run", action="store_true", help="show what it would remove, and do nothing")

    sub = command("describe", cmd_describe, "show an installed plugin")
    sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)
    sub.add_argument("name", metavar="NAME")

    sub = command("history", cmd_history, "show every install, update and rollback of a plugin, newest first")
    sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)
    sub.add_argument("name", metavar="NAME")

    sub = command("rollback", cmd_rollback, "swap the previous version of a plugin back in")
    sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--version", metavar="X",
                     help="the kept version to go back to (history --json marks them kept); default: the newest")
    sub.add_argument("--stop", action="store_true",
                     help="native plugins: restart the engine (engine.restartCommand) once rolled back")

    sub = command("list", cmd_list, "list the installed plugins of a type")
    sub.add_argument("type", type=plugin_type, metavar="TYPE", help=type_help)

    sub = command("register", cmd_register, "set the function list of a function plugin")
    sub.add_argument("name", metavar="NAME", help="function plugin")
    sub.add_argument("functions", nargs="+", metavar="F", help="function names")

    command("udfs", cmd_udfs, "list every user-defined function")

    sub = command("udf", cmd_udf, "show which plugin provides a function")
    sub.add_argument("name", metavar="NAME", help="function name")

    sub = command("prebuild", cmd_prebuild, "list the prebuilt plugins offered for the server's machine")
    sub.add_argument("type", type=native_type, metavar="TYPE", help="source, sink or function")

    command("verify", cmd_verify, "compare every recorded file and eKuiper's store with the registry")
    command("repair", cmd_repair, "reinstall each damaged plugin from its recorded URL and sha256")
    sub = command("backup", cmd_backup, "save one consistent tar.gz of the registry, eKuiper's store and the files")
    sub.add_argument("output", metavar="FILE", help="where to save the tar.gz")
    sub = command("restore", cmd_restore, "offline: restore a backup into this machine's KUIPER_HOME, then verify")
    sub.add_argument("archive", metavar="FILE", help="a tar.gz saved by backup")

    sub = command("upload", cmd_upload, "upload a local file to the server's uploads folder; print where it went")
    sub.add_argument("local_file", metavar="LOCAL_FILE")

    sub = command("export", cmd_export, "print the plugin set: every installed plugin, its package and functions")
    sub.add_argument("-o", "--output", metavar="FILE", help="save it to FILE instead")
    sub.add_argument("--format", choices=EXPORT_FORMATS, default="yaml",
                     help="yaml (default; json with --json), json, or ekuiper: the plugin part of eKuiper's export,"
                          " function lists added")
    sub = command("apply", cmd_apply, "make the server's plugins what a plugin set says, all or nothing")
    sub.add_argument("-f", "--file", required=True, metavar="FILE",
                     help="the plugin set (YAML or JSON, as export writes it) or eKuiper's export; - for stdin")
    sub.add_argument("--prune", action="store_true", help="also remove the installed plugins FILE does not name")
    sub.add_argument("--dry-run", action="store_true", help="show what would change, and change nothing")

    sub = command("audit", cmd_audit, "show the audit trail: who changed which plugin, newest first")
    sub.add_argument("--limit", type=int, default=20, metavar="N", help="most rows shown (1 to 1000; default 20)")
    sub.add_argument("--since", metavar="TIME",
                     help="only rows at or after this RFC 3339 time, e.g. 2024-05-01T00:00:00Z")
    return parser


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
    """Run one command; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        base_url = _server_url(args)
        token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
        with requests.Session() as session:
            args.handler(Client(base_url, token, session), args)
    except Failure as failure:
        print(f"error: {failure.message}", file=sys.stderr)
        return failure.exit_status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
