"""One function per command: each sends its request(s) through the Client and prints the answer."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import requests
import yaml

from kuiper_plugins.cli import progress
from kuiper_plugins.cli.client import (
    CHUNK_SIZE,
    CONNECT_TIMEOUT,
    EXIT_REFUSED,
    EXIT_USAGE,
    READ_TIMEOUT,
    Client,
    Failure,
    asks_on_terminal,
    network_reason,
    on_terminal,
    readable_file,
    refusal_message,
    upload,
)
from kuiper_plugins.cli.output import (
    NO_PLUGIN,
    NO_UDF,
    PLUGIN_SECTIONS,
    TYPE_WORDS,
    as_json,
    audit_table,
    changes_table,
    functions_table,
    history_table,
    key_values,
    message,
    names,
    plan_table,
    plugins_table,
    portable_table,
    prebuild_table,
    problems_table,
    show,
    status_text,
    uploads_table,
)


def _segment(name: str) -> str:
    return quote(name, safe="")


def _install_body(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """The create/update body; with --zip, upload the file first and install it from where it was saved."""
    if args.function and args.type != "functions":
        raise Failure("--function applies to function plugins only", EXIT_USAGE)
    sha256 = args.sha256
    if args.zip is not None:
        local = readable_file(args.zip)
        if not local.name.endswith(".zip"):
            raise Failure(f"--zip expects a file whose name ends in .zip, got {args.zip}", EXIT_USAGE)
        saved, digest = _upload_checked(client, args, local)
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


def _upload_checked(client: Client, args: argparse.Namespace, local: Path) -> tuple[str, str]:
    """Upload a --zip once nothing known refuses it: its package rules, the plugin an update replaces, and
    an upload of that name already on the server (asked about on a terminal, else --force)."""
    from kuiper_plugins.cli import package_check  # the package rules: read only when a --zip is given

    action = "update" if args.command == "update" else "create"
    package_check.check_id(args.name)
    if action == "update" and args.type != "portables":  # a portable update of a new name creates it, as eKuiper
        _refuse_update_of_missing(client, args, local)
    package_check.check_zip(args.type, args.name, local, action, shell_paras=args.shell_para,
                            functions=args.function)
    _confirm_replacing(client, args, local)
    saved, digest = upload(client, local)
    args.uploaded = saved  # for _upload_removed_if_refused
    return saved, digest


def _refuse_update_of_missing(client: Client, args: argparse.Namespace, local: Path) -> None:
    """Refuse, in the words the update would get, to upload a package for a native plugin that is not there."""
    try:
        client.call("GET", f"/plugins/{args.type}/{_segment(args.name)}")
    except Failure as failure:
        if failure.status != 404:
            raise
        raise Failure(
            f"update {args.type} plugin {args.name} error, cannot delete old version: invalid name {args.name}:"
            f" not exist (checked before uploading {local.name}: nothing was sent; `kuiper-plugins create`"
            " installs a new plugin)", EXIT_REFUSED, failure.answer, failure.status,
        ) from None


def _confirm_replacing(client: Client, args: argparse.Namespace, local: Path) -> None:
    """Ask before an upload replaces one of the same name (a plugin installed from it is repaired from it)."""
    listed = client.call("GET", "/config/uploads")
    existing = next((path for path in listed if isinstance(path, str) and PurePosixPath(path).name == local.name),
                    None) if isinstance(listed, list) else None
    if existing is None or args.force:
        return
    if not asks_on_terminal():
        raise Failure(f"an upload named {local.name} is on the server already ({existing}): give --force to"
                      " replace it (nothing was uploaded)", EXIT_USAGE)
    sys.stderr.write(f"{existing} is on the server already, and a plugin installed from it is repaired from it:"
                     " replace it? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise Failure(f"{existing} is left as it was (nothing was uploaded)", EXIT_REFUSED)


def _upload_removed_if_refused(command: Callable[[Client, argparse.Namespace], None]) -> Callable:
    """Wrap create and update: when the server refuses the install, remove the upload --zip made for it.

    Only a refusal counts: after a timeout or a lost connection the server may still be reading the file.
    """

    @functools.wraps(command)
    def run(client: Client, args: argparse.Namespace) -> None:
        try:
            command(client, args)
        except Failure as failure:
            saved = getattr(args, "uploaded", None)
            if saved is not None and failure.status is not None:
                failure.message += _remove_upload(client, PurePosixPath(saved).name)
            raise

    return run


def _remove_upload(client: Client, name: str) -> str:
    """Remove an upload this command made; return what to add to the refusal's message."""
    try:
        client.call("DELETE", f"/config/uploads/{_segment(name)}")
    except Failure as failure:
        return f" (the upload {name} made for this install could not be removed: {failure.message})"
    return f" (the upload {name} made for this install is removed)"


def _dry_run(args: argparse.Namespace) -> dict[str, str] | None:
    return {"dryRun": "1"} if args.dry_run else None


def _watched_call(client: Client, args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """Send a write under the CLI's own X-Request-Id; on a terminal, draw the server's phases while it runs."""
    request_id = progress.new_request_id()
    stream = sys.stderr if on_terminal() and not args.json else None
    asking = {key: value for key, value in client.session.headers.items() if key in ("User-Agent", "Authorization")}
    with progress.watched(client.base_url, asking, request_id, stream, READ_TIMEOUT):
        return client.call(method, path, headers={progress.REQUEST_ID_HEADER: request_id}, **kwargs)


@_upload_removed_if_refused
def cmd_create(client: Client, args: argparse.Namespace) -> None:
    body = _install_body(client, args)
    answer = _watched_call(client, args, "POST", f"/plugins/{args.type}", json=body, params=_dry_run(args))
    show(args, answer, plan_table if args.dry_run else message)


@_upload_removed_if_refused
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
    """One type's names as eKuiper lists them; without a type, or with -o, every plugin's row with its version."""
    if args.output == "name":
        print(_plugin_names(client, args.type), end="")
        return
    if args.type is not None and args.output is None:
        render = portable_table if args.type == "portables" else names(NO_PLUGIN)
        show(args, client.call("GET", f"/plugins/{args.type}"), render)
        return
    rows = _plugin_rows(client, args.type, with_functions=args.output is not None or args.json)
    _show_rows(args, rows, lambda shown: plugins_table(shown, wide=args.output == "wide"))


def _plugin_names(client: Client, plugin_type: str | None) -> str:
    """Names one per line, for scripts and completion: a type's, or every plugin's as `type/name`."""
    if plugin_type is None:
        return "".join(f"{row['type']}/{row['name']}\n" for row in _plugin_rows(client, None, with_functions=False))
    answer = client.call("GET", f"/plugins/{plugin_type}")
    listed = [item.get("name") if isinstance(item, dict) else item for item in answer]
    return "".join(f"{name}\n" for name in listed if isinstance(name, str))


def _plugin_rows(client: Client, plugin_type: str | None, *, with_functions: bool) -> list[dict[str, Any]]:
    """Every installed plugin (of one type) from the plugin set, in type then name order, with its version."""
    document = client.call("GET", "/config/plugins")
    if not isinstance(document, dict):
        raise Failure(f"the server's plugin set is not a mapping (answer: {str(document)[:200]!r})", EXIT_REFUSED)
    portable_functions = {}
    if with_functions and document.get("portables") and plugin_type in (None, "portables"):
        # The plugin set lists a function plugin's functions; a portable's are in its descriptor.
        portable_functions = {item.get("name"): item.get("functions") for item in
                              client.call("GET", "/plugins/portables") if isinstance(item, dict)}
    rows = []
    for section in PLUGIN_SECTIONS:
        if plugin_type not in (None, section):
            continue
        for name, entry in sorted((document.get(section) or {}).items()):
            entry = entry if isinstance(entry, dict) else {}
            row = {"type": TYPE_WORDS[section], "name": name, "version": entry.get("version")}
            if with_functions and section in ("functions", "portables"):
                row["functions"] = entry.get("functions") if section == "functions" else portable_functions.get(name)
            if with_functions:
                row.update(sha256=entry.get("sha256"), file=entry.get("file"))
            rows.append(row)
    return rows


def _show_rows(args: argparse.Namespace, rows: list[dict[str, Any]], human: Callable[[list], str]) -> None:
    """Rows as -o asks: JSON (also for --json alone), YAML, or for people."""
    if args.output == "json" or (args.json and args.output is None):
        print(as_json(rows))
    elif args.output == "yaml":
        sys.stdout.write(yaml.safe_dump(rows, sort_keys=False, allow_unicode=True) if rows else "[]\n")
    else:
        print(human(rows))


def cmd_register(client: Client, args: argparse.Namespace) -> None:
    path = f"/plugins/functions/{_segment(args.name)}/register"
    show(args, client.call("POST", path, json={"functions": args.functions}), message)


def cmd_udfs(client: Client, args: argparse.Namespace) -> None:
    """Every function rules can call, with the plugin that owns it; --json: the server's list of names."""
    answer = client.call("GET", "/plugins/udfs")
    if args.output == "name" or (args.json and args.output is None) or not isinstance(answer, list) or not answer:
        show(args, answer, names(NO_UDF))
        return
    _show_rows(args, _function_rows(client, answer), functions_table)


def _function_rows(client: Client, functions: list[Any]) -> list[dict[str, Any]]:
    """Each function with its owner: from the function plugins' and portables' lists, else asked one by one."""
    owners: dict[str, tuple[str, str]] = {}
    for row in _plugin_rows(client, None, with_functions=True):
        for function in row.get("functions") or []:
            owners[function] = (row["name"], row["type"])
    rows = []
    for function in functions:
        if function not in owners:  # installed between the two answers, or named by eKuiper only
            owner = client.call("GET", f"/plugins/udfs/{_segment(str(function))}")
            owners[function] = (owner.get("plugin") if isinstance(owner, dict) else None, None)
        plugin, kind = owners[function]
        rows.append({"name": function, "plugin": plugin, "type": kind})
    return rows


def cmd_udf(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/udfs/{_segment(args.name)}"), key_values)


def cmd_prebuild(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", f"/plugins/{args.type}/prebuild"), prebuild_table)


def cmd_upload(client: Client, args: argparse.Namespace) -> None:
    saved, _ = upload(client, readable_file(args.local_file))
    show(args, saved, message)


def cmd_uploads(client: Client, args: argparse.Namespace) -> None:
    """The files in the server's uploads folder; `rm` removes some."""
    if getattr(args, "remove", None) is not None:
        _remove_uploads(client, args)
        return
    answer = client.call("GET", "/config/uploads")
    if args.output == "name":
        listed = [PurePosixPath(path).name for path in answer if isinstance(path, str)]
        print("".join(f"{name}\n" for name in listed), end="")
        return
    show(args, answer, uploads_table)


def _remove_uploads(client: Client, args: argparse.Namespace) -> None:
    removed = []
    try:
        for name in args.remove:
            client.call("DELETE", f"/config/uploads/{quote(name, safe='/')}")
            removed.append(name)
            if not args.json:
                print(f"upload {name} is removed")
    finally:
        if args.json:
            print(as_json({"removed": removed}))


def cmd_status(client: Client, args: argparse.Namespace) -> None:
    show(args, client.call("GET", "/"), lambda answer: status_text(answer, client.base_url))


def cmd_token(client: Client | None, args: argparse.Namespace) -> None:
    """Print a token signed with a private key; nothing is sent anywhere."""
    from kuiper_plugins.cli import tokens  # PyJWT and cryptography: only this command needs them

    token, claims = tokens.mint(Path(args.key).expanduser(), issuer=args.issuer, subject=args.subject,
                                lifetime=args.lifetime)
    show(args, {"token": token, "claims": claims}, lambda answer: answer["token"])


def cmd_audit(client: Client, args: argparse.Namespace) -> None:
    params = {"limit": str(args.limit)}
    if args.since:
        params["since"] = args.since
    show(args, client.call("GET", "/audit", params=params), audit_table)


def _fail_unless_ok(answer: Any) -> None:
    if isinstance(answer, dict) and answer.get("ok") is False:
        raise Failure(f"{len(answer.get('problems') or [])} problem(s) remain", EXIT_REFUSED)


# ------------------------------------------------------------------ the plugin set

EXPORT_FORMATS = ("yaml", "json", "ekuiper")
YAML_SUFFIXES = (".yaml", ".yml")


def cmd_export(client: Client, args: argparse.Namespace) -> None:
    """Print the plugin set, or save it with -o (written aside and renamed once whole)."""
    chosen = "json" if args.json and args.format == "yaml" else args.format
    if chosen == "yaml":
        text = client.call("GET", "/config/plugins", headers={"Accept": "application/yaml"})
        if not isinstance(text, str):  # a server that answered JSON all the same: the same document, as YAML
            text = yaml.safe_dump(text, sort_keys=False, allow_unicode=True)
    else:
        params = {"format": "ekuiper"} if chosen == "ekuiper" else None
        text = as_json(client.call("GET", "/config/plugins", params=params)) + "\n"
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
                print(as_json(refusal))
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
                raise Failure(refusal_message(response), EXIT_REFUSED, status=response.status_code)
            with open(partial, "wb") as out:
                for chunk in response.iter_content(CHUNK_SIZE):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise Failure(f"cannot reach kuiper-plugins at {client.base_url}: {network_reason(exc)}", EXIT_USAGE)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise Failure(f"cannot write {target}: {exc.strerror or exc}", EXIT_USAGE)
    os.replace(partial, target)
    show(args, str(target), message)


def cmd_restore(client: Client, args: argparse.Namespace) -> None:
    """Restore a backup into this machine's home, offline; then verify it."""
    from kuiper_plugins.lifecycle import backup  # the server's code: only this command needs it
    from kuiper_plugins.settings import SettingsError, load_settings

    archive = readable_file(args.archive)
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
