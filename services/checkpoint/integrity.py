"""sha256 of a checkpoint directory: one digest over every file's name and content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuneloop.storage import UnsafePath, refuse_links

MANIFEST = "tuneloop-manifest.json"


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


def verify(path: Path, recorded_sha256: str | None = None, *, uncatalogued_ok: bool = False) -> str | None:
    """What is wrong with a checkpoint, or None.

    Its files must match the manifest the checkpoint service wrote when it hashed them, and the
    manifest must match ``recorded_sha256``, the digest the service announced (``ckpt.recorded``,
    kept in the stream where files on disk cannot change it). No manifest is a problem, unless
    the checkpoint was never recorded and ``uncatalogued_ok`` (the trainer resuming from a
    checkpoint saved just before it stopped, which the service had no time to hash)."""
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
