"""How much annotators agree on preference labels: Cohen's kappa per pair, Krippendorff's alpha overall.

    labels = [("item-1", "ana", "A"), ("item-1", "ben", "A"), ("item-2", "ana", "B"), ("item-2", "ben", "tie")]
    pairwise_kappa(labels)      # {("ana", "ben"): (0.0, 2)}: kappa and the number of shared items
    krippendorff_alpha(labels)  # one number over everyone, missing labels allowed

Choices are nominal (A, B, tie, both_bad): disagreeing "A" vs "tie" costs as much as "A" vs "B".
Kappa compares two annotators on the items both labelled; alpha uses every item labelled by two or
more people, whoever they are, which is what an overlap queue produces. Alpha comes from the
maintained `krippendorff` package rather than our own code.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import krippendorff
import numpy as np

Label = tuple[str, str, str]  # (item id, annotator, choice)


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Agreement of two annotators beyond chance, on the same items in the same order.

    NaN when chance agreement is already total (both always gave one and the same answer):
    kappa is undefined there, and a made-up 1.0 would hide that nothing was measured.

    >>> cohen_kappa(["A", "A", "B", "B", "A", "B"], ["A", "B", "B", "B", "A", "A"])  # (4/6 - 1/2) / (1 - 1/2)
    0.333333...
    >>> cohen_kappa(["A", "B"], ["A", "B"])
    1.0
    """
    if len(first) != len(second):
        raise ValueError(f"cohen_kappa needs paired labels, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    left, right = Counter(first), Counter(second)
    expected = sum(left[c] * right[c] for c in left) / (n * n)
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def _by_item(labels: Iterable[Label]) -> dict[str, dict[str, str]]:
    items: dict[str, dict[str, str]] = defaultdict(dict)
    for item, annotator, choice in labels:
        if annotator in items[item]:
            raise ValueError(f"annotator {annotator!r} labelled item {item!r} twice")
        items[item][annotator] = choice
    return items


def pairwise_kappa(labels: Iterable[Label]) -> dict[tuple[str, str], tuple[float, int]]:
    """Cohen's kappa for every pair of annotators who share at least one item: (kappa, shared items)."""
    items = _by_item(labels)
    annotators = sorted({a for by in items.values() for a in by})
    out = {}
    for a, b in combinations(annotators, 2):
        shared = [by for by in items.values() if a in by and b in by]
        if shared:
            out[(a, b)] = (cohen_kappa([by[a] for by in shared], [by[b] for by in shared]), len(shared))
    return out


def krippendorff_alpha(labels: Iterable[Label]) -> float:
    """Krippendorff's alpha (nominal) over all annotators and items; NaN with fewer than two labels per item.

    >>> krippendorff_alpha([("1", "x", "A"), ("1", "y", "A"), ("2", "x", "A"), ("2", "y", "B"),
    ...                     ("3", "x", "B"), ("3", "y", "B"), ("4", "x", "B"), ("4", "y", "B")])  # 1 - D_o/D_e = 8/15
    0.533333...
    """
    items = {item: by for item, by in _by_item(labels).items() if len(by) >= 2}
    values = sorted({c for by in items.values() for c in by.values()})
    if not items or len(values) < 2:
        return math.nan  # no item to compare on, or one answer only: nothing to measure
    annotators = sorted({a for by in items.values() for a in by})
    code = {c: i for i, c in enumerate(values)}
    data = np.full((len(annotators), len(items)), np.nan)
    for j, by in enumerate(items.values()):
        for i, annotator in enumerate(annotators):
            if annotator in by:
                data[i, j] = code[by[annotator]]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


@dataclass(frozen=True)
class Agreement:
    kappa: dict[tuple[str, str], tuple[float, int]]  # (annotator, annotator) -> (Cohen's kappa, shared items)
    alpha: float  # Krippendorff's alpha (nominal) over items with two labels or more; NaN when none
    overlapping_items: int  # items labelled by two or more annotators


def measure(labels: Iterable[Label]) -> Agreement:
    """Everything the admin tab and an export report about agreement, from one list of labels."""
    labels = list(labels)
    per_item = Counter(item for item, _, _ in labels)
    return Agreement(kappa=pairwise_kappa(labels), alpha=krippendorff_alpha(labels),
                     overlapping_items=sum(1 for n in per_item.values() if n >= 2))
