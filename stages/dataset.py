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

import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
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


def write_dataset(records: Iterable[dict[str, Any]], out_dir: Path, shard_rows: int = 50_000,
                  shard_bytes: int = SHARD_BYTES) -> int:
    """Write records (dicts with the five columns; `meta` may be a dict) atomically. Returns rows.

    A shard closes at `shard_rows` rows or `shard_bytes` of text, whichever comes first, so memory
    here and in every stage that reads a shard at a time is bounded whatever the documents' sizes.
    """
    tmp = atomic_dir(out_dir)
    batch: list[dict[str, Any]] = []
    shard = rows = size = 0

    def flush() -> None:
        nonlocal shard, batch, size
        table = pa.Table.from_pylist(batch, schema=SCHEMA)
        pq.write_table(table, tmp / f"part-{shard:05d}.parquet")
        shard += 1
        batch, size = [], 0

    for rec in records:
        meta = rec.get("meta") or {}
        text = rec["text"]
        batch.append({
            "id": str(rec["id"]), "text": text, "source": rec["source"], "url": rec.get("url") or "",
            "meta": meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True),
        })
        rows += 1
        size += len(text) if isinstance(text, str) else 0
        if len(batch) >= shard_rows or size >= shard_bytes:
            flush()
    if batch or shard == 0:
        flush()
    commit_dir(tmp, Path(out_dir))
    return rows


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
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows):
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
