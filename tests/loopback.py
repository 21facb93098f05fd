"""The tests' fake servers (generation, judge, SGLang / vLLM) share this: a threaded HTTP
server bound to 127.0.0.1 on a free port, and the JSON reply every handler writes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object) -> None:
    """Writes ``body`` (bytes as they are, anything else as JSON) with ``status``; a client that
    timed out and left is not an error."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_json(handler: BaseHTTPRequestHandler) -> dict:
    """The request's JSON body ({} when empty)."""
    return json.loads(handler.rfile.read(int(handler.headers.get("Content-Length", 0))) or b"{}")


class Loopback:
    """``handler`` (a `BaseHTTPRequestHandler` class) served on 127.0.0.1 from its own thread;
    ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)
