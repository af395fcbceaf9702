"""Losses and rewards as small pure functions: checked against hand-computed values and against
TRL's implementation on the very same tensors.

TRL computes its DPO and GRPO losses inline in `DPOTrainer._compute_loss` / `GRPOTrainer._compute_loss`
rather than in standalone functions. Building a real trainer needs a model, datasets, Accelerate and
a few seconds per test; instead these tests call those methods unbound, with a stand-in `self` that
carries only the attributes the loss code reads (single process, so gathers are identities) and a
stand-in model that returns the per-token log-probs under test. The arithmetic is then TRL's own
code, on our tensors. If a TRL upgrade renames an attribute, these tests fail loudly rather than
compare against nothing.
"""

from __future__ import annotations

import doctest
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from stages import dpo, grpo, rewards
from stages.dpo import dpo_loss
from stages.grpo import group_advantages, grpo_loss
from stages.pretrain import heldout_perplexity, lm_loss, unigram_perplexity
from stages.sft import SFTConfig, replay_windows
from stages.token_shards import TokenShards
from stages.rewards import combined, correctness, well_formatted


class _SingleProcessAccelerator:
    """What TRL's loss code asks of Accelerate, for one process: every collective is the identity."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


# --- DPO -------------------------------------------------------------------------------------


def test_dpo_loss_hand_values() -> None:
    t = torch.tensor
    # beta 0.5; chosen gained 1 nat over the reference, rejected lost 1: margin of implicit rewards = 1.
    pc = t([-5.0], requires_grad=True)
    loss, rc, rr = dpo_loss(pc, t([-7.0]), t([-6.0]), t([-6.0]), beta=0.5)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)  # -log sigmoid(1)
    loss.backward()
    sigmoid = 1 / (1 + math.exp(-1.0))
    assert pc.grad.item() == pytest.approx(-0.5 * (1 - sigmoid), abs=1e-6)  # -beta * sigmoid(-margin)
    # No preference yet -> log 2; the mean is over pairs; rewards are detached (metrics, not loss terms).
    loss0, _, _ = dpo_loss(t([0.0, 3.0]), t([0.0, 3.0]), t([1.0, 3.0]), t([1.0, 3.0]), beta=0.1)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-7)
    assert not rc.requires_grad and not rr.requires_grad


def test_dpo_doctest() -> None:
    assert doctest.testmod(dpo).failed == 0


def _trl_dpo_loss(policy_tok: torch.Tensor, mask: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """TRL's sigmoid DPO loss (`DPOTrainer._compute_loss`) on given per-token log-probs.

    policy_tok: [2B, T-1] per-token log-probs, rows [chosen..., rejected...]; mask: [2B, T] completion mask.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = mask.shape
    zeros = torch.zeros(n, width - 1)

    def model(**kwargs):
        # TRL's fused LM head yields 0 log-prob where the label is -100 (prompt and padding).
        return SimpleNamespace(log_probs=policy_tok * mask[:, 1:], entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(n, width - 1, dtype=torch.bool))

    metrics = {"train": defaultdict(list)}
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_SingleProcessAccelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0, _metrics=metrics,
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, width, dtype=torch.long),
              "attention_mask": torch.ones(n, width, dtype=torch.long), "completion_mask": mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, metrics["train"]


def test_dpo_loss_matches_trl_sigmoid_loss() -> None:
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    pairs, width, beta = 6, 9, 0.1
    per_token = (-torch.rand(2 * pairs, width - 1, generator=g) * 3).requires_grad_(True)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for i in range(2 * pairs):  # prompts of different lengths, some right padding
        start = int(torch.randint(1, 4, (1,), generator=g))
        stop = int(torch.randint(start + 1, width + 1, (1,), generator=g))
        mask[i, start:stop] = 1
    ref = -torch.rand(2 * pairs, generator=g) * 10

    summed = (per_token * mask[:, 1:]).sum(-1)  # exactly stages.dpo.summed_logprobs' reduction
    ours, rc, rr = dpo_loss(summed[:pairs], summed[pairs:], ref[:pairs], ref[pairs:], beta)
    (grad_ours,) = torch.autograd.grad(ours, per_token)
    theirs, trl_metrics = _trl_dpo_loss(per_token, mask, ref[:pairs], ref[pairs:], beta)
    (grad_theirs,) = torch.autograd.grad(theirs, per_token)

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert rc.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][-1], abs=1e-6)
    assert rr.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][-1], abs=1e-6)
    assert (rc > rr).float().mean().item() == pytest.approx(trl_metrics["rewards/accuracies"][-1])


def test_ipo_matches_trl() -> None:
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    pairs, width, beta = 5, 9, 0.5
    per_token = (-torch.rand(2 * pairs, width - 1, generator=g) * 3).requires_grad_(True)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for i in range(2 * pairs):  # responses of different lengths: IPO's per-token normalisation matters
        mask[i, 2:2 + int(torch.randint(1, width - 2, (1,), generator=g))] = 1
    ref = -torch.rand(2 * pairs, generator=g) * 10
    summed = (per_token * mask[:, 1:]).sum(-1)
    tokens = mask[:, 1:].sum(-1)
    ours, _, _ = dpo_loss(summed[:pairs], summed[pairs:], ref[:pairs], ref[pairs:], beta, loss_type="ipo",
                          chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:])
    (grad_ours,) = torch.autograd.grad(ours, per_token)
    theirs, _ = _trl_dpo_loss(per_token, mask, ref[:pairs], ref[pairs:], beta, loss_type="ipo")
    (grad_theirs,) = torch.autograd.grad(theirs, per_token)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_conservative_dpo_hand_values() -> None:
    # cDPO with eps = 0.25 at margin beta*m = 1: -(0.75 log s(1) + 0.25 log s(-1)); its gradient
    # vanishes where s(beta m) = 1 - eps, so the margin stops growing instead of running to infinity.
    t = torch.tensor
    loss, _, _ = dpo_loss(t([1.0]), t([-1.0]), t([0.0]), t([0.0]), beta=0.5, label_smoothing=0.25)
    sig = 1 / (1 + math.exp(-1.0))
    assert loss.item() == pytest.approx(-(0.75 * math.log(sig) + 0.25 * math.log(1 - sig)), abs=1e-6)
    at = math.log(0.75 / 0.25)  # s(x) = 0.75
    pc = t([at], requires_grad=True)
    dpo_loss(pc, t([0.0]), t([0.0]), t([0.0]), beta=1.0, label_smoothing=0.25)[0].backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.DPOConfig(policy=Path("p"), output_dir=Path("o"), dataset=Path("d"), loss_type="ipo", label_smoothing=0.1)


# --- GRPO ------------------------------------------------------------------------------------


def test_group_advantages_hand_values() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0]), 2)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    torch.testing.assert_close(adv, torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0, 0,
                                                  1 / (s * 2 + 1e-4), -1 / (s * 2 + 1e-4), 0, 0]))
    adv3 = group_advantages(torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0]), 3)
    # Group 1: mean 2, std 1. Group 2: mean 2, std sqrt(12).
    torch.testing.assert_close(adv3, torch.tensor([1 / 1.0001, -1 / 1.0001, 0, -2 / (12**0.5 + 1e-4),
                                                   -2 / (12**0.5 + 1e-4), 4 / (12**0.5 + 1e-4)]))
    rewards = torch.rand(40, generator=torch.Generator().manual_seed(1))
    per_group = group_advantages(rewards, 8).view(5, 8)
    torch.testing.assert_close(per_group.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    # A group whose completions all score the same carries no signal: zeros, not NaN.
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_doctest() -> None:
    assert doctest.testmod(grpo).failed == 0


def _batch(seed: int = 0, rows: int = 4, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, width, generator=g) * 2
    mask = torch.ones(rows, width)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    adv = torch.randn(rows, generator=g)
    return logp, mask, adv


def test_grpo_on_policy_gradient_is_advantage_times_grad_logp() -> None:
    logp, mask, adv = _batch()
    logp = logp.requires_grad_(True)
    loss, metrics = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, kl_coef=0.04)
    loss.backward()
    # ratio == 1 and KL's gradient vanishes at logp == ref: REINFORCE with the per-sequence token mean.
    rows = logp.shape[0]
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / rows
    torch.testing.assert_close(logp.grad, expected)
    assert loss.item() == pytest.approx(-(adv.mean()).item(), abs=1e-6)
    assert metrics["rl/kl"] == 0.0 and metrics["rl/clip_fraction"] == 0.0


def test_grpo_clipping_zeroes_the_gradient_outside_the_trust_region() -> None:
    eps = 0.2
    old = torch.full((4, 2), -1.0)
    # Token 0 of every row: ratio 1.5 (above 1 + eps) or 0.5 (below 1 - eps). Token 1: ratio 1.
    shift = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    logp = old.clone()
    logp[:, 0] += shift
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = grpo_loss(logp, old, logp.detach(), adv, torch.ones(4, 2), clip_eps=eps, kl_coef=0.0)
    loss.backward()
    grad = logp.grad[:, 0]
    # Clipped (no gradient): ratio too high with A > 0, ratio too low with A < 0.
    assert grad[0].item() == 0.0 and grad[3].item() == 0.0
    # Not clipped: min() keeps the unclipped, pessimistic term -> d(-ratio*A)/dlogp = -ratio*A / (2 tokens * 4 rows).
    assert grad[1].item() == pytest.approx(1.5 * 1.0 / 8)
    assert grad[2].item() == pytest.approx(-0.5 * 1.0 / 8)
    torch.testing.assert_close(logp.grad[:, 1], -adv / 8)  # ratio 1 tokens: plain policy gradient
    # Half of the tokens sit outside [0.8, 1.2], but the clip binds (removes the gradient) on two of
    # the eight only: rows 1 and 2 keep the unclipped, pessimistic term.
    assert metrics["rl/clip_fraction"] == pytest.approx(0.25)


def test_grpo_k3_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    logp, mask, adv = _batch(seed=2)
    _, same = grpo_loss(logp, logp, logp, adv, mask, clip_eps=0.2, kl_coef=1.0)
    assert same["rl/kl"] == 0.0
    ref = logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    _, diff = grpo_loss(logp, logp, ref, adv, mask, clip_eps=0.2, kl_coef=1.0)
    d = ref - logp
    expected = ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()  # k3 = e^d - d - 1 >= 0
    assert diff["rl/kl"] == pytest.approx(expected.item(), rel=1e-6) and diff["rl/kl"] > 0
    # With zero advantages the loss is the KL term alone: kl_coef times the per-sequence mean of k3.
    loss, _ = grpo_loss(logp, logp, ref, torch.zeros(4), mask, clip_eps=0.2, kl_coef=0.5)
    per_seq = ((torch.exp(d) - d - 1) * mask).sum(1) / mask.sum(1)
    assert loss.item() == pytest.approx(0.5 * per_seq.mean().item(), rel=1e-6)


def test_grpo_k3_is_an_unbiased_estimate_of_kl() -> None:
    # E_{x~pi}[k3] = sum pi (ref/pi - log(ref/pi) - 1) = KL(pi || ref), exactly, on a small vocabulary.
    pi = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    ref = torch.softmax(torch.tensor([1.0, 0.0, 0.5, -0.5]), 0)
    d = ref.log() - pi.log()
    k3 = torch.exp(d) - d - 1
    assert (pi * k3).sum().item() == pytest.approx(F.kl_div(ref.log(), pi, reduction="sum").item(), rel=1e-5)


def _trl_grpo_loss(logp, old, ref, adv, mask, eps, beta, *, loss_type="grpo", eps_high=None, max_len=None
                   ) -> tuple[torch.Tensor, dict]:
    """TRL's GRPO-family loss (`GRPOTrainer._compute_loss`, token-level ratios)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    metrics = {"train": defaultdict(list)}
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_SingleProcessAccelerator(), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high or eps, use_vllm=False,
        max_completion_length=max_len or logp.shape[1],
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, _metrics=metrics,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None))
    rows, width = logp.shape
    inputs = {"prompt_ids": torch.zeros(rows, 3, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().float()}
    return GRPOTrainer._compute_loss(fake, None, inputs), metrics["train"]


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_grpo_loss_matches_trl(kl_coef: float) -> None:
    pytest.importorskip("trl")
    old, mask, adv = _batch(seed=4, rows=6, width=8)
    g = torch.Generator().manual_seed(5)
    logp = (old + torch.randn(old.shape, generator=g) * 0.3).requires_grad_(True)  # ratios both sides of the clip
    ref = old + torch.randn(old.shape, generator=g) * 0.3
    eps = 0.2

    ours, metrics = grpo_loss(logp, old, ref, adv, mask, clip_eps=eps, kl_coef=kl_coef)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    theirs, trl_metrics = _trl_grpo_loss(logp, old, ref, adv, mask.long(), eps, kl_coef)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert (grad_ours != 0).any()
    if kl_coef:
        assert metrics["rl/kl"] == pytest.approx(trl_metrics["kl"][-1], rel=1e-5)


@pytest.mark.parametrize(("loss_type", "eps_high"), [("grpo", 0.28), ("dr_grpo", None), ("dapo", 0.28)])
def test_grpo_variants_match_trl(loss_type: str, eps_high: float | None) -> None:
    # Dr. GRPO's constant normaliser (max_completion_length = 10, wider than the mask) and DAPO's
    # batch token mean and clip-higher, on ratios on both sides of the asymmetric clip.
    pytest.importorskip("trl")
    old, mask, adv = _batch(seed=6, rows=6, width=8)
    g = torch.Generator().manual_seed(7)
    logp = (old + torch.randn(old.shape, generator=g) * 0.3).requires_grad_(True)
    ref = old + torch.randn(old.shape, generator=g) * 0.3
    ours, metrics = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.04, clip_eps_high=eps_high,
                              loss_type=loss_type, max_tokens=10)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    theirs, trl_metrics = _trl_grpo_loss(logp, old, ref, adv, mask.long(), 0.2, 0.04, loss_type=loss_type,
                                         eps_high=eps_high, max_len=10)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert (grad_ours != 0).any()


def test_grpo_clip_fraction_counts_only_where_the_clip_binds() -> None:
    # Ratios 1.5 and 0.5 with both advantage signs: the clip binds for (1.5, A>0) and (0.5, A<0) only;
    # with clip-higher 0.6 the ratio 1.5 is inside the region and only (0.5, A<0) binds.
    old = torch.zeros(4, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ones = torch.ones(4, 1)
    _, m = grpo_loss(logp, old, logp, adv, ones, clip_eps=0.2, kl_coef=0.0)
    assert m["rl/clip_fraction"] == pytest.approx(0.5)
    _, m = grpo_loss(logp, old, logp, adv, ones, clip_eps=0.2, kl_coef=0.0, clip_eps_high=0.6)
    assert m["rl/clip_fraction"] == pytest.approx(0.25)


def test_dr_grpo_hand_values() -> None:
    # No std in the advantage; token sums over the constant max_tokens, so a longer answer with the
    # same advantage carries proportionally more gradient (GRPO divides each row by its own length).
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale=False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, 1.0]), mask, 0.2, 0.0,
                        loss_type="dr_grpo", max_tokens=8)
    assert loss.item() == pytest.approx(-(4 + 1) / 8 / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, -mask / 8 / 2)


def test_dapo_token_mean_and_overlong_penalty_hand_values() -> None:
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.0,
                        loss_type="dapo")
    assert loss.item() == pytest.approx(-(4 - 1) / 5)  # one mean over the 5 real tokens
    assert grpo.overlong_penalty([3, 4, 5, 6], max_len=6, buffer=2, penalty=0.5) == [0.0, 0.0, -0.25, -0.5]
    assert grpo.overlong_penalty([6], max_len=6, buffer=0) == [0.0]
    assert grpo.informative_groups(torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 2.0]), 2).tolist() == [False, True, False]


def test_grpo_loss_matches_the_paper_formula() -> None:
    # Independent re-implementation, loop by loop, of DeepSeekMath eq. 3 (GRPO) with the k3 KL.
    old, mask, adv = _batch(seed=6)
    g = torch.Generator().manual_seed(7)
    logp = old + torch.randn(old.shape, generator=g) * 0.4
    ref = old + torch.randn(old.shape, generator=g) * 0.4
    eps, beta = 0.2, 0.1
    total = 0.0
    for i in range(logp.shape[0]):
        terms = []
        a = float(adv[i])
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = math.exp(float(logp[i, t] - old[i, t]))
                clipped = min(max(r, 1 - eps), 1 + eps)
                q = math.exp(float(ref[i, t] - logp[i, t]))
                terms.append(min(r * a, clipped * a) - beta * (q - math.log(q) - 1))
        total += sum(terms) / len(terms)
    objective = total / logp.shape[0]
    loss, _ = grpo_loss(logp, old, ref, adv, mask, clip_eps=eps, kl_coef=beta)
    assert loss.item() == pytest.approx(-objective, abs=1e-5)


# --- rewards ---------------------------------------------------------------------------------


def test_rewards_doctests() -> None:
    assert doctest.testmod(rewards).failed == 0


@pytest.mark.parametrize(("completion", "answer", "correct", "formatted"), [
    ("<think>2 + 3 = 5</think> <answer>5</answer>", 5, 1.0, 1.0),
    ("<think>2 + 3 = 5</think><answer>5</answer>", 5, 1.0, 1.0),  # no space needed between the tags
    ("  <think>a\nb</think>\n<answer> 5 </answer>\n", 5, 1.0, 1.0),  # whitespace and newlines around
    ("5", 5, 0.0, 0.0),  # right number, no tags
    ("", 5, 0.0, 0.0),
    ("The answer is 5.", 5, 0.0, 0.0),
    ("<answer>5</answer>", 5, 1.0, 0.0),  # right but no reasoning
    ("<think>x</think> <answer>6</answer>", 5, 0.0, 1.0),  # formatted but wrong
    ("<answer>4</answer> no wait <answer>5</answer>", 5, 1.0, 0.0),  # the last answer counts
    ("<answer>5</answer> no wait <answer>4</answer>", 5, 0.0, 0.0),
    ("<think>x</think> <answer>5</answer> <answer>5</answer>", 5, 1.0, 0.0),  # two answers: not the format
    ("<think>2 - 5 = -3</think> <answer>-3</answer>", -3, 1.0, 1.0),  # negative numbers
    ("<think>x</think> <answer>- 3</answer>", -3, 0.0, 0.0),
    ("<think>x</think> <answer>5.0</answer>", 5, 0.0, 0.0),  # exact integer string, not a float
    ("<think>x</think> <answer>05</answer>", 5, 0.0, 1.0),
    ("<think>x</think> <answer>5</answer> trailing words", 5, 1.0, 0.0),
    ("<answer>5", 5, 0.0, 0.0),  # unclosed tag
    ("<think>x <answer>5</answer>", 5, 1.0, 0.0),  # unclosed think
])
def test_rewards_on_known_strings(completion: str, answer: int, correct: float, formatted: float) -> None:
    assert correctness([completion], answers=[answer]) == [correct]
    assert well_formatted([completion]) == [formatted]
    assert combined([completion], answers=[answer], format_weight=0.1) == [round(correct + 0.1 * formatted, 6)]


def test_rewards_are_batched_and_refuse_mismatched_answers() -> None:
    texts = ["<think>x</think> <answer>1</answer>", "<answer>2</answer>", "3"]
    assert correctness(texts, answers=[1, 2, 3]) == [1.0, 1.0, 0.0]
    assert combined(texts, answers=[1, 2, 3], format_weight=0.5) == [1.5, 1.0, 0.0]
    assert correctness(texts, answers=[1, 2, 3], prompts=["ignored"] * 3) == [1.0, 1.0, 0.0]  # extra kwargs ok
    with pytest.raises(ValueError):
        correctness(texts, answers=[1, 2])


# --- language modelling ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_lm_loss_is_masked_next_token_cross_entropy(tiny_lm: LlamaForCausalLM) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 37, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    labels[2, ::2] = -100
    loss, metrics = lm_loss(tiny_lm, {"input_ids": ids, "labels": labels})
    assert metrics == {}
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids).logits
    # By hand: position t predicts token t+1; -100 targets drop out of numerator and denominator.
    logprobs = torch.log_softmax(logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logprobs.gather(2, target.clamp(min=0)[..., None]).squeeze(-1)
    hand = (nll * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 37), target.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # Right padding after the last supervised target cannot leak into the loss.
    padded = ids.clone()
    padded[1, 7:] = 0
    loss2, _ = lm_loss(tiny_lm, {"input_ids": padded, "labels": labels})
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_lm_loss_on_shifted_targets_scores_every_position(tiny_lm: LlamaForCausalLM) -> None:
    # A token-shard window: seq_len inputs and their seq_len next tokens, none shifted away.
    rows = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    loss, _ = lm_loss(tiny_lm, {"input_ids": rows[:, :-1], "targets": rows[:, 1:]})
    with torch.no_grad():
        logits = tiny_lm(input_ids=rows[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, 37), rows[:, 1:].reshape(-1))  # all 10 positions, no shift
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # The same tokens read as one unshifted row of 11: causal, so the same 30 predictions.
    full, _ = lm_loss(tiny_lm, {"input_ids": rows, "labels": rows})
    assert full.item() == pytest.approx(loss.item(), rel=1e-5)


def test_unigram_perplexity_hand_value() -> None:
    # Add-one counts of [0, 0, 1] over 3 types: p = [3, 2, 1] / 6; held-out [0, 2] -> exp(-(log 1/2 + log 1/6) / 2).
    ppl = unigram_perplexity(np.bincount([0, 0, 1], minlength=3), np.bincount([0, 2], minlength=3))
    assert ppl == pytest.approx(math.sqrt(12))
    assert math.isnan(unigram_perplexity(np.bincount([0, 0, 1], minlength=3), np.zeros(3, dtype=np.int64)))  # none held out


def test_heldout_perplexity_without_heldout_tokens_is_nan(tiny_lm: LlamaForCausalLM) -> None:
    for n in (0, 8):  # tokenize.heldout_fraction=0 leaves none; 8 tokens make no window of 8 + 1
        assert math.isnan(heldout_perplexity(tiny_lm, np.arange(n), seq_len=8, max_windows=4))
    assert math.isfinite(heldout_perplexity(tiny_lm, np.arange(9), seq_len=8, max_windows=4))


def test_sft_replay_windows_are_training_shard_windows_fixed_by_seed_and_step(tokens: Path, tmp_path: Path) -> None:
    cfg = SFTConfig(dataset=tmp_path, policy=tmp_path, output_dir=tmp_path, tokens=tokens, batch_size=8,
                    replay_fraction=0.5, replay_seq_len=16)
    train, heldout = TokenShards(tokens, "train"), TokenShards(tokens, "heldout")
    a = replay_windows(train, 5, cfg)
    assert a.shape == (4, 16) and a.dtype == np.int64
    assert np.array_equal(a, replay_windows(TokenShards(tokens, "train"), 5, cfg))  # a resumed run: same rows
    assert not np.array_equal(a, replay_windows(train, 6, cfg))
    assert not np.array_equal(a, replay_windows(train, 5, SFTConfig(**{**vars(cfg), "train": type(cfg.train)(seed=1)})))
    # Each row is 16 consecutive tokens of the training split (pretraining's window of that step).
    stream = train.read(0, len(train))
    for row, w in zip(a, train.window_indices(5, 15, 4, seed=cfg.train.seed), strict=True):
        assert np.array_equal(row, stream[w * 15 : w * 15 + 16])
    # ... never of the held-out split: no row is a slice of it.
    held = heldout.read(0, len(heldout))
    assert len(held) >= 16
    assert not any(np.array_equal(row, held[i : i + 16]) for row in a for i in range(len(held) - 15))
