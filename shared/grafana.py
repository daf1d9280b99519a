"""Grafana annotations for what an operator did and what a run saved: every applied control
and every catalogued checkpoint, posted with grafana-client when ``GRAFANA_URL`` and
``GRAFANA_TOKEN`` are set (the checkpoint service does it). The dashboard shows both from
Prometheus too; these annotations carry the text (old -> new, sha256) and survive the
metrics' retention. ``annotation`` is pure; ``Annotator`` only posts.
"""

from __future__ import annotations

import asyncio
import logging
import os

from .events import CheckpointRecorded, ControlApplied, ControlRolledBack, Event

log = logging.getLogger(__name__)
DASHBOARD_UID = "tuneloop"


def annotation(event: Event) -> dict | None:
    """The annotation for ``event`` (keyword arguments of grafana-client's add_annotation), if any."""
    when = int(event.time.timestamp() * 1000)
    if isinstance(event, ControlApplied):
        return {"dashboard_uid": DASHBOARD_UID, "time_from": when, "tags": ["tuneloop", event.run_id, "control", event.command],
                "text": f"{event.run_id}: {event.command} at step {event.step}: {event.old!r} -> {event.new!r}"}
    if isinstance(event, ControlRolledBack):
        return {"dashboard_uid": DASHBOARD_UID, "time_from": when, "tags": ["tuneloop", event.run_id, "rollback", event.command],
                "text": f"{event.run_id}: {event.command} {event.value!r} rolled back at step {event.step} to the savepoint "
                        f"at step {event.savepoint_step}: guard {event.guard!r} broken by the verdict of step "
                        f"{event.verdict_step} {event.metrics}"}
    if isinstance(event, CheckpointRecorded):
        return {"dashboard_uid": DASHBOARD_UID, "time_from": when, "tags": ["tuneloop", event.run_id, "checkpoint"],
                "text": f"{event.run_id}: checkpoint step {event.step} ({event.bytes / 1e6:.1f} MB, "
                        f"sha256 {event.sha256[:12]})"}
    return None


class Annotator:
    def __init__(self, url: str, token: str):
        from grafana_client import GrafanaApi

        self.api = GrafanaApi.from_url(url=url, credential=token)
        self.url = url

    @classmethod
    def from_env(cls) -> "Annotator | None":
        url, token = os.environ.get("GRAFANA_URL"), os.environ.get("GRAFANA_TOKEN")
        return cls(url, token) if url and token else None

    async def post(self, event: Event) -> None:
        """Post the event's annotation; Grafana being away costs a log line, never the service."""
        kwargs = annotation(event)
        if kwargs is None:
            return
        try:
            await asyncio.to_thread(self.api.annotations.add_annotation, **kwargs)
        except Exception as e:
            log.warning("grafana annotation at %s failed: %r", self.url, e)
