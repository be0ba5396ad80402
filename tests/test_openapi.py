"""The OpenAPI document and the /docs page, as a person and a machine would read them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading

import pytest
import requests
from openapi_spec_validator import validate
from werkzeug.serving import make_server

from kuiper_plugins.layout import PLUGIN_TYPES


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

    make_zip(file_server.root / "random.zip", {"Random@v1.0.0.so": b"\x7fELF", "random.yaml": "a: 1\n"})
    make_zip(file_server.root / "misc.zip", {"misc@v2.0.0.so": b"\x7fELF", "install.sh": "#!/bin/sh\n"})
    # The example installs from this service's uploads folder (its packages are uploaded by the upload example).
    body = json.loads(json.dumps(examples["document"]["value"]).replace(f"file://{service.layout.uploads}/",
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


# ---------------------------------------------------------------------------- examples that work as they are

# Every operation of the document, in the order of the session its examples form, with the status it answers on
# a fresh service with `make run`'s settings (no engine attached: the two operations relayed to one answer 400).
SESSION = [
    ("ping", 200), ("readiness", 200), ("uploadFile", 201), ("listUploads", 200), ("installPlugin", 201),
    ("getOperation", 200),
    ("listPlugins", 200), ("describePlugin", 200), ("updatePlugin", 200), ("pluginHistory", 200),
    ("rollbackPlugin", 200), ("listPrebuiltPlugins", 200), ("registerFunctions", 200), ("listFunctions", 200),
    ("describeFunction", 200), ("portablePluginStatus", 400), ("listAudit", 200), ("verifyRegistry", 200),
    ("repairRegistry", 200), ("backupRegistry", 200), ("listPendingRestart", 400), ("getPluginSet", 200),
    ("applyPluginSet", 200), ("deletePlugin", 200), ("deleteUpload", 200),
]


def documented_requests(document: dict) -> dict[str, list[tuple[str, str, dict, object, dict]]]:
    """For each operationId, the requests its examples make as they are: (method, URL path, query, JSON body,
    headers).

    A body with several examples makes one request each; an example named after a plugin type fills {type}."""
    found = {}
    for path, item in document["paths"].items():
        for method in ("get", "put", "post", "delete"):
            if method not in item:
                continue
            operation = item[method]
            parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
            values = {p["name"]: p["example"] for p in parameters if p["in"] == "path"}
            query = {p["name"]: p["example"] for p in parameters if p["in"] == "query" and "example" in p}
            sent = {p["name"]: p["example"] for p in parameters if p["in"] == "header" and "example" in p}
            assert set(values) == set(re.findall(r"\{(\w+)\}", path)), (path, "a path parameter has no example")
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            bodies = ({name: example["value"] for name, example in content["examples"].items()} if content
                      else {"": None})
            assert content is None or "example" not in content, (path, method, "one example or named ones")
            found[operation["operationId"]] = [
                (method, path.format(**{**values, **({"type": name} if name in PLUGIN_TYPES else {})}), query, body,
                 sent) for name, body in bodies.items()]
    return found


def run_the_session(url: str, headers: dict[str, str]) -> list[tuple[str, str, int]]:
    """Every example of the served document, as it is, in the session's order; (operationId, path, status)."""
    document = requests.get(f"{url}/openapi.json", timeout=30).json()
    validate(document)
    found = documented_requests(document)
    assert sorted(found) == sorted(operation for operation, _ in SESSION), "an operation is missing from SESSION"
    answers = []
    for operation_id, expected in SESSION:
        documented = next(item[method] for item in document["paths"].values() for method in ("get", "put", "post",
                                                                                               "delete")
                          if method in item and item[method]["operationId"] == operation_id)["responses"]
        assert str(expected) in documented, (operation_id, expected, sorted(documented))
        for method, path, query, body, sent in found[operation_id]:
            answer = requests.request(method.upper(), f"{url}{path}", params=query, json=body,
                                      headers={**headers, **sent}, timeout=120)
            answers.append((operation_id, path, answer.status_code))
            assert answer.status_code == expected, (operation_id, method, path, answer.text[:500])
    return answers


@pytest.mark.slow
def test_every_example_works_as_it_is_against_a_fresh_service(start_gunicorn):
    # As `make run` serves it: no address allowed beyond the defaults, the handshake check on.
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__PRIVATENETALLOWLIST="",
                            KUIPER_PLUGINS__PORTABLE__VERIFYONINSTALL="true")
    answers = run_the_session(server.url, {})
    assert ("installPlugin", "/plugins/functions", 201) in answers
    assert requests.get(f"{server.url}/plugins/functions/misc", timeout=30).json() == {
        "name": "misc", "version": "2", "functions": ["f1", "f2"]}  # the plugin set's example gave its list back
    assert requests.get(f"{server.url}/plugins/sources", timeout=30).json() == []


@pytest.mark.slow
def test_with_authentication_on_the_documented_scheme_authorizes_every_example(start_gunicorn, tmp_path):
    """The document asks for its bearer scheme everywhere but / and /ping; a token sent as the scheme says (as
    Swagger UI's Authorize sends it) makes every example work, and without it the service answers 401."""
    import time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mgmt = tmp_path / "home" / "etc" / "mgmt"
    mgmt.mkdir(parents=True, mode=0o755)
    (mgmt / "docs.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"iss": "docs.pub", "aud": "eKuiper", "iat": now, "exp": now + 600, "sub": "docs"}, key,
                       algorithm="RS256")
    server = start_gunicorn(KUIPER_PLUGINS__BASIC__AUTHENTICATION="true")
    document = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    assert document["security"] == [{"jwt": []}]
    scheme = document["components"]["securitySchemes"]["jwt"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    open_operations = {operation["operationId"] for item in document["paths"].values()
                       for operation in item.values() if isinstance(operation, dict) and "operationId" in operation
                       and operation.get("security") == []}
    assert open_operations == {"ping", "readiness"}
    refused = requests.get(f"{server.url}/plugins/sources", timeout=30)
    assert refused.status_code == 401 and refused.json()["message"].startswith("missing_token")
    run_the_session(server.url, {"Authorization": f"Bearer {token}"})


def test_every_operation_has_its_own_operation_id_and_the_document_names_its_server(service):
    document = service.client.get("/openapi.json").get_json()
    ids = [operation["operationId"] for item in document["paths"].values() for method, operation in item.items()
           if method in ("get", "put", "post", "delete")]
    assert len(ids) == len(set(ids)) == sum(1 for _ in documented_requests(document))
    assert document["servers"] == [{"url": "/", "description": "this service, where this document was read"}]
    assert "security" not in document  # authentication off: no operation asks for a token
    assert set(document["components"]["securitySchemes"]) == {"jwt"}  # Authorize is offered, and says how


def test_the_install_example_prefills_what_a_source_takes(service):
    """The first example (what Swagger UI fills in) is a source: no functions, no shellParas, nothing generated
    from the schema; the function plugin's example gives its functions."""
    document = service.client.get("/openapi.json").get_json()
    content = document["paths"]["/plugins/{type}"]["post"]["requestBody"]["content"]["application/json"]
    first, functions = content["examples"].values()
    assert first["value"] == {"name": "random", "file": f"file://{service.layout.uploads}/random.zip"}
    assert functions["value"]["functions"] == ["f1", "f2"]
    assert "example" not in content


def test_the_docs_page_shows_every_operation_before_its_script_runs(service):
    """What a browser shows while Swagger UI's megabyte of script loads: a summary rendered by the service."""
    document = service.client.get("/openapi.json").get_json()
    page = service.client.get("/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    shown = html[html.index('<div id="first-view">'):html.index('<div id="swagger-ui" hidden>')]
    for path, item in document["paths"].items():
        for method in ("get", "put", "post", "delete"):
            if method in item:
                assert f"<code>{method.upper()}</code></td><td><code>{path}</code>" in shown, (method, path)
                assert item[method]["operationId"] in shown
    assert "kuiper-plugins" in shown and "/openapi.json" in shown
    # Everything the page loads is this service's own: no CDN, no validator site.
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(source.startswith(("./", "/")) for source in sources), sources
    for source in sources:
        if source.startswith("./"):
            asset = service.client.get(f"/docs/{source[2:]}")
            assert asset.status_code == 200, source
            asset.close()
    assert "validatorUrl: null" in html


def chromium_dom(url: str, profile, *flags: str) -> str:
    """The page's DOM as headless chromium leaves it after 10 s of virtual time."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed (make test installs it)"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", *flags, "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.stdout, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_the_docs_page_in_a_browser_first_view_then_authorize(make_service, tmp_path):
    """Before Swagger UI's script has arrived, and after it has arrived while the document has not, the browser
    shows the summary (not Swagger UI's bare "LOADING"); once Swagger UI has drawn the document it has taken the
    summary's place and, authentication being on, offers Authorize."""
    service = make_service(authentication=True)
    script_arrives = threading.Event()
    document_arrives = threading.Event()

    def held(environ, start_response):
        # "As the page loads": until the test lets each through, the megabyte of script, then the document, has
        # not arrived. (A refusal stands for "not yet": a browser's view of either is the same until it comes.)
        path = environ["PATH_INFO"]
        if (path.endswith("/swagger-ui-bundle.js") and not script_arrives.is_set()) or (
                path == "/openapi.json" and not document_arrives.is_set()):
            start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
            return [b""]
        return service.app(environ, start_response)

    server = make_server("127.0.0.1", 0, held, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/docs/"
        first = chromium_dom(url, tmp_path / "first")
        assert 'id="first-view"' in first and "<code>installPlugin</code>" in first
        assert "Every operation but GET / and GET /ping needs a token: press Authorize" in first
        assert '<div id="swagger-ui" hidden=""></div>' in first  # no script yet: nothing drawn there
        script_arrives.set()
        waiting = chromium_dom(url, tmp_path / "waiting")
        assert 'id="first-view"' in waiting and "<code>installPlugin</code>" in waiting
        # Swagger UI ran (its own markup is in its element) out of sight, the summary still shown
        assert re.search(r'<div id="swagger-ui" hidden="">\s*<section class="swagger-ui', waiting), waiting[-3000:]
        document_arrives.set()
        loaded = chromium_dom(url, tmp_path / "loaded")
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert 'id="first-view"' not in loaded  # Swagger UI drew the page in its place
    assert re.search(r'<button class="btn authorize[^"]*"', loaded), loaded[-3000:]
    assert 'data-path="/plugins/{type}"' in loaded
