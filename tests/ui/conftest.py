"""Fixtures for page tests: a real annotation page on a free loopback port, and a real headless Chromium.

`browser` (session-wide) and `screenshot(page, name)` serve every browser test of a service page
(the annotation page, Prefect, MLflow): Debian's /usr/bin/chromium driven by Playwright, since no
browser can be downloaded here. Without chromium or playwright those tests skip and say why.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from infra.settings import REPO_ROOT
from ui import store as st

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO_ROOT / "test-artifacts"  # gitignored; CI keeps it


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as test-artifacts/<name>.png (look at it) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium for the whole session (about 1 s to start); each test opens its own context."""
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
                                      headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def labels_store(tmp_path) -> Iterator[st.Store]:
    """A fresh annotation store on a SQLite WAL file of this test's own."""
    # In a folder of its own: a test takes the database away by moving the folder.
    (tmp_path / "labels").mkdir()
    s = st.open_store(f"sqlite:///{tmp_path / 'labels' / 'labels.db'}")
    yield s
    s.engine.dispose()


@dataclass
class RunningPage:
    url: str
    store: st.Store


@pytest.fixture
def start_page() -> Iterator[Callable[..., RunningPage]]:
    """start_page(store, **build_app kwargs) -> RunningPage: the real page (uvicorn + Gradio) in a thread
    of this process on a free port, stopped when the test ends."""
    import uvicorn

    from infra.services import free_port
    from ui import page

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(store: st.Store, **kwargs) -> RunningPage:
        port = free_port()
        # A short graceful shutdown: browsers and clients hold streaming connections open.
        server = uvicorn.Server(uvicorn.Config(page.web_app(store, **kwargs), host=page.HOST, port=port,
                                               log_level="warning", timeout_graceful_shutdown=1))
        thread = threading.Thread(target=server.run, name=f"annotation-page-{port}", daemon=True)
        thread.start()
        servers.append((server, thread))
        url = f"http://{page.HOST}:{port}"
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"annotation page did not start on {url}")
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        return RunningPage(url, store)

    yield start
    for server, thread in servers:
        server.should_exit = True
    for server, thread in servers:
        thread.join(timeout=15)
        assert not thread.is_alive(), f"annotation page thread {thread.name} did not stop"
