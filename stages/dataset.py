"""The one on-disk dataset format every data stage reads and writes.

A dataset is a directory of Parquet shards `part-00000.parquet, ...`, each with columns
`id` (str), `text` (str), `source` (str), `url` (str, "" when the record has none), `meta` (str: a
JSON object). Few, large shards keep DVC fast (it hashes per file). Writes are atomic: shards go to
a temporary sibling directory that is renamed into place last, so a reader never sees half a dataset.

Every data stage writes the same three things under its output directory: `dataset/`, `report.json`
(with the `fingerprint` of its config and inputs, so an unchanged re-run is a no-op) and
`quarantine.jsonl` (one row per record or file it could not use, naming file, line or offset, and
reason). `QuarantineLog`, `fingerprint`, `finished_report` and `write_report` are those pieces.

Stages that work shard by shard take a `mapper` with the signature of the builtin `map` (the
default): the flows pass a Ray one (`infra.ray_map`), so the same code runs in a test, on a laptop
and on a cluster without the stage importing Ray.
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = ("id", "text", "source", "url", "meta")
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`; pass it to `commit_dir` when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` (old content moved aside first, then deleted)."""
    final = Path(final)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary sibling (same suffix, so savefig/np.save keep it), then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    return write_atomically(path, write)


SHARD_BYTES = 64 << 20  # text per shard at most: a shard is what one worker holds in memory at once
# Text per Parquet row group, about: a reader decodes a whole row group at once (pyarrow's
# iter_batches included), so one 64 MB row group cost every reader ~160 MB of RSS where 8 MB ones cost ~40.
ROW_GROUP_BYTES = 8 << 20


def text_lengths(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Characters of each row's text (0 where null), as `len(text)` counts them."""
    return pc.utf8_length(table.column("text")).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group that give about ROW_GROUP_BYTES of text: `pq.write_table(t, f, row_group_size=...)`."""
    text = int(text_lengths(table).sum())
    return max(1, table.num_rows * ROW_GROUP_BYTES // text) if text else max(1, table.num_rows)


class ShardWriter:
    """Dataset shards `<prefix>-00000.parquet, ...` in `directory`, written from SCHEMA tables as they come.

    A shard closes at `shard_rows` rows or `shard_bytes` of text, whichever comes first (the row that
    reaches the byte limit is the shard's last); rows reach the file in row groups that close once
    they hold ROW_GROUP_BYTES of text (so below twice that plus one written table). Memory is one row
    group plus the table being written, whatever the shard size.
    """

    def __init__(self, directory: Path, prefix: str = "part", shard_rows: int = 50_000,
                 shard_bytes: int = SHARD_BYTES) -> None:
        self.directory, self.prefix = Path(directory), prefix
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.shards = self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = self._shard_size = 0  # of the open shard
        self._group: list[pa.Table] = []
        self._group_size = 0

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        lengths = text_lengths(table)
        pos = 0
        while pos < len(lengths):
            room = self.shard_rows - self._shard_rows
            cum = np.cumsum(lengths[pos:pos + room]) + self._shard_size
            full = int(np.searchsorted(cum, self.shard_bytes, side="left"))  # first row reaching the byte limit
            take = min(room, full + 1, len(cum))
            self._add(table.slice(pos, take), int(cum[take - 1] - self._shard_size))
            pos += take
            if self._shard_rows >= self.shard_rows or self._shard_size >= self.shard_bytes:
                self._close_shard()

    def _add(self, piece: pa.Table, size: int) -> None:
        self._group.append(piece)
        self._group_size += size
        self._shard_rows += piece.num_rows
        self._shard_size += size
        self.rows += piece.num_rows
        if self._group_size >= ROW_GROUP_BYTES:
            self._flush_group()

    def _flush_group(self) -> None:
        if self._writer is None:
            path = self.directory / f"{self.prefix}-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA)
        if self._group:
            group = pa.concat_tables(self._group)
            self._writer.write_table(group, row_group_size=max(1, group.num_rows))
        self._group, self._group_size = [], 0

    def _close_shard(self) -> None:
        self._flush_group()
        self._writer.close()
        self._writer = None
        self.shards += 1
        self._shard_rows = self._shard_size = 0

    def close(self, empty_shard: bool = True) -> int:
        """Close the open shard (and, with `empty_shard`, write an empty one if none was written). Returns rows."""
        if self._shard_rows or (empty_shard and self.shards == 0):
            self._close_shard()
        return self.rows


def as_dataset_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """A batch read from a shard, in SCHEMA: `url` added where the shard predates it, null urls as ""."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    if "url" not in table.column_names:
        table = table.add_column(min(3, table.num_columns), "url", pa.array([""] * table.num_rows, pa.string()))
    else:
        table = table.set_column(table.column_names.index("url"), "url", pc.fill_null(table.column("url"), ""))
    return table.select(list(COLUMNS)).cast(SCHEMA)


def iter_batches(shard: Path, batch_rows: int = 8192, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of one shard, decoded one row group at a time.

    pyarrow's own `ParquetFile.iter_batches` reads ahead: measured on a 64 MB shard of 8 MB row groups,
    its pool peaked at 104 MB where one row group at a time peaks at ~40 MB.
    """
    f = pq.ParquetFile(shard)
    for group in range(f.num_row_groups):
        yield from f.read_row_group(group, columns=columns).to_batches(max_chunksize=batch_rows)


def iter_tables(path: Path, batch_rows: int = 8192) -> Iterator[tuple[Path, pa.Table]]:
    """(shard, batch in SCHEMA) for every batch of every shard of a dataset: rows stay in Arrow, not Python objects."""
    for shard in dataset_shards(path):
        for batch in iter_batches(shard, batch_rows):
            yield shard, as_dataset_table(batch)


def write_dataset(records: Iterable[dict[str, Any]], out_dir: Path, shard_rows: int = 50_000,
                  shard_bytes: int = SHARD_BYTES) -> int:
    """Write records (dicts with the five columns; `meta` may be a dict) atomically. Returns rows.

    A shard closes at `shard_rows` rows or `shard_bytes` of text, whichever comes first, so memory
    here and in every stage that reads a shard at a time is bounded whatever the documents' sizes.
    Records are converted to Arrow a row group's worth at a time (ShardWriter).
    """
    tmp = atomic_dir(out_dir)
    writer = ShardWriter(tmp, shard_rows=shard_rows, shard_bytes=shard_bytes)
    batch: list[dict[str, Any]] = []
    size = 0
    for rec in records:
        meta = rec.get("meta") or {}
        text = rec["text"]
        batch.append({
            "id": str(rec["id"]), "text": text, "source": rec["source"], "url": rec.get("url") or "",
            "meta": meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True),
        })
        size += len(text) if isinstance(text, str) else 0
        if len(batch) >= 1024 or size >= ROW_GROUP_BYTES:
            writer.write(pa.Table.from_pylist(batch, schema=SCHEMA))
            batch, size = [], 0
    if batch:
        writer.write(pa.Table.from_pylist(batch, schema=SCHEMA))
    rows = writer.close()
    commit_dir(tmp, Path(out_dir))
    return rows


def write_kept(input_dir: Path, keep: np.ndarray, out_dir: Path, batch_rows: int = 8192,
               on_batch: Callable[[int, pa.Table], None] | None = None) -> tuple[int, Counter, Counter]:
    """Copy the rows of a dataset where `keep` (bool, one per row in corpus order) is True, atomically.

    Rows go from Parquet to Parquet in Arrow batches, never as Python objects, so memory is a batch
    and a row group whatever the corpus size. `on_batch(offset, table)` sees every input batch (its
    first row's corpus index). Returns (rows written, Counter of sources in, Counter of sources kept).
    """
    rows_in = sum(pq.ParquetFile(shard).metadata.num_rows for shard in dataset_shards(input_dir))
    if rows_in != len(keep):
        raise ValueError(f"write_kept: {input_dir} has {rows_in} rows, the mask {len(keep)}")
    tmp = atomic_dir(out_dir)
    writer = ShardWriter(tmp)
    sources_in: Counter = Counter()
    sources_out: Counter = Counter()
    offset = 0
    for _, table in iter_tables(input_dir, batch_rows):
        mask = keep[offset:offset + table.num_rows]
        sources = table.column("source").to_pylist()
        sources_in.update(sources)
        sources_out.update(itertools.compress(sources, mask.tolist()))
        if on_batch is not None:
            on_batch(offset, table)
        writer.write(table.filter(pa.array(mask, type=pa.bool_())))
        offset += table.num_rows
    rows = writer.close()
    commit_dir(tmp, Path(out_dir))
    return rows, sources_in, sources_out


def release_memory() -> None:
    """Hand freed heap pages back to the OS, between stages and shards that run in one process.

    Arrow's allocator (mimalloc) and glibc's malloc keep what was freed for their own reuse, and one
    cannot reuse the other's: measured after `clean` on two 64 MB shards, RSS 572 MB with nothing
    alive; 273 MB after Arrow's release, 218 MB after glibc's `malloc_trim`. Without this, dedup
    running after clean in one process was OOM-killed under a 640 MB limit it fits in alone.
    """
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def dataset_shards(path: Path) -> list[Path]:
    """The shard files of a dataset directory, in order."""
    files = sorted(Path(path).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in dataset directory {path}")
    return files


def read_shard(path: Path) -> pd.DataFrame:
    df = pq.read_table(path).to_pandas()
    if "url" not in df.columns:  # written before the url column existed
        df.insert(3, "url", "")
    return df


def read_dataset(path: Path, sources: Iterable[str] | None = None) -> pd.DataFrame:
    """All shards of a dataset as one DataFrame (optionally only some sources)."""
    df = pd.concat([read_shard(f) for f in dataset_shards(path)], ignore_index=True)
    if sources is not None:
        df = df[df["source"].isin(list(sources))].reset_index(drop=True)
    return df


def iter_records(path: Path, batch_rows: int = 8192) -> Iterator[dict[str, Any]]:
    """Every record of a dataset, streamed batch by batch (memory bounded by one batch)."""
    for shard in dataset_shards(path):
        for batch in iter_batches(shard, batch_rows):
            for rec in batch.to_pylist():
                rec.setdefault("url", "")
                yield rec


def meta_of(row: Any) -> dict[str, Any]:
    return json.loads(row["meta"]) if row["meta"] else {}


EPOCH_SUFFIX = re.compile(r"#epoch\d+$")  # what the mix appends to a repeated document's id


def base_id(record_id: str) -> str:
    """The id a repeated copy was made from: "doc#epoch2" -> "doc".

    >>> base_id("stdlib:json:loads#epoch3"), base_id("file:web:17")
    ('stdlib:json:loads', 'file:web:17')
    """
    return EPOCH_SUFFIX.sub("", record_id)


def match_key(source: str, patterns: Iterable[str]) -> str | None:
    """The pattern (a source name or a glob such as "file:*") naming `source`: an exact name first, else the first glob that matches.

    >>> match_key("folder:web", ["*:books", "*:web"]), match_key("file:web", ["file:web", "*"]), match_key("x", ["y"])
    ('*:web', 'file:web', None)
    """
    patterns = list(patterns)
    if source in patterns:
        return source
    return next((p for p in patterns if fnmatch.fnmatchcase(source, p)), None)


def is_heldout(record_id: str, fraction: float) -> bool:
    """Stable train/held-out split by id (same answer in every process and every run).

    Copies the mix made of a document fall on the same side as the document, or they would leak.
    """
    digest = hashlib.blake2b(base_id(record_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --- what every data stage writes besides its dataset -------------------------------------------

RAW_CHARS = 200  # quarantine keeps a prefix only: enough to debug, not a second copy of the data


class QuarantineLog:
    """`quarantine.jsonl`, streamed: rows are written as they come, the file appears complete at close.

        with QuarantineLog(out / "quarantine.jsonl") as q:
            q.add(file=path, line=7, reason="invalid JSON: ...", raw=line_bytes)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        self._file = open(self._tmp, "w", encoding="utf-8")
        self.count = 0

    def add(self, *, file: str | Path, reason: str, line: int | None = None, offset: int | None = None,
            raw: str | bytes = "", **extra: Any) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        row = {"file": str(file), "line": line, "offset": offset, "reason": reason, "raw": raw[:RAW_CHARS], **extra}
        self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rows already shaped like `add`'s (e.g. returned by a worker)."""
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self.count += 1

    def close(self) -> Path:
        if not self._file.closed:
            self._file.close()
            os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> QuarantineLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # a failed stage leaves the previous quarantine file as it was
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def file_digest(*paths: Path) -> str:
    """md5 of the files' bytes in order, read in 1 MB chunks (for one file DVC's hash, so lineage digests agree)."""
    h = hashlib.md5()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(config: dict[str, Any], inputs: Iterable[Path]) -> str:
    """One digest of a stage's config (minus its output_dir) and the bytes of every input file.

    A folder stands for every file below it. Inputs that do not exist are part of the digest by name,
    so a run that failed on a missing file is not taken as finished once the file appears.
    """
    h = hashlib.md5(json.dumps({k: v for k, v in config.items() if k != "output_dir"},
                               sort_keys=True, default=str).encode())
    for root in inputs:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f).encode())
            h.update(file_digest(f).encode() if f.is_file() else b"<missing>")
    return h.hexdigest()


def finished_report(out_dir: Path, fp: str) -> dict[str, Any] | None:
    """The report of an earlier run with the same fingerprint whose dataset is complete, else None."""
    report = Path(out_dir) / "report.json"
    try:
        previous = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("fingerprint") != fp or not any((Path(out_dir) / "dataset").glob("*.parquet")):
        return None
    return previous


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """`report.json`, written last: its presence (with the fingerprint) marks the stage finished."""
    return write_atomically(Path(out_dir) / "report.json",
                            lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str)))
