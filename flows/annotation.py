"""`flywheel annotate`: the annotation page, started in the background like the other services.

    FLYWHEEL_ANNOTATOR_PASSWORD=... flywheel annotators add ana --admin
    flywheel annotate                          # start (or reuse) the page, print its URL
    flywheel annotate --foreground --port P    # the page process itself (what `flywheel annotate` launches)
    flywheel services status|down              # include the page

The page reads the labels database from `FLYWHEEL_LABELS_DB` (default: SQLite under the state root);
`FLYWHEEL_ANNOTATION_URL` points at a page that runs elsewhere, and then nothing is started.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from infra import services

log = logging.getLogger(__name__)


def export_summary(store=None) -> str:
    """The admin tab's Export button: labels -> preference pairs as a DVC version (flows/feedback.py).

    Imported when the button is pressed, so the page runs even where that module cannot load.
    """
    return importlib.import_module("flows.feedback").export_labels(store).markdown


def _fail(message: str) -> int:
    print(f"flywheel annotate: {' '.join(message.split())}", file=sys.stderr)
    return 1


def run_foreground(port: int) -> int:
    from ui import page
    from ui import store as labels

    try:
        services.check_port_free(port)
    except OSError as err:
        return _fail(str(err))
    try:
        store = labels.open_store()
    except SQLAlchemyError as err:
        return _fail(f"labels database: {getattr(err, 'orig', None) or err}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ui").setLevel(logging.INFO)
    page.launch(port, store, export=lambda: export_summary(store))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    if args.foreground:
        return run_foreground(args.port or services.free_port())
    from ui import store as labels

    try:
        url = services.up_annotation()
    except (RuntimeError, TimeoutError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        # The first line names the log; its last line is usually the page's own one-line error.
        return _fail(lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else ""))
    print(f"Annotation page: {url}")
    try:
        people = labels.list_annotators(labels.open_store())
    except SQLAlchemyError:
        people = None
    if not people:
        print("No annotators yet. Add one (the password comes from $FLYWHEEL_ANNOTATOR_PASSWORD or a prompt):")
    else:
        print(f"{sum(not a.disabled for a in people)} active annotators. Add more with:")
    print("  flywheel annotators add NAME [--admin]")
    print("Scripts: gradio_client.Client(URL, auth=(NAME, PASSWORD)).predict(api_name=\"/next_pair\"); "
          "stop it with: flywheel services down")
    return 0
