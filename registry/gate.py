"""The promotion gate: a paired non-inferiority test of challenger against champion. Pure math.

    spec = GateSpec("eval/arithmetic/accuracy", margin=0.02, floor=0.30)
    challenger = stages.evaluate.read_items(eval_dir / "items.jsonl")   # {metric: {item: value}}
    v = paired_verdict(spec, 0.47, challenger[spec.metric], champion[spec.metric], champion_version="3")
    v.passed, v.reason   # True, "eval/arithmetic/accuracy: +0.013 [-0.021, +0.047] vs v3 on 400 ..."

Why paired, and why non-inferiority: the challenger and the champion answer the *same* items in the
same evaluation run, so item difficulty cancels in the per-item differences d_i (oriented so that
positive = challenger better). Their mean has standard error sd(d)/sqrt(n), much smaller than
comparing two independent accuracies; and it is fresh: the champion is re-scored, not remembered,
so the bar cannot ratchet down from one champion's own noisy score to the next. The challenger
passes iff the lower bound of the two-sided `confidence` interval of mean(d) is >= -margin: the
data rule out, at that confidence, a regression larger than `margin`. A challenger that is merely
"not measurably worse" on 20 noisy items does not pass: a wide interval fails.

`floor` is an absolute bound on the challenger's aggregate value (a minimum when higher is better,
a maximum when lower is better); it is what the very first version, with no champion to face, must
clear. Without a floor the first version passes on nothing, and the reason says so.

A candidate that tripped a reward-hacking monitor (stages/monitors.py; recorded on the version as
the `monitor.alarms` tag by registry/models.py) fails whatever its metrics say: `monitor_verdict`.

The interval uses the normal approximation (z quantile): fine for the hundreds of items an
evaluation scores; with a handful of items it is somewhat too narrow, one more reason to score many.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class GateSpec:
    metric: str  # e.g. "eval/arithmetic/accuracy"
    higher_is_better: bool = True
    margin: float = 0.02  # the largest regression (in metric units) we accept as "no worse"
    floor: float | None = None  # absolute bound on the challenger's value: min (higher better) / max
    confidence: float = 0.95  # two-sided interval level

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("GateSpec.metric must name a metric")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ValueError(f"GateSpec.margin must be a finite number >= 0, got {self.margin}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"GateSpec.confidence must be in (0, 1), got {self.confidence}")
        if self.floor is not None and not math.isfinite(self.floor):
            raise ValueError(f"GateSpec.floor must be finite or None, got {self.floor}")


@dataclass(frozen=True)
class GateVerdict:
    metric: str
    passed: bool
    value: float  # the challenger's aggregate value of the metric
    higher_is_better: bool
    margin: float
    floor: float | None
    confidence: float
    champion_version: str | None  # None: no champion to compare with
    n: int  # paired items (0 without a champion)
    diff: float | None  # mean paired difference, positive = challenger better
    stderr: float | None  # standard error of `diff`
    ci_low: float | None
    ci_high: float | None
    reason: str  # one line, with the numbers


def z_quantile(confidence: float) -> float:
    """The two-sided normal quantile: 1.959964 for 0.95."""
    return NormalDist().inv_cdf((1 + confidence) / 2)


def _signed(x: float) -> str:
    return f"{x:+.3f}" if abs(x) >= 0.0005 or x == 0 else f"{x:+.2e}"


def _floor_check(spec: GateSpec, value: float) -> tuple[bool, str]:
    if spec.floor is None:
        return True, "no floor set"
    if spec.higher_is_better:
        ok = value >= spec.floor
        return ok, f"{value:.4g} {'>=' if ok else '<'} floor {spec.floor:g}"
    ok = value <= spec.floor
    return ok, f"{value:.4g} {'<=' if ok else '>'} ceiling {spec.floor:g}"


def _paired_differences(spec: GateSpec, challenger: Mapping[str, float], champion: Mapping[str, float]
                        ) -> list[float]:
    only_challenger = sorted(set(challenger) - set(champion))
    only_champion = sorted(set(champion) - set(challenger))
    if only_challenger or only_champion:
        raise ValueError(
            f"{spec.metric}: challenger and champion must be scored on the same items; "
            f"{len(only_challenger)} only in the challenger's (e.g. {only_challenger[:3]}), "
            f"{len(only_champion)} only in the champion's (e.g. {only_champion[:3]})"
        )
    if not challenger:
        raise ValueError(f"{spec.metric}: no per-item scores to compare")
    sign = 1.0 if spec.higher_is_better else -1.0
    return [sign * (float(challenger[k]) - float(champion[k])) for k in sorted(challenger)]


def paired_verdict(
    spec: GateSpec,
    challenger_value: float,
    challenger_items: Mapping[str, float] | None,
    champion_items: Mapping[str, float] | None,
    *,
    champion_version: str | None = None,
) -> GateVerdict:
    """The gate decision for one metric. `champion_items=None`: there is no champion (floor only).

    Raises ValueError when both sides were not scored on exactly the same items: a comparison on
    different items would not be paired, and silently intersecting them would hide a broken run.
    """
    value = float(challenger_value)
    base = dict(metric=spec.metric, value=value, higher_is_better=spec.higher_is_better, margin=spec.margin,
                floor=spec.floor, confidence=spec.confidence,
                champion_version=None if champion_items is None else champion_version)
    if not math.isfinite(value):
        return GateVerdict(**base, passed=False, n=0, diff=None, stderr=None, ci_low=None, ci_high=None,
                           reason=f"{spec.metric}: challenger value {value} is not finite: fails")
    floor_ok, floor_text = _floor_check(spec, value)

    if champion_items is None:
        verdict = "passes" if floor_ok else "fails"
        return GateVerdict(**base, passed=floor_ok, n=0, diff=None, stderr=None, ci_low=None, ci_high=None,
                           reason=f"{spec.metric}: {value:.4g}, no champion to compare, {floor_text}: {verdict}")

    diffs = _paired_differences(spec, challenger_items or {}, champion_items)
    n = len(diffs)
    vs = f" vs v{champion_version}" if champion_version else " vs champion"
    if not all(math.isfinite(d) for d in diffs):
        return GateVerdict(**base, passed=False, n=n, diff=None, stderr=None, ci_low=None, ci_high=None,
                           reason=f"{spec.metric}: non-finite per-item scores{vs} on {n} items: fails")
    mean = sum(diffs) / n
    # One item gives no estimate of spread: an infinite interval, which cannot show non-inferiority.
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.inf
    stderr = sd / math.sqrt(n)
    half = z_quantile(spec.confidence) * stderr if stderr > 0 else 0.0
    low, high = mean - half, mean + half
    non_inferior = low >= -spec.margin
    passed = floor_ok and non_inferior

    parts = [f"{spec.metric}: {_signed(mean)} [{_signed(low)}, {_signed(high)}]{vs} on {n} paired items, "
             f"margin {spec.margin:g}"]
    if spec.floor is not None:
        parts.append(floor_text)
    if passed:
        parts.append("passes")
    else:
        why = []
        if not non_inferior:
            why.append(f"lower bound {_signed(low)} is {(-spec.margin - low):.3g} below -{spec.margin:g}")
        if not floor_ok:
            why.append(floor_text)
        parts.append("fails (" + "; ".join(why) + ")")
    return GateVerdict(**base, passed=passed, n=n, diff=mean, stderr=stderr, ci_low=low, ci_high=high,
                       reason=", ".join(parts[:-1]) + ": " + parts[-1])


MONITOR_METRIC = "monitor/alarms"  # the gate row of a candidate that tripped a reward-hacking monitor


def monitor_verdict(alarms: Sequence[str]) -> GateVerdict:
    """The failing verdict of a candidate carrying reward-hacking monitor alarms (stages/monitors.py).

    A monitor that fired means the candidate's other numbers may be the reward being gamed (longer,
    politer, more confident answers; a policy far from its reference; a reward model that disagrees
    with the verifier), so no paired test on them can clear it: it fails whatever they say. Its value
    is the number of alarms, against a ceiling of 0.
    """
    if not alarms:
        raise ValueError("monitor_verdict needs at least one alarm")
    return GateVerdict(metric=MONITOR_METRIC, passed=False, value=float(len(alarms)), higher_is_better=False,
                       margin=0.0, floor=0.0, confidence=0.95, champion_version=None, n=0, diff=None, stderr=None,
                       ci_low=None, ci_high=None,
                       reason=f"{MONITOR_METRIC}: {len(alarms)} reward-hacking monitor alarm"
                              f"{'s' if len(alarms) > 1 else ''} ({'; '.join(alarms)}): fails")


def all_passed(verdicts: Iterable[GateVerdict]) -> bool:
    """Every gate passed; no gates at all is a failure (fail closed)."""
    verdicts = list(verdicts)
    return bool(verdicts) and all(v.passed for v in verdicts)
