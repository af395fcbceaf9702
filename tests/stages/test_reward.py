"""The reward model stage: Bradley–Terry to hand values and to TRL's RewardTrainer code, a tiny RM that
learns separable pairs, a checkpoint any Hugging Face reader scores the same, bad input quarantined by
file:line, and the HH-RLHF loader on the real file.

Tiny checkpoints come from tests/stages/conftest.py. HH-RLHF holds offensive text: these tests assert on
structure and counts and never print an example.
"""

from __future__ import annotations

import doctest
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stages import checkpoint as ckpt
from stages import reward
from stages.chat import load_problems, prompt_and_response
from stages.reward import EncodedPair, RewardConfig, bradley_terry_loss
from stages.tasks import hh_rlhf
from stages.tasks.arithmetic import target
from stages.tracking import RecordingTracker

from .conftest import LINEAGE, Trained, quiet_train
from .test_losses import _SingleProcessAccelerator
from .test_training import assert_every_parameter_changed

HH = Path(__file__).resolve().parents[2] / hh_rlhf.DEFAULT_PATH


def write_pairs(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- the loss ----------------------------------------------------------------------------------


def test_bradley_terry_hand_values_and_gradient() -> None:
    t = torch.tensor
    rc = t([1.0, 0.5, -1.0], requires_grad=True)
    rr = t([0.0, 0.5, 1.0])
    loss = bradley_terry_loss(rc, rr)
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, 0, -2
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dr_c of log(1 + e^-d) / n = -sigmoid(-d) / n
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert rc.grad.tolist() == pytest.approx([-sig(-1) / 3, -sig(0) / 3, -sig(2) / 3], abs=1e-6)

    # A margin demands a larger gap: 1 - margin 1 = no preference (log 2); a per-pair margin tensor works too.
    assert bradley_terry_loss(t([1.0]), t([0.0]), margin=1.0).item() == pytest.approx(math.log(2), abs=1e-7)
    per_pair = bradley_terry_loss(t([1.0, 3.0]), t([0.0, 0.0]), margin=t([1.0, 0.0])).item()
    assert per_pair == pytest.approx((math.log(2) + math.log1p(math.exp(-3))) / 2, abs=1e-6)
    # Only the difference matters: shifting both rewards changes nothing.
    assert bradley_terry_loss(rc + 7, rr + 7).item() == pytest.approx(expected, abs=1e-6)
    m = reward.pair_metrics(t([1.0, 0.5, -1.0]), rr)
    assert m == {"reward/accuracy": pytest.approx(1 / 3), "reward/margin": pytest.approx((1 + 0 - 2) / 3)}


def test_reward_and_hh_doctests() -> None:
    assert doctest.testmod(reward).failed == 0
    assert doctest.testmod(hh_rlhf).failed == 0


def _trl_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None):
    """TRL's `RewardTrainer.compute_loss` on given rewards: a stand-in `self` and a model that returns them."""
    from trl.trainer.reward_trainer import RewardTrainer

    n = r_chosen.shape[0]
    metrics = {"train": defaultdict(list)}
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_SingleProcessAccelerator(),
                           args=SimpleNamespace(center_rewards_coefficient=None), _metrics=metrics,
                           _total_train_tokens=0, _tp_size=1)

    def model(**inputs):
        return SimpleNamespace(logits=torch.cat([r_chosen, r_rejected])[:, None])

    inputs = {"input_ids": torch.zeros(2 * n, 4, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(fake, model, inputs), metrics["train"]


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin: bool) -> None:
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rc = (torch.randn(7, generator=g) * 2).requires_grad_(True)
    rr = (torch.randn(7, generator=g) * 2).requires_grad_(True)
    margin = torch.rand(7, generator=g) if with_margin else None
    ours = bradley_terry_loss(rc, rr, margin if margin is not None else 0.0)
    grads_ours = torch.autograd.grad(ours, (rc, rr))
    theirs, trl_metrics = _trl_reward_loss(rc, rr, margin)
    grads_theirs = torch.autograd.grad(theirs, (rc, rr))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        torch.testing.assert_close(a, b)
    m = reward.pair_metrics(rc.detach(), rr.detach())
    assert m["reward/accuracy"] == pytest.approx(trl_metrics["accuracy"][-1])
    assert m["reward/margin"] == pytest.approx(trl_metrics["margin"][-1], abs=1e-6)


# --- a tiny reward model on separable pairs ------------------------------------------------------


@pytest.fixture(scope="module")
def separable_pairs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chosen: the formatted answer; rejected: the bare number. One feature (the format) separates them."""
    problems = load_problems(corpus, "train")[:240]
    rows = [{"prompt": p.question, "chosen": target(p), "rejected": str(p.answer)} for p in problems]
    # The annotation export's multi-turn prompts too.
    rows += [{"prompt": [{"role": "user", "content": p.question}], "chosen": target(p), "rejected": f"{p.answer}."}
             for p in load_problems(corpus, "train")[240:280]]
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def rm_trained(sft_trained: Trained, separable_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = RewardConfig(policy=sft_trained.checkpoint, pairs=separable_pairs, output_dir=tmp_path_factory.mktemp("rm"),
                       heldout_fraction=0.2, batch_size=16, lineage=LINEAGE,
                       train=quiet_train(max_steps=25, lr=1e-3, warmup_steps=2, checkpoint_every=25))
    tracker = RecordingTracker()
    return Trained(cfg, reward.run(cfg, tracker=tracker), tracker)


def test_reward_model_separates_separable_pairs(rm_trained: Trained) -> None:
    m = rm_trained.result.metrics
    assert m["eval/reward/pairs"] >= 30
    assert m["eval/reward/accuracy"] > 0.9, m
    assert 0 <= m["eval/reward/accuracy_stderr"] < 0.1
    assert m["eval/reward/chosen_mean"] > m["eval/reward/rejected_mean"]
    losses = rm_trained.tracker.series("train/loss")
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert rm_trained.tracker.series("reward/accuracy")[-1] > 0.9
    meta = ckpt.read_meta(rm_trained.checkpoint)
    assert meta["stage"] == "reward" and meta["parent"] == str(rm_trained.cfg.policy)
    assert meta["metrics"]["eval/reward/accuracy"] == m["eval/reward/accuracy"]
    assert "eval/reward/accuracy_stderr" in meta["metrics"] and meta["lineage"] == LINEAGE
    out = rm_trained.cfg.output_dir
    logged = {p.name for p, _ in rm_trained.tracker.artifacts}
    assert {"reward_distribution.png", "reward_curves.png"} <= logged
    assert (out / "reward_distribution.png").stat().st_size > 1000
    assert (out / "quarantine.jsonl").read_text() == ""  # nothing wrong with these pairs, and the file says so


def test_reward_model_changes_every_parameter(rm_trained: Trained) -> None:
    tok = ckpt.load_tokenizer(rm_trained.cfg.policy)
    initial = reward.reward_model_from_policy(rm_trained.cfg.policy, tok, seed=rm_trained.cfg.train.seed)
    trained, _ = reward.load_reward_model(rm_trained.checkpoint)
    assert_every_parameter_changed(initial, trained.requires_grad_(True))
    # The head starts from the seed: same seed, same head, so the comparison above is to the real start.
    again = reward.reward_model_from_policy(rm_trained.cfg.policy, tok, seed=rm_trained.cfg.train.seed)
    assert torch.equal(initial.score.weight, again.score.weight)


def test_reward_checkpoint_loads_as_sequence_classifier_and_scores_the_same(rm_trained: Trained) -> None:
    final = rm_trained.checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", ckpt.META} <= \
        {p.name for p in final.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    held = [json.loads(line) for line in (rm_trained.cfg.output_dir / "heldout_rewards.jsonl").read_text().splitlines()]
    assert len(held) == rm_trained.result.metrics["eval/reward/pairs"]

    # A plain transformers reader, padding its own batch, gets the rewards the stage recorded.
    records = [json.loads(line) for line in rm_trained.cfg.pairs.read_text().splitlines()]
    first = [records[int(h["source"].split(":")[1]) - 1] for h in held[:6]]
    seqs = [prompt_and_response(tok, r["prompt"], r["chosen"])[0] for r in first]
    for side in ("right", "left"):  # the reward is read at the last real token either way
        batch = tok.pad({"input_ids": seqs}, return_tensors="pt", padding_side=side)
        with torch.no_grad():
            outside = model(**batch).logits.squeeze(-1)
        assert outside.tolist() == pytest.approx([h["r_chosen"] for h in held[:6]], abs=1e-4), side
    # ...and so does `score`, the helper PPO, rejection sampling and best-of-N use.
    rm, rm_tok = reward.load_reward_model(final)
    scored = reward.score(rm, rm_tok, [r["prompt"] for r in first], [r["chosen"] for r in first], batch_size=4)
    assert scored == pytest.approx([h["r_chosen"] for h in held[:6]], abs=1e-4)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_pairs_are_quarantined_by_file_line_and_reason(sft_trained: Trained, tmp_path: Path) -> None:
    good = [{"prompt": f"What is {i} + 1?", "chosen": f"<answer>{i + 1}</answer>", "rejected": "no"} for i in range(8)]
    bad = [
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},  # line 9
        {"prompt": "Missing?", "chosen": "yes"},  # 10
        {"prompt": "Empty?", "chosen": "yes", "rejected": "   "},  # 11
        {"prompt": "", "chosen": "a", "rejected": "b"},  # 12
        {"prompt": [], "chosen": "a", "rejected": "b"},  # 13
        {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},  # 14
        {"prompt": "Long? " + "word " * 400, "chosen": "a", "rejected": "b"},  # 15
        "{not json",  # 16
        {"prompt": "Margin?", "chosen": "a", "rejected": "b", "margin": "big"},  # 17
    ]
    pairs = write_pairs(tmp_path / "pairs.jsonl", good + bad)
    cfg = RewardConfig(policy=sft_trained.checkpoint, pairs=pairs, output_dir=tmp_path / "rm", batch_size=4,
                       heldout_fraction=0.25, train=quiet_train(max_steps=1, warmup_steps=0))
    tracker = RecordingTracker()
    result = reward.run(cfg, tracker=tracker)
    quarantined = [json.loads(line) for line in (tmp_path / "rm" / "quarantine.jsonl").read_text().splitlines()]
    reasons = {q["source"]: q["reason"] for q in quarantined}
    assert list(reasons) == [f"pairs.jsonl:{n}" for n in range(9, 18)]
    expected = {9: "chosen equals rejected", 10: "rejected: missing", 11: "rejected: missing or empty",
                12: "prompt: empty", 13: "prompt: empty message list", 14: "prompt: messages must be",
                15: "more than max_len=128", 16: "not a JSON object", 17: "margin: not a finite number"}
    for line, words in expected.items():
        assert words in reasons[f"pairs.jsonl:{line}"], reasons
    assert quarantined[0]["record"] == bad[0]  # the record itself travels, for whoever fixes the data
    assert result.metrics["data/quarantined"] == 9 and tracker.params["data/quarantined"] == 9
    assert tracker.params["data/pairs"] == 8
    assert ckpt.is_complete(tmp_path / "rm")


def test_missing_columns_or_nothing_usable_is_one_clear_error(sft_trained: Trained, tmp_path: Path) -> None:
    no_rejected = write_pairs(tmp_path / "labels.jsonl", [{"prompt": "q", "chosen": "a"}] * 3)
    cfg = RewardConfig(policy=sft_trained.checkpoint, pairs=no_rejected, output_dir=tmp_path / "a",
                       train=quiet_train(max_steps=1))
    with pytest.raises(ValueError, match=r"labels\.jsonl.*missing rejected"):
        reward.run(cfg)
    all_bad = write_pairs(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3)
    cfg = RewardConfig(policy=sft_trained.checkpoint, pairs=all_bad, output_dir=tmp_path / "b",
                       train=quiet_train(max_steps=1))
    with pytest.raises(ValueError, match=r"same\.jsonl: no usable preference pairs \(3 quarantined"):
        reward.run(cfg)
    assert not ckpt.is_complete(tmp_path / "b")
    assert len((tmp_path / "b" / "quarantine.jsonl").read_text().splitlines()) == 3
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        reward.run(RewardConfig(policy=sft_trained.checkpoint, pairs=tmp_path / "nowhere.jsonl",
                                output_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="reward.heldout_fraction"):
        RewardConfig(policy=tmp_path, pairs=all_bad, output_dir=tmp_path, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="set `pairs`"):
        RewardConfig(policy=tmp_path, output_dir=tmp_path)


def test_margins_add_the_config_margin_to_each_pair(pretrained: Trained) -> None:
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    records = [("f:1", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}),
               ("f:2", {"prompt": "r", "chosen": "a", "rejected": "b", "margin": None}),
               ("f:3", {"prompt": "s", "chosen": "a", "rejected": "b"})]
    kept, quarantined = reward.encode_pairs(records, tok, max_len=128, margin=0.5)
    assert [p.margin for p in kept] == [2.5, 0.5, 0.5] and not quarantined
    assert kept[0].chosen[-1] == tok.eos_token_id and kept[0].chosen[:-2] == kept[0].rejected[:-2]


def test_parquet_pairs_with_message_prompts_and_margins(pretrained: Trained, tmp_path: Path) -> None:
    import pandas as pd

    rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "2 + 2?"}], "chosen": "4", "rejected": "5", "margin": 1.5},
            {"prompt": [{"role": "user", "content": "3 + 3?"}], "chosen": "6", "rejected": "6", "margin": 0.0}]
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    cfg = RewardConfig(policy=pretrained.checkpoint, pairs=path, output_dir=tmp_path / "rm")
    kept, quarantined = reward.encode_pairs(reward.load_pairs(cfg), tok, max_len=128, margin=0.0)
    assert [p.source for p in kept] == ["pairs.parquet:1"] and kept[0].margin == 1.5
    assert kept[0].chosen == prompt_and_response(tok, rows[0]["prompt"], "4")[0]
    assert [(q["source"], q["reason"].split(":")[0]) for q in quarantined] == \
        [("pairs.parquet:2", "chosen equals rejected")]


def test_heldout_split_keeps_a_prompt_on_one_side_and_is_stable() -> None:
    pairs = [EncodedPair(f"f:{i}", f"prompt-{i % 20}", [1], [2], 0.0) for i in range(200)]
    train, held = reward.split_heldout(pairs, 0.2)
    assert held and len(train) + len(held) == 200
    assert not {p.prompt_key for p in train} & {p.prompt_key for p in held}
    assert reward.split_heldout(list(reversed(pairs)), 0.2)[1] == list(reversed(held))  # order does not matter
    # Too few prompts for the hash to pick one: one is still held out, never all of them.
    train, held = reward.split_heldout(pairs[:2], 0.01)
    assert len(train) == len(held) == 1
    assert reward.split_heldout(pairs, 0.0) == (pairs, [])


def test_same_tokenizer_and_the_error_for_a_foreign_one(pretrained: Trained, tmp_path: Path) -> None:
    a = ckpt.load_tokenizer(pretrained.checkpoint)
    b = ckpt.load_tokenizer(pretrained.checkpoint)
    assert reward.same_tokenizer(a, b)
    reward.require_same_tokenizer(a, b, policy=Path("p"), reward_model=Path("rm"))  # no error
    b.add_tokens(["<|tool|>"])
    assert not reward.same_tokenizer(a, b)
    with pytest.raises(ValueError, match=r"reward model rm-dir has a different tokenizer from the policy pol-dir: "
                                         rf"vocabulary \({len(a)} vs {len(a) + 1} tokens\)"):
        reward.require_same_tokenizer(a, b, policy=Path("pol-dir"), reward_model=Path("rm-dir"))
    c = ckpt.load_tokenizer(pretrained.checkpoint)
    c.chat_template = "{{ messages }}"
    assert reward.tokenizer_differences(a, c) == ["chat template"]


# --- HH-RLHF ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HH.exists(), reason=f"{hh_rlhf.DEFAULT_PATH} is not here (shared datasets not mounted)")
def test_hh_loader_on_the_real_file() -> None:
    data = hh_rlhf.load(HH)
    assert len(data.pairs) + len(data.malformed) == 2312  # every line is a pair or named as malformed
    assert 2250 < len(data.pairs)
    for p in data.pairs:
        assert p["prompt"] and p["prompt"][0]["role"] == "user" and p["prompt"][-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} and m["role"] in ("user", "assistant") for m in p["prompt"])
        assert p["chosen"] and p["rejected"] and "\n\nHuman:" not in p["chosen"] + p["rejected"]
    for m in data.malformed:
        assert m["source"].startswith("harmless-base-test.jsonl.gz:") and m["reason"]
    # check_pair converts the raw records exactly as the loader does.
    assert reward.check_pair(json.loads(hh_rlhf.open_text(HH).readline()))[0] == \
        {k: v for k, v in data.pairs[0].items() if k != "source"}
    assert len(hh_rlhf.load(HH, limit=10).pairs) == 10


@pytest.mark.slow
@pytest.mark.skipif(not HH.exists(), reason=f"{hh_rlhf.DEFAULT_PATH} is not here (shared datasets not mounted)")
def test_tiny_reward_model_trains_on_hh_rlhf(sft_trained: Trained, tmp_path: Path) -> None:
    cfg = RewardConfig(policy=sft_trained.checkpoint, pairs=HH, output_dir=tmp_path / "rm", heldout_fraction=0.1,
                       batch_size=8, train=quiet_train(max_steps=8, lr=3e-4, warmup_steps=1, checkpoint_every=8))
    result = reward.run(cfg)
    m = result.metrics
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["eval/reward/loss"])
    assert 0.0 <= m["eval/reward/accuracy"] <= 1.0 and m["eval/reward/pairs"] > 20
    # Dialogues longer than the tiny model's 128 tokens are quarantined, each named.
    quarantined = (tmp_path / "rm" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantined) == m["data/quarantined"] > 0
    print(f"hh-rlhf tiny RM, 8 steps: held-out accuracy {m['eval/reward/accuracy']:.3f} "
          f"± {m['eval/reward/accuracy_stderr']:.3f} on {m['eval/reward/pairs']:.0f} pairs")


def test_reward_resume_matches_uninterrupted_and_a_finished_run_is_returned_as_is(
        sft_trained: Trained, separable_pairs: Path, tmp_path: Path) -> None:
    from .test_training import KillAtStep, Killed

    def config(out: Path) -> RewardConfig:
        return RewardConfig(policy=sft_trained.checkpoint, pairs=separable_pairs, output_dir=out, batch_size=4,
                            heldout_fraction=0.2, train=quiet_train(max_steps=4, warmup_steps=0, checkpoint_every=2))

    straight = reward.run(config(tmp_path / "a"))
    with pytest.raises(Killed):
        reward.run(config(tmp_path / "b"), tracker=KillAtStep(3))
    resumed = reward.run(config(tmp_path / "b"))  # from step 2: the sequence classifier's head and body
    a = reward.load_reward_model(tmp_path / "a" / "final")[0].state_dict()
    b = reward.load_reward_model(tmp_path / "b" / "final")[0].state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert resumed.metrics["eval/reward/accuracy"] == straight.metrics["eval/reward/accuracy"]

    meta_before = (tmp_path / "a" / "final" / ckpt.META).read_text()
    again = reward.run(config(tmp_path / "a"))
    assert (tmp_path / "a" / "final" / ckpt.META).read_text() == meta_before
    assert again.metrics == straight.metrics
    assert (tmp_path / "a" / "reward_distribution.png").exists()
