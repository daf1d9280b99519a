"""The bus as a 3-node JetStream cluster (three local nats-server processes, routed as a
deployment's are): every stream and KV bucket has 3 replicas, and SIGKILLing the node that
leads the TUNELOOP stream in the middle of a run, for 30 s, loses nothing. Training goes on
through the leader election and the outage, every step's metrics, checkpoint, verdict and
feedback is stored once, each control is answered and applied once, and the node catches up
when it comes back (its replica current, no lag)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import pytest

from helpers import collect, every_checkpoint_judged, make_run, stored_when, tiny_config, wait_for
from tuneloop import subjects
from tuneloop.bus import Bus
from tuneloop.tools.embedded import NatsCluster
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, Control, ControlApplied, EvalVerdict, Feedback,
                             StepMetrics, TrainingFinished)

pytestmark = pytest.mark.reliability
DOWN_S = 30.0


async def stream_cluster(bus: Bus):
    """The TUNELOOP stream's raft group as the cluster reports it (leader, peers, their lag)."""
    return (await bus.js.stream_info(subjects.STREAM)).cluster


async def test_killing_the_stream_leader_of_a_3_node_cluster_loses_nothing(tmp_path, services, figures):
    with NatsCluster(tmp_path / "nats", size=3) as cluster:
        bus = await Bus.connect(cluster.url, "operator")  # provisions: a cluster of 3 gets R3 everywhere
        try:
            streams = {name: (await bus.js.stream_info(name)).config.num_replicas
                       for name in (subjects.STREAM, subjects.AUDIT_STREAM, *(f"KV_{b}" for b in subjects.BUCKETS))}
            assert set(streams.values()) == {3}, streams
            run = f"cluster-{int(time.time()) % 10**6}"
            cfg = tiny_config(tmp_path, max_steps=100000, save_steps=40, logging_steps=1)
            cfg.feedback.min_step = 10**6  # the run ends by the operator's stop, not by scores
            svc = services(make_run(tmp_path, run, cfg), cluster.url, run)
            for name in ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward"):
                svc.start(name)
            steps, finished = await collect(bus, StepMetrics, run), await collect(bus, TrainingFinished, run)
            await wait_for(lambda: any(s.step >= 45 for s in steps), timeout=240)  # a checkpoint and its verdict first
            before = Control(run_id=run, command="set-log-interval", value=1)
            await bus.publish(before)

            old = (await stream_cluster(bus)).leader
            stored_before = (await bus.js.stream_info(subjects.STREAM)).state.messages
            cluster.kill(old)
            down_wall, down = time.time(), time.monotonic()
            during = Control(run_id=run, command="set-lr", value=0.002)
            await bus.publish(during)  # stored once a new leader is elected
            new = None
            while new in (None, old):
                with_leader = await stream_cluster(bus)
                new = with_leader.leader if with_leader else None
                await asyncio.sleep(0.1)
            figures["new_leader_seen_after_s"] = round(time.monotonic() - down, 2)
            await asyncio.sleep(max(0.0, DOWN_S - (time.monotonic() - down)))
            cluster.node(old).start()
            up_wall, up = time.time(), time.monotonic()

            async def caught_up() -> bool:
                peers = {p.name: p for p in (await stream_cluster(bus)).replicas or []}
                return old in peers and peers[old].current and not peers[old].lag and not peers[old].offline
            while not await caught_up():
                await asyncio.sleep(0.2)
            figures["catch_up_s"] = round(time.monotonic() - up, 2)
            await wait_for(lambda: any(s.time.timestamp() > up_wall for s in steps), timeout=120)
            after = Control(run_id=run, command="set-grad-clip", value=0.5)
            stop = Control(run_id=run, command="stop")
            await bus.publish(after)
            await bus.publish(stop)
            await wait_for(lambda: finished, timeout=300)
            leader_after = (await stream_cluster(bus)).leader
            held = (await bus.js.stream_info(subjects.STREAM)).state.messages
        finally:
            await bus.close()

        kinds = (StepMetrics, ControlApplied, CheckpointSaved, CheckpointRecorded, EvalVerdict, Feedback, TrainingFinished)
        got = await stored_when(cluster.url, run, kinds, every_checkpoint_judged)
        end = got[TrainingFinished][0]
        step_times = {}
        for s in got[StepMetrics]:
            step_times.setdefault(s.step, s.time.timestamp())
        times = sorted(step_times.values())
        gaps = [b - a for a, b in zip(times, times[1:])]
        applied = Counter(a.control_id for a in got[ControlApplied])
        sent = [before.event_id, during.event_id, after.event_id, stop.event_id]
        saved = sorted(e.step for e in got[CheckpointSaved] if not e.snapshot)
        recorded = sorted(e.step for e in got[CheckpointRecorded] if not e.path.startswith("snapshots"))
        periodic = sorted(v.step for v in got[EvalVerdict] if v.purpose == "periodic")
        feedback = sorted(f.step for f in got[Feedback])
        figures.update(
            replicas=3, leader_killed=old, new_leader=new, leader_at_end=leader_after,
            down_s=round(up - down, 1),
            steps_trained_while_down=len({k for k, t in step_times.items() if down_wall < t < up_wall}),
            longest_stall_s=round(max(gaps), 2), median_step_s=round(statistics.median(gaps), 3),
            messages_before_kill=stored_before, messages_at_end=held,
            steps=end.step, steps_missing=end.step - len(step_times),
            controls_lost=sum(c not in applied for c in sent), duplicates_applied=sum(n - 1 for n in applied.values()),
            checkpoints=len(recorded), verdicts=len(periodic))
        assert end.reason == "control", end
        assert sorted(step_times) == list(range(1, end.step + 1)), "a step's metrics are missing"
        assert applied == {c: 1 for c in sent}, applied
        assert saved == recorded == periodic == feedback and len(set(saved)) == len(saved), (saved, recorded, periodic)
        assert figures["steps_trained_while_down"] > 0 and new != old and held > stored_before, figures
        # Training never waited for the bus: no pause between steps as long as the election took.
        assert figures["longest_stall_s"] < figures["new_leader_seen_after_s"], figures
