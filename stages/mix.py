"""`flywheel stage mix input_dir=/tmp/decontaminate/dataset output_dir=/tmp/mix target_tokens=2000000 weights.folder:web=0.67 weights.folder:books=0.045` — the training mixture.

Each source gets a share of a token budget (`weights`: source name or glob -> share, normalised to
sum to one) and a cap on how often its documents may be repeated (`max_epochs`, per source in
`epochs`). A source with fewer tokens than its share is repeated up to its cap (the copies get ids
`<id>#epoch2`, `<id>#epoch3`, ...; `base_id` strips that); one with more is subsampled. Which
documents are kept is decided by a seeded hash of the id (blake2b, not Python's salted `hash`), so
the same config gives the same mixture in every run and every process, and a larger budget keeps a
superset of a smaller one.

Tokens: counted with the tokenizer in `tokenizer` (a directory `AutoTokenizer.from_pretrained`
loads, no special tokens) when given; otherwise estimated as UTF-8 bytes / 4 rounded up (about 4
bytes per token is what byte-level BPE vocabularies of 32k-50k tokens reach on English text; code
and non-Latin scripts get fewer bytes per token, so the estimate undercounts them).

Records held out for evaluation (`meta.split == "test"`, e.g. the `arithmetic` test problems the
evaluate stage reads from the corpus) are never dropped, repeated or counted in the mixture: they
pass through once, whatever their source's weight, and are reported as `protected`.

Sources not named in `weights` keep their natural share of the input by default (`unlisted=keep`:
the named weights share what is left); `unlisted=drop` removes them. With no weights at all every
source keeps its natural share. `target_tokens=0` samples nothing: every kept document is written
once and the weights are only reported beside the shares the data has. A source that cannot reach
its share within its epoch cap delivers what the cap allows: the budget is not refilled from the
other sources (`shortfall_tokens` in the report says how much is missing).

Two streaming passes over the shards (count, then sample), each shard a task of `mapper`: memory is
bounded by one row group and one batch of records plus a fixed-size histogram per source, whatever
the corpus size; output shards close at `shard_rows` rows or 64 MB of text (`stages.dataset.ShardWriter`).

The LLaMA mixture (Touvron et al. 2023, table 1), for sources named by connector and folder, e.g.
`folder:web`, `file:c4`: `weights='{"*:web": 0.67, "*:c4": 0.15, "*:code": 0.045, ...}'` is
`LLAMA_WEIGHTS`; `LLAMA_EPOCHS` holds the epochs the paper trained each for.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.config import to_dict
from stages.dataset import (EPOCH_SUFFIX, SCHEMA, QuarantineLog, ShardWriter, as_dataset_table, atomic_dir, base_id,
                            commit_dir, dataset_shards, finished_report, fingerprint, iter_batches, match_key,
                            release_memory, write_atomically, write_report)
from stages.tracking import NullTracker, Tracker

# LLaMA (Touvron et al. 2023, table 1): share of the training tokens and epochs trained per source.
LLAMA_WEIGHTS = {"*:web": 0.67, "*:c4": 0.15, "*:code": 0.045, "*:wikipedia": 0.045, "*:books": 0.045,
                 "*:arxiv": 0.025, "*:qa": 0.02}
LLAMA_EPOCHS = {"*:web": 1.10, "*:c4": 1.06, "*:code": 0.64, "*:wikipedia": 2.45, "*:books": 2.23,
                "*:arxiv": 1.06, "*:qa": 1.03}

HASH_BINS = 4096  # resolution of the kept fraction: a source's budget is met to 1/4096 of its tokens
BATCH_ROWS = 8192


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    input_dir: Path  # a dataset directory (stages.dataset format)
    output_dir: Path
    weights: dict[str, float] = field(default_factory=dict)  # source name or glob -> share; {} = natural
    target_tokens: int = 0  # the budget; 0 = keep every document once, weights only reported
    max_epochs: float = 4.0  # how often a document may appear at most (fractions allowed)
    epochs: dict[str, float] = field(default_factory=dict)  # per source name or glob: its own cap
    unlisted: str = "keep"  # sources not in weights: "keep" (natural share) or "drop"
    tokenizer: Path | None = None  # a tokenizer directory; None = UTF-8 bytes / 4
    seed: int = 0  # another seed, another (equally sized) sample
    shard_rows: int = 50_000  # rows per output shard at most (and 64 MB of text)

    def __post_init__(self) -> None:
        for key, w in self.weights.items():
            if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights.{key} must be a number >= 0, got {w!r}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be 0")
        if self.target_tokens < 0:
            raise ValueError(f"target_tokens must be >= 0 (0 = keep everything), got {self.target_tokens}")
        if not self.max_epochs > 0:
            raise ValueError(f"max_epochs must be > 0, got {self.max_epochs}")
        for key, cap in self.epochs.items():
            if not isinstance(cap, int | float) or isinstance(cap, bool) or not cap > 0:
                raise ValueError(f"epochs.{key} must be a number > 0, got {cap!r}")
        if self.unlisted not in ("keep", "drop"):
            raise ValueError(f"unlisted must be 'keep' or 'drop', got {self.unlisted!r}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")


@dataclass(frozen=True)
class MixResult:
    dataset: Path
    report: Path
    quarantine: Path
    plot: Path
    metrics: dict[str, float]
    # The token shares the output was sampled to (source -> share); {} when target_tokens is 0.
    # What validate's `expected_mixture` should check.
    expected_mixture: dict[str, float] = field(default_factory=dict)


# --- small pure pieces -------------------------------------------------------------------------


def hash_unit(record_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, id): the same in every process and every run.

    >>> hash_unit("doc-1", 0) == hash_unit("doc-1", 0), hash_unit("doc-1", 0) == hash_unit("doc-1", 1)
    (True, False)
    """
    digest = hashlib.blake2b(f"{seed}\x00{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def estimate_tokens(text: str) -> int:
    """UTF-8 bytes / 4, rounded up: the token count when no tokenizer is given.

    >>> estimate_tokens("four"), estimate_tokens("hello world"), estimate_tokens("")
    (1, 3, 0)
    """
    return -(-len(text.encode("utf-8")) // 4)


def copy_id(record_id: str, epoch: int) -> str:
    """The id of a document's `epoch`-th copy (the first keeps its id).

    >>> copy_id("a", 1), copy_id("a", 3), base_id(copy_id("a", 3))
    ('a', 'a#epoch3', 'a')
    """
    return record_id if epoch == 1 else f"{record_id}#epoch{epoch}"


def is_protected(meta: Any) -> bool:
    """True for a record held out for evaluation (meta.split == "test"): the mix never touches it.

    >>> is_protected('{"split": "test"}'), is_protected('{"split": "train"}'), is_protected(None)
    (True, False, False)
    """
    if not meta or "split" not in meta:  # skips the JSON parse for almost every record
        return False
    try:
        value = json.loads(meta) if isinstance(meta, str) else meta
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("split") == "test"


def metric_name(source: str) -> str:
    # MLflow refuses some characters (':' among them on some platforms).
    return re.sub(r"[^\w.\- /]", "_", source)


@lru_cache(maxsize=2)
def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # only when asked: transformers costs seconds to import

    return AutoTokenizer.from_pretrained(path)


def count_tokens(texts: list[str], tokenizer: str | None) -> np.ndarray:
    if tokenizer is None:
        return np.fromiter((estimate_tokens(t) for t in texts), dtype=np.int64, count=len(texts))
    ids = _load_tokenizer(tokenizer)(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))


# --- pass 1: count -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountTask:
    shard: Path
    cache: Path  # where this shard's per-row token counts go (read back by pass 2)
    tokenizer: str | None
    seed: int


@dataclass
class SourceCount:
    docs: int = 0
    tokens: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HASH_BINS, dtype=np.int64))

    def add(self, other: SourceCount) -> None:
        self.docs += other.docs
        self.tokens += other.tokens
        self.hist += other.hist


@dataclass
class ShardCount:
    sources: dict[str, SourceCount]
    protected: dict[str, list[int]]  # source -> [docs, tokens]
    quarantine: list[dict[str, Any]]


def count_shard(task: CountTask) -> ShardCount:
    """Per source: documents, tokens and a histogram of tokens over the id hash (for the kept fraction)."""
    sources: dict[str, SourceCount] = {}
    protected: dict[str, list[int]] = {}
    bad: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    row = 0
    for batch in iter_batches(task.shard, BATCH_ROWS, columns=["id", "text", "source", "meta"]):
        cols = batch.to_pydict()
        texts = [t if isinstance(t, str) else "" for t in cols["text"]]
        tokens = count_tokens(texts, task.tokenizer)
        for i, (rid, text, source, meta) in enumerate(zip(cols["id"], cols["text"], cols["source"], cols["meta"], strict=True)):
            if not isinstance(text, str) or not isinstance(rid, str) or not isinstance(source, str):
                bad.append({"file": str(task.shard), "line": None, "offset": row + i, "id": rid,
                            "reason": "record without a string id, text or source", "raw": repr(text)[:200]})
                tokens[i] = -1  # pass 2 skips it
                continue
            if is_protected(meta):
                p = protected.setdefault(source, [0, 0])
                p[0] += 1
                p[1] += int(tokens[i])
                continue
            s = sources.setdefault(source, SourceCount())
            s.docs += 1
            s.tokens += int(tokens[i])
            s.hist[min(int(hash_unit(rid, task.seed) * HASH_BINS), HASH_BINS - 1)] += int(tokens[i])
        counts.append(tokens)
        row += batch.num_rows
    all_counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    write_atomically(task.cache, lambda tmp: np.save(tmp, all_counts))
    return ShardCount(sources, protected, bad)


# --- the plan: how much of each source --------------------------------------------------------


@dataclass(frozen=True)
class SourcePlan:
    key: str | None  # the weights key that named it (None: unlisted)
    target_share: float
    cap: float  # max epochs
    full_epochs: int  # every document this many times ...
    threshold: float  # ... plus one more copy where hash_unit(id) < threshold
    dropped: bool = False

    def copies(self, unit: float) -> int:
        return self.full_epochs + (1 if unit < self.threshold else 0)


def fraction_threshold(hist: np.ndarray, fraction: float) -> float:
    """The hash threshold that keeps `fraction` of a source's tokens, as close as the bins allow.

    >>> fraction_threshold(np.array([10, 10, 10, 10]), 0.5), fraction_threshold(np.array([1, 1]), 0.0)
    (0.5, 0.0)
    """
    total = hist.sum()
    if fraction <= 0 or total == 0:
        return 0.0
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    k = int(np.argmin(np.abs(cumulative - fraction * total)))
    return k / len(hist)


def target_shares(tokens: dict[str, int], weights: dict[str, float], unlisted: str) -> dict[str, tuple[str | None, float]]:
    """source -> (weights key, share of the mixture). A glob's share is split by its sources' tokens.

    Unlisted sources keep their natural share (or get 0 with unlisted="drop"); named ones share the rest.

    >>> target_shares({"a": 30, "b": 10, "c": 60}, {"a": 3, "b": 1}, "keep")
    {'a': ('a', 0.30000000000000004), 'b': ('b', 0.1), 'c': (None, 0.6)}
    """
    total = sum(tokens.values())
    if not weights:
        return {s: (None, t / total if total else 0.0) for s, t in tokens.items()}
    keys = {s: match_key(s, weights) for s in tokens}
    natural_unlisted = sum(t for s, t in tokens.items() if keys[s] is None) / total if total else 0.0
    free = 1.0 - (natural_unlisted if unlisted == "keep" else 0.0)
    present = {k for k in keys.values() if k is not None}
    weight_sum = sum(weights[k] for k in present)
    group_tokens = {k: sum(t for s, t in tokens.items() if keys[s] == k) for k in present}
    shares: dict[str, tuple[str | None, float]] = {}
    for s, t in tokens.items():
        k = keys[s]
        if k is None:
            shares[s] = (None, t / total if unlisted == "keep" and total else 0.0)
        else:
            within = t / group_tokens[k] if group_tokens[k] else 0.0
            shares[s] = (k, free * weights[k] / weight_sum * within if weight_sum else 0.0)
    return shares


def plan_mixture(cfg: MixConfig, counts: dict[str, SourceCount]) -> dict[str, SourcePlan]:
    shares = target_shares({s: c.tokens for s, c in counts.items()}, cfg.weights, cfg.unlisted)
    plans: dict[str, SourcePlan] = {}
    for source, c in counts.items():
        key, share = shares[source]
        cap_key = match_key(source, cfg.epochs)
        cap = float(cfg.epochs[cap_key]) if cap_key is not None else cfg.max_epochs
        dropped = key is None and cfg.unlisted == "drop" and bool(cfg.weights)
        if dropped:
            ratio = 0.0
        elif cfg.target_tokens == 0:
            ratio = 1.0
        else:
            ratio = min(share * cfg.target_tokens / c.tokens, cap) if c.tokens else 0.0
        full = int(math.floor(ratio))
        plans[source] = SourcePlan(key=key, target_share=share, cap=cap, full_epochs=full,
                                   threshold=fraction_threshold(c.hist, ratio - full), dropped=dropped)
    return plans


# --- pass 2: sample ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleTask:
    shard: Path
    cache: Path
    out_prefix: Path  # output shards are <prefix>-00000.parquet, ...
    plans: dict[str, SourcePlan]
    seed: int
    shard_rows: int


def sample_shard(task: SampleTask) -> dict[str, list[int]]:
    """Write this shard's share of the mixture; returns source -> [docs out, tokens out, rows in, rows kept].

    Rows stay in Arrow: only id, source and meta become Python objects, the kept rows (and their
    copies) are taken from the batch and streamed to the output shards.
    """
    tokens = np.load(task.cache)
    stats: dict[str, list[int]] = {}
    writer = ShardWriter(task.out_prefix.parent, task.out_prefix.name, shard_rows=task.shard_rows)
    row = 0
    for batch in iter_batches(task.shard, BATCH_ROWS):
        table = as_dataset_table(batch)
        cols = table.select(["id", "source", "meta"]).to_pydict()
        take: list[int] = []
        ids: list[str] = []
        for i, (rid, source, meta) in enumerate(zip(cols["id"], cols["source"], cols["meta"], strict=True)):
            n_tokens = int(tokens[row])
            row += 1
            if n_tokens < 0:  # quarantined in pass 1
                continue
            if is_protected(meta):
                n = 1
                s = stats.setdefault(f"\x00protected:{source}", [0, 0, 0, 0])
            else:
                n = task.plans[source].copies(hash_unit(rid, task.seed))
                s = stats.setdefault(source, [0, 0, 0, 0])
            s[2] += 1
            s[3] += n > 0
            for epoch in range(1, n + 1):  # a document's copies follow it
                take.append(i)
                ids.append(copy_id(rid, epoch))
            s[0] += n
            s[1] += n * n_tokens
        if take:
            kept = table.take(pa.array(take, type=pa.int64()))
            writer.write(kept.set_column(0, "id", pa.array(ids, type=pa.string())))
    writer.close(empty_shard=False)
    return stats


# --- the stage ------------------------------------------------------------------------------------


def plot_mixture(table: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars of target vs actual token share per source."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in worker threads

    names = list(table)
    fig = Figure(figsize=(max(6, 1.1 * len(names) + 2), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [table[n]["target_share"] for n in names], 0.4, label="target", color="tab:gray")
    ax.bar(x + 0.2, [table[n]["actual_share"] for n in names], 0.4, label="actual", color="tab:blue")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("share of training tokens")
    ax.set_title("mixture: target vs actual")
    ax.legend()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def _result(out: Path, report: dict[str, Any]) -> MixResult:
    return MixResult(dataset=out / "dataset", report=out / "report.json", quarantine=out / "quarantine.jsonl",
                     plot=out / "mixture.png", metrics=dict(report["metrics"]),
                     expected_mixture=dict(report["expected_mixture"]))


def run(cfg: MixConfig, tracker: Tracker | None = None,
        mapper: Callable[..., Iterable[Any]] = map) -> MixResult:
    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    out = Path(cfg.output_dir)
    shards = dataset_shards(cfg.input_dir)
    inputs = [Path(cfg.input_dir)] + ([Path(cfg.tokenizer)] if cfg.tokenizer else [])
    fp = fingerprint(to_dict(cfg), inputs)
    previous = finished_report(out, fp)
    if previous is not None and "expected_mixture" in previous:
        return _result(out, previous)

    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    release_memory()  # what the previous stage in this process left in the allocators
    tokenizer = str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None
    caches = [work / f"tokens-{i:05d}.npy" for i in range(len(shards))]

    counts: dict[str, SourceCount] = {}
    protected: dict[str, list[int]] = {}
    with QuarantineLog(out / "quarantine.jsonl") as quarantine:
        for shard_count in mapper(count_shard, [CountTask(s.resolve(), c.resolve(), tokenizer, cfg.seed)
                                                for s, c in zip(shards, caches, strict=True)]):
            for name, c in shard_count.sources.items():
                counts.setdefault(name, SourceCount()).add(c)
            for name, (docs, tokens) in shard_count.protected.items():
                p = protected.setdefault(name, [0, 0])
                p[0] += docs
                p[1] += tokens
            quarantine.extend(shard_count.quarantine)
        n_quarantined = quarantine.count

    release_memory()
    plans = plan_mixture(cfg, counts)
    tmp = atomic_dir(out / "dataset")
    stats: dict[str, list[int]] = {}
    tasks = [SampleTask(s.resolve(), c.resolve(), tmp.resolve() / f"part-{i:05d}", plans, cfg.seed, cfg.shard_rows)
             for i, (s, c) in enumerate(zip(shards, caches, strict=True))]
    for shard_stats in mapper(sample_shard, tasks):
        for name, values in shard_stats.items():
            s = stats.setdefault(name, [0, 0, 0, 0])
            for i, v in enumerate(values):
                s[i] += v
    if not any(tmp.glob("*.parquet")):  # an empty mixture is still a dataset readers can open
        pq.write_table(SCHEMA.empty_table(), tmp / "part-00000.parquet")
    commit_dir(tmp, out / "dataset")
    shutil.rmtree(work, ignore_errors=True)

    mixed_out = sum(v[1] for k, v in stats.items() if not k.startswith("\x00"))
    table: dict[str, dict[str, Any]] = {}
    for name in sorted(counts):
        c, plan = counts[name], plans[name]
        docs_out, tokens_out, _, _ = stats.get(name, [0, 0, 0, 0])
        table[name] = {
            "weights_key": plan.key, "docs": c.docs, "tokens_in": c.tokens, "target_share": plan.target_share,
            "docs_out": docs_out, "tokens_out": tokens_out,
            "actual_share": tokens_out / mixed_out if mixed_out else 0.0,
            "epochs": tokens_out / c.tokens if c.tokens else 0.0, "max_epochs": plan.cap,
            "capped": bool(cfg.target_tokens) and plan.target_share * cfg.target_tokens > plan.cap * c.tokens,
            "dropped": plan.dropped,
        }
    protected_out = {name: {"docs": d, "tokens": t} for name, (d, t) in sorted(protected.items())}
    rows_in = sum(c.docs for c in counts.values()) + sum(d for d, _ in protected.values()) + n_quarantined
    rows_out = sum(v[0] for v in stats.values())
    sources = {name: {"in": counts.get(name, SourceCount()).docs + protected.get(name, [0, 0])[0],
                      "out": stats.get(name, [0])[0] + stats.get(f"\x00protected:{name}", [0])[0]}
               for name in sorted(set(counts) | set(protected))}
    dropped = {
        "unlisted_source": sum(counts[n].docs for n in counts if plans[n].dropped),
        "subsampled": sum(counts[n].docs - stats.get(n, [0, 0, 0, 0])[3] for n in counts if not plans[n].dropped),
    }
    expected = {n: row["target_share"] for n, row in table.items()} if cfg.target_tokens else {}
    metrics: dict[str, float] = {
        "data/rows_in": float(rows_in), "data/rows_out": float(rows_out), "data/quarantined": float(n_quarantined),
        "data/mix/tokens_in": float(sum(c.tokens for c in counts.values())),
        "data/mix/tokens_out": float(mixed_out),
        "data/mix/protected_docs": float(sum(d for d, _ in protected.values())),
    }
    metrics |= {f"data/{k}/dropped": float(v) for k, v in dropped.items()}
    metrics |= {f"data/mix/{metric_name(n)}/share": float(row["actual_share"]) for n, row in table.items()}
    report: dict[str, Any] = {
        "fingerprint": fp, "rows_in": rows_in, "rows_out": rows_out, "quarantined": n_quarantined,
        "dropped": dropped, "sources": sources, "mixture": table, "protected": protected_out,
        "target_tokens": cfg.target_tokens, "tokens_out": mixed_out,
        "shortfall_tokens": max(0, cfg.target_tokens - mixed_out) if cfg.target_tokens else 0,
        "token_counter": "tokenizer" if tokenizer else "utf8_bytes/4",
        "expected_mixture": expected, "metrics": metrics, "config": to_dict(cfg),
    }
    plot_mixture(table, out / "mixture.png")
    report_path = write_report(out, report)
    tracker.log_metrics(metrics)
    tracker.log_artifact(report_path)
    tracker.log_artifact(out / "mixture.png")
    return _result(out, report)

