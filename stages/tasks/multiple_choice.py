"""Log-likelihood multiple choice: built-in arithmetic questions and MMLU-format CSV files.

Each option is scored as the assistant's reply to the question (the chat prompt of stages/chat.py,
then the option's tokens and the end-of-turn token); the model "answers" with the most likely
option and its confidence is that option's share of the softmax over the options' log-likelihoods.
The end-of-turn token matters: without it "1" would score at least as high as "12", its extension.

- `arithmetic_mc`: an arithmetic test question and four numbers, the answer and three distractors
  a careless solver would give (the other operations on the same operands, off-by-one), scored
  in the `<answer>N</answer>` form the model is trained to reply with. Options are listed in
  ascending order, so the answer's position carries no information.
- `mmlu`: the original MMLU CSVs (`question,A,B,C,D,answer`, no header; a header row is allowed).
  The prompt lists the lettered options and the continuation is the letter, as in the MMLU paper,
  so long and short options compete on equal terms.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stages.chat import prompt_ids, response_ids
from stages.eval_stats import softmax
from stages.rollout import pad_right, token_logprobs
from stages.tasks.arithmetic import Problem

LETTERS = ("A", "B", "C", "D")
_REASONING = re.compile(r"^\s*(\d+)\s*([+\-x])\s*(\d+)\s*=\s*(\d+)\s*$")


class MMLUFormatError(ValueError):
    """An MMLU-format file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class MCQuestion:
    id: str  # stable across runs and checkpoints: what a gate pairs items by
    prompt: str  # the user's message
    options: tuple[str, ...]  # each one the assistant's full reply
    answer: int  # index of the right option


@dataclass(frozen=True)
class MCScore:
    loglikelihoods: tuple[float, ...]
    predicted: int
    confidence: float  # softmax share of the predicted option
    correct: float


def item_id(text: str) -> str:
    """A short content hash: the same question gets the same id in every dataset that holds it.

    >>> item_id("What is 2 + 2?")
    'q-38d46ad3618826cf'
    """
    return "q-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def distractors(problem: Problem, count: int = 3) -> list[int]:
    """Wrong answers a careless solver gives: other operations on the operands, then near misses.

    >>> distractors(Problem(question="?", answer=19, reasoning="12 + 7 = 19"))
    [5, 84, 20]
    >>> distractors(Problem(question="?", answer=0, reasoning="3 - 3 = 0"))  # never negative
    [6, 9, 1]
    """
    m = _REASONING.match(problem.reasoning)
    c = problem.answer
    candidates = []
    if m:
        a, b = int(m.group(1)), int(m.group(3))
        candidates += [a + b, abs(a - b), a * b]
    candidates += [c + 1, c - 1, c + 2, c - 2, c + 10, *range(c + 3, c + 3 + count)]
    out: list[int] = []
    for x in candidates:
        if x >= 0 and x != c and x not in out:
            out.append(x)
    return out[:count]


def arithmetic_mc(problems: Sequence[Problem]) -> list[MCQuestion]:
    """Four numeric options per problem, ascending, each in the `<answer>N</answer>` reply form.

    >>> q = arithmetic_mc([Problem(question="12 and 7?", answer=19, reasoning="12 + 7 = 19")])[0]
    >>> q.options, q.answer
    (('<answer>5</answer>', '<answer>19</answer>', '<answer>20</answer>', '<answer>84</answer>'), 1)
    """
    out = []
    for p in problems:
        numbers = sorted([p.answer, *distractors(p)])
        out.append(MCQuestion(id=item_id(p.question), prompt=p.question,
                              options=tuple(f"<answer>{n}</answer>" for n in numbers),
                              answer=numbers.index(p.answer)))
    return out


def mmlu_prompt(question: str, options: Sequence[str]) -> str:
    """The question with its lettered options, as the MMLU paper prompts.

    >>> print(mmlu_prompt("2 + 2 =", ["3", "4", "5", "22"]))
    2 + 2 =
    A. 3
    B. 4
    C. 5
    D. 22
    Answer:
    """
    lines = [question.strip(), *(f"{letter}. {opt.strip()}" for letter, opt in zip(LETTERS, options, strict=True))]
    return "\n".join([*lines, "Answer:"])


def _is_header(row: list[str]) -> bool:
    return [c.strip().lower() for c in row] == ["question", "a", "b", "c", "d", "answer"]


def load_mmlu_csv(path: Path, limit: int | None = None) -> list[MCQuestion]:
    """Questions of one MMLU-format CSV; item ids are `<file stem>:<line>` (MMLU has duplicate questions).

    Raises FileNotFoundError for a missing file and MMLUFormatError naming the line otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mmlu file {path} does not exist")
    questions: list[MCQuestion] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1  # the physical line a record starts on (a quoted field may span lines)
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or (line == 1 and _is_header(row)):
                    continue
                if len(row) != 6:
                    raise MMLUFormatError(f"{path}:{line}: expected 6 columns question,A,B,C,D,answer, "
                                          f"found {len(row)}")
                answer = row[5].strip().upper()
                if answer not in LETTERS:
                    raise MMLUFormatError(f"{path}:{line}: answer must be one of A, B, C, D, found {row[5]!r}")
                if not row[0].strip() or any(not opt.strip() for opt in row[1:5]):
                    raise MMLUFormatError(f"{path}:{line}: empty question or option")
                questions.append(MCQuestion(id=f"{path.stem}:{line}", prompt=mmlu_prompt(row[0], row[1:5]),
                                            options=LETTERS, answer=LETTERS.index(answer)))
                if limit is not None and len(questions) >= limit:
                    break
        except csv.Error as e:
            raise MMLUFormatError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise MMLUFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not questions:
        raise MMLUFormatError(f"{path}: no questions (an empty file, or a header only)")
    return questions


def _truncate_left(ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int]]:
    # A context longer than the model's window loses its oldest tokens, never the scored option.
    return (ids[-max_len:], mask[-max_len:]) if len(ids) > max_len else (ids, mask)


@torch.no_grad()
def score(model, tokenizer, questions: Sequence[MCQuestion], *, batch_size: int = 32,
          progress: bool = False, desc: str = "multiple choice") -> list[MCScore]:
    """Log-likelihood of every option as the assistant's reply; the argmax is the model's answer."""
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
    seqs: list[tuple[list[int], list[int]]] = []
    for q in questions:
        p = prompt_ids(tokenizer, q.prompt)
        for opt in q.options:
            r = response_ids(tokenizer, opt)
            seqs.append(_truncate_left(p + r, [0] * len(p) + [1] * len(r), max_len))
    sums: list[float] = []
    for lo in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch", disable=not progress,
                   dynamic_ncols=True, mininterval=1.0):
        chunk = seqs[lo : lo + batch_size]
        ids, attn, mask = pad_right([s[0] for s in chunk], tokenizer.pad_token_id, [s[1] for s in chunk])
        logp = token_logprobs(model, ids.to(device), attn.to(device))
        sums += (logp * mask[:, 1:].to(device)).sum(dim=1).tolist()
    out, at = [], 0
    for q in questions:
        ll = tuple(sums[at : at + len(q.options)])
        at += len(q.options)
        probs = softmax(ll)
        pred = max(range(len(ll)), key=ll.__getitem__)
        out.append(MCScore(loglikelihoods=ll, predicted=pred, confidence=probs[pred],
                           correct=float(pred == q.answer)))
    return out
