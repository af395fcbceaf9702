"""Chat formatting shared by SFT, DPO, GRPO and evaluation, so all of them see the same prompts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.dataset import meta_of, read_dataset
from stages.tasks import arithmetic
from stages.tasks.arithmetic import Problem

ARITHMETIC = arithmetic.SOURCE


def load_problems(dataset: Path, split: str) -> list[Problem]:
    """The arithmetic problems of one split ("train" / "test") from a collected/cleaned dataset."""
    df = read_dataset(dataset, sources=[ARITHMETIC])
    problems = []
    for _, row in df.iterrows():
        meta = meta_of(row)
        if meta.get("split") == split:
            problems.append(Problem(question=row["text"], answer=int(meta["answer"]), reasoning=meta["reasoning"]))
    if not problems:
        raise ValueError(f"{dataset}: no arithmetic problems with split={split!r} (source {ARITHMETIC!r})")
    return problems


def prompt_text(tokenizer, question: str | list[dict[str, str]]) -> str:
    """The chat prompt up to and including the assistant tag; `question` may be a whole conversation
    (a list of {role, content} messages, as human preference labels of multi-turn chats are)."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, question: str | list[dict[str, str]]) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """The assistant's tokens, ending with the end-of-turn token that stops generation."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prompt_and_response(tokenizer, question: str | list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): the mask is 1 on the assistant's tokens only."""
    p, r = prompt_ids(tokenizer, question), response_ids(tokenizer, response)
    return p + r, [0] * len(p) + [1] * len(r)


# --- multi-turn conversations (SFT's `messages` records) -------------------------------------

ROLES = ("system", "user", "assistant")
# The instruction-data categories of InstructGPT/Dolly; an unlabelled record is "other".
TASK_TYPES = ("generation", "open_qa", "brainstorming", "chat", "rewrite", "summarization", "classification",
              "closed_qa", "extraction", "other")


class TemplateError(ValueError):
    """The chat template does not render a conversation turn by turn (a later render rewrites an earlier one)."""


def record_problem(record: Any) -> str:
    """Why a `{"messages": [...], "task_type": ...}` record cannot be trained on, or "" when it can.

    >>> record_problem({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    ''
    >>> record_problem({"messages": []})
    'empty messages'
    >>> record_problem({"messages": [{"role": "user", "content": "hi"}]})
    'no assistant turn: nothing to learn from'
    """
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    messages = record.get("messages")
    if messages is None:
        return "missing field 'messages'"
    if not isinstance(messages, list):
        return f"field 'messages' is a {type(messages).__name__}, not a list"
    if not messages:
        return "empty messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is a {type(m).__name__}, not an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}]: unknown role {m.get('role')!r} (valid: {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}]: content is {type(m.get('content')).__name__}, not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to learn from"
    task_type = record.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        return f"unknown task_type {task_type!r} (valid: {', '.join(TASK_TYPES)})"
    return ""


def task_type_of(record: dict[str, Any]) -> str:
    return record.get("task_type") or "other"


def read_records(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line, record, "") per JSONL line or Parquet row (1-based), or (line, raw text, reason) for a
    line that is not UTF-8 JSON. Raises FileNotFoundError for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".parquet":
        yield from ((row, rec, "") for row, rec in enumerate(pq.read_table(path).to_pylist(), start=1))
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, raw.decode("utf-8", errors="replace"), f"invalid UTF-8 ({e.reason} at byte {e.start})"
                continue
            try:
                yield line_no, json.loads(line), ""
            except json.JSONDecodeError as e:
                yield line_no, line, f"invalid JSON ({e.msg} at column {e.colno})"


def conversation_ids(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation through the chat template; the mask is 1 on the
    tokens of every assistant turn (its content and the template's end-of-turn), 0 elsewhere.

    The template is rendered up to each turn boundary and each new piece tokenized on its own, so the
    boundaries between prompt and answer are exact for any template that renders turn by turn.
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""

    def extend(text: str, supervised: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise TemplateError("the chat template renders an earlier turn differently once later turns follow")
        piece = tokenizer(text[len(done):], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([supervised] * len(piece))
        done = text

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            extend(render(i, True), 0)  # everything before this answer, up to the assistant tag
            extend(render(i + 1, False), 1)  # the answer and its end-of-turn
    extend(render(len(messages), False), 0)  # turns after the last answer (if any)
    return ids, mask
