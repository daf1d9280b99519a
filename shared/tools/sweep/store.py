"""The sweep's state in JetStream KV (bucket ``tuneloop-sweeps``): its settings, one record per
trial, and its scheduler's state. The truth a restarted sweep starts from."""

from __future__ import annotations

import json

from nats.js.errors import KeyNotFoundError, NotFoundError

from ... import subjects
from ...bus import Bus
from ...config import Config, ConfigError, differences
from ...records import Records
from .search import TrialRecord
from .spec import SweepSpec

BUCKET = subjects.SWEEP_BUCKET


class SweepMismatch(ConfigError):
    """A sweep of this name exists with other settings: continuing it would mix two searches."""

class Store:
    """The sweep's state in JetStream KV: ``<sweep>.spec`` and one ``<sweep>.trial-NNNN`` per trial."""

    def __init__(self, kv, name: str):
        self.kv, self.name = kv, name
        self.trials: Records[TrialRecord] = Records(kv, TrialRecord)

    @classmethod
    async def open(cls, bus: Bus, spec: SweepSpec, base: Config) -> "Store":
        """The sweep's store; SweepMismatch when a sweep of this name exists with other settings
        or its base config (the file every trial starts from) changed since it started."""
        store = cls(await bus.key_value(BUCKET), spec.name)
        key, mine = f"{spec.name}.spec", spec.fingerprint()
        base_now = base.model_dump(mode="json")
        try:
            stored = json.loads((await store.kv.get(key)).value)
        except (KeyNotFoundError, NotFoundError):
            await store.kv.put(key, json.dumps({"fingerprint": mine, "spec": spec.model_dump(mode="json"),
                                                "base": base_now}).encode())
            return store
        if stored["fingerprint"] != mine:
            changed = sorted(k for k, v in spec.model_dump(mode="json").items()
                             if stored["spec"].get(k) != v and k not in ("concurrency", "evaluators", "base_dir"))
            raise SweepMismatch(f"sweep {spec.name!r} already exists with other settings (changed: "
                                f"{', '.join(changed) or 'the sweep file format'}); give this one another name")
        if "base" in stored and (changed := differences(Config.model_validate(stored["base"]), base)):
            raise SweepMismatch(f"sweep {spec.name!r}: its base config {spec.config} changed since the sweep started "
                                f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); its trials would not "
                                "compare: restore it, or give the sweep another name")
        return store

    async def records(self) -> list[TrialRecord]:
        return await self.trials.under(f"{self.name}.trial-")

    async def put(self, record: TrialRecord) -> None:
        await self.trials.put(f"{self.name}.trial-{record.number:04d}", record)

    async def state(self, key: str) -> dict | None:
        """The scheduler's saved state (``<sweep>.<key>``), or None."""
        try:
            return json.loads((await self.kv.get(f"{self.name}.{key}")).value)
        except (KeyNotFoundError, NotFoundError):
            return None

    async def put_state(self, key: str, state: dict) -> None:
        await self.kv.put(f"{self.name}.{key}", json.dumps(state).encode())

