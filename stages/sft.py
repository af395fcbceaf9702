"""Supervised fine-tuning on chat examples, with the loss on the assistant's tokens only.

    flywheel stage sft dataset=data/clean policy=<checkpoint> output_dir=/tmp/sft train.max_steps=50
    flywheel stage sft dataset=data/clean replay_fraction=0.125 tokens=data/tokens policy=<ckpt> output_dir=/tmp/sft
    flywheel stage sft messages=chats.jsonl replay_fraction=0 policy=<ckpt> output_dir=/tmp/sft packing=true
    flywheel stage sft gsm8k=../shared/datasets/gsm8k/train.jsonl replay_fraction=0 policy=<ckpt> output_dir=/tmp/sft lora.r=64

Examples come from one of three places:
- `messages`: a JSONL/Parquet file of `{"messages": [{"role", "content"}, ...], "task_type": ...}`
  records (multi-turn; roles system/user/assistant; task types in stages.chat.TASK_TYPES, missing =
  "other"), rendered through the tokenizer's chat template with the loss on every assistant turn;
- `gsm8k`: a GSM8K-format file, each problem answered with its reference reasoning in <think> and the
  number in <answer> (stages.tasks.gsm8k.sft_records);
- by default, the arithmetic problems of `dataset`'s train split, answered the same way (closed_qa).
Records that cannot be trained on (empty or malformed messages, no assistant turn, longer than
`seq_len`) go to `<output_dir>/quarantine.jsonl` naming file:line and the reason; the task-type mix
goes to `<output_dir>/sft_data_report.json` and the metrics `data/task_type/<type>`.

`packing=true` concatenates examples into rows of `seq_len` tokens. Positions restart at every example
and no token attends across examples: with `position_ids` and no 2D attention mask, transformers'
mask builder reads the restarts as sequence boundaries and makes the causal mask block-diagonal.
Every batch carries `loss_tokens` per row, so gradient accumulation averages over the whole batch's
assistant tokens. `lora.r > 0` trains a LoRA adapter instead of every weight (stages/lora.py).

`replay_fraction > 0` fills that share of every batch with windows of pretraining text (loss on every
token) from the training split of `tokens`, the tokenize stage's shards (memory-mapped: nothing is
tokenized here); the windows of a step are pretraining's batch of that step, a function of
(train.seed, step), so resuming replays the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages.chat import (TASK_TYPES, TemplateError, conversation_ids, load_problems, read_records, record_problem,
                         task_type_of)
from stages.config import to_dict
from stages.dataset import write_atomically, write_jsonl
from stages.lora import LoraConfig
from stages.pretrain import check_tokenizer, lm_loss
from stages.tasks.arithmetic import target
from stages.tasks.gsm8k import load_gsm8k, sft_records
from stages.token_shards import TokenShards
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, pick_device, tune_policy

REPORT = "sft_data_report.json"
QUARANTINE = "quarantine.jsonl"
RAW_CHARS = 200  # quarantine keeps a prefix of a bad record: enough to debug, not a second copy


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    policy: Path  # checkpoint to start from
    output_dir: Path
    dataset: Path | None = None  # arithmetic problems (the default examples)
    messages: Path | None = None  # chat records (JSONL/Parquet); replaces the arithmetic examples
    gsm8k: Path | None = None  # a GSM8K-format JSONL; replaces the arithmetic examples
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-3, warmup_steps=5))
    batch_size: int = 16  # rows per step: examples, or packed rows with `packing`
    seq_len: int = 0  # longest example, and the packed row length; 0 = the model's context
    packing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)  # r=0: full fine-tuning
    # Share of each batch that replays pretraining text (loss on every token): without it a small
    # model forgets language while it learns the chat format.
    replay_fraction: float = 0.0
    replay_seq_len: int = 64
    # The tokenize stage's output the replay rows come from: its training split only, so replay never
    # sees the held-out documents that evaluation measures perplexity on.
    tokens: Path | None = None
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"sft.replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.messages is not None and self.gsm8k is not None:
            raise ValueError("sft.messages and sft.gsm8k are two sources of examples: set one of them")
        if self.dataset is None and self.messages is None and self.gsm8k is None:
            raise ValueError("sft: set sft.dataset (arithmetic examples), sft.messages or sft.gsm8k")
        if self.replay_fraction and self.tokens is None:
            raise ValueError(f"sft.replay_fraction={self.replay_fraction} replays pretraining text from token shards: "
                             "set sft.tokens=<a tokenize stage's output> or sft.replay_fraction=0")
        if self.replay_fraction and self.replay_seq_len < 2:
            raise ValueError(f"sft.replay_seq_len must be >= 2 (a token and the next one), got {self.replay_seq_len}")
        if self.seq_len < 0 or self.batch_size < 1:
            raise ValueError(f"sft.seq_len must be >= 0 and sft.batch_size >= 1, got {self.seq_len}, {self.batch_size}")


@dataclass(frozen=True)
class SFTResult:
    checkpoint: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class Example:
    ids: list[int]
    mask: list[int]  # 1 on the tokens the loss covers
    task_type: str


# --- examples ----------------------------------------------------------------------------------


def _quarantined(file: Any, line: int | None, reason: str, raw: Any) -> dict[str, Any]:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return {"file": str(file), "line": line, "reason": reason, "raw": text[:RAW_CHARS]}


def source_records(cfg: SFTConfig) -> tuple[str, list[tuple[str, int | None, Any, str]]]:
    """(source name, [(file, line, record, reason the line could not be read or "")]), before any check."""
    if cfg.messages is not None:
        if not Path(cfg.messages).is_file():
            raise FileNotFoundError(f"sft.messages: {cfg.messages} does not exist")
        return "messages", [(str(cfg.messages), line, rec, bad) for line, rec, bad in read_records(cfg.messages)]
    if cfg.gsm8k is not None:
        if not Path(cfg.gsm8k).is_file():
            raise FileNotFoundError(f"sft.gsm8k: {cfg.gsm8k} does not exist")
        records = sft_records(load_gsm8k(cfg.gsm8k))  # a malformed line is an error naming it
        return "gsm8k", [(str(cfg.gsm8k), int(r["id"].rsplit(":", 1)[1]), r, "") for r in records]
    problems = load_problems(cfg.dataset, "train")
    records = [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": target(p)}],
                "task_type": "closed_qa"} for p in problems]
    return "arithmetic", [(str(cfg.dataset), None, r, "") for r in records]


def encode_examples(tokenizer, located: list[tuple[str, int | None, Any, str]], max_len: int
                    ) -> tuple[list[Example], list[dict[str, Any]]]:
    """Encoded examples and quarantine entries (malformed records, conversations over `max_len` tokens)."""
    examples, quarantine = [], []
    for file, line, rec, reason in located:
        reason = reason or record_problem(rec)
        if not reason:
            try:
                ids, mask = conversation_ids(tokenizer, rec["messages"])
            except TemplateError as e:
                reason = str(e)
        if not reason and len(ids) > max_len:
            reason = f"{len(ids)} tokens, longer than the context of {max_len} (sft.seq_len)"
        if reason:
            quarantine.append(_quarantined(file, line, reason, rec))
            continue
        examples.append(Example(ids=ids, mask=mask, task_type=task_type_of(rec)))
    return examples, quarantine


def pack(examples: list[Example], seq_len: int, seed: int) -> list[list[Example]]:
    """Examples in a seeded random order, filled greedily into rows of at most `seq_len` tokens."""
    order = np.random.default_rng([seed, 0x5F7]).permutation(len(examples))
    rows: list[list[Example]] = []
    used = seq_len  # forces a first row
    for i in order:
        ex = examples[i]
        if used + len(ex.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.ids)
    return rows


def collate(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, width: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-padded tensors for rows of one or more (ids, loss mask) segments.

    `position_ids` restart at 0 with every segment (and for the padding); `labels` are the ids where
    the mask is 1 and -100 elsewhere, and never on the first token of a row's second or later segment
    (no prediction crosses a boundary); `loss_tokens` counts the labels the shifted loss uses per row.
    """
    width = width or max(sum(len(ids) for ids, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg_ids, seg_mask in row:
            n = len(seg_ids)
            seg = torch.tensor(seg_ids, dtype=torch.long)
            ids[r, at:at + n] = seg
            keep = torch.tensor(seg_mask, dtype=torch.bool)
            if at:  # predicted from the previous example's last token: not a target
                keep[0] = False
            labels[r, at:at + n] = seg.masked_fill(~keep, -100)
            positions[r, at:at + n] = torch.arange(n)
            attention[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own, attending to nothing real
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": attention,
            "loss_tokens": (labels[:, 1:] != -100).sum(1)}


def packed_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss over the labelled tokens of packed rows.

    No 2D attention mask on purpose: given restarting `position_ids` and no mask, transformers builds a
    block-diagonal causal mask (tests/stages/test_sft.py checks it against each example run alone).
    """
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False)
    return out.loss, {}


def data_report(source: str, cfg: SFTConfig, examples: list[Example], quarantine: list[dict[str, Any]],
                packed_rows: list[list[Example]] | None, seq_len: int) -> dict[str, Any]:
    counts = {t: 0 for t in TASK_TYPES}
    loss_tokens = {t: 0 for t in TASK_TYPES}
    for ex in examples:
        counts[ex.task_type] += 1
        loss_tokens[ex.task_type] += sum(ex.mask)
    report: dict[str, Any] = {
        "source": source, "file": str(cfg.messages or cfg.gsm8k or cfg.dataset), "examples": len(examples),
        "quarantined": len(quarantine), "tokens": sum(len(ex.ids) for ex in examples),
        "loss_tokens": sum(loss_tokens.values()), "seq_len": seq_len,
        "task_types": {t: {"examples": counts[t], "share": counts[t] / len(examples), "loss_tokens": loss_tokens[t]}
                       for t in TASK_TYPES},
    }
    if packed_rows is not None:
        report["packing"] = {"rows": len(packed_rows),
                             "fill": report["tokens"] / (len(packed_rows) * seq_len)}  # share of row slots used
    return report


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    metrics = {f"data/task_type/{t}": float(v["examples"]) for t, v in report["task_types"].items()}
    metrics |= {"data/examples": float(report["examples"]), "data/quarantined": float(report["quarantined"])}
    if "packing" in report:
        metrics["data/packing_fill"] = report["packing"]["fill"]
    return metrics


# --- pretraining replay ------------------------------------------------------------------------


def replay_shards(cfg: SFTConfig, tokenizer) -> TokenShards:
    """The training split of `cfg.tokens`, refused if the policy's tokenizer did not make it or it
    holds no window of `replay_seq_len` tokens."""
    shards = TokenShards(cfg.tokens, "train")
    check_tokenizer(shards, cfg.policy, tokenizer)
    if shards.windows_per_epoch(cfg.replay_seq_len - 1) == 0:
        raise ValueError(f"{shards.root}: {len(shards)} training tokens, no window of "
                         f"sft.replay_seq_len={cfg.replay_seq_len}")
    return shards


def replay_windows(shards: TokenShards, step: int, cfg: SFTConfig) -> np.ndarray:
    """The replay rows of `step`: `replay_seq_len` tokens each, a pure function of (train.seed, step).

    Pretraining's batch of the same step (TokenShards.batch_at: windows of an epoch in a seeded
    permutation), so a resumed run replays exactly the windows an uninterrupted one would. A window
    of `replay_seq_len - 1` inputs and their next tokens is `replay_seq_len` tokens of text; the model
    shifts the labels itself here.
    """
    n = round(cfg.batch_size * cfg.replay_fraction)
    b = shards.batch_at(step, cfg.replay_seq_len - 1, n, cfg.train.seed)
    return np.concatenate([b["input_ids"], b["targets"][:, -1:]], axis=1)


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: SFTConfig, tracker: Tracker | None = None) -> SFTResult:
    tracker = tracker or NullTracker()
    out = Path(cfg.output_dir)
    device = pick_device()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    source, located = source_records(cfg)  # a missing file fails here, before the model loads
    n_replay = round(cfg.batch_size * cfg.replay_fraction)
    replay = replay_shards(cfg, tokenizer) if n_replay else None  # so do foreign or too short shards
    model = ckpt.load_policy(cfg.policy, cfg.lora, device=device, where="sft.lora", seed=cfg.train.seed)
    context = model.config.max_position_embeddings
    if cfg.seq_len > context:
        raise ValueError(f"sft.seq_len={cfg.seq_len} exceeds the model's context of {context} tokens")
    seq_len = cfg.seq_len or context
    if cfg.packing and n_replay and cfg.replay_seq_len > seq_len:
        raise ValueError(f"sft.replay_seq_len={cfg.replay_seq_len} must fit a packed row of sft.seq_len={seq_len}")

    examples, quarantine = encode_examples(tokenizer, located, seq_len)
    write_jsonl(quarantine, out / QUARANTINE)
    if not examples:
        first = f"; first: {quarantine[0]['file']}:{quarantine[0]['line']}: {quarantine[0]['reason']}" if quarantine else ""
        raise ValueError(f"sft: no trainable examples in {source} ({len(quarantine)} quarantined to "
                         f"{out / QUARANTINE}{first})")
    rows = pack(examples, seq_len, cfg.train.seed) if cfg.packing else None
    report = data_report(source, cfg, examples, quarantine, rows, seq_len)
    write_atomically(out / REPORT, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    data_metrics = report_metrics(report)
    tracker.log_params({"stage": "sft", **to_dict(cfg), "data/examples": len(examples)})
    tracker.log_metrics(data_metrics, step=0)

    # Each batch row: one example, or with packing one packed row; replay rows are one shard window.
    units = [[(ex.ids, ex.mask) for ex in row] for row in rows] if rows is not None \
        else [[(ex.ids, ex.mask)] for ex in examples]

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([cfg.train.seed, step])
        picked = [units[i] for i in rng.integers(0, len(units), size=cfg.batch_size - n_replay)]
        if replay is not None:
            picked += [[(w, [1] * len(w))] for w in replay_windows(replay, step, cfg).tolist()]
        batch = collate(picked, tokenizer.pad_token_id, seq_len if cfg.packing else None)
        if cfg.packing:
            del batch["attention_mask"]  # the restarting position_ids carry the example boundaries
        else:
            del batch["position_ids"]  # one example per row: right padding needs nothing but the mask
        return batch

    def loss_fn(m, b):
        return packed_lm_loss(m, b) if cfg.packing else lm_loss(m, b)

    train_cfg = cfg
    if cfg.lora.quantize == "4bit" and cfg.train.compile == "auto":
        # bitsandbytes' 4-bit matmuls under torch.compile are not proven here: QLoRA runs eager unless asked.
        train_cfg = replace(cfg, train=replace(cfg.train, compile="off"))
    result = tune_policy("sft", train_cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["train/loss"])
    return SFTResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics={**data_metrics, **result.metrics})
