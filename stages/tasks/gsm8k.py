"""GSM8K-format grade-school math: `{"question", "answer"}` per JSONL line, the number after `#### `.

`python -c "from stages.tasks.gsm8k import load_gsm8k; print(load_gsm8k('../shared/datasets/gsm8k/train.jsonl', 1))"`

`sft_records` turns problems into the `messages` records SFT trains on (`flywheel stage sft gsm8k=FILE ...`).

The reference reasoning carries calculator annotations (`48/2 = <<48/2=24>>24`) that the original
authors used to drive a calculator at sampling time; they are stripped here, since no model of ours
is trained to emit them. Scoring is exact match of the final number after normalization (commas,
a dollar sign, a trailing `.0` do not count as differences).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stages.tasks.arithmetic import extract_answer

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
FINAL = "#### "


class GSM8KFormatError(ValueError):
    """A GSM8K-format file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class GSM8KProblem:
    id: str  # `<file stem>:<line>`: stable for the same file
    question: str
    answer: str  # the normalized final number
    reasoning: str  # the reference solution without calculator annotations or the final line


def strip_calculator(text: str) -> str:
    """Drop `<<expression=result>>` annotations.

    >>> strip_calculator("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    'Natalia sold 48/2 = 24 clips in May.'
    """
    return _CALCULATOR.sub("", text)


def normalize_number(text: str) -> str:
    """One spelling per number: no thousands commas, no dollar sign, no trailing zeros or period.

    >>> [normalize_number(s) for s in ["1,000", "$18", "72.0", " 5. ", "-3", "0.50"]]
    ['1000', '18', '72', '5', '-3', '0.5']
    """
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def final_answer(solution: str) -> str | None:
    """The normalized number after the last `#### `, or None when there is none.

    >>> final_answer("48 + 24 = <<48+24=72>>72 clips.\\n#### 72")
    '72'
    >>> final_answer("no final line") is None
    True
    """
    if FINAL not in solution:
        return None
    tail = solution.rsplit(FINAL, 1)[1].strip()
    return normalize_number(tail.splitlines()[0]) if tail else None


def extract_prediction(completion: str) -> str | None:
    """A model's final number: its `<answer>`, else a `#### ` line, else the last number it wrote.

    >>> extract_prediction("<think>48 / 2 = 24</think> <answer>72</answer>")
    '72'
    >>> extract_prediction("So she earned $1,250 in total.\\n#### 1,250"), extract_prediction("It is 3, then 4.")
    ('1250', '4')
    >>> extract_prediction("no idea") is None
    True
    """
    tagged = extract_answer(completion)
    if tagged is not None:
        return normalize_number(tagged)
    if FINAL in completion:
        return final_answer(completion)
    numbers = _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the reference answer.

    >>> is_correct("<answer>72.0</answer>", "72"), is_correct("<answer>71</answer>", "72")
    (1.0, 0.0)
    """
    return 1.0 if extract_prediction(completion) == normalize_number(answer) else 0.0


def load_gsm8k(path: Path, limit: int | None = None) -> list[GSM8KProblem]:
    """Problems of one GSM8K-format JSONL file (blank lines skipped), in file order.

    Raises FileNotFoundError for a missing file and GSM8KFormatError naming the line otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k file {path} does not exist")
    problems: list[GSM8KProblem] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GSM8KFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                    or not isinstance(row.get("answer"), str):
                raise GSM8KFormatError(f"{where}: expected an object with string fields \"question\" and \"answer\"")
            answer = final_answer(row["answer"])
            if not answer:
                raise GSM8KFormatError(f"{where}: the answer has no final line '#### <number>'")
            reasoning = strip_calculator(row["answer"].rsplit(FINAL, 1)[0]).strip()
            problems.append(GSM8KProblem(id=f"{path.stem}:{line_no}", question=row["question"].strip(),
                                         answer=answer, reasoning=reasoning))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise GSM8KFormatError(f"{path}: no problems (the file is empty)")
    return problems


def sft_records(problems: list[GSM8KProblem]) -> list[dict]:
    """SFT `messages` records: the question as the user's turn, the reference solution as the
    assistant's in the format the rewards check (`<think>reasoning</think> <answer>number</answer>`).

    >>> p = GSM8KProblem(id="train:1", question="2 + 3?", answer="5", reasoning="2 + 3 = 5")
    >>> sft_records([p])[0]["messages"][1]["content"]
    '<think>2 + 3 = 5</think> <answer>5</answer>'
    """
    return [{"messages": [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": f"<think>{p.reasoning}</think> <answer>{p.answer}</answer>"}],
             "task_type": "closed_qa", "id": p.id} for p in problems]
