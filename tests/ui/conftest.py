"""Fixtures for page tests: a real annotation page on a free loopback port, and a real headless Chromium.

The `browser` fixture and `screenshot(page, name)` live in tests/conftest.py: every service page's
browser test uses them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from ui import store as st

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
