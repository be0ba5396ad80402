"""How soon a running eKuiper engine accepts a rule using a plugin, after the 2xx that installed or registered it.

For each operation (a native function plugin's install, a portable plugin's install, a function list's
register) the clock starts when the 2xx has been received, and stops at the first `POST /rules` using the
plugin that the engine accepts (201), asked every POLL_INTERVAL seconds for at most ACCEPT_TIMEOUT seconds.
Run it once against eKuiper's own API (the engine alone) and once against the front (nginx: the plugin API to
kuiper-plugins, the rules to the engine) on the same machine: the difference is what the service adds.

Both the native package and the portable plugin are installed by file:// URLs from the engine's data/uploads
folder, which every engine and the service accept. Each repetition ends by deleting its rule and the plugin
through the same base URL, so that the next one starts from an engine without it.

usage: engine_live.py --url BASE --uploads DIR --multi-zip ZIP --portable-dir DIR [--reps 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import stat
import statistics
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

POLL_INTERVAL = 0.02
ACCEPT_TIMEOUT = 30.0
REQUEST_TIMEOUT = 700.0  # an install may take the service's download and install.sh limits
FUNCTIONS = ("twice", "shout")  # the native test plugin's functions (tests/go/kuiperd/multi)


@dataclass
class Sample:
    """One repetition: the operation's own answer and how long after it the engine took a rule."""

    operation: str
    repetition: int
    status: int
    request_seconds: float
    accepted_after: float | None  # None: not accepted within ACCEPT_TIMEOUT
    attempts: int = 0  # rule creations asked; 1: the engine took the first one
    refusal: str = ""


class Engine:
    """eKuiper's REST API at `base` (the engine itself, or the front that routes the plugin API elsewhere)."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def call(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        return requests.request(method, f"{self.base}{path}", json=body, timeout=REQUEST_TIMEOUT)

    def rule(self, rule_id: str, sql: str) -> requests.Response:
        return self.call("POST", "/rules", {"id": rule_id, "sql": sql, "actions": [{"log": {}}]})

    def drop_rule(self, rule_id: str) -> None:
        self.call("DELETE", f"/rules/{rule_id}")

    def stream(self, sql: str) -> None:
        """Create the stream unless it exists (stream creation does not check the source type)."""
        answer = self.call("POST", "/streams", {"sql": sql})
        if answer.status_code not in (201, 400):
            raise SystemExit(f"creating a stream: {answer.status_code} {answer.text}")

    def first_accepted(self, rule_id: str, sql: str, since: float) -> tuple[float | None, int, str]:
        """Seconds from `since` to the first 201 for the rule (bounded), the attempts, the last refusal's text."""
        deadline = since + ACCEPT_TIMEOUT
        attempts = 0
        while True:
            answer = self.rule(rule_id, sql)
            attempts += 1
            if answer.status_code == 201:
                accepted = time.monotonic() - since
                self.drop_rule(rule_id)
                return accepted, attempts, ""
            if time.monotonic() >= deadline:
                return None, attempts, f"{answer.status_code} {answer.text.strip()}"
            time.sleep(POLL_INTERVAL)  # asking again, bounded by ACCEPT_TIMEOUT

    def timed(self, method: str, path: str, body: dict) -> tuple[requests.Response, float, float]:
        """The answer, when it was received (monotonic) and how long the request took."""
        started = time.monotonic()
        answer = self.call(method, path, body)
        received = time.monotonic()
        return answer, received, received - started


def must(answer: requests.Response, what: str) -> None:
    if not 200 <= answer.status_code < 300:
        raise SystemExit(f"{what}: {answer.status_code} {answer.text.strip()}")


def refused(engine: Engine, rule_id: str, sql: str, what: str) -> None:
    """Check the engine refuses the rule now (the plugin is not there yet)."""
    answer = engine.rule(rule_id, sql)
    if answer.status_code == 201:
        engine.drop_rule(rule_id)
        raise SystemExit(f"{what}: the engine took the rule before the operation ({sql})")


def zip_portable(folder: Path, target: Path) -> None:
    """Zip a portable plugin's folder as eKuiper expects it, file modes kept."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(str(path.relative_to(folder)))
                info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())


def native_install(engine: Engine, package: str, repetition: int) -> Sample:
    """Install the native function plugin; time the first rule using one of its functions."""
    sql = "SELECT twice(a) FROM bench_demo"
    refused(engine, "bench_pre", sql, "native install")
    answer, received, took = engine.timed("POST", "/plugins/functions",
                                          {"name": "multi", "file": package, "functions": list(FUNCTIONS)})
    must(answer, "native install")
    accepted, attempts, refusal = engine.first_accepted(f"bench_native_{repetition}", sql, received)
    must(engine.call("DELETE", "/plugins/functions/multi"), "native delete")
    return Sample("native install", repetition, answer.status_code, took, accepted, attempts, refusal)


def register(engine: Engine, package: str, repetition: int) -> Sample:
    """Install the plugin with one function, register both; time the first rule using the newly registered one."""
    must(engine.call("POST", "/plugins/functions", {"name": "multi", "file": package, "functions": ["twice"]}),
         "native install before register")
    # the install must have reached the engine before the register is timed (bounded)
    ready, _, refusal = engine.first_accepted(f"bench_ready_{repetition}", "SELECT twice(a) FROM bench_demo",
                                           time.monotonic())
    if ready is None:
        must(engine.call("DELETE", "/plugins/functions/multi"), "native delete")
        return Sample("register", repetition, 0, 0.0, None, 0, f"install before register not live: {refusal}")
    sql = "SELECT shout(s) FROM bench_demo"
    refused(engine, "bench_pre", sql, "register")
    answer, received, took = engine.timed("POST", "/plugins/functions/multi/register",
                                          {"functions": list(FUNCTIONS)})
    must(answer, "register")
    accepted, attempts, refusal = engine.first_accepted(f"bench_register_{repetition}", sql, received)
    must(engine.call("DELETE", "/plugins/functions/multi"), "native delete")
    return Sample("register", repetition, answer.status_code, took, accepted, attempts, refusal)


def portable_install(engine: Engine, package: str, repetition: int) -> Sample:
    """Install the portable plugin; time the first rule reading its source."""
    sql = "SELECT greeting FROM bench_greetings"
    refused(engine, "bench_pre", sql, "portable install")
    answer, received, took = engine.timed("POST", "/plugins/portables", {"name": "pygreet", "file": package})
    must(answer, "portable install")
    accepted, attempts, refusal = engine.first_accepted(f"bench_portable_{repetition}", sql, received)
    must(engine.call("DELETE", "/plugins/portables/pygreet"), "portable delete")
    return Sample("portable install", repetition, answer.status_code, took, accepted, attempts, refusal)


def summary(samples: list[Sample]) -> list[str]:
    """One line per operation: median and max of the seconds to the accepted rule, and of the request."""
    lines = []
    for operation in dict.fromkeys(sample.operation for sample in samples):
        mine = [sample for sample in samples if sample.operation == operation]
        accepted = [sample.accepted_after for sample in mine if sample.accepted_after is not None]
        requests_took = [sample.request_seconds for sample in mine]
        missing = len(mine) - len(accepted)
        first_try = sum(1 for sample in mine if sample.attempts == 1)
        times = (f"median {statistics.median(accepted):.3f} s, max {max(accepted):.3f} s" if accepted else "-")
        lines.append(
            f"{operation:17} 2xx->rule accepted: {times}; not accepted within {ACCEPT_TIMEOUT:.0f} s: "
            f"{missing}/{len(mine)}; at the first attempt: {first_try}/{len(mine)}; "
            f"the request itself: median {statistics.median(requests_took):.3f} s, "
            f"max {max(requests_took):.3f} s"
        )
    return lines


def main() -> None:
    """Measure each operation `--reps` times against `--url`, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="eKuiper's REST base: the engine, or the front")
    parser.add_argument("--uploads", required=True, type=Path, help="the engine's data/uploads folder")
    parser.add_argument("--multi-zip", required=True, type=Path, help="the native function plugin's package")
    parser.add_argument("--portable-dir", required=True, type=Path, help="the portable plugin's folder (pygreet)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engine = Engine(args.url)
    native = args.uploads / "bench-multi.zip"
    native.write_bytes(args.multi_zip.read_bytes())
    portable = args.uploads / "bench-pygreet.zip"
    zip_portable(args.portable_dir, portable)
    engine.stream('CREATE STREAM bench_demo () WITH (TYPE="httppush", DATASOURCE="/bench", FORMAT="json")')
    engine.stream('CREATE STREAM bench_greetings () WITH (TYPE="greeting", FORMAT="json")')

    samples: list[Sample] = []
    for operation, package in ((native_install, native), (portable_install, portable), (register, native)):
        for repetition in range(1, args.reps + 1):
            sample = operation(engine, f"file://{package}", repetition)
            samples.append(sample)
            shown = "not accepted" if sample.accepted_after is None else f"{sample.accepted_after:.3f} s"
            print(f"{args.label} {sample.operation} #{repetition}: {sample.status} in {sample.request_seconds:.3f} s,"
                  f" rule accepted after {shown} ({sample.attempts} attempts) {sample.refusal[:160]}", flush=True)
    print(f"\n{args.label} ({args.url}, {args.reps} repetitions)")
    for line in summary(samples):
        print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps([asdict(sample) for sample in samples], indent=1))


if __name__ == "__main__":
    main()
