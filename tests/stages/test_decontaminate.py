"""decontaminate: GSM8K questions planted in Shakespeare paragraphs, Parquet list fields, the arithmetic test split."""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import decontaminate
from stages.dataset import read_dataset, write_dataset
from stages.decontaminate import DecontaminateConfig, MissingEvalFile
from stages.minhash import words
from stages.tasks.arithmetic import generate

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
SHAKESPEARE = DATASETS / "tinyshakespeare" / "input.txt"
GSM8K = DATASETS / "gsm8k" / "train.jsonl"
needs_data = pytest.mark.skipif(not (SHAKESPEARE.is_file() and GSM8K.is_file()),
                                reason=f"{SHAKESPEARE} or {GSM8K} not present")


def paragraphs(count: int, min_words: int = 30) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if len(p.split()) >= min_words][:count]


def plant(doc: str, inserted: str, rng: random.Random) -> str:
    """`inserted` between two lines of `doc`, as a copied question would sit inside a web page."""
    lines = doc.split("\n")
    at = rng.randrange(1, len(lines))
    return "\n".join(lines[:at] + [inserted] + lines[at:])


def kept(result) -> set[str]:
    return set(read_dataset(result.dataset)["id"])


def contaminated(result) -> list[dict]:
    return [json.loads(line) for line in result.contaminated.read_text().splitlines()]


@needs_data
def test_planted_gsm8k_questions_are_all_removed_and_clean_documents_all_kept(tmp_path):
    rng = random.Random(0)
    eval_file = tmp_path / "gsm8k_eval.jsonl"  # the first 300 problems stand for an eval split
    lines = GSM8K.read_text(encoding="utf-8").splitlines()[:300]
    eval_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = [json.loads(line) for line in lines]
    docs = paragraphs(400)
    planted = {}  # doc index -> eval line
    for i, line_no in zip(rng.sample(range(len(docs)), 40), rng.sample(range(1, 301), 40), strict=True):
        problem = problems[line_no - 1]
        docs[i] = plant(docs[i], problem["question"] if len(planted) % 4 else problem["answer"], rng)
        planted[i] = line_no
    records = [{"id": f"d{i}", "text": t, "source": "web"} for i, t in enumerate(docs)]
    write_dataset(records, tmp_path / "in", shard_rows=150)

    res = decontaminate.run(DecontaminateConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out",
                                                eval_files=(eval_file,)))
    removed = {r["id"] for r in records} - kept(res)
    assert removed == {f"d{i}" for i in planted}
    listed = {row["id"]: row for row in contaminated(res)}
    assert set(listed) == removed
    for i, line_no in planted.items():
        row = listed[f"d{i}"]
        assert (row["eval"], row["item"], row["eval_id"]) == (str(eval_file), line_no, f"gsm8k_eval:{line_no}")
        problem = problems[line_no - 1]
        gram = row["ngram"].split()
        assert len(gram) == 13 and row["ngram"] in " ".join(words(problem["question"] + " " + problem["answer"]))
    report = json.loads(res.report.read_text())
    assert report["dropped"] == {"contaminated": 40} and report["rows_out"] == 360
    assert report["eval_sets"][str(eval_file)]["items"] == 300
    assert res.metrics["data/decontaminate/dropped"] == 40


def test_parquet_eval_file_with_a_list_field(tmp_path):
    question = "Which of the following best describes the main function of the mitochondria in a eukaryotic cell?"
    choices = ["It produces most of the chemical energy the cell needs", "Paris", "It stores the genetic code",
               "It digests waste"]
    eval_file = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": [question], "choices": [choices], "answer": [0]}), eval_file)
    filler = "the weather was mild and the harvest good that year in the valley " * 3
    docs = {
        "q": filler + question.upper() + " " + filler,  # case and punctuation do not hide it
        "choice": filler + "so: it produces most of the chemical energy, the cell needs! " + filler,  # 10 words, whole
        "short": filler + "Paris is lovely in spring. It stores the genetic code? no. " + filler,  # under min_words
        "partial": filler + "it produces most of the chemical energy " + filler,  # part of a short text only
    }
    write_dataset([{"id": k, "text": t, "source": "web"} for k, t in docs.items()], tmp_path / "in")
    res = decontaminate.run(DecontaminateConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out",
                                                eval_files=(eval_file,), builtin_tasks=False))
    assert kept(res) == {"short", "partial"}
    rows = {row["id"]: row for row in contaminated(res)}
    assert rows["choice"]["ngram"] == "it produces most of the chemical energy the cell needs"
    assert rows["q"]["item"] == 1 and rows["q"]["eval_id"] == "mmlu:1"
    counts = json.loads(res.report.read_text())["eval_sets"][str(eval_file)]
    assert counts["whole_texts"] == 1 and counts["skipped_short"] == 3  # "Paris", the code, the waste
    with ProcessPoolExecutor(2) as pool:  # the per-shard work as separate processes: same result
        pooled = decontaminate.run(DecontaminateConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "pool",
                                                       eval_files=(eval_file,), builtin_tasks=False), mapper=pool.map)
    assert pooled.contaminated.read_text() == res.contaminated.read_text()


def test_arithmetic_test_split_is_kept_and_a_train_text_embedding_it_removed(tmp_path):
    test_q = "Vera has 10 bags with 4 oranges in each. How many oranges does Vera have altogether?"
    # another problem of the same template: it shares 13 words with the test question, but not the question
    sibling = "Vera has 7 bags with 4 oranges in each. How many oranges does Vera have altogether?"
    meta = {"answer": 40, "reasoning": "10 x 4 = 40"}
    records = [{"id": "test-0", "text": test_q, "source": "arithmetic", "meta": {**meta, "split": "test"}},
               {"id": "sibling", "text": sibling, "source": "arithmetic", "meta": {**meta, "split": "train"}}]
    records += [{"id": f"train-{i}", "text": p.question, "source": "arithmetic", "meta": {**meta, "split": "train"}}
                for i, p in enumerate(generate(3, seed=123))]
    records.append({"id": "leak", "text": f"Homework help! Question: {test_q} Answer below.", "source": "web"})
    write_dataset(records, tmp_path / "in")
    res = decontaminate.run(DecontaminateConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out"))
    assert kept(res) == {"test-0", "sibling", "train-0", "train-1", "train-2"}
    (leak,) = contaminated(res)
    assert (leak["id"], leak["eval"], leak["eval_id"]) == ("leak", "arithmetic:test", "test-0")
    assert leak["ngram"] == " ".join(words(test_q))  # matched as the whole question
    assert json.loads(res.report.read_text())["exempt_eval_records"] == 1


def test_a_missing_eval_file_is_one_error_before_any_work(tmp_path):
    write_dataset([{"id": "a", "text": "some text", "source": "web"}], tmp_path / "in")
    missing = tmp_path / "nowhere" / "mmlu_test.jsonl"
    with pytest.raises(MissingEvalFile, match=f"eval_files: {missing}"):
        decontaminate.run(DecontaminateConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out",
                                              eval_files=(missing,)))
    assert not (tmp_path / "out").exists()


def test_config_is_checked_and_eval_files_parse_from_a_command_line():
    cfg = DecontaminateConfig(input_dir=Path("x"), output_dir=Path("y"), eval_files="a.jsonl, b.parquet")
    assert cfg.eval_files == (Path("a.jsonl"), Path("b.parquet"))
    with pytest.raises(ValueError, match="eval_files: c.txt"):
        DecontaminateConfig(input_dir=Path("x"), output_dir=Path("y"), eval_files=("c.txt",))
    with pytest.raises(ValueError, match="min_words"):
        DecontaminateConfig(input_dir=Path("x"), output_dir=Path("y"), ngram=5, min_words=8)


def test_null_text_is_quarantined_and_an_unchanged_rerun_is_a_no_op(tmp_path):
    inp = tmp_path / "in"
    write_dataset([{"id": "a", "text": "a clean document of a few words", "source": "web"}], inp)
    pq.write_table(pa.table({"id": ["bad"], "text": pa.array([None], pa.string()), "source": ["web"], "url": [""],
                             "meta": ["{}"]}), inp / "part-00001.parquet")
    cfg = DecontaminateConfig(input_dir=inp, output_dir=tmp_path / "out")
    res = decontaminate.run(cfg)
    assert kept(res) == {"a"} and json.loads(res.quarantine.read_text())["id"] == "bad"
    stamp = res.report.stat().st_mtime_ns
    assert decontaminate.run(cfg).report.stat().st_mtime_ns == stamp
