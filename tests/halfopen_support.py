"""Half-open gRPC calls at the HTTP/2 level: a raw client over a socket, for the admission tests (issue 16).

Each call is a HEADERS frame (no END_STREAM) and a DATA frame that holds the gRPC length prefix of a message
and only part of that message: the server has the call, and its request never completes. No stub can do
that, so this writes the frames itself (RFC 9113; header fields as HPACK literals, RFC 7541 §6.2.2).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM = END_HEADERS = 0x4
ACK = 0x1
# A gRPC message frame that announces 1,000 bytes and carries 3 of them.
PARTIAL_MESSAGE = struct.pack(">BI", 0, 1000) + b"\x0a\x01x"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _integer(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (a string's length, Huffman bit clear)."""
    if value < 127:
        return bytes([value])
    out, value = bytearray([127]), value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def header_block(fields: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names (first byte 0x00)."""
    block = bytearray()
    for name, value in fields:
        raw_name, raw_value = name.encode(), value.encode()
        block += b"\x00" + _integer(len(raw_name)) + raw_name + _integer(len(raw_value)) + raw_value
    return bytes(block)


class HalfOpenConnection:
    """One HTTP/2 connection that opens calls and never finishes their requests; it answers SETTINGS and PING."""

    def __init__(self, port: int, ca: Path | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        if ca is not None:  # TLS without a client certificate
            context = ssl.create_default_context(cafile=str(ca))
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname="localhost")
        self._sock = sock
        self._authority = f"127.0.0.1:{port}"
        self._scheme = "https" if ca is not None else "http"
        self._next_stream = 1
        self._lock = threading.Lock()
        self.ended: set[int] = set()  # streams the server ended (trailers with END_STREAM, or RST_STREAM)
        self._send(PREFACE + frame(SETTINGS, 0, 0))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def open_call(self, method: str) -> None:
        """A call to `method` (a path such as '/pkg.Service/Method') with no token and a request cut short."""
        headers = [
            (":method", "POST"),
            (":scheme", self._scheme),
            (":path", method),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        with self._lock:
            stream, self._next_stream = self._next_stream, self._next_stream + 2
            self._send(frame(HEADERS, END_HEADERS, stream, header_block(headers)))
            self._send(frame(DATA, 0, stream, PARTIAL_MESSAGE))

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                    with self._lock:
                        if kind == SETTINGS and not flags & ACK:
                            self._send(frame(SETTINGS, ACK, 0))
                        elif kind == PING and not flags & ACK:
                            self._send(frame(PING, ACK, 0, payload))
                        elif kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                            self.ended.add(stream)
        except OSError:
            return

    @property
    def refused(self) -> int:
        return len(self.ended)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(5.0)


@contextlib.contextmanager
def half_open_calls(
    port: int, methods: list[str], calls: int, connections: int, ca: Path | None = None
) -> Iterator[list[HalfOpenConnection]]:
    """`calls` half-open calls spread over `connections` connections, cycling through `methods`; held open
    (from the client's side: it never ends them) until the block exits."""
    opened = [HalfOpenConnection(port, ca) for _ in range(connections)]
    try:
        for index in range(calls):
            opened[index % connections].open_call(methods[index % len(methods)])
        yield opened
    finally:
        for connection in opened:
            connection.close()
