"""fetch: URL syntax, the address policy, loopback-only SSRF cases, redirects, caps, deadline, file:// sandbox."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FileServer, make_zip
from hypothesis import given, settings
from hypothesis import strategies as st

from kuiper_plugins.errors import DiskFull, DownloadFailed, InvalidRequest
from kuiper_plugins.install.fetch import (
    URL_RULE,
    AllowedTarget,
    address_allowed,
    check_url,
    fetch,
    parse_allow_list,
)

PAYLOAD = {"random.so": b"\x7fELF" + b"x" * 2000, "random.yaml": "default: {}\n"}


# ---------------------------------------------------------------- fixtures and helpers

def start_server(root: Path, tls: ssl.SSLContext | None = None) -> FileServer:
    """Start conftest's FileServer, over TLS when given a context."""
    server = FileServer(root)
    if tls is not None:
        server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True, do_handshake_on_connect=False)
        server.httpd.handle_error = lambda request, client_address: None  # failed handshakes are expected
    return server.start()


@pytest.fixture
def env(tmp_path):
    """The folders a fetch touches: dest (downloads land here) and uploads (the file:// sandbox)."""
    dest = tmp_path / "dest"
    uploads = tmp_path / "uploads"
    dest.mkdir()
    uploads.mkdir()
    return SimpleNamespace(tmp=tmp_path, dest=dest, uploads=uploads)


@pytest.fixture
def server_b(tmp_path):
    """A second loopback server: the forbidden target, which must see no request."""
    root = tmp_path / "served_b"
    root.mkdir()
    make_zip(root / "p.zip", PAYLOAD)
    server = start_server(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def release():
    """An event stalled routes wait on; set at teardown so no server thread outlives the test for long."""
    event = threading.Event()
    try:
        yield event
    finally:
        event.set()


@pytest.fixture
def served_zip(file_server):
    """A plugin zip served by file_server at /p.zip; returns its bytes."""
    path = make_zip(file_server.root / "p.zip", PAYLOAD)
    return path.read_bytes()


def run_fetch(env, url, **options):
    kwargs = dict(
        uploads_dir=env.uploads, allow_external_file_access=False, enable_private_net=False,
        private_net_allow_list=(), max_size=1 << 20, timeout=5.0, tls_verify=True,
    )
    kwargs.update(options)
    return fetch(url, env.dest, **kwargs)


def refused(env, url, match, error=DownloadFailed, **options):
    """Assert the fetch fails with `error` matching `match` and leaves dest empty; return the error."""
    with pytest.raises(error, match=match) as info:
        run_fetch(env, url, **options)
    assert list(env.dest.iterdir()) == []
    return info.value


def allow(server):
    """The allow list that lets exactly `server` through while private targets stay forbidden."""
    return [f"127.0.0.1:{server.port}"]


def answer(handler, status, headers=(), body=b"", reason=None):
    """Send a whole HTTP answer from a route; a client that went away is not an error."""
    with contextlib.suppress(OSError):
        handler.send_response(status, reason)
        for key, value in headers:
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(body)


def redirect(status, location):
    return lambda handler: answer(handler, status, [("Location", location), ("Content-Length", "0")])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- check_url

@pytest.mark.parametrize("url", [
    "http://google.com/a.zip",
    "https://google.com/a.zip",
    "file:///tmp/file.zip",
    "HTTP://Google.com:8080/dir/a.zip",
    "http://[2001:db8::1]:8080/a.zip",
    "http://x/a.zip#frag.zip",
    "file:///tmp/my%20file.zip",
])
def test_check_url_accepts(url):
    check_url(url)


@pytest.mark.parametrize("url", [
    "ftp://server/a.zip",
    "not url",
    "not url.zip",
    "http://",
    "http://.zip",
    "http:///a.zip",
    "file://host/path.zip",
    "file://localhost/tmp/a.zip",
    "file:relative/a.zip",
    "file:///tmp/a%00.zip",
    "http://x/a.zip?x=1",
    "http://x/a.ZIP",
    "http://x/a.zip/",
    "http://x/a",
    "http://x?a.zip",
    "gopher://x/a.zip",
    "dict://x:11211/a.zip",
    "data:text/plain,a.zip",
    "jar:http://x/a.zip!/b.zip",
    "javascript:alert(1)//a.zip",
    " http://x/a.zip",
    "\thttp://x/a.zip",
    "\r\nhttp://x/a.zip",
    "http://x/a b.zip",
    "http://x/a\tb.zip",
    "http://user:pw@x/a.zip",
    "http://x\\@y/a.zip",
    "http://x:99999/a.zip",
    "http://x:0/a.zip",
    "http://[::1]x/a.zip",
    "http://[::1/a.zip",
    "http://%31%32%37.0.0.1/a.zip",
    "http://bücher.example/a.zip",
    "",
])
def test_check_url_refuses(url):
    with pytest.raises(InvalidRequest) as info:
        check_url(url)
    assert info.value.message == f"invalid uri {url} ({URL_RULE})"


# ---------------------------------------------------------------- address policy (no sockets)

@pytest.mark.parametrize("address", [
    # catalogue case 23
    "169.254.169.254", "100.64.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00:808:808", "2002:7f00:1::",
    "::127.0.0.1", "2001:0:4136:e378:8000:63bf:5601:5601", "fe80::1%eth0", "fd00:ec2::254",
    # the plain cases
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "0.0.0.0",
    "0.1.2.3", "255.255.255.255", "224.0.0.1", "239.255.255.250", "240.0.0.1", "198.18.0.1", "198.19.255.255",
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "192.0.0.1", "192.88.99.1", "100.127.255.255",
    "::1", "::", "::ffff:127.0.0.1", "::ffff:8.8.8.8", "::ffff:0:8.8.8.8", "::8.8.8.8", "64:ff9b::808:808",
    "2002:808:808::1", "2001::1", "2001:db8::1", "3fff::1", "fc00::1", "fd12:3456::1", "fe80::1",
    "febf::1", "fec0::1", "ff02::1", "ff0e::1", "100::1",
])
def test_address_policy_refuses(address):
    assert address_allowed(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.32.0.1",
    "2606:4700::1111", "2001:4860:4860::8888", "2a00:1450::1",
])
def test_address_policy_allows_public(address):
    assert address_allowed(ipaddress.ip_address(address)) is True


URL_LIKE = st.tuples(
    st.sampled_from(["http://", "https://", "file://", "file:///", "HTTP://", "ftp://", "", " http://"]),
    st.text(max_size=40),
    st.sampled_from(["", ".zip", "/a.zip", ":80/a.zip"]),
).map("".join)


@given(URL_LIKE)
@settings(max_examples=400, deadline=None)
def test_check_url_never_raises_anything_else(url):
    try:
        check_url(url)
    except InvalidRequest as exc:
        assert exc.message == f"invalid uri {url} ({URL_RULE})"
        return
    assert url.endswith(".zip")
    assert url.split(":", 1)[0].lower() in ("http", "https", "file")


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_ipv4_translation_forms_always_refused(number):
    """Whatever IPv4 address an IPv6 form embeds, the form itself is refused."""
    ipv4 = ipaddress.IPv4Address(number)
    forms = [
        ipaddress.IPv6Address(f"::ffff:{ipv4}"),  # mapped
        ipaddress.IPv6Address(f"::{ipv4}"),  # compatible
        ipaddress.IPv6Address(f"64:ff9b::{ipv4}"),  # NAT64
        ipaddress.IPv6Address((0x0064FF9B0001 << 80) | number),  # local-use NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (number << 80)),  # 6to4
        ipaddress.IPv6Address((0x20010000 << 96) | (number ^ 0xFFFFFFFF)),  # Teredo client
    ]
    assert [address_allowed(form) for form in forms] == [False] * len(forms)


def test_parse_allow_list_forms():
    parsed = parse_allow_list(["127.0.0.1:8080", "10.0.0.0/8", " 192.168.1.5 ", "[::1]:443", "[fd00::1]",
                               "fd00::/8", "::1"])
    assert parsed == (
        AllowedTarget(ipaddress.ip_network("127.0.0.1/32"), 8080),
        AllowedTarget(ipaddress.ip_network("10.0.0.0/8"), None),
        AllowedTarget(ipaddress.ip_network("192.168.1.5/32"), None),
        AllowedTarget(ipaddress.ip_network("::1/128"), 443),
        AllowedTarget(ipaddress.ip_network("fd00::1/128"), None),
        AllowedTarget(ipaddress.ip_network("fd00::/8"), None),
        AllowedTarget(ipaddress.ip_network("::1/128"), None),
    )
    assert parse_allow_list("127.0.0.1:80, 10.0.0.0/8") == parse_allow_list(["127.0.0.1:80", "10.0.0.0/8"])
    assert parse_allow_list(()) == ()
    entry = parsed[0]
    assert entry.matches(ipaddress.ip_address("127.0.0.1"), 8080)
    assert not entry.matches(ipaddress.ip_address("127.0.0.1"), 8081)
    assert not entry.matches(ipaddress.ip_address("::1"), 8080)
    assert parsed[1].matches(ipaddress.ip_address("10.9.8.7"), 1)


@pytest.mark.parametrize("entry", [
    "", "  ", "example.com", "300.1.1.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x",
    "10.0.0.1/8", "10.0.0.0/33", "10.0.0.0/8:80", "[::1]:", "[::1]:99999", "[127.0.0.1]:80", "[::1",
    "fe80::1%eth0", "1.2.3.4:80:90",
])
def test_parse_allow_list_refuses_malformed(entry):
    with pytest.raises(ValueError, match="invalid private net allow list entry") as info:
        parse_allow_list(["127.0.0.1", entry])
    assert repr(entry) in str(info.value)


# ---------------------------------------------------------------- SSRF against a real loopback server

LOOPBACK_SPELLINGS = [
    "127.0.0.1", "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "0x7f.0.0.1", "127.1",
    "127.000.000.001", "0", "0.0.0.0", "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "LOCALHOST", "localhost", "localhost.", "[::1%25lo]",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_loopback_spellings_refused_without_a_request(env, file_server, served_zip, spelling):
    url = f"http://{spelling}:{file_server.port}/p.zip"
    refused(env, url, rf"^fail to download file {re.escape(url)}: (ip \S+ is in internal network|cannot resolve host)")
    assert file_server.requests == []


def test_refusal_message_is_ekuipers(env, file_server, served_zip):
    url = file_server.url("p.zip")
    error = refused(env, url, "internal network")
    assert error.message == (
        f"fail to download file {url}: ip 127.0.0.1 is in internal network (downloads from loopback, private and"
        f" link-local addresses are refused: add 127.0.0.1:{file_server.port} to basic.privateNetAllowList, or set"
        " basic.enablePrivateNet to true)")


@pytest.mark.parametrize("template", [
    "http://a.example@127.0.0.1:{port}/p.zip",
    "http://127.0.0.1:{port}\\@a.example/p.zip",
    "http://a.example#@127.0.0.1:{port}/p.zip",
    "http://127.0.0.1:{port}#@a.example/p.zip",
    "http://127.0.0.1%3a{port}/p.zip",
    "http://[::1]x:{port}/p.zip",
    " http://127.0.0.1:{port}/p.zip",
    "\thttp://127.0.0.1:{port}/p.zip",
    "\r\nhttp://127.0.0.1:{port}/p.zip",
    "http://127.0.0.1:{port}/\r\nHost: a.example/p.zip",
])
def test_parser_confusion_refused(env, file_server, served_zip, template):
    url = template.format(port=file_server.port)
    with pytest.raises((InvalidRequest, DownloadFailed)):
        run_fetch(env, url)
    assert file_server.requests == []
    assert list(env.dest.iterdir()) == []


# ---------------------------------------------------------------- allow list, redirects, rebinding

def test_allowed_server_serves_the_zip(env, file_server, served_zip):
    seen = {}

    def capture(handler):
        seen.update(handler.headers)
        answer(handler, 200, [("Content-Length", str(len(served_zip)))], served_zip)

    file_server.routes["/pkg.zip"] = capture
    result = run_fetch(env, file_server.url("pkg.zip"), private_net_allow_list=allow(file_server))
    assert result.path.parent == env.dest
    assert result.path.read_bytes() == served_zip
    assert result.sha256 == sha(served_zip)
    assert result.size == len(served_zip)
    assert seen["Host"] == f"127.0.0.1:{file_server.port}"
    assert seen["Accept-Encoding"] == "identity"


def test_host_name_kept_in_host_header(env, file_server, served_zip):
    seen = {}
    file_server.routes["/h.zip"] = lambda handler: (seen.update(handler.headers), answer(handler, 200, [], b"ok"))
    result = run_fetch(env, f"http://LocalHost:{file_server.port}/h.zip", private_net_allow_list=allow(file_server))
    assert result.path.read_bytes() == b"ok"
    assert seen["Host"] == f"localhost:{file_server.port}"


def test_allow_list_is_per_port(env, file_server, server_b, served_zip):
    url = server_b.url("p.zip")
    refused(env, url, "ip 127.0.0.1 is in internal network", private_net_allow_list=allow(file_server))
    assert server_b.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_into_private_space_refused(env, file_server, server_b, status):
    file_server.routes["/r.zip"] = redirect(status, server_b.url("p.zip"))
    refused(env, file_server.url("r.zip"), re.escape(
        f"ip 127.0.0.1 is in internal network (redirected to {server_b.url('p.zip')}; downloads from loopback,"
        f" private and link-local addresses are refused: add 127.0.0.1:{server_b.port} to"
        " basic.privateNetAllowList, or set basic.enablePrivateNet to true)") + "$",
            private_net_allow_list=allow(file_server))
    assert file_server.requests == ["/r.zip"]
    assert server_b.requests == []


@pytest.mark.parametrize("location, match", [
    ("http://[::1]:{b}/p.zip", r"ip ::1 is in internal network"),
    ("http://localhost:{b}/p.zip", r"ip 127.0.0.1 is in internal network"),
    ("http://2130706433:{b}/p.zip", r"ip 127.0.0.1 is in internal network"),
    ("file:///etc/passwd", r"redirect to file:///etc/passwd refused"),
    ("ftp://127.0.0.1:{b}/p.zip", r"redirect to ftp://127.0.0.1:\d+/p.zip refused"),
    ("gopher://127.0.0.1:{b}/_x", r"redirect to gopher://.* refused"),
    ("http://a.example@127.0.0.1:{b}/p.zip", r"redirect to .* refused"),
    ("http://127.0.0.1:{b}\\@a.example/p.zip", r"redirect to .* refused"),
    ("http://[::1:{b}/p.zip", r"redirect to http://\[::1:\d+/p.zip refused"),
    ("/a b.zip", r"redirect to http://127.0.0.1:\d+/a b.zip refused"),
])
def test_redirect_targets_refused(env, file_server, server_b, location, match):
    file_server.routes["/r.zip"] = redirect(302, location.format(b=server_b.port))
    refused(env, file_server.url("r.zip"), match, private_net_allow_list=allow(file_server))
    assert server_b.requests == []


def test_redirect_loop_refused(env, file_server, server_b):
    file_server.routes["/loop.zip"] = redirect(302, "/loop.zip")
    refused(env, file_server.url("loop.zip"), r"too many redirects \(more than 5\)",
            private_net_allow_list=allow(file_server))
    assert file_server.requests == ["/loop.zip"] * 6
    assert server_b.requests == []


def chain(server, redirects: int, final: bytes) -> str:
    """Routes /start.zip -> /c1 -> ... -> /c<redirects>, which serves `final`; returns the start URL.

    Relative Locations with a query and without .zip: redirect targets need not end in .zip.
    """
    for index in range(redirects):
        source = "/start.zip" if index == 0 else f"/c{index}"
        server.routes[source] = redirect(307 if index % 2 else 302, f"/c{index + 1}?from={index}")
    server.routes[f"/c{redirects}"] = lambda handler: answer(
        handler, 200, [("Content-Length", str(len(final)))], final)
    return server.url("start.zip")


def test_five_redirects_followed(env, file_server, served_zip):
    url = chain(file_server, 5, served_zip)
    result = run_fetch(env, url, private_net_allow_list=allow(file_server))
    assert result.path.read_bytes() == served_zip
    assert file_server.requests == ["/start.zip"] + [f"/c{i}?from={i - 1}" for i in range(1, 6)]


def test_six_redirects_refused(env, file_server, server_b, served_zip):
    url = chain(file_server, 6, served_zip)
    refused(env, url, r"too many redirects \(more than 5\)", private_net_allow_list=allow(file_server))
    assert len(file_server.requests) == 6  # /c6 is never asked for


def test_rebinding_resolves_once_and_connects_to_the_checked_address(env, file_server, served_zip, monkeypatch):
    calls = []

    def resolver(host, port, *args, **kwargs):
        calls.append(host)
        if len(calls) > 1:  # a second lookup would rebind to an address nobody listens on
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.2", port))]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    seen = {}
    file_server.routes["/p.zip"] = lambda handler: (seen.update(handler.headers), answer(handler, 200, [], b"pk"))
    result = run_fetch(env, f"http://pkg.example:{file_server.port}/p.zip", private_net_allow_list=allow(file_server))
    assert result.path.read_bytes() == b"pk"
    assert calls == ["pkg.example"]
    assert seen["Host"] == f"pkg.example:{file_server.port}"


def test_every_resolved_address_is_checked(env, file_server, served_zip, monkeypatch):
    def resolver(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    refused(env, f"http://pkg.example:{file_server.port}/p.zip", "ip 10.0.0.1 is in internal network",
            private_net_allow_list=allow(file_server))
    assert file_server.requests == []


# ---------------------------------------------------------------- answers, caps, deadline (private net on)

PRIVATE = {"enable_private_net": True}


def test_missing_file_is_a_404(env, file_server):
    url = file_server.url("missing.zip")
    refused(env, url, rf"^fail to download file {url}: cannot download the file with status: 404 ", **PRIVATE)


@pytest.mark.parametrize("status, reason", [(404, "Not Found"), (500, "Internal Server Error"), (403, "Forbidden")])
def test_status_line_in_message(env, file_server, status, reason):
    file_server.routes["/s.zip"] = lambda handler: answer(handler, status, [("Content-Length", "0")])
    url = file_server.url("s.zip")
    error = refused(env, url, "status", **PRIVATE)
    assert error.message == f"fail to download file {url}: cannot download the file with status: {status} {reason}"


def test_redirect_without_location_is_a_failed_status(env, file_server):
    file_server.routes["/r.zip"] = lambda handler: answer(handler, 302, [("Content-Length", "0")])
    refused(env, file_server.url("r.zip"), "cannot download the file with status: 302 Found", **PRIVATE)


def test_content_length_over_the_cap_refused_before_the_body(env, file_server, release):
    def huge(handler):
        with contextlib.suppress(OSError):
            handler.send_response(200)
            handler.send_header("Content-Length", "10737418240")
            handler.end_headers()
            release.wait(30)  # never sends a body byte

    file_server.routes["/huge.zip"] = huge
    started = time.monotonic()
    refused(env, file_server.url("huge.zip"), "announces 10737418240 bytes, more than the limit of 1048576 bytes",
            **PRIVATE)
    assert time.monotonic() - started < 2


def test_endless_chunked_body_refused_at_the_cap(env, file_server):
    def endless(handler):
        chunk = b"z" * 65536
        with contextlib.suppress(OSError):
            handler.send_response(200)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            for _ in range(4096):  # 256 MiB at most; the client hangs up long before
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    file_server.routes["/endless.zip"] = endless
    refused(env, file_server.url("endless.zip"), "larger than the limit of 262144 bytes", max_size=256 * 1024,
            **PRIVATE)


def test_unannounced_oversized_body_refused_at_the_cap(env, file_server):
    file_server.routes["/big.zip"] = lambda handler: answer(handler, 200, [], b"a" * (300 * 1024))
    refused(env, file_server.url("big.zip"), "larger than the limit of 262144 bytes", max_size=256 * 1024,
            **PRIVATE)


def test_body_of_exactly_the_cap_accepted(env, file_server):
    body = b"b" * 4096
    file_server.routes["/edge.zip"] = lambda handler: answer(handler, 200, [], body)
    assert run_fetch(env, file_server.url("edge.zip"), max_size=4096, **PRIVATE).size == 4096


def test_short_body_refused(env, file_server):
    file_server.routes["/short.zip"] = lambda handler: answer(handler, 200, [("Content-Length", "1000")], b"x" * 10)
    refused(env, file_server.url("short.zip"), "closed the connection before the whole file arrived", **PRIVATE)


def test_stalled_body_refused_at_the_total_deadline(env, file_server, release):
    def stall(handler):
        with contextlib.suppress(OSError):
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            handler.wfile.write(b"P")
            release.wait(30)

    file_server.routes["/stall.zip"] = stall
    started = time.monotonic()
    refused(env, file_server.url("stall.zip"), r"did not finish within the timeout of 1\.5 s", timeout=1.5, **PRIVATE)
    assert time.monotonic() - started < 1.5 + 2


@pytest.mark.parametrize("where", ["body", "headers"])
def test_slow_drip_refused_at_the_total_deadline(env, file_server, release, where):
    """A byte every 0.1 s keeps every single read alive; only a total deadline ends it."""
    def drip(handler):
        with contextlib.suppress(OSError):
            handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
            if where == "body":
                handler.wfile.write(b"Content-Length: 1000\r\n\r\n")
            for _ in range(200):  # 20 s at most, far past the deadline
                handler.wfile.write(b"a")
                if release.wait(0.1):
                    return

    file_server.routes["/drip.zip"] = drip
    started = time.monotonic()
    refused(env, file_server.url("drip.zip"), r"did not finish within the timeout of 1 s", timeout=1.0, **PRIVATE)
    assert time.monotonic() - started < 1.0 + 2


def test_gzip_content_encoding_refused(env, file_server):
    body = gzip.compress(b"\0" * 100000)
    file_server.routes["/gz.zip"] = lambda handler: answer(
        handler, 200, [("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))], body)
    refused(env, file_server.url("gz.zip"), "Content-Encoding gzip; only identity is accepted", **PRIVATE)


def test_sha256_match_case_insensitive(env, file_server, served_zip):
    result = run_fetch(env, file_server.url("p.zip"), sha256=sha(served_zip).upper(), **PRIVATE)
    assert result.sha256 == sha(served_zip)


def test_sha256_mismatch_refused(env, file_server, served_zip):
    wrong = "0" * 64
    refused(env, file_server.url("p.zip"), f"sha256 mismatch: expected {wrong}, got {sha(served_zip)}",
            sha256=wrong, **PRIVATE)


def test_malformed_sha256_is_an_invalid_request(env, file_server, served_zip):
    refused(env, file_server.url("p.zip"), "invalid sha256", error=InvalidRequest, sha256="abc", **PRIVATE)
    assert file_server.requests == []


def test_environment_proxies_ignored(env, file_server, server_b, served_zip, monkeypatch):
    proxy = f"http://127.0.0.1:{server_b.port}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    result = run_fetch(env, file_server.url("p.zip"), **PRIVATE)
    assert result.path.read_bytes() == served_zip
    assert file_server.requests == ["/p.zip"]
    assert server_b.requests == []


def test_connection_refused(env):
    with socket.socket() as closed:  # bound, never listening: connecting is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        refused(env, f"http://127.0.0.1:{port}/p.zip", rf"connection to 127\.0\.0\.1:{port} refused", **PRIVATE)


def test_disk_full_while_writing(env, file_server, served_zip, monkeypatch):
    real_write = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(f"{env.dest}{os.sep}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    refused(env, file_server.url("p.zip"), "No space left on device", error=DiskFull, **PRIVATE)


# ---------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A throwaway CA and a certificate for "localhost" it signed, made by the openssl command."""
    assert shutil.which("openssl"), "the openssl command is needed (make test installs it)"
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "leaf.ext").write_text(
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=kuiper-plugins test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "cert.pem", "-days", "2", "-extfile", "leaf.ext"],
    ]
    for command in commands:
        subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=30)
    return SimpleNamespace(ca=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")


@pytest.fixture
def tls_server(tmp_path, tls_files):
    """A loopback HTTPS server with the "localhost" certificate; records the SNI names it was sent."""
    root = tmp_path / "served_tls"
    root.mkdir()
    make_zip(root / "p.zip", PAYLOAD)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    sni = []
    context.sni_callback = lambda sslobj, name, ctx: sni.append(name)
    server = start_server(root, tls=context)
    server.sni = sni
    try:
        yield server
    finally:
        server.stop()


def test_tls_unknown_ca_refused(env, tls_server, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    url = f"https://localhost:{tls_server.port}/p.zip"
    refused(env, url, rf"TLS error with localhost:{tls_server.port}: certificate verify failed", **PRIVATE)
    assert tls_server.requests == []


def test_tls_trusted_ca_verifies_the_original_host_name(env, tls_server, tls_files, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    result = run_fetch(env, f"https://localhost:{tls_server.port}/p.zip", **PRIVATE)
    assert result.path.read_bytes() == (tls_server.root / "p.zip").read_bytes()
    assert tls_server.sni == ["localhost"]
    result.path.unlink()
    # the same server by address: the certificate does not name 127.0.0.1
    refused(env, f"https://127.0.0.1:{tls_server.port}/p.zip", "certificate verify failed", **PRIVATE)


def test_tls_verify_off_accepts_and_still_sends_sni(env, tls_server, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    result = run_fetch(env, f"https://localhost:{tls_server.port}/p.zip", tls_verify=False,
                       private_net_allow_list=allow(tls_server))
    assert result.path.read_bytes() == (tls_server.root / "p.zip").read_bytes()
    assert tls_server.sni == ["localhost"]


def test_tls_stall_refused_at_the_total_deadline(env, tls_server, release):
    def stall(handler):
        with contextlib.suppress(OSError):
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            handler.wfile.write(b"P")
            release.wait(30)

    tls_server.routes["/stall.zip"] = stall
    started = time.monotonic()
    refused(env, f"https://localhost:{tls_server.port}/stall.zip", r"did not finish within the timeout of 1 s",
            timeout=1.0, tls_verify=False, **PRIVATE)
    assert time.monotonic() - started < 1.0 + 2


# ---------------------------------------------------------------- file://

@pytest.fixture
def outside_zip(env):
    return make_zip(env.tmp / "outside" / "o.zip", PAYLOAD)


def file_url(path) -> str:
    return Path(path).as_uri()


def test_file_inside_uploads_is_copied_once_into_a_private_file(env):
    path = make_zip(env.uploads / "sub" / "my pkg.zip", PAYLOAD)
    result = run_fetch(env, file_url(path))
    assert result.path.parent == env.dest and result.path.name.startswith(f"download-{os.getpid()}-")
    assert result.path.read_bytes() == path.read_bytes()
    assert result.sha256 == sha(path.read_bytes())
    assert result.size == path.stat().st_size
    assert list(env.dest.iterdir()) == [result.path]
    # The private copy is what the caller reads: the upload may change, the copy does not.
    path.write_bytes(b"other bytes")
    assert sha(result.path.read_bytes()) == result.sha256


def replaced_at_open(monkeypatch, path: Path, new_bytes: bytes) -> None:
    """Have `path` given a whole new file (renamed over it, as the uploads API does) just before fetch opens it.

    Deterministic: the rename runs in the open call itself, after fetch has checked the name with stat.
    """
    real_open = os.open

    def open_after_a_re_upload(target, *args, **kwargs):
        if os.fspath(target) == os.path.realpath(path) and path.read_bytes() != new_bytes:
            fresh = path.with_name(path.name + ".new")
            fresh.write_bytes(new_bytes)
            os.replace(fresh, path)
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_a_re_upload)


def test_a_file_re_uploaded_between_the_check_and_the_open_is_read_as_opened(env, monkeypatch):
    # The name is given another file after fetch looked at it: what fetch opened is what it reads and pins.
    path = make_zip(env.uploads / "p.zip", {"Other@v1.0.0.so": b"other"})
    wanted = make_zip(env.tmp / "wanted.zip", PAYLOAD).read_bytes()
    replaced_at_open(monkeypatch, path, wanted)
    result = run_fetch(env, file_url(path), sha256=sha(wanted))
    assert result.path.read_bytes() == wanted and result.sha256 == sha(wanted)


def test_a_file_re_uploaded_with_other_bytes_is_a_sha256_mismatch(env, monkeypatch):
    wanted = make_zip(env.uploads / "p.zip", PAYLOAD).read_bytes()
    replaced_at_open(monkeypatch, env.uploads / "p.zip", b"other bytes")
    refused(env, file_url(env.uploads / "p.zip"), "sha256 mismatch", sha256=sha(wanted))


def test_file_symlink_inside_uploads_to_inside_allowed(env):
    target = make_zip(env.uploads / "real.zip", PAYLOAD)
    (env.uploads / "link.zip").symlink_to(target)
    assert run_fetch(env, file_url(env.uploads / "link.zip")).path.read_bytes() == target.read_bytes()


def test_file_outside_uploads_refused(env, outside_zip):
    url = file_url(outside_zip)
    error = refused(env, url, "file access denied")
    assert error.message == f"fail to download file {url}: file access denied: path must be under {env.uploads}"


@pytest.mark.parametrize("escape", ["..", "%2e%2e", "%2E%2e", "sub/../.."])
def test_file_dot_dot_escape_refused(env, outside_zip, escape):
    (env.uploads / "sub").mkdir()
    refused(env, f"file://{env.uploads}/{escape}/outside/o.zip", "file access denied")


def test_file_etc_passwd_refused(env):
    refused(env, "file:///etc/passwd", "invalid uri", error=InvalidRequest)
    refused(env, f"file://{env.uploads}/../../../../etc/passwd%00.zip", "invalid uri", error=InvalidRequest)


def test_file_symlink_pointing_outside_refused(env, outside_zip):
    (env.uploads / "evil.zip").symlink_to(outside_zip)
    refused(env, file_url(env.uploads / "evil.zip"), "file access denied")


def test_file_dev_zero_via_symlink_refused(env):
    (env.uploads / "zero.zip").symlink_to("/dev/zero")
    refused(env, file_url(env.uploads / "zero.zip"), "file access denied")
    refused(env, file_url(env.uploads / "zero.zip"), "is not a regular file", allow_external_file_access=True)


def test_file_fifo_refused_without_blocking(env):
    fifo = env.uploads / "pipe.zip"
    os.mkfifo(fifo)
    started = time.monotonic()
    refused(env, file_url(fifo), f"{fifo} is not a regular file")
    assert time.monotonic() - started < 1


def test_file_directory_refused(env):
    (env.uploads / "folder.zip").mkdir()
    refused(env, file_url(env.uploads / "folder.zip"), "is not a regular file")


def test_file_missing_named(env):
    missing = env.uploads / "nope.zip"
    refused(env, file_url(missing), f"file {missing} does not exist")


def test_file_outside_allowed_with_external_access(env, outside_zip):
    result = run_fetch(env, file_url(outside_zip), allow_external_file_access=True)
    assert result.path.read_bytes() == outside_zip.read_bytes()
    assert result.path.parent == env.dest


def test_file_over_the_cap_refused(env):
    path = env.uploads / "big.zip"
    path.write_bytes(b"x" * 5000)
    refused(env, file_url(path), "larger than the limit of 4096 bytes", max_size=4096)
    assert path.exists()


def test_file_sha256_checked(env):
    path = make_zip(env.uploads / "p.zip", PAYLOAD)
    run_fetch(env, file_url(path), sha256=sha(path.read_bytes())).path.unlink()
    refused(env, file_url(path), "sha256 mismatch", sha256="f" * 64)  # and the refused copy is removed
    assert path.exists()


def test_file_with_host_refused(env):
    path = make_zip(env.uploads / "p.zip", PAYLOAD)
    refused(env, f"file://localhost{path}", "invalid uri", error=InvalidRequest)
