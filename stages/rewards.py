"""Verifiable rewards: pure functions `(completions, **kw) -> list[float]`.

>>> correctness(["<think>2 + 3 = 5</think> <answer>5</answer>", "<answer>6</answer>"], answers=[5, 5])
[1.0, 0.0]
>>> well_formatted(["<think>x</think> <answer>5</answer>", "5"])
[1.0, 0.0]
>>> combined(["<think>2 + 3 = 5</think> <answer>5</answer>"], answers=[5])
[1.1]
>>> gsm8k_correctness(["<answer>$1,250</answer>", "It is 1250."], answers=["1250", "1250"])
[1.0, 0.0]
"""

from __future__ import annotations

import re

from stages.tasks.arithmetic import extract_answer
from stages.tasks.gsm8k import normalize_number

FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>\s*-?\d+\s*</answer>\s*$", re.DOTALL)
NUMBER_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>\s*-?\$?\d[\d,]*(?:\.\d+)?\s*</answer>\s*$", re.DOTALL)


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


def gsm8k_correctness(completions: list[str], *, answers: list[str], **_) -> list[float]:
    """1 when the last <answer> holds the reference number (GSM8K normalisation: commas, $, a trailing .0).

    Stricter than GSM8K evaluation, which falls back to the last number written: as a reward, that
    fallback would pay a policy for listing many numbers.
    """
    out = []
    for text, answer in zip(completions, answers, strict=True):
        got = extract_answer(text)
        out.append(1.0 if got is not None and normalize_number(got) == normalize_number(str(answer)) else 0.0)
    return out


def combined(completions: list[str], *, answers: list, format_weight: float = 0.1, gsm8k: bool = False,
             **_) -> list[float]:
    """Correctness plus a small bonus for the format, so early policies get a learning signal.
    `gsm8k=True`: GSM8K answers (any number, normalised) instead of the arithmetic task's integers."""
    correct = gsm8k_correctness(completions, answers=answers) if gsm8k else correctness(completions, answers=answers)
    formatted = [1.0 if NUMBER_FORMAT.match(t) else 0.0 for t in completions] if gsm8k else well_formatted(completions)
    return [round(c + format_weight * f, 6) for c, f in zip(correct, formatted, strict=True)]
