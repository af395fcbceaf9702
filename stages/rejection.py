"""Rejection sampling (DeepSeek-R1's step between RL rounds): the policy's best answers become SFT data.

    flywheel stage rejection policy=<grpo checkpoint> dataset=data/clean output_dir=/tmp/rs n=8 scorer=verifier
    flywheel stage rejection policy=<ckpt> dataset=data/clean output_dir=/tmp/rs scorer=reward_model reward_model=<rm>

For each arithmetic problem of the train split, sample `n` answers, score each by the verifier
(stages.rewards: the right number in <answer>, plus `format_weight` for the format) or by a reward model
(stages.reward.score), and keep the best one per prompt (the first of equal scores), only if it reaches
`min_score` when that is set. An empty answer is never kept. The kept answers are written as
`<output_dir>/sft.jsonl` in the SFT stage's messages format:

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task_type": "closed_qa", "score": ...}

so `flywheel stage sft messages=<output_dir>/sft.jsonl ...` trains on them. Beside it: `samples.jsonl`
(every sample, its score, whether it was kept), `report.json` (kept share, score distributions) and
`scores.png`. The verifier's correctness is measured under either scorer, so a reward model's choice
is checked against the truth (`rejection/accuracy`: share of prompts whose kept answer is right).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.config import to_dict
from stages.dataset import write_atomically, write_jsonl
from stages.reward import load_reward_model, plot_histograms, score
from stages.rewards import combined, correctness
from stages.rollout import sample
from stages.tracking import NullTracker, Tracker
from stages.train_loop import pick_device

log = logging.getLogger(__name__)

SCORERS = ("verifier", "reward_model")
SFT_FILE, SAMPLES_FILE, REPORT_FILE = "sft.jsonl", "samples.jsonl", "report.json"


@dataclass(frozen=True, kw_only=True)
class RejectionConfig:
    policy: Path  # checkpoint that samples the answers
    dataset: Path  # arithmetic problems (train split): the prompts and the verifier's answers
    output_dir: Path
    n: int = 8  # samples per prompt
    scorer: str = "verifier"  # verifier | reward_model
    reward_model: Path | None = None  # reward checkpoint (stages.reward) when scorer=reward_model
    min_score: float | None = None  # keep a prompt's best answer only if it scores at least this
    max_prompts: int = 0  # 0: every problem of the train split; else a seeded sample of this many
    max_new_tokens: int = 24
    temperature: float = 1.0
    format_weight: float = 0.1  # the verifier's bonus for <think>...</think> <answer>...</answer>
    prompts_per_batch: int = 16  # prompts sampled together (each n times)
    seed: int = 0
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"rejection.scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.scorer == "reward_model" and self.reward_model is None:
            raise ValueError("rejection.reward_model: set a reward checkpoint directory for scorer=reward_model")
        if self.n < 1 or self.prompts_per_batch < 1 or self.max_new_tokens < 1 or self.max_prompts < 0:
            raise ValueError("rejection.n, rejection.prompts_per_batch and rejection.max_new_tokens must be >= 1, "
                             "rejection.max_prompts >= 0")
        if self.n > 1 and self.temperature <= 0:
            raise ValueError(f"rejection.temperature={self.temperature}: greedy decoding gives {self.n} identical "
                             f"samples; sample at a temperature > 0 or set n=1")


@dataclass(frozen=True)
class RejectionResult:
    dataset: Path  # the SFT file (sft.jsonl)
    report: Path
    metrics: dict[str, float]


def best_of_group(scores: list[float], eligible: list[bool]) -> int | None:
    """Index of the highest-scoring eligible sample (the first of equals), or None when none is eligible.

    >>> best_of_group([0.1, 1.1, 1.1, 0.0], [True, True, True, True])
    1
    >>> best_of_group([0.1, 1.1], [True, False]), best_of_group([1.0], [False])
    (0, None)
    """
    candidates = [i for i, ok in enumerate(eligible) if ok]
    return max(candidates, key=lambda i: (scores[i], -i)) if candidates else None


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"count": len(values), "mean": float(np.mean(values)), "min": float(q[0]), "p25": float(q[1]),
            "median": float(q[2]), "p75": float(q[3]), "max": float(q[4])}


def _finished(cfg: RejectionConfig) -> RejectionResult | None:
    """A rerun with the same config returns the written dataset as it is (a Prefect retry samples nothing)."""
    report = Path(cfg.output_dir) / REPORT_FILE
    if not report.exists():
        return None
    saved = json.loads(report.read_text())
    if saved.get("config") != to_dict(cfg):
        raise ValueError(f"{report} was written by another rejection config: use a new output_dir")
    return RejectionResult(dataset=Path(cfg.output_dir) / SFT_FILE, report=report, metrics=saved["metrics"])


def run(cfg: RejectionConfig, tracker: Tracker | None = None) -> RejectionResult:
    tracker = tracker or NullTracker()
    done = _finished(cfg)
    if done is not None:
        log.info("rejection: %s is already complete; returned as it is", done.dataset)
        return done
    out = Path(cfg.output_dir)
    device = pick_device()
    tokenizer = ckpt.load_tokenizer(cfg.policy)
    model = ckpt.load_model(cfg.policy, device)
    # Scoring is by text (the reward model renders prompt and answer with its own tokenizer and chat
    # template), so a reward model with another tokenizer than the policy's still scores correctly here.
    scorer = load_reward_model(cfg.reward_model, device) if cfg.scorer == "reward_model" else None
    problems = load_problems(cfg.dataset, "train")
    if cfg.max_prompts and cfg.max_prompts < len(problems):
        picked = np.random.default_rng(cfg.seed).choice(len(problems), size=cfg.max_prompts, replace=False)
        problems = [problems[i] for i in sorted(picked)]
    tracker.log_params({"stage": "rejection", **to_dict(cfg), "data/prompts": len(problems)})

    samples, kept = [], []
    for batch_index, lo in enumerate(range(0, len(problems), cfg.prompts_per_batch)):
        batch = problems[lo:lo + cfg.prompts_per_batch]
        drawn = sample(model, tokenizer, [prompt_text(tokenizer, p.question) for p in batch], n=cfg.n,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       seed=cfg.seed * 1_000_003 + batch_index)
        answers = [p.answer for p in batch for _ in range(cfg.n)]
        right = correctness(drawn.texts, answers=answers)
        if scorer is None:
            scores = combined(drawn.texts, answers=answers, format_weight=cfg.format_weight)
        else:
            scores = score(*scorer, [p.question for p in batch for _ in range(cfg.n)], drawn.texts)
        for j, problem in enumerate(batch):
            group = range(j * cfg.n, (j + 1) * cfg.n)
            texts, group_scores = [drawn.texts[i] for i in group], [scores[i] for i in group]
            best = best_of_group(group_scores, [bool(t.strip()) for t in texts])
            keep = best is not None and (cfg.min_score is None or group_scores[best] >= cfg.min_score)
            prompt_index = lo + j
            for k, i in enumerate(group):
                samples.append({"prompt_index": prompt_index, "prompt": problem.question, "answer": problem.answer,
                                "sample": k, "completion": texts[k], "score": group_scores[k], "correct": right[i],
                                "kept": keep and k == best})
            if keep:
                kept.append({"messages": [{"role": "user", "content": problem.question},
                                          {"role": "assistant", "content": texts[best]}],
                             "task_type": "closed_qa", "score": group_scores[best],
                             "_correct": right[group[best]]})

    best_scores = [r["score"] for r in kept]
    all_scores = [s["score"] for s in samples]
    metrics = {
        "rejection/kept_fraction": len(kept) / len(problems),
        # What best-of-n reaches per prompt, whether or not min_score then keeps it.
        "rejection/best_score_mean": float(np.mean([max(all_scores[i:i + cfg.n])
                                                    for i in range(0, len(all_scores), cfg.n)])),
        "rejection/sample_score_mean": float(np.mean(all_scores)),
        # A prompt whose best answer was not kept counts as not right: the dataset does not hold it.
        "rejection/accuracy": sum(r["_correct"] for r in kept) / len(problems),
        "rejection/sample_accuracy": float(np.mean([s["correct"] for s in samples])),
        "rejection/kept": float(len(kept)),
    }
    if not kept:
        log.warning("rejection: no prompt kept an answer (min_score=%s): %s is empty", cfg.min_score, out / SFT_FILE)
    write_jsonl(samples, out / SAMPLES_FILE)
    write_jsonl([{k: v for k, v in r.items() if not k.startswith("_")} for r in kept], out / SFT_FILE)
    plot = plot_histograms({"all samples": all_scores, "kept (best of n)": best_scores}, out / "scores.png",
                           f"rejection sampling, n={cfg.n}, scorer={cfg.scorer}", "score")
    report = {"config": to_dict(cfg), "metrics": metrics, "prompts": len(problems), "samples": len(samples),
              "kept": len(kept), "empty_samples": sum(not s["completion"].strip() for s in samples),
              "kept_score": distribution(best_scores), "sample_score": distribution(all_scores),
              "lineage": cfg.lineage, "parent": str(cfg.policy), "parent_meta": ckpt.parent_summary(cfg.policy),
              "git_commit": ckpt.git_commit()}
    # The report is written last: its presence is what marks the stage as finished.
    write_atomically(out / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str)))
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(plot)
    tracker.log_artifact(out / REPORT_FILE)
    return RejectionResult(dataset=out / SFT_FILE, report=out / REPORT_FILE, metrics=metrics)
