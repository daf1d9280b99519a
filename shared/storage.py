"""Run storage: every run has one directory under a storage root, and every path that rides
on an event is relative to it. ``confine`` is the one gate: a path from an event that would
leave the run directory (``..``, absolute, symlink out) is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .events import Reject
from .config import Config, ConfigError, differences, dump_config, load_config

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
# In the run directory: the run's controls as applied so far, written before each is answered.
APPLIED_FILE = "controls-applied.json"
SNAPSHOTS = "snapshots"  # evaluation snapshots (eval.every): <run>/snapshots/step-<N>, weights only


class RunDir:
    """The one home of a run folder's layout: where each part of a run lives (every literal
    name is here), and how an evaluation snapshot's folder is named and read back."""

    SNAPSHOT_PREFIX = "step-"

    def __init__(self, path: Path):
        self.path = Path(path)

    checkpoints = property(lambda self: self.path / "checkpoints")  # resumable checkpoints (TRL's checkpoint-<N>)
    snapshots = property(lambda self: self.path / SNAPSHOTS)  # evaluation snapshots: weights only
    data = property(lambda self: self.path / "data")  # prepared data sets, one folder each
    base = property(lambda self: self.path / "base")  # the base model (or a link to it)
    export = property(lambda self: self.path / "export")  # exported adapters and merged models
    logs = property(lambda self: self.path / "logs")  # one log per service process
    # A fork's start (tools/fork.py): the parent's checkpoint it resumes from until it has its own.
    # Not under checkpoints/: it is no checkpoint of this run, and nothing catalogues or exports it.
    fork_start = property(lambda self: self.path / "forked-from")
    config = property(lambda self: self.path / CONFIG_FILE)
    applied = property(lambda self: self.path / APPLIED_FILE)

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"{self.SNAPSHOT_PREFIX}{step}"

    def snapshot_folders(self) -> dict[int, Path]:
        """Every evaluation snapshot, by step (a folder whose name is not one is left out)."""
        out = {}
        for path in self.snapshots.glob(f"{self.SNAPSHOT_PREFIX}*"):
            tail = path.name[len(self.SNAPSHOT_PREFIX):]
            if tail.isdigit():
                out[int(tail)] = path
        return out


class UnsafePath(Reject, ValueError):
    """An event named a path outside its run's directory."""


def run_dir(root: Path, run_id: str) -> Path:
    return Path(root).resolve() / run_id


def confine(base: Path, rel: str) -> Path:
    """``base / rel`` resolved, or UnsafePath if it escapes ``base``."""
    if not rel or Path(rel).is_absolute():
        raise UnsafePath(f"path {rel!r} must be relative to the run directory")
    base = Path(base).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafePath(f"path {rel!r} leaves the run directory {base}")
    return target


def refuse_links(folder: Path) -> None:
    """UnsafePath if anything under ``folder`` is a symbolic link: hashing, resuming and
    exporting read what is inside a checkpoint, never what a link points at elsewhere."""
    for p in sorted(Path(folder).rglob("*")):
        if p.is_symlink():
            raise UnsafePath(f"{p} is a symbolic link (to {os.readlink(p)}); a checkpoint holds only its own files")


def relative(base: Path, path: Path) -> str:
    return str(Path(path).resolve().relative_to(Path(base).resolve()))


def init_run(cfg: Config, run_id: str, storage: Path) -> Path:
    """Create the run directory with its config: all services need to serve the run.

    Used by ``tuneloop run``, the sweep and, for compose and Kubernetes, ``tuneloop init``. The
    same run again (a restart) resumes; another config under its id would mix two runs.
    """
    rdir = run_dir(storage, run_id)
    existing = rdir / CONFIG_FILE
    if existing.is_file():
        changed = differences(load_config(existing), cfg)
        if changed:
            raise ConfigError(f"run {run_id} already exists ({rdir}) with another configuration "
                              f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''} differ); give this one "
                              "another run id (or run.name), or delete that folder to start over")
    (rdir / "logs").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, rdir / CONFIG_FILE)
    return rdir


def load_run_config(root: Path, run_id: str) -> Config:
    return load_config(run_dir(root, run_id) / CONFIG_FILE)


def read_run_info(root: Path, run_id: str) -> dict:
    p = run_dir(root, run_id) / RUN_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no run {run_id!r} under {Path(root).resolve()} ({p} missing)")
    return json.loads(p.read_text())


LINEAGE = ("forked_from", "forks")  # kept in run.json whoever rewrites it (a run, a sweep, a fork)


def write_run_info(root: Path, run_id: str, info: dict) -> None:
    p = run_dir(root, run_id) / RUN_FILE
    if p.is_file() and not all(k in info for k in LINEAGE):
        try:
            before = json.loads(p.read_text())
        except ValueError:
            before = {}
        info = {**{k: before[k] for k in LINEAGE if k in before}, **info}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(p)


def resolve_model(base: Path, ref: str) -> Path | str:
    """A model reference from an event: a path inside the run directory, or a hub id (``org/name``).

    Anything else (absolute paths, ``..``) is refused, so an event cannot point a service at
    arbitrary files.
    """
    candidate = Path(base).resolve() / ref
    if not Path(ref).is_absolute() and ".." not in Path(ref).parts and candidate.exists():
        return confine(base, ref)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref) and ".." not in ref:
        if Path(ref).exists():  # transformers would load this folder of the service's working directory
            raise UnsafePath(f"model {ref!r} is not in the run directory, and as a hub id it would load "
                             f"{Path(ref).resolve()} from the service's working directory instead")
        return ref
    raise UnsafePath(f"model {ref!r} is neither inside the run directory nor a hub id")
