"""Best-of-N as an inference option of evaluation: the verifier's pick is pass@N (an oracle bound), a
reward model's pick is the deployable number, and both are scored item by item like every metric.

The shared corpus and SFT checkpoint come from tests/stages/conftest.py.
"""

from __future__ import annotations

import doctest
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from stages import checkpoint as ckpt
from stages import evaluate
from stages.chat import load_problems
from stages.eval_stats import pass_at_k
from stages.evaluate import EvaluateConfig, best_of_n_name, best_of_n_picks, best_of_n_task, read_items
from stages.rollout import Samples

from .conftest import Trained

QUESTION = re.compile(r"<\|user\|>(.*)<\|end\|><\|assistant\|>", re.DOTALL)


def test_doctests() -> None:
    assert doctest.testmod(evaluate).failed == 0


def test_picks_take_the_first_best_of_each_group() -> None:
    assert best_of_n_picks([0.0, 1.0, 1.0, 2.0, 2.0, 0.0], 3) == [1, 0]
    assert best_of_n_picks([3.0, 1.0], 1) == [0, 0]
    with pytest.raises(ValueError, match="groups of 4"):
        best_of_n_picks([1.0, 2.0, 3.0], 4)


def _rows(correct: list[list[float]]) -> list[dict]:
    """N rows per problem, in order, as arithmetic_scores/gsm8k_scores return them."""
    return [{"id": f"p{i}", "question": f"q{i}", "answer": i, "completion": f"p{i} answer {j}", "correct": c}
            for i, group in enumerate(correct) for j, c in enumerate(group)]


def test_verifier_pick_is_pass_at_n_and_reward_model_pick_is_scored_by_hand() -> None:
    correct = [[0, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]]  # c = 0, 1, 3, 1 right of n = 3
    cfg = EvaluateConfig(checkpoint=Path("c"), dataset=Path("d"), output_dir=Path("o"), tasks=("arithmetic",),
                         best_of_n=3, reward_model=Path("rm"))
    # A hand reward model: it likes the answer index 2 of every problem, except problem 3, where it likes 0.
    rm = {"p0": [0, 0, 1], "p1": [0, 0, 1], "p2": [0, 0, 1], "p3": [5, 1, 1]}
    calls = []

    def scorer(questions, completions):
        calls.append((questions, completions))
        return [rm[c.split()[0]][int(c.split()[-1])] for c in completions]

    out = best_of_n_task(cfg, "arithmetic", _rows(correct), scorer)
    assert calls[0][0] == [f"q{i}" for i in range(4) for _ in range(3)]  # the question beside each completion
    oracle = {r["item"]: r["value"] for r in out.items if r["metric"] == best_of_n_name("arithmetic", 3, oracle=True)}
    assert oracle == {f"p{i}": pass_at_k(3, int(sum(g)), 3) for i, g in enumerate(correct)} == {
        "p0": 0.0, "p1": 1.0, "p2": 1.0, "p3": 1.0}
    picked = {r["item"]: r["value"] for r in out.items if r["metric"] == "eval/arithmetic/best_of_3_accuracy"}
    assert picked == {"p0": 0.0, "p1": 0.0, "p2": 1.0, "p3": 0.0}  # index 2, 2, 2, 0
    assert out.metrics["eval/arithmetic/best_of_3_oracle_accuracy"] == 0.75
    assert out.metrics["eval/arithmetic/best_of_3_accuracy"] == 0.25
    assert out.metrics["eval/arithmetic/best_of_3_accuracy_stderr"] == pytest.approx(0.25)  # sd 0.5 / sqrt(4)
    # Divergence per problem where the verifier orders a pair: p1 (right=1, RM gives it 0 < 1 for index 2 and
    # = 0 for index 0 -> pairs (1,0) tie 1/2, (1,2) wrong 1 -> 0.75); p3 (right=2: RM 1 < 5, 1 = 1 -> 0.75).
    div = {r["item"]: r["value"] for r in out.items if r["metric"] == "eval/monitor/rm_verifier_divergence"}
    assert div == {"arithmetic:p1": pytest.approx(0.75), "arithmetic:p3": pytest.approx(0.75)}
    assert out.samples[1] == {"id": "p1", "question": "q1", "answer": 1, "completions": [f"p1 answer {j}" for j in range(3)],
                              "correct": [0, 1, 0], "verifier_pick": 1, "rm_scores": [0.0, 0.0, 1.0], "rm_pick": 2}

    verifier_only = best_of_n_task(cfg, "arithmetic", _rows(correct), None)
    assert set(verifier_only.metrics) == {"eval/arithmetic/best_of_3_oracle_accuracy",
                                          "eval/arithmetic/best_of_3_oracle_accuracy_stderr"}


def test_config_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    base = dict(checkpoint=tmp_path, dataset=tmp_path, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"evaluate\.reward_model must name a reward model"):
        EvaluateConfig(**base, best_of_n=4)
    with pytest.raises(ValueError, match=r"evaluate\.best_of_n_scorer must be one of reward_model, verifier"):
        EvaluateConfig(**base, best_of_n=4, best_of_n_scorer="judge")
    with pytest.raises(ValueError, match=r"best_of_n=4 needs a generative task"):
        EvaluateConfig(**base, tasks=("heldout",), best_of_n=4, best_of_n_scorer="verifier")
    with pytest.raises(ValueError, match=r"best_of_n_temperature must be > 0"):
        EvaluateConfig(**base, best_of_n=4, best_of_n_scorer="verifier", best_of_n_temperature=0.0)
    with pytest.raises(ValueError, match=r"best_of_n must be >= 1"):
        EvaluateConfig(**base, best_of_n=0)
    EvaluateConfig(**base, best_of_n=1)  # off: no reward model needed


def test_verifier_best_of_n_beats_greedy_on_a_seeded_sampler(corpus: Path, pretrained: Trained,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded stand-in policy that is right 35% of the time, sampled or greedy: best-of-4 by the verifier
    is pass@4 of the same samples, and well above greedy (1 - 0.65^4 = 0.82 expected vs 0.35)."""
    import random

    problems = load_problems(corpus, "test")[:40]
    answer_of = {p.question: p.answer for p in problems}
    seen: dict[str, list[str]] = {}

    def fake_sample(model, tokenizer, prompts, *, n, max_new_tokens, temperature, seed=0):
        texts = []
        for p in prompts:
            q = QUESTION.fullmatch(p).group(1)
            rng = random.Random(f"{q}|{seed}|{temperature}")
            for _ in range(n):
                texts.append(f"<answer>{answer_of[q] if rng.random() < 0.35 else -1}</answer>")
            seen.setdefault(q, []).extend(texts[-n:] if n > 1 else [])
        return Samples(prompts=[[0]] * len(texts), completions=[[0]] * len(texts), texts=texts)

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    cfg = EvaluateConfig(checkpoint=pretrained.checkpoint, dataset=corpus, output_dir=Path("unused"),
                         tasks=("arithmetic",), batch_size=8, best_of_n=4, best_of_n_scorer="verifier", progress=False)
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    greedy = evaluate.arithmetic_task(cfg, None, tok, problems)
    best = evaluate.arithmetic_best_of_n(cfg, None, tok, problems, scorer=None)
    oracle = {r["item"]: r["value"] for r in best.items}
    for p in problems:
        right = sum(t == f"<answer>{p.answer}</answer>" for t in seen[p.question])
        assert len(seen[p.question]) == 4 and oracle[evaluate.mc.item_id(p.question)] == pass_at_k(4, right, 4)
    acc, bon = greedy.metrics["eval/arithmetic/accuracy"], best.metrics["eval/arithmetic/best_of_4_oracle_accuracy"]
    assert 0.15 < acc < 0.55 and bon > 0.65 and bon - acc > 3 * best.metrics["eval/arithmetic/best_of_4_oracle_accuracy_stderr"]


def test_best_of_n_on_a_tiny_model_reports_picks_and_items(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    n, t = 3, 1.0
    cfg = EvaluateConfig(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path,
                         tasks=("arithmetic", "gsm8k"), gsm8k_files=(_gsm8k_file(tmp_path),), gsm8k_max_new_tokens=8,
                         arithmetic_problems=6, max_new_tokens=12, batch_size=18, progress=False, seed=3,
                         best_of_n=n, best_of_n_scorer="verifier", best_of_n_temperature=t,
                         passk_samples=n, passk_k=(n,), passk_temperatures=(t,))
    result = evaluate.run(cfg)
    m, items = result.metrics, read_items(result.items)
    oracle = best_of_n_name("arithmetic", n, oracle=True)
    # Same seed, temperature and batching as pass@k's samples: the same completions, item by item.
    assert items[oracle] == items[f"eval/arithmetic/pass_at_{n}_t{t:g}"]
    assert list(items[oracle]) == list(items["eval/arithmetic/accuracy"])  # pairs with a champion by the same ids
    assert list(items["eval/gsm8k/best_of_3_oracle_accuracy"]) == ["tiny_gsm8k:1", "tiny_gsm8k:2"]
    assert m[oracle] >= m["eval/arithmetic/accuracy"]
    assert "eval/arithmetic/best_of_3_accuracy" not in m  # no reward model: no deployable pick
    report = json.loads(result.report.read_text())
    picks = report["samples"]["arithmetic_best_of_n"]
    assert len(picks) == 6 and all(len(p["completions"]) == n and len(set(p["completions"])) > 1 for p in picks)
    assert all(items[oracle][p["id"]] == float(any(p["correct"])) for p in picks)
    assert {"arithmetic_best_of_n", "gsm8k_best_of_n"} <= set(report["timings_s"])


def _gsm8k_file(root: Path) -> Path:
    path = root / "tiny_gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Ann has 3 apples and buys 4 more. How many?", "answer": "#### 7"}) + "\n"
                    + json.dumps({"question": "What is 6 times 2?", "answer": "#### 12"}) + "\n")
    return path


def test_reward_model_scorer_is_wired_through_stages_reward(corpus: Path, sft_trained: Trained, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The reward-model path against stages/reward.py's API, with a stub reward model that prefers long
    answers; the sampling is stubbed too, so every number is known."""
    import stages

    problems = load_problems(corpus, "test")[:3]
    answer_of = {p.question: p.answer for p in problems}

    def fake_sample(model, tokenizer, prompts, *, n, max_new_tokens, temperature, seed=0):
        questions = [QUESTION.fullmatch(p).group(1) for p in prompts]
        if n == 1:
            texts = ["no idea"] * len(questions)
        else:  # sample 0: right and short; sample 1: wrong and long
            texts = [[f"<answer>{answer_of[q]}</answer>", "<think>long long long</think> <answer>-1</answer>"][s]
                     for q in questions for s in range(n)]
        return Samples(prompts=[[0]] * len(texts), completions=[[0] * len(t) for t in texts], texts=texts)

    loaded, scored = [], []

    def load_reward_model(path, device):
        loaded.append(Path(path))
        return "rm-model", "rm-tokenizer"

    def score(model, tokenizer, prompts, completions, *, batch_size=16):
        assert (model, tokenizer, batch_size) == ("rm-model", "rm-tokenizer", 7)
        scored.append(list(prompts))
        return [float(len(c)) for c in completions]

    stub = types.SimpleNamespace(load_reward_model=load_reward_model, score=score)
    monkeypatch.setitem(sys.modules, "stages.reward", stub)
    monkeypatch.setattr(stages, "reward", stub, raising=False)
    monkeypatch.setattr(evaluate, "sample", fake_sample)
    cfg = EvaluateConfig(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path, tasks=("arithmetic",),
                         arithmetic_problems=3, progress=False, best_of_n=2, reward_model=tmp_path / "rm",
                         reward_batch_size=7)
    with pytest.raises(FileNotFoundError, match=r"evaluate\.reward_model: reward model directory .*rm does not exist"):
        evaluate.run(cfg)
    (tmp_path / "rm").mkdir()
    result = evaluate.run(cfg)
    assert loaded == [tmp_path / "rm"] and scored == [[p.question for p in problems for _ in range(2)]]
    m = result.metrics
    assert m["eval/arithmetic/best_of_2_oracle_accuracy"] == 1.0  # one of the two is always right
    assert m["eval/arithmetic/best_of_2_accuracy"] == 0.0  # the length-loving reward model always picks wrong
    assert m["eval/monitor/rm_verifier_divergence"] == 1.0  # ... and so ranks every pair against the verifier
    assert m["eval/monitor/rm_verifier_divergence_stderr"] == 0.0
    # the default divergence_max (0.5) is crossed: an alarm in the result and the report
    assert [a["metric"] for a in result.alarms] == ["eval/monitor/rm_verifier_divergence"]
    assert json.loads(result.report.read_text())["alarms"] == list(result.alarms)
    items = read_items(result.items)
    assert sorted(items["eval/monitor/rm_verifier_divergence"]) == sorted(
        f"arithmetic:{i}" for i in items["eval/arithmetic/accuracy"])
    assert all(math.isfinite(v) for v in m.values())


def test_a_real_reward_model_picks_its_highest_scored_sample(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    """Through stages/reward.py for real: a reward model (the SFT network with a seeded scalar head, saved
    as AutoModelForSequenceClassification) reranks the samples, and its pick is its own argmax."""
    reward = pytest.importorskip("stages.reward", reason="stages/reward.py (the reward model stage) is not here")
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = ckpt.load_tokenizer(sft_trained.checkpoint)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(sft_trained.checkpoint, num_labels=1,
                                                            pad_token_id=tok.pad_token_id)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cfg = EvaluateConfig(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path / "eval",
                         tasks=("arithmetic",), arithmetic_problems=4, max_new_tokens=10, batch_size=12,
                         progress=False, best_of_n=3, reward_model=tmp_path / "rm", best_of_n_temperature=1.0)
    result = evaluate.run(cfg)
    picks = json.loads(result.report.read_text())["samples"]["arithmetic_best_of_n"]
    model, rm_tok = reward.load_reward_model(tmp_path / "rm", "cpu")
    for p in picks:
        again = reward.score(model, rm_tok, [p["question"]] * 3, p["completions"])
        assert p["rm_scores"] == pytest.approx(again, abs=1e-5) and len(set(again)) > 1
        assert p["rm_pick"] == max(range(3), key=lambda i: again[i])
    items = read_items(result.items)
    assert items["eval/arithmetic/best_of_3_accuracy"] == {p["id"]: float(p["correct"][p["rm_pick"]]) for p in picks}
    assert result.metrics["eval/arithmetic/best_of_3_accuracy"] <= result.metrics[
        "eval/arithmetic/best_of_3_oracle_accuracy"]
