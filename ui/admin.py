"""What the admin tab shows: queue status, throughput per annotator, agreement, label distribution.

Read-only queries over a Store, and one markdown rendering of them for the page:

    from ui import admin, store
    print(admin.report_markdown(store.open_store()))

Choices are counted in the item's own order (`Label.choice`: "A" means the item's response_a), the
order agreement must compare in: two annotators who saw the pair in opposite A/B orders and
preferred the same answer agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select

from ui import agreement
from ui.store import CATEGORIES, CHOICES, Annotator, Assignment, Item, Label, Store, wants_labels


@dataclass(frozen=True)
class QueueStatus:
    items: int  # in the queue, ever
    labels: int  # stored labels
    labelled: int  # items with all the labels they want
    remaining: int  # items that still want labels
    leased: int  # items someone holds right now


@dataclass(frozen=True)
class Throughput:
    annotator: str
    labels: int
    last_hour: int  # labels in the last 60 minutes
    per_hour: float | None  # while active: labels after the first one / hours from first to last; None below 2


@dataclass(frozen=True)
class Distribution:
    choices: dict[str, int]  # every choice, zeros included
    categories: dict[str, int]  # categories used, plus "(none)" for labels without one
    flags: dict[str, int]


def queue_status(store: Store, overlap: int = 1) -> QueueStatus:
    """`overlap`: labels an item wants unless it sets its own (the page's queue setting)."""
    now = store.clock()
    with store.session() as s:
        items = s.scalar(select(func.count(Item.id)))
        remaining = s.scalar(select(func.count(Item.id)).where(wants_labels(overlap)))
        leased = s.scalar(select(func.count(func.distinct(Assignment.item_id))).where(Assignment.leased_until > now))
        labels = s.scalar(select(func.count(Label.id)))
    return QueueStatus(items=items, labels=labels, labelled=items - remaining, remaining=remaining, leased=leased)


def throughput(store: Store) -> list[Throughput]:
    """Every annotator who has labelled something, most labels first."""
    since = store.clock() - timedelta(hours=1)
    with store.session() as s:
        rows = s.execute(select(Annotator.name, func.count(Label.id), func.min(Label.created_at),
                                func.max(Label.created_at),
                                func.count(Label.id).filter(Label.created_at > since))
                         .join(Label, Label.annotator_id == Annotator.id).group_by(Annotator.name)).all()
    out = []
    for name, n, first, last, recent in rows:
        hours = (last - first).total_seconds() / 3600
        out.append(Throughput(name, n, recent, (n - 1) / hours if n >= 2 and hours > 0 else None))
    return sorted(out, key=lambda t: (-t.labels, t.annotator))


def _labels(store: Store) -> list[tuple[str, str, str]]:
    with store.session() as s:
        return [(str(item), name, choice) for item, name, choice in
                s.execute(select(Label.item_id, Annotator.name, Label.choice)
                          .join(Annotator, Annotator.id == Label.annotator_id).order_by(Label.id))]


def agreement_stats(store: Store) -> agreement.Agreement:
    return agreement.measure(_labels(store))


def distribution(store: Store) -> Distribution:
    with store.session() as s:
        choices = dict(s.execute(select(Label.choice, func.count(Label.id)).group_by(Label.choice)).all())
        categories = dict(s.execute(select(Label.category, func.count(Label.id)).group_by(Label.category)).all())
        harmful = s.scalar(select(func.count(Label.id)).where(Label.flag_harmful))
        hallucination = s.scalar(select(func.count(Label.id)).where(Label.flag_hallucination))
    ordered = {c: categories[c] for c in CATEGORIES if c in categories}
    if None in categories:
        ordered["(none)"] = categories[None]
    return Distribution(choices={c: choices.get(c, 0) for c in CHOICES}, categories=ordered,
                        flags={"harmful": harmful, "hallucination": hallucination})


def _number(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(store: Store, overlap: int = 1) -> str:
    """The admin tab's content. Names are safe to put in markdown: the store allows only letters,
    digits and `. _ @ -` in them."""
    q, agree, dist = queue_status(store, overlap), agreement_stats(store), distribution(store)
    lines = ["### Queue", "", "| items | labels | fully labelled | remaining | leased now |",
             "| ---: | ---: | ---: | ---: | ---: |",
             f"| {q.items} | {q.labels} | {q.labelled} | {q.remaining} | {q.leased} |", "",
             "### Throughput", ""]
    rows = throughput(store)
    if rows:
        lines += ["| annotator | labels | last hour | labels/hour while active |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {t.annotator} | {t.labels} | {t.last_hour} | {_number(t.per_hour, 1)} |" for t in rows]
    else:
        lines.append("No labels yet.")
    lines += ["", "### Agreement", "",
              f"Krippendorff's α (nominal): **{_number(agree.alpha)}** over {agree.overlapping_items} items "
              "labelled by two or more annotators.", ""]
    if agree.kappa:
        lines += ["| annotators | Cohen's κ | shared items |", "| --- | ---: | ---: |"]
        lines += [f"| {a} · {b} | {_number(k)} | {n} |" for (a, b), (k, n) in sorted(agree.kappa.items())]
    else:
        lines.append("No item has been labelled by two annotators yet.")
    lines += ["", "### Labels", "", "| choice | " + " | ".join(dist.choices) + " |",
              "| --- |" + " ---: |" * len(dist.choices),
              "| labels | " + " | ".join(str(n) for n in dist.choices.values()) + " |", ""]
    if dist.categories:
        lines.append("Categories: " + ", ".join(f"{c} {n}" for c, n in dist.categories.items()) + ".")
    lines.append(f"Flags: harmful {dist.flags['harmful']}, hallucination {dist.flags['hallucination']}.")
    return "\n".join(lines)
