"""`flywheel stage dedup input_dir=/tmp/clean/dataset output_dir=/tmp/dedup` — exact, then MinHash-LSH near-duplicates.

Two passes over the corpus, each shard by shard:

1. Per shard, through `mapper` (Ray tasks in the flows): every text's exact key (64-bit BLAKE2b of the
   text lowercased with whitespace collapsed) and its MinHash signature (stages/minhash.py: word
   5-grams, 128 permutations), returned as numpy arrays, never texts.
2. On the driver: exact duplicates out, first kept; then each band of the surviving signatures is
   sorted, documents sharing a band's bucket are candidate pairs, optionally verified by the
   estimated Jaccard similarity of their signatures (`jaccard_threshold`), and joined by union-find.
   Each cluster keeps its first document in corpus order. Band hashes (one file per band) and
   signatures wait in scratch files under the output directory (768 bytes a document at the
   defaults); memory holds one band at a time and about 70 bytes a document (exact key, flags,
   union-find parent, roots, candidate index, one band column, its selection and sort order).
3. The corpus is streamed once more, in Arrow batches (`stages.dataset.write_kept`), to write the
   kept rows and the example clusters' snippets.

Defaults, and why: 128 permutations give a Jaccard estimate with standard deviation at most 0.044
(sqrt(J(1-J)/128)); 32 bands of 4 rows make a pair at Jaccard 0.7 a candidate with probability
1-(1-0.7^4)^32 > 0.999 and at 0.5 with 0.87, so verification at an estimated 0.6 decides: pairs at
0.7 pass it 99 % of the time and pairs at 0.5 about 1 %. Small edits of short documents change many
5-grams (one replaced word changes up to five), so 0.7 is about what three edits leave in a
100-word paragraph. Without verification (`jaccard_threshold=null`), LSH alone decides, as in
DataTrove; 16 bands of 8 rows then put the S-curve's midpoint near 0.7.

Rows whose text is null or not a string go to `quarantine.jsonl` (shard file, row, id, reason).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.config import to_dict
from stages.dataset import (QuarantineLog, dataset_shards, finished_report, fingerprint, iter_batches, match_key,
                            release_memory, write_kept, write_report)
from stages.minhash import MinHasher, WordHasher, band_hashes
from stages.tasks import arithmetic
from stages.tracking import NullTracker, Tracker

WHITESPACE = re.compile(r"\s+")
SNIPPET_CHARS = 150


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    input_dir: Path  # a dataset directory (stages.dataset format)
    output_dir: Path
    exact: bool = True  # drop exact duplicates (lowercased, whitespace collapsed), first kept
    near: bool = True  # drop MinHash-LSH near-duplicates, first of each cluster kept
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128
    bands: int = 32
    rows: int = 4  # bands * rows must equal num_perm
    jaccard_threshold: float | None = 0.6  # estimated Jaccard a candidate pair must reach; None: LSH decides
    max_compare: int = 8  # earlier bucket members a document is verified against, nearest first
    seed: int = 1  # of the MinHash permutations
    batch_rows: int = 4096  # rows per batch read from a shard
    examples: int = 5  # example clusters in the report
    # Sources (names or globs) deduplicated exactly only: generated from templates, their documents
    # differ in a few numbers by design, which MinHash would take for near-duplicates (measured: 8 %
    # of 3,000 arithmetic questions merged).
    exact_only_sources: tuple[str, ...] = (arithmetic.SOURCE,)

    def __post_init__(self) -> None:
        for name in ("shingle_size", "num_perm", "bands", "rows", "max_compare", "batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shingle_size > 64:
            raise ValueError(f"shingle_size must be <= 64, got {self.shingle_size}")
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands * rows must equal num_perm: bands={self.bands} * rows={self.rows} "
                             f"= {self.bands * self.rows}, num_perm={self.num_perm}")
        if self.jaccard_threshold is not None and not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"jaccard_threshold must be in (0, 1] or null, got {self.jaccard_threshold}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")


@dataclass(frozen=True)
class DedupResult:
    dataset: Path
    report: Path
    quarantine: Path
    metrics: dict[str, float]


def dedup_key(text: str) -> str:
    """What two texts must share to be exact duplicates.

    >>> dedup_key("  To be,\\n\\tOR not ") == dedup_key("to be, or not")
    True
    """
    return WHITESPACE.sub(" ", text.lower()).strip()


def exact_hash(text: str) -> int:
    # 64 bits: a chance collision needs about 2^32 documents (n^2 / 2^65 expected pairs)
    return int.from_bytes(hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=8).digest(), "little")


# --- pass 1, per shard (a Ray task in the flows) ------------------------------------------------

@dataclass(frozen=True)
class ShardTask:
    path: str
    shingle_size: int
    num_perm: int
    seed: int
    batch_rows: int
    exact_only_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardSignatures:
    rows: int
    signatures: np.ndarray  # uint32 [rows, num_perm]
    no_words: np.ndarray  # bool [rows]: no shingle, or a source deduplicated exactly only: never bucketed
    exact: np.ndarray  # uint64 [rows]
    invalid: list[dict[str, Any]]  # {row, id, reason}: text null or not a string


def signature_shard(task: ShardTask) -> ShardSignatures:
    """Exact keys and MinHash signatures of one shard, batch by batch."""
    hasher, minhash = WordHasher(), MinHasher(num_perm=task.num_perm, shingle_size=task.shingle_size, seed=task.seed)
    sigs, no_words, exact, invalid = [], [], [], []
    row = 0
    for batch in iter_batches(task.path, task.batch_rows, columns=["id", "text", "source"]):
        ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
        sources = batch.column("source").to_pylist()
        exempt = {s: match_key(s or "", task.exact_only_sources) is not None for s in set(sources)}
        exact_only = np.array([exempt[s] for s in sources], dtype=bool)
        good = [isinstance(t, str) for t in texts]
        for i, ok in enumerate(good):
            if not ok:
                invalid.append({"row": row + i, "id": ids[i],
                                "reason": "text is null" if texts[i] is None else "text is not a string"})
        strings = [t if ok else "" for t, ok in zip(texts, good, strict=True)]
        sig, empty = minhash.signatures(strings, hasher)
        sigs.append(sig)
        no_words.append(empty | exact_only)
        exact.append(np.array([exact_hash(t) for t in strings], dtype=np.uint64))
        row += len(texts)
    if not sigs:
        return ShardSignatures(0, np.empty((0, task.num_perm), np.uint32), np.empty(0, bool), np.empty(0, np.uint64), [])
    return ShardSignatures(row, np.concatenate(sigs), np.concatenate(no_words), np.concatenate(exact), invalid)


# --- pass 2, on the driver ----------------------------------------------------------------------

class UnionFind:
    """Roots are the smallest member, so a cluster's root is its first document in corpus order."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:  # path compression
            parent[x], x = root, int(parent[x])
        return root

    def roots(self) -> np.ndarray:
        """Every element's root at once (pointer jumping: log-many vectorised passes, no Python int per row)."""
        r = self.parent.copy()
        while True:
            nxt = r[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def exact_keep(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """True at the first valid row of every distinct key.

    >>> exact_keep(np.array([5, 3, 5, 3, 7], np.uint64), np.array([True, False, True, True, True])).tolist()
    [True, False, False, True, True]
    """
    idx = np.flatnonzero(valid)
    _, first = np.unique(keys[idx], return_index=True)  # index of the first occurrence
    keep = np.zeros(len(keys), dtype=bool)
    keep[idx[first]] = True
    return keep


def near_clusters(band_files: list[Path], n: int, candidates: np.ndarray, cfg: DedupConfig,
                  signatures: np.ndarray | None) -> UnionFind:
    """Union-find over all `n` rows, joining candidates that share a band bucket (and pass verification).

    `band_files[b]` holds band b's hash of every row (uint64, corpus order): one band in memory at a time.
    """
    uf = UnionFind(n)
    for path in band_files:
        col = np.fromfile(path, dtype=np.uint64)[candidates]
        order = np.argsort(col, kind="stable")  # stable: bucket members stay in corpus order
        sorted_col = col[order]
        edges = np.flatnonzero(sorted_col[1:] != sorted_col[:-1]) + 1
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges, [len(col)]])
        multi = ends - starts > 1  # buckets of one document: no pair
        run_starts, run_ends = starts[multi], ends[multi]
        for lo, hi in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
            members = candidates[order[lo:hi]].tolist()
            if signatures is None:
                for m in members[1:]:
                    uf.union(members[0], m)
                continue
            for p in range(1, len(members)):
                m = members[p]
                for q in reversed(members[max(0, p - cfg.max_compare):p]):
                    if uf.find(q) == uf.find(m):
                        break
                    if np.mean(signatures[m] == signatures[q]) >= cfg.jaccard_threshold:
                        uf.union(q, m)
                        break
    return uf


def snippet(text: str) -> str:
    return WHITESPACE.sub(" ", text).strip()[:SNIPPET_CHARS]


def _result(out: Path, report: dict[str, Any]) -> DedupResult:
    return DedupResult(dataset=out / "dataset", report=out / "report.json", quarantine=out / "quarantine.jsonl",
                       metrics=report["metrics"])


def run(cfg: DedupConfig, tracker: Tracker | None = None, mapper=map) -> DedupResult:
    tracker = tracker or NullTracker()
    out = Path(cfg.output_dir)
    shards = dataset_shards(cfg.input_dir)
    fp = fingerprint(to_dict(cfg), [cfg.input_dir])
    previous = finished_report(out, fp)
    if previous is not None:
        return _result(out, previous)
    tracker.log_params(to_dict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".work"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    verify = cfg.near and cfg.jaccard_threshold is not None
    release_memory()  # what the previous stage in this process left in the allocators

    tasks = [ShardTask(str(s), cfg.shingle_size, cfg.num_perm, cfg.seed, cfg.batch_rows, cfg.exact_only_sources)
             for s in shards]
    exact, no_words, valid, offsets = [], [], [], [0]
    # Band hashes (8 bytes x bands a document) and signatures (4 bytes x num_perm) wait on disk: what
    # stays in memory is about 70 bytes a document (keys, flags, union-find, one band being sorted).
    band_files = [scratch / f"band-{b:03d}.u64" for b in range(cfg.bands)] if cfg.near else []
    with (QuarantineLog(out / "quarantine.jsonl") as quarantine, open(scratch / "signatures.u32", "wb") as sig_file,
          ExitStack() as stack):
        band_out = [stack.enter_context(open(path, "wb")) for path in band_files]
        for shard, res in zip(shards, mapper(signature_shard, tasks), strict=True):
            ok = np.ones(res.rows, dtype=bool)
            for bad in res.invalid:
                ok[bad["row"]] = False
                quarantine.add(file=shard, reason=bad["reason"], row=bad["row"], id=bad["id"])
            exact.append(res.exact)
            no_words.append(res.no_words)
            valid.append(ok)
            if cfg.near:
                for f, column in zip(band_out, band_hashes(res.signatures, cfg.bands, cfg.rows).T, strict=True):
                    f.write(np.ascontiguousarray(column).tobytes())
            if verify:
                sig_file.write(np.ascontiguousarray(res.signatures).tobytes())
            offsets.append(offsets[-1] + res.rows)
            del res
            release_memory()
        quarantined = quarantine.count
    n = offsets[-1]
    exact_keys, valid_rows = np.concatenate(exact), np.concatenate(valid)
    keep = exact_keep(exact_keys, valid_rows) if cfg.exact else valid_rows.copy()
    exact_dropped = int(valid_rows.sum() - keep.sum())

    roots = np.arange(n, dtype=np.int64)
    if cfg.near and n:
        candidates = np.flatnonzero(keep & ~np.concatenate(no_words))
        signatures = (np.memmap(scratch / "signatures.u32", dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
                      if verify and n else None)
        uf = near_clusters(band_files, n, candidates, cfg, signatures)
        roots[candidates] = uf.roots()[candidates]
        del signatures
    near_dup = keep & (roots != np.arange(n))
    near_dropped = int(near_dup.sum())
    keep &= ~near_dup

    cluster_roots, sizes = np.unique(roots[roots != np.arange(n)], return_counts=True)
    sizes = sizes + 1  # the root itself
    histogram = {str(k): v for k, v in sorted(Counter(sizes.tolist()).items())}
    top = np.lexsort((cluster_roots, -sizes))[: cfg.examples]
    example_members = {int(r): [int(r)] + np.flatnonzero(roots == r).tolist()[1:5] for r in cluster_roots[top]}
    wanted = np.array(sorted({m for ms in example_members.values() for m in ms}), dtype=np.int64)
    seen: dict[int, tuple[str, str]] = {}

    def note_examples(offset: int, table) -> None:
        lo, hi = np.searchsorted(wanted, [offset, offset + table.num_rows])
        for g in wanted[lo:hi].tolist():
            seen[g] = (table.column("id")[g - offset].as_py(), snippet(table.column("text")[g - offset].as_py()))

    release_memory()
    rows_out, sources_in, sources_out = write_kept(cfg.input_dir, keep, out / "dataset", cfg.batch_rows,
                                                   on_batch=note_examples)
    examples = [{"size": int(sizes[i]), "ids": [seen[m][0] for m in example_members[int(cluster_roots[i])]],
                 "snippets": [seen[m][1] for m in example_members[int(cluster_roots[i])]]} for i in top]
    shutil.rmtree(scratch, ignore_errors=True)

    metrics = {"data/rows_in": float(n), "data/rows_out": float(rows_out), "data/quarantined": float(quarantined),
               "data/dedup/exact/dropped": float(exact_dropped), "data/dedup/near/dropped": float(near_dropped),
               "data/dedup/clusters": float(len(cluster_roots))}
    report = {
        "fingerprint": fp, "rows_in": n, "rows_out": rows_out, "quarantined": quarantined,
        "dropped": {"exact": exact_dropped, "near": near_dropped},
        "sources": {s: {"in": c, "out": sources_out.get(s, 0)} for s, c in sorted(sources_in.items())},
        "clusters": {"count": len(cluster_roots), "documents": int(sizes.sum()), "size_histogram": histogram,
                     "examples": examples},
        "lsh": {"bands": cfg.bands, "rows": cfg.rows, "s_curve_midpoint": (1 / cfg.bands) ** (1 / cfg.rows)},
        "config": to_dict(cfg), "metrics": metrics,
    }
    report_path = write_report(out, report)
    tracker.log_metrics(metrics)
    tracker.log_artifact(report_path)
    return _result(out, report)
