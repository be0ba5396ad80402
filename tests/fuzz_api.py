"""Fuzz the API from its own OpenAPI document with schemathesis: `make fuzz`.

The app runs in this process (schemathesis calls the WSGI app directly) on a fresh temporary
KUIPER_HOME with the service's default guards: no private network allow-list, file:// jailed to
data/uploads. Every operation of /openapi.json is driven with schema-valid (positive) and
schema-violating (negative) requests; each answer is checked for: no 5xx, a status the document
lists, the documented content type, headers and body schema, and that negative data is refused.

Nothing leaves the machine: generated package URLs pass through the real SSRF guard, and under it
this harness refuses every DNS query (only IP literals and localhost resolve) and every connection
to an address outside the loopback range, counting both. Exit status 0 only with at least
`--min-requests` requests sent and zero failures.

    .venv/bin/python tests/fuzz_api.py [--examples N] [--seed S] [--min-requests N]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import hypothesis  # noqa: E402
import schemathesis  # noqa: E402
from conftest import LoopbackPeer  # noqa: E402
from hypothesis import HealthCheck, Phase, given  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NotSet  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from kuiper_plugins import create_app  # noqa: E402
from kuiper_plugins.settings import Settings  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


# ---------------------------------------------------------------------------- nothing leaves the machine

class NetworkGuard:
    """Refuse DNS queries and non-loopback connections made by anything in this process; count them."""

    def __init__(self) -> None:
        self.refused_lookups = 0
        self.refused_connections = 0
        self._getaddrinfo = socket.getaddrinfo
        self._connect = socket.socket.connect
        self._connect_ex = socket.socket.connect_ex

    def install(self) -> None:
        guard = self

        def getaddrinfo(host, *args, **kwargs):
            text = host.decode() if isinstance(host, bytes) else str(host)
            if not (guard._is_literal(text) or text.lower() == "localhost"):
                guard.refused_lookups += 1
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (fuzz harness: no DNS)")
            return guard._getaddrinfo(host, *args, **kwargs)

        def connect(sock, address):
            guard._check(sock, address)
            return guard._connect(sock, address)

        def connect_ex(sock, address):
            guard._check(sock, address)
            return guard._connect_ex(sock, address)

        socket.getaddrinfo = getaddrinfo
        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex

    @staticmethod
    def _is_literal(text: str) -> bool:
        try:
            ipaddress.ip_address(text.split("%", 1)[0])
            return True
        except ValueError:
            pass
        try:
            socket.inet_aton(text)  # 127.1, 2130706433, 0x7f000001 ... are numeric to the resolver too
            return True
        except OSError:
            return False

    def _check(self, sock, address) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = address[0]
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ip = None
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip is None or not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
            self.refused_connections += 1
            raise OSError(101, f"Network is unreachable (fuzz harness: {host} is not loopback)")


# ---------------------------------------------------------------------------- the app, counted

class Counted:
    """WSGI middleware counting every answer by status (the schema download counted apart)."""

    def __init__(self, app) -> None:
        self.app = app
        self.statuses: collections.Counter[int] = collections.Counter()
        self.schema_fetches = 0
        self.last_status = 0

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/openapi.json" and environ.get("HTTP_X_FUZZ_SCHEMA") == "1":
            self.schema_fetches += 1
            return self.app(environ, start_response)

        def counting_start_response(status, headers, exc_info=None):
            self.last_status = int(status.split(" ", 1)[0])
            self.statuses[self.last_status] += 1
            return start_response(status, headers, exc_info)

        return self.app(environ, counting_start_response)


def build_app(home: Path, peer: LoopbackPeer):
    """The app, its every request (schemathesis' and the seeding test client's) from `peer`'s connection.

    schemathesis' WSGI client leaves REMOTE_ADDR out and the test client has no socket; a real server
    would name the client's end of a real connection, so the service can ask the kernel who holds it.
    """
    settings = Settings(home=home, private_net_allow_list=(), download_timeout=5, install_script_timeout=5,
                        portable_verify_on_install=False)
    stops: list[bool] = []
    app = create_app(settings, stop_service=lambda: stops.append(True))
    wsgi_app = app.wsgi_app

    def from_peer(environ, start_response):
        environ.update(peer.environ)
        return wsgi_app(environ, start_response)

    app.wsgi_app = from_peer
    return app, stops


PORTABLE_DESCRIPTOR = {"version": "v1.0.0", "language": "go", "executable": "mirror", "sources": ["pull"],
                       "sinks": ["push"], "functions": ["mirrorfn"]}
SEEDED = {  # type -> (name, zip members, extra request keys): installed before fuzzing, so answers have bodies
    "sources": ("random", {"Random@v1.0.0.so": b"\x7fELF", "random.yaml": b"default: {}\n"}, {}),
    "sinks": ("file2", {"file2.so": b"\x7fELF"}, {}),
    "functions": ("echo", {"Echo@v2.so": b"\x7fELF"}, {"functions": ["echo", "echo2"]}),
    "portables": ("mirror", {"mirror.json": json.dumps(PORTABLE_DESCRIPTOR).encode(), "mirror": b"#!/bin/sh\n",
                             "sources/pull.yaml": b"default: {}\n"}, {}),
}


def seed_plugins(app) -> None:
    """Install one plugin of each type from data/uploads (file://), through the API."""
    import zipfile

    uploads = app.extensions["kuiper_plugins"].layout.uploads
    client = app.test_client()
    for plugin_type, (name, members, extra) in SEEDED.items():
        path = uploads / f"{name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        response = client.post(f"/plugins/{plugin_type}", json={"name": name, "file": path.as_uri(), **extra})
        if response.status_code != 201:
            raise SystemExit(f"seeding {plugin_type} plugin {name} failed: {response.status_code} {response.data!r}")


def known_cases(schema) -> list:
    """Requests that succeed against the seeded plugins, so success bodies are checked against the document."""
    cases = []
    for plugin_type, (name, _members, _extra) in SEEDED.items():
        cases.append(schema["/plugins/{type}"]["GET"].Case(path_parameters={"type": plugin_type}))
        cases.append(schema["/plugins/{type}/{name}"]["GET"].Case(path_parameters={"type": plugin_type, "name": name}))
    for plugin_type in ("sources", "sinks", "functions"):
        cases.append(schema["/plugins/{type}/prebuild"]["GET"].Case(path_parameters={"type": plugin_type}))
    for function in ("echo", "echo2", "mirrorfn"):
        cases.append(schema["/plugins/udfs/{name}"]["GET"].Case(path_parameters={"name": function}))
    cases.append(schema["/plugins/udfs"]["GET"].Case())
    cases.append(schema["/config/uploads"]["GET"].Case())
    cases.append(schema["/"]["GET"].Case())
    cases.append(schema["/ping"]["GET"].Case())
    cases.append(schema["/plugins/functions/{name}/register"]["POST"].Case(
        path_parameters={"name": "echo"}, body={"functions": ["echo", "echo3"]}, media_type="application/json"))
    return cases


# ---------------------------------------------------------------------------- the run

def run(examples: int, seed: int) -> dict:
    guard = NetworkGuard()
    guard.install()
    failures: list[dict] = []
    errors: list[str] = []
    per_operation: dict[str, int] = collections.Counter()
    unsatisfiable: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kuiper-fuzz-") as folder, contextlib.closing(LoopbackPeer()) as peer:
        app, stops = build_app(Path(folder) / "home", peer)
        counted = Counted(app)
        document = app.test_client().get("/openapi.json")
        if document.status_code != 200:
            raise SystemExit(f"/openapi.json answered {document.status_code}: {document.data[:300]!r}")
        schema = schemathesis.openapi.from_wsgi("/openapi.json", counted, headers={"X-Fuzz-Schema": "1"})
        for operation_path in ("/plugins/{type}",):  # the empty lists, before anything is installed
            for plugin_type in SEEDED:
                case = schema[operation_path]["GET"].Case(path_parameters={"type": plugin_type})
                check_known(case, "empty", counted, per_operation, failures)
        seed_plugins(app)
        for case in known_cases(schema):
            check_known(case, "installed", counted, per_operation, failures)
        operations = []
        for result in schema.get_all_operations():
            try:
                operations.append(result.ok())
            except Exception as exc:  # an operation schemathesis cannot read is a failure of the document
                errors.append(f"unusable operation in /openapi.json: {exc}")
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
                try:
                    drive(operation, mode, label, examples, seed, per_operation, failures)
                except hypothesis.errors.Unsatisfiable:
                    # Nothing to make invalid: no parameters or body, or a parameter any string satisfies.
                    unsatisfiable.append(label)
                except Exception:
                    errors.append(f"{label}: {traceback.format_exc(limit=3)}")
    return {
        "requests": sum(counted.statuses.values()),
        "statuses": dict(sorted(counted.statuses.items())),
        "server_errors": sum(n for status, n in counted.statuses.items() if status >= 500),
        "failures": failures,
        "errors": errors,
        "per_operation": dict(per_operation),
        "refused_dns_lookups": guard.refused_lookups,
        "refused_connections": guard.refused_connections,
        "stop_requests": len(stops),
        "without_negative_cases": unsatisfiable,
    }


def drive(operation, mode: GenerationMode, label: str, examples: int, seed: int,
          per_operation: collections.Counter, failures: list[dict]) -> None:
    """Send `examples` generated requests for one operation and mode; record every failed check."""

    @hypothesis.settings(
        max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
        print_blob=False, suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        check_one(case, label, per_operation, failures)

    one()


def check_known(case, state: str, counted: Counted, per_operation: collections.Counter, failures: list[dict]) -> None:
    """A request that must succeed: every check, and a 2xx status."""
    label = f"{case.method} {case.operation.path} [known good, {state}]"
    check_one(case, label, per_operation, failures)
    if not 200 <= counted.last_status < 300:
        failures.append({"operation": label, "request": case.formatted_path, "status": counted.last_status,
                         "response": "", "failure": "a request that should succeed did not"})


def check_one(case, label: str, per_operation: collections.Counter, failures: list[dict]) -> None:
    """Send one request and run every check on its answer, recording what fails."""
    per_operation[label] += 1
    response = case.call()
    try:
        case.validate_response(response, checks=CHECKS)
    except (Exception, FailureGroup) as exc:  # every failed check is recorded, and the run goes on
        failures.append({
            "operation": label,
            "request": f"{case.method} {case.formatted_path} query={case.query} headers={case.headers}"
                       f" body={_short(case.body) if not isinstance(case.body, NotSet) else '-'}",
            "status": response.status_code,
            "response": _short(response.text, 300),
            "failure": _failure_titles(exc),
        })


def _failure_titles(exc: BaseException) -> str:
    """One line per failed check: its title and the first line of its message."""
    failures = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
    lines = []
    for failure in failures:
        title = getattr(failure, "title", type(failure).__name__)
        message = (getattr(failure, "message", "") or str(failure)).strip().splitlines()
        lines.append(f"{title}: {message[0] if message else ''}")
    return _short("; ".join(lines), 600)


def _short(value, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="examples per operation and mode (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--min-requests", type=int, default=1000, help="fail if fewer requests were sent")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    started = time.monotonic()
    report = run(args.examples, seed)
    elapsed = time.monotonic() - started

    for failure in report["failures"][:30]:
        print(f"FAILURE {failure['operation']}: {failure['request']}\n  -> {failure['status']} "
              f"{failure['response']!r}\n  {failure['failure']}", file=sys.stderr)
    for error in report["errors"]:
        print(f"ERROR {error}", file=sys.stderr)
    print(f"seed: {seed}")
    print(f"operations x modes driven: {len(report['per_operation'])}"
          f" (no negative case exists for: {', '.join(report['without_negative_cases']) or 'none'})")
    print(f"requests sent: {report['requests']} in {elapsed:.1f}s")
    print("statuses seen: " + ", ".join(f"{status}: {n}" for status, n in report["statuses"].items()))
    print(f"server errors (5xx): {report['server_errors']}")
    print(f"check failures (schema, status, content type, headers, negative data, 5xx): {len(report['failures'])}")
    print(f"harness errors: {len(report['errors'])}")
    print(f"DNS lookups refused by the harness: {report['refused_dns_lookups']}; "
          f"non-loopback connections refused: {report['refused_connections']}")
    ok = (not report["failures"] and not report["errors"] and report["server_errors"] == 0
          and report["requests"] >= args.min_requests)
    if report["requests"] < args.min_requests:
        print(f"too few requests: {report['requests']} < {args.min_requests}", file=sys.stderr)
    print("fuzz: OK" if ok else "fuzz: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
