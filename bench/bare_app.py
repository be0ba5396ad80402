"""The read benchmark's baseline: a bare Flask app answering the same JSON as the service, from memory.

It runs under the same `etc/gunicorn.conf.py` as the service (same worker count
and class, same access log), so the ratio service / bare app is the cost of
everything the service does beyond Flask, gunicorn and json.dumps: access
checks, the registry query, schemas.

`BENCH_BARE_DATA` names a JSON file written by bench/fixtures.py:
{"sources": {name: version}, "functions": {function: plugin}}.
Bodies are serialised per request exactly as the service serialises them.
"""

from __future__ import annotations

import json
import os

from flask import Flask, Response, abort, request

with open(os.environ["BENCH_BARE_DATA"], encoding="utf-8") as data_file:
    _data = json.load(data_file)

SOURCES: dict[str, str] = _data["sources"]
SOURCE_NAMES = sorted(SOURCES)
FUNCTIONS: dict[str, str] = _data["functions"]
FUNCTION_NAMES = sorted(FUNCTIONS)

app = Flask(__name__, static_folder=None)


def json_response(payload: object, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status=status, mimetype="application/json")


@app.get("/ping")
def ping() -> Response:
    return Response(status=200)


@app.get("/plugins/sources")
def list_sources() -> Response:
    return json_response(SOURCE_NAMES)


@app.get("/plugins/sources/<name>")
def describe_source(name: str) -> Response:
    if name not in SOURCES:
        abort(404)
    return json_response({"name": name, "version": SOURCES[name]})


@app.get("/plugins/udfs")
def list_functions() -> Response:
    return json_response(FUNCTION_NAMES)


@app.get("/plugins/udfs/<name>")
def describe_function(name: str) -> Response:
    if name not in FUNCTIONS:
        abort(404)
    return json_response({"name": name, "plugin": FUNCTIONS[name]})


@app.post("/plugins/sources")
def create_source() -> Response:
    """Parse the install body as the service does, and answer as it does, without installing anything."""
    body = json.loads(request.get_data(cache=False))
    return Response(f"sources plugin {body['name']} is created", status=201, mimetype="text/plain")
