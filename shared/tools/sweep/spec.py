"""The sweep file: which run config to start from, which of its values to search, how.

Validated like a run config (unknown keys are errors), and more: every value a parameter
can take is applied to the base config and validated at load, so a sweep never fails at
trial 7 on a typo or an impossible value. Pure: no bus, no processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...config import Config, ConfigError, load_config, read_yaml
from ...task import goal, unknown_metric
from ...events import explain

Value = bool | int | float | str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Section):
    """One searched value: a list of ``values`` (grid or categorical), or a range ``low``..``high``."""

    values: list[Value] | None = Field(default=None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = Field(default=False, description="Sample the range on a log scale (learning rates).")
    step: float | None = Field(default=None, gt=0, description="Quantize the range to this step.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Param":
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either values: [...] or low and high")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        """A range of whole numbers (LoRA rank, batch size): low, high and step are all integers."""
        return self.values is None and all(float(v).is_integer() for v in (self.low, self.high, self.step or 1))

    def candidates(self) -> list[Value]:
        """The values a config must accept: all listed ones, or both ends of the range."""
        if self.values is not None:
            return list(self.values)
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


class Pruner(_Section):
    """When a trial's verdicts fall behind, it is stopped (a ``prune`` control) and its checkpoints released."""

    kind: Literal["median", "percentile", "successive-halving", "none"] = "median"
    startup_trials: int = Field(default=2, ge=0, description="Prune nothing until this many trials completed (median, percentile).")
    warmup_steps: int = Field(default=0, ge=0, description="Prune no trial before this training step.")
    percentile: float = Field(default=50.0, gt=0, lt=100, description="percentile: prune below this percentile of completed trials.")


class Pbt(_Section):
    """Population-based training: ``population`` members train at once; every ``interval`` of a
    member's verdicts, a member in the bottom ``quantile`` stops and a fork of a top-quantile
    member (its checkpoint at its latest verdict, full state) takes its place, with the searched
    settings perturbed or resampled (``explore``). As Ray Tune's PBT, on forks."""

    population: int = Field(ge=2, le=64, description="Members training at once (each a run; a copy is a new run).")
    interval: int = Field(default=2, ge=1, description="A member is compared with the others every this many of its verdicts.")
    quantile: float = Field(default=0.25, gt=0, le=0.5, description=(
        "The bottom and top fractions of the members (at least one each): a bottom member copies a top one."))
    explore: Literal["perturb", "resample"] = Field(default="perturb", description=(
        "perturb: a range value times one of factors, a listed value moved to a neighbour (or resampled with "
        "resample_probability); resample: every searched value drawn afresh."))
    factors: tuple[float, float] = Field(default=(0.8, 1.2), description="perturb: the two factors a range value is multiplied by.")
    resample_probability: float = Field(default=0.25, ge=0, le=1, description="perturb: the chance a value is drawn afresh instead.")


class Asha(_Section):
    """Asynchronous successive halving: rungs at ``min_steps * reduction_factor**k`` steps; at
    each, a trial trains on only in the top ``1/reduction_factor`` of the trials there so far."""

    min_steps: int = Field(ge=1, description="The first rung (the grace period): no trial is stopped before it.")
    reduction_factor: float = Field(default=3.0, gt=1, description="Each rung keeps the top 1/this of the trials.")


class SweepSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="The sweep's id: restarting with the same name continues it.")
    config: str = Field(description="Run config every trial starts from (relative to the sweep file).")
    phase: str | None = Field(default=None, description="With a phased config: the phase whose settings the trials use (run alone).")
    overrides: dict = Field(default_factory=dict, description="Changes to that config for every trial (e.g. fewer steps).")
    params: dict[str, Param] = Field(min_length=1, description="Dotted config paths (train.learning_rate, train.lora.r) -> what to try.")
    sampler: Literal["grid", "random", "tpe", "pbt"] = Field(
        default="grid", validation_alias=AliasChoices("sampler", "search"),
        description="grid: every combination, in the order written (or shuffled); random and tpe: Optuna's "
                    "samplers; pbt: population-based training (see pbt). Also read as search:.")
    shuffle: bool = Field(default=False, description=(
        "grid: walk the combinations in a random order drawn from seed, so that a sweep cut short (trials: N, "
        "pruning against the first trials) does not favour the values written first."))
    trials: int | None = Field(default=None, ge=1, description="How many trials (random, tpe: required; grid: at most this many).")
    concurrency: int = Field(default=2, ge=1, le=64, description="Trials training at once.")
    evaluators: int = Field(default=1, ge=1, le=64, description="Evaluator processes shared by all trials.")
    metric: str | None = Field(
        default=None, description="What the sweep maximizes, a metric of the config's task (a fraction: not eval_loss or "
                                  "perplexity): verdicts on val while training (pruning), on test at the end "
                                  "(the trial's value). Default: the config's feedback.metric.")
    seed: int = 0
    pruner: Pruner = Pruner()
    scheduler: Literal["optuna", "asha", "pbt"] = Field(default="optuna", description=(
        "What starts and stops trials (schedulers.py): optuna, its sampler and pruner; asha, successive halving "
        "(see asha) over the sampler; pbt, population-based training (sampler: pbt reads as this too)."))
    pbt: Pbt | None = Field(default=None, description="scheduler pbt: the population and its exploit and explore rules.")
    asha: Asha | None = Field(default=None, description="scheduler asha: its rungs.")
    base_dir: str = Field(default=".", description="Set by the loader: the sweep file's folder.")

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, raw):
        if isinstance(raw, dict) and "sampler" in raw and "search" in raw:
            raise ValueError("sampler: and search: are the same setting: give one")
        return raw

    @model_validator(mode="after")
    def _count(self) -> "SweepSpec":
        if self.sampler == "pbt" or self.scheduler == "pbt":
            if "scheduler" in self.model_fields_set and self.scheduler != "pbt":
                raise ValueError(f"sampler pbt is population-based training: it is scheduler pbt, not {self.scheduler}")
            if self.sampler != "pbt" and {"sampler", "search"} & self.model_fields_set:
                raise ValueError(f"scheduler pbt draws its own members: leave sampler out (not {self.sampler})")
            self.sampler = self.scheduler = "pbt"
            return self._pbt()
        if self.asha is not None and self.scheduler != "asha":
            raise ValueError(f"asha: is for scheduler: asha, not {self.scheduler}")
        if self.scheduler == "asha":
            if self.asha is None:
                raise ValueError("scheduler asha needs asha: {min_steps: N}")
            if "pruner" in self.model_fields_set and self.pruner.kind != "none":
                raise ValueError("scheduler asha stops trials at its rungs: set pruner: {kind: none} or leave it out")
            self.pruner = Pruner(kind="none")
        if self.pbt is not None:
            raise ValueError(f"pbt: is for sampler: pbt, not {self.sampler}")
        if self.sampler != "grid" and self.trials is None:
            raise ValueError(f"sampler {self.sampler} needs trials: N")
        if self.sampler == "grid":
            ranged = [k for k, p in self.params.items() if p.values is None]
            if ranged:
                raise ValueError(f"a grid needs values: [...] for every parameter, not a range: {', '.join(ranged)}")
        return self

    def _pbt(self) -> "SweepSpec":
        from ..fork import keeps_state  # what a full-state fork may change

        if self.pbt is None:
            raise ValueError("sampler pbt needs pbt: {population: N}")
        if self.trials is not None:
            raise ValueError("sampler pbt trains pbt.population members: trials does not apply")
        if "pruner" in self.model_fields_set and self.pruner.kind != "none":
            raise ValueError("sampler pbt replaces pruning by exploiting: set pruner: {kind: none} or leave it out")
        self.pruner = Pruner(kind="none")
        if self.concurrency < self.pbt.population:
            raise ValueError(f"sampler pbt compares members training side by side: concurrency {self.concurrency} "
                             f"must be at least pbt.population {self.pbt.population}")
        if shared := [k for k in self.params if k in ("train.save_steps", "train.max_steps", "train.pause_every")]:
            raise ValueError(f"sampler pbt compares members at shared steps, on equal budgets: {', '.join(shared)} "
                             "cannot be searched (set it in overrides)")
        if stateful := [k for k in self.params if not keeps_state(k)]:
            raise ValueError(f"sampler pbt copies a member by a full-state fork, which cannot change {', '.join(stateful)} "
                             "(the optimizer and data position would not fit): search it with grid, random or tpe")
        return self

    def total(self) -> int:
        if self.sampler == "pbt":
            return self.pbt.population  # the first members; copies are more trials, not more members
        if self.sampler == "grid":
            n = len(grid(self))
            return min(n, self.trials) if self.trials else n
        return self.trials  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """What makes two sweeps the same sweep (a restart must not continue a different one)."""
        data = self.model_dump(mode="json", exclude={"concurrency", "evaluators", "base_dir"})
        if data["scheduler"] in ("optuna", "pbt") and data["asha"] is None:  # what sweeps before schedulers had
            del data["scheduler"], data["asha"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def grid(spec: SweepSpec) -> list[dict[str, Value]]:
    """Every combination of the listed values, the first parameter varying slowest; with
    ``shuffle``, in the order a ``random.Random(seed)`` shuffle gives (the same on every restart)."""
    names = list(spec.params)
    points = [dict(zip(names, combo)) for combo in itertools.product(*(spec.params[n].values for n in names))]
    if spec.shuffle:
        random.Random(spec.seed).shuffle(points)
    return points


def trial_config(spec: SweepSpec, base: Config, params: dict[str, Value], run_name: str) -> Config:
    """The config of one trial: base, then the sweep's overrides, then the trial's values.

    The sweep compares its trials on their scores (the pruner, PBT's quantile), which a trial's
    own bound cannot settle: by default trials score every case and decide on point estimates
    (``eval.sequential: false``, ``feedback.confidence: 0``; a pruner on bounds is not built yet);
    the sweep's overrides or its params may say otherwise."""
    defaults = {"eval.sequential": False, "feedback.confidence": 0.0}
    cfg = base.with_overrides(defaults, spec.overrides, {"run.name": run_name}, params)
    if cfg.train.lora.enabled and "merged" not in spec.overrides.get("export", {}):
        cfg = cfg.with_overrides({"export.merged": False})  # a trial exports its adapter; the sweep merges the winner's alone
    return cfg


def load_sweep(path: str | Path) -> tuple[SweepSpec, Config]:
    """The sweep file and its base config, both checked; errors name the file and the field."""
    path = Path(path)
    raw = read_yaml(path, "sweep")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {explain(e)}") from e
    if not (Path(spec.base_dir) / spec.config).is_file():
        raise ConfigError(f"{path}: config: {spec.config!r} is not a file ({(Path(spec.base_dir) / spec.config).resolve()})")
    base = load_config(Path(spec.base_dir) / spec.config, functions=True)
    names = [p.name for p in base.phases]
    if spec.phase is not None:
        if spec.phase not in names:
            raise ConfigError(f"{path}: phase {spec.phase!r} is not in {spec.config} (phases: {', '.join(names) or 'none'})")
        base = base.phase_config(names.index(spec.phase))
    elif base.phases:
        raise ConfigError(f"{path}: config {spec.config} has phases ({', '.join(names)}); "
                          "a trial is one run: say which with phase: NAME")
    metric = spec.metric or base.feedback.metric
    if metric not in base.task.names():
        raise ConfigError(f"{path}: " + unknown_metric(metric, base.task.names(), "metric"))
    if goal(metric) != "max":
        raise ConfigError(f"{path}: metric: a sweep maximizes a fraction; {metric} is lower-is-better (choose one of "
                          f"{', '.join(m for m in base.task.names() if goal(m) == 'max')})")
    try:
        first = trial_config(spec, base, {}, spec.name)
    except ValueError as e:
        raise ConfigError(f"{path}: overrides make an invalid config: {e}") from None
    if first.train.epochs is not None or "train.epochs" in spec.params:
        raise ConfigError(f"{path}: a sweep compares trials at steps (pruner, budgets, PBT barriers): set "
                          "train.max_steps, not train.epochs")
    if spec.sampler == "pbt" and first.eval.every is not None:
        raise ConfigError(f"{path}: sampler pbt copies members at their evaluated checkpoints: leave eval.every unset "
                          f"(it is {first.eval.every}), the verdicts then come every train.save_steps")
    for name, param in spec.params.items():
        for value in param.candidates():
            try:
                trial_config(spec, base, {name: value}, spec.name)
            except ValueError as e:
                raise ConfigError(f"{path}: params.{name} = {value!r} makes an invalid config: {e}") from None
    return spec, base
