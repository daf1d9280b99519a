"""Loading a checkpoint and generating answers: batched greedy decoding with left padding."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneloop.models import load_model, tokenizer_source

log = logging.getLogger(__name__)


def load_for_eval(base: str | Path, checkpoint: str | Path, adapter: bool):
    """Model in eval mode (on the GPU when there is one) and its tokenizer, padding on the left."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(base, checkpoint))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = load_model(base, checkpoint, adapter)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[list[str], list[int]]:
    """Greedy completions (text up to EOS, special tokens dropped) and their new-token counts."""
    import torch

    outputs: list[str] = []
    counts: list[int] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row in new:
            ids = row.tolist()
            n = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            counts.append(n)
            outputs.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
    return outputs, counts
