"""Fifty annotators at once through the page's API, and the page crashes and restarts in the middle.

The page runs as its own process on 127.0.0.1 (`ui.page.launch`), on SQLite and on a real PostgreSQL.
Each annotator is a `gradio_client.Client` in a thread of its own, labelling in a loop; when about a
third of the labels are acknowledged the page is killed (SIGKILL: requests in flight die with it) and
started again on the same port. Clients log in again and retry with the same idempotency key. What
must hold: the labels stored are exactly the submissions acknowledged, each once, and no item (overlap
1) has two labels.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from benchmarks.annotation import Annotator, PageProcess, Tally, run_annotators, seed_store
from tests.ui.pg import postgres_server, store_url  # noqa: F401 (fixtures)
from ui import store as st

ANNOTATORS = 50
LABELS_EACH = 3
RESTART_AFTER = ANNOTATORS * LABELS_EACH // 3  # acknowledged labels before the crash


@pytest.mark.slow
def test_fifty_annotators_through_a_page_restart_store_exactly_the_acknowledged_labels(store_url, tmp_path):  # noqa: F811
    people = seed_store(store_url, ANNOTATORS, ANNOTATORS * LABELS_EACH)
    page = PageProcess(store_url, tmp_path / "page.log")
    page.start()
    tally = Tally()
    restarted, finished = threading.Event(), threading.Event()
    acknowledged_at_crash: list[int] = []

    def crash_and_restart() -> None:
        while len(tally.acknowledged) < RESTART_AFTER:
            if finished.is_set():
                return
            time.sleep(0.02)
        acknowledged_at_crash.append(len(tally.acknowledged))
        page.stop(crash=True)
        page.start()
        restarted.set()

    restarter = threading.Thread(target=crash_and_restart, daemon=True)
    annotators = [Annotator(page.url, name, password) for name, password in people]
    try:
        restarter.start()
        run_annotators(annotators, LABELS_EACH, tally)
    finally:
        finished.set()
        restarter.join(timeout=120)
        page.stop()
    assert tally.failures == []
    assert restarted.is_set(), "the page was never restarted"
    # The crash hit the run in its middle, and clients really had to recover from it.
    assert acknowledged_at_crash[0] < len(tally.acknowledged)
    assert sum(a.retries for a in annotators) > 0

    acknowledged = sorted(label_id for _, _, label_id in tally.acknowledged)
    assert len(acknowledged) == ANNOTATORS * LABELS_EACH  # everyone got all their work done
    assert len(set(acknowledged)) == len(acknowledged)  # no two submissions share a label
    store = st.open_store(store_url)
    try:
        with store.session() as s:
            rows = s.execute(select(st.Label.id, st.Label.item_id, st.Annotator.name)
                             .join(st.Annotator, st.Label.annotator_id == st.Annotator.id)).all()
    finally:
        store.engine.dispose()
    assert sorted(label_id for label_id, _, _ in rows) == acknowledged  # stored = acknowledged, nothing more
    assert len({item for _, item, _ in rows}) == len(rows)  # overlap 1: no item labelled twice
    stored = {(name, str(item), label_id) for label_id, item, name in rows}
    assert stored == set(tally.acknowledged)  # each label is the one its annotator was told about
