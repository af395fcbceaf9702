"""The data gate's distribution expectations (length, language, duplicates, source shares) and its data docs."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from stages import mix, validate
from stages.dataset import write_dataset
from stages.mix import MixConfig
from stages.validate import DataValidationError, ValidateConfig, raise_for_failures

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly farmers".split()


def doc(i: int, source: str, language: str | None = "en", words: int = 40, split: str | None = None) -> dict:
    text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" (document {source} {i})"
    meta = {k: v for k, v in {"language": language, "split": split}.items() if v is not None}
    return {"id": f"{source}/{i}", "text": text, "source": source, "meta": meta}


def good_records() -> list[dict]:
    """60 % web, 30 % books, 10 % code by tokens (equal-size documents), English, no duplicates."""
    counts = {"folder:web": 300, "folder:books": 150, "file:code": 50}
    return [doc(i, s) for s, n in counts.items() for i in range(n)]


MIXTURE = {"folder:web": 0.6, "folder:books": 0.3, "file:*": 0.1}


def check(tmp_path: Path, records: list[dict], **overrides) -> validate.ValidateResult:
    write_dataset(records, tmp_path / "ds")
    cfg = ValidateConfig(dataset=tmp_path / "ds", output_dir=tmp_path / "out", **overrides)
    return validate.run(cfg)


def test_doctests() -> None:
    assert doctest.testmod(validate).failed == 0


def test_good_dataset_passes_every_distribution_check(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    result = check(tmp_path, good_records(), expected_mixture=MIXTURE, mixture_tolerance=0.02)
    assert result.success, result.failed
    assert result.skipped == ()
    outcome = json.loads(result.report.read_text())
    types = [r["expectation_config"]["type"] for r in outcome["results"]]
    for expected in ("expect_column_quantile_values_to_be_between", "expect_column_values_to_be_in_set",
                     "expect_column_proportion_of_unique_values_to_be_between", "expect_column_sum_to_be_between"):
        assert expected in types
    assert types.count("expect_column_sum_to_be_between") == 3
    assert result.metrics["data/validate/share/folder_web"] == pytest.approx(0.6, abs=0.01)
    assert result.metrics["data/validate/language_share"] == 1.0
    assert result.metrics["data/validate/duplicate_rate"] == 0.0
    # The data docs: an index naming the suite, and its validation page.
    assert result.data_docs == tmp_path / "out" / "data_docs" / "index.html"
    html = result.data_docs.read_text()
    assert validate.SUITE_NAME in html
    assert list((tmp_path / "out" / "data_docs" / "validations").rglob("*.html"))
    assert (tmp_path / "out" / "data_docs" / "expectations" / f"{validate.SUITE_NAME}.html").exists()
    captured = capfd.readouterr()
    assert "Calculating Metrics" not in captured.out + captured.err  # GX stays quiet


def test_skewed_lengths_fail_naming_the_quantile(tmp_path: Path) -> None:
    records = good_records()
    for r in records[:400]:
        r["text"] = r["text"][:3]  # most texts are 3 characters: the median is far below 5
    result = check(tmp_path, records, min_chars=1)
    assert not result.success
    (line,) = [f for f in result.failed if f.startswith("expect_column_quantile_values_to_be_between(text_chars)")]
    assert "p50=3" in line and "p95" not in line


def test_wrong_language_share_fails(tmp_path: Path) -> None:
    records = good_records()
    for r in records[:150]:  # 30 % German: 70 % English is below the 80 % default
        r["meta"]["language"] = "de"
    result = check(tmp_path, records)
    assert result.failed == ("expect_column_values_to_be_in_set(language): 150 unexpected values "
                             "(share in set 0.700, expected >= 0.8)",)
    assert check(tmp_path / "lenient", records, min_language_share=0.6).success


def test_rows_without_language_count_as_outside_and_none_at_all_skips(tmp_path: Path) -> None:
    records = good_records()
    for r in records[:200]:
        del r["meta"]["language"]
    assert not check(tmp_path / "some", records).success  # 60 % with a language: below 80 %
    for r in records:
        r["meta"].pop("language", None)
    result = check(tmp_path / "none", records)
    assert result.success
    assert result.skipped == ("language share: no row has meta.language (run the clean stage first)",
                              "source shares: expected_mixture is empty")
    assert json.loads(result.report.read_text())["skipped"] == list(result.skipped)


def test_duplicate_rate_fails_above_threshold(tmp_path: Path) -> None:
    records = good_records()
    for r in records[:40]:  # 40 of 500 rows repeat another's text, in other case and spacing: 8 %
        r["text"] = "  " + records[100]["text"].upper().replace(" ", "   ") + " "
    result = check(tmp_path, records)
    assert result.failed == ("expect_column_proportion_of_unique_values_to_be_between(text_key): "
                             "observed 0.92, expected min_value=0.95",)
    assert result.metrics["data/validate/duplicate_rate"] == pytest.approx(0.08)
    assert check(tmp_path / "lenient", records, max_duplicate_rate=0.1).success


def test_source_share_outside_tolerance_fails_naming_the_source(tmp_path: Path) -> None:
    records = good_records()  # web is 60 %, not 75 %
    result = check(tmp_path, records, expected_mixture={"folder:web": 0.75, "folder:books": 0.3, "file:*": 0.1})
    (line,) = result.failed
    assert line.startswith("expect_column_sum_to_be_between(token_share[folder:web]): observed 0.599")
    assert "min_value=0.7, max_value=0.8" in line
    with pytest.raises(DataValidationError, match=r"token_share\[folder:web\]"):
        raise_for_failures(result)
    absent = check(tmp_path / "absent", records, expected_mixture={"folder:wiki": 0.1})
    assert absent.failed == ("expect_column_sum_to_be_between(token_share[folder:wiki]): observed 0, "
                             "expected min_value=0.05, max_value=0.15",)


def test_mix_output_passes_the_gate_with_its_own_mixture(tmp_path: Path) -> None:
    """Epoch repeats are not duplicates; evaluation rows are not part of the mixture."""
    records = good_records() + [doc(i, "arithmetic", split="test", words=10) for i in range(100)]
    write_dataset(records, tmp_path / "raw")
    mixed = mix.run(MixConfig(input_dir=tmp_path / "raw", output_dir=tmp_path / "mix", target_tokens=40_000,
                              weights={"folder:web": 0.5, "folder:books": 0.3, "file:code": 0.2}))
    assert json.loads(mixed.report.read_text())["mixture"]["file:code"]["epochs"] > 2  # many repeats
    result = validate.run(ValidateConfig(dataset=mixed.dataset, output_dir=tmp_path / "validate",
                                         expected_mixture=mixed.expected_mixture, mixture_tolerance=0.02))
    assert result.success, result.failed
    assert result.metrics["data/validate/duplicate_rate"] == 0.0
    # A mix whose cap kept a source from its share is stopped by the same gate.
    capped = mix.run(MixConfig(input_dir=tmp_path / "raw", output_dir=tmp_path / "capped", target_tokens=40_000,
                               weights={"folder:web": 0.2, "folder:books": 0.3, "file:code": 0.5}))
    gate = validate.run(ValidateConfig(dataset=capped.dataset, output_dir=tmp_path / "validate2",
                                       expected_mixture=capped.expected_mixture))
    assert any(f.startswith("expect_column_sum_to_be_between(token_share[file:code])") for f in gate.failed)


def test_every_connector_prefix_is_a_known_source(tmp_path: Path) -> None:
    records = [doc(i, src) for i, src in enumerate(["warc:crawl", "http:urls", "hf:gsm8k", "folder:x", "file:y"])]
    assert check(tmp_path, records + [doc(9, "scraped")], min_rows=1).failed == (
        "expect_column_values_to_match_regex(source): 1 unexpected values",)


def test_data_docs_can_be_turned_off_and_config_errors_name_the_field(tmp_path: Path) -> None:
    result = check(tmp_path, good_records()[:150], data_docs=False)
    assert result.data_docs is None and not (tmp_path / "out" / "data_docs").exists()
    for kwargs, field in [({"length_quantiles": {"median": [1, 2]}}, "length_quantiles"),
                          ({"length_quantiles": {"p50": [9, 2]}}, "length_quantiles.p50"),
                          ({"min_language_share": 1.5}, "min_language_share"),
                          ({"max_duplicate_rate": -0.1}, "max_duplicate_rate"),
                          ({"expected_mixture": {"folder:web": 2}}, "expected_mixture.folder:web")]:
        with pytest.raises(ValueError, match=field):
            ValidateConfig(dataset=tmp_path, output_dir=tmp_path, **kwargs)
