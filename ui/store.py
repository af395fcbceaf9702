"""The annotation store: annotators, items to compare, who holds which item, and the labels.

SQLAlchemy 2 on SQLite (WAL) by default, PostgreSQL by URL (`FLYWHEEL_LABELS_DB`). Every function
takes the annotator's name from the authenticated session (the page's login), never from a form
field, and refuses items that were not handed to that annotator.

Queue rules: an item is leased to one annotator at a time (the lease expires, so an abandoned item
goes back to the queue); nobody labels the same item twice; an item leaves the queue once it has
`overlap` labels. Responses are shown in a random A/B order per assignment; labels are stored in the
item's own order (`swapped` records what the annotator saw), so export never has to guess.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ui.passwords import DUMMY_HASH, hash_password, verify_password

CHOICES = ("A", "B", "tie", "both_bad")
CATEGORIES = ("generation", "open QA", "brainstorming", "chat", "rewrite", "summarization",
              "classification", "closed QA", "extraction", "other")
FLAGS = ("harmful", "hallucination")
RATING_RANGE = (1, 7)
MAX_RATIONALE = 4000
MAX_NAME = 64
MAX_KEY = 128


def utcnow() -> datetime:
    # Naive UTC throughout: SQLite drops time zones, and mixing aware and naive values breaks comparisons.
    return datetime.now(UTC).replace(tzinfo=None)


class StoreError(Exception):
    """A request the store refuses; the message is fit to show the annotator."""


class InvalidLabel(StoreError, ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class NotAssigned(StoreError, PermissionError):
    """The item was not handed to this annotator (a forged, foreign or unknown item_id)."""


class UnknownAnnotator(StoreError, LookupError):
    pass


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[Any] = mapped_column(JSON)  # a string, or a list of {"role", "content"} messages
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(256), default="")  # never shown to annotators
    model_b: Mapped[str] = mapped_column(String(256), default="")
    source: Mapped[str] = mapped_column(String(256), default="")
    # Labels wanted for this item; None: the queue's default. Overlap on a share of items is what
    # agreement is measured on.
    overlap: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    # None once labelled; in the past when abandoned (the item may then go to someone else).
    leased_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)  # response_b was shown as "A"
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)  # never offered to this annotator again
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Label(Base):
    __tablename__ = "labels"
    # AUTOINCREMENT: SQLite would otherwise hand an undone label's id to the next label, and "labels
    # since the last export" (ids above the exported ones) would miss it.
    __table_args__ = (UniqueConstraint("item_id", "annotator_id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))  # in the item's order: "A" means response_a
    rating_a: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rating_b: Mapped[int | None] = mapped_column(Integer, nullable=True)
    category: Mapped[str | None] = mapped_column(String(32), nullable=True)
    flag_harmful: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_hallucination: Mapped[bool] = mapped_column(Boolean, default=False)
    rationale: Mapped[str] = mapped_column(Text, default="")
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str] = mapped_column(String(MAX_KEY), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


@dataclass
class Store:
    engine: Engine
    session: sessionmaker[Session]
    clock: Callable[[], datetime] = field(default=utcnow)  # tests move time to expire leases


def default_url() -> str:
    from infra.settings import load_settings

    url = os.environ.get("FLYWHEEL_LABELS_DB")
    if url:
        return url
    path = load_settings().home / "labels" / "labels.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Take over transaction control from pysqlite, so that `begin` below decides how they start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA busy_timeout=5000")  # wait for the write lock instead of failing at once
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # IMMEDIATE takes the write lock up front: two annotators asking for work cannot both read the
        # same item as free and both lease it (SQLite has no SELECT ... FOR UPDATE).
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_store(url: str | None = None) -> Store:
    url = url or default_url()
    if url.startswith("sqlite"):
        # One connection, and callers queue for it: every transaction takes SQLite's write lock up
        # front anyway, and SQLite's own busy wait (polling) lost every race for 5 s on a loaded
        # machine with 50 annotators, where a queue in the pool serves them in turn (measured:
        # "database is locked" refusals -> none, same labels/s). Never hold two sessions at once.
        engine = create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=0, pool_timeout=60)
        _sqlite_setup(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return Store(engine=engine, session=sessionmaker(engine, expire_on_commit=False))


# --- annotators -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnnotatorInfo:
    name: str
    is_admin: bool
    disabled: bool
    created_at: datetime


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or not all(c.isalnum() or c in "._@-" for c in name):
        raise StoreError(f"name: must be 1-{MAX_NAME} letters, digits or . _ @ -, got {name!r}")
    return name


def add_annotator(store: Store, name: str, password: str, admin: bool = False) -> None:
    _check_name(name)
    if not password:
        raise StoreError("password: must not be empty")
    with store.session.begin() as s:
        if s.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
            raise StoreError(f"annotator {name!r} already exists")
        s.add(Annotator(name=name, password_hash=hash_password(password), is_admin=admin))


def verify_login(store: Store, name: str, password: str) -> bool:
    """False for a wrong password and for unknown or disabled names, after the same scrypt work."""
    with store.session() as s:
        row = s.execute(select(Annotator.password_hash, Annotator.disabled)
                        .where(Annotator.name == name)).first()
    ok = verify_password(password, row.password_hash if row else DUMMY_HASH)
    return ok and row is not None and not row.disabled


def disable_annotator(store: Store, name: str) -> None:
    with store.session.begin() as s:
        annotator = s.scalar(select(Annotator).where(Annotator.name == name))
        if annotator is None:
            raise UnknownAnnotator(f"no annotator named {name!r}")
        annotator.disabled = True
        # Their open leases go back to the queue now rather than when they expire.
        for a in s.scalars(select(Assignment).where(Assignment.annotator_id == annotator.id,
                                                    Assignment.leased_until.is_not(None))):
            a.leased_until = store.clock()


def list_annotators(store: Store) -> list[AnnotatorInfo]:
    with store.session() as s:
        return [AnnotatorInfo(a.name, a.is_admin, a.disabled, a.created_at)
                for a in s.scalars(select(Annotator).order_by(Annotator.name))]


def _active_annotator(s: Session, name: str) -> Annotator:
    annotator = s.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None or annotator.disabled:
        raise UnknownAnnotator(f"no active annotator named {name!r}")
    return annotator


# --- items and the queue ----------------------------------------------------------------------------

def _check_prompt(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    and isinstance(m.get("content"), str) for m in prompt)):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise StoreError("prompt: must be a string or a non-empty list of {role, content} messages")


def _check_overlap(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise StoreError(f"overlap: must be a whole number >= 1, got {value!r}")


def add_items(store: Store, items: Iterable[dict]) -> list[int]:
    """Queue items: dicts with prompt, response_a, response_b and optionally model_a, model_b, source,
    overlap (labels wanted; default: the queue's)."""
    with store.session.begin() as s:
        rows = [Item(prompt=_check_prompt(it["prompt"]), response_a=str(it["response_a"]),
                     response_b=str(it["response_b"]), model_a=str(it.get("model_a", "")),
                     model_b=str(it.get("model_b", "")), source=str(it.get("source", "")),
                     overlap=_check_overlap(it.get("overlap"))) for it in items]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def item_count(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count(Item.id))) or 0


@dataclass(frozen=True)
class Pair:
    """What an annotator sees: no model names, responses in this assignment's A/B order."""
    item_id: int
    prompt: Any
    response_a: str
    response_b: str


def _shown(item: Item, a: Assignment) -> Pair:
    first, second = (item.response_b, item.response_a) if a.swapped else (item.response_a, item.response_b)
    return Pair(item.id, item.prompt, first, second)


def wants_labels(overlap: int):
    """SQL condition on Item: fewer labels than it wants (its own overlap, else the queue's)."""
    label_count = select(func.count(Label.id)).where(Label.item_id == Item.id).correlate(Item).scalar_subquery()
    return label_count < func.coalesce(Item.overlap, overlap)


def open_to(annotator_id: int, overlap: int) -> tuple:
    """SQL conditions on Item: it still wants labels, and this annotator neither labelled nor skipped it."""
    return (wants_labels(overlap),
            Item.id.not_in(select(Label.item_id).where(Label.annotator_id == annotator_id)),
            Item.id.not_in(select(Assignment.item_id).where(Assignment.annotator_id == annotator_id,
                                                            Assignment.skipped)))


def next_item(store: Store, annotator: str, lease_s: float = 600, overlap: int = 1) -> Pair | None:
    """The annotator's current item, or lease them a new one; None when nothing is left for them.

    `overlap` is the number of labels an item wants unless the item sets its own.
    """
    now = store.clock()
    with store.session.begin() as s:
        me = _active_annotator(s, annotator)
        mine = s.scalars(select(Assignment).where(Assignment.annotator_id == me.id,
                                                  Assignment.leased_until > now)
                         .order_by(Assignment.id)).first()
        if mine is not None:  # a reload or a second tab shows the same item, not a new one
            return _shown(s.get(Item, mine.item_id), mine)
        held = select(Assignment.item_id).where(Assignment.leased_until > now)
        free = (*open_to(me.id, overlap), Item.id.not_in(held))
        query = select(Item).where(*free).order_by(Item.id).limit(1)
        if s.get_bind().dialect.name != "sqlite":
            # SQLite's BEGIN IMMEDIATE already serialised us. On PostgreSQL the row lock does: a racer
            # skips the locked item; one that got the lock just after the holder committed re-checks
            # with a fresh statement (READ COMMITTED), sees the new lease and takes the next item.
            query = query.with_for_update(skip_locked=True)
            while (item := s.scalars(query).first()) is not None:
                if s.scalar(select(Item.id).where(Item.id == item.id, *free)) is not None:
                    break
        else:
            item = s.scalars(query).first()
        if item is None:
            return None
        a = s.scalar(select(Assignment).where(Assignment.item_id == item.id, Assignment.annotator_id == me.id))
        if a is None:  # an earlier, expired lease of the same annotator is reused (one row per pair)
            a = Assignment(item_id=item.id, annotator_id=me.id, swapped=random.random() < 0.5)
            s.add(a)
        a.leased_until = now + timedelta(seconds=lease_s)
        s.flush()
        return _shown(item, a)


def skip_item(store: Store, annotator: str, item_id: int) -> None:
    """Hand the item back: it goes to someone else, never again to this annotator."""
    with store.session.begin() as s:
        me = _active_annotator(s, annotator)
        a = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.annotator_id == me.id,
                                              Assignment.leased_until.is_not(None), Assignment.skipped.is_(False)))
        if a is None:
            raise NotAssigned(f"item {item_id} is not assigned to {annotator}")
        a.skipped, a.leased_until = True, store.clock()


# --- labels -----------------------------------------------------------------------------------------

def _check_label(choice: str, ratings: dict | None, category: str | None, flags: Iterable[str],
                 rationale: str, idempotency_key: str) -> tuple[dict, set]:
    if choice not in CHOICES:
        raise InvalidLabel("choice", f"must be one of {', '.join(CHOICES)}, got {choice!r}")
    ratings = dict(ratings or {})
    for side, value in ratings.items():
        if side not in ("A", "B"):
            raise InvalidLabel("ratings", f"keys are A and B, got {side!r}")
        low, high = RATING_RANGE
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise InvalidLabel(f"rating {side}", f"must be an integer from {low} to {high}, got {value!r}")
    if category is not None and category not in CATEGORIES:
        raise InvalidLabel("category", f"must be one of {', '.join(CATEGORIES)}, got {category!r}")
    flags = set(flags)
    if not flags <= set(FLAGS):
        raise InvalidLabel("flags", f"must be among {', '.join(FLAGS)}, got {sorted(flags - set(FLAGS))}")
    if not isinstance(rationale, str) or len(rationale) > MAX_RATIONALE:
        raise InvalidLabel("rationale", f"at most {MAX_RATIONALE} characters, got "
                                        f"{len(rationale) if isinstance(rationale, str) else type(rationale).__name__}")
    if not idempotency_key or len(idempotency_key) > MAX_KEY:
        raise InvalidLabel("idempotency_key", f"must be 1-{MAX_KEY} characters")
    return ratings, flags


def _replay(s: Session, me: Annotator, item_id: int, key: str) -> int | None:
    """The label an earlier submit with this key stored, or None; a key of someone else is refused."""
    earlier = s.scalar(select(Label).where(Label.idempotency_key == key))
    if earlier is None:
        return None
    if earlier.annotator_id != me.id or earlier.item_id != item_id:
        raise InvalidLabel("idempotency_key", "already used for another submission")
    return earlier.id


def submit_label(store: Store, annotator: str, item_id: int, choice: str, *, idempotency_key: str,
                 ratings: dict | None = None, category: str | None = None, flags: Iterable[str] = (),
                 rationale: str = "") -> int:
    """Store one label; `choice` and `ratings` are as the annotator saw them (A = the left response).

    A repeated submit with the same key returns the first label's id and stores nothing. A lease that
    expired while the annotator was working still counts: the item was handed to them.
    """
    ratings, flags = _check_label(choice, ratings, category, flags, rationale, idempotency_key)
    try:
        with store.session.begin() as s:
            me = _active_annotator(s, annotator)
            replayed = _replay(s, me, item_id, idempotency_key)
            if replayed is not None:
                return replayed
            a = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.annotator_id == me.id))
            if a is None:
                raise NotAssigned(f"item {item_id} was not assigned to {annotator}")
            if s.scalar(select(Label.id).where(Label.item_id == item_id, Label.annotator_id == me.id)) is not None:
                raise StoreError(f"item {item_id} is already labelled by {annotator}; undo it first")
            flip = {"A": "B", "B": "A"}
            label = Label(item_id=item_id, annotator_id=me.id, swapped=a.swapped,
                          choice=flip.get(choice, choice) if a.swapped else choice,
                          rating_a=ratings.get("B" if a.swapped else "A"),
                          rating_b=ratings.get("A" if a.swapped else "B"),
                          category=category, flag_harmful="harmful" in flags,
                          flag_hallucination="hallucination" in flags, rationale=rationale,
                          idempotency_key=idempotency_key, created_at=store.clock())
            s.add(label)
            a.leased_until = None
            s.flush()
            return label.id
    except IntegrityError:
        # A concurrent submit with the same key won the race: answer with its label.
        with store.session() as s:
            replayed = _replay(s, _active_annotator(s, annotator), item_id, idempotency_key)
        if replayed is None:
            raise
        return replayed


@dataclass(frozen=True)
class LabelInfo:
    id: int
    item_id: int
    choice: str  # in the item's order
    rating_a: int | None
    rating_b: int | None
    category: str | None
    flags: tuple[str, ...]
    rationale: str
    created_at: datetime


def _info(label: Label) -> LabelInfo:
    flags = tuple(f for f, on in (("harmful", label.flag_harmful), ("hallucination", label.flag_hallucination)) if on)
    return LabelInfo(label.id, label.item_id, label.choice, label.rating_a, label.rating_b, label.category,
                     flags, label.rationale, label.created_at)


def labels_of(store: Store, annotator: str) -> list[LabelInfo]:
    """This annotator's labels, oldest first; never anyone else's."""
    with store.session() as s:
        me = _active_annotator(s, annotator)
        return [_info(x) for x in s.scalars(select(Label).where(Label.annotator_id == me.id).order_by(Label.id))]


def undo_last(store: Store, annotator: str, lease_s: float = 600) -> int | None:
    """Remove this annotator's most recent label and give them its item again; the item id, or None."""
    with store.session.begin() as s:
        me = _active_annotator(s, annotator)
        last = s.scalars(select(Label).where(Label.annotator_id == me.id)
                         .order_by(Label.created_at.desc(), Label.id.desc())).first()
        if last is None:
            return None
        a = s.scalar(select(Assignment).where(Assignment.item_id == last.item_id, Assignment.annotator_id == me.id))
        if a is not None:
            a.leased_until = store.clock() + timedelta(seconds=lease_s)
        s.delete(last)
        return last.item_id


# --- what the page shows an annotator ---------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    labelled: int  # labels by this annotator
    left: int  # items that still want labels and that this annotator has neither labelled nor skipped


def progress(store: Store, annotator: str, overlap: int = 1) -> Progress:
    """The annotator's progress counter; `overlap` as in `next_item`. Items others hold count as left:
    their leases may expire and come back."""
    with store.session() as s:
        me = _active_annotator(s, annotator)
        labelled = s.scalar(select(func.count(Label.id)).where(Label.annotator_id == me.id))
        left = s.scalar(select(func.count(Item.id)).where(*open_to(me.id, overlap)))
        return Progress(labelled=labelled, left=left)


def is_admin(store: Store, annotator: str) -> bool:
    """Whether this name is an active admin (the page's admin tab and its functions check it on every call)."""
    with store.session() as s:
        return bool(s.scalar(select(Annotator.id).where(Annotator.name == annotator, Annotator.is_admin,
                                                        Annotator.disabled.is_(False))))
