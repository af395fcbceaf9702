"""`make run`'s lifecycle, timed per phase, with the share spent outside the stages, and what it learned.

    .venv/bin/python benchmarks/lifecycle.py [--preset tiny] [--home /tmp/flywheel-bench] [override ...]
    .venv/bin/python benchmarks/lifecycle.py --collect --home .flywheel      # read back a `make run`

Runs `flywheel run` in a fresh state root (its own Prefect and MLflow servers, its own Ray), then
reads the lifecycle's MLflow runs back:
- per phase wall time (the parent run's `time/<phase>_s`),
- time inside stages (each child run's `time/seconds`, measured around the stage's `run()`),
- orchestration/tracking/versioning share = 1 - stage time / lifecycle time (Ray start-up, Prefect
  and MLflow calls, DVC add/push, registration all count as overhead),
- learning: held-out perplexity after pretraining vs the unigram baseline, arithmetic accuracy and
  format rate after each stage.
Results go to benchmarks/results/lifecycle-<preset>.json and are printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--collect", action="store_true",
                    help="do not run: read the newest lifecycle from the servers of --home (e.g. after `make run`)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.collect:
        mlflow_uri = json.loads((args.home / "services" / "mlflow.json").read_text())["url"]
        report(collect(MlflowClient(mlflow_uri), wall=None), args.preset)
        return
    home = args.home or Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    flywheel = str(Path(sys.executable).parent / "flywheel")

    started = time.perf_counter()
    subprocess.run([flywheel, "run", "--preset", args.preset, *args.overrides], env=env, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    try:
        mlflow_uri = json.loads((home / "services" / "mlflow.json").read_text())["url"]
        result = collect(MlflowClient(mlflow_uri), wall)
    finally:
        subprocess.run([flywheel, "services", "down"], env=env, check=False, cwd=ROOT)
    report(result, args.preset)


def report(result: dict, preset: str) -> None:
    out = ROOT / "benchmarks" / "results" / f"lifecycle-{preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


def collect(client: MlflowClient, wall: float | None) -> dict:
    exp = client.get_experiment_by_name("flywheel")
    parent = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` LIKE 'lifecycle-%'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    m = parent.data.metrics
    phases = {k.removeprefix("time/").removesuffix("_s"): v for k, v in m.items() if k.startswith("time/")}
    stage_seconds = {c.data.tags.get("mlflow.runName"): c.data.metrics.get("time/seconds", 0.0) for c in children}
    lifecycle_s = sum(phases.values())
    inside = sum(stage_seconds.values())
    pretrain = next(c for c in children if c.data.tags.get("mlflow.runName") == "pretrain").data.metrics
    learning = {stage: {k: m.get(f"{k}/{stage}") for k in
                        ("eval/heldout/perplexity", "eval/arithmetic/accuracy", "eval/arithmetic/format_rate")}
                for stage in ("pretrain", "sft", "dpo", "grpo")}
    return {"command_wall_s": wall if wall is not None else float("nan"), "lifecycle_s": lifecycle_s, "phases_s": phases, "stages_s": stage_seconds,
            "inside_stages_s": inside, "overhead_share": 1 - inside / lifecycle_s,
            "unigram_perplexity": pretrain.get("eval/heldout/unigram_perplexity"),
            "pretrain_tokens_per_s": pretrain.get("train/tokens_per_s"), "learning": learning}


def markdown(r: dict) -> str:
    lines = ["| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["phases_s"].items()]
    lines += [f"| **lifecycle** | **{r['lifecycle_s']:.1f}** |", f"| whole command (install excluded, services start included) | {r['command_wall_s']:.1f} |",
              "", f"Inside stages: {r['inside_stages_s']:.1f} s; orchestration/tracking/versioning share: "
              f"**{100 * r['overhead_share']:.1f} %**", "",
              "| checkpoint | held-out perplexity | arithmetic accuracy | format rate |", "|---|---|---|---|"]
    for stage, v in r["learning"].items():
        lines.append(f"| {stage} | {v['eval/heldout/perplexity']:.1f} | {v['eval/arithmetic/accuracy']:.3f} | "
                     f"{v['eval/arithmetic/format_rate']:.3f} |")
    lines.append(f"| unigram baseline | {r['unigram_perplexity']:.1f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
