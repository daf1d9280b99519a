"""GRPO's reward function: a call to the rl-reward service, not code inside the trainer.

TRL calls it with each rank's completions. With several processes, every rank hands its
batch to rank 0, which asks the service once (request/reply to the ``rl-reward`` queue group,
so any number of replicas share the load) and hands each rank its rewards back.
"""

from __future__ import annotations

import logging
import time

from tuneloop.bus import NoAnswer
from tuneloop.events import RewardRequest

from . import distributed

log = logging.getLogger(__name__)
# Scoring a batch takes milliseconds; no answer in this long means the replica is gone or hung.
ATTEMPT_S = 10.0


class RewardServiceError(RuntimeError):
    """The rl-reward service could not score a batch (no responder, timeout, error reply)."""


class RemoteReward:
    __name__ = "rl_reward"  # TRL logs rewards under the function's name

    def __init__(self, link, run_id: str, weights: dict[str, float], timeout: float):
        self.link, self.run_id, self.weights, self.timeout = link, run_id, dict(weights), timeout
        self.errors = 0  # completions the service could not score (they count as no reward)
        self.retries = 0  # requests asked again (no replica yet, or one died mid-request)

    def __call__(self, prompts, completions, category=None, reference=None, columns=None, **_) -> list[float | None]:
        n = len(completions)
        mine = ([_text(c) for c in completions], list(reference or [None] * n), list(category or [None] * n),
                list(prompts or [None] * n), list(columns or [None] * n),
                any(isinstance(c, list) for c in completions))
        batches = distributed.gather(mine)
        replies = self._score(batches) if distributed.rank() == 0 else None
        return distributed.scatter(replies)

    def _score(self, batches: list[tuple]) -> list[list[float | None]]:
        completions = [c for b in batches for c in b[0]]
        req = RewardRequest(run_id=self.run_id, completions=completions,
                            references=[r for b in batches for r in b[1]],
                            categories=[c for b in batches for c in b[2]],
                            prompts=[p for b in batches for p in b[3]], columns=[c for b in batches for c in b[4]],
                            conversational=any(b[5] for b in batches), weights=self.weights)
        reply = self._ask(req)
        if len(reply.rewards) != len(completions):
            raise RewardServiceError(f"rl-reward answered {len(reply.rewards)} rewards for {len(completions)} completions")
        for err in [e for e in reply.errors if e][:3]:
            log.warning("reward error: %s", err)
        self.errors += sum(1 for e in reply.errors if e)
        out, i = [], 0
        for b in batches:
            out.append(reply.rewards[i:i + len(b[0])])
            i += len(b[0])
        return out

    def _ask(self, req: RewardRequest):
        """Ask until the timeout. While no replica answers yet (still starting), or the one that
        got the request died or hangs (no answer within ``ATTEMPT_S``), ask again: the queue
        group hands it to a replica that is there. Scoring is pure, so asking twice is safe."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return self.link.score(req, timeout=max(min(ATTEMPT_S, left), 1.0))
            except Exception as e:
                retry = isinstance(e, NoAnswer)
                if time.monotonic() >= deadline or not retry:
                    raise RewardServiceError(f"rl-reward could not score {len(req.completions)} completions: {e}") from e
                self.retries += 1
                log.warning("reward request: %s; asking again", e)
                time.sleep(0.5)


def _text(completion) -> str:
    """TRL passes strings, or message lists for conversational data sets."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)
