"""`flywheel stage validate dataset=/tmp/clean/dataset output_dir=/tmp/validate` — guard a dataset.

Great Expectations checks the contract every later stage relies on: ids present and unique, text
present and of sane length, every source one we know, enough rows to be worth training on. The
stage reports; it does not raise, so a flow can log the result first and then decide
(`raise_for_failures` is the usual decision). The full GX result stays in `validation.json` beside
the data, not in the tracker: it contains sample values of the data itself.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import to_dict
from stages.dataset import read_dataset
from stages.tracking import NullTracker, Tracker

BUILTIN_SOURCES = ("stdlib-docstrings", "stdlib-topics", "arithmetic")
# Connector sources carry the user's folder or file name after the prefix.
OPEN_SOURCE_PREFIXES = ("folder:", "file:")


class DataValidationError(RuntimeError):
    """A dataset broke its expectations; the message names each one and the dataset."""


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    dataset: Path
    output_dir: Path
    min_rows: int = 100
    min_chars: int = 1
    max_chars: int = 100_000  # the longest stdlib help topic is about 63k characters
    known_sources: tuple[str, ...] = BUILTIN_SOURCES  # plus any "folder:..." or "file:..."

    def __post_init__(self) -> None:
        if self.min_rows < 0:
            raise ValueError(f"min_rows must be >= 0, got {self.min_rows}")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"min_chars must be >= 0 and <= max_chars, got {self.min_chars} and {self.max_chars}")
        if not self.known_sources:
            raise ValueError("known_sources must name at least one source")


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    failed: tuple[str, ...]  # e.g. "expect_column_values_to_be_unique(id): 2 unexpected values"
    report: Path  # validation.json: the full GX result
    metrics: dict[str, float]


def source_regex(known: tuple[str, ...]) -> str:
    """Anchored regex accepting the known sources and any connector source.

    >>> bool(re.match(source_regex(("arithmetic",)), "folder:notes")), bool(re.match(source_regex(("a",)), "b"))
    (True, False)
    """
    names = "|".join(re.escape(s) for s in known)
    prefixes = "|".join(re.escape(p) for p in OPEN_SOURCE_PREFIXES)
    return rf"^(?:{names}|(?:{prefixes}).+)$"


def _describe(result: dict[str, Any]) -> str:
    """One human-readable line for a failed expectation result."""
    config = result["expectation_config"]
    column = config["kwargs"].get("column")
    name = f"{config['type']}({column})" if column else config["type"]
    detail = result.get("result", {})
    if "unexpected_count" in detail:
        return f"{name}: {detail['unexpected_count']} unexpected values"
    if "observed_value" in detail:
        bounds = ", ".join(f"{k}={v}" for k, v in config["kwargs"].items()
                           if k in ("min_value", "max_value") and v is not None)
        return f"{name}: observed {detail['observed_value']}, expected {bounds}"
    return name


def run(cfg: ValidateConfig, tracker: Tracker | None = None) -> ValidateResult:
    # Imported here: GX costs about 2 s to import, which every `stages` user would otherwise pay.
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    df = read_dataset(cfg.dataset)

    context = gx.get_context(mode="ephemeral")  # no on-disk GX project: the suite lives in code
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset("dataset")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    e = gx.expectations
    suite = gx.ExpectationSuite(name="flywheel_text_dataset", expectations=[
        e.ExpectColumnValuesToNotBeNull(column="id"),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToNotBeNull(column="text"),
        e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars,
                                              max_value=cfg.max_chars),
        e.ExpectColumnValuesToMatchRegex(column="source", regex=source_regex(cfg.known_sources)),
        e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
    ])
    outcome = batch.validate(suite, result_format="SUMMARY").to_json_dict()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "validation.json"
    tmp = report.with_name(f".tmp-{report.name}-{os.getpid()}")
    tmp.write_text(json.dumps({"dataset": str(cfg.dataset), **outcome}, indent=2, default=str))
    os.replace(tmp, report)

    failed = tuple(sorted(_describe(r) for r in outcome["results"] if not r["success"]))
    metrics = {
        "data/validate/success": float(bool(outcome["success"])),
        "data/validate/expectations": float(len(outcome["results"])),
        "data/validate/failed": float(len(failed)),
        "data/rows": float(len(df)),
    }
    tracker.log_metrics(metrics)
    return ValidateResult(success=bool(outcome["success"]), failed=failed, report=report,
                          metrics=metrics)


def raise_for_failures(result: ValidateResult, dataset: Path | None = None) -> None:
    """Raise DataValidationError naming every failed expectation (and the dataset) if any failed."""
    if result.success:
        return
    if dataset is None:
        dataset = json.loads(Path(result.report).read_text()).get("dataset", "?")
    raise DataValidationError(
        f"dataset {dataset} failed {len(result.failed)} expectation(s): "
        + "; ".join(result.failed) + f" (full results: {result.report})"
    )
