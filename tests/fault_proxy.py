"""A fault-injecting HTTP proxy on loopback, in front of a test S3 server: answers 500/503 or drops the connection by rule."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# 500 and 503 answer as S3 does (InternalError, SlowDown); drop closes the socket before the request reaches
# the server; lost forwards it, then closes the socket instead of answering (done, but the client can't know);
# truncate forwards it and answers with the full Content-Length but half the body, then closes (a dropped body);
# slow forwards it after the proxy's `slow_s` seconds (a store answering late, or a long listing);
# unconditional forwards it without its If-None-Match and If-Match headers (a store that ignores conditional
# writes); 501 answers NotImplemented to a request that carries one (a store that refuses them), else forwards it.
FAULTS = ("500", "503", "drop", "lost", "truncate", "slow", "unconditional", "501")
_CONDITIONS = ("if-none-match", "if-match")
# Headers that belong to one hop (RFC 9110 section 7.6.1) or that the proxy sets itself.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
    "server",
}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault-proxy</RequestId></Error>"
)
_S3_ERRORS = {  # S3's own codes and messages
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
    "501": ("NotImplemented", "A header you provided implies functionality that is not implemented."),
}


@dataclass
class Rule:
    """Which requests fail, and how.

    A request matches when its method is in `methods` (all when empty), its path plus query matches
    `pattern` (all when None) and does not match `exclude` (e.g. listings: `[?&]list-type=`). Among
    matching requests every `every`-th fails (1: all of them), the fault cycling through `faults`:
    every=3, faults=("503", "500", "drop") fails requests 3, 6, 9 with 503, 500, drop.
    """

    every: int = 3
    faults: tuple[str, ...] = ("503",)
    methods: frozenset[str] = frozenset()
    pattern: re.Pattern[str] | None = None
    exclude: re.Pattern[str] | None = None
    seen: int = 0  # matching requests so far
    injected: dict[str, int] = field(default_factory=dict)  # fault -> count

    def __post_init__(self) -> None:
        if self.every < 1 or not self.faults or not set(self.faults) <= set(FAULTS):
            raise ValueError(f"every must be >= 1 and faults some of {FAULTS}, got {self.every}, {self.faults}")

    def matches(self, method: str, target: str) -> bool:
        target = urllib.parse.unquote(target)
        return (
            (not self.methods or method in self.methods)
            and (self.pattern is None or self.pattern.search(target) is not None)
            and (self.exclude is None or self.exclude.search(target) is None)
        )

    def decide(self) -> str | None:
        """Count one matching request; the fault to inject, or None to forward it."""
        self.seen += 1
        if self.seen % self.every:
            return None
        fault = self.faults[(self.seen // self.every - 1) % len(self.faults)]
        self.injected[fault] = self.injected.get(fault, 0) + 1
        return fault


class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:PORT", [Rule(...)]) as proxy:` then use `proxy.url` as the S3 endpoint.

    The first rule a request matches decides its fate (each rule counts its own requests). Bounded: at
    most `max_connections` client connections are served at once (more wait for a slot), and every
    socket, ours and the upstream one, times out after `timeout_s`. Rules can be swapped while it runs
    (`proxy.rules = [...]`; empty passes everything through).
    """

    def __init__(
        self, upstream: str, rules: list[Rule] | None = None, max_connections: int = 64, timeout_s: float = 30.0, slow_s: float = 1.0
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.slow_s = slow_s
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules = list(rules or [])
        self.timeout_s = timeout_s
        self.requests = 0  # every request seen, faulted or not
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._server = _Server(("127.0.0.1", 0), _handler_for(self), self._slots)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind, over all rules."""
        total: dict[str, int] = {}
        for rule in self.rules:
            for fault, count in rule.injected.items():
                total[fault] = total.get(fault, 0) + count
        return total

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.matches(method, target):
                    return rule.decide()
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        self._slots.acquire()  # a bounded number of handler threads
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler_for(proxy: FaultProxy) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        timeout = proxy.timeout_s

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()
            fault = proxy._decide(self.command, self.path)
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "slow":
                time.sleep(proxy.slow_s)
            conditional = any(name.lower() in _CONDITIONS for name in self.headers)
            if fault in _S3_ERRORS and (fault != "501" or conditional):
                code, message = _S3_ERRORS[fault]
                body = _ERROR_BODY.format(code=code, message=message).encode()
                self._answer(int(fault), [("Content-Type", "application/xml")], body)
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout_s)
            try:
                dropped = _HOP_HEADERS | (set(_CONDITIONS) if fault == "unconditional" else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                if fault == "lost":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                passed = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
                if fault == "truncate" and len(data) > 1:
                    self.close_connection = True
                    self._answer(response.status, passed + [("Content-Length", str(len(data)))], data[: len(data) // 2], set_length=False)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == "HEAD":  # no body, but the object's size must reach the client
                    passed.append(("Content-Length", response.getheader("Content-Length", "0")))
                    data = b""
                self._answer(response.status, passed, data, set_length=self.command != "HEAD", reason=response.reason)
            finally:
                upstream.close()

        def _answer(
            self, status: int, headers: Iterable[tuple[str, str]], data: bytes, set_length: bool = True, reason: str | None = None
        ) -> None:
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            if set_length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
