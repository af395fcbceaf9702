"""Labels -> preference pairs (prompt, chosen, rejected) for DPO and the reward model.

    from ui import export, store
    result = export.preference_pairs(store.open_store())
    export.write(result, out_dir)           # pairs.jsonl + summary.json

The rules, per item, over every label it has (labels are stored in the item's own A/B order):
1. Each label is a vote: A, B, tie or both_bad.
2. The item yields a pair only when A or B has strictly more votes than every other choice: that
   response is `chosen`, the other `rejected`. Two annotators saying A and one saying B is a pair;
   one A and one B is not ("split"), and neither is a majority of tie ("tie") or of both_bad
   ("both_bad"): DPO and a Bradley-Terry reward model learn from a strict preference only, and a
   pair built from "both bad" would teach the model to prefer a bad answer.
3. Flags (harmful, hallucination) travel with the pair: the guidelines ask annotators to flag an
   item when either response has the problem and still to choose the less harmful, more truthful
   one, so the preference is the signal we want; a trainer can still filter on `flags`.
4. `agreement` is the share of the item's labels that voted for the winner (1.0 with one label).
Every label is counted under exactly one outcome in `summary["outcomes"]`, so nothing disappears
without a number. Agreement over annotators (Cohen's kappa per pair, Krippendorff's alpha) is
computed on all labels, pairs or not, and goes into the summary.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ui import agreement
from ui.store import Annotator, Item, Label, Store

PAIRS_FILE, SUMMARY_FILE = "pairs.jsonl", "summary.json"
OUTCOMES = ("pair", "split", "tie", "both_bad")


@dataclass(frozen=True)
class Export:
    pairs: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def label_ids(self) -> str:
        """The label-id range read, "first-last" ("" when there were no labels): lineage of a model."""
        lo, hi = self.summary["first_label_id"], self.summary["last_label_id"]
        return f"{lo}-{hi}" if hi else ""

    @property
    def markdown(self) -> str:
        s = self.summary
        alpha = s["agreement"]["krippendorff_alpha"]
        lines = [f"**{len(self.pairs)} preference pairs** from {s['labels']} labels on {s['items']} items "
                 f"(label ids {self.label_ids or '-'})", "",
                 "| outcome | items |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["outcomes"].items()]
        lines += ["", f"Krippendorff's alpha: {'-' if alpha is None else f'{alpha:.3f}'} "
                      f"over {s['agreement']['items_with_overlap']} items labelled by two or more"]
        return "\n".join(lines)


def last_label_id(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.max(Label.id))) or 0


def new_labels_since(store: Store, label_id: int) -> int:
    """Labels stored after the one with id `label_id` (ids are never reused, see ui/store.py)."""
    with store.session() as s:
        return s.scalar(select(func.count(Label.id)).where(Label.id > label_id)) or 0


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value  # JSON has no NaN


def _winner(votes: Counter) -> str | None:
    (top, count), *rest = votes.most_common()
    return None if rest and rest[0][1] == count else top


def preference_pairs(store: Store) -> Export:
    """Every label in the store, turned into pairs by the rules above; the summary counts the rest."""
    with store.session() as s:
        rows = s.execute(select(Label, Item, Annotator.name).join(Item, Label.item_id == Item.id)
                         .join(Annotator, Label.annotator_id == Annotator.id).order_by(Label.id)).all()
    by_item: dict[int, list[tuple[Label, str]]] = defaultdict(list)
    items: dict[int, Item] = {}
    for label, item, name in rows:
        by_item[item.id].append((label, name))
        items[item.id] = item

    pairs, outcomes = [], Counter({k: 0 for k in OUTCOMES})
    for item_id, labels in by_item.items():
        item = items[item_id]
        votes = Counter(label.choice for label, _ in labels)
        winner = _winner(votes)
        if winner not in ("A", "B"):
            outcomes["split" if winner is None else winner] += 1
            continue
        chosen, rejected = ((item.response_a, item.response_b) if winner == "A" else (item.response_b, item.response_a))
        chosen_model, rejected_model = (item.model_a, item.model_b) if winner == "A" else (item.model_b, item.model_a)
        categories = Counter(label.category for label, _ in labels if label.category)
        flags = sorted({f for label, _ in labels for f, on in (("harmful", label.flag_harmful),
                                                                ("hallucination", label.flag_hallucination)) if on})
        outcomes["pair"] += 1
        pairs.append({
            "prompt": item.prompt, "chosen": chosen, "rejected": rejected, "item_id": item_id,
            "label_ids": [label.id for label, _ in labels], "annotators": [name for _, name in labels],
            "agreement": votes[winner] / len(labels),
            "category": categories.most_common(1)[0][0] if categories else None, "flags": flags,
            "chosen_model": chosen_model, "rejected_model": rejected_model, "source": item.source,
        })

    votes_by = [(str(label.item_id), name, label.choice) for label, _item, name in rows]
    agreed = agreement.measure(votes_by)
    summary = {
        "labels": len(rows), "items": len(by_item), "pairs": len(pairs), "outcomes": dict(outcomes),
        "first_label_id": rows[0][0].id if rows else 0, "last_label_id": rows[-1][0].id if rows else 0,
        "annotators": sorted({name for _, _, name in rows}),
        "agreement": {
            "krippendorff_alpha": _number(agreed.alpha),  # None: nothing labelled twice, or one answer only
            "items_with_overlap": agreed.overlapping_items,
            "cohen_kappa": {f"{a}|{b}": {"kappa": _number(k), "items": n}
                            for (a, b), (k, n) in agreed.kappa.items()},
        },
        "rules": "a strict majority of A or B makes a pair; split, tie and both_bad do not; flags travel along",
    }
    return Export(pairs, summary)


def write(result: Export, out_dir: Path) -> Path:
    """pairs.jsonl (one pair a line, what DPO's `pairs` reads) and summary.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PAIRS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.pairs), encoding="utf-8")
    tmp.replace(out_dir / PAIRS_FILE)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    return out_dir
