"""A list of HTTP(S) URLs, fetched politely: the web's rules first, our throughput second.

- at most `concurrency` requests in flight (a thread pool), each with a total `timeout_s`;
- retries with exponential backoff on 5xx, 429, timeouts and connection errors, never on other 4xx;
- a user agent that names the project and how to reach it, and robots.txt honoured (fetched once
  per host, kept in the cache; a robots.txt that answers 5xx means "disallow all", RFC 9309 §2.3.1.3);
- a content-addressed cache on disk (`index/` maps a URL to the md5 of its body, `blobs/<md5>`
  holds the body), so a re-run does not refetch, and a record's `raw_md5` names the exact bytes;
- HTML through the main-content extractor (`stages.html`), text/plain kept as it is.

A URL that cannot be used (unreachable, too slow, 404, disallowed, not text) is one quarantine row
naming the URL and why; the other URLs are unaffected.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

from stages import html
from stages.connectors import DEFAULT_MAX_DOC_BYTES, Record, bad_file, bad_record
from stages.dataset import QuarantineLog

try:
    VERSION = metadata.version("llm-flywheel")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0"
USER_AGENT = f"llm-flywheel/{VERSION} (+https://github.com/llm-flywheel/llm-flywheel; data collection)"
TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    concurrency: int = 4  # requests in flight at once, over all hosts
    timeout_s: float = 10.0  # per attempt, connect to last byte
    retries: int = 2  # further attempts after a 5xx/429/timeout/connection error
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**(k-1)
    user_agent: str = USER_AGENT
    respect_robots: bool = True
    cache_dir: Path | None = None  # None: <output_dir>/http_cache

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"http.concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"http.timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"http.retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"http.backoff_s must be >= 0, got {self.backoff_s}")
        if not self.user_agent.strip():
            raise ValueError("http.user_agent must not be empty")


@dataclass(frozen=True)
class Fetched:
    url: str
    body: bytes | None = None  # None: failed, see kind/detail
    status: int = 0
    content_type: str = ""
    final_url: str = ""
    md5: str = ""
    blob: str = ""
    cached: bool = False
    kind: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Target:
    source: str
    url: str
    list_file: str = ""
    line: int | None = None


def is_url(text: str) -> bool:
    """Whether an entry of `urls` is a URL (else it is a file listing URLs).

    >>> is_url("https://example.org/a"), is_url("urls.txt"), is_url("ftp://x/y")
    (True, False, False)
    """
    parts = urlsplit(text.strip())
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class Cache:
    """URL -> body on disk, content-addressed: identical bodies are stored once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _index(self, url: str) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()
        return self.root / "index" / key[:2] / f"{key}.json"

    def get(self, url: str) -> Fetched | None:
        try:
            entry = json.loads(self._index(url).read_text())
            blob = self.root / "blobs" / entry["md5"]
            return Fetched(url=url, body=blob.read_bytes(), status=entry["status"], cached=True,
                           content_type=entry["content_type"], final_url=entry["final_url"],
                           md5=entry["md5"], blob=str(blob))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, f: Fetched) -> Fetched:
        md5 = hashlib.md5(f.body or b"").hexdigest()
        blob = self.root / "blobs" / md5
        _atomic_write(blob, f.body or b"")
        entry = {"url": f.url, "final_url": f.final_url, "status": f.status, "content_type": f.content_type,
                 "md5": md5, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _atomic_write(self._index(f.url), json.dumps(entry).encode())
        return Fetched(url=f.url, body=f.body, status=f.status, content_type=f.content_type,
                       final_url=f.final_url, md5=md5, blob=str(blob))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Fetcher:
    def __init__(self, cfg: HttpConfig, cache_dir: Path, max_bytes: int = DEFAULT_MAX_DOC_BYTES) -> None:
        self.cfg, self.cache, self.max_bytes = cfg, Cache(cache_dir), max_bytes
        self._robots: dict[str, RobotFileParser | Fetched | None] = {}
        self._host_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _get(self, url: str, *, ok_status: frozenset[int] = frozenset()) -> Fetched:
        """One URL, retried; `ok_status` are error statuses to return as answers (robots.txt's 404)."""
        failure = Fetched(url=url, kind="unreachable", detail="no attempt made")
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            failure = self._attempt(url, ok_status)
            if failure.body is not None or failure.kind not in ("unreachable", "timeout", "server error"):
                return failure
        tries = self.cfg.retries + 1
        return Fetched(url=url, kind=failure.kind, status=failure.status,
                       detail=f"{failure.detail} (after {tries} attempt{'s' * (tries > 1)})")

    def _attempt(self, url: str, ok_status: frozenset[int]) -> Fetched:
        request = urllib.request.Request(url, headers={
            "User-Agent": self.cfg.user_agent, "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.1"})
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    return Fetched(url=url, status=resp.status, kind="document too large",
                                   detail=f"Content-Length {length} > max_doc_bytes={self.max_bytes}")
                chunks, size = [], 0
                # The socket timeout bounds each read; the deadline bounds a server that trickles.
                while chunk := resp.read(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.max_bytes:
                        return Fetched(url=url, status=resp.status, kind="document too large",
                                       detail=f"more than max_doc_bytes={self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"body not complete after {self.cfg.timeout_s} s")
                return Fetched(url=url, body=b"".join(chunks), status=resp.status,
                               content_type=resp.headers.get("Content-Type", ""), final_url=resp.geturl())
        except urllib.error.HTTPError as e:
            if e.code in ok_status:
                return Fetched(url=url, body=b"", status=e.code, final_url=url)
            kind = "server error" if e.code in RETRY_STATUS else "HTTP error"
            return Fetched(url=url, status=e.code, kind=kind, detail=f"HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                return Fetched(url=url, kind="timeout", detail=f"no complete answer within {self.cfg.timeout_s} s")
            return Fetched(url=url, kind="unreachable", detail=f"{type(reason).__name__}: {reason}")

    def _robots_for(self, url: str) -> RobotFileParser | Fetched | None:
        """The host's robots rules (None: no robots.txt) or the failed fetch of them."""
        parts = urlsplit(url)
        host = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            lock = self._host_locks.setdefault(host, threading.Lock())
        with lock:  # one robots.txt fetch per host, however many threads ask at once
            if host not in self._robots:
                robots_url = host + "/robots.txt"
                got = self.cache.get(robots_url)
                if got is None:
                    got = self._get(robots_url, ok_status=frozenset(range(400, 500)))
                    if got.body is not None:
                        got = self.cache.put(got)
                if got.body is None:
                    self._robots[host] = got
                elif 400 <= got.status < 500:
                    self._robots[host] = None  # no robots.txt: everything allowed
                else:
                    rules = RobotFileParser(robots_url)
                    rules.parse(got.body.decode("utf-8", errors="replace").splitlines())
                    self._robots[host] = rules
            return self._robots[host]

    def fetch(self, url: str) -> Fetched:
        cached = self.cache.get(url)
        if cached is not None:
            return cached
        if self.cfg.respect_robots:
            rules = self._robots_for(url)
            if isinstance(rules, Fetched):
                kind = rules.kind if rules.kind in ("unreachable", "timeout") else "robots.txt unavailable"
                return Fetched(url=url, kind=kind, detail=f"robots.txt: {rules.detail}")
            agent = self.cfg.user_agent.split("/")[0]
            if rules is not None and not rules.can_fetch(agent, url):
                return Fetched(url=url, kind="disallowed by robots.txt", detail=f"robots.txt disallows {agent}")
        got = self._get(url)
        return self.cache.put(got) if got.body is not None else got


def targets(entries: Iterable[str], q: QuarantineLog) -> Iterator[Target]:
    """Every URL named by `entries`: URLs themselves, or files with one URL per line (# comments)."""
    for entry in entries:
        if is_url(entry):
            yield Target(source="http:urls", url=entry.strip())
            continue
        path = Path(entry)
        source = f"http:{path.stem}"
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            bad_file(q, file=path, kind="unreadable file", detail=f"{type(e).__name__}: {e}", source=source)
            continue
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if is_url(line):
                yield Target(source=source, url=line, list_file=str(path), line=n)
            else:
                bad_record(q, file=path, kind="not an http(s) URL", source=source, line=n, raw=line)


def _ordered(pool: ThreadPoolExecutor, fn: Any, items: Iterable[Any], window: int) -> Iterator[Any]:
    """pool.map that keeps at most `window` items in flight (a long URL list is not all queued)."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            done = pending.popleft()
            yield done[0], done[1].result()
    while pending:
        done = pending.popleft()
        yield done[0], done[1].result()


def url_records(entries: Iterable[str], q: QuarantineLog, cfg: HttpConfig, cache_dir: Path,
                max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, stats: dict[str, int] | None = None) -> Iterator[Record]:
    fetcher = Fetcher(cfg, cache_dir, max_doc_bytes)
    stats = stats if stats is not None else {}
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="fetch") as pool:
        for target, got in _ordered(pool, lambda t: fetcher.fetch(t.url), targets(entries, q), 4 * cfg.concurrency):
            stats["cached" if got.cached else "fetched"] = stats.get("cached" if got.cached else "fetched", 0) + 1
            record = _record(target, got, q)
            if record is not None:
                yield record


def _record(t: Target, got: Fetched, q: QuarantineLog) -> Record | None:
    where = {"line": t.line, "list": t.list_file} if t.list_file else {}
    if got.body is None:
        bad_record(q, file=t.url, kind=got.kind, detail=f"{t.url}: {got.detail}", source=t.source,
                   url=t.url, status=got.status or None, **where)
        return None
    mime = got.content_type.split(";")[0].strip().lower()
    charset = html.charset_of(got.content_type)
    if html.is_html(got.content_type):
        text = html.extract_text(got.body, charset)
    elif mime in TEXT_TYPES:
        text = html.decode_html(got.body, charset)
    else:
        bad_record(q, file=t.url, kind="unsupported content type", detail=f"{t.url}: {got.content_type or 'none'}",
                   source=t.source, url=t.url, raw=got.body[:200], **where)
        return None
    if not text.strip():
        bad_record(q, file=t.url, kind="empty document", detail=f"{t.url}: no text", source=t.source, url=t.url,
                   raw=got.body[:200], **where)
        return None
    return {"id": f"{t.source}:{t.url}", "text": text, "source": t.source, "url": t.url,
            "meta": {"path": got.blob, "raw_md5": got.md5, "final_url": got.final_url, "status": got.status,
                     "content_type": got.content_type, **where}}
