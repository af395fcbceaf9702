"""Evaluation statistics against hand-computed values, and the task loaders against good and bad files.

No model here: everything is plain numbers and text, so this file runs in about a second.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import pytest

from stages import eval_stats
from stages.eval_stats import (bootstrap_stderr, expected_calibration_error, mean_stderr, paired_difference,
                               pass_at_k, perplexity_stderr)
from stages.tasks import gsm8k, multiple_choice
from stages.tasks.arithmetic import Problem, generate
from stages.tasks.gsm8k import GSM8KFormatError, load_gsm8k
from stages.tasks.multiple_choice import MMLUFormatError, arithmetic_mc, load_mmlu_csv

REPO = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = REPO / ".." / "shared" / "datasets" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize("module", [eval_stats, gsm8k, multiple_choice])
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, module.__name__


# --- statistics ------------------------------------------------------------------------------


def test_mean_stderr_by_hand() -> None:
    # values 1, 2, 3, 6: mean 3; squared deviations 4 + 1 + 0 + 9 = 14; sd = sqrt(14 / 3); se = sd / 2
    mean, se = mean_stderr([1, 2, 3, 6])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    # accuracy 3/4 from 0/1 values: sd = sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5; se = 0.5 / 2
    assert mean_stderr([1, 1, 0, 1]) == (0.75, 0.25)
    assert math.isnan(mean_stderr([0.3])[1]) and all(math.isnan(x) for x in mean_stderr([]))


def test_pass_at_k_by_hand() -> None:
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    # k=1 is the fraction correct; c=0 can never pass; n-c < k always passes
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 6, 4) == 1.0
    # large n: the product form stays finite where the binomials would be astronomically large
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_expected_calibration_error_by_hand() -> None:
    # Two bins, [0, 0.5) and [0.5, 1].
    #   bin 0: confidence 0.3, wrong          -> |acc 0 - conf 0.3| = 0.3, share 1/4 -> 0.075
    #   bin 1: confidences 0.9, 0.8, 0.6; right, wrong, right
    #          acc 2/3, mean conf 2.3/3       -> |0.6667 - 0.7667| = 0.1, share 3/4 -> 0.075
    # ECE = 0.075 + 0.075 = 0.15
    assert expected_calibration_error([0.9, 0.8, 0.3, 0.6], [1, 0, 0, 1], bins=2) == pytest.approx(0.15)
    # Ten bins, four answers at confidence 0.25 (one right) and 0.95 (both right):
    #   bin 2: acc 1/4 vs conf 0.25 -> 0; bin 9: acc 1 vs conf 0.95 -> 0.05 * share 2/6
    assert expected_calibration_error([0.25] * 4 + [0.95] * 2, [1, 0, 0, 0, 1, 1]) == pytest.approx(0.05 / 3)
    # Always sure, always wrong: the worst calibration there is.
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == 1.0
    with pytest.raises(ValueError, match="confidences in"):
        expected_calibration_error([1.5], [1])


def test_perplexity_stderr_is_the_delta_method() -> None:
    # NLLs 2 and 4: mean 3, se 1 -> perplexity e^3, se e^3 * 1
    ppl, se = perplexity_stderr([2.0, 4.0])
    assert ppl == pytest.approx(math.exp(3)) and se == pytest.approx(math.exp(3))


def test_bootstrap_is_seeded_and_shrinks_with_more_items() -> None:
    small = [0.0, 1.0] * 10
    large = [0.0, 1.0] * 200

    def se(xs, seed=0):
        return bootstrap_stderr(lambda idx: sum(xs[i] for i in idx) / len(idx), len(xs), seed=seed)

    assert se(small) == se(small) and se(small) != se(small, seed=1)
    assert se(large) < se(small) / 3  # ~ 1/sqrt(20) of it
    assert math.isnan(bootstrap_stderr(lambda idx: 0.0, 1))


def test_paired_difference_uses_shared_items_only() -> None:
    challenger = {"a": 1.0, "b": 1.0, "c": 0.0, "x": 1.0}
    champion = {"a": 0.0, "b": 1.0, "c": 0.0, "y": 0.0}
    # differences on a, b, c: 1, 0, 0 -> mean 1/3, sd sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3), se = 1/3
    mean, se, n = paired_difference(challenger, champion)
    assert (mean, n) == (pytest.approx(1 / 3), 3) and se == pytest.approx(1 / 3)


# --- arithmetic multiple choice --------------------------------------------------------------


def test_arithmetic_mc_has_four_distinct_options_with_the_answer() -> None:
    problems = generate(300, seed=3)
    questions = arithmetic_mc(problems)
    for p, q in zip(problems, questions, strict=True):
        numbers = [int(o.removeprefix("<answer>").removesuffix("</answer>")) for o in q.options]
        assert len(set(numbers)) == 4 and numbers == sorted(numbers) and min(numbers) >= 0
        assert numbers[q.answer] == p.answer and q.prompt == p.question
    assert arithmetic_mc(problems) == questions  # deterministic
    assert len({q.id for q in questions}) == len(questions)


def test_distractors_include_the_other_operations() -> None:
    p = Problem(question="?", answer=24, reasoning="6 x 4 = 24")
    assert multiple_choice.distractors(p) == [10, 2, 25]


# --- MMLU-format files -----------------------------------------------------------------------


def test_mmlu_csv_with_and_without_header(tmp_path: Path) -> None:
    rows = 'What is 2 + 2?,3,4,5,22,B\n"A question, with a comma",x,y,z,w,d\n'
    bare, headed = tmp_path / "algebra_test.csv", tmp_path / "headed.csv"
    bare.write_text(rows)
    headed.write_text("question,A,B,C,D,answer\n" + rows)
    qs = load_mmlu_csv(bare)
    assert [q.answer for q in qs] == [1, 3] and [q.id for q in qs] == ["algebra_test:1", "algebra_test:2"]
    assert qs[1].prompt.startswith("A question, with a comma\nA. x\n") and qs[0].options == ("A", "B", "C", "D")
    assert [q.answer for q in load_mmlu_csv(headed)] == [1, 3]
    assert len(load_mmlu_csv(bare, limit=1)) == 1


@pytest.mark.parametrize(("content", "message"), [
    ("q,a,b,c,d,A\nq2,a,b,c,D\n", r"bad\.csv:2: expected 6 columns .* found 5"),
    ("q,a,b,c,d,A\nq2,a,b,c,d,E\n", r"bad\.csv:2: answer must be one of A, B, C, D, found 'E'"),
    ("q,a,b,c,d,A\n\nq3,a,,c,d,A\n", r"bad\.csv:3: empty question or option"),
    ('q,a,b,c,d,A\n"multi\nline",a,b,c,d,A\nq,a,b,c,d,Z\n', r"bad\.csv:4: answer must be one of"),
    ("question,A,B,C,D,answer\n", r"bad\.csv: no questions"),
])
def test_malformed_mmlu_file_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MMLUFormatError, match=message):
        load_mmlu_csv(path)
    assert issubclass(MMLUFormatError, ValueError)


def test_missing_mmlu_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mmlu file .*nope\.csv does not exist"):
        load_mmlu_csv(tmp_path / "nope.csv")


# --- GSM8K-format files ----------------------------------------------------------------------


def test_gsm8k_loader_strips_calculator_annotations(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    path.write_text(json.dumps({"question": "Q1?", "answer": "48/2 = <<48/2=24>>24\n#### 1,024"}) + "\n\n"
                    + json.dumps({"question": "Q2?", "answer": "so\n#### 7"}) + "\n")
    problems = load_gsm8k(path)
    assert [(p.id, p.answer, p.reasoning) for p in problems] == [("mini:1", "1024", "48/2 = 24"), ("mini:3", "7", "so")]
    assert gsm8k.is_correct("<think>...</think> <answer>1024</answer>", problems[0].answer) == 1.0


@pytest.mark.parametrize(("content", "message"), [
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q"\n', r"g\.jsonl:2: not valid JSON"),
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q", "solution": "#### 1"}\n',
     r'g\.jsonl:2: expected an object with string fields "question" and "answer"'),
    ('{"question": "q", "answer": "so 1"}\n', r"g\.jsonl:1: the answer has no final line '#### <number>'"),
    ("\n\n", r"g\.jsonl: no problems"),
])
def test_malformed_gsm8k_file_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(content)
    with pytest.raises(GSM8KFormatError, match=message):
        load_gsm8k(path)


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"real GSM8K data not found at {GSM8K_TRAIN}")
def test_real_gsm8k_train_file_loads_whole() -> None:
    problems = load_gsm8k(GSM8K_TRAIN)
    assert len(problems) == 7473 and len({p.id for p in problems}) == 7473
    assert problems[0].answer == "72" and problems[0].reasoning.startswith("Natalia sold 48/2 = 24 clips")
    assert not any("<<" in p.reasoning or "####" in p.reasoning for p in problems)
    # every reference answer is a number our own extraction reads back unchanged
    assert all(gsm8k.is_correct(f"#### {p.answer}", p.answer) == 1.0 for p in problems)
