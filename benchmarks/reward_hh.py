"""Reward model on real preferences: the tiny preset's model trained on HH-RLHF (harmless-base, test file),
held-out pairwise accuracy with a 95 % interval.

    .venv/bin/python benchmarks/reward_hh.py [--pretrain-steps 400] [--steps 300] [--heldout 0.2]

The base is the tiny preset's model pretrained on the builtin stdlib text (cached under
`$FLYWHEEL_HOME/bench/reward_hh/`, like the other benchmarks' workloads); the reward model starts from
it and trains on the train side of the reward stage's own split by prompt, and is scored on the
held-out side. Dialogues longer than the model's context are quarantined by the stage and counted here.
Two reference points on the same held-out pairs: chance (0.5) and "the longer answer is chosen".
Nothing from the data is printed: it contains offensive text by design.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench_dir, machine, prepare_workload, write_results  # noqa: E402
from stages import pretrain, reward  # noqa: E402
from stages.config import from_dict, load_preset  # noqa: E402
from stages.eval_stats import mean_stderr  # noqa: E402
from stages.pretrain import PretrainConfig  # noqa: E402
from stages.reward import RewardConfig  # noqa: E402
from stages.tasks import hh_rlhf  # noqa: E402
from stages.train_loop import TrainConfig  # noqa: E402

HH = Path(__file__).resolve().parents[1] / hh_rlhf.DEFAULT_PATH


def longer_is_chosen(out: Path) -> tuple[float, float]:
    """Accuracy of the length heuristic on the stage's held-out pairs (ties count as wrong)."""
    pairs = {p["source"]: p for p in hh_rlhf.load(HH).pairs}
    held = [json.loads(line) for line in (out / "heldout_rewards.jsonl").read_text().splitlines()]
    hits = [float(len(pairs[h["source"]]["chosen"]) > len(pairs[h["source"]]["rejected"])) for h in held]
    return mean_stderr(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=400, help="the tiny preset's 400 by default")
    ap.add_argument("--steps", type=int, default=300, help="reward model optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not HH.exists():
        sys.exit(f"{HH} is not here: the benchmark needs ../shared/datasets/hh-rlhf")

    root = bench_dir("reward_hh")
    work = prepare_workload(root)
    preset = load_preset("tiny")["pretrain"]
    train = from_dict(TrainConfig, {**preset["train"], "max_steps": args.pretrain_steps, "progress": False,
                                    "eval_every": 0, "checkpoint_every": args.pretrain_steps}, "train.")
    base = pretrain.run(PretrainConfig(tokens=work.tokens, tokenizer=work.tokenizer, model=work.model,
                                       output_dir=root / f"pretrain-{args.pretrain_steps}", seq_len=preset["seq_len"],
                                       batch_size=preset["batch_size"], train=train))

    out = root / f"rm-s{args.steps}-b{args.batch_size}-lr{args.lr:g}-h{args.heldout:g}-seed{args.seed}"
    cfg = RewardConfig(policy=base.checkpoint, pairs=HH, output_dir=out, heldout_fraction=args.heldout,
                       batch_size=args.batch_size,
                       train=TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                                         log_every=max(1, args.steps // 10), checkpoint_every=args.steps,
                                         seed=args.seed, progress=False))
    started = time.perf_counter()
    result = reward.run(cfg)
    seconds = time.perf_counter() - started
    m = result.metrics
    acc, se = m["eval/reward/accuracy"], m["eval/reward/accuracy_stderr"]
    length_acc, length_se = longer_is_chosen(out)
    lines = sum(1 for _ in hh_rlhf.open_text(HH))
    payload = {
        "command": " ".join(["benchmarks/reward_hh.py", *sys.argv[1:]]),
        "data": {"file": str(hh_rlhf.DEFAULT_PATH), "records": lines, "quarantined": m["data/quarantined"],
                 "heldout_pairs": m["eval/reward/pairs"], "max_len": work.model.max_seq_len},
        "model": {"hidden_size": work.model.hidden_size, "layers": work.model.num_layers,
                  "pretrain_steps": args.pretrain_steps},
        "reward_model": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seconds": seconds},
        "heldout_accuracy": acc, "heldout_accuracy_ci95": [acc - 1.96 * se, acc + 1.96 * se],
        "heldout_loss": m["eval/reward/loss"], "train_loss_last": m["train/loss"],
        "longer_is_chosen_accuracy": length_acc, "longer_is_chosen_ci95": [length_acc - 1.96 * length_se,
                                                                           length_acc + 1.96 * length_se],
        "checkpoint": str(result.checkpoint), "machine": machine(),
    }
    path = write_results("reward_hh", payload)
    print(f"HH-RLHF harmless-base ({lines} records, {m['data/quarantined']:.0f} quarantined, "
          f"{m['eval/reward/pairs']:.0f} held-out pairs): tiny RM ({args.steps} steps, {seconds:.0f} s)")
    print(f"  held-out accuracy {acc:.3f}  95% CI [{acc - 1.96 * se:.3f}, {acc + 1.96 * se:.3f}]  "
          f"(held-out BT loss {m['eval/reward/loss']:.3f}; log 2 = {math.log(2):.3f})")
    print(f"  'longer answer is chosen' on the same pairs: {length_acc:.3f}  95% CI "
          f"[{length_acc - 1.96 * length_se:.3f}, {length_acc + 1.96 * length_se:.3f}];  chance 0.5")
    print(f"  results: {path}")


if __name__ == "__main__":
    main()
