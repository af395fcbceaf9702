"""Reward model: the policy's network with a scalar head, trained on preference pairs (Bradley–Terry).

    flywheel stage reward policy=<sft checkpoint> pairs=<pairs.jsonl> output_dir=/tmp/rm train.max_steps=100

The model is `AutoModelForSequenceClassification(num_labels=1)` initialised from the policy (its LM
head is dropped, a fresh linear `score` head added): the reward of a (prompt, answer) is the head's
value at the answer's last token, the end-of-turn token that the chat format ends every answer with.
The final directory loads unchanged with `AutoModelForSequenceClassification.from_pretrained`, which
reads the same position (the rightmost token that is not the pad token; a tokenizer whose pad token is
its end-of-turn token is read one token earlier, by us and by every other reader alike).

Pairs come from `pairs` (JSONL, JSONL.gz or Parquet with prompt, chosen, rejected and an optional
numeric `margin`: the annotation export's format; `prompt` is a string or {role, content} messages;
a file in HH-RLHF's own dialogue format is converted by stages/tasks/hh_rlhf.py) or are synthesised
from the arithmetic train split (`dataset`) as DPO does. A pair with chosen equal to rejected, a
missing or empty field, or more tokens than `max_len` goes to `<output_dir>/quarantine.jsonl` with its
file:line and the reason. Pairs are split by prompt into train and held-out; the held-out pairwise
accuracy (with its standard error) is `eval/reward/accuracy` in final/meta.json, and the held-out
reward distributions are plotted to `reward_distribution.png`.

Other stages use `load_reward_model`, `score` and `require_same_tokenizer`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to choose
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from stages import checkpoint as ckpt
from stages.chat import prompt_ids, response_ids
from stages.config import to_dict
from stages.dataset import is_heldout, write_jsonl
from stages.pairs import EncodedPair, check_pair, encode_pairs, load_pairs, read_records  # noqa: F401
from stages.eval_stats import mean_stderr
from stages.rollout import pad_right
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, tune_policy

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    policy: Path  # causal-LM checkpoint the reward model starts from (usually the SFT model)
    output_dir: Path
    pairs: Path | None = None  # prompt/chosen/rejected(/margin) records: JSONL, JSONL.gz or Parquet
    dataset: Path | None = None  # arithmetic problems for synthetic pairs when there is no pairs file
    margin: float = 0.0  # added to every pair's own `margin`: the loss is -log sigmoid(r_c - r_r - margin)
    heldout_fraction: float = 0.1  # share of prompts held out for the pairwise accuracy
    batch_size: int = 16  # pairs per optimizer step
    max_len: int | None = None  # longest prompt + answer in tokens; default the model's context
    eval_batch_size: int = 32
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-4, warmup_steps=5))
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pairs is None and self.dataset is None:
            raise ValueError("reward: set `pairs` (a preference file) or `dataset` (synthetic arithmetic pairs)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"reward.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"reward.batch_size and reward.eval_batch_size must be >= 1, got "
                             f"{self.batch_size} and {self.eval_batch_size}")
        if not math.isfinite(self.margin):
            raise ValueError(f"reward.margin must be a finite number, got {self.margin}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"reward.max_len must be >= 2 tokens, got {self.max_len}")


@dataclass(frozen=True)
class RewardResult:
    checkpoint: Path
    metrics: dict[str, float]


# --- the loss ----------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    >>> t = torch.tensor
    >>> round(bradley_terry_loss(t([0.0]), t([0.0])).item(), 4)  # no preference yet: log 2
    0.6931
    >>> # gaps 2 and 0 against margins 1 and 0: (log(1 + e^-1) + log 2) / 2
    >>> round(bradley_terry_loss(t([2.0, 0.0]), t([0.0, 0.0]), margin=t([1.0, 0.0])).item(), 4)
    0.5032
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Share of pairs ranked right (strictly: a tie is not a win) and the mean reward gap."""
    return {"reward/accuracy": (r_chosen > r_rejected).float().mean().item(),
            "reward/margin": (r_chosen - r_rejected).mean().item()}


# --- the model ---------------------------------------------------------------------------------


@contextmanager
def _quiet_head_warnings():
    # "Some weights ... newly initialized: score.weight" is the point of the exercise, not news.
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def ensure_pad_token(tokenizer) -> None:
    """Batches are right-padded, and the reward is read before the padding: there must be a pad token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def reward_model_from_policy(policy: Path, tokenizer, seed: int = 0) -> PreTrainedModel:
    """The policy's network with a fresh scalar head (seeded, so reruns start from the same head)."""
    torch.manual_seed(seed)
    with _quiet_head_warnings():
        model = AutoModelForSequenceClassification.from_pretrained(
            policy, num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id)
    model.config._attn_implementation = "sdpa"
    return model


def load_reward_model(path: Path, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of a reward checkpoint, in eval mode with no gradients."""
    tokenizer = ckpt.load_tokenizer(path)
    ensure_pad_token(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: not a reward model (num_labels={model.config.num_labels}, expected 1)")
    model.config._attn_implementation = "sdpa"
    return model.to(device).eval().requires_grad_(False), tokenizer


def rewards_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One fp32 reward per right-padded row."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


@torch.no_grad()
def score_ids(model, pad_id: int, seqs: list[list[int]], batch_size: int = 16) -> list[float]:
    """Rewards of token sequences, batched by similar length (less padding), in the input order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        ids, attn, _ = pad_right([seqs[i] for i in idx], pad_id)
        for i, r in zip(idx, rewards_of(model, ids.to(device), attn.to(device)).tolist(), strict=True):
            out[i] = r
    model.train(was_training)
    return out


def score(model, tokenizer, prompts: list[str | list[dict[str, str]]], completions: list[str], *,
          batch_size: int = 16) -> list[float]:
    """Reward of each (prompt, completion): the prompt through the chat template, the completion as
    the assistant's turn ending with its end-of-turn token (as training saw them).

    A sequence longer than the model's context keeps its last tokens, where the reward is read (and
    says so in the log): an RL or sampling step should not die on one long prompt.
    """
    limit = model.config.max_position_embeddings
    seqs = [prompt_ids(tokenizer, p) + response_ids(tokenizer, c) for p, c in zip(prompts, completions, strict=True)]
    cut = sum(len(s) > limit for s in seqs)
    if cut:
        log.warning("reward: %d of %d sequences exceed the reward model's %d tokens; scored on their last %d",
                    cut, len(seqs), limit, limit)
    return score_ids(model, tokenizer.pad_token_id, [s[-limit:] for s in seqs], batch_size)


def tokenizer_differences(a, b) -> list[str]:
    """What differs between two tokenizers in ways that change token ids or the chat format."""
    diffs = []
    if a.get_vocab() != b.get_vocab():
        diffs.append(f"vocabulary ({len(a)} vs {len(b)} tokens)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            diffs.append(f"{name} ({getattr(a, name)} vs {getattr(b, name)})")
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        diffs.append("chat template")
    return diffs


def same_tokenizer(a, b) -> bool:
    """True when both map every text and chat to the same ids (so token-level rewards line up)."""
    return not tokenizer_differences(a, b)


def require_same_tokenizer(policy_tokenizer, reward_tokenizer, *, policy: Path, reward_model: Path) -> None:
    """One clear error, before any training, when a reward model cannot score the policy's tokens."""
    diffs = tokenizer_differences(policy_tokenizer, reward_tokenizer)
    if diffs:
        raise ValueError(f"reward model {reward_model} has a different tokenizer from the policy {policy}: "
                         f"{', '.join(diffs)} differ. Train the reward model from this policy (or its parent) "
                         f"with `flywheel stage reward policy={policy} ...`")


# --- the data ----------------------------------------------------------------------------------


def split_heldout(pairs: list[EncodedPair], fraction: float) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) by prompt: stable (a hash of the prompt), never empty when fraction > 0 and
    there are two prompts or more (the prompt with the smallest hash is held out if none fell in)."""
    if fraction == 0:
        return pairs, []
    held = [p for p in pairs if is_heldout(p.prompt_key, fraction)]
    if not held and len({p.prompt_key for p in pairs}) > 1:
        first = min((p.prompt_key for p in pairs), key=lambda k: hashlib.blake2b(k.encode(), digest_size=8).digest())
        held = [p for p in pairs if p.prompt_key == first]
    held_keys = {p.prompt_key for p in held}
    return [p for p in pairs if p.prompt_key not in held_keys], held


# --- evaluation and the plot ---------------------------------------------------------------------


def heldout_rewards(model, pairs: list[EncodedPair], pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    r = score_ids(model, pad_id, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size)
    return np.array(r[:len(pairs)]), np.array(r[len(pairs):])


def heldout_metrics(chosen: np.ndarray, rejected: np.ndarray, margins: np.ndarray) -> dict[str, float]:
    accuracy, stderr = mean_stderr((chosen > rejected).astype(float).tolist())
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margins)).item()
    return {"eval/reward/accuracy": accuracy, "eval/reward/accuracy_stderr": stderr,
            "eval/reward/loss": loss, "eval/reward/margin": float((chosen - rejected).mean()),
            "eval/reward/chosen_mean": float(chosen.mean()), "eval/reward/rejected_mean": float(rejected.mean()),
            "eval/reward/pairs": float(len(chosen))}


def plot_histograms(series: dict[str, list[float]], path: Path, title: str, xlabel: str) -> Path:
    """Overlaid histograms on shared bins (rewards of chosen vs rejected answers, best vs all samples)."""
    values = [v for vs in series.values() for v in vs]
    bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 10))) if values else 10
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, vs in series.items():
        ax.hist(vs, bins=bins, alpha=0.5, label=f"{name} (n={len(vs)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: RewardConfig, tracker: Tracker | None = None) -> RewardResult:
    tracker = tracker or NullTracker()
    out = Path(cfg.output_dir)
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    ensure_pad_token(tokenizer)
    model = reward_model_from_policy(cfg.policy, tokenizer, seed=cfg.train.seed)
    context = model.config.max_position_embeddings
    max_len = cfg.max_len or context
    if max_len > context:
        raise ValueError(f"reward.max_len={max_len} exceeds the model's context of {context} tokens ({cfg.policy})")

    source = cfg.pairs or cfg.dataset
    pairs, quarantined = encode_pairs(load_pairs(cfg), tokenizer, max_len, cfg.margin)
    write_jsonl(quarantined, out / "quarantine.jsonl")
    if quarantined:
        log.warning("reward: %d of %d pairs quarantined to %s", len(quarantined), len(pairs) + len(quarantined),
                    out / "quarantine.jsonl")
    if not pairs:
        raise ValueError(f"{source}: no usable preference pairs ({len(quarantined)} quarantined, reasons in "
                         f"{out / 'quarantine.jsonl'})")
    train_pairs, held = split_heldout(pairs, cfg.heldout_fraction)
    if not train_pairs:
        raise ValueError(f"{source}: every pair shares one prompt, so nothing is left to train on after the held-out "
                         f"split; add pairs or set reward.heldout_fraction=0")
    tracker.log_params({"stage": "reward", **to_dict(cfg), "data/pairs": len(pairs),
                        "data/train_pairs": len(train_pairs), "data/heldout_pairs": len(held),
                        "data/quarantined": len(quarantined)})

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([cfg.train.seed, step])
        picked = [train_pairs[i] for i in rng.integers(0, len(train_pairs), size=cfg.batch_size)]
        # Both sides padded to one width: the loss scores chosen and rejected in a single forward pass.
        ids, attn, _ = pad_right([p.chosen for p in picked] + [p.rejected for p in picked], tokenizer.pad_token_id)
        n = len(picked)
        return {"chosen_input_ids": ids[:n], "chosen_attention_mask": attn[:n], "rejected_input_ids": ids[n:],
                "rejected_attention_mask": attn[n:], "margin": torch.tensor([p.margin for p in picked])}

    def loss_fn(m, b):
        r = rewards_of(m, torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]),
                       torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]]))
        r_chosen, r_rejected = r.chunk(2)
        loss = bradley_terry_loss(r_chosen, r_rejected, b["margin"])
        return loss, pair_metrics(r_chosen.detach(), r_rejected.detach())

    seen: dict[str, np.ndarray] = {}

    def evaluate(m) -> dict[str, float]:
        seen["chosen"], seen["rejected"] = heldout_rewards(m, held, tokenizer.pad_token_id, cfg.eval_batch_size)
        return heldout_metrics(seen["chosen"], seen["rejected"], np.array([p.margin for p in held]))

    result = tune_policy("reward", cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["train/loss", "reward/accuracy", "reward/margin"], evaluate=evaluate if held else None,
                         extra_meta=lambda: {"reward": {"max_len": max_len, "heldout_pairs": len(held)}})
    metrics = {**result.metrics, "data/quarantined": float(len(quarantined))}
    tracker.log_metrics({"data/quarantined": float(len(quarantined))}, step=cfg.train.max_steps)
    if held:
        if not seen:  # a finished run returned as is: score the held-out pairs with its final model
            final, _ = load_reward_model(ckpt.final_dir(out))
            seen["chosen"], seen["rejected"] = heldout_rewards(final, held, tokenizer.pad_token_id, cfg.eval_batch_size)
        scored = zip(held, seen["chosen"], seen["rejected"], strict=True)
        write_jsonl([{"source": p.source, "r_chosen": float(c), "r_rejected": float(r)} for p, c, r in scored],
                    out / "heldout_rewards.jsonl")
        plot = plot_histograms({"chosen": seen["chosen"].tolist(), "rejected": seen["rejected"].tolist()},
                               out / "reward_distribution.png", "held-out rewards", "reward")
        tracker.log_artifact(plot)
    else:
        log.warning("reward: no held-out pairs (heldout_fraction=%s), so no eval/reward/accuracy", cfg.heldout_fraction)
    return RewardResult(checkpoint=ckpt.final_dir(out), metrics=metrics)
