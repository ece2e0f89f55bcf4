"""A scripted DSP peer standing in for the TCK: its own loopback server records what the connector under
test sends (schema-checked), answers like a DSP peer, and signs what it sends with a real identity."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request, Response

from healthspace.core.settings import Settings
from healthspace.identity.keys import SigningKey
from healthspace.identity.tokens import mint_request_token
from healthspace.protocol.messages import (
    ContractNegotiation,
    DspMessage,
    TransferProcess,
    message_key,
    parse_message,
    to_json,
)
from healthspace.protocol.states import NegotiationState, TransferState
from tests.support.servers import serve
from tests.support.space import Node


@dataclass
class Received:
    path: str
    message: DspMessage
    authorization: str | None

    @property
    def key(self) -> str:
        return message_key(self.message)


@dataclass
class TckPeer:
    """`url` is where the CUT reaches us (callback / provider address); `inbox` what it sent."""

    id: str
    url: str
    key: SigningKey
    credential: str
    inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    invalid: list[str] = field(default_factory=list)
    # Scripted deviations: paths ending in one of `refuse` answer 400 (after recording the message);
    # `states` is what GET /negotiations/{pid} or /transfers/{pid} reports for a pid.
    refuse: set[str] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)

    def token_for(self, audience: str) -> str:
        return mint_request_token(self.key, self.credential, self.id, audience, datetime.now(UTC))

    def send(self, cut: Node, method: str, path: str, message: DspMessage | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token_for(cut.id)}", "Content-Type": "application/json"}
        content = to_json(message) if message is not None else None
        return httpx.request(method, f"{cut.url}{path}", content=content, headers=headers, timeout=10.0)

    def expect(self, key: str, timeout_s: float = 10.0) -> Received:
        """The next message the CUT sends us; it must be `key`."""
        got = self.inbox.get(timeout=timeout_s)
        if got.key != key:
            raise AssertionError(f"expected {key} from the connector, got {got.key} at {got.path}")
        return got


def _app(peer_box: list[TckPeer]) -> FastAPI:
    app = FastAPI()

    @app.post("/{path:path}")
    async def receive(path: str, request: Request) -> Response:
        peer = peer_box[0]
        body = await request.body()
        try:
            message = parse_message(body)
        except Exception as exc:  # a schema failure is recorded and fails the test that reads it
            peer.invalid.append(f"/{path}: {exc}")
            return Response(status_code=400)
        peer.inbox.put(Received(f"/{path}", message, request.headers.get("authorization")))
        if any(path.endswith(suffix) for suffix in peer.refuse):
            return Response(status_code=400)
        doc = orjson.loads(body)
        if path == "negotiations/request":
            ack: DspMessage = ContractNegotiation(
                provider_pid=f"urn:uuid:{uuid.uuid4()}",
                consumer_pid=doc["consumerPid"],
                state=NegotiationState.REQUESTED,
            )
            return Response(to_json(ack), status_code=201, media_type="application/json")
        if path.endswith("/request") and path.startswith("negotiations/"):
            ack = ContractNegotiation(
                provider_pid=doc["providerPid"],
                consumer_pid=doc["consumerPid"],
                state=NegotiationState.REQUESTED,
            )
            return Response(to_json(ack), media_type="application/json")
        if path == "transfers/request":
            ack = TransferProcess(
                provider_pid=f"urn:uuid:{uuid.uuid4()}",
                consumer_pid=doc["consumerPid"],
                state=TransferState.REQUESTED,
            )
            return Response(to_json(ack), status_code=201, media_type="application/json")
        return Response(status_code=200)

    @app.get("/{kind}/{pid}")
    def process(kind: str, pid: str) -> Response:
        peer = peer_box[0]
        if pid not in peer.states:
            return Response(status_code=404)
        ack: DspMessage
        if kind == "negotiations":
            ack = ContractNegotiation(
                provider_pid=pid, consumer_pid="c", state=NegotiationState(peer.states[pid])
            )
        else:
            ack = TransferProcess(provider_pid=pid, consumer_pid="c", state=TransferState(peer.states[pid]))
        return Response(to_json(ack), media_type="application/json")

    return app


@contextmanager
def tck_peer(node: Node) -> Iterator[TckPeer]:
    """Serve the TCK stand-in with the identity of the onboarded participant `node`."""
    key = SigningKey.load(
        node.data_dir / "participant.key", Settings(data_dir=node.data_dir).key_encryption_key()
    )
    credential = (node.data_dir / "credential.jwt").read_text().strip()
    box: list[TckPeer] = []
    with serve(_app(box)) as url:
        box.append(TckPeer(node.id, url, key, credential))
        yield box[0]


def body(**members: Any) -> dict[str, Any]:
    return {"@context": ["https://w3id.org/dspace/2025/1/context.jsonld"], **members}
