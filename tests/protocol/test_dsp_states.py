"""DSP negotiation and transfer lifecycles allow exactly the moves DSP 2025-1 allows, for the right role."""

from __future__ import annotations

from itertools import product

import pytest

from healthspace.core.errors import InvalidTransitionError
from healthspace.protocol.errors import MessageNotAllowedError
from healthspace.protocol.states import (
    EVENT_ACCEPTED,
    EVENT_FINALIZED,
    NEGOTIATION,
    NEGOTIATION_MESSAGE_EFFECTS,
    TRANSFER,
    TRANSFER_MESSAGE_EFFECTS,
    NegotiationState,
    Role,
    TransferState,
    allowed_messages,
    can_send,
    has_moved_past,
    negotiation_next_state,
    transfer_next_state,
)

# Written out from the spec's state-machine figures and the conformance README, not from the code.
NEGOTIATION_ALLOWED = {
    ("REQUESTED", "OFFERED"),
    ("REQUESTED", "AGREED"),
    ("REQUESTED", "TERMINATED"),
    ("OFFERED", "REQUESTED"),
    ("OFFERED", "ACCEPTED"),
    ("OFFERED", "TERMINATED"),
    ("ACCEPTED", "AGREED"),
    ("ACCEPTED", "TERMINATED"),
    ("AGREED", "VERIFIED"),
    ("AGREED", "TERMINATED"),
    ("VERIFIED", "FINALIZED"),
    ("VERIFIED", "TERMINATED"),
}
TRANSFER_ALLOWED = {
    ("REQUESTED", "STARTED"),
    ("REQUESTED", "TERMINATED"),
    ("STARTED", "SUSPENDED"),
    ("STARTED", "COMPLETED"),
    ("STARTED", "TERMINATED"),
    ("SUSPENDED", "STARTED"),
    ("SUSPENDED", "TERMINATED"),
}


@pytest.mark.parametrize(("current", "target"), list(product(NegotiationState, NegotiationState)))
def test_negotiation_transition_is_allowed_exactly_when_the_spec_allows_it(
    current: NegotiationState, target: NegotiationState
) -> None:
    if (current.value, target.value) in NEGOTIATION_ALLOWED:
        assert NEGOTIATION.transition(current, target) is target
    else:
        with pytest.raises(InvalidTransitionError):
            NEGOTIATION.transition(current, target)


@pytest.mark.parametrize(("current", "target"), list(product(TransferState, TransferState)))
def test_transfer_transition_is_allowed_exactly_when_the_spec_allows_it(
    current: TransferState, target: TransferState
) -> None:
    if (current.value, target.value) in TRANSFER_ALLOWED:
        assert TRANSFER.transition(current, target) is target
    else:
        with pytest.raises(InvalidTransitionError):
            TRANSFER.transition(current, target)


def test_final_states_are_finalized_terminated_and_completed() -> None:
    assert {s.value for s in NegotiationState if NEGOTIATION.is_final(s)} == {"FINALIZED", "TERMINATED"}
    assert {s.value for s in TransferState if TRANSFER.is_final(s)} == {"COMPLETED", "TERMINATED"}


def test_state_names_match_the_schema_enums(registry: object) -> None:
    # The ContractNegotiation / TransferProcess schemas enumerate the states DSP defines.
    from healthspace.protocol.schemas import SchemaRegistry

    assert isinstance(registry, SchemaRegistry)
    for state in NegotiationState:
        registry.validate_as(
            {
                "@context": ["https://w3id.org/dspace/2025/1/context.jsonld"],
                "@type": "ContractNegotiation",
                "providerPid": "p",
                "consumerPid": "c",
                "state": state.value,
            },
            "ContractNegotiation",
        )
    for state in TransferState:
        registry.validate_as(
            {
                "@context": ["https://w3id.org/dspace/2025/1/context.jsonld"],
                "@type": "TransferProcess",
                "providerPid": "p",
                "consumerPid": "c",
                "state": state.value,
            },
            "TransferProcess",
        )


# --- which message, sent by whom, moves which state ------------------------------------------------------

# "Sent by" and "Resulting state" rows of the DSP 2025-1 message tables (TERMINATED aside).
NEGOTIATION_SENDERS = {
    "ContractRequestMessage": ({"consumer"}, "REQUESTED"),
    "ContractOfferMessage": ({"provider"}, "OFFERED"),
    "ContractAgreementMessage": ({"provider"}, "AGREED"),
    "ContractAgreementVerificationMessage": ({"consumer"}, "VERIFIED"),
    EVENT_ACCEPTED: ({"consumer"}, "ACCEPTED"),
    EVENT_FINALIZED: ({"provider"}, "FINALIZED"),
    "ContractNegotiationTerminationMessage": ({"consumer", "provider"}, "TERMINATED"),
}
TRANSFER_SENDERS = {
    "TransferRequestMessage": ({"consumer"}, "REQUESTED"),
    "TransferStartMessage": ({"consumer", "provider"}, "STARTED"),
    "TransferSuspensionMessage": ({"consumer", "provider"}, "SUSPENDED"),
    "TransferCompletionMessage": ({"consumer", "provider"}, "COMPLETED"),
    "TransferTerminationMessage": ({"consumer", "provider"}, "TERMINATED"),
}


@pytest.mark.parametrize(
    ("table", "senders"),
    [(NEGOTIATION_MESSAGE_EFFECTS, NEGOTIATION_SENDERS), (TRANSFER_MESSAGE_EFFECTS, TRANSFER_SENDERS)],
    ids=["negotiation", "transfer"],
)
def test_each_effect_has_a_legitimate_sender_and_the_message_s_resulting_state(
    table: dict[tuple[Role, str, object], object], senders: dict[str, tuple[set[str], str]]
) -> None:
    for (receiver, key, _current), target in table.items():
        allowed_senders, resulting = senders[key]
        assert receiver.other.value in allowed_senders, (receiver, key)
        assert str(target) == resulting, (receiver, key)


def test_every_negotiation_effect_is_a_move_of_the_state_machine() -> None:
    for (_, _, current), target in NEGOTIATION_MESSAGE_EFFECTS.items():
        assert current is None or NEGOTIATION.can(current, target)


def test_every_transfer_effect_is_a_move_of_the_state_machine() -> None:
    for (_, _, current), target in TRANSFER_MESSAGE_EFFECTS.items():
        assert current is None or TRANSFER.can(current, target)


def test_every_negotiation_move_is_reachable_by_some_message() -> None:
    moves = {(c, t) for (_, _, c), t in NEGOTIATION_MESSAGE_EFFECTS.items() if c is not None}
    assert {(c.value, t.value) for c, t in moves} == NEGOTIATION_ALLOWED


def test_every_transfer_move_is_reachable_by_some_message() -> None:
    moves = {(c, t) for (_, _, c), t in TRANSFER_MESSAGE_EFFECTS.items() if c is not None}
    assert {(c.value, t.value) for c, t in moves} == TRANSFER_ALLOWED


NEGOTIATION_KEYS = sorted(NEGOTIATION_SENDERS)
TRANSFER_KEYS = sorted(TRANSFER_SENDERS)


@pytest.mark.parametrize(
    ("receiver", "key", "current"), list(product(Role, NEGOTIATION_KEYS, [None, *NegotiationState]))
)
def test_negotiation_message_outside_the_table_answers_400(
    receiver: Role, key: str, current: NegotiationState | None
) -> None:
    expected = NEGOTIATION_MESSAGE_EFFECTS.get((receiver, key, current))
    if expected is not None:
        assert negotiation_next_state(receiver, key, current) is expected
    else:
        with pytest.raises(MessageNotAllowedError) as caught:
            negotiation_next_state(receiver, key, current)
        assert caught.value.status == 400


@pytest.mark.parametrize(
    ("receiver", "key", "current"), list(product(Role, TRANSFER_KEYS, [None, *TransferState]))
)
def test_transfer_message_outside_the_table_answers_400(
    receiver: Role, key: str, current: TransferState | None
) -> None:
    expected = TRANSFER_MESSAGE_EFFECTS.get((receiver, key, current))
    if expected is not None:
        assert transfer_next_state(receiver, key, current) is expected
    else:
        with pytest.raises(MessageNotAllowedError) as caught:
            transfer_next_state(receiver, key, current)
        assert caught.value.status == 400


def test_only_the_provider_starts_a_requested_transfer() -> None:
    assert (
        transfer_next_state(Role.CONSUMER, "TransferStartMessage", TransferState.REQUESTED)
        is TransferState.STARTED
    )
    with pytest.raises(MessageNotAllowedError):
        transfer_next_state(Role.PROVIDER, "TransferStartMessage", TransferState.REQUESTED)


def test_either_party_may_resume_a_suspended_transfer() -> None:
    for receiver in Role:
        assert (
            transfer_next_state(receiver, "TransferStartMessage", TransferState.SUSPENDED)
            is TransferState.STARTED
        )


def test_forbidden_transfer_shortcuts_are_refused() -> None:
    for key, current in [
        ("TransferCompletionMessage", TransferState.REQUESTED),
        ("TransferSuspensionMessage", TransferState.REQUESTED),
        ("TransferCompletionMessage", TransferState.SUSPENDED),
    ]:
        for receiver in Role:
            with pytest.raises(MessageNotAllowedError):
                transfer_next_state(receiver, key, current)


def test_a_consumer_cannot_finalize_and_a_provider_cannot_accept() -> None:
    with pytest.raises(MessageNotAllowedError):
        negotiation_next_state(Role.PROVIDER, EVENT_FINALIZED, NegotiationState.VERIFIED)
    with pytest.raises(MessageNotAllowedError):
        negotiation_next_state(Role.CONSUMER, EVENT_ACCEPTED, NegotiationState.OFFERED)


def test_refusal_names_the_state_and_what_would_be_accepted() -> None:
    with pytest.raises(MessageNotAllowedError) as caught:
        negotiation_next_state(
            Role.PROVIDER, "ContractAgreementVerificationMessage", NegotiationState.OFFERED
        )
    assert "OFFERED" in caught.value.detail
    assert EVENT_ACCEPTED in caught.value.detail


def test_can_send_mirrors_what_the_other_side_accepts() -> None:
    assert can_send(Role.CONSUMER, "ContractRequestMessage", None)
    assert not can_send(Role.PROVIDER, "ContractRequestMessage", None)
    assert can_send(Role.PROVIDER, "TransferStartMessage", TransferState.REQUESTED)
    assert not can_send(Role.CONSUMER, "TransferStartMessage", TransferState.REQUESTED)


def test_allowed_messages_in_a_final_state_is_empty() -> None:
    for receiver in Role:
        assert allowed_messages(receiver, NegotiationState.FINALIZED) == []
        assert allowed_messages(receiver, TransferState.COMPLETED) == []


# --- a refused repeat: has the peer already taken our message? -------------------------------------

_N, _T = NegotiationState, TransferState

# Written out by hand from the spec's diagram, not derived from the state machine under test: the
# pairs (ours, theirs) where the peer cannot stand unless it took our last message.
_NEG_TAKEN = {
    (_N.ACCEPTED, _N.AGREED), (_N.ACCEPTED, _N.VERIFIED), (_N.ACCEPTED, _N.FINALIZED),
    (_N.AGREED, _N.VERIFIED), (_N.AGREED, _N.FINALIZED), (_N.VERIFIED, _N.FINALIZED),
}  # fmt: skip
_TRANSFER_TAKEN = {(_T.REQUESTED, _T.STARTED), (_T.REQUESTED, _T.SUSPENDED), (_T.REQUESTED, _T.COMPLETED)}


@pytest.mark.parametrize(
    ("ours", "theirs"), [*product(list(_N), repeat=2), *product(list(_T), repeat=2)], ids=str
)
def test_a_peer_has_moved_past_us_only_where_it_cannot_have_missed_our_message(
    ours: NegotiationState | TransferState, theirs: NegotiationState | TransferState
) -> None:
    expected = theirs == ours or (ours, theirs) in _NEG_TAKEN | _TRANSFER_TAKEN
    assert has_moved_past(ours, theirs) is expected


def test_states_of_the_other_lifecycle_never_count_as_moved_past() -> None:
    assert not has_moved_past(_N.REQUESTED, _T.REQUESTED)  # equal strings, different lifecycles
