"""A checkpoint on disk: its folder name, when it is complete, its state file, its digest.

The trainer writes ``checkpoint-<step>`` folders through TRL and adds ``STATE_FILE`` last
(the controls in force, ``controls.Steering``): a folder without it is half written. The
checkpoint service hashes a complete one into ``MANIFEST`` and announces the digest
(``ckpt.recorded``, kept in the stream, where files on disk cannot change it). Resuming,
exporting and listing all read checkpoints through this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .controls import Steering
from .storage import UnsafePath, refuse_links

log = logging.getLogger(__name__)
PREFIX = "checkpoint-"
STATE_FILE = "tuneloop_state.json"  # written last into a checkpoint: one without it is incomplete
MANIFEST = "tuneloop-manifest.json"  # the checkpoint service's sha256 of every file


def step_of(path: Path | str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder; None for any other name (one moved aside)."""
    name = Path(path).name
    tail = name[len(PREFIX):]
    return int(tail) if name.startswith(PREFIX) and tail.isdigit() else None


def folder(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"{PREFIX}{step}"


def all_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """step -> folder of every checkpoint in ``checkpoints``, complete or not (moved-aside ones excluded)."""
    found = ((step_of(p), p) for p in Path(checkpoints).glob(f"{PREFIX}*"))
    return dict(sorted((s, p) for s, p in found if s is not None))


def complete_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """step -> folder of every fully written checkpoint (half-written and moved-aside ones excluded)."""
    return {s: p for s, p in all_checkpoints(checkpoints).items() if is_complete(p)}


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / STATE_FILE).is_file()


def latest_complete(checkpoints: Path) -> Path | None:
    """Newest checkpoint that was fully written; half-written ones are skipped."""
    done = complete_checkpoints(checkpoints)
    return done[max(done)] if done else None


def latest_intact(checkpoints: Path, recorded: dict[str, str] | None = None) -> Path | None:
    """Newest complete checkpoint whose files still match the checkpoint service's manifest and
    record (``recorded``: run-relative path -> sha256 of its ``ckpt.recorded``).

    A damaged one (truncated, edited, files missing or added, manifest removed) is moved aside
    as ``<name>.corrupt`` — kept for inspection, never deleted or overwritten — and the one
    before it is used. One never recorded and without a manifest is used: the service had no
    time to hash what was saved just before a stop."""
    recorded = recorded or {}
    checkpoints = Path(checkpoints)
    while (ckpt := latest_complete(checkpoints)) is not None:
        problem = verify(ckpt, recorded.get(f"{checkpoints.name}/{ckpt.name}"), uncatalogued_ok=True)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"{ckpt.name}.corrupt")
        n = 1
        while aside.exists():
            n += 1
            aside = ckpt.with_name(f"{ckpt.name}.corrupt{n}")
        ckpt.rename(aside)
        log.error("not resuming from %s; moved aside to %s", problem, aside.name)
    return None


# ------------------------------------------------------------------ a full disk
MIN_FREE_BYTES = 1 << 20  # below this, a write that failed failed for want of room


def out_of_space(error: BaseException, path: Path) -> bool:
    """Whether ``error`` (or what caused it) is the disk of ``path`` filling up: ENOSPC, however
    the writer wrapped it (torch and safetensors raise their own errors), or hardly a byte free."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(path).free < MIN_FREE_BYTES
    except OSError:
        return False


def drop_half_written(checkpoints: Path) -> list[str]:
    """Remove the checkpoint folders newer than the newest complete one: half written (no state
    file), by this trainer, when the disk filled up. Their room is what a restart needs first."""
    last = max(complete_checkpoints(checkpoints), default=-1)
    gone = []
    for s, path in all_checkpoints(checkpoints).items():
        if s > last and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path.name)
    return gone


class DiskFull(OSError):
    """The run's volume filled up while training wrote to it: training stops, saying where it can resume."""

    def __init__(self, run_dir: Path, step: int, checkpoints: Path):
        self.step = step
        removed = drop_half_written(checkpoints)
        last = latest_complete(checkpoints)
        free = shutil.disk_usage(run_dir).free
        super().__init__(errno.ENOSPC, (
            f"no space left on the volume of {run_dir} at step {step} ({free} bytes free)"
            + (f"; half-written {', '.join(removed)} removed" if removed else "")
            + (f"; the last complete checkpoint is {last.name}: make room and start the run again to resume from it"
               if last else "; no complete checkpoint yet: make room and start the run again")))


# ------------------------------------------------------------------ the state file
def write_state(checkpoint: Path, steering: Steering) -> None:
    """Controls in force, saved atomically as the checkpoint's last file."""
    write_steering(Path(checkpoint) / STATE_FILE, steering)


def read_state(checkpoint: Path) -> Steering:
    return read_steering(Path(checkpoint) / STATE_FILE)


def write_steering(path: Path, steering: Steering) -> None:
    """``steering`` to ``path``, written aside, synced and renamed: never half written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(steering.to_dict(), indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_steering(path: Path) -> Steering:
    return Steering.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------ integrity
def digest_dir(path: Path) -> tuple[str, int, dict[str, str]]:
    """(overall sha256, total bytes, sha256 per file); the manifest itself is left out.
    UnsafePath if the folder holds a symbolic link (its target is not the checkpoint's)."""
    refuse_links(path)
    overall = hashlib.sha256()
    files: dict[str, str] = {}
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                total += len(chunk)
        rel = str(f.relative_to(path))
        files[rel] = h.hexdigest()
        overall.update(rel.encode() + b"\0" + h.digest())
    return overall.hexdigest(), total, files


def write_manifest(path: Path, sha: str, size: int, files: dict[str, str]) -> None:
    """Keep ``digest_dir``'s answer in the checkpoint's manifest (what ``verify`` checks against)."""
    (Path(path) / MANIFEST).write_text(json.dumps({"sha256": sha, "bytes": size, "files": files}, indent=1))


def read_manifest(path: Path) -> dict:
    """The manifest of ``path`` ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def verify(path: Path, recorded_sha256: str | None = None, *, uncatalogued_ok: bool = False) -> str | None:
    """What is wrong with a checkpoint, or None.

    Its files must match the manifest the checkpoint service wrote when it hashed them, and the
    manifest must match ``recorded_sha256``, the digest the service announced. No manifest is a
    problem, unless the checkpoint was never recorded and ``uncatalogued_ok`` (the trainer
    resuming from a checkpoint saved just before it stopped, which the service had no time to
    hash)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        if recorded_sha256:
            return f"{path}: its manifest ({MANIFEST}) is gone, yet it was recorded with sha256 {recorded_sha256[:12]}"
        return None if uncatalogued_ok else (f"{path} has no manifest ({MANIFEST}): the checkpoint service never "
                                             "recorded it, so its files cannot be checked")
    try:
        recorded = json.loads(manifest.read_text())
        expected, manifest_sha = recorded["files"], recorded["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable: {e}"
    if recorded_sha256 and manifest_sha != recorded_sha256:
        return f"{manifest} says sha256 {manifest_sha[:12]}, but the checkpoint was recorded as {recorded_sha256[:12]}"
    try:
        sha, _, actual = digest_dir(path)
    except UnsafePath as e:
        return str(e)
    changed = sorted(f for f in set(expected) | set(actual) if actual.get(f) != expected.get(f))
    if changed:
        return f"{path}: {', '.join(changed)} changed, added or missing since it was catalogued (sha256 {MANIFEST})"
    if sha != manifest_sha:
        return f"{path}: its digest {sha[:12]} is not the manifest's {manifest_sha[:12]}"
    return None
