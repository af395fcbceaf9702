"""The annotation page clicked through in a real headless Chromium: login, guidelines, labelling with the
mouse and with the keyboard, undo, two annotators, the admin tab, HTML in items, a database outage.

Screenshots land in test-artifacts/annotation-*.png.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import screenshot
from ui import store as st

expect = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed").expect


def _people(store, *names, admins=()):
    for name in names:
        st.add_annotator(store, name, f"pw-{name}", admin=name in admins)


def _items(store, n):
    return st.add_items(store, [{"prompt": f"question {i}", "response_a": f"good {i}", "response_b": f"bad {i}"}
                                for i in range(n)])


@pytest.fixture
def open_page(browser):
    """open_page(url, name) -> a logged-in Playwright page in a context of its own (own cookies)."""
    contexts = []

    def login(url: str, name: str, shot: str | None = None):
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []  # an alert() from an injected script would land here
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.outside = []  # requests that leave loopback (fonts, analytics): none, the page works offline
        page.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                else page.outside.append(r.url))
        page.goto(url)
        page.locator("input[type=text]").fill(name)
        page.locator("input[type=password]").fill(f"pw-{name}")
        if shot:
            screenshot(page, shot)
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#status")).to_contain_text(f"Logged in as {name}.", timeout=30_000)
        return page

    yield login
    for context in contexts:
        context.close()


def _shown(page, side: str) -> str:
    return page.locator(f"#response-{side} .response").inner_text()


def _prompt(page) -> str:
    return page.locator("#prompt .turn .text").first.inner_text()


def test_annotator_reads_guidelines_labels_with_mouse_and_keyboard_and_undoes(labels_store, start_page, open_page):
    _people(labels_store, "ana")
    _items(labels_store, 3)
    page = open_page(start_page(labels_store).url, "ana", shot="annotation-login")
    expect(page.locator("#progress")).to_contain_text("0 labelled by you · 3 left in the queue")

    page.get_by_text("Guidelines (read these first)").click()
    expect(page.get_by_text("truthful and harmless outweigh helpful", exact=False)).to_be_visible()
    expect(page.get_by_text("Worked examples")).to_be_visible()
    screenshot(page, "annotation-guidelines")
    page.get_by_text("Guidelines (read these first)").click()

    # With the mouse: the good answer, ratings, category, a flag, a rationale.
    first = _prompt(page)
    good_shown_as_a = _shown(page, "a") == first.replace("question", "good")
    page.locator("#choice").get_by_text("A is better" if good_shown_as_a else "B is better").click()
    page.locator("#rating-a").get_by_text("6", exact=True).click()
    page.locator("#rating-b").get_by_text("3", exact=True).click()
    page.locator("#category input").click()
    page.get_by_role("option", name="closed QA").click()
    page.locator("#flags").get_by_text("hallucination").click()
    page.locator("#rationale textarea").fill("the good one is right")
    screenshot(page, "annotation-filled")
    page.locator("#submit-btn").click()
    expect(page.locator("#status")).to_contain_text("Saved label #")
    expect(page.locator("#progress")).to_contain_text("1 labelled by you · 2 left in the queue")
    [label] = st.labels_of(labels_store, "ana")
    assert label.item_id == int(first.split()[-1]) + 1 and label.choice == "A"  # the item's good response_a
    assert (label.category, label.flags, label.rationale) == ("closed QA", ("hallucination",), "the good one is right")
    assert (label.rating_a, label.rating_b) == ((6, 3) if good_shown_as_a else (3, 6))  # stored in the item's order
    # The form is fresh for the next item.
    second = _prompt(page)
    assert second != first
    expect(page.locator("#rationale textarea")).to_have_value("")
    expect(page.locator("#choice input:checked")).to_have_count(0)

    # With the keyboard: "2" picks B, keys typed in the rationale stay text, "s" submits.
    shown_b = _shown(page, "b")
    page.locator("#progress").click()  # focus on the page, not a text box
    page.keyboard.press("2")
    expect(page.locator("#choice input[value=B]")).to_be_checked()
    page.locator("#rationale textarea").click()
    page.keyboard.type("1 s u k")
    expect(page.locator("#choice input[value=B]")).to_be_checked()
    expect(page.locator("#rationale textarea")).to_have_value("1 s u k")
    page.locator("#progress").click()
    page.keyboard.press("s")
    expect(page.locator("#progress")).to_contain_text("2 labelled by you · 1 left in the queue")
    labels = st.labels_of(labels_store, "ana")
    assert len(labels) == 2 and labels[1].item_id == int(second.split()[-1]) + 1 and labels[1].rationale == "1 s u k"
    assert labels[1].choice == ("A" if shown_b.startswith("good") else "B")  # the item's response_a is "good"
    screenshot(page, "annotation-labelled")

    # "u" undoes the last label: it leaves the store and its item is shown again.
    page.keyboard.press("u")
    undone = labels[1].item_id
    expect(page.locator("#status")).to_contain_text(f"Removed your last label; item {undone} is shown again.")
    expect(page.locator("#prompt")).to_contain_text(second)
    assert [x.id for x in st.labels_of(labels_store, "ana")] == [label.id]
    expect(page.locator("#progress")).to_contain_text("1 labelled by you · 2 left in the queue")
    page.keyboard.press("k")  # skip it: it goes to someone else
    expect(page.locator("#status")).to_contain_text("Skipped")
    assert _prompt(page) not in (first, second)
    assert page.outside == []


def test_second_annotator_does_not_see_the_first_ones_labels_and_only_admins_see_the_admin_tab(
        labels_store, start_page, open_page):
    _people(labels_store, "ana", "bo", admins=("ana",))
    _items(labels_store, 2)
    url = start_page(labels_store).url
    ana, bo = open_page(url, "ana"), open_page(url, "bo")
    ana_item = _prompt(ana)
    assert _prompt(bo) != ana_item  # one item, one annotator at a time
    ana.locator("#progress").click()
    ana.keyboard.press("1")
    ana.keyboard.press("s")
    expect(ana.locator("#status")).to_contain_text("Saved label #")

    bo.reload()
    expect(bo.locator("#status")).to_contain_text("Logged in as bo.")
    assert _prompt(bo) != ana_item  # done (overlap 1): never offered to bo
    expect(bo.locator("#progress")).to_contain_text("0 labelled by you · 1 left in the queue")
    bo.locator("#undo-btn").click()
    expect(bo.locator("#status")).to_contain_text("Nothing to undo.")
    assert [x.item_id for x in st.labels_of(labels_store, "ana")] == [int(ana_item.split()[-1]) + 1]
    assert st.labels_of(labels_store, "bo") == []

    expect(bo.get_by_role("tab", name="Admin")).to_have_count(0)
    ana.get_by_role("tab", name="Admin").click()
    ana.locator("#admin-refresh").click()
    expect(ana.locator("#admin-report")).to_contain_text("Krippendorff")
    expect(ana.locator("#admin-report table").first).to_contain_text("remaining")
    screenshot(ana, "annotation-admin")


XSS_PROMPT = [{"role": "system", "content": "<script>window.__xss = 'prompt'; alert('prompt')</script>"},
              {"role": "user", "content": "Is <b>this</b> bold? ${value} {{value}}"}]
XSS_IMG = "<img src=x onerror=\"window.__xss = 'img'; alert('img')\">"


def test_html_and_scripts_in_items_render_as_text_and_never_run(labels_store, start_page, open_page):
    _people(labels_store, "ana")
    st.add_items(labels_store, [{"prompt": XSS_PROMPT, "response_a": XSS_IMG, "response_b": XSS_IMG + " too"}])
    page = open_page(start_page(labels_store).url, "ana")
    turns = page.locator("#prompt .turn")
    expect(turns).to_have_count(2)
    expect(turns.nth(0).locator(".role")).to_have_text("system")
    expect(turns.nth(0).locator(".text")).to_have_text(XSS_PROMPT[0]["content"])
    expect(turns.nth(1).locator(".text")).to_have_text(XSS_PROMPT[1]["content"])
    shown = {_shown(page, "a"), _shown(page, "b")}
    assert shown == {XSS_IMG, XSS_IMG + " too"}
    page.wait_for_timeout(500)  # time for an injected onerror to fire, were there an <img>
    assert page.locator("#prompt script, #prompt b, #response-a img, #response-b img").count() == 0
    assert page.evaluate("window.__xss") is None and page.dialogs == []
    # A rationale with markup is stored as typed, and the page never renders it.
    page.locator("#choice").get_by_text("Both bad").click()
    page.locator("#flags").get_by_text("harmful").click()
    page.locator("#rationale textarea").fill(XSS_IMG)
    page.locator("#submit-btn").click()
    expect(page.locator("#status")).to_contain_text("Saved label #")
    [label] = st.labels_of(labels_store, "ana")
    assert (label.choice, label.flags, label.rationale) == ("both_bad", ("harmful",), XSS_IMG)
    assert page.evaluate("window.__xss") is None and page.dialogs == []
    page.locator("#undo-btn").click()  # back to the item, for the screenshot
    expect(page.locator("#prompt .turn")).to_have_count(2)
    screenshot(page, "annotation-xss")


def test_page_says_when_the_labels_database_is_down_and_keeps_the_form(tmp_path, labels_store, start_page, open_page):
    _people(labels_store, "ana")
    _items(labels_store, 2)
    page = open_page(start_page(labels_store).url, "ana")
    page.locator("#choice").get_by_text("Tie").click()
    page.locator("#rationale textarea").fill("same answer, other words")
    shutil.move(tmp_path / "labels", tmp_path / "labels-away")
    labels_store.engine.dispose()  # the open connections die, as when a database server restarts
    page.locator("#submit-btn").click()
    expect(page.locator("#status .error")).to_have_text(
        "The labels database is not answering, so nothing was saved. Try again in a moment.")
    expect(page.locator("#rationale textarea")).to_have_value("same answer, other words")
    screenshot(page, "annotation-db-down")

    shutil.move(tmp_path / "labels-away", tmp_path / "labels")
    page.locator("#submit-btn").click()
    expect(page.locator("#status")).to_contain_text("Saved label #")
    [label] = st.labels_of(labels_store, "ana")
    assert (label.choice, label.rationale) == ("tie", "same answer, other words")
