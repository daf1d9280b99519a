"""The benchmark figures of docs/ (and the README's Quick start) are the ones in
bench/results/*.json, rendered by bench/readme.py: a figure typed in by hand (or JSON updated
without the docs) fails here."""

import importlib.util
import json
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))  # the benches' own common.py, as when they run


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_the_figures_of_the_bench_results():
    readme = bench_module("readme")
    results = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "bench" / "results").glob("*.json"))}
    timings = {k: v for k, v in results.items() if k not in readme.STUDY_FILES + readme.OWN_SECTION}
    assert set(timings) == {name for name, *_ in readme.TARGETS}  # every target measured
    # the data study and make demo from a fresh clone are measured too
    assert set(results) - set(timings) == set(readme.STUDY_FILES + readme.OWN_SECTION)
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text[text.index(readme.BEGIN) + len(readme.BEGIN):text.index(readme.END)].strip()
    assert section == readme.render(timings, REPO / "bench" / "results").strip()
    text = (REPO / "docs" / "data.md").read_text()
    study = text[text.index(readme.STUDY_BEGIN) + len(readme.STUDY_BEGIN):text.index(readme.STUDY_END)].strip()
    assert study == readme.render_study(results).strip()


def test_the_quick_start_shows_the_timed_fresh_demo():
    fresh = bench_module("fresh_demo")
    figures = json.loads((REPO / "bench" / "results" / "fresh_demo.json").read_text())
    text = (REPO / "README.md").read_text()
    block = text[text.index(fresh.BEGIN) + len(fresh.BEGIN):text.index(fresh.END)].strip().strip("`").strip()
    assert block == fresh.render(figures)


def test_a_target_is_met_only_when_its_whole_interval_is_on_its_side():
    readme = bench_module("readme")
    assert readme.judged({"k": 0.4, "k_ci95": [0.3, 0.49]}, "k", 0.5, True) == "met"
    assert readme.judged({"k": 0.45, "k_ci95": [0.3, 0.6]}, "k", 0.5, True) == "unresolved"
    assert readme.judged({"k": 0.7, "k_ci95": [0.55, 0.8]}, "k", 0.5, True) == "missed"
    assert readme.judged({"k": 0.98, "ratios": [0.975, 0.99, 0.98]}, "k", 0.97, False) == "met"
    assert readme.judged({"k": 0.98, "ratios": [0.95, 0.99, 0.98]}, "k", 0.97, False) == "unresolved"
    assert readme.judged({"k": 0.98}, "k", 0.97, False) == "unresolved"  # no interval: not a pass
