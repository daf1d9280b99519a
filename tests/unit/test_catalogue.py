"""The checkpoint catalogue: which checkpoint is best, which snapshots are exported or released."""

from tuneloop.checkpoint.catalogue import Entry, best, pending, stale_snapshots


def test_best_checkpoint_prefers_score_then_later_step():
    e = lambda step, s: Entry(step=step, path=f"c{step}", base_model="base", adapter=True, sha256="x", bytes=1,
                              scores=None if s is None else {"protocol": s})
    entries = [e(50, 0.8), e(100, 0.9), e(150, 0.9), e(200, None)]
    assert best(entries, "protocol").step == 150
    assert pending(entries) == [200]


def test_snapshots_are_exported_when_best_and_released_when_outscored():
    def e(step, s, snapshot=False, evaluated=True, released=False):
        return Entry(step=step, path=f"p{step}", base_model="base", adapter=True, sha256="x", bytes=1,
                     scores=None if s is None else {"protocol": s}, snapshot=snapshot, evaluated=evaluated,
                     released=released)

    entries = [e(10, 0.5, snapshot=True), e(15, None, evaluated=False), e(20, 0.9, snapshot=True),
               e(30, 0.7), e(40, None, snapshot=True)]
    assert best(entries, "protocol").step == 20          # a snapshot can be the export
    assert pending(entries) == [40]                       # a resume-only checkpoint awaits no verdict
    assert [x.step for x in stale_snapshots(entries, "protocol")] == [10]  # not the best, not unscored
    entries[1] = e(20, 0.9, snapshot=True, released=True)
    entries.pop(2)
    assert best(entries, "protocol").step == 30           # a released entry is never chosen
    assert stale_snapshots([e(10, 0.9, snapshot=True)], "protocol") == []  # the only one is the best


def test_the_best_checkpoint_by_a_loss_is_the_lowest():
    entries = [Entry(step=s, path=f"c{s}", base_model="base", adapter=True, sha256="x", bytes=1,
                     scores={"exact": e, "eval_loss": loss})
               for s, e, loss in ((10, 0.2, 0.9), (20, 0.5, 0.4), (30, 0.6, 0.7))]
    assert best(entries, "eval_loss").step == 20 and best(entries, "exact").step == 30
