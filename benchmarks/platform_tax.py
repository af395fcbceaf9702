"""Platform tax: pretraining tokens/s through Ray Train + tracker + checkpoints vs a bare PyTorch loop.

    .venv/bin/python benchmarks/platform_tax.py [--steps 200 --repeats 3]

Same model (the tiny preset's), same data (builtin text, vocab-4096 BPE, its token shards), same
batches (`TokenShards.batch_at`), same optimizer and lr schedule. The bare loop is what a researcher
would write in one file: no Ray, no tracker, no checkpoints, torch's default threads. The platform is
`stages.pretrain.run` inside `infra.ray_executor.run_distributed` with an MLflow tracker on a local
SQLite store and the preset's checkpoint cadence: everything the platform adds, once with the
default 2 Ray workers (DDP over gloo) and once with 1 worker holding both cores.

Steady state: tokens/s per logged window (log_every steps), median over the windows after the
first (start-up, first-touch allocations). The platform's windows come from the tracker's
`train/tokens_per_s` history; the bare loop times its windows the same way. "Aggregate" is total
tokens over total time of those same windows: unlike the median it charges the checkpoint saves.
End-to-end wall time (tokenize + build + train, plus worker spawn, final eval, final checkpoint
for the platform) is reported separately; Ray's own start is timed once, apart.
Runs alternate (bare, platform W=2, platform W=1, ...) so that background load hits all alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root
    sys.path.insert(0, str(REPO))

os.environ.setdefault("FLYWHEEL_RAY_TMP", "/tmp/fw-bench-ray")  # our own short Ray temp dir

import torch  # noqa: E402

from benchmarks.common import (Workload, bench_dir, machine, markdown_table, median,  # noqa: E402
                               prepare_workload, write_results)
from stages import checkpoint as ckpt  # noqa: E402
from stages.config import from_dict  # noqa: E402
from stages.model import build_model  # noqa: E402
from stages.pretrain import PretrainConfig  # noqa: E402
from stages.token_shards import TokenShards  # noqa: E402
from stages.train_loop import TrainConfig, lr_at  # noqa: E402

log = logging.getLogger("platform_tax")
TARGET = 0.95


OVERRIDES: dict[str, int] = {}  # --log-every / --checkpoint-every, applied to every run alike


def train_config(w: Workload, steps: int) -> TrainConfig:
    return from_dict(TrainConfig, {**w.pretrain["train"], "max_steps": steps, **OVERRIDES}, "pretrain.train.")


def window_stats(windows: list[tuple[int, float]]) -> dict[str, float]:
    """windows: (tokens, seconds) per logged window; statistics over all windows but the first."""
    steady = windows[1:]
    tps = [t / s for t, s in steady]
    return {"median_tokens_per_s": median(tps),
            "aggregate_tokens_per_s": sum(t for t, _ in steady) / sum(s for _, s in steady),
            "min_window_tokens_per_s": min(tps), "windows": len(steady)}


# -- the baseline: the loop a researcher would write


def bare_loop(w: Workload, steps: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = train_config(w, steps)
    seq_len, batch_size = int(w.pretrain["seq_len"]), int(w.pretrain["batch_size"])
    tokenizer = ckpt.load_tokenizer(w.tokenizer)
    shards = TokenShards(w.tokens)
    model = build_model(w.model, tokenizer, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    model.train()
    windows: list[tuple[int, float]] = []
    tokens, start, losses = 0, time.perf_counter(), []
    for step in range(steps):
        b = shards.batch_at(step, seq_len, batch_size, cfg.seed)
        x, y = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["targets"])
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        losses.append(loss.item())  # the platform's loop takes .item() every step too
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            windows.append((tokens, now - start))
            tokens, start = 0, now
            final_loss, losses = sum(losses) / len(losses), []  # the logged loss: the window's mean
    return {"kind": "bare", "wall_s": time.perf_counter() - t0, "final_loss": final_loss,
            **window_stats(windows)}


# -- the platform: pretrain.run under Ray Train, MLflow tracker, checkpoints


def platform_run(w: Workload, steps: int, work: Path, workers: int, tracking_uri: str, label: str,
                 settings) -> dict[str, Any]:
    from mlflow import MlflowClient

    from infra.ray_executor import RayConfig, run_distributed
    from registry.tracking import end_run, start_run

    cfg = PretrainConfig(tokens=w.tokens, tokenizer=w.tokenizer, output_dir=work, model=w.model,
                         train=train_config(w, steps), seq_len=int(w.pretrain["seq_len"]),
                         batch_size=int(w.pretrain["batch_size"]))
    tracker = start_run(tracking_uri, "bench-platform-tax", label)
    ray_cfg = RayConfig(num_workers=workers, cpus_per_worker=2.0 / workers)
    t0 = time.perf_counter()
    result = run_distributed("pretrain", cfg, tracker, ray_cfg, settings=settings)
    wall = time.perf_counter() - t0
    end_run(tracker)
    history = sorted(MlflowClient(tracking_uri).get_metric_history(tracker.run_id, "train/tokens_per_s"),
                     key=lambda m: m.step)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    windows, prev = [], 0
    for m in history:
        n = (m.step - prev) * tokens_per_step
        windows.append((n, n / m.value))
        prev = m.step
    return {"kind": f"platform_w{workers}", "workers": workers, "cpus_per_worker": ray_cfg.cpus_per_worker,
            "wall_s": wall, "final_loss": result.metrics.get("train/loss"), "run_id": tracker.run_id,
            **window_stats(windows)}


def worker_threads() -> dict[str, str]:
    """torch threads inside a plain Ray actor holding 1 and 2 CPUs, in the executor's runtime env.

    Ray sets OMP_NUM_THREADS to the actor's CPUs; torch follows it when it is first imported after
    that. Until the worker-setup hook moved to `infra.ray_setup` it imported torch first, and a 1-CPU
    actor kept 2 threads (2 workers x 2 threads oversubscribe 2 cores); `infra.ray_executor._worker`
    still calls `torch.set_num_threads(cpus_per_worker)`, for workers that import torch earlier.
    """
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            import os

            import torch
            return f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"

    out = {}
    for cpus in (1, 2):
        actor = Probe.options(num_cpus=cpus).remote()
        out[f"cpus={cpus}"] = ray.get(actor.threads.remote())
        ray.kill(actor)
    return out


# -- driver


KINDS = ("bare", "platform_w2", "platform_w1")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind]
        if rs:
            out[kind] = {k: median([r[k] for r in rs])
                         for k in ("median_tokens_per_s", "aggregate_tokens_per_s", "wall_s")}
    bare = out.get("bare")
    # Per-repeat ratios (each platform run against the bare run of the same repeat), then the median.
    for kind in KINDS[1:]:
        if kind in out and bare:
            for k in ("median_tokens_per_s", "aggregate_tokens_per_s", "wall_s"):
                pairs = [(p[k], b[k]) for p, b in zip([r for r in runs if r["kind"] == kind],
                                                     [r for r in runs if r["kind"] == "bare"])]
                out[kind][f"ratio_{k}"] = median([p / b for p, b in pairs])
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    names = {"bare": "bare PyTorch loop (1 process, 2 threads)",
             "platform_w2": "platform, 2 Ray workers x 1 CPU (DDP/gloo)",
             "platform_w1": "platform, 1 Ray worker x 2 CPUs"}
    rows = []
    for kind, s in summary.items():
        rows.append([names[kind], s["median_tokens_per_s"], s.get("ratio_median_tokens_per_s", 1.0),
                     s["aggregate_tokens_per_s"], s.get("ratio_aggregate_tokens_per_s", 1.0),
                     s["wall_s"], s.get("ratio_wall_s", 1.0)])
    return markdown_table(["run", "steady tok/s (median)", "ratio", "aggregate tok/s (incl. ckpt)", "ratio",
                           "end-to-end wall s", "ratio"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ", ".join(KINDS))
    ap.add_argument("--log-every", type=int, default=0, help="logged window length in steps (0: the preset's)")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="0: the preset's")
    ap.add_argument("--result-name", default="platform_tax", help="benchmarks/results/<name>.json")
    args = ap.parse_args(argv)
    if args.log_every:
        OVERRIDES["log_every"] = args.log_every
    if args.checkpoint_every:
        OVERRIDES["checkpoint_every"] = args.checkpoint_every
    kinds = [k for k in args.kinds.split(",") if k]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from infra.ray_executor import ensure_ray, shutdown
    from infra.settings import Settings, apply_offline_env, load_settings

    root = bench_dir("platform_tax")
    settings = Settings(home=root, repo_root=load_settings().repo_root)
    apply_offline_env(settings)
    w = prepare_workload(root / "inputs")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    runs_dir = root / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.rmtree(settings.ray_storage, ignore_errors=True)  # else Ray Train reloads an earlier run's snapshot

    t0 = time.perf_counter()
    ensure_ray(settings)
    ray_start_s = time.perf_counter() - t0
    threads = worker_threads()
    log.info("ray started in %.1f s; torch threads in Ray actors: %s", ray_start_s, threads)

    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.repeats):
            for kind in kinds:
                work = runs_dir / f"{kind}-r{r}"
                if kind == "bare":
                    res = bare_loop(w, args.steps, work)
                else:
                    res = platform_run(w, args.steps, work, int(kind[-1]), tracking_uri, work.name, settings)
                res["repeat"] = r
                runs.append(res)
                log.info("repeat %d %s: median %.0f tok/s, aggregate %.0f tok/s, wall %.1f s", r, kind,
                         res["median_tokens_per_s"], res["aggregate_tokens_per_s"], res["wall_s"])
                shutil.rmtree(work, ignore_errors=True)
                path = write_results(args.result_name, _payload(args, argv, w, ray_start_s, threads, runs))
    finally:
        shutdown()

    payload = _payload(args, argv, w, ray_start_s, threads, runs)
    path = write_results(args.result_name, payload)
    print()
    print(table(payload["summary"]))
    print(f"\nRay start (once, not in the wall times): {ray_start_s:.1f} s; torch threads in a plain Ray actor "
          f"(before the executor's cap): {threads}")
    print(f"results: {path}")
    return payload


def _payload(args, argv, w: Workload, ray_start_s: float, threads: dict, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarize(runs)
    return {"benchmark": "platform_tax", "target_ratio": TARGET,
            "command": "benchmarks/platform_tax.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": args.steps, "repeats": args.repeats, "machine": machine(),
            "ray_start_s": ray_start_s, "ray_actor_torch_threads": threads,
            "workload": {"model": w.model.__dict__, "seq_len": w.pretrain["seq_len"],
                         "batch_size": w.pretrain["batch_size"], "vocab": 4096,
                         "train": train_config(w, args.steps).__dict__},
            "summary": summary, "runs": runs}


if __name__ == "__main__":
    main()
