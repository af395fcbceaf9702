"""Reasoning RL with verifiable rewards: Group Relative Policy Optimization and its variants.

    flywheel stage grpo dataset=data/clean policy=<checkpoint> output_dir=/tmp/grpo group_size=8
    flywheel stage grpo gsm8k=../shared/datasets/gsm8k/train.jsonl policy=<checkpoint> ...   # GSM8K problems
    flywheel stage grpo ... loss_type=dr_grpo                      # Dr. GRPO
    flywheel stage grpo ... loss_type=dapo clip_eps_high=0.28 dynamic_sampling=true overlong_buffer=4

For each prompt, sample G completions; reward each with a program (right number in <answer>, plus a
small bonus for the <think>/<answer> format); the advantage of a completion is its reward normalised
within its group, so no value network is needed. The loss is PPO's clipped ratio objective plus a
KL penalty (k3 estimator, weight `kl_coef`; 0 drops it from the loss, the KL is still measured) to
the frozen starting policy.

Variants, each a switch on the same loss:
- `loss_type=grpo` (DeepSeekMath): token mean per sequence, then mean over sequences.
- `loss_type=dr_grpo` (Liu et al., "Understanding R1-Zero-like training"): no division by the group's
  reward std and no per-sequence length normalisation (token sums over the constant
  `max_new_tokens`), which removes GRPO's bias towards long wrong answers.
- `loss_type=dapo` (Yu et al., DAPO): one token mean over the whole batch; with `clip_eps_high`
  (clip-higher), `dynamic_sampling` (groups whose rewards are all equal carry no signal and are
  replaced by fresh prompts) and the soft `overlong_buffer` penalty.

Candidly: with `updates_per_rollout=1` (the default) the ratio is exactly 1 at the only update, the
clip never binds, and this is REINFORCE with a group-mean baseline and a KL leash. Raise
`updates_per_rollout` to reuse each rollout for several steps; then the ratio and clipping matter.

LoRA and a rollout server:

    flywheel stage grpo ... lora.r=16                                          # train an adapter only
    flywheel stage grpo ... lora.r=16 rollout_url=http://127.0.0.1:8000 rollout_model=flywheel-sft

`lora.r > 0` trains a LoRA adapter; the KL reference is the same model with the adapter disabled (no
frozen copy in memory). With `rollout_url`, sampling moves to a vLLM OpenAI server serving the
starting policy as `rollout_model` (started with `--enable-lora`, `--max-lora-rank >= lora.r` and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): before every rollout the current adapter is saved to
`<output_dir>/rollout-adapter/<index>` and hot-loaded as `rollout_adapter`, and the completions are
sampled under that name (stages/vllm_rollout.py). The server only picks tokens: log-probs are
recomputed by the training model, so the loss never trusts the server's numbers. A rollout server
needs `lora.r > 0`: syncing full weights into a running vLLM needs a GPU weight-transfer path (NCCL)
or a server restart per rollout, neither of which this stage does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.tasks.gsm8k import load_gsm8k
from stages import vllm_rollout
from stages.config import to_dict
from stages.lora import LoraConfig, reference_view
from stages.monitors import MonitorConfig, RolloutMonitor
from stages.rewards import combined, correctness, gsm8k_correctness
from stages.rollout import masked_mean, pad_right, sample, token_logprobs
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, autocast, pick_device, tune_policy

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    dataset: Path | None = None  # arithmetic problems (train split)
    gsm8k: Path | None = None  # GSM8K-format problems instead (verifier: stages.rewards.gsm8k_correctness)
    policy: Path
    output_dir: Path
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO's clip-higher: upper bound 1 + clip_eps_high (None: clip_eps)
    kl_coef: float = 0.04  # beta; 0 keeps the KL out of the loss (still logged)
    format_weight: float = 0.1
    updates_per_rollout: int = 1
    loss_type: str = "grpo"
    dynamic_sampling: bool = False  # drop all-equal groups, refill with fresh prompts
    max_refills: int = 3  # rounds of fresh prompts per rollout before training on what there is
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens before max_new_tokens
    overlong_penalty: float = 1.0
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # reward-hacking alarm thresholds
    lora: LoraConfig = field(default_factory=LoraConfig)  # r=0: full fine-tuning against a frozen copy
    rollout_url: str | None = None  # a vLLM OpenAI server to sample from (None: in-process generate)
    rollout_model: str = "flywheel-policy"  # the served base model's name (its --served-model-name)
    rollout_adapter: str = "grpo-policy"  # the name the current adapter is hot-loaded under
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=30, lr=1e-4, warmup_steps=0,
                                                                   log_every=5, checkpoint_every=10))
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if (self.dataset is None) == (self.gsm8k is None):
            raise ValueError("grpo: set one source of problems, grpo.dataset (arithmetic) or grpo.gsm8k")
        if self.updates_per_rollout < 1:
            raise ValueError("grpo.updates_per_rollout must be >= 1")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.kl_coef < 0 or self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ValueError("grpo.kl_coef must be >= 0 and grpo.clip_eps / clip_eps_high > 0")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(f"grpo.overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}), "
                             f"got {self.overlong_buffer}")
        if self.rollout_url and not self.lora.enabled:
            raise ValueError("grpo.rollout_url needs grpo.lora.r > 0: a running vLLM server can only take the "
                             "policy's updates as a hot-loaded LoRA adapter; full-weight sync needs a GPU "
                             "weight-transfer path or a server restart per rollout (unset grpo.rollout_url to "
                             "sample in-process)")
        if self.rollout_url and not self.rollout_url.startswith(("http://", "https://")):
            raise ValueError(f"grpo.rollout_url must be an http(s) URL, got {self.rollout_url!r}")
        # A rollout lives in memory only: resuming mid-rollout would resample it from newer weights.
        if self.train.checkpoint_every % self.updates_per_rollout:
            raise ValueError(f"grpo.train.checkpoint_every={self.train.checkpoint_every} must be a multiple of "
                             f"updates_per_rollout={self.updates_per_rollout} for exact resume")


@dataclass(frozen=True)
class GRPOResult:
    checkpoint: Path
    metrics: dict[str, float]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), flat in, flat out; `scale=False` (Dr. GRPO) keeps r - mean.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2).tolist()
    [0.7070068120956421, -0.7070068120956421, 0.0, 0.0]
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, scale=False).tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    r = rewards.view(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    return (centered / (r.std(1, keepdim=True) + eps) if scale else centered).view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups hold different rewards (DAPO's dynamic sampling keeps only those).

    >>> informative_groups(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist()
    [True, False]
    """
    r = rewards.view(-1, group_size)
    return (r.max(1).values - r.min(1).values) > 0


def overlong_penalty(lengths: list[int], max_len: int, buffer: int, penalty: float = 1.0) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -penalty.

    >>> overlong_penalty([2, 6, 7, 8], max_len=8, buffer=4)
    [0.0, -0.5, -0.75, -1.0]
    """
    if buffer <= 0:
        return [0.0] * len(lengths)
    return [-penalty * min(1.0, (n - (max_len - buffer)) / buffer) if n > max_len - buffer else 0.0 for n in lengths]


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coef: float, *, clip_eps_high: float | None = None,
              loss_type: str = "grpo", max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + k3 KL to the reference, reduced as `loss_type` says (see the module docstring).

    `max_tokens` is Dr. GRPO's constant normaliser (defaults to the mask's width).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -surrogate + kl_coef * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        loss = ((per_token * mask).sum(1) / (max_tokens or mask.shape[1])).mean()
    elif loss_type == "dapo":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"unknown grpo loss_type {loss_type!r}")
    # The clip binds only where it removes the gradient: above 1+eps for A > 0, below 1-eps for A < 0.
    clipped = ((ratio > 1 + high) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    return loss, {"rl/kl": masked_mean(kl, mask).item(), "rl/clip_fraction": masked_mean(clipped.float(), mask).item()}


def run(cfg: GRPOConfig, tracker: Tracker | None = None) -> GRPOResult:
    tracker = tracker or NullTracker()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    device = pick_device()
    model = ckpt.load_policy(cfg.policy, cfg.lora, device=device, where="grpo.lora", seed=cfg.train.seed)
    reference = None if cfg.lora.enabled else ckpt.frozen_copy(model, device)
    problems = load_gsm8k(cfg.gsm8k) if cfg.gsm8k else load_problems(cfg.dataset, "train")
    on_gsm8k = cfg.gsm8k is not None
    tracker.log_params({"stage": "grpo", **to_dict(cfg), "data/problems": len(problems)})
    rollouts: dict[int, dict[str, torch.Tensor]] = {}
    latest = ckpt.latest_checkpoint(cfg.output_dir)
    monitor = RolloutMonitor(cfg.monitor, ckpt.read_meta(latest).get("monitors") if latest else None, "grpo")
    last_kl: list[float] = []  # the KL the latest update measured, for the next rollout's monitor

    checked_server: list[bool] = []

    def publish_adapter(index: int) -> None:
        """Save the adapter as it is now and hot-load it, so the server samples from the current policy."""
        if not checked_server:  # once, at the first rollout (a finished stage needs no server)
            served = vllm_rollout.served_models(cfg.rollout_url)
            if cfg.rollout_model not in served:
                raise ValueError(f"grpo.rollout_model={cfg.rollout_model!r} is not served at {cfg.rollout_url} "
                                 f"(it serves {served}); start the server on grpo.policy={cfg.policy} with "
                                 f"--served-model-name {cfg.rollout_model}")
            checked_server.append(True)
        root = Path(cfg.output_dir) / "rollout-adapter"
        model.save_pretrained(root / str(index), safe_serialization=True)
        vllm_rollout.load_adapter(cfg.rollout_url, cfg.rollout_adapter, root / str(index))
        for old in root.iterdir():  # the server holds the weights now; keep only the latest on disk
            if old.name != str(index):
                shutil.rmtree(old, ignore_errors=True)

    def generate(prompts: list[str], seed: int):
        kwargs = dict(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
        if cfg.rollout_url is None:
            return sample(model, tokenizer, prompts, **kwargs)
        return vllm_rollout.sample_via_server(cfg.rollout_url, cfg.rollout_adapter, tokenizer, prompts, **kwargs,
                                              stop_ids=vllm_rollout.stop_token_ids(
                                                  tokenizer, model.generation_config.eos_token_id))

    def sample_groups(index: int, round_: int) -> dict[str, torch.Tensor | list]:
        rng = np.random.default_rng([cfg.train.seed, index, round_])
        picked = [problems[i] for i in rng.integers(0, len(problems), size=cfg.prompts_per_step)]
        samples = generate([prompt_text(tokenizer, p.question) for p in picked],
                           seed=cfg.train.seed * 1_000_003 + index * 101 + round_)
        answers = [p.answer for p in picked for _ in range(cfg.group_size)]
        lengths = [len(c) for c in samples.completions]
        rewards = torch.tensor(combined(samples.texts, answers=answers, format_weight=cfg.format_weight, gsm8k=on_gsm8k))
        rewards += torch.tensor(overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty))
        return {"samples": samples, "rewards": rewards, "lengths": lengths,
                "correct": torch.tensor((gsm8k_correctness if on_gsm8k else correctness)(samples.texts, answers=answers))}

    def select(groups: dict, keep: torch.Tensor) -> dict:
        rows = keep.repeat_interleave(cfg.group_size).nonzero().squeeze(1).tolist()
        s = groups["samples"]
        return {"prompts": [s.prompts[i] for i in rows], "completions": [s.completions[i] for i in rows],
                "rewards": groups["rewards"][rows], "correct": groups["correct"][rows],
                "lengths": [groups["lengths"][i] for i in rows]}

    def rollout(index: int) -> dict[str, torch.Tensor]:
        if cfg.rollout_url is not None:
            publish_adapter(index)
        picked, kept_groups, drawn_groups = [], 0, 0
        for round_ in range(cfg.max_refills + 1 if cfg.dynamic_sampling else 1):
            groups = sample_groups(index, round_)
            keep = (informative_groups(groups["rewards"], cfg.group_size) if cfg.dynamic_sampling
                    else torch.ones(cfg.prompts_per_step, dtype=torch.bool))
            drawn_groups += cfg.prompts_per_step
            need = cfg.prompts_per_step - kept_groups
            keep &= keep.cumsum(0) <= need
            if keep.any():
                picked.append(select(groups, keep))
                kept_groups += int(keep.sum())
            if kept_groups == cfg.prompts_per_step:
                break
        if not picked:  # every group tied in every round: train on the last one (zero advantages, KL only)
            picked.append(select(groups, torch.ones(cfg.prompts_per_step, dtype=torch.bool)))
        merged = {k: sum((p[k] for p in picked), []) if isinstance(picked[0][k], list) else torch.cat([p[k] for p in picked])
                  for k in picked[0]}
        seqs = [p + c for p, c in zip(merged["prompts"], merged["completions"], strict=True)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(merged["prompts"], merged["completions"], strict=True)]
        ids, attn, mask = pad_right(seqs, tokenizer.pad_token_id, masks)
        # Rows are right-padded, so every completion starts at or after the shortest prompt's end: only
        # the positions from there on are scored (the loss reads the start off the mask's width).
        first = min(min(len(p) for p in merged["prompts"]), ids.shape[1] - 1)
        with torch.no_grad(), autocast(cfg.train, device), reference_view(model, reference) as ref_model:
            ref = token_logprobs(ref_model, ids.to(device), attn.to(device), temperature=cfg.temperature,
                                 first_target=first).float().cpu()
        completion_mask = mask[:, first:]
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in merged["completions"]]
        watched = monitor.observe(index, texts, merged["lengths"], kl=last_kl[-1] if last_kl else None)
        batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": completion_mask,
                 # "old" is filled at the first update from that update's own (detached) log-probs: the
                 # policy that sampled is the one being updated, so the ratio starts at exactly 1.
                 "old_logp": torch.full(ref.shape, float("nan")), "ref_logp": ref, "row": torch.arange(len(seqs)),
                 "advantages": group_advantages(merged["rewards"], cfg.group_size, scale=cfg.loss_type != "dr_grpo"),
                 "reward": merged["rewards"], "correct": merged["correct"],
                 "response_length": torch.tensor(merged["lengths"], dtype=torch.float),
                 "kept_groups": torch.full((len(seqs),), kept_groups / drawn_groups),
                 **{name: torch.full((len(seqs),), value) for name, value in watched.items()}}
        if cfg.loss_type == "dapo":  # one token mean over the batch, also across micro-batches
            batch["loss_tokens"] = completion_mask.sum(1)
        return batch

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        index = step // cfg.updates_per_rollout
        if index not in rollouts:
            rollouts.clear()
            rollouts[index] = rollout(index)
        return rollouts[index]

    def loss_fn(m, b):
        first = b["input_ids"].shape[1] - b["completion_mask"].shape[1]
        logp = token_logprobs(m, b["input_ids"], b["attention_mask"], temperature=cfg.temperature, first_target=first)
        old = b["old_logp"]
        if torch.isnan(old).any():
            old = logp.detach()
            next(iter(rollouts.values()))["old_logp"][b["row"].cpu()] = old.float().cpu()
        loss, metrics = grpo_loss(logp, old, b["ref_logp"], b["advantages"], b["completion_mask"], cfg.clip_eps,
                                  cfg.kl_coef, clip_eps_high=cfg.clip_eps_high, loss_type=cfg.loss_type,
                                  max_tokens=cfg.max_new_tokens)
        last_kl[:] = [metrics["rl/kl"]]
        return loss, {**metrics, "rl/reward_mean": b["reward"].mean().item(), "rl/accuracy": b["correct"].mean().item(),
                      "rl/response_length": b["response_length"].mean().item(),
                      "rl/kept_groups": b["kept_groups"].mean().item(),
                      **{k: v.mean().item() for k, v in b.items() if k.startswith("monitor/")}}

    result = tune_policy("grpo", cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["rl/reward_mean", "rl/accuracy", "rl/kl"],
                         extra_meta=lambda: {"monitors": monitor.state()})
    return GRPOResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=result.metrics)
