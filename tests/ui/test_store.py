"""The annotation store on a real SQLite WAL file and a real PostgreSQL: logins, the lease queue, labels
and their guards. Every test that takes `store` or `store_url` runs on both (tests/ui/pg.py)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from flows import cli
from tests.ui.pg import postgres_server, store_url  # noqa: F401 (fixtures)
from ui import store as st
from ui.passwords import hash_password, verify_password


@pytest.fixture
def store(store_url):  # noqa: F811 (the imported fixture)
    s = st.open_store(store_url)
    yield s
    s.engine.dispose()


@pytest.fixture
def sqlite_store(tmp_path):
    s = st.open_store(f"sqlite:///{tmp_path / 'labels.db'}")
    yield s
    s.engine.dispose()


def _people(store, *names):
    for name in names:
        st.add_annotator(store, name, f"pw-{name}")


def _items(store, n):
    return st.add_items(store, [{"prompt": f"question {i}", "response_a": f"good {i}", "response_b": f"bad {i}",
                                 "model_a": "v2", "model_b": "v1", "source": "test"} for i in range(n)])


def _label(store, who, pair, key=None, choice="A", **kw):
    return st.submit_label(store, who, pair.item_id, choice, idempotency_key=key or f"{who}-{pair.item_id}", **kw)


def test_sqlite_store_runs_in_wal_mode_with_a_busy_timeout(sqlite_store):
    store = sqlite_store
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_password_is_stored_as_a_salted_kdf_hash_that_verifies():
    stored = hash_password("correct horse")
    assert "correct horse" not in stored and stored.startswith("scrypt$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse") != stored  # a fresh salt each time


def test_login_fails_for_wrong_password_unknown_and_disabled_annotators(store):
    _people(store, "ana")
    assert st.verify_login(store, "ana", "pw-ana")
    assert not st.verify_login(store, "ana", "wrong")
    assert not st.verify_login(store, "nobody", "pw-ana")
    st.disable_annotator(store, "ana")
    assert not st.verify_login(store, "ana", "pw-ana")
    assert [(a.name, a.disabled) for a in st.list_annotators(store)] == [("ana", True)]
    with pytest.raises(st.UnknownAnnotator):
        st.next_item(store, "ana")


def test_duplicate_name_and_empty_password_are_refused(store):
    _people(store, "ana")
    with pytest.raises(st.StoreError, match="already exists"):
        st.add_annotator(store, "ana", "other")
    with pytest.raises(st.StoreError, match="password"):
        st.add_annotator(store, "bo", "")


def test_two_annotators_never_hold_the_same_item_and_models_stay_hidden(store):
    _people(store, "ana", "bo")
    _items(store, 2)
    a, b = st.next_item(store, "ana"), st.next_item(store, "bo")
    assert a.item_id != b.item_id
    assert st.next_item(store, "ana") == a  # a reload shows the same item, not a new lease
    assert not {"v1", "v2"} & set(vars(a).values())
    assert {a.response_a, a.response_b} == {"good %d" % (a.item_id - 1), "bad %d" % (a.item_id - 1)}


def test_an_expired_lease_goes_to_another_annotator(store):
    _people(store, "ana", "bo")
    (item,) = _items(store, 1)
    start = datetime(2026, 1, 1)
    store.clock = lambda: start
    assert st.next_item(store, "ana", lease_s=60).item_id == item
    assert st.next_item(store, "bo", lease_s=60) is None  # still held by ana
    store.clock = lambda: start + timedelta(seconds=61)
    assert st.next_item(store, "bo", lease_s=60).item_id == item


def test_nobody_gets_an_item_twice_and_overlap_two_reaches_two_people(store):
    _people(store, "ana", "bo", "cy")
    (item,) = _items(store, 1)
    _label(store, "ana", st.next_item(store, "ana", overlap=2))
    assert st.next_item(store, "ana", overlap=2) is None  # labelled it already
    pair = st.next_item(store, "bo", overlap=2)
    assert pair.item_id == item
    _label(store, "bo", pair)
    assert st.next_item(store, "cy", overlap=2) is None  # two labels: done
    _items(store, 1)
    _label(store, "ana", st.next_item(store, "ana", overlap=1))
    assert st.next_item(store, "bo", overlap=1) is None  # overlap 1: one label is enough


def test_an_item_can_ask_for_more_labels_than_the_queue_default(store):
    _people(store, "ana", "bo")
    single, double = st.add_items(store, [{"prompt": "one", "response_a": "a", "response_b": "b"},
                                          {"prompt": "two", "response_a": "a", "response_b": "b", "overlap": 2}])
    _label(store, "ana", st.next_item(store, "ana"))
    _label(store, "ana", st.next_item(store, "ana"))
    assert st.next_item(store, "bo").item_id == double  # the single one is done after one label
    with pytest.raises(st.StoreError, match="overlap"):
        st.add_items(store, [{"prompt": "x", "response_a": "a", "response_b": "b", "overlap": 0}])


def test_a_skipped_item_goes_to_someone_else_and_never_back(store):
    _people(store, "ana", "bo")
    first, second = _items(store, 2)
    assert st.next_item(store, "ana").item_id == first
    st.skip_item(store, "ana", first)
    assert st.next_item(store, "ana").item_id == second
    assert st.next_item(store, "bo").item_id == first
    with pytest.raises(st.NotAssigned):
        st.skip_item(store, "ana", first)  # no longer hers to skip


def test_an_undone_labels_id_is_never_handed_out_again(store):
    _people(store, "ana")
    _items(store, 2)
    undone = _label(store, "ana", st.next_item(store, "ana"))
    st.undo_last(store, "ana")
    again = _label(store, "ana", st.next_item(store, "ana"), key="second-try")
    assert again > undone  # "labels since the last export" counts ids above the exported ones


def test_choice_and_ratings_are_stored_in_the_items_order_whatever_was_shown(store):
    _people(store, "ana")
    _items(store, 30)
    swapped_seen = set()
    while (pair := st.next_item(store, "ana")) is not None:
        left_is_good = pair.response_a.startswith("good")
        swapped_seen.add(not left_is_good)
        _label(store, "ana", pair, choice="A" if left_is_good else "B",
               ratings={"A": 6, "B": 2} if left_is_good else {"A": 2, "B": 6})
    assert swapped_seen == {True, False}  # the A/B order is randomised
    labels = st.labels_of(store, "ana")
    assert len(labels) == 30
    assert all(lab.choice == "A" and (lab.rating_a, lab.rating_b) == (6, 2) for lab in labels)


def test_double_submit_with_the_same_key_stores_one_label(store):
    _people(store, "ana")
    _items(store, 1)
    pair = st.next_item(store, "ana")
    first = _label(store, "ana", pair, key="k-1")
    assert _label(store, "ana", pair, key="k-1") == first
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(st.Label)) == 1
    with pytest.raises(st.StoreError, match="already labelled"):
        _label(store, "ana", pair, key="k-2")


def test_forged_or_foreign_item_ids_are_refused(store):
    _people(store, "ana", "bo")
    _items(store, 2)
    ana_pair = st.next_item(store, "ana")
    with pytest.raises(st.NotAssigned):
        _label(store, "bo", ana_pair)  # ana's item
    with pytest.raises(st.NotAssigned):
        st.submit_label(store, "bo", 999, "A", idempotency_key="x")  # no such item
    key = _label(store, "ana", ana_pair, key="shared")
    bo_pair = st.next_item(store, "bo")
    with pytest.raises(st.InvalidLabel, match="idempotency_key"):
        _label(store, "bo", bo_pair, key="shared")  # replaying someone else's key reveals nothing
    assert [lab.id for lab in st.labels_of(store, "ana")] == [key]


def test_annotators_see_and_undo_only_their_own_labels(store):
    _people(store, "ana", "bo")
    _items(store, 3)
    first = _label(store, "ana", st.next_item(store, "ana"))
    second = _label(store, "ana", st.next_item(store, "ana"))
    assert st.labels_of(store, "bo") == [] and st.undo_last(store, "bo") is None
    assert [lab.id for lab in st.labels_of(store, "ana")] == [first, second]
    undone_item = st.undo_last(store, "ana")
    assert [lab.id for lab in st.labels_of(store, "ana")] == [first]
    assert st.next_item(store, "ana").item_id == undone_item  # given back to relabel


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rationale": "x" * (st.MAX_RATIONALE + 1)}, "rationale"),
    ({"choice": "C"}, "choice"),
    ({"category": "poetry"}, "category"),
    ({"ratings": {"A": 8}}, "rating A"),
    ({"flags": ["rude"]}, "flags"),
])
def test_invalid_fields_are_refused_naming_the_field(store, kwargs, field):
    _people(store, "ana")
    _items(store, 1)
    pair = st.next_item(store, "ana")
    with pytest.raises(st.InvalidLabel) as err:
        _label(store, "ana", pair, **kwargs)
    assert err.value.field == field and str(err.value).startswith(field)
    assert st.labels_of(store, "ana") == []
    assert _label(store, "ana", pair, rationale="x" * st.MAX_RATIONALE, category="chat", flags=["harmful"])


def test_twenty_concurrent_annotators_store_exactly_the_acknowledged_labels(store_url):  # noqa: F811
    url = store_url
    setup = st.open_store(url)
    names = [f"a{i}" for i in range(20)]
    _people(setup, *names)
    _items(setup, 60)
    acknowledged: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def annotate(name: str) -> None:
        mine = st.open_store(url)  # its own engine and connections, as a separate page worker would have
        try:
            for _ in range(3):
                pair = st.next_item(mine, name)
                if pair is None:
                    return
                key = f"{name}-{pair.item_id}"
                ids = {st.submit_label(mine, name, pair.item_id, "tie", idempotency_key=key) for _ in range(2)}
                assert len(ids) == 1  # the retry got the same label back
                with lock:
                    acknowledged.extend(ids)
        except BaseException as err:  # noqa: BLE001 (reported below, with the thread's failure)
            failures.append(err)
        finally:
            mine.engine.dispose()

    threads = [threading.Thread(target=annotate, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    with setup.session() as s:
        stored = s.execute(select(st.Label.id, st.Label.item_id)).all()
    assert sorted(i for i, _ in stored) == sorted(acknowledged) and len(acknowledged) == 60
    assert len({item for _, item in stored}) == 60  # overlap 1: no item labelled twice
    setup.engine.dispose()


def test_annotators_cli_add_list_disable_and_one_line_errors(store_url, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", store_url)
    monkeypatch.setenv("FLYWHEEL_ANNOTATOR_PASSWORD", "s3cret")
    assert cli.main(["annotators", "add", "ana", "--admin"]) == 0
    assert cli.main(["annotators", "add", "bo"]) == 0
    assert cli.main(["annotators", "disable", "bo"]) == 0
    capsys.readouterr()
    assert cli.main(["annotators", "list"]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert rows == [["ana", "admin", "active"], ["bo", "annotator", "disabled"]]
    store = st.open_store()
    assert st.verify_login(store, "ana", "s3cret") and not st.verify_login(store, "bo", "s3cret")
    store.engine.dispose()

    for argv, words in ((["annotators", "add", "ana"], "already exists"),
                        (["annotators", "disable", "zed"], "zed")):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("FLYWHEEL_ANNOTATOR_PASSWORD", "")
    assert cli.main(["annotators", "add", "cy"]) == 1
    err = capsys.readouterr().err
    assert "password" in err and len(err.strip().splitlines()) == 1


def test_annotators_cli_names_an_unreachable_labels_database_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{tmp_path / 'no-such-dir' / 'labels.db'}")
    assert cli.main(["annotators", "list"]) == 1
    err = capsys.readouterr().err
    assert "labels database" in err and "unable to open" in err and len(err.strip().splitlines()) == 1
