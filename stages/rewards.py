"""Verifiable rewards: pure functions `(completions, **kw) -> list[float]`.

>>> correctness(["<think>2 + 3 = 5</think> <answer>5</answer>", "<answer>6</answer>"], answers=[5, 5])
[1.0, 0.0]
>>> well_formatted(["<think>x</think> <answer>5</answer>", "5"])
[1.0, 0.0]
>>> combined(["<think>2 + 3 = 5</think> <answer>5</answer>"], answers=[5])
[1.1]
"""

from __future__ import annotations

import re

from stages.tasks.arithmetic import extract_answer

FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>\s*-?\d+\s*</answer>\s*$", re.DOTALL)


def correctness(completions: list[str], *, answers: list[int], **_) -> list[float]:
    """1 when the last <answer> holds exactly the right integer."""
    out = []
    for text, answer in zip(completions, answers, strict=True):
        got = extract_answer(text)
        out.append(1.0 if got is not None and got.strip() == str(answer) else 0.0)
    return out


def well_formatted(completions: list[str], **_) -> list[float]:
    """1 when the completion is exactly `<think>...</think> <answer>integer</answer>`."""
    return [1.0 if FORMAT.match(text) else 0.0 for text in completions]


def combined(completions: list[str], *, answers: list[int], format_weight: float = 0.1, **_) -> list[float]:
    """Correctness plus a small bonus for the format, so early policies get a learning signal."""
    return [round(c + format_weight * f, 6) for c, f in
            zip(correctness(completions, answers=answers), well_formatted(completions), strict=True)]
