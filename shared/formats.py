"""Rows in the formats people already have, as chats (``{"messages": [...]}``): pure mapping.

- ``messages``: TRL's conversational format, ``{"messages": [{"role", "content"}, ...]}``;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value": ...}]}``
  (FastChat, Axolotl's ``type: sharegpt``);
- ``alpaca``: ``{"instruction", "input", "output"}`` (+ ``system``), as Stanford Alpaca.

``columns`` renames what a format reads to the data's own column names (``{"instruction":
"question", "output": "answer"}``, ``{"conversations": "dialog", "from": "speaker"}``). The row's
other columns are kept: the task's checks, categories and references read them.
"""

from __future__ import annotations

FORMATS = ("messages", "sharegpt", "alpaca")

# What each format reads, by default names.
FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "from", "value"),
    "alpaca": ("instruction", "input", "output", "system"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool", "function_response": "tool"}


class FormatError(ValueError):
    """A row that does not have what its format reads; the message names the column."""


def unknown_columns(fmt: str, columns: dict[str, str]) -> list[str]:
    """Keys of ``columns`` that ``fmt`` does not read (a typo would be silently ignored)."""
    return [k for k in columns if k not in FIELDS[fmt]]


def to_chat(row: dict, fmt: str = "messages", columns: dict[str, str] | None = None) -> dict:
    """``row`` as ``{"messages": [...], **other columns}``."""
    name = {f: (columns or {}).get(f, f) for f in FIELDS[fmt]}
    if fmt == "messages":
        if name["messages"] == "messages":
            return row
        if name["messages"] not in row:
            raise FormatError(f"no column {name['messages']!r} (the messages)")
        rest = {k: v for k, v in row.items() if k != name["messages"]}
        return {"messages": row[name["messages"]], **rest}
    if fmt == "sharegpt":
        turns = row.get(name["conversations"])
        if not isinstance(turns, list):
            raise FormatError(f"no list in column {name['conversations']!r} (the conversation)")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or name["from"] not in t or name["value"] not in t:
                raise FormatError(f"{name['conversations']}.{i}: expected {{{name['from']!r}, {name['value']!r}}}")
            who = str(t[name["from"]]).lower()
            if who not in SHAREGPT_ROLES:
                raise FormatError(f"{name['conversations']}.{i}.{name['from']}: unknown speaker {t[name['from']]!r} "
                                  f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
            messages.append({"role": SHAREGPT_ROLES[who], "content": t[name["value"]]})
        rest = {k: v for k, v in row.items() if k != name["conversations"]}
        return {"messages": messages, **rest}
    # alpaca
    for f in ("instruction", "output"):
        if not row.get(name[f]):
            raise FormatError(f"no {f} in column {name[f]!r}")
    prompt = str(row[name["instruction"]])
    if row.get(name["input"]):
        prompt += "\n\n" + str(row[name["input"]])
    messages = [{"role": "system", "content": row[name["system"]]}] if row.get(name["system"]) else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[name["output"]]}]
    rest = {k: v for k, v in row.items() if k not in name.values()}
    return {"messages": messages, **rest}
