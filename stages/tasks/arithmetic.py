"""Verifiable arithmetic word problems, generated offline and deterministically.

`python -c "from stages.tasks.arithmetic import generate; print(generate(3))"`

The reasoning-RL stage needs a task whose answers a program can check; these are it. Operands stay
small (at most 20, products of at most 10 x 10) so a model of a few million parameters can learn
something in minutes on a CPU, and every answer is a non-negative integer so that exact string
comparison of `extract_answer` output is the whole reward function.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SOURCE = "arithmetic"  # the `source` of the generated problems in a dataset (what evaluation reads back)

NAMES = (
    "Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira",
    "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
)
OBJECTS = (
    "apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "shells", "cards",
    "balloons", "stamps", "oranges", "toy cars", "flowers", "buttons", "eggs",
)
CONTAINERS = ("boxes", "bags", "baskets", "jars", "shelves", "trays")

# Several phrasings per operation: a model should learn the arithmetic, not one sentence.
ADD = (
    "{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?",
    "{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did {name} pick in total?",
    "There are {a} {obj} on the table and {name} puts {b} more on it. How many {obj} are on the table?",
)
SUB = (
    "{name} has {a} {obj}. {name} gives {b} of them to a friend. How many {obj} does {name} have left?",
    "There were {a} {obj} in the room. {name} took {b} away. How many {obj} are still in the room?",
    "{name} bought {a} {obj} and lost {b} of them on the way home. How many {obj} does {name} still have?",
)
MUL = (
    "{name} has {a} {box} with {b} {obj} in each. How many {obj} does {name} have altogether?",
    "{name} buys {a} packs of {obj}. Each pack holds {b} {obj}. How many {obj} did {name} buy?",
    "There are {a} {box} and every one of them holds {b} {obj}. How many {obj} are there in all?",
)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    reasoning: str  # the one calculation that solves it, e.g. "12 + 7 = 19"


def _one(rng: random.Random) -> Problem:
    name, obj, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        template, answer = rng.choice(ADD), a + b
    elif op == "-":
        a = rng.randint(2, 20)
        b = rng.randint(1, a)  # never more than there is: answers stay non-negative
        template, answer = rng.choice(SUB), a - b
    else:
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        template, answer = rng.choice(MUL), a * b
    question = template.format(name=name, obj=obj, box=box, a=a, b=b)
    sign = {"+": "+", "-": "-", "*": "x"}[op]
    return Problem(question=question, answer=answer, reasoning=f"{a} {sign} {b} = {answer}")


def generate(n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct problems; the same `(n, seed)` always gives the same list.

    >>> p = generate(2, seed=1)
    >>> p == generate(2, seed=1), len({q.question for q in p})
    (True, 2)
    >>> all(q.answer >= 0 and q.reasoning.endswith(f"= {q.answer}") for q in generate(500))
    True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    # The template space holds well over 100k distinct questions; the cap only stops a runaway
    # request for more than that from looping forever.
    for _ in range(max(1000, 50 * n)):
        if len(problems) == n:
            break
        p = _one(rng)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    if len(problems) < n:
        raise ValueError(f"could only generate {len(problems)} distinct problems, asked for {n}")
    return problems


def split_of(question: str, test_fraction: float) -> str:
    """"train" or "test", stable across processes and Python versions (`hash()` is salted).

    >>> split_of("What is 2 + 2?", 0.0), split_of("What is 2 + 2?", 1.0)
    ('train', 'test')
    """
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def target(problem: Problem) -> str:
    """The assistant answer a model is trained to produce.

    >>> target(Problem(question="?", answer=19, reasoning="12 + 7 = 19"))
    '<think>12 + 7 = 19</think> <answer>19</answer>'
    """
    return f"<think>{problem.reasoning}</think> <answer>{problem.answer}</answer>"


def extract_answer(text: str) -> str | None:
    """Stripped content of the last `<answer>...</answer>`, or None.

    >>> extract_answer("<think>3 x 4 = 12</think> <answer> 12 </answer>")
    '12'
    >>> extract_answer("<answer>1</answer> no, <answer>2</answer>")
    '2'
    >>> extract_answer("twelve") is None
    True
    """
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None
