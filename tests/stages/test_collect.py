"""The collect stage over its connectors: one run over every kind of input, damaged ones included,
its report, the unchanged re-run that reads nothing, the HTTP cache across runs, real data."""

from __future__ import annotations

import gzip
import json
import pickle
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import collect
from stages.collect import CollectConfig
from stages.config import ConfigError, from_dict, parse_overrides
from stages.connectors.http import HttpConfig
from stages.dataset import file_digest, read_dataset
from stages.tracking import RecordingTracker
from tests.stages.test_connectors import Server, needs_pydoc, pydoc_pages, write_warc

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
NO_BUILTIN = {"builtin_text": False, "arithmetic_problems": 0}


def quarantine_rows(result: collect.CollectResult) -> list[dict]:
    return [json.loads(line) for line in result.quarantine.read_text().splitlines()]


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """One input of each kind, most of them damaged somewhere."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("A plain note.", encoding="utf-8")
    (docs / "b.txt").write_bytes(b"\x00\x01\x02binary")
    (docs / "c.md").write_bytes(b"\xef\xbb\xbfMarkdown with a BOM.")
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b"\xef\xbb\xbf" + b"\n".join([b'{"text": "first"}', b'{"text": broken', b'{"text": "third"}']))
    whole = gzip.compress(b"".join(b'{"text": "gz line %d"}\n' % i for i in range(2000)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["x"] * 50}), wrong)
    return {"docs": docs, "notes": notes, "cut": cut, "wrong": wrong, "missing": tmp_path / "missing.jsonl"}


def test_one_run_over_every_kind_of_input_keeps_the_good_and_reports_the_bad(inputs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    files = tuple(str(inputs[k]) for k in ("notes", "cut", "wrong", "missing"))
    tracker = RecordingTracker()
    result = collect.run(CollectConfig(output_dir=tmp_path / "out", folders=(str(inputs["docs"]),), files=files,
                                       arithmetic_problems=20, builtin_text=False), tracker)
    df = read_dataset(result.dataset)
    by_source = df.groupby("source").size().to_dict()
    gz_rows = by_source["file:cut"]
    assert 100 < gz_rows < 2000
    assert by_source == {"arithmetic": 20, "folder:docs": 2, "file:notes": 2, "file:cut": gz_rows}
    assert list(df[df["source"] == "file:notes"]["text"]) == ["first", "third"]  # the BOM cost nothing
    assert df["id"].is_unique and set(df.columns) == {"id", "text", "source", "url", "meta"}
    lineage = json.loads(df[df["source"] == "file:notes"]["meta"].iloc[0])
    assert lineage["raw_md5"] == file_digest(inputs["notes"]) and lineage["line"] == 1

    report = json.loads(result.report.read_text())
    rows = quarantine_rows(result)
    assert report["quarantined"] == len(rows) == result.metrics["data/quarantined"] == 5
    assert report["quarantined_by_reason"] == {"binary file": 1, "invalid JSON": 1, "missing text column": 1,
                                               "truncated or corrupt file": 1, "unreadable file": 1}
    assert [Path(u["file"]).name for u in report["unreadable_files"]] == ["wrong.parquet", "missing.jsonl"]
    assert "body" in report["unreadable_files"][0]["reason"]
    assert [Path(d["file"]).name for d in report["damaged_files"]] == ["cut.jsonl.gz"]
    assert report["sources"]["file:notes"] == {"in": 3, "out": 2, "chars": len("first") + len("third")}
    assert report["rows_out"] == len(df) == result.metrics["data/rows_out"]
    assert report["fingerprint"] and report["metrics"] == result.metrics
    assert result.metrics["data/collect/file_cut/rows"] == gz_rows
    assert result.metrics["data/collect/folder_docs/rows"] == 2
    assert result.metrics["data/collect/unreadable_files"] == 2
    assert tracker.metrics[-1][1] == result.metrics and tracker.params["max_doc_bytes"] == 100 * 1024 * 1024


def test_unchanged_rerun_reads_nothing_and_a_changed_input_reruns(inputs: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CollectConfig(output_dir=tmp_path / "out", folders=(str(inputs["docs"]),), files=(str(inputs["notes"]),),
                        **NO_BUILTIN)
    first = collect.run(cfg)
    shards = {p: p.stat().st_mtime_ns for p in first.dataset.glob("*.parquet")}

    def must_not_run(job):  # an unchanged re-run may not open a single input
        raise AssertionError(f"re-read {job.target}")

    monkeypatch.setattr(collect, "collect_job", must_not_run)
    again = collect.run(cfg)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in again.dataset.glob("*.parquet")} == shards
    monkeypatch.undo()

    (inputs["docs"] / "new.txt").write_text("A new note.", encoding="utf-8")
    changed = collect.run(cfg)
    assert changed.metrics["data/collect/folder_docs/rows"] == 3 and changed.metrics["data/rows_out"] == 5


def test_mapper_runs_one_picklable_job_per_input(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = CollectConfig(output_dir=tmp_path / "a", folders=(str(inputs["docs"]),),
                        files=(str(inputs["notes"]), str(inputs["cut"])), arithmetic_problems=30, builtin_text=False)
    jobs = collect.jobs_of(cfg, tmp_path / "work")
    assert [j.kind for j in jobs] == ["arithmetic", "folder", "file", "file"]
    assert pickle.loads(pickle.dumps(jobs[1])) == jobs[1]  # what a Ray mapper ships to a worker
    plain = collect.run(cfg)
    with ThreadPoolExecutor(2) as pool:
        threaded = collect.run(CollectConfig(**{**vars(cfg), "output_dir": tmp_path / "b"}), mapper=pool.map)
    a, b = read_dataset(plain.dataset), read_dataset(threaded.dataset)
    assert a.equals(b) and plain.metrics == threaded.metrics
    assert plain.quarantine.read_text() == threaded.quarantine.read_text()


@needs_pydoc
def test_warc_and_url_list_through_the_stage_with_the_cache_shared_across_runs(tmp_path: Path) -> None:
    crawl = tmp_path / "crawl.warc.gz"
    write_warc(crawl, pydoc_pages(3))
    server = Server()
    try:
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{server.base}/page-1\n{server.base}/missing\n")
        http = HttpConfig(timeout_s=2.0, retries=0, cache_dir=tmp_path / "http_cache")
        cfg = CollectConfig(output_dir=tmp_path / "one", warc=(str(crawl),),
                            urls=(str(listing), server.base + "/page-2"), http=http, **NO_BUILTIN)
        first = collect.run(cfg)
        hits = sum(server.hits.values())
        df = read_dataset(first.dataset)
        assert df.groupby("source").size().to_dict() == {"warc:crawl": 3, "http:urls": 2}
        assert set(df[df["source"] == "warc:crawl"]["url"]) == {
            f"https://docs.python.org/3/library/{p.name}" for p in pydoc_pages(3)}
        report = json.loads(first.report.read_text())
        assert report["skipped"] == {"non-HTML record": 1, "warc request record": 3}
        assert report["quarantined_by_reason"] == {"HTTP error": 1} and report["http"] == {"fetched": 3}
        # Another output directory: the stage runs again, the pages come from the cache.
        second = collect.run(CollectConfig(**{**vars(cfg), "output_dir": tmp_path / "two"}))
        assert sum(server.hits.values()) == hits + 1  # only the 404 is asked again
        assert json.loads(second.report.read_text())["http"] == {"cached": 2, "fetched": 1}
    finally:
        server.close()


def test_config_from_the_command_line_nests_http_and_names_bad_fields(tmp_path: Path) -> None:
    values = parse_overrides([f"output_dir={tmp_path}", "folders=notes", "http.concurrency=8", "http.timeout_s=3",
                              "max_doc_bytes=1000", "id_field=qid"])
    cfg = from_dict(CollectConfig, values)
    assert cfg.folders == ("notes",) and cfg.http.concurrency == 8 and cfg.http.timeout_s == 3.0
    assert cfg.http.cache_dir is None and cfg.http.respect_robots and cfg.max_doc_bytes == 1000
    for override, name in (("http.concurrency=0", "http.concurrency"), ("max_doc_bytes=0", "max_doc_bytes"),
                           ("warc=[a.arc]", "warc"), ("urls=[ftp://x.org/f]", "urls"), ("id_field=text", "id_field"),
                           ("files=[a/x.jsonl,b/x.parquet]", "files"), ("http.retry=3", "http.retry")):
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            from_dict(CollectConfig, parse_overrides([f"output_dir={tmp_path}", override]))


def test_usage_lines_of_the_docstring_are_valid_configs() -> None:
    lines = [line.strip() for line in collect.__doc__.splitlines() if line.strip().startswith("flywheel stage collect")]
    assert len(lines) >= 5  # folder, JSONL, WARC, URL list, datasets: the README quotes them
    for line in lines:
        cfg = from_dict(CollectConfig, parse_overrides(shlex.split(line)[3:]))
        assert cfg.folders or cfg.files or cfg.warc or cfg.urls or cfg.hf_datasets or cfg.builtin_text, line


@pytest.mark.skipif(not (SHARED_DATASETS / "gsm8k" / "train.jsonl").exists()
                    or not (SHARED_DATASETS / "tinyshakespeare").is_dir(),
                    reason=f"real data not present under {SHARED_DATASETS}")
def test_real_gsm8k_questions_and_tinyshakespeare_folder(tmp_path: Path) -> None:
    gsm8k, shakespeare = SHARED_DATASETS / "gsm8k" / "train.jsonl", SHARED_DATASETS / "tinyshakespeare"
    result = collect.run(CollectConfig(output_dir=tmp_path / "out", files=(str(gsm8k),), folders=(str(shakespeare),),
                                       text_field="question", **NO_BUILTIN))
    assert result.metrics["data/quarantined"] == 0
    assert result.metrics["data/collect/file_train/rows"] == 7473
    assert result.metrics["data/collect/folder_tinyshakespeare/rows"] == 1
    df = read_dataset(result.dataset)
    play = df[df["source"] == "folder:tinyshakespeare"].iloc[0]
    assert play["text"].startswith("First Citizen:") and len(play["text"]) > 1_000_000
    assert json.loads(play["meta"])["raw_md5"] == file_digest(shakespeare / "input.txt")
    first = json.loads(df[df["source"] == "file:train"]["meta"].iloc[0])
    assert "####" in first["fields"]["answer"] and first["raw_md5"] == file_digest(gsm8k)
