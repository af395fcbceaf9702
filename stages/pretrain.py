"""Pretrain a Llama-architecture model from scratch on the cleaned dataset (next-token prediction).

    flywheel stage pretrain dataset=data/clean tokenizer=<dir> output_dir=/tmp/pt train.max_steps=50

Documents are tokenized once (cached under output_dir/tokens), joined with the document separator
and cut into fixed windows at seeded random offsets: sequence packing with no padding waste. A small
held-out split (by record id) gives perplexity, and a unigram model fitted on the training tokens
gives the baseline that perplexity must beat. Runs alone or as one rank of a DDP group (Ray Train).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages import checkpoint as ckpt
from stages import planner
from stages.config import to_dict
from stages.dataset import is_heldout, read_dataset, write_atomically
from stages.model import ModelConfig, active_parameters, build_model, count_parameters, loss_parts
from stages.plots import plot_curves
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, dist_info, train

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    dataset: Path
    tokenizer: Path  # directory with the trained tokenizer
    output_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200, lr=3e-3))
    seq_len: int = 128
    batch_size: int = 16  # sequences per optimizer step, across all ranks
    heldout_fraction: float = 0.02
    eval_windows: int = 64
    lineage: dict = field(default_factory=dict)  # data versions, parent runs: copied into meta.json

    def __post_init__(self) -> None:
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    metrics: dict[str, float]


def token_stream(texts: list[str], tokenizer) -> np.ndarray:
    """Documents tokenized and joined, each followed by the bos token (the document separator)."""
    sep = tokenizer.bos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in (*doc, sep)), dtype=np.int32)


def heldout_texts(dataset: Path, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) texts, split by record id."""
    df = read_dataset(dataset)
    held = df["id"].map(lambda rid: is_heldout(rid, heldout_fraction))
    return df.loc[~held, "text"].tolist(), df.loc[held, "text"].tolist()


def tokenize_corpus(dataset: Path, tokenizer, heldout_fraction: float, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token streams; cached as .npy so retries and other ranks skip the work."""
    files = cache / "train.npy", cache / "heldout.npy"
    if not all(f.exists() for f in files):
        for path, texts in zip(files, heldout_texts(dataset, heldout_fraction), strict=True):
            stream = token_stream(texts, tokenizer)
            write_atomically(path, lambda tmp, stream=stream: np.save(tmp, stream))
    return np.load(files[0]), np.load(files[1])


def unigram_perplexity(train_tokens: np.ndarray, heldout_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model: the floor any language model must beat."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[heldout_tokens].mean()))


def windows_at(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """`batch_size` windows at offsets that depend only on (seed, step): resumable sampling."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over positions whose label is not -100 (SFT masks prompts)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    return out.loss, loss_parts(model, out)  # MoE: train/aux_loss and train/lm_loss beside the total


def heldout_perplexity(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, max_windows: int,
                       batch_size: int = 16) -> float:
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n == 0:
        return float("nan")
    device = next(model.parameters()).device
    windows = torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len).astype(np.int64))
    total, count = 0.0, 0
    for lo in range(0, n, batch_size):
        x = windows[lo : lo + batch_size].to(device)
        out = model(input_ids=x, labels=x)
        # An MoE model's loss includes the router's balance term: perplexity is the LM part alone.
        loss = loss_parts(model, out).get("train/lm_loss", out.loss.item())
        total += loss * x.shape[0]
        count += x.shape[0]
    return math.exp(total / count)


def run(cfg: PretrainConfig, tracker: Tracker | None = None) -> PretrainResult:
    tracker = tracker or NullTracker()
    rank, world = dist_info()
    tokenizer = ckpt.load_tokenizer(cfg.tokenizer)
    cache = Path(cfg.output_dir) / "tokens"
    if rank == 0:  # one rank tokenizes, the others read the cache
        tokenize_corpus(cfg.dataset, tokenizer, cfg.heldout_fraction, cache)
    if world > 1:
        dist.barrier()
    train_tokens, heldout_tokens = tokenize_corpus(cfg.dataset, tokenizer, cfg.heldout_fraction, cache)
    if len(train_tokens) <= cfg.seq_len:
        raise ValueError(f"{cfg.dataset}: only {len(train_tokens)} training tokens, fewer than seq_len={cfg.seq_len}")

    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    n_params = count_parameters(model)
    # 6N per token for the dense matmuls plus the attention score/value products (the planner's count).
    # Active parameters: an MoE token passes through experts_per_token experts, not all of them.
    flops_per_token = planner.flops_per_token(active_parameters(model), cfg.model.num_layers, cfg.model.hidden_size, cfg.seq_len)
    if rank == 0:
        tracker.log_params({"stage": "pretrain", **to_dict(cfg), "model/parameters": n_params,
                            "model/active_parameters": active_parameters(model),
                            "data/train_tokens": len(train_tokens), "world_size": world})
        log.info("pretrain: %s parameters, %s training tokens, %d rank(s)", f"{n_params:,}",
                 f"{len(train_tokens):,}", world)

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        x = windows_at(train_tokens, cfg.seq_len, cfg.batch_size, cfg.train.seed, step)
        return {"input_ids": x, "labels": x}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"eval/heldout/perplexity": heldout_perplexity(m, heldout_tokens, cfg.seq_len, cfg.eval_windows)}

    meta = {"stage": "pretrain", "config": to_dict(cfg), "lineage": cfg.lineage, "parent": None}
    result = train(model, tokenizer, cfg=cfg.train, batch_at=batch_at, loss_fn=lm_loss,
                   output_dir=cfg.output_dir, meta=meta, evaluate=evaluate, tracker=tracker,
                   desc="pretrain", flops_per_token=flops_per_token)
    metrics = {**result.metrics,
               "eval/heldout/unigram_perplexity": unigram_perplexity(train_tokens, heldout_tokens, len(tokenizer))}
    if rank == 0:
        tracker.log_metrics({"eval/heldout/unigram_perplexity": metrics["eval/heldout/unigram_perplexity"]})
        plot = plot_curves(result.history, Path(cfg.output_dir) / "pretrain_curves.png", "pretraining",
                           ["train/loss", "eval/heldout/perplexity", "train/tokens_per_s"])
        if plot:
            tracker.log_artifact(plot)
    return PretrainResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=metrics)
