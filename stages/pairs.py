"""Preference pairs, shared by the reward model and DPO: read, checked, quarantined, tokenised.

A pairs file is JSONL, JSONL.gz or Parquet with prompt, chosen, rejected and an optional numeric
`margin` (the annotation export's format); `prompt` is a string or {role, content} messages, and a
file in HH-RLHF's own dialogue format is converted by stages/tasks/hh_rlhf.py. A record with chosen
equal to rejected, a missing or empty field, or more tokens than the context is quarantined with its
file:line and the reason; without a file, pairs are synthesised from the arithmetic train split.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages.chat import load_problems, prompt_ids, response_ids
from stages.tasks import hh_rlhf
from stages.tasks.arithmetic import Problem, target

REQUIRED = ("prompt", "chosen", "rejected")


def synthetic_pairs(problems: list[Problem], seed: int) -> list[dict[str, str]]:
    """One pair per problem: the correct, formatted answer against a plausible bad one."""
    rng = random.Random(seed)
    pairs = []
    for p in problems:
        wrong = p.answer + rng.choice([-2, -1, 1, 2, 10])
        # Every rejected answer is wrong: a rejected text that contained the right number would
        # teach the policy to avoid the right number.
        rejected = rng.choice([
            f"<think>{p.reasoning.rsplit('=', 1)[0]}= {wrong}</think> <answer>{wrong}</answer>",  # wrong result
            f"<answer>{wrong}</answer>",  # wrong, and no reasoning
        ])
        pairs.append({"prompt": p.question, "chosen": target(p), "rejected": rejected})
    return pairs


@dataclass(frozen=True)
class EncodedPair:
    source: str  # file:line (or synthetic:<index>)
    prompt_key: str  # the prompt as JSON: pairs of the same prompt stay on the same side of the split
    chosen: list[int]  # prompt + chosen answer
    rejected: list[int]
    margin: float
    prompt_len: int = 0  # the prompt's tokens at the start of both: the answers' loss mask starts there

    def masks(self) -> tuple[list[int], list[int]]:
        """Loss masks of chosen and rejected: 1 on the answer tokens."""
        return ([0] * self.prompt_len + [1] * (len(self.chosen) - self.prompt_len),
                [0] * self.prompt_len + [1] * (len(self.rejected) - self.prompt_len))


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(file:line, record) of a JSONL(.gz) or Parquet file; a line that is not JSON is kept as None."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference pairs: {path} does not exist")
    if path.suffix == ".parquet":
        rows = json.loads(pd.read_parquet(path).to_json(orient="records"))  # plain Python values, not numpy
        return [(f"{path.name}:{i}", row) for i, row in enumerate(rows, 1)]
    out = []
    with hh_rlhf.open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((f"{path.name}:{line_no}", json.loads(line)))
                except json.JSONDecodeError:
                    out.append((f"{path.name}:{line_no}", None))
    return out


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "prompt: empty"
    if isinstance(prompt, list):
        if not prompt:
            return "prompt: empty message list"
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in prompt):
            return None
        return "prompt: messages must be {role, content} objects with string values"
    if prompt is None:
        return "prompt: missing"
    return f"prompt: must be a string or a message list, got {type(prompt).__name__}"


def check_pair(record: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(pair, None) for a usable record, (None, reason) otherwise. HH-format dialogues are converted."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if hh_rlhf.looks_like_hh(record):
        try:
            record = hh_rlhf.to_pair(record)
        except hh_rlhf.MalformedRecord as e:
            return None, f"hh-rlhf: {e}"
    problem = _prompt_problem(record.get("prompt"))
    if problem:
        return None, problem
    for side in ("chosen", "rejected"):
        value = record.get(side)
        if not isinstance(value, str) or not value.strip():
            return None, f"{side}: missing or empty"
    if record["chosen"].strip() == record["rejected"].strip():
        return None, "chosen equals rejected: no preference to learn"
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)
                               or not math.isfinite(margin)):
        return None, f"margin: not a finite number ({margin!r})"
    return record, None


def load_pairs(cfg: Any) -> list[tuple[str, Any]]:
    """(source, record) of every pair of `cfg.pairs`, or synthetic ones from `cfg.dataset` (seeded by
    `cfg.train.seed`); one clear error when the file lacks a required column."""
    if cfg.pairs is None:
        pairs = synthetic_pairs(load_problems(cfg.dataset, "train"), cfg.train.seed)
        return [(f"synthetic:{i}", p) for i, p in enumerate(pairs)]
    records = read_records(cfg.pairs)
    dicts = [r for _, r in records if isinstance(r, dict)]
    if not any(hh_rlhf.looks_like_hh(r) for r in dicts):
        present = set().union(*dicts) if dicts else set()
        missing = [c for c in REQUIRED if c not in present]
        if missing:
            raise ValueError(f"{cfg.pairs}: preference pairs need columns {', '.join(REQUIRED)} "
                             f"(and optionally margin); missing {', '.join(missing)}")
    return records


def encode_pairs(records: list[tuple[str, Any]], tokenizer, max_len: int, margin: float
                 ) -> tuple[list[EncodedPair], list[dict[str, Any]]]:
    """(usable pairs as token ids, quarantined records with their source and reason)."""
    kept, quarantined = [], []
    for source, record in records:
        pair, reason = check_pair(record)
        if pair is not None:
            p = prompt_ids(tokenizer, pair["prompt"])
            chosen = p + response_ids(tokenizer, pair["chosen"])
            rejected = p + response_ids(tokenizer, pair["rejected"])
            longest = max(len(chosen), len(rejected))
            if longest > max_len:
                reason = f"prompt + answer is {longest} tokens, more than max_len={max_len}"
            else:
                kept.append(EncodedPair(source, json.dumps(pair["prompt"], sort_keys=True), chosen, rejected,
                                        margin + float(pair.get("margin") or 0.0), prompt_len=len(p)))
        if reason:
            quarantined.append({"source": source, "reason": reason, "record": record})
    return kept, quarantined
