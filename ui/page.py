"""The annotation page: people compare two answers and their labels feed the next alignment round.

    flywheel annotate                                   # in the background; prints the URL
    python -c "from ui import page; page.launch(7860)"  # in this process, on 127.0.0.1:7860

A Gradio Blocks page behind a login checked against the store (`verify_login`), mounted in a
FastAPI app that also answers `GET /health` (200 while the labels database answers, else 503).
Whoever is logged in is `request.username` of the Gradio session: no handler takes the annotator
from a form field. The page shows a label as saved only after the store committed it.

API for scripts (the logged-in annotator only; see the README):

    /next_pair    -> {"item_id": "7", "prompt": ..., "response_a": ..., "response_b": ...}  ("" when done)
    /submit_label (item_id, choice, rating_a, rating_b, category, flags, rationale, idempotency_key) -> label id
    /undo_last    -> the item_id whose label was removed ("" when there was none)

Prompts and answers are escaped and rendered as text: HTML in them never reaches the DOM as markup.
"""

# No `from __future__ import annotations` here: gr.api reads the endpoint functions' return
# annotations as objects (a string "dict" would give the API a wrong schema).

import html
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from infra.settings import load_settings
from ui import admin
from ui import store as st

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # where local clients reach the page; it listens on FLYWHEEL_BIND_HOST (loopback by default)
GUIDELINES = Path(__file__).with_name("guidelines.md")
CHOICE_LABELS = [("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both bad", "both_bad")]
RATINGS = [str(r) for r in range(st.RATING_RANGE[0], st.RATING_RANGE[1] + 1)]
# Keys the page itself makes are "<annotator>/<key>": nobody can take, or collide with, another's keys.
MAX_CLIENT_KEY = st.MAX_KEY - st.MAX_NAME - 1
DB_DOWN = "The labels database is not answering, so nothing was saved. Try again in a moment."
DB_DOWN_READING = "The labels database is not answering. Try again in a moment."
CONCURRENCY = 16  # events handled at once: store calls are short, and Gradio's default of 1 queues everyone

CSS = """
.conversation, .response { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 1rem; line-height: 1.5; }
.turn { margin: 0 0 .6rem 0; padding: .5rem .75rem; border-radius: .5rem;
        background: var(--background-fill-secondary); }
.turn .role { font-size: .75rem; font-weight: 600; text-transform: uppercase; opacity: .7; }
.turn-assistant { margin-left: 2rem; }
.response { padding: .75rem; border: 1px solid var(--border-color-primary); border-radius: .5rem; min-height: 4rem; }
.side-title { font-weight: 700; font-size: 1.1rem; margin-bottom: .3rem; }
#status .error { color: var(--error-text-color, #b91c1c); font-weight: 600; }
"""

# Gradio has no hotkey API: a script clicks the page's own buttons and radio inputs. Keys typed into
# text fields (rationale, the category filter) stay text; Enter on a focused button is that button's.
HOTKEYS = """
<script>
(() => {
  const choices = {"1": "A", "a": "A", "2": "B", "b": "B", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad"};
  const buttons = {"s": "submit-btn", "Enter": "submit-btn", "k": "skip-btn", "u": "undo-btn"};
  const typing = (el) => el && (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT" ||
    (el.tagName === "INPUT" && !["radio", "checkbox", "button", "submit"].includes(el.type)));
  const shown = (el) => el && el.offsetParent !== null;
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    if (e.key === "Enter" && e.target.closest && e.target.closest("button")) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    let target = null;
    if (choices[key]) target = document.querySelector(`#choice input[value="${choices[key]}"]`);
    else if (buttons[key]) target = document.getElementById(buttons[key]);
    if (shown(target)) { e.preventDefault(); target.click(); }
  });
})();
</script>
"""


# ----------------------------------------------------------------------------- rendering


def _text(s: str) -> str:
    return html.escape(s, quote=True)


def prompt_html(prompt: Any) -> str:
    """A plain prompt, or a conversation (a list of {role, content}) as one block per turn; all text escaped."""
    turns = [("user", prompt)] if isinstance(prompt, str) else [(m["role"], m["content"]) for m in prompt]
    blocks = []
    for role, content in turns:
        kind = role if role in ("user", "assistant", "system") else "other"
        blocks.append(f"<div class='turn turn-{kind}'><div class='role'>{_text(role)}</div>"
                      f"<div class='text'>{_text(content)}</div></div>")
    return f"<div class='conversation'>{''.join(blocks)}</div>"


def response_html(side: str, text: str) -> str:
    return f"<div class='side-title'>{side}</div><div class='response'>{_text(text)}</div>"


def _status(message: str, error: bool = False) -> str:
    # Messages may quote what the annotator typed (e.g. a bad category): escaped like everything else.
    return f"<div class='{'error' if error else 'ok'}'>{_text(message)}</div>"


def _refusal(err: Exception, writing: bool = True) -> str:
    """What the annotator reads when the store refuses or cannot be reached (`writing`: while saving)."""
    if isinstance(err, st.UnknownAnnotator):
        return "Your login is no longer active; ask an admin."
    if isinstance(err, st.StoreError):
        return str(err)
    log.warning("labels database: %s", " ".join(str(getattr(err, "orig", None) or err).split()))
    return DB_DOWN if writing else DB_DOWN_READING


def _refused(message: str) -> gr.Error:
    # A refusal is an answer, not a server fault: no traceback in the page's log (DB trouble is logged above).
    return gr.Error(message, print_exception=False)


def _item_id(value: Any) -> int:
    """The item id from the page or an API call: a forged value is refused like a foreign item."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise st.NotAssigned(f"item_id: {str(value)[:40]!r} is not an item assigned to you") from None


def _rating(value: Any, side: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise st.InvalidLabel(f"rating {side}", f"must be an integer from 1 to 7, got {value!r}") from None


# ----------------------------------------------------------------------------- the app


def build_app(store: st.Store, *, export: Callable[[], str] | None = None, lease_s: float = 600,
              overlap: int = 1) -> gr.Blocks:
    """The page's Blocks. `export` runs the labels export and returns a markdown summary (admin tab);
    `lease_s` is how long an item stays with the annotator it was handed to; `overlap` the labels an item
    wants unless it sets its own."""

    def user(request: gr.Request) -> str:
        if not request or not request.username:  # only reachable if the app was mounted without auth
            raise st.UnknownAnnotator("not logged in")
        return request.username

    def progress_md(name: str) -> str:
        p = st.progress(store, name, overlap)
        return f"**{p.labelled}** labelled by you · **{p.left}** left in the queue"

    def shown(name: str, message: str = "", error: bool = False) -> tuple:
        """Every output of a navigation event: the annotator's next item and a fresh form."""
        pair = st.next_item(store, name, lease_s=lease_s, overlap=overlap)
        if pair is None:
            prompt, a, b, item = "<p>Nothing left for you in the queue. Thank you!</p>", "", "", ""
        else:
            prompt, a, b, item = (prompt_html(pair.prompt), response_html("A", pair.response_a),
                                  response_html("B", pair.response_b), str(pair.item_id))
        return (_status(message, error), progress_md(name), prompt, a, b, item, uuid.uuid4().hex,
                None, None, None, None, [], "")

    def unchanged(message: str) -> tuple:
        # A refused submit keeps the form as it is (the rationale typed is not lost) and says why.
        return (_status(message, error=True), *[gr.skip()] * (len(form) - 1))

    def then_next(name: str, done: str) -> tuple:
        """After a committed change: the next item, or, if it cannot be loaded, what was done and why not.
        A resubmit of the form left on screen is harmless: it carries the same idempotency key."""
        try:
            return shown(name, done)
        except (st.StoreError, SQLAlchemyError) as err:
            return unchanged(f"{done} {_refusal(err, writing=False)}")

    def on_load(request: gr.Request):
        name = user(request)
        try:
            out = shown(name, f"Logged in as {name}.")
            is_admin = st.is_admin(store, name)
        except (st.StoreError, SQLAlchemyError) as err:
            return (*unchanged(_refusal(err, writing=False)), gr.Tab(visible=False))
        return (*out, gr.Tab(visible=is_admin))

    def on_submit(item, key, choice, rating_a, rating_b, category, flags, rationale, request: gr.Request):
        name = user(request)
        if not item:
            return unchanged("Nothing to label right now.")
        if not choice:
            return unchanged("Pick A, B, tie or both bad first (keys 1-4).")
        try:
            label_id = st.submit_label(store, name, _item_id(item), choice, idempotency_key=f"{name}/{key}",
                                       ratings={"A": _rating(rating_a, "A"), "B": _rating(rating_b, "B")},
                                       category=category or None, flags=flags or (), rationale=rationale or "")
        except (st.StoreError, SQLAlchemyError) as err:
            return unchanged(_refusal(err))
        return then_next(name, f"Saved label #{label_id}.")  # acknowledged only now, after the commit

    def on_skip(item, request: gr.Request):
        name = user(request)
        try:
            if item:
                st.skip_item(store, name, _item_id(item))
        except (st.StoreError, SQLAlchemyError) as err:
            return unchanged(_refusal(err))
        return then_next(name, "Skipped; that item goes to someone else.")

    def on_undo(request: gr.Request):
        name = user(request)
        try:
            undone = st.undo_last(store, name, lease_s=lease_s)
        except (st.StoreError, SQLAlchemyError) as err:
            return unchanged(_refusal(err))
        return then_next(name, "Nothing to undo." if undone is None else
                         f"Removed your last label; item {undone} is shown again.")

    def admin_only(request: gr.Request) -> str:
        name = user(request)
        if not st.is_admin(store, name):
            raise _refused("The admin tab is for admins only.")
        return name

    def admin_stats(request: gr.Request) -> str:
        """Queue status, throughput, agreement and label distribution (markdown); admins only."""
        try:
            admin_only(request)
            return admin.report_markdown(store, overlap)
        except SQLAlchemyError as err:
            raise _refused(_refusal(err, writing=False)) from None

    def admin_export(request: gr.Request) -> str:
        """Run the labels export; its markdown summary. Admins only."""
        try:
            admin_only(request)
        except SQLAlchemyError as err:
            raise _refused(_refusal(err, writing=False)) from None
        if export is None:
            raise _refused("Export is not configured on this page.")
        try:
            return export()
        except Exception as err:  # whatever the export hits (no labels, DVC, MLflow), the admin reads it
            log.exception("export failed")
            raise _refused(f"Export failed: {' '.join(str(err).split())[:500]}") from None

    def next_pair(request: gr.Request) -> dict:
        """The logged-in annotator's item: {item_id, prompt, response_a, response_b}; item_id "" when none is left."""
        try:
            pair = st.next_item(store, user(request), lease_s=lease_s, overlap=overlap)
        except (st.StoreError, SQLAlchemyError) as err:
            raise _refused(_refusal(err, writing=False)) from None
        if pair is None:
            return {"item_id": "", "prompt": "", "response_a": "", "response_b": ""}
        return {"item_id": str(pair.item_id), "prompt": pair.prompt, "response_a": pair.response_a,
                "response_b": pair.response_b}

    def submit_label(item_id: str, choice: str, rating_a: int | None = None, rating_b: int | None = None,
                     category: str | None = None, flags: list[str] | None = None, rationale: str = "",
                     idempotency_key: str = "", request: gr.Request = None) -> int:
        """Store the logged-in annotator's label on an item handed to them; returns the label id.

        choice: A, B, tie or both_bad, as shown (A = response_a of /next_pair). A repeated call with the
        same idempotency_key (default: one per item) stores nothing new and returns the same id.
        """
        name = user(request)
        key = idempotency_key or f"item-{item_id}"
        try:
            if len(key) > MAX_CLIENT_KEY:
                raise st.InvalidLabel("idempotency_key", f"at most {MAX_CLIENT_KEY} characters")
            return st.submit_label(store, name, _item_id(item_id), choice, idempotency_key=f"{name}/{key}",
                                   ratings={"A": _rating(rating_a, "A"), "B": _rating(rating_b, "B")},
                                   category=category or None, flags=flags or (), rationale=rationale or "")
        except (st.StoreError, SQLAlchemyError) as err:
            raise _refused(_refusal(err)) from None

    def undo_last(request: gr.Request) -> str:
        """Remove the logged-in annotator's most recent label (never anyone else's) and hand its item back to
        them; returns that item_id, or "" when there is nothing to undo."""
        try:
            undone = st.undo_last(store, user(request), lease_s=lease_s)
        except (st.StoreError, SQLAlchemyError) as err:
            raise _refused(_refusal(err)) from None
        return "" if undone is None else str(undone)

    with gr.Blocks(title="Flywheel · compare answers") as blocks:
        with gr.Row():
            gr.Markdown("## Which answer is better?")
            progress = gr.Markdown(elem_id="progress")
        with gr.Tabs():
            with gr.Tab("Label", id="label"):
                with gr.Accordion("Guidelines (read these first)", open=False, elem_id="guidelines"):
                    gr.Markdown(GUIDELINES.read_text())
                status = gr.HTML(elem_id="status", js_on_load=None)
                prompt = gr.HTML(elem_id="prompt", js_on_load=None)
                with gr.Row(equal_height=True):
                    with gr.Column():
                        response_a = gr.HTML(elem_id="response-a", js_on_load=None)
                        rating_a = gr.Radio(RATINGS, label="Rating of A (1 = unusable, 7 = excellent; optional)",
                                            elem_id="rating-a")
                    with gr.Column():
                        response_b = gr.HTML(elem_id="response-b", js_on_load=None)
                        rating_b = gr.Radio(RATINGS, label="Rating of B (1 = unusable, 7 = excellent; optional)",
                                            elem_id="rating-b")
                choice = gr.Radio(CHOICE_LABELS, label="Your choice (keys 1 2 3 4)", elem_id="choice")
                with gr.Row():
                    category = gr.Dropdown(list(st.CATEGORIES), label="Category of the prompt (optional)",
                                           elem_id="category")
                    flags = gr.CheckboxGroup(list(st.FLAGS), label="Flags", elem_id="flags")
                rationale = gr.Textbox(label=f"Rationale (optional, at most {st.MAX_RATIONALE} characters)",
                                       lines=2, elem_id="rationale")
                with gr.Row():
                    submit = gr.Button("Submit (s)", variant="primary", elem_id="submit-btn")
                    skip = gr.Button("Skip (k)", elem_id="skip-btn")
                    undo = gr.Button("Undo last label (u)", elem_id="undo-btn")
                item, key = gr.State(""), gr.State("")
            with gr.Tab("Admin", id="admin", visible=False, elem_id="admin-tab") as admin_tab:
                refresh = gr.Button("Refresh", elem_id="admin-refresh")
                report = gr.Markdown(elem_id="admin-report")
                export_btn = gr.Button("Export labels", variant="primary", elem_id="admin-export",
                                       interactive=export is not None)
                export_out = gr.Markdown(elem_id="admin-export-result")

        form = [status, progress, prompt, response_a, response_b, item, key,
                choice, rating_a, rating_b, category, flags, rationale]
        private = {"api_visibility": "private"}
        blocks.load(on_load, outputs=[*form, admin_tab], **private)
        submit.click(on_submit, inputs=[item, key, choice, rating_a, rating_b, category, flags, rationale],
                     outputs=form, **private)
        skip.click(on_skip, inputs=[item], outputs=form, **private)
        undo.click(on_undo, outputs=form, **private)
        # Undocumented, not private: callable (and refused to non-admins) so tests can prove the refusal.
        refresh.click(admin_stats, outputs=report, api_name="admin_stats", api_visibility="undocumented")
        export_btn.click(admin_export, outputs=export_out, api_name="admin_export", api_visibility="undocumented")
        gr.api(next_pair, api_name="next_pair")
        gr.api(submit_label, api_name="submit_label")
        gr.api(undo_last, api_name="undo_last")
    blocks.queue(default_concurrency_limit=CONCURRENCY)
    return blocks


def web_app(store: st.Store, **kwargs: Any) -> FastAPI:
    """The page under `/` behind the store's login, and `GET /health`. `kwargs` go to `build_app`."""
    app = FastAPI(title="flywheel annotation page", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health():
        try:
            with store.engine.connect() as conn:
                conn.execute(select(func.count()).select_from(st.Annotator))
        except SQLAlchemyError as err:
            reason = " ".join(str(getattr(err, "orig", None) or err).split())
            return JSONResponse({"status": "labels database unreachable", "error": reason}, status_code=503)
        return {"status": "ok"}

    def login(name: str, password: str) -> bool:
        try:
            return st.verify_login(store, name, password)
        except SQLAlchemyError as err:
            log.warning("login of %r: labels database: %s", name, err)
            return False

    return gr.mount_gradio_app(
        app, build_app(store, **kwargs), path="/", auth=login,
        auth_message="Log in with the name and password an admin gave you (flywheel annotators add NAME).",
        ssr_mode=False, footer_links=["api", "settings"], css=CSS, head=HOTKEYS, server_name=load_settings().bind_host)


def launch(port: int, store: st.Store | None = None, **kwargs: Any) -> None:
    """Serve the page on 127.0.0.1:`port` until SIGTERM/SIGINT. The store defaults to `FLYWHEEL_LABELS_DB`
    (or SQLite under the state root); `kwargs` go to `build_app` (export, lease_s, overlap)."""
    import uvicorn

    store = store or st.open_store()
    host = load_settings().bind_host
    log.info("annotation page on http://%s:%s (labels: %s)", host, port, store.engine.url.render_as_string())
    uvicorn.run(web_app(store, **kwargs), host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
