"""A loopback HTTP server for download tests (no network needed)."""

from __future__ import annotations

import http.server
import threading
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[bytes, int | None]] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # the name http.server calls
        self.requests.append(self.path)
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, declared = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # the base signature
        pass


class LoopbackServer:
    """Serves byte strings at paths on 127.0.0.1; ``declared`` lets a route lie about its
    Content-Length (an interrupted transfer)."""

    def __init__(self) -> None:
        handler = type("Handler", (_Handler,), {"routes": {}, "requests": []})
        self.handler: type[_Handler] = handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def serve(self, path: str, body: bytes, declared: int | None = None) -> str:
        self.handler.routes[path] = (body, declared)
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    @property
    def requests(self) -> list[str]:
        return self.handler.requests

    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
