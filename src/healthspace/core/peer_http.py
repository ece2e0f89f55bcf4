"""The HTTP client the DSP manager posts peer messages with, and the lab calls data planes with: the
standard library's `http.client`, pooled (ADR 0008).

A DSP message is one small POST with a fresh request token to a peer we talk to constantly, so the
cost that matters is the client's CPU per request. httpx spent ≈ 0.7 ms of CPU on one loopback POST
(URL merging, cookies, the auth generator, redirect handling, h11 in pure Python); `http.client`
≈ 0.35 ms for the same request. What the manager needs from a client is kept: per-request timeouts
(connect and every read or write), keep-alive connections pooled per peer, TLS with certificate
and host-name checks (`https://` URLs; httpx's trust store unless a context is given), TCP_NODELAY,
a bounded answer size, and one exception type (`PeerHttpError`) for every failure to get an answer.
Like the httpx client it replaces (whose custom transport ignored the proxy environment), it
connects to peers directly.

`PeerHttpClient` is what `manager.peer_http_client()` returns: an `httpx.Client` (the management
API's occasional calls keep httpx's convenience) that carries a `PeerHttp` for the manager's
deliveries; both share the timeout and are closed together.
"""

from __future__ import annotations

import functools
import http.client
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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


def _connected(sock: Any, read_timeout: float | None) -> None:
    # http.client writes a request's head and body in two `send` calls: under Nagle's algorithm the
    # body would wait ~40 ms for the peer's delayed ACK. (Joining them into one write was measured
    # against uvicorn on loopback: no difference in wall time or server CPU.)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if read_timeout is not None:
        sock.settimeout(read_timeout)


class _Connection(http.client.HTTPConnection):
    read_timeout: float | None = None
    """The timeout of every read and write once connected (`timeout` bounds only the connect)."""

    def connect(self) -> None:
        super().connect()
        _connected(self.sock, self.read_timeout)


class _TlsConnection(http.client.HTTPSConnection):
    read_timeout: float | None = None

    def connect(self) -> None:
        super().connect()  # the TLS handshake, under the connect timeout
        _connected(self.sock, self.read_timeout)


_Key = tuple[str, str, int]  # scheme, host, port


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
        self._idle: dict[_Key, list[tuple[float, http.client.HTTPConnection]]] = {}
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
        key, target = _split(url)
        timeout = self.timeout_s if timeout is None else timeout
        conn = self._checkout(key, timeout)
        try:
            conn.request(method, target, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read(self.max_answer_bytes + 1)
            if len(content) > self.max_answer_bytes:
                raise PeerHttpError(f"answer from {key[1]}:{key[2]} exceeds {self.max_answer_bytes} bytes")
            if not answer.isclosed():
                answer.read()  # nothing left by now; keeps the connection usable
            reusable = not answer.will_close
        except PeerHttpError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise PeerHttpError(f"{type(exc).__name__}") from exc
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._checkin(key, conn)
        else:
            conn.close()
        return PeerResponse(answer.status, content)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()

    def _checkout(self, key: _Key, timeout: float) -> http.client.HTTPConnection:
        now = time.monotonic()
        while True:
            with self._lock:
                if self._closed:
                    raise PeerHttpError("the peer HTTP client is closed")
                stack = self._idle.get(key)
                if not stack:
                    break
                since, conn = stack.pop()  # the most recently used: least likely to be closing
            if now - since < _KEEPALIVE_S and _still_open(conn):
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                return conn
            conn.close()
        scheme, host, port = key
        connect = timeout if self.connect_timeout_s is None else min(timeout, self.connect_timeout_s)
        fresh: _Connection | _TlsConnection
        if scheme == "https":
            fresh = _TlsConnection(host, port, timeout=connect, context=self._ssl_context or _default_tls())
        else:
            fresh = _Connection(host, port, timeout=connect)
        fresh.read_timeout = timeout
        return fresh

    def _checkin(self, key: _Key, conn: http.client.HTTPConnection) -> None:
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
    return (scheme, parts.hostname, port or (443 if scheme == "https" else 80)), target


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection is usable when nothing is waiting to be read on it: end of file
    means the server closed it, stray bytes that it is out of step. Either way it is dropped."""
    sock: Any = conn.sock
    if sock is None or sock.fileno() < 0:
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
