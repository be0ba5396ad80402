"""Bring a plugin package from a client's URL to a local file, refusing anything that could harm the host.

The URL is a server-side request forgery target, so every guard sits where the bytes move:

* ``http``/``https``: the host name is resolved here, *every* address is checked by the address
  policy, and the connection then goes to one of those checked addresses (`_PinnedConnection`), never
  to a second DNS answer, so DNS rebinding has no gap to use. The Host header, TLS SNI and certificate
  verification keep the original host name. Redirects are followed here, at most `MAX_REDIRECTS`, each
  hop parsed, resolved and checked again. No proxy or ``.netrc`` from the environment is used, the body
  is read raw (``Accept-Encoding: identity``; any other Content-Encoding is refused), it is streamed to a
  temporary file with a size cap, and one total deadline bounds the whole download, slow drips included
  (`_DeadlineSocket`: every blocking receive waits at most until the deadline).
* ``file``: the path is percent-decoded and resolved with links followed; it must lie inside the
  uploads folder unless external access is allowed; only a regular file is read (FIFOs, devices and
  folders are refused without being opened). It is opened once and copied, while being hashed, into a
  private file in the destination folder: what is inspected and unpacked is exactly the bytes hashed,
  whatever happens to the path meanwhile.

Every failure is a `DownloadFailed` whose message reads ``fail to download file <url>: <reason>``, in
eKuiper's words where eKuiper has words (`DiskFull` when the disk fills up while writing); a partly
written temporary file is removed before the error leaves. Temporary files are named
``download-<pid>-*``, so that start-up can tell those of a dead worker (`is_orphan`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from kuiper_plugins.errors import DiskFull, DownloadFailed, InvalidRequest
from kuiper_plugins.lifecycle import progress

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Fetched:
    """A package brought to a local file."""

    path: Path  # a private file fetch created in the destination folder; the caller removes it
    sha256: str  # hex digest of its bytes
    size: int


TEMPORARY_PREFIX = "download-"


def _temporary_file(dest_dir: Path) -> tuple[int, str]:
    """Create a private file in dest_dir named after this process, so its owner can be told."""
    try:
        return tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", suffix=".zip", dir=dest_dir)
    except OSError as exc:
        _raise_if_disk_full(exc)
        raise


def is_orphan(name: str, prefix: str = TEMPORARY_PREFIX) -> bool:
    """Whether a scratch file named `<prefix><pid>-...` belongs to a process that is no longer alive."""
    if not name.startswith(prefix):
        return False
    pid = name[len(prefix):].partition("-")[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------- URL syntax

# Printable ASCII without space or backslash. Python's urlsplit silently drops leading blanks and any
# TAB/CR/LF, and reads "\" differently from browsers and Go; refusing them keeps one parse for all.
_URL_CHARS = re.compile(r"[!-\[\]-~]+")
_AUTHORITY = re.compile(r"(?:\[(?P<ipv6>[^\[\]]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]*))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class _HttpTarget:
    """One http(s) URL taken apart, as it will be used on the wire."""

    url: str
    scheme: str
    host: str  # lower-case name, or an IP literal without brackets (an IPv6 zone kept as "%zone")
    port: int
    host_header: str
    request_target: str  # path and query, as sent in the request line


# What `invalid uri` adds, after eKuiper's words: what a package URL may be.
URL_RULE = ("accepted: http:// or https:// with a host, or file:// with an absolute path; ending in .zip, in plain"
            " ASCII, without user info, blanks or a query after the .zip")


def check_url(url: str) -> None:
    """Refuse (InvalidRequest "invalid uri <url> (<URL_RULE>)") a URL this service will not fetch a package from.

    Accepted: ``http``/``https`` with a host, or ``file`` with an empty host and an absolute path, whose
    path ends in ``.zip`` and which as a whole ends in ``.zip`` (so a query string after it fails, as in
    eKuiper). Stricter than eKuiper, on purpose: no user info (``user@host``), no blanks, control
    characters, backslashes or non-ASCII anywhere, no percent-encoding in host names. No network, no
    file access.
    """
    try:
        if not isinstance(url, str) or not url.endswith(".zip") or not _URL_CHARS.fullmatch(url):
            raise ValueError("not a .zip URL in plain ASCII")
        if urlsplit(url).scheme == "file":
            path = _file_path(url)
        else:
            _parse_http_url(url)
            path = urlsplit(url).path
        if not path.endswith(".zip"):
            raise ValueError("path does not end in .zip")
    except ValueError:
        raise InvalidRequest(f"invalid uri {url} ({URL_RULE})") from None


def _parse_http_url(url: str) -> _HttpTarget:
    """Take an http(s) URL apart, or raise ValueError; used for the client's URL and every redirect."""
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("blank, control, backslash or non-ASCII character")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("not http or https")
    authority = _AUTHORITY.fullmatch(parts.netloc)
    if authority is None:
        raise ValueError("bad host")
    if authority["ipv6"] is not None:
        address, percent, zone = authority["ipv6"].partition("%")
        if percent and (not zone.startswith("25") or "%" in unquote(zone[2:])):
            raise ValueError("bad zone")  # RFC 6874: a zone is written "%25zone"
        host = f"{address}%{unquote(zone[2:])}" if percent else address
        ipaddress.IPv6Address(host)  # ValueError for anything but an IPv6 address
        host = host.lower()
        host_in_header = f"[{address.lower()}]"  # a zone never goes on the wire
    else:
        host = authority["name"].lower()
        if not host.strip("."):
            raise ValueError("bad host")
        host_in_header = host
    port_text = authority["port"]
    port = int(port_text) if port_text else _DEFAULT_PORTS[parts.scheme]
    if not 0 < port < 65536:
        raise ValueError("bad port")
    return _HttpTarget(
        url=url,
        scheme=parts.scheme,
        host=host,
        port=port,
        host_header=f"{host_in_header}:{port}" if port_text else host_in_header,
        request_target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
    )


def _file_path(url: str) -> str:
    """Return the decoded absolute path of a file: URL with an empty host, or raise ValueError."""
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("blank, control, backslash or non-ASCII character")
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc:
        raise ValueError("not a file URL with an empty host")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise ValueError("not an absolute path")
    return path


# ---------------------------------------------------------------- address policy

def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


_REFUSED_IPV4 = _networks(
    "0.0.0.0/8",  # "this network"; Linux routes 0.0.0.0 to the local host
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata services
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
    "192.88.99.0/24",  # 6to4 relay anycast
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, 255.255.255.255 broadcast among them
)
# Only 2000::/3 holds global unicast; everything outside it is refused, which already covers
# ::/128, ::1, IPv4-mapped ::ffff:0:0/96, IPv4-compatible ::/96, NAT64 64:ff9b::/96 and 64:ff9b:1::/48,
# discard 100::/64, unique-local fc00::/7, link-local fe80::/10, site-local fec0::/10, multicast ff00::/8.
_GLOBAL_UNICAST_IPV6 = ipaddress.IPv6Network("2000::/3")
_REFUSED_IPV6 = _networks(
    "2001::/23",  # IETF special purpose: Teredo 2001::/32, benchmarking, ORCHID
    "2001:db8::/32", "3fff::/20",  # documentation
    "2002::/16",  # 6to4, which embeds an IPv4 address
)


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Return False for any address a download must not reach without enablePrivateNet.

    Translation forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are refused
    outright rather than decoded. The standard library's own `is_global` must agree as well. A string
    is parsed first.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip not in _GLOBAL_UNICAST_IPV6 or any(ip in network for network in _REFUSED_IPV6):
            return False
    elif any(ip in network for network in _REFUSED_IPV4):
        return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class AllowedTarget:
    """One operator-configured exception to the address policy: a network, and a port or every port."""

    network: IPNetwork
    port: int | None = None

    def matches(self, ip: IPAddress, port: int) -> bool:
        return (
            ip.version == self.network.version
            and ip in self.network
            and (self.port is None or self.port == port)
        )


_BRACKETED_ENTRY = re.compile(r"\[(?P<ip>[^\[\]%]+)\](?::(?P<port>[0-9]{1,5}))?")


def parse_allow_list(entries: Iterable[str | AllowedTarget] | str) -> tuple[AllowedTarget, ...]:
    """Parse private-net allow-list entries: ``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a CIDR network.

    A single string is read as a comma-separated list. A malformed entry raises ValueError naming it;
    a CIDR network with host bits set (``10.0.0.1/8``) is malformed too, as it says two things at once.
    """
    if isinstance(entries, str):
        entries = entries.split(",")
    return tuple(
        entry if isinstance(entry, AllowedTarget) else _parse_allow_entry(entry) for entry in entries
    )


def _parse_allow_entry(entry: str) -> AllowedTarget:
    text = entry.strip() if isinstance(entry, str) else ""
    try:
        port_text = None
        if text.startswith("["):
            bracketed = _BRACKETED_ENTRY.fullmatch(text)
            if bracketed is None:
                raise ValueError(entry)
            network = ipaddress.ip_network(ipaddress.IPv6Address(bracketed["ip"]))
            port_text = bracketed["port"]
        elif "/" in text:
            network = ipaddress.ip_network(text, strict=True)
        elif text.count(":") == 1:
            address, port_text = text.split(":")
            network = ipaddress.ip_network(ipaddress.IPv4Address(address))
        else:
            if "%" in text:
                raise ValueError(entry)
            network = ipaddress.ip_network(ipaddress.ip_address(text))
        port = None
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(entry)
            port = int(port_text)
    except ValueError:
        raise ValueError(
            f"invalid private net allow list entry {entry!r}: "
            "expected IP, IP:PORT, [IPv6]:PORT or a CIDR network"
        ) from None
    return AllowedTarget(network, port)


@dataclass(frozen=True)
class _Policy:
    enable_private_net: bool
    allow_list: tuple[AllowedTarget, ...]

    def permits(self, ip: IPAddress, port: int) -> bool:
        return (
            self.enable_private_net
            or address_allowed(ip)
            or any(allowed.matches(ip, port) for allowed in self.allow_list)
        )


# ---------------------------------------------------------------- fetch

def fetch(
    url: str,
    dest_dir: Path,
    *,
    uploads_dir: Path,
    allow_external_file_access: bool,
    enable_private_net: bool,
    private_net_allow_list: Iterable[str | AllowedTarget] = (),
    max_size: int,
    timeout: float,
    tls_verify: bool,
    sha256: str | None = None,
) -> Fetched:
    """Bring the package at `url` to a local file (downloads go into dest_dir), enforcing every guard."""
    check_url(url)
    expected = _expected_digest(sha256)
    progress.phase("download")
    try:
        if urlsplit(url).scheme == "file":
            return _read_local(
                _file_path(url), Path(uploads_dir), allow_external_file_access, max_size, expected, Path(dest_dir)
            )
        download = _HttpDownload(
            policy=_Policy(enable_private_net, parse_allow_list(private_net_allow_list)),
            deadline=_Deadline(timeout), tls_verify=tls_verify, max_size=max_size, expected=expected,
        )
        return download.run(_parse_http_url(url), Path(dest_dir))
    except (DownloadFailed, DiskFull) as exc:
        raise exc.with_prefix(f"fail to download file {url}") from exc.__cause__


def _expected_digest(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise InvalidRequest(f"invalid sha256 {sha256!r}: expected 64 hex digits")
    return sha256.lower()


def _check_digest(expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise DownloadFailed(f"sha256 mismatch: expected {expected}, got {actual}")


# ---------------------------------------------------------------- file://

def _read_local(
    path: str, uploads_dir: Path, allow_external: bool, max_size: int, expected: str | None, dest_dir: Path
) -> Fetched:
    """Copy a local regular file into dest_dir while hashing it, refusing anything outside the uploads
    folder unless allowed. The source is opened once; everything after reads the private copy."""
    real = os.path.realpath(path)
    root = os.path.realpath(uploads_dir)
    if not allow_external and not _inside(real, root):
        raise DownloadFailed(f"file access denied: path must be under {uploads_dir}")
    try:
        # stat before open: opening a FIFO could block and opening a device can have side effects.
        before = os.stat(real)
    except FileNotFoundError:
        raise DownloadFailed(f"file {path} does not exist") from None
    except OSError as exc:
        raise DownloadFailed(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise DownloadFailed(f"{path} is not a regular file")
    if before.st_size > max_size:
        raise DownloadFailed(f"{path} is larger than the limit of {max_size} bytes")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise DownloadFailed(f"cannot read {path}: {exc.strerror}") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise DownloadFailed(f"{path} is not a regular file")
        # The name may have been given another file between the stat and the open: the uploads API replaces a
        # file by renaming a whole new one over it. What was opened is what is read, so it is held to the same
        # rules (a regular file, inside the uploads folder, within the size limit); any other change would
        # refuse an install for racing an ordinary re-upload.
        if opened.st_size > max_size:
            raise DownloadFailed(f"{path} is larger than the limit of {max_size} bytes")
        if not allow_external and not _inside(_opened_path(fd, real), root):
            raise DownloadFailed(f"file access denied: path must be under {uploads_dir}")
        progress.phase("download", opened.st_size)
        copy_fd, copy = _temporary_file(dest_dir)
    except OSError as exc:
        os.close(fd)
        raise DownloadFailed(f"cannot read {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := os.read(fd, CHUNK_SIZE):
                size += len(chunk)
                if size > max_size:  # the file grew after fstat
                    raise DownloadFailed(f"{path} is larger than the limit of {max_size} bytes")
                digest.update(chunk)
                _write_all(copy_fd, chunk)
                progress.advance(len(chunk))
        except OSError as exc:
            _raise_if_disk_full(exc)
            raise DownloadFailed(f"cannot read {path}: {exc.strerror}") from None
        finally:
            os.close(copy_fd)
        _check_digest(expected, digest.hexdigest())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
        raise
    finally:
        os.close(fd)
    return Fetched(path=Path(copy), sha256=digest.hexdigest(), size=size)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _opened_path(fd: int, fallback: str) -> str:
    """Return where the open file really is (race-free on Linux), or `fallback` without /proc."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback


# ---------------------------------------------------------------- http(s)://

class _Deadline:
    """One total time budget for a whole download: connects, redirects, headers and body."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def message(self) -> str:
        return f"download did not finish within the timeout of {self.seconds:g} s"


def _bound_by_deadline(sock: socket.socket, deadline: _Deadline | None) -> None:
    """Let the next blocking call on `sock` wait no longer than the deadline leaves."""
    if deadline is not None:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise TimeoutError("download deadline passed")
        sock.settimeout(remaining)


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every blocking send or receive waits at most until its download's deadline.

    A per-read timeout alone never ends a body that drips one byte just before each read would time
    out; bounding each receive by the time left does, however the reads above are buffered.
    """

    deadline: _Deadline | None = None

    def recv_into(self, buffer, nbytes=0, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().recv(bufsize, flags)

    def sendall(self, data, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS socket `_tls_context` makes: the same deadline as `_DeadlineSocket`."""

    deadline: _Deadline | None = None

    def recv_into(self, buffer, nbytes=None, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen=1024, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().recv(buflen, flags)

    def sendall(self, data, flags=0):
        _bound_by_deadline(self, self.deadline)
        return super().sendall(data, flags)


def _tls_context(verify: bool) -> ssl.SSLContext:
    """Return a client context over the system trust store (SSL_CERT_FILE/SSL_CERT_DIR honoured)."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.sslsocket_class = _DeadlineSSLSocket
    return context


SockAddr = tuple[socket.AddressFamily, tuple]


class _PinnedConnection:
    """Connect to addresses resolved and checked beforehand, never to a fresh DNS answer.

    urllib3 keeps `host` for the Host header, SNI and certificate checks; only the socket is ours:
    `_new_conn` (urllib3's one place that opens it) goes to the checked addresses, in order.
    """

    def __init__(self, host: str, port: int, *, addresses: list[SockAddr], deadline: _Deadline, **kwargs):
        self._addresses = addresses
        self._deadline = deadline
        super().__init__(host, port, timeout=max(deadline.remaining(), 0.001), **kwargs)

    def _new_conn(self) -> socket.socket:
        last_error: OSError = TimeoutError("download deadline passed")
        for family, sockaddr in self._addresses:
            sock = _DeadlineSocket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                _bound_by_deadline(sock, self._deadline)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            sock.deadline = self._deadline
            return sock
        raise last_error

    def connect(self) -> None:
        super().connect()
        # For https the socket is now the TLS socket wrapped around ours: bound it by the deadline too.
        if not isinstance(self.sock, _DeadlineSocket | _DeadlineSSLSocket):
            raise RuntimeError(f"unexpected socket type {type(self.sock).__name__}; the deadline cannot hold")
        self.sock.deadline = self._deadline


class _PinnedHTTPConnection(_PinnedConnection, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnection, HTTPSConnection):
    pass


# What the network can throw at us; each becomes a DownloadFailed through `_describe_failure`.
_NETWORK_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException, ValueError)

_REQUEST_HEADERS = {
    "Accept-Encoding": "identity",  # raw bytes only: the size cap counts what lands on disk
    "Accept": "*/*",
    "User-Agent": "kuiper-plugins",
    "Connection": "close",
}


@dataclass(frozen=True)
class _HttpDownload:
    """One http(s) download: its address policy, deadline, TLS setting, size cap and expected digest."""

    policy: _Policy
    deadline: _Deadline
    tls_verify: bool
    max_size: int
    expected: str | None

    def run(self, target: _HttpTarget, dest_dir: Path) -> Fetched:
        """Follow up to MAX_REDIRECTS redirects, checking every hop; stream the final 200 to dest_dir."""
        for hop in range(MAX_REDIRECTS + 1):
            conn, response = self._request(target, redirected=hop > 0)
            try:
                location = response.headers.get("Location")
                if response.status in REDIRECT_STATUSES and location:
                    target = _redirect_target(target, location)
                    log.debug("following redirect %d to %s", hop + 1, target.url)
                    continue
                self._check_answer(response)
                return self._save_body(response, target, dest_dir)
            finally:
                response.close()
                conn.close()
        raise DownloadFailed(f"too many redirects (more than {MAX_REDIRECTS})")

    def _request(self, target: _HttpTarget, *, redirected: bool):
        """Connect to a checked address of the target, send GET and read the answer's head."""
        addresses = self._checked_addresses(target, redirected)
        if target.scheme == "https":
            conn = _PinnedHTTPSConnection(
                target.host, target.port, addresses=addresses, deadline=self.deadline,
                ssl_context=_tls_context(self.tls_verify), server_hostname=target.host,
            )
        else:
            conn = _PinnedHTTPConnection(
                target.host, target.port, addresses=addresses, deadline=self.deadline
            )
        headers = {"Host": target.host_header, **_REQUEST_HEADERS}
        try:
            conn.request("GET", target.request_target, headers=headers,
                         preload_content=False, decode_content=False)
            return conn, conn.getresponse()
        except _NETWORK_ERRORS as exc:
            conn.close()
            raise DownloadFailed(_describe_failure(exc, target, self.deadline)) from exc
        except BaseException:
            conn.close()
            raise

    def _checked_addresses(self, target: _HttpTarget, redirected: bool) -> list[SockAddr]:
        """Resolve the target's host and return its addresses, or refuse if any one is not permitted."""
        def refuse(ip: object) -> DownloadFailed:
            where = f"redirected to {target.url}; " if redirected else ""
            entry = f"[{ip}]:{target.port}" if ":" in str(ip) else f"{ip}:{target.port}"
            return DownloadFailed(
                f"ip {ip} is in internal network ({where}downloads from loopback, private and link-local addresses"
                f" are refused: add {entry} to basic.privateNetAllowList, or set basic.enablePrivateNet to true)"
            )

        if self.deadline.expired():
            raise DownloadFailed(self.deadline.message())
        try:
            literal = ipaddress.ip_address(target.host)
        except ValueError:
            literal = None
        if literal is not None and not self.policy.permits(literal, target.port):
            raise refuse(literal)  # before the resolver, which may not even understand a zone
        try:
            # The resolver cannot be interrupted: its own timeout bounds it; the deadline is checked after.
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise DownloadFailed(f"cannot resolve host {target.host}") from exc
        if self.deadline.expired():
            raise DownloadFailed(self.deadline.message())
        addresses: list[SockAddr] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(sockaddr[0])
            except ValueError:
                raise refuse(sockaddr[0]) from None
            if not self.policy.permits(ip, target.port):
                raise refuse(ip)
            addresses.append((family, sockaddr))
        if not addresses:
            raise DownloadFailed(f"cannot resolve host {target.host}")
        return addresses

    def _check_answer(self, response: urllib3.BaseHTTPResponse) -> None:
        """Refuse a final answer that is not 200, is encoded, or announces more than the cap."""
        if response.status != 200:
            reason = response.reason or http.client.responses.get(response.status, "")
            raise DownloadFailed(f"cannot download the file with status: {response.status} {reason}".rstrip())
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadFailed(f"the server sent Content-Encoding {encoding}; only identity is accepted")
        declared = _declared_length(response.headers.get("Content-Length"))
        if declared is not None and declared > self.max_size:
            raise DownloadFailed(
                f"the server announces {declared} bytes, more than the limit of {self.max_size} bytes"
            )

    def _save_body(self, response: urllib3.BaseHTTPResponse, target: _HttpTarget, dest_dir: Path) -> Fetched:
        """Stream the raw body to a new temp file in dest_dir, hashing it; remove the file on any failure."""
        fd, name = _temporary_file(dest_dir)
        try:
            digest, size = hashlib.sha256(), 0
            try:
                progress.phase("download", _declared_length(response.headers.get("Content-Length")))
                while True:
                    if self.deadline.expired():
                        raise DownloadFailed(self.deadline.message())
                    try:
                        # What has arrived, up to a chunk: a slow body's bytes are counted as they come.
                        chunk = response.read1(CHUNK_SIZE, decode_content=False)
                    except _NETWORK_ERRORS as exc:
                        raise DownloadFailed(_describe_failure(exc, target, self.deadline)) from exc
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_size:
                        raise DownloadFailed(f"the file is larger than the limit of {self.max_size} bytes")
                    digest.update(chunk)
                    _write_all(fd, chunk)
                    progress.advance(len(chunk))
            finally:
                os.close(fd)
            _check_digest(self.expected, digest.hexdigest())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        log.debug("downloaded %s: %d bytes", target.url, size)
        return Fetched(path=Path(name), sha256=digest.hexdigest(), size=size)


def _redirect_target(current: _HttpTarget, location: str) -> _HttpTarget:
    """Return where a redirect leads: any http(s) URL (no .zip needed), parsed by the same rules."""
    url = location.strip()
    try:
        url = urljoin(current.url, url)
        return _parse_http_url(url)
    except ValueError:
        raise DownloadFailed(f"redirect to {url} refused: not a plain http or https URL") from None


def _declared_length(value: str | None) -> int | None:
    if value is None:
        return None
    lengths = [int(part) for part in value.split(",") if part.strip().isdigit()]
    return max(lengths) if lengths else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        _raise_if_disk_full(exc)
        raise


def _raise_if_disk_full(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(f"cannot save the download: {os.strerror(exc.errno)}") from exc


def _describe_failure(exc: BaseException, target: _HttpTarget, deadline: _Deadline) -> str:
    """Say in one line why a connection, request or read failed."""
    where = f"{target.host}:{target.port}"
    if deadline.expired() or _caused_by(exc, TimeoutError, urllib3.exceptions.TimeoutError):
        return deadline.message()
    tls = _caused_by(exc, ssl.SSLError)
    if tls is not None:
        reason = getattr(tls, "verify_message", None) or tls.reason or str(tls)
        if isinstance(tls, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {reason}"
        return f"TLS error with {where}: {reason}"
    if _caused_by(exc, ConnectionRefusedError):
        return f"connection to {where} refused"
    if _caused_by(exc, http.client.RemoteDisconnected):
        return f"{where} closed the connection without answering"
    if _caused_by(exc, http.client.IncompleteRead, urllib3.exceptions.IncompleteRead):
        return f"{where} closed the connection before the whole file arrived"
    if _caused_by(exc, ConnectionResetError):
        return f"connection reset by {where}"
    if _caused_by(exc, http.client.HTTPException, urllib3.exceptions.ProtocolError):
        return f"invalid HTTP answer from {where}"
    failure = _caused_by(exc, OSError)
    if failure is not None:
        return f"connection to {where} failed: {failure.strerror or type(failure).__name__}"
    return f"download from {where} failed ({type(exc).__name__})"


def _caused_by(exc: BaseException, *types: type[BaseException]) -> BaseException | None:
    """Return the first exception of `types` in exc's chain of causes (a bounded walk)."""
    for _ in range(16):
        if exc is None:
            return None
        if isinstance(exc, types):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
