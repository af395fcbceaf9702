"""Pretrain a Llama-architecture model from scratch on token shards (next-token prediction).

    flywheel stage tokenize dataset=data/clean tokenizer=<dir> output_dir=/tmp/tok-shards
    flywheel stage pretrain tokens=/tmp/tok-shards tokenizer=<dir> output_dir=/tmp/pt train.max_steps=50

The `tokenize` stage writes the shards once (`stages.tokenize`); this stage only reads them through
`stages.token_shards.TokenShards`. The training split gives the batches: packed windows of
`seq_len + 1` tokens, documents back to back, the step's global batch a pure function of
`(train.seed, step)`, so a resumed run reads exactly the batches an uninterrupted one would, and
every DDP rank builds the same global batch and takes its rows of it (`stages.train_loop`). The
held-out split (by record id, cut by the tokenize stage) gives perplexity, and a unigram model of
the training split's token counts gives the baseline that perplexity must beat. Runs alone or as
one rank of a DDP group (Ray Train).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import checkpoint as ckpt
from stages import planner
from stages.config import to_dict
from stages.model import ModelConfig, active_parameters, build_model, count_parameters, loss_parts
from stages.plots import plot_curves
from stages.token_shards import TokenShards
from stages.tokenize import separator_id, tokenizer_hash
from stages.tracking import NullTracker, Tracker
from stages.train_loop import TrainConfig, dist_info, train

log = logging.getLogger(__name__)
COUNT_CHUNK = 1 << 24  # held-out tokens counted per read: bounded memory on a large split


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    tokens: Path  # a tokenize stage's output (or its tokens/ folder, or a DVC version of it)
    tokenizer: Path  # the tokenizer the shards were made with (checked by hash): saved with every checkpoint
    output_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200, lr=3e-3))
    seq_len: int = 128
    batch_size: int = 16  # sequences per optimizer step, across all ranks
    eval_windows: int = 64
    lineage: dict = field(default_factory=dict)  # data versions, parent runs: copied into meta.json

    def __post_init__(self) -> None:
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    metrics: dict[str, float]


def open_shards(cfg: PretrainConfig) -> tuple[TokenShards, TokenShards]:
    """(train, held-out) splits of `cfg.tokens`, refused if another tokenizer made them."""
    train_split, heldout = TokenShards(cfg.tokens, "train"), TokenShards(cfg.tokens, "heldout")
    if tokenizer_hash(cfg.tokenizer) != train_split.tokenizer_hash:
        # Ids of one vocabulary read by a model of another train without error and learn nothing.
        raise ValueError(f"{train_split.root} was tokenized by another tokenizer than {cfg.tokenizer} "
                         f"(hash {train_split.tokenizer_hash}, not {tokenizer_hash(cfg.tokenizer)}): "
                         f"re-run the tokenize stage with tokenizer={cfg.tokenizer}")
    if train_split.windows_per_epoch(cfg.seq_len) == 0:
        raise ValueError(f"{train_split.root}: only {len(train_split)} training tokens, fewer than "
                         f"seq_len+1={cfg.seq_len + 1}")
    return train_split, heldout


ROUND_TRIP_TOKENS = 1024  # tokens of whole documents the tokenizer check re-encodes (a few ms)
ROUND_TRIP_MAX_DOC = 4096  # longer documents are skipped: the check stays cheap on any corpus
ROUND_TRIP_DOCS = 1000  # documents looked at, at most


def check_tokenizer(shards: TokenShards, tokenizer_dir: Path, tokenizer=None) -> None:
    """Refuse token shards made by another tokenizer than the one a checkpoint (`tokenizer_dir`) carries.

    Ids of one vocabulary read by a model of another train (or score) without error and mean nothing.
    The files' hash decides first, as for pretraining (`open_shards`, which reads the tokenizer folder
    the shards were made with and accepts nothing else). A checkpoint carries its tokenizer re-saved
    (save_pretrained adds keys to tokenizer_config.json, so that hash differs): then the vocabulary
    size and document separator must match, and the split's first documents (about ROUND_TRIP_TOKENS
    tokens), decoded, must re-encode to exactly their ids. Ids of other merges decode to text this
    tokenizer splits differently; a short document can survive that by chance, a thousand tokens do not.
    """
    if tokenizer_hash(tokenizer_dir) == shards.tokenizer_hash:
        return
    tokenizer = tokenizer if tokenizer is not None else ckpt.load_tokenizer(tokenizer_dir)
    why = ""
    if len(tokenizer) != shards.vocab_size or separator_id(tokenizer) != shards.separator_id:
        why = (f"vocabulary {len(tokenizer)} and separator {separator_id(tokenizer)}, not "
               f"{shards.vocab_size} and {shards.separator_id}")
    starts = shards.doc_starts[:ROUND_TRIP_DOCS + 1].tolist()
    ends = [*starts[1:], len(shards)][:ROUND_TRIP_DOCS]
    checked = 0
    for k, (lo, hi) in enumerate(zip(starts, ends)):
        if why or checked >= ROUND_TRIP_TOKENS:
            break
        if hi - lo > ROUND_TRIP_MAX_DOC:
            continue
        ids = shards.read(lo, hi - 1).tolist()  # without its separator
        if tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] != ids:
            why = f"document {k} of the {shards.split} split does not re-encode to its ids"
        checked += len(ids)
    if why:
        raise ValueError(f"{shards.root} was tokenized by another tokenizer than {tokenizer_dir}'s ({why}; "
                         f"hash {shards.tokenizer_hash}, not {tokenizer_hash(tokenizer_dir)}): "
                         f"re-run the tokenize stage with tokenizer={tokenizer_dir}")


def shard_batch(shards: TokenShards, step: int, seq_len: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The global batch of `step`: inputs and their next tokens (already shifted: `targets`).

    Packed documents attend across their boundaries (segment and position ids are not used): the
    unmasked causal path keeps SDPA on its flash kernel (a per-document mask forces the slower
    masked kernels and an L x L mask per row), the `<|endoftext|>` before each document teaches the
    model that what precedes it is unrelated, as in GPT-2 and nanochat, and the held-out perplexity
    here and in the evaluate stage reads windows packed the same way, so the numbers stay comparable.
    """
    b = shards.batch_at(step, seq_len, batch_size, seed)
    return {"input_ids": torch.from_numpy(b["input_ids"]), "targets": torch.from_numpy(b["targets"])}


def unigram_perplexity(train_counts: np.ndarray, heldout_counts: np.ndarray) -> float:
    """Perplexity of an add-one-smoothed unigram model (fitted on the training tokens' counts) on the
    held-out tokens (given by their counts): the floor any language model must beat."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n = heldout_counts.sum()
    return float(math.exp(-(heldout_counts * logp).sum() / n)) if n else float("nan")


def split_counts(shards: TokenShards, vocab_size: int) -> np.ndarray:
    """Unigram counts of a whole split, read a chunk at a time."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(shards), COUNT_CHUNK):
        counts += np.bincount(shards.read(lo, min(len(shards), lo + COUNT_CHUNK)), minlength=vocab_size)
    return counts


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over positions whose label is not -100 (SFT masks prompts).

    `labels` are the inputs' own ids, shifted by the model; `targets` (token shards) are the next
    tokens already, every position a target: HF then needs `shift_labels` so it does not shift again
    (and some `labels` at all to compute a loss).
    """
    if "targets" in batch:
        # Contiguous: a DDP rank's rows are a strided slice of the global batch, and HF calls .view on them.
        targets = batch["targets"].contiguous()
        out = model(input_ids=batch["input_ids"], labels=targets, shift_labels=targets)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    return out.loss, loss_parts(model, out)  # MoE: train/aux_loss and train/lm_loss beside the total


def heldout_perplexity(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, max_windows: int,
                       batch_size: int = 16) -> float:
    """Over consecutive windows of the held-out stream, as the evaluate stage's `heldout` task reads them."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n <= 0:  # no held-out split (tokenize.heldout_fraction=0) or one shorter than a window
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
    train_split, heldout = open_shards(cfg)  # every rank maps the same files: nothing to wait for
    heldout_tokens = heldout.read(0, min(len(heldout), cfg.eval_windows * cfg.seq_len + 1))

    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    n_params = count_parameters(model)
    # 6N per token for the dense matmuls plus the attention score/value products (the planner's count).
    # Active parameters: an MoE token passes through experts_per_token experts, not all of them.
    flops_per_token = planner.flops_per_token(active_parameters(model), cfg.model.num_layers, cfg.model.hidden_size, cfg.seq_len)
    if rank == 0:
        tracker.log_params({"stage": "pretrain", **to_dict(cfg), "model/parameters": n_params,
                            "model/active_parameters": active_parameters(model),
                            "data/train_tokens": len(train_split), "data/heldout_tokens": len(heldout),
                            "data/tokenizer_hash": train_split.tokenizer_hash, "world_size": world})
        log.info("pretrain: %s parameters, %s training tokens in %s, %d rank(s)", f"{n_params:,}",
                 f"{len(train_split):,}", train_split.root, world)

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        return shard_batch(train_split, step, cfg.seq_len, cfg.batch_size, cfg.train.seed)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"eval/heldout/perplexity": heldout_perplexity(m, heldout_tokens, cfg.seq_len, cfg.eval_windows)}

    # The evaluate stage finds the held-out split by pretraining's config in meta.json: the fraction
    # the shards were cut with is part of what this run trained on.
    config = {**to_dict(cfg), "heldout_fraction": train_split.index["heldout_fraction"]}
    meta = {"stage": "pretrain", "config": config, "lineage": cfg.lineage, "parent": None}
    result = train(model, tokenizer, cfg=cfg.train, batch_at=batch_at, loss_fn=lm_loss,
                   output_dir=cfg.output_dir, meta=meta, evaluate=evaluate, tracker=tracker,
                   desc="pretrain", flops_per_token=flops_per_token)
    unigram = unigram_perplexity(train_split.token_counts(), split_counts(heldout, len(tokenizer)))
    metrics = {**result.metrics, "eval/heldout/unigram_perplexity": unigram}
    if rank == 0:
        tracker.log_metrics({"eval/heldout/unigram_perplexity": unigram})
        plot = plot_curves(result.history, Path(cfg.output_dir) / "pretrain_curves.png", "pretraining",
                           ["train/loss", "eval/heldout/perplexity", "train/tokens_per_s"])
        if plot:
            tracker.log_artifact(plot)
    return PretrainResult(checkpoint=ckpt.final_dir(cfg.output_dir), metrics=metrics)
