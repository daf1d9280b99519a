"""tuneloop's records in the trackers TRL opened for this trainer (``run.report_to``; what goes
where is in tuneloop/trackers.py): each verdict's metrics, feedback decision and applied
control, written at its own step as the step boundary hands them over."""

from __future__ import annotations

import logging
import os

from tuneloop.events import Event
from tuneloop.trackers import records

log = logging.getLogger(__name__)


class TrackerLog:
    """Writes tuneloop's records into the trackers TRL opened for this trainer: its
    TensorBoard writer, the active MLflow run, the W&B run (their own public handles)."""

    def __init__(self, trainer, report_to: list[str]):
        self.callbacks = trainer.callback_handler.callbacks
        self.report_to = set(report_to)

    def seen(self, event: Event, answer: Event | None) -> None:
        if (got := records(event, answer)) is not None:
            self.write(*got)

    def write(self, step: int, values: dict[str, float]) -> None:
        try:
            if "tensorboard" in self.report_to:
                for cb in self.callbacks:
                    if getattr(cb, "tb_writer", None) is not None:
                        for k, v in values.items():
                            cb.tb_writer.add_scalar(k, v, step)
                        cb.tb_writer.flush()
            if "mlflow" in self.report_to:
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.log_metrics(values, step=step)
            if "wandb" in self.report_to:
                import wandb

                if wandb.run is not None:
                    wandb.log({**values, "train/global_step": step})
        except Exception as e:  # a tracker's trouble never stops training
            log.warning("tracker: could not write step %d %s: %r", step, sorted(values), e)


def same_mlflow_run_next() -> None:
    """The MLflow run this trainer opened, for its next ``train()`` (a rollback, a set-data)."""
    import mlflow

    if (run := mlflow.last_active_run()) is not None:
        os.environ["MLFLOW_RUN_ID"] = run.info.run_id
