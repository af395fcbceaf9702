"""Evaluate a checkpoint: held-out perplexity, arithmetic accuracy and format rate.

    flywheel stage evaluate checkpoint=<dir> dataset=data/clean output_dir=/tmp/eval

Perplexity uses the same held-out split (by record id) as pretraining, so numbers are comparable
along the lineage. Arithmetic is the test split, answered greedily: exact match of <answer>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.config import to_dict
from stages.dataset import write_atomically
from stages.pretrain import heldout_perplexity, heldout_texts, token_stream
from stages.rewards import correctness, well_formatted
from stages.rollout import sample
from stages.tracking import NullTracker, Tracker
from stages.train_loop import pick_device


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    checkpoint: Path
    dataset: Path
    output_dir: Path
    heldout_fraction: float = 0.02  # must match pretraining's
    seq_len: int = 128
    perplexity_windows: int = 64
    arithmetic_problems: int = 200  # from the test split (0: skip)
    max_new_tokens: int = 24
    batch_size: int = 50


@dataclass(frozen=True)
class EvaluateResult:
    report: Path
    metrics: dict[str, float]


@torch.no_grad()
def arithmetic_scores(model, tokenizer, dataset: Path, n: int, max_new_tokens: int, batch_size: int
                      ) -> tuple[dict[str, float], list[dict]]:
    problems = load_problems(dataset, "test")[:n]
    rows = []
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo : lo + batch_size]
        out = sample(model, tokenizer, [prompt_text(tokenizer, p.question) for p in chunk], n=1,
                     max_new_tokens=max_new_tokens, temperature=0.0)
        answers = [p.answer for p in chunk]
        for p, text, ok, fmt in zip(chunk, out.texts, correctness(out.texts, answers=answers),
                                    well_formatted(out.texts), strict=True):
            rows.append({"question": p.question, "answer": p.answer, "completion": text, "correct": ok, "formatted": fmt})
    accuracy = sum(r["correct"] for r in rows) / max(1, len(rows))
    format_rate = sum(r["formatted"] for r in rows) / max(1, len(rows))
    return {"eval/arithmetic/accuracy": accuracy, "eval/arithmetic/format_rate": format_rate,
            "eval/arithmetic/n": float(len(rows))}, rows


def run(cfg: EvaluateConfig, tracker: Tracker | None = None) -> EvaluateResult:
    tracker = tracker or NullTracker()
    device = pick_device()
    model = ckpt.load_model(cfg.checkpoint, device).eval()
    tokenizer = ckpt.load_tokenizer(cfg.checkpoint)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    heldout = token_stream(heldout_texts(cfg.dataset, cfg.heldout_fraction)[1], tokenizer)
    with torch.no_grad():
        metrics = {"eval/heldout/perplexity": heldout_perplexity(model, heldout, cfg.seq_len, cfg.perplexity_windows)}
    samples: list[dict] = []
    if cfg.arithmetic_problems:
        scores, samples = arithmetic_scores(model, tokenizer, cfg.dataset, cfg.arithmetic_problems,
                                            cfg.max_new_tokens, cfg.batch_size)
        metrics |= scores

    report = write_atomically(out / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(
        {"checkpoint": str(cfg.checkpoint), "config": to_dict(cfg), "metrics": metrics, "samples": samples[:50]},
        indent=2)))
    tracker.log_metrics(metrics)
    tracker.log_artifact(report)
    return EvaluateResult(report=report, metrics=metrics)
