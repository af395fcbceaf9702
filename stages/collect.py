"""`flywheel stage collect output_dir=/tmp/raw` — gather raw text from every connector into one dataset.

    flywheel stage collect output_dir=/tmp/raw builtin_text=false arithmetic_problems=0 folders=[~/notes]
    flywheel stage collect output_dir=/tmp/raw builtin_text=false arithmetic_problems=0 files=[data/qa.jsonl.gz] text_field=question id_field=qid
    flywheel stage collect output_dir=/tmp/raw builtin_text=false arithmetic_problems=0 warc=[crawl/CC-MAIN-00000.warc.gz]
    flywheel stage collect output_dir=/tmp/raw builtin_text=false arithmetic_problems=0 urls=[urls.txt] http.concurrency=8
    flywheel stage collect output_dir=/tmp/raw builtin_text=false arithmetic_problems=0 hf_datasets=[/data/saved_corpus]

Sources, each a small connector (`stages/connectors/`) yielding records (`id`, `text`, `source`,
`url`, `meta`):

- builtin: docstrings of the Python standard library, parsed from source with `ast`, plus the
  `pydoc_data` help topics: about 2 MB of real English that every machine has, so the demo and the
  tests need no download;
- arithmetic: generated word problems with checkable answers (`stages.tasks.arithmetic`);
- folders: every `.txt`/`.md`/`.html`/`.htm` file below a folder, one record per file (HTML through
  the main-content extractor, `stages/html.py`);
- files: JSONL (optionally gzipped) or Parquet, the text taken from `text_field` (and the id and URL
  from `id_field` and `url_field` when given);
- warc: WARC files, one record per HTML response;
- urls: URLs, or text files listing one URL per line, fetched politely (`http.*` settings);
- hf_datasets: Hugging Face datasets saved with `save_to_disk`, or Hub names (streamed) when online.

Bad input never stops the run and never vanishes: every record or file that cannot be used is a row
of `quarantine.jsonl` naming its file, line or byte offset, and reason, and every good record before
and after the damage is kept. `report.json` counts rows per source, quarantined rows per reason, and
names the files that could not be read at all. Each input is one job given to `mapper` (Ray in the
flows); an unchanged re-run (same config, same input bytes) returns the previous result unread.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sysconfig
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.config import to_dict
from stages.connectors import DEFAULT_MAX_DOC_BYTES, FieldMap
from stages.connectors import files as file_connector
from stages.connectors import folders as folder_connector
from stages.connectors import hf as hf_connector
from stages.connectors import http as http_connector
from stages.connectors import warc as warc_connector
from stages.connectors.http import HttpConfig
from stages.dataset import (SCHEMA, QuarantineLog, atomic_dir, commit_dir, file_digest, finished_report, fingerprint,
                            write_dataset, write_report)
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

FILE_SUFFIXES = file_connector.SUFFIXES
WARC_SUFFIXES = warc_connector.SUFFIXES
FOLDER_SUFFIXES = folder_connector.SUFFIXES
# Tests of the stdlib are code, not prose; idlelib (a GUI) and lib2to3 (grammar fixers and
# fixtures) add little English; site-packages is whatever happens to be installed, which would make
# the corpus differ between machines.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
TUPLE_FIELDS = ("folders", "files", "warc", "urls", "hf_datasets")
file_source_name = file_connector.file_stem


@dataclass(frozen=True, kw_only=True)
class CollectConfig:
    output_dir: Path
    builtin_text: bool = True  # stdlib docstrings + pydoc topics
    max_builtin_chars: int = 0  # stop each builtin source after this many characters (0 = all)
    arithmetic_problems: int = 3000
    arithmetic_test_fraction: float = 0.1  # share of problems held out for evaluation (meta.split)
    folders: tuple[str, ...] = ()  # every .txt/.md/.html/.htm below each, recursively
    files: tuple[str, ...] = ()  # .jsonl, .jsonl.gz or .parquet
    warc: tuple[str, ...] = ()  # .warc or .warc.gz
    urls: tuple[str, ...] = ()  # http(s) URLs, or paths of text files listing one URL per line
    hf_datasets: tuple[str, ...] = ()  # save_to_disk directories, or Hub names (owner/name[:config])
    text_field: str = "text"  # the field of a file/dataset record that holds the text
    id_field: str | None = None  # ... its id (None: <source>:<line or row>)
    url_field: str | None = None  # ... its URL (None: no URL)
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES  # a larger document is one quarantine row, never loaded
    http: HttpConfig = field(default_factory=HttpConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in TUPLE_FIELDS:  # `folders=docs` on the command line means one folder, not four letters
            value = getattr(self, name)
            if isinstance(value, str | Path):
                object.__setattr__(self, name, (str(value),))
            elif not all(isinstance(v, str | Path) and str(v).strip() for v in value):
                raise ValueError(f"{name}: every entry must be a non-empty path or name, got {list(value)!r}")
            else:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.max_builtin_chars < 0:
            raise ValueError(f"max_builtin_chars must be >= 0 (0 = all), got {self.max_builtin_chars}")
        if self.arithmetic_problems < 0:
            raise ValueError(f"arithmetic_problems must be >= 0, got {self.arithmetic_problems}")
        if not 0.0 <= self.arithmetic_test_fraction <= 1.0:
            raise ValueError(
                f"arithmetic_test_fraction must be in [0, 1], got {self.arithmetic_test_fraction}")
        if not self.text_field:
            raise ValueError("text_field must not be empty")
        for name in ("id_field", "url_field"):
            value = getattr(self, name)
            if value is not None and (not value or value == self.text_field):
                raise ValueError(f"{name} must be a non-empty field other than text_field, got {value!r}")
        if self.max_doc_bytes <= 0:
            raise ValueError(f"max_doc_bytes must be > 0, got {self.max_doc_bytes}")
        if not isinstance(self.http, HttpConfig):
            raise ValueError(f"http must be an HttpConfig, got {type(self.http).__name__}")
        for f in self.files:
            if not f.endswith(FILE_SUFFIXES):
                raise ValueError(f"files: {f} is not one of {', '.join(FILE_SUFFIXES)}")
        for f in self.warc:
            if not f.endswith(WARC_SUFFIXES):
                raise ValueError(f"warc: {f} is not one of {', '.join(WARC_SUFFIXES)}")
        for u in self.urls:
            if "://" in u and not http_connector.is_url(u):
                raise ValueError(f"urls: {u} is not an http(s) URL (nor a path of a file listing URLs)")
        # Source names become ids: two inputs with the same name would produce colliding ids.
        for name, names in (("folders", [Path(f).name for f in self.folders]),
                            ("files", [file_source_name(f) for f in self.files]),
                            ("warc", [warc_connector.warc_stem(f) for f in self.warc]),
                            ("urls", [Path(u).stem for u in self.urls if not http_connector.is_url(u)]),
                            ("hf_datasets", [hf_connector.hf_name(d) for d in self.hf_datasets])):
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            if dupes:
                raise ValueError(f"{name}: two entries share the name {dupes[0]!r}")

    @property
    def fields(self) -> FieldMap:
        return FieldMap(text=self.text_field, id=self.id_field, url=self.url_field)

    def inputs(self) -> list[Path]:
        """The local paths whose bytes the result depends on (the fingerprint reads them)."""
        local = [*self.folders, *self.files, *self.warc, *(u for u in self.urls if not http_connector.is_url(u)),
                 *(d for d in self.hf_datasets if Path(d).exists())]
        return [Path(p) for p in local]


@dataclass(frozen=True)
class CollectResult:
    dataset: Path
    report: Path
    quarantine: Path
    metrics: dict[str, float]


def metric_key(*parts: str) -> str:
    """Metric name from parts; characters MLflow rejects on some platforms (e.g. ':') become '_'."""
    return "/".join(re.sub(r"[^\w.\- /]", "_", p) for p in parts)


# --- builtin ---------------------------------------------------------------------------------


def stdlib_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualname, docstring) of the module and every class/function in it, nested ones included."""
    doc = ast.get_docstring(tree)
    if doc:
        yield "<module>", doc
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield qualname, doc
                stack.append((qualname + ".", child))
            elif not isinstance(child, ast.expr):
                # Definitions inside if/try blocks are still definitions of this scope.
                stack.append((prefix, child))


def stdlib_docstrings(max_chars: int = 0) -> Iterator[dict[str, Any]]:
    # Parsed, never imported: `this` prints, `antigravity` opens a browser, `idlelib` starts a GUI.
    root = Path(sysconfig.get_paths()["stdlib"])
    seen_text: set[str] = set()
    seen_ids: Counter[str] = Counter()
    chars = 0
    with tqdm(stdlib_files(root), desc="stdlib docstrings", unit="file", mininterval=1.0) as files:
        for path in files:
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            try:
                with warnings.catch_warnings():  # old files warn about invalid escapes
                    warnings.simplefilter("ignore")
                    tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
                continue  # e.g. lib2to3 fixtures and bad-syntax examples kept as data
            for qualname, doc in _docstrings(tree):
                if doc in seen_text:
                    continue  # inherited/copied docstrings (e.g. the same "Return self==value.")
                seen_text.add(doc)
                rid = f"stdlib:{module}:{qualname}"
                seen_ids[rid] += 1
                if seen_ids[rid] > 1:  # the same name defined twice, e.g. in if/else branches
                    rid = f"{rid}#{seen_ids[rid]}"
                yield {"id": rid, "text": doc, "source": "stdlib-docstrings",
                       "meta": {"path": rel.as_posix(), "qualname": qualname}}
                chars += len(doc)
                if max_chars and chars >= max_chars:
                    return


def stdlib_topics(max_chars: int = 0) -> Iterator[dict[str, Any]]:
    from pydoc_data.topics import topics  # plain data module: safe to import

    chars = 0
    for key in sorted(topics):
        yield {"id": f"stdlib-topics:{key}", "text": topics[key], "source": "stdlib-topics",
               "meta": {"topic": key}}
        chars += len(topics[key])
        if max_chars and chars >= max_chars:
            return


# --- arithmetic ------------------------------------------------------------------------------


def arithmetic_records(n: int, test_fraction: float, seed: int) -> Iterator[dict[str, Any]]:
    for p in arithmetic.generate(n, seed=seed):
        yield {
            # Keyed by the question itself: the same problem keeps its id whatever n and seed are.
            "id": "arithmetic:" + hashlib.sha256(p.question.encode("utf-8")).hexdigest()[:16],
            "text": p.question, "source": arithmetic.SOURCE,
            "meta": {"answer": p.answer, "reasoning": p.reasoning,
                     "split": arithmetic.split_of(p.question, test_fraction)},
        }


# --- one job per input: a module-level function of one picklable argument, for any mapper --------


@dataclass(frozen=True)
class Job:
    index: int
    kind: str  # stdlib-docstrings | stdlib-topics | arithmetic | folder | file | warc | urls | hf
    target: str
    cfg: CollectConfig
    work_dir: Path


class TallyQuarantine(QuarantineLog):
    """A QuarantineLog that also counts what it was told, for the report."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.kinds: Counter[str] = Counter()
        self.per_source: Counter[str] = Counter()
        self.unreadable: list[dict[str, Any]] = []
        self.damaged: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:  # type: ignore[override]
        super().add(**row)
        self.kinds[row.get("kind") or row["reason"]] += 1
        if row.get("scope") == "file":
            entry = {"file": str(row["file"]), "reason": row["reason"]}
            (self.damaged if row.get("partial") else self.unreadable).append(entry)
        elif row.get("source"):
            self.per_source[row["source"]] += 1


def _records(job: Job, q: QuarantineLog, skipped: Counter[str], fetch: dict[str, int]) -> Iterator[dict[str, Any]]:
    cfg = job.cfg
    digest = _memo(file_digest)
    if job.kind == "stdlib-docstrings":
        yield from stdlib_docstrings(cfg.max_builtin_chars)
    elif job.kind == "stdlib-topics":
        yield from stdlib_topics(cfg.max_builtin_chars)
    elif job.kind == "arithmetic":
        yield from arithmetic_records(cfg.arithmetic_problems, cfg.arithmetic_test_fraction, cfg.seed)
    elif job.kind == "folder":
        yield from folder_connector.folder_records(Path(job.target), q, cfg.max_doc_bytes, digest)
    elif job.kind == "file":
        yield from file_connector.file_records(Path(job.target), q, cfg.fields, cfg.max_doc_bytes, digest)
    elif job.kind == "warc":
        yield from warc_connector.warc_records(Path(job.target), q, cfg.max_doc_bytes, skipped, digest)
    elif job.kind == "urls":
        cache = Path(cfg.http.cache_dir or Path(cfg.output_dir) / "http_cache").resolve()
        yield from http_connector.url_records(cfg.urls, q, cfg.http, cache, cfg.max_doc_bytes, fetch)
    elif job.kind == "hf":
        yield from hf_connector.hf_records(job.target, q, cfg.fields, cfg.max_doc_bytes)
    else:
        raise ValueError(f"unknown collect job kind {job.kind!r}")


def _memo(fn: Callable[[Path], str]) -> Callable[[Path], str]:
    seen: dict[Path, str] = {}

    def cached(path: Path) -> str:
        if path not in seen:
            seen[path] = fn(path)
        return seen[path]

    return cached


def collect_job(job: Job) -> dict[str, Any]:
    """Write one input's records to `work_dir/<index>/` and return its (small) counts."""
    out = Path(job.work_dir) / f"{job.index:04d}"
    rows: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    fetch: dict[str, int] = {}

    def counted(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for rec in records:
            rows[rec["source"]] += 1
            chars[rec["source"]] += len(rec["text"])
            yield rec

    with TallyQuarantine(out / "quarantine.jsonl") as q:
        total = write_dataset(counted(_records(job, q, skipped, fetch)), out / "dataset")
    return {"index": job.index, "kind": job.kind, "target": job.target, "rows": total, "dir": str(out),
            "rows_per_source": dict(rows), "chars_per_source": dict(chars), "skipped": dict(skipped),
            "fetch": fetch, "quarantined": q.count, "kinds": dict(q.kinds), "per_source": dict(q.per_source),
            "unreadable": q.unreadable, "damaged": q.damaged}


def jobs_of(cfg: CollectConfig, work_dir: Path) -> list[Job]:
    kinds: list[tuple[str, str]] = []
    if cfg.builtin_text:
        kinds += [("stdlib-docstrings", ""), ("stdlib-topics", "")]
    if cfg.arithmetic_problems:
        kinds.append(("arithmetic", ""))
    kinds += [("folder", f) for f in cfg.folders] + [("file", f) for f in cfg.files]
    kinds += [("warc", f) for f in cfg.warc]
    if cfg.urls:
        kinds.append(("urls", ""))  # one job: one thread pool and one robots cache for every list
    kinds += [("hf", d) for d in cfg.hf_datasets]
    return [Job(index=i, kind=k, target=str(Path(t).resolve()) if t and Path(t).exists() else t, cfg=cfg,
                work_dir=work_dir) for i, (k, t) in enumerate(kinds)]


# --- the stage -------------------------------------------------------------------------------


def run(cfg: CollectConfig, tracker: Tracker | None = None, mapper: Callable = map) -> CollectResult:
    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    out = Path(cfg.output_dir).resolve()  # Ray workers run elsewhere: absolute paths only
    out.mkdir(parents=True, exist_ok=True)
    dataset, quarantine_path = out / "dataset", out / "quarantine.jsonl"
    fp = fingerprint(to_dict(cfg), cfg.inputs())
    previous = finished_report(out, fp)
    if previous is not None:  # same config, same input bytes: the dataset on disk is the answer
        metrics = {k: float(v) for k, v in previous["metrics"].items()}
        tracker.log_metrics(metrics)
        return CollectResult(dataset=dataset, report=out / "report.json", quarantine=quarantine_path,
                             metrics=metrics)

    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    results = sorted(mapper(collect_job, jobs_of(cfg, work)), key=lambda r: r["index"])

    tmp = atomic_dir(dataset)
    shards = 0
    for r in results:
        if r["rows"]:
            for shard in sorted((Path(r["dir"]) / "dataset").glob("*.parquet")):
                os.replace(shard, tmp / f"part-{shards:05d}.parquet")
                shards += 1
    if shards == 0:  # readers expect at least one shard, even of nothing
        pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), tmp / "part-00000.parquet")
    with QuarantineLog(quarantine_path) as q:
        for r in results:
            with open(Path(r["dir"]) / "quarantine.jsonl", encoding="utf-8") as f:
                q.extend(json.loads(line) for line in f)
    commit_dir(tmp, dataset)
    shutil.rmtree(work, ignore_errors=True)

    rows: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    fetch: Counter[str] = Counter()
    for r in results:
        rows.update(r["rows_per_source"])
        chars.update(r["chars_per_source"])
        lost.update(r["per_source"])
        kinds.update(r["kinds"])
        skipped.update(r["skipped"])
        fetch.update(r["fetch"])
    total, quarantined = sum(rows.values()), sum(r["quarantined"] for r in results)
    unreadable = [u for r in results for u in r["unreadable"]]
    metrics: dict[str, float] = {"data/rows_in": float(total + sum(lost.values())), "data/rows_out": float(total),
                                 "data/quarantined": float(quarantined), "data/chars_out": float(sum(chars.values())),
                                 "data/collect/unreadable_files": float(len(unreadable)),
                                 "data/collect/skipped": float(sum(skipped.values()))}
    for source in sorted(rows.keys() | lost.keys()):
        metrics[metric_key("data", "collect", source, "rows")] = float(rows[source])
        metrics[metric_key("data", "collect", source, "chars")] = float(chars[source])
    report = {
        "stage": "collect", "fingerprint": fp, "rows_in": int(metrics["data/rows_in"]), "rows_out": total,
        "quarantined": quarantined, "quarantined_by_reason": dict(sorted(kinds.items())), "dropped": {},
        "sources": {s: {"in": rows[s] + lost[s], "out": rows[s], "chars": chars[s]}
                    for s in sorted(rows.keys() | lost.keys())},
        "unreadable_files": unreadable, "damaged_files": [d for r in results for d in r["damaged"]],
        "skipped": dict(sorted(skipped.items())), "http": dict(fetch),
        "inputs": [{"kind": r["kind"], "target": r["target"], "rows": r["rows"], "quarantined": r["quarantined"]}
                   for r in results],
        "metrics": metrics,
    }
    report_path = write_report(out, report)
    tracker.log_metrics(metrics)
    return CollectResult(dataset=dataset, report=report_path, quarantine=quarantine_path, metrics=metrics)
