"""A loopback HTTP server that answers GETs in JSON, for tests that stand in for eKuiper's REST API."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

# answer(path, headers) -> (status, body): a str body is sent as it is, anything else as its JSON
Answer = Callable[[str, Any], tuple[int, Any]]


class JsonStub:
    """Serves `answer` on 127.0.0.1 from a thread until `stop()`; `url` is where."""

    def __init__(self, answer: Answer):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = answer(self.path, self.headers)
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
