"""The paired gate against hand-computed cases (the arithmetic is written out in each test)."""

from __future__ import annotations

import math

import pytest

from registry.gate import GateSpec, all_passed, paired_verdict, z_quantile

ACC = "eval/arithmetic/accuracy"
NLL = "eval/heldout/nll"
Z95 = 1.959964


def _items(values: list[float]) -> dict[str, float]:
    return {f"q{i:03d}": v for i, v in enumerate(values)}


def test_z_quantile_is_the_two_sided_normal_one():
    assert z_quantile(0.95) == pytest.approx(Z95, abs=1e-6)
    assert z_quantile(0.90) == pytest.approx(1.644854, abs=1e-6)


def test_ten_items_interval_too_wide_for_margin_fails():
    challenger = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    champion = [0, 1, 1, 1, 1, 1, 0, 1, 0, 1]
    # diffs = [1, 0, 0, -1, 0, 0, 0, 0, 1, 0]: mean 0.1
    # squared deviations: 2 * 0.9^2 + 1.1^2 + 7 * 0.1^2 = 1.62 + 1.21 + 0.07 = 2.9
    sd = math.sqrt(2.9 / 9)  # 0.567646
    se = sd / math.sqrt(10)  # 0.179505
    low, high = 0.1 - Z95 * se, 0.1 + Z95 * se  # -0.251823, +0.451823
    assert low == pytest.approx(-0.251823, abs=1e-5) and high == pytest.approx(0.451823, abs=1e-5)

    v = paired_verdict(GateSpec(ACC, margin=0.02), 0.8, _items(challenger), _items(champion), champion_version="3")
    assert not v.passed  # better on average, but 10 items cannot rule out a 0.25 regression
    assert v.n == 10 and v.diff == pytest.approx(0.1)
    assert v.stderr == pytest.approx(se, rel=1e-9)
    assert v.ci_low == pytest.approx(low, abs=1e-6) and v.ci_high == pytest.approx(high, abs=1e-6)
    assert v.champion_version == "3"
    assert v.reason.startswith(f"{ACC}: +0.100 [-0.252, +0.452] vs v3 on 10 paired items, margin 0.02: fails")
    assert "0.232 below -0.02" in v.reason  # by how much: -0.02 - (-0.2518) = 0.2318

    wide = paired_verdict(GateSpec(ACC, margin=0.3), 0.8, _items(challenger), _items(champion))
    assert wide.passed and wide.reason.endswith(": passes")  # -0.2518 >= -0.3


def test_four_hundred_items_small_gain_passes():
    # 40 items the challenger gets right and the champion wrong, 10 the reverse, 350 equal.
    challenger = [1.0] * 40 + [0.0] * 10 + [1.0] * 200 + [0.0] * 150
    champion = [0.0] * 40 + [1.0] * 10 + [1.0] * 200 + [0.0] * 150
    mean = 30 / 400  # 0.075
    sd = math.sqrt((50 - 400 * mean**2) / 399)  # sum d^2 = 50: sd 0.345940
    se = sd / 20  # 0.0172970
    low = mean - Z95 * se  # 0.0410985
    v = paired_verdict(GateSpec(ACC), 0.6, _items(challenger), _items(champion), champion_version="7")
    assert v.passed and v.n == 400
    assert v.ci_low == pytest.approx(low, abs=1e-6) and low == pytest.approx(0.0410985, abs=1e-6)
    assert v.reason == f"{ACC}: +0.075 [+0.041, +0.109] vs v7 on 400 paired items, margin 0.02: passes"


def test_same_answers_everywhere_passes_with_zero_width_interval():
    same = _items([1, 0, 1, 1])
    v = paired_verdict(GateSpec(ACC), 0.75, same, dict(same))
    assert v.passed and v.diff == 0 and v.stderr == 0 and v.ci_low == 0 == v.ci_high


def test_clear_regression_fails():
    # 400 items: the challenger loses 60, wins 10. mean -50/400 = -0.125, far below -0.02.
    challenger = [0.0] * 60 + [1.0] * 10 + [1.0] * 330
    champion = [1.0] * 60 + [0.0] * 10 + [1.0] * 330
    v = paired_verdict(GateSpec(ACC), 0.85, _items(challenger), _items(champion))
    assert not v.passed and v.diff == pytest.approx(-0.125) and v.ci_high < 0


def test_lower_is_better_nll_orients_differences():
    challenger = [2.0, 3.0, 2.5, 4.0]
    champion = [2.1, 2.9, 2.7, 4.1]
    # Lower is better: d = champion - challenger = [0.1, -0.1, 0.2, 0.1], mean 0.075
    # squared deviations: 0.025^2 + 0.175^2 + 0.125^2 + 0.025^2 = 0.0475
    se = math.sqrt(0.0475 / 3) / 2  # 0.0629153
    low = 0.075 - Z95 * se  # -0.048312
    assert low == pytest.approx(-0.048312, abs=1e-6)
    value = sum(challenger) / 4  # 2.875
    ok = paired_verdict(GateSpec(NLL, higher_is_better=False, margin=0.05), value, _items(challenger), _items(champion))
    assert ok.passed and ok.diff == pytest.approx(0.075) and ok.ci_low == pytest.approx(low, abs=1e-6)
    tight = paired_verdict(GateSpec(NLL, higher_is_better=False, margin=0.04), value, _items(challenger),
                           _items(champion))
    assert not tight.passed  # -0.0483 < -0.04
    # The same numbers read as higher-is-better are a regression: orientation matters.
    flipped = paired_verdict(GateSpec(NLL, margin=0.05), value, _items(challenger), _items(champion))
    assert flipped.diff == pytest.approx(-0.075) and not flipped.passed


def test_floor_without_champion_and_with_one():
    assert paired_verdict(GateSpec(ACC, floor=0.3), 0.31, None, None).passed
    low = paired_verdict(GateSpec(ACC, floor=0.3), 0.29, None, None)
    assert not low.passed and low.reason == f"{ACC}: 0.29, no champion to compare, 0.29 < floor 0.3: fails"
    free = paired_verdict(GateSpec(ACC), 0.01, None, None)
    assert free.passed and "no floor set" in free.reason and free.n == 0 and free.champion_version is None
    # Lower is better: the floor is a ceiling.
    assert paired_verdict(GateSpec(NLL, higher_is_better=False, floor=3.0), 2.9, None, None).passed
    assert not paired_verdict(GateSpec(NLL, higher_is_better=False, floor=3.0), 3.1, None, None).passed
    # Non-inferior to the champion but below the floor: fails, and says it is the floor.
    same = _items([1, 0, 0, 0])
    v = paired_verdict(GateSpec(ACC, floor=0.3), 0.25, same, dict(same), champion_version="2")
    assert not v.passed and "0.25 < floor 0.3" in v.reason and "lower bound" not in v.reason


def test_non_finite_values_fail():
    assert not paired_verdict(GateSpec(ACC), float("nan"), None, None).passed
    assert not paired_verdict(GateSpec(NLL, higher_is_better=False), float("inf"), None, None).passed
    v = paired_verdict(GateSpec(NLL, higher_is_better=False), 2.0, _items([1.0, float("nan")]), _items([1.0, 2.0]))
    assert not v.passed and "non-finite" in v.reason


def test_items_must_be_the_same_on_both_sides():
    with pytest.raises(ValueError, match=r"same items; 1 only in the challenger's \(e.g. \['x'\]\), 0 only"):
        paired_verdict(GateSpec(ACC), 0.5, {"a": 1.0, "x": 0.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="no per-item scores"):
        paired_verdict(GateSpec(ACC), 0.5, {}, {})


def test_one_item_cannot_show_non_inferiority():
    v = paired_verdict(GateSpec(ACC, margin=0.5), 1.0, {"a": 1.0}, {"a": 0.0})
    assert not v.passed and v.stderr == math.inf


def test_spec_validation_and_all_passed():
    with pytest.raises(ValueError, match="margin"):
        GateSpec(ACC, margin=-0.1)
    with pytest.raises(ValueError, match="confidence"):
        GateSpec(ACC, confidence=1.0)
    yes = paired_verdict(GateSpec(ACC), 0.5, None, None)
    no = paired_verdict(GateSpec(ACC, floor=0.9), 0.5, None, None)
    assert all_passed([yes]) and not all_passed([yes, no]) and not all_passed([])
