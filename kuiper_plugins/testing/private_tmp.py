"""Run a command with a /tmp of its own: the test engine's sockets never meet anyone else's.

eKuiper's portable runtime listens on ``ipc:///tmp/plugin_<name>.ipc`` and opens its data channels in /tmp
as well. A kuiperd started by a test on a shared machine would otherwise take those names from another
engine, another test run, or a test that checks the host's /tmp stays empty of them.

Run inside ``unshare --mount --propagation private`` (a mount namespace of its own)::

    python private_tmp.py KEEP... -- COMMAND [ARG...]

A fresh tmpfs is mounted on /tmp, each KEEP folder that lies below /tmp (the engine's home, the SDK's
venv, ...) is bound back at its own path, and COMMAND replaces this process, so signals reach it directly.
"""

from __future__ import annotations

import ctypes
import os
import sys

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384


def outermost_below_tmp(folders: list[str]) -> list[str]:
    """The folders below /tmp, none inside another (binding the outer one brings the inner along)."""
    below = sorted({os.path.realpath(folder) for folder in folders})
    below = [folder for folder in below if folder.startswith("/tmp/")]
    return [folder for folder in below if not any(folder.startswith(other + "/") for other in below)]


def main(argv: list[str]) -> None:
    """Mount the private /tmp, bind the kept folders back, then exec the command."""
    split = argv.index("--")
    keep, command = argv[:split], argv[split + 1:]
    # Opened before the tmpfs hides them; bound back through /proc/self/fd, which the kernel follows.
    held = {folder: os.open(folder, os.O_PATH | os.O_DIRECTORY) for folder in outermost_below_tmp(keep)}
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        encoded = [None if part is None else part.encode() for part in (source, target, fstype, data)]
        if libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]) != 0:
            error = ctypes.get_errno()
            sys.exit(f"private_tmp: mount {source} on {target}: {os.strerror(error)}")

    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=256m")
    for folder, fd in held.items():
        os.makedirs(folder, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", folder, None, MS_BIND | MS_REC, None)
        os.close(fd)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
