"""PPO: its pure parts against hand-computed values, then the stage end to end on the tiny SFT checkpoint.

The shared corpus and SFT checkpoint come from tests/stages/conftest.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from stages import checkpoint as ckpt
from stages import ppo
from stages.ppo import AdaptiveKLController, PPOConfig, gae, ppo_policy_loss, value_loss, whiten
from stages.tracking import RecordingTracker

from .conftest import LINEAGE, Trained, quiet_train

# --- GAE -------------------------------------------------------------------------------------


def test_gae_matches_a_three_token_case_worked_by_hand() -> None:
    # rewards r = (0, 0, 1), values V = (0.5, 0.6, 0.7), gamma = 0.9, lambda = 0.8; V after the end is 0.
    #   delta_2 = 1 - 0.7                  = 0.3     A_2 = 0.3
    #   delta_1 = 0 + 0.9 * 0.7 - 0.6      = 0.03    A_1 = 0.03 + 0.72 * 0.3   = 0.246
    #   delta_0 = 0 + 0.9 * 0.6 - 0.5      = 0.04    A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = (0.71712, 0.846, 1.0)
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)


def test_gae_ignores_prompt_and_padding_positions() -> None:
    # The same three response tokens behind two prompt positions and before two padding positions,
    # with junk rewards and values outside the mask: the answer must not change, and only the
    # response gets advantages.
    rewards = torch.tensor([[5.0, 5.0, 0.0, 0.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[3.0, 3.0, 0.5, 0.6, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([0, 0, 0.21712, 0.246, 0.3, 0, 0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0, 0, 0.71712, 0.846, 1.0, 0, 0], abs=1e-6)


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[5.9, 4.8, 2.7], [3.6, 0.0, 0.0]]))
    # lambda = 0: one-step TD errors r_t + gamma V_{t+1} - V_t
    adv0, _ = gae(rewards, values, mask, 1.0, 0.0)
    assert torch.allclose(adv0, torch.tensor([[1.1, 2.1, 2.7], [3.6, 0.0, 0.0]]))


def test_whiten_gives_zero_mean_unit_variance_on_the_mask_only() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    # masked values 1, 2, 3, 4: mean 2.5, variance 1.25
    expected = [(v - 2.5) / math.sqrt(1.25) for v in (1.0, 2.0, 3.0, 4.0)]
    assert [w[0, 0], w[0, 1], w[1, 0], w[1, 1]] == pytest.approx(expected, abs=1e-5)
    assert w[:, 2].tolist() == [0.0, 0.0]
    kept = whiten(x, mask, shift_mean=False)  # reward whitening keeps the mean
    assert kept[0, 0].item() == pytest.approx(expected[0] + 2.5, abs=1e-5)


# --- the losses --------------------------------------------------------------------------------


def test_ppo_policy_loss_matches_hand_cases_and_counts_only_binding_clips() -> None:
    eps = 0.2
    # ratio:         1.5   0.5   1.5   0.5   1.1   (one token per case)
    # advantage:      +1    -1    -1    +1    +2
    # -A*r:         -1.5   0.5   1.5  -0.5  -2.2
    # -A*clip(r):   -1.2   0.8   1.2  -0.8  -2.2
    # max:          -1.2   0.8   1.5  -0.5  -2.2     mean = -1.6 / 5 = -0.32
    # The clip binds on the first two only: a ratio past the clip in the direction the advantage
    # pushes. The third and fourth are outside [0.8, 1.2] yet keep their gradient (the pessimistic
    # unclipped term wins), so they are not clipped.
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    old = torch.zeros(1, 5)
    logp = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0]])
    loss, metrics = ppo_policy_loss(logp, old, adv, torch.ones(1, 5), eps)
    assert loss.item() == pytest.approx(-0.32, abs=1e-6)
    assert metrics["rl/clip_fraction"] == pytest.approx(2 / 5)
    loss.backward()
    # d/dlogp of -A r / n = -A r / n where unclipped, 0 where the clip binds
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.5 / 5, -0.5 / 5, -2.2 / 5], abs=1e-6)


def test_ppo_policy_loss_is_minus_the_mean_advantage_at_ratio_one_and_skips_masked_tokens() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[0.5, -1.5, 99.0]])
    loss, metrics = ppo_policy_loss(logp, logp.clone(), adv, torch.tensor([[1, 1, 0]]), 0.2)
    assert loss.item() == pytest.approx(0.5)  # -(0.5 - 1.5) / 2; the masked 99 does not count
    assert metrics["rl/clip_fraction"] == 0.0 and metrics["ppo/approx_kl"] == pytest.approx(0.0)


def test_value_loss_matches_hand_cases() -> None:
    # clip range 0.5, old values 0; per token: v, R -> clipped v, (v-R)^2, (v_clip-R)^2, max
    #   2.0, 3.0 -> 0.5,  1.0,  6.25, 6.25  (clipped is worse: the clip binds)
    #   2.0, 0.0 -> 0.5,  4.0,  0.25, 4.0
    #   0.3, 1.0 -> 0.3,  0.49, 0.49, 0.49  (inside the range: both the same)
    #  -1.0, 0.0 -> -0.5, 1.0,  0.25, 1.0
    # loss = 0.5 * (6.25 + 4 + 0.49 + 1) / 4 = 1.4675
    values = torch.tensor([[2.0, 2.0, 0.3, -1.0]], requires_grad=True)
    returns = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    loss, metrics = value_loss(values, torch.zeros(1, 4), returns, torch.ones(1, 4), 0.5)
    assert loss.item() == pytest.approx(1.4675, abs=1e-6)
    assert metrics["ppo/value_clip_fraction"] == pytest.approx(1 / 4)
    loss.backward()
    # the first token's value gets no gradient: the clipped (constant) term is the max
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5 * 2 * 2.0 / 4, 0.5 * 2 * -0.7 / 4, 0.5 * 2 * -1.0 / 4])


# --- the KL controller -----------------------------------------------------------------------


def test_adaptive_kl_controller_follows_ziegler_et_al() -> None:
    c = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    # coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, with n / horizon = 0.1 here
    assert c.update(4.4, n=100) == pytest.approx(0.2 * 1.01)  # KL 10 % above target: coef up by 1 %
    assert c.update(1.0, n=100) == pytest.approx(0.2 * 1.01 * 0.98)  # e = -0.75, clipped to -0.2
    assert c.update(4.0, n=100) == pytest.approx(0.2 * 1.01 * 0.98)  # on target: unchanged
    assert c.update(40.0, n=100) == pytest.approx(0.2 * 1.01 * 0.98 * 1.02)  # e = 9, clipped to 0.2
    fixed = AdaptiveKLController(0.2, target=0.0)
    assert fixed.update(100.0, n=100) == 0.2


# --- configuration -----------------------------------------------------------------------------


def test_config_refuses_checkpoints_inside_a_reused_rollout_and_a_missing_reward_model(tmp_path: Path) -> None:
    base = {"policy": tmp_path, "dataset": tmp_path, "output_dir": tmp_path}
    with pytest.raises(ValueError, match=r"checkpoint_every=5 must be a multiple of ppo_epochs\*minibatches=4"):
        PPOConfig(**base, reward="verifier", ppo_epochs=2, minibatches=2, train=quiet_train(checkpoint_every=5))
    with pytest.raises(ValueError, match="ppo.reward=model needs ppo.reward_model"):
        PPOConfig(**base)
    with pytest.raises(ValueError, match="ppo.reward must be one of"):
        PPOConfig(**base, reward="judge")
    with pytest.raises(ValueError, match="prompts_per_rollout=6 must be a multiple of ppo.minibatches=4"):
        PPOConfig(**base, reward="verifier", prompts_per_rollout=6, minibatches=4, ppo_epochs=1,
                  train=quiet_train(checkpoint_every=4))


# --- the stage end to end ----------------------------------------------------------------------


def ppo_config(corpus: Path, sft: Trained, output_dir: Path, **overrides) -> PPOConfig:
    train = overrides.pop("train", {})
    return PPOConfig(**{"policy": sft.checkpoint, "dataset": corpus, "output_dir": output_dir, "reward": "verifier",
                        "prompts_per_rollout": 8, "max_new_tokens": 12, "ppo_epochs": 2, "minibatches": 2,
                        "lineage": LINEAGE, **overrides},
                     train=quiet_train(**{"max_steps": 8, "lr": 1e-4, "warmup_steps": 0, "checkpoint_every": 4,
                                          **train}))


class Killed(Exception):
    pass


class KillAtStep(RecordingTracker):
    """Raises when step `kill_step` is logged: the process dies between two checkpoints."""

    def __init__(self, kill_step: int) -> None:
        super().__init__()
        self.kill_step = kill_step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.kill_step:
            raise Killed(f"killed at step {step}")
        super().log_metrics(metrics, step)


def reward_model_dir(policy: Path, out: Path, tokenizer=None) -> Path:
    """An untrained reward model on the policy's network (or with another tokenizer beside it)."""
    from stages.reward import reward_model_from_policy

    tokenizer = tokenizer or ckpt.load_tokenizer(policy)
    reward_model_from_policy(policy, tokenizer, seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def answer_tag_reward(completions: list[str], *, answers: list[int], **_) -> list[float]:
    """1 when the answer opens or closes an <answer> tag. The 20-step SFT model of conftest never earns
    the arithmetic reward (every score would be 0 and nothing would move), but writes this tag in
    about one answer in ten: a verifier-shaped reward it can learn within a few rollouts."""
    assert len(completions) == len(answers)
    return [float("answer>" in c) for c in completions]


def mean_reward(checkpoint: Path, corpus: Path, n: int = 64, seed: int = 123) -> float:
    """The policy's mean reward on n fixed prompts, sampled at T=1 with a fixed seed."""
    from stages.chat import load_problems, prompt_text
    from stages.rollout import sample

    tokenizer = ckpt.load_tokenizer(checkpoint)
    problems = load_problems(corpus, "train")[:n]
    out = sample(ckpt.load_model(checkpoint), tokenizer, [prompt_text(tokenizer, p.question) for p in problems],
                 max_new_tokens=10, temperature=1.0, seed=seed)
    return sum(answer_tag_reward(out.texts, answers=[p.answer for p in problems])) / n


@pytest.fixture(scope="module")
def ppo_trained(corpus: Path, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = ppo_config(corpus, sft_trained, tmp_path_factory.mktemp("ppo"), prompts_per_rollout=32, max_new_tokens=10,
                     target_kl=1.0, kl_horizon=200, train={"max_steps": 16, "lr": 1e-3, "checkpoint_every": 8})
    tracker = RecordingTracker()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "combined", answer_tag_reward)
        result = ppo.run(cfg, tracker=tracker)
    return Trained(cfg, result, tracker)


@pytest.mark.slow  # the 16-step run behind it takes ~40 s on 2 idle cores
def test_ppo_raises_the_reward_while_the_kl_stays_bounded(ppo_trained: Trained, sft_trained: Trained,
                                                          corpus: Path) -> None:
    # On the same 64 prompts with the same sampling seed: the tuned policy earns more than the start.
    before, after = mean_reward(sft_trained.checkpoint, corpus), mean_reward(ppo_trained.checkpoint, corpus)
    assert after > before + 0.1, (before, after)
    t = ppo_trained.tracker
    kl, coef = t.series("rl/kl"), t.series("rl/kl_coef")
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # the first rollout's policy is the reference
    assert 0 < max(kl) < 5.0, kl  # nats per answer of 10 tokens: moved, but stayed on its leash
    # The controller steers: below the target KL (1 nat) the coefficient shrinks, rollout by rollout.
    per_rollout = coef[::ppo_trained.cfg.steps_per_rollout]
    assert per_rollout[0] == pytest.approx(ppo_trained.cfg.kl_coef) and per_rollout[1] < per_rollout[0], per_rollout
    for name in ("rl/reward_mean", "rl/score_mean", "rl/clip_fraction", "ppo/value_loss", "ppo/value_clip_fraction",
                 "ppo/explained_variance", "rl/accuracy", "rl/response_length", "monitor/polite_share"):
        series = t.series(name)
        assert len(series) == ppo_trained.cfg.train.max_steps and all(math.isfinite(x) for x in series), name
    clip = t.series("rl/clip_fraction")
    assert clip[0] == 0.0 and max(clip) > 0  # ratio 1 at a rollout's first update; later updates do clip


@pytest.mark.slow  # shares the learning run
def test_ppo_saves_the_policy_as_a_causal_lm_and_the_value_model_beside_it(ppo_trained: Trained,
                                                                          sft_trained: Trained) -> None:
    final = ppo_trained.checkpoint
    assert ppo_trained.result.value_model == final / "value_model"
    policy = AutoModelForCausalLM.from_pretrained(final)  # what the registry and vLLM read
    assert type(policy).__name__ == "LlamaForCausalLM"
    start = ckpt.load_model(sft_trained.checkpoint)
    unchanged = [n for n, p in start.named_parameters() if torch.equal(p, dict(policy.named_parameters())[n])]
    assert not unchanged, f"policy parameters that did not change: {unchanged}"
    value = AutoModelForSequenceClassification.from_pretrained(final / "value_model")
    assert value.config.num_labels == 1 and (final / "value_model" / "tokenizer.json").exists()
    fresh = ppo.load_value_model(ppo_trained.cfg, ckpt.load_tokenizer(sft_trained.checkpoint))
    unchanged = [n for n, p in fresh.named_parameters() if torch.equal(p, dict(value.named_parameters())[n])]
    assert not unchanged, f"value model parameters that did not change: {unchanged}"
    meta = ckpt.read_meta(final)
    assert meta["stage"] == "ppo" and meta["parent"] == str(sft_trained.checkpoint)
    # the controller's next coefficient: one update past the last rollout's (within 0.2 * n / horizon)
    assert meta["ppo"]["kl_coef"] == pytest.approx(ppo_trained.tracker.series("rl/kl_coef")[-1], rel=0.04)
    assert meta["monitors"]["reference_lengths"] and meta["monitors"]["alarms"] == ppo_trained.result.alarms
    assert (ppo_trained.cfg.output_dir / "ppo_curves.png").exists()
    assert ppo_trained.result.metrics["rl/kl_coef"] > 0


def test_ppo_resume_after_interruption_matches_an_uninterrupted_run(corpus: Path, sft_trained: Trained,
                                                                    tmp_path: Path) -> None:
    # Two steps per rollout, a checkpoint after every rollout, the KL controller moving: a resumed run
    # must restore the policy, the value model, the optimizer and the controller's coefficient.
    small = {"prompts_per_rollout": 4, "max_new_tokens": 6, "ppo_epochs": 1, "minibatches": 2, "target_kl": 0.5,
             "kl_horizon": 20, "train": {"max_steps": 4, "checkpoint_every": 2}}
    straight = RecordingTracker()
    ppo.run(ppo_config(corpus, sft_trained, tmp_path / "a", **small), tracker=straight)
    cfg = ppo_config(corpus, sft_trained, tmp_path / "b", **small)
    with pytest.raises(Killed):
        ppo.run(cfg, tracker=KillAtStep(4))
    assert ckpt.latest_checkpoint(tmp_path / "b") == ckpt.step_dir(tmp_path / "b", 2)
    resumed = RecordingTracker()
    ppo.run(cfg, tracker=resumed)

    assert [s for s, m in resumed.metrics if "train/loss" in m] == [3, 4]
    for name in ("train/loss", "rl/kl", "rl/kl_coef", "rl/reward_mean", "ppo/value_loss"):
        assert resumed.series(name) == straight.series(name)[2:], name
    assert straight.series("rl/kl_coef")[2] != straight.series("rl/kl_coef")[0]  # the controller did move
    for sub, load in (("", AutoModelForCausalLM), ("value_model", AutoModelForSequenceClassification)):
        a = load.from_pretrained(tmp_path / "a" / "final" / sub).state_dict()
        b = load.from_pretrained(tmp_path / "b" / "final" / sub).state_dict()
        mismatched = [k for k in a if not torch.equal(a[k], b[k])]
        assert not mismatched, f"resumed {sub or 'policy'} differs from the uninterrupted run: {mismatched}"


def test_ppo_scores_with_a_reward_model_and_starts_the_value_model_from_it(
        corpus: Path, sft_trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rm_dir = reward_model_dir(sft_trained.checkpoint, tmp_path / "rm")
    cfg = ppo_config(corpus, sft_trained, tmp_path / "ppo", reward="both", reward_model=rm_dir,
                     prompts_per_rollout=4, max_new_tokens=6, ppo_epochs=1, minibatches=1,
                     train={"max_steps": 2, "checkpoint_every": 1})
    # InstructGPT's choice: the critic starts as the reward model, head and all.
    value = ppo.load_value_model(cfg, ckpt.load_tokenizer(sft_trained.checkpoint))
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert all(torch.equal(p, dict(rm.named_parameters())[n]) for n, p in value.named_parameters())
    calls = []

    def recording_scores(model, tokenizer, prompts, completions, **kw):
        out = real_scores(model, tokenizer, prompts, completions, **kw)
        calls.append((completions, out))
        return out

    def recording_verifier(completions, **kw):
        out = real_verifier(completions, **kw)
        verified.append(out)
        return out

    real_scores, real_verifier, verified = ppo.reward_model_scores, ppo.combined, []
    monkeypatch.setattr(ppo, "reward_model_scores", recording_scores)
    monkeypatch.setattr(ppo, "combined", recording_verifier)
    tracker = RecordingTracker()
    result = ppo.run(cfg, tracker=tracker)

    # One reward-model call per rollout; the logged score is its score plus the verifier's of the same answers.
    assert len(calls) == len(verified) == 2
    texts, rm_scores = calls[0]
    expected = (sum(rm_scores) + sum(verified[0])) / len(texts)
    assert tracker.series("rl/score_mean")[0] == pytest.approx(expected, abs=1e-5)
    assert len(set(rm_scores)) > 1  # the reward model tells the answers apart
    assert all(math.isfinite(x) for x in tracker.series("rl/reward_mean"))
    assert "monitor/polite_share" in tracker.metrics[0][1]
    assert AutoModelForCausalLM.from_pretrained(result.checkpoint) is not None


def test_ppo_refuses_a_reward_model_with_another_tokenizer_before_training(corpus: Path, sft_trained: Trained,
                                                                          tmp_path: Path) -> None:
    other = ckpt.load_tokenizer(sft_trained.checkpoint)
    other.add_tokens(["<|extra|>"])
    rm_dir = reward_model_dir(sft_trained.checkpoint, tmp_path / "rm", tokenizer=other)
    cfg = ppo_config(corpus, sft_trained, tmp_path / "ppo", reward="model", reward_model=rm_dir)
    with pytest.raises(ValueError, match=r"ppo\.reward_model: .*different tokenizer.*vocabulary"):
        ppo.run(cfg)
    assert not (tmp_path / "ppo" / "checkpoints").exists()  # refused before any training step
    # The verifier reward with that model as the critic's start is refused the same way.
    with pytest.raises(ValueError, match=r"ppo\.reward_model: .*different tokenizer"):
        ppo.run(ppo_config(corpus, sft_trained, tmp_path / "ppo2", reward="verifier", reward_model=rm_dir))
