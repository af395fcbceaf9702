"""Evaluation wall time per task on one checkpoint (the gate's input; it runs twice per promotion).

    .venv/bin/python benchmarks/evaluation.py --checkpoint .flywheel/champion/flywheel-chat/hf_model \
        --dataset data/clean --repeats 3

Every task of `stages.evaluate` at the sizes the tiny preset and a user would use: held-out
perplexity (64 windows), arithmetic greedy exact match (400 problems), pass@k (8 samples at two
temperatures on 100 problems), arithmetic multiple choice (400), GSM8K (100 problems of
`../shared/datasets/gsm8k/train.jsonl`, when present) and the shipped lm-eval harness task. Each task
runs alone, `--repeats` times, alternating; the table reports medians and items/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, markdown_table, median, write_results  # noqa: E402
from stages import evaluate  # noqa: E402
from stages.evaluate import EvaluateConfig  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "gsm8k" / "train.jsonl"


def task_configs() -> dict[str, dict]:
    configs = {
        "heldout": {"tasks": ("heldout",), "perplexity_windows": 64},
        "arithmetic": {"tasks": ("arithmetic",), "arithmetic_problems": 400},
        "arithmetic pass@k": {"tasks": ("arithmetic",), "arithmetic_problems": 100, "passk_samples": 8,
                              "passk_k": (1, 4), "passk_temperatures": (0.7, 1.0)},
        "arithmetic_mc": {"tasks": ("arithmetic_mc",), "arithmetic_problems": 400},
        "harness (flywheel_arithmetic)": {"tasks": ("heldout",), "perplexity_windows": 1,
                                          "harness_tasks": ("flywheel_arithmetic",)},
    }
    if GSM8K.is_file():
        configs["gsm8k"] = {"tasks": ("gsm8k",), "gsm8k_files": (GSM8K,), "limit": 100, "gsm8k_max_new_tokens": 128}
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True, help="the cleaned dataset the checkpoint was trained on")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    runs = []
    configs = task_configs()
    for r in range(args.repeats):
        for label, overrides in configs.items():
            with tempfile.TemporaryDirectory() as out:
                cfg = EvaluateConfig(checkpoint=args.checkpoint, dataset=args.dataset, output_dir=Path(out),
                                     progress=False, **overrides)
                t0 = time.perf_counter()
                result = evaluate.run(cfg)
                wall = time.perf_counter() - t0
                report = json.loads(result.report.read_text())
            items = sum(report.get("items", {}).values()) if isinstance(report.get("items"), dict) else 0
            runs.append({"task": label, "repeat": r, "wall_s": wall, "task_s": report.get("timings_s", {}),
                         "items": items})
            print(f"{label:32s} {wall:7.1f} s  ({items} items)", flush=True)

    rows = []
    for label in configs:
        xs = [x for x in runs if x["task"] == label]
        wall = median([x["wall_s"] for x in xs])
        rows.append([label, wall, xs[0]["items"], xs[0]["items"] / wall if wall else float("nan")])
    table = markdown_table(["task", "wall s (median)", "scored items", "items/s"], rows)
    print(table)
    write_results("evaluation", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                 "runs": runs, "table": table})


if __name__ == "__main__":
    main()
