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
    timings = {k: v for k, v in results.items() if k not in readme.STUDY_FILES + readme.OWN_SECTION}
    assert set(timings) == {"feedback_loop", "startup", "sweep", "trainer_overhead"}
    # the data study and make demo from a fresh clone are measured too
    assert set(results) - set(timings) == set(readme.STUDY_FILES + readme.OWN_SECTION)
    text = (REPO / "README.md").read_text()
    section = text[text.index(readme.BEGIN) + len(readme.BEGIN):text.index(readme.END)].strip()
    assert section == readme.render(timings).strip()
    study = text[text.index(readme.STUDY_BEGIN) + len(readme.STUDY_BEGIN):text.index(readme.STUDY_END)].strip()
    assert study == readme.render_study(results).strip()


def test_the_quick_start_shows_the_timed_fresh_demo():
    spec = importlib.util.spec_from_file_location("fresh_demo", REPO / "bench" / "fresh_demo.py")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    figures = json.loads((REPO / "bench" / "results" / "fresh_demo.json").read_text())
    text = (REPO / "README.md").read_text()
    block = text[text.index(fresh.BEGIN) + len(fresh.BEGIN):text.index(fresh.END)].strip().strip("`").strip()
    assert block == fresh.render(figures)
