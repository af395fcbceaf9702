"""Tokenize a text dataset once into memory-mapped token shards that pretraining streams.

    flywheel stage tokenize dataset=data/clean tokenizer=<dir> output_dir=/tmp/tokens

Each input shard `part-<k>.parquet` becomes, per split, `tokens/<split>/tokens-<k>.bin` (the
documents' token ids back to back, each document followed by the document separator, raw uint16 when
every id fits, else uint32) and `tokens/<split>/docs-<k>.npy` (int64 offset of each document's first
token in that shard). The split is by record id (`stages.dataset.is_heldout`, the split
`stages.pretrain` measures perplexity on and records in its meta.json for the evaluate stage), so a
document and every copy the mix made of it land on one side. `tokens/index.json` names dtype,
vocabulary size, tokenizer hash, separator and every shard's file, token and document counts and md5
(DVC's hash); `stages.token_shards.TokenShards` reads it. `tokens/train/token_counts.npy` holds the
training split's unigram counts, so the baseline perplexity needs no pass over the tokens.

Atomic and resumable: a worker writes its shard's files under `shards/` (keyed by the input shard's
bytes, the tokenizer and the split) and its small `<key>.json` last, so a killed run re-tokenizes
only the shards that had not finished. `tokens/` is assembled in a temporary directory (hard links),
its `index.json` written last, then renamed into place; `report.json` comes after that, and its
fingerprint makes an unchanged re-run a no-op. The per-shard work is `tokenize_shard(ShardTask)`, a
module-level function of one picklable argument, so any `map` (Ray's included) can run it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from stages.config import to_dict
from stages.dataset import (QuarantineLog, atomic_dir, commit_dir, dataset_shards, file_digest, fingerprint,
                            is_heldout, write_atomically, write_report)
from stages.tracking import NullTracker, Tracker

VERSION = 1  # bump when the shard layout or the tokenization changes meaning
SPLITS = ("train", "heldout")
INDEX = "index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    dataset: Path  # a dataset directory (stages.dataset format)
    tokenizer: Path  # a tokenizer (or checkpoint) directory
    output_dir: Path
    heldout_fraction: float = 0.02  # share of documents (by id) in the held-out split: pretraining's
    batch_rows: int = 1024  # documents per batch-encode call: bounds a worker's memory

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")


@dataclass(frozen=True)
class TokenizeResult:
    tokens: Path  # the directory holding index.json: `TokenShards(tokens)`
    report: Path
    quarantine: Path
    metrics: dict[str, float]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below `vocab_size`.

    >>> token_dtype(50_257), token_dtype(65_536), token_dtype(65_537), token_dtype(128_256)
    (dtype('uint16'), dtype('uint16'), dtype('uint32'), dtype('uint32'))
    """
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size}: token ids must fit in uint32")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_hash(path: Path) -> str:
    """md5 of the files that decide how text becomes ids (not the weights of a checkpoint beside them).

    By file name and content, not path: a copied tokenizer has the same hash.
    """
    h = hashlib.md5()
    for name in TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer  # here, not at import: workers of other stages need not pay for it

    return AutoTokenizer.from_pretrained(path)


def separator_id(tokenizer) -> int:
    """The document separator: bos, else eos.

    Not eos first: the project's tokenizer (bos `<|endoftext|>`, eos `<|end|>`) and every base model
    that base_model prepares end chat turns with eos, so it must not also mean "new document";
    base_model gives a tokenizer without bos one (Qwen2's `<|endoftext|>`).
    """
    for sep in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if sep is not None:
            return int(sep)
    raise ValueError("the tokenizer has neither a bos nor an eos token to separate documents")


@dataclass(frozen=True)
class ShardTask:
    """One input shard -> a train and a held-out token shard (plus `<key>.json`) under `prefix`'s folder."""

    input: Path
    prefix: Path  # shards/<key>: files are <key>.<split>.bin, <key>.<split>.docs.npy, <key>.counts.npy
    tokenizer: Path
    heldout_fraction: float
    batch_rows: int

    def path(self, kind: str) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.{kind}")


def _encode(tokenizer, texts: list[str], sep: int, vocab: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with a separator after each document, each document's length including it)."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    end = np.cumsum(lengths)
    for doc, stop in zip(ids, end, strict=True):
        flat[stop - 1 - len(doc) : stop - 1] = doc
        flat[stop - 1] = sep
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):  # a silent wrap in uint16 would corrupt training
        raise ValueError(f"tokenizer produced id {int(flat.max())} outside its vocabulary of {vocab}")
    return flat.astype(dtype), lengths


def tokenize_shard(task: ShardTask) -> dict[str, Any]:
    """Tokenize one input shard; returns (and saves as `<key>.json`, written last) its counts and quarantine rows."""
    done = task.path("json")
    kinds = [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "docs.npy")] + ["counts.npy"]
    if done.exists() and all(task.path(k).exists() for k in kinds):  # finished by an earlier, interrupted run
        return {**json.loads(done.read_text()), "reused": True}
    tokenizer = _load_tokenizer(str(task.tokenizer))
    vocab, sep = len(tokenizer), separator_id(tokenizer)
    dtype = token_dtype(vocab)
    tmp = {s: task.path(f"{s}.bin.tmp-{os.getpid()}") for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    starts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    n_tokens = dict.fromkeys(SPLITS, 0)
    md5 = {s: hashlib.md5() for s in SPLITS}
    counts = np.zeros(vocab, dtype=np.int64)
    stats = {"chars": 0, "empty": 0}
    quarantine: list[dict[str, Any]] = []
    row = 0
    try:
        for batch in pq.ParquetFile(task.input).iter_batches(batch_size=task.batch_rows, columns=["id", "text"]):
            docs: dict[str, list[str]] = {s: [] for s in SPLITS}
            for rid, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True):
                row += 1
                if not isinstance(text, str):
                    quarantine.append({"file": str(task.input), "line": row - 1, "offset": None, "id": rid,
                                       "reason": f"text is {type(text).__name__}, not a string", "raw": ""})
                elif not text:
                    stats["empty"] += 1  # a lone separator teaches nothing
                else:
                    docs["heldout" if is_heldout(str(rid), task.heldout_fraction) else "train"].append(text)
                    stats["chars"] += len(text)
            for s in SPLITS:
                if not docs[s]:
                    continue
                tokens, lengths = _encode(tokenizer, docs[s], sep, vocab, dtype)
                starts[s].append(n_tokens[s] + np.cumsum(lengths) - lengths)
                n_tokens[s] += tokens.size
                md5[s].update(tokens.tobytes())
                files[s].write(tokens.tobytes())
                if s == "train":
                    counts += np.bincount(tokens, minlength=vocab)
        for f in files.values():
            f.close()
        out: dict[str, Any] = {"input": task.input.name, "vocab_size": vocab, "separator_id": sep,
                               "dtype": dtype.name, **stats, "quarantine": quarantine, "splits": {}}
        for s in SPLITS:
            doc_starts = np.concatenate(starts[s]) if starts[s] else np.zeros(0, dtype=np.int64)
            write_atomically(task.path(f"{s}.docs.npy"), lambda p, d=doc_starts: np.save(p, d))
            os.replace(tmp[s], task.path(f"{s}.bin"))
            out["splits"][s] = {"n_tokens": n_tokens[s], "n_docs": int(doc_starts.size), "md5": md5[s].hexdigest()}
        write_atomically(task.path("counts.npy"), lambda p: np.save(p, counts))
        write_atomically(done, lambda p: p.write_text(json.dumps(out)))
    finally:
        for s in SPLITS:
            files[s].close()
            tmp[s].unlink(missing_ok=True)
    return {**out, "reused": False}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links: pay for a copy
        shutil.copyfile(src, dst)


def _assemble(tasks: list[ShardTask], results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> Path:
    """Build tokens/ from the cached shard files; index.json last, then the whole folder renamed into place."""
    final = out / "tokens"
    tmp = atomic_dir(final)
    counts = None
    index: dict[str, Any] = {**meta, "splits": {}}
    for s in SPLITS:
        (tmp / s).mkdir()
        shards = []
        for k, (task, res) in enumerate(zip(tasks, results, strict=True)):
            info = res["splits"][s]
            if info["n_tokens"] == 0:  # np.memmap cannot map an empty file; an absent shard has no tokens
                continue
            name, docs = f"{s}/tokens-{k:05d}.bin", f"{s}/docs-{k:05d}.npy"
            _link(task.path(f"{s}.bin"), tmp / name)
            _link(task.path(f"{s}.docs.npy"), tmp / docs)
            shards.append({"file": name, "docs": docs, "source": res["input"], **info})
        index["splits"][s] = {"n_tokens": sum(x["n_tokens"] for x in shards),
                              "n_docs": sum(x["n_docs"] for x in shards), "shards": shards}
    for task in tasks:
        c = np.load(task.path("counts.npy"))
        counts = c if counts is None else counts + c
    np.save(tmp / "train" / "token_counts.npy", counts)
    index["token_counts"] = "train/token_counts.npy"
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    commit_dir(tmp, final)
    return final


def _finished(out: Path, fp: str) -> dict[str, Any] | None:
    try:
        previous = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return previous if previous.get("fingerprint") == fp and (out / "tokens" / INDEX).exists() else None


def run(cfg: TokenizeConfig, tracker: Tracker | None = None, mapper: Any = map) -> TokenizeResult:
    tracker = tracker or NullTracker()
    tracker.log_params(to_dict(cfg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tokens": out / "tokens", "report": out / "report.json", "quarantine": out / "quarantine.jsonl"}
    tok_hash = tokenizer_hash(cfg.tokenizer)
    fp = fingerprint({**to_dict(cfg), "tokenizer": tok_hash, "version": VERSION}, [cfg.dataset])
    previous = _finished(out, fp)
    if previous is not None:  # unchanged config, tokenizer and data: the earlier shards stand
        metrics = {k: float(v) for k, v in previous["metrics"].items()}
        tracker.log_metrics(metrics)
        return TokenizeResult(**paths, metrics=metrics)

    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    tasks = []
    for shard in dataset_shards(cfg.dataset):
        key = hashlib.md5(f"{VERSION}:{tok_hash}:{cfg.heldout_fraction}:{file_digest(shard)}".encode()).hexdigest()
        tasks.append(ShardTask(input=Path(shard).absolute(), prefix=shard_dir.absolute() / key,
                               tokenizer=Path(cfg.tokenizer).absolute(), heldout_fraction=cfg.heldout_fraction,
                               batch_rows=cfg.batch_rows))
    results = list(mapper(tokenize_shard, tasks))
    first = results[0]
    meta = {"format": "flywheel-token-shards", "version": VERSION, "dtype": first["dtype"],
            "vocab_size": first["vocab_size"], "separator_id": first["separator_id"], "tokenizer_hash": tok_hash,
            "heldout_fraction": cfg.heldout_fraction}
    with QuarantineLog(paths["quarantine"]) as q:
        for res in results:
            q.extend(res["quarantine"])
    _assemble(tasks, results, out, meta)
    keep = {t.prefix.name for t in tasks}
    for stale in shard_dir.iterdir():  # shards of an earlier tokenizer or data version
        if stale.name.split(".")[0] not in keep:
            stale.unlink(missing_ok=True)

    index = json.loads((paths["tokens"] / INDEX).read_text())
    totals = {s: index["splits"][s] for s in SPLITS}
    chars = sum(r["chars"] for r in results)
    n_tokens = sum(t["n_tokens"] for t in totals.values())
    n_docs = sum(t["n_docs"] for t in totals.values())
    metrics = {"data/tokens/train": totals["train"]["n_tokens"], "data/tokens/heldout": totals["heldout"]["n_tokens"],
               "data/docs/train": totals["train"]["n_docs"], "data/docs/heldout": totals["heldout"]["n_docs"],
               "data/tokenize/chars_per_token": chars / max(1, n_tokens - n_docs),
               "data/tokenize/quarantined": sum(len(r["quarantine"]) for r in results),
               "data/tokenize/empty": sum(r["empty"] for r in results)}
    metrics = {k: float(v) for k, v in metrics.items()}
    write_report(out, {"fingerprint": fp, "config": to_dict(cfg), "metrics": metrics, **meta,
                       "chars": chars, "shards_in": len(tasks), "shards_reused": sum(r["reused"] for r in results),
                       "splits": {s: {k: v for k, v in t.items() if k != "shards"} for s, t in totals.items()}})
    tracker.log_metrics(metrics)
    return TokenizeResult(**paths, metrics=metrics)
