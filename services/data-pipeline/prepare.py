"""Turn raw chat files into the prepared splits the trainer and evaluator read. Pure: no bus.

Input rows (JSONL, one per line; or Parquet; or a ``datasets`` folder from ``save_to_disk``): a
chat, and any other columns the task reads (``task.category_column``, ``task.reference_column``,
columns its checks and functions compare with)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "category": "math", "reference": "26"}

Output rows (prompt-completion for SFT, prompt-chosen-rejected for DPO, prompt + reference
for GRPO's rewards: what TRL's trainers take directly), with the row's category and reference
as the task finds them and its other columns (as JSON, for metric and reward functions)::

    {"prompt": "<|user|>\\n...\\n<|assistant|>\\n", "completion": "...", "chosen": "...", "rejected": "...",
     "category": ..., "reference": ..., "columns": "{...}"}

A row may bring its own ``rejected`` answer; otherwise one is found (``augment.negative_for``): the
answer of another row that fails the most of this row's declared metrics.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from tuneloop.chat import render_prompt
from tuneloop.config import Config, Source
from tuneloop.events import explain
from tuneloop.formats import to_chat
from tuneloop.suites import SuiteCase, read_suite
from tuneloop.task import DEFAULT_CATEGORY, Judge, TaskError, TaskSection

from . import quality
from .augment import negative_for, rephrase


class DataError(ValueError):
    """A data set that cannot be used; names the file, line and field."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(min_length=1)


class Row(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=2)
    rejected: str | None = Field(default=None, min_length=1, description="A dispreferred answer, for DPO.")
    _where: str = PrivateAttr(default="")  # file:line it was read from, for the quality report
    _category: str = PrivateAttr(default=DEFAULT_CATEGORY)
    _reference: str | None = PrivateAttr(default=None)

    @property
    def columns(self) -> dict:
        """The row's other columns, as the task's checks and functions see them."""
        return dict(self.model_extra or {})

    @property
    def answer(self) -> str:
        return self.messages[-1].content

    @property
    def category(self) -> str:
        return self._category

    @property
    def reference(self) -> str | None:
        return self._reference

    def read_by(self, task: TaskSection) -> "Row":
        """Where the task finds this row's category and reference."""
        self._category = task.category_of(self.columns)
        self._reference = task.reference_of(self.answer, self.columns)
        return self

    def assistant_turns(self) -> list[int]:
        """The assistant messages with a user message before them: each a completion to learn."""
        firsts = next(i for i, m in enumerate(self.messages) if m.role == "user")
        return [i for i, m in enumerate(self.messages) if m.role == "assistant" and i > firsts]

    def check_turns(self) -> None:
        if self.messages[-1].role != "assistant":
            raise ValueError("messages: the last message must be the assistant's answer")
        if not any(m.role == "user" for m in self.messages[:-1]):
            raise ValueError("messages: no user message before the answer")


@dataclass
class SourceRows:
    name: str
    weight: float
    rows: list[Row]
    rejected: list[str] = field(default_factory=list)


def records(path: Path, split: str = "train") -> Iterator[tuple[str, str | dict]]:
    """(where, raw row) from a JSONL file (raw line), a Parquet file, or a ``datasets`` folder
    saved with ``save_to_disk`` (dicts); ``where`` names the file and line or row."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path}[{split}] row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", line


def hub_records(name: str, split: str, subset: str | None = None, revision: str | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of a data set on the Hugging Face hub (``datasets.load_dataset``): its ``subset``
    (configuration) and ``revision`` (branch, tag or commit) where given."""
    from datasets import load_dataset

    what = f"hub data set {name!r}" + (f" subset {subset!r}" if subset else "") + (f" revision {revision!r}" if revision else "")
    try:
        ds = load_dataset(name, subset, split=split, revision=revision)
    except Exception as e:  # unreachable hub, unknown name, subset, revision or split: "cannot use this source"
        raise DataError(f"{what} (split {split!r}) could not be loaded: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row


def parse_row(raw: str | dict, fmt: str = "messages", columns: dict[str, str] | None = None) -> "Row":
    """One raw row (a JSONL line, or a dict from Parquet, a folder or the hub) in ``fmt``, as a Row."""
    if fmt == "messages" and not columns and isinstance(raw, str):
        return Row.model_validate_json(raw)  # the common case: pydantic reads the line directly
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"a row is a JSON object, not {type(raw).__name__}")
    return Row.model_validate(to_chat(raw, fmt, columns))


def read_source(path: Path | str, name: str, weight: float, on_bad_row: str, max_rows: int | None = None,
                split: str = "train", task: TaskSection | None = None, source: Source | None = None) -> SourceRows:
    """Read and validate one source (a local path, or a hub name as a str; ``source``: its
    format, column names, hub subset and revision); bad rows raise DataError (fail) or are
    counted (skip)."""
    if isinstance(path, Path) and not path.exists():
        raise DataError(f"{path}: data file not found")
    source = source or (Source(path=str(path)) if isinstance(path, Path) else Source(hub=path))
    out = SourceRows(name=name, weight=weight, rows=[])
    raws = records(path, split) if isinstance(path, Path) else hub_records(path, split, source.subset, source.revision)
    for where, raw in raws:
        try:
            row = parse_row(raw, source.format, source.columns)
            row.check_turns()
            row._where = where
            row.read_by(task or TaskSection())
        except ValidationError as e:
            problem = explain(e)
        except ValueError as e:  # FormatError too: a column the format reads is missing
            problem = str(e)
        else:
            out.rows.append(row)
            if max_rows and len(out.rows) >= max_rows:
                break
            continue
        if on_bad_row == "fail":
            raise DataError(f"{where}: {problem}")
        out.rejected.append(f"{where}: {problem}")
    if not out.rows:
        raise DataError(f"{path}: no usable rows ({len(out.rejected)} rejected)")
    return out


def to_example(row: Row, template: str, negative: str | None = None, turn: int | None = None) -> dict:
    """A prepared row; ``chosen``/``rejected`` (DPO) only where the row brings a rejected answer
    or a ``negative`` was found for it (a DPO run then names the rows that lack one). ``turn``:
    the assistant message that is the completion (the chat before it the prompt); the last by
    default."""
    turn = len(row.messages) - 1 if turn is None else turn
    prompt_msgs = [m.model_dump() for m in row.messages[:turn]]
    answer = row.messages[turn].content
    rejected = row.rejected or negative
    if template == "model":  # conversational: TRL applies the tokenizer's own template
        prompt, completion = prompt_msgs, [{"role": "assistant", "content": answer}]
        rejected = rejected and [{"role": "assistant", "content": rejected}]
    else:
        prompt, completion = render_prompt(prompt_msgs), answer
    pair = {"chosen": completion, "rejected": rejected} if rejected else {}
    return {"prompt": prompt, "completion": completion, **pair, "category": row.category, "reference": row.reference,
            "columns": json.dumps(row.columns, ensure_ascii=False, sort_keys=True, default=str)}


def augmented(rows: list[Row], augment, rng: random.Random) -> list[Row]:
    """New train rows from ``data.augment.phrasings``: each row whose last user message a rule
    of its category matches, ``copies`` times in another phrasing, with the same answer."""
    out = []
    if not augment.enabled:
        return out
    for row in rows:
        rule = augment.phrasings.get(row.category)
        user = max(i for i, m in enumerate(row.messages) if m.role == "user") if rule else None
        for _ in range(augment.copies if rule else 0):
            new = rephrase(row.messages[user].content, rule, rng)
            if new is None:
                break
            messages = [m.model_copy(update={"content": new}) if i == user else m for i, m in enumerate(row.messages)]
            twin = row.model_copy(update={"messages": messages})
            twin._where = f"augment of {row._where}"
            out.append(twin)
    return out


def suite_example(case: SuiteCase, template: str) -> dict:
    """A suite case as the evaluator reads it: the rendered prompt and the case's own checks."""
    prompt = case.chat() if template == "model" else render_prompt(case.chat())
    return {"prompt": prompt, "category": case.category, "weight": case.weight, "reference": None,
            "checks": [c.model_dump(by_alias=True) for c in case.checks]}


def mix(sources: list[SourceRows], rng: random.Random) -> list[Row]:
    """Draw rows from each source in proportion to its weight (total = all rows read)."""
    if len(sources) == 1:
        return list(sources[0].rows)
    total = sum(len(s.rows) for s in sources)
    wsum = sum(s.weight for s in sources)
    out: list[Row] = []
    for s in sources:
        n = round(total * s.weight / wsum)
        out += rng.sample(s.rows, n) if n <= len(s.rows) else rng.choices(s.rows, k=n)
    return out


@dataclass
class Prepared:
    splits: dict[str, tuple[str, int, dict[str, int]]]  # name -> (relative path, rows, per category)
    fingerprint: str
    mixture: dict[str, float]
    rejected: list[str]
    quality: quality.Report | None = None
    augmented: int = 0


def source_weights(cfg: Config, override: dict[str, float] | None = None) -> dict[str, float]:
    """Weight per source name: the config's, with ``override`` on top; unknown names are an error."""
    weights = {s.label: s.weight for s in cfg.data.sources}
    override = override or {}
    unknown = sorted(set(override) - set(weights))
    if unknown:
        raise DataError(f"no data source named {', '.join(unknown)} (sources: {', '.join(weights)})")
    bad = {k: v for k, v in override.items() if not v > 0}
    if bad:
        raise DataError(f"source weights must be > 0, got {bad}")
    return {**weights, **override}


def reweight(rows: list[Row], weights: dict[str, float], rng: random.Random) -> list[Row]:
    """As many rows, drawn with probability proportional to their category's weight (default 1)."""
    if not weights or not rows:
        return rows
    return rng.choices(rows, weights=[weights.get(r.category, 1.0) for r in rows], k=len(rows))


def adapt_weights(current: dict[str, float], weak: list[str], categories: list[str], boost: float,
                  cap: float) -> dict[str, float]:
    """Category weights after a feedback naming ``weak`` categories: boosted, at most ``cap``
    times the least weighted one. Only shares matter, so the weights are kept relative to the
    least (categories at 1 are left out), and when every category is weak nothing shifts."""
    weights = {c: current.get(c, 1.0) for c in {*categories, *current}}
    weak = [c for c in weak if c in weights]
    if not weak or len(weak) == len(weights):
        return dict(current)
    for c in weak:
        weights[c] *= boost
    low = min(weights.values())
    relative = {c: min(w / low, cap) for c, w in weights.items()}
    return {c: w for c, w in sorted(relative.items()) if w != 1.0}


def evidence_is_new(verdict_step: int, switched_at: int | None, cooldown: int) -> bool:
    """Whether a verdict may move the mixture again: it must be of weights trained on the
    current mixture for ``cooldown`` steps (``switched_at``: the step the trainer applied it;
    None: not applied yet). The checkpoint taken at the switch, and those just after it, were
    trained on the old mixture: their verdicts repeat the evidence that caused the switch."""
    return switched_at is not None and verdict_step >= switched_at + cooldown


def prepare(cfg: Config, out_dir: Path, run_dir: Path, template: str | None = None,
            weights: dict[str, float] | None = None, category_weights: dict[str, float] | None = None) -> Prepared:
    """Read every source, mix, split (held-out prompts never seen in train) and write JSONL.

    ``template``: 'tuneloop' writes prompts as text; 'model' keeps them as messages for the
    base tokenizer's own template; by default what ``model.chat_template`` says.

    Each data set goes to its own folder ``out_dir/<dataset id>``: a run that switches data
    (set-data) can still resume on the old one, and the same input lands in the same place.
    """
    template = template or cfg.model.template()
    rng = random.Random(cfg.run.seed)
    weight = source_weights(cfg, weights)
    sources = []
    for s in cfg.data.sources:
        where = cfg.resolve(s.path) if s.path else s.hub
        sources.append(read_source(where, s.label, weight[s.label], cfg.data.on_bad_row, cfg.data.max_rows, s.split,
                                   cfg.task, s))
    # Split each source before mixing, so held-out rows are never sampled into train.
    held: dict[str, list[Row]] = {"val": [], "test": []}
    for s in sources:
        rng.shuffle(s.rows)
        n = len(s.rows)
        n_test, n_val = round(n * cfg.data.test_fraction), round(n * cfg.data.val_fraction)
        held["test"] += s.rows[:n_test]
        held["val"] += s.rows[n_test:n_test + n_val]
        s.rows = s.rows[n_test + n_val:]
    # Held-out prompts that could be drawn into train by any mixture are dropped: the held-out
    # splits stay the same whatever the weights, so scores before and after a re-mix compare.
    seen = {_prompt_key(r) for s in sources for r in s.rows}
    held = {k: [r for r in v if _prompt_key(r) not in seen] for k, v in held.items()}
    suites = {}
    for suite in cfg.eval.suites:
        try:
            suites[suite.name] = read_suite(cfg.resolve(suite.path))
        except ValueError as e:
            raise DataError(f"eval suite {suite.name!r}: {e}") from None
    try:
        judge = Judge(cfg.task, cfg.base_dir)
    except TaskError as e:
        raise DataError(f"task: {e}") from None
    report = gate(cfg, sources, held, judge)
    added, held_prompts = 0, {_prompt_key(r) for rows in held.values() for r in rows}
    for s in sources:  # after the split, and never a held-out prompt: augmentation must not leak the test
        new = [r for r in augmented(s.rows, cfg.data.augment, rng) if _prompt_key(r) not in held_prompts]
        s.rows += new
        added += len(new)
    train = reweight(mix(sources, rng), category_weights or {}, rng)
    rng.shuffle(train)

    negatives = negative_for(train, judge, rng) if cfg.data.augment.negatives and cfg.train.method == "dpo" else {}
    examples = {name: [to_example(r, template, negatives.get(id(r))) for r in rows] for name, rows in held.items()}
    every = cfg.data.turns == "every" and cfg.train.method == "sft"  # DPO's pair and GRPO's reference: the last turn's
    examples = {"train": [to_example(r, template, negatives.get(id(r)), turn)
                          for r in train for turn in (r.assistant_turns() if every else [None])], **examples}
    for name, cases in suites.items():
        examples[f"suite:{name}"] = [suite_example(c, template) for c in cases]
    texts, digest = {}, hashlib.sha256()
    for name, rows in examples.items():
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        texts[name] = "\n".join(lines) + ("\n" if lines else "")
        digest.update(name.encode() + b"\0" + texts[name].encode())
    folder = out_dir / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quality.json").write_text(json.dumps(report.document(), indent=1) + "\n", encoding="utf-8")
    splits = {}
    for name, rows in examples.items():
        path = folder / f"{name.replace(':', '-')}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(texts[name], encoding="utf-8")
        tmp.replace(path)
        splits[name] = (str(path.resolve().relative_to(run_dir.resolve())), len(rows), dict(Counter(r["category"] for r in rows)))
    wsum = sum(s.weight for s in sources)
    return Prepared(
        splits=splits, fingerprint=digest.hexdigest(),
        mixture={s.name: s.weight / wsum for s in sources},
        rejected=[r for s in sources for r in s.rejected], quality=report, augmented=added,
    )


def length_counter(cfg: Config) -> tuple:
    """(how long a templated text is, the unit): tokens of the base model's tokenizer when it is
    a local folder with tokenizer.json; else UTF-8 bytes, which bound a byte-level BPE's
    tokens from above (the tiny model's tokenizer is trained later, from the train split)."""
    from tuneloop.models import local_base

    base = local_base(cfg)
    if base is not None and (base / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            pass
        else:
            tok = Tokenizer.from_file(str(base / "tokenizer.json"))
            return (lambda text: len(tok.encode(text).ids)), "tokens"
    return (lambda text: len(text.encode("utf-8"))), "bytes"


def gate(cfg: Config, sources: list[SourceRows], held: dict[str, list[Row]], judge: Judge) -> quality.Report:
    """The quality gate over the train rows of every source and the held-out rows: drops what
    ``data.quality`` says in place, returns the report; DataError when it refuses the data."""
    def item(r: Row) -> quality.Item:
        prompt = "\n".join(m.content for m in r.messages[:-1])
        return quality.Item(r._where, prompt, r.answer, r.category, r.reference,
                            render_prompt([m.model_dump() for m in r.messages[:-1]]) + r.answer,
                            {**r.columns, "category": r.category},
                            next(m.content for m in reversed(r.messages[:-1]) if m.role == "user"))

    train = [(s, r) for s in sources for r in s.rows]
    held_rows = [(k, r) for k, rows in held.items() for r in rows]
    length_of, unit = length_counter(cfg)
    try:
        drop_train, drop_held, report = quality.run_gate(
            cfg.data.quality, [item(r) for _, r in train], [item(r) for _, r in held_rows],
            judge, cfg.train.max_length, length_of, unit)
    except quality.QualityError as e:
        raise DataError(str(e)) from None
    gone = {id(train[i][1]) for i in drop_train} | {id(held_rows[i][1]) for i in drop_held}
    for s in sources:
        s.rows = [r for r in s.rows if id(r) not in gone]
        if not s.rows:
            raise DataError(f"source {s.name}: the quality gate dropped every train row ({report.summary()})")
    for k in held:
        held[k] = [r for r in held[k] if id(r) not in gone]
    return report


def _prompt_key(row: Row) -> str:
    return "\n".join(m.content for m in row.messages[:-1])
