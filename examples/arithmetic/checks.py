"""A metric function of the arithmetic task: is the work shown right?

tuneloop calls it with keywords (``prompt``, ``completion``, ``reference`` and the row's
columns; it takes those it names) and reads a bool, a score in [0, 1] or ``(score, reason)``.
"""

from __future__ import annotations

import re

EQUATION = re.compile(r"(-?\d+)\s*([+\-x*])\s*(-?\d+)\s*=\s*(-?\d+)")
ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def work_is_right(completion: str, prompt: str) -> tuple[float, str]:
    """The first equation in the answer is true, uses the numbers of the problem, and its result is the
    final answer: a right answer reached the right way, which `correct` alone cannot tell."""
    eq = EQUATION.search(completion)
    if eq is None:
        return 0.0, "no equation such as '7 + 5 = 12'"
    a, op, b, result = int(eq.group(1)), eq.group(2), int(eq.group(3)), int(eq.group(4))
    value = {"+": a + b, "-": a - b, "x": a * b, "*": a * b}[op]
    if value != result:
        return 0.0, f"{a} {op} {b} is {value}, not {result}"
    numbers = {int(n) for n in re.findall(r"\d+", prompt)}
    if not {a, b} <= numbers:
        return 0.0, f"{a} and {b} are not both numbers of the problem"
    final = ANSWER.search(completion)
    if final is None or int(final.group(1)) != result:
        return 0.0, f"the answer line does not give the result {result}"
    return 1.0, ""
