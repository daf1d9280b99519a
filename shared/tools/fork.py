"""Fork a run: a new run that starts from one of its checkpoints, with some settings changed.

- **Full state** (the default): the child resumes the parent's checkpoint as a restart would
  (weights, optimizer, schedule, RNG, data position), so with no change it continues the
  parent's trajectory exactly; a changed learning rate, gradient clip or save/log interval
  takes effect at the fork step as a control would (recorded as one in the child's
  applied-controls file, so the trainer's resume applies it: no second mechanism). Settings a
  resumed optimizer or data position cannot follow (LoRA rank, method, data, batch size,
  the base model...) are refused with the reason: fork with ``weights_only``.
- **Weights only**: the parent's weights at that step (the adapter merged into its base)
  become the child's base model; a fresh optimizer, schedule and data order, and any setting
  may change (an SFT checkpoint forked into GRPO, another LoRA rank).

The child is a run like any other (its own id, controls, verdicts, export); its run.json and
summary say where it came from (``forked_from``), and the parent's run.json lists its forks.
Pure planning (``plan``) apart from the files it writes (``make``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from ..checkpoints import complete_checkpoints, read_state, read_steering, verify, write_steering
from ..config import RUN_ID_STAMP, Config, load_config
from ..controls import AppliedControl
from ..storage import CONFIG_FILE, RunDir, init_run, read_run_info, relative, run_dir, write_run_info
from ..subjects import check_run_id

# What a full-state fork may change: what a control could change mid-run, and what is read
# afresh by the services (when to stop, how to evaluate, the feedback policy, the export).
KEEPS_STATE = ("train.learning_rate", "train.max_grad_norm", "train.save_steps", "train.logging_steps",
               "train.max_steps", "eval.", "feedback.", "export.", "run.name")
AS_CONTROL = {"train.learning_rate": ("set-lr", "learning_rate"), "train.max_grad_norm": ("set-grad-clip", "max_grad_norm"),
              "train.save_steps": ("set-save-interval", "save_steps"),
              "train.logging_steps": ("set-log-interval", "logging_steps")}


class ForkRefused(ValueError):
    """A fork that cannot be made, and why."""


class ForkUsage(ForkRefused):
    """The fork's arguments cannot be read (``--set``, ``--at``, ``--name``)."""


class ForkNotFound(ForkRefused):
    """What the fork starts from is not there: the run, or its checkpoint at the step asked for."""


@dataclass
class Fork:
    parent: str
    child: str
    step: int
    checkpoint: Path
    config: Config
    changed: dict = field(default_factory=dict)
    weights_only: bool = False

    def lineage(self, storage: Path) -> dict:
        return {"run": self.parent, "step": self.step, "weights_only": self.weights_only, "changed": self.changed,
                "checkpoint": relative(run_dir(storage, self.parent), self.checkpoint)}


def fork_tree(runs, parent_of) -> list[tuple[int, str]]:
    """(depth, run) of ``runs`` (in their order) with each fork right under its parent, a fork
    of a fork one deeper; a fork whose parent is not listed stands on its own."""
    runs = list(runs)
    children: dict[str, list[str]] = {}
    for r in runs:
        if (p := parent_of(r)) in runs and p != r:
            children.setdefault(p, []).append(r)
    out: list[tuple[int, str]] = []

    def visit(r: str, depth: int) -> None:
        out.append((depth, r))
        for c in children.get(r, []):
            visit(c, depth + 1)
    for r in runs:
        if parent_of(r) not in runs or parent_of(r) == r:
            visit(r, 0)
    return out


def parse_sets(sets: list[str]) -> dict:
    """``KEY=VALUE`` pairs (``train.learning_rate=5e-4``), each value read as YAML."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ForkUsage(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=5e-4")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 5e-4 as text: a number typed on a command line is one
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def keeps_state(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in KEEPS_STATE)


def choose_checkpoint(storage: Path, parent: str, at: str) -> tuple[int, Path]:
    rd = RunDir(run_dir(storage, parent))
    complete = complete_checkpoints(rd.checkpoints)
    if at == "latest":
        if not complete:
            raise ForkNotFound(f"run {parent} has no complete checkpoint yet")
        step = max(complete)
    elif at == "best":
        summary = rd.path / "summary.json"
        step = json.loads(summary.read_text()).get("exported_step") if summary.is_file() else None
        if step is None:
            raise ForkNotFound(f"run {parent} has no best checkpoint yet (it has not exported one): name a step")
    else:
        try:
            step = int(at)
        except ValueError:
            raise ForkUsage(f"--at {at!r}: a step, latest or best") from None
    if step not in complete:
        why = discarded(rd, step)
        raise ForkNotFound(f"run {parent} has no complete checkpoint at step {step}"
                          + (f": {why}" if why else f" (it has: {', '.join(map(str, sorted(complete))) or 'none'})"))
    if problem := verify(complete[step], None, uncatalogued_ok=True):
        raise ForkRefused(f"checkpoint {complete[step]} cannot be forked: {problem}")
    return step, complete[step]


def discarded(rd: RunDir, step: int) -> str | None:
    """Why ``step``'s checkpoint is gone, when a rollback discarded it (the run's steering file
    lists the controls rolled back, with the step the run went back from)."""
    try:
        state = read_steering(rd.applied)
    except (OSError, ValueError):
        return None
    for a in state.rolled_back:
        if a.rolled_back_at is not None and a.step < step <= a.rolled_back_at:
            return (f"it was discarded when {a.command} applied at step {a.step} was rolled back at step "
                    f"{a.rolled_back_at} (its guard broke)")
    return None


def plan(storage: Path, parent: str, at: str = "latest", sets: list[str] | None = None, weights_only: bool = False,
         name: str | None = None, changes: dict | None = None) -> Fork:
    """What forking ``parent`` at ``at`` with ``sets`` (``KEY=VALUE`` text) or ``changes`` (the
    values themselves) would make; ForkRefused says why not."""
    storage = Path(storage).resolve()
    if not (run_dir(storage, parent) / CONFIG_FILE).is_file():
        raise ForkNotFound(f"no run {parent!r} under {storage}")
    changed = {**parse_sets(sets or []), **(changes or {})}
    if not weights_only:
        for key in changed:
            if not keeps_state(key):
                raise ForkRefused(f"--set {key}: a full-state fork continues the parent's optimizer, schedule and data "
                                  f"position, which {key} would not fit; fork with --weights-only to change it")
    parent_cfg = load_config(run_dir(storage, parent) / CONFIG_FILE)
    # A full-state fork resumes: its starting model is the parent's checkpoint, not a new "before".
    keep = {} if weights_only else {"eval.baseline": False}
    keep["train.pause_every"] = None  # a fork is a run of its own: a PBT sweep's barrier is the sweep's to set
    try:
        cfg = parent_cfg.with_overrides(keep, changed)
    except ValueError as e:
        raise ForkUsage(f"--set: {e}") from None
    step, ckpt = choose_checkpoint(storage, parent, at)
    child = name or f"{parent}-fork{step}" + datetime.now().strftime(RUN_ID_STAMP)
    try:
        check_run_id(child)
    except ValueError as e:
        raise ForkUsage(str(e)) from None
    if run_dir(storage, child).exists():
        raise ForkRefused(f"run {child} exists already: name the fork with --name")
    return Fork(parent, child, step, ckpt, cfg, changed, weights_only)


def make(fork: Fork, storage: Path) -> Path:
    """Write the child's run folder (and the parent's record of it); returns the child's."""
    storage = Path(storage).resolve()
    cfg = fork.config
    child = RunDir(run_dir(storage, fork.child))
    if fork.weights_only:
        fork.config = cfg = _on_parent_weights(fork, storage, child)
        init_run(cfg, fork.child, storage)
    else:
        init_run(cfg, fork.child, storage)
        shutil.copytree(fork.checkpoint, child.fork_start / fork.checkpoint.name)
        steering = read_state(fork.checkpoint)
        for key, (command, attr) in AS_CONTROL.items():
            if key in fork.changed:  # applied at the fork step, as the control would have been
                setattr(steering, attr, getattr(cfg.train, key.split(".", 1)[1]))
                steering.applied.append(AppliedControl(control_id=f"fork-{fork.child}-{command}", command=command,
                                                       value=getattr(steering, attr), step=fork.step))
        write_steering(child.applied, steering)
    lineage = fork.lineage(storage)
    write_run_info(storage, fork.child, {"run_id": fork.child, "state": "forked", "forked_from": lineage})
    try:
        parent_info = read_run_info(storage, fork.parent)
    except FileNotFoundError:  # a run a deployment serves (`tuneloop init`) has no run.json of the runner's
        parent_info = {"run_id": fork.parent}
    parent_info.setdefault("forks", []).append({"run": fork.child, "step": fork.step, "changed": fork.changed,
                                                "weights_only": fork.weights_only})
    write_run_info(storage, fork.parent, parent_info)
    return child.path


def _on_parent_weights(fork: Fork, storage: Path, child: RunDir) -> Config:
    """The child's config on the parent's weights at the fork step (its adapter merged into its
    base), written into the child's folder: a fresh run from there."""
    from ..export import export_merged

    parent = RunDir(run_dir(storage, fork.parent))
    parent_cfg = load_config(parent.config)
    dest = child.path / "forked-weights"
    child.path.mkdir(parents=True, exist_ok=True)
    export_merged(fork.checkpoint, parent.base, parent_cfg.train.lora.enabled, dest)
    template = {"tuneloop": "tuneloop", "model": "base"}[parent_cfg.model.template()]
    return fork.config.with_overrides({"model.name_or_path": str(dest), "model.gguf_file": None,
                                       "model.chat_template": template})
