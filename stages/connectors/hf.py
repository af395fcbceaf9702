"""Hugging Face `datasets`: a dataset saved with `save_to_disk`, or a Hub name when online.

A local directory is opened with `load_from_disk` (memory-mapped Arrow: rows are read batch by
batch, never copied whole into memory); every split of a `DatasetDict` is read, in name order. An
entry that is not a local path is a Hub name, `owner/name` or `owner/name:config`, read with
`load_dataset(..., streaming=True)`, so a large Hub corpus is streamed rather than downloaded first.
`datasets` is imported only here, and only when such an entry is configured (it is slow to import).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.connectors import DEFAULT_MAX_DOC_BYTES, FieldMap, Record, bad_file, bad_record, mapped_record
from stages.connectors.files import too_long
from stages.dataset import QuarantineLog, file_digest

BATCH_ROWS = 1000


def hf_name(entry: str) -> str:
    """The source name of an entry: a directory's name, or the Hub id without its owner and config.

    >>> hf_name("/data/my_corpus"), hf_name("openai/gsm8k:main")
    ('my_corpus', 'gsm8k')
    """
    return Path(entry.split(":")[0]).name if not Path(entry).exists() else Path(entry).name


def _arrow_md5(ds: Any) -> tuple[str, str]:
    """(path, md5) of the Arrow files behind a local split: the md5 of their bytes in order."""
    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", [])]
    return (str(files[0].parent) if files else "", file_digest(*files))


def hf_records(entry: str, q: QuarantineLog, fields: FieldMap = FieldMap(),
               max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Record]:
    source = f"hf:{hf_name(entry)}"
    try:
        import datasets

        if Path(entry).exists():
            loaded = datasets.load_from_disk(entry)
            hub = False
        else:
            name, _, config = entry.partition(":")
            loaded = datasets.load_dataset(name, config or None, streaming=True)
            hub = True
    except Exception as e:  # noqa: BLE001 - a dataset that cannot be opened is a file-level row, any cause
        bad_file(q, file=entry, kind="unreadable dataset", detail=f"{type(e).__name__}: {str(e)[:300]}",
                 source=source)
        return
    splits = sorted(loaded.items()) if hasattr(loaded, "keys") else [("", loaded)]
    for split, ds in splits:
        where_file = f"{entry}[{split}]" if split else entry
        columns = list(ds.column_names or []) if getattr(ds, "column_names", None) is not None else None
        if columns is not None and fields.text not in columns:
            bad_file(q, file=where_file, kind="missing text column", source=source, columns=columns,
                     detail=f"no column {fields.text!r}; the dataset's columns are {', '.join(columns)}")
            continue
        path, md5 = ("", "") if hub else _arrow_md5(ds)
        row = 0
        try:
            for rec in _rows(ds, hub):
                row += 1
                if row == 1 and columns is None and isinstance(rec, dict) and fields.text not in rec:
                    # A Hub stream has no schema up front: its first row stands for the split.
                    bad_file(q, file=where_file, kind="missing text column", source=source, columns=list(rec),
                             detail=f"no column {fields.text!r}; the dataset's columns are {', '.join(rec)}")
                    break
                text = rec.get(fields.text)
                if isinstance(text, str) and too_long(text, max_doc_bytes):
                    bad_record(q, file=where_file, kind="document too large", source=source, line=row, row=row,
                               detail=f"{len(text.encode())} bytes > max_doc_bytes={max_doc_bytes}")
                    continue
                where = {"path": path or entry, "raw_md5": md5, "split": split, "row": row}
                position = f"{split}:{row}" if split else row
                record, kind, detail = mapped_record(rec, fields, source=source, position=position, where=where)
                if record is None:
                    bad_record(q, file=where_file, kind=kind, detail=detail, source=source, line=row, row=row)
                else:
                    yield record
        except Exception as e:  # noqa: BLE001 - a stream that breaks keeps what it gave
            bad_file(q, file=where_file, kind="dataset read failed", source=source, line=row + 1, partial=row > 0,
                     detail=f"after row {row}: {type(e).__name__}: {str(e)[:300]}")


def _rows(ds: Any, hub: bool) -> Iterator[dict[str, Any]]:
    if hub:
        yield from ds
        return
    for batch in ds.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))
