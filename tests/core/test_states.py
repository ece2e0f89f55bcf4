"""The state-machine helper refuses every move its table does not allow."""

from __future__ import annotations

from enum import StrEnum
from itertools import product

import pytest

from healthspace.core.errors import InvalidTransitionError
from healthspace.core.states import StateMachine


class Door(StrEnum):
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    LOCKED = "LOCKED"
    DEMOLISHED = "DEMOLISHED"


ALLOWED = {
    Door.OPEN: {Door.CLOSED, Door.DEMOLISHED},
    Door.CLOSED: {Door.OPEN, Door.LOCKED, Door.DEMOLISHED},
    Door.LOCKED: {Door.CLOSED},
}
DOOR = StateMachine("door", ALLOWED)


@pytest.mark.parametrize(("current", "target"), list(product(Door, Door)))
def test_transition_follows_the_table_exactly(current: Door, target: Door) -> None:
    if target in ALLOWED.get(current, set()):
        assert DOOR.transition(current, target) is target
    else:
        with pytest.raises(InvalidTransitionError, match=f"{current.value} to {target.value}"):
            DOOR.transition(current, target)


def test_a_state_without_outgoing_moves_is_final() -> None:
    assert DOOR.is_final(Door.DEMOLISHED)
    assert not DOOR.is_final(Door.LOCKED)
