# The body of a "go"-language plugin for the handshake tests: eKuiper runs such an executable directly as
# `<exe> <json>`. The test writes it out with a #! line naming a Python that has pynng, and a run bit.
# It shows how it was started, dials the control channel as eKuiper's SDKs do, sends a message of its own
# (any message is a handshake to eKuiper) and waits for the reply that never comes.
import os
import sys

import pynng

print(f"gohand started in {os.getcwd()} with {sys.argv[1:]}")
with pynng.Req0(recv_timeout=600_000) as sock:
    sock.dial("ipc:///tmp/plugin_gohand.ipc", block=True)
    sock.send(b"hello from gohand")
    print("gohand sent its handshake")
    sock.recv()
