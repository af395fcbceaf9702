"""Connectors: small generators that turn one kind of raw input into records of one shape.

Every connector yields `{"id", "text", "source", "url", "meta"}` and never raises on bad input:
what it cannot use goes to the `QuarantineLog` it is given, one row naming the file, the line (or
row) or byte offset, and the reason. `meta` always carries the raw file's `path` and `raw_md5`
(the md5 DVC uses), so a document's lineage reaches back to the exact raw bytes it came from.

Two kinds of quarantine rows: `scope="record"` (one record lost, the rest of the file kept) and
`scope="file"` (nothing of the file could be read: missing, unreadable, a Parquet file without
the text column). The collect stage lists the second kind as `unreadable_files` in its report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.dataset import QuarantineLog, file_digest

Record = dict[str, Any]
Digest = Callable[[Path], str]

UTF8_BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_DOC_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class FieldMap:
    """Which fields of a JSONL/Parquet/datasets record hold the text, the id and the URL."""

    text: str = "text"
    id: str | None = None  # None: ids are <source>:<line or row>
    url: str | None = None

    def columns(self) -> set[str]:
        return {f for f in (self.text, self.id, self.url) if f}


def bad_record(q: QuarantineLog, *, file: str | Path, kind: str, detail: str = "", source: str = "",
               line: int | None = None, offset: int | None = None, raw: str | bytes = "", **extra: Any) -> None:
    """One record lost; `kind` is the short reason the report counts by, `detail` the specifics."""
    q.add(file=file, line=line, offset=offset, reason=f"{kind}: {detail}" if detail else kind, raw=raw,
          kind=kind, scope="record", source=source, **extra)


def bad_file(q: QuarantineLog, *, file: str | Path, kind: str, detail: str = "", source: str = "",
             line: int | None = None, offset: int | None = None, **extra: Any) -> None:
    """Nothing (more) of a file can be read."""
    q.add(file=file, line=line, offset=offset, reason=f"{kind}: {detail}" if detail else kind,
          kind=kind, scope="file", source=source, **extra)


def decode_text(raw: bytes) -> tuple[str | None, str, str, int | None]:
    """(text, "", "", None) for usable UTF-8 bytes, else (None, kind, detail, byte offset).

    A UTF-8 BOM is dropped (offsets still count it, so they point into the raw file).

    >>> decode_text(b"\\xef\\xbb\\xbfhello")
    ('hello', '', '', None)
    >>> decode_text(b"ab\\x00cd")[1:]
    ('binary file', 'NUL byte at offset 2', 2)
    >>> decode_text(b"caf\\xe9")[1::2]
    ('invalid UTF-8', 3)
    """
    nul = raw.find(b"\x00")
    if nul >= 0:  # no text encoding but UTF-16/32 has NULs; those files are not what a .txt promises
        return None, "binary file", f"NUL byte at offset {nul}", nul
    bom = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        return raw[bom:].decode("utf-8"), "", "", None
    except UnicodeDecodeError as e:
        return None, "invalid UTF-8", f"byte {bom + e.start}: {e.reason}", bom + e.start


def plain(value: Any) -> Any:
    """A JSON-safe copy of a field value (dates, decimals and bytes from Parquet become strings)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def mapped_record(rec: Any, fields: FieldMap, *, source: str, position: int | str, where: dict[str, Any],
                  ) -> tuple[Record | None, str, str]:
    """A record from a JSON object / table row through the field mapping, or (None, kind, detail)."""
    if not isinstance(rec, dict):
        return None, "not an object", f"record is a {type(rec).__name__}, not an object"
    if fields.text not in rec:
        return None, "missing text field", f"missing field {fields.text!r}"
    text = rec[fields.text]
    if not isinstance(text, str):
        return None, "text not a string", f"field {fields.text!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty document", f"field {fields.text!r} is blank"
    rid = f"{source}:{position}"
    if fields.id:
        value = rec.get(fields.id)
        if value is None or isinstance(value, dict | list):
            return None, "missing id field", f"field {fields.id!r} is {'absent' if value is None else 'not a scalar'}"
        rid = f"{source}:{value}"
    url = rec.get(fields.url) if fields.url else None
    extra = {k: plain(v) for k, v in rec.items() if k not in fields.columns()}
    return {"id": rid, "text": text.removeprefix("\ufeff"), "source": source,
            "url": url if isinstance(url, str) else "", "meta": {**where, "fields": extra}}, "", ""


__all__ = ["DEFAULT_MAX_DOC_BYTES", "Digest", "FieldMap", "Record", "bad_file", "bad_record", "decode_text",
           "file_digest", "mapped_record", "plain"]
