"""The sweep file and the search, without a bus: what is accepted, what is refused (and how it
is named), grid order, and that a study rebuilt from records prunes as the original would."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import EXAMPLE_DATA
from tuneloop.config import ConfigError
from tuneloop.tools.sweep import search
from tuneloop.tools.sweep.search import TrialRecord
from tuneloop.tools.sweep.spec import grid, load_sweep, trial_config

BASE = {"data": {"sources": [{"path": str(EXAMPLE_DATA)}]}, "train": {"max_steps": 40, "save_steps": 10}}


def write(tmp_path: Path, sweep: dict, base: dict = BASE) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "config": "base.yaml", **sweep}))
    return path


def test_grid_runs_every_combination_first_parameter_slowest(tmp_path):
    spec, base = load_sweep(write(tmp_path, {"params": {"train.learning_rate": {"values": [0.001, 0.003]},
                                                        "train.lora.r": {"values": [4, 8, 16]}},
                                             "overrides": {"train": {"max_steps": 30}}}))
    points = grid(spec)
    assert spec.total() == 6 and points[:3] == [{"train.learning_rate": 0.001, "train.lora.r": r} for r in (4, 8, 16)]
    cfg = trial_config(spec, base, points[4], "s-t04")
    assert (cfg.train.learning_rate, cfg.train.lora.r, cfg.train.max_steps, cfg.run.name) == (0.003, 8, 30, "s-t04")


def test_a_shuffled_grid_walks_every_point_once_in_an_order_the_seed_fixes(tmp_path):
    params = {"train.learning_rate": {"values": [0.001, 0.003, 0.01]}, "train.lora.r": {"values": [4, 8, 16]}}
    written, _ = load_sweep(write(tmp_path, {"params": params}))
    orders = {seed: [tuple(p.values()) for p in grid(load_sweep(write(tmp_path, {"params": params, "shuffle": True,
                                                                              "seed": seed}))[0])]
              for seed in range(4)}
    listed = [tuple(p.values()) for p in grid(written)]
    assert all(sorted(o) == sorted(listed) for o in orders.values())  # every point, once
    assert len({tuple(o) for o in orders.values()} | {tuple(listed)}) > 2  # the seed decides the order
    spec, _ = load_sweep(write(tmp_path, {"params": params, "shuffle": True, "seed": 3}))
    assert spec.fingerprint() != written.fingerprint()  # a restart never continues the other order
    # a restarted sweep takes the next point of the same order
    taken = [TrialRecord(number=i, run_id=f"s-t{i:02d}", params=p) for i, p in enumerate(grid(spec)[:4])]
    assert search.next_params(spec, taken) == grid(spec)[4]


@pytest.mark.parametrize("sweep, message", [
    ({"params": {"train.learnin_rate": {"values": [0.1]}}}, "params.train.learnin_rate = 0.1 makes an invalid config"),
    ({"params": {"train.learning_rate": {"values": [-1.0]}}}, "params.train.learning_rate = -1.0"),
    ({"params": {"train.lora.r": {"low": 4, "high": 32}}}, "a grid needs values: [...] for every parameter"),
    ({"params": {"train.lora.r": {"low": 4, "high": 32}}, "sampler": "tpe"}, "sampler tpe needs trials: N"),
    ({"params": {"train.learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "sampler": "random", "trials": 3},
     "a log range needs low > 0"),
    ({"params": {}}, "params"),
    ({"params": {"train.lora.r": {"values": [4]}}, "overrides": {"train": {"max_stepz": 3}}}, "overrides make an invalid config"),
    ({"params": {"train.lora.r": {"values": [4]}}, "concurency": 2}, "concurency"),
])
def test_a_wrong_sweep_file_is_refused_naming_the_field(tmp_path, sweep, message):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, sweep))
    assert message in str(e.value) and "sweep.yaml" in str(e.value)


def test_a_missing_base_config_and_a_phased_one_are_named(tmp_path):
    path = write(tmp_path, {"params": {"train.lora.r": {"values": [4]}}, "config": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"sweep.yaml: config: .nope.yaml. is not a file"):
        load_sweep(path)
    phased = {**BASE, "phases": [{"name": "a", "train": {"max_steps": 7}}, {"name": "b"}]}
    with pytest.raises(ConfigError, match=r"has phases \(a, b\); a trial is one run: say which with phase: NAME"):
        load_sweep(write(tmp_path, {"params": {"train.lora.r": {"values": [4]}}}, base=phased))
    with pytest.raises(ConfigError, match="phase 'c' is not in base.yaml"):
        load_sweep(write(tmp_path, {"params": {"train.lora.r": {"values": [4]}}, "phase": "c"}, base=phased))
    spec, base = load_sweep(write(tmp_path, {"params": {"train.lora.r": {"values": [4]}}, "phase": "a"}, base=phased))
    assert base.train.max_steps == 7 and not base.phases


def test_ranges_become_optuna_distributions_and_samples_stay_inside(tmp_path):
    spec, _ = load_sweep(write(tmp_path, {"sampler": "random", "trials": 5, "params": {
        "train.learning_rate": {"low": 0.0001, "high": 0.01, "log": True}, "train.lora.r": {"low": 4, "high": 32, "step": 4}}}))
    study = search.make_study(spec)
    for _ in range(5):
        t = search.ask(study, spec, search.next_params(spec, []))
        assert 1e-4 <= t.params["train.learning_rate"] <= 1e-2
        assert isinstance(t.params["train.lora.r"], int) and t.params["train.lora.r"] % 4 == 0


def _records():
    return [TrialRecord(number=0, run_id="s-t00", params={"train.learning_rate": 0.001}, state="complete",
                        values={10: 0.5, 20: 0.8}, value=0.8),
            TrialRecord(number=1, run_id="s-t01", params={"train.learning_rate": 0.003}, state="complete",
                        values={10: 0.6, 20: 0.9}, value=0.9),
            TrialRecord(number=2, run_id="s-t02", params={"train.learning_rate": 0.01}, state="running", values={10: 0.7})]


def test_a_rebuilt_study_resumes_numbering_and_prunes_a_trial_behind_the_median(tmp_path):
    spec, _ = load_sweep(write(tmp_path, {"params": {"train.learning_rate": {"values": [0.001, 0.003, 0.01, 0.03]}},
                                          "pruner": {"kind": "median", "startup_trials": 2}}))
    study = search.make_study(spec)
    running = search.rebuild(study, spec, _records())
    assert list(running) == [2]
    assert search.next_params(spec, _records()) == {"train.learning_rate": 0.03}  # the grid goes on where it was
    assert search.report(running[2], 20, 0.2)  # behind the median (0.85) of the completed trials at step 20
    fresh = search.ask(study, spec, search.next_params(spec, _records()))
    assert fresh.number == 3 and not search.report(fresh, 20, 0.95)


def test_no_pruning_before_enough_trials_completed_or_with_pruner_none(tmp_path):
    for pruner in ({"kind": "median", "startup_trials": 3}, {"kind": "none"}):
        spec, _ = load_sweep(write(tmp_path, {"params": {"train.learning_rate": {"values": [0.001, 0.003, 0.01]}},
                                              "pruner": pruner}))
        study = search.make_study(spec)
        running = search.rebuild(study, spec, _records())
        assert not search.report(running[2], 20, 0.0)


def test_the_best_trial_is_the_highest_test_value_earliest_on_ties():
    recs = _records() + [TrialRecord(number=3, run_id="s-t03", params={}, state="complete", value=0.9),
                         TrialRecord(number=4, run_id="s-t04", params={}, state="pruned", values={10: 0.99})]
    assert search.best(recs).number == 1
    assert search.best([r for r in recs if r.state != "complete"]) is None


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_restarted_random_or_tpe_sweep_does_not_draw_again_what_its_first_trials_drew(tmp_path, sampler):
    spec, _ = load_sweep(write(tmp_path, {"sampler": sampler, "trials": 8, "params": {
        "train.learning_rate": {"low": 1e-5, "high": 1e-1, "log": True}, "train.lora.r": {"values": [4, 8, 16, 32, 64]}}}))
    study = search.make_study(spec)
    first = [search.ask(study, spec).params for _ in range(3)]
    records = [TrialRecord(number=i, run_id=f"s-t{i:02d}", params=p) for i, p in enumerate(first)]
    again = search.make_study(spec, drawn=len(records))  # what the driver builds on a restart
    assert list(search.rebuild(again, spec, records)) == [0, 1, 2]
    later = [search.ask(again, spec).params["train.learning_rate"] for _ in range(3)]
    assert not set(later) & {p["train.learning_rate"] for p in first}, (first, later)
    # ... and two restarts at the same point draw alike: the search stays reproducible
    twin = search.make_study(spec, drawn=len(records))
    search.rebuild(twin, spec, records)
    assert [search.ask(twin, spec).params["train.learning_rate"] for _ in range(3)] == later
