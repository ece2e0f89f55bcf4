"""DSP 2025-1 negotiation and transfer lifecycles, and which message moves which state for which role.

Two layers of data, both pure:

* `NEGOTIATION` / `TRANSFER`: the state machines (every move either party may cause);
* `NEGOTIATION_MESSAGE_EFFECTS` / `TRANSFER_MESSAGE_EFFECTS`: `(receiver role, message key, current
  state) -> next state`, where the receiver is the connector processing the message and `None` as the
  current state means "no process yet" (the message creates one). A key absent from the table is a
  message the receiver must refuse with 400. The sender's copy of the process moves the same way, so
  a sender checks itself with `can_send`.

Message keys are the wire `@type`, except that `ContractNegotiationEventMessage` is split by its
`eventType`: `ContractNegotiationEventMessage:ACCEPTED` and `...:FINALIZED`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from healthspace.core.states import StateMachine
from healthspace.protocol.errors import MessageNotAllowedError

__all__ = [
    "EVENT_ACCEPTED",
    "EVENT_FINALIZED",
    "NEGOTIATION",
    "NEGOTIATION_MESSAGE_EFFECTS",
    "TRANSFER",
    "TRANSFER_MESSAGE_EFFECTS",
    "NegotiationState",
    "Role",
    "TransferState",
    "allowed_messages",
    "can_send",
    "has_moved_past",
    "negotiation_next_state",
    "transfer_next_state",
]


class Role(StrEnum):
    PROVIDER = "provider"
    CONSUMER = "consumer"

    @property
    def other(self) -> Role:
        return Role.CONSUMER if self is Role.PROVIDER else Role.PROVIDER


class NegotiationState(StrEnum):
    REQUESTED = "REQUESTED"
    OFFERED = "OFFERED"
    ACCEPTED = "ACCEPTED"
    AGREED = "AGREED"
    VERIFIED = "VERIFIED"
    FINALIZED = "FINALIZED"
    TERMINATED = "TERMINATED"


class TransferState(StrEnum):
    REQUESTED = "REQUESTED"
    STARTED = "STARTED"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    TERMINATED = "TERMINATED"


_N = NegotiationState
_T = TransferState

NEGOTIATION: StateMachine[NegotiationState] = StateMachine(
    "contract negotiation",
    {
        _N.REQUESTED: {_N.OFFERED, _N.AGREED, _N.TERMINATED},
        _N.OFFERED: {_N.REQUESTED, _N.ACCEPTED, _N.TERMINATED},
        _N.ACCEPTED: {_N.AGREED, _N.TERMINATED},
        _N.AGREED: {_N.VERIFIED, _N.TERMINATED},
        _N.VERIFIED: {_N.FINALIZED, _N.TERMINATED},
    },
)

TRANSFER: StateMachine[TransferState] = StateMachine(
    "transfer process",
    {
        _T.REQUESTED: {_T.STARTED, _T.TERMINATED},
        _T.STARTED: {_T.SUSPENDED, _T.COMPLETED, _T.TERMINATED},
        _T.SUSPENDED: {_T.STARTED, _T.TERMINATED},
    },
)

EVENT_ACCEPTED = "ContractNegotiationEventMessage:ACCEPTED"
EVENT_FINALIZED = "ContractNegotiationEventMessage:FINALIZED"

_P, _C = Role.PROVIDER, Role.CONSUMER
_NEGOTIATION_LIVE = [s for s in NegotiationState if not NEGOTIATION.is_final(s)]
_TRANSFER_LIVE = [s for s in TransferState if not TRANSFER.is_final(s)]

NEGOTIATION_MESSAGE_EFFECTS: Mapping[tuple[Role, str, NegotiationState | None], NegotiationState] = {
    # The provider receives what the consumer sends.
    (_P, "ContractRequestMessage", None): _N.REQUESTED,  # initial request, no providerPid yet
    (_P, "ContractRequestMessage", _N.OFFERED): _N.REQUESTED,  # counter-offer
    (_P, EVENT_ACCEPTED, _N.OFFERED): _N.ACCEPTED,
    (_P, "ContractAgreementVerificationMessage", _N.AGREED): _N.VERIFIED,
    # The consumer receives what the provider sends.
    (_C, "ContractOfferMessage", None): _N.OFFERED,  # provider-initiated negotiation
    (_C, "ContractOfferMessage", _N.REQUESTED): _N.OFFERED,
    (_C, "ContractAgreementMessage", _N.REQUESTED): _N.AGREED,
    (_C, "ContractAgreementMessage", _N.ACCEPTED): _N.AGREED,
    (_C, EVENT_FINALIZED, _N.VERIFIED): _N.FINALIZED,
    # Either party may walk away from any live negotiation (spec text: "at any state").
    **{
        (role, "ContractNegotiationTerminationMessage", state): _N.TERMINATED
        for role in Role
        for state in _NEGOTIATION_LIVE
    },
}

TRANSFER_MESSAGE_EFFECTS: Mapping[tuple[Role, str, TransferState | None], TransferState] = {
    (_P, "TransferRequestMessage", None): _T.REQUESTED,
    (_C, "TransferStartMessage", _T.REQUESTED): _T.STARTED,  # only the provider starts a transfer
    # Resuming, suspending and completing are open to both parties.
    **{(role, "TransferStartMessage", _T.SUSPENDED): _T.STARTED for role in Role},
    **{(role, "TransferSuspensionMessage", _T.STARTED): _T.SUSPENDED for role in Role},
    **{(role, "TransferCompletionMessage", _T.STARTED): _T.COMPLETED for role in Role},
    **{
        (role, "TransferTerminationMessage", state): _T.TERMINATED
        for role in Role
        for state in _TRANSFER_LIVE
    },
}


def negotiation_next_state(
    receiver: Role, message_key: str, current: NegotiationState | None
) -> NegotiationState:
    """The state a negotiation moves to when `receiver` accepts `message_key` in `current`.

    Raises `MessageNotAllowedError` (400) when DSP does not allow that message there.
    """
    target = NEGOTIATION_MESSAGE_EFFECTS.get((receiver, message_key, current))
    if target is None:
        raise _refusal("contract negotiation", receiver, message_key, current)
    return target


def transfer_next_state(receiver: Role, message_key: str, current: TransferState | None) -> TransferState:
    """The state a transfer process moves to when `receiver` accepts `message_key` in `current`.

    Raises `MessageNotAllowedError` (400) when DSP does not allow that message there. A repeated
    `TransferRequestMessage` with a known consumerPid is not a transition: the endpoint answers it with
    the existing process (idempotent), before consulting this table.
    """
    target = TRANSFER_MESSAGE_EFFECTS.get((receiver, message_key, current))
    if target is None:
        raise _refusal("transfer process", receiver, message_key, current)
    return target


def can_send(sender: Role, message_key: str, current: NegotiationState | TransferState | None) -> bool:
    """Whether `sender` may send `message_key` in `current` (the receiver is the other role)."""
    return message_key in allowed_messages(sender.other, current)


def allowed_messages(receiver: Role, current: NegotiationState | TransferState | None) -> list[str]:
    """Message keys `receiver` accepts in `current`, sorted (for error details and documentation).

    With `current=None` these are the messages that open a new negotiation or transfer.
    """
    keys: list[tuple[Role, str, NegotiationState | TransferState | None]] = []
    if not isinstance(current, TransferState):
        keys.extend(NEGOTIATION_MESSAGE_EFFECTS)
    if not isinstance(current, NegotiationState):
        keys.extend(TRANSFER_MESSAGE_EFFECTS)
    # StrEnum members of both lifecycles compare equal by value, so compare types as well.
    return sorted(
        {
            key
            for role, key, state in keys
            if role is receiver and type(state) is type(current) and state == current
        }
    )


def _refusal(
    what: str, receiver: Role, key: str, current: NegotiationState | TransferState | None
) -> MessageNotAllowedError:
    state = "no existing process" if current is None else f"state {current}"
    allowed = allowed_messages(receiver, current) if current is not None else []
    hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
    return MessageNotAllowedError(
        f"{what}: a {receiver} cannot accept {key} in {state}{hint}",
        current=None if current is None else str(current),
        message=key,
        role=str(receiver),
    )


def has_moved_past(ours: NegotiationState | TransferState, theirs: NegotiationState | TransferState) -> bool:
    """Whether a peer whose copy of a process stands in `theirs` must already have processed the message
    that moved ours to `ours` (we send it again after a crash between delivering and recording it).

    True when the copies agree, or when `ours` is on the one-way part of the lifecycle (no cycle
    leads back to it) and `theirs` lies ahead of it: the peer verified our agreement and finalized
    while we were down. From a state on a cycle (REQUESTED and OFFERED; STARTED and SUSPENDED) a
    peer may move ahead without our message, and TERMINATED is where a peer goes for any reason:
    neither counts.
    """
    if type(ours) is not type(theirs):
        return False
    if theirs == ours:
        return True
    machine: StateMachine[Any] = NEGOTIATION if isinstance(ours, NegotiationState) else TRANSFER
    ahead = machine.reachable(ours)
    return ours not in ahead and theirs in ahead and theirs not in (_N.TERMINATED, _T.TERMINATED)
