"""rl-reward service: serves reward requests (queue group) and turns periodic verdicts into feedback."""

from __future__ import annotations

import logging
from collections import defaultdict

from tuneloop.events import EvalVerdict, RewardReply, RewardRequest
from tuneloop.service import ServiceContext, run_service

from . import rewards
from .policy import PolicyState, decide

log = logging.getLogger("tuneloop.rl_reward")


def score_batch(req: RewardRequest) -> RewardReply:
    """One reward or one error per completion; a bad item never fails the batch."""
    weights = rewards.check_weights(req.weights)
    out, errors = [], []
    for i, completion in enumerate(req.completions):
        ref = req.references[i] if i < len(req.references) else None
        cat = req.categories[i] if i < len(req.categories) else None
        try:
            out.append(rewards.combined(completion, ref, cat, weights))
            errors.append(None)
        except (ValueError, TypeError) as e:
            out.append(None)
            errors.append(f"item {i}: {e}")
    return RewardReply(run_id=req.run_id, rewards=out, errors=errors)


async def main(ctx: ServiceContext) -> None:
    states: dict[str, PolicyState] = defaultdict(PolicyState)

    async def on_reward(req: RewardRequest) -> RewardReply:
        return score_batch(req)

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
