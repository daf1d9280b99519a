"""Population-based training's rules, without training: the sweep file's checks, who copies
whom, what a copy explores, when a round is due, and the replay of recorded checks (exact with
the sweep's own settings, stopping where other settings part from the recording). Named apart
from tests/integration/test_pbt.py: pytest imports test modules by basename."""

import random

import pytest
from pydantic import ValidationError

from tuneloop.tools.sweep import pbt
from tuneloop.tools.sweep.pbt import Check, Exploit, PbtLog
from tuneloop.tools.sweep.spec import Pbt, SweepSpec

LR = "train.learning_rate"


def spec(**over):
    raw = {"name": "p", "config": "c.yaml", "sampler": "pbt", "concurrency": 4,
           "params": {LR: {"values": [1e-4, 3e-4, 1e-3, 3e-3]}}, "pbt": {"population": 4, "interval": 2}}
    raw.update(over)
    return SweepSpec.model_validate(raw)


@pytest.mark.parametrize("over, says", [
    ({"pbt": None}, "sampler pbt needs pbt"),
    ({"concurrency": 2}, "concurrency 2 must be at least pbt.population 4"),
    ({"params": {"train.lora.r": {"values": [8, 16]}}}, "cannot change train.lora.r"),
    ({"params": {"train.save_steps": {"values": [10, 20]}}}, "train.save_steps cannot be searched"),
    ({"pruner": {"kind": "median"}}, "set pruner: {kind: none}"),
    ({"trials": 8}, "trials does not apply"),
    ({"sampler": "grid"}, "pbt: is for sampler: pbt"),
])
def test_a_pbt_sweep_that_cannot_work_is_refused_saying_why(over, says):
    with pytest.raises(ValidationError, match=says.replace("{", r"\{").replace("}", r"\}")):
        spec(**over)


def test_search_is_read_as_sampler_and_both_at_once_are_refused():
    raw = {"name": "p", "config": "c.yaml", "concurrency": 4, "params": {LR: {"values": [1e-4, 3e-4, 1e-3, 3e-3]}},
           "pbt": {"population": 4, "interval": 2}}
    assert SweepSpec.model_validate({**raw, "search": "pbt"}).sampler == "pbt"
    with pytest.raises(ValidationError, match="sampler: and search: are the same setting"):
        SweepSpec.model_validate({**raw, "search": "pbt", "sampler": "pbt"})


def test_members_start_on_the_grid_in_its_order_then_on_draws():
    assert [p[LR] for p in pbt.initial(spec())] == [1e-4, 3e-4, 1e-3, 3e-3]
    shuffled = spec(shuffle=True, seed=3)
    assert sorted(p[LR] for p in pbt.initial(shuffled)) == [1e-4, 3e-4, 1e-3, 3e-3]
    ranged = spec(params={LR: {"low": 1e-5, "high": 1e-2, "log": True}}, pbt={"population": 3}, concurrency=3)
    first = pbt.initial(ranged)
    assert len(first) == 3 and all(1e-5 <= p[LR] <= 1e-2 for p in first)
    assert first == pbt.initial(ranged)  # drawn from the seed: the same on a restart


def test_quantiles_take_at_least_one_member_each_and_at_most_half():
    assert pbt.quantiles({0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7}, 0.25) == ([0], [1])
    assert pbt.quantiles({0: 0.1, 1: 0.9}, 0.25) == ([0], [1])
    assert pbt.quantiles({0: 0.1, 1: 0.9, 2: 0.5}, 0.5) == ([0], [1])  # half of 3 is 1
    assert pbt.quantiles({0: 0.5, 1: 0.5}, 0.5) == ([1], [0])  # a tie goes against the later member


def check(trial, nth, scores, step=40):
    params = {n: {LR: [1e-4, 3e-4, 1e-3, 3e-3][n % 4]} for n in scores}
    return Check(trial=trial, step=step, nth=nth, scores=scores, params=params,
                 steps={n: step for n in scores})


def test_a_bottom_member_copies_a_top_one_every_interval_verdicts():
    s = spec()
    scores = {0: 0.1, 1: 0.2, 2: 0.6, 3: 0.8}
    assert pbt.decide(s.pbt, s, check(0, 1, scores)) is None  # the interval is 2
    e = pbt.decide(s.pbt, s, check(0, 2, scores))
    assert e.trial == 0 and e.donor == 3 and e.step == 40
    assert e.params[LR] in (1e-3, 3e-3, 1e-4, 3e-4) and e.changed == ({} if e.params[LR] == 3e-3 else {LR: e.params[LR]})
    assert pbt.decide(s.pbt, s, check(0, 2, scores)) == e  # drawn from seed, member and step: a restart agrees
    assert pbt.decide(s.pbt, s, check(2, 2, scores)) is None  # not in the bottom
    assert pbt.decide(s.pbt, s, check(0, 2, {0: 0.1})) is None  # nobody to compare with


def test_a_copy_starts_from_the_donors_latest_verdict_step():
    s = spec()
    c = check(0, 2, {0: 0.1, 1: 0.9}, step=60)
    c.steps = {0: 60, 1: 40}
    assert pbt.decide(s.pbt, s, c).step == 40


def test_explore_perturbs_within_the_space():
    s = spec(params={LR: {"low": 1e-4, "high": 1e-2, "log": True}, "train.max_grad_norm": {"values": [0.5, 1.0, 2.0]}})
    settings = Pbt(population=4, resample_probability=0.0)
    rng = random.Random(0)
    for _ in range(50):
        out = pbt.explore(settings, s, {LR: 1e-3, "train.max_grad_norm": 1.0}, rng)
        assert out[LR] in (pytest.approx(8e-4), pytest.approx(1.2e-3))
        assert out["train.max_grad_norm"] in (0.5, 2.0)  # a neighbour in the list
    assert pbt.explore(settings, s, {LR: 9.5e-3, "train.max_grad_norm": 2.0}, random.Random(1))[LR] <= 1e-2  # kept inside
    drawn = [pbt.explore(Pbt(population=4, explore="resample"), s, {LR: 1e-3, "train.max_grad_norm": 1.0}, rng)
             for _ in range(30)]
    assert all(1e-4 <= d[LR] <= 1e-2 for d in drawn) and len({d[LR] for d in drawn}) > 20


def recorded(s):
    """Checks as a live sweep would record them: each decided by the sweep's own settings."""
    log = PbtLog()
    for c in [check(0, 1, {0: 0.2, 1: 0.3, 2: 0.5, 3: 0.9}, step=20), check(1, 1, {0: 0.2, 1: 0.3, 2: 0.5, 3: 0.9}, step=20),
              check(0, 2, {0: 0.1, 1: 0.4, 2: 0.5, 3: 0.9}, step=40), check(1, 2, {1: 0.4, 2: 0.5, 3: 0.9, 4: 0.9}, step=40)]:
        c.exploit = pbt.decide(s.pbt, s, c)
        log.checks.append(c)
    return log


def test_the_sweeps_own_settings_replay_the_live_copies_exactly():
    s = spec()
    log = recorded(s)
    assert [c.exploit.trial for c in log.checks if c.exploit] == [0, 1]
    out = pbt.replay(log, s, s.pbt)
    assert out.same_as_live and out.checks == 4 and [e.trial for e in out.exploits] == [0, 1]


def test_other_settings_replay_up_to_the_first_check_they_decide_otherwise():
    s = spec()
    log = recorded(s)
    every = pbt.replay(log, s, Pbt(population=4, interval=1))  # copies at the first check already
    assert not every.same_as_live and every.checks == 1 and every.diverges.step == 20
    assert every.would.trial == 0 and every.diverges.exploit is None
    text = pbt.parting_text(every, {0: "t00", 3: "t03"})
    assert "would copy t00<-t03@20" in text and "past the recording" in text
    rarer = pbt.replay(log, s, Pbt(population=4, interval=4))  # never copies: parts where the live one did
    assert rarer.diverges.step == 40 and rarer.would is None and rarer.exploits == []


def test_settings_to_try_are_parsed_with_clear_errors():
    tries = pbt.parse_settings("quantile=0.5,interval=1|4", Pbt(population=4))
    assert [(t.quantile, t.interval) for t in tries] == [(0.5, 1), (0.5, 4)]
    assert pbt.parse_settings("", Pbt(population=4, interval=3)) == [Pbt(population=4, interval=3)]
    with pytest.raises(ValueError, match="expected interval=N"):
        pbt.parse_settings("patience=2", Pbt(population=4))
    with pytest.raises(ValueError, match="quantile"):
        pbt.parse_settings("quantile=0.9", Pbt(population=4))


def test_a_copy_reads_as_member_donor_step_and_change():
    e = Exploit(trial=1, donor=3, step=40, params={LR: 1.2e-3}, changed={LR: 1.2e-3})
    assert pbt.copy_text(e, {1: "t01", 3: "t03"}) == "t01<-t03@40 (learning_rate=0.0012)"


def test_the_example_pbt_sweep_loads_and_a_snapshot_cadence_is_refused(tmp_path):
    from pathlib import Path

    import yaml

    from tuneloop.config import ConfigError
    from tuneloop.tools.sweep.spec import load_sweep

    examples = Path(__file__).resolve().parents[2] / "examples"
    example, base = load_sweep(examples / "pbt.yaml")
    assert example.sampler == "pbt" and example.pruner.kind == "none" and example.pbt.population == 4
    raw = yaml.safe_load((examples / "pbt.yaml").read_text())
    raw["config"] = str(examples / raw["config"])
    raw["overrides"]["eval"]["every"] = 5
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="leave eval.every unset"):
        load_sweep(tmp_path / "s.yaml")


def test_a_pause_cadence_off_the_checkpoints_is_refused():
    from tuneloop.config import TrainSection

    with pytest.raises(ValidationError, match="pause_every 30 must be a multiple of save_steps 20"):
        TrainSection(save_steps=20, pause_every=30)
    assert TrainSection(save_steps=20, pause_every=40).pause_every == 40


def member(n, values, start=0, replaced_by=None, state="running"):
    from tuneloop.tools.sweep.search import TrialRecord

    return TrialRecord(number=n, run_id=f"p-t{n:02d}", params={LR: 1e-3}, values=values, start_step=start,
                       replaced_by=replaced_by, state=state)


def test_a_round_waits_for_every_member_at_a_step_of_the_cadence_and_ignores_verdicts_off_it():
    budgets = {0: 100, 1: 100, 2: 100}
    first = [member(0, {20: 0.5}), member(1, {})]
    assert pbt.next_round(first, {0, 1}, set(), 20, budgets) is None  # member 1 is not there yet
    first[1].values[20] = 0.1
    assert pbt.next_round(first, {0, 1}, set(), 20, budgets) == 20
    # member 1 copied over at 20 by member 2 (starting there); member 0 resumed after an
    # interruption from the checkpoint it saved at 35, which was evaluated: no round at 35
    later = [member(0, {20: 0.5, 35: 0.6, 40: 0.7}), member(1, {20: 0.1}, replaced_by=2, state="pruned"),
             member(2, {}, start=20)]
    assert [m.number for m in pbt.members_at(later, {0, 2}, 40)] == [0, 2]
    assert pbt.next_round(later, {0, 2}, {20}, 20, budgets) is None  # member 2's verdict at 40 is missing
    later[2].values[40] = 0.2
    assert pbt.next_round(later, {0, 2}, {20}, 20, budgets) == 40
    assert pbt.next_round(later, {0, 2}, {20, 40}, 20, budgets) is None
    done = [member(0, {100: 0.9}), member(1, {100: 0.8})]
    assert pbt.next_round(done, set(), set(), 20, budgets) is None  # a line's last verdict makes no round
