"""Bounded memory: a corpus several times larger than a cgroup memory limit through collect -> clean -> dedup -> decontaminate -> mix.

    .venv/bin/python benchmarks/data_memory.py --corpus-mb 2500 --limit-mb 1024     # full run (root, cgroup v1)
    .venv/bin/python benchmarks/data_memory.py --small                              # smoke test: 60 MB, 400 MB limit
    .venv/bin/python benchmarks/data_memory.py --limit-mb 600 --start-from DATASET  # decontaminate -> mix only
    .venv/bin/python benchmarks/data_memory.py --start-from DATASET --first dedup   # dedup -> decontaminate -> mix

Corpus: JSONL files (`--file-mb` each) of generated documents of about `--doc-kb` KB, each a random
sample of lines of ../shared/datasets/tinyshakespeare/input.txt in random order: real words and
lines, but documents that are neither exact nor near duplicates of each other, so every stage
carries (nearly) the whole corpus. Built once under `--work`, reused while the parameters match.

The chain runs in one child process put in a fresh cgroup v1 memory cgroup
(`/sys/fs/cgroup/memory/<name>`, `memory.limit_in_bytes` = the limit, and `memory.memsw.limit_in_bytes`
too where swap accounting exists) before it executes, so its imports and every process it starts
are inside the limit; the cgroup is removed afterwards. Stages are the real ones with their defaults
(clean: every filter on; decontaminate: built-in tasks plus GSM8K's test set when present; mix:
natural shares sampled to about half the tokens clean kept), `mapper=map`. Clean's C4 line rule
removes most Shakespeare lines (no terminal punctuation), so later stages carry about a third of the
characters but nearly all the rows.

`--start-from DATASET` runs only decontaminate -> mix on an existing dataset directory (for example a
run's `out/collect/dataset` or `out/dedup/dataset`), under the same kind of limit: the two stages
that cost the most time on this machine, measured without rerunning clean. Its "corpus" is the
dataset's text (the Parquet footers' uncompressed size of the text column).

Measured: the child reports when each stage starts and ends; the parent samples every 0.2 s the RSS
of the child's process tree and the cgroup's own accounting (`memory.stat` rss, and
`memory.usage_in_bytes`, which also counts page cache the kernel reclaims under the limit), and keeps
the peak of each per stage. A stage killed by the kernel's OOM killer is named with the peak it had
reached. Without permission to create the cgroup the benchmark says so and stops. It measures; it
never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASETS = REPO / ".." / "shared" / "datasets"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
STAGES = ("collect", "clean", "dedup", "decontaminate", "mix")


# --- corpus -----------------------------------------------------------------------------------------


def build_corpus(work: Path, corpus_mb: int, file_mb: int, doc_kb: float, seed: int) -> dict[str, Any]:
    key = {"corpus_mb": corpus_mb, "file_mb": file_mb, "doc_kb": doc_kb, "seed": seed, "version": 1}
    meta_path = work / "corpus.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        return json.loads(meta_path.read_text())
    shutil.rmtree(work / "jsonl", ignore_errors=True)
    (work / "jsonl").mkdir(parents=True)
    lines = [ln for ln in (DATASETS / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    mean_line = sum(len(ln) + 1 for ln in lines) / len(lines)
    per_doc = max(1, int(doc_kb * 1024 / mean_line))
    rng = random.Random(seed)
    total = docs = 0
    k = 0
    while total < corpus_mb * 1e6:
        size = 0
        with open(work / "jsonl" / f"part-{k:04d}.jsonl", "w", encoding="utf-8") as f:
            while size < file_mb * 1e6 and total + size < corpus_mb * 1e6:
                text = "\n".join(rng.choices(lines, k=per_doc))
                line = json.dumps({"id": f"g{docs:08d}", "text": text}) + "\n"
                f.write(line)
                size += len(line)
                docs += 1
        total += size
        k += 1
    meta = {"key": key, "bytes": total, "mb": total / 1e6, "documents": docs, "files": k}
    meta_path.write_text(json.dumps(meta))
    return meta


# --- the chain, in the limited child -----------------------------------------------------------------


def chain(work: Path, out: Path, progress: Path, filters: str = "all", start: Path | None = None,
          first: str = "decontaminate") -> None:
    from stages import clean, collect, decontaminate, dedup, mix

    def mark(stage: str, event: str, **extra: Any) -> None:
        with open(progress, "a") as f:
            f.write(json.dumps({"stage": stage, "event": event, "t": time.time(), **extra}) + "\n")

    shutil.rmtree(out, ignore_errors=True)
    evals = tuple(p for p in [DATASETS / "gsm8k" / "test.jsonl"] if p.is_file())
    if start is not None:  # --start-from: decontaminate and mix only, from an existing dataset
        tail(start, out, evals, mark, first=first)
        return
    files = tuple(str(p) for p in sorted((work / "jsonl").glob("*.jsonl")))
    mark("collect", "start")
    r = collect.run(collect.CollectConfig(output_dir=out / "collect", builtin_text=False, arithmetic_problems=0,
                                          files=files, id_field="id"))
    mark("collect", "end", metrics=r.metrics)
    mark("clean", "start")
    off = {"enabled": False}
    only_gopher = {} if filters == "all" else dict(
        builtin_per_source=False, language=clean.LanguageConfig(enabled=False, record=False),
        gopher_repetition=clean.GopherRepetitionConfig(**off), c4=clean.C4Config(**off),
        fineweb=clean.FineWebConfig(**off), toxicity=clean.ToxicityConfig(**off), pii=clean.PIIConfig(**off))
    r = clean.run(clean.CleanConfig(input_dir=r.dataset, output_dir=out / "clean", **only_gopher))
    mark("clean", "end", metrics=r.metrics)
    target_tokens = int(r.metrics["data/chars_out"] / 8)  # about half of what clean kept (4 bytes a token)
    mark("dedup", "start")
    r = dedup.run(dedup.DedupConfig(input_dir=r.dataset, output_dir=out / "dedup"))
    mark("dedup", "end", metrics=r.metrics)
    tail(r.dataset, out, evals, mark, target_tokens)


def tail(dataset: Path, out: Path, evals: tuple[Path, ...], mark, target_tokens: int | None = None,
         first: str = "decontaminate") -> None:
    """[dedup ->] decontaminate -> mix; without `target_tokens`, about half the tokens of `dataset` (UTF-8 bytes / 8)."""
    from stages import decontaminate, dedup, mix
    from stages.dataset import dataset_shards

    if target_tokens is None:
        target_tokens = sum(text_bytes(s) for s in dataset_shards(dataset)) // 8
    if first == "dedup":
        mark("dedup", "start")
        r = dedup.run(dedup.DedupConfig(input_dir=dataset, output_dir=out / "dedup"))
        mark("dedup", "end", metrics=r.metrics)
        dataset = r.dataset
    mark("decontaminate", "start")
    r = decontaminate.run(decontaminate.DecontaminateConfig(input_dir=dataset, output_dir=out / "decontaminate",
                                                            eval_files=evals))
    mark("decontaminate", "end", metrics=r.metrics)
    mark("mix", "start")
    r = mix.run(mix.MixConfig(input_dir=r.dataset, output_dir=out / "mix", target_tokens=target_tokens))
    mark("mix", "end", metrics=r.metrics)


def text_bytes(shard: Path) -> int:
    """The text column's uncompressed size from the Parquet footer (text plus 4 bytes a row), read without the data."""
    meta = pq.ParquetFile(shard).metadata
    col = meta.schema.names.index("text")
    return sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))


# --- cgroup and sampling in the parent ----------------------------------------------------------------


def make_cgroup(name: str, limit: int) -> tuple[Path | None, str]:
    path = CGROUP_ROOT / name
    try:
        if path.exists():
            path.rmdir()
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit))
    except OSError as e:
        if path.exists():
            try:
                path.rmdir()
            except OSError:
                pass
        return None, f"cannot create a memory cgroup at {path}: {e}"
    return path, ""


def read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def cgroup_stat(cg: Path) -> dict[str, int]:
    out = {}
    try:
        for line in (cg / "memory.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
    except OSError:
        pass
    return out


def oom_kills(cg: Path) -> int:
    try:
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def current_stage(progress: Path) -> str:
    stage = "start-up"
    try:
        for line in progress.read_text().splitlines():
            ev = json.loads(line)
            stage = ev["stage"] if ev["event"] == "start" else f"after {ev['stage']}"
    except (OSError, ValueError):
        pass
    return stage


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-mb", type=int, default=2500)
    ap.add_argument("--limit-mb", type=int, default=1024)
    ap.add_argument("--file-mb", type=int, default=250, help="size of each JSONL input file")
    ap.add_argument("--doc-kb", type=float, default=4.0)
    ap.add_argument("--small", action="store_true", help="smoke test: 60 MB corpus, 400 MB limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fw-bench-data-memory"))
    ap.add_argument("--result-name", default="data_memory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--filters", choices=("all", "gopher"), default="all",
                    help="clean with every filter, or Gopher quality only (same shard-wise memory, ~5x faster)")
    ap.add_argument("--start-from", type=Path, default=None, metavar="DATASET",
                    help="run decontaminate -> mix only, on this existing dataset directory (e.g. a previous "
                         "run's out/dedup/dataset); the corpus size reported is then that dataset's")
    ap.add_argument("--first", choices=("dedup", "decontaminate"), default="decontaminate",
                    help="with --start-from: the first stage to run on it")
    args = ap.parse_args(argv)
    if args.worker:
        tail_run = "-tail" if args.start_from else ""
        chain(args.work, args.work / f"out{tail_run}", args.work / f"progress{tail_run}.jsonl", args.filters,
              args.start_from, args.first)
        return {}
    if not (DATASETS / "tinyshakespeare" / "input.txt").is_file():
        sys.exit(f"needs {DATASETS}/tinyshakespeare/input.txt")
    from benchmarks.common import machine, markdown_table, tree_rss_mb, write_results

    if args.small:
        args.corpus_mb, args.limit_mb, args.file_mb = 60, 400, 30
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.start_from:
        from stages.dataset import dataset_shards

        shards = dataset_shards(args.start_from)
        size = sum(text_bytes(s) for s in shards)
        corpus = {"dataset": str(args.start_from), "bytes": size, "mb": size / 1e6, "files": len(shards),
                  "documents": sum(pq.ParquetFile(s).metadata.num_rows for s in shards),
                  "note": "bytes = the text column's uncompressed Parquet size"}
    else:
        corpus = build_corpus(args.work, args.corpus_mb, args.file_mb, args.doc_kb, args.seed)
    print(f"corpus: {corpus['documents']} docs, {corpus['mb']:.0f} MB in {corpus['files']} files "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    limit = args.limit_mb * 2**20
    name = f"fw-bench-{os.getpid()}"
    cg, why = make_cgroup(name, limit)
    if cg is None:
        print(f"skipped: {why} (needs root and cgroup v1's memory controller)")
        return {"skipped": why}
    progress = args.work / ("progress-tail.jsonl" if args.start_from else "progress.jsonl")
    progress.unlink(missing_ok=True)
    procs = cg / "cgroup.procs"

    def enter_cgroup() -> None:  # runs in the child between fork and exec: imports count too
        procs.write_text(str(os.getpid()))

    log = open(args.work / ("chain-tail.log" if args.start_from else "chain.log"), "w")
    start = time.time()
    load_before = os.getloadavg()
    peaks: dict[str, dict[str, float]] = {}
    try:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--work", str(args.work), "--filters",
                                 args.filters, "--first", args.first,
                                 *(["--start-from", str(args.start_from)] if args.start_from else [])],
                                stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=enter_cgroup,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                stage = current_stage(progress)
                p = peaks.setdefault(stage, {"tree_rss_mb": 0.0, "cgroup_rss_mb": 0.0, "cgroup_usage_mb": 0.0})
                stat = cgroup_stat(cg)
                p["tree_rss_mb"] = max(p["tree_rss_mb"], tree_rss_mb(proc.pid))
                p["cgroup_rss_mb"] = max(p["cgroup_rss_mb"], stat.get("rss", 0) / 2**20)
                p["cgroup_usage_mb"] = max(p["cgroup_usage_mb"], read_int(cg / "memory.usage_in_bytes") / 2**20)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
        wall = time.time() - start
        cg_info = {"max_usage_mb": read_int(cg / "memory.max_usage_in_bytes") / 2**20,
                   "failcnt": read_int(cg / "memory.failcnt"), "oom_kills": oom_kills(cg)}
    finally:
        log.close()
        for _ in range(50):  # the cgroup can be removed once its last process has gone
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    stage_s, rows = {}, {}
    starts = {e["stage"]: e["t"] for e in events if e["event"] == "start"}
    for e in events:
        if e["event"] == "end":
            stage_s[e["stage"]] = e["t"] - starts[e["stage"]]
            m = e["metrics"]
            rows[e["stage"]] = {"in": m.get("data/rows_in"), "out": m.get("data/rows_out")}
    stages = STAGES[STAGES.index(args.first):] if args.start_from else STAGES
    completed = rc == 0 and all(s in stage_s for s in stages)
    failed_in = None if completed else current_stage(progress)
    table_rows = [[s, f"{stage_s[s]:.0f}" if s in stage_s else "-", rows.get(s, {}).get("in", "-"),
                   rows.get(s, {}).get("out", "-"), peaks.get(s, {}).get("tree_rss_mb", float("nan")),
                   peaks.get(s, {}).get("cgroup_rss_mb", float("nan"))] for s in stages]
    table = markdown_table(["stage", "wall s", "rows in", "rows out", "peak tree RSS MB", "peak cgroup rss MB"],
                           table_rows)
    peak = max((p["tree_rss_mb"] for p in peaks.values()), default=0.0)
    print(table)
    print(f"corpus {corpus['mb']:.0f} MB ({corpus['mb'] * 1e6 / limit:.1f}x the limit) under a "
          f"{args.limit_mb} MB limit: {'completed' if completed else f'FAILED in {failed_in} (rc {rc})'}; "
          f"peak tree RSS {peak:.0f} MB, wall {wall:.0f} s, oom kills {cg_info['oom_kills']}")
    if not completed:
        print(Path(log.name).read_text()[-2000:])
    payload = {"corpus": corpus, "limit_mb": args.limit_mb, "filters": args.filters, "completed": completed, "returncode": rc,
               "failed_in": failed_in, "wall_s": wall, "stage_s": stage_s, "rows": rows, "peaks": peaks,
               "peak_tree_rss_mb": peak, "cgroup": cg_info, "table": table,
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
               "command": " ".join([".venv/bin/python benchmarks/data_memory.py", *(argv or sys.argv[1:])])}
    print(f"wrote {write_results(args.result_name, payload)}")
    return payload


if __name__ == "__main__":
    main()
