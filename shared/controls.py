"""The controls an operator can send a run: one vocabulary, and what each one does.

``COMMANDS`` is the vocabulary: each command's value, its limits and its help. The CLI's
help, the trainer's validation and the docs' controls table are made from it. ``apply`` is the
whole effect of a control on the run's ``Steering`` (the steerable state, saved in every
checkpoint so a resumed run keeps what operators decided), as pure logic the trainer's
callback calls at a step boundary: it returns an ``Outcome`` saying what the training loop
must do, or raises ``Rejected`` with the reason; a rejected control changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .generated import replace_block


class Rejected(ValueError):
    """The control cannot be applied; the message says why."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    value: str = ""  # what the value is, as the help names it: "" (none), "X" (a number), "N" (a whole number), a word
    upper: float = 0.0  # numbers: the largest accepted value (the smallest is just above 0)
    optional: bool = False  # the value may be left out

    @property
    def number(self) -> bool:
        return self.value in ("X", "N")

    @property
    def usage(self) -> str:
        if not self.value:
            return self.name
        return f"{self.name} [{self.value}]" if self.optional else f"{self.name} {self.value}"


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("stop", "checkpoint, then stop"),
    Command("prune", "stop without a last checkpoint; the checkpoint service deletes the run's checkpoints "
                     "instead of exporting", value="WHY", optional=True),
    Command("pause", "hold at the next step boundary (metrics keep coming, marked paused)"),
    Command("resume", "go on after a pause"),
    Command("checkpoint", "save a checkpoint now"),
    Command("eval", "save a checkpoint now and evaluate it"),
    Command("set-lr", "learning rate from the next step; the schedule continues from it", value="X", upper=10.0),
    Command("set-grad-clip", "max gradient norm", value="X", upper=1e6),
    Command("set-save-interval", "a checkpoint every N steps", value="N", upper=1e9),
    Command("set-log-interval", "metrics every N steps", value="N", upper=1e9),
    Command("set-data", "go on with another data set announced for the run (see `tuneloop data`)", value="ID"),
)}
# The steering field each setter changes.
FIELDS = {"set-lr": "learning_rate", "set-grad-clip": "max_grad_norm", "set-save-interval": "save_steps",
          "set-log-interval": "logging_steps"}


def usage() -> str:
    """One line naming every command with its value: the CLI's help."""
    return " | ".join(c.usage for c in COMMANDS.values())


def table() -> str:
    """The commands as a Markdown table: docs/events-and-controls.md's."""
    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `{c.usage}` | {c.help} |" for c in COMMANDS.values()]
    return "\n".join(rows)


DOC_BEGIN, DOC_END = "<!-- controls:begin -->", "<!-- controls:end -->"


def in_document(text: str) -> str:
    """``text`` (a page of the docs) with ``table()`` between its controls markers."""
    return replace_block(text, DOC_BEGIN, DOC_END, table(), "the page")


GUARDABLE = ("set-lr", "set-grad-clip", "set-data")  # the controls that change what training does


def check_guard(command: str, guard: str | None, within: int | None, categories: frozenset[str] = frozenset(),
                watching: "GuardWatch | None" = None, metrics: list[str] | None = None):
    """The parsed guard of a control (None without one); Rejected says what is wrong with it.
    ``categories``: the data set's (a guard on another category could never be judged);
    ``watching``: the guard already under watch (one at a time); ``metrics``: the task's (None: any)."""
    from .guard import GuardError, parse

    if guard is None:
        if within is not None:
            raise Rejected("--within needs --guard")
        return None
    if command not in GUARDABLE:
        raise Rejected(f"{command} cannot be guarded; guarded controls: {', '.join(GUARDABLE)}")
    try:
        parsed = parse(guard, metrics)
    except GuardError as e:
        raise Rejected(str(e)) from None
    unknown = parsed.categories() - categories
    if categories and unknown:
        raise Rejected(f"guard {guard!r} names categories the data set does not have: {', '.join(sorted(unknown))} "
                       f"(it has: {', '.join(sorted(categories))})")
    if watching is not None:
        raise Rejected(f"{watching.command} applied at step {watching.applied_step} is still under its guard "
                       f"{watching.guard!r}; wait for its confirmation or rollback")
    return parsed


def parse_value(command: str, text: str | None):
    """The value of ``command`` as typed on a command line: a number for a numeric command,
    else the text as it is (the trainer, which validates every control, answers a bad one)."""
    spec = COMMANDS.get(command)
    if text is None or spec is None or not spec.number:
        return text
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class Outcome:
    old: object = None
    new: object = None
    stop: bool = False
    save: bool = False
    prune: bool = False  # stop without a last checkpoint: the run's checkpoints are to be released
    switch_data: bool = False  # set-data: save, then go on with the new data set
    set_lr: bool = False  # the optimizer and schedule take the new learning rate
    evaluate: bool = False  # the checkpoint saved now is evaluated
    stop_reason: tuple[str, str] | None = None  # (reason, detail) for TrainingFinished


@dataclass
class AppliedControl:
    """A control that took effect: the audit of a run's steering (and, once a rollback undid
    it, ``rolled_back_at``: the step the run went back from; it is never applied again)."""

    control_id: str
    command: str
    value: object = None
    step: int = 0
    rolled_back_at: int | None = None


@dataclass
class GuardWatch:
    """A guarded control under watch (``--guard``): applied after its savepoint, judged on the
    next ``within`` verdicts, rolled back to the savepoint if one breaks the guard."""

    control_id: str
    command: str
    guard: str
    value: object = None
    within: int = 1
    applied_step: int = 0
    savepoint: str = ""  # run-relative folder of the savepoint checkpoint
    savepoint_step: int = 0
    held: list[int] = field(default_factory=list)  # steps of the verdicts that met the guard
    saves: list[str] = field(default_factory=list)  # ckpt.saved ids since: discarded by a rollback
    ignore_data_skip: bool = False  # the training arguments' value at the savepoint, restored with it


@dataclass
class OpenProposal:
    """What a policy wants to do, waiting for an operator (the trainer's approvals)."""

    proposal: dict  # the Proposal event as published (JSON)
    deadline: float  # wall clock: then ``feedback.on_timeout`` decides
    control: dict | None = None  # the policy's control it holds (JSON), None for feedback's stop

    @property
    def command(self) -> str:
        return self.proposal["command"]


def _records(cls, items, where: str):
    try:
        return [item if isinstance(item, cls) else cls(**{k: v for k, v in item.items() if k in cls.__dataclass_fields__})
                for item in items]
    except (TypeError, AttributeError) as e:
        raise ValueError(f"steering state: {where} is not a list of {cls.__name__} records ({e})") from None


@dataclass
class Steering:
    """The steerable state of a run: the trainer reads it at every step boundary. Saved with
    every checkpoint and in the run's applied-controls file as JSON (``to_dict``), in the shape
    the plain dicts of earlier versions had, so either reads the other's files."""

    learning_rate: float
    max_grad_norm: float
    save_steps: int
    logging_steps: int
    dataset_id: str = ""
    paused: bool = False
    applied: list[AppliedControl] = field(default_factory=list)  # audit: every applied control, in order
    rolled_back: list[AppliedControl] = field(default_factory=list)  # undone by a rollback: never applied again
    guard: GuardWatch | None = None  # the guarded control under watch, None when none is
    proposals: dict[str, OpenProposal] = field(default_factory=dict)  # open proposals by id
    discarded_requests: list[str] = field(default_factory=list)  # eval requests of discarded checkpoints

    def applied_ids(self) -> set[str]:
        return {a.control_id for a in self.applied} | {a.control_id for a in self.rolled_back}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, train, dataset_id: str = "") -> "Steering":
        """The state a fresh run starts with (``train`` is the config's train section)."""
        return cls(learning_rate=train.learning_rate, max_grad_norm=train.max_grad_norm,
                   save_steps=train.save_steps, logging_steps=train.logging_steps, dataset_id=dataset_id)

    @classmethod
    def from_dict(cls, data: dict) -> "Steering":
        """The state saved by ``to_dict`` (this version's or an earlier one's); ValueError
        names what is wrong with a file that is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"steering state: expected an object, got {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["applied"] = _records(AppliedControl, known.get("applied") or [], "applied")
        known["rolled_back"] = _records(AppliedControl, known.get("rolled_back") or [], "rolled_back")
        if known.get("guard") is not None:
            known["guard"] = _records(GuardWatch, [known["guard"]], "guard")[0]
        proposals = known.get("proposals") or {}
        if not isinstance(proposals, dict):
            raise ValueError("steering state: proposals is not an object of open proposals")
        known["proposals"] = dict(zip(proposals, _records(OpenProposal, proposals.values(), "proposals")))
        try:
            return cls(**known)
        except TypeError as e:
            raise ValueError(f"steering state: {e}") from None


def _number(value, spec: Command) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise Rejected(f"{spec.name} needs a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0 or v > spec.upper:
        raise Rejected(f"{spec.name} must be in (0, {spec.upper:g}], got {value!r}")
    if spec.value == "N":
        if v != int(v):
            raise Rejected(f"{spec.name} needs a whole number, got {value!r}")
        return int(v)
    return v


def _set(state: Steering, attr: str, new) -> Outcome:
    old = getattr(state, attr)
    setattr(state, attr, new)
    return Outcome(old=old, new=new)


def apply(state: Steering, command: str, value, datasets: frozenset[str] = frozenset(), *,
          stopping: str | None = None, who: str = "operator") -> Outcome:
    """Apply ``command`` to ``state``; raises Rejected for unknown commands or bad values.

    ``datasets``: ids of the data sets announced for the run (what set-data may switch to);
    ``stopping``: why the run is already stopping, if it is; ``who``: who sent the control.
    """
    if command not in COMMANDS:
        raise Rejected(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    if command in ("stop", "prune") and stopping is not None:
        raise Rejected(f"already stopping ({stopping})")
    if command == "stop":
        return Outcome(old="paused" if state.paused else "running", new="stopping", stop=True, save=True,
                       stop_reason=("control", f"stop by {who}"))
    if command == "prune":  # a sweep's trial that fell behind: stop now, nothing more to save
        return Outcome(old="paused" if state.paused else "running", new="pruned", stop=True, prune=True,
                       stop_reason=("pruned", f"pruned by {who}" + (f": {value}" if value else "")))
    if command in ("checkpoint", "eval"):
        return Outcome(new="saving", save=True, evaluate=command == "eval")
    if command == "pause":
        if state.paused:
            raise Rejected("already paused")
        return _set(state, "paused", True)
    if command == "resume":
        if not state.paused:
            raise Rejected("not paused")
        return _set(state, "paused", False)
    if command in FIELDS:
        outcome = _set(state, FIELDS[command], _number(value, COMMANDS[command]))
        outcome.set_lr = command == "set-lr"
        return outcome
    # set-data
    if value not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        raise Rejected(f"no data set {value!r} was announced for this run (announced: {known})")
    if value == state.dataset_id:
        raise Rejected(f"already training on data set {value!r}")
    outcome = _set(state, "dataset_id", value)
    outcome.save = outcome.switch_data = True
    return outcome


if __name__ == "__main__":  # make docs: python -m tuneloop.controls docs/events-and-controls.md
    import sys
    from pathlib import Path

    doc = Path(sys.argv[1])
    doc.write_text(in_document(doc.read_text()))
