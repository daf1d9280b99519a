"""Operator side of the control plane: publish a ``Control`` and wait for its answer."""

from __future__ import annotations

import asyncio
import getpass

from .bus import Bus
from .events import Control, ControlApplied, ControlRejected


async def send_control(url: str, run_id: str, command: str, value=None, *, timeout: float = 120.0,
                       bus: Bus | None = None) -> ControlApplied | ControlRejected:
    """Publish ``command`` for ``run_id``; return the trainer's ControlApplied or ControlRejected."""
    own = bus is None
    bus = bus or await Bus.connect(url, "ctl")
    try:
        event = Control(run_id=run_id, command=command, value=value, operator=_whoami())
        answer: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_answer(ev) -> None:
            if ev.control_id == event.event_id and not answer.done():
                answer.set_result(ev)

        await bus.subscribe(ControlApplied, run_id, on_answer)   # before publishing: no race
        await bus.subscribe(ControlRejected, run_id, on_answer)
        await bus.publish(event)
        try:
            return await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer to {command!r} from run {run_id} within {timeout:.0f}s "
                               "(is its trainer running?)") from None
    finally:
        if own:
            await bus.close()


def _whoami() -> str:
    try:
        return getpass.getuser()[:64]
    except Exception:
        return "operator"
