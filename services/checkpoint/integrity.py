"""sha256 of a checkpoint directory: one digest over every file's name and content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "tuneloop-manifest.json"


def digest_dir(path: Path) -> tuple[str, int, dict[str, str]]:
    """(overall sha256, total bytes, sha256 per file); the manifest itself is left out."""
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


def verify(path: Path) -> str | None:
    """What is wrong with a catalogued checkpoint (files changed or gone since the checkpoint
    service hashed them), or None. A checkpoint not yet catalogued has no manifest: None."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable: {e}"
    _, _, actual = digest_dir(Path(path))
    changed = sorted(f for f in expected if actual.get(f) != expected[f])
    if changed:
        return f"{path}: {', '.join(changed)} changed or missing since it was catalogued (sha256 {MANIFEST})"
    return None
