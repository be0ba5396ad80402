"""One API request against KUIPER_HOME in a process of its own, for tests that kill it or trace it.

    python power_cut_child.py <home> <METHOD> <path> [<json body>]

Builds the service exactly as a worker does (settings, start-up recovery included), sends the request
through Flask's test client and prints `ANSWERED <status>`: in a trace, that write marks the moment the
caller would have been answered.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import LoopbackPeer, client_class_for  # this file lives beside conftest.py

from kuiper_plugins import create_app
from kuiper_plugins.settings import Settings


def main() -> int:
    home, method, path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    body = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    app = create_app(Settings(home=home), stop_service=lambda: None)
    app.test_client_class = client_class_for(LoopbackPeer())  # the request comes from a real local connection
    response = app.test_client().open(path, method=method, json=body)
    sys.stdout.write(f"ANSWERED {response.status_code}\n")
    sys.stdout.flush()
    # Gone at once, as a worker that still holds its registry connection is when the power goes: no
    # checkpoint on close, no clean-up after the answer.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
