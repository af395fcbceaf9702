"""Every bad input of issue 9, one connector at a time: the damage is one quarantine row that names the
file, the line or byte offset and the reason, and the good records before and after it are kept.

WARC files are written with warcio from real HTML (Debian's Python manual); the HTTP connector runs
against a real server on 127.0.0.1.
"""

from __future__ import annotations

import doctest
import gzip
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.connectors as connectors
from stages import html
from stages.connectors import FieldMap, files, folders, hf, warc
from stages.connectors import http as http_connector
from stages.connectors.http import HttpConfig
from stages.dataset import QuarantineLog, file_digest

PYDOC = Path("/usr/share/doc/python3.11/html")
needs_pydoc = pytest.mark.skipif(not (PYDOC / "library" / "json.html").exists(),
                                 reason=f"Debian's Python manual not installed at {PYDOC} (make test-deps)")


class Log:
    """A QuarantineLog to hand to a connector, and its rows once the connector is done."""

    def __init__(self, tmp: Path) -> None:
        self.q = QuarantineLog(tmp / "quarantine.jsonl")

    def rows(self) -> list[dict]:
        self.q.close()
        return [json.loads(line) for line in self.q.path.read_text().splitlines()]


def jsonl(*records: dict | bytes) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def texts(records) -> list[str]:
    return [r["text"] for r in records]


def test_doctests() -> None:
    for module in (connectors, files, warc, hf, http_connector, html):
        assert doctest.testmod(module).failed == 0, module.__name__


# --- JSONL ---------------------------------------------------------------------------------------


def test_bad_utf8_line_is_one_row_and_neighbours_kept(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl({"text": "before"}) + b'{"text": "caf\xe9 latin-1"}\n' + jsonl({"text": "after"}))
    log = Log(tmp_path)
    records = list(files.file_records(path, log.q))
    assert texts(records) == ["before", "after"]
    [row] = log.rows()
    assert row["file"] == str(path) and row["line"] == 2 and row["offset"] == len(jsonl({"text": "before"}))
    assert row["kind"] == "invalid UTF-8" and "byte 13" in row["reason"]
    meta = records[1]["meta"]  # lineage: the raw file, its md5 and the line
    assert meta["path"] == str(path) and meta["raw_md5"] == file_digest(path) and meta["line"] == 3


def test_bom_does_not_cost_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl({"text": "first"}, {"text": "second"}))
    log = Log(tmp_path)
    assert texts(files.file_records(path, log.q)) == ["first", "second"]
    assert log.rows() == []
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    log = Log(tmp_path)
    assert texts(files.file_records(gz, log.q)) == ["first", "second"] and log.rows() == []


def test_broken_json_line_is_one_row_and_neighbours_kept(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_bytes(jsonl({"text": "one"}, b'{"text": "two", ', {"text": "three"}, b"[1, 2]", {"text": "five"}))
    log = Log(tmp_path)
    assert texts(files.file_records(path, log.q)) == ["one", "three", "five"]
    rows = log.rows()
    assert [(r["line"], r["kind"]) for r in rows] == [(2, "invalid JSON"), (4, "not an object")]
    assert all(r["file"] == str(path) and r["offset"] > 0 for r in rows)


def test_truncated_gzip_keeps_every_record_before_the_cut(tmp_path: Path) -> None:
    records = [{"text": f"record number {i} " + "x" * 40} for i in range(3000)]
    whole = gzip.compress(jsonl(*records))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    log = Log(tmp_path)
    kept = texts(files.file_records(path, log.q))
    assert 100 < len(kept) < 3000
    assert kept == [r["text"] for r in records[: len(kept)]]  # a prefix, in order, nothing skipped
    [row] = log.rows()
    assert row["file"] == str(path) and row["scope"] == "file" and row["partial"] is True
    assert row["line"] == len(kept) + 1 and row["offset"] > 0 and row["compressed_offset"] == len(whole) // 2
    assert "EOFError" in row["reason"] and "truncated" in row["kind"]


def test_not_gzip_at_all_is_one_file_row(tmp_path: Path) -> None:
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b"this was never gzip\n")
    log = Log(tmp_path)
    assert list(files.file_records(path, log.q)) == []
    [row] = log.rows()
    assert row["scope"] == "file" and not row["partial"] and "BadGzipFile" in row["reason"]


def test_empty_and_oversize_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "sizes.jsonl"
    big = {"text": "y" * 5000}
    path.write_bytes(jsonl({"text": "small one"}, {"text": "   "}, big, {"text": "small two"}))
    log = Log(tmp_path)
    assert texts(files.file_records(path, log.q, max_doc_bytes=1000)) == ["small one", "small two"]
    rows = log.rows()
    assert [(r["line"], r["kind"]) for r in rows] == [(2, "empty document"), (3, "document too large")]
    assert f"{len(jsonl(big))} bytes" in rows[1]["reason"] and rows[1]["raw"] == ""  # measured, not loaded


def test_field_mapping_takes_id_and_url(tmp_path: Path) -> None:
    path = tmp_path / "mapped.jsonl"
    path.write_bytes(jsonl({"body": "hello", "key": "a1", "link": "https://x.org/a", "lang": "en"},
                           {"body": "no key here"}))
    log = Log(tmp_path)
    [rec] = files.file_records(path, log.q, FieldMap(text="body", id="key", url="link"))
    assert (rec["id"], rec["url"], rec["meta"]["fields"]) == ("file:mapped:a1", "https://x.org/a", {"lang": "en"})
    [row] = log.rows()
    assert row["line"] == 2 and row["kind"] == "missing id field"


# --- Parquet -------------------------------------------------------------------------------------


def test_parquet_without_text_column_is_one_file_row(tmp_path: Path) -> None:
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(500)], "n": list(range(500))}), path)
    log = Log(tmp_path)
    assert list(files.file_records(path, log.q)) == []
    [row] = log.rows()  # one row for the file, not 500
    assert row["scope"] == "file" and row["kind"] == "missing text column"
    assert "'text'" in row["reason"] and "body, n" in row["reason"] and row["columns"] == ["body", "n"]


def test_corrupt_parquet_is_one_file_row(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), good)
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(good.read_bytes()[:-30])  # footer gone
    log = Log(tmp_path)
    assert list(files.file_records(path, log.q)) == []
    [row] = log.rows()
    assert row["file"] == str(path) and row["scope"] == "file" and row["kind"] == "corrupt parquet"


def test_parquet_streams_row_groups_and_quarantines_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "groups.parquet"
    values = [f"doc {i}" for i in range(5000)]
    values[10], values[4000] = None, "z" * 3000
    pq.write_table(pa.table({"text": values, "k": list(range(5000))}), path, row_group_size=1000)
    log = Log(tmp_path)
    records = list(files.file_records(path, log.q, max_doc_bytes=2000))
    assert len(records) == 4998 and records[-1]["text"] == "doc 4999" and records[-1]["meta"]["row"] == 5000
    assert [(r["line"], r["kind"]) for r in log.rows()] == [(11, "text not a string"), (4001, "document too large")]


# --- folders -------------------------------------------------------------------------------------


def test_folder_bad_files_are_rows_and_the_rest_kept(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a_good.txt").write_text("First good file.", encoding="utf-8")
    (docs / "b_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (docs / "c_bom.md").write_bytes(b"\xef\xbb\xbf# Heading\n\nWith a BOM.")
    (docs / "d_empty.txt").write_bytes(b"  \n\n")
    (docs / "e_latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "f_big.txt").write_text("w " * 2000, encoding="utf-8")
    (docs / "g_page.html").write_text("<html><body><nav>Home | About</nav><main><h1>Title</h1>"
                                      "<p>Real paragraph of the page with enough words to count as content.</p>"
                                      "</main><script>var x = 1;</script></body></html>", encoding="utf-8")
    (docs / "h_scripts_only.html").write_text("<html><script>track()</script></html>", encoding="utf-8")
    (docs / "z_last.txt").write_text("Last good file.", encoding="utf-8")
    log = Log(tmp_path)
    records = list(folders.folder_records(docs, log.q, max_doc_bytes=1000))
    assert [r["id"] for r in records] == ["folder:docs:a_good.txt", "folder:docs:c_bom.md", "folder:docs:g_page.html",
                                          "folder:docs:z_last.txt"]
    assert records[1]["text"] == "# Heading\n\nWith a BOM."
    assert "Real paragraph" in records[2]["text"] and "var x" not in records[2]["text"]
    assert records[3]["meta"] == {"path": str(docs / "z_last.txt"), "raw_md5": file_digest(docs / "z_last.txt")}
    rows = {Path(r["file"]).name: r for r in log.rows()}
    assert {n: r["kind"] for n, r in rows.items()} == {
        "b_binary.txt": "binary file", "d_empty.txt": "empty document", "e_latin1.txt": "invalid UTF-8",
        "f_big.txt": "document too large", "h_scripts_only.html": "empty document"}
    assert rows["b_binary.txt"]["offset"] == 8 and rows["e_latin1.txt"]["offset"] == 3
    assert "4000 bytes" in rows["f_big.txt"]["reason"]


def test_missing_folder_is_one_file_row(tmp_path: Path) -> None:
    log = Log(tmp_path)
    assert list(folders.folder_records(tmp_path / "nope", log.q)) == []
    [row] = log.rows()
    assert row["scope"] == "file" and "nope" in row["reason"]


# --- HTML ----------------------------------------------------------------------------------------


@needs_pydoc
def test_html_extractor_keeps_the_prose_of_a_real_page_and_drops_its_chrome() -> None:
    raw = (PYDOC / "library" / "json.html").read_bytes()
    text = html.extract_text(raw)
    assert text.startswith("json — JSON encoder and decoder")
    for prose in ("JSON (JavaScript Object Notation), specified by RFC 7159", "class json.JSONDecoder",
                  "Be cautious when parsing JSON data from untrusted sources"):
        assert prose in text, prose
    for chrome in ("Previous topic", "Next topic", "Quick search", "Table of Contents", "Theme", "Report a Bug",
                   "Show Source", "@media", "width: 100%", "jquery", "<div"):
        assert chrome not in text, chrome
    assert 15_000 < len(text) < len(raw) / 3


def test_html_charset_from_header_meta_or_detection() -> None:
    page = "<html><body><p>Ein schöner Absatz über Käse und Bären, lang genug für den Text.</p></body></html>"
    latin1 = page.encode("latin-1")
    assert "schöner" in html.extract_text(latin1, "iso-8859-1")
    meta = page.replace("<html>", '<html><head><meta charset="iso-8859-1"></head>').encode("latin-1")
    assert "Käse" in html.extract_text(meta)
    assert "Bären" in html.extract_text(b"\xef\xbb\xbf" + page.encode("utf-8"))
    assert "Käse" in html.extract_text(latin1, "no-such-charset")  # a bad header falls back to detection


# --- WARC ----------------------------------------------------------------------------------------


def write_warc(path: Path, pages: list[Path], extra: bool = True) -> list[int]:
    """A WARC of real pages (plus a request and a non-HTML response); returns each page record's offset."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    offsets = []
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=path.name.endswith(".gz"))
        for page in pages:
            url = f"https://docs.python.org/3/library/{page.name}"
            if extra:
                w.write_record(w.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            offsets.append(f.tell())
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(page.read_bytes()),
                                                http_headers=headers))
        if extra:
            css = StatusAndHeaders("200 OK", [("Content-Type", "text/css")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record("https://docs.python.org/3/_static/x.css", "response",
                                                payload=io.BytesIO(b"body { color: red }"), http_headers=css))
    return offsets


def pydoc_pages(n: int) -> list[Path]:
    return sorted((PYDOC / "library").glob("*.html"))[:n]


@needs_pydoc
@pytest.mark.parametrize("suffix", [".warc.gz", ".warc"])
def test_warc_html_responses_become_records(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"crawl{suffix}"
    pages = pydoc_pages(4)
    offsets = write_warc(path, pages)
    log, skipped = Log(tmp_path), Counter()
    records = list(warc.warc_records(path, log.q, skipped=skipped))
    assert [r["url"] for r in records] == [f"https://docs.python.org/3/library/{p.name}" for p in pages]
    assert [r["meta"]["offset"] for r in records] == offsets and records[0]["id"] == f"warc:crawl:{offsets[0]}"
    assert records[0]["text"] == html.extract_text(pages[0].read_bytes())
    assert records[0]["meta"]["raw_md5"] == file_digest(path)
    assert skipped == {"warc request record": 4, "non-HTML record": 1} and log.rows() == []


@needs_pydoc
@pytest.mark.parametrize("suffix", [".warc.gz", ".warc"])
def test_truncated_warc_keeps_the_records_before_the_cut(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    offsets = write_warc(whole, pydoc_pages(6), extra=False)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole.read_bytes()[: offsets[4] + 2000])  # inside the fifth page
    log = Log(tmp_path)
    records = list(warc.warc_records(path, log.q))
    assert [r["meta"]["offset"] for r in records] == offsets[:4]
    [row] = log.rows()
    assert row["file"] == str(path) and row["offset"] == offsets[4] and row["kind"] == "truncated WARC record"
    assert row["url"].endswith(pydoc_pages(6)[4].name)


@needs_pydoc
@pytest.mark.parametrize("suffix", [".warc.gz", ".warc"])
def test_damaged_warc_record_costs_only_itself(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"damaged{suffix}"
    offsets = write_warc(path, pydoc_pages(5), extra=False)
    data = bytearray(path.read_bytes())
    data[offsets[2]: offsets[2] + 12] = b"#" * 12  # the third record's header (or gzip member) destroyed
    path.write_bytes(bytes(data))
    log = Log(tmp_path)
    records = list(warc.warc_records(path, log.q))
    assert [r["meta"]["offset"] for r in records] == offsets[:2] + offsets[3:]  # after the damage: kept
    [row] = log.rows()
    assert row["offset"] == offsets[2] and row["kind"] == "unreadable WARC record"


@needs_pydoc
def test_oversize_warc_record_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.warc.gz"
    pages = sorted(pydoc_pages(40), key=lambda p: p.stat().st_size)[-3:]  # biggest last
    offsets = write_warc(path, [pages[0], pages[2], pages[1]], extra=False)
    limit = pages[1].stat().st_size + 500
    log = Log(tmp_path)
    records = list(warc.warc_records(path, log.q, max_doc_bytes=limit))
    assert [r["meta"]["offset"] for r in records] == [offsets[0], offsets[2]]
    [row] = log.rows()
    assert row["kind"] == "document too large" and row["offset"] == offsets[1]


# --- HTTP ----------------------------------------------------------------------------------------

PAGE = (b"<html><head><title>t</title><script>var tracker = 1;</script></head><body><nav>Menu Home</nav>"
        b"<article><h1>A page served locally</h1><p>This paragraph is the content of the page and has "
        b"enough words to be main content.</p></article></body></html>")


class Server:
    """A real HTTP server on 127.0.0.1 that counts the requests each path gets."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.agents: set[str] = set()
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the slow URL's timeout): that is the point

            def do_GET(self) -> None:
                with lock:
                    server.hits[self.path] += 1
                    n = server.hits[self.path]
                    server.agents.add(self.headers.get("User-Agent", ""))
                if self.path == "/robots.txt":
                    self.send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
                elif self.path.startswith("/page"):
                    self.send(200, PAGE)
                elif self.path == "/plain.txt":
                    self.send(200, "Plain text, kept as it is: naïve café.".encode(), "text/plain; charset=utf-8")
                elif self.path == "/flaky":
                    self.send(500, b"try again") if n == 1 else self.send(200, PAGE)
                elif self.path == "/slow":
                    time.sleep(1.5)
                    self.send(200, PAGE)
                elif self.path == "/image.png":
                    self.send(200, b"\x89PNG\r\n", "image/png")
                else:
                    self.send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = HttpConfig(concurrency=3, timeout_s=0.5, retries=1, backoff_s=0.05)


def test_http_urls_polite_fetch_and_every_failure_named(server: Server, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/page"
    listing = tmp_path / "seeds.txt"
    names = ["/page1", "/private/secret", "/slow", "/flaky", "/missing", "/plain.txt", "/image.png", "/page2"]
    listing.write_text("# seed list\n" + "".join(server.base + n + "\n" for n in names) + dead + "\nnot a url\n")
    log = Log(tmp_path)
    started = time.monotonic()
    records = list(http_connector.url_records([str(listing)], log.q, FAST, tmp_path / "cache"))
    assert time.monotonic() - started < 6  # the slow URL costs its timeouts, not the run
    assert [r["url"] for r in records] == [server.base + n for n in ("/page1", "/flaky", "/plain.txt", "/page2")]
    assert records[0]["text"].startswith("A page served locally") and "tracker" not in records[0]["text"]
    assert "Menu Home" not in records[0]["text"]
    assert records[2]["text"] == "Plain text, kept as it is: naïve café."
    assert records[0]["source"] == "http:seeds" and records[0]["id"] == f"http:seeds:{server.base}/page1"
    blob = Path(records[0]["meta"]["path"])
    assert blob.read_bytes() == PAGE and records[0]["meta"]["raw_md5"] == blob.name == file_digest(blob)
    assert records[0]["meta"]["line"] == 2 and records[0]["meta"]["list"] == str(listing)

    rows = {r["file"]: r for r in log.rows()}
    assert {u.removeprefix(server.base): r["kind"] for u, r in rows.items()} == {
        "/private/secret": "disallowed by robots.txt", "/slow": "timeout", "/missing": "HTTP error",
        "/image.png": "unsupported content type", dead: "unreachable", str(listing): "not an http(s) URL"}
    assert "HTTP 404" in rows[server.base + "/missing"]["reason"]
    assert "after 2 attempts" in rows[dead]["reason"] and rows[dead]["line"] == 10
    assert rows[str(listing)]["line"] == 11
    # Politeness: robots.txt once, the disallowed page never, retries only where they can help.
    assert server.hits["/robots.txt"] == 1 and server.hits["/private/secret"] == 0
    assert server.hits["/flaky"] == 2 and server.hits["/missing"] == 1 and server.hits["/slow"] == 2
    assert server.agents == {FAST.user_agent} and FAST.user_agent.startswith("llm-flywheel/")


def test_http_cache_means_a_rerun_does_not_refetch(server: Server, tmp_path: Path) -> None:
    urls = [server.base + "/page-a", server.base + "/page-b", server.base + "/plain.txt"]
    first = list(http_connector.url_records(urls, Log(tmp_path).q, FAST, tmp_path / "cache"))
    hits = sum(server.hits.values())
    assert hits == 4  # robots.txt + three pages
    stats: dict[str, int] = {}
    again = list(http_connector.url_records(urls, Log(tmp_path).q, FAST, tmp_path / "cache", stats=stats))
    assert again == first and sum(server.hits.values()) == hits and stats == {"cached": 3}
    # Content-addressed: the two identical pages are one blob.
    assert len(list((tmp_path / "cache" / "blobs").iterdir())) == 3  # page, plain text, robots.txt


def test_http_robots_can_be_ignored_when_configured(server: Server, tmp_path: Path) -> None:
    cfg = HttpConfig(timeout_s=1.0, retries=0, respect_robots=False)
    log = Log(tmp_path)
    assert list(http_connector.url_records([server.base + "/private/page"], log.q, cfg, tmp_path / "c")) == []
    assert [r["kind"] for r in log.rows()] == ["HTTP error"]  # fetched (404 here), not refused
    assert server.hits["/robots.txt"] == 0


def test_http_config_errors_name_the_field() -> None:
    for kwargs, name in (({"concurrency": 0}, "http.concurrency"), ({"timeout_s": 0}, "http.timeout_s"),
                         ({"retries": -1}, "http.retries"), ({"user_agent": " "}, "http.user_agent")):
        with pytest.raises(ValueError, match=name):
            HttpConfig(**kwargs)


# --- Hugging Face datasets -----------------------------------------------------------------------


def test_hf_dataset_saved_to_disk_every_split_and_a_missing_column(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["alpha", "", "gamma"], "n": [1, 2, 3]}),
                 "test": Dataset.from_dict({"text": ["delta"], "n": [4]})}).save_to_disk(tmp_path / "corpus")
    Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "other")
    log = Log(tmp_path)
    records = list(hf.hf_records(str(tmp_path / "corpus"), log.q))
    assert [(r["id"], r["text"]) for r in records] == [
        ("hf:corpus:test:1", "delta"), ("hf:corpus:train:1", "alpha"), ("hf:corpus:train:3", "gamma")]
    assert records[1]["meta"]["fields"] == {"n": 1} and len(records[1]["meta"]["raw_md5"]) == 32
    assert list(hf.hf_records(str(tmp_path / "other"), log.q)) == []
    assert list(hf.hf_records("nobody/not-a-dataset", log.q)) == []  # offline in tests: one file row
    rows = log.rows()
    assert [(r["kind"], r["scope"]) for r in rows] == [
        ("empty document", "record"), ("missing text column", "file"), ("unreadable dataset", "file")]
    assert rows[0]["line"] == 2 and "body" in rows[1]["reason"]
