"""The export's model card (README.md, huggingface_hub's ``ModelCard``): what a person or the
Hub needs to trust and reuse the model without the run directory.

It names the base portably (``base_model``: a hub id or ``package:DIST``, the path trained on
only where nothing else names it), the data sources, the training settings, the verdicts
(the exported checkpoint's on val, then the exported model's own on test and every suite,
added as they come), the lineage (fork, phase) and the tuneloop version. The checkpoint
service writes it with the export and again as each final verdict arrives.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from .config import Config
from .events import EvalVerdict

TEMPLATE = """---
{{ card_data }}
---

# {{ run_id }}

{{ summary }}

## Results

{{ results }}

## Data

{{ data }}

## Training

```yaml
{{ settings }}
```

## Lineage

{{ lineage }}

## Loading it

{{ loading }}

Made with tuneloop {{ tuneloop_version }}.
"""


def tuneloop_version() -> str:
    try:
        return version("tuneloop")
    except PackageNotFoundError:
        return "unknown"


def results_table(verdicts: list[EvalVerdict]) -> str:
    """One row per verdict and metric: split, purpose, step, score, its bound, cases scored."""
    if not verdicts:
        return "No verdict yet."
    rows = ["| split | verdict | step | metric | score | bound | cases |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in verdicts:
        for metric, score in v.scores.items():
            bound = v.bounds.get(metric)
            rows.append(f"| {v.split} | {v.purpose} | {v.step} | {metric} | {score:.4f} | "
                        f"{f'[{bound[0]:.3f}, {bound[1]:.3f}]' if bound else '-'} | {v.cases} |")
    return "\n".join(rows)


def card_text(cfg: Config, *, run_id: str, step: int, base_name: str, adapter: bool,
              verdicts: list[EvalVerdict], lineage: dict | None = None) -> str:
    """The card of ``run_id``'s export of ``step``."""
    from huggingface_hub import ModelCard, ModelCardData

    tc = cfg.train
    how = (f"LoRA r={tc.lora.r}, alpha={tc.lora.alpha}, on {tc.lora.target_modules}" if adapter else "all weights")
    hub_data = [s.hub for s in cfg.data.sources if s.hub]
    portable = not Path(base_name).is_absolute()
    data = ModelCardData(
        base_model=base_name if portable else None, library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation", tags=["tuneloop", tc.method, *(["lora"] if adapter else [])],
        datasets=hub_data or None, model_name=run_id)
    sources = "\n".join(f"- `{s.hub or s.path}`" + (f" (split {s.split})" if s.hub else "") + f", weight {s.weight:g}"
                        for s in cfg.data.sources)
    fork = (lineage or {}).get("forked_from")
    lines = []
    if fork:
        lines.append(f"- forked from run `{fork['run']}` at step {fork['step']} "
                     f"({'weights only' if fork.get('weights_only') else 'full state'}; changed: {fork.get('changed') or 'nothing'})")
    if (lineage or {}).get("phase"):
        lines.append(f"- phase `{lineage['phase']}` of job `{lineage.get('job', run_id)}`")
    loading = (f"```python\nfrom tuneloop.export import load_exported\nmodel = load_exported(\"path/to/this/folder\")\n```\n\n"
               f"With PEFT alone: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), folder)`, "
               f"BASE being `{base_name}`" + ("" if portable or not adapter else " (a path on the machine it was trained on)")
               + ("; a `package:` base is a GGUF file that tuneloop dequantizes (`load_exported` does it)."
                  if base_name.startswith("package:") else ".")
               if adapter else "```python\nfrom transformers import AutoModelForCausalLM\n"
                               "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```")
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, run_id=run_id, tuneloop_version=tuneloop_version(),
        summary=f"`{base_name}` fine-tuned with {tc.method.upper()} ({how}) by tuneloop; exported at step {step}, "
                f"the best checkpoint of the run on `{cfg.feedback.metric}`.",
        results=results_table(verdicts), data=sources,
        settings=yaml.safe_dump({"train": cfg.train.model_dump(mode="json", exclude_defaults=True)}, sort_keys=False).strip(),
        lineage="\n".join(lines) or "A run of its own (no fork, no phases).", loading=loading)
    return str(card)


def write_card(folder: Path, text: str) -> None:
    """``folder``/README.md, written whole (a reader never sees half a card)."""
    tmp = folder / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "README.md")
