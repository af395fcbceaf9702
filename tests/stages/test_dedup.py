"""dedup: exact duplicates by hand, near-duplicates planted by small edits of real Shakespeare paragraphs."""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import dedup
from stages.dataset import read_dataset, write_dataset
from stages.dedup import DedupConfig, ShardTask, signature_shard

SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")


def recs(texts, prefix="r", source="s"):
    return [{"id": f"{prefix}{i}", "text": t, "source": source} for i, t in enumerate(texts)]


def paragraphs(min_words: int = 50) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if len(p.split()) >= min_words]


def edit(text: str, k: int, rng: random.Random) -> str:
    """k word edits, each a replacement, an insertion or a deletion at a random place."""
    w = text.split()
    for _ in range(k):
        op, i = rng.choice("rid"), rng.randrange(len(w))
        if op == "r":
            w[i] = rng.choice(["lord", "sweet", "thou", "night", "grace", "blood"])
        elif op == "i":
            w.insert(i, rng.choice(["indeed", "alas", "good", "now"]))
        else:
            del w[i]
    return " ".join(w)


def kept_ids(result) -> list[str]:
    return read_dataset(result.dataset)["id"].tolist()


def test_exact_duplicates_first_kept_and_bad_rows_quarantined(tmp_path):
    texts = ["The quick brown fox jumps.", "the  QUICK brown\nfox jumps.", "Something else entirely here.",
             "The quick brown fox jumps.", "A third text, unlike the others."]
    inp = tmp_path / "in"
    write_dataset(recs(texts), inp, shard_rows=2)  # duplicates across shards
    # a null text in its own shard, written directly (write_dataset would refuse nothing, but be explicit)
    pq.write_table(pa.table({"id": ["bad"], "text": pa.array([None], pa.string()), "source": ["s"], "url": [""],
                             "meta": ["{}"]}), inp / "part-00009.parquet")
    res = dedup.run(DedupConfig(input_dir=inp, output_dir=tmp_path / "out"))
    assert kept_ids(res) == ["r0", "r2", "r4"]
    report = json.loads(res.report.read_text())
    assert report["dropped"] == {"exact": 2, "near": 0}
    assert (report["rows_in"], report["rows_out"], report["quarantined"]) == (6, 3, 1)
    assert report["sources"] == {"s": {"in": 6, "out": 3}}
    (row,) = [json.loads(line) for line in res.quarantine.read_text().splitlines()]
    assert row["id"] == "bad" and row["reason"] == "text is null" and row["file"].endswith("part-00009.parquet")
    assert res.metrics["data/dedup/exact/dropped"] == 2 and res.metrics["data/dedup/near/dropped"] == 0


def test_exact_only_keeps_near_duplicates(tmp_path):
    base = " ".join(f"word{i}" for i in range(60))
    write_dataset(recs([base, base.replace("word30", "other")]), tmp_path / "in")
    near = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "a"))
    exact = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "b", near=False))
    assert kept_ids(near) == ["r0"] and kept_ids(exact) == ["r0", "r1"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="bands \\* rows must equal num_perm"):
        DedupConfig(input_dir=Path("x"), output_dir=Path("y"), num_perm=128, bands=20, rows=4)
    with pytest.raises(ValueError, match="jaccard_threshold"):
        DedupConfig(input_dir=Path("x"), output_dir=Path("y"), jaccard_threshold=1.5)


@needs_shakespeare
def test_planted_near_duplicates_found_with_default_config(tmp_path):
    rng = random.Random(0)
    originals = paragraphs()[:600]
    planted = {}
    for j, i in enumerate(rng.sample(range(len(originals)), 150)):
        planted[f"d{j}"] = (f"p{i}", edit(originals[i], rng.randint(1, 3), rng))
    rows = recs(originals, "p") + [{"id": k, "text": t, "source": "s"} for k, (_, t) in planted.items()]
    write_dataset(rows, tmp_path / "in", shard_rows=200)
    res = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out"))
    dropped = {r["id"] for r in rows} - set(kept_ids(res))
    true_pos = len(dropped & set(planted))
    precision, recall = true_pos / max(1, len(dropped)), true_pos / len(planted)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    report = json.loads(res.report.read_text())
    assert report["dropped"]["near"] == len(dropped)
    example = report["clusters"]["examples"][0]
    assert example["size"] == 2 and len(example["snippets"][0]) <= 150
    first, copy = example["ids"]
    assert planted[copy][0] == first  # the cluster pairs the copy with its own original, original kept


@needs_shakespeare
def test_documents_sharing_a_few_lines_are_not_merged(tmp_path):
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if len(line.split()) >= 6]
    # 40 documents of 14 lines: four lines (a quarter of the words) in common, ten of their own
    docs = ["\n".join(lines[:4] + lines[4 + 10 * i: 14 + 10 * i]) for i in range(40)]
    write_dataset(recs(docs), tmp_path / "in")
    res = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out"))
    assert len(kept_ids(res)) == 40
    # the case is not trivially far apart: LSH alone makes some of them candidates, verification refuses them
    lsh_only = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "lsh", jaccard_threshold=None))
    assert len(kept_ids(lsh_only)) < 40


@needs_shakespeare
def test_mapper_contract_process_pool_equals_map(tmp_path):
    write_dataset(recs(paragraphs()[:300]), tmp_path / "in", shard_rows=100)
    tasks = [ShardTask(str(p), 5, 128, 1, 64) for p in sorted((tmp_path / "in").glob("*.parquet"))]
    local = list(map(signature_shard, tasks))
    with ProcessPoolExecutor(2) as pool:
        remote = list(pool.map(signature_shard, tasks))
    for a, b in zip(local, remote, strict=True):
        assert a.signatures.dtype == np.uint32 and a.signatures.shape == (100, 128)
        assert np.array_equal(a.signatures, b.signatures) and np.array_equal(a.exact, b.exact)
    cfg = DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "a")
    with ProcessPoolExecutor(2) as pool:
        pooled = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "b"), mapper=pool.map)
    assert kept_ids(dedup.run(cfg)) == kept_ids(pooled)


def test_unchanged_rerun_is_a_no_op_and_a_changed_config_is_not(tmp_path):
    write_dataset(recs(["one two three four five six", "one two three four five six", "seven"]), tmp_path / "in")
    cfg = DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    first = dedup.run(cfg)
    stamp = first.report.stat().st_mtime_ns
    again = dedup.run(cfg)
    assert again.report.stat().st_mtime_ns == stamp and again.metrics == first.metrics
    other = dedup.run(DedupConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out", exact=False, near=False))
    assert other.metrics["data/rows_out"] == 3 and other.report.stat().st_mtime_ns != stamp
