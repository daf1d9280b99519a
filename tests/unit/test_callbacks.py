"""The trainer's TRL callbacks, one concern each, driven by hand as TRL's loop drives them
(TrainerState, TrainerControl, a real torch optimizer): what each publishes, writes and sets.
The link is a stand-in for link.BusLink (events in, events out); the bus itself is tested with
a real nats-server in tests/integration."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainerControl, TrainerState

from tuneloop.checkpoints import folder, read_state
from tuneloop.controls import AppliedControl, Steering
from tuneloop.events import CheckpointSaved, Control, ControlApplied, StepMetrics
from tuneloop.storage import RunDir
from tuneloop.trainer.callbacks import CheckpointCallback, Hooks, MetricsCallback, SnapshotCallback
from tuneloop.trainer.steering_callback import BarrierCallback, SteeringCallback


class Link:
    """Events in (``arrive``), events out (``sent``), as BusLink hands them to the callbacks."""

    def __init__(self):
        self.inbox, self.sent, self.acked = [], [], []
        self.stopping = threading.Event()
        self.datasets = {}

    def arrive(self, event) -> None:
        self.inbox.append((event, lambda: self.acked.append(event.event_id)))

    def drain(self):
        items, self.inbox = self.inbox, []
        return items

    def wait(self, timeout):
        return self.drain()

    def publish(self, event, *, now=False, then=None):
        self.sent.append(event)
        if then:
            then()

    def of(self, cls):
        return [e for e in self.sent if isinstance(e, cls)]


def hooks(tmp_path, link, **kw) -> Hooks:
    state = Steering(learning_rate=1e-3, max_grad_norm=1.0, save_steps=10, logging_steps=1, dataset_id="d0")
    return Hooks(link, "r", tmp_path, "base", True, state, **kw)


def at(step, max_steps=100) -> TrainerState:
    s = TrainerState()
    s.global_step, s.max_steps, s.epoch = step, max_steps, 0.5
    return s


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_metrics_publish_each_log_with_throughput_from_the_second_interval(tmp_path):
    link = Link()
    h = hooks(tmp_path, link)
    m = h.metrics
    args, control = SimpleNamespace(), TrainerControl()
    m.on_train_begin(args, at(0), control)
    m.on_log(args, at(1), control, logs={"loss": 2.0, "num_tokens": 100.0, "learning_rate": 1e-3})
    m.on_log(args, at(2), control, logs={"loss": 1.5, "num_tokens": 300.0})
    m.on_log(args, at(2), control, logs={"train_runtime": 1.0})  # no loss: not a step's log
    first, second = link.of(StepMetrics)
    assert (first.step, first.loss, first.tokens, first.tokens_per_second) == (1, 2.0, None, None)
    assert second.step == 2 and second.tokens == 200 and second.tokens_per_second > 0
    assert h.loop.last_loss == 1.5 and m.tokens_per_second == second.tokens_per_second
    assert h.loop.losses == {}  # no guard watches: no losses kept


def test_a_checkpoint_gets_its_steering_file_then_is_announced_final_at_the_last_step(tmp_path):
    link = Link()
    h = hooks(tmp_path, link, eval_every=20)
    cb = next(c for c in h.callbacks if isinstance(c, CheckpointCallback))
    args = SimpleNamespace(output_dir=str(RunDir(tmp_path).checkpoints))
    for step in (10, 20, 25):
        folder(args.output_dir, step).mkdir(parents=True)
    cb.on_save(args, at(10, max_steps=25), TrainerControl())
    cb.on_save(args, at(20, max_steps=25), TrainerControl())
    cb.on_save(args, at(25, max_steps=25), TrainerControl())
    saved = link.of(CheckpointSaved)
    assert [(s.step, s.evaluate, s.is_final) for s in saved] == [(10, False, False), (20, True, False), (25, True, True)]
    assert saved[0].path == "checkpoints/checkpoint-10" and h.loop.final_checkpoint == "checkpoints/checkpoint-25"
    assert read_state(folder(args.output_dir, 10)).learning_rate == 1e-3
    assert sorted(h.loop.awaiting) == [20, 25] and h.loop.expecting_verdicts()


def test_a_snapshot_is_written_aside_and_announced_only_where_no_checkpoint_is(tmp_path):
    class Model:  # what the callback asks of a PEFT model
        def save_pretrained(self, path, safe_serialization=True):
            Path(path).mkdir(parents=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"w")

    link = Link()
    h = hooks(tmp_path, link, eval_every=5)
    snap = next(c for c in h.callbacks if isinstance(c, SnapshotCallback))
    snap.on_step_end(SimpleNamespace(), at(5), TrainerControl(), model=Model())
    snap.on_step_end(SimpleNamespace(), at(7), TrainerControl(), model=Model())  # off the cadence
    saving = TrainerControl()
    saving.should_save = True
    snap.on_step_end(SimpleNamespace(), at(10), saving, model=Model())  # a checkpoint covers it
    [saved] = link.of(CheckpointSaved)
    assert saved.snapshot and saved.step == 5 and (tmp_path / saved.path / "adapter_model.safetensors").exists()
    assert not (tmp_path / (saved.path + ".tmp")).exists() and 5 in h.loop.awaiting


def test_steering_applies_a_control_at_the_step_end_and_answers_it_after_acting(tmp_path):
    link = Link()
    h = hooks(tmp_path, link)
    opt, control = optimizer(), TrainerControl()
    args = SimpleNamespace(max_grad_norm=1.0, save_steps=10, logging_steps=1)
    link.arrive(Control(run_id="r", command="set-lr", value=5e-4, event_id="c1"))
    h.steering.on_step_end(args, at(3), control, optimizer=opt)
    [answer] = link.of(ControlApplied)
    assert answer.step == 3 and opt.param_groups[0]["lr"] == 5e-4 and link.acked == ["c1"]
    assert not control.should_training_stop and RunDir(tmp_path).applied.exists()  # durable before it was answered


def test_sigterm_saves_and_stops_with_a_reason_to_resume(tmp_path):
    link = Link()
    h = hooks(tmp_path, link)
    control = TrainerControl()
    link.stopping.set()
    h.steering.on_step_end(SimpleNamespace(), at(4), control, optimizer=optimizer())
    assert control.should_training_stop and control.should_save and h.loop.stop_reason[0] == "interrupted"


def test_a_stop_answered_after_the_last_checkpoint_stops_the_resumed_run_at_its_first_step(tmp_path):
    link = Link()
    h = hooks(tmp_path, link)
    args = SimpleNamespace(max_grad_norm=1.0, save_steps=10, logging_steps=1)
    h.steering.restored = [AppliedControl(control_id="p", command="prune", value="behind", step=12)]
    h.steering.on_train_begin(args, at(10), TrainerControl(), optimizer=optimizer())
    control = TrainerControl()
    h.steering.on_step_end(args, at(11), control, optimizer=optimizer())
    assert control.should_training_stop and h.loop.stop_reason == ("pruned", "prune applied at step 12 before a restart")
    assert not control.should_save  # a pruned run's checkpoints are released: no last one


def test_a_pbt_member_pauses_at_its_barrier_until_resumed(tmp_path):
    link = Link()
    h = hooks(tmp_path, link, pause_every=10)
    barrier = next(c for c in h.callbacks if isinstance(c, BarrierCallback))
    args = SimpleNamespace(output_dir=str(RunDir(tmp_path).checkpoints), max_grad_norm=1.0, save_steps=10,
                           logging_steps=1)
    barrier.on_save(args, at(5), TrainerControl(), optimizer=optimizer())  # not a barrier: nothing waits
    link.arrive(Control(run_id="r", command="resume", event_id="go"))  # what the sweep sends once its round is done
    control = TrainerControl()
    barrier.on_save(args, at(10), control, optimizer=optimizer())
    assert not h.loop.run_state.paused and link.acked == ["go"] and not control.should_training_stop
    assert any(m.paused for m in link.of(StepMetrics))  # it said it was paused while it waited
    link.stopping.set()  # asked to stop while waiting at the next barrier: that checkpoint is its last
    control = TrainerControl()
    barrier.on_save(args, at(20), control, optimizer=optimizer())
    assert control.should_training_stop and h.loop.final_checkpoint == "checkpoints/checkpoint-20"
    assert h.loop.stop_reason[0] == "interrupted"


def test_the_callbacks_are_in_the_order_the_savepoint_and_snapshots_need(tmp_path):
    order = [type(c) for c in hooks(tmp_path, Link(), eval_every=5, pause_every=10).callbacks]
    assert order == [MetricsCallback, CheckpointCallback, SteeringCallback, SnapshotCallback, BarrierCallback]
