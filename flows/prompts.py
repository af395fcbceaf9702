"""Where prompts come from and how a registered model answers them: shared by `flywheel compare`
(a judge picks) and `flywheel queue fill` (people pick).

Prompts: a file when one is given (JSONL with a "prompt" field, a string or a list of chat messages,
or plain text, one prompt per line), otherwise real user prompts sampled from the serving logs and
the rest from the arithmetic test split of a version's training data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.chat import load_problems
from stages.checkpoint import load_model, load_tokenizer
from stages.rollout import sample

PROMPT_SEED = 0  # the same logs and test split give the same prompts: reruns are comparable
ANSWER_BATCH = 16  # prompts per generate() call
SOURCE_FILE, SOURCE_LOGS, SOURCE_TEST = "file", "serving_logs", "arithmetic_test"

Prompt = str | list[dict[str, str]]  # a user question, or chat messages as the serving logs hold them


class PromptsFileError(ValueError):
    """A prompts file that cannot be read as asked; the message names the file and line."""


@dataclass(frozen=True)
class SourcedPrompt:
    prompt: Prompt
    source: str  # SOURCE_FILE, SOURCE_LOGS or SOURCE_TEST


# ----------------------------------------------------------------------------- prompts


def _checked_prompt(value: object) -> Prompt | None:
    """`value` if it is a non-empty question or a list of {role, content} messages ending with the user."""
    if isinstance(value, str):
        return value if value.strip() else None
    if not isinstance(value, list) or not value:
        return None
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return None
    if value[-1]["role"] != "user":  # nothing for the model to answer
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_prompts_file(path: Path) -> list[Prompt]:
    """Prompts from JSONL (`.jsonl`/`.json`: a "prompt" per line) or plain text (one per line).

    Blank lines are skipped; anything else unreadable raises PromptsFileError naming `path:line`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    as_json = path.suffix in (".jsonl", ".json")
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if not as_json:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise PromptsFileError(f"{path}:{number}: not a JSON object ({err})") from None
        prompt = _checked_prompt(record.get("prompt")) if isinstance(record, dict) else None
        if prompt is None:
            raise PromptsFileError(f"{path}:{number}: needs a \"prompt\" that is a non-empty string or a "
                                   "list of {\"role\", \"content\"} messages ending with the user's")
        prompts.append(prompt)
    if not prompts:
        raise PromptsFileError(f"{path}: no prompts")
    return prompts


def serving_log_files(home: Path) -> list[Path]:
    """The router's request log and its rotated predecessors (infra/router.py), oldest first."""
    logs = home / "serving" / "logs"
    rotated = sorted(logs.glob("requests.jsonl.[0-9]*"), key=lambda p: -int(p.suffix[1:]))
    current = logs / "requests.jsonl"
    return rotated + ([current] if current.is_file() else [])


def logged_prompts(files: Sequence[Path]) -> list[Prompt]:
    """Distinct user prompts from serving logs, in first-seen order.

    Lines without a usable prompt are skipped, not errors: a log is what happened (GET requests,
    a line cut by rotation), not input someone wrote for us. So are the platform's own requests
    (marked `client`, e.g. the queue fill asking the champion): they are not users' prompts. A question asked a thousand times
    counts once, so popular prompts do not crowd out the rest of the sample.
    """
    seen, prompts = set(), []
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("client"):  # the platform's own requests
                continue
            prompt = _checked_prompt(record.get("prompt"))
            key = json.dumps(prompt, sort_keys=True)
            if prompt is not None and key not in seen:
                seen.add(key)
                prompts.append(prompt)
    return prompts


def default_prompts(n: int, logs: Sequence[Prompt], dataset: Path, seed: int = PROMPT_SEED) -> list[SourcedPrompt]:
    """Up to n // 2 prompts sampled from the logs, the rest sampled from the arithmetic test split."""
    rng = random.Random(seed)
    from_logs = rng.sample(list(logs), min(len(logs), n // 2))
    chosen = [SourcedPrompt(p, SOURCE_LOGS) for p in from_logs]
    if len(chosen) < n:
        if not dataset.exists():
            raise FileNotFoundError(f"prompt data {dataset} does not exist; pass dataset=<dir> or a prompts "
                                    "file, or `dvc pull` it")
        questions = [p.question for p in load_problems(dataset, "test")]
        chosen += [SourcedPrompt(q, SOURCE_TEST) for q in rng.sample(questions, min(len(questions), n - len(chosen)))]
    return chosen


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def judge_text(prompt: Prompt) -> str:
    """What the judge reads as the user prompt: the question, or the conversation for several turns."""
    messages = as_messages(prompt)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def model_answers(checkpoint: Path, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0) -> list[str]:
    """One answer per prompt through the checkpoint's chat template; temperature 0 is greedy."""
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    answers: list[str] = []
    for lo in range(0, len(texts), ANSWER_BATCH):
        answers += sample(model, tokenizer, texts[lo : lo + ANSWER_BATCH], max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed + lo).texts
    return answers
