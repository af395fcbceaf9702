"""Data pipeline throughput and peak memory: ours (collect -> clean -> dedup) vs DataTrove 0.10.1, same corpus.

    .venv/bin/python benchmarks/data_pipeline.py --repeats 3            # full run (~25k docs)
    .venv/bin/python benchmarks/data_pipeline.py --small --repeats 1    # smoke test (~3k docs)
    .venv/bin/python benchmarks/data_pipeline.py --filters all --sides ours,ours_ray1,ours_ray2 --files 16
                                                    # Ray 1 vs 2 CPUs with every filter of ours

The same pipeline on both sides, from the same JSONL files to a written deduplicated output:
Gopher quality filter (Rae et al. defaults), exact dedup (text lowercased, whitespace collapsed,
first kept), MinHash-LSH near-dedup (word 5-grams, 128 permutations, 32 bands x 4 rows, first of a
cluster kept).

- ours: `stages.collect` (the JSONL files) -> `stages.clean` with every filter off except
  gopher_quality -> `stages.dedup` (its defaults: exact, then MinHash with candidates verified at an
  estimated Jaccard of 0.6), with `mapper=map` (one process), and with `infra.ray_map.mapper()` on a
  local Ray of 1 and of 2 CPUs (started in the subprocess before the clock starts; its start is
  timed apart).
- datatrove: `LocalPipelineExecutor` (workers=1) over JsonlReader -> GopherQualityFilter ->
  JsonlWriter -> ExactDedupSignature; ExactFindDedups; JsonlReader -> ExactDedupFilter -> JsonlWriter
  -> MinhashDedupSignature; MinhashDedupBuckets; MinhashDedupCluster; JsonlReader -> MinhashDedupFilter
  -> JsonlWriter: DataTrove's own stages, chained the way its examples chain them. Intermediate
  writers are uncompressed, the final one uses DataTrove's default (gzip).

Two stand-ins on the DataTrove side: its English word tokenizer is spaCy, which is not installed, so
a whitespace split is passed as its `language` (cheaper than spaCy: in DataTrove's favour). It is
also what keeps both filters doing the same work: with a tokenizer that splits punctuation off as
spaCy does, DataTrove's alpha-word rule counts every comma as a word without letters and dropped 68 %
of this corpus (ours and DataTrove-with-split keep 92 %). And its default xxhash shingle hash fails
on str with the installed xxhash 4 ("Strings must be encoded before hashing"), so its signature step
hashes the UTF-8 bytes with the same xxhash64.

Corpus: real text only. Paragraphs of ../shared/datasets/tinyshakespeare/input.txt and the main text
of Debian's Python 3.11 manual (/usr/share/doc/python3.11/html, through `stages.html.extract_text`),
grouped into documents of about `--doc-words` words; then planted duplicates appended after all
originals (a file of their own, read last by both sides): near-duplicates (1-3 words replaced,
inserted or deleted, the edit model of benchmarks/minhash.py) and exact copies (case and whitespace
changed). Precision and recall are scored on what each side's dedup removed from what its own
Gopher filter kept, against the planted copies whose original that filter also kept.

Each side runs in its own subprocess; peak memory is the sampled RSS of that process tree (every
0.1 s, parent and all descendants summed: Ray's raylet, GCS and workers included), beside the
process's RSS after its imports, before any data (ru_maxrss is not used: Linux keeps the forking
parent's high-water mark across exec). Sides alternate (reversed order every other repeat);
medians and the median of per-repeat ratios are reported. Benchmarks measure; they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root
    sys.path.insert(0, str(REPO))

os.environ.setdefault("FLYWHEEL_RAY_TMP", "/tmp/fw-bench-ray")  # short Ray temp dir (socket path limit)

from benchmarks.minhash import near_copy  # noqa: E402  # the MinHash benchmark's edit model

DATASETS = REPO / ".." / "shared" / "datasets"
PYDOC = Path("/usr/share/doc/python3.11/html")
NAME = "data_pipeline"
SHINGLE, BANDS, ROWS = 5, 32, 4
SIDES = ("ours", "datatrove", "ours_ray1", "ours_ray2")
THROUGHPUT_SIDES = ("ours", "datatrove")


# --- the corpus ------------------------------------------------------------------------------------


def paragraphs() -> list[tuple[str, str]]:
    """(source, paragraph) of the real text, in a fixed order."""
    from stages.html import extract_text

    out = [("shakespeare", p.strip()) for p in
           (DATASETS / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for page in sorted(PYDOC.rglob("*.html")):
        text = extract_text(page.read_bytes())
        out += [("python-doc", p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return out


def group(paras: list[tuple[str, str]], doc_words: int) -> list[tuple[str, str]]:
    """Consecutive paragraphs of one source joined until a document has about `doc_words` words."""
    docs, buf, words, src = [], [], 0, None
    for source, p in paras:
        if buf and (source != src or words >= doc_words):
            docs.append((src, "\n\n".join(buf)))
            buf, words = [], 0
        src = source
        buf.append(p)
        words += len(p.split())
    if buf:
        docs.append((src, "\n\n".join(buf)))
    return docs


def exact_copy(text: str, rng: random.Random) -> str:
    # Same key for both sides' exact dedup (lowercased, whitespace collapsed), different bytes.
    return ("  " + text.upper() + "\n") if rng.random() < 0.5 else "\t".join(text.split(" "))


def build_corpus(work: Path, max_docs: int, doc_words: int, near_frac: float, exact_frac: float,
                 files: int, seed: int) -> dict[str, Any]:
    """JSONL files under work/jsonl (originals in `files` files, then planted.jsonl) and truth.json."""
    key = {"max_docs": max_docs, "doc_words": doc_words, "near": near_frac, "exact": exact_frac,
           "files": files, "seed": seed, "version": 1}
    truth_path = work / "truth.json"
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth["key"] == key:
            return truth
    shutil.rmtree(work / "jsonl", ignore_errors=True)
    (work / "jsonl").mkdir(parents=True)
    docs = [d for d in group(paragraphs(), doc_words) if len(d[1].split()) >= 5]
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_orig = min(len(docs), int(max_docs / (1 + near_frac + exact_frac)))
    docs = docs[:n_orig]
    originals = [{"id": f"o{i:06d}", "text": t, "source": s} for i, (s, t) in enumerate(docs)]
    near_of, exact_of = {}, {}
    planted = []
    for j, i in enumerate(rng.sample(range(n_orig), int(n_orig * near_frac))):
        rid = f"pn{j:06d}"
        near_of[rid] = originals[i]["id"]
        planted.append({"id": rid, "text": near_copy(originals[i]["text"], rng), "source": originals[i]["source"]})
    for j, i in enumerate(rng.sample(range(n_orig), int(n_orig * exact_frac))):
        rid = f"px{j:06d}"
        exact_of[rid] = originals[i]["id"]
        planted.append({"id": rid, "text": exact_copy(originals[i]["text"], rng), "source": originals[i]["source"]})
    rng.shuffle(planted)
    per_file = -(-n_orig // files)
    chunks = [originals[k:k + per_file] for k in range(0, n_orig, per_file)] + [planted]
    for k, chunk in enumerate(chunks):
        name = "planted.jsonl" if k == len(chunks) - 1 else f"part-{k:03d}.jsonl"
        with open(work / "jsonl" / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk)
    n = n_orig + len(planted)
    chars = sum(len(r["text"]) for r in originals + planted)
    truth = {"key": key, "documents": n, "originals": n_orig, "planted_near": len(near_of),
             "planted_exact": len(exact_of), "chars": chars, "mb": chars / 1e6,
             "words_per_doc_mean": sum(len(r["text"].split()) for r in originals) / max(1, n_orig),
             "sources": {s: sum(r["source"] == s for r in originals) for s in ("shakespeare", "python-doc")},
             "near_of": near_of, "exact_of": exact_of}
    truth_path.write_text(json.dumps(truth))
    return truth


def input_files(work: Path) -> list[Path]:
    return sorted((work / "jsonl").glob("*.jsonl"), key=lambda p: (p.name == "planted.jsonl", p.name))


# --- ours -----------------------------------------------------------------------------------------


def run_ours(work: Path, out: Path, ray_cpus: int | None, filters: str = "gopher") -> dict[str, Any]:
    from stages import clean, collect, dedup
    from stages.dataset import dataset_shards

    mapper: Any = map
    extra: dict[str, Any] = {}
    if ray_cpus:
        from infra.ray_executor import ensure_ray
        from infra.ray_map import mapper as ray_mapper

        t = time.perf_counter()
        ensure_ray(num_cpus=ray_cpus)
        extra["ray_start_s"] = time.perf_counter() - t
        mapper = ray_mapper()
    off = {"enabled": False}
    stage_s: dict[str, float] = {}
    start = time.perf_counter()
    c = collect.run(collect.CollectConfig(output_dir=out / "collect", builtin_text=False, arithmetic_problems=0,
                                          files=tuple(str(p) for p in input_files(work)), id_field="id"),
                    mapper=mapper)
    stage_s["collect"] = time.perf_counter() - start
    t = time.perf_counter()
    # "all": clean as the lifecycle runs it (language id, Gopher, C4, FineWeb, toxicity, PII)
    gopher_only = {} if filters == "all" else dict(
        language=clean.LanguageConfig(enabled=False, record=False), gopher_repetition=clean.GopherRepetitionConfig(**off),
        c4=clean.C4Config(**off), fineweb=clean.FineWebConfig(**off), toxicity=clean.ToxicityConfig(**off),
        pii=clean.PIIConfig(**off))
    k = clean.run(clean.CleanConfig(input_dir=c.dataset, output_dir=out / "clean", builtin_per_source=False,
                                    **gopher_only), mapper=mapper)
    stage_s["clean"] = time.perf_counter() - t
    t = time.perf_counter()
    d = dedup.run(dedup.DedupConfig(input_dir=k.dataset, output_dir=out / "dedup", shingle_size=SHINGLE,
                                    num_perm=BANDS * ROWS, bands=BANDS, rows=ROWS), mapper=mapper)
    stage_s["dedup"] = time.perf_counter() - t
    seconds = time.perf_counter() - start
    if ray_cpus:
        from infra.ray_executor import shutdown
        shutdown()

    def ids(dataset: Path) -> list[str]:
        import pyarrow.parquet as pq
        # collect prefixes ids with their source ("file:part-000:o000001"); the truth has the bare ids
        return [i.rsplit(":", 1)[-1] for s in dataset_shards(dataset)
                for i in pq.read_table(s, columns=["id"])["id"].to_pylist()]

    return {"seconds": seconds, "stage_s": stage_s, "filter_kept": ids(k.dataset), "kept": ids(d.dataset),
            "exact_dropped": d.metrics["data/dedup/exact/dropped"], "near_dropped": d.metrics["data/dedup/near/dropped"],
            **extra}


# --- DataTrove, used as a library -------------------------------------------------------------------


def run_datatrove(work: Path, out: Path, workers: int = 1) -> dict[str, Any]:
    import gzip

    import xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceSplit(WordTokenizer):  # stands in for spaCy (not installed); see the module docstring
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"[^.!?]+[.!?]*", text)]

    class Signature(MinhashDedupSignature):  # xxhash 4 hashes bytes only
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode("utf-8"))

    tok = WhitespaceSplit()
    n_files = len(input_files(work))
    mcfg = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=ROWS)
    ecfg = ExactDedupConfig(content_getter=exact_content)
    raw, d = str(work / "jsonl"), out

    stage_s: dict[str, float] = {}

    def execute(name: str, steps: list, tasks: int) -> None:
        t = time.perf_counter()
        LocalPipelineExecutor(steps, tasks=tasks, workers=min(workers, tasks), logging_dir=str(d / "logs" / name),
                              skip_completed=False).run()
        stage_s[name] = time.perf_counter() - t

    start = time.perf_counter()
    execute("filter+exact_sig", [JsonlReader(raw, glob_pattern="*.jsonl"), GopherQualityFilter(language=tok),
                                 JsonlWriter(str(d / "filtered"), compression=None),
                                 ExactDedupSignature(str(d / "exact_sigs"), config=ecfg)], n_files)
    execute("exact_find", [ExactFindDedups(str(d / "exact_sigs"), str(d / "exact_dups"), config=ecfg)], 1)
    execute("exact_filter+minhash_sig", [JsonlReader(str(d / "filtered")),
                                         ExactDedupFilter(str(d / "exact_dups"), config=ecfg),
                                         JsonlWriter(str(d / "exact_out"), compression=None),
                                         Signature(str(d / "sigs"), config=mcfg, language=tok)], n_files)
    execute("minhash_buckets", [MinhashDedupBuckets(str(d / "sigs"), str(d / "buckets"), config=mcfg)], BANDS)
    execute("minhash_cluster", [MinhashDedupCluster(str(d / "buckets"), str(d / "remove"), config=mcfg)], 1)
    execute("minhash_filter", [JsonlReader(str(d / "exact_out")), MinhashDedupFilter(str(d / "remove")),
                               JsonlWriter(str(d / "final"))], n_files)
    seconds = time.perf_counter() - start

    def ids(folder: Path) -> list[str]:
        out_ids = []
        for path in sorted(folder.glob("*.jsonl*")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                out_ids += [json.loads(line)["id"] for line in f]
        return out_ids

    filtered, exact_out, final = ids(d / "filtered"), ids(d / "exact_out"), ids(d / "final")
    return {"seconds": seconds, "stage_s": stage_s, "filter_kept": filtered, "kept": final,
            "exact_dropped": len(filtered) - len(exact_out), "near_dropped": len(exact_out) - len(final)}


def exact_content(doc: Any) -> bytes:
    """Our exact-dedup key, as DataTrove's content getter (its annotation picks a bytes hash)."""
    return " ".join(doc.text.lower().split()).encode("utf-8")


PREIMPORT = {"ours": ["stages.collect", "stages.clean", "stages.dedup", "pyarrow.parquet"],
             "ours_ray": ["stages.collect", "stages.clean", "stages.dedup", "pyarrow.parquet", "infra.ray_map"],
             "datatrove": ["datatrove.executor", "datatrove.pipeline.dedup", "datatrove.pipeline.filters",
                           "datatrove.pipeline.readers", "datatrove.pipeline.writers", "xxhash"]}


def worker(side: str, work: Path, out: Path, result: Path, filters: str) -> None:
    import importlib

    import psutil

    for module in PREIMPORT["ours_ray" if side.startswith("ours_ray") else side.split("_")[0]]:
        importlib.import_module(module)  # imports are not what is timed
    import_rss = psutil.Process().memory_info().rss / 2**20
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if side == "datatrove":
        res = run_datatrove(work, out)
    elif side == "datatrove_w2":
        res = run_datatrove(work, out, workers=2)
    else:
        res = run_ours(work, out, {"ours": None, "ours_ray1": 1, "ours_ray2": 2}[side], filters)
    res["import_rss_mb"] = import_rss  # the process after its imports, before any data
    result.write_text(json.dumps(res))


# --- the driver -----------------------------------------------------------------------------------


def run_side(side: str, work: Path, log_dir: Path, filters: str) -> dict[str, Any]:
    from benchmarks.common import tree_rss_mb  # imports torch: the driver only, never a measured side

    result = work / f"result-{side}.json"
    result.unlink(missing_ok=True)
    log = open(log_dir / f"{side}.log", "w")
    cmd = [sys.executable, __file__, "--worker", side, "--work", str(work), "--filters", filters]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "RAY_TQDM_PATCH_PRINT": "0"})
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    sampler.join()
    log.close()
    if rc or not result.exists():
        tail = (log_dir / f"{side}.log").read_text()[-3000:]
        raise SystemExit(f"{side} failed (rc {rc}):\n{tail}")
    res = json.loads(result.read_text())
    res["peak_tree_rss_mb"] = peak[0]
    return res


def score(res: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Precision/recall of what dedup removed from what this side's own Gopher filter kept.

    A planted copy and its original form a cluster; either member may be the one kept (DataTrove's
    exact dedup keeps the lowest index within a file, not the first in corpus order). Recall: planted
    pairs (both members kept by the filter) of which dedup removed at least one. Precision: removals
    that a cluster needed (at most its size - 1) over all removals.
    """
    kept_f, kept = set(res["filter_kept"]), set(res["kept"])
    removed = kept_f - kept
    clusters: dict[str, set[str]] = {}
    recall = {}
    for kind in ("near", "exact"):
        pairs = [(p, o) for p, o in truth[f"{kind}_of"].items() if p in kept_f and o in kept_f]
        for p, o in pairs:
            clusters.setdefault(o, {o}).add(p)
        recall[kind] = (sum(p in removed or o in removed for p, o in pairs) / len(pairs) if pairs else float("nan"),
                        len(pairs))
    needed = sum(min(len(m & removed), len(m) - 1) for m in clusters.values())
    in_clusters = set().union(*clusters.values()) if clusters else set()
    return {"filter_kept": len(kept_f), "rows_out": len(kept), "removed_by_dedup": len(removed),
            "near_pairs": recall["near"][1], "exact_pairs": recall["exact"][1],
            "near_recall": recall["near"][0], "exact_recall": recall["exact"][0],
            "precision": needed / len(removed) if removed else float("nan"),
            "false_positive_count": len(removed) - needed,
            "false_positives_outside_clusters": sorted(removed - in_clusters)[:20]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-docs", type=int, default=25_000, help="corpus size in documents (originals + planted)")
    ap.add_argument("--small", action="store_true", help="smoke test: 3,000 documents")
    ap.add_argument("--doc-words", type=int, default=100)
    ap.add_argument("--near-frac", type=float, default=0.2)
    ap.add_argument("--exact-frac", type=float, default=0.05)
    ap.add_argument("--files", type=int, default=8, help="JSONL files of originals (= shards / tasks)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"of {SIDES + ('datatrove_w2',)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fw-bench-data-pipeline"))
    ap.add_argument("--result-name", default=NAME)
    ap.add_argument("--filters", choices=("gopher", "all"), default="gopher",
                    help="clean with Gopher quality only (both sides), or with every filter of ours "
                         "(language id, Gopher, C4, FineWeb, toxicity, PII: ours_* sides only)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.work, args.work / "out" / args.worker, args.work / f"result-{args.worker}.json",
               args.filters)
        return {}
    if args.filters == "all" and any(not s.startswith("ours") for s in args.sides.split(",")):
        sys.exit("--filters all runs only our sides (DataTrove would not run the same filters): "
                 "--sides ours,ours_ray1,ours_ray2")
    if not (DATASETS / "tinyshakespeare" / "input.txt").is_file() or not PYDOC.is_dir():
        sys.exit(f"needs {DATASETS}/tinyshakespeare/input.txt and {PYDOC} (Debian's python3.11-doc)")
    from benchmarks.common import machine, markdown_table, median, write_results

    max_docs = 3000 if args.small else args.max_docs
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    truth = build_corpus(args.work, max_docs, args.doc_words, args.near_frac, args.exact_frac, args.files, args.seed)
    print(f"corpus: {truth['documents']} docs ({truth['originals']} originals, {truth['planted_near']} near + "
          f"{truth['planted_exact']} exact planted), {truth['mb']:.1f} MB, built in {time.perf_counter() - t:.0f} s",
          flush=True)
    sides = args.sides.split(",")
    log_dir = args.work / "logs"
    log_dir.mkdir(exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate: drifting load hits every side alike
            before = load_average()
            res = run_side(side, args.work, log_dir, args.filters)
            res["load_before"], res["load_after"] = before, load_average()
            res["docs_per_s"] = truth["documents"] / res["seconds"]
            res["quality"] = score(res, truth)
            del res["filter_kept"], res["kept"]
            runs[side].append(res)
            q = res["quality"]
            print(f"[{r}] {side:13s} {res['seconds']:7.1f} s  {res['docs_per_s']:7.0f} docs/s  "
                  f"tree peak {res['peak_tree_rss_mb']:6.0f} MB  out {q['rows_out']}  "
                  f"near R {q['near_recall']:.3f}  P {q['precision']:.3f}  load {res['load_before'][0]}", flush=True)

    summary: dict[str, dict[str, Any]] = {}
    for side, rs in runs.items():
        summary[side] = {"seconds": median([x["seconds"] for x in rs]), "docs_per_s": median([x["docs_per_s"] for x in rs]),
                         "peak_tree_rss_mb": median([x["peak_tree_rss_mb"] for x in rs]),
                         "import_rss_mb": median([x["import_rss_mb"] for x in rs]),
                         "stage_s": {k: median([x["stage_s"][k] for x in rs]) for k in rs[0]["stage_s"]},
                         **{k: rs[-1]["quality"][k] for k in ("rows_out", "filter_kept", "near_recall", "exact_recall",
                                                              "precision", "false_positive_count")}}
        if "ray_start_s" in rs[0]:
            summary[side]["ray_start_s"] = median([x["ray_start_s"] for x in rs])
    ratios: dict[str, float] = {}
    base = runs.get("ours")
    for side in sides:
        for ref in ("datatrove", "ours"):
            if side != ref and ref in runs and (ref == "datatrove" or side.startswith("ours_ray")):
                ratios[f"{side}/{ref}_docs_per_s"] = median([r["seconds"] / s["seconds"]
                                                             for s, r in zip(runs[side], runs[ref])])
    if base and "datatrove" in runs:
        ratios["ours/datatrove_peak_tree_rss"] = median([o["peak_tree_rss_mb"] / d["peak_tree_rss_mb"]
                                                         for o, d in zip(runs["ours"], runs["datatrove"])])
    names = {"ours": "ours, mapper=map (1 process)", "datatrove": "DataTrove LocalPipelineExecutor, workers=1",
             "datatrove_w2": "DataTrove LocalPipelineExecutor, workers=2",
             "ours_ray1": "ours, Ray mapper, 1 CPU", "ours_ray2": "ours, Ray mapper, 2 CPUs"}
    rows = [[names[s], v["seconds"], v["docs_per_s"], ratios.get(f"{s}/datatrove_docs_per_s", "")
             if s != "datatrove" else 1.0, v["peak_tree_rss_mb"], v["import_rss_mb"], v["rows_out"],
             f"{v['near_recall']:.3f}", f"{v['exact_recall']:.3f}", f"{v['precision']:.3f}"] for s, v in summary.items()]
    table = markdown_table(["run", "wall s", "docs/s", "vs DataTrove", "peak tree RSS MB", "RSS after imports MB",
                            "rows out", "near recall", "exact recall", "dedup precision"], rows)
    print(table)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    payload = {"corpus": {k: v for k, v in truth.items() if k not in ("near_of", "exact_of")},
               "config": {"filters": args.filters, "shingle": SHINGLE, "num_perm": BANDS * ROWS, "bands": BANDS, "rows": ROWS,
                          "ours_jaccard_threshold": 0.6, "datatrove": "0.10.1"},
               "repeats": args.repeats, "summary": summary, "ratios": ratios, "runs": runs, "table": table,
               "machine": {**machine(), "load_average_end": load_average()},
               "command": " ".join([".venv/bin/python benchmarks/data_pipeline.py", *(argv or sys.argv[1:])])}
    path = write_results(args.result_name, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
