"""Blocks that tuneloop writes into files otherwise kept by hand (nats.conf's permissions, the
docs' tables, the README's transcripts): the text between two marker lines is replaced, the
rest is kept as written."""

from __future__ import annotations


def replace_block(text: str, begin: str, end: str, body: str, where: str = "the file", note: str = "") -> str:
    """``text`` with ``body`` between its ``begin`` and ``end`` markers (``note`` after
    ``begin`` on its line); a ValueError naming ``where`` if either marker is missing."""
    if begin not in text or end not in text:
        raise ValueError(f"{where} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}{note}\n{body}\n{end}{rest.split(end, 1)[1]}"
