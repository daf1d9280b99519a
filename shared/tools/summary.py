"""What a run, a phased job and a sweep leave in their ``summary.json``, typed.

Users script against these files, so their shape is a contract like the events': the models
here are the source of truth, their JSON Schemas are in ``proto/summaries/`` (``tuneloop
proto``; a test fails when they drift). ``run_summary`` makes a run's from its ``Progress``;
``print_*`` show them as tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from ..storage import RunDir
from ..config import Config
from ..events import EvalVerdict
from ..task import SUITE_METRIC
from .progress import Progress
from .sweep.search import TrialRecord
from .sweep.spec import Value

SUMMARY_FILE = "summary.json"


class Scores(BaseModel):
    """One verdict: its cases and, as keys of their own, the score of each of the task's metrics
    (``summary["test"]["accuracy"]``)."""

    model_config = ConfigDict(extra="allow")
    cases: int
    mean_new_tokens: float
    by_category: dict[str, dict[str, float]] = Field(default_factory=dict)

    @classmethod
    def of(cls, v: EvalVerdict | None) -> "Scores | None":
        return cls(cases=v.cases, **v.scores, mean_new_tokens=v.mean_new_tokens, by_category=v.by_category) if v else None

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.model_extra or {})


class Evaluation(BaseModel):
    """A verdict during training: the step and, as keys of their own, its metrics."""

    model_config = ConfigDict(extra="allow")
    step: int

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.model_extra or {})


class SuiteResult(BaseModel):
    """The exported model on one test suite."""

    model_config = ConfigDict(populate_by_name=True)
    cases: int
    pass_rate: float = Field(alias="pass", description="Weighted fraction of cases that passed all their checks.")
    mean_new_tokens: float
    by_category: dict[str, float] = Field(default_factory=dict)
    failures: list[str] = Field(default_factory=list, description="The first failures' reasons.")


class DataSummary(BaseModel):
    dataset_id: str | None = None
    category_weights: dict[str, float] = Field(default_factory=dict)


class BaseModelInfo(BaseModel):
    """What the run started from: the configured name, and for a GGUF the file and its digest."""

    name_or_path: str
    gguf: str | None = Field(default=None, description="The GGUF file's name, when the base was one.")
    sha256: str | None = Field(default=None, description="The GGUF file's sha256 (its dequantized folder's key).")
    parameters: int | None = None

    @classmethod
    def of(cls, cfg: Config, rdir: Path) -> "BaseModelInfo":
        """From the config and ``base/source.json``, which a GGUF's dequantized folder carries."""
        import json

        from ..gguf import SOURCE_FILE

        try:
            src = json.loads((RunDir(rdir).base / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            src = {}
        return cls(name_or_path=cfg.model.name_or_path, gguf=Path(src["gguf"]).name if src.get("gguf") else None,
                   sha256=src.get("sha256"), parameters=src.get("parameters"))


class RunSummary(BaseModel):
    """``<run>/summary.json``: how one run went and where its export is."""

    run_id: str
    run_dir: str
    method: str
    base_model: BaseModelInfo | None = None
    processes: int
    metrics: list[str] = Field(default_factory=list, description="The task's metrics the views show, in order.")
    steps: int | None = None
    stop_reason: str | None = Field(default=None, description="<reason>: <detail>, from train.done.")
    final_loss: float | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    peak_memory_mb: float | None = None
    batch_size: int | None = None
    data: DataSummary = Field(default_factory=DataSummary)
    baseline: Scores | None = Field(default=None, description="The starting model on test (eval.baseline).")
    evaluations: list[Evaluation] = Field(default_factory=list)
    exported_step: int | None = None
    adapter: str | None = None
    merged: str | None = None
    test: Scores | None = Field(default=None, description="The exported model on test.")
    suites: dict[str, SuiteResult] = Field(default_factory=dict)
    forked_from: dict | None = Field(default=None, description=(
        "A fork: the parent run, the step of its checkpoint, what changed, weights only or the full state."))


class PhaseSummary(RunSummary):
    """One phase of a phased job: a run of its own."""

    phase: str


class JobSummary(BaseModel):
    """``<job>/summary.json`` of a config with ``phases``."""

    job_id: str
    run_dir: str
    phases: list[PhaseSummary]
    test: Scores | None = None
    adapter: str | None = None
    merged: str | None = None


class SweepBest(BaseModel):
    trial: int
    run_id: str
    params: dict[str, Value]
    value: float | None
    config: str
    export: str | None = None


class SweepSummary(BaseModel):
    """``<sweep>/summary.json``: every trial, and the best one."""

    sweep: str
    metric: str
    sampler: str
    pruner: str
    trials: list[TrialRecord]
    best: SweepBest | None = None


SCHEMAS = {"run": RunSummary, "job": JobSummary, "sweep": SweepSummary}


def summary_row(path: Path) -> tuple[str, str, "Scores | None"]:
    """(steps, how it stopped, held-out scores) of a run's or a phased job's summary.json, for
    ``tuneloop runs``; dashes where there is none yet, and what is wrong with one that does
    not parse (written by another version, or damaged) instead of failing the listing."""
    if not path.is_file():
        return "-", "-", None
    text = path.read_text()
    try:
        job = JobSummary.model_validate_json(text) if '"phases"' in text else None
        run = None if job else RunSummary.model_validate_json(text)
    except ValueError as e:
        return "-", f"unreadable summary.json: {str(e).splitlines()[0]}", None
    if job:
        last = job.phases[-1] if job.phases else None
        steps = "+".join(str(p.steps or 0) for p in job.phases) or "-"
        return steps, (last.stop_reason or "-").split(":")[0] if last else "-", job.test
    return str(run.steps or "-"), (run.stop_reason or "-").split(":")[0], run.test


def write(summary: BaseModel, folder: Path) -> None:
    (Path(folder) / SUMMARY_FILE).write_text(summary.model_dump_json(indent=2, by_alias=True))


def run_summary(progress: Progress, rdir: Path, cfg: Config) -> RunSummary:
    p, f, x = progress, progress.finished, progress.exported
    return RunSummary(
        run_id=p.run_id, run_dir=str(rdir), method=cfg.train.method, base_model=BaseModelInfo.of(cfg, rdir),
        processes=f.processes if f else cfg.train.processes, metrics=cfg.task.shown(),
        steps=f.step if f else None,
        stop_reason=f"{f.reason}: {f.detail}" if f else None,
        final_loss=f.final_loss if f else None,
        train_seconds=round(f.train_seconds, 1) if f else None,
        tokens_per_second=round(f.tokens_per_second, 1) if f and f.tokens_per_second else None,
        peak_memory_mb=round(f.peak_memory_mb) if f and f.peak_memory_mb else None,
        batch_size=f.batch_size if f else None,
        data=DataSummary(dataset_id=p.dataset.dataset_id, category_weights=p.dataset.category_weights) if p.dataset else DataSummary(),
        baseline=Scores.of(p.baseline),
        evaluations=[Evaluation(step=v.step, **v.scores) for v in p.verdicts],
        exported_step=x.step if x else None,
        adapter=str(rdir / x.adapter_path) if x and x.adapter_path else None,
        merged=str(rdir / x.merged_path) if x and x.merged_path else None,
        test=Scores.of(p.final_verdict),
        suites={name: SuiteResult(cases=v.cases, pass_rate=v.scores.get(SUITE_METRIC, 0.0), mean_new_tokens=v.mean_new_tokens,
                                  by_category={c: s.get(SUITE_METRIC, 0.0) for c, s in v.by_category.items()},
                                  failures=[x.reason for x in v.failures[:3]])
                for name, v in sorted(p.suite_verdicts.items())},
        forked_from=_lineage(rdir),
    )


def _lineage(rdir: Path) -> dict | None:
    info = Path(rdir) / "run.json"
    return json.loads(info.read_text()).get("forked_from") if info.is_file() else None


# ------------------------------------------------------------------ printing
def print_summary(summary: RunSummary | JobSummary, console: Console) -> None:
    if isinstance(summary, JobSummary):
        return print_job(summary, console)
    s = summary
    t = Table(title=f"tuneloop run {s.run_id}", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    if s.forked_from:
        f = s.forked_from
        t.add_row("forked from", f"{f['run']} at step {f['step']} ({'weights only' if f['weights_only'] else 'full state'})"
                  + (f", changed {f['changed']}" if f["changed"] else ""))
    if s.base_model:
        t.add_row("base model", describe_base(s.base_model))
    t.add_row("steps", f"{s.steps} ({s.method}, {s.processes} process{'es' if s.processes != 1 else ''})")
    t.add_row("stopped", str(s.stop_reason))
    t.add_row("final loss", f"{s.final_loss:.4f}" if s.final_loss is not None else "-")
    t.add_row("training time", f"{s.train_seconds} s")
    t.add_row("throughput", f"{s.tokens_per_second or '-'} tokens/s  (batch {s.batch_size}, "
                            f"peak memory {s.peak_memory_mb or '-'} MB)")
    shown = s.metrics or list(s.test.scores if s.test else [])
    if s.baseline:
        t.add_row("before (test)", f"{scores_text(s.baseline.scores, shown)}  (the starting model)")
    for v in s.evaluations:
        t.add_row(f"val @ step {v.step}", scores_text(v.scores, shown))
    if s.test:
        t.add_row("held-out test", f"[bold green]{scores_text(s.test.scores, shown)}[/]  ({s.test.cases} prompts, "
                                   f"{s.test.mean_new_tokens:.1f} tokens/answer)")
    for name, r in s.suites.items():
        t.add_row(f"suite {name}", f"pass {r.pass_rate:.3f}  ({r.cases} cases, {r.mean_new_tokens:.1f} tokens/answer)")
    t.add_row("exported step", str(s.exported_step))
    t.add_row("adapter", str(s.adapter))
    t.add_row("merged model", str(s.merged))
    console.print(t)
    console.print(f"summary: {s.run_dir}/{SUMMARY_FILE}", soft_wrap=True)


def scores_text(scores: dict[str, float], metrics: list[str]) -> str:
    """``accuracy 0.812  eval_loss 0.412``: the shown metrics a verdict has."""
    return "  ".join(f"{m} {scores[m]:.3f}" for m in metrics if m in scores) or "-"


def print_job(job: JobSummary, console: Console) -> None:
    """The job at a glance: a column per phase, its held-out scores before (its starting model)
    and after (its export), a row per metric of the task (as many as it declares: rows, not columns)."""
    shown = next((p.metrics for p in job.phases if p.metrics), [])
    t = Table(title=f"tuneloop job {job.job_id}: held-out test scores before -> after each phase")
    t.add_column("", style="bold", no_wrap=True)
    for p in job.phases:
        t.add_column(p.phase, overflow="fold")

    def change(p: PhaseSummary, metric: str) -> str:
        before = p.baseline.scores.get(metric) if p.baseline else None
        after = p.test.scores.get(metric) if p.test else None
        if after is None:
            return "-"
        return f"{before:.3f} -> [bold]{after:.3f}[/]" if before is not None else f"[bold]{after:.3f}[/]"

    t.add_row("method", *(p.method for p in job.phases))
    t.add_row("steps", *(f"{p.steps} ({str(p.stop_reason).split(':')[0]})" for p in job.phases))
    for m in shown:
        t.add_row(m, *(change(p, m) for p in job.phases))
    t.add_row("category weights", *(", ".join(f"{k} {v:g}" for k, v in sorted(p.data.category_weights.items())) or "-"
                                    for p in job.phases))
    console.print(t)
    first, last = job.phases[0] if job.phases else None, job.phases[-1] if job.phases else None
    if first and first.base_model:
        console.print(f"base model: {describe_base(first.base_model)}", soft_wrap=True)
    if last and last.suites:
        console.print("test suites on the final model: " + ", ".join(
            f"{name} pass {r.pass_rate:.3f} ({r.cases} cases)" for name, r in last.suites.items()), soft_wrap=True)
    console.print(f"merged model: {job.merged}", soft_wrap=True)
    console.print(f"summary: {job.run_dir}/{SUMMARY_FILE}", soft_wrap=True)


def describe_base(b: BaseModelInfo) -> str:
    if not b.gguf:
        return b.name_or_path
    size = f", {b.parameters / 1e6:.1f}M parameters" if b.parameters else ""
    return f"{b.name_or_path} ({b.gguf}, sha256 {(b.sha256 or '?')[:12]}{size})"


def print_sweep(summary: SweepSummary, console: Console) -> None:
    trials, best = summary.trials, summary.best.trial if summary.best else None
    names = list(trials[0].params) if trials else []
    t = Table(title=f"sweep {summary.sweep}: {summary.metric} on val while training (step:score), on test at the end")
    t.add_column("#", no_wrap=True)
    for n in names:
        t.add_column(n.rsplit(".", 1)[-1], overflow="fold")
    t.add_column("state", no_wrap=True)
    pbt = any(r.forked_from or r.replaced_by is not None for r in trials)
    if pbt:
        t.add_column("lineage", overflow="fold")
    t.add_column("val", overflow="fold", min_width=12)
    for col in ("test", "tok/s", "MB"):
        t.add_column(col, no_wrap=True, justify="right")
    for r in trials:
        curve = " ".join(f"{s}:{v:.2f}".replace("0.", ".") for s, v in sorted(r.values.items()))
        state = f"pruned@{r.pruned_at}" if r.state == "pruned" and r.pruned_at is not None else r.state
        if r.replaced_by is not None:
            state = f"copied over@{r.pruned_at if r.pruned_at is not None else '?'}"
        lineage = [_family(r)] if pbt else []
        t.add_row(f"{r.number}{'*' if r.number == best else ''}", *(_fmt(r.params[n]) for n in names), state,
                  *lineage, curve or "-", f"{r.value:.3f}" if r.value is not None else "-",
                  f"{r.tokens_per_second:.0f}" if r.tokens_per_second else "-",
                  f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb else "-")
    console.print(t)
    if summary.best:
        b = summary.best
        console.print(f"best (*): trial {b.trial} ({b.run_id}) {b.params} -> test {summary.metric} "
                      f"{b.value:.3f}; config {b.config}; model {b.export}", soft_wrap=True)
    else:
        console.print("[red]no trial completed[/]")


def _family(r) -> str:
    """A PBT trial's family: whom it forked (where, changing what), who took its place."""
    out = []
    if r.forked_from:
        f = r.forked_from
        change = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in f.get("changed", {}).items())
        out.append(f"fork of {f['trial']}@{f['step']}" + (f" ({change})" if change else ""))
    if r.replaced_by is not None:
        out.append(f"-> {r.replaced_by}")
    return "; ".join(out) or "member"


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
