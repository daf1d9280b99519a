"""Tokenized train sets kept across the runs of one trainer process (a pool worker's trials).

TRL's SFTTrainer tokenizes, labels and truncates the whole train split in its constructor:
seconds per run, the same work again for every trial of a sweep on the same data. A worker
keeps the last few prepared sets, keyed by everything that preparation reads: the rows, the
tokenizer (its serialized vocabulary, special tokens and chat template) and the SFT settings
that shape the result. Anything else differs: the set is prepared anew.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

KEEP = 2
# SFTConfig fields that change what _prepare_dataset produces.
SHAPING = ("max_length", "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss",
           "dataset_text_field", "truncation_mode", "eos_token", "pad_token", "chat_template_path", "dataset_kwargs")

_kept: OrderedDict[str, object] = OrderedDict()


def key(rows: list[dict], tokenizer, args) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token,
                         tokenizer.padding_side, tokenizer.model_max_length], default=str).encode())
    h.update(json.dumps({f: getattr(args, f, None) for f in SHAPING}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def get(k: str):
    if k in _kept:
        _kept.move_to_end(k)
        return _kept[k]
    return None


def keep(k: str, dataset) -> None:
    _kept[k] = dataset
    _kept.move_to_end(k)
    while len(_kept) > KEEP:
        _kept.popitem(last=False)
