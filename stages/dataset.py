"""The one on-disk dataset format every data stage reads and writes.

A dataset is a directory of Parquet shards `part-00000.parquet, ...`, each with columns
`id` (str), `text` (str), `source` (str), `meta` (str: a JSON object). Few, large shards keep DVC
fast (it hashes per file). Writes are atomic: shards go to a temporary sibling directory that is
renamed into place last, so a reader never sees half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("id", "text", "source", "meta")
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


def write_dataset(records: Iterable[dict[str, Any]], out_dir: Path, shard_rows: int = 50_000) -> int:
    """Write records (dicts with the four columns; `meta` may be a dict) atomically. Returns rows."""
    tmp = atomic_dir(out_dir)
    batch: list[dict[str, Any]] = []
    shard = rows = 0

    def flush() -> None:
        nonlocal shard, batch
        table = pa.Table.from_pylist(batch, schema=SCHEMA)
        pq.write_table(table, tmp / f"part-{shard:05d}.parquet")
        shard += 1
        batch = []

    for rec in records:
        meta = rec.get("meta") or {}
        batch.append({
            "id": str(rec["id"]), "text": rec["text"], "source": rec["source"],
            "meta": meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True),
        })
        rows += 1
        if len(batch) >= shard_rows:
            flush()
    if batch or shard == 0:
        flush()
    commit_dir(tmp, Path(out_dir))
    return rows


def read_dataset(path: Path, sources: Iterable[str] | None = None) -> pd.DataFrame:
    """All shards of a dataset as one DataFrame (optionally only some sources)."""
    files = sorted(Path(path).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in dataset directory {path}")
    df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    if sources is not None:
        df = df[df["source"].isin(list(sources))].reset_index(drop=True)
    return df


def meta_of(row: Any) -> dict[str, Any]:
    return json.loads(row["meta"]) if row["meta"] else {}


def is_heldout(record_id: str, fraction: float) -> bool:
    """Stable train/held-out split by id (same answer in every process and every run)."""
    digest = hashlib.blake2b(record_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction
