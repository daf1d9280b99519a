"""The operator of ``trainer_overhead.py``, in a process of its own as ``tuneloop ctl`` is.

Follows every run's ``StepMetrics`` and, each ``--every`` steps of a run, sends it a control
(``set-grad-clip`` to its current value: applied and answered, nothing changes in training)
and waits for the answer before the next. Runs until terminated.

    python bench/operator_probe.py NATS_URL --every 10 --value 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tuneloop.bus import Bus
from tuneloop.tools.client import send_control
from tuneloop.events import StepMetrics


async def main(url: str, every: int, value: float) -> None:
    bus = await Bus.connect(url, "ctl")
    marks: dict[str, int] = {}
    busy: set[str] = set()

    async def control(run_id: str) -> None:
        try:
            await send_control(url, run_id, "set-grad-clip", value, bus=bus, timeout=60, operator="bench")
        except TimeoutError:
            pass  # sent after the run's last step: nobody answers
        finally:
            marks[run_id] += every
            busy.discard(run_id)

    async def on_step(ev: StepMetrics) -> None:
        mark = marks.setdefault(ev.run_id, every)
        if ev.step >= mark and ev.run_id not in busy:
            busy.add(ev.run_id)
            asyncio.ensure_future(control(ev.run_id))

    await bus.subscribe(StepMetrics, "*", on_step)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    print("ready", flush=True)
    await done.wait()
    await bus.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--value", type=float, default=1.0)
    a = ap.parse_args()
    asyncio.run(main(a.url, a.every, a.value))
