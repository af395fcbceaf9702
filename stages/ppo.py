"""RLHF with PPO, the InstructGPT recipe's last step: SFT -> reward model -> PPO with a KL penalty.

    flywheel stage ppo policy=<sft checkpoint> reward_model=<reward checkpoint> dataset=data/clean \
        output_dir=/tmp/ppo reward=model

The four models of the lectures:
- the policy (trained), sampling answers to the dataset's prompts;
- the value model (trained): a scalar per token, started from the reward model as InstructGPT does
  (from the policy with a fresh scalar head when there is no reward model);
- the frozen reference (the starting policy), whose log-probs give the per-token KL penalty;
- the frozen reward model, whose score of the whole answer lands on its last token.
`reward=verifier` scores answers with the arithmetic verifier instead (`stages.rewards.combined`),
`reward=both` adds the two.

Each rollout is reused for `ppo_epochs x minibatches` optimizer steps, one minibatch per step, so the
one training loop (`stages.train_loop.train`) runs PPO unchanged: the rollout happens inside
`batch_at(step)`, and `train()` sees a single module holding policy and value model. That module saves
the policy as a plain causal-LM directory (what the registry and vLLM read) and the value model under
`value_model/`; meta.json carries the adaptive KL coefficient and the monitors' state, so resume is exact.

Metrics: `rl/score_mean` is the reward model's (or verifier's) score, `rl/reward_mean` the score less
the KL penalty; `rl/kl` is nats per answer (log pi - log pi_ref summed over the answer's tokens, the
quantity the penalty charges and the controller steers; unlike GRPO's per-token k3), `rl/kl_coef` the
controller's coefficient; `monitor/kl` is the per-token k3 KL the monitors' threshold reads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.config import to_dict
from stages.monitors import MonitorConfig, RolloutMonitor
from stages.reward import load_reward_model, require_same_tokenizer, reward_model_from_policy
from stages.reward import score as reward_model_scores
from stages.rewards import combined, correctness
from stages.rollout import masked_mean, pad_right, sample, token_logprobs
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, autocast, pick_device, tune_policy

log = logging.getLogger(__name__)

REWARDS = ("model", "verifier", "both")
VALUE_DIR = "value_model"


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    policy: Path  # the SFT checkpoint to tune (also the frozen reference)
    dataset: Path  # arithmetic problems: the prompts, and the answers the verifier checks
    output_dir: Path
    reward_model: Path | None = None  # a `stages.reward` checkpoint (AutoModelForSequenceClassification)
    reward: str = "model"  # model | verifier | both (reward model score + verifier reward)
    format_weight: float = 0.1  # the verifier's bonus for the <think>/<answer> format
    prompts_per_rollout: int = 16  # one answer per prompt
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    ppo_epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # optimizer steps per pass: a rollout serves ppo_epochs * minibatches steps
    clip_eps: float = 0.2  # PPO's ratio clip
    clip_range_value: float = 0.2  # values move at most this far from the rollout's per update
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial weight of the per-token KL penalty folded into the reward
    target_kl: float = 0.0  # adaptive KL controller's target (nats per answer); 0: kl_coef stays fixed
    kl_horizon: int = 10_000  # controller horizon in samples (Ziegler et al.)
    whiten_rewards: bool = False  # scale per-token rewards to unit variance before GAE
    score_clip: float = 0.0  # clip the reward model/verifier score to [-c, c]; 0: no clip
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # reward-hacking alarm thresholds
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, lr=1e-5, warmup_steps=0,
                                                                   log_every=4, checkpoint_every=20))
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"ppo.reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.reward in ("model", "both") and self.reward_model is None:
            raise ValueError(f"ppo.reward={self.reward} needs ppo.reward_model (a reward model checkpoint), "
                             "or set ppo.reward=verifier")
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError("ppo.ppo_epochs and ppo.minibatches must be >= 1")
        if self.prompts_per_rollout % self.minibatches:
            raise ValueError(f"ppo.prompts_per_rollout={self.prompts_per_rollout} must be a multiple of "
                             f"ppo.minibatches={self.minibatches}")
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature must be > 0 (PPO samples), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"ppo.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.clip_eps <= 0 or self.clip_range_value <= 0:
            raise ValueError("ppo.clip_eps and ppo.clip_range_value must be > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_coef < 0 or self.target_kl < 0 or self.kl_horizon < 1 or self.score_clip < 0:
            raise ValueError("ppo.kl_coef, ppo.target_kl and ppo.score_clip must be >= 0, ppo.kl_horizon >= 1")
        # A rollout lives in memory only: resuming mid-rollout would resample it from newer weights.
        if self.train.checkpoint_every % self.steps_per_rollout:
            raise ValueError(f"ppo.train.checkpoint_every={self.train.checkpoint_every} must be a multiple of "
                             f"ppo_epochs*minibatches={self.steps_per_rollout} for exact resume")

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches


@dataclass(frozen=True)
class PPOResult:
    checkpoint: Path  # the policy: a plain causal-LM directory
    value_model: Path  # checkpoint/value_model
    metrics: dict[str, float]
    alarms: list[dict] = field(default_factory=list)  # reward-hacking monitor alarms (worst per metric)


# --- the pure parts --------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) tokens of each row: [B, L] in.

    The episode ends at the row's last masked token (its next value is 0); positions outside the mask
    get 0 advantage. Returns (advantages, returns = advantages + values).

    >>> a, r = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.9)
    >>> [round(x, 4) for x in a[0].tolist()], [round(x, 4) for x in r[0].tolist()]
    ([0.433, 0.37, 0.3], [0.933, 0.97, 1.0])
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries to unit variance (and zero mean unless `shift_mean` is off).

    >>> whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1, 1, 0]])).tolist()
    [[-1.0, 1.0, 0.0]]
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, as a loss: mean over masked tokens of max(-A r, -A clip(r, 1-e, 1+e)).

    `rl/clip_fraction` counts the tokens where the clip binds (r > 1+e with A > 0, or r < 1-e with A < 0):
    only there is the gradient zeroed.

    >>> t = torch.tensor
    >>> loss, m = ppo_policy_loss(t([[1.5, 0.5]]).log(), t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]]), 0.2)
    >>> round(loss.item(), 4), m["rl/clip_fraction"]  # (-1.2 + 0.8) / 2; both clipped
    (-0.2, 1.0)
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    binds = ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    with torch.no_grad():
        # The k3 estimate of KL(old || new): how far a minibatch update moved the policy.
        log_ratio = old_logp - logp
        approx_kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
    return loss, {"rl/clip_fraction": masked_mean(binds.float(), mask).item(), "ppo/approx_kl": approx_kl.item()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean over masked tokens of max((v - R)^2, (v_clipped - R)^2), where
    v_clipped = old + clamp(v - old, -c, c) keeps each update's values near the rollout's.

    >>> t = torch.tensor
    >>> loss, m = value_loss(t([[1.0, 0.0]]), t([[0.0, 0.0]]), t([[2.0, 1.0]]), t([[1, 1]]), 0.2)
    >>> round(loss.item(), 4), m["ppo/value_clip_fraction"]  # 0.5 * ((2-0.2)^2 + (1-0)^2) / 2
    (1.06, 0.5)
    """
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    plain_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain_err, clipped_err), mask)
    return loss, {"ppo/value_clip_fraction": masked_mean((clipped_err > plain_err).float(), mask).item()}


def k3_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked tokens of the k3 estimate of KL(policy || reference): never negative, unlike the
    plain log-ratio on a small sample (the per-token scale the monitors' `kl_max` is set in).

    >>> round(k3_per_token(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2)), 4)
    0.3591
    """
    log_ratio = ref_logp - logp
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask).item()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 is a perfect critic, 0 a constant one.

    >>> explained_variance(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    0.75
    """
    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    total = var(returns)
    return float("nan") if total.item() == 0 else (1 - var(returns - values) / total).item()


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL penalty's coefficient so the policy's KL tracks a target.

    After each rollout: e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e * n / horizon, with n the
    rollout's samples. A target of 0 keeps the coefficient fixed.

    >>> c = AdaptiveKLController(0.1, target=2.0, horizon=100)
    >>> round(c.update(3.0, n=10), 6)  # e = 0.2 (0.5 clipped): 0.1 * (1 + 0.2 * 10/100)
    0.102
    >>> round(c.update(1.8, n=10), 6)  # e = -0.1: 0.102 * (1 - 0.1 * 0.1)
    0.10098
    """

    def __init__(self, init: float, target: float = 0.0, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = float(init), float(target), int(horizon)

    def update(self, kl: float, n: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


# --- the four models -------------------------------------------------------------------------


class PolicyAndValue(torch.nn.Module):
    """What `train()` trains: the policy and the value model as one module.

    `forward` gives per-token log-probs (at the sampling temperature) and values, aligned so that
    position t scores token t+1 and values the state before it. `save_pretrained` writes the policy as
    a plain causal-LM directory and the value model under `value_model/`; `generation_config` is the
    policy's (checkpoint.save_checkpoint assigns it).
    """

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module, tokenizer, *,
                 temperature: float) -> None:
        super().__init__()
        if not hasattr(value_model, "score"):
            raise ValueError(f"value model {type(value_model).__name__} has no `score` head")
        self.policy = policy
        self.value_model = value_model
        self.temperature = temperature
        self._tokenizer = tokenizer

    @property
    def generation_config(self):
        return self.policy.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.policy.generation_config = value

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.value_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_model.score(hidden).squeeze(-1)[:, :-1].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = token_logprobs(self.policy, input_ids, attention_mask, temperature=self.temperature)
        return logp, self.values(input_ids, attention_mask)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        out = Path(save_directory)
        self.policy.save_pretrained(out, **kwargs)
        self.value_model.save_pretrained(out / VALUE_DIR, **kwargs)
        self._tokenizer.save_pretrained(out / VALUE_DIR)  # the value model loads on its own, like a reward model


def load_value_model(cfg: PPOConfig, tokenizer) -> torch.nn.Module:
    """The reward model's weights when there is one (InstructGPT), else the policy's with a fresh head."""
    source = cfg.reward_model if cfg.reward_model is not None else cfg.policy
    return reward_model_from_policy(source, tokenizer, seed=cfg.train.seed)


def check_reward_tokenizer(cfg: PPOConfig, policy_tokenizer, reward_tokenizer) -> None:
    """Refuse, before any training, a reward model that reads other tokens than the policy writes."""
    try:
        require_same_tokenizer(policy_tokenizer, reward_tokenizer, policy=cfg.policy, reward_model=cfg.reward_model)
    except ValueError as e:
        raise ValueError(f"ppo.reward_model: {e}") from None


# --- the stage -------------------------------------------------------------------------------


def run(cfg: PPOConfig, tracker: Tracker | None = None) -> PPOResult:
    tracker = tracker or NullTracker()
    device = pick_device()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    policy = ckpt.load_model(cfg.policy)
    reward_model = None
    if cfg.reward_model is not None:  # scores the answers, or at least starts the value model: same tokens
        check_reward_tokenizer(cfg, tokenizer, ckpt.load_tokenizer(cfg.reward_model))
    if cfg.reward in ("model", "both"):
        reward_model, rm_tokenizer = load_reward_model(cfg.reward_model, device)
    reference = ckpt.frozen_copy(policy, device)
    problems = load_problems(cfg.dataset, "train")

    # A checkpoint's meta.json holds the controller's coefficient for the next rollout and the monitors'
    # state: a resumed run continues both where the uninterrupted one would be.
    latest = ckpt.latest_checkpoint(cfg.output_dir)
    resumed = ckpt.read_meta(latest) if latest is not None else {}
    controller = AdaptiveKLController(resumed.get("ppo", {}).get("kl_coef", cfg.kl_coef), cfg.target_kl,
                                      cfg.kl_horizon)
    monitor = RolloutMonitor(cfg.monitor, resumed.get("monitors"), "ppo")
    model = PolicyAndValue(policy, load_value_model(cfg, tokenizer), tokenizer, temperature=cfg.temperature)
    tracker.log_params({"stage": "ppo", **to_dict(cfg), "data/problems": len(problems)})
    rollouts: dict[int, dict[str, torch.Tensor]] = {}

    def pick(index: int) -> list:
        rng = np.random.default_rng([cfg.train.seed, index])
        return [problems[i] for i in rng.integers(0, len(problems), size=cfg.prompts_per_rollout)]

    def scores(picked: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(score per answer, the reward model's part when it has one)."""
        answers = [p.answer for p in picked]
        total = torch.zeros(len(texts))
        rm = None
        if cfg.reward in ("verifier", "both"):
            total += torch.tensor(combined(texts, answers=answers, format_weight=cfg.format_weight))
        if reward_model is not None:
            rm = torch.tensor(reward_model_scores(reward_model, rm_tokenizer, [p.question for p in picked], texts))
            total += rm
        return total, rm

    def rollout(index: int) -> dict[str, torch.Tensor]:
        picked = pick(index)
        samples = sample(policy, tokenizer, [prompt_text(tokenizer, p.question) for p in picked],
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         seed=cfg.train.seed * 1_000_003 + index)
        seqs = [p + c for p, c in zip(samples.prompts, samples.completions, strict=True)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(samples.prompts, samples.completions, strict=True)]
        ids, attn, mask = pad_right(seqs, tokenizer.pad_token_id, masks)
        mask = mask[:, 1:].float()  # aligned with token_logprobs: position t scores token t+1
        with torch.no_grad(), autocast(cfg.train, device):
            d_ids, d_attn = ids.to(device), attn.to(device)
            old_logp, old_values = (x.float().cpu() for x in model(d_ids, d_attn))
            ref_logp = token_logprobs(reference, d_ids, d_attn, temperature=cfg.temperature).float().cpu()
        score, rm_score = scores(picked, samples.texts)
        if cfg.score_clip:
            score = score.clamp(-cfg.score_clip, cfg.score_clip)
        log_ratio = (old_logp - ref_logp) * mask
        kl_coef = controller.value
        rewards = -kl_coef * log_ratio
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last response token
        rewards[torch.arange(len(seqs)), last] += score
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
        kl = log_ratio.sum(1)  # nats per answer: what the penalty charges and the controller steers
        controller.update(kl.mean().item(), n=len(seqs))
        correct = torch.tensor(correctness(samples.texts, answers=[p.answer for p in picked]))
        lengths = mask.sum(1)
        watched = monitor.observe(index, samples.texts, lengths.tolist(), kl=k3_per_token(old_logp, ref_logp, mask),
                                  rm_scores=None if rm_score is None else rm_score.tolist(),
                                  verifier_scores=None if rm_score is None else correct.tolist())
        # Undefined when the verifier ties every answer: in a log window's mean it would be biased by the
        # rollouts that lack it, so it goes to the tracker as it is, at the rollout's first step.
        divergence = watched.pop("monitor/rm_verifier_divergence", None)
        if divergence is not None:
            tracker.log_metrics({"monitor/rm_verifier_divergence": divergence}, step=index * cfg.steps_per_rollout + 1)
        rollout_metrics = {  # per rollout, not per minibatch: the curves follow the policy, not the shuffle
            "rl/reward_mean": (score - kl_coef * kl).mean().item(), "rl/score_mean": score.mean().item(),
            "rl/accuracy": correct.mean().item(), "rl/response_length": lengths.mean().item(),
            "rl/kl": kl.mean().item(), "rl/kl_coef": kl_coef,
            "ppo/explained_variance": explained_variance(old_values, returns, mask),
            **watched,
        }
        return {"input_ids": ids, "attention_mask": attn, "completion_mask": mask, "loss_tokens": lengths,
                "old_logp": old_logp, "old_values": old_values, "advantages": whiten(advantages, mask),
                "returns": returns,
                **{k: torch.full((len(seqs),), v) for k, v in rollout_metrics.items() if math.isfinite(v)}}

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        index, within = divmod(step, cfg.steps_per_rollout)
        if index not in rollouts:
            rollouts.clear()
            rollouts[index] = rollout(index)
        data = rollouts[index]
        epoch, part = divmod(within, cfg.minibatches)
        order = torch.from_numpy(np.random.default_rng([cfg.train.seed, index, epoch]).permutation(cfg.prompts_per_rollout))
        size = cfg.prompts_per_rollout // cfg.minibatches
        rows = order[part * size:(part + 1) * size]
        return {k: v[rows] for k, v in data.items()}

    per_row = ("rl/", "ppo/explained_variance", "monitor/")

    def loss_fn(m, b):
        logp, values = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        mask = b["completion_mask"]
        policy_loss, policy_metrics = ppo_policy_loss(logp, b["old_logp"], b["advantages"], mask, cfg.clip_eps)
        v_loss, value_metrics = value_loss(values, b["old_values"], b["returns"], mask, cfg.clip_range_value)
        metrics = {**policy_metrics, **value_metrics, "ppo/policy_loss": policy_loss.item(),
                   "ppo/value_loss": v_loss.item(), **{k: v.mean().item() for k, v in b.items() if k.startswith(per_row)}}
        return policy_loss + cfg.vf_coef * v_loss, metrics

    result = tune_policy("ppo", cfg, model, tokenizer, batch_at=batch_at, loss_fn=loss_fn, tracker=tracker,
                         curves=["rl/reward_mean", "rl/score_mean", "rl/kl", "rl/kl_coef"],
                         extra_meta=lambda: {"ppo": {"kl_coef": controller.value}, "monitors": monitor.state()})
    final = ckpt.final_dir(cfg.output_dir)
    return PPOResult(checkpoint=final, value_model=final / VALUE_DIR, metrics=result.metrics,
                     alarms=ckpt.read_meta(final).get("monitors", {}).get("alarms", []))
