"""The README's benchmark figures are the ones in bench/results/*.json, rendered by
bench/readme.py: a figure typed in by hand (or JSON updated without the README) fails here."""

import importlib.util
import json

from helpers import REPO


def test_the_readme_shows_the_figures_of_the_bench_results():
    spec = importlib.util.spec_from_file_location("bench_readme", REPO / "bench" / "readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    results = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "bench" / "results").glob("*.json"))}
    assert set(results) == {"feedback_loop", "startup", "sweep", "trainer_overhead"}
    text = (REPO / "README.md").read_text()
    section = text[text.index(readme.BEGIN) + len(readme.BEGIN):text.index(readme.END)].strip()
    assert section == readme.render(results).strip()
