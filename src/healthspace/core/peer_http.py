"""The HTTP client the DSP manager posts peer messages with, and the lab calls data planes with: a
pool of keep-alive sockets, the request head written here and the answer framed by httptools' parser
(llhttp, the parser under Node.js and uvicorn) (ADR 0008).

A DSP message is one small POST with a fresh request token to a peer we talk to constantly, so the
cost that matters is the client's CPU per request: httpx spent ≈ 0.7 ms on one loopback POST,
`http.client` ≈ 0.25-0.35 ms (≈ 30 µs of it parsing the answer's headers with the `email` package),
this ≈ 0.1 ms. What the manager needs from a client is kept: per-request timeouts (connect and every
read or write), keep-alive connections pooled per peer, TLS with certificate and host-name checks
(`https://` URLs; httpx's trust store unless a context is given), TCP_NODELAY, a bounded answer
size, and one exception type (`PeerHttpError`) for every failure to get an answer. What we write is
checked (no control characters in the target or a header value, header names are tokens); what we
read is framed by the parser alone: Content-Length, chunked, or the end of the connection, interim
1xx answers skipped, and an answer cut short is an error, never a shorter body. Like the httpx
client it replaced (whose custom transport ignored the proxy environment), it connects to peers
directly.

`PeerHttpClient` is what `manager.peer_http_client()` returns: an `httpx.Client` (the management
API's occasional calls keep httpx's convenience) that carries a `PeerHttp` for the manager's
deliveries; both share the timeout and are closed together.
"""

from __future__ import annotations

import functools
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

__all__ = ["MAX_ANSWER_BYTES", "PeerHttp", "PeerHttpClient", "PeerHttpError", "PeerResponse"]

# A DSP answer is a few kB; anything far larger is not one, and is not read into memory.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# uvicorn closes an idle keep-alive connection after 5 s; one idle for longer than this is not
# reused, so we do not send a request into a connection the server is closing.
_KEEPALIVE_S = 4.0


class PeerHttpError(Exception):
    """No (complete) answer: connection refused or reset, timeout, TLS failure, malformed or oversized
    answer. `str()` names the cause without the request's contents (never the token)."""


@dataclass(frozen=True, slots=True)
class PeerResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


_Key = tuple[str, str, int]  # scheme, host, port


class _Wire:
    """One keep-alive connection to a peer: a socket, TLS-wrapped for https."""

    __slots__ = ("sock",)

    def __init__(
        self, key: _Key, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        scheme, host, port = key
        sock: socket.socket = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            # Head and body leave in one write, but an answer must not wait for a delayed ACK either.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = (tls or _default_tls()).wrap_socket(sock, server_hostname=host)  # connect timeout
            sock.settimeout(read_timeout)  # every read and write from now on
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        self.sock.close()


class _Answer:
    """The response parser's callbacks (httptools, i.e. llhttp: framing by Content-Length or chunked
    transfer coding, keep-alive), collecting the status and a body of at most `limit` bytes."""

    __slots__ = (
        "body",
        "complete",
        "delimited",
        "headers_done",
        "keep_alive",
        "limit",
        "parser",
        "size",
        "status",
        "stray",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0
        self.headers_done = False
        self.delimited = False  # Content-Length or Transfer-Encoding: else the body ends at close
        self.complete = False
        self.stray = False  # bytes after the answer: the connection is out of step
        self.keep_alive = False  # read when the answer completes (the parser forgets it after)

    def on_message_begin(self) -> None:
        if self.complete:
            self.stray = True

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers_done = self.delimited = False
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True


def _head(method: str, target: str, key: _Key, headers: dict[str, str], body: bytes | None) -> bytes:
    scheme, host, port = key
    literal = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets
    authority = literal if port == (443 if scheme == "https" else 80) else f"{literal}:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise ValueError("invalid header")  # no header injection through a name or a value
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF and other controls (tab is allowed)
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


class PeerHttp:
    """A thread-safe pool of keep-alive HTTP/1.1 connections, at most `connections` idle per peer.

    A connection is used by one request at a time; requests beyond the idle ones open a connection
    of their own (the manager runs a handful of workers, so this stays small). `timeout_s` bounds
    every read and write (a request may pass its own); `connect_timeout_s`, when shorter, the connect.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        connections: int = 32,
        *,
        connect_timeout_s: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connections = connections
        self.max_answer_bytes = max_answer_bytes
        self._ssl_context = ssl_context
        self._idle: dict[_Key, list[tuple[float, _Wire]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float | None = None
    ) -> PeerResponse:
        return self.request("POST", url, body, headers, timeout)

    def get(self, url: str, headers: dict[str, str], timeout: float | None = None) -> PeerResponse:
        return self.request("GET", url, None, headers, timeout)

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> PeerResponse:
        if method == "HEAD":
            raise ValueError("HEAD answers carry no body: not supported")
        key, target = _split(url)
        timeout = self.timeout_s if timeout is None else timeout
        wire: _Wire | None = None
        try:
            request = _head(method, target, key, headers, body) + (body or b"")  # before connecting
            wire = self._checkout(key, timeout)
            wire.sock.sendall(request)
            answer = self._read(wire.sock, key)
        except PeerHttpError:
            if wire is not None:
                wire.close()
            raise
        except (OSError, httptools.HttpParserError, ValueError) as exc:
            if wire is not None:
                wire.close()
            raise PeerHttpError(f"{type(exc).__name__}") from exc
        except BaseException:
            if wire is not None:
                wire.close()
            raise
        if answer.delimited and answer.keep_alive and not answer.stray:
            self._checkin(key, wire)
        else:
            wire.close()
        return PeerResponse(answer.status, b"".join(answer.body))

    def _read(self, sock: socket.socket, key: _Key) -> _Answer:
        answer = _Answer(self.max_answer_bytes)
        while not answer.complete:
            data = sock.recv(65536)
            if not data:
                if answer.headers_done and not answer.delimited:  # the body ends where the peer closes
                    answer.status = answer.parser.get_status_code()
                    answer.complete = True
                    break
                raise PeerHttpError("RemoteDisconnected: the peer closed the connection before answering")
            try:
                answer.parser.feed_data(data)
            except httptools.HttpParserError:
                if not answer.complete:
                    raise
                answer.stray = True  # garbage after a complete answer
            if answer.size > self.max_answer_bytes:
                raise PeerHttpError(f"answer from {key[1]}:{key[2]} exceeds {self.max_answer_bytes} bytes")
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()

    def _checkout(self, key: _Key, timeout: float) -> _Wire:
        now = time.monotonic()
        while True:
            with self._lock:
                if self._closed:
                    raise PeerHttpError("the peer HTTP client is closed")
                stack = self._idle.get(key)
                if not stack:
                    break
                since, wire = stack.pop()  # the most recently used: least likely to be closing
            if now - since < _KEEPALIVE_S and _still_open(wire):
                wire.sock.settimeout(timeout)
                return wire
            wire.close()
        connect = timeout if self.connect_timeout_s is None else min(timeout, self.connect_timeout_s)
        return _Wire(key, connect, timeout, self._ssl_context)

    def _checkin(self, key: _Key, conn: _Wire) -> None:
        with self._lock:
            stack = self._idle.setdefault(key, [])
            if not self._closed and len(stack) < self.connections:
                stack.append((time.monotonic(), conn))
                return
        conn.close()


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # The trust store httpx uses (certifi's, or SSL_CERT_FILE / SSL_CERT_DIR), so moving DSP calls
    # off httpx changes no certificate decision. Built once: reading the CA bundle takes tens of ms.
    return httpx.create_ssl_context()


def _split(url: str) -> tuple[_Key, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise PeerHttpError("invalid peer URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise PeerHttpError(f"unsupported peer URL scheme or host: {scheme or '?'}://")
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    if _BAD_TARGET.search(target):
        raise PeerHttpError("invalid peer URL")
    return (scheme, parts.hostname, port or (443 if scheme == "https" else 80)), target


def _still_open(conn: _Wire) -> bool:
    """An idle keep-alive connection is usable when nothing is waiting to be read on it: end of file
    means the server closed it, stray bytes that it is out of step. Either way it is dropped."""
    sock = conn.sock
    if sock.fileno() < 0:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        if hasattr(select, "poll"):  # no descriptor-number limit, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable
    except (OSError, ValueError):
        return False


class PeerHttpClient(httpx.Client):
    """An `httpx.Client` that also holds the `PeerHttp` pool the DSP manager delivers with."""

    def __init__(self, peer: PeerHttp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peer = peer

    def close(self) -> None:
        try:
            self.peer.close()
        finally:
            super().close()

    def __exit__(self, *exc: Any) -> None:
        # httpx's own `__exit__` closes its transport, not through `close()`: close the pool too.
        try:
            self.peer.close()
        finally:
            super().__exit__(*exc)
