"""Reliability scenarios report their figures here; docs/reliability.md quotes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIGURES = Path(os.environ.get("TUNELOOP_RELIABILITY_FIGURES", "runs/reliability-figures.json"))


@pytest.fixture
def figures(request):
    """Record ``figures[name] = value`` for this scenario; printed, and kept in one JSON file."""
    got: dict = {}
    yield got
    print(f"\n{request.node.name}: {json.dumps(got)}")
    old = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    old[request.node.name] = got
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(old, indent=1, sort_keys=True))
