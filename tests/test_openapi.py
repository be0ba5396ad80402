"""The OpenAPI document and the /docs page, as a person and a machine would read them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading

import pytest
from openapi_spec_validator import validate
from werkzeug.serving import make_server


def test_document_is_valid_openapi(service):
    response = service.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    validate(document)
    assert document["openapi"].startswith("3.")
    assert set(document["components"]["schemas"]) >= {"PluginRequest", "Error", "PortableDescription"}


def test_every_route_is_documented(service):
    document = service.client.get("/openapi.json").get_json()
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops if method != "parameters"}
    for rule in service.app.url_map.iter_rules():
        if rule.rule.startswith(("/docs", "/openapi")):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        path = path.replace("{plugin_type}", "{type}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)


def test_error_answers_reference_the_envelope(service):
    document = service.client.get("/openapi.json").get_json()
    post = document["paths"]["/plugins/{type}"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/PluginRequest"}
    assert post["responses"]["400"] == {"$ref": "#/components/responses/Error400"}
    error = document["components"]["responses"]["Error400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}


@pytest.fixture
def live_server(service):
    """The app on a real loopback port, for a browser."""
    server = make_server("127.0.0.1", 0, service.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.slow
def test_docs_page_renders_the_plugin_endpoints_in_a_browser(live_server, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed (make test installs it)"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         f"{live_server}/docs"],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    assert "swagger-ui" in dom, result.stderr[-2000:]
    assert "kuiper-plugins" in dom
    for path in ("/plugins/{type}", "/plugins/{type}/{name}", "/plugins/udfs", "/config/uploads"):
        assert f'data-path="{path}"' in dom, path
    assert "Install a plugin from a zip URL" in dom


def test_the_dry_run_plan_example_has_the_shape_of_a_real_plan(service, file_server):
    """The documented plan is what a dry run answers: the same keys, and valid against the Plan schema."""
    from conftest import make_zip
    from openapi_schema_validator import OAS30Validator

    document = service.client.get("/openapi.json").get_json()
    post = document["paths"]["/plugins/{type}"]["post"]
    assert "dryRun" in [p["name"] for p in post["parameters"]]
    example = post["responses"]["200"]["content"]["application/json"]["example"]
    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": b"\x7fELF", "random.yaml": "a: 1\n",
                                               "install.sh": "#!/bin/sh\necho preparing\n"})

    real = service.post("sources?dryRun=1", {"name": "random", "file": file_server.url("random.zip")}).get_json()

    assert set(real) == set(example) and set(real["source"]) == set(example["source"])
    assert set(real["writes"][0]) == set(example["writes"][0])
    assert set(real["installScript"]) == set(example["installScript"])
    schema = {"$ref": "#/components/schemas/Plan", "components": document["components"]}
    for plan in (example, real):
        OAS30Validator(schema).validate(plan)
    for operation in (document["paths"]["/plugins/{type}/{name}"][m] for m in ("put", "delete")):
        assert "dryRun" in [p["name"] for p in operation["parameters"]]
    assert document["paths"]["/engine/pending"]["get"]["responses"]["200"]["content"]["application/json"]["example"]


def test_the_plugin_set_examples_are_valid_and_shaped_as_real_answers(service, file_server):
    """The documented plugin set, its changes and a failed apply validate against their schemas, and so do the
    real answers of an apply made from the documented example (its URLs pointed at the loopback server)."""
    from conftest import make_zip
    from openapi_schema_validator import OAS30Validator

    document = service.client.get("/openapi.json").get_json()
    operations = document["paths"]["/config/plugins"]

    def valid(schema_name: str, value) -> None:
        OAS30Validator({"$ref": f"#/components/schemas/{schema_name}",
                        "components": document["components"]}).validate(value)

    examples = operations["put"]["requestBody"]["content"]["application/json"]["examples"]
    answer_example = operations["put"]["responses"]["200"]["content"]["application/json"]["example"]
    failure_example = operations["put"]["responses"]["400"]["content"]["application/json"]["example"]
    valid("PluginSet", examples["document"]["value"])
    valid("EkuiperPlugins", examples["ekuiper"]["value"])
    valid("PluginSetChanges", answer_example)
    valid("PluginSetFailure", failure_example)

    make_zip(file_server.root / "random_amd64.zip", {"Random@v1.0.0.so": b"\x7fELF", "random.yaml": "a: 1\n"})
    make_zip(file_server.root / "misc_amd64.zip", {"misc@v2.0.0.so": b"\x7fELF", "install.sh": "#!/bin/sh\n"})
    body = json.loads(json.dumps(examples["document"]["value"]).replace("https://packages.example.com/",
                                                                         file_server.url("")))
    for plugins in (body["sources"], body["functions"]):
        for entry in plugins.values():
            entry.pop("sha256")  # the example's digests are not those of the zips made here

    applied = service.client.put("/config/plugins", json=body)

    assert applied.status_code == 200, applied.get_data(as_text=True)
    valid("PluginSetChanges", applied.get_json())
    assert {c["name"] for c in applied.get_json()["changes"]} == {"random", "misc"}
    valid("PluginSet", service.client.get("/config/plugins").get_json())
    valid("EkuiperPlugins", service.client.get("/config/plugins?format=ekuiper").get_json())
    failed = service.client.put("/config/plugins", json={"sinks": {"influx": {"file": file_server.url("no.zip")}}})
    assert failed.status_code == 400
    valid("PluginSetFailure", failed.get_json())
    assert set(failed.get_json()) == set(failure_example)


# ---------------------------------------------------------------------------- the examples, replayed
# Every lifecycle endpoint of issue 19 (history, rollback, verify, repair, backup, audit, the dry runs; GET
# /engine/pending with the engine, in test_engine_pending.py) is sent exactly as its documented examples
# say, to a service with source plugin random installed at 1.0.0 and updated to 2.0.0, and must answer
# the documented status. The examples name the home /var/lib/kuiper (eKuiper's file:// package form);
# the replay's home is the test's.

LIFECYCLE = [
    ("get", "/plugins/{type}/{name}/history"),
    ("post", "/plugins/{type}/{name}/rollback"),
    ("get", "/registry/verify"),
    ("post", "/registry/repair"),
    ("get", "/registry/backup"),
    ("get", "/audit"),
    ("post", "/plugins/{type}"),
    ("put", "/plugins/{type}/{name}"),
    ("delete", "/plugins/{type}/{name}"),
]
EXAMPLE_HOME = "/var/lib/kuiper"


def documented_request(document: dict, method: str, path: str) -> tuple[str, dict, object, str]:
    """The request an operation's examples make: its URL path, query, JSON body, and the status documented for it.

    Every path parameter has an example; a query parameter is sent when it has one. The status is the
    operation's one 2xx, or with dryRun=1 the 200 that answers the plan.
    """
    item = document["paths"][path]
    operation = item[method]
    parameters = item.get("parameters", []) + operation.get("parameters", [])
    url = path
    for parameter in (p for p in parameters if p["in"] == "path"):
        assert "example" in parameter, f"{method.upper()} {path}: path parameter {parameter['name']} has no example"
        url = url.replace("{" + parameter["name"] + "}", parameter["example"])
    query = {p["name"]: p["example"] for p in parameters if p["in"] == "query" and "example" in p}
    body = None
    if "requestBody" in operation:
        media = operation["requestBody"]["content"]["application/json"]
        assert "example" in media, f"{method.upper()} {path}: its body has no example"
        body = media["example"]
    successes = sorted(status for status in operation["responses"] if status.startswith("2"))
    status = "200" if query.get("dryRun") == "1" else successes[0]
    assert query.get("dryRun") == "1" or len(successes) == 1, (method, path, successes)
    return url, query, body, status


def at_home(value: object, home: str) -> object:
    """An example value with the documented home replaced by `home`."""
    return json.loads(json.dumps(value).replace(EXAMPLE_HOME, home)) if value is not None else None


@pytest.mark.parametrize(("method", "path"), LIFECYCLE, ids=[f"{m}-{p}" for m, p in LIFECYCLE])
def test_each_documented_lifecycle_example_answers_its_documented_status(make_service, method, path):
    from conftest import make_zip

    service = make_service()
    uploads = service.layout.uploads
    make_zip(uploads / "random.zip", {"Random@v1.0.0.so": b"\x7fELF one", "random.yaml": "a: 1\n"})
    make_zip(uploads / "random2.zip", {"Random@v2.0.0.so": b"\x7fELF two", "random.yaml": "a: 1\n"})
    document = service.client.get("/openapi.json").get_json()
    url, query, body, status = documented_request(document, method, path)
    if (method, path) == ("post", "/plugins/{type}"):
        # the example installs random: replayed where another plugin is installed, as random is not yet
        make_zip(uploads / "echo.zip", {"Echo.so": b"\x7fELF echo"})
        assert service.post("sinks", {"name": "echo", "file": (uploads / "echo.zip").as_uri()}).status_code == 201
    else:
        assert service.post("sources", {"name": "random", "file": (uploads / "random.zip").as_uri()}).status_code == 201
        answer = service.client.put("/plugins/sources/random", json={"file": (uploads / "random2.zip").as_uri()})
        assert answer.status_code == 200, answer.get_data(as_text=True)

    answer = service.client.open(url, method=method.upper(), query_string=query,
                                 json=at_home(body, str(service.home)))

    assert str(answer.status_code) == status, (method, url, query, answer.get_data(as_text=True)[:500])
