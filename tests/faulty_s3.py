"""A fault-injecting HTTP proxy in front of the moto server: S3 that throttles, resets and stalls.

    proxy = FaultyS3(server.endpoint).start()     # a free port on 127.0.0.1; point AWS_ENDPOINT_URL at it
    proxy.add(Fault("503", method="PUT", path=r"/state-[^/?]*\\.pt"))              # one SlowDown
    proxy.add(Fault("reset_response", path=r"manifest\\.json", times=0))          # every manifest answer cut
    proxy.add(Fault("stall", method="GET", seconds=30, skip=2, times=1))        # the 3rd GET hangs 30 s
    ...
    proxy.served("503")   # requests answered with that fault so far
    proxy.bytes_served(r"\\.pt")  # answer body bytes of GETs whose target matches (a counter at S3)
    proxy.stop()

Faults (each applies to the requests whose method and ``method target`` match, after ``skip`` of them
went through, to ``times`` of them (0: all), or with ``every`` to one in ``every``):

* ``503``: the whole request is read, then answered ``503 Slow Down`` with S3's XML error body.
* ``reset_request``: the request head and half its body are read, then the connection is reset (RST).
* ``reset_response``: the request reaches the store, whose answer is cut after half of its body (half of
  its head when it has no body) by a reset: the client cannot know whether the store acted on it.
* ``stall``: the whole request is read, then the connection is held open, unanswered, for ``seconds``
  and reset.

Every other request is forwarded unchanged (one upstream connection per request; the client keeps its
connection alive). ``Expect: 100-continue`` is answered by the proxy.
"""

from __future__ import annotations

import re
import socket
import socketserver
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

KINDS = ("503", "reset_request", "reset_response", "stall")
_HEAD_LIMIT = 64 << 10


@dataclass
class Fault:
    kind: str
    method: str = ""  # "" = any method
    path: str = ""  # regex searched in the request target (path and query); "" = any
    skip: int = 0  # matching requests let through before the fault applies
    times: int = 1  # requests it applies to after that (0 = every one)
    every: int = 0  # apply to one matching request in `every` (after skip), up to `times`
    seconds: float = 0.0  # how long a stall holds the connection
    seen: int = field(default=0, init=False)
    applied: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {KINDS}")

    def take(self, method: str, target: str) -> bool:
        """Whether this fault applies to the request (and count it)."""
        if self.method and method != self.method or self.path and not re.search(self.path, target):
            return False
        self.seen += 1
        index = self.seen - self.skip  # 1-based among the requests after the skipped ones
        if index < 1 or self.times and self.applied >= self.times:
            return False
        if self.every and (index - 1) % self.every:
            return False
        self.applied += 1
        return True


@dataclass
class Served:
    method: str
    target: str
    fault: str  # "" when forwarded unchanged
    start: float
    end: float = 0.0
    body_bytes: int = 0  # bytes of the store's answer body passed on to the client (what a counter at S3 sees)


class FaultyS3:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.log: list[Served] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._clients: set[socket.socket] = set()
        self.endpoint = ""

    # ------------------------------------------------------------------------------------------------
    # Control

    def start(self) -> FaultyS3:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.request_queue_size = 128  # clients reconnect in bursts after resets
        server.server_bind()
        server.server_activate()
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="faulty-s3").start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            _reset(sock)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def served(self, kind: str | None = None) -> list[Served]:
        """Requests answered so far, those with fault ``kind`` only when given ("" = forwarded)."""
        with self._lock:
            return [s for s in self.log if kind is None or s.fault == kind]

    def bytes_served(self, path: str = "", method: str = "GET") -> int:
        """Answer body bytes passed on so far for requests of ``method`` whose target matches ``path``."""
        with self._lock:
            return sum(s.body_bytes for s in self.log if s.method == method and re.search(path, s.target))

    def _match(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.take(method, target):
                    return fault
        return None

    # ------------------------------------------------------------------------------------------------
    # One client connection: requests one after the other (keep-alive)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.add(client)
        reader = client.makefile("rb")
        try:
            while not self._stopping.is_set():
                head = _read_head(reader)
                if not head:
                    return
                method, target, headers = _parse_request(head)
                fault = self._match(method, target)
                record = Served(method, target, fault.kind if fault else "", time.time())
                with self._lock:
                    self.log.append(record)
                try:
                    keep_open = self._answer(client, reader, head, method, headers, fault, record)
                finally:
                    record.end = time.time()
                if not keep_open:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(client)
            try:
                client.close()
            except OSError:
                pass

    def _answer(self, client: socket.socket, reader, head: bytes, method: str, headers: dict[str, str],
                fault: Fault | None, record: Served) -> bool:
        if headers.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if fault is not None and fault.kind == "reset_request":
            length = int(headers.get("content-length", "0") or 0)
            if length:
                reader.read(max(1, length // 2))
            _reset(client)
            return False
        body = _read_body(reader, headers)
        if fault is not None and fault.kind == "503":
            client.sendall(_slow_down(method))
            return True
        if fault is not None and fault.kind == "stall":
            self._stopping.wait(fault.seconds)
            _reset(client)
            return False
        response = self._forward(head, body)
        if fault is not None and fault.kind == "reset_response":
            split = response.find(b"\r\n\r\n") + 4
            cut = split + (len(response) - split) // 2 if len(response) > split else split // 2
            client.sendall(response[:cut])
            record.body_bytes = max(0, cut - split)
            _reset(client)
            return False
        client.sendall(response)
        record.body_bytes = len(response) - response.find(b"\r\n\r\n") - 4
        return headers.get("connection", "").lower() != "close"

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send one request upstream on a fresh connection; its whole answer, re-framed for keep-alive."""
        lines = head.split(b"\r\n")
        kept = [lines[0]] + [line for line in lines[1:] if line and line.split(b":", 1)[0].strip().lower()
                             not in (b"connection", b"expect", b"keep-alive")]
        request = b"\r\n".join(kept + [b"Connection: close", b"", b""]) + body
        with socket.create_connection(self.upstream, timeout=120) as upstream:
            upstream.sendall(request)
            chunks = []
            while data := upstream.recv(1 << 20):
                chunks.append(data)
        raw = b"".join(chunks)
        split = raw.find(b"\r\n\r\n")
        if split < 0:
            raise OSError("upstream closed without an answer")
        status_line, *header_lines = raw[:split].split(b"\r\n")
        payload = raw[split + 4:]
        header_lines = [h for h in header_lines
                        if h.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")]
        names = {h.split(b":", 1)[0].strip().lower() for h in header_lines}
        status = int(status_line.split()[1])
        if b"content-length" not in names and b"transfer-encoding" not in names and status not in (204, 304):
            header_lines.append(b"Content-Length: %d" % len(payload))
        return b"\r\n".join([status_line, *header_lines, b"", b""]) + payload


# ----------------------------------------------------------------------------------------------------------
# HTTP/1.1 framing


def _read_head(reader) -> bytes:
    lines = []
    size = 0
    while True:
        line = reader.readline(_HEAD_LIMIT)
        if not line:
            return b""
        if line in (b"\r\n", b"\n") and not lines:
            continue  # stray CRLF between requests
        lines.append(line)
        size += len(line)
        if line in (b"\r\n", b"\n") or size > _HEAD_LIMIT:
            return b"".join(lines)


def _parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    text = head.decode("latin-1")
    request_line, *header_lines = text.split("\r\n")
    method, target = request_line.split(" ")[:2]
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _read_body(reader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = []
        while True:
            size_line = reader.readline(_HEAD_LIMIT)
            out.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = reader.readline(_HEAD_LIMIT)
                    out.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(out)
            out.append(reader.read(size + 2))
    length = int(headers.get("content-length", "0") or 0)
    return reader.read(length) if length else b""


def _slow_down(method: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message>"
            b"<RequestId>" + request_id.encode() + b"</RequestId><HostId>faulty-s3</HostId></Error>")
    head = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            b"x-amz-request-id: " + request_id.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    return head if method == "HEAD" else head + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST) instead of an orderly FIN, as a crashed peer or a load balancer does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
