"""The dataset writer and the Arrow copy path that keep the data stages' memory bounded (stages/dataset.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import dataset
from stages.dataset import SCHEMA, dataset_shards, iter_records, read_dataset, write_dataset, write_kept


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"d{i}", "text": None if i % 17 == 5 else "x" * rng.randrange(0, 300),
             "source": f"s{i % 3}", "url": None if i % 2 else f"http://e/{i}", "meta": {"i": i}} for i in range(n)]


def expected_shards(recs: list[dict], shard_rows: int, shard_bytes: int) -> list[int]:
    """Rows per shard under the rule: close at shard_rows rows or once shard_bytes of text is reached."""
    sizes, rows, size = [], 0, 0
    for r in recs:
        rows += 1
        size += len(r["text"]) if isinstance(r["text"], str) else 0
        if rows >= shard_rows or size >= shard_bytes:
            sizes.append(rows)
            rows = size = 0
    if rows or not sizes:
        sizes.append(rows)
    return sizes


@pytest.mark.parametrize("shard_rows,shard_bytes", [(50, 10**9), (10**6, 2_000), (37, 3_000)])
def test_shards_close_at_rows_or_text_bytes_in_small_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               shard_rows: int, shard_bytes: int) -> None:
    monkeypatch.setattr(dataset, "ROW_GROUP_BYTES", 700)
    recs = records(400)
    assert write_dataset(iter(recs), tmp_path / "d", shard_rows=shard_rows, shard_bytes=shard_bytes) == 400
    shards = dataset_shards(tmp_path / "d")
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == expected_shards(recs, shard_rows, shard_bytes)
    for s in shards:
        f = pq.ParquetFile(s)
        assert f.schema_arrow == SCHEMA
        for g in range(f.num_row_groups):  # a row group closes once it holds 700 characters: below 2 x 700 + a text
            texts = f.read_row_group(g, columns=["text"]).column("text").to_pylist()
            assert sum(len(t or "") for t in texts) < 2 * 700 + 300
        if f.metadata.num_rows > 30:
            assert f.num_row_groups > 1
    back = list(iter_records(tmp_path / "d"))
    assert [r["id"] for r in back] == [r["id"] for r in recs]
    assert [r["text"] for r in back] == [r["text"] for r in recs]
    assert [r["url"] for r in back] == [r["url"] or "" for r in recs]
    assert [json.loads(r["meta"]) for r in back] == [r["meta"] for r in recs]


def test_empty_input_still_writes_one_readable_shard(tmp_path: Path) -> None:
    assert write_dataset([], tmp_path / "d") == 0
    assert len(read_dataset(tmp_path / "d")) == 0 and len(dataset_shards(tmp_path / "d")) == 1


def test_write_kept_copies_exactly_the_masked_rows_in_order(tmp_path: Path) -> None:
    recs = records(300, seed=1)
    write_dataset(iter(recs), tmp_path / "in", shard_rows=64)
    # a shard written before the url column existed, with a null url elsewhere: both read as ""
    pq.write_table(pa.table({"id": ["old"], "text": ["t"], "source": ["s0"], "meta": ["{}"]}),
                   tmp_path / "in" / "part-00099.parquet")
    keep = np.random.default_rng(0).random(301) < 0.5
    seen: list[int] = []
    rows, sources_in, sources_out = write_kept(tmp_path / "in", keep, tmp_path / "out", batch_rows=25,
                                               on_batch=lambda offset, table: seen.append(offset))
    all_rows = [r["id"] for r in recs] + ["old"]
    out = read_dataset(tmp_path / "out")
    assert out["id"].tolist() == [i for i, k in zip(all_rows, keep, strict=True) if k] and rows == keep.sum()
    assert out["url"].isna().sum() == 0 and set(out.columns) == {"id", "text", "source", "url", "meta"}
    all_sources = [r["source"] for r in recs] + ["s0"]
    assert sources_in == {s: all_sources.count(s) for s in set(all_sources)}
    assert sum(sources_out.values()) == keep.sum()
    assert seen[0] == 0 and seen == sorted(seen) and len(seen) > len(dataset_shards(tmp_path / "in"))
    with pytest.raises(ValueError, match="301 rows, the mask 300"):
        write_kept(tmp_path / "in", keep[:300], tmp_path / "bad")


def test_row_group_rows_gives_row_groups_of_about_row_group_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "ROW_GROUP_BYTES", 1_000)
    table = pa.Table.from_pylist([{"id": str(i), "text": "y" * 100, "source": "s", "url": "", "meta": "{}"}
                                  for i in range(100)], schema=SCHEMA)
    assert dataset.row_group_rows(table) == 10
    assert dataset.row_group_rows(table.slice(0, 0)) == 1  # an empty shard is still written
