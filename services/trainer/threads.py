"""``CoreShareCallback``: the trainer's side of sharing a machine's cores (``tuneloop.cores``).

At each step boundary it reads the leases of the services working beside it and trains on
the cores they did not borrow; when they are done, on all of them again. From the moment the
trainer hands out an evaluation (``expecting()``: snapshots announced, no feedback on them
yet) until an evaluator's lease shows it took the work, the evaluators' cores are kept free,
so they pick the work up at once. Only for a single training process: ranks of one job must
not disagree on their thread counts mid-step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import TrainerCallback

from tuneloop.cores import CoreBudget

log = logging.getLogger(__name__)


class CoreShareCallback(TrainerCallback):
    def __init__(self, budget: CoreBudget, expecting: Callable[[], bool] = lambda: False):
        self.budget = budget
        self.expecting = expecting
        self.full = 0  # the trainer's own thread count, when nobody borrows
        self.current = 0
        self.changes = 0

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        self.full = self.full or torch.get_num_threads()
        self.current = torch.get_num_threads()

    def on_step_end(self, args, state, control, **kwargs):
        self._set(min(self.full, self.budget.threads_for_me(self.expecting())))

    def on_save(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)  # a checkpoint to evaluate was just announced

    def on_train_end(self, args, state, control, **kwargs):
        self._set(self.full)

    def _set(self, threads: int) -> None:
        if threads == self.current:
            return
        import torch

        torch.set_num_threads(threads)
        log.debug("training on %d thread(s) (was %d)", threads, self.current)
        self.current, self.changes = threads, self.changes + 1
