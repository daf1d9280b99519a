"""The built-in chat template, shared by data-pipeline (to write prompts), the trainer and
the evaluator (to prompt exactly as in training).

``tuneloop`` is a minimal template the tiny tokenizer knows as special tokens; ``model``
leaves the chat as messages so TRL and the evaluator apply the tokenizer's own template.
"""

from __future__ import annotations

USER, ASSISTANT, END, PAD = "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT]
TEMPLATES = ("tuneloop", "model")


def render_prompt(messages: list[dict]) -> str:
    """Everything before the assistant's answer, ending where generation starts."""
    out = []
    for m in messages:
        tag = ASSISTANT if m["role"] == "assistant" else USER  # system and tool turns are input, as the user's
        out.append(f"{tag}\n{m['content']}\n" if tag == USER else f"{tag}\n{m['content']}{END}\n")
    return "".join(out) + f"{ASSISTANT}\n"


def jinja(end: str = END) -> str:
    """The same template in Jinja, saved with the tokenizer of every checkpoint and export so
    ``apply_chat_template`` prompts an exported model as it was trained: ``end`` closes an
    answer (the tokenizer's eos, which the trainer appends to each completion)."""
    return ("{% for m in messages %}{% if m['role'] == 'assistant' %}" + ASSISTANT + "\n{{ m['content'] }}" + end + "\n"
            "{% else %}" + USER + "\n{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + ASSISTANT + "\n{% endif %}")


JINJA = jinja()
