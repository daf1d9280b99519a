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


def teacher_forced(model, tokenizer, prompts: list, completions: list, batch_size: int,
                   adapters_on: bool = True) -> list[tuple[float, int]]:
    """Each demonstration's summed token NLL and its token count, given its prompt: the held-out
    loss of ``eval_loss`` and ``perplexity``, computed as training computes it (prompt tokens
    masked, the completion rendered by the same template, its end-of-turn token included)."""
    import torch

    pairs = []
    for p, c in zip(prompts, completions):
        prompt = render(tokenizer, p)
        if isinstance(c, list):  # conversational: the whole chat by the template, the prompt's text a prefix of it
            full = tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
            answer = full[len(prompt):] if full.startswith(prompt) else "".join(m.get("content", "") for m in c)
        else:
            answer = c + (tokenizer.eos_token or "")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        pairs.append((p_ids, a_ids))
    out: list[tuple[float, int]] = []
    off = contextlib.nullcontext() if adapters_on else model.disable_adapter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with off, torch.no_grad():
        step = min(batch_size, 16)  # logits of a whole vocabulary per position: keep the batch small
        for i in range(0, len(pairs), step):
            batch = pairs[i:i + step]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (p, a) in enumerate(batch):  # right padding: positions as in training
                seq = p + a
                ids[j, :len(seq)] = torch.tensor(seq)
                labels[j, len(p):len(seq)] = torch.tensor(a)
                mask[j, :len(seq)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                                    reduction="none")
            for j in range(len(batch)):
                n = int((shift_labels[j] != -100).sum())
                out.append((float(nll[j].sum()), n))
    return out
