"""Anthropic's HH-RLHF preference data as reward-model pairs: `{"chosen", "rejected"}` dialogues per line.

`python -c "from stages.tasks.hh_rlhf import load; print(len(load().pairs))"`

Each record holds two whole dialogues in `\\n\\nHuman: ...\\n\\nAssistant: ...` turns that share every turn
but the last assistant reply. A pair is {prompt: the shared turns as {role, content} messages, chosen:
the last reply of `chosen`, rejected: the last reply of `rejected`}: the annotation export's format, so
the reward stage reads both alike. A record that does not have that shape (no final assistant turn,
dialogues that differ before their last reply, an empty reply, not JSON) is malformed: it is returned
named by `file:line` with the reason, never dropped silently.

The data contains offensive text by design (it is the "harmless" split). Code here reports counts and
reasons only: never log or print the examples themselves.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("../shared/datasets/hh-rlhf/harmless-base-test.jsonl.gz")
ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn starts at a blank line followed by the speaker's name; the text before the first turn must be empty.
_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class MalformedRecord(ValueError):
    """One record is not a pair of dialogues sharing all but their last assistant reply."""


@dataclass
class HHPairs:
    pairs: list[dict[str, Any]]  # prompt (messages), chosen, rejected, source (file:line)
    malformed: list[dict[str, str]] = field(default_factory=list)  # source, reason


def parse_dialogue(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` -> [{role, content}, ...] (contents stripped).

    >>> parse_dialogue("\\n\\nHuman: What is 2 + 2?\\n\\nAssistant: 4.")
    [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': '4.'}]
    >>> parse_dialogue("no turns here")
    Traceback (most recent call last):
    ...
    stages.tasks.hh_rlhf.MalformedRecord: text before the first turn (a turn starts with '\\n\\nHuman: ')
    """
    if not isinstance(text, str):
        raise MalformedRecord(f"dialogue is {type(text).__name__}, not a string")
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise MalformedRecord("text before the first turn (a turn starts with '\\n\\nHuman: ')")
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": ROLES[speaker], "content": content.strip()} for speaker, content in turns]


def to_pair(record: dict[str, Any]) -> dict[str, Any]:
    """One HH record -> {prompt, chosen, rejected}; raises MalformedRecord naming what is wrong.

    >>> hi = "\\n\\nHuman: Hi\\n\\nAssistant: "
    >>> to_pair({"chosen": hi + "Hello!", "rejected": hi + "Go away."})
    {'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': 'Hello!', 'rejected': 'Go away.'}
    >>> to_pair({"chosen": hi + "Hello!", "rejected": "\\n\\nHuman: Bye\\n\\nAssistant: Bye."})
    Traceback (most recent call last):
    ...
    stages.tasks.hh_rlhf.MalformedRecord: chosen and rejected differ before their last assistant reply
    """
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise MalformedRecord(f"missing field {missing[0]!r}")
    turns = {}
    for side in ("chosen", "rejected"):
        try:
            turns[side] = parse_dialogue(record[side])
        except MalformedRecord as e:
            raise MalformedRecord(f"{side}: {e}") from None
        if turns[side][0]["role"] != "user" or turns[side][-1]["role"] != "assistant":
            raise MalformedRecord(f"{side}: must start with a Human turn and end with an Assistant turn")
        if not turns[side][-1]["content"]:
            raise MalformedRecord(f"{side}: the last assistant reply is empty")
    if turns["chosen"][:-1] != turns["rejected"][:-1]:
        raise MalformedRecord("chosen and rejected differ before their last assistant reply")
    return {"prompt": turns["chosen"][:-1], "chosen": turns["chosen"][-1]["content"],
            "rejected": turns["rejected"][-1]["content"]}


def looks_like_hh(record: dict[str, Any]) -> bool:
    """A record in HH's own format: dialogues under chosen/rejected and no separate prompt."""
    chosen = record.get("chosen")
    return "prompt" not in record and isinstance(chosen, str) and chosen.startswith("\n\nHuman:")


def open_text(path: Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def load(path: Path = DEFAULT_PATH, limit: int | None = None) -> HHPairs:
    """Every pair of an HH-format JSONL(.gz) file, and every malformed record named by file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no HH-RLHF file (expected {DEFAULT_PATH} relative to the repository root)")
    out = HHPairs(pairs=[])
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(out.pairs) >= limit:
                break
            if not line.strip():
                continue
            source = f"{path.name}:{line_no}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise MalformedRecord("not a JSON object")
                out.pairs.append({**to_pair(record), "source": source})
            except json.JSONDecodeError:
                out.malformed.append({"source": source, "reason": "not valid JSON"})
            except MalformedRecord as e:
                out.malformed.append({"source": source, "reason": str(e)})
    return out
