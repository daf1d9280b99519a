"""Provisioning: the streams and KV buckets tuneloop uses, created or brought up to date.

What the admin identity does once for a deployment (``tuneloop provision``, the init job), and
whoever comes first where nothing is secured (embedded runs). A service whose identity may not
create them waits for them. Kept apart from the bus, which only uses them, as nats.go keeps
its JetStreamManager apart from JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import os

import nats
from nats.aio.client import Client
from nats.js.api import StreamConfig, StreamSource
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from . import subjects

log = logging.getLogger(__name__)


class ProvisionError(RuntimeError):
    """The streams or buckets are missing and this identity may not create them."""


def stream_config() -> StreamConfig:
    return StreamConfig(name=subjects.STREAM, subjects=subjects.stream_subjects(),
                        max_age=7 * 24 * 3600, max_bytes=2 * 1024**3, duplicate_window=300)


def audit_config() -> StreamConfig:
    """The audit trail: a copy of every control, its answer (applied, rejected, rolled back,
    confirmed), every proposal and its decision, and every mixture request, sourced
    from the main stream, kept for a year and protected from deletes and purges."""
    return StreamConfig(
        name=subjects.AUDIT_STREAM, max_age=365 * 24 * 3600, deny_delete=True, deny_purge=True,
        sources=[StreamSource(name=subjects.STREAM, filter_subject=f"{subjects.PREFIX}.*.{kind}")
                 for kind in subjects.AUDIT_KINDS],
    )


def cluster_size(nc: Client) -> int:
    """How many servers the connected one says its cluster has (1 for a lone server)."""
    info = getattr(nc, "_server_info", None) or {}
    return max(len(set(info.get("connect_urls") or [])), 1) if info.get("cluster") else 1


def replicas(nc: Client) -> int:
    """Copies of every stream and KV bucket: ``TUNELOOP_BUS_REPLICAS`` when set, else 3 on a
    cluster of 3 or more (a node can be lost without losing a message or stalling the
    quorum), else 1 (one server: the embedded run)."""
    if os.environ.get("TUNELOOP_BUS_REPLICAS"):
        return int(os.environ["TUNELOOP_BUS_REPLICAS"])
    return 3 if cluster_size(nc) >= 3 else 1


async def provision(nc: Client) -> dict[str, int]:
    """Create (or bring up to date) every stream and KV bucket. Returns each one's replicas.
    An existing one is scaled up to ``replicas()``, never down unless ``TUNELOOP_BUS_REPLICAS``
    says so (a client that cannot see the cluster must not take copies away)."""
    js = nc.jetstream()
    want, explicit = replicas(nc), bool(os.environ.get("TUNELOOP_BUS_REPLICAS"))

    def target(have: int | None) -> int:
        return want if explicit else max(want, have or 1)
    made = {}
    for config in (stream_config(), audit_config()):
        try:
            have = (await js.stream_info(config.name)).config.num_replicas
        except NotFoundError:
            config.num_replicas = want
            await js.add_stream(config)
        else:  # new kinds after an upgrade, kinds audited since, more copies
            config.num_replicas = target(have)
            await js.update_stream(config)
        made[config.name] = config.num_replicas
    for bucket, ttl in subjects.BUCKETS.items():
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(bucket=bucket, history=1, ttl=ttl, replicas=want)
            made[bucket] = want
            continue
        config = (await js.stream_info(f"KV_{bucket}")).config  # a bucket is a stream
        if target(config.num_replicas) != (config.num_replicas or 1):
            config.num_replicas = target(config.num_replicas)
            await js.update_stream(config)
        made[bucket] = config.num_replicas or 1
    return made


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
        return True
    except NotFoundError:
        return False


async def streams_current(js: JetStreamContext) -> bool:
    """The streams exist and the main one takes every kind this version publishes."""
    try:
        info = await js.stream_info(subjects.STREAM)
    except NotFoundError:
        return False
    return sorted(info.config.subjects or []) == sorted(subjects.stream_subjects()) \
        and await _exists(js, subjects.AUDIT_STREAM)


async def provisioned(js: JetStreamContext) -> bool:
    """The streams are current and every bucket exists."""
    try:
        for bucket in subjects.BUCKETS:
            await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return False
    return await streams_current(js)


async def provision_or_wait(nc: Client, wait: bool, what: str) -> None:
    """Provision where this identity may; else wait for the admin to (``wait``), or raise
    ``ProvisionError`` at once (a command a person waits on)."""
    for _ in range(2):  # a second try: a peer may have been creating the same thing meanwhile
        try:
            await provision(nc)
            return
        except Exception as e:  # refused: this identity may not
            error = e
    js = nc.jetstream()
    if await provisioned(js):
        return
    hint = (f"{what} and identity {nc.options.get('user') or '(none)'} may not create them ({error!r}): "
            "run `tuneloop provision` with the admin identity")
    if not wait:
        raise ProvisionError(hint)
    log.warning("%s; waiting for them", hint)
    while not await provisioned(js):
        await asyncio.sleep(2.0)
