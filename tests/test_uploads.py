"""/config/uploads: getting files onto the box so that file:// URLs can install them."""

from __future__ import annotations

import io

import pytest
from conftest import make_zip


def test_json_content_lands_in_uploads(service):
    response = service.client.post("/config/uploads", json={"name": "notes/readme.txt", "content": "héllo"})
    assert response.status_code == 201
    saved = service.layout.uploads / "notes/readme.txt"
    assert response.data.decode() == str(saved)
    assert saved.read_text() == "héllo"
    assert service.client.get("/config/uploads").get_json() == [str(service.layout.uploads / "notes")]


def test_multipart_upload_then_install_from_it(service, tmp_path):
    package = make_zip(tmp_path / "random.zip", {"Random@v1.0.0.so": b"so", "random.yaml": "a: 1\n"})
    response = service.client.post(
        "/config/uploads", data={"uploadFile": (io.BytesIO(package.read_bytes()), "random.zip")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 201
    saved = service.layout.uploads / "random.zip"
    assert response.data.decode() == str(saved)
    assert saved.read_bytes() == package.read_bytes()
    created = service.post("sources", {"name": "random", "file": saved.as_uri()})
    assert created.status_code == 201, created.data
    assert list(service.layout.incoming.iterdir()) == []


def test_json_file_url_is_fetched(service, file_server):
    make_zip(file_server.root / "p.zip", {"x.so": b"so"})
    response = service.client.post("/config/uploads", json={"name": "p.zip", "file": file_server.url("p.zip")})
    assert response.status_code == 201
    assert (service.layout.uploads / "p.zip").read_bytes() == (file_server.root / "p.zip").read_bytes()
    assert list(service.layout.incoming.iterdir()) == []


def test_json_file_url_follows_the_address_guard(make_service, file_server):
    service = make_service(private_net_allow_list=())
    make_zip(file_server.root / "p.zip", {"x.so": b"so"})
    response = service.client.post("/config/uploads", json={"name": "p.zip", "file": file_server.url("p.zip")})
    assert response.status_code == 400
    assert "internal network" in response.get_json()["message"]
    assert file_server.requests == []
    assert service.client.get("/config/uploads").get_json() == []


@pytest.mark.parametrize("name", ["../evil.zip", "a/../../evil.zip", "/abs.zip", ".hidden", "a//b", "", "a\\b"])
def test_names_never_leave_uploads(service, name):
    before = service.snapshot()
    response = service.client.post("/config/uploads", json={"name": name, "content": "x"})
    assert response.status_code == 400
    assert response.get_json()["error"] == 1000
    service.assert_unchanged(before)


def test_multipart_filename_is_checked_too(service):
    before = service.snapshot()
    response = service.client.post(
        "/config/uploads", data={"uploadFile": (io.BytesIO(b"x"), "../evil.zip")}, content_type="multipart/form-data",
    )
    assert response.status_code == 400
    service.assert_unchanged(before)


@pytest.mark.parametrize("body", [{"name": "a.zip"}, {"content": "x"}, {"name": "a", "content": "x", "file": "x"}])
def test_incomplete_json_is_refused(service, body):
    response = service.client.post("/config/uploads", json=body)
    assert response.status_code == 400


def test_missing_multipart_field(service):
    response = service.client.post("/config/uploads", data={"other": (io.BytesIO(b"x"), "a.zip")},
                                   content_type="multipart/form-data")
    assert response.status_code == 400
    assert "uploadFile" in response.get_json()["message"]


def test_size_limit(make_service):
    service = make_service(max_plugin_size=200 * 1024)
    before = service.snapshot()
    response = service.client.post(
        "/config/uploads", data={"uploadFile": (io.BytesIO(b"x" * (400 * 1024)), "big.zip")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    service.assert_unchanged(before)
    assert list(service.layout.incoming.iterdir()) == []
    fits = service.client.post(
        "/config/uploads", data={"uploadFile": (io.BytesIO(b"x" * (100 * 1024)), "ok.zip")},
        content_type="multipart/form-data",
    )
    assert fits.status_code == 201


def test_delete(service):
    assert service.client.post("/config/uploads", json={"name": "a.zip", "content": "x"}).status_code == 201
    deleted = service.client.delete("/config/uploads/a.zip")
    assert deleted.status_code == 200 and deleted.data == b"ok"
    assert not (service.layout.uploads / "a.zip").exists()
    missing = service.client.delete("/config/uploads/a.zip")
    assert missing.status_code == 404
    assert service.client.delete("/config/uploads/..%2Fetc").status_code in (400, 404)
