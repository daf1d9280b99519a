"""Generate the example data set: short tasks answered in a fixed JSON protocol.

Every answer is ``{"task": <category>, "answer": <string>}``. A tiny model learns the
*protocol* (valid JSON, the two keys, the right task name) quickly; the *answers*
(arithmetic, reversing a word, ...) are harder, which leaves room for the feedback loop.

Like real demonstration data, it is not clean: a share of the ``math`` and ``length``
demonstrations (``--legacy``) come from an older assistant that answered in prose
("18 + 8 = 26"). Every row still carries the right ``reference``. SFT imitates the prose;
rewards that check the protocol and the answer do not, which is what the GRPO phase of the
example shows.

    python examples/make_protocol_data.py --rows 3000 --seed 0 > examples/data/protocol.jsonl
    python examples/make_protocol_data.py --phrasing-suite --rows 12 --seed 1 > examples/suites/phrasings.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "no", "pi", "da", "ve", "zo", "ba", "ne", "fi", "gu"]

PHRASINGS = {
    "math": ["What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."],
    "reverse": ["Reverse the word {w}.", "Spell {w} backwards."],
    "upper": ["Write {w} in capital letters.", "Uppercase {w}."],
    "length": ["How many letters are in {w}?", "Count the letters of {w}."],
}


# Phrasings that appear nowhere in the data set nor in the example's data.augment templates
# (examples/protocol.yaml): the held-out phrasing suite (``--phrasing-suite``) asks the tasks
# this way, to measure whether the protocol carries over to ways of asking never trained on.
HELD_OUT_PHRASINGS = {
    "math": ["Find the sum of {a} and {b}.", "{a} plus {b} makes how much?", "Please add {a} to {b}."],
    "reverse": ["Read {w} from right to left.", "Turn {w} around, letter by letter."],
    "upper": ["Convert {w} to upper case.", "Shout the word {w}."],
    "length": ["Tell me the number of letters in {w}.", "How long is the word {w}?"],
}
SCHEMA = {"type": "object", "required": ["task", "answer"], "additionalProperties": False,
          "properties": {"answer": {"type": "string"}}}


def make_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


LEGACY = {  # the older assistant's prose answers
    "math": "{a} + {b} = {answer}",
    "length": "{w} has {answer} letters.",
}


def make_row(rng: random.Random, legacy: float = 0.0) -> dict:
    task = rng.choice(sorted(PHRASINGS))
    a, b, w = rng.randint(0, 49), rng.randint(0, 49), make_word(rng)
    prompt = rng.choice(PHRASINGS[task]).format(a=a, b=b, w=w)
    answer = {"math": str(a + b), "reverse": w[::-1], "upper": w.upper(), "length": str(len(w))}[task]
    reply = json.dumps({"task": task, "answer": answer})
    if task in LEGACY and rng.random() < legacy:
        reply = LEGACY[task].format(a=a, b=b, w=w, answer=answer)
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
        "category": task,
        "reference": answer,
    }


def phrasing_case(rng: random.Random, task: str) -> dict:
    """A suite case asking ``task`` in a held-out phrasing; it passes when the answer follows
    the protocol with the right task name (the protocol, not the arithmetic)."""
    a, b, w = rng.randint(0, 49), rng.randint(0, 49), make_word(rng)
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "task": {"const": task}}}
    return {"prompt": rng.choice(HELD_OUT_PHRASINGS[task]).format(a=a, b=b, w=w), "category": task,
            "checks": [{"type": "json_schema", "schema": schema}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--legacy", type=float, default=0.4, help="share of math/length demonstrations in prose")
    parser.add_argument("--phrasing-suite", action="store_true", help="write the held-out phrasing suite instead "
                        "(--rows cases per task)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.phrasing_suite:
        for task in sorted(HELD_OUT_PHRASINGS):
            for _ in range(args.rows):
                sys.stdout.write(json.dumps(phrasing_case(rng, task)) + "\n")
        return
    for _ in range(args.rows):
        sys.stdout.write(json.dumps(make_row(rng, args.legacy)) + "\n")


if __name__ == "__main__":
    main()
