"""WARC files (plain or gzip, as crawlers and Common Crawl write them), read with warcio.

Each `response` (or `resource`) record whose payload is HTML becomes one record: the page's main
text through `stages.html`, `url` = its WARC-Target-URI. WET `conversion` records (text already
extracted) are kept as they are. Anything else (requests, metadata, images, scripts, error pages)
is counted in `skipped`, not quarantined: a crawl is mostly such records, and none of it is lost text.

Damage: warcio reads a truncated record without complaint, so every record's block is checked for
completeness (`raw_stream.limit` still > 0 means the file ended inside it). A record cut short or a
header that does not parse is one quarantine row with its byte offset; the reader then looks for
the next record header past the damage and carries on, so records after it are kept too.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from stages import html
from stages.connectors import DEFAULT_MAX_DOC_BYTES, Digest, Record, bad_file, bad_record, file_digest
from stages.dataset import QuarantineLog

SUFFIXES = (".warc", ".warc.gz")
TEXT_TYPES = ("text/plain",)
READ_ERRORS = (ArchiveLoadFailed, EOFError, zlib.error, OSError, ValueError)


def warc_stem(path: str | Path) -> str:
    """The name a WARC file's records are known by.

    >>> warc_stem("crawl/CC-MAIN-0001.warc.gz")
    'CC-MAIN-0001'
    """
    name = Path(path).name
    for suffix in (".warc.gz", ".warc"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _next_record_start(f: BinaryIO, after: int, gz: bool) -> int | None:
    """Byte offset of the next plausible record start after `after` (a gzip member or a WARC header)."""
    marker = b"\x1f\x8b\x08" if gz else b"WARC/1."
    f.seek(after + 1)
    pos, tail = after + 1, b""
    while chunk := f.read(1 << 20):
        hit = (tail + chunk).find(marker)
        if hit >= 0:
            return pos - len(tail) + hit
        tail = chunk[-(len(marker) - 1):]
        pos += len(chunk)
    return None


def warc_records(path: Path, q: QuarantineLog, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
                 skipped: Counter[str] | None = None, digest: Digest = file_digest) -> Iterator[Record]:
    path = Path(path)
    source = f"warc:{warc_stem(path)}"
    skipped = skipped if skipped is not None else Counter()
    try:
        md5 = digest(path)
        f = open(path, "rb")
    except OSError as e:
        bad_file(q, file=path, kind="unreadable file", detail=f"{type(e).__name__}: {e}", source=source)
        return
    gz = path.name.endswith(".gz")
    start: int | None = 0
    kept = 0
    with f:
        while start is not None:
            f.seek(start)
            it = ArchiveIterator(f)  # its offsets are absolute: it starts from f.tell()
            try:
                for rec in it:
                    out = _record(rec, path, q, source, md5, it, max_doc_bytes, skipped)
                    if out is not None:
                        kept += 1
                        yield out
                return
            except READ_ERRORS as e:
                reached = it.offset  # start of the record the reader could not make sense of
                bad_record(q, file=path, kind="unreadable WARC record", source=source, offset=reached,
                           detail=f"{type(e).__name__}: {str(e)[:120]!r}")  # the message quotes raw bytes
                start = _next_record_start(f, reached, gz)
                if start is None and kept == 0:
                    bad_file(q, file=path, kind="unreadable file", source=source, offset=0,
                             detail="no WARC record could be read")


def _record(rec, path: Path, q: QuarantineLog, source: str, md5: str, it: ArchiveIterator,
            max_doc_bytes: int, skipped: Counter[str]) -> Record | None:
    kind = rec.rec_type
    if kind not in ("response", "resource", "conversion"):
        skipped[f"warc {kind} record"] += 1
        return None
    headers = rec.http_headers if kind == "response" else rec.rec_headers
    content_type = headers.get_header("Content-Type") if headers is not None else None
    status = headers.get_statuscode() if kind == "response" and headers is not None else None
    wanted = html.is_html(content_type) or (kind == "conversion" and _is_text(content_type))
    if not wanted:
        skipped["non-HTML record"] += 1
        return None
    if status and not status.startswith("2"):
        skipped[f"HTTP {status} response"] += 1
        return None
    url = rec.rec_headers.get_header("WARC-Target-URI") or ""
    if rec.length and rec.length > max_doc_bytes:
        # Not read: warcio skips the rest of the block when the iterator moves on.
        bad_record(q, file=path, kind="document too large", source=source, offset=it.get_record_offset(),
                   detail=f"{url}: {rec.length} bytes > max_doc_bytes={max_doc_bytes}", url=url)
        return None
    payload = rec.content_stream().read()
    missing = getattr(rec.raw_stream, "limit", 0)  # bytes of the block the file did not have
    offset = it.get_record_offset()  # only once the content is read: asking earlier skips the block
    if missing > 0:
        bad_record(q, file=path, kind="truncated WARC record", source=source, offset=offset, url=url,
                   detail=f"{url}: the file ends {missing} bytes before the record does",
                   raw=payload[:200])
        return None
    text = html.extract_text(payload, html.charset_of(content_type)) if html.is_html(content_type) else \
        html.decode_html(payload, html.charset_of(content_type))
    if not text.strip():
        bad_record(q, file=path, kind="empty document", source=source, offset=offset, url=url,
                   detail=f"{url}: no text after extraction", raw=payload[:200])
        return None
    return {"id": f"{source}:{offset}", "text": text, "source": source, "url": url,
            "meta": {"path": str(path), "raw_md5": md5, "offset": offset, "warc_type": kind,
                     "record_id": rec.rec_headers.get_header("WARC-Record-ID") or "",
                     "date": rec.rec_headers.get_header("WARC-Date") or "", "content_type": content_type or ""}}


def _is_text(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() in TEXT_TYPES
