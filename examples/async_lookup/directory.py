"""A stand-in key directory for the async_lookup example: ``GET /keys/<api key>``.

It answers ``200 {"user": ..., "plan": ...}`` for a known key and ``404`` otherwise. The key
``key-slow`` takes a second to answer, to show that one slow lookup does not hold up other
requests. Run it beside the example::

    python examples/async_lookup/directory.py            # http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEYS: dict[str, dict[str, str]] = {
    "key-alice": {"user": "alice", "plan": "gold"},
    "key-bob": {"user": "bob", "plan": "free"},
    "key-slow": {"user": "sloane", "plan": "gold"},
}
DELAYS = {"key-slow": 1.0}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.asked: list[str] = []  # keys looked up so far, in arrival order


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        key = self.path.removeprefix("/keys/")
        self.server.asked.append(key)
        time.sleep(DELAYS.get(key, 0.0))
        found = KEYS.get(key)
        body = json.dumps(found if found else {"error": "unknown key"}).encode()
        self.send_response(200 if found else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: one line per lookup would drown the server's own logs


class Directory:
    """The directory in a background thread (used by the tests too).

    Example::

        with Directory() as directory:
            print(directory.url)          # http://127.0.0.1:<free port>
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port))
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def asked(self) -> list[str]:
        """The keys looked up so far, oldest first."""
        return list(self._server.asked)

    def __enter__(self) -> Directory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the async_lookup example's key directory")
    parser.add_argument("--port", type=int, default=8081)
    port = parser.parse_args().port
    with Directory(port=port) as directory:
        print(f"key directory on {directory.url}/keys/<key>; Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
