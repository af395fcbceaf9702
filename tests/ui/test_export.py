"""Labels -> preference pairs: the documented rules for majorities, splits, ties, both-bad and harm."""

from __future__ import annotations

import json

import pytest

from stages.pairs import check_pair, read_records
from ui import export
from ui import store as st


@pytest.fixture
def store(tmp_path):
    s = st.open_store(f"sqlite:///{tmp_path / 'labels.db'}")
    for name in ("ana", "bo", "cy"):
        st.add_annotator(s, name, "pw")
    yield s
    s.engine.dispose()


def _label_item(store, prompt, votes, **kw):
    """Queue one item and have each (annotator, choice as stored, i.e. in the item's order) label it."""
    (item_id,) = st.add_items(store, [{"prompt": prompt, "response_a": f"{prompt}: first",
                                       "response_b": f"{prompt}: second", "model_a": "v2", "model_b": "v1",
                                       "overlap": len(votes)}])
    for who, choice in votes:
        pair = st.next_item(store, who)
        assert pair.item_id == item_id
        shown = choice
        if pair.response_a != f"{prompt}: first" and choice in ("A", "B"):
            shown = {"A": "B", "B": "A"}[choice]  # the store flips what the annotator saw back
        st.submit_label(store, who, item_id, shown, idempotency_key=f"{who}-{item_id}", **kw.get(who, {}))
    return item_id


def test_majorities_become_pairs_and_everything_else_is_counted(store):
    win = _label_item(store, "majority", [("ana", "A"), ("bo", "A"), ("cy", "B")])
    _label_item(store, "split", [("ana", "A"), ("bo", "B")])
    _label_item(store, "tie", [("ana", "tie")])
    _label_item(store, "both bad", [("ana", "both_bad"), ("bo", "both_bad")])
    second = _label_item(store, "single", [("bo", "B")], bo={"category": "closed QA"})
    _label_item(store, "flagged", [("cy", "B")], cy={"flags": ["harmful"]})

    result = export.preference_pairs(store)
    by_prompt = {p["prompt"]: p for p in result.pairs}
    assert set(by_prompt) == {"majority", "single", "flagged"}
    assert by_prompt["majority"]["chosen"] == "majority: first"
    assert by_prompt["majority"]["rejected"] == "majority: second"
    assert by_prompt["majority"]["agreement"] == pytest.approx(2 / 3)
    assert by_prompt["majority"]["annotators"] == ["ana", "bo", "cy"]
    assert (by_prompt["majority"]["item_id"], by_prompt["single"]["item_id"]) == (win, second)
    assert by_prompt["single"]["chosen"] == "single: second" and by_prompt["single"]["category"] == "closed QA"
    assert by_prompt["single"]["chosen_model"] == "v1"
    assert by_prompt["flagged"]["flags"] == ["harmful"] and by_prompt["single"]["flags"] == []
    assert by_prompt["flagged"]["chosen"] == "flagged: second"  # the less harmful answer, as the guidelines ask
    assert result.summary["outcomes"] == {"pair": 3, "split": 1, "tie": 1, "both_bad": 1}
    assert result.summary["labels"] == 10 and result.summary["items"] == 6
    assert result.label_ids == f"1-{export.last_label_id(store)}"


def test_agreement_is_computed_over_all_labels_and_written_with_the_pairs(store, tmp_path):
    _label_item(store, "one", [("ana", "A"), ("bo", "A")])
    _label_item(store, "two", [("ana", "B"), ("bo", "B")])
    _label_item(store, "three", [("ana", "A"), ("bo", "tie")])
    result = export.preference_pairs(store)
    agreement = result.summary["agreement"]
    assert agreement["items_with_overlap"] == 3
    # ana: A B A, bo: A B tie. p_o = 2/3; p_e = (2*1 + 1*1) / 9 = 1/3; kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert agreement["cohen_kappa"]["ana|bo"] == {"kappa": pytest.approx(0.5), "items": 3}
    assert agreement["krippendorff_alpha"] is not None

    out = export.write(result, tmp_path / "prefs")
    # The file reads back as DPO and the reward model read it, and every pair passes their checks.
    read_back = [check_pair(record) for _, record in read_records(out / export.PAIRS_FILE)]
    assert [reason for _, reason in read_back] == [None] * len(result.pairs)
    assert [{k: pair[k] for k in ("prompt", "chosen", "rejected")} for pair, _ in read_back] == [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in result.pairs]
    assert json.loads((out / export.SUMMARY_FILE).read_text())["pairs"] == 2
    assert "2 preference pairs" in result.markdown


def test_new_labels_are_counted_after_an_export_point(store):
    _label_item(store, "one", [("ana", "A")])
    point = export.last_label_id(store)
    assert export.new_labels_since(store, point) == 0
    _label_item(store, "two", [("ana", "B"), ("bo", "A")])
    assert export.new_labels_since(store, point) == 2


def test_an_empty_store_exports_no_pairs_and_says_so(store):
    result = export.preference_pairs(store)
    assert result.pairs == [] and result.label_ids == "" and result.summary["agreement"]["krippendorff_alpha"] is None
