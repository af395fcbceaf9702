"""`python -c "from stages.data_report import build; print(build({'collect': ..., 'clean': ...}, out).markdown)"` — one report of the data phase.

Reads what the data stages left in their output directories (`report.json`, `dataset/`) and writes
one PNG (length histograms of the raw collected and the final dataset, rows dropped per stage and
filter, language share, source mix) plus a markdown summary a person reads (the flows publish it as
a Prefect markdown artifact and log both to MLflow). Stages that did not run, or whose report lacks
a key, are named as missing and the rest is still reported: the report never fails a run.

Keys read, per stage (all optional): every report's `rows_in`, `rows_out`, `quarantined`,
`dropped` ({name: rows}) and `sources` ({source: {"in", "out"}}); collect's `unreadable_files`;
clean's `language_share` ({language: share}) and `length_histogram` ({"edges", "before", "after"},
used only when the datasets are gone); dedup's `clusters.count`; decontaminate's
`contaminated.count`; mix's `mixture` ({source: {"docs", "tokens_in", "target_share",
"tokens_out", "actual_share", "epochs"}}); validate's `validation.json` (`success`, `results`).
Lengths are counted from the datasets themselves, streamed one column at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.dataset import write_atomically

STAGE_ORDER = ("collect", "clean", "dedup", "decontaminate", "mix")
# Character-length bins: 0, then log-spaced up to 10 M (a longer text lands in the last bin).
LENGTH_EDGES = np.concatenate([[0], np.unique(np.round(np.logspace(0, 7, 57)).astype(np.int64))])


@dataclass(frozen=True)
class DataReport:
    png: Path
    markdown: str
    summary: dict[str, Any]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def length_histogram(dataset: Path) -> tuple[np.ndarray, int, int] | None:
    """(counts over LENGTH_EDGES, rows, median characters) of a dataset's texts, or None without shards."""
    shards = sorted(Path(dataset).glob("*.parquet"))
    if not shards:
        return None
    counts = np.zeros(len(LENGTH_EDGES) - 1, dtype=np.int64)
    for shard in shards:
        try:
            batches = pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=65_536)
            for batch in batches:
                lengths = pc.utf8_length(batch.column(0)).to_numpy(zero_copy_only=False)
                lengths = lengths[~np.isnan(lengths.astype(float))].astype(np.int64)
                counts += np.histogram(np.minimum(lengths, LENGTH_EDGES[-1]), bins=LENGTH_EDGES)[0]
        except (OSError, ValueError, KeyError, TypeError):  # a shard we cannot read is left out, not fatal
            continue
    rows = int(counts.sum())
    return counts, rows, median_of(counts)


def median_of(counts: np.ndarray) -> int:
    """The lower edge of the bin holding the median (0 for no rows).

    >>> median_of(np.array([0, 5, 1] + [0] * (len(LENGTH_EDGES) - 4)))
    1
    """
    total = counts.sum()
    if total == 0:
        return 0
    k = int(np.searchsorted(np.cumsum(counts), (total + 1) / 2))
    return int(LENGTH_EDGES[k])


def language_share_of(dataset: Path, limit_rows: int = 200_000) -> dict[str, float]:
    """Share of rows per meta.language in the first `limit_rows` rows (a sample bounds the cost)."""
    counts: dict[str, int] = {}
    seen = 0
    for shard in sorted(Path(dataset).glob("*.parquet")):
        try:
            for batch in pq.ParquetFile(shard).iter_batches(columns=["meta"], batch_size=65_536):
                for meta in batch.column(0).to_pylist():
                    lang = None
                    if isinstance(meta, str) and '"language"' in meta:
                        try:
                            lang = json.loads(meta).get("language")
                        except (ValueError, AttributeError):
                            lang = None
                    if isinstance(lang, str):
                        counts[lang] = counts.get(lang, 0) + 1
                    seen += 1
                if seen >= limit_rows:
                    break
        except (OSError, ValueError, KeyError):
            continue
        if seen >= limit_rows:
            break
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def stage_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """rows in/out, quarantined and drops of one stage's report, whatever keys it lacks."""
    dropped = report.get("dropped") if isinstance(report.get("dropped"), dict) else {}
    drops = {k: int(v) for k, v in dropped.items() if _number(v) is not None}
    row: dict[str, Any] = {"rows_in": _number(report.get("rows_in")), "rows_out": _number(report.get("rows_out")),
                           "quarantined": _number(report.get("quarantined")), "dropped": drops}
    unreadable = report.get("unreadable_files")
    if isinstance(unreadable, list | dict):
        row["unreadable_files"] = len(unreadable)
    clusters = report.get("clusters")
    if isinstance(clusters, dict) and _number(clusters.get("count")) is not None:
        row["clusters"] = int(clusters["count"])
    contaminated = report.get("contaminated")
    if isinstance(contaminated, dict) and _number(contaminated.get("count")) is not None:
        row["contaminated"] = int(contaminated["count"])
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1%}" if value <= 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def markdown_of(summary: dict[str, Any]) -> str:
    lines = ["# Data report", ""]
    stages = summary["stages"]
    if stages:
        lines += _table(["stage", "rows in", "rows out", "dropped", "quarantined", "notes"],
                        [[name, s["rows_in"], s["rows_out"], sum(s["dropped"].values()), s["quarantined"],
                          ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s.items()
                                    if k in ("unreadable_files", "clusters", "contaminated"))]
                         for name, s in stages.items()])
    if summary["missing"]:
        lines += ["", "Not run or no report: " + ", ".join(summary["missing"]) + "."]
    if summary["drops"]:
        lines += ["", "## Rows dropped per filter", ""]
        lines += _table(["stage", "filter", "rows"], [[*k.split("/", 1), v] for k, v in summary["drops"].items()])
    length = summary["length"]
    if length:
        lines += ["", "## Text length (characters)", ""]
        lines += _table(["dataset", "rows", "median"], [[k, v["rows"], v["median_chars"]] for k, v in length.items()])
    if summary["language_share"]:
        lines += ["", "## Language share", ""]
        lines += _table(["language", "share"], [[k, float(v)] for k, v in list(summary["language_share"].items())[:10]])
    if summary["mixture"]:
        lines += ["", "## Source mix", ""]
        lines += _table(["source", "docs", "tokens in", "target share", "tokens out", "actual share", "epochs"],
                        [[src, m.get("docs"), m.get("tokens_in"), m.get("target_share"), m.get("tokens_out"),
                          m.get("actual_share"), f"{m['epochs']:.2f}" if isinstance(m.get("epochs"), float) else None]
                         for src, m in summary["mixture"].items()])
    elif summary["sources"]:
        lines += ["", "## Sources (rows in the final dataset)", ""]
        lines += _table(["source", "rows"], [[k, v] for k, v in summary["sources"].items()])
    gate = summary.get("validation")
    if gate:
        verdict = "passed" if gate["success"] else f"FAILED ({gate['failed']} of {gate['expectations']})"
        lines += ["", f"Data gate (Great Expectations): {verdict}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], hists: dict[str, np.ndarray], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in worker threads

    fig = Figure(figsize=(13, 8), layout="constrained")
    (lengths, drops), (langs, mix) = fig.subplots(2, 2)

    def empty(ax: Any, title: str) -> None:
        ax.set_title(title)
        ax.text(0.5, 0.5, "not available (stage skipped)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    if hists:
        for (label, counts), color in zip(hists.items(), ("tab:gray", "tab:blue"), strict=False):
            lengths.stairs(counts, np.maximum(LENGTH_EDGES, 0.5), label=f"{label} ({int(counts.sum()):,} rows)",
                           color=color, fill=label == "raw", alpha=0.5 if label == "raw" else 1.0)
        lengths.set_xscale("log")
        used = np.flatnonzero(np.sum(list(hists.values()), axis=0))
        if len(used):  # zoom on the occupied bins, not 0..10 M characters
            lengths.set_xlim(max(LENGTH_EDGES[used[0]], 0.5), LENGTH_EDGES[used[-1] + 1])
        lengths.set_xlabel("characters")
        lengths.set_ylabel("rows")
        lengths.set_title("text length: raw vs final")
        lengths.legend()
    else:
        empty(lengths, "text length")
    if summary["drops"]:
        names = list(summary["drops"])
        bars = drops.barh(names, list(summary["drops"].values()), color="tab:red")
        drops.bar_label(bars, fmt="{:,.0f}", padding=3)  # 3 quarantined rows beside 10,000 dropped still show
        drops.invert_yaxis()
        drops.set_xlabel("rows")
        drops.set_title("rows dropped per stage / filter")
    else:
        empty(drops, "rows dropped")
    if summary["language_share"]:
        share = list(summary["language_share"].items())[:8]
        langs.barh([k for k, _ in share], [v for _, v in share], color="tab:green")
        langs.invert_yaxis()
        langs.set_xlabel("share of rows")
        langs.set_title("language share")
    else:
        empty(langs, "language share")
    if summary["mixture"]:
        names = list(summary["mixture"])
        x = np.arange(len(names))
        mix.bar(x - 0.2, [summary["mixture"][n].get("target_share") or 0 for n in names], 0.4, label="target",
                color="tab:gray")
        mix.bar(x + 0.2, [summary["mixture"][n].get("actual_share") or 0 for n in names], 0.4, label="actual",
                color="tab:blue")
        mix.set_xticks(x, names, rotation=30, ha="right")
        mix.set_ylabel("share of training tokens")
        mix.legend()
        mix.set_title("source mix")
    elif summary["sources"]:
        mix.bar(list(summary["sources"]), list(summary["sources"].values()), color="tab:blue")
        mix.tick_params(axis="x", rotation=30)
        mix.set_ylabel("rows")
        mix.set_title("sources (final dataset)")
    else:
        empty(mix, "source mix")
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


def build(stage_dirs: dict[str, Path], out_dir: Path) -> DataReport:
    """The data report of stages' output directories (name -> dir; missing or skipped ones are named)."""
    names = [n for n in STAGE_ORDER if n in stage_dirs] + [n for n in stage_dirs if n not in STAGE_ORDER]
    reports: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for name in names:
        if name == "validate":
            continue
        report = read_json(Path(stage_dirs[name]) / "report.json") if stage_dirs[name] else None
        if report is None:
            missing.append(name)
        else:
            reports[name] = report
    stages = {name: stage_row(name, r) for name, r in reports.items()}
    drops: dict[str, int] = {}
    for name, s in stages.items():
        if s["quarantined"]:
            drops[f"{name}/quarantined"] = s["quarantined"]
        drops |= {f"{name}/{k}": v for k, v in s["dropped"].items() if v}

    with_data = [n for n in names if n in reports and stage_dirs[n] and (Path(stage_dirs[n]) / "dataset").is_dir()]
    raw_stage, final_stage = (with_data[0], with_data[-1]) if with_data else (None, None)
    hists: dict[str, np.ndarray] = {}
    length: dict[str, dict[str, Any]] = {}
    for label, stage in (("raw", raw_stage), ("final", final_stage)):
        found = length_histogram(Path(stage_dirs[stage]) / "dataset") if stage else None
        if found is not None:
            hists[label] = found[0]
            length[label] = {"stage": stage, "rows": found[1], "median_chars": found[2]}
    clean_hist = reports.get("clean", {}).get("length_histogram")
    if not hists and isinstance(clean_hist, dict):  # datasets gone: clean's own before/after counts
        edges = np.asarray(clean_hist.get("edges", []))
        for label, key in (("raw", "before"), ("final", "after")):
            counts = np.asarray(clean_hist.get(key, []), dtype=np.int64)
            if len(edges) == len(LENGTH_EDGES) and len(counts) == len(edges) - 1:
                hists[label] = counts

    language = {}
    if final_stage is not None:
        language = language_share_of(Path(stage_dirs[final_stage]) / "dataset")
    if not language and isinstance(reports.get("clean", {}).get("language_share"), dict):
        language = {k: float(v) for k, v in reports["clean"]["language_share"].items()
                    if isinstance(v, int | float)}

    mixture = reports.get("mix", {}).get("mixture")
    mixture = {k: v for k, v in mixture.items() if isinstance(v, dict)} if isinstance(mixture, dict) else {}
    sources: dict[str, int] = {}
    if final_stage is not None and isinstance(reports[final_stage].get("sources"), dict):
        sources = {k: int(v["out"]) for k, v in reports[final_stage]["sources"].items()
                   if isinstance(v, dict) and _number(v.get("out")) is not None}

    summary: dict[str, Any] = {"stages": stages, "missing": missing, "drops": drops, "length": length,
                               "language_share": language, "mixture": mixture, "sources": sources}
    if "validate" in stage_dirs and stage_dirs["validate"]:
        outcome = read_json(Path(stage_dirs["validate"]) / "validation.json")
        if outcome is not None and isinstance(outcome.get("results"), list):
            results = outcome["results"]
            summary["validation"] = {"success": bool(outcome.get("success")), "expectations": len(results),
                                     "failed": sum(1 for r in results if not r.get("success"))}
        else:
            missing.append("validate")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "data_report.png"
    plot(summary, hists, png)
    markdown = markdown_of(summary)
    write_atomically(out / "data_report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    write_atomically(out / "data_report.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str)))
    return DataReport(png=png, markdown=markdown, summary=summary)
