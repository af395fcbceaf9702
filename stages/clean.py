"""`flywheel stage clean input_dir=/tmp/raw/dataset output_dir=/tmp/clean` — normalize, identify language, filter, redact PII.

Per document, in order: Unicode NFC and control characters out (newline and tab stay); records
without a string text to `quarantine.jsonl`; then the filters of `stages.filters`, each
individually switchable (`c4.enabled=false`) and each row charged to the first one it fails, so
the per-filter counts add up to rows_in - rows_out - quarantined:

    empty -> language -> gopher_repetition -> gopher_quality -> c4 (also removes lines) -> fineweb
    -> toxicity (word list, then the optional classifier in batches) ; then PII redaction (kept rows)

Every kept record's meta gains `language` and `language_score` (py3langid), so later stages and
the data gate can report the language share. Exact and near duplicates are the dedup stage's job.

Per source: `per_source` maps a source name or glob (`file:*`, `stdlib-*`) to overrides of the
filter configs, or to a profile name (`web`: the defaults, `short`: the built-in corpus's rules).
The built-in sources get `short` unless `builtin_per_source=false`: Python docstrings and one-line
arithmetic questions are not web pages, and Gopher's 50-word minimum or C4's 5-sentence one would
drop nearly all of them. Later entries win; an exact name wins over a glob.

Shard by shard: each input shard becomes one output shard under `shards/`, keyed by a digest of
the input shard's bytes and the config, so a re-run with one changed shard recomputes only that
one; `dataset/` is then assembled from those shards (hard links). The work per shard is
`clean_shard(ShardTask)`, a module-level function of one picklable argument returning small stats,
so any `map` (a process pool, Ray) can run it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.config import deep_merge, from_dict, to_dict
from stages.dataset import (SCHEMA, QuarantineLog, atomic_dir, commit_dir, dataset_shards, file_digest,
                            finished_report, fingerprint, read_shard, row_group_rows, write_atomically, write_report)
from stages.filters.c4 import C4Config
from stages.filters.fineweb import FineWebConfig
from stages.filters.gopher import GopherQualityConfig, GopherRepetitionConfig
from stages.filters.language import LanguageConfig, identify
from stages.filters.pii import PIIConfig
from stages.filters.toxicity import ToxicityConfig
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

VERSION = 2  # bump when a rule changes meaning: cached shards and finished runs are then recomputed
# C0/C1 controls except \t and \n; \r is turned into \n before this runs.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
FILTERS = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "toxicity")
CHARGED = ("empty", *FILTERS)  # every name a dropped row can be charged to
EXAMPLE_CHARS = 200
LENGTH_EDGES = np.array([0, *(2 ** k for k in range(28))])  # characters; log bins that add across shards

# The built-in corpus (stdlib docstrings and help topics, arithmetic questions): today's looser
# Gopher subset, measured to keep ~98 % of the docstring characters and every question.
SHORT_TEXT: dict[str, Any] = {
    "language": {"enabled": False},  # identified and stored, not filtered: code-heavy docstrings score low
    "gopher_quality": {"min_words": 3, "max_mean_word_length": 12.0, "min_alpha_word_fraction": 0.6,
                       "min_stop_words": 0, "max_bullet_line_fraction": 1.0, "max_ellipsis_line_fraction": 1.0},
    "gopher_repetition": {"max_duplicate_paragraph_fraction": 1.0, "max_duplicate_line_char_fraction": 1.0,
                          "max_duplicate_paragraph_char_fraction": 1.0, "top_ngram_fractions": [],
                          "duplicate_ngram_fractions": []},
    "c4": {"enabled": False},
    "fineweb": {"enabled": False},
}
PROFILES: dict[str, dict[str, Any]] = {"web": {}, "short": SHORT_TEXT}
BUILTIN_PER_SOURCE: dict[str, Any] = {"stdlib-*": "short", arithmetic.SOURCE: "short"}


@dataclass(frozen=True)
class Filters:
    """The filter configs in force for one source."""

    language: LanguageConfig
    gopher_repetition: GopherRepetitionConfig
    gopher_quality: GopherQualityConfig
    c4: C4Config
    fineweb: FineWebConfig
    toxicity: ToxicityConfig
    pii: PIIConfig


FILTER_TYPES: dict[str, type] = typing.get_type_hints(Filters)


@dataclass(frozen=True, kw_only=True)
class CleanConfig:
    input_dir: Path  # a dataset directory (stages.dataset format)
    output_dir: Path
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    # source name or glob -> {filter: {field: value}} overrides, or a profile name ("web", "short")
    per_source: dict[str, Any] = field(default_factory=dict)
    builtin_per_source: bool = True  # stdlib-* and arithmetic get the "short" profile first
    examples_per_filter: int = 3  # dropped rows shown per filter in report.json (id + first 200 chars)

    def __post_init__(self) -> None:
        if not isinstance(self.per_source, dict):
            raise ValueError(f"per_source must be a mapping of source (or glob) to overrides, got {self.per_source!r}")
        for pattern, value in self.per_source.items():
            if isinstance(value, str):
                if value not in PROFILES:
                    raise ValueError(f"per_source[{pattern}]: unknown profile {value!r} "
                                     f"(profiles: {', '.join(PROFILES)})")
            elif not isinstance(value, dict) or set(value) - set(FILTER_TYPES):
                bad = sorted(set(value) - set(FILTER_TYPES)) if isinstance(value, dict) else value
                raise ValueError(f"per_source[{pattern}]: unknown filter {bad} (filters: {', '.join(FILTER_TYPES)})")
            filters_for(self, pattern)  # builds every override now: a bad value fails here, naming it
        if self.examples_per_filter < 0:
            raise ValueError(f"examples_per_filter must be >= 0, got {self.examples_per_filter}")


def _layers(cfg: CleanConfig, source: str) -> list[tuple[str, Any]]:
    tables = ([BUILTIN_PER_SOURCE] if cfg.builtin_per_source else []) + [cfg.per_source]
    layers = []
    for table in tables:
        matched = [p for p in table if fnmatch.fnmatchcase(source, p)]
        matched.sort(key=lambda p: p == source)  # stable: globs in order, then the exact name
        layers += [(p, table[p]) for p in matched]
    return layers


def filters_for(cfg: CleanConfig, source: str) -> Filters:
    """The filter configs for `source`: the stage's, then every matching per_source entry on top."""
    base = {name: getattr(cfg, name) for name in FILTER_TYPES}
    layers = _layers(cfg, source)
    if not layers:
        return Filters(**base)
    plain = {name: to_dict(c) for name, c in base.items()}
    merged = plain
    for _, layer in layers:
        if isinstance(layer, str):  # a profile starts again from the stage's own settings
            merged = deep_merge(plain, PROFILES[layer])
        else:
            merged = deep_merge(merged, layer)
    where = ",".join(p for p, _ in layers)
    return Filters(**{name: from_dict(FILTER_TYPES[name], merged[name], prefix=f"per_source[{where}].{name}.")
                      for name in FILTER_TYPES})


@dataclass(frozen=True)
class CleanResult:
    dataset: Path
    report: Path
    quarantine: Path
    plot: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class ShardTask:
    """One input shard -> one output shard (plus its stats and quarantine rows) under `shards/`."""

    input: Path
    output: Path  # shards/<key>.parquet; <key>.json holds the stats, <key>.quarantine.jsonl the rows
    key: str
    config: CleanConfig

    @property
    def stats_path(self) -> Path:
        return self.output.with_suffix(".json")

    @property
    def quarantine_path(self) -> Path:
        return self.output.with_suffix(".quarantine.jsonl")


@dataclass
class ShardStats:
    key: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    chars_in: int = 0
    chars_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # filter -> rows
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # filter -> rule -> rows
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> in, out, dropped{filter}
    languages: dict[str, int] = field(default_factory=dict)  # kept rows per language
    pii: dict[str, int] = field(default_factory=dict)  # redactions per kind
    c4_chars_removed: int = 0
    lengths_in: list[int] = field(default_factory=list)  # histogram counts over LENGTH_EDGES
    lengths_out: list[int] = field(default_factory=list)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def normalize(text: str) -> str:
    """NFC, newlines unified, control characters removed, outer whitespace stripped.

    >>> normalize("Cafe\\u0301\\r\\nbar\\x00\\t ")
    'Café\\nbar'
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return CONTROL_CHARS.sub("", text).strip()


def histogram(lengths: list[int]) -> list[int]:
    """Counts of lengths over LENGTH_EDGES (the last bin takes everything longer).

    >>> histogram([0, 1, 3, 3, 1000])[:3], sum(histogram([0, 1, 3, 3, 1000]))
    ([1, 1, 2], 5)
    """
    clipped = np.minimum(np.asarray(lengths, dtype=np.int64), LENGTH_EDGES[-1])
    return np.histogram(clipped, bins=LENGTH_EDGES)[0].astype(int).tolist()


def _meta(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return dict(raw)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {"meta_raw": raw}
    return value if isinstance(value, dict) else {"meta_raw": value}


def _verdict(f: Filters, text: str) -> tuple[str, str, str]:
    """(filter, reason, text): filter "" when the document stays; C4 may have removed lines."""
    if not text:
        return "empty", "empty", text
    if f.gopher_repetition.enabled:
        keep, reason = f.gopher_repetition(text)
        if not keep:
            return "gopher_repetition", reason, text
    if f.gopher_quality.enabled:
        keep, reason = f.gopher_quality(text)
        if not keep:
            return "gopher_quality", reason, text
    if f.c4.enabled:
        new, reason = f.c4(text)
        if new is None:
            return "c4", reason, text
        text = new
    if f.fineweb.enabled:
        keep, reason = f.fineweb(text)
        if not keep:
            return "fineweb", reason, text
    if f.toxicity.enabled:
        keep, reason = f.toxicity(text)
        if not keep:
            return "toxicity", reason, text
    return "", "", text


def clean_shard(task: ShardTask) -> ShardStats:
    """Clean one input shard into `task.output` (atomically) and return its stats (also saved beside it)."""
    cfg = task.config
    stats = ShardStats(key=task.key, dropped={name: 0 for name in CHARGED})
    df = read_shard(task.input)
    per_source: dict[str, Filters] = {}
    kept: list[list[Any]] = []  # [id, text, source, url, meta dict, Filters]
    lengths_in: list[int] = []
    task.output.parent.mkdir(parents=True, exist_ok=True)
    with QuarantineLog(task.quarantine_path) as quarantine:
        for row, (rid, text, source, url, meta) in enumerate(
                zip(df["id"], df["text"], df["source"], df["url"], df["meta"])):
            stats.rows_in += 1
            source = str(source)
            src = stats.sources.setdefault(source, {"in": 0, "out": 0, "dropped": {}})
            src["in"] += 1
            if not isinstance(text, str):
                reason = "text is null" if text is None or (isinstance(text, float) and np.isnan(text)) \
                    else "text is not a string"
                quarantine.add(file=task.input, line=row, reason=reason, id=str(rid), source=source)
                stats.quarantined += 1
                continue
            text = normalize(text)
            lengths_in.append(len(text))
            f = per_source.get(source)
            if f is None:
                f = per_source[source] = filters_for(cfg, source)
            lang: tuple[str, float] | None = None
            charged, reason = "", ""
            if f.language.enabled and text:
                lang = identify(text, f.language.max_chars)
                keep, reason = f.language.judge(*lang)
                charged = "" if keep else "language"
            if not charged:
                before = len(text)
                charged, reason, text = _verdict(f, text)
                if not charged:
                    stats.c4_chars_removed += before - len(text)
            if charged:
                _charge(stats, cfg, charged, reason, source, rid, text)
                continue
            kept.append([str(rid), text, source, url or "", meta, f, lang])
        stats.lengths_in = histogram(lengths_in)

    _classify(stats, cfg, kept)
    columns: dict[str, list[str]] = {c: [] for c in SCHEMA.names}
    for rid, text, source, url, meta, f, lang in kept:
        meta = _meta(meta)
        if lang is None and f.language.record:
            lang = identify(text, f.language.max_chars)
        if lang is not None:
            meta["language"], meta["language_score"] = lang
            stats.languages[lang[0]] = stats.languages.get(lang[0], 0) + 1
        if f.pii.enabled:
            text, counts = f.pii(text)
            if counts:
                meta["pii_redactions"] = counts
                for kind, n in counts.items():
                    stats.pii[kind] = stats.pii.get(kind, 0) + n
        for name, value in zip(SCHEMA.names, (rid, text, source, url, json.dumps(meta, sort_keys=True))):
            columns[name].append(value)
        stats.sources[source]["out"] += 1
    stats.rows_out = len(columns["id"])
    out_lengths = [len(t) for t in columns["text"]]
    stats.chars_in, stats.chars_out = int(sum(lengths_in)), int(sum(out_lengths))
    stats.lengths_out = histogram(out_lengths)

    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    write_atomically(task.output, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_rows(table)))
    write_atomically(task.stats_path, lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(stats))))
    return stats


def _charge(stats: ShardStats, cfg: CleanConfig, charged: str, reason: str, source: str, rid: Any,
            text: str) -> None:
    stats.dropped[charged] = stats.dropped.get(charged, 0) + 1
    rules = stats.reasons.setdefault(charged, {})
    rules[reason] = rules.get(reason, 0) + 1
    by_source = stats.sources[source]["dropped"]
    by_source[charged] = by_source.get(charged, 0) + 1
    examples = stats.examples.setdefault(charged, [])
    if len(examples) < cfg.examples_per_filter:
        examples.append({"id": str(rid), "source": source, "reason": reason, "text": text[:EXAMPLE_CHARS]})


def _classify(stats: ShardStats, cfg: CleanConfig, kept: list[list[Any]]) -> None:
    """The optional toxicity classifier, in batches over what every other filter kept (in place)."""
    groups: dict[ToxicityConfig, list[int]] = {}
    for i, (*_, f, _lang) in enumerate(kept):
        if f.toxicity.enabled and f.toxicity.classifier_dir is not None:
            groups.setdefault(f.toxicity, []).append(i)
    drop: set[int] = set()
    for tox, rows in groups.items():
        scores = tox.classifier_scores([kept[i][1] for i in rows])
        for i, score in zip(rows, scores):
            if score >= tox.classifier_threshold:
                rid, text, source = kept[i][:3]
                _charge(stats, cfg, "toxicity", "classifier", source, rid, text)
                drop.add(i)
    if drop:
        kept[:] = [k for i, k in enumerate(kept) if i not in drop]


# --- the driver: tasks, cache, assembly, report --------------------------------------------------


def _extra_inputs(cfg: CleanConfig) -> list[Path]:
    """Files besides the dataset whose bytes decide the result: word lists and classifier directories."""
    paths: set[Path] = set()
    for source in ["\0base", *BUILTIN_PER_SOURCE, *cfg.per_source]:
        tox = filters_for(cfg, source).toxicity
        if tox.enabled:
            paths.add(tox.wordlist_path)
            if tox.classifier_dir is not None:
                paths.add(Path(tox.classifier_dir))
    return sorted(paths)


def _shard_config_digest(cfg: CleanConfig, extra: list[Path]) -> str:
    plain = {k: v for k, v in to_dict(cfg).items() if k not in ("input_dir", "output_dir")}
    return fingerprint({"clean": plain, "version": VERSION}, extra)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links there
        shutil.copy2(src, dst)


def _load_stats(path: Path) -> ShardStats | None:
    try:
        return ShardStats(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def run(cfg: CleanConfig, tracker: Tracker | None = None, mapper: Any = map) -> CleanResult:
    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"dataset": out / "dataset", "report": out / "report.json", "quarantine": out / "quarantine.jsonl",
             "plot": out / "data_report.png"}
    extra = _extra_inputs(cfg)
    fp = fingerprint({**to_dict(cfg), "version": VERSION}, [cfg.input_dir, *extra])
    previous = finished_report(out, fp)
    if previous is not None:  # unchanged config and inputs: the earlier result stands
        metrics = {k: float(v) for k, v in previous["metrics"].items()}
        tracker.log_metrics(metrics)
        return CleanResult(**paths, metrics=metrics)

    shard_dir = out / "shards"
    digest = _shard_config_digest(cfg, extra)
    tasks = []
    for shard in dataset_shards(cfg.input_dir):
        key = hashlib.md5(f"{digest}:{file_digest(shard)}".encode()).hexdigest()
        tasks.append(ShardTask(input=shard, output=shard_dir / f"{key}.parquet", key=key, config=cfg))
    stats: dict[str, ShardStats] = {}
    for task in tasks:
        cached = _load_stats(task.stats_path) if task.output.exists() else None
        if cached is not None:
            stats[task.key] = cached
    pending = [t for t in tasks if t.key not in stats]
    for result in mapper(clean_shard, pending):
        stats[result.key] = result
    ordered = [stats[t.key] for t in tasks]

    tmp = atomic_dir(paths["dataset"])
    nonempty = [t for t, s in zip(tasks, ordered) if s.rows_out] or tasks[:1]  # a dataset has >= 1 shard
    for i, task in enumerate(nonempty):
        _link(task.output, tmp / f"part-{i:05d}.parquet")
    commit_dir(tmp, paths["dataset"])
    with QuarantineLog(paths["quarantine"]) as quarantine:
        for task in tasks:
            with open(task.quarantine_path, encoding="utf-8") as f:
                quarantine.extend(json.loads(line) for line in f if line.strip())
    keep = {t.key for t in tasks}
    for stale in shard_dir.glob("*"):  # earlier configs' and inputs' shards
        if stale.name.split(".")[0] not in keep:
            stale.unlink(missing_ok=True)

    report = summarize(ordered, cfg.examples_per_filter)
    report |= {"fingerprint": fp, "config": to_dict(cfg),
               "shards": {"total": len(tasks), "computed": len(pending), "reused": len(tasks) - len(pending)}}
    metrics = report_metrics(report)
    report["metrics"] = metrics
    plot_report(report, paths["plot"])
    write_report(out, report)
    tracker.log_metrics(metrics)
    tracker.log_artifact(paths["report"])
    tracker.log_artifact(paths["plot"])
    return CleanResult(**paths, metrics=metrics)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def summarize(shards: list[ShardStats], examples_per_filter: int) -> dict[str, Any]:
    """report.json's body from the shards' stats (counts add; examples keep the first few)."""
    totals = {"rows_in": 0, "rows_out": 0, "quarantined": 0, "chars_in": 0, "chars_out": 0, "c4_chars_removed": 0}
    dropped: dict[str, Any] = {name: 0 for name in CHARGED}
    reasons: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    languages: dict[str, Any] = {}
    pii: dict[str, Any] = {}
    examples: dict[str, list[dict[str, str]]] = {}
    hist_in = np.zeros(len(LENGTH_EDGES) - 1, dtype=np.int64)
    hist_out = hist_in.copy()
    for s in shards:
        for k in totals:
            totals[k] += getattr(s, k)
        _add(dropped, s.dropped)
        _add(reasons, s.reasons)
        _add(sources, s.sources)
        _add(languages, s.languages)
        _add(pii, s.pii)
        for name, rows in s.examples.items():
            examples.setdefault(name, []).extend(rows)
        hist_in += np.asarray(s.lengths_in or 0, dtype=np.int64)
        hist_out += np.asarray(s.lengths_out or 0, dtype=np.int64)
    kept = max(totals["rows_out"], 1)
    return {
        **totals, "dropped": dropped, "dropped_reasons": reasons,
        "dropped_by_source": {src: v["dropped"] for src, v in sorted(sources.items())},
        "sources": {src: {"in": v["in"], "out": v["out"]} for src, v in sorted(sources.items())},
        "language_share": {lang: n / kept for lang, n in sorted(languages.items(), key=lambda kv: -kv[1])},
        "pii_redactions": pii,
        "dropped_examples": {name: rows[:examples_per_filter] for name, rows in examples.items()},
        "length_histogram": {"edges": LENGTH_EDGES.tolist(), "before": hist_in.tolist(), "after": hist_out.tolist()},
    }


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    metrics = {f"data/{k}": float(report[k]) for k in ("rows_in", "rows_out", "quarantined", "chars_in", "chars_out")}
    metrics |= {f"data/{name}/dropped": float(n) for name, n in report["dropped"].items()}
    for name, rules in report["dropped_reasons"].items():
        metrics |= {f"data/{name}/{rule}/dropped": float(n) for rule, n in rules.items()}
    metrics |= {f"data/language/{lang}/share": float(v) for lang, v in report["language_share"].items()}
    metrics |= {f"data/pii/{kind}": float(n) for kind, n in report["pii_redactions"].items()}
    metrics["data/clean/c4_chars_removed"] = float(report["c4_chars_removed"])
    metrics["data/clean/shards_reused"] = float(report["shards"]["reused"])
    return metrics


def plot_report(report: dict[str, Any], path: Path) -> None:
    # Figure without pyplot: no global backend switch, no GUI, safe in worker threads.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    bars, hist = fig.subplots(1, 2)
    dropped = report["dropped"]
    bars.barh(list(dropped), list(dropped.values()), color="tab:red")
    bars.set_title("rows dropped per filter")
    bars.set_xlabel("rows")
    lengths = report["length_histogram"]
    edges = np.maximum(np.asarray(lengths["edges"], dtype=float), 0.5)  # log axis: the 0 bin drawn at 0.5
    for name, color in (("before", "tab:gray"), ("after", "tab:blue")):
        hist.stairs(lengths[name], edges, color=color, label=name, fill=name == "after", alpha=0.6)
    hist.set_xscale("log")
    hist.legend()
    hist.set_title(f"text lengths ({report['rows_in']} rows in, {report['rows_out']} kept)")
    hist.set_xlabel("characters")
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
