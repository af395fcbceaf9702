"""Annotation page under load: submit latency and labels/s with 1, 10 and 50 concurrent annotators.

    .venv/bin/python benchmarks/annotation.py --think-s 0 5          # SQLite and PostgreSQL, 1 10 50 annotators
    .venv/bin/python benchmarks/annotation.py --concurrency 50 --labels 10 --clients http gradio_client

The real page (`ui.page.launch` in its own process on 127.0.0.1); each annotator logs in and loops the
way a script would: `/next_pair`, then `/submit_label`, back to back (`--think-s 0`: the page
saturated) or after a pause like a person reading two answers (`--think-s 5`). Annotators call
Gradio's HTTP API directly by default (`--clients http`; `gradio_client` itself costs ~55 ms of CPU
per call here, see `Annotator`). Reported per backend, concurrency and pause: submit latency p50/p95
(one call, from the client's side: Gradio's queue, the store's transaction, the HTTP round trip;
target p95 < 200 ms at 50), next_pair p50/p95, labels/s over the labelling phase, and annotators
refused by the page. Logins and each annotator's first call happen before the clock starts. Both
databases keep their durability defaults: SQLite WAL (synchronous FULL) and PostgreSQL (a throw-away
server from infra/postgres.py, fsync on).

The page process and the annotator client (retries with the same idempotency key after a failure)
are also what tests/ui/test_load.py drives through a restart of the page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.services import HOST, free_port, tail  # noqa: E402
from infra.settings import OFFLINE_ENV  # noqa: E402

PAGE_START_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 120.0  # how long an annotator keeps retrying one call while the page is away


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no samples."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------- the page, as a process


class PageProcess:
    """`ui.page.launch(port)` in a process of its own, on a fixed port so a restart keeps the URL.

    (`flywheel annotate --foreground` would do the same, but refuses a port that still has
    TIME_WAIT connections from before the restart; uvicorn itself binds with SO_REUSEADDR.)
    """

    def __init__(self, labels_db: str, log_path: Path, port: int | None = None):
        self.labels_db, self.log_path = labels_db, Path(log_path)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = PAGE_START_TIMEOUT_S) -> None:
        env = {**os.environ, **OFFLINE_ENV, "FLYWHEEL_LABELS_DB": self.labels_db}
        cmd = [sys.executable, "-c", f"from ui import page; page.launch({self.port})"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"annotation page exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   f"{tail(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"annotation page not healthy at {self.url} after {timeout:.0f} s; see {self.log_path}")

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (uvicorn finishes what is in flight), or SIGKILL with `crash`: a page that dies mid-request."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None


# ----------------------------------------------------------------------------- one annotator


class Refused(Exception):
    """The page answered the call with an error (a `gr.Error`: a refusal, not a failure): never retried."""


@dataclass
class Annotator:
    """A script labelling through the page's API. A failed call (the page restarting, a dropped
    connection, a login the restarted page no longer knows) is retried with a fresh login and, for a
    submit, the SAME idempotency key, so a label the page stored but never acknowledged is not stored
    twice.

    `transport`: "gradio_client" (the documented `Client(url, auth=...)`), or "http": the same Gradio
    endpoints (`POST /gradio_api/call/<name>`, then its event stream) over one keep-alive httpx
    connection. gradio_client spends ~55 ms of CPU per call on this machine, so fifty of them in one
    process measure the client, not the page; "http" is what the benchmark uses by default.
    """
    url: str
    name: str
    password: str
    transport: str = "gradio_client"
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    _session: object | None = None

    def login(self) -> None:
        if self.transport == "gradio_client":
            from gradio_client import Client

            self._session = Client(self.url, auth=(self.name, self.password), verbose=False, download_files=False,
                                   analytics_enabled=False, httpx_kwargs={"timeout": 60})
            return
        http = httpx.Client(base_url=self.url, timeout=60)
        r = http.post("/login", data={"username": self.name, "password": self.password})
        if r.status_code != 200:
            http.close()
            raise ConnectionError(f"login of {self.name} at {self.url}: HTTP {r.status_code}")
        self._session = http

    def _predict(self, args: tuple, api_name: str):
        if self._session is None:
            self.login()
        if self.transport == "gradio_client":
            from gradio_client.exceptions import AppError

            try:
                return self._session.predict(*args, api_name=api_name)
            except AppError as err:
                raise Refused(str(err)) from None
        http: httpx.Client = self._session
        r = http.post(f"/gradio_api/call{api_name}", json={"data": list(args)})
        r.raise_for_status()
        with http.stream("GET", f"/gradio_api/call{api_name}/{r.json()['event_id']}") as events:
            events.raise_for_status()
            kind = None
            for line in events.iter_lines():
                if line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    data = json.loads(line.removeprefix("data:"))
                    if kind == "error":
                        raise Refused(str(data))
                    return data[0]
        raise ConnectionError(f"{api_name}: the event stream ended without a result")

    def call(self, *args, api_name: str):
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            try:
                return self._predict(args, api_name)
            except Refused:
                raise
            except Exception as err:  # noqa: BLE001 (whatever a dying server looks like from here: retry)
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                self.errors.append(f"{api_name}: {type(err).__name__}")
                self.close()  # the restarted page has forgotten our login
                time.sleep(0.3)

    def close(self) -> None:
        if isinstance(self._session, httpx.Client):
            self._session.close()
        self._session = None

    def next_pair(self) -> dict:
        return self.call(api_name="/next_pair")

    def submit(self, item_id: str, choice: str, key: str) -> int:
        return int(self.call(item_id, choice, None, None, None, [], "", key, api_name="/submit_label"))


@dataclass
class Tally:
    """What every annotator saw, shared across their threads."""
    acknowledged: list[tuple[str, str, int]] = field(default_factory=list)  # (annotator, item_id, label id)
    submit_s: list[float] = field(default_factory=list)
    next_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def label_until_done(who: Annotator, tally: Tally, limit: int, think_s: float = 0.0,
                     choices: tuple[str, ...] = ("A", "B", "tie")) -> None:
    """Label up to `limit` items (fewer if the queue runs dry), recording acknowledgements and latencies.

    `think_s`: mean pause before each label (uniform in 0.5-1.5x): a person reading two answers.
    """
    rng = random.Random(who.name)
    for n in range(limit):
        if think_s:
            time.sleep(think_s * rng.uniform(0.5, 1.5))
        t0 = time.perf_counter()
        pair = who.next_pair()
        t1 = time.perf_counter()
        if not pair["item_id"]:
            return
        key = uuid.uuid4().hex  # one per submission, kept across its retries
        label_id = who.submit(pair["item_id"], choices[n % len(choices)], key)
        t2 = time.perf_counter()
        with tally.lock:
            tally.acknowledged.append((who.name, pair["item_id"], label_id))
            tally.next_s.append(t1 - t0)
            tally.submit_s.append(t2 - t1)


def run_annotators(annotators: list[Annotator], limit: int, tally: Tally, think_s: float = 0.0) -> float:
    """Everyone at once, one thread each; returns the wall time of the labelling phase (logins excluded)."""
    for who in annotators:
        # Before the clock starts: the login, and a first call (it leases the item the annotator then
        # labels first; a page's first events pay one-time costs worth ~0.5 s).
        who.login()
        who.next_pair()
    start = threading.Barrier(len(annotators) + 1)

    def work(who: Annotator) -> None:
        start.wait()
        try:
            label_until_done(who, tally, limit, think_s)
        except BaseException as err:  # noqa: BLE001 (reported by the caller)
            with tally.lock:
                tally.failures.append(f"{who.name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(who,), daemon=True) for who in annotators]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for who in annotators:
        who.close()
    return seconds


def seed_store(labels_db: str, n_annotators: int, n_items: int) -> list[tuple[str, str]]:
    """Annotators (name, password) and items in a fresh labels database."""
    from ui import store as st

    store = st.open_store(labels_db)
    try:
        people = [(f"annotator{i:02d}", f"pw-{uuid.uuid4().hex[:12]}") for i in range(n_annotators)]
        for name, password in people:
            st.add_annotator(store, name, password)
        st.add_items(store, [{"prompt": f"Question {i}: which answer is better?", "response_a": f"first answer {i}",
                              "response_b": f"second answer {i}", "source": "benchmark"} for i in range(n_items)])
    finally:
        store.engine.dispose()
    return people


# ----------------------------------------------------------------------------- the benchmark


def measure(backend: str, labels_db: Callable[[str], str], concurrency: int, labels_each: int, transport: str,
            think_s: float, log_dir: Path) -> dict:
    run = f"{backend}_{concurrency}_{transport}_{int(think_s * 1000)}"
    db = labels_db(f"bench_{run}")
    people = seed_store(db, concurrency, concurrency * labels_each)
    page = PageProcess(db, log_dir / f"page-{run}.log")
    page.start()
    try:
        annotators = [Annotator(page.url, name, password, transport) for name, password in people]
        tally = Tally()
        seconds = run_annotators(annotators, labels_each, tally, think_s)
    finally:
        page.stop()
    n = len(tally.acknowledged)
    row = {"backend": backend, "concurrency": concurrency, "client": transport, "think_s": think_s, "labels": n, "seconds": round(seconds, 3),
           "labels_per_s": round(n / seconds, 2),
           "submit_p50_ms": round(1000 * percentile(tally.submit_s, 50), 1),
           "submit_p95_ms": round(1000 * percentile(tally.submit_s, 95), 1),
           "next_pair_p50_ms": round(1000 * percentile(tally.next_s, 50), 1),
           "next_pair_p95_ms": round(1000 * percentile(tally.next_s, 95), 1),
           "retries": sum(a.retries for a in annotators),
           # An annotator stops at its first refusal (e.g. "the labels database is not answering").
           "failed_annotators": len(tally.failures), "first_failure": tally.failures[0] if tally.failures else None}
    print(f"{backend:10s} x{concurrency:<3d} {transport:13s} think {think_s:3.1f} s {row['labels_per_s']:7.1f} labels/s   submit p50 {row['submit_p50_ms']:6.1f} ms"
          f"  p95 {row['submit_p95_ms']:6.1f} ms   next_pair p50 {row['next_pair_p50_ms']:6.1f} ms"
          f"  p95 {row['next_pair_p95_ms']:6.1f} ms   failed annotators {len(tally.failures)}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine, markdown_table, write_results
    from infra import postgres

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--labels", type=int, default=10, help="labels per annotator")
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    p.add_argument("--think-s", type=float, nargs="+", default=[0.0],
                   help="mean pause before each label; 0: every annotator calls back to back (saturation)")
    p.add_argument("--clients", nargs="+", default=["http"], choices=["http", "gradio_client"],
                   help="how annotators call the page (see Annotator)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-annotation-") as tmp:
        root = Path(tmp)
        rows, server = [], None
        try:
            for backend in args.backends:
                if backend == "sqlite":
                    def labels_db(name: str) -> str:
                        return f"sqlite:///{root / name}.db"
                else:
                    server = server or postgres.start(root / "postgres", durable=True)
                    labels_db = server.new_database
                for transport in args.clients:
                    for think_s in args.think_s:
                        for c in args.concurrency:
                            rows.append(measure(backend, labels_db, c, args.labels, transport, think_s, root))
        finally:
            if server is not None:
                server.stop()
    write_results("annotation", {"machine": machine(), "args": vars(args), "runs": rows})
    print(markdown_table(["backend", "client", "think s", "annotators", "labels/s", "submit p50 ms", "submit p95 ms",
                          "next_pair p50 ms", "next_pair p95 ms", "failed annotators"],
                         [[r["backend"], r["client"], r["think_s"], r["concurrency"], r["labels_per_s"], r["submit_p50_ms"],
                           r["submit_p95_ms"], r["next_pair_p50_ms"], r["next_pair_p95_ms"], r["failed_annotators"]]
                          for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
