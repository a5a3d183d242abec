"""The HTTP/1.1 test client against a real local server that answers with a script."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from calloutkit.testing import http_request


class ScriptedServer:
    """Accepts connections on a free loopback port; to each, after reading the request head
    and its content-length body, writes ``reply`` byte for byte and closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(data)
                conn.sendall(self.reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        self._thread.join(5)


@pytest.fixture
def scripted() -> Iterator[Callable[[bytes], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(reply: bytes) -> ScriptedServer:
        servers.append(ScriptedServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


FINAL = (b"HTTP/1.1 201 Created\r\nx-final: yes\r\nContent-Length: 5\r\n"
         b"Connection: close\r\n\r\nhello")


@pytest.mark.parametrize("informational", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
], ids=["100", "102", "100-then-103"])
def test_informational_responses_are_skipped_for_the_final_one(scripted, informational):
    server = scripted(informational + FINAL)
    response = http_request(f"http://127.0.0.1:{server.port}/upload", "POST", body=b"data",
                            headers=[("expect", "100-continue")])
    assert response.status == 201
    assert response.header("x-final") == "yes"
    assert response.header("link") is None  # the 103's headers are not the response's
    assert response.body == b"hello"
    assert server.requests[0].startswith(b"POST /upload HTTP/1.1\r\n")


def test_chunked_response_after_100_continue_keeps_its_trailers(scripted):
    server = scripted(b"HTTP/1.1 100 Continue\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n0\r\nx-sum: 3\r\n\r\n")
    response = http_request(f"http://127.0.0.1:{server.port}/", "POST", chunks=[b"abc"])
    assert (response.status, response.body) == (200, b"abc")
    assert response.trailer("x-sum") == "3"


def test_101_switching_protocols_is_the_final_response(scripted):
    server = scripted(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                      b"connection: upgrade\r\n\r\n\x81\x05hello")
    response = http_request(f"http://127.0.0.1:{server.port}/ws",
                            headers=[("upgrade", "websocket")])
    assert response.status == 101
    assert response.header("upgrade") == "websocket"
    assert response.body == b""  # the bytes after it belong to the new protocol
