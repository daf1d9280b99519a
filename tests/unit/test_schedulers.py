"""The sweep's schedulers on trial records alone (no bus, no processes): what each starts,
what each verdict and end decides, and that a scheduler rebuilt after a restart decides as the
first one would have. The driver only carries these decisions out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tuneloop.tools.sweep import schedulers
from tuneloop.tools.sweep.schedulers import AshaScheduler, Copy, OptunaScheduler, PbtScheduler, Prune, Resume, View
from tuneloop.tools.sweep.search import TrialRecord
from tuneloop.tools.sweep.spec import SweepSpec

LR = "train.learning_rate"
GRID = {LR: {"values": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}}


def spec(**over) -> SweepSpec:
    return SweepSpec.model_validate({"name": "s", "config": "c.yaml", "params": GRID, **over})


def record(n: int, values: dict, state: str = "running", value: float | None = None, budget: int = 40,
           bounds: dict | None = None) -> TrialRecord:
    return TrialRecord(number=n, run_id=f"s-t{n:02d}", params={LR: GRID[LR]["values"][n % 5]}, values=values,
                       state=state, value=value, budget=budget, bounds=bounds or {})


def started(sched, count: int) -> list[TrialRecord]:
    """``count`` trials started by ``sched``, as the driver records them."""
    records: list[TrialRecord] = []
    for n in range(count):
        params = sched.next_trial(records)
        records.append(TrialRecord(number=n, run_id=f"s-t{n:02d}", params=params, budget=40))
    return records


def training(records) -> View:
    return View(records, {r.number for r in records if r.state == "running"})


# ---------------------------------------------------------------- Optuna
def test_optuna_walks_the_grid_and_prunes_a_trial_behind_the_median_but_never_at_its_final_report():
    s = OptunaScheduler(spec(pruner={"kind": "median", "startup_trials": 2}), "correctness")
    s.restore([])
    records = started(s, 3)
    assert [r.params[LR] for r in records] == [1e-4, 3e-4, 1e-3]  # the grid, in its order
    for r, (v10, v20, final) in zip(records[:2], [(0.5, 0.8, 0.8), (0.6, 0.9, 0.9)]):
        r.values = {10: v10, 20: v20}
        assert s.on_verdict(r, 10, v10, training(records)) == [] and s.on_verdict(r, 20, v20, training(records)) == []
        r.state, r.value = "complete", final
        s.on_end(r, training(records))
    third = records[2]
    third.values = {10: 0.1}
    [p] = s.on_verdict(third, 10, 0.1, training(records))
    assert p == Prune(2, 10, "correctness 0.100 on val at step 10 fell behind (median pruner)", "median pruner")
    third.budget = 10  # the same verdict as its final report: nothing left to save
    fresh = OptunaScheduler(spec(pruner={"kind": "median", "startup_trials": 2}), "correctness")
    assert fresh.restore(records[:2] + [third.model_copy(update={"values": {}})]) == []
    assert fresh.on_verdict(third, 10, 0.1, training(records)) == []


def test_an_end_judges_the_trials_still_training_again_and_a_restart_finds_those_behind():
    """Trial 2 reported 0.3 at step 10 while only one trial had completed (start-up 2): kept.
    Trial 1 then completes: trial 2 is behind the median now and is pruned at that end.
    A scheduler rebuilt from the records (the sweep restarted) says the same at once."""
    sp = spec(pruner={"kind": "median", "startup_trials": 2})
    s = OptunaScheduler(sp, "correctness")
    s.restore([])
    records = started(s, 3)
    records[0].values, records[0].state, records[0].value = {10: 0.6}, "complete", 0.6
    s.on_end(records[0], training(records))
    records[2].values = {10: 0.3}
    assert s.on_verdict(records[2], 10, 0.3, training(records)) == []
    records[1].values, records[1].state, records[1].value = {10: 0.8}, "complete", 0.8
    s.on_verdict(records[1], 10, 0.8, training(records))
    assert [p.trial for p in s.on_end(records[1], training(records))] == [2]
    again = OptunaScheduler(sp, "correctness")
    assert [(p.trial, p.step) for p in again.restore(records)] == [(2, 10)]
    assert again.next_trial(records) == {LR: 3e-3}  # numbering and the grid go on where they were


def test_a_trial_is_judged_at_the_top_of_its_bound():
    sp = spec(pruner={"kind": "median", "startup_trials": 1})
    s = OptunaScheduler(sp, "correctness")
    s.restore([])
    records = started(s, 2)
    records[0].values, records[0].state, records[0].value = {10: 0.6}, "complete", 0.6
    s.on_end(records[0], training(records))
    records[1].values, records[1].bounds = {10: 0.4}, {10: [0.2, 0.7]}
    assert s.on_verdict(records[1], 10, 0.4, training(records)) == []  # its upper bound 0.7 is not behind 0.6


# ---------------------------------------------------------------- ASHA
def asha(**a) -> AshaScheduler:
    s = AshaScheduler(spec(scheduler="asha", asha={"min_steps": 10, "reduction_factor": 2, **a}), "correctness")
    s.restore([])
    return s


def test_asha_rungs_grow_by_the_reduction_factor_below_the_budget():
    assert asha().rungs(80) == [10, 20, 40]
    assert asha(reduction_factor=3).rungs(100) == [10, 30, 90]


def test_asha_keeps_the_first_at_a_rung_and_stops_one_below_the_top_half_of_those_before_it():
    s = asha()
    records = started(s, 3)
    records[0].values = {10: 0.5}
    assert s.on_verdict(records[0], 10, 0.5, training(records)) == []  # first at rung 10
    records[1].values = {10: 0.7}
    assert s.on_verdict(records[1], 10, 0.7, training(records)) == []  # above the cut-off of [0.5]
    records[2].values = {10: 0.55}
    [p] = s.on_verdict(records[2], 10, 0.55, training(records))  # the median of [0.5, 0.7] is 0.6
    assert (p.trial, p.step, p.policy) == (2, 10, "asha") and "rung 10's cut-off 0.600" in p.why
    records[2].bounds = {10: [0.4, 0.65]}
    assert s.on_verdict(records[2], 10, 0.55, training(records)) == []  # its upper bound reaches the cut-off
    records[0].values[20] = 0.1  # verdicts between rungs and a trial's final report are never cut
    assert s.on_verdict(records[0], 20, 0.1, training(records)) == []
    records[1].values[40] = 0.0
    assert s.on_verdict(records[1], 40, 0.0, training(records)) == []


def test_asha_reads_a_rung_at_the_first_verdict_past_it_and_a_restart_judges_the_running_again():
    s = asha()
    records = started(s, 2)
    records[0].values, records[0].state = {10: 0.9, 20: 0.9}, "complete"
    records[1].values = {15: 0.2}  # its verdicts come every 15 steps: 15 is its report at rung 10
    [p] = s.on_verdict(records[1], 15, 0.2, training(records))
    assert (p.trial, p.step) == (1, 15)
    assert [(d.trial, d.step) for d in asha().restore(records)] == [(1, 15)]


# ---------------------------------------------------------------- PBT
def pbt_spec(**over) -> SweepSpec:
    return SweepSpec.model_validate({"name": "p", "config": "c.yaml", "scheduler": "pbt", "concurrency": 4,
                                     "params": {LR: {"values": [1e-4, 3e-4, 1e-3, 3e-3]}},
                                     "pbt": {"population": 4, "interval": 1, "quantile": 0.25}, **over})


def test_pbt_starts_the_population_then_decides_each_round_once_every_member_is_in():
    s = PbtScheduler(pbt_spec(), "correctness", cadence=10)
    s.restore([], None)
    assert s.trial_overrides() == {"train.pause_every": 10}
    records = started(s, 4)
    assert [r.params[LR] for r in records] == [1e-4, 3e-4, 1e-3, 3e-3] and s.next_trial(records) is None
    for r, v in zip(records[:3], (0.2, 0.5, 0.9)):
        r.values = {10: v}
        assert s.on_verdict(r, 10, v, training(records)) == []  # member 3 is not there yet
    records[3].values = {10: 0.6}
    out = s.on_verdict(records[3], 10, 0.6, training(records))
    [copy] = [d for d in out if isinstance(d, Copy)]
    assert copy.check.trial == 0 and copy.check.exploit.donor == 2 and copy.check.exploit.step == 10
    assert sorted(d.trial for d in out if isinstance(d, Resume)) == [1, 2, 3]
    assert s.poll(training(records)) == []  # a round is decided once


def test_pbt_after_a_restart_carries_the_last_round_out_again_and_a_refused_copy_resumes():
    s = PbtScheduler(pbt_spec(), "correctness", cadence=10)
    s.restore([], None)
    records = started(s, 4)
    for r, v in zip(records, (0.2, 0.5, 0.9, 0.6)):
        r.values = {10: v}
    first = s.poll(training(records))
    again = PbtScheduler(pbt_spec(), "correctness", cadence=10)
    assert again.restore(records, s.state()) == first  # the same decisions, from the saved rounds
    first[0].check.refused = "no checkpoint at step 10"
    restored = PbtScheduler(pbt_spec(), "correctness", cadence=10).restore(records, s.state())
    assert Resume(0, 10) in restored and not any(isinstance(d, Copy) for d in restored)


def test_pbt_rounds_off_the_barrier_decide_nothing_and_resume_nobody():
    s = PbtScheduler(pbt_spec(pbt={"population": 4, "interval": 2}), "correctness", cadence=10)
    s.restore([], None)
    records = started(s, 4)
    for r, v in zip(records, (0.2, 0.5, 0.9, 0.6)):
        r.values = {10: v}
    assert s.poll(training(records)) == [] and len(s.log.checks) == 4  # the round is recorded all the same
    for r, v in zip(records, (0.2, 0.5, 0.9, 0.6)):
        r.values[20] = v
    assert any(isinstance(d, Copy) for d in s.poll(training(records)))


# ---------------------------------------------------------------- the sweep file
def test_the_scheduler_key_and_the_old_sampler_pbt_name_the_same_scheduler():
    base = {"name": "p", "config": "c.yaml", "concurrency": 4, "params": {LR: {"values": [1e-4, 3e-4]}},
            "pbt": {"population": 4}}
    assert SweepSpec.model_validate({**base, "sampler": "pbt"}).scheduler == "pbt"
    assert SweepSpec.model_validate({**base, "scheduler": "pbt"}).sampler == "pbt"
    assert isinstance(schedulers.make(spec(scheduler="asha", asha={"min_steps": 5}), "m", 10), AshaScheduler)
    assert isinstance(schedulers.make(spec(), "m", 10), OptunaScheduler)
    # a sweep written before schedulers existed keeps its fingerprint (it continues)
    assert spec().fingerprint() == spec(scheduler="optuna").fingerprint()


@pytest.mark.parametrize("over, says", [
    ({"scheduler": "asha"}, "scheduler asha needs asha: {min_steps: N}"),
    ({"asha": {"min_steps": 5}}, "asha: is for scheduler: asha, not optuna"),
    ({"scheduler": "asha", "asha": {"min_steps": 5}, "pruner": {"kind": "median"}}, "set pruner: {kind: none}"),
    ({"scheduler": "asha", "asha": {"min_steps": 5, "reduction_factor": 1}}, "greater than 1"),
    ({"scheduler": "pbt", "sampler": "grid", "concurrency": 4, "pbt": {"population": 4}}, "leave sampler out"),
    ({"sampler": "pbt", "scheduler": "asha"}, "it is scheduler pbt, not asha"),
])
def test_a_scheduler_that_cannot_work_is_refused_saying_why(over, says):
    with pytest.raises(ValidationError, match=says.replace("{", r"\{").replace("}", r"\}")):
        spec(**over)


def test_the_example_asha_sweep_loads_with_its_rungs_below_the_trials_budget():
    from pathlib import Path

    from tuneloop.tools.sweep.spec import load_sweep

    spec, base = load_sweep(Path(__file__).resolve().parents[2] / "examples" / "asha.yaml")
    s = schedulers.make(spec, "correctness", 25)
    assert isinstance(s, AshaScheduler) and spec.pruner.kind == "none"
    assert s.rungs(150) == [25, 75]
