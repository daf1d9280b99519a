"""Population-based training: when a member copies another, and what it changes. Pure.

The sweep judges its members in rounds: at a step of the checkpoint cadence, once every member
has its verdict there (``next_round``), each member's *check* records what the sweep saw (every
member's score at that step) and what it decided. Every ``interval`` of its own verdicts, a
member in the bottom quantile copies a member of the top quantile (``Exploit``): the driver
forks the donor at that step's checkpoint, full state, with the searched settings explored,
and stops the member. The sweep keeps the checks in order (``PbtLog``), so the same decisions
replay exactly from them (``replay``), with other settings too, up to the first check where
those would have decided otherwise: past it, the recording has no verdicts.

Randomness (which top member, which factor) is drawn from the sweep's seed, the member and the
step, so a decision is the same live, after a restart and in a replay.
"""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, Field

from .search import TrialRecord
from .spec import Pbt, SweepSpec, Value, grid


class Exploit(BaseModel):
    """Member ``trial`` stops; a fork of ``donor`` at ``step`` with ``params`` takes its place."""

    trial: int
    donor: int
    step: int
    params: dict[str, Value]
    changed: dict[str, Value] = Field(default_factory=dict, description="What differs from the donor's settings.")


class Check(BaseModel):
    """One verdict of one member, as the sweep judged it."""

    trial: int
    step: int
    nth: int = Field(description="How many verdicts this member has had, this one included.")
    scores: dict[int, float] = Field(description="Each live member's latest score on val, this one's included.")
    params: dict[int, dict[str, Value]] = Field(description="The live members' settings (a copy explores the donor's).")
    steps: dict[int, int] = Field(default_factory=dict, description="Each live member's latest verdict step.")
    exploit: Exploit | None = None
    refused: str | None = Field(default=None, description="The copy could not be made (the fork's refusal).")


class PbtLog(BaseModel):
    """Every check of the sweep, in the order the driver made them (KV ``<sweep>.pbt``)."""

    checks: list[Check] = Field(default_factory=list)


def initial(spec: SweepSpec) -> list[dict[str, Value]]:
    """The first members' settings: the grid's points in its order (shuffled by seed when asked),
    then draws from the search space when the population is larger (or the space has ranges)."""
    points = grid(spec) if all(p.values is not None for p in spec.params.values()) else []
    rng = random.Random(f"{spec.seed}-initial")
    while len(points) < spec.pbt.population:
        points.append({k: _draw(p, rng) for k, p in spec.params.items()})
    return points[:spec.pbt.population]


def members_at(records: list[TrialRecord], training: set[int], step: int) -> list[TrialRecord]:
    """The members a round at ``step`` compares: started before it, and either judged at it or
    still training towards it (``training``: not ended, not copied over)."""
    return [r for r in records if r.start_step < step and (step in r.values or r.number in training)]


def next_round(records: list[TrialRecord], training: set[int], judged: set[int], cadence: int,
               budgets: dict[int, int]) -> int | None:
    """The lowest step of the checkpoint cadence below the members' budgets not judged yet, once
    every member has its verdict there; None while one is missing. Verdicts off the cadence (the
    checkpoint an interruption saved, an operator's ``eval``) stay in the records but make no
    round: not every member has one."""
    steps = {s for r in records for s in r.values if s % cadence == 0 and s not in judged and s < budgets[r.number]}
    for step in sorted(steps):
        return step if all(step in r.values for r in members_at(records, training, step)) else None
    return None


def quantiles(scores: dict[int, float], fraction: float) -> tuple[list[int], list[int]]:
    """(bottom, top) members: ``ceil(n * fraction)`` each, at most half (Ray Tune's rule).
    Ties go against the later member: the earlier one has trained longer on the same settings."""
    ranked = sorted(scores, key=lambda n: (scores[n], -n))
    k = min(math.ceil(len(ranked) * fraction), len(ranked) // 2)
    return ranked[:k], ranked[len(ranked) - k:]


def decide(settings: Pbt, spec: SweepSpec, check: Check) -> Exploit | None:
    """Whether the member of ``check`` copies another now, and which, with what settings."""
    if check.nth % settings.interval or len(check.scores) < 2:
        return None
    bottom, top = quantiles(check.scores, settings.quantile)
    if check.trial not in bottom:
        return None
    rng = random.Random(f"{spec.seed}-{check.trial}-{check.step}")
    donor = rng.choice(sorted(top))
    params = explore(settings, spec, check.params[donor], rng)
    return Exploit(trial=check.trial, donor=donor, step=check.steps.get(donor, check.step), params=params,
                   changed={k: v for k, v in params.items() if check.params[donor].get(k) != v})


def explore(settings: Pbt, spec: SweepSpec, params: dict[str, Value], rng: random.Random) -> dict[str, Value]:
    """The donor's settings, explored: each searched value resampled, or perturbed (a range value
    times a factor, kept inside it; a listed value moved to a neighbour in the list)."""
    out = dict(params)
    for name, p in spec.params.items():
        if settings.explore == "resample" or rng.random() < settings.resample_probability or name not in params:
            out[name] = _draw(p, rng)
        elif p.values is not None:
            i = p.values.index(params[name]) if params[name] in p.values else 0
            out[name] = p.values[max(0, min(len(p.values) - 1, i + rng.choice((-1, 1))))]
        else:
            v = min(max(params[name] * rng.choice(settings.factors), p.low), p.high)
            if p.step:
                v = p.low + round((v - p.low) / p.step) * p.step
            out[name] = int(round(v)) if p.integer else float(f"{v:.6g}")
    return out


def _draw(p, rng: random.Random) -> Value:
    if p.values is not None:
        return rng.choice(p.values)
    if p.log:
        v = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
    else:
        v = rng.uniform(p.low, p.high)
    if p.step:
        v = p.low + round((v - p.low) / p.step) * p.step
    return int(round(v)) if p.integer else float(f"{v:.6g}")


# ---------------------------------------------------------------- backtesting
class Replayed(BaseModel):
    """The recorded checks through other settings, up to where they part from the live ones."""

    settings: Pbt
    exploits: list[Exploit] = Field(default_factory=list, description="Copies made up to the divergence (or the end).")
    checks: int = Field(default=0, description="Checks replayed.")
    diverges: Check | None = Field(default=None, description="The first check decided otherwise: the recording ends there.")
    would: Exploit | None = Field(default=None, description="What the replay decided at that check (None: no copy).")

    @property
    def same_as_live(self) -> bool:
        return self.diverges is None


def replay(log: PbtLog, spec: SweepSpec, settings: Pbt) -> Replayed:
    """The live checks in order through ``settings``. A copy decided by the replay at a check
    where the live sweep made none (or another one) changes which runs exist from there on, so
    nothing past that check can be replayed: it says where, and what it would have done."""
    out = Replayed(settings=settings)
    for check in log.checks:
        mine = decide(settings, spec, check)
        live = check.exploit
        out.checks += 1
        if _key(mine) != _key(live):
            out.diverges, out.would = check, mine
            return out
        if mine is not None:
            out.exploits.append(mine)
    return out


def _key(e: Exploit | None):
    return None if e is None else (e.trial, e.donor, e.step, tuple(sorted(e.params.items())))


def parse_settings(text: str, recorded: Pbt) -> list[Pbt]:
    """``quantile=0.5,interval=1|4`` -> every combination, the rest as recorded."""
    if not text.strip():
        return [recorded]
    options: dict[str, list[str]] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("interval", "quantile", "explore", "resample_probability"):
            raise ValueError(f"--pbt {part!r}: expected interval=N, quantile=F, explore=perturb|resample or "
                             "resample_probability=F (alternatives with |)")
        options[key] = [v.strip() for v in value.split("|")]
    tries = [{}]
    for key, values in options.items():
        tries = [{**t, key: v} for t in tries for v in values]
    out = []
    for t in tries:
        try:
            out.append(Pbt.model_validate({**recorded.model_dump(), **t}))
        except ValueError as e:
            raise ValueError(f"--pbt {t}: {e}") from None
    return out


def describe(s: Pbt) -> str:
    explore = s.explore if s.explore == "resample" else f"perturb x{s.factors[0]:g}/x{s.factors[1]:g}, " \
                                                         f"resample {s.resample_probability:g}"
    return f"interval {s.interval}, quantile {s.quantile:g}, {explore}"


def copy_text(e: Exploit, run: dict[int, str]) -> str:
    change = " ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                      for k, v in e.changed.items())
    return f"{run.get(e.trial, e.trial)}<-{run.get(e.donor, e.donor)}@{e.step}" + (f" ({change})" if change else "")


def parting_text(out: Replayed, run: dict[int, str]) -> str:
    """Where the replay leaves the recording, in words."""
    c = out.diverges
    if c is None:
        return "-"
    me = run.get(c.trial, c.trial)
    live = f"copied {copy_text(c.exploit, run)}" if c.exploit else "made no copy"
    would = f"would copy {copy_text(out.would, run)}" if out.would else "would make no copy"
    return f"at {me}'s verdict of step {c.step}: {would}, live {live}; past the recording from there"
