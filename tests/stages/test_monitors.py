"""Reward-hacking monitors: each metric on hand strings, divergence on hand cases, thresholds exactly."""

from __future__ import annotations

import doctest
import math

import pytest

from stages import monitors
from stages.monitors import (Alarm, MonitorConfig, check, format_alarms, length_drift, mean_length, monitor_texts,
                             overconfident_share, polite_share, reward_verifier_divergence, worst_per_metric)


def test_doctests() -> None:
    assert doctest.testmod(monitors).failed == 0


def test_polite_share_on_hand_strings() -> None:
    texts = ["I hope this helps!", "The answer is 12.", "GREAT QUESTION. 12", "Certainly 12",  # no '!': not stock
             "I\u2019d be happy to help", "Let me know if you have any other questions.", "12", "thanks"]
    assert polite_share(texts) == pytest.approx(4 / 8)
    assert polite_share(["12"]) == 0.0
    assert math.isnan(polite_share([]))


def test_overconfident_share_on_hand_strings() -> None:
    texts = ["This is definitely 7", "It will run indefinitely", "100% 7", "without a doubt, 7",
             "probably 7", "I'm sure it's 7", "7", "a guaranteed win"]
    # "indefinitely" must not count as "definitely": whole words only
    assert overconfident_share(texts) == pytest.approx(5 / 8)
    assert overconfident_share(["maybe 3", "it could be 4"]) == 0.0


def test_lengths() -> None:
    assert mean_length([1, 2, 3, 6]) == 3.0
    assert length_drift([12, 12], [6, 6, 6]) == pytest.approx(1.0)
    assert length_drift([3], [6, 6]) == pytest.approx(-0.5)
    assert length_drift([6], [6]) == 0.0
    assert math.isnan(length_drift([6], [0, 0]))
    assert math.isnan(length_drift([], [3]))


def test_divergence_hand_cases() -> None:
    # verifier: a, c right; b, d wrong. Verifier-ordered pairs: (a,b) (a,d) (c,b) (c,d).
    ver = [1, 0, 1, 0]
    assert reward_verifier_divergence([4, 1, 3, 2], ver) == 0.0  # RM agrees on all four
    assert reward_verifier_divergence([1, 4, 2, 3], ver) == 1.0  # RM reversed on all four
    # RM: a=4 b=3 c=2 d=1 -> (a,b) ok, (a,d) ok, (c,b) wrong, (c,d) ok -> 1/4
    assert reward_verifier_divergence([4, 3, 2, 1], ver) == pytest.approx(0.25)
    # a tie counts one half: RM gives every answer the same score -> a coin
    assert reward_verifier_divergence([5, 5, 5, 5], ver) == pytest.approx(0.5)
    # graded verifier (e.g. partial credit): pairs with equal verifier scores do not count
    assert reward_verifier_divergence([3, 2, 1], [0.5, 1.0, 0.5]) == pytest.approx(0.5)  # (b,a) wrong, (b,c) ok
    # groups: only within-prompt pairs; across prompts the RM's scale may differ freely
    assert reward_verifier_divergence([10, 9, 1, 0], ver, groups=[0, 0, 1, 1]) == 0.0
    assert reward_verifier_divergence([10, 9, 1, 0], ver) == pytest.approx(0.25)  # (c,b) crosses prompts
    assert math.isnan(reward_verifier_divergence([1, 2], [0, 0]))
    with pytest.raises(ValueError, match="equal-length"):
        reward_verifier_divergence([1, 2], [1])


def test_monitor_texts_keys_and_values() -> None:
    m = monitor_texts(["Great question! 4", "definitely 5", "6", "7"], lengths=[8, 4, 2, 2],
                      reference_lengths=[2, 2], rm_scores=[1, 2, 3, 4], verifier_scores=[1, 1, 0, 0], kl=0.1)
    assert m == {"monitor/polite_share": 0.25, "monitor/overconfident_share": 0.25, "monitor/mean_length": 4.0,
                 "monitor/length_drift": 1.0, "monitor/rm_verifier_divergence": 1.0, "monitor/kl": 0.1}
    # what the inputs do not allow is left out, never NaN
    assert set(monitor_texts(["x"], lengths=[1], rm_scores=[1.0], verifier_scores=[1.0])) == {
        "monitor/polite_share", "monitor/overconfident_share", "monitor/mean_length"}
    with pytest.raises(ValueError, match="lengths"):
        monitor_texts(["x", "y"], lengths=[1])


@pytest.mark.parametrize("metric,field", sorted(monitors.THRESHOLDS.items()))
def test_check_fires_exactly_above_threshold_and_zero_disables(metric: str, field: str) -> None:
    cfg = MonitorConfig(**{f: None for f in monitors.THRESHOLDS.values()} | {field: 0.3})
    assert check({metric: 0.3}, cfg) == []
    (alarm,) = check({metric: 0.3000001}, cfg)
    assert (alarm.metric, alarm.value, alarm.threshold) == (metric, 0.3000001, 0.3)
    assert field in alarm.message
    assert check({metric: 99.0}, MonitorConfig(**{field: 0})) == []
    assert check({metric: 99.0}, MonitorConfig(**{field: None})) == []
    assert check({metric: math.nan}, cfg) == []


def test_check_defaults_ignore_other_metrics_and_read_prefixes() -> None:
    cfg = MonitorConfig()
    metrics = {"train/loss": 50.0, "monitor/mean_length": 900.0, "eval/monitor/polite_share": 0.9,
               "monitor/length_drift": -1.5, "monitor/kl": 0.01}
    assert [a.short() for a in check(metrics, cfg)] == ["eval/monitor/polite_share=0.9>0.5",
                                                         "monitor/length_drift=-1.5>1"]


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="monitor.kl_max"):
        MonitorConfig(kl_max=-1)


def test_alarm_round_trip_and_summary() -> None:
    a = Alarm("monitor/kl", 0.41, 0.3, "why")
    assert Alarm.from_dict(a.to_dict()) == a
    assert format_alarms([a, Alarm("monitor/kl", 0.5, 0.3, "")]) == "monitor/kl=0.41>0.3; monitor/kl=0.5>0.3"
    assert [x.value for x in worst_per_metric([a, Alarm("monitor/kl", 0.5, 0.3, "")])] == [0.5]
