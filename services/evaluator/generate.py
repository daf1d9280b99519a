"""Loading a checkpoint and generating answers: batched greedy decoding with left padding.

The base stays resident (``models.Resident``): a shard of a checkpoint already seen reuses the
model, a new adapter checkpoint swaps only its LoRA weights."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from tuneloop.models import Resident, tokenizer_source, with_chat_template

log = logging.getLogger(__name__)


class Models:
    """The resident base (and its adapter) plus the tokenizer of the last checkpoint."""

    def __init__(self):
        import torch

        self.resident = Resident("cuda" if torch.cuda.is_available() else None)
        self.tokenizer_key, self.tokenizer = None, None

    def get(self, base: str | Path, checkpoint: str | Path | None, adapter: bool):
        """(model, tokenizer, adapters on) for ``checkpoint`` (None: the base as it is)."""
        model, adapters_on = self.resident.model(base, checkpoint, adapter)
        source = tokenizer_source(base, checkpoint if checkpoint is not None else base)
        if source != self.tokenizer_key:
            self.tokenizer_key, self.tokenizer = source, load_tokenizer(source)
        return model, self.tokenizer, adapters_on


def load_tokenizer(source: str):
    """The tokenizer padding on the left, with the chat template message prompts are rendered in."""
    from transformers import AutoTokenizer

    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(source))
    tokenizer.padding_side = "left"
    return tokenizer


def render(tokenizer, prompt: str | list[dict]) -> str:
    """A prepared prompt as text: already text (tuneloop's template), or messages rendered by the
    tokenizer's template exactly as TRL renders them in training."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
             adapters_on: bool = True) -> tuple[list[str], list[int]]:
    """Greedy completions (text up to EOS, special tokens dropped) and their new-token counts."""
    import torch

    outputs: list[str] = []
    counts: list[int] = []
    texts = [render(tokenizer, p) for p in prompts]
    off = contextlib.nullcontext() if adapters_on else model.disable_adapter()
    with off, torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new:
                ids = row.tolist()
                n = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
                counts.append(n)
                outputs.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
    return outputs, counts
