"""Lifecycles as data: an enum, a table of allowed transitions and one guarded transition.

    class Light(StrEnum):
        RED = "RED"; GREEN = "GREEN"

    LIGHT = StateMachine("light", {Light.RED: {Light.GREEN}, Light.GREEN: {Light.RED}})
    LIGHT.transition(Light.RED, Light.GREEN)   # -> Light.GREEN
    LIGHT.transition(Light.RED, Light.RED)     # raises InvalidTransitionError

A state absent from the table's keys is final. Entities never assign a state directly; they call
`transition`, so an invalid move is an error and never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from enum import Enum
from typing import Generic, TypeVar

from healthspace.core.errors import InvalidTransitionError

__all__ = ["StateMachine"]

S = TypeVar("S", bound=Enum)


class StateMachine(Generic[S]):
    def __init__(self, name: str, allowed: Mapping[S, Set[S]]) -> None:
        self.name = name
        self._allowed: dict[S, frozenset[S]] = {k: frozenset(v) for k, v in allowed.items()}

    def targets(self, current: S) -> frozenset[S]:
        """States reachable from `current` in one step (empty for a final state)."""
        return self._allowed.get(current, frozenset())

    def can(self, current: S, target: S) -> bool:
        return target in self.targets(current)

    def is_final(self, state: S) -> bool:
        return not self.targets(state)

    def reachable(self, current: S) -> frozenset[S]:
        """States reachable from `current` in one step or more (`current` itself only on a cycle)."""
        seen: set[S] = set()
        todo = list(self.targets(current))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self.targets(s))
        return frozenset(seen)

    def transition(self, current: S, target: S) -> S:
        """Return `target` if the move is allowed, else raise `InvalidTransitionError`."""
        if target not in self.targets(current):
            raise InvalidTransitionError(
                f"{self.name}: cannot go from {current.value} to {target.value}",
                current=str(current.value),
                target=str(target.value),
            )
        return target
