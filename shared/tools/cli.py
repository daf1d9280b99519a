"""The ``tuneloop`` command: run a job, steer it, regenerate the contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from .. import controls
from ..config import ConfigError

app = typer.Typer(no_args_is_help=True, help="Fine-tuning as event-driven microservices over NATS.")
console = Console()
err_console = Console(stderr=True)


class Code(IntEnum):
    """Exit codes, one per kind of failure, so that a script can tell them apart (the table is in
    docs/events-and-controls.md). Typer's own usage errors are 2 as well."""

    FAILED = 1         # the work ran and failed: a run failed, a control was rejected, no test score
    USAGE = 2          # the command line or a config cannot be used as given
    UNREACHABLE = 3    # no NATS server answered
    REFUSED = 4        # refused: by the server's permissions, or as unsafe (would overwrite, damaged, not sent)
    NOT_FOUND = 5      # no such run, checkpoint, proposal or recording
    TIMEOUT = 6        # nobody answered in time
    INTERRUPTED = 130  # Ctrl-C, SIGTERM, SIGHUP


def fail(message: str, code: Code) -> NoReturn:
    """Say what went wrong, on stderr, and exit with ``code``."""
    err_console.print(message, soft_wrap=True)
    raise typer.Exit(code)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        typer.echo(f"tuneloop {version('tuneloop')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Fine-tuning as event-driven microservices over NATS."""
NATS_URL = typer.Option(None, "--nats-url", envvar="NATS_URL", help="Use this NATS server instead of the run's own.")
STORAGE = typer.Option(Path("runs"), "--storage", envvar="TUNELOOP_STORAGE", help="Root of the run directories.")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    nats_url: Optional[str] = NATS_URL,
    run_id: Optional[str] = typer.Option(None, help="Run id (default: <run.name>-<timestamp>)."),
    evaluators: int = typer.Option(1, min=1, help="Evaluator processes."),
    processes: Optional[int] = typer.Option(None, min=1, help="Training processes (default: train.processes)."),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE, a change to the config (train.learning_rate=5e-4, "
                                                       "train.trl.neftune_noise_alpha=5); repeat it."),
) -> None:
    """Run a whole job on this machine: NATS, the five services, progress, summary."""
    from .fork import ForkRefused, parse_sets
    from .runner import RunFailed, run_job
    from .summary import print_summary

    try:
        changes = parse_sets(sets)
    except ForkRefused as e:
        fail(f"[red]config error:[/] {e}", Code.USAGE)
    try:
        summary = run_job(config, nats_url=nats_url, run_id=run_id, evaluators=evaluators, processes=processes,
                          console=console, sets=changes)
    except ConfigError as e:
        fail(f"[red]config error:[/] {e}", Code.USAGE)
    except RunFailed as e:
        fail(f"[red]run failed:[/] {e}", Code.FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(Code.INTERRUPTED)
    print_summary(summary, console)
    if summary.test is None:
        raise typer.Exit(Code.FAILED)


@app.command()
def fork(
    run_id: str = typer.Argument(..., help="Run to fork."),
    at: str = typer.Option("latest", "--at", help="Its checkpoint to start from: a step, latest, or best (the exported one)."),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE, a setting of the child (train.learning_rate=5e-4); repeat it."),
    weights_only: bool = typer.Option(False, "--weights-only", help="Start from the parent's weights only: a fresh "
                                                                      "optimizer, schedule and data order; any setting may change."),
    name: Optional[str] = typer.Option(None, "--name", help="The child's run id (default: <run>-fork<step>-<time>)."),
    queue: bool = typer.Option(False, "--queue", help="Queue the child for the trainer and data-pipeline pools (compose, "
                                                       "Kubernetes; needs --nats-url) instead of running it here."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
    evaluators: int = typer.Option(1, min=1, help="Evaluator processes (run here)."),
) -> None:
    """A new run from a checkpoint of RUN, some settings changed; RUN itself is left as it is."""
    from .fork import ForkNotFound, ForkRefused, ForkUsage, make, plan
    from .runner import RunFailed, announce_fork, run_fork
    from .summary import print_summary

    if queue and not nats_url:
        fail("[red]--queue needs --nats-url: the pools' bus[/]", Code.USAGE)
    try:
        f = plan(storage, run_id, at, sets, weights_only, name)
        make(f, storage)
    except ForkNotFound as e:
        fail(f"[red]cannot fork {run_id}:[/] {e}", Code.NOT_FOUND)
    except (ForkUsage, ConfigError) as e:
        fail(f"[red]cannot fork {run_id}:[/] {e}", Code.USAGE)
    except ForkRefused as e:
        fail(f"[red]cannot fork {run_id}:[/] {e}", Code.REFUSED)
    console.print(f"forked [cyan]{run_id}[/] at step {f.step} into [cyan]{f.child}[/] "
                  f"({'weights only' if weights_only else 'full state'}; changed: {f.changed or 'nothing'})")
    if queue:
        asyncio.run(announce_fork(f, storage, nats_url, queue=True))
        console.print(f"queued {f.child} for the pools")
        return
    try:
        summary = run_fork(f, storage, nats_url=nats_url, evaluators=evaluators, console=console)
    except RunFailed as e:
        fail(f"[red]run failed:[/] {e}", Code.FAILED)
    print_summary(summary, console)


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="Sweep file (YAML): base config, parameters, sampler, pruner, concurrency."),
    nats_url: Optional[str] = NATS_URL,
) -> None:
    """Search training configs: trials run as runs on one bus, sharing evaluators; the best is reported.

    Run it again after a crash or Ctrl-C: the sweep goes on where it was (its state is in
    JetStream KV); finished trials are not run again, running ones resume from a checkpoint.
    """
    from .summary import print_sweep
    from .sweep.driver import sweep as run_sweep

    try:
        summary = run_sweep(file, nats_url=nats_url, console=console)
    except ConfigError as e:
        fail(f"[red]sweep error:[/] {e}", Code.USAGE)
    except KeyboardInterrupt:
        fail("[yellow]interrupted: run the same command to continue the sweep[/]", Code.INTERRUPTED)
    print_sweep(summary, console)
    if summary.best is None:
        raise typer.Exit(Code.FAILED)


@app.command()
def init(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    run_id: str = typer.Option(..., help="Run id the services serve (TUNELOOP_RUN_ID)."),
    storage: Path = STORAGE,
) -> None:
    """Create a run directory for services started elsewhere (compose, Kubernetes). With
    ``--run-id '*'`` the services are pools: nothing to create, runs come queued (``queue``)."""
    from ..config import load_config
    from ..storage import init_run
    from ..subjects import ALL_RUNS, check_run_id

    if run_id == ALL_RUNS:
        console.print("the services serve every run (pools): queue runs with `tuneloop queue CONFIG --run-id ID` "
                      "or `tuneloop fork RUN --queue`")
        return
    try:
        check_run_id(run_id)
        rdir = init_run(load_config(config, functions=True), run_id, storage.resolve())
    except (ConfigError, ValueError) as e:
        fail(f"[red]{e}[/]", Code.USAGE)
    console.print(f"run {run_id}: {rdir}")


@app.command()
def queue(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    run_id: str = typer.Option(..., help="The run's id."),
    sets: list[str] = typer.Option([], "--set", help="KEY=VALUE, a change to the config (train.max_steps=200); repeat it."),
    nats_url: str = typer.Option(..., "--nats-url", envvar="NATS_URL", help="The pools' NATS server."),
    storage: Path = STORAGE,
) -> None:
    """Queue a run for the pools (services started with ``--run-id '*'``: compose with
    TUNELOOP_RUN_ID='*', Kubernetes' sweep overlay): its run directory is created, then a
    trainer worker takes it and data-pipeline prepares its data. ``watch`` and ``ctl`` as for any run."""
    from ..bus import CONNECT_PATIENCE_S, Bus
    from ..config import load_config
    from ..events import RunQueued, derived_id
    from ..storage import init_run
    from ..subjects import check_run_id
    from .fork import parse_sets

    try:
        check_run_id(run_id)
        rdir = init_run(load_config(config, functions=True).with_overrides(parse_sets(sets)), run_id, storage.resolve())
    except (ConfigError, ValueError) as e:
        fail(f"[red]{e}[/]", Code.USAGE)

    async def go() -> None:
        async with await Bus.connect(nats_url, "queue", patience=CONNECT_PATIENCE_S) as bus:
            await bus.publish(RunQueued(run_id=run_id, event_id=derived_id("queued", run_id, 0), reason=f"queued from {config}"))

    asyncio.run(go())
    console.print(f"queued run {run_id} ({rdir}) for the pools")


@app.command()
def provision(nats_url: str = typer.Option(..., "--nats-url", envvar="NATS_URL", help="The deployment's NATS server.")) -> None:
    """Create the streams and KV buckets of a deployment, as the admin identity (NATS_USER=admin):
    the init job of compose and Kubernetes. Services of other identities wait for them. On a
    cluster of 3 or more every one has 3 replicas (TUNELOOP_BUS_REPLICAS overrides)."""
    from .. import provision as provisioning
    from ..bus import CONNECT_PATIENCE_S, Bus, BusError

    async def go() -> tuple[int, dict[str, int]]:
        async with await Bus.connect(nats_url, "provision", patience=CONNECT_PATIENCE_S) as bus:
            return provisioning.cluster_size(bus.nc), await provisioning.provision(bus.nc)

    try:
        nodes, made = asyncio.run(go())
    except BusError as e:
        fail(f"[red]{e}[/]", Code.FAILED)
    where = f"a {nodes}-node cluster" if nodes > 1 else "one server"
    console.print(f"provisioned on {nats_url} ({where}): " + ", ".join(f"{name} R{r}" for name, r in made.items()),
                  soft_wrap=True)


@app.command()
def ctl(
    run_id: str = typer.Argument(..., help="Run to steer."),
    command: str = typer.Argument(..., help=controls.usage()),
    value: Optional[str] = typer.Argument(None),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
    timeout: float = typer.Option(120.0, help="Seconds to wait for the trainer's answer."),
    guard: Optional[str] = typer.Option(None, "--guard", help="Roll back unless the next verdicts meet this, "
                                        "e.g. 'accuracy>=0.9 and loss<3', any of the task's metrics (set-lr, set-grad-clip, set-data)."),
    within: Optional[int] = typer.Option(None, "--within", min=1, help="Verdicts the guard watches (default 1)."),
) -> None:
    """Send a control event and wait until the trainer applies or rejects it."""
    from .client import ControlRefused, send_control

    from pydantic import ValidationError

    from ..events import explain

    try:  # a guard that cannot parse is named here, before anything is sent
        controls.check_guard(command, guard, within)
    except controls.Rejected as e:
        fail(f"[red]not sent: {e}[/]", Code.USAGE)
    url = nats_url or _run_url(storage, run_id)
    try:
        answer = asyncio.run(send_control(url, run_id, command, controls.parse_value(command, value),
                                          timeout=timeout, live_only=True, guard=guard, within=within))
    except ValidationError as e:  # refused before anything is sent (e.g. an empty command)
        fail(f"[red]not a valid control: {explain(e)}[/]", Code.USAGE)
    except ControlRefused as e:
        fail(f"[red]not sent: {e}[/]", Code.REFUSED)
    except TimeoutError as e:
        fail(f"[red]{e}[/]", Code.TIMEOUT)
    _print_answer(answer)


def _print_answer(answer) -> None:
    from ..events import ControlApplied, Proposal

    if isinstance(answer, ControlApplied):
        console.print(f"[green]applied[/] {answer.command} at step {answer.step}: {answer.old!r} -> {answer.new!r}"
                      + (f"; guarded by {answer.guard!r} over the next {answer.within} verdict(s), savepoint at step "
                         f"{answer.savepoint_step}" if answer.guard else ""), soft_wrap=True)
    elif isinstance(answer, Proposal):
        console.print(f"[yellow]proposed[/] {answer.command} at step {answer.step} (proposal {answer.event_id}): "
                      f"waiting for `tuneloop approve {answer.run_id} {answer.event_id}`", soft_wrap=True)
    else:
        fail(f"[red]rejected[/] {answer.command} at step {answer.step}: {answer.reason}", Code.FAILED)


def _decision(approve: bool, doc: str):
    """`tuneloop approve` / `tuneloop reject`: the same arguments, the other answer."""
    verb = "approve" if approve else "reject"

    def command(
        run_id: str = typer.Argument(..., help=f"Run whose proposal to {verb}."),
        proposal_id: Optional[str] = typer.Argument(None, help="The proposal (leave out to list the open ones)."),
        reason: str = typer.Option("", "--reason", help="Why, for the audit trail."),
        nats_url: Optional[str] = NATS_URL,
        storage: Path = STORAGE,
        timeout: float = typer.Option(120.0, help="Seconds to wait for the trainer's answer."),
    ) -> None:
        _decide(run_id, proposal_id, approve, reason, nats_url, storage, timeout)

    command.__doc__ = doc
    return app.command(verb)(command)


_decision(True, "Approve what a policy proposed (feedback.approve); it takes effect at the next step boundary.")
_decision(False, "Reject what a policy proposed: training goes on as it was.")


def _decide(run_id: str, proposal_id: Optional[str], approve: bool, reason: str, nats_url: Optional[str], storage: Path,
            timeout: float) -> None:
    from ..bus import CONNECT_PATIENCE_S, Bus
    from .client import decide_proposal, open_proposals

    url = nats_url or _run_url(storage, run_id)
    if proposal_id is None:
        async def listing():
            async with await Bus.connect(url, "ctl", patience=CONNECT_PATIENCE_S) as bus:
                return await open_proposals(bus, run_id)

        found = asyncio.run(listing())
        for p in found:
            console.print(f"{p.event_id}  {p.command} {p.value if p.value is not None else ''}  proposed by {p.proposer} "
                          f"at step {p.step}: {p.reason}  (on timeout after {p.timeout_s:g}s: {p.on_timeout})", soft_wrap=True)
        if not found:
            console.print(f"no open proposals for run {run_id}")
        return
    try:
        answer = asyncio.run(decide_proposal(url, run_id, proposal_id, approve, reason, timeout=timeout))
    except TimeoutError as e:  # (an identity other than the operator is refused by the server: exit 4, see main)
        fail(f"[red]{e}[/]", Code.TIMEOUT)
    if answer.outcome == "unknown":
        fail(f"[red]{answer.reason}[/]", Code.NOT_FOUND)
    console.print(f"{answer.outcome} {answer.command} at step {answer.step}: "
                  f"{'applied' if answer.applied else 'not applied'}" + (f" ({answer.reason})" if answer.reason else ""),
                  soft_wrap=True)


@app.command()
def data(
    run_id: str = typer.Argument(..., help="Run whose data to prepare again."),
    weight: list[str] = typer.Option(..., "--weight", "-w", help="SOURCE=WEIGHT (repeatable)."),
    apply: bool = typer.Option(False, "--apply", help="Then switch the trainer to it (set-data)."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
    timeout: float = typer.Option(120.0, help="Seconds to wait for each answer."),
) -> None:
    """Ask data-pipeline for a new mixture of the run's sources; with --apply, train on it from the next step."""
    from .client import MixtureRefused, request_mixture, send_control

    weights = {}
    for w in weight:
        name, _, num = w.partition("=")
        try:
            weights[name] = float(num)
        except ValueError:
            fail(f"[red]--weight {w!r}: expected SOURCE=NUMBER[/]", Code.USAGE)
    url = nats_url or _run_url(storage, run_id)
    try:
        ready = asyncio.run(request_mixture(url, run_id, weights, timeout=timeout))
    except TimeoutError as e:
        fail(f"[red]{e}[/]", Code.TIMEOUT)
    except MixtureRefused as e:
        fail(f"[red]{e}[/]", Code.REFUSED)
    rows = {k: v.rows for k, v in ready.splits.items()}
    console.print(f"data set [bold]{ready.dataset_id}[/]: mixture {ready.mixture}, rows {rows}")
    if apply:
        _print_answer(asyncio.run(send_control(url, run_id, "set-data", ready.dataset_id, timeout=timeout)))


@app.command()
def audit(
    run_id: str = typer.Argument(..., help="Run whose interventions to list."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
) -> None:
    """Every control, its answer and every mixture request of a run, from the audit stream."""
    from ..bus import CONNECT_PATIENCE_S, Bus

    async def read(url: str):
        async with await Bus.connect(url, "audit", patience=CONNECT_PATIENCE_S) as bus:
            return await bus.audit_trail(run_id)

    with _reading(storage, run_id, nats_url) as url:
        trail = asyncio.run(read(url))
    trail = sorted(trail + _written_after(storage, run_id, trail), key=lambda e: e.time)
    for e in trail:
        what = {k: v for k, v in e.model_dump(exclude={"run_id", "event_id", "time", "schema_version",
                                                        "discarded_saves"}).items()  # (ids for the checkpoint service)
                if v not in (None, "", {}, [])}
        console.print(f"{e.time:%Y-%m-%d %H:%M:%S} [bold]{e.KIND}[/] {what}", soft_wrap=True)


def _written_after(storage: Path, run_id: str, trail: list) -> list:
    """Audited events an embedded run's timeline holds that its stored stream does not: what
    happened to it after its server stopped (a fork of it, ``runner.tell_parent``)."""
    from ..subjects import AUDIT_KINDS
    from .report import TIMELINE_FILE, read_timeline

    timeline = storage / run_id / TIMELINE_FILE
    if not timeline.is_file():
        return []
    seen = {e.event_id for e in trail}
    return [e for e in read_timeline(timeline) if e.KIND in AUDIT_KINDS and e.event_id not in seen]


@app.command()
def export(
    run_id: str = typer.Argument(..., help="Run whose checkpoint to export."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the newest complete one)."),
    merged: bool = typer.Option(False, "--merged", help="Write a merged model instead of the LoRA adapter."),
    out: Optional[Path] = typer.Option(None, help="Target folder (default: <run>/export/<adapter|merged>-<step>)."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that holds other files too (they are kept; "
                                                       "none is ever overwritten)."),
    storage: Path = STORAGE,
) -> None:
    """Export a checkpoint of a run as a PEFT adapter or a merged model (safetensors). Needs no broker.

    Never deletes or overwrites a file tuneloop did not write: a target folder holding other
    files is refused unless --force; exporting again into a folder replaces the earlier export."""
    from .. import export as exporter
    from ..checkpoints import folder, is_complete, latest_complete, step_of, verify
    from ..model_card import card_text
    from ..models import base_ref, portable_name
    from ..storage import RunDir, load_run_config, read_run_info, resolve_model, run_dir

    rdir = run_dir(storage, run_id)
    ckpt = latest_complete(RunDir(rdir).checkpoints) if step is None else folder(RunDir(rdir).checkpoints, step)
    if ckpt is None or not is_complete(ckpt):
        fail(f"[red]no complete checkpoint {'' if step is None else f'for step {step} '}under {rdir / 'checkpoints'}[/]",
             Code.NOT_FOUND)
    problem = verify(ckpt)
    if problem:
        fail(f"[red]{problem}[/]; not exporting it", Code.REFUSED)
    cfg = load_run_config(storage, run_id)
    base = resolve_model(rdir, base_ref(cfg))
    adapter = cfg.train.lora.enabled
    kind = "merged" if merged or not adapter else "adapter"
    dest = (out or RunDir(rdir).export / f"{kind}-{step_of(ckpt)}").resolve()
    name = portable_name(cfg, base)
    card = card_text(cfg, run_id=run_id, step=step_of(ckpt), base_name=name, adapter=kind == "adapter",
                     verdicts=_recorded_verdicts(rdir, step_of(ckpt)), lineage=read_run_info(storage, run_id))
    try:
        if kind == "merged":
            path = exporter.export_merged(ckpt, base, adapter, dest, force=force, card=card)
        else:
            path = exporter.export_adapter(ckpt, base, dest, force=force, base_name=name, card=card)
    except exporter.DestinationInUse as e:
        fail(f"[red]{e}[/]", Code.REFUSED)
    console.print(f"exported {ckpt.name} as {kind}: {path}", soft_wrap=True)


def _recorded_verdicts(rdir: Path, step: int) -> list:
    """The checkpoint's own val verdict as the run's timeline recorded it (an embedded run's),
    for the model card of an export made without a broker."""
    from ..events import EvalVerdict
    from .report import TIMELINE_FILE, read_timeline

    timeline = rdir / TIMELINE_FILE
    if not timeline.is_file():
        return []
    return [e for e in read_timeline(timeline) if isinstance(e, EvalVerdict) and e.purpose == "periodic" and e.step == step]


@app.command()
def watch(
    run_id: str = typer.Argument(..., help="Run to watch."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
    follow: bool = typer.Option(False, "--follow", help="Keep watching after the run has finished."),
) -> None:
    """Live view of a run (attach from any terminal): progress, curves, verdicts, controls."""
    from .watch import watch as watch_run

    try:
        with _reading(storage, run_id, nats_url) as url:
            asyncio.run(watch_run(url, run_id, console, exit_when_done=not follow))
    except KeyboardInterrupt:
        raise typer.Exit(Code.INTERRUPTED)


@app.command()
def runs(storage: Path = STORAGE) -> None:
    """The runs under the storage folder: state, steps, how they ended, held-out scores."""
    from rich.table import Table

    from rich.table import Column

    from ..procfs import running
    from ..storage import RUN_FILE
    from .fork import fork_tree
    from ..task import shown_of
    from .summary import SUMMARY_FILE, scores_text, summary_row

    # The run id is what a user copies from here: never cut; the other columns fold instead.
    t = Table(Column("run", no_wrap=True, overflow="ignore", min_width=max(
        [len(p.parent.name) + 6 for p in Path(storage).glob(f"*/{RUN_FILE}")] or [3])),
        *(Column(h, overflow="fold") for h in ("state", "started", "steps", "stopped", "held-out test")))
    infos = {}
    for info_file in sorted(Path(storage).glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime):
        info = json.loads(info_file.read_text())
        infos[info["run_id"]] = (info_file, info)
    for depth, run in fork_tree(infos, lambda r: (infos[r][1].get("forked_from") or {}).get("run")):
        info_file, info = infos[run]
        state = info.get("state", "?")
        if state == "running" and not running(info.get("pid")):
            state = "gone"  # the runner died without saying so
        steps, stopped, test = summary_row(info_file.parent / SUMMARY_FILE)
        name = ("  " * (depth - 1) + "└ " if depth else "") + info["run_id"]  # a fork under its parent
        t.add_row(name, state, str(info.get("started", ""))[:19], steps, stopped,
                  scores_text(test.scores, shown_of(test.scores)) if test else "-")
    console.print(t)


@app.command()
def checkpoints(
    run_id: str = typer.Argument(..., help="Run whose checkpoints to list."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
) -> None:
    """A run's checkpoints: complete or not, size, sha256, and the evaluator's scores."""
    from rich.table import Table

    from ..checkpoints import PREFIX, all_checkpoints, is_complete, read_manifest, step_of
    from ..events import EvalVerdict
    from ..storage import RunDir, run_dir
    from ..task import shown_of

    rdir = run_dir(storage, run_id)
    folders = all_checkpoints(RunDir(rdir).checkpoints)
    # damaged ones the trainer moved aside
    aside = sorted(p.name for p in RunDir(rdir).checkpoints.glob(f"{PREFIX}*") if step_of(p) is None)
    if not folders:
        fail(f"[red]no checkpoints under {rdir / 'checkpoints'}[/]", Code.NOT_FOUND)
    scores = {e.step: e.scores for e in _events(run_id, storage, nats_url)
              if isinstance(e, EvalVerdict) and e.purpose == "periodic"}
    names = shown_of(next(reversed(scores.values()))) if scores else []
    t = Table("step", "complete", "MB", "sha256", *names)
    for step, f in folders.items():
        m = read_manifest(f)
        sc = scores.get(step, {})
        t.add_row(str(step), "yes" if is_complete(f) else "[red]no[/]",
                  f"{m['bytes'] / 1e6:.1f}" if m else "-", m.get("sha256", "-")[:12],
                  *(f"{sc[k]:.3f}" if k in sc else "-" for k in names))
    console.print(t)
    if aside:
        console.print(f"[yellow]moved aside as damaged:[/] {', '.join(aside)}")


@app.command()
def report(
    run_id: str = typer.Argument(..., help="Run to plot."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
    out: Optional[Path] = typer.Option(None, help="Folder for report.png and report.html (default: the run's)."),
) -> None:
    """Training curves (loss, lr, reward, validation scores, controls marked) as PNG and HTML."""
    from .report import write_report
    from ..storage import run_dir

    try:
        png, page = write_report(run_dir(storage, run_id), _events(run_id, storage, nats_url), out)
    except ValueError as e:
        fail(f"[red]{e}[/]", Code.FAILED)
    console.print(f"wrote {png} and {page}", soft_wrap=True)


@app.command("replay")
def replay_run(
    run_id: str = typer.Argument(..., help="A finished run (or sweep) to backtest."),
    feedback: str = typer.Option("", "--feedback", help="Policy settings to try: target=0.9,patience=2,min_step=100 "
                                                        "(the rest as the run had them)."),
    grid: str = typer.Option("", "--grid", help="Several settings at once: patience=1|2|4,target=0.9|0.95."),
    pruner: str = typer.Option("", "--pruner", help="A sweep: the pruner to try, percentile:25, median or none; "
                                                    "alternatives with | (the rest as the sweep had it)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="A sweep: prune no trial before this step."),
    startup_trials: Optional[int] = typer.Option(None, "--startup-trials", help="A sweep: prune nothing until this "
                                                                                  "many trials completed."),
    pbt: str = typer.Option("", "--pbt", help="A PBT sweep: the settings to try, quantile=0.5,interval=1|4 "
                                              "(alternatives with |; the rest as the sweep had them)."),
    nats_url: Optional[str] = NATS_URL,
    storage: Path = STORAGE,
) -> None:
    """Backtest the feedback policy: the run's recorded verdicts through the same policy code,
    with other settings: when it would have stopped, what it would have exported, the steps and
    time saved or lost. With no settings, the run's own: the live decisions, exactly. Given a
    sweep, its trials' verdicts through the same pruner code: which trials would have been
    pruned, and whether the winner would have survived; given a PBT sweep, its recorded checks
    through other exploit settings, up to the first copy they would have made otherwise."""
    from rich.table import Table

    if (storage / run_id / "sweep.json").is_file():
        return _replay_sweep(run_id, pruner, warmup_steps, startup_trials, pbt, storage, nats_url)
    if pruner or warmup_steps is not None or startup_trials is not None or pbt:
        fail(f"[red]{run_id} is a run, not a sweep: --pruner, --warmup-steps, --startup-trials and --pbt are "
             "for sweeps (a run's policy takes --feedback)[/]", Code.USAGE)
    from . import backtest
    from ..events import EvalVerdict, Feedback, StepMetrics, TrainingFinished
    from ..storage import load_run_config

    run_config = load_run_config(storage, run_id)
    recorded, metrics = run_config.feedback, run_config.task.names()
    try:
        tries = backtest.grid(grid, recorded, metrics) if grid else [backtest.parse_settings(feedback, recorded, metrics)]
    except ValueError as e:
        fail(f"[red]{e}[/]", Code.USAGE)
    events = _events(run_id, storage, nats_url, kinds=(StepMetrics, EvalVerdict, Feedback, TrainingFinished))
    if not backtest.verdicts_seen(events):
        fail(f"[red]run {run_id} has no recorded verdicts to replay[/]", Code.NOT_FOUND)
    results = [backtest.backtest(events, recorded, s) for s in tries]
    live = results[0].live
    t = Table(title=f"replay of {run_id}: {len(backtest.verdicts_seen(events))} verdicts, ended at step "
                    f"{results[0].end_step}; live: {backtest.stop_text(live)}, best {backtest.best_text(live)}")
    rows = [backtest.row(r) for r in results]
    for col in rows[0]:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row.values())
    console.print(t)
    if grid:  # the trade-off goes into the run's report page too
        from .report import BACKTEST_FILE
        from ..storage import run_dir

        path = run_dir(storage, run_id) / BACKTEST_FILE
        path.write_text(json.dumps({"grid": grid, "title": t.title, "rows": rows}, indent=1))
        console.print(f"wrote {path}: `tuneloop report {run_id}` shows it", soft_wrap=True)


def _replay_sweep(name: str, pruner: str, warmup_steps: Optional[int], startup_trials: Optional[int], pbt: str,
                  storage: Path, nats_url: Optional[str]) -> None:
    from rich.table import Table

    from ..events import CheckpointsReleased, Control, EvalVerdict, ExportDone, TrainingFinished
    from ..records import Records
    from .report import stored_events
    from ..subjects import SWEEP_BUCKET
    from .sweep import backtest
    from .sweep.pbt import PbtLog
    from .sweep.search import TrialRecord, best
    from .sweep.spec import SweepSpec

    summary = json.loads((storage / name / "summary.json").read_text()) if (storage / name / "summary.json").is_file() else {}
    if not summary.get("trials"):
        fail(f"[red]sweep {name} has no finished trials recorded ({storage / name / 'summary.json'})[/]", Code.NOT_FOUND)
    first = summary["trials"][0]["run_id"]

    async def fetch(url: str):
        from ..bus import CONNECT_PATIENCE_S, Bus

        async with await Bus.connect(url, "report", patience=CONNECT_PATIENCE_S) as bus:
            kv = await bus.key_value(SWEEP_BUCKET)
            spec = SweepSpec.model_validate(json.loads((await kv.get(f"{name}.spec")).value)["spec"])
            records = await Records(kv, TrialRecord).under(f"{name}.trial-")
            if spec.sampler == "pbt":
                return spec, records, await Records(kv, PbtLog).get(f"{name}.pbt") or PbtLog()
            kinds = (EvalVerdict, Control, TrainingFinished, ExportDone, CheckpointsReleased)
            return spec, records, {r.run_id: await stored_events(bus, r.run_id, kinds=kinds) for r in records}

    with _reading(storage, first, nats_url) as url:
        spec, records, events = asyncio.run(fetch(url))
    if spec.sampler == "pbt" or pbt:
        return _replay_pbt(name, spec, records, events, pbt, pruner or warmup_steps is not None or startup_trials is not None)
    try:
        tries = backtest.parse_pruners(pruner, spec.pruner, warmup_steps, startup_trials)
    except ValueError as e:
        fail(f"[red]{e}[/]", Code.USAGE)
    trials = backtest.traces(records, events, summary["metric"])  # the metric the driver resolved (spec's may be unset)
    live, winner = backtest.live_prunes(trials), best(records)
    t = Table(title=f"replay of sweep {name}: {len(records)} trials; live pruner {backtest.describe(spec.pruner)} "
                    f"pruned {', '.join(f'{n}@{s}' for n, s in sorted(live.items())) or 'none'}; winner "
                    f"{f'trial {winner.number} ({winner.value:.3f})' if winner else '-'}")
    for col in ("pruner", "would prune (trial@step)", "winner survives", "best", "steps trained", "steps saved",
                "same as live"):
        t.add_column(col, overflow="fold")
    for row in backtest.compare(spec, records, trials, tries):
        out, top = row.replay, row.replay.winner()
        survives = "-" if row.winner_survives is None else "yes" if row.winner_survives else \
            f"no (pruned at {out.fates[winner.number].pruned_at})"
        t.add_row(backtest.describe(row.pruner), ", ".join(f"{n}@{out.fates[n].pruned_at}" for n in out.pruned) or "none",
                  survives, "-" if top is None else f"trial {top} ({out.fates[top].value:.3f})",
                  f">= {row.steps}" if row.unknown else str(row.steps),
                  "-" if row.steps_saved is None else f"{row.steps_saved:+d}", "yes" if row.same_as_live else "no")
    console.print(t)


def _replay_pbt(name: str, spec, records: list, log, settings: str, pruning: bool) -> None:
    """A PBT sweep's checks, in the order the sweep made them, through other exploit settings."""
    from rich.table import Table

    from .sweep import pbt

    if spec.sampler != "pbt":
        fail(f"[red]sweep {name} searched with {spec.sampler}, not pbt: --pbt is for PBT sweeps (try --pruner)[/]", Code.USAGE)
    if pruning:
        fail(f"[red]sweep {name} is a PBT sweep: it prunes nothing (its members are copied over); try --pbt[/]", Code.USAGE)
    try:
        tries = pbt.parse_settings(settings, spec.pbt)
    except ValueError as e:
        fail(f"[red]{e}[/]", Code.USAGE)
    run = {r.number: r.run_id.rsplit("-", 1)[-1] for r in records}
    live = [c.exploit for c in log.checks if c.exploit is not None]
    t = Table(title=f"replay of PBT sweep {name}: {len(log.checks)} checks, {len(live)} copies live "
                    f"({pbt.describe(spec.pbt)}): {', '.join(pbt.copy_text(e, run) for e in live) or 'none'}")
    for col in ("settings", "copies (member<-donor@step)", "checks replayed", "same as live", "where it parts"):
        t.add_column(col, overflow="fold")
    for s in tries:
        out = pbt.replay(log, spec, s)
        t.add_row(pbt.describe(s), ", ".join(pbt.copy_text(e, run) for e in out.exploits) or "none",
                  f"{out.checks} of {len(log.checks)}", "yes" if out.same_as_live else "no", pbt.parting_text(out, run))
    console.print(t)


def _events(run_id: str, storage: Path, nats_url: Optional[str], kinds: tuple | None = None) -> list:
    """A run's recorded events: its timeline file (embedded runs), else a replay from NATS."""
    from .report import KINDS, TIMELINE_FILE, read_timeline, stored_events
    from ..storage import run_dir

    timeline = run_dir(storage, run_id) / TIMELINE_FILE
    if timeline.exists() and not nats_url:
        return read_timeline(timeline)

    async def fetch(url: str):
        from ..bus import CONNECT_PATIENCE_S, Bus

        async with await Bus.connect(url, "report", patience=CONNECT_PATIENCE_S) as bus:
            return await stored_events(bus, run_id, kinds=kinds or KINDS)

    with _reading(storage, run_id, nats_url) as url:
        return asyncio.run(fetch(url))


@app.command()
def proto(
    out: Path = typer.Option(Path("proto"), help="Folder to write."),
    check: bool = typer.Option(False, "--check", help="Only report whether the folder is up to date."),
) -> None:
    """Generate the JSON Schemas and the AsyncAPI document from the event models."""
    from . import proto as gen

    if check:
        stale = gen.diff(out)
        if stale:
            fail("[red]proto/ is out of date[/] (run `tuneloop proto`): " + ", ".join(stale), Code.FAILED)
        console.print("proto/ is up to date")
        return
    for f in gen.write(out):
        console.print(f"wrote {out / f}")


@contextlib.contextmanager
def _reading(storage: Path, run_id: str, nats_url: Optional[str]) -> Iterator[str]:
    """Where to read ``run_id``'s events: ``--nats-url``; the run's own server while it answers;
    else, for an embedded run whose server is gone (finished, killed), a private server on a
    copy of the stream it stored."""
    from .embedded import answers, stored_stream
    from ..storage import read_run_info

    if nats_url:
        yield nats_url
        return
    url = _run_url(storage, run_id)
    store = read_run_info(storage, run_id).get("nats_store")
    if answers(url) or not store or not (Path(store) / "jetstream").is_dir():
        yield url
        return
    typer.echo(f"{url} does not answer: reading the run's stored stream ({store})", err=True)
    with stored_stream(Path(store)) as local:
        yield local


def _run_url(storage: Path, run_id: str) -> str:
    from ..storage import read_run_info

    try:
        return read_run_info(storage, run_id)["nats_url"]
    except FileNotFoundError as e:
        fail(f"[red]{e}[/]; pass --nats-url", Code.NOT_FOUND)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    from ..bus import NatsUnreachable, PermissionRefused

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C, SIGTERM (timeout, systemd, docker stop, a CI cancel) and SIGHUP (a closed terminal)
    # stop what a command started: services, pools and the embedded nats-server. All three raise
    # KeyboardInterrupt at once. (Left alone, asyncio.run turns Ctrl-C into a cancellation of its
    # main task, which the full suite once saw absorbed: the run went on for minutes.)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        app()
    except NatsUnreachable as e:  # any command that needs the bus: say which URL, never hang
        err_console.print(f"[red]{e}[/]", soft_wrap=True)
        raise SystemExit(Code.UNREACHABLE)
    except PermissionRefused as e:  # not "rejected" (exit 1): this identity may not do it at all
        err_console.print(f"[red]{e}[/]", soft_wrap=True)
        raise SystemExit(Code.REFUSED)
