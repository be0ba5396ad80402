"""Who is on the other end of a local connection: the uid the kernel records for the client's socket.

A TCP connection on this machine's loopback has both of its sockets in our network namespace, and
Linux records, for every socket, the uid of the process that created it. Two ways to read it:

- NETLINK_SOCK_DIAG (inet_diag): ask for the socket with the exact four-tuple (the client's address
  and port as its local end, ours as its remote end); one request, one reply, a few microseconds.
  Unprivileged processes may ask (it is what `ss` uses).
- /proc/net/tcp and /proc/net/tcp6: every socket is a line with its local and remote address, state,
  uid and inode; the client's end is the line whose local address is the client's. Read whole, so the
  cost grows with the number of sockets on the machine: the fallback.

A socket that no process holds any more (the client closed it; the kernel keeps it in TIME_WAIT or as
an orphan until the exchange ends) is reported with inode 0 and, in TIME_WAIT, uid 0: it names nobody,
so it is no answer. A Unix domain socket has SO_PEERCRED: the uid of the process that connected.
Nothing here decides who is allowed; `kuiper_plugins.web.access` does.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import socket
import struct
import sys
import threading

Endpoint = tuple[str, int]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_COND = 7
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_TIME_WAIT = 6
TCP_LISTEN = 10
LIVE_STATES = sum(1 << state for state in range(1, 12) if state not in (TCP_TIME_WAIT, TCP_LISTEN))

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, extensions, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # inet_diag_sockid: sport, dport, src, dst (network order) ...
_SOCKID_TAIL = struct.Struct("=III")  # ... then interface and the cookie (host order)
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retransmits
_MSG_TAIL = struct.Struct("=IIIII")  # after the sockid: expires, rqueue, wqueue, uid, inode
_ERROR = struct.Struct("=i")
_EXACT_REQUEST = struct.Struct("=IHHII" "BBBBI" "HH16s16s" "III")  # nlmsghdr, inet_diag_req_v2 with its sockid
_NLATTR = struct.Struct("=HH")  # length, type
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, offset if true, offset if false
_HOSTCOND = struct.Struct("=BBxxi")  # inet_diag_hostcond: family, prefix length, port; the address follows
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_LINUX = sys.platform.startswith("linux")
PROC_TABLES = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}


class PeerUnknown(Exception):
    """The kernel could not say who holds the client's end of a connection; the message says why."""


class _Serving(threading.local):
    """The connection this thread is serving, with its two ends as accept() and the listener gave them."""

    sock: socket.socket | None = None
    ends: tuple[Endpoint, Endpoint] | None = None


_serving = _Serving()


def serving(sock: socket.socket | None, client: Endpoint | None = None, server: Endpoint | None = None) -> None:
    """Say which accepted TCP connection this thread serves now (None once done), and its two ends.

    A worker that accepted the connection itself knows the client's end from accept() and ours from a
    listener bound to one address; `peer_of_socket` then asks the kernel for the owner only, without
    asking it for the ends again. Only this very socket object is answered from it.
    """
    if sock is None or client is None or server is None:
        _serving.sock = _serving.ends = None
    else:
        _serving.sock, _serving.ends = sock, (client[:2], server[:2])


def peer_of_socket(sock: socket.socket) -> frozenset[int]:
    """Return the uid of the process on the other end of an accepted connection (a set of one).

    TCP: the client's socket is looked up by the connection's four-tuple. Unix domain: SO_PEERCRED.
    """
    if _serving.sock is sock:
        return owners(*_serving.ends)
    try:
        client = sock.getpeername()
        if isinstance(client, str | bytes):  # a Unix domain socket's peer has a path (or none), not a port
            return frozenset({_peer_credentials(sock)})
        server = sock.getsockname()
    except OSError as exc:
        raise PeerUnknown(f"the connection is gone ({exc.strerror})") from None
    return owners(client[:2], server[:2])


def _peer_credentials(sock: socket.socket) -> int:
    if not hasattr(socket, "SO_PEERCRED"):
        raise PeerUnknown(f"local callers can be identified only on Linux, not on {sys.platform}")
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def owners(client: Endpoint, server: Endpoint | None = None) -> frozenset[int]:
    """Return the uids holding a live socket whose local end is `client` (and remote end `server`, if given).

    With `server` the answer is the one socket of that connection (sock_diag, else /proc). Without it,
    every live socket bound to the client's address and port counts: the caller can then require all
    of them to be allowed, so that another socket sharing the port cannot lend the caller its owner.
    """
    if not _LINUX:
        raise PeerUnknown(f"local callers can be identified only on Linux, not on {sys.platform}")
    client = _normalise(client)
    try:
        if server is not None:
            return frozenset({owner_by_sock_diag(client, _normalise(server))})
        return owners_by_sock_diag_dump(client)
    except _DiagUnavailable:
        return owners_from_proc(client, _normalise(server) if server is not None else None)


class _DiagUnavailable(Exception):
    """This kernel or sandbox offers no inet_diag over netlink: read /proc instead."""


def owner_by_sock_diag(client: Endpoint, server: Endpoint) -> int:
    """Return the uid of the socket with local end `client` and remote end `server`, asked of inet_diag."""
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    client_address, server_address = _packed(family, client[0]), _packed(family, server[0])
    with _shared.lock:
        diag = _shared.open()
        _shared.sequence = sequence = (_shared.sequence + 1) & 0xFFFFFFFF
        # The whole request in one pack: nlmsghdr, inet_diag_req_v2 and its sockid (ports in network order).
        request = _EXACT_REQUEST.pack(
            _EXACT_REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0,
            family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
            socket.htons(client[1]), socket.htons(server[1]), client_address, server_address,
            0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE,
        )
        try:
            diag.sendto(request, (0, 0))
            # The kernel answers within sendto, so the reply is already queued: never wait for it. Replies
            # to an earlier request that went unread (there should be none) are skipped by their number.
            for _ in range(8):
                reply = diag.recv(8192, socket.MSG_DONTWAIT)
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply)
                if seq == sequence:
                    break
            else:
                raise _DiagUnavailable("no reply with the request's sequence number")
        except OSError as exc:
            _shared.close()
            raise _DiagUnavailable(str(exc)) from None
    body = reply[_NLMSGHDR.size:length]
    if kind == NLMSG_ERROR:
        code = -_ERROR.unpack_from(body)[0]
        if code == errno.ENOENT:
            raise PeerUnknown(f"no socket on this machine has the client's end {_shown(client)} of the connection")
        raise _DiagUnavailable(os.strerror(code))
    if kind != SOCK_DIAG_BY_FAMILY:
        raise _DiagUnavailable(f"unexpected netlink message type {kind}")
    state = _MSG_HEAD.unpack_from(body)[1]
    uid, inode = _MSG_TAIL.unpack_from(body, _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size)[3:]
    if inode == 0 or state == TCP_TIME_WAIT:
        raise PeerUnknown(f"the client's socket {_shown(client)} is already closed; it names no user")
    return uid


def owners_by_sock_diag_dump(client: Endpoint) -> frozenset[int]:
    """Return the uids of the live sockets whose local end is `client`, from an inet_diag dump.

    The kernel filters the dump (a one-instruction program matching the local address and port), so
    the answer costs little even with thousands of other sockets on the machine.
    """
    cond_family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    address = socket.inet_pton(cond_family, client[0])
    length = _BC_OP.size + _HOSTCOND.size + len(address)
    program = (_BC_OP.pack(INET_DIAG_BC_S_COND, length, length + 4)
               + _HOSTCOND.pack(cond_family, 8 * len(address), client[1]) + address)
    attribute = _NLATTR.pack(_NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program
    found: set[int] = set()
    closed = False
    # An IPv4 client may hold an IPv6 socket talking to a mapped address: ask both tables.
    families = (socket.AF_INET, socket.AF_INET6) if cond_family == socket.AF_INET else (socket.AF_INET6,)
    try:
        diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise _DiagUnavailable(str(exc)) from None
    with diag:
        diag.settimeout(2.0)
        for sequence, family in enumerate(families, start=1):
            request = (
                _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, LIVE_STATES)
                + _SOCKID.pack(0, 0, bytes(16), bytes(16))
                + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
                + attribute
            )
            header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                                    NLM_F_REQUEST | NLM_F_DUMP, sequence, 0)
            try:
                diag.sendto(header + request, (0, 0))
                for state, uid, inode in _dump_entries(diag, sequence):
                    if inode == 0 or state == TCP_TIME_WAIT:
                        closed = True
                    elif state != TCP_LISTEN:
                        found.add(uid)
            except OSError as exc:
                raise _DiagUnavailable(str(exc)) from None
    if not found:
        if closed:
            raise PeerUnknown(f"the client's socket {_shown(client)} is already closed; it names no user")
        raise PeerUnknown(f"no socket on this machine has the client's end {_shown(client)} of the connection")
    return frozenset(found)


def _dump_entries(diag: socket.socket, sequence: int):
    """Yield (state, uid, inode) of each socket a dump reports, until its end (bounded by the timeout)."""
    for _ in range(100000):
        reply = diag.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(reply):
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply, offset)
            if length < _NLMSGHDR.size:
                raise _DiagUnavailable("malformed netlink reply")
            body = reply[offset + _NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3
            if seq != sequence:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                raise _DiagUnavailable(os.strerror(-_ERROR.unpack_from(body)[0]))
            if kind == SOCK_DIAG_BY_FAMILY:
                state = _MSG_HEAD.unpack_from(body)[1]
                uid, inode = _MSG_TAIL.unpack_from(body, _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size)[3:]
                yield state, uid, inode
    raise _DiagUnavailable("the dump did not end")


class _SharedDiag:
    """One netlink socket per process for the exact lookups, used under a lock (a lookup is microseconds).

    Not one per thread: threads that come and go (a thread per request) would each leave one behind.
    A forked child (a gunicorn worker forked by a master that looked something up) starts afresh:
    its own socket, and a lock no thread of the parent can be holding.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.socket: socket.socket | None = None
        self.sequence = 0

    def open(self) -> socket.socket:
        if self.socket is None:
            try:
                self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            except (OSError, AttributeError) as exc:
                raise _DiagUnavailable(str(exc)) from None
        return self.socket

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = None

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.close()  # the child's copy of the descriptor; the parent's stays open


_shared = _SharedDiag()
atexit.register(_shared.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shared.after_fork)


def owners_from_proc(client: Endpoint, server: Endpoint | None = None) -> frozenset[int]:
    """Return the uids of live sockets listed in /proc/net/tcp{,6} with local end `client` (remote `server`)."""
    found: set[int] = set()
    closed = False
    for family, path in PROC_TABLES.items():
        local = _proc_endpoint(family, client)
        if local is None:
            continue
        remote = _proc_endpoint(family, server) if server is not None else None
        try:
            with open(path, encoding="ascii") as table:
                next(table, None)  # the column titles
                for line in table:
                    fields = line.split()
                    if len(fields) < 10 or fields[1] != local or (remote is not None and fields[2] != remote):
                        continue
                    state, uid, inode = int(fields[3], 16), int(fields[7]), int(fields[9])
                    if state == TCP_LISTEN:
                        continue
                    if inode == 0 or state == TCP_TIME_WAIT:
                        closed = True
                        continue
                    found.add(uid)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PeerUnknown(f"cannot read {path}: {exc.strerror}") from None
    if not found:
        if closed:
            raise PeerUnknown(f"the client's socket {_shown(client)} is already closed; it names no user")
        raise PeerUnknown(f"no socket on this machine has the client's end {_shown(client)} of the connection")
    return frozenset(found)


def _normalise(endpoint: Endpoint) -> Endpoint:
    """An IPv4 address for an IPv4-mapped IPv6 one, no scope id; the port as an int."""
    address = endpoint[0]
    if ":" not in address:  # IPv4, the common case
        _packed(socket.AF_INET, address)
        return (address, int(endpoint[1]))
    address = address.split("%", 1)[0]
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        raise PeerUnknown(f"the client address {address[:60]!r} is not an IP address") from None
    return (str(mapped) if mapped is not None else address, int(endpoint[1]))


def _packed(family: int, address: str) -> bytes:
    try:
        return socket.inet_pton(family, address)  # struct's "16s" pads an IPv4 address with zeros
    except OSError:
        raise PeerUnknown(f"the client address {address[:60]!r} is not an IP address") from None


def _proc_endpoint(family: int, endpoint: Endpoint) -> str | None:
    """How /proc/net/tcp{,6} spells an endpoint: the address as 32-bit words in host order, the port in hex."""
    address, port = endpoint
    if ":" not in address:
        raw = socket.inet_pton(socket.AF_INET, address)
        if family == socket.AF_INET6:  # an IPv6 socket talking IPv4 lists the mapped address
            raw = b"\0" * 10 + b"\xff\xff" + raw
    elif family == socket.AF_INET6:
        raw = socket.inet_pton(socket.AF_INET6, address)
    else:
        return None
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def _shown(endpoint: Endpoint) -> str:
    address, port = endpoint
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
