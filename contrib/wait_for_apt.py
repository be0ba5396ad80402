"""Wait until no other apt or dpkg holds its locks, saying who holds them; give up after a bound.

`make test` installs the Debian packages its tests drive with apt-get. On a machine where another apt runs
(unattended-upgrades at boot, a second terminal), apt-get would fail at once on the dpkg lock. This waits for
the locks instead, up to --timeout seconds, printing which lock and which process it waits for, every
--every seconds. It only asks the kernel who holds each lock (fcntl F_GETLK), never takes one, so it cannot
keep the other apt waiting.

Exit status: 0 when every lock is free, 1 when one is still held at the deadline.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
import sys
import time
from pathlib import Path

# struct flock as Linux lays it out on 64-bit machines: type, whence, (padding), start, len, pid, (padding).
FLOCK = struct.Struct("hh4xqqi4x")


def holder(lock: Path) -> int | None:
    """The pid of the process holding `lock` (a POSIX record lock, as apt and dpkg take), or None."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None  # no such lock file: nothing holds it
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    finally:
        os.close(fd)
    kind, _whence, _start, _length, pid = FLOCK.unpack(answer)
    return None if kind == fcntl.F_UNLCK else pid


def command_of(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split()
    except OSError:
        return "?"
    shown = " ".join(words)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def main(argv: list[str] | None = None) -> int:
    """Wait for the locks named on the command line; 0 once all are free, 1 at the deadline."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait at most (default 600)")
    parser.add_argument("--every", type=float, default=5, help="seconds between looks (default 5)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    while True:
        held = [(lock, pid) for lock in args.locks if (pid := holder(lock)) is not None]
        if not held:
            return 0
        lock, pid = held[0]
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"{lock} is still held by process {pid} ({command_of(pid)}) after {args.timeout:g} s: giving up;"
                  " run make test again once that apt has finished", file=sys.stderr, flush=True)
            return 1
        print(f"waiting for {lock}, held by process {pid} ({command_of(pid)}): another apt is at work"
              f" (at most {left:.0f} s more)", flush=True)
        time.sleep(min(args.every, left))  # polling another program's lock, bounded by the deadline


if __name__ == "__main__":
    sys.exit(main())
