"""`flywheel stage decontaminate input_dir=/tmp/dedup/dataset output_dir=/tmp/decon eval_files=[gsm8k/test.jsonl]` — drop training documents that overlap evaluation data.

A training document is contaminated when it contains any 13-word sequence (`ngram`) of any
evaluation text. Words are normalised on both sides alike: lowercased, punctuation and spacing
stripped (runs of word characters, stages/minhash.py). The evaluation sets are

- built in (`builtin_tasks=true`): the arithmetic test split, i.e. the dataset's own records of source
  "arithmetic" with meta.split == "test" (what stages/evaluate.py scores; those records are the
  evaluation set, so they are kept and never checked), and the data files of stages/tasks/harness
  (the lm-eval task YAMLs' JSONL). Both are generated from a few sentence templates, so any 13 words
  of one question recur in hundreds of different problems (measured: 13-grams would remove 7.6 % of
  collect's 2,694 arithmetic training questions, none of them a test question): their questions
  match only as a whole, the full question inside a document;
- every JSONL (plain or .gz), Parquet or CSV file in `eval_files`: every string of a record is eval
  text, at any depth (GSM8K's question and answer, MMLU's question and each of its choices, a
  Parquet list<string> column element by element; a CSV row cell by cell).

An eval text shorter than `ngram` words matches only as a whole: its full normalised word sequence,
contiguous, inside a document. Texts under `min_words` words (a one-word MMLU choice, a number) are
not matched at all, since they occur everywhere; the report counts them per eval set.

Eval n-grams are 64-bit hashes in one sorted numpy array (with, beside it, which item each came
from), saved under the output directory for the per-shard workers (`mapper`) to memory-map. A
document's first match is what `contaminated.jsonl` lists: document id and source, eval set, item
index and id, and the matching words. A missing eval file is an error naming it before any work.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.config import to_dict
from stages.dataset import (QuarantineLog, dataset_shards, finished_report, fingerprint, iter_batches, release_memory,
                            write_jsonl, write_kept, write_report)
from stages.minhash import WordHasher, ngram_hashes, ngram_hashes_by_length, words
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

HARNESS_DIR = Path(__file__).parent / "tasks" / "harness"
SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")
REPORT_EXAMPLES = 20


class MissingEvalFile(FileNotFoundError):
    """An eval file named in the config does not exist."""


class EvalFileError(ValueError):
    """An eval file cannot be read; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
    input_dir: Path  # a dataset directory (stages.dataset format)
    output_dir: Path
    eval_files: tuple[Path, ...] = ()  # JSONL (.gz), Parquet or CSV; every string of a record is eval text
    builtin_tasks: bool = True  # the arithmetic test split of the dataset and stages/tasks/harness data
    ngram: int = 13  # words per n-gram (GPT-3's decontamination used 13)
    min_words: int = 8  # eval texts shorter than this are not matched (they occur everywhere)
    batch_rows: int = 4096

    def __post_init__(self) -> None:
        value = self.eval_files
        if isinstance(value, str | Path):  # `eval_files=a.jsonl,b.parquet` on a command line
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        object.__setattr__(self, "eval_files", tuple(Path(v) for v in value))
        for f in self.eval_files:
            if not f.name.lower().endswith(SUFFIXES):
                raise ValueError(f"decontaminate.eval_files: {f} is not one of {', '.join(SUFFIXES)}")
        if not 1 <= self.ngram <= 64:
            raise ValueError(f"decontaminate.ngram must be in [1, 64], got {self.ngram}")
        if not 1 <= self.min_words <= self.ngram:
            raise ValueError(f"decontaminate.min_words must be in [1, ngram={self.ngram}], got {self.min_words}")
        if self.batch_rows < 1:
            raise ValueError(f"decontaminate.batch_rows must be >= 1, got {self.batch_rows}")


@dataclass(frozen=True)
class DecontaminateResult:
    dataset: Path
    report: Path
    quarantine: Path
    contaminated: Path
    metrics: dict[str, float]


# --- evaluation texts -------------------------------------------------------------------------

def strings_of(value: Any) -> Iterator[str]:
    """Every string inside a record, depth first.

    >>> list(strings_of({"question": "q?", "choices": ["a", "b"], "label": 2, "meta": {"x": "y"}}))
    ['q?', 'a', 'b', 'y']
    """
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_of(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_of(v)


def eval_items(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(item index, item id, texts) of one eval file; index = line (JSONL, CSV) or row (Parquet), from 1."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                yield row, str(rec.get("id") or f"{path.stem}:{row}"), list(strings_of(rec))
    elif name.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for line, cells in enumerate(csv.reader(f), start=1):
                yield line, f"{path.stem}:{line}", [c for c in cells if c]
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise EvalFileError(f"eval file {path}:{line}: not valid JSON ({e.msg})") from None
                rid = rec.get("id") if isinstance(rec, dict) else None
                yield line, str(rid or f"{path.stem}:{line}"), list(strings_of(rec))


def arithmetic_test_items(dataset: Path) -> Iterator[tuple[int, str, list[str]]]:
    """The dataset's arithmetic test split, read column-wise (only the arithmetic rows' text), a row group at a time."""
    index = 0
    for shard in dataset_shards(dataset):
        f = pq.ParquetFile(shard)
        for group in range(f.num_row_groups):
            # the source column first: most row groups of a real corpus hold no arithmetic row
            sources = f.read_row_group(group, columns=["source"]).column("source")
            if not pc.any(pc.equal(sources, arithmetic.SOURCE)).as_py():
                continue
            table = f.read_row_group(group, columns=["id", "text", "source", "meta"])
            for rec in table.filter(pc.equal(table.column("source"), arithmetic.SOURCE)).to_pylist():
                meta = json.loads(rec["meta"]) if rec["meta"] else {}
                if meta.get("split") == "test" and isinstance(rec["text"], str):
                    index += 1
                    yield index, rec["id"], [rec["text"]]


def build_index(sets: dict[str, tuple[Iterator[tuple[int, str, list[str]]], bool]], cfg: DecontaminateConfig,
                where: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], list[int]]:
    """Hash every eval text into `where`/hashes.npy (sorted, unique) and refs.npy (item of each hash).

    `sets`: name -> (items, whole), `whole` meaning its texts match only as a whole, at any length.
    Returns (items: [{eval, item, id}], per-set counts, the whole-text lengths (other than ngram) that occur).
    """
    hasher = WordHasher()
    items: list[dict[str, Any]] = []
    hashes, refs, whole_lengths = [], [], set()
    counts: dict[str, dict[str, int]] = {}
    for name, (rows, whole) in sets.items():
        c = counts[name] = {"items": 0, "texts": 0, "ngrams": 0, "whole_texts": 0, "skipped_short": 0}
        for index, item_id, texts in rows:
            ref = len(items)
            items.append({"eval": name, "item": index, "id": item_id})
            c["items"] += 1
            for text in texts:
                wh = hasher(words(text))
                if len(wh) < cfg.min_words:
                    c["skipped_short"] += 1
                    continue
                c["texts"] += 1
                n = len(wh) if whole else min(cfg.ngram, len(wh))
                if n != cfg.ngram and (whole or n < cfg.ngram):
                    c["whole_texts"] += 1
                    whole_lengths.add(n)
                h = ngram_hashes(wh, n)
                hashes.append(h)
                refs.append(np.full(len(h), ref, dtype=np.int32))
                c["ngrams"] += len(h)
    all_h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    all_r = np.concatenate(refs) if refs else np.empty(0, np.int32)
    uniq, first = np.unique(all_h, return_index=True)  # sorted; each hash credited to its first item
    np.save(where / "hashes.npy", uniq)
    np.save(where / "refs.npy", all_r[first])
    return items, counts, sorted(whole_lengths)


# --- per shard (a Ray task in the flows) --------------------------------------------------------

@dataclass(frozen=True)
class ShardTask:
    path: str
    index_dir: str
    lengths: tuple[int, ...]  # ngram first, then the lengths of eval texts matched as a whole
    batch_rows: int


@dataclass(frozen=True)
class ShardMatches:
    rows: int
    matches: list[dict[str, Any]]  # {row, id, source, ref, ngram}
    invalid: list[dict[str, Any]]  # {row, id, reason}
    exempt: int  # arithmetic test-split rows: the eval set itself


def is_eval_record(source: Any, meta: Any) -> bool:
    if source != arithmetic.SOURCE or not meta:
        return False
    try:
        return json.loads(meta).get("split") == "test"
    except (ValueError, AttributeError):
        return False


def match_shard(task: ShardTask) -> ShardMatches:
    # np.asarray: a lookup (searchsorted, then take) of 700 n-grams took 830 us on the np.memmap subclass, 150 on a
    # plain ndarray view of the same map
    hashes = np.asarray(np.load(Path(task.index_dir) / "hashes.npy", mmap_mode="r"))
    refs = np.asarray(np.load(Path(task.index_dir) / "refs.npy", mmap_mode="r"))
    hasher = WordHasher()
    matches, invalid, exempt, row = [], [], 0, 0
    for batch in iter_batches(task.path, task.batch_rows, columns=["id", "text", "source", "meta"]):
        for rec in batch.to_pylist():
            text = rec["text"]
            if not isinstance(text, str):
                invalid.append({"row": row, "id": rec["id"],
                                "reason": "text is null" if text is None else "text is not a string"})
            elif is_eval_record(rec["source"], rec["meta"]):
                exempt += 1
            elif len(hashes):
                ws = words(text)
                by_length = ngram_hashes_by_length(hasher(ws), task.lengths)
                for n in task.lengths:
                    h = by_length[n]
                    if not len(h):
                        continue
                    pos = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
                    hit = np.flatnonzero(hashes[pos] == h)
                    if len(hit):
                        p = int(hit[0])
                        matches.append({"row": row, "id": rec["id"], "source": rec["source"],
                                        "ref": int(refs[pos[p]]), "ngram": " ".join(ws[p:p + n])})
                        break
            row += 1
    return ShardMatches(rows=row, matches=matches, invalid=invalid, exempt=exempt)


# --- driver -------------------------------------------------------------------------------------

def harness_files() -> list[Path]:
    return sorted(HARNESS_DIR.glob("*.jsonl"))


def run(cfg: DecontaminateConfig, tracker: Tracker | None = None, mapper=map) -> DecontaminateResult:
    missing = [f for f in cfg.eval_files if not Path(f).is_file()]
    if missing:
        raise MissingEvalFile(f"decontaminate.eval_files: {missing[0]} does not exist"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tracker = tracker or NullTracker()
    out = Path(cfg.output_dir)
    shards = dataset_shards(cfg.input_dir)
    builtin_files = harness_files() if cfg.builtin_tasks else []
    fp = fingerprint(to_dict(cfg), [cfg.input_dir, *cfg.eval_files, *builtin_files])
    previous = finished_report(out, fp)
    if previous is not None:
        return _result(out, previous)
    tracker.log_params(to_dict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".work"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    release_memory()  # what the previous stage in this process left in the allocators

    sets: dict[str, Iterator] = {}
    if cfg.builtin_tasks:
        # Generated from a few templates: any 13 words of one question recur in hundreds of other problems
        # (other names or numbers, other answers), so a question counts only as a whole.
        sets["arithmetic:test"] = (arithmetic_test_items(cfg.input_dir), True)
        sets |= {f"harness:{f.name}": (eval_items(f), True) for f in builtin_files}
    sets |= {str(f): (eval_items(Path(f)), False) for f in cfg.eval_files}
    items, eval_counts, whole = build_index(sets, cfg, scratch)

    tasks = [ShardTask(str(s), str(scratch.resolve()), (cfg.ngram, *sorted(whole, reverse=True)), cfg.batch_rows)
             for s in shards]
    drop: set[int] = set()
    listed: list[dict[str, Any]] = []
    exempt = offset = 0
    with QuarantineLog(out / "quarantine.jsonl") as quarantine:
        for shard, res in zip(shards, mapper(match_shard, tasks), strict=True):
            for bad in res.invalid:
                quarantine.add(file=shard, reason=bad["reason"], row=bad["row"], id=bad["id"])
                drop.add(offset + bad["row"])
            for m in res.matches:
                drop.add(offset + m["row"])
                item = items[m["ref"]]
                listed.append({"id": m["id"], "source": m["source"], "eval": item["eval"], "item": item["item"],
                               "eval_id": item["id"], "ngram": m["ngram"]})
            exempt += res.exempt
            offset += res.rows
            release_memory()
        quarantined = quarantine.count
    contaminated_path = write_jsonl(listed, out / "contaminated.jsonl")

    keep = np.ones(offset, dtype=bool)
    keep[np.fromiter(drop, dtype=np.int64, count=len(drop))] = False
    rows_out, sources_in, sources_out = write_kept(cfg.input_dir, keep, out / "dataset", cfg.batch_rows)
    shutil.rmtree(scratch, ignore_errors=True)
    by_eval = Counter(row["eval"] for row in listed)
    metrics = {"data/rows_in": float(offset), "data/rows_out": float(rows_out), "data/quarantined": float(quarantined),
               "data/decontaminate/dropped": float(len(listed)), "data/decontaminate/exempt": float(exempt),
               "data/decontaminate/eval_ngrams": float(sum(c["ngrams"] for c in eval_counts.values()))}
    report = {
        "fingerprint": fp, "rows_in": offset, "rows_out": rows_out, "quarantined": quarantined,
        "dropped": {"contaminated": len(listed)},
        "sources": {s: {"in": c, "out": sources_out.get(s, 0)} for s, c in sorted(sources_in.items())},
        "contaminated": {"count": len(listed), "by_eval": dict(sorted(by_eval.items())),
                         "examples": listed[:REPORT_EXAMPLES]},
        "exempt_eval_records": exempt, "eval_sets": eval_counts,
        "config": to_dict(cfg), "metrics": metrics,
    }
    report_path = write_report(out, report)
    tracker.log_metrics(metrics)
    tracker.log_artifact(report_path)
    tracker.log_artifact(contaminated_path)
    return _result(out, report)


def _result(out: Path, report: dict[str, Any]) -> DecontaminateResult:
    return DecontaminateResult(dataset=out / "dataset", report=out / "report.json", quarantine=out / "quarantine.jsonl",
                               contaminated=out / "contaminated.jsonl", metrics=report["metrics"])
