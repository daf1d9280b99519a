"""Generate the second example's data set: arithmetic word problems answered in plain text.

Each answer shows its work on one line and ends with an ``Answer: <number>`` line::

    {"messages": [{"role": "user", "content": "Mia has 7 shells. She finds 5 more. How many shells does Mia have now?"},
                  {"role": "assistant", "content": "7 + 5 = 12\\nAnswer: 12"}],
     "kind": "add"}

No JSON, no reference column: the task (examples/arithmetic.yaml) finds the reference in the
demonstration's ``Answer:`` line and the category in ``kind``. Like real data it is not clean: a
share of the rows (``--prose``) were answered by an older assistant in a sentence, with no
``Answer:`` line; the data-quality gate drops them by the task's format metric.

    python examples/make_arithmetic_data.py --rows 1500 --seed 0 > examples/data/arithmetic.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys

NAMES = ["Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Ivy", "Sam", "Nora", "Eli"]
THINGS = ["apples", "shells", "stickers", "marbles", "books", "coins", "pencils", "cards"]

PROBLEMS = {
    "add": ["{n} has {a} {t}. {p} finds {b} more. How many {t} does {n} have now?",
            "{n} had {a} {t} and got {b} more. How many {t} are there in all?"],
    "subtract": ["{n} has {a} {t}. {p} gives away {b}. How many {t} does {n} have left?",
                 "There were {a} {t}. {n} took {b} of them. How many {t} are left?"],
    "multiply": ["{n} has {a} bags with {b} {t} in each. How many {t} is that in total?",
                 "{n} buys {a} boxes of {t}, {b} in each box. How many {t} does {n} buy?"],
}
OPS = {"add": ("+", lambda a, b: a + b), "subtract": ("-", lambda a, b: a - b), "multiply": ("x", lambda a, b: a * b)}
PROSE = "{n} ends up with {r} {t}."  # the older assistant's answer: right, but no Answer: line


def make_row(rng: random.Random, prose: float = 0.0) -> dict:
    kind = rng.choice(sorted(PROBLEMS))
    if kind == "multiply":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(5, 40), rng.randint(1, 20)
        if kind == "subtract" and b > a:
            a, b = b, a
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    pronoun = "She" if name in ("Mia", "Ana", "Sara", "Ivy", "Nora") else "He"
    symbol, op = OPS[kind]
    result = op(a, b)
    question = rng.choice(PROBLEMS[kind]).format(n=name, p=pronoun, a=a, b=b, t=thing)
    answer = f"{a} {symbol} {b} = {result}\nAnswer: {result}"
    if rng.random() < prose:
        answer = PROSE.format(n=name, r=result, t=thing)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "kind": kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prose", type=float, default=0.1, help="Share of rows answered in prose (no Answer: line).")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for _ in range(args.rows):
        sys.stdout.write(json.dumps(make_row(rng, args.prose)) + "\n")


if __name__ == "__main__":
    main()
