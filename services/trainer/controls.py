"""What a control event does to a run, as pure logic the callback calls at a step boundary.

Each command either returns an ``Outcome`` with the old and new value, or raises
``Rejected`` with the reason; a rejected control changes nothing. The state is saved in
every checkpoint, so a resumed run keeps what operators decided.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


class Rejected(ValueError):
    """The control cannot be applied; the message says why."""


@dataclass
class Outcome:
    old: object = None
    new: object = None
    stop: bool = False
    save: bool = False
    prune: bool = False  # stop without a last checkpoint: the run's checkpoints are to be released
    switch_data: bool = False  # set-data: save, then go on with the new data set


@dataclass
class RunState:
    """The steerable state of a run: the trainer reads it at every step boundary."""

    learning_rate: float
    max_grad_norm: float
    save_steps: int
    logging_steps: int
    dataset_id: str = ""
    paused: bool = False
    applied: list[dict] = field(default_factory=list)  # audit: every applied control, in order

    def applied_ids(self) -> set[str]:
        return {a["control_id"] for a in self.applied}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, train, dataset_id: str = "") -> "RunState":
        """The state a fresh run starts with (``train`` is the config's train section)."""
        return cls(learning_rate=train.learning_rate, max_grad_norm=train.max_grad_norm,
                   save_steps=train.save_steps, logging_steps=train.logging_steps, dataset_id=dataset_id)

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _number(value, name: str, upper: float, integer: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise Rejected(f"{name} needs a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0 or v > upper:
        raise Rejected(f"{name} must be in (0, {upper:g}], got {value!r}")
    if integer:
        if v != int(v):
            raise Rejected(f"{name} needs a whole number, got {value!r}")
        return int(v)
    return v


def _set(state: RunState, attr: str, new) -> Outcome:
    old = getattr(state, attr)
    setattr(state, attr, new)
    return Outcome(old=old, new=new)


def apply(state: RunState, command: str, value, datasets: frozenset[str] = frozenset()) -> Outcome:
    """Apply ``command`` to ``state``; raises Rejected for unknown commands or bad values.

    ``datasets``: ids of the data sets announced for the run (what set-data may switch to).
    """
    if command == "stop":
        return Outcome(old="paused" if state.paused else "running", new="stopping", stop=True, save=True)
    if command == "prune":  # a sweep's trial that fell behind: stop now, nothing more to save
        return Outcome(old="paused" if state.paused else "running", new="pruned", stop=True, prune=True)
    if command in ("checkpoint", "eval"):  # every checkpoint is evaluated: eval = checkpoint now
        return Outcome(new="saving", save=True)
    if command == "pause":
        if state.paused:
            raise Rejected("already paused")
        return _set(state, "paused", True)
    if command == "resume":
        if not state.paused:
            raise Rejected("not paused")
        return _set(state, "paused", False)
    if command == "set-lr":
        return _set(state, "learning_rate", _number(value, command, 10.0))
    if command == "set-grad-clip":
        return _set(state, "max_grad_norm", _number(value, command, 1e6))
    if command == "set-save-interval":
        return _set(state, "save_steps", _number(value, command, 1e9, integer=True))
    if command == "set-log-interval":
        return _set(state, "logging_steps", _number(value, command, 1e9, integer=True))
    if command == "set-data":
        if value not in datasets:
            known = ", ".join(sorted(datasets)) or "none"
            raise Rejected(f"no data set {value!r} was announced for this run (announced: {known})")
        if value == state.dataset_id:
            raise Rejected(f"already training on data set {value!r}")
        outcome = _set(state, "dataset_id", value)
        outcome.save = outcome.switch_data = True
        return outcome
    raise Rejected(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")


COMMANDS = ("stop", "prune", "pause", "resume", "checkpoint", "eval", "set-lr", "set-grad-clip", "set-save-interval",
            "set-log-interval", "set-data")
