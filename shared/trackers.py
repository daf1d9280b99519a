"""Experiment trackers (``run.report_to``: TensorBoard, MLflow, W&B): TRL logs training there
as usual, and tuneloop adds its own records at their steps: every verdict's metrics
(``eval/<metric>``, ``eval/<category>/<metric>``), every feedback decision, every applied
control (the trainer, services/trainer/trackers.py) and the export's final scores (``test/...``,
``suite/<name>/pass``; the runner, ``log_final``). The run id is the tracker's run name; a fork
(a PBT copy too) is tagged with its parent.

Where each tracker writes, unless the user's environment already says (a tracking server):
``<run>/trackers/tensorboard``, an MLflow file store ``<run>/trackers/mlruns`` (experiment
``run.name``), W&B offline in ``<run>/trackers``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .events import ControlApplied, Event, Feedback

log = logging.getLogger(__name__)


def environment(report_to: list[str], run_dir: Path, run_id: str, experiment: str, lineage: dict) -> dict[str, str]:
    """The variables TRL's tracker callbacks read, for this run (a pool trainer serves one run
    after another: set per run, the user's own settings kept)."""
    trackers = Path(run_dir) / "trackers"
    env: dict[str, str] = {}
    tags = {"tuneloop.run_id": run_id}
    if fork := lineage.get("forked_from"):
        tags.update({"tuneloop.parent": fork["run"], "tuneloop.parent_step": str(fork["step"])})
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(trackers / "tensorboard")
    if "mlflow" in report_to:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = f"file:{trackers / 'mlruns'}"
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 asks for this to write a local file store
        env["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
        env["MLFLOW_TAGS"] = json.dumps(tags)
    if "wandb" in report_to:
        env["WANDB_MODE"] = os.environ.get("WANDB_MODE") or "offline"
        env["WANDB_DIR"] = os.environ.get("WANDB_DIR") or str(trackers)
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or experiment
        env["WANDB_TAGS"] = ",".join(f"{k}={v}" for k, v in tags.items())
    return env


def records(event: Event, answer: Event | None) -> tuple[int, dict[str, float]] | None:
    """(step, scalars) that ``event`` (and its answer) put in the trackers, or None."""
    if isinstance(event, Feedback):
        values = {f"eval/{k}": v for k, v in event.scores.items()}
        for category, scores in event.by_category.items():
            values.update({f"eval/{category}/{k}": v for k, v in scores.items() if k != "cases"})
        values["feedback/continue"] = 1.0 if event.action == "continue" else 0.0
        if event.best_score is not None:
            values["feedback/best_score"] = event.best_score
        return event.step, values
    if isinstance(answer, ControlApplied):
        value = answer.new if isinstance(answer.new, (int, float)) and not isinstance(answer.new, bool) else 1.0
        return answer.step, {f"control/{answer.command}": float(value)}
    return None


def summary_records(summary) -> list[tuple[int, dict[str, float]]]:
    """(step, scalars) of a finished run's summary: each verdict during training (its overall
    metrics), then the exported model on test and on each suite."""
    out = [(e.step, {f"eval/{k}": float(v) for k, v in e.scores.items() if isinstance(v, (int, float))})
           for e in summary.evaluations]
    if summary.exported_step is not None and summary.test is not None:
        values = {f"test/{k}": float(v) for k, v in (summary.test.model_extra or {}).items() if isinstance(v, (int, float))}
        values.update({f"suite/{name}/pass": s.pass_rate for name, s in summary.suites.items()})
        out.append((summary.exported_step, values))
    return out


def missing(records: list[tuple[int, dict[str, float]]], written: dict[str, set[int]]) -> list[tuple[int, dict]]:
    """What of ``records`` is not yet at its step (``written``: tag -> steps): the trainer wrote
    the verdicts that reached it while training; those that came after it ended, and the final
    scores, are the runner's to write."""
    out = []
    for step, values in records:
        left = {k: v for k, v in values.items() if step not in written.get(k, set())}
        if left:
            out.append((step, left))
    return out


def log_final(report_to: list[str], run_dir: Path, run_id: str, summary) -> None:
    """Complete the run's trackers from its summary once it is over (the trainer has closed its
    writers): the verdicts that came after training ended, the export's scores on test and suites."""
    records = summary_records(summary)
    try:
        if "tensorboard" in report_to:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            from torch.utils.tensorboard import SummaryWriter

            logdir = os.environ.get("TENSORBOARD_LOGGING_DIR") or str(Path(run_dir) / "trackers" / "tensorboard")
            seen = EventAccumulator(logdir, size_guidance={"scalars": 0}).Reload() if Path(logdir).is_dir() else None
            written = {t: {e.step for e in seen.Scalars(t)} for t in seen.Tags()["scalars"]} if seen else {}
            with SummaryWriter(log_dir=logdir) as w:
                for step, values in missing(records, written):
                    for k, v in values.items():
                        w.add_scalar(k, v, step)
        if "mlflow" in report_to:
            from mlflow.tracking import MlflowClient

            uri = environment(["mlflow"], run_dir, run_id, "", {}).get("MLFLOW_TRACKING_URI") or os.environ["MLFLOW_TRACKING_URI"]
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            for r in client.search_runs(experiments, filter_string=f"tags.`tuneloop.run_id` = '{run_id}'")[:1]:
                keys = {k for _, values in records for k in values}
                written = {k: {m.step for m in client.get_metric_history(r.info.run_id, k)} for k in keys}
                for step, values in missing(records, written):
                    for k, v in values.items():
                        client.log_metric(r.info.run_id, k, v, step=step)
    except Exception as e:  # the run is done either way: say so, do not fail it
        log.warning("trackers: %s not completed from its summary: %r", run_id, e)
