"""The bus: typed events over nats-py (JetStream streams and consumers, core request-reply).

- ``publish``: durable kinds go through JetStream with ``Nats-Msg-Id = event_id`` (so a
  retried publish is stored once); the rest go over core NATS. ``publish_batch`` sends
  several and awaits their acks together (the trainer's outbox).
- ``consume``: a durable pull consumer per (service, run, kind). Replicas of a service share
  it, so it is a work queue. A message that fails validation is dead-lettered and acked; a
  handler error is retried (nak with back-off) and dead-lettered after ``max_deliver`` tries.
- ``subscribe``: core subscription for watchers (live, nothing kept).
- ``request`` / ``serve``: request-reply with a timeout, served by a queue group.

A service (a bus named for one of ``topology.SERVICES``) publishes and consumes only the kinds
``shared/topology.py`` gives it: anything else raises ``TopologyError`` here, in an embedded
run and every test alike, before the server's permissions would refuse it in a deployment.

The streams and KV buckets are provisioned once (``tuneloop.provision``): by the admin
identity in a deployment (``tuneloop provision``, the init job), by whoever comes first where
nothing is secured (embedded runs). A service whose identity may not create them waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from . import exporter, metrics, provision, subjects, topology
from .events import BY_KIND, DeadLetter, Event, Reject, explain  # noqa: F401  (Reject: what handlers raise)

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]
MAX_DLQ_PAYLOAD = 64 * 1024
STOP_RETRY_S = 0.2  # stop_consuming cancels again this often until the consumer has ended
CONSUMER_CHECK_S = 10.0  # an idle consumer looks this often whether its durable still exists


# How long commands a person waits on (ctl, watch, audit, report...) try a first connection.
CONNECT_PATIENCE_S = float(os.environ.get("TUNELOOP_CONNECT_PATIENCE", "10"))


class NatsUnreachable(ConnectionError):
    """The first connection to NATS did not succeed in time; the message names the URL."""


class BusError(RuntimeError):
    """A request could not be answered (timeout, no responder, or the responder said why)."""


class NoAnswer(BusError):
    """A request found nobody to answer it, or no answer came in time: asking again may help."""


class PermissionRefused(BusError):
    """The server does not let this identity publish there (nats.conf); retrying cannot help."""


def credentials(env: dict[str, str] | None = None) -> dict:
    """Who this process is on the server, from the environment (deployments keep these in
    Secrets, never in files of the repo): ``NATS_USER`` / ``NATS_PASSWORD``, or a
    ``NATS_CREDS`` file (JWT + nkey), and TLS with ``NATS_TLS_CA`` (plus ``NATS_TLS_CERT`` /
    ``NATS_TLS_KEY`` for client certificates). None set: no authentication (embedded runs)."""
    env = os.environ if env is None else env
    kw: dict = {}
    if env.get("NATS_USER"):
        # Replies (and JetStream's answers) come to this identity's own inboxes, which the
        # server lets nobody else subscribe to (nats.conf).
        kw.update(user=env["NATS_USER"], password=env.get("NATS_PASSWORD", ""), inbox_prefix=f"_INBOX.{env['NATS_USER']}")
    if env.get("NATS_CREDS"):
        kw["user_credentials"] = env["NATS_CREDS"]
    if env.get("NATS_TLS_CA"):
        import ssl

        ctx = ssl.create_default_context(cafile=env["NATS_TLS_CA"])
        if env.get("NATS_TLS_CERT"):
            ctx.load_cert_chain(env["NATS_TLS_CERT"], env.get("NATS_TLS_KEY"))
        kw["tls"] = ctx
    return kw


def untrusted_hint(url: str, e: ssl.SSLCertVerificationError) -> str:
    return (f"the NATS server at {url} presents a certificate this client does not trust ({e.verify_message}): "
            "set NATS_TLS_CA to the deployment's CA (make secrets writes .tls/ca.pem)")


class Bus:
    """One connection of one service (``service`` is stamped as the source of what it publishes)."""

    def __init__(self, nc: Client, service: str, refused: set[str] | None = None):
        self.nc = nc
        self.js = nc.jetstream()
        self.service = service
        self._tasks: list[asyncio.Task] = []
        self._stops: dict[asyncio.Task, asyncio.Event] = {}  # consume task -> its stop flag
        self._closing = False
        self.refused = refused if refused is not None else set()  # subjects the server refused us (lower case)
        # How long a durable publish retries while the broker is away: a service waits for it
        # however long it takes (its work is kept meanwhile); a command gives up after 30 s.
        self.publish_patience = math.inf

    # ------------------------------------------------------------ connection
    @classmethod
    async def connect(cls, url: str, service: str, *, timeout: float = 10.0, patience: float | None = None) -> "Bus":
        """Connect, then reconnect forever after any outage. ``patience``: give up on the first
        connection after that many seconds (commands a person waits on; services wait for
        their broker however long it takes to come up)."""
        refused: set[str] = set()
        untrusted: list[ssl.SSLCertVerificationError] = []

        async def on_error(e: Exception) -> None:
            if isinstance(e, ssl.SSLCertVerificationError):
                untrusted.append(e)
                e = NatsUnreachable(untrusted_hint(url, e))
            log.warning("nats: %s", e)
            if m := re.search(r'permissions violation for publish to "([^"]+)"', str(e), re.IGNORECASE):
                refused.add(m.group(1).lower())

        async def on_disconnect() -> None:
            log.info("nats: disconnected from %s", url)

        async def on_reconnect() -> None:
            log.info("nats: reconnected")

        connecting = nats.connect(
            servers=url.split(","), name=service, connect_timeout=min(timeout, patience or timeout),
            max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            **credentials(),
        )
        try:
            nc = await (asyncio.wait_for(connecting, patience) if patience else connecting)
        except asyncio.TimeoutError:
            if untrusted:
                raise NatsUnreachable(untrusted_hint(url, untrusted[-1])) from None
            raise NatsUnreachable(f"no NATS server answered at {url} within {patience:.0f}s "
                                  "(is it running? for a finished embedded run it is gone: pass --nats-url)") from None
        bus = cls(nc, service, refused)
        if patience is not None:
            bus.publish_patience = 30.0
        await bus._jetstream_ready(patience)
        await bus.ensure_stream(wait=patience is None)
        return bus

    async def _jetstream_ready(self, patience: float | None) -> None:
        """Wait until JetStream answers: a cluster's only once its nodes have elected a meta
        leader, seconds after they start, and the main stream's only once it has a leader (a
        node lost: a client connecting meanwhile waits out the election). A command gives up
        after ``patience``."""
        deadline = time.monotonic() + patience if patience else math.inf
        while True:
            try:
                await self.js.account_info()
                with contextlib.suppress(NotFoundError):  # not provisioned yet: ensure_stream's to say
                    await self.js.stream_info(subjects.STREAM)
                return
            except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.js.errors.ServiceUnavailableError) as e:
                if time.monotonic() > deadline:
                    raise BusError(f"JetStream did not answer within {patience:.0f}s ({e!r}): "
                                   "is it enabled, and has the cluster a quorum?") from None
                log.info("JetStream not ready yet (%r); waiting", e)
                await asyncio.sleep(0.5)

    async def ensure_stream(self, *, wait: bool = True) -> None:
        """The streams exist and the main one takes every kind: provisioned where this identity
        may, else waited for (``wait``; a command fails at once instead)."""
        if not await provision.streams_current(self.js):
            await self._provision_or_wait(wait, f"the streams {subjects.STREAM}/{subjects.AUDIT_STREAM} "
                                                "are missing or out of date")

    async def key_value(self, bucket: str):
        """The JetStream KV bucket ``bucket`` (one of ``subjects.BUCKETS``), provisioned if need be."""
        try:
            return await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await self._provision_or_wait(True, f"KV bucket {bucket} is missing")
            return await self.js.key_value(bucket)

    async def _provision_or_wait(self, wait: bool, what: str) -> None:
        try:
            await provision.provision_or_wait(self.nc, wait, what)
        except provision.ProvisionError as e:
            raise BusError(str(e)) from None

    async def audit_trail(self, run_id: str, timeout: float = 2.0) -> list[Event]:
        """Every audited event of ``run_id``, oldest first (controls, answers, mixture requests).

        Sorted by the events' own time: the audit stream copies each kind through its own
        source, so its order across kinds is not the order things happened.
        """
        out = await self._stored(subjects.AUDIT_STREAM, subjects.subject(run_id, ">"), timeout)
        return sorted(out, key=lambda e: e.time)

    async def stored(self, run_id: str) -> int:
        """How many events of ``run_id`` the stream holds (0: a run id nobody ever used here)."""
        info = await self.js.stream_info(subjects.STREAM, subjects_filter=subjects.subject(run_id, ">"))
        return sum((info.state.subjects or {}).values())

    async def history(self, cls: type[E], run_id: str, timeout: float = 2.0) -> list[E]:
        """Every stored ``cls`` event of ``run_id``, in the order stored (complete, unlike
        ``follow``, which hands over history and live events alike)."""
        return await self._stored(subjects.STREAM, subjects.subject(run_id, cls.KIND), timeout)

    async def _stored(self, stream: str, subj: str, timeout: float) -> list:
        """The valid events stored on ``subj`` in ``stream``: as many as the stream counts."""
        out: list[Event] = []
        info = await self.js.stream_info(stream, subjects_filter=subj)
        stored = sum((info.state.subjects or {}).values())
        if not stored:
            return out
        sub = await self.js.subscribe(subj, stream=stream, ordered_consumer=True)
        try:
            for _ in range(stored):
                msg = await sub.next_msg(timeout=timeout)
                cls = BY_KIND.get(subjects.kind_of(msg.subject))
                if cls is not None:
                    with contextlib.suppress(ValidationError):
                        out.append(cls.model_validate_json(msg.data))
        finally:
            await sub.unsubscribe()
        return out

    async def __aenter__(self) -> "Bus":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(self.stop_consuming(t) for t in list(self._tasks)))
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()

    # ------------------------------------------------------------ publish
    def _outgoing(self, event: E) -> tuple[E, str]:
        """``event`` stamped with this service as its source (unless it names one), checked
        against the topology, and its subject."""
        if not event.source:
            event = event.model_copy(update={"source": self.service})
        topology.check(self.service, "publish", event.KIND)
        return event, subjects.subject(event.run_id, event.KIND)

    async def publish(self, event: Event, *, retry_seconds: float | None = None) -> None:
        """Publish ``event``; durable kinds are retried until JetStream stores them, for up to
        ``retry_seconds`` (default ``publish_patience``; ``math.inf``: until the broker is back,
        unless the bus is closing)."""
        retry_seconds = self.publish_patience if retry_seconds is None else retry_seconds
        event, subj = self._outgoing(event)
        data = event.to_bytes()
        if not event.DURABLE:
            await self.nc.publish(subj, data)
        else:
            deadline = time.monotonic() + retry_seconds
            delay = 0.1
            while True:
                try:
                    await self.js.publish(subj, data, headers={"Nats-Msg-Id": event.event_id}, timeout=5)
                    break
                except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
                        nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError) as e:
                    if subj.lower() in self.refused:
                        raise PermissionRefused(f"the NATS server does not let identity "
                                                f"{self.nc.options.get('user') or '(none)'} publish {subj}") from e
                    if time.monotonic() > deadline or self._closing:
                        raise BusError(f"could not publish {subj}: {e!r}") from e
                    log.warning("publish %s failed (%r); retrying", subj, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        exporter.count_event(event.run_id, event.KIND, "out")
        metrics.observe(event)

    async def publish_batch(self, events: list[Event], *, retry_seconds: float | None = None) -> list[Exception | None]:
        """Publish ``events`` in order, pipelined: all are sent, then their acks awaited together
        (one round trip, one wake-up of each side for the batch, instead of one each). One not
        acknowledged is published again on its own, in order, as ``publish`` does. Returns
        each event's error (None: stored)."""
        pending: list[tuple[Event, asyncio.Future | None]] = []
        for event in events:
            event, subj = self._outgoing(event)
            try:
                if event.DURABLE:
                    ack = await self.js.publish_async(subj, event.to_bytes(), wait_stall=5,
                                                      headers={"Nats-Msg-Id": event.event_id})
                else:
                    await self.nc.publish(subj, event.to_bytes())
                    ack = None
            except Exception:  # noqa: BLE001 - sent again on its own below
                ack = asyncio.get_running_loop().create_future()
                ack.set_exception(BusError("not sent"))
            pending.append((event, ack))
        acks = [a for _, a in pending if a is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), 5)
        errors: list[Exception | None] = []
        for event, ack in pending:
            if ack is None or (ack.done() and not ack.cancelled() and ack.exception() is None):
                exporter.count_event(event.run_id, event.KIND, "out")
                metrics.observe(event)
                errors.append(None)
                continue
            try:
                await self.publish(event, retry_seconds=retry_seconds)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - the caller decides
                errors.append(e)
        return errors

    async def dead_letter(self, subj: str, reason: str, payload: bytes) -> None:
        run_id = subjects.run_of(subj)
        kind = subjects.kind_of(subj)
        exporter.BUS_DEAD_LETTERS.labels(run_id, kind, reason.split(":")[0][:40]).inc()
        log.error("dead letter on %s: %s", subj, reason)
        if run_id == "unknown" or kind == DeadLetter.KIND:
            return  # nowhere sensible to put it (or it is a dead letter already): logged and counted
        text = payload[:MAX_DLQ_PAYLOAD].decode("utf-8", errors="replace")
        await self.publish(DeadLetter(run_id=run_id, subject=subj, reason=reason, payload=text, service=self.service))

    async def pending(self, cls: type[Event], run_id: str, group: str | None = None) -> int:
        """Messages of ``cls`` not yet acked by the durable consumer ``group`` shares (its lag)."""
        durable = subjects.durable_name(group or self.service, run_id, cls.KIND)
        info = await self.js.consumer_info(subjects.STREAM, durable)
        return info.num_pending + info.num_ack_pending

    # ------------------------------------------------------------ consume (durable)
    async def consume(
        self, cls: type[E], run_id: str, handler: Handler, *, group: str | None = None,
        max_deliver: int = 5, ack_wait: float = 30.0, deliver_new: bool = False, concurrency: int = 1,
    ) -> asyncio.Task:
        """Start a task that feeds every ``cls`` event of ``run_id`` to ``handler``, once per group.

        ``group`` (default: the service name) names the durable consumer; processes with the
        same group share the messages, processes with different groups each get all of them.
        ``concurrency`` > 1 hands up to that many messages to ``handler`` at once (in order of
        arrival), for handlers that wait on something else, like a step boundary.
        """
        topology.check(self.service, "consume", cls.KIND)
        subj = subjects.subject(run_id, cls.KIND)
        durable = subjects.durable_name(group or self.service, run_id, cls.KIND)
        config = ConsumerConfig(
            ack_wait=ack_wait, max_deliver=max_deliver + 1, filter_subject=subj, max_ack_pending=max(concurrency, 1000),
            deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
        )
        psub = await self.js.pull_subscribe(subj, durable=durable, stream=subjects.STREAM, config=config)
        stop = asyncio.Event()  # set by stop_consuming: checked after every fetch, since a cancel can be lost

        async def loop() -> None:
            nonlocal psub
            checked, seen = time.monotonic(), 0  # seen: the newest stream sequence handed to the handler
            try:
                while not self._closing and not stop.is_set():
                    try:
                        msgs = await psub.fetch(concurrency, timeout=1.0)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        if time.monotonic() - checked > CONSUMER_CHECK_S:  # idle: is the consumer still there?
                            psub, checked = await self._ensure_consumer(psub, subj, durable, config, seen), time.monotonic()
                        continue
                    except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                        raise
                    except Exception as e:  # broker restart, reconnecting, the consumer deleted: look, wait, go on
                        log.warning("fetch %s: %r", subj, e)
                        await asyncio.sleep(0.5)
                        psub, checked = await self._ensure_consumer(psub, subj, durable, config, seen), time.monotonic()
                        continue
                    if stop.is_set():  # fetched after the stop: back to the server for whoever consumes next
                        await asyncio.gather(*(m.nak() for m in msgs), return_exceptions=True)
                        return
                    seen = max([seen, *(m.metadata.sequence.stream for m in msgs if m.metadata)])
                    handled = await asyncio.gather(*(self._handle(m, cls, handler, max_deliver, ack_wait) for m in msgs),
                                                   return_exceptions=True)
                    for outcome in handled:  # one message's trouble never ends the consumer
                        if isinstance(outcome, Exception):
                            log.error("a %s message was left unsettled (%r): it comes back after %.0f s",
                                      subj, outcome, ack_wait)
            finally:
                if not self._closing:  # one consumer stopped (a pool worker done with a run), the bus goes on
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()

        task = asyncio.create_task(loop(), name=f"consume:{durable}")
        self._tasks.append(task)
        self._stops[task] = stop
        return task

    async def _ensure_consumer(self, psub, subj: str, durable: str, config: ConsumerConfig, seen: int):
        """``psub``, or a new pull subscription when its durable consumer is gone from the server
        (deleted by an administrator, lost with the broker's store): created again, so the
        service goes on receiving instead of waiting on a consumer that no longer exists. It
        starts after ``seen``, the newest message this process was handed: what was handled
        before is not handed over again (a control rejected once must not be applied later)."""
        try:
            await self.js.consumer_info(subjects.STREAM, durable)
            return psub
        except NotFoundError:
            log.warning("consumer %s is gone from the server: creating it again", durable)
        except Exception:  # the broker is away: nothing to decide now
            return psub
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        if seen:
            config = dataclasses.replace(config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seen + 1)
        try:
            return await self.js.pull_subscribe(subj, durable=durable, stream=subjects.STREAM, config=config)
        except Exception as e:
            log.warning("could not create consumer %s again yet: %r", durable, e)
            return psub

    async def _settle_bad(self, msg: Msg, reason: str, term: bool = False) -> None:
        """Dead-letter ``msg``, then ack (or term) it. If the dead letter cannot be stored (the
        broker is away), the message stays unacknowledged: it comes back after its ack wait
        and is tried again, rather than being lost or ending the consumer."""
        try:
            await self.dead_letter(msg.subject, reason, msg.data)
        except Exception as e:
            log.error("could not dead-letter %s (%r): left unacknowledged, it comes back", msg.subject, e)
            return
        await (msg.term() if term else msg.ack())

    def health(self) -> tuple[bool, dict]:
        """Whether this connection serves: connected to a server, and no consumer has ended on its
        own (one stopped on purpose is forgotten). With what was seen, for /healthz."""
        consumers = {t.get_name().removeprefix("consume:"): "ended" if t.done() else "consuming" for t in self._tasks}
        connected = self.nc.is_connected
        return connected and "ended" not in consumers.values(), {
            "service": self.service, "bus": "connected" if connected else "reconnecting" if self.nc.is_reconnecting
            else "closed" if self.nc.is_closed else "disconnected", "consumers": consumers}

    async def stop_consuming(self, task: asyncio.Task) -> None:
        """End one ``consume`` whatever arrives meanwhile (the durable consumer stays on the
        server, for whoever serves it next).

        One ``cancel`` is not enough: on Python 3.11 ``asyncio.wait_for`` inside nats-py's fetch
        can return a message that arrived at the moment of the cancellation and swallow the
        cancellation (CPython gh-86296), and the loop would then hand that message to a handler
        nobody will ever answer. So the loop checks a stop flag after every fetch (what it fetched
        goes back to the server), and the task is cancelled again until it has ended; a handler
        it interrupts naks its message."""
        stop = self._stops.pop(task, None)
        if stop is not None:
            stop.set()
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_RETRY_S)
        if not task.cancelled() and task.exception() is not None:
            log.warning("consumer %s had ended with %r", task.get_name(), task.exception())
        if task in self._tasks:
            self._tasks.remove(task)

    async def _handle(self, msg: Msg, cls: type[E], handler: Handler, max_deliver: int, ack_wait: float) -> None:
        try:
            event = cls.model_validate_json(msg.data)
            if subjects.run_of(msg.subject) != event.run_id:
                raise ValueError(f"run_id {event.run_id!r} does not match subject {msg.subject}")
        except (ValidationError, ValueError) as e:
            reason = f"invalid {cls.__name__}: {explain(e) if isinstance(e, ValidationError) else e}"
            await self._settle_bad(msg, reason)
            return
        exporter.count_event(event.run_id, cls.KIND, "in")
        heartbeat = asyncio.create_task(self._keep_alive(msg, ack_wait))
        started = time.perf_counter()
        try:
            await handler(event)
        except asyncio.CancelledError:
            heartbeat.cancel()
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Reject as e:
            heartbeat.cancel()
            await self._settle_bad(msg, f"rejected: {e}")
            return
        except Exception as e:
            heartbeat.cancel()
            delivered = msg.metadata.num_delivered if msg.metadata else 1
            log.exception("handler for %s failed (delivery %d/%d)", msg.subject, delivered, max_deliver)
            if delivered >= max_deliver:
                await self._settle_bad(msg, f"handler failed {delivered} times: {e!r}", term=True)
            else:
                await msg.nak(delay=min(2.0**delivered, 30.0))
            return
        heartbeat.cancel()
        exporter.BUS_HANDLER_SECONDS.labels(cls.KIND).observe(time.perf_counter() - started)
        await msg.ack()

    @staticmethod
    async def _keep_alive(msg: Msg, ack_wait: float) -> None:
        """Tell JetStream a long handler is still working, so the message is not redelivered."""
        with contextlib.suppress(asyncio.CancelledError, Exception):
            while True:
                await asyncio.sleep(max(ack_wait / 3, 0.5))
                await msg.in_progress()

    async def latest(self, cls: type[E], run_id: str) -> E | None:
        """The newest stored ``cls`` event of ``run_id`` (e.g. the current data set), or None."""
        try:
            msg = await self.js.get_last_msg(subjects.STREAM, subjects.subject(run_id, cls.KIND))
        except NotFoundError:
            return None
        try:
            return cls.model_validate_json(msg.data)
        except ValidationError as e:
            await self.dead_letter(msg.subject, f"invalid {cls.__name__}: {explain(e)}", msg.data or b"")
            return None

    async def follow(self, cls: type[E], run_id: str, handler: Handler):
        """Every stored ``cls`` event of ``run_id``, then the new ones, for this process alone.

        An ephemeral ordered consumer: nothing is shared or acked, so a restarted process
        sees the whole history again (e.g. every data set announced for a run).
        """
        return await self.js.subscribe(subjects.subject(run_id, cls.KIND), stream=subjects.STREAM,
                                       ordered_consumer=True, cb=_live_callback(cls, handler))

    # ------------------------------------------------------------ subscribe (live)
    async def subscribe(self, cls: type[E], run_id: str, handler: Handler):
        """Live core subscription (watchers, CLI). Invalid events are counted and skipped."""
        return await self.nc.subscribe(subjects.subject(run_id, cls.KIND), cb=_live_callback(cls, handler))

    # ------------------------------------------------------------ request / reply
    async def request(self, event: Event, reply_cls: type[E], *, timeout: float = 30.0) -> E:
        event, subj = self._outgoing(event)
        try:
            msg = await self.nc.request(subj, event.to_bytes(), timeout=timeout)
        except nats.errors.NoRespondersError as e:
            raise NoAnswer(f"no service answers {subj}") from e
        except nats.errors.TimeoutError as e:
            raise NoAnswer(f"no answer on {subj} within {timeout}s") from e
        body = json.loads(msg.data or b"{}")
        if isinstance(body, dict) and set(body) == {"error"}:
            raise BusError(f"{subj}: {body['error']}")
        return reply_cls.model_validate(body)

    async def serve(self, cls: type[E], run_id: str, handler: Callable[[E], Awaitable[Event]], *, queue: str) -> None:
        """Answer requests for ``cls`` as a member of queue group ``queue``; bad requests get an error reply."""
        topology.check(self.service, "consume", cls.KIND)

        async def cb(msg: Msg) -> None:
            try:
                event = cls.model_validate_json(msg.data)
            except ValidationError as e:
                reason = f"invalid {cls.__name__}: {explain(e)}"
                await self.dead_letter(msg.subject, reason, msg.data)
                if msg.reply:
                    await msg.respond(json.dumps({"error": reason}).encode())
                return
            exporter.count_event(event.run_id, cls.KIND, "in")
            try:
                reply = await handler(event)
                if not reply.source:
                    reply = reply.model_copy(update={"source": self.service})
                data = reply.to_bytes()
            except Exception as e:
                log.exception("request handler for %s failed", msg.subject)
                data = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
            if msg.reply:
                await msg.respond(data)

        await self.nc.subscribe(subjects.subject(run_id, cls.KIND), queue=queue, cb=cb)


def _live_callback(cls: type[E], handler: Handler) -> Callable[[Msg], Awaitable[None]]:
    """A NATS callback for subscribers that do not ack: invalid events are counted and skipped,
    a failing handler is logged; neither ends the subscription."""

    async def cb(msg: Msg) -> None:
        try:
            event = cls.model_validate_json(msg.data)
        except ValidationError as e:
            exporter.BUS_DEAD_LETTERS.labels(subjects.run_of(msg.subject), cls.KIND, "invalid").inc()
            log.warning("ignoring invalid %s on %s: %s", cls.__name__, msg.subject, explain(e))
            return
        try:
            await handler(event)
        except Exception:
            log.exception("subscriber for %s failed", msg.subject)

    return cb
