"""Agreement statistics against values worked out by hand."""

from __future__ import annotations

import doctest
import math

import pytest

from ui import agreement
from ui.agreement import cohen_kappa, krippendorff_alpha, pairwise_kappa


def test_doctests():
    assert doctest.testmod(agreement, optionflags=doctest.ELLIPSIS).failed == 0


def test_kappa_by_hand():
    # 10 shared items, 3 choices. Agreements on 7: p_o = 0.7.
    # first: A x5, B x3, tie x2; second: A x5, B x4, tie x1 -> p_e = (5*5 + 3*4 + 2*1) / 100 = 0.39.
    first = ["A", "A", "A", "A", "A", "B", "B", "B", "tie", "tie"]
    second = ["A", "A", "A", "A", "B", "B", "B", "A", "tie", "B"]
    assert cohen_kappa(first, second) == pytest.approx((0.7 - 0.39) / (1 - 0.39))
    assert cohen_kappa(first, first) == 1.0
    assert cohen_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)  # p_o 0, p_e 0.5
    assert math.isnan(cohen_kappa(["A", "A"], ["A", "A"]))  # chance agreement is total: undefined
    with pytest.raises(ValueError, match="paired"):
        cohen_kappa(["A"], ["A", "B"])


def test_pairwise_kappa_uses_shared_items_only():
    labels = [("1", "ana", "A"), ("1", "ben", "A"), ("2", "ana", "B"), ("2", "ben", "A"),
              ("3", "ana", "A"), ("3", "cat", "A"), ("4", "ben", "tie")]
    out = pairwise_kappa(labels)
    assert set(out) == {("ana", "ben"), ("ana", "cat")}  # ben and cat share nothing
    # ana vs ben on items 1-2: p_o = 1/2; ana A,B and ben A,A -> p_e = (1*2 + 1*0) / 4 = 1/2 -> kappa 0
    assert out[("ana", "ben")] == (pytest.approx(0.0), 2)
    assert math.isnan(out[("ana", "cat")][0]) and out[("ana", "cat")][1] == 1


def test_alpha_by_hand_with_missing_labels():
    # Three annotators, items labelled by 2 or 3 of them. Coincidences (weight 1/(m-1) per ordered pair):
    # item 1 (A, A, A): o_AA += 3; item 2 (A, B): o_AB = o_BA += 1; item 3 (B, B): o_BB += 2;
    # item 4 (B, B, A): o_BB += 1, o_AB = o_BA += 1. So o_AA 3, o_AB 2, o_BA 2, o_BB 3; n_A = n_B = 5, n = 10.
    # D_o = 4/10; D_e = 2 * 5 * 5 / (10 * 9) = 50/90; alpha = 1 - 0.4 / (5/9) = 0.28.
    labels = [("1", "x", "A"), ("1", "y", "A"), ("1", "z", "A"), ("2", "x", "A"), ("2", "z", "B"),
              ("3", "y", "B"), ("3", "z", "B"), ("4", "x", "B"), ("4", "y", "B"), ("4", "z", "A"),
              ("5", "x", "tie")]  # item 5 has one label: it cannot show agreement and is left out
    assert krippendorff_alpha(labels) == pytest.approx(0.28)
    assert math.isnan(krippendorff_alpha([("1", "x", "A")]))
    with pytest.raises(ValueError, match="twice"):
        krippendorff_alpha([("1", "x", "A"), ("1", "x", "B")])
