"""Supervised fine-tuning on chat examples, with the loss on the assistant's tokens only.

    flywheel stage sft dataset=data/clean policy=<checkpoint> output_dir=/tmp/sft train.max_steps=50

The default examples are the arithmetic problems of the train split, answered with a short
reasoning in <think> and the number in <answer>: the format the RL stage later rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_and_response
from stages.config import to_dict
from stages.pretrain import lm_loss, tokenize_corpus, windows_at
from stages.rollout import pad_right
from stages.tasks.arithmetic import target
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, tune_policy


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    dataset: Path  # a dataset with arithmetic problems (source "arithmetic", meta split/answer/reasoning)
    policy: Path  # checkpoint to start from
    output_dir: Path
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-3, warmup_steps=5))
    batch_size: int = 16
    # Share of each batch that replays pretraining text (loss on every token): without it a small
    # model forgets language while it learns the chat format.
    replay_fraction: float = 0.0
    replay_seq_len: int = 64
    heldout_fraction: float = 0.02  # pretraining's split, so replay never sees held-out text
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"sft.replay_fraction must be in [0, 1), got {self.replay_fraction}")


@dataclass(frozen=True)
class SFTResult:
    checkpoint: Path
    metrics: dict[str, float]


def run(cfg: SFTConfig, tracker: Tracker | None = None) -> SFTResult:
    tracker = tracker or NullTracker()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    model = ckpt.load_model(cfg.policy)
    examples = [prompt_and_response(tokenizer, p.question, target(p)) for p in load_problems(cfg.dataset, "train")]
    n_replay = round(cfg.batch_size * cfg.replay_fraction)
    if n_replay:
        corpus, _ = tokenize_corpus(cfg.dataset, tokenizer, cfg.heldout_fraction, Path(cfg.output_dir) / "tokens")
    tracker.log_params({"stage": "sft", **to_dict(cfg), "data/examples": len(examples)})

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([cfg.train.seed, step])
        picked = [examples[i] for i in rng.integers(0, len(examples), size=cfg.batch_size - n_replay)]
        if n_replay:
            windows = windows_at(corpus, cfg.replay_seq_len, n_replay, cfg.train.seed, step).tolist()
            picked += [(w, [1] * len(w)) for w in windows]
        ids, attn, mask = pad_right([e[0] for e in picked], tokenizer.pad_token_id, [e[1] for e in picked])
        return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(mask == 0, -100)}

    result = tune_policy("sft", cfg, model, tokenizer, batch_at=batch_at, loss_fn=lm_loss, tracker=tracker,
                         curves=["train/loss"])
    return SFTResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=result.metrics)

