"""A loopback HTTP server for the `file` URLs of install requests: it serves a folder and counts what it was asked.

A test puts a zip in `root`, gives the service `url(name)`, and afterwards reads `requests` to see how many
downloads the service made. `routes` lets a test answer a path itself (a slow body, a redirect, an error).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        hook = self.server.routes.get(self.path.split("?")[0])
        if hook is not None:
            hook(self)
            return
        super().do_GET()


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving `root`; counts requests; routes override paths."""

    def __init__(self, root: Path):
        self.root = root
        handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.routes = {}
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def requests(self) -> list[str]:
        """The path (with its query) of every GET so far, in the order they came."""
        return self.httpd.requests

    @property
    def routes(self) -> dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]:
        """Map a path to a function(handler) that answers it instead of the file tree."""
        return self.httpd.routes

    def url(self, name: str) -> str:
        """The URL of `name` under `root`, as an install request's `file`."""
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def start(self) -> FileServer:
        """Serve from a thread of this process; return self."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
