"""Pretraining through Ray Train: DDP vs FSDP with 2 workers, and 1 vs 2 workers, on CPU.

    .venv/bin/python benchmarks/pretrain_parallel.py [--model small --steps 8 --repeats 2]
    .venv/bin/python benchmarks/pretrain_parallel.py --model gpt2-124m --steps 5 --repeats 1 --batch-size 4

Results go to benchmarks/results/pretrain_parallel_<model>.json.

The tiny preset's data (builtin text, its tokenizer and token shards) with the `--model` preset's
architecture, through `infra.ray_executor.run_distributed` exactly as `flywheel run` pretrains:
- 1 worker holding both cores (no wrapper: one process),
- 2 workers x 1 core, `ray.strategy=ddp` (every worker holds weights, gradients and Adam states),
- 2 workers x 1 core, `ray.strategy=fsdp` (FSDP2: each holds half, gathering a block's weights for
  its forward and backward).
Step time: the median over the run's steps after the first two (`log_every=1`, one step per window;
no checkpoint until the last step, no evaluation until the end), then the median over repeats. Peak
memory per worker, the largest over the workers of their `ru_maxrss` (which includes Python, torch
and Ray's own ~0.5 GB per process): while training (`memory/peak_rss_mb` of the last log window,
logged before that step's checkpoint) and over the whole run (`memory/worker_peak_rss_mb` from the
executor: the final checkpoint included, for which FSDP gathers the whole model on rank 0).
Runs alternate (W=1, DDP, FSDP, W=1, ...) so that background load hits all alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root
    sys.path.insert(0, str(REPO))

os.environ.setdefault("FLYWHEEL_RAY_TMP", "/tmp/fw-bench-ray")  # our own short Ray temp dir

from benchmarks.common import bench_dir, machine, markdown_table, median, prepare_workload, write_results  # noqa: E402
from infra import ray_executor  # noqa: E402
from infra.ray_executor import RayConfig  # noqa: E402
from stages.config import from_dict, load_preset  # noqa: E402
from stages.model import ModelConfig  # noqa: E402
from stages.pretrain import PretrainConfig  # noqa: E402
from stages.train_loop import TrainConfig, read_metrics_log  # noqa: E402

SETUPS = {"1 worker": RayConfig(num_workers=1, cpus_per_worker=2),
          "2 workers DDP": RayConfig(num_workers=2, strategy="ddp"),
          "2 workers FSDP": RayConfig(num_workers=2, strategy="fsdp")}
SKIP = 2  # first steps: allocations, FSDP's lazy init


def one_run(w, model: ModelConfig, args, ray_cfg: RayConfig, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = PretrainConfig(tokens=w.tokens, tokenizer=w.tokenizer, output_dir=out, model=model, seq_len=args.seq_len,
                         batch_size=args.batch_size, eval_windows=4,
                         train=TrainConfig(max_steps=args.steps, lr=1e-3, warmup_steps=2, log_every=1,
                                           checkpoint_every=args.steps, progress=False))
    result = ray_executor.run_distributed("pretrain", cfg, ray_cfg=ray_cfg)
    tokens = args.seq_len * args.batch_size
    rows = read_metrics_log(out)
    step_s = [tokens / row["train/tokens_per_s"] for row in rows[SKIP:]]
    return {"step_s": median(step_s), "train_peak_rss_mb": rows[-1]["memory/peak_rss_mb"],
            "run_peak_rss_mb": result.metrics["memory/worker_peak_rss_mb"], "final_loss": result.metrics["train/loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset whose model section is trained")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="bytes: set glibc's MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's dynamic default)")
    args = ap.parse_args()
    if args.mmap_threshold:
        # Inherited by the local Ray's workers. A fixed threshold serves every larger allocation from
        # mmap and gives it back on free; the dynamic default rises after the first frees and then
        # keeps FSDP's per-block gather buffers in the heap, so freed memory stays resident.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)

    root = bench_dir("pretrain_parallel")
    w = prepare_workload(root / "workload", "tiny")
    model = from_dict(ModelConfig, {**load_preset(args.model)["model"], "max_seq_len": args.seq_len}, "model.")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    ray_executor.ensure_ray(num_cpus=2)
    try:
        for r in range(args.repeats):
            for name, ray_cfg in SETUPS.items():
                runs[name].append(one_run(w, model, args, ray_cfg, root / "runs" / name.replace(" ", "-")))
                print(f"repeat {r + 1} {name}: {runs[name][-1]}", flush=True)
    finally:
        ray_executor.shutdown()

    summary = {name: {k: median([x[k] for x in xs]) for k in xs[0]} for name, xs in runs.items()}
    base = summary["1 worker"]["step_s"]
    rows = [[name, s["step_s"], base / s["step_s"], s["train_peak_rss_mb"], s["run_peak_rss_mb"], s["final_loss"]]
            for name, s in summary.items()]
    print(markdown_table(["setup", "step time (s)", "speed vs 1 worker", "peak RSS per worker, training (MB)",
                          "peak RSS per worker, whole run (MB)", f"loss after {args.steps} steps"], rows))
    tag = f"_mmap{args.mmap_threshold}" if args.mmap_threshold else ""
    write_results(f"pretrain_parallel_{args.model}{tag}",
                  {"args": vars(args), "machine": machine(), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
