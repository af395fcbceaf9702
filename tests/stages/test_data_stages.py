"""The data stages on real inputs: the standard library, generated problems, crafted bad records."""

from __future__ import annotations

import doctest
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import clean, collect, dedup, validate
from stages.clean import CleanConfig
from stages.collect import CollectConfig
from stages.dataset import file_digest, read_dataset, write_dataset
from stages.dedup import DedupConfig
from stages.tasks import arithmetic
from stages.tracking import RecordingTracker
from stages.validate import DataValidationError, ValidateConfig, raise_for_failures

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def rec(i: int, text: str | None, source: str = "arithmetic") -> dict:
    return {"id": f"r{i}", "text": text, "source": source, "meta": {}}


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> collect.CollectResult:
    """The default corpus, collected once: the stdlib scan is the slow part (a few seconds)."""
    return collect.run(CollectConfig(output_dir=tmp_path_factory.mktemp("raw")))


@pytest.fixture(scope="module")
def cleaned(builtin: collect.CollectResult, tmp_path_factory: pytest.TempPathFactory) -> clean.CleanResult:
    return clean.run(CleanConfig(input_dir=builtin.dataset, output_dir=tmp_path_factory.mktemp("clean")))


# --- arithmetic ------------------------------------------------------------------------------


def test_doctests() -> None:
    for module in (arithmetic, clean, validate):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_arithmetic_is_deterministic_distinct_and_checkable() -> None:
    problems = arithmetic.generate(3000, seed=3)
    assert problems == arithmetic.generate(3000, seed=3)
    assert problems != arithmetic.generate(3000, seed=4)
    assert len({p.question for p in problems}) == 3000
    for p in problems:
        a, op, b, _, result = p.reasoning.split()
        assert max(int(a), int(b)) <= 20 and p.answer == int(result) >= 0
        assert p.answer == {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert arithmetic.extract_answer(arithmetic.target(p)) == str(p.answer)
    tests = sum(arithmetic.split_of(p.question, 0.1) == "test" for p in problems)
    assert 200 < tests < 400
    assert arithmetic.split_of(problems[0].question, 0.1) == arithmetic.split_of(problems[0].question, 0.1)


def test_extract_answer() -> None:
    assert arithmetic.extract_answer("<think>2 + 2 = 4</think> <answer>\n 4 </answer>") == "4"
    assert arithmetic.extract_answer("<answer>3</answer><answer>5</answer>") == "5"
    assert arithmetic.extract_answer("<answer>5") is None
    assert arithmetic.extract_answer("") is None


# --- collect ---------------------------------------------------------------------------------


def test_builtin_collection_is_real_text_with_unique_ids(builtin: collect.CollectResult) -> None:
    df = read_dataset(builtin.dataset)
    assert df["text"].str.len().sum() > 1_000_000
    assert set(df["source"]) == {"stdlib-docstrings", "stdlib-topics", "arithmetic"}
    assert df["id"].is_unique
    assert builtin.metrics["data/collect/stdlib-docstrings/rows"] > 1000
    assert builtin.metrics["data/collect/stdlib-topics/rows"] > 10
    assert builtin.metrics["data/collect/arithmetic/rows"] == 3000
    assert builtin.metrics["data/quarantined"] == 0 and builtin.quarantine.read_text() == ""
    # Parsed, not imported: modules with import-time side effects are still read.
    assert df["id"].str.startswith("stdlib:json:").any()
    assert not df["id"].str.contains(r"^stdlib:(?:idlelib|lib2to3|test)\b").any()
    meta = json.loads(df[df["source"] == "arithmetic"]["meta"].iloc[0])
    assert set(meta) == {"answer", "reasoning", "split"}


def test_max_builtin_chars_caps_each_builtin_source(tmp_path: Path) -> None:
    result = collect.run(CollectConfig(output_dir=tmp_path, max_builtin_chars=5000, arithmetic_problems=0))
    df = read_dataset(result.dataset)
    for source, texts in df.groupby("source")["text"]:
        assert 5000 <= texts.str.len().sum() < 5000 + texts.str.len().max(), source
    assert set(df["source"]) == {"stdlib-docstrings", "stdlib-topics"}


def test_jsonl_malformed_records_are_quarantined_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "first good line"}',
        b'{"text": "broken json"',
        b'{"text": "bad utf-8 \xff\xfe here"}',
        b'{"body": "no text field"}',
        b"",
        b'{"text": "last good line", "extra": 1}',
    ]) + b"\n")
    result = collect.run(CollectConfig(output_dir=tmp_path / "out", builtin_text=False,
                                       arithmetic_problems=0, files=(str(path),)))
    df = read_dataset(result.dataset)
    assert list(df["text"]) == ["first good line", "last good line"]
    assert list(df["source"]) == ["file:notes"] * 2 and df["id"].is_unique
    assert json.loads(df["meta"].iloc[1])["fields"] == {"extra": 1}
    bad = [json.loads(line) for line in result.quarantine.read_text().splitlines()]
    assert [(b["file"], b["line"]) for b in bad] == [(str(path), 2), (str(path), 3), (str(path), 4)]
    assert "JSON" in bad[0]["reason"] and "UTF-8" in bad[1]["reason"] and "'text'" in bad[2]["reason"]
    assert result.metrics["data/quarantined"] == 3
    assert result.metrics["data/collect/file_notes/rows"] == 2


def test_gzip_and_parquet_files_with_custom_text_field(tmp_path: Path) -> None:
    gz = tmp_path / "qa.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": "Why is the sky blue?"}) + "\n")
        f.write(json.dumps({"question": 42}) + "\n")
    table = tmp_path / "more.parquet"
    pq.write_table(pa.table({"question": ["What is a list?", None]}), table)
    result = collect.run(CollectConfig(output_dir=tmp_path / "out", builtin_text=False, arithmetic_problems=0,
                                       files=(str(gz), str(table)), text_field="question"))
    df = read_dataset(result.dataset)
    assert list(df["text"]) == ["Why is the sky blue?", "What is a list?"]
    assert list(df["source"]) == ["file:qa", "file:more"]
    bad = [json.loads(line) for line in result.quarantine.read_text().splitlines()]
    assert [(Path(b["file"]).name, b["line"]) for b in bad] == [("qa.jsonl.gz", 2), ("more.parquet", 2)]


def test_folder_connector_reads_txt_and_md_recursively(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Plain text file.", encoding="utf-8")
    (docs / "sub" / "b.md").write_text("# Title\n\nMarkdown body.", encoding="utf-8")
    (docs / "skip.py").write_text("print('not text')", encoding="utf-8")
    (docs / "bad.txt").write_bytes(b"\xff\xfe broken")
    result = collect.run(CollectConfig(output_dir=tmp_path / "out", builtin_text=False,
                                       arithmetic_problems=0, folders=(str(docs),)))
    df = read_dataset(result.dataset)
    assert list(df["id"]) == ["folder:docs:a.txt", "folder:docs:sub/b.md"]
    assert set(df["source"]) == {"folder:docs"}
    meta = json.loads(df["meta"].iloc[1])
    assert meta["path"] == str(docs / "sub" / "b.md")
    assert meta["raw_md5"] == file_digest(docs / "sub" / "b.md")  # lineage down to the raw file
    assert result.metrics["data/quarantined"] == 1


def test_collect_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arithmetic_test_fraction"):
        CollectConfig(output_dir=tmp_path, arithmetic_test_fraction=1.5)
    with pytest.raises(ValueError, match="files"):
        CollectConfig(output_dir=tmp_path, files=("data.csv",))
    with pytest.raises(ValueError, match="folders"):
        CollectConfig(output_dir=tmp_path, folders=("a/docs", "b/docs"))


# --- clean -----------------------------------------------------------------------------------


def test_clean_normalizes_and_dedup_then_drops_what_normalization_made_equal(tmp_path: Path) -> None:
    good = "The quick brown fox jumps over the lazy dog near the river bank."
    records = [
        rec(0, good),
        rec(1, "  THE quick brown fox\tjumps over the lazy dog\n near the river bank.  "),  # case/space variant
        rec(2, "Cafe\u0301 au lait\x00 is served\r\nwarm in the morning."),  # normalized, kept
        rec(3, "Café au lait is served\nwarm in the morning."),  # equal to r2 after NFC
        rec(4, None),  # quarantined by clean
    ]
    write_dataset(records, tmp_path / "in")
    cleaned = clean.run(CleanConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "clean"))
    assert cleaned.metrics["data/rows_in"] == 5 and cleaned.metrics["data/quarantined"] == 1
    df = read_dataset(cleaned.dataset)
    assert df.set_index("id").at["r2", "text"] == "Café au lait is served\nwarm in the morning."
    bad = [json.loads(line) for line in cleaned.quarantine.read_text().splitlines()]
    assert [(b["id"], b["reason"]) for b in bad] == [("r4", "text is null")]

    deduped = dedup.run(DedupConfig(input_dir=cleaned.dataset, output_dir=tmp_path / "dedup"))
    assert list(read_dataset(deduped.dataset)["id"]) == ["r0", "r2"]
    assert deduped.metrics["data/dedup/exact/dropped"] == 2


def test_every_arithmetic_question_survives_cleaning_and_only_repeats_are_deduplicated(tmp_path: Path) -> None:
    problems = [p for seed in range(3) for p in arithmetic.generate(3000, seed=seed)]
    write_dataset(({"id": f"q{i}", "text": p.question, "source": "arithmetic", "meta": {}}
                   for i, p in enumerate(problems)), tmp_path / "in")
    result = clean.run(CleanConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out"))
    assert result.metrics["data/rows_out"] == len(problems)
    deduped = dedup.run(DedupConfig(input_dir=result.dataset, output_dir=tmp_path / "dedup"))
    unique = len({p.question for p in problems})  # seeds may share a few questions
    assert deduped.metrics["data/rows_out"] == unique
    assert deduped.metrics["data/dedup/exact/dropped"] == len(problems) - unique
    # Why arithmetic is exact-only by default: questions from one template differ in numbers only,
    # and MinHash would merge hundreds of different problems.
    merged = dedup.run(DedupConfig(input_dir=result.dataset, output_dir=tmp_path / "near", exact_only_sources=()))
    assert merged.metrics["data/dedup/near/dropped"] > 0.02 * unique


def test_clean_keeps_most_of_the_builtin_corpus(builtin: collect.CollectResult,
                                                cleaned: clean.CleanResult) -> None:
    report = json.loads(cleaned.report.read_text())
    assert report["sources"]["arithmetic"]["in"] == report["sources"]["arithmetic"]["out"] == 3000
    docs = report["sources"]["stdlib-docstrings"]
    assert docs["out"] > 0.9 * docs["in"]
    assert cleaned.metrics["data/chars_out"] > 0.95 * builtin.metrics["data/chars_out"]


# --- validate --------------------------------------------------------------------------------


def test_validate_passes_on_the_cleaned_corpus(cleaned: clean.CleanResult, tmp_path: Path) -> None:
    result = validate.run(ValidateConfig(dataset=cleaned.dataset, output_dir=tmp_path))
    assert result.success, result.failed
    assert result.failed == () and result.metrics["data/validate/success"] == 1.0
    assert json.loads(result.report.read_text())["success"] is True
    raise_for_failures(result)  # no-op


def test_validate_fails_naming_each_broken_expectation(tmp_path: Path) -> None:
    records = [rec(i, f"text number {i}") for i in range(5)]
    records += [rec(0, "duplicate id"), rec(9, "from nowhere", source="scraped-web"),
                rec(10, "from a folder", source="folder:notes")]
    write_dataset(records, tmp_path / "bad")
    result = validate.run(ValidateConfig(dataset=tmp_path / "bad", output_dir=tmp_path / "out", min_rows=100))
    assert not result.success and result.metrics["data/validate/failed"] == 3
    assert any(f.startswith("expect_column_values_to_be_unique(id)") for f in result.failed)
    assert any(f.startswith("expect_column_values_to_match_regex(source): 1 ") for f in result.failed)
    assert any(f.startswith("expect_table_row_count_to_be_between: observed 8") for f in result.failed)
    with pytest.raises(DataValidationError) as err:
        raise_for_failures(result)
    message = str(err.value)
    assert str(tmp_path / "bad") in message
    assert all(f in message for f in result.failed)


def test_validate_text_bounds(tmp_path: Path) -> None:
    write_dataset([rec(0, "x" * 50), rec(1, "fine text")], tmp_path / "ds")
    result = validate.run(ValidateConfig(dataset=tmp_path / "ds", output_dir=tmp_path / "out", min_rows=1,
                                         max_chars=20))
    assert result.failed == ("expect_column_value_lengths_to_be_between(text): 1 unexpected values",)


# --- the contract ----------------------------------------------------------------------------


def test_stages_import_no_orchestration_or_ui_packages() -> None:
    code = ("import sys, stages.collect, stages.clean, stages.validate, stages.tasks.arithmetic; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'ray', 'dvc', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not (SHARED_DATASETS / "gsm8k" / "train.jsonl").exists(),
                    reason=f"real data not present: {SHARED_DATASETS / 'gsm8k' / 'train.jsonl'}")
def test_gsm8k_questions_through_files_connector_and_clean(tmp_path: Path) -> None:
    source = SHARED_DATASETS / "gsm8k" / "train.jsonl"
    raw = collect.run(CollectConfig(output_dir=tmp_path / "raw", builtin_text=False, arithmetic_problems=0,
                                    files=(str(source),), text_field="question"))
    assert raw.metrics["data/quarantined"] == 0
    assert raw.metrics["data/collect/file_train/rows"] == 7473
    df = read_dataset(raw.dataset)
    assert "####" in json.loads(df["meta"].iloc[0])["fields"]["answer"]  # the answer rides along in meta
    # One-sentence word problems are not web pages: the "short" profile, as for the built-in questions.
    cleaned = clean.run(CleanConfig(input_dir=raw.dataset, output_dir=tmp_path / "clean",
                                    per_source={"file:*": "short"}))
    assert cleaned.metrics["data/rows_out"] > 0.95 * 7473
    checked = validate.run(ValidateConfig(dataset=cleaned.dataset, output_dir=tmp_path / "validate"))
    assert checked.success, checked.failed
