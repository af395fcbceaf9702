"""The annotation page through its real HTTP API (gradio_client against uvicorn + Gradio on loopback),
its admin statistics against hand-computed values, and `flywheel annotate` as a background service."""

from __future__ import annotations

import math
import shutil
from datetime import datetime, timedelta

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

from flows import cli
from infra import services
from ui import admin
from ui import store as st


def _people(store, *names, admins=()):
    for name in names:
        st.add_annotator(store, name, f"pw-{name}", admin=name in admins)


def _items(store, n, **extra):
    return st.add_items(store, [{"prompt": f"question {i}", "response_a": f"good {i}", "response_b": f"bad {i}",
                                 "model_a": "v2", "model_b": "v1", **extra} for i in range(n)])


@pytest.fixture
def login():
    """login(running, name, password=None) -> a gradio_client session of that annotator, closed afterwards."""
    clients = []

    def connect(running, name, password=None) -> Client:
        clients.append(Client(running.url, auth=(name, password or f"pw-{name}"), verbose=False))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def _shown_choice(pair: dict, wanted: str) -> str:
    """The choice, as shown, that picks the response with this text (the A/B order is random)."""
    return "A" if pair["response_a"] == wanted else "B"


def _label_count(store) -> int:
    return admin.queue_status(store).labels


@pytest.fixture
def running(labels_store, start_page):
    _people(labels_store, "ana", "bo", admins=("ana",))
    return start_page(labels_store)


# ----------------------------------------------------------------------------- login, round trip


def test_page_requires_a_login_and_refuses_a_wrong_password(running, login):
    with pytest.raises(AuthenticationError, match="login"):
        Client(running.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        login(running, "ana", "wrong")
    with pytest.raises(ValueError, match="Could not login"):
        login(running, "nobody", "pw-ana")
    # Plain HTTP without the session cookie: neither the page's components nor its endpoints answer.
    assert httpx.get(f"{running.url}/config", timeout=5).status_code == 401
    assert httpx.post(f"{running.url}/gradio_api/call/next_pair", json={"data": []}, timeout=5).status_code == 401


def test_next_pair_and_submit_label_round_trip_attribute_the_label_to_the_session(running, login):
    store = running.store
    _items(store, 2)
    ana = login(running, "ana")
    pair = ana.predict(api_name="/next_pair")
    assert set(pair) == {"item_id", "prompt", "response_a", "response_b"}
    assert pair["prompt"] in ("question 0", "question 1") and "v1" not in pair.values() and "v2" not in pair.values()
    assert ana.predict(api_name="/next_pair") == pair  # a reload shows the same item
    good = pair["prompt"].replace("question", "good")
    label_id = ana.predict(item_id=pair["item_id"], choice=_shown_choice(pair, good), rating_a=6, rating_b=2,
                           category="closed QA", flags=["hallucination"], rationale="A is right",
                           idempotency_key="k-1", api_name="/submit_label")
    [label] = st.labels_of(store, "ana")
    assert label.id == label_id and label.item_id == int(pair["item_id"])
    assert label.choice == "A"  # stored in the item's order: the good answer is the item's response_a
    shown_a_is_good = pair["response_a"] == good
    assert (label.rating_a, label.rating_b) == ((6, 2) if shown_a_is_good else (2, 6))
    assert (label.category, label.flags, label.rationale) == ("closed QA", ("hallucination",), "A is right")
    assert st.labels_of(store, "bo") == []
    second = ana.predict(api_name="/next_pair")
    assert second["item_id"] not in ("", pair["item_id"])
    ana.predict(item_id=second["item_id"], choice="tie", api_name="/submit_label")
    assert ana.predict(api_name="/next_pair") == {"item_id": "", "prompt": "", "response_a": "", "response_b": ""}


def test_multi_turn_prompt_comes_back_as_messages(running, login):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "2+2?"}]
    st.add_items(running.store, [{"prompt": turns, "response_a": "4", "response_b": "5"}])
    assert login(running, "bo").predict(api_name="/next_pair")["prompt"] == turns


def test_double_submit_stores_one_label(running, login):
    _items(running.store, 1)
    ana = login(running, "ana")
    item = ana.predict(api_name="/next_pair")["item_id"]
    first = ana.predict(item_id=item, choice="A", idempotency_key="click-1", api_name="/submit_label")
    assert ana.predict(item_id=item, choice="A", idempotency_key="click-1", api_name="/submit_label") == first
    assert _label_count(running.store) == 1
    [label] = st.labels_of(running.store, "ana")
    assert label.id == first


def test_retry_without_a_key_returns_the_first_label(running, login):
    _items(running.store, 1)
    bo = login(running, "bo")
    item = bo.predict(api_name="/next_pair")["item_id"]
    first = bo.predict(item_id=item, choice="A", api_name="/submit_label")
    assert bo.predict(item_id=item, choice="A", api_name="/submit_label") == first
    assert _label_count(running.store) == 1


def test_forged_and_foreign_item_ids_are_refused(running, login):
    _items(running.store, 3)
    ana, bo = login(running, "ana"), login(running, "bo")
    mine = ana.predict(api_name="/next_pair")["item_id"]
    theirs = bo.predict(api_name="/next_pair")["item_id"]
    never_handed_out = str(({1, 2, 3} - {int(mine), int(theirs)}).pop())
    for forged, message in ((theirs, "not assigned to ana"), (never_handed_out, "not assigned to ana"),
                            ("999", "not assigned to ana"), ("1; DROP TABLE labels", "not an item assigned")):
        with pytest.raises(AppError, match=message):
            ana.predict(item_id=forged, choice="A", api_name="/submit_label")
    assert _label_count(running.store) == 0
    # Someone else's idempotency key cannot claim their label either: keys are per annotator.
    bo_label = bo.predict(item_id=theirs, choice="A", idempotency_key="shared", api_name="/submit_label")
    ana_label = ana.predict(item_id=mine, choice="A", idempotency_key="shared", api_name="/submit_label")
    assert ana_label != bo_label and _label_count(running.store) == 2


def test_second_annotator_cannot_see_or_undo_the_first_ones_labels(running, login):
    _items(running.store, 2)
    ana, bo = login(running, "ana"), login(running, "bo")
    first = ana.predict(api_name="/next_pair")
    ana.predict(item_id=first["item_id"], choice="A", api_name="/submit_label")
    assert bo.predict(api_name="/next_pair")["item_id"] not in ("", first["item_id"])  # overlap 1: it is done
    assert bo.predict(api_name="/undo_last") == ""  # bo has nothing of his own to undo
    with pytest.raises(AppError, match="not assigned to bo"):
        bo.predict(item_id=first["item_id"], choice="B", api_name="/submit_label")
    assert [x.item_id for x in st.labels_of(running.store, "ana")] == [int(first["item_id"])]
    assert st.labels_of(running.store, "bo") == []
    assert ana.predict(api_name="/undo_last") == first["item_id"]
    assert st.labels_of(running.store, "ana") == [] and ana.predict(api_name="/next_pair") == first


def test_disabled_annotator_cannot_log_in_nor_keep_labelling(running, login):
    _items(running.store, 2)
    bo = login(running, "bo")
    item = bo.predict(api_name="/next_pair")["item_id"]
    st.disable_annotator(running.store, "bo")
    with pytest.raises(ValueError, match="Could not login"):
        login(running, "bo")
    with pytest.raises(AppError, match="no longer active"):  # the session opened before is refused too
        bo.predict(item_id=item, choice="A", api_name="/submit_label")
    with pytest.raises(AppError, match="no longer active"):
        bo.predict(api_name="/next_pair")
    assert _label_count(running.store) == 0


def test_oversize_rationale_and_bad_fields_are_refused_with_a_message(running, login):
    _items(running.store, 1)
    ana = login(running, "ana")
    item = ana.predict(api_name="/next_pair")["item_id"]
    limit = st.MAX_RATIONALE
    with pytest.raises(AppError, match=f"rationale: at most {limit} characters, got {limit + 1}"):
        ana.predict(item_id=item, choice="A", rationale="x" * (limit + 1), api_name="/submit_label")
    for fields, message in (({"choice": "C"}, "choice: must be one of A, B, tie, both_bad"),
                            ({"choice": "A", "rating_a": 9}, "rating A: must be an integer from 1 to 7"),
                            ({"choice": "A", "category": "poetry"}, "category: must be one of"),
                            ({"choice": "A", "flags": ["rude"]}, "flags: must be among harmful, hallucination")):
        with pytest.raises(AppError, match=message):
            ana.predict(item_id=item, api_name="/submit_label", **fields)
    assert _label_count(running.store) == 0
    ana.predict(item_id=item, choice="A", rationale="x" * limit, api_name="/submit_label")
    assert len(st.labels_of(running.store, "ana")[0].rationale) == limit


# ----------------------------------------------------------------------------- admin


def test_non_admin_cannot_reach_admin_functions(labels_store, start_page, login):
    _people(labels_store, "ana", "bo", admins=("ana",))
    exports = []
    running = start_page(labels_store, export=lambda: exports.append(1) or "**exported 1 pair**")
    _items(labels_store, 1)
    bo = login(running, "bo")
    for endpoint in ("/admin_stats", "/admin_export"):
        with pytest.raises(AppError, match="admins only"):
            bo.predict(api_name=endpoint)
    assert exports == []
    named = bo.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(named) == {"/next_pair", "/submit_label", "/undo_last"}  # admin endpoints are not advertised
    ana = login(running, "ana")
    item = ana.predict(api_name="/next_pair")["item_id"]
    ana.predict(item_id=item, choice="tie", category="chat", api_name="/submit_label")
    stats = ana.predict(api_name="/admin_stats")
    assert "| 1 | 1 | 1 | 0 | 0 |" in stats  # items, labels, fully labelled, remaining, leased
    assert "| ana | 1 | 1 | – |" in stats and "chat 1" in stats
    assert ana.predict(api_name="/admin_export") == "**exported 1 pair**" and exports == [1]


def test_admin_export_without_an_export_says_so(running, login):
    with pytest.raises(AppError, match="not configured"):
        login(running, "ana").predict(api_name="/admin_export")


def _label_as(store, who, item_text, prefer, when=None, **kw):
    """Label the item whose prompt is `item_text` for `who`, preferring the response `prefer` ("good"/"bad")."""
    pair = st.next_item(store, who, overlap=2)
    assert pair.prompt == item_text
    wanted = item_text.replace("question", prefer)
    return st.submit_label(store, who, pair.item_id, "A" if pair.response_a == wanted else "B",
                           idempotency_key=f"{who}-{pair.item_id}", **kw)


def test_admin_statistics_match_hand_computed_values(labels_store):
    store = labels_store
    _people(store, "ana", "bo", "cy")
    _items(store, 4)
    t0 = datetime(2026, 1, 1, 9, 0)
    now = [t0]
    store.clock = lambda: now[0]
    # ana: good, good, bad at 9:00, 9:30, 10:00; bo: good, bad, bad at 9:15, 9:45, 10:15 on the same items.
    for minutes, (who, prefer) in enumerate([("ana", "good"), ("bo", "good"), ("ana", "good"), ("bo", "bad"),
                                             ("ana", "bad"), ("bo", "bad")]):
        now[0] = t0 + timedelta(minutes=15 * minutes)
        _label_as(store, who, f"question {minutes // 2}", prefer, category="closed QA" if who == "ana" else None,
                  flags=["harmful"] if prefer == "bad" and who == "bo" else ())
    st.next_item(store, "cy", overlap=2)  # cy holds the fourth item (leased 10 minutes from 10:15)
    now[0] = t0 + timedelta(minutes=80)

    q = admin.queue_status(store, overlap=2)
    assert (q.items, q.labels, q.labelled, q.remaining, q.leased) == (4, 6, 3, 1, 1)
    assert admin.queue_status(store, overlap=1).labelled == 3
    rates = {t.annotator: t for t in admin.throughput(store)}
    assert set(rates) == {"ana", "bo"}
    assert rates["ana"].labels == 3 and rates["ana"].per_hour == pytest.approx(2 / 1.0)  # 2 more in 60 min
    assert rates["ana"].last_hour == 2  # 9:30 and 10:00 are within the hour before 10:20, 9:00 is not
    assert rates["bo"].per_hour == pytest.approx(2 / 1.0) and rates["bo"].last_hour == 2  # 9:45, 10:15
    agree = admin.agreement_stats(store)
    # ana A A B, bo A B B: p_o = 2/3, p_e = (2*1 + 1*2)/9 = 4/9, kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert agree.kappa == {("ana", "bo"): (pytest.approx(0.4), 3)}
    # coincidences o_AA = o_BB = 2, o_AB = o_BA = 1: D_o = 2/6, D_e = 2*3*3/(6*5) = 0.6, alpha = 1 - (1/3)/0.6
    assert agree.alpha == pytest.approx(4 / 9) and agree.overlapping_items == 3
    dist = admin.distribution(store)
    assert dist.choices == {"A": 3, "B": 3, "tie": 0, "both_bad": 0}
    assert dist.categories == {"closed QA": 3, "(none)": 3}
    assert dist.flags == {"harmful": 2, "hallucination": 0}
    report = admin.report_markdown(store, overlap=2)
    assert "| ana · bo | 0.40 | 3 |" in report and "α (nominal): **0.44**" in report


def test_admin_statistics_of_an_empty_queue(labels_store):
    agree = admin.agreement_stats(labels_store)
    assert agree.kappa == {} and math.isnan(agree.alpha)
    assert "No labels yet." in admin.report_markdown(labels_store)


def test_progress_counts_my_labels_and_what_is_left_for_me(labels_store):
    _people(labels_store, "ana", "bo", admins=("ana",))
    _items(labels_store, 3)
    assert st.progress(labels_store, "ana") == st.Progress(labelled=0, left=3)
    pair = st.next_item(labels_store, "ana")
    st.submit_label(labels_store, "ana", pair.item_id, "A", idempotency_key="a1")
    st.skip_item(labels_store, "ana", st.next_item(labels_store, "ana").item_id)
    assert st.progress(labels_store, "ana") == st.Progress(labelled=1, left=1)
    assert st.progress(labels_store, "bo") == st.Progress(labelled=0, left=2)  # ana's label done it (overlap 1)
    assert st.progress(labels_store, "bo", overlap=2) == st.Progress(labelled=0, left=3)
    assert st.is_admin(labels_store, "ana") and not st.is_admin(labels_store, "bo")
    st.disable_annotator(labels_store, "ana")
    assert not st.is_admin(labels_store, "ana")


# ----------------------------------------------------------------------------- health, database down


def test_health_and_a_labels_database_that_goes_away(tmp_path, labels_store, start_page, login):
    _people(labels_store, "ana")
    _items(labels_store, 3)
    running = start_page(labels_store)
    ana = login(running, "ana")
    acknowledged = []
    item = ana.predict(api_name="/next_pair")["item_id"]
    acknowledged.append(ana.predict(item_id=item, choice="A", idempotency_key="k1", api_name="/submit_label"))
    item = ana.predict(api_name="/next_pair")["item_id"]

    # The database goes away: its folder is moved, and the open connections die as they would when
    # a database server restarts.
    shutil.move(tmp_path / "labels", tmp_path / "labels-away")
    labels_store.engine.dispose()
    health = httpx.get(f"{running.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "labels database unreachable"
    with pytest.raises(AppError, match="labels database is not answering, so nothing was saved"):
        ana.predict(item_id=item, choice="B", idempotency_key="k2", api_name="/submit_label")

    shutil.move(tmp_path / "labels-away", tmp_path / "labels")
    assert httpx.get(f"{running.url}/health", timeout=5).status_code == 200
    acknowledged.append(ana.predict(item_id=item, choice="B", idempotency_key="k2", api_name="/submit_label"))
    assert [x.id for x in st.labels_of(labels_store, "ana")] == acknowledged


# ----------------------------------------------------------------------------- flywheel annotate


def test_annotate_starts_the_page_in_the_background_reuses_it_and_services_stop_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{tmp_path / 'labels.db'}")
    monkeypatch.delenv("FLYWHEEL_ANNOTATION_URL", raising=False)
    monkeypatch.setenv("FLYWHEEL_ANNOTATOR_PASSWORD", "pw-ana")
    assert cli.main(["annotators", "add", "ana", "--admin"]) == 0
    try:
        assert cli.main(["annotate"]) == 0
        out = capsys.readouterr().out
        url = out.split("Annotation page: ")[1].split()[0]
        assert "1 active annotators" in out and "flywheel annotators add NAME" in out
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        client = Client(url, auth=("ana", "pw-ana"), verbose=False)
        assert client.predict(api_name="/next_pair")["item_id"] == ""
        client.close()
        assert cli.main(["annotate"]) == 0  # reused, not a second page
        assert capsys.readouterr().out.split("Annotation page: ")[1].split()[0] == url
        assert services.status()["annotation"]["healthy"]
    finally:
        assert cli.main(["services", "down"]) == 0
    assert "annotation" in capsys.readouterr().out
    assert not services.status()["annotation"]["alive"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_annotate_in_the_foreground_fails_with_one_line(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind((services.HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["annotate", "--foreground", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port}" in err and "in use" in err
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{tmp_path / 'missing' / 'dir' / 'labels.db'}")
    assert cli.main(["annotate", "--foreground", "--port", str(services.free_port())]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flywheel annotate: labels database:")


def test_a_failing_export_tells_the_admin_why(labels_store, start_page, login):
    _people(labels_store, "ana", admins=("ana",))

    def broken_export() -> str:
        raise RuntimeError("no labels to export yet")

    running = start_page(labels_store, export=broken_export)
    with pytest.raises(AppError, match="Export failed: no labels to export yet"):
        login(running, "ana").predict(api_name="/admin_export")
