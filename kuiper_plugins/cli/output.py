"""What the CLI prints for people: tables, key/value rows and messages; --json prints the server's JSON."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Any

NO_PLUGIN = "No plugin is found."
NO_UDF = "No udf is found."
NO_UPLOAD = "No upload is found."
PLUGIN_SECTIONS = ("sources", "sinks", "functions", "portables")  # the plugin set's keys, in the order shown
TYPE_WORDS = {"sources": "source", "sinks": "sink", "functions": "function", "portables": "portable"}


def cell(value: Any) -> str:
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
        return as_json(answer)
    first = [key for key in ("name", "version") if key in answer]
    keys = first + [key for key in answer if key not in first]
    return table([(key, cell(answer[key])) for key in keys])


def names(empty: str) -> Callable[[Any], str]:
    """Render a JSON array of names one per line, or `empty` when there are none."""

    def render(answer: Any) -> str:
        if not isinstance(answer, list):
            return as_json(answer)
        return "\n".join(str(name) for name in answer) if answer else empty

    return render


def portable_table(answer: Any) -> str:
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        return as_json(answer)
    if not answer:
        return NO_PLUGIN
    rows = [(cell(p.get("name")), cell(p.get("version")), cell(p.get("language"))) for p in answer]
    return table(rows, header=("NAME", "VERSION", "LANGUAGE"))


def prebuild_table(answer: Any) -> str:
    if not isinstance(answer, dict):
        return as_json(answer)
    if not answer:
        return NO_PLUGIN
    return table([(name, cell(url)) for name, url in answer.items()], header=("NAME", "URL"))


def actor_text(actor: Any) -> str:
    """An audit row's actor in a few words: the token's issuer/subject, the local user, the address."""
    if not isinstance(actor, dict):
        return cell(actor)
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
        return as_json(answer)
    if not answer:
        return "No audit row is found."
    rows = []
    for row in answer:
        target = f"{row.get('type') or '-'}/{row.get('name') or '-'}" if row.get("name") else cell(row.get("path"))
        versions = f"{row.get('versionBefore') or '-'} -> {row.get('versionAfter') or '-'}"
        rows.append((cell(row.get("time")), cell(row.get("operation")), target, versions,
                     f"{cell(row.get('outcome'))} {cell(row.get('status'))}", actor_text(row.get("actor")),
                     cell(row.get("requestId"))))
    return table(rows, header=("TIME", "OPERATION", "PLUGIN", "VERSIONS", "OUTCOME", "ACTOR", "REQUEST ID"))


def plan_table(answer: Any) -> str:
    """A dry run's plan: what it is, then each file written or removed, then the head of install.sh."""
    if not isinstance(answer, dict) or "writes" not in answer:
        return as_json(answer)
    source = answer.get("source") or {}
    script = answer.get("installScript")
    summary = [
        ("plan", f"{answer.get('kind')} {answer.get('type')} plugin {answer.get('name')} (dry run: nothing written)"),
        ("version", cell(answer.get("version"))),
        ("source", cell(source.get("url"))),
        ("size", cell(source.get("size"))),
        ("sha256", cell(source.get("sha256"))),
        ("functions", cell(answer.get("functions"))),
        ("clashes", cell([f"{c['function']} ({c['plugin']})" for c in answer.get("functionClashes") or []])),
        ("install.sh", "runs, sha256 " + cell(script.get("sha256")) if script else "none"),
        ("restart needed", "yes" if answer.get("restartNeeded") else "no"),
    ]
    if answer.get("compatibility") is not None:
        summary.append(("compatibility", cell(answer["compatibility"])))
    files = [("write", f["path"], cell(f.get("size")), cell(f.get("sha256"))) for f in answer["writes"]]
    files += [("remove", path, "-", "-") for path in answer.get("removes") or []]
    parts = [table(summary), ""]
    parts.append(table(files, header=("ACTION", "PATH", "SIZE", "SHA256")) if files else "no file written or removed")
    if script and script.get("head"):
        parts += ["", "install.sh, first lines:"] + [f"  {line}" for line in script["head"]]
    return "\n".join(parts)


def message(answer: Any) -> str:
    return answer if isinstance(answer, str) else as_json(answer)


def as_json(answer: Any) -> str:
    return json.dumps(answer, indent=2, ensure_ascii=False)


def show(args: argparse.Namespace, answer: Any, human: Callable[[Any], str]) -> None:
    """Print an answer for people, or with --json for scripts (a text answer as {"message": text})."""
    if args.json:
        print(as_json({"message": answer} if isinstance(answer, str) else answer))
    else:
        print(human(answer))


def history_table(answer: Any) -> str:
    """A plugin's history, newest first: when (UTC), operation, version, outcome, sha256 and URL."""
    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"])), entry["operation"], entry["version"],
             entry["outcome"], cell(entry["sha256"]), cell(entry["url"])] for entry in answer]
    return table(rows, ["WHEN (UTC)", "OPERATION", "VERSION", "OUTCOME", "SHA256", "URL"])


def problems_table(answer: Any) -> str:
    """Verify's and repair's problems as a table, one row per plugin and path."""
    if not isinstance(answer, dict) or not isinstance(answer.get("problems"), list):
        return as_json(answer)
    lines = []
    for key, label in (("repaired", "repaired"), ("notRepaired", "not repaired")):
        for item in answer.get(key) or []:
            lines.append(f"{label}: {cell(item.get('type'))} {cell(item.get('name'))}"
                         f" ({cell(item.get('reason') or item.get('file'))})")
    if answer["problems"]:
        rows = [(cell(p.get("type")), cell(p.get("name")), cell(p.get("path")), cell(p.get("problem")),
                 cell(p.get("detail"))) for p in answer["problems"]]
        lines.append(table(rows, header=("TYPE", "NAME", "PATH", "PROBLEM", "DETAIL")))
    else:
        lines.append("ok: every recorded file and eKuiper's store agree with the registry")
    return "\n".join(lines)


def _side(change: dict[str, Any], key: str) -> str:
    """One side of a change in a few words: the function list of a register, else version and digest."""
    state = change.get(key)
    if not isinstance(state, dict):
        return "-"
    if change.get("action") == "register":
        return cell(state.get("functions"))
    digest = state.get("sha256")
    return cell(state.get("version")) + (f" ({digest[:12]})" if isinstance(digest, str) else "")


def changes_table(answer: Any) -> str:
    """What an apply changed (or with --dry-run would change), one row per plugin, in the order it was done."""
    if not isinstance(answer, dict) or not isinstance(answer.get("changes"), list):
        return as_json(answer)
    dry_run = bool(answer.get("dryRun"))
    if not answer["changes"]:
        return "no change: the plugins are as the document says" + (" (dry run)" if dry_run else "")
    rows = [(cell(c.get("action")), cell(c.get("type")), cell(c.get("name")), _side(c, "from"), _side(c, "to"),
             cell(c.get("reason"))) for c in answer["changes"]]
    count = len(rows)
    done = f"{count} change{'s' if count != 1 else ''}"
    footer = f"dry run: {done} planned, nothing was changed" if dry_run else f"{done} made"
    return table(rows, header=("ACTION", "TYPE", "NAME", "FROM", "TO", "REASON")) + "\n" + footer


# ------------------------------------------------------------------ listings across types


def plugins_table(rows: Sequence[dict[str, Any]], *, wide: bool = False) -> str:
    """Every plugin of every type, one row each; wide adds its functions, sha256 and package URL."""
    if not rows:
        return NO_PLUGIN
    header = ["TYPE", "NAME", "VERSION"] + (["FUNCTIONS", "SHA256", "FILE"] if wide else [])
    lines = []
    for row in rows:
        line = [row["type"], row["name"], cell(row.get("version"))]
        if wide:
            line += [cell(row.get("functions")), cell(row.get("sha256")), cell(row.get("file"))]
        lines.append(line)
    return table(lines, header=header)


def functions_table(rows: Sequence[dict[str, Any]]) -> str:
    """Every function rules can call, with the plugin that owns it and that plugin's type."""
    if not rows:
        return NO_UDF
    return table([(str(r["name"]), cell(r.get("plugin")), cell(r.get("type"))) for r in rows],
                 header=("FUNCTION", "PLUGIN", "TYPE"))


def uploads_table(answer: Any) -> str:
    """The uploads folder's entries: the name `uploads rm` takes, and the path a file:// URL names."""
    if not isinstance(answer, list) or not all(isinstance(path, str) for path in answer):
        return as_json(answer)
    if not answer:
        return NO_UPLOAD
    return table([(PurePosixPath(path).name, path) for path in answer], header=("NAME", "PATH"))


def status_text(answer: Any, url: str) -> str:
    """GET / in words: the service, the engine it serves, the registry's counts and what needs a look."""
    if not isinstance(answer, dict):
        return as_json(answer)
    if "serviceVersion" not in answer:  # eKuiper's own GET /, as a front that sends / to the engine answers it
        return (f"eKuiper {answer.get('version')} on {answer.get('os')}/{answer.get('arch')} at {url}, up"
                f" {_duration(answer.get('upTimeSeconds'))} (this is the engine's own answer: kuiper-plugins says"
                " how it is on its own port, basic.restPort, 9091 beside an engine)")
    registry = answer.get("registry") if isinstance(answer.get("registry"), dict) else {}
    plugins = registry.get("plugins") if isinstance(registry.get("plugins"), dict) else {}
    platform = f"{answer.get('os')}/{answer.get('arch')}"
    engine = answer.get("engine")
    lines = [f"kuiper-plugins {answer.get('serviceVersion')} at {url}, up {_duration(answer.get('upTimeSeconds'))}"]
    if isinstance(engine, dict):
        lines.append(f"engine: eKuiper {answer.get('version')} on {platform}")
    else:
        lines.append(f"engine: none attached; plugins are for eKuiper {answer.get('version')} (basic.kuiperVersion)"
                     f" on {platform}")
    counts = [_counted(plugins.get(section), TYPE_WORDS[section] + (" plugin" if section == "functions" else ""))
              for section in PLUGIN_SECTIONS]
    lines.append(f"plugins: {', '.join(counts)}; {_counted(registry.get('functions'), 'function')}")
    in_flight = registry.get("operationsInFlight")
    lines.append(f"in flight: {_counted(in_flight, 'operation') if in_flight else 'nothing'}")
    damaged = registry.get("damaged")
    lines.append(f"damaged: {_counted(damaged, 'plugin')} (`kuiper-plugins verify` says what is missing,"
                 " `kuiper-plugins repair` reinstalls)" if damaged else "damaged: none")
    if isinstance(engine, dict) and "pendingRestart" in engine:
        pending = engine["pendingRestart"]
        lines.append("pending the engine's restart: " + (
            "unknown (the engine has not said when it started)" if pending is None
            else "nothing" if pending == 0 else f"{_counted(pending, 'change')} (GET /engine/pending)"))
    return "\n".join(lines)


def _counted(count: Any, word: str) -> str:
    if not isinstance(count, int):
        return f"? {word}s"
    return f"{count} {word}" + ("" if count == 1 else "s")


def _duration(seconds: Any) -> str:
    """An uptime in the two largest units that matter: `3 d 4 h`, `2 h 5 min`, `42 s`."""
    if not isinstance(seconds, int) or seconds < 0:
        return "?"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{value} {unit}" for value, unit in parts[:2] if value or unit == parts[0][1])
