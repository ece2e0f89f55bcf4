"""The manager's peer HTTP client (`core.peer_http`) against real servers on loopback: keep-alive
reuse, connections the server closed, timeouts, refused connections, oversized answers, TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request, Response

from healthspace.connector.dsp.manager import DspManager, _NoAnswerError, peer_http_client
from healthspace.core.peer_http import PeerHttp, PeerHttpClient, PeerHttpError, _head, _split
from tests.support.servers import bind_loopback, serve

LOOPBACK = "127.0.0.1"


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(body, status_code=201, media_type="application/json")

    @app.get("/big")
    def big() -> Response:
        return Response(b"x" * 5000, media_type="application/octet-stream")

    @app.get("/missing")
    def missing() -> Response:
        return Response(b'{"code":"nope"}', status_code=404, media_type="application/json")

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(_app()) as u:
        yield u


def test_a_post_is_answered_and_its_connection_reused(url: str) -> None:
    pool = PeerHttp(5.0)
    try:
        first = pool.post(
            f"{url}/echo", b'{"a":1}', {"Content-Type": "application/json", "Authorization": "t1"}
        )
        second = pool.post(f"{url}/echo", b'{"b":2}', {"Content-Type": "application/json"})
    finally:
        pool.close()
    assert (first.status_code, first.content) == (201, b'{"a":1}')
    assert (second.status_code, second.content) == (201, b'{"b":2}')


def test_keep_alive_connections_are_reused_not_reopened(url: str) -> None:
    ports: set[int] = set()
    pool = PeerHttp(5.0)
    try:
        for _ in range(5):
            assert pool.post(f"{url}/echo", b"", {}).status_code == 201
            with pool._lock:
                (idle,) = pool._idle.values()
                assert len(idle) == 1
                sock = idle[0][1].sock
            assert sock is not None
            ports.add(sock.getsockname()[1])
    finally:
        pool.close()
    assert len(ports) == 1  # one local port: one TCP connection for all five


def test_error_statuses_are_answers_not_failures(url: str) -> None:
    pool = PeerHttp(5.0)
    try:
        r = pool.get(f"{url}/missing", {})
    finally:
        pool.close()
    assert (r.status_code, r.text) == (404, '{"code":"nope"}')


def test_an_answer_larger_than_the_bound_is_refused(url: str) -> None:
    pool = PeerHttp(5.0, max_answer_bytes=1000)
    try:
        with pytest.raises(PeerHttpError, match="exceeds 1000 bytes"):
            pool.get(f"{url}/big", {})
        assert pool.get(f"{url}/missing", {}).status_code == 404  # the pool still works
    finally:
        pool.close()


def test_a_refused_connection_is_a_peer_http_error() -> None:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    pool = PeerHttp(2.0)
    with pytest.raises(PeerHttpError, match="ConnectionRefused"):
        pool.post(f"http://127.0.0.1:{port}/x", b"{}", {})
    pool.close()


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1/x", "http:///x", "http://127.0.0.1:notaport/x"])
def test_urls_other_than_http_s_are_refused(bad: str) -> None:
    with pytest.raises(PeerHttpError):
        PeerHttp(1.0).get(bad, {})


@contextmanager
def _raw_server(handle: object) -> Iterator[int]:
    """A plain TCP server on loopback: `handle(conn)` serves each accepted connection (bounded)."""
    listener = bind_loopback()
    listener.listen(8)
    listener.settimeout(5.0)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handle(conn)  # type: ignore[operator]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        t.join(5)


def _read_request(conn: socket.socket) -> None:
    data = b""
    conn.settimeout(5.0)
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def test_a_timeout_is_a_peer_http_error() -> None:
    def silent(conn: socket.socket) -> None:
        _read_request(conn)
        time.sleep(1.0)  # never answers within the client's timeout

    with _raw_server(silent) as port:
        pool = PeerHttp(0.3)
        t0 = time.monotonic()
        with pytest.raises(PeerHttpError, match=r"TimeoutError|timed out"):
            pool.post(f"http://127.0.0.1:{port}/x", b"{}", {})
        assert time.monotonic() - t0 < 0.9
        pool.close()


def test_a_short_connect_timeout_does_not_bound_the_wait_for_the_answer() -> None:
    # The lab connects within 5 s but lets a site compute for 30: the connect timeout must not stay
    # on the socket for the reads.
    def slow(conn: socket.socket) -> None:
        _read_request(conn)
        time.sleep(0.4)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")

    with _raw_server(slow) as port:
        pool = PeerHttp(3.0, connect_timeout_s=0.1)
        try:
            assert pool.post(f"http://127.0.0.1:{port}/x", b"{}", {}).status_code == 200
        finally:
            pool.close()


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    served: list[int] = []

    def once_then_close(conn: socket.socket) -> None:
        # Promises keep-alive, answers one request, then closes: as a server whose idle timeout ran out.
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
        served.append(1)
        time.sleep(0.05)

    with _raw_server(once_then_close) as port:
        pool = PeerHttp(2.0)
        try:
            assert pool.post(f"http://127.0.0.1:{port}/x", b"{}", {}).status_code == 200
            time.sleep(0.2)  # the server has closed that connection by now
            assert pool.post(f"http://127.0.0.1:{port}/x", b"{}", {}).status_code == 200
        finally:
            pool.close()
    assert len(served) == 2


def test_a_connection_with_an_unread_answer_is_not_reused() -> None:
    def answers_twice(conn: socket.socket) -> None:
        # A second, unsolicited answer leaves the connection out of step: it must not be reused, or
        # the next request would be "answered" with it.
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.05)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"x":1}')

    with _raw_server(answers_twice) as port:
        pool = PeerHttp(2.0)
        try:
            assert pool.post(f"http://127.0.0.1:{port}/x", b"{}", {}).content == b"{}"
            time.sleep(0.2)
            r = pool.post(f"http://127.0.0.1:{port}/x", b"{}", {})  # a new connection
            assert (r.status_code, r.content) == (200, b"{}")
        finally:
            pool.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_checks_the_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    sock = bind_loopback()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(_app(), log_level="warning", ssl_certfile=str(cert), ssl_keyfile=str(key))
    )
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started
        url = f"https://127.0.0.1:{port}/echo"
        untrusting = PeerHttp(5.0)
        with pytest.raises(PeerHttpError, match="SSLCertVerificationError"):
            untrusting.post(url, b"{}", {})
        untrusting.close()
        trusting = PeerHttp(5.0, ssl_context=ssl.create_default_context(cafile=str(cert)))
        try:
            r = trusting.post(url, b'{"tls":true}', {"Content-Type": "application/json"})
            again = trusting.post(url, b"{}", {})
        finally:
            trusting.close()
        assert (r.status_code, r.content, again.status_code) == (201, b'{"tls":true}', 201)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_closed_pool_refuses_calls(url: str) -> None:
    client = peer_http_client(5.0)
    assert isinstance(client, PeerHttpClient)
    assert client.peer.post(f"{url}/echo", b"{}", {}).status_code == 201
    client.close()
    with pytest.raises(PeerHttpError, match="closed"):
        client.peer.post(f"{url}/echo", b"{}", {})


class _Service:
    """The manager only registers for hints here; these tests drive its HTTP calls alone."""

    def on_work(self, _: object) -> None:
        pass


class _Header(httpx.Auth):
    """An auth for both clients: `authorization()` for the pool, `auth_flow` for httpx."""

    def __init__(self) -> None:
        self.minted = 0

    def authorization(self) -> str:
        self.minted += 1
        return f"Bearer t{self.minted}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.authorization()
        yield request


def _refuse(_: httpx.Request) -> httpx.Response:
    raise AssertionError("the manager must not post through httpx when the client carries a pool")


def test_the_manager_delivers_through_the_pool_with_a_fresh_header(url: str) -> None:
    auth = _Header()
    client = PeerHttpClient(PeerHttp(5.0), transport=httpx.MockTransport(_refuse))
    manager = DspManager(cast(Any, _Service()), client, lambda _: auth)
    try:
        r = manager._call("POST", f"{url}/echo", "peer", b'{"m":1}')
        again = manager._call("POST", f"{url}/echo", "peer", b'{"m":2}')
    finally:
        client.close()
    assert (r.status_code, r.content, again.content, auth.minted) == (201, b'{"m":1}', b'{"m":2}', 2)


def test_the_manager_falls_back_to_httpx_for_other_clients(url: str) -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["authorization"])
        return httpx.Response(201, content=request.content)

    auth = _Header()
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        manager = DspManager(cast(Any, _Service()), client, lambda _: auth)
        r = manager._call("POST", f"{url}/echo", "peer", b'{"m":1}')
    assert (r.status_code, r.content, sent) == (201, b'{"m":1}', ["Bearer t1"])


def test_the_manager_reports_no_answer_from_either_client() -> None:
    sock = bind_loopback()
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}/x"
    sock.close()
    auth = _Header()
    for client in (peer_http_client(2.0), httpx.Client()):
        manager = DspManager(cast(Any, _Service()), client, lambda _: auth)
        try:
            with pytest.raises(_NoAnswerError):
                manager._call("POST", dead, "peer", b"{}")
        finally:
            client.close()


def test_leaving_the_client_s_block_closes_the_pool_too(url: str) -> None:
    with peer_http_client(5.0) as client:
        assert isinstance(client, PeerHttpClient)
        assert client.peer.post(f"{url}/echo", b"{}", {}).status_code == 201
    with pytest.raises(PeerHttpError, match="closed"):
        client.peer.post(f"{url}/echo", b"{}", {})


# --- framing: what the response parser must get right, against raw servers ---------------------------


def _serve_raw(answer: bytes, then_close: bool = False) -> Any:
    """A handler answering every request on a connection with `answer` (closing after, if asked)."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5.0)
        while True:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(rest) < length:
                rest += conn.recv(4096)
            conn.sendall(answer)
            if then_close:
                return

    return handle


@contextmanager
def _pool_answered_with(
    answer: bytes, then_close: bool = False, **pool: Any
) -> Iterator[tuple[PeerHttp, str]]:
    """A pool and a URL whose server answers every request with `answer`; the pool closed after."""
    with _raw_server(_serve_raw(answer, then_close)) as port:
        client = PeerHttp(2.0, **pool)
        try:
            yield client, f"http://127.0.0.1:{port}/x"
        finally:
            client.close()


def _idle(pool: PeerHttp) -> int:
    with pool._lock:
        return sum(len(v) for v in pool._idle.values())


def test_a_chunked_answer_is_read_whole_and_its_connection_reused() -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    with _pool_answered_with(chunked) as (pool, url):
        first = pool.post(url, b"{}", {})
        assert _idle(pool) == 1  # kept for reuse
        second = pool.post(url, b"{}", {})
    assert (first.status_code, first.content, second.content) == (200, b'{"a":1}', b'{"a":1}')


def test_an_answer_ended_by_closing_the_connection_is_read_to_the_end_and_not_reused() -> None:
    with _pool_answered_with(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}", then_close=True) as (
        pool,
        url,
    ):
        r = pool.get(url, {})
        assert _idle(pool) == 0
    assert (r.status_code, r.content) == (200, b"{}")


def test_an_interim_answer_is_skipped_for_the_real_one() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"
    with _pool_answered_with(answer) as (pool, url):
        r = pool.post(url, b"{}", {})
    assert (r.status_code, r.content) == (201, b"{}")


@pytest.mark.parametrize(
    ("answer", "pool", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", {}, "RemoteDisconnected"),  # cut short
        (  # chunked, over the bound
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nbb8\r\n" + b"x" * 3000 + b"\r\n0\r\n\r\n",
            {"max_answer_bytes": 1000},
            "exceeds 1000 bytes",
        ),
        (b"SMTP ready\r\n\r\n", {}, "HttpParser"),  # not HTTP
    ],
)
def test_an_answer_cut_short_oversized_or_not_http_is_an_error_not_a_body(
    answer: bytes, pool: dict[str, Any], error: str
) -> None:
    with (
        _pool_answered_with(answer, then_close=True, **pool) as (client, url),
        pytest.raises(PeerHttpError, match=error),
    ):
        client.get(url, {})


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/x", {"Authorization": "Bearer t\r\nX-Injected: 1"}),
        ("/x", {"Bad Name": "v"}),
        ("/x y", {}),
        ("/x\r\nX-Injected: 1", {}),
    ],
)
def test_nothing_is_sent_with_a_header_or_target_that_would_inject(
    target: str, headers: dict[str, str]
) -> None:
    received: list[bytes] = []

    def record(conn: socket.socket) -> None:
        conn.settimeout(0.5)
        try:
            received.append(conn.recv(4096))
        except OSError:
            received.append(b"")

    with _raw_server(record) as port:
        pool = PeerHttp(1.0)
        with pytest.raises(PeerHttpError):
            pool.get(f"http://127.0.0.1:{port}{target}", headers)
        pool.close()
    assert received == []  # refused before connecting


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:8080/x", "127.0.0.1:8080"),
        ("http://gz.example/x", "gz.example"),
        ("https://gz.example:443/x", "gz.example"),
        ("http://[::1]:9/x", "[::1]:9"),
    ],
)
def test_the_host_header_names_the_peer_as_its_url_does(url: str, host: str) -> None:
    key, target = _split(url)
    head = _head("POST", target, key, {"Content-Type": "application/json"}, b"{}").decode()
    assert head.split("\r\n")[:4] == [
        "POST /x HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Content-Length: 2",
    ]
