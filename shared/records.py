"""``Records``: pydantic records kept in a JetStream KV bucket under a key prefix.

The checkpoint catalogue (``<run>.<step>``) and a sweep's trials (``<sweep>.trial-NNNN``)
are both this: state a restarted process reads back, one key per record, listed by prefix
in key order.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class Records(Generic[M]):
    def __init__(self, kv, model: type[M]):
        self.kv, self.model = kv, model

    async def put(self, key: str, record: M) -> None:
        await self.kv.put(key, record.model_dump_json().encode())

    async def get(self, key: str) -> M | None:
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        return self.model.model_validate_json(entry.value) if entry and entry.value else None

    async def under(self, prefix: str) -> list[M]:
        """Every record whose key starts with ``prefix``, in key order (deleted ones left out)."""
        try:
            keys = await self.kv.keys()
        except (NotFoundError, NoKeysError):
            return []
        out = []
        for k in sorted(k for k in keys if k.startswith(prefix)):
            if (record := await self.get(k)) is not None:
                out.append(record)
        return out
