"""checkpoint service: verifies and catalogues checkpoints, asks for their evaluation, and
exports the best one when training is done (or, for a pruned run, releases them all).
Asked with ``export.request``, it merges a finished run's exported adapter (a sweep's winner)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time

from tuneloop import metrics, subjects
from tuneloop.events import Reject
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, CheckpointsReleased, ControlApplied, ControlRolledBack,
                             EvalRequest, EvalVerdict, ExportDone, ExportRequest, TrainingFinished, derived_id)
from tuneloop.grafana import Annotator
from tuneloop.records import Records
from tuneloop.service import ServiceContext, consume_handlers, handles, on_torch_thread, run_service, warm_up
from tuneloop.checkpoints import complete_checkpoints, digest_dir, verify, write_manifest
from tuneloop.storage import RunDir, confine, read_run_info, relative, resolve_model

from tuneloop import export, model_card, models
from .catalogue import Entry, best, pending, stale_snapshots

log = logging.getLogger("tuneloop.checkpoint")
BUCKET = subjects.CHECKPOINT_BUCKET
VERDICT_WAIT_S = 900.0
CATALOGUE_WAIT_S = 60.0


class Catalogue:
    """Entries per run, kept in JetStream KV (key ``<run>.<step>``) so a restart loses none."""

    def __init__(self, kv):
        self.records: Records[Entry] = Records(kv, Entry)

    async def put(self, run_id: str, entry: Entry) -> None:
        await self.records.put(_key(run_id, entry.step), entry)

    async def get(self, run_id: str, step: int) -> Entry | None:
        return await self.records.get(_key(run_id, step))

    async def entries(self, run_id: str) -> list[Entry]:
        return await self.records.under(run_id + ".")


def _key(run_id: str, step: int) -> str:
    return f"{run_id}.{step:09d}"


async def open_catalogue(ctx: ServiceContext) -> Catalogue:
    return Catalogue(await ctx.bus.key_value(BUCKET))


class CheckpointService:
    """The service's handlers, each declared with what it consumes (``handles``)."""

    def __init__(self, ctx: ServiceContext, catalogue: Catalogue, annotator: Annotator | None):
        self.ctx, self.bus, self.catalogue, self.annotator = ctx, ctx.bus, catalogue, annotator
        # The base of the last merged export stays in memory: a pool's runs (a sweep's trials, one
        # linked base) merge their adapters into a copy of it instead of each loading the base.
        self.resident = models.Resident()

    # Short ack wait: a hashing handler keeps its message alive (in-progress acks), and a killed
    # service's message comes back to the restarted one within seconds.
    @handles(CheckpointSaved, ack_wait=5)
    async def on_saved(self, ev: CheckpointSaved) -> None:
        run_dir = self.ctx.run_dir(ev.run_id)
        path = confine(run_dir, ev.path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {ev.path} of run {ev.run_id} does not exist")
        t0 = time.perf_counter()
        sha, size, files = await asyncio.to_thread(digest_dir, path)  # UnsafePath (a Reject) on a symlink
        metrics.CHECKPOINT_SECONDS.labels(ev.run_id).observe(time.perf_counter() - t0)
        old = await self.catalogue.get(ev.run_id, ev.step)
        if old is not None and old.saved_by == ev.event_id and old.sha256 != sha:
            raise Reject(f"checkpoint {ev.path} changed since it was recorded (sha256 {old.sha256[:12]}, now "
                         f"{sha[:12]}); its record and manifest stay as they were")
        write_manifest(path, sha, size, files)
        entry = Entry(step=ev.step, path=ev.path, base_model=str(ev.base_model), adapter=ev.adapter, sha256=sha,
                      bytes=size, is_final=ev.is_final, scores=old.scores if old and old.sha256 == sha else None,
                      snapshot=ev.snapshot, evaluated=ev.evaluate or ev.is_final, saved_by=ev.event_id)
        await self.catalogue.put(ev.run_id, entry)
        record = CheckpointRecorded(run_id=ev.run_id, event_id=derived_id("rec", ev.event_id), step=ev.step,
                                    path=ev.path, sha256=sha, bytes=size)
        await self.bus.publish(record)
        if self.annotator:
            await self.annotator.post(record)
        if entry.scores is None and entry.evaluated:
            await self.bus.publish(EvalRequest(run_id=ev.run_id, event_id=derived_id("eval", ev.event_id), step=ev.step,
                                          checkpoint=ev.path, base_model=ev.base_model, adapter=ev.adapter))
        log.info("recorded step %d (%s, %.1f MB)", ev.step, sha[:12], size / 1e6)

    @handles(EvalVerdict)
    async def on_verdict(self, v: EvalVerdict) -> None:
        if v.purpose == "final":  # the exported model's own score: into its model card
            return await self.update_cards(v.run_id)
        if v.purpose != "periodic":
            return
        entry = await self.catalogue.get(v.run_id, v.step)
        if entry is None:
            log.warning("verdict for unknown checkpoint %s step %d", v.run_id, v.step)
            return
        if entry.saved_by and v.request_id != derived_id("eval", entry.saved_by):
            log.info("verdict of step %d is of a checkpoint saved there before (discarded by a rollback): not its record",
                     v.step)
            return
        entry.scores, entry.bounds = dict(v.scores), dict(v.bounds)
        await self.catalogue.put(v.run_id, entry)
        await self.drop_stale_snapshots(v.run_id)

    @handles(ControlRolledBack)
    async def on_rolled_back(self, ev: ControlRolledBack) -> None:
        """The trainer deleted the checkpoints after a savepoint: their records can no longer be
        exported (the steps are saved again as training goes on from the savepoint)."""
        discarded = set(ev.discarded_saves)
        for e in await self.catalogue.entries(ev.run_id):
            if e.saved_by in discarded and not e.released:
                e.released = e.discarded = True
                await self.catalogue.put(ev.run_id, e)
                log.info("step %d of run %s discarded by the rollback of %s", e.step, ev.run_id, ev.command)

    async def drop_stale_snapshots(self, run_id: str) -> None:
        """Delete the snapshots that lost to another entry (retention; the records stay)."""
        metric = self.ctx.config(run_id).feedback.metric
        for e in stale_snapshots(await self.catalogue.entries(run_id), metric):
            await asyncio.to_thread(shutil.rmtree, confine(self.ctx.run_dir(run_id), e.path), True)
            e.released = True
            await self.catalogue.put(run_id, e)
            log.info("snapshot of step %d released: outscored on %s", e.step, metric)

    async def settled(self, done: TrainingFinished, scored: bool, wait_s: float) -> list[Entry]:
        """The run's entries once every checkpoint on disk (the final one included) is catalogued
        and, with ``scored``, has its verdict; after ``wait_s`` whatever is there."""
        run_dir = self.ctx.run_dir(done.run_id)
        deadline = time.monotonic() + wait_s
        while True:
            entries = await self.catalogue.entries(done.run_id)
            have_final = done.final_checkpoint is None or any(e.path == done.final_checkpoint for e in entries)
            # A checkpoint on disk but not catalogued yet: its ckpt.saved is on its way (e.g. redelivered
            # after this service was killed while hashing it). Export waits for it too.
            uncatalogued = set(complete_checkpoints(RunDir(run_dir).checkpoints)) - {e.step for e in entries}
            waiting = pending(entries) if scored else []
            if have_final and not waiting and not uncatalogued:
                return entries
            if time.monotonic() > deadline:
                log.warning("going on without verdicts for steps %s (not catalogued: %s)", waiting, sorted(uncatalogued))
                return entries
            await asyncio.sleep(0.5)

    async def release(self, done: TrainingFinished) -> None:
        """A pruned run: delete its checkpoints (the catalogue keeps their records, marked released)."""
        entries = await self.settled(done, scored=False, wait_s=CATALOGUE_WAIT_S)
        rd = RunDir(self.ctx.run_dir(done.run_id))
        folders = [*rd.checkpoints.glob("checkpoint-*"), *rd.snapshot_folders().values()]
        freed = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
        for d in folders:
            await asyncio.to_thread(shutil.rmtree, d, True)
        for e in entries:
            e.released = True
            await self.catalogue.put(done.run_id, e)
        steps = sorted({int(d.name.rsplit("-", 1)[1]) for d in folders if d.name.rsplit("-", 1)[1].isdigit()})
        await self.bus.publish(CheckpointsReleased(run_id=done.run_id, event_id=derived_id("released", done.event_id),
                                              steps=steps, bytes=freed, reason=done.detail))
        log.info("run %s pruned: released %d checkpoints (%.1f MB)", done.run_id, len(folders), freed / 1e6)

    @handles(TrainingFinished, ack_wait=60)
    async def on_done(self, done: TrainingFinished) -> None:
        if done.reason == "error":
            log.warning("run %s failed (%s); nothing to export", done.run_id, done.detail)
            return
        if done.reason == "interrupted":
            log.info("run %s interrupted at step %d; it resumes from its checkpoint, nothing to export", done.run_id, done.step)
            return
        if done.reason == "pruned":
            return await self.release(done)
        cfg = self.ctx.config(done.run_id)
        run_dir = self.ctx.run_dir(done.run_id)
        entries = await self.settled(done, scored=True, wait_s=VERDICT_WAIT_S)
        chosen = best(entries, cfg.feedback.metric)
        if chosen is None:
            log.error("run %s has no checkpoint to export", done.run_id)
            return
        t0 = time.perf_counter()
        ckpt = confine(run_dir, chosen.path)
        problem = await asyncio.to_thread(verify, ckpt, chosen.sha256)
        if problem:  # changed on disk since it was recorded: exporting it would hand out other weights
            raise Reject(f"not exporting step {chosen.step} of run {done.run_id}: {problem}")
        base = resolve_model(run_dir, chosen.base_model)
        name = models.portable_name(cfg, base)
        adapter_path = merged_path = None
        if cfg.export.adapter and chosen.adapter:
            card = await self.card(done.run_id, chosen.step, name, adapter=True)
            adapter_path = await asyncio.to_thread(export.export_adapter, ckpt, base, run_dir / "export" / "adapter",
                                                   False, name, card)
        if cfg.export.merged or not chosen.adapter:
            card = await self.card(done.run_id, chosen.step, name, adapter=False)
            merged_path = await on_torch_thread(export.export_merged, ckpt, base, chosen.adapter, run_dir / "export" / "merged",
                                                False, self.resident, card)
        metrics.EXPORT_SECONDS.labels(done.run_id).observe(time.perf_counter() - t0)
        log.info("exported step %d (%s) in %.1fs", chosen.step, chosen.scores, time.perf_counter() - t0)
        # The exported model itself is scored on the held-out test split and on every test suite.
        final, final_adapter = (merged_path, False) if merged_path else (adapter_path, True)
        for i, split in enumerate(["test"] + [f"suite:{s.name}" for s in cfg.eval.suites]):
            await self.bus.publish(EvalRequest(run_id=done.run_id, event_id=derived_id(f"final{i or ''}", done.event_id),
                                          step=chosen.step, checkpoint=relative(run_dir, final),
                                          base_model=chosen.base_model, adapter=final_adapter, split=split,
                                          purpose="final"))
        await self.bus.publish(ExportDone(
            run_id=done.run_id, event_id=derived_id("export", done.event_id), step=chosen.step,
            score=(chosen.scores or {}).get(cfg.feedback.metric),
            adapter_path=relative(run_dir, adapter_path) if adapter_path else None,
            merged_path=relative(run_dir, merged_path) if merged_path else None,
        ))
        await self.update_cards(done.run_id)  # a final verdict that came before the export.done

    async def card(self, run_id: str, step: int, base_name: str, adapter: bool) -> str:
        """The model card of ``run_id``'s export of ``step``: its val verdict, and the exported
        model's own verdicts (test, suites) as far as they came."""
        verdicts = [v for v in await self.bus.history(EvalVerdict, run_id)
                    if v.purpose == "final" or (v.purpose == "periodic" and v.step == step)]
        try:
            lineage = read_run_info(self.ctx.storage, run_id)
        except FileNotFoundError:
            lineage = {}
        return model_card.card_text(self.ctx.config(run_id), run_id=run_id, step=step, base_name=base_name,
                                    adapter=adapter, verdicts=verdicts, lineage=lineage)

    async def update_cards(self, run_id: str) -> None:
        done = await self.bus.latest(ExportDone, run_id)
        if done is None:
            return
        rdir = self.ctx.run_dir(run_id)
        for path, adapter in ((done.adapter_path, True), (done.merged_path, False)):
            if path:
                folder = confine(rdir, path)
                name = (json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter
                        else models.portable_name(self.ctx.config(run_id), resolve_model(rdir, models.base_ref(self.ctx.config(run_id)))))
                await asyncio.to_thread(export.update_card, folder, await self.card(run_id, done.step, name, adapter))

    @handles(ExportRequest, ack_wait=60)
    async def on_export_request(self, req: ExportRequest) -> None:
        """The merged model of a run that exported its adapter only; answered with ExportDone."""
        done = await self.bus.latest(ExportDone, req.run_id)
        if done is None or done.adapter_path is None:
            raise Reject(f"run {req.run_id} has no exported adapter to merge (export.done: "
                         f"{'none yet' if done is None else 'a merged model already'})")
        rdir = self.ctx.run_dir(req.run_id)
        adapter = confine(rdir, done.adapter_path)
        base = export.base_of(adapter)
        name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        t0 = time.perf_counter()
        merged = await on_torch_thread(export.export_merged, adapter, base, True, adapter.parent / "merged",
                                       False, self.resident, await self.card(req.run_id, done.step, name, adapter=False))
        log.info("run %s: merged its adapter (step %d) in %.1fs, asked: %s", req.run_id, done.step,
                 time.perf_counter() - t0, req.reason)
        await self.bus.publish(ExportDone(run_id=req.run_id, event_id=derived_id("export", req.event_id), step=done.step,
                                     score=done.score, adapter_path=done.adapter_path,
                                     merged_path=relative(rdir, merged), requested_by=req.event_id))


async def main(ctx: ServiceContext) -> None:
    service = CheckpointService(ctx, await open_catalogue(ctx),
                                Annotator.from_env())  # GRAFANA_URL + GRAFANA_TOKEN: annotate checkpoints and controls
    warm_up(models.imports)  # merged exports load models: imported now, not in front of the first one
    await consume_handlers(ctx.bus, ctx.run_id, service)
    if service.annotator:  # applied and rolled-back controls become Grafana annotations too
        for kind in (ControlApplied, ControlRolledBack):
            await ctx.bus.consume(kind, ctx.run_id, service.annotator.post, group="checkpoint-grafana")
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("checkpoint", main)
