"""PPO's reward and KL curves on the tiny preset: the InstructGPT recipe SFT -> reward model -> PPO.

    .venv/bin/python benchmarks/ppo_curves.py                          # builds (and caches) SFT and reward model
    .venv/bin/python benchmarks/ppo_curves.py --pretrain-steps 100 --sft-steps 100 --reward-steps 40  # a busy machine
    .venv/bin/python benchmarks/ppo_curves.py --policy DIR --dataset DIR [--reward-model DIR] [ppo.key=value ...]

Without `--policy`, the tiny preset's workload (collect, clean, tokenizer) is prepared once under
`$FLYWHEEL_HOME/bench/ppo/`, then pretraining and SFT run at the preset's sizes, and a reward model is
trained on synthetic arithmetic pairs (right answer chosen, wrong one rejected); every step is cached.
PPO then runs with the preset's `ppo:` section (or RECOMMENDED below while the preset has none), with
`reward=model` unless overridden. Per rollout it prints the score (reward model), the reward after
the KL penalty, the KL to the reference, the KL coefficient and the verifier's accuracy; the curves
land in `<run>/ppo_curves.png` and benchmarks/results/ppo_curves.png, the numbers in
benchmarks/results/ppo_curves.json. Measures; never asserts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, bench_dir, machine, markdown_table, prepare_workload, write_results  # noqa: E402
from stages import ppo, pretrain, reward, sft  # noqa: E402
from stages import checkpoint as ckpt  # noqa: E402
from stages.config import deep_merge, from_dict, load_preset, parse_overrides  # noqa: E402
from stages.tracking import RecordingTracker  # noqa: E402

# The `ppo:` values recommended for the tiny preset (the lead owns the preset file).
RECOMMENDED = {
    "reward": "model", "prompts_per_rollout": 32, "max_new_tokens": 20, "ppo_epochs": 2, "minibatches": 2,
    "kl_coef": 0.05, "target_kl": 1.0, "kl_horizon": 1000,
    "train": {"max_steps": 40, "lr": 3e-5, "warmup_steps": 0, "log_every": 4, "checkpoint_every": 20},
}
REWARD_DEFAULT = {"train": {"max_steps": 100, "lr": 1e-4, "warmup_steps": 5, "log_every": 20, "checkpoint_every": 100}}


def build_policy_and_reward_model(root: Path, preset: dict, steps: dict[str, int | None]) -> tuple[Path, Path, Path]:
    """(dataset, SFT checkpoint, reward model) at the preset's sizes, each stage cached in `root` (a folder
    per step count, so a shortened build never passes for the preset's)."""
    w = prepare_workload(root / "workload")
    for stage, n in steps.items():
        if n:
            preset = deep_merge(preset, {stage: {"train": {"max_steps": n, "checkpoint_every": n}}})
    root = root / "-".join(f"{s}{preset.get(s, REWARD_DEFAULT)['train']['max_steps']}" for s in steps)
    quiet = {"train": {"progress": False}}
    pre = pretrain.run(from_dict(pretrain.PretrainConfig, deep_merge(
        {**preset["pretrain"], "model": preset["model"]}, {"tokens": str(w.tokens), "tokenizer": str(w.tokenizer),
                                                           "output_dir": str(root / "pretrain"), **quiet})))
    tuned = sft.run(from_dict(sft.SFTConfig, deep_merge(preset["sft"], {
        "dataset": str(w.dataset), "policy": str(pre.checkpoint), "output_dir": str(root / "sft"), **quiet})))
    rm = reward.run(from_dict(reward.RewardConfig, deep_merge(preset.get("reward", REWARD_DEFAULT), {
        "dataset": str(w.dataset), "policy": str(tuned.checkpoint), "output_dir": str(root / "reward"), **quiet})))
    print(f"reward model: held-out accuracy {rm.metrics.get('eval/reward/accuracy', float('nan')):.3f}")
    return w.dataset, tuned.checkpoint, rm.checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, help="SFT checkpoint (default: build one at the tiny preset's sizes)")
    ap.add_argument("--dataset", type=Path, help="the dataset with the arithmetic problems (with --policy)")
    ap.add_argument("--reward-model", type=Path, help="reward model checkpoint (with --policy)")
    ap.add_argument("--output-dir", type=Path, help="PPO run folder (default: a new one under the bench folder)")
    for stage in ("pretrain", "sft", "reward"):
        ap.add_argument(f"--{stage}-steps", type=int, help=f"{stage} steps when building (default: the preset's)")
    ap.add_argument("overrides", nargs="*", help="ppo.key=value (or key=value) overrides of the PPO config")
    args = ap.parse_args()
    root = bench_dir("ppo")
    preset = load_preset("tiny")
    if args.policy is None:
        steps = {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "reward": args.reward_steps}
        dataset, policy, reward_model = build_policy_and_reward_model(root, preset, steps)
    else:
        if args.dataset is None:
            ap.error("--policy needs --dataset")
        dataset, policy, reward_model = args.dataset, args.policy, args.reward_model
    out = args.output_dir or root / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = parse_overrides([o.removeprefix("ppo.") for o in args.overrides])
    section = deep_merge(preset.get("ppo", RECOMMENDED), overrides)
    if reward_model is None and section.get("reward", "model") != "verifier":
        section["reward"] = "verifier"
    cfg = from_dict(ppo.PPOConfig, deep_merge(section, {
        "policy": str(policy), "dataset": str(dataset), "output_dir": str(out),
        "reward_model": str(reward_model) if reward_model else None, "train": {"progress": False}}))

    tracker = RecordingTracker()
    started = time.perf_counter()
    result = ppo.run(cfg, tracker=tracker)
    seconds = time.perf_counter() - started

    every = cfg.train.log_every
    keys = ("rl/score_mean", "rl/reward_mean", "rl/kl", "rl/kl_coef", "rl/accuracy", "rl/response_length",
            "rl/clip_fraction", "ppo/explained_variance")
    rows = [{"step": s, **{k: m[k] for k in keys if k in m}} for s, m in tracker.metrics if "rl/kl" in m]
    print(f"PPO on the tiny preset: {cfg.train.max_steps} steps, {cfg.steps_per_rollout} per rollout of "
          f"{cfg.prompts_per_rollout} answers (log window {every} steps), reward={cfg.reward}, {seconds:.0f} s")
    print(markdown_table(["step", *keys], [[r["step"], *(r.get(k, float("nan")) for k in keys)] for r in rows]))
    png = cfg.output_dir / "ppo_curves.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if png.exists():
        shutil.copyfile(png, RESULTS_DIR / "ppo_curves.png")
    path = write_results("ppo_curves", {
        "machine": machine(), "seconds": seconds, "config": ckpt.read_meta(result.checkpoint)["config"],
        "policy": str(policy), "reward_model": str(reward_model) if reward_model else None, "history": rows,
        "alarms": result.alarms, "final": result.metrics})
    print(f"curves: {png}  numbers: {path}")


if __name__ == "__main__":
    main()
