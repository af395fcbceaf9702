"""Chat formatting shared by SFT, DPO, GRPO and evaluation, so all of them see the same prompts."""

from __future__ import annotations

from pathlib import Path

from stages.dataset import meta_of, read_dataset
from stages.tasks.arithmetic import Problem

ARITHMETIC = "arithmetic"


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
