"""Reasoning RL with verifiable rewards: Group Relative Policy Optimization.

    flywheel stage grpo dataset=data/clean policy=<checkpoint> output_dir=/tmp/grpo group_size=8

For each prompt, sample G completions; reward each with a program (right number in <answer>, plus a
small bonus for the <think>/<answer> format); the advantage of a completion is its reward normalised
within its group, so no value network is needed. The loss is PPO's clipped ratio objective plus a
KL penalty (k3 estimator) to the frozen starting policy.

Candidly: with `updates_per_rollout=1` (the default) the ratio is exactly 1 at the only update, the
clip never binds, and this is REINFORCE with a group-mean baseline and a KL leash. Raise
`updates_per_rollout` to reuse each rollout for several steps; then the ratio and clipping matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.config import to_dict
from stages.rewards import combined, correctness
from stages.rollout import masked_mean, pad_right, sample, token_logprobs
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, pick_device, tune_policy


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    dataset: Path  # arithmetic problems (train split)
    policy: Path
    output_dir: Path
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    format_weight: float = 0.1
    updates_per_rollout: int = 1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=30, lr=1e-4, warmup_steps=0,
                                                                   log_every=5, checkpoint_every=10))
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.updates_per_rollout < 1:
            raise ValueError("grpo.updates_per_rollout must be >= 1")
        # A rollout lives in memory only: resuming mid-rollout would resample it from newer weights.
        if self.train.checkpoint_every % self.updates_per_rollout:
            raise ValueError(f"grpo.train.checkpoint_every={self.train.checkpoint_every} must be a multiple of "
                             f"updates_per_rollout={self.updates_per_rollout} for exact resume")


@dataclass(frozen=True)
class GRPOResult:
    checkpoint: Path
    metrics: dict[str, float]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), flat in, flat out.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2).tolist()
    [0.7070068120956421, -0.7070068120956421, 0.0, 0.0]
    """
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + k3 KL to the reference, averaged per sequence then over the batch."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    loss = masked_mean(-surrogate + kl_coef * kl, mask, dim=1).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"rl/kl": masked_mean(kl, mask).item(), "rl/clip_fraction": masked_mean(clipped, mask).item()}


def run(cfg: GRPOConfig, tracker: Tracker | None = None) -> GRPOResult:
    tracker = tracker or NullTracker()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    model = ckpt.load_model(cfg.policy)
    device = pick_device()
    reference = ckpt.frozen_copy(model, device)
    problems = load_problems(cfg.dataset, "train")
    tracker.log_params({"stage": "grpo", **to_dict(cfg), "data/problems": len(problems)})
    rollouts: dict[int, dict[str, torch.Tensor]] = {}

    def rollout(index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([cfg.train.seed, index])
        picked = [problems[i] for i in rng.integers(0, len(problems), size=cfg.prompts_per_step)]
        samples = sample(model, tokenizer, [prompt_text(tokenizer, p.question) for p in picked],
                         n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         seed=cfg.train.seed * 1_000_003 + index)
        answers = [p.answer for p in picked for _ in range(cfg.group_size)]
        rewards = torch.tensor(combined(samples.texts, answers=answers, format_weight=cfg.format_weight))
        correct = torch.tensor(correctness(samples.texts, answers=answers))
        seqs = [p + c for p, c in zip(samples.prompts, samples.completions, strict=True)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(samples.prompts, samples.completions, strict=True)]
        ids, attn, mask = pad_right(seqs, tokenizer.pad_token_id, masks)
        with torch.no_grad():
            old = token_logprobs(model, ids.to(device), attn.to(device)).cpu()
            ref = token_logprobs(reference, ids.to(device), attn.to(device)).cpu()
        return {"input_ids": ids, "attention_mask": attn, "completion_mask": mask[:, 1:], "old_logp": old,
                "ref_logp": ref, "advantages": group_advantages(rewards, cfg.group_size), "reward": rewards,
                "correct": correct}

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        index = step // cfg.updates_per_rollout
        if index not in rollouts:
            rollouts.clear()
            rollouts[index] = rollout(index)
        return rollouts[index]

    def loss_fn(m, b):
        logp = token_logprobs(m, b["input_ids"], b["attention_mask"])
        loss, metrics = grpo_loss(logp, b["old_logp"], b["ref_logp"], b["advantages"], b["completion_mask"],
                                  cfg.clip_eps, cfg.kl_coef)
        return loss, {**metrics, "rl/reward_mean": b["reward"].mean().item(),
                      "rl/accuracy": b["correct"].mean().item()}

    result = tune_policy("grpo", cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["rl/reward_mean", "rl/accuracy", "rl/kl"])
    return GRPOResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=result.metrics)
