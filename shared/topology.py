"""Who publishes and who consumes each event, declared once.

Everything else follows from this table: the permission lists of the deployment's
``nats.conf`` (``python -m tuneloop.topology --write`` regenerates its ``authorization``
block), AsyncAPI's send and receive operations (``proto/asyncapi.yaml``) and the events table
of docs/events-and-controls.md. Tests fail when any of them drifts, and a service's bus refuses to publish or
consume a kind this table does not give it (``check``), in every test and embedded run, not
only in a secured deployment.

Identities are those of ``nats.conf``: one per service, ``operator`` for people and their
tools (``tuneloop ctl``, ``approve``, a sweep), ``admin`` to provision, ``viewer`` to read.
Reading (watching, following history, the audit trail) is open to every identity; what
this table governs is who may *say* something and who *acts* on it (a durable consumer).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from . import subjects
from .generated import replace_block

@dataclass(frozen=True)
class Service:
    """A service of the roster. What else lists the services reads ``ROSTER``: process start
    order, a sweep's pools, image targets, Prometheus' scrape config; tests hold compose.yaml,
    k8s/, the Dockerfile and pyproject.toml to it (tests/unit/test_deploy.py)."""

    name: str
    torch: bool = False  # its image carries torch (the ml stage); else a slim one
    first: bool = False  # on the path to the first training step: started first, the rest once training runs
    pool: str = "one"  # replicas in a sweep's pools: one, or the sweep setting that sizes it


ROSTER = (
    Service("trainer", torch=True, first=True, pool="concurrency"),
    Service("data-pipeline", first=True),
    Service("evaluator", torch=True, pool="evaluators"),
    Service("rl-reward", first=True),  # GRPO asks it for rewards at its first step; it imports no torch
    Service("checkpoint", torch=True),
)
SERVICES = tuple(s.name for s in ROSTER)
IDENTITIES = ("admin", "operator", *SERVICES, "viewer")


@dataclass(frozen=True)
class Route:
    kind: str
    publishers: tuple[str, ...]
    consumers: tuple[str, ...] = ()  # identities acting on it through a durable consumer (or serving requests)
    readers: str = ""  # who else reads it, in words (watchers, the operator's commands)
    payload: str = ""  # what it carries, for the docs' events table
    reply: str = ""  # request/reply: the kind the consumers answer with (to whoever asked); not stored


ROUTES: tuple[Route, ...] = (
    Route("data.ready", ("data-pipeline",), readers="the trainer and the evaluators (from the run's history)",
          payload="splits (path, rows, per category), fingerprint, mixture, rejected rows, the mixture request it answers"),
    Route("data.mixture", ("operator",), ("data-pipeline",), readers="the audit trail",
          payload="source weights, reason"),
    Route("data.switch", ("data-pipeline",), ("trainer",), readers="the audit trail",
          payload="adaptive data's request that the trainer go on with a data set it announced: "
                  "applied as `set-data` and nothing else (the only thing data-pipeline may ask of the trainer)"),
    Route("run.queued", ("operator",), ("trainer", "data-pipeline"),
          payload="attempt: a run for a pool worker to take (its config is in its run directory)"),
    Route("run.forked", ("operator",), readers="the audit trail of the parent and of the child, watchers",
          payload="parent, child, the step of the parent's checkpoint, the settings changed, weights only or the "
                  "full state (`tuneloop fork`)"),
    Route("train.step", ("trainer",), readers="watchers",
          payload="step, method, loss, lr, grad norm, tokens/s, GRPO reward, paused"),
    Route("ckpt.saved", ("trainer",), ("checkpoint",),
          payload="step, path, base model, adapter?, final?, snapshot? (weights only, `eval.every`), evaluate?"),
    Route("ckpt.recorded", ("checkpoint",), readers="watchers, the trainer (what it may resume from)",
          payload="step, path, sha256, bytes"),
    Route("ckpt.released", ("checkpoint",), readers="watchers",
          payload="a pruned run's checkpoints deleted from storage (the catalogue keeps their record)"),
    Route("eval.request", ("checkpoint", "trainer"), ("evaluator",),
          payload="checkpoint, base model, split (val, test, suite:NAME), purpose (periodic/final/manual/baseline: "
                  "the trainer asks for the baseline, the starting model on test)"),
    Route("eval.shard", ("evaluator",), ("evaluator",),
          payload="the request, shard index/count, case range of the split file (a work queue of the evaluators)"),
    Route("eval.verdict", ("evaluator",), ("rl-reward", "checkpoint"), readers="watchers",
          payload="scores, per-category scores, failures, tokens per answer, shards, workers"),
    Route("feedback", ("rl-reward",), ("trainer", "data-pipeline"),
          payload="continue/stop, reason, best step, weak categories"),
    Route("control", ("operator",), ("trainer",), readers="the audit trail",
          payload="command, value, guard and within, policy (a sweep's pruner)"),
    Route("control.applied", ("trainer",), ("checkpoint",), readers="the operator's command, the audit trail",
          payload="control id, step, old/new value; guard and savepoint step"),
    Route("control.rejected", ("trainer",), readers="the operator's command, the audit trail",
          payload="control id, reason"),
    Route("control.rolled_back", ("trainer",), ("checkpoint", "rl-reward"), readers="watchers, the audit trail",
          payload="a guarded control undone: savepoint step, steps discarded, the verdict and metrics that broke "
                  "the guard, controls reverted"),
    Route("control.confirmed", ("trainer",), readers="watchers, the audit trail",
          payload="a guarded control kept: the verdict steps that met its guard"),
    Route("proposal", ("trainer",), readers="the operator (`watch`, `approve`), the audit trail",
          payload="a policy's action held for approval: command, value, reason, proposer, verdict step, timeout and "
                  "what it then does"),
    Route("proposal.decision", ("operator",), ("trainer",), readers="the audit trail",
          payload="approve / reject a proposal, reason"),
    Route("proposal.resolved", ("trainer",), readers="watchers, the audit trail",
          payload="approved / rejected / timed-out, applied?, step, by whom"),
    Route("train.done", ("trainer",), ("checkpoint",), readers="watchers",
          payload="step, reason (completed/control/feedback/pruned/interrupted: SIGTERM, resumes when started "
                  "again/error), final loss, final checkpoint, processes"),
    Route("export.request", ("operator",), ("checkpoint",),
          payload="merge a finished run's exported adapter (a sweep, for its best trial); answered with "
                  "`export.done`, or a dead letter saying why not"),
    Route("export.done", ("checkpoint",), readers="watchers",
          payload="exported step, score, adapter and merged paths; `requested_by` when it answers an `export.request`"),
    Route("reward.score", ("trainer",), ("rl-reward",), reply="reward.reply",
          payload="completions, references, categories, weights; answered with rewards and per-item errors "
                  "(`reward.reply`, to whoever asked)"),
    Route("dlq", ("operator", *SERVICES), readers="operators",
          payload="subject, reason, raw payload, service"),
)
BY_KIND = {r.kind: r for r in ROUTES}
# Who may write each KV bucket (everyone may read them).
KV_WRITERS = {subjects.CHECKPOINT_BUCKET: ("checkpoint",), subjects.SHARD_BUCKET: ("evaluator",),
              subjects.SWEEP_BUCKET: ("operator",), subjects.POLICY_BUCKET: ("rl-reward",)}


def publishes(identity: str) -> list[str]:
    return [r.kind for r in ROUTES if identity in r.publishers]


def consumes(identity: str) -> list[str]:
    return [r.kind for r in ROUTES if identity in r.consumers]


class TopologyError(RuntimeError):
    """A service published or consumed a kind the declaration does not give it."""


def check(service: str, action: str, kind: str) -> None:
    """Raise unless ``service`` (one of ``SERVICES``; other names are people's tools and tests,
    which the server's identities govern) may ``action`` ('publish' or 'consume') ``kind``."""
    if service not in SERVICES:
        return
    allowed = publishes(service) if action == "publish" else consumes(service)
    if kind not in allowed:
        raise TopologyError(f"{service} may not {action} {kind!r}: shared/topology.py gives it {sorted(allowed)} "
                            "(declare it there, then `python -m tuneloop.topology --write`)")


# ------------------------------------------------------------------ nats.conf
# What every identity may ask of JetStream: look up and read (INFO, STREAM.INFO, MSG.GET,
# DIRECT.GET), the ephemeral ordered consumers that reading history needs (CONSUMER.CREATE.<stream>,
# INFO, their flow control). A durable consumer adds pulling and acking on the main stream, and
# creating it only on the subjects it consumes.
READ_API = ["$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.MSG.GET.*", "$JS.API.DIRECT.GET.>",
            "$JS.API.CONSUMER.CREATE.*", "$JS.API.CONSUMER.INFO.*.*", "$JS.FC.>"]
CONSUME_API = ["$JS.API.CONSUMER.MSG.NEXT.TUNELOOP.*", "$JS.ACK.TUNELOOP.>"]
BEGIN, END = "# topology:begin", "# topology:end"


def _allow(identity: str) -> list[str]:
    subjects = [f"tuneloop.*.{kind}" for kind in publishes(identity)]
    kv = [f"$KV.{bucket}.>" for bucket, writers in KV_WRITERS.items() if identity in writers]
    durable = [f"$JS.API.CONSUMER.CREATE.TUNELOOP.*.tuneloop.*.{kind}" for kind in consumes(identity)
               if not BY_KIND[kind].reply]
    return READ_API + (CONSUME_API if durable else []) + subjects + kv + durable


def _list(items: list[str], indent: str) -> str:
    """A nats.conf list, wrapped at about 110 columns."""
    lines, line = [], ""
    for item in (f'"{i}"' for i in items):
        if line and len(indent) + len(line) + len(item) + 2 > 110:
            lines.append(line + ",")
            line = ""
        line = f"{line}, {item}" if line else item
    return f"\n{indent}".join([*lines, line])


def users_block() -> str:
    """The ``authorization`` block of nats.conf, from the declaration."""
    out = ["authorization {", "  users: ["]
    pad = " " * 24
    for identity in IDENTITIES:
        password = f"$TUNELOOP_{identity.upper().replace('-', '_')}_PASSWORD"
        if identity == "admin":
            publish = 'publish: {allow: ["$JS.API.>"], deny: $NO_DELETE}'
        else:
            publish = f"publish: {{allow: [{_list(_allow(identity), pad)}]}}"
        reads = "" if identity == "admin" else '"tuneloop.>", '  # admin provisions; it reads no events
        subscribe = f'subscribe: [{reads}"_INBOX.{identity}.>"]'
        responses = ", allow_responses: true" if any(identity in r.consumers for r in ROUTES if r.reply) else ""
        out.append(f"    {{user: {identity}, password: {password}, permissions: {{\n"
                   f"      {publish},\n      {subscribe}{responses}}}}}")
    out += ["  ]", "}"]
    return "\n".join(out)


def render_conf(text: str) -> str:
    """``text`` (a nats.conf) with its generated block replaced from the declaration."""
    return replace_block(text, BEGIN, END, users_block(), "nats.conf",
                         note="  (generated from shared/topology.py: python -m tuneloop.topology --write)")


# ------------------------------------------------------------------ the events table
def events_table() -> str:
    rows = ["| kind | from | acted on by | also read by | payload |", "| --- | --- | --- | --- | --- |"]
    for r in ROUTES:
        to = ", ".join(r.consumers) + (" (request/reply)" if r.reply else "")
        rows.append(f"| `{r.kind}` | {', '.join(r.publishers)} | {to or '-'} | {r.readers or '-'} | {r.payload} |")
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- events:begin -->", "<!-- events:end -->"


def render_readme(text: str) -> str:
    return replace_block(text, README_BEGIN, README_END, events_table(), str(README))


# ------------------------------------------------------------------ files
REPO = Path(__file__).resolve().parents[1]
CONF = Path("k8s/base/nats/nats.conf")
README = Path("docs/events-and-controls.md")  # the events table


def drifted(root: Path = REPO) -> list[str]:
    """The generated files that differ from the declaration."""
    return [str(p) for p, render in ((CONF, render_conf), (README, render_readme))
            if (root / p).read_text() != render((root / p).read_text())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuneloop.topology", description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite nats.conf's permissions and the docs' events table")
    ap.add_argument("--root", type=Path, default=REPO)
    args = ap.parse_args(argv)
    if args.write:
        for p, render in ((CONF, render_conf), (README, render_readme)):
            (args.root / p).write_text(render((args.root / p).read_text()))
            print(f"wrote {p}")
        return 0
    stale = drifted(args.root)
    for p in stale:
        print(f"{p} differs from shared/topology.py: python -m tuneloop.topology --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
