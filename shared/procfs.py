"""Whether a process recorded earlier is still the one we mean: a pid from a file may have
been reused by another program since, so its command line must name what we expect."""

from __future__ import annotations

from pathlib import Path


def running(pid: int | str | None, marker: str = "tuneloop") -> bool:
    """``pid`` is alive and its command line contains ``marker``."""
    try:
        return marker.encode() in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, TypeError, ValueError):
        return False
