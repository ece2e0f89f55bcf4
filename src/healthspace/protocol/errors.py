"""Errors of the DSP wire layer: invalid messages and messages the process state does not allow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from healthspace.core.errors import InvalidTransitionError, ValidationError

__all__ = ["DspValidationError", "MessageNotAllowedError", "Problem"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a message: where (RFC 6901 JSON pointer into the message) and what."""

    pointer: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"pointer": self.pointer, "message": self.message}

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


class DspValidationError(ValidationError):
    """A DSP message does not conform to its DSP 2025-1 schema (or names no known type).

    DSP answers a malformed message with 400, not 422, so the status is overridden. `problems` lists
    every violation found, each with its JSON pointer; it also reaches the problem document.
    """

    status = 400
    code = "dsp-invalid-message"
    title = "The DSP message is not valid"

    def __init__(self, detail: str, problems: list[Problem], **extra: Any) -> None:
        super().__init__(detail, problems=[p.to_json() for p in problems], **extra)
        self.problems = problems


class MessageNotAllowedError(InvalidTransitionError):
    """A well-formed DSP message that the process's current state (or the receiver's role) forbids.

    DSP requires 400 for an invalid state transition (negotiation and transfer HTTPS bindings), so
    the 409 of `InvalidTransitionError` is overridden; callers catching `InvalidTransitionError` still
    catch this.
    """

    status = 400
    code = "dsp-message-not-allowed"
    title = "Message not allowed in the current state"
