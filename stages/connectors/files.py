"""JSONL (plain or gzip) and Parquet files: one record per line / row, through a field mapping.

Both are streamed: JSONL line by line with a cap on the line length (a 100 MB line is measured and
skipped, never held in memory), Parquet row group by row group with `iter_batches`. Damage costs
only what it touches: a broken line is one quarantine row; a truncated gzip keeps every line before
the cut; a corrupt Parquet row group loses that group and the reader carries on with the next.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.connectors import (DEFAULT_MAX_DOC_BYTES, Digest, FieldMap, Record, bad_file, bad_record, file_digest,
                               mapped_record)
from stages.dataset import QuarantineLog

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
PARQUET_BATCH_ROWS = 1024  # rows decoded at once: bounds memory when documents are large


def file_stem(path: str | Path) -> str:
    """The name a file's records are known by: its file name without the data suffix.

    >>> file_stem("data/train.jsonl.gz"), file_stem("x/more.parquet")
    ('train', 'more')
    """
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def too_long(text: str, max_bytes: int) -> bool:
    """Whether `text` is more than `max_bytes` bytes of UTF-8, encoding it only when it could be."""
    return len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes)


def file_records(path: Path, q: QuarantineLog, fields: FieldMap = FieldMap(),
                 max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, digest: Digest = file_digest) -> Iterator[Record]:
    """Records of one .jsonl, .jsonl.gz or .parquet file (by suffix)."""
    path = Path(path)
    source = f"file:{file_stem(path)}"
    try:
        md5 = digest(path)
    except OSError as e:
        bad_file(q, file=path, kind="unreadable file", detail=f"{type(e).__name__}: {e}", source=source)
        return
    if path.name.endswith(".parquet"):
        yield from parquet_records(path, q, fields, source, md5, max_doc_bytes)
    else:
        yield from jsonl_records(path, q, fields, source, md5, max_doc_bytes)


def jsonl_records(path: Path, q: QuarantineLog, fields: FieldMap, source: str, md5: str,
                  max_doc_bytes: int) -> Iterator[Record]:
    line_no = offset = 0
    raw_file = open(path, "rb")
    stream = gzip.GzipFile(fileobj=raw_file, mode="rb") if path.name.endswith(".gz") else raw_file
    try:
        while True:
            # readline with a limit: an over-long line is read in pieces and dropped, never held whole.
            chunk = stream.readline(max_doc_bytes + 1)
            if not chunk:
                return
            line_no += 1
            start, offset = offset, offset + len(chunk)
            if len(chunk) > max_doc_bytes and not chunk.endswith(b"\n"):
                size = len(chunk)
                while chunk and not chunk.endswith(b"\n"):
                    chunk = stream.readline(1 << 20)
                    size += len(chunk)
                    offset += len(chunk)
                bad_record(q, file=path, kind="document too large", source=source, line=line_no, offset=start,
                           detail=f"line of {size} bytes > max_doc_bytes={max_doc_bytes}", raw=b"")
                continue
            if line_no == 1:
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a BOM would make the first line invalid JSON
            if not chunk.strip():
                continue  # a blank line separates nothing and loses nothing
            try:
                rec = json.loads(chunk.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad_record(q, file=path, kind="invalid UTF-8", detail=f"byte {e.start} of the line: {e.reason}",
                           source=source, line=line_no, offset=start, raw=chunk)
                continue
            except json.JSONDecodeError as e:
                bad_record(q, file=path, kind="invalid JSON", detail=str(e), source=source, line=line_no,
                           offset=start, raw=chunk)
                continue
            where = {"path": str(path), "raw_md5": md5, "line": line_no, "offset": start}
            record, kind, detail = mapped_record(rec, fields, source=source, position=line_no, where=where)
            if record is None:
                bad_record(q, file=path, kind=kind, detail=detail, source=source, line=line_no, offset=start,
                           raw=chunk)
            else:
                yield record
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        # Truncated or corrupt compressed data: what was decoded before the damage is already out.
        bad_file(q, file=path, kind="truncated or corrupt file", source=source, line=line_no + 1, offset=offset,
                 detail=f"{type(e).__name__}: {e} (after line {line_no}, decompressed byte {offset}, "
                        f"file byte {raw_file.tell()})", compressed_offset=raw_file.tell(), partial=line_no > 0)
    finally:
        stream.close()
        raw_file.close()


def parquet_records(path: Path, q: QuarantineLog, fields: FieldMap, source: str, md5: str,
                    max_doc_bytes: int) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        bad_file(q, file=path, kind="corrupt parquet", detail=f"{type(e).__name__}: {e}", source=source)
        return
    schema = pf.schema_arrow
    # A schema problem is the file's, not each row's: one row that names it, not a million identical ones.
    if fields.text not in schema.names:
        bad_file(q, file=path, kind="missing text column", source=source, columns=schema.names,
                 detail=f"no column {fields.text!r}; the file's columns are {', '.join(schema.names)}")
        return
    text_type = schema.field(fields.text).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
            or (pa.types.is_dictionary(text_type) and pa.types.is_string(text_type.value_type))):
        bad_file(q, file=path, kind="text column not a string", source=source,
                 detail=f"column {fields.text!r} is {text_type}, not a string")
        return
    row = 0
    for group in range(pf.num_row_groups):
        first = row
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                for rec in batch.to_pylist():
                    row += 1
                    text = rec.get(fields.text)
                    if isinstance(text, str) and too_long(text, max_doc_bytes):
                        bad_record(q, file=path, kind="document too large", source=source, line=row, row=row,
                                   detail=f"{len(text.encode())} bytes > max_doc_bytes={max_doc_bytes}")
                        continue
                    where = {"path": str(path), "raw_md5": md5, "row": row, "line": row}
                    record, kind, detail = mapped_record(rec, fields, source=source, position=row, where=where)
                    if record is None:
                        bad_record(q, file=path, kind=kind, detail=detail, source=source, line=row, row=row,
                                   raw=json.dumps(rec, default=str))
                    else:
                        yield record
        except (pa.ArrowException, OSError) as e:
            lost = pf.metadata.row_group(group).num_rows - (row - first)
            bad_record(q, file=path, kind="corrupt row group", source=source, line=row + 1, row=row + 1,
                       detail=f"row group {group}: {type(e).__name__}: {e} ({lost} rows lost)", row_group=group)
            row = first + pf.metadata.row_group(group).num_rows
