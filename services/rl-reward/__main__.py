"""rl-reward service: serves reward requests (queue group) and turns periodic verdicts into feedback."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from tuneloop import metrics
from tuneloop.events import EvalVerdict, RewardReply, RewardRequest
from tuneloop.service import ServiceContext, run_service

from . import rewards
from .policy import PolicyState, decide

log = logging.getLogger("tuneloop.rl_reward")


def score_batch(req: RewardRequest, parts: dict[str, list[float]] | None = None) -> RewardReply:
    """One reward or one error per completion; a bad item never fails the batch. With ``parts``,
    each function's own reward per scored item is collected there too (for the metrics)."""
    weights = rewards.check_weights(req.weights)
    out, errors = [], []
    for i, completion in enumerate(req.completions):
        ref = req.references[i] if i < len(req.references) else None
        cat = req.categories[i] if i < len(req.categories) else None
        try:
            each = {name: rewards.REWARDS[name](completion, ref, cat) for name, w in weights.items() if w}
        except (ValueError, TypeError) as e:
            out.append(None)
            errors.append(f"item {i}: {e}")
            continue
        out.append(rewards.combine(each, weights))
        errors.append(None)
        for name, value in each.items():
            if parts is not None:
                parts.setdefault(name, []).append(value)
    return RewardReply(run_id=req.run_id, rewards=out, errors=errors)


def record(req: RewardRequest, reply: RewardReply | None, parts: dict[str, list[float]], seconds: float) -> None:
    run = req.run_id
    metrics.REWARD_REQUESTS.labels(run, "ok" if reply else "error").inc()
    metrics.REWARD_SECONDS.labels(run).observe(seconds)
    for name, values in parts.items():
        metrics.REWARD_ITEMS.labels(run, name, "scored").inc(len(values))
        metrics.REWARD_SUM.labels(run, name).inc(sum(values))
    if reply:
        metrics.REWARD_ITEMS.labels(run, "combined", "error").inc(sum(e is not None for e in reply.errors))


async def main(ctx: ServiceContext) -> None:
    states: dict[str, PolicyState] = defaultdict(PolicyState)

    async def on_reward(req: RewardRequest) -> RewardReply:
        t0, parts, reply = time.perf_counter(), {}, None
        try:
            reply = score_batch(req, parts)
            return reply
        finally:
            record(req, reply, parts, time.perf_counter() - t0)

    async def on_verdict(verdict: EvalVerdict) -> None:
        if verdict.purpose != "periodic":
            return
        cfg = ctx.config(verdict.run_id).feedback
        feedback = decide(cfg, states[verdict.run_id], verdict)
        if feedback:
            await ctx.bus.publish(feedback)
            log.info("feedback for step %d: %s (%s)", feedback.step, feedback.action, feedback.reason)

    await ctx.bus.serve(RewardRequest, ctx.run_id, on_reward, queue="rl-reward")
    await ctx.bus.consume(EvalVerdict, ctx.run_id, on_verdict)
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("rl-reward", main)
