"""`flywheel stage validate dataset=/tmp/clean/dataset output_dir=/tmp/validate` — guard a dataset.

Great Expectations checks the contract every later stage relies on: ids present and unique, text
present and of sane length, every source one we know, enough rows to be worth training on. Then
the distributions, with thresholds from the config:

- text length quantiles (`length_quantiles`, e.g. `length_quantiles.p50=[20,5000]`: the median
  text between 20 and 5,000 characters; `null` leaves a side open);
- language share: the fraction of rows whose `meta.language` (written by clean) is in `languages`
  is at least `min_language_share` (rows without one count as outside); skipped, and named in
  `skipped`, when no row has a language;
- duplicate rate: the share of rows whose normalised text (lowercased, whitespace collapsed)
  repeats an earlier row's is at most `max_duplicate_rate`; the mix stage's repeats
  (`<id>#epochN`) are intended and not counted;
- source shares: each key of `expected_mixture` (a source name or glob, as in the mix stage's
  weights) holds its share of the training tokens within `mixture_tolerance` (absolute). Tokens
  are the mix stage's estimate (UTF-8 bytes / 4); rows held out for evaluation (`meta.split ==
  "test"`) are not part of the mixture.

They are GX expectations on columns derived per row (`text_chars`, `language`, `text_key`,
`token_share[<key>]`: this row's tokens over all training tokens where the row belongs to the key,
else 0, so the column sum is the key's share). The stage reports; it does not raise, so a flow can
log the result first and then decide (`raise_for_failures` is the usual decision). The full GX
result stays in `validation.json` beside the data, not in the tracker: it contains sample values of
the data itself; so do the GX data docs, written as HTML to `data_docs/index.html`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stages.config import to_dict
from stages.dataset import EPOCH_SUFFIX, atomic_dir, commit_dir, match_key, read_dataset
from stages.dedup import dedup_key
from stages.mix import estimate_tokens, is_protected, metric_name
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

BUILTIN_SOURCES = ("stdlib-docstrings", "stdlib-topics", arithmetic.SOURCE)
# Connector sources carry the user's folder or file name after the prefix.
OPEN_SOURCE_PREFIXES = ("folder:", "file:", "warc:", "http:", "hf:")
SUITE_NAME = "flywheel_text_dataset"
# A median under 5 characters or over 20k means the text field holds ids or whole files, not documents.
DEFAULT_LENGTH_QUANTILES = {"p05": (1, None), "p50": (5, 20_000), "p95": (None, 50_000)}
QUANTILE_KEY = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


class DataValidationError(RuntimeError):
    """A dataset broke its expectations; the message names each one and the dataset."""


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    dataset: Path
    output_dir: Path
    min_rows: int = 100
    min_chars: int = 1
    max_chars: int = 100_000  # the longest stdlib help topic is about 63k characters
    known_sources: tuple[str, ...] = BUILTIN_SOURCES  # plus any "folder:", "file:", "warc:", "http:", "hf:" one
    # "pNN" -> (min, max) characters of that quantile of text length; None leaves a side open.
    # Setting it replaces the whole default set (give every quantile you want checked).
    length_quantiles: dict[str, tuple[float | None, float | None]] = field(
        default_factory=lambda: dict(DEFAULT_LENGTH_QUANTILES))
    languages: tuple[str, ...] = ("en",)  # meta.language values that count as wanted
    min_language_share: float = 0.8  # measured: 98.6 % of the cleaned built-in corpus is "en"
    max_duplicate_rate: float = 0.05  # share of rows repeating an earlier row's normalised text
    expected_mixture: dict[str, float] = field(default_factory=dict)  # source or glob -> token share
    mixture_tolerance: float = 0.05  # absolute: 0.67 +- 0.05
    data_docs: bool = True  # write the GX data docs site (HTML) to output_dir/data_docs

    def __post_init__(self) -> None:
        if self.min_rows < 0:
            raise ValueError(f"min_rows must be >= 0, got {self.min_rows}")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"min_chars must be >= 0 and <= max_chars, got {self.min_chars} and {self.max_chars}")
        if not self.known_sources:
            raise ValueError("known_sources must name at least one source")
        for key, bounds in self.length_quantiles.items():
            if quantile_of(key) is None:
                raise ValueError(f"length_quantiles keys are p0..p100 (e.g. p50), got {key!r}")
            if not isinstance(bounds, list | tuple) or len(bounds) != 2:
                raise ValueError(f"length_quantiles.{key} must be [min, max] (null for open), got {bounds!r}")
            lo, hi = bounds
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"length_quantiles.{key}: min {lo} > max {hi}")
        if isinstance(self.languages, str):  # `languages=en` on the command line
            object.__setattr__(self, "languages", (self.languages,))
        object.__setattr__(self, "length_quantiles",
                           {k: tuple(v) for k, v in self.length_quantiles.items()})
        for name in ("min_language_share", "max_duplicate_rate", "mixture_tolerance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for key, share in self.expected_mixture.items():
            if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
                raise ValueError(f"expected_mixture.{key} must be a share in [0, 1], got {share!r}")


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    failed: tuple[str, ...]  # e.g. "expect_column_values_to_be_unique(id): 2 unexpected values"
    report: Path  # validation.json: the full GX result
    metrics: dict[str, float]
    skipped: tuple[str, ...] = ()  # checks not run, each with its reason
    data_docs: Path | None = None  # data_docs/index.html


def source_regex(known: tuple[str, ...]) -> str:
    """Anchored regex accepting the known sources and any connector source.

    >>> bool(re.match(source_regex(("arithmetic",)), "folder:notes")), bool(re.match(source_regex(("a",)), "b"))
    (True, False)
    """
    names = "|".join(re.escape(s) for s in known)
    prefixes = "|".join(re.escape(p) for p in OPEN_SOURCE_PREFIXES)
    return rf"^(?:{names}|(?:{prefixes}).+)$"


def quantile_of(key: str) -> float | None:
    """"p95" -> 0.95; None for anything else.

    >>> quantile_of("p5"), quantile_of("p50"), quantile_of("p99.9"), quantile_of("median")
    (0.05, 0.5, 0.999, None)
    """
    m = QUANTILE_KEY.fullmatch(key)
    if m is None or float(m.group(1)) > 100:
        return None
    return round(float(m.group(1)) / 100, 6)


def text_key(text: Any) -> str | None:
    """The text as duplicates are compared: lowercased, whitespace collapsed.

    >>> text_key("  Hello\\n  World "), text_key(None)
    ('hello world', None)
    """
    return dedup_key(text) if isinstance(text, str) else None  # the dedup stage's exact-duplicate key


def derived_columns(df: pd.DataFrame, expected_mixture: dict[str, float]) -> tuple[pd.DataFrame, bool]:
    """The per-row columns the distribution expectations read; and whether any row has a language."""
    metas = [json.loads(m) if isinstance(m, str) and m else {} for m in df["meta"]]
    languages = [m.get("language") if isinstance(m, dict) else None for m in metas]
    has_language = any(isinstance(x, str) for x in languages)
    derived = pd.DataFrame(index=df.index)
    derived["text_chars"] = df["text"].map(lambda t: len(t) if isinstance(t, str) else None)
    # A row without a language counts as outside the wanted set (ExpectColumnValuesToBeInSet skips nulls).
    derived["language"] = [x if isinstance(x, str) else "none" for x in languages]
    is_repeat = df["id"].map(lambda i: isinstance(i, str) and EPOCH_SUFFIX.search(i) is not None)
    derived["text_key"] = [None if rep else text_key(t) for t, rep in zip(df["text"], is_repeat, strict=True)]
    if expected_mixture:
        held_out = pd.Series([is_protected(m) for m in df["meta"]], index=df.index)
        tokens = df["text"].map(lambda t: estimate_tokens(t) if isinstance(t, str) else 0).where(~held_out, 0)
        total = max(int(tokens.sum()), 1)
        keys = df["source"].map(lambda s: match_key(s, expected_mixture) if isinstance(s, str) else None)
        for key in expected_mixture:
            derived[f"token_share[{key}]"] = (tokens / total).where(keys == key, 0.0)
    return derived, has_language


def build_suite(cfg: ValidateConfig, has_language: bool) -> tuple[list[Any], list[str]]:
    """(expectations, skipped checks with their reasons)."""
    import great_expectations as gx

    e = gx.expectations
    expectations = [
        e.ExpectColumnValuesToNotBeNull(column="id"),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToNotBeNull(column="text"),
        e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars, max_value=cfg.max_chars),
        e.ExpectColumnValuesToMatchRegex(column="source", regex=source_regex(cfg.known_sources)),
        e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
    ]
    skipped = []
    if cfg.length_quantiles:
        keys = sorted(cfg.length_quantiles, key=quantile_of)
        expectations.append(e.ExpectColumnQuantileValuesToBeBetween(column="text_chars", quantile_ranges={
            "quantiles": [quantile_of(k) for k in keys],
            "value_ranges": [list(cfg.length_quantiles[k]) for k in keys]}))
    else:
        skipped.append("length quantiles: length_quantiles is empty")
    if has_language:
        expectations.append(e.ExpectColumnValuesToBeInSet(column="language", value_set=list(cfg.languages),
                                                          mostly=cfg.min_language_share))
    else:
        skipped.append("language share: no row has meta.language (run the clean stage first)")
    expectations.append(e.ExpectColumnProportionOfUniqueValuesToBeBetween(
        column="text_key", min_value=1.0 - cfg.max_duplicate_rate))
    if cfg.expected_mixture:
        for key, share in cfg.expected_mixture.items():
            expectations.append(e.ExpectColumnSumToBeBetween(
                column=f"token_share[{key}]", min_value=max(0.0, share - cfg.mixture_tolerance),
                max_value=min(1.0, share + cfg.mixture_tolerance)))
    else:
        skipped.append("source shares: expected_mixture is empty")
    return expectations, skipped


def _describe(result: dict[str, Any]) -> str:
    """One human-readable line for a failed expectation result."""
    config = result["expectation_config"]
    kwargs = config["kwargs"]
    column = kwargs.get("column")
    name = f"{config['type']}({column})" if column else config["type"]
    detail = result.get("result", {})
    if result.get("exception_info", {}).get("raised_exception"):
        return f"{name}: error {result['exception_info'].get('exception_message')}"
    if "unexpected_count" in detail:
        line = f"{name}: {detail['unexpected_count']} unexpected values"
        if kwargs.get("mostly") is not None and detail.get("element_count"):
            inside = 1 - detail["unexpected_count"] / detail["element_count"]
            line += f" (share in set {inside:.3f}, expected >= {kwargs['mostly']})"
        return line
    observed = detail.get("observed_value")
    if isinstance(observed, dict) and "quantiles" in observed:  # quantile values: name each one that is out
        ranges = kwargs["quantile_ranges"]["value_ranges"]
        out = [f"p{100 * q:g}={v} not in {r}" for q, v, r, ok in
               zip(observed["quantiles"], observed["values"], ranges, detail["details"]["success_details"], strict=True)
               if not ok]
        return f"{name}: " + ", ".join(out)
    if observed is not None:
        if isinstance(observed, float):
            observed = f"{observed:.4g}"
        bounds = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items()
                           if k in ("min_value", "max_value") and v is not None)
        return f"{name}: observed {observed}, expected {bounds}"
    return name


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones: GX's own store refuses numpy's bool (quantile results carry one)."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        return value.item()
    return value


def write_data_docs(context: Any, suite: Any, batch: Any, validation: Any, out_dir: Path) -> Path:
    """The GX data docs site (suite and validation pages) as static HTML in `out_dir`, atomically."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (ExpectationSuiteIdentifier,
                                                                            ValidationResultIdentifier)

    tmp = atomic_dir(out_dir)
    context.add_data_docs_site("flywheel", {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(tmp)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    for r in validation.results:
        r.success = bool(_plain(r.success))
    validation.success = bool(_plain(validation.success))
    key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite.name),
                                     run_id=RunIdentifier(run_name="flywheel"), batch_identifier=batch.id)
    context.validation_results_store.set(key, validation)
    # Only our site: the ephemeral context's default one would be built in a fresh /tmp folder.
    context.build_data_docs(site_names=["flywheel"])
    commit_dir(tmp, out_dir)
    return out_dir / "index.html"


def run(cfg: ValidateConfig, tracker: Tracker | None = None) -> ValidateResult:
    # Imported here: GX costs about 2 s to import, which every `stages` user would otherwise pay.
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    df = read_dataset(cfg.dataset)
    derived, has_language = derived_columns(df, cfg.expected_mixture)
    frame = pd.concat([df, derived], axis=1)

    context = gx.get_context(mode="ephemeral")  # no on-disk GX project: the suite lives in code
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset("dataset")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    expectations, skipped = build_suite(cfg, has_language)
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    validation = batch.validate(suite, result_format="SUMMARY")
    outcome = validation.to_json_dict()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "validation.json"
    tmp = report.with_name(f".tmp-{report.name}-{os.getpid()}")
    tmp.write_text(json.dumps({"dataset": str(cfg.dataset), "skipped": skipped, **outcome}, indent=2, default=_plain))
    os.replace(tmp, report)
    docs = write_data_docs(context, suite, batch, validation, out / "data_docs") if cfg.data_docs else None

    failed = tuple(sorted(_describe(r) for r in outcome["results"] if not r["success"]))
    keys = derived["text_key"].dropna()
    metrics = {
        "data/validate/success": float(bool(outcome["success"])),
        "data/validate/expectations": float(len(outcome["results"])),
        "data/validate/failed": float(len(failed)),
        "data/validate/skipped": float(len(skipped)),
        "data/validate/duplicate_rate": float(1 - keys.nunique() / len(keys)) if len(keys) else 0.0,
        "data/rows": float(len(df)),
    }
    if has_language:
        metrics["data/validate/language_share"] = float(derived["language"].isin(cfg.languages).mean())
    for key in cfg.expected_mixture:
        share = float(derived[f"token_share[{key}]"].sum())
        metrics[f"data/validate/share/{metric_name(key)}"] = share if math.isfinite(share) else 0.0
    tracker.log_metrics(metrics)
    return ValidateResult(success=bool(outcome["success"]), failed=failed, report=report, metrics=metrics,
                          skipped=tuple(skipped), data_docs=docs)


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
