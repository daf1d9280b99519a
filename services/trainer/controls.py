"""What a control event does to a run, as pure logic the callback calls at a step boundary.

Each command either returns an ``Outcome`` with the old and new value, or raises
``Rejected`` with the reason; a rejected control changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class Rejected(ValueError):
    """The control cannot be applied; the message says why."""


@dataclass
class Outcome:
    old: object = None
    new: object = None
    stop: bool = False
    save: bool = False


@dataclass
class RunState:
    """The steerable state of a run: the trainer reads it at every step boundary."""

    learning_rate: float
    max_grad_norm: float
    applied: list[dict] = field(default_factory=list)  # audit: every applied control, in order


def _positive_float(value, name: str, upper: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise Rejected(f"{name} needs a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0 or v > upper:
        raise Rejected(f"{name} must be in (0, {upper:g}], got {value!r}")
    return v


def apply(state: RunState, command: str, value) -> Outcome:
    """Apply ``command`` to ``state``; raises Rejected for unknown commands or bad values."""
    if command == "stop":
        return Outcome(old="running", new="stopping", stop=True, save=True)
    if command == "checkpoint":
        return Outcome(new="saving", save=True)
    if command == "set-lr":
        new = _positive_float(value, "set-lr", 10.0)
        old, state.learning_rate = state.learning_rate, new
        return Outcome(old=old, new=new)
    if command == "set-grad-clip":
        new = _positive_float(value, "set-grad-clip", 1e6)
        old, state.max_grad_norm = state.max_grad_norm, new
        return Outcome(old=old, new=new)
    raise Rejected(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")


COMMANDS = ("stop", "checkpoint", "set-lr", "set-grad-clip")
