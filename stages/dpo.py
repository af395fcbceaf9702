"""Direct Preference Optimization against a frozen copy of the starting policy.

    flywheel stage dpo dataset=data/clean policy=<sft checkpoint> output_dir=/tmp/dpo beta=0.1
    flywheel stage dpo ... loss_type=ipo beta=0.5           # IPO
    flywheel stage dpo ... label_smoothing=0.1              # conservative DPO (cDPO)

Pairs come from `pairs` (JSONL or Parquet with prompt, chosen, rejected: the human labels of the
annotation page) or, by default, are synthesised from the arithmetic train split: the chosen answer
is correct and well formatted, the rejected one is wrong or unformatted. Bad records are quarantined
to `<output_dir>/quarantine.jsonl` with their file:line (stages/pairs.py, shared with the reward model).

Variants: `loss_type=ipo` (Azar et al.: a squared loss that pulls the per-token log-ratio margin to
1/(2 beta) instead of pushing it to infinity, so it cannot overfit deterministic preferences) and
`label_smoothing=eps` (Mitchell's conservative DPO: each label is taken as wrong with probability
eps). `precompute_ref=true` scores every pair under the reference once, then frees the reference.

`lora.r > 0` trains a LoRA adapter (stages/lora.py); the reference is then the same model with its
adapter switched off (`lora.reference_view`), so no second model sits in memory. The checkpoint is still
a merged plain model, with the adapter under `adapter/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages import checkpoint as ckpt
from stages.config import to_dict
from stages.dataset import write_jsonl
from stages.lora import LoraConfig, reference_view
from stages.pairs import encode_pairs, load_pairs, synthetic_pairs  # noqa: F401 (synthetic_pairs: reused)
from stages.rollout import pad_right, token_logprobs
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, autocast, pick_device, tune_policy

LOSS_TYPES = ("sigmoid", "ipo")
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    policy: Path
    output_dir: Path
    dataset: Path | None = None  # arithmetic problems for synthetic pairs
    pairs: Path | None = None  # prompt/chosen/rejected records; replaces the synthetic pairs
    beta: float = 0.1
    # Weight of an NLL term on the chosen answers (as in RPO). Pure DPO (0) can lower the
    # likelihood of both answers when they share most tokens; the NLL term anchors the chosen one.
    nll_weight: float = 0.0
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # cDPO's eps, sigmoid loss only
    precompute_ref: bool = False  # reference log-probs of every pair once, then no reference model
    lora: LoraConfig = field(default_factory=LoraConfig)  # r=0: full fine-tuning against a frozen copy
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=50, lr=2e-4, warmup_steps=5))
    batch_size: int = 8
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset is None and self.pairs is None:
            raise ValueError("dpo: set `dataset` (synthetic pairs) or `pairs` (a preference file)")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.loss_type != "sigmoid"):
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5) and needs loss_type=sigmoid, "
                             f"got {self.label_smoothing} with {self.loss_type}")


@dataclass(frozen=True)
class DPOResult:
    checkpoint: Path
    metrics: dict[str, float]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, *, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss from summed response log-probs; returns (mean loss, chosen rewards, rejected rewards).

    sigmoid: -(1-eps) log s(beta m) - eps log s(-beta m), m the margin of log-ratios (eps = 0: DPO).
    ipo: (m / tokens - 1/(2 beta))^2 with per-token log-ratios (needs the response token counts).

    >>> t = torch.tensor
    >>> loss, _, _ = dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.1)
    >>> round(loss.item(), 4)  # log 2: no preference yet
    0.6931
    >>> ipo, _, _ = dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.5, loss_type="ipo",
    ...                      chosen_tokens=t([2.0]), rejected_tokens=t([2.0]))
    >>> ipo.item()  # (0 - 1/(2 * 0.5))^2
    1.0
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    if loss_type == "sigmoid":
        margin = chosen_reward - rejected_reward
        loss = (-(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)).mean()
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs chosen_tokens and rejected_tokens (its log-ratios are per token)")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = ((per_token - 1 / (2 * beta)) ** 2).mean()
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}")
    return loss, chosen_reward.detach(), rejected_reward.detach()


def stack_rows(a: torch.Tensor, b: torch.Tensor, fill: int) -> torch.Tensor:
    """[a; b] with the narrower one right-padded with `fill` to the wider one's width.

    >>> stack_rows(torch.tensor([[1, 2, 3]]), torch.tensor([[4]]), 0).tolist()
    [[1, 2, 3], [4, 0, 0]]
    """
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(x, (0, width - x.shape[1]), value=fill) for x in (a, b)])


def summed_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of the response tokens (mask marks them) per row."""
    return (token_logprobs(model, ids, attn) * mask[:, 1:]).sum(-1)


def run(cfg: DPOConfig, tracker: Tracker | None = None) -> DPOResult:
    tracker = tracker or NullTracker()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    device = pick_device()
    model = ckpt.load_policy(cfg.policy, cfg.lora, device=device, where="dpo.lora", seed=cfg.train.seed)
    reference = None if cfg.lora.enabled else ckpt.frozen_copy(model, device)
    usable, quarantined = encode_pairs(load_pairs(cfg), tokenizer, model.config.max_position_embeddings, 0.0)
    write_jsonl(quarantined, Path(cfg.output_dir) / "quarantine.jsonl")
    if quarantined:
        log.warning("dpo: %d of %d pairs quarantined to %s", len(quarantined), len(usable) + len(quarantined),
                    Path(cfg.output_dir) / "quarantine.jsonl")
    if not usable:
        raise ValueError(f"{cfg.pairs or cfg.dataset}: no usable preference pairs ({len(quarantined)} quarantined, "
                         f"reasons in {Path(cfg.output_dir) / 'quarantine.jsonl'})")
    # (ids, loss mask) of chosen and rejected, the mask on the answer's tokens
    encoded = [tuple(zip((p.chosen, p.rejected), p.masks(), strict=True)) for p in usable]
    tracker.log_params({"stage": "dpo", **to_dict(cfg), "data/pairs": len(usable), "data/quarantined": len(quarantined)})
    ref_table: dict[str, torch.Tensor] = {}  # side -> reference log-prob of every pair (precompute_ref)

    def reference_logprobs(rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        ids, attn, mask = pad_right([r[0] for r in rows], tokenizer.pad_token_id, [r[1] for r in rows])
        with torch.no_grad(), autocast(cfg.train, device), reference_view(model, reference) as ref:
            return summed_logprobs(ref, ids.to(device), attn.to(device), mask.to(device)).float().cpu()

    def precompute() -> None:
        nonlocal reference
        for side, j in (("chosen", 0), ("rejected", 1)):
            ref_table[side] = torch.cat([reference_logprobs([p[j] for p in encoded[lo:lo + cfg.batch_size]])
                                         for lo in range(0, len(encoded), cfg.batch_size)])
        reference = None  # no longer needed: its memory goes back to the policy

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        if cfg.precompute_ref and not ref_table:
            precompute()
        rng = np.random.default_rng([cfg.train.seed, step])
        indices = rng.integers(0, len(encoded), size=cfg.batch_size)
        picked = [encoded[i] for i in indices]
        batch = {}
        for side, j in (("chosen", 0), ("rejected", 1)):
            ids, attn, mask = pad_right([p[j][0] for p in picked], tokenizer.pad_token_id, [p[j][1] for p in picked])
            ref = ref_table[side][indices] if ref_table else reference_logprobs([p[j] for p in picked])
            batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_mask": mask, f"ref_{side}": ref}
        return batch

    def loss_fn(m, b):
        # Chosen and rejected rows in one forward pass (right-padded to one width): half the calls.
        both = summed_logprobs(m, *(stack_rows(b[f"chosen_{k}"], b[f"rejected_{k}"], fill)
                                    for k, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0),
                                                    ("mask", 0))))
        chosen, rejected = both.chunk(2)
        loss, rc, rr = dpo_loss(chosen, rejected, b["ref_chosen"], b["ref_rejected"], cfg.beta,
                                loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                chosen_tokens=b["chosen_mask"][:, 1:].sum(-1), rejected_tokens=b["rejected_mask"][:, 1:].sum(-1))
        if cfg.nll_weight:
            loss = loss - cfg.nll_weight * (chosen / b["chosen_mask"][:, 1:].sum(-1)).mean()
        return loss, {"dpo/reward_margin": (rc - rr).mean().item(), "dpo/accuracy": (rc > rr).float().mean().item()}

    result = tune_policy("dpo", cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["train/loss", "dpo/reward_margin", "dpo/accuracy"])
    return DPOResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=result.metrics)
