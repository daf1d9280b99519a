"""What a decision at the step boundary is made at (``Boundary``) and what it asks of the
training loop and the bus (``Effects``): the vocabulary between the pure deciders (steering.py,
approvals.py) and the callback that carries their decisions out (steering_callback.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneloop.events import Event

from .rollback import Rollback


@dataclass(frozen=True)
class Boundary:
    """The step boundary an event is decided at."""

    step: int
    datasets: frozenset[str] = frozenset()  # ids of the data sets announced for the run (set-data's choices)
    now: float = 0.0  # wall clock: proposals' deadlines
    loop_stopping: bool = False  # the training loop ends at this step already (its last step, a stop decided)


@dataclass
class Effects:
    """What a decision asks of the training loop and the bus."""

    answer: Event | None = None  # the reply to the event decided; the event is acknowledged once it is stored
    publish: list[Event] = field(default_factory=list)  # published too (a held control applied, a guard confirmed)
    deferred: bool = False  # a guarded control: answered after its savepoint (``at_savepoint``)
    applied: bool = False  # a control took effect: the trainer's arguments follow the steering state
    set_lr: bool = False  # the optimizer and schedule take the state's learning rate
    stop: bool = False
    save: bool = False
    switch_data: str | None = None  # set-data: save, then the recipe goes on with this data set
    evaluate_next_save: bool = False
    rollback: Rollback | None = None  # a broken guard: stop without saving, the recipe rolls back
    write_steering: bool = False  # the applied-controls file (rank 0): durable before it is answered

    def merge(self, other: "Effects") -> "Effects":
        """``other`` carried out after this one (an approved proposal's held control)."""
        self.publish += ([other.answer] if other.answer else []) + other.publish
        for name in ("applied", "set_lr", "stop", "save", "evaluate_next_save", "write_steering"):
            setattr(self, name, getattr(self, name) or getattr(other, name))
        self.switch_data = other.switch_data or self.switch_data
        return self
