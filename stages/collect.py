"""`flywheel stage collect output_dir=/tmp/raw` — gather raw text from every connector into one dataset.

Connectors, each a generator of records (`id`, `text`, `source`, `meta`):

- builtin: docstrings of the Python standard library, parsed from source with `ast`, plus the
  `pydoc_data` help topics: about 2 MB of real English that every machine has, so the demo and the
  tests need no download;
- arithmetic: generated word problems with checkable answers (`stages.tasks.arithmetic`);
- folders: every `.txt`/`.md` file below a folder, one record per file;
- files: JSONL (optionally gzipped) or Parquet, the text taken from `text_field`.

A malformed record never stops the run: it goes to `quarantine.jsonl` with its file, line and
reason, so one bad line in a million is a number on a dashboard rather than a failed pipeline.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from stages.config import to_dict
from stages.dataset import write_dataset, write_jsonl
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
FOLDER_SUFFIXES = (".txt", ".md")
# Tests of the stdlib are code, not prose; idlelib (a GUI) and lib2to3 (grammar fixers and
# fixtures) add little English; site-packages is whatever happens to be installed, which would make
# the corpus differ between machines.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
RAW_CHARS = 200  # quarantine keeps a prefix only: enough to debug, not a second copy of the data


@dataclass(frozen=True, kw_only=True)
class CollectConfig:
    output_dir: Path
    builtin_text: bool = True  # stdlib docstrings + pydoc topics
    max_builtin_chars: int = 0  # stop each builtin source after this many characters (0 = all)
    arithmetic_problems: int = 3000
    arithmetic_test_fraction: float = 0.1  # share of problems held out for evaluation (meta.split)
    folders: tuple[str, ...] = ()  # every .txt/.md below each, recursively
    files: tuple[str, ...] = ()  # .jsonl, .jsonl.gz or .parquet
    text_field: str = "text"  # the field of a file record that holds the text
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_builtin_chars < 0:
            raise ValueError(f"max_builtin_chars must be >= 0 (0 = all), got {self.max_builtin_chars}")
        if self.arithmetic_problems < 0:
            raise ValueError(f"arithmetic_problems must be >= 0, got {self.arithmetic_problems}")
        if not 0.0 <= self.arithmetic_test_fraction <= 1.0:
            raise ValueError(
                f"arithmetic_test_fraction must be in [0, 1], got {self.arithmetic_test_fraction}")
        if not self.text_field:
            raise ValueError("text_field must not be empty")
        for f in self.files:
            if not str(f).endswith(FILE_SUFFIXES):
                raise ValueError(f"files: {f} is not one of {', '.join(FILE_SUFFIXES)}")
        # Source names become ids: two inputs with the same name would produce colliding ids.
        for field, names in (("folders", [Path(f).name for f in self.folders]),
                             ("files", [file_source_name(f) for f in self.files])):
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            if dupes:
                raise ValueError(f"{field}: two entries share the name {dupes[0]!r}")


@dataclass(frozen=True)
class CollectResult:
    dataset: Path
    quarantine: Path
    metrics: dict[str, float]


def file_source_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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
            "text": p.question, "source": "arithmetic",
            "meta": {"answer": p.answer, "reasoning": p.reasoning,
                     "split": arithmetic.split_of(p.question, test_fraction)},
        }


# --- folders and files -----------------------------------------------------------------------


def _quarantine(file: Path, line: int | None, reason: str, raw: str | bytes) -> dict[str, Any]:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return {"file": str(file), "line": line, "reason": reason, "raw": raw[:RAW_CHARS]}


def folder_records(folder: Path, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folders: {folder} is not a directory")
    source = f"folder:{folder.name}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            quarantine.append(_quarantine(path, None, f"invalid UTF-8: {e}", raw))
            continue
        rel = path.relative_to(folder).as_posix()
        yield {"id": f"{source}:{rel}", "text": text, "source": source, "meta": {"path": str(path)}}


def _text_of(record: Any, text_field: str) -> tuple[str | None, str]:
    """(text, "") for a good record, (None, reason) for a malformed one."""
    if not isinstance(record, dict):
        return None, f"record is a {type(record).__name__}, not an object"
    if text_field not in record:
        return None, f"missing field {text_field!r}"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"field {text_field!r} is {type(text).__name__}, not a string"
    return text, ""


def file_records(path: Path, text_field: str, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"files: {path} does not exist")
    source = f"file:{file_source_name(path)}"

    def record(line: int, rec: dict[str, Any]) -> dict[str, Any]:
        text, _ = _text_of(rec, text_field)
        extra = {k: v for k, v in rec.items() if k != text_field}
        return {"id": f"{source}:{line}", "text": text, "source": source,
                "meta": {"path": str(path), "line": line, "fields": extra}}

    if path.name.endswith(".parquet"):
        # Row numbers (1-based) stand in for line numbers so quarantine entries read the same.
        for row, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            text, reason = _text_of(rec, text_field)
            if text is None:
                quarantine.append(_quarantine(path, row, reason, json.dumps(rec, default=str)))
            else:
                yield record(row, rec)
        return

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                quarantine.append(_quarantine(path, line_no, f"invalid UTF-8: {e}", raw))
                continue
            except json.JSONDecodeError as e:
                quarantine.append(_quarantine(path, line_no, f"invalid JSON: {e}", raw))
                continue
            text, reason = _text_of(rec, text_field)
            if text is None:
                quarantine.append(_quarantine(path, line_no, reason, raw))
                continue
            yield record(line_no, rec)


# --- the stage -------------------------------------------------------------------------------


def run(cfg: CollectConfig, tracker: Tracker | None = None) -> CollectResult:
    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    quarantine: list[dict[str, Any]] = []

    def records() -> Iterator[dict[str, Any]]:
        if cfg.builtin_text:
            yield from stdlib_docstrings(cfg.max_builtin_chars)
            yield from stdlib_topics(cfg.max_builtin_chars)
        if cfg.arithmetic_problems:
            yield from arithmetic_records(cfg.arithmetic_problems, cfg.arithmetic_test_fraction, cfg.seed)
        for folder in cfg.folders:
            yield from folder_records(Path(folder), quarantine)
        for file in cfg.files:
            yield from file_records(Path(file), cfg.text_field, quarantine)

    rows: Counter[str] = Counter()
    chars: Counter[str] = Counter()

    def counted() -> Iterator[dict[str, Any]]:
        for rec in records():
            rows[rec["source"]] += 1
            chars[rec["source"]] += len(rec["text"])
            yield rec

    dataset = out / "dataset"
    total = write_dataset(counted(), dataset)
    quarantine_path = out / "quarantine.jsonl"
    write_jsonl(quarantine, quarantine_path)

    metrics: dict[str, float] = {"data/rows_out": float(total), "data/quarantined": float(len(quarantine)),
                                 "data/chars_out": float(sum(chars.values()))}
    for source in sorted(rows):
        metrics[metric_key("data", "collect", source, "rows")] = float(rows[source])
        metrics[metric_key("data", "collect", source, "chars")] = float(chars[source])
    tracker.log_metrics(metrics)
    return CollectResult(dataset=dataset, quarantine=quarantine_path, metrics=metrics)
