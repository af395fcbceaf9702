"""The data phase's stages chained on real text, as the lifecycle chains them (without the services).

Tiny Shakespeare in 40-line documents, with planted trouble: near-duplicate copies (a few words
changed), GSM8K questions pasted into some documents (contamination), and a second file that is a
truncated gzip. Asserted: every kind of trouble is handled by the stage meant for it, and nothing
good is lost on the way.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from stages import clean, collect, data_report, decontaminate, dedup, mix, validate
from stages.clean import CleanConfig
from stages.collect import CollectConfig
from stages.dataset import file_digest, meta_of, read_dataset
from stages.decontaminate import DecontaminateConfig
from stages.dedup import DedupConfig
from stages.mix import MixConfig
from stages.validate import ValidateConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SHAKESPEARE, GSM8K = SHARED / "tinyshakespeare" / "input.txt", SHARED / "gsm8k" / "train.jsonl"

pytestmark = pytest.mark.skipif(not (SHAKESPEARE.exists() and GSM8K.exists()),
                                reason=f"real data not present under {SHARED}")


def _corpus(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    lines = SHAKESPEARE.read_text().splitlines()
    docs = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines) - 40, 40)]
    rng = random.Random(7)
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:200]]
    planted: dict[str, list[str]] = {"contaminated": [], "near_copy": []}
    records = [{"text": d, "doc": f"orig-{i}"} for i, d in enumerate(docs)]
    for k, i in enumerate(rng.sample(range(len(docs)), 15)):  # a benchmark question pasted into a play
        records[i]["text"] += "\n\n" + questions[k]
        planted["contaminated"].append(records[i]["doc"])
    for j, i in enumerate(rng.sample(range(len(docs)), 30)):  # a copy with three words changed
        words = docs[i].split(" ")
        for k in rng.sample(range(len(words)), 3):
            words[k] = "forsooth"
        records.append({"text": " ".join(words), "doc": f"copy-{j}-of-{i}"})
        planted["near_copy"].append(f"copy-{j}-of-{i}")
    good = tmp_path / "plays.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    damaged = tmp_path / "damaged.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records[:20]).encode())
    damaged.write_bytes(whole[: len(whole) // 2])  # cut mid-stream: the first records are readable
    return good, damaged, planted


def test_real_text_through_collect_clean_dedup_decontaminate_mix_validate(tmp_path: Path) -> None:
    good, damaged, planted = _corpus(tmp_path)
    raw = collect.run(CollectConfig(output_dir=tmp_path / "collect", builtin_text=False, arithmetic_problems=0,
                                    files=(str(good), str(damaged)), id_field="doc"))
    raw_df = read_dataset(raw.dataset)
    from_damaged = raw_df[raw_df["source"] == "file:damaged"]
    assert 0 < len(from_damaged) < 20  # the records before the damage are kept
    quarantined = [json.loads(line) for line in raw.quarantine.read_text().splitlines()]
    assert any(q["file"] == str(damaged) and q["offset"] is not None for q in quarantined), quarantined

    cleaned = clean.run(CleanConfig(input_dir=raw.dataset, output_dir=tmp_path / "clean"))
    kept_share = cleaned.metrics["data/rows_out"] / cleaned.metrics["data/rows_in"]
    assert kept_share > 0.5, json.loads(cleaned.report.read_text())["dropped"]

    deduped = dedup.run(DedupConfig(input_dir=cleaned.dataset, output_dir=tmp_path / "dedup"))
    after_dedup = read_dataset(deduped.dataset)
    ids = set(after_dedup["id"])
    # The damaged file repeats the first 20 documents of the good one: exact duplicates, dropped.
    assert not any(i.startswith("file:damaged") for i in ids)
    clean_ids = set(read_dataset(cleaned.dataset)["id"])
    copies = [c for c in planted["near_copy"] if f"file:plays:{c}" in clean_ids]
    originals = {f"file:plays:orig-{c.rsplit('-', 1)[1]}" for c in copies}
    assert len(copies) >= 20
    assert sum(f"file:plays:{c}" not in ids for c in copies) >= 0.9 * len(copies)  # recall on planted copies
    assert (originals & clean_ids) <= ids  # the original of each copy is the one kept

    decon = decontaminate.run(DecontaminateConfig(input_dir=deduped.dataset, output_dir=tmp_path / "decon",
                                                  eval_files=(GSM8K,)))
    removed = {json.loads(line)["id"] for line in decon.contaminated.read_text().splitlines()}
    expected = {f"file:plays:{d}" for d in planted["contaminated"]} & ids
    assert expected and removed == expected  # every planted one, and nothing else

    mixed = mix.run(MixConfig(input_dir=decon.dataset, output_dir=tmp_path / "mix"))
    checked = validate.run(ValidateConfig(dataset=mixed.dataset, output_dir=tmp_path / "validate", min_rows=50))
    assert checked.success, checked.failed

    final = read_dataset(mixed.dataset)
    meta = meta_of(final.iloc[0])
    assert meta["raw_md5"] == file_digest(good) and meta["language"] == "en"  # lineage to the raw file survives

    report = data_report.build({"collect": tmp_path / "collect", "clean": tmp_path / "clean",
                                "dedup": tmp_path / "dedup", "decontaminate": tmp_path / "decon",
                                "mix": tmp_path / "mix", "validate": tmp_path / "validate"}, tmp_path / "report")
    assert report.png.read_bytes()[:4] == b"\x89PNG"
    assert "| decontaminate |" in report.markdown and f"{len(final):,}" in report.markdown
