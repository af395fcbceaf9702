"""Rejection sampling: on a seeded run every kept answer is the best of its group (checkable by hand from
samples.jsonl), the written sft.jsonl is the SFT stage's messages format and trains, and the reward-model
scorer keeps what `stages.reward.score` ranks first.
"""

from __future__ import annotations

import doctest
import json
from collections import defaultdict
from pathlib import Path

import pytest

from stages import rejection, reward, sft
from stages.chat import TASK_TYPES, record_problem
from stages.rejection import RejectionConfig
from stages.reward import RewardConfig
from stages.rewards import combined, correctness
from stages.sft import SFTConfig
from stages.tracking import RecordingTracker

from .conftest import LINEAGE, Trained, quiet_train


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def groups_of(samples: list[dict]) -> dict[int, list[dict]]:
    groups = defaultdict(list)
    for s in samples:
        groups[s["prompt_index"]].append(s)
    return groups


@pytest.fixture(scope="module")
def formatting_policy(corpus: Path, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's SFT model, 40 steps further: at 20 steps its samples are never formatted, so every
    verifier score is 0 and "the best of its group" would check nothing."""
    cfg = SFTConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path_factory.mktemp("sft-more"),
                    batch_size=16, train=quiet_train(max_steps=40, lr=3e-3, warmup_steps=2, checkpoint_every=40))
    return sft.run(cfg).checkpoint


@pytest.fixture(scope="module")
def verifier_run(corpus: Path, formatting_policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = RejectionConfig(policy=formatting_policy, dataset=corpus, output_dir=tmp_path_factory.mktemp("rs"),
                          n=4, max_prompts=12, prompts_per_batch=6, max_new_tokens=20, temperature=0.7, seed=3,
                          lineage=LINEAGE)
    tracker = RecordingTracker()
    return Trained(cfg, rejection.run(cfg, tracker=tracker), tracker)


def test_rejection_doctests() -> None:
    assert doctest.testmod(rejection).failed == 0


def test_every_kept_answer_is_the_best_of_its_group(verifier_run: Trained) -> None:
    cfg, out = verifier_run.cfg, verifier_run.cfg.output_dir
    samples = read_jsonl(out / rejection.SAMPLES_FILE)
    groups = groups_of(samples)
    assert len(groups) == 12 and all(len(g) == cfg.n for g in groups.values())
    # The scores are the verifier's, recomputed here from the texts alone.
    assert [s["score"] for s in samples] == combined([s["completion"] for s in samples],
                                                     answers=[s["answer"] for s in samples])
    assert [s["correct"] for s in samples] == correctness([s["completion"] for s in samples],
                                                          answers=[s["answer"] for s in samples])
    kept = read_jsonl(out / rejection.SFT_FILE)
    by_prompt = {r["messages"][0]["content"]: r for r in kept}
    for group in groups.values():
        chosen = [s for s in group if s["kept"]]
        nonempty = [s for s in group if s["completion"].strip()]
        assert len(chosen) == (1 if nonempty else 0)
        if chosen:
            best = max(s["score"] for s in nonempty)
            assert chosen[0]["score"] == best
            # Ties go to the first sample of the group with the best score.
            assert chosen[0]["sample"] == min(s["sample"] for s in nonempty if s["score"] == best)
            record = by_prompt[group[0]["prompt"]]
            assert record["messages"][1]["content"] == chosen[0]["completion"] and record["score"] == best
    assert len(kept) == sum(1 for g in groups.values() if any(s["kept"] for s in g))
    # A run whose samples all score alike would check nothing above: this one has a spread.
    assert len({s["score"] for s in samples}) > 1


def test_sft_file_has_the_messages_schema_and_trains(verifier_run: Trained, tmp_path: Path) -> None:
    kept = read_jsonl(verifier_run.result.dataset)
    assert kept, "a tiny SFT model should get some answers formatted"
    for r in kept:
        assert set(r) == {"messages", "task_type", "score"} and record_problem(r) == ""
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["task_type"] in TASK_TYPES
        assert r["task_type"] == "closed_qa" and r["messages"][1]["content"].strip()
    # The SFT stage takes the file as it is.
    cfg = SFTConfig(policy=verifier_run.cfg.policy, messages=verifier_run.result.dataset, output_dir=tmp_path / "sft",
                    batch_size=4, train=quiet_train(max_steps=1, warmup_steps=0))
    assert sft.run(cfg).metrics["train/loss"] > 0


def test_report_and_metrics_agree_with_the_samples(verifier_run: Trained) -> None:
    out = verifier_run.cfg.output_dir
    samples = read_jsonl(out / rejection.SAMPLES_FILE)
    kept = [s for s in samples if s["kept"]]
    m = verifier_run.result.metrics
    assert m["rejection/kept_fraction"] == pytest.approx(len(kept) / 12)
    best = [max(s["score"] for s in g) for g in groups_of(samples).values()]
    assert m["rejection/best_score_mean"] == pytest.approx(sum(best) / 12)
    assert m["rejection/accuracy"] == pytest.approx(sum(s["correct"] for s in kept) / 12)
    assert m["rejection/sample_accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    # Best of n can only beat the average sample.
    assert m["rejection/best_score_mean"] >= m["rejection/sample_score_mean"]
    report = json.loads((out / rejection.REPORT_FILE).read_text())
    assert report["kept"] == len(kept) and report["prompts"] == 12 and report["metrics"] == m
    assert report["kept_score"]["max"] == max(s["score"] for s in kept) and report["lineage"] == LINEAGE
    assert {p.name for p, _ in verifier_run.tracker.artifacts} == {"scores.png", "report.json"}
    assert verifier_run.tracker.series("rejection/kept_fraction") == [m["rejection/kept_fraction"]]


def test_min_score_keeps_only_right_answers_and_a_rerun_is_returned_as_is(verifier_run: Trained) -> None:
    # Right answers score 1.1 (1 + the format bonus), formatted wrong ones 0.1: keep the right ones only.
    cfg = RejectionConfig(**{**vars(verifier_run.cfg), "min_score": 1.0,
                             "output_dir": verifier_run.cfg.output_dir.parent / "rs-min"})
    result = rejection.run(cfg)
    samples = read_jsonl(cfg.output_dir / rejection.SAMPLES_FILE)
    # Same seed, same samples as the unfiltered run: only the keeping rule differs.
    unfiltered = read_jsonl(verifier_run.cfg.output_dir / rejection.SAMPLES_FILE)
    assert [s["completion"] for s in samples] == [s["completion"] for s in unfiltered]
    groups = groups_of(samples)
    right = sum(1 for g in groups.values() if any(s["correct"] for s in g))
    assert right < sum(1 for g in groups_of(unfiltered).values() if any(s["kept"] for s in g))  # it filters
    assert result.metrics["rejection/kept_fraction"] == pytest.approx(right / 12)
    assert all(s["correct"] == 1.0 for s in samples if s["kept"])
    assert len(read_jsonl(result.dataset)) == right
    assert result.metrics["rejection/accuracy"] == result.metrics["rejection/kept_fraction"]

    report_before = (cfg.output_dir / rejection.REPORT_FILE).read_text()
    again = rejection.run(cfg)
    assert again.metrics == result.metrics and (cfg.output_dir / rejection.REPORT_FILE).read_text() == report_before
    with pytest.raises(ValueError, match="another rejection config"):
        rejection.run(RejectionConfig(**{**vars(cfg), "n": 2}))


def test_reward_model_scorer_keeps_what_the_reward_model_ranks_first(
        corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    # A few steps on the synthetic arithmetic pairs (dataset=, no pairs file): any RM will do for the ranking.
    rm = reward.run(RewardConfig(policy=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path / "rm",
                                 batch_size=4, train=quiet_train(max_steps=2, warmup_steps=0)))
    assert 0 <= rm.metrics["eval/reward/accuracy"] <= 1
    cfg = RejectionConfig(policy=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path / "rs", n=3,
                          max_prompts=4, max_new_tokens=16, scorer="reward_model", reward_model=rm.checkpoint)
    result = rejection.run(cfg)
    samples = read_jsonl(cfg.output_dir / rejection.SAMPLES_FILE)
    model, tok = reward.load_reward_model(rm.checkpoint)
    again = reward.score(model, tok, [s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(again, abs=1e-4)
    for group in groups_of(samples).values():
        nonempty = [s for s in group if s["completion"].strip()]
        if nonempty:
            assert [s["kept"] for s in group].count(True) == 1
            assert next(s for s in group if s["kept"])["score"] == max(s["score"] for s in nonempty)
    # The verifier still grades the kept answers, so a reward model's picks are checked against the truth.
    assert "rejection/accuracy" in result.metrics


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rejection.scorer"):
        RejectionConfig(policy=tmp_path, dataset=tmp_path, output_dir=tmp_path, scorer="judge")
    with pytest.raises(ValueError, match="rejection.reward_model"):
        RejectionConfig(policy=tmp_path, dataset=tmp_path, output_dir=tmp_path, scorer="reward_model")
    with pytest.raises(ValueError, match="rejection.temperature"):
        RejectionConfig(policy=tmp_path, dataset=tmp_path, output_dir=tmp_path, temperature=0.0)
    RejectionConfig(policy=tmp_path, dataset=tmp_path, output_dir=tmp_path, temperature=0.0, n=1)  # greedy, one each
