"""The OpenAPI document and the /docs page, as a person and a machine would read them."""

from __future__ import annotations

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
