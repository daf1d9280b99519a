"""An in-memory stand-in for ``tuneloop.bus.Bus``, for unit tests of service handlers.

It keeps what the handlers publish and hands events to what they consume or subscribe, in
process, at once: the logic of a handler can be tested without a broker. It is not a test of
NATS: delivery, redelivery, permissions and the streams are tested against a real
nats-server in tests/integration/ and tests/reliability/.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tuneloop import topology
from tuneloop.events import Event


@dataclass
class Entry:
    key: str
    value: bytes
    revision: int = 0


class FakeKV:
    """What the services use of a JetStream KV bucket (revisions too, for compare-and-set)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.revisions: dict[str, int] = {}
        self.revision = 0

    async def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.data[key], self.revisions[key] = value, self.revision
        return self.revision

    async def get(self, key: str) -> Entry:
        from nats.js.errors import KeyNotFoundError

        if key not in self.data:
            raise KeyNotFoundError
        return Entry(key, self.data[key], self.revisions[key])

    async def create(self, key: str, value: bytes) -> int:
        from nats.js.errors import KeyWrongLastSequenceError

        if key in self.data:
            raise KeyWrongLastSequenceError
        return await self.put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        from nats.js.errors import KeyWrongLastSequenceError

        if self.revisions.get(key) != last:
            raise KeyWrongLastSequenceError
        return await self.put(key, value)

    async def keys(self) -> list[str]:
        from nats.js.errors import NoKeysError

        if not self.data:
            raise NoKeysError
        return list(self.data)


class FakeBus:
    def __init__(self, service: str = "test"):
        self.service = service
        self.published: list[Event] = []
        self.handlers: dict[tuple[type, str], list] = defaultdict(list)
        self.buckets: dict[str, FakeKV] = defaultdict(FakeKV)

    def of(self, cls: type[Event]) -> list[Event]:
        """What was published of ``cls``, in order."""
        return [e for e in self.published if isinstance(e, cls)]

    async def publish(self, event: Event, **_) -> None:
        if not event.source:
            event = event.model_copy(update={"source": self.service})
        self.published.append(event)
        for run in (event.run_id, "*"):
            for handler in list(self.handlers[(type(event), run)]):
                await handler(event)

    async def publish_batch(self, events: list[Event], **_) -> list[None]:
        for e in events:
            await self.publish(e)
        return [None] * len(events)

    async def consume(self, cls: type[Event], run_id: str, handler, **_) -> None:
        topology.check(self.service, "consume", cls.KIND)  # as the real bus does
        await self.follow(cls, run_id, handler)

    async def follow(self, cls: type[Event], run_id: str, handler, **_) -> None:
        self.handlers[(cls, run_id)].append(handler)

    subscribe = follow

    async def latest(self, cls: type[Event], run_id: str) -> Event | None:
        found = [e for e in self.of(cls) if e.run_id == run_id]
        return found[-1] if found else None

    async def history(self, cls: type[Event], run_id: str, timeout: float = 0.0) -> list[Event]:
        return [e for e in self.of(cls) if e.run_id == run_id]

    async def key_value(self, bucket: str) -> FakeKV:
        return self.buckets[bucket]

    async def close(self) -> None:
        pass
