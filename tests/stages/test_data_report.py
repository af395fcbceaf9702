"""The data report: one PNG and a markdown table from the data stages' outputs, skipped stages tolerated."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest

from stages import data_report, mix
from stages.dataset import write_dataset, write_report
from stages.mix import MixConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(n: int, source: str, words: int, language: str | None = None) -> list[dict]:
    meta = {"language": language} if language else {}
    return [{"id": f"{source}/{i}", "text": " ".join(["word"] * (words + i % 7)), "source": source, "meta": meta}
            for i in range(n)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """collect -> clean -> (no dedup) -> decontaminate -> mix -> validate, as their outputs look on disk."""
    root = tmp_path_factory.mktemp("stages")
    dirs = {name: root / name for name in ("collect", "clean", "dedup", "decontaminate", "mix", "validate")}
    raw = records(600, "folder:web", 200) + records(300, "folder:books", 5) + records(100, "file:code", 50)
    write_dataset(raw, dirs["collect"] / "dataset")
    write_report(dirs["collect"], {"rows_in": 1003, "rows_out": 1000, "quarantined": 3, "dropped": {},
                                   "sources": {"folder:web": {"in": 601, "out": 600}},
                                   "unreadable_files": [{"file": "x.jsonl.gz", "reason": "truncated gzip"}]})
    kept = [r for r in raw if not (r["source"] == "folder:books" and int(r["id"].split("/")[1]) % 2)]
    for r in kept:
        r["meta"] = {"language": "de" if r["source"] == "file:code" else "en"}
    write_dataset(kept, dirs["clean"] / "dataset")
    write_report(dirs["clean"], {"rows_in": 1000, "rows_out": len(kept), "quarantined": 0,
                                 "dropped": {"gopher_quality": 150, "language": 0, "c4": 0},
                                 "language_share": {"en": 0.88, "de": 0.12}})
    write_dataset(kept, dirs["decontaminate"] / "dataset")
    write_report(dirs["decontaminate"], {"rows_in": len(kept), "rows_out": len(kept) - 2, "quarantined": 0,
                                         "dropped": {"contaminated": 2}, "contaminated": {"count": 2}})
    mix.run(MixConfig(input_dir=dirs["decontaminate"] / "dataset", output_dir=dirs["mix"], target_tokens=30_000,
                      weights={"folder:web": 0.6, "folder:books": 0.2, "file:code": 0.2}))
    dirs["validate"].mkdir()
    (dirs["validate"] / "validation.json").write_text(json.dumps(
        {"success": False, "results": [{"success": True}, {"success": False}, {"success": True}]}))
    return dirs


def test_doctests() -> None:
    assert doctest.testmod(data_report).failed == 0


def test_report_of_a_whole_pipeline(pipeline: dict[str, Path], tmp_path: Path) -> None:
    report = data_report.build(pipeline, tmp_path / "report")
    assert report.png.read_bytes()[:8] == PNG_MAGIC and report.png.stat().st_size > 20_000
    md = report.markdown
    assert (tmp_path / "report" / "data_report.md").read_text() == md
    # One table row per stage that ran, in pipeline order; the skipped one named.
    assert "| collect | 1,003 | 1,000 | 0 | 3 | unreadable files 1 |" in md
    assert "| clean | 1,000 | 850 | 150 | 0 |  |" in md
    assert "| decontaminate | 850 | 848 | 2 | 0 | contaminated 2 |" in md
    assert md.index("| collect |") < md.index("| clean |") < md.index("| decontaminate |") < md.index("| mix |")
    assert "Not run or no report: dedup." in md
    assert "| clean | gopher_quality | 150 |" in md and "| clean | c4 |" not in md  # zero drops left out
    mixture = json.loads((pipeline["mix"] / "report.json").read_text())["mixture"]
    web = mixture["folder:web"]
    assert (f"| folder:web | {web['docs']:,} | {web['tokens_in']:,} | 60.0% | {web['tokens_out']:,} | "
            f"{web['actual_share']:.1%} | {web['epochs']:.2f} |") in md
    assert "Data gate (Great Expectations): FAILED (1 of 3)." in md
    # Lengths: the raw dataset is collect's, the final one mix's; the language share is the final data's.
    summary = report.summary
    assert summary["length"]["raw"] == {"stage": "collect", "rows": 1000, "median_chars": summary["length"]["raw"]["median_chars"]}
    assert summary["length"]["final"]["stage"] == "mix"
    assert 700 < summary["length"]["raw"]["median_chars"] <= 1030  # 200-word web pages (1,000+ chars) are the majority
    assert set(summary["language_share"]) == {"en", "de"}
    assert summary["drops"] == {"collect/quarantined": 3, "clean/gopher_quality": 150,
                                "decontaminate/contaminated": 2, "mix/subsampled": summary["drops"]["mix/subsampled"]}
    assert json.loads((tmp_path / "report" / "data_report.json").read_text())["missing"] == ["dedup"]


def test_only_collect_and_broken_reports(pipeline: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "clean"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    odd = tmp_path / "dedup"
    odd.mkdir()
    (odd / "report.json").write_text(json.dumps({"rows_in": "many", "dropped": {"exact": "x", "near": 4},
                                                 "clusters": []}))
    report = data_report.build({"collect": pipeline["collect"], "clean": broken, "dedup": odd,
                                "mix": tmp_path / "nowhere"}, tmp_path / "out")
    assert report.png.read_bytes()[:8] == PNG_MAGIC
    assert "Not run or no report: clean, mix." in report.markdown
    assert "| dedup | – | – | 4 | – |  |" in report.markdown
    assert "## Source mix" not in report.markdown and "| folder:web | 600 |" in report.markdown  # collect's rows
    assert report.summary["length"]["raw"]["stage"] == report.summary["length"]["final"]["stage"] == "collect"


def test_nothing_at_all_still_gives_a_report(tmp_path: Path) -> None:
    report = data_report.build({}, tmp_path)
    assert report.png.exists() and report.markdown.startswith("# Data report")


def test_length_histogram_counts_characters(tmp_path: Path) -> None:
    write_dataset([{"id": str(i), "text": "é" * n, "source": "s", "meta": {}} for i, n in enumerate([0, 3, 3, 500])],
                  tmp_path / "ds")
    counts, rows, median = data_report.length_histogram(tmp_path / "ds")
    assert rows == 4 and counts.sum() == 4
    edges = data_report.LENGTH_EDGES
    assert counts[np.searchsorted(edges, 3, side="right") - 1] == 2  # characters, not UTF-8 bytes
    assert median == 3
