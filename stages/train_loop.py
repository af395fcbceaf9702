"""The one training loop. Pretraining, SFT, DPO and GRPO differ only in their batches and their loss.

    result = train(model, tokenizer, cfg=TrainConfig(...), batch_at=..., loss_fn=..., output_dir=...)

- `batch_at(step)` returns the *global* batch for a step as a dict of tensors with a leading batch
  dimension. Making the batch a pure function of the step (seeded sampling, no iterator state) is
  what makes resume exact: a restarted run asks for the same batches in the same order.
- `loss_fn(model, micro_batch)` returns `(mean loss, metrics)`; each objective is one such function.
  A batch may carry `loss_tokens` ([B], the loss-bearing tokens of each row): micro-batches are then
  weighted by their share of the batch's tokens, so with `grad_accum > 1` the step still optimises
  the whole batch's token mean (the loss must be its micro-batch's token mean). Without it, rows weight.
- Distributed data parallel comes for free when `torch.distributed` is initialised (Ray Train does
  that for the pretraining workers): the model is wrapped in DDP, or with `strategy=fsdp` sharded
  by FSDP2 (`fully_shard` per transformer block, then the root: weights, gradients and optimizer
  states split across ranks; `ray.strategy` sets it), and each rank takes its slice of
  every batch. Every rank sees the whole global batch, so each weights its micro-batches by their
  share of the *global* batch's tokens and DDP's gradient mean is the global token mean, however
  unevenly the tokens fall. The logged loss and metrics are summed over ranks (each rank holds its
  token share of them), so they are the global batch's, not rank 0's shard. Rank 0 alone logs,
  shows progress and writes checkpoints.
- Numerical faults are caught before the update: a non-finite loss or gradient norm, or (with
  `spike_factor`) a loss above `spike_factor` x the median of the recent good steps' losses, either
  stops the run (`on_fault=stop`: `TrainingFault` names the step and the reason; no checkpoint is
  written after it, so the newest one on disk is the last good state) or skips the batch
  (`on_fault=skip`: no optimizer update, counted as `train/skipped_batches`, the reason in the
  `faults` field of metrics.jsonl). A skipped step still consumes its batch and its slot in the LR
  schedule: data and LR stay functions of the step number, so a resumed run meets the same fault
  at the same step and stays exact, and the cosine still ends at `max_steps`. Under DDP the ranks
  sum their fault flags before deciding, so all of them skip or stop together.
- Checkpoints hold the model (HF format), the optimizer, the scheduler, the RNG states (every rank's) and
  the trainable parameters as the live module names them (so a LoRA adapter or a policy+value pair
  resumes without special code); a resumed run reproduces an uninterrupted one step for step. Under
  FSDP the model and optimizer are saved as each rank's shards (`checkpoint.save_sharded`), the HF
  files gathered whole on rank 0. A stage whose `final/` already exists is returned as it is: a
  retry of a finished stage trains nothing and rewrites nothing.
- Every log window is a line of `<output_dir>/metrics.jsonl` (step and every logged value), so a run's
  curve can be read without MLflow. Progress is a tqdm bar in a terminal; elsewhere (a Ray worker, CI,
  a log file) one compact log line per window, since every bar refresh would become a line of its own.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import resource
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from stages import checkpoint as ckpt
from stages.config import to_dict
from stages.plots import plot_curves
from stages.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

# Dense bf16 peak FLOP/s used for MFU; per-device figures from the vendors' data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
METRICS_LOG = "metrics.jsonl"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slower on CPU)
    compile: str = "auto"  # auto: torch.compile on CUDA only (compile time dominates tiny CPU runs)
    progress: bool = True
    on_fault: str = "stop"  # non-finite loss / grad norm or a loss spike: "stop" the run or "skip" the batch
    spike_factor: float = 0.0  # > 1: a loss above spike_factor x the recent median is a fault; 0: off
    spike_warmup: int = 20  # steps before spikes are looked for (early losses fall steeply)
    spike_window: int = 50  # recent good steps whose median loss a spike is measured against
    strategy: str = "ddp"  # with torch.distributed: "ddp" replicates the model, "fsdp" shards it (ray.strategy)
    peak_flops: float | None = None  # one device's (one worker's) FLOP/s for MFU; None: the table or a measured matmul

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"train.compile must be auto, on or off, got {self.compile!r}")
        if self.grad_accum < 1 or self.checkpoint_every < 1:
            raise ValueError("train.grad_accum and train.checkpoint_every must be >= 1")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"train.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.on_fault not in ("stop", "skip"):
            raise ValueError(f"train.on_fault must be stop or skip, got {self.on_fault!r}")
        if not (self.spike_factor == 0 or self.spike_factor > 1):
            # A factor <= 1 would call half of all healthy steps spikes.
            raise ValueError(f"train.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"train.peak_flops must be > 0 FLOP/s or unset, got {self.peak_flops}")
        if self.spike_warmup < 0 or self.spike_window < 1:
            raise ValueError(f"train.spike_warmup must be >= 0 and train.spike_window >= 1, got "
                             f"{self.spike_warmup} and {self.spike_window}")


class TrainingFault(FloatingPointError):
    """A step whose loss or gradient could not be trusted, under `on_fault=stop`."""

    # Defaults so that pickle (which rebuilds from the message, then restores the attributes) can
    # carry it from a Ray worker to the driver.
    def __init__(self, message: str, *, step: int = 0, reason: str = "", checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Schedule shape in [0, 1]: linear warmup, then cosine decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * lr_factor(step, cfg)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device) -> AbstractContextManager:
    """The precision the loss runs under. Reference and "old" log-probs are taken under it too: in fp32
    beside a bf16 loss the PPO ratio is not 1 and the k3 KL not 0 at the very first update."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors), as is standard for transformers.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _slice(batch: Batch, start: int, stop: int, stride: int = 1) -> Batch:
    return {k: v[start:stop:stride] for k, v in batch.items()}


def micro_batch_weight(mb: Batch, global_batch: Batch, world: int) -> float:
    """Weight of a micro-batch's mean loss in the step's loss: its share of the global batch's loss
    tokens (or rows), times `world` because DDP averages the ranks' gradients.

    >>> b = {"loss_tokens": torch.tensor([3, 1])}
    >>> micro_batch_weight({"loss_tokens": torch.tensor([3])}, b, 1)  # 3 of 4 tokens, not 1 of 2 rows
    0.75
    """
    if "loss_tokens" in global_batch:
        return float(mb["loss_tokens"].sum()) * world / max(float(global_batch["loss_tokens"].sum()), 1.0)
    return next(iter(mb.values())).shape[0] * world / next(iter(global_batch.values())).shape[0]


def fault_reason(loss: float, grad_norm: float, recent: list[float], step: int, cfg: TrainConfig) -> str | None:
    """Why the update of (0-based) `step` must not be applied, or None; `recent` holds the losses of the
    last good steps. A spike is measured only against a positive median: an RL loss hovers around 0.

    >>> cfg = TrainConfig(spike_factor=3.0, spike_warmup=2)
    >>> fault_reason(float("nan"), 1.0, [], 0, cfg)
    'loss is nan'
    >>> fault_reason(2.0, float("inf"), [], 0, cfg)
    'grad norm is inf'
    >>> fault_reason(9.0, 1.0, [2.0, 2.5, 3.0], 5, cfg)
    'loss spike: 9 > 3 x 2.5, the median loss of the last 3 good steps'
    >>> fault_reason(9.0, 1.0, [2.0, 2.5, 3.0], 1, cfg) is None  # still warming up
    True
    """
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"grad norm is {grad_norm}"
    if cfg.spike_factor and step >= cfg.spike_warmup and recent:
        median = float(np.median(recent))
        if median > 0 and loss > cfg.spike_factor * median:
            return (f"loss spike: {loss:.4g} > {cfg.spike_factor:g} x {median:.4g}, the median loss of the last "
                    f"{len(recent)} good steps")
    return None


def _reduce_step(loss: float, metrics: dict[str, float], grad_norm: float, world: int,
                 device: torch.device) -> tuple[float, dict[str, float], bool]:
    """(global loss, global metrics, whether any rank saw a non-finite value). Each rank holds its token
    share of the step's means, so their sum is the global batch's; one all-reduce carries it all."""
    local_bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if world == 1:
        return loss, metrics, local_bad
    keys = sorted(metrics)  # the same order on every rank, whatever order each loss_fn built its dict in
    packed = torch.tensor([loss, *(metrics[k] for k in keys), float(local_bad)], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    values = packed.tolist()
    return values[0], {**metrics, **dict(zip(keys, values[1:-1], strict=True))}, values[-1] > 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    live = dict(model.named_parameters())
    wanted = {n for n, p in live.items() if p.requires_grad}
    if set(saved) != wanted:
        raise ValueError(f"checkpoint holds {len(saved)} trainable tensors, the model has {len(wanted)}: "
                         f"missing {sorted(wanted - set(saved))[:3]}, unexpected {sorted(set(saved) - wanted)[:3]}")
    with torch.no_grad():
        for n, value in saved.items():
            live[n].copy_(value)


def read_metrics_log(output_dir: Path) -> list[dict[str, float]]:
    path = Path(output_dir) / METRICS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start_metrics_log(output_dir: Path, start: int) -> list[dict[str, float]]:
    """Keep the windows up to the resumed step (a killed run may have logged past its last checkpoint)."""
    kept = [row for row in read_metrics_log(output_dir) if row["step"] <= start]
    path = Path(output_dir) / METRICS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return kept


def peak_flops(device: torch.device, configured: float | None = None) -> tuple[float | None, str]:
    """One device's peak FLOP/s, the denominator of MFU, and where the figure comes from.

    `train.peak_flops` wins everywhere. On CUDA the data-sheet bf16 figure of `PEAK_FLOPS` (None for
    a card not in it: no MFU rather than a guess). On CPU no vendor table exists (the peak depends on
    the cores, the SIMD width, the clock and how many threads this process may use), so the peak is
    measured: the dense fp32 matmul rate this process achieves (fp32 is the CPU default; set
    `train.peak_flops` for a bf16 run). CPU MFU is thus model FLOPs over what this machine's matmul
    kernel actually reaches, an achievable ceiling rather than a data sheet's: it reads higher than
    MFU against a theoretical peak would, and is not comparable with GPU MFU.
    """
    if configured is not None:
        return configured, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None), f"{name} bf16 data sheet"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return measured_matmul_flops(threads), f"measured fp32 matmul, {threads} thread(s)"
    return None, "unknown"


@functools.cache  # once per process (and thread count): a fraction of a second of matmuls
def measured_matmul_flops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of an n x n fp32 matmul on the CPU: the best of `reps` after a warm-up.

    The best rep, not the mean: it is the ceiling the kernel reaches when the machine lets it, and
    other processes' load only slows reps down. A private generator leaves the training RNG alone.
    """
    del threads  # the cache key: torch uses the process's current thread count
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)) for i in range(2))
    with torch.no_grad():
        torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train(
    model: torch.nn.Module,
    tokenizer,
    *,
    cfg: TrainConfig,
    batch_at: Callable[[int], Batch],
    loss_fn: LossFn,
    output_dir: Path,
    meta: dict[str, Any],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    tracker: Tracker | None = None,
    desc: str = "train",
    flops_per_token: float | None = None,
    extra_meta: Callable[[], dict[str, Any]] | None = None,
) -> TrainResult:
    """Run `cfg.max_steps` optimizer steps (resuming from the newest checkpoint) and save `final/`.

    `extra_meta()` adds what is known only as training goes (e.g. reward-hacking alarms) to every
    checkpoint's meta.json."""
    tracker = tracker or NullTracker()
    rank, world = dist_info()
    device = pick_device()
    output_dir = Path(output_dir)
    finished = _finished(output_dir, cfg)
    if finished is not None:
        if rank == 0:
            log.info("%s: %s is already complete (step %d); returned as it is", desc, ckpt.final_dir(output_dir),
                     cfg.max_steps)
        return finished
    seed_everything(cfg.seed)

    model.to(device)
    sharded = world > 1 and cfg.strategy == "fsdp"
    if sharded:
        shard_model(model)  # before the optimizer exists: FSDP2 replaces the parameters by DTensor shards
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = 0
    skipped = 0  # batches skipped for a fault, over the whole run (restored on resume)
    recent: list[float] = []  # the last good steps' losses, for spike detection (restored on resume)
    resume_from = ckpt.latest_checkpoint(output_dir)
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        if ckpt.is_sharded(resume_from):
            ckpt.load_sharded(resume_from, model, optimizer)
        elif sharded:
            raise ValueError(f"{desc}: {resume_from} was written by a replicated (DDP or single-process) run; "
                             "resume it with ray.strategy=ddp or train in a new output_dir")
        else:
            restore_trainable(model, state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(_own_rng(state, rank, world))
        start = state["step"]
        skipped = int(state.get("skipped_batches", 0))
        recent = list(state.get("recent_losses", []))
        if rank == 0:
            log.info("%s: resuming from %s (step %d)", desc, resume_from, start)

    raw_model = model
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    if world > 1 and not sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    peak, peak_source = peak_flops(device, cfg.peak_flops) if flops_per_token else (None, "")
    if peak and world > 1 and device.type == "cpu" and cfg.peak_flops is None:
        # Every rank has the same thread count, so one peak x world stands for the job; the ranks'
        # measurements differ by other processes' load (171 vs 98 GFLOP/s seen on a shared 2-core
        # machine), and the highest is the best estimate of the ceiling (it keeps MFU from inflating).
        best = torch.tensor(peak, dtype=torch.float64)
        dist.all_reduce(best, op=dist.ReduceOp.MAX)
        peak = float(best)
    if peak and rank == 0:
        log.info("%s: MFU against %.3g FLOP/s per worker x %d (%s)", desc, peak, world, peak_source)

    history = _start_metrics_log(output_dir, start) if rank == 0 else []
    last: dict[str, float] = {}
    # One place decides how progress shows: a bar in a terminal, else one line per log window.
    show = rank == 0 and cfg.progress
    as_lines = show and not _terminal()
    bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=not show or as_lines, mininterval=1.0)
    window_from = start
    # Logged values are means over the steps since the last log line, not one noisy step.
    # Skipped steps stay out of the means (a NaN would poison the window) but not out of tokens/s.
    window_tokens, window_start, window_sums, window_steps = 0, time.perf_counter(), {}, 0
    window_faults: list[dict[str, Any]] = []
    for step in range(start, cfg.max_steps):
        model.train()
        global_batch = batch_at(step)
        rows = next(iter(global_batch.values())).shape[0]
        if rows < world:
            # A rank with no rows would skip backward and leave the others waiting in all-reduce forever.
            raise ValueError(f"{desc}: step {step + 1}: a global batch of {rows} rows cannot feed {world} ranks")
        local = _slice(global_batch, rank, None, world) if world > 1 else global_batch
        n = next(iter(local.values())).shape[0]
        micro = max(1, math.ceil(n / cfg.grad_accum))
        step_metrics: dict[str, float] = {}
        total_loss = 0.0
        for i, lo in enumerate(range(0, n, micro)):
            mb = {k: v.to(device, non_blocking=True) for k, v in _slice(local, lo, lo + micro).items()}
            is_last = lo + micro >= n
            sync = _grad_sync(model, raw_model, is_last)
            weight = micro_batch_weight(mb, global_batch, world)
            with sync, autocast(cfg, device):
                loss, metrics = loss_fn(model, mb)
                (loss * weight).backward()
            share = weight / world  # this rank's part of the step's mean, for the logs
            total_loss += loss.item() * share
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v * share
        window_tokens += sum(int(v.numel()) for k, v in global_batch.items() if k.endswith("input_ids"))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: a sharded norm
        total_loss, step_metrics, any_bad = _reduce_step(total_loss, step_metrics, grad_norm, world, device)
        done = step + 1
        reason = fault_reason(total_loss, grad_norm, recent, step, cfg)
        if reason is None and any_bad:  # another rank's shard went non-finite
            reason = "a non-finite loss or grad norm on another rank"
        if reason is not None and cfg.on_fault == "stop":
            bar.close()
            raise _stop(desc, done, reason, output_dir, rank)
        if reason is None:
            optimizer.step()
            recent = [*recent, total_loss][-cfg.spike_window:]
        else:
            skipped += 1
            window_faults.append(_fault(done, reason, "skip"))
            if rank == 0:
                log.warning("%s: step %d skipped, no update applied: %s", desc, done, reason)
        scheduler.step()  # a skipped step keeps its LR slot: the schedule stays a function of the step
        optimizer.zero_grad(set_to_none=True)

        bar.update(1)
        if reason is None:
            window_steps += 1
            for k, v in {"train/loss": total_loss, "train/grad_norm": grad_norm, **step_metrics}.items():
                window_sums[k] = window_sums.get(k, 0.0) + v
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            steps_per_s, window_from = (done - window_from) / max(elapsed, 1e-9), done
            last = {**{k: v / window_steps for k, v in window_sums.items()},
                    "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tps,
                    "train/skipped_batches": float(skipped)}
            if peak and flops_per_token:
                last["train/mfu"] = tps * flops_per_token / (peak * world)
                last["train/peak_flops"] = peak  # the denominator, per worker: MFU can be checked from the log
            last.update(_peak_memory_mb(device, world))
            faults, window_faults = window_faults, []
            window_tokens, window_start, window_sums, window_steps = 0, time.perf_counter(), {}, 0
            if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                last.update(_run_eval(evaluate, raw_model))
            if rank == 0:
                row = {"step": done, **last, **({"faults": faults} if faults else {})}
                history.append(row)
                _append_metrics_row(output_dir, row)
                tracker.log_metrics(last, step=done)
                shown = {"loss": f"{last['train/loss']:.3f}" if "train/loss" in last else "skipped",
                         "tok_s": f"{tps:,.0f}"}
                if "rl/reward_mean" in last:  # an RL loss hovers near 0 by design; the reward is the news
                    shown["reward"] = f"{last['rl/reward_mean']:.3f}"
                bar.set_postfix(shown)
                if as_lines:
                    log.info("%s", progress_line(desc, done, cfg.max_steps, last, steps_per_s))
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            _save(ckpt.step_dir(output_dir, done), raw_model, tokenizer, {**meta, **(extra_meta() if extra_meta else {})},
                  optimizer, scheduler, done, rank, world,
                  {"skipped_batches": skipped, "recent_losses": recent})
            if rank == 0:
                ckpt.prune_checkpoints(output_dir, cfg.keep_checkpoints)
    bar.close()

    final_metrics = dict(last)
    if evaluate is not None:
        final_metrics.update(_run_eval(evaluate, raw_model))
    full = ckpt.full_state_dict(raw_model) if sharded else None  # gathered onto rank 0: every rank takes part
    if rank == 0:
        if evaluate is not None:
            tracker.log_metrics({k: v for k, v in final_metrics.items() if k.startswith("eval/")}, step=cfg.max_steps)
        ckpt.save_checkpoint(ckpt.final_dir(output_dir), raw_model, tokenizer,
                             {**meta, **(extra_meta() if extra_meta else {}), "step": cfg.max_steps,
                              "metrics": final_metrics}, state_dict=full)
    if world > 1:
        dist.barrier()
    return TrainResult(step=cfg.max_steps, metrics=final_metrics, history=history)


def _finished(output_dir: Path, cfg: TrainConfig) -> TrainResult | None:
    if not ckpt.is_complete(output_dir):
        return None
    meta = ckpt.read_meta(ckpt.final_dir(output_dir))
    if meta.get("step") != cfg.max_steps:
        raise ValueError(f"{ckpt.final_dir(output_dir)} holds a finished run of {meta.get('step')} steps, not "
                         f"train.max_steps={cfg.max_steps}: use a new output_dir to train again")
    return TrainResult(step=cfg.max_steps, metrics=dict(meta.get("metrics", {})), history=read_metrics_log(output_dir))


def _run_eval(evaluate, model) -> dict[str, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = evaluate(model)
    model.train(was_training)
    return out


def _fault(step: int, reason: str, action: str) -> dict[str, Any]:
    return {"step": step, "reason": reason, "action": action}


def _append_metrics_row(output_dir: Path, row: dict[str, Any]) -> None:
    with open(output_dir / METRICS_LOG, "a") as f:
        f.write(json.dumps(row) + "\n")


def _stop(desc: str, step: int, reason: str, output_dir: Path, rank: int) -> TrainingFault:
    """The error that ends a run at a fault; the metrics log gets the reason (a resume drops that row)."""
    newest = ckpt.latest_checkpoint(output_dir)
    message = (f"{desc}: step {step}: {reason}; stopped before its update (train.on_fault=stop), "
               f"newest checkpoint: {newest if newest else 'none yet'}")
    if rank == 0:
        log.error("%s", message)
        _append_metrics_row(output_dir, {"step": step, "faults": [_fault(step, reason, "stop")]})
    return TrainingFault(message, step=step, reason=reason, checkpoint=newest)


def _save(path, model, tokenizer, meta, optimizer, scheduler, step, rank, world, loop_state) -> None:
    rngs = _gathered_rng(world)
    state = {"scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_by_rank": rngs, "step": step, **loop_state}
    if isinstance(model, FSDPModule):  # every rank writes its shards of the model and optimizer
        ckpt.save_sharded(path, model, tokenizer, {**meta, "step": step}, optimizer, state)
        return
    if rank == 0:
        state.update(optimizer=optimizer.state_dict(), trainable=trainable_state(model))
        ckpt.save_checkpoint(path, model, tokenizer, {**meta, "step": step}, trainer_state=state)
    if world > 1:
        dist.barrier()


def _peak_memory_mb(device: torch.device, world: int) -> dict[str, float]:
    """The largest rank's peak memory so far (a collective): host RSS, and on CUDA the allocator's peak.
    Logged before the window's checkpoint, so it is training's own, not a save's."""
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB on Linux
    if device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(device) / 2**20)
    peaks = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return dict(zip(("memory/peak_rss_mb", "memory/peak_gpu_mb"), peaks.tolist()))


def _gathered_rng(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (a collective): ranks that draw differently (dropout on different rows)
    each resume their own stream."""
    if world == 1:
        return [_rng_state()]
    rngs: list[Any] = [None] * world
    dist.all_gather_object(rngs, _rng_state())
    return rngs


def _own_rng(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    by_rank = state.get("rng_by_rank")
    # Another world size (or a checkpoint from before per-rank states): rank 0's stream for all.
    return by_rank[rank] if by_rank and len(by_rank) == world else state["rng"]


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: each transformer block its own unit (its weights gathered just for its forward
    and backward), then the root for what is left (embeddings, final norm, head)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())  # HF names its block classes here
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def _grad_sync(model: torch.nn.Module, raw_model: torch.nn.Module, is_last: bool) -> AbstractContextManager:
    """Reduce gradients across ranks on a step's last micro-batch only (grad accumulation): DDP's
    `no_sync` before it; FSDP2 has a switch instead, set before every backward."""
    if isinstance(raw_model, FSDPModule):
        raw_model.set_requires_gradient_sync(is_last)
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not is_last:
        return model.no_sync()
    return nullcontext()


def _terminal() -> bool:
    """Whether tqdm's stream (stderr) is a terminal; in a Ray worker or CI it is a pipe or a file."""
    return sys.stderr.isatty()


def progress_line(desc: str, done: int, total: int, last: dict[str, float], steps_per_s: float) -> str:
    """One log window as one line, for output that is not a terminal.

    >>> progress_line("pretrain", 20, 200, {"train/loss": 3.4121, "train/tokens_per_s": 12345.6}, 4.0)
    'pretrain 20/200 (10%) loss 3.412 | 12,346 tok/s | 4.00 steps/s | ETA 0:00:45'
    >>> progress_line("pretrain", 200, 200, {"train/tokens_per_s": 9e5, "train/mfu": 0.412}, 2.0)
    'pretrain 200/200 (100%) loss skipped | 900,000 tok/s | MFU 41.2% | 2.00 steps/s | ETA 0:00:00'
    """
    loss = f"{last['train/loss']:.3f}" if "train/loss" in last else "skipped"
    parts = [f"{desc} {done}/{total} ({100 * done // total}%) loss {loss}", f"{last['train/tokens_per_s']:,.0f} tok/s"]
    if "rl/reward_mean" in last:
        parts.append(f"reward {last['rl/reward_mean']:.3f}")
    if "train/mfu" in last:
        parts.append(f"MFU {100 * last['train/mfu']:.1f}%")
    eta = round((total - done) / steps_per_s) if steps_per_s > 0 else 0
    parts += [f"{steps_per_s:.2f} steps/s", f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"]
    return " | ".join(parts)



def tune_policy(stage: str, cfg: Any, model: torch.nn.Module, tokenizer, *, batch_at: Callable[[int], Batch],
                loss_fn: LossFn, tracker: Tracker, curves: list[str],
                evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                extra_meta: Callable[[], dict[str, Any]] | None = None) -> TrainResult:
    """Train `cfg.policy` into `cfg.output_dir`: the shared body of SFT, reward, DPO, PPO and GRPO.

    Records the parent checkpoint's ancestry in meta.json and logs a plot of `curves`.
    """
    meta = {"stage": stage, "config": to_dict(cfg), "lineage": cfg.lineage, "parent": str(cfg.policy),
            "parent_meta": ckpt.parent_summary(cfg.policy)}
    result = train(model, tokenizer, cfg=cfg.train, batch_at=batch_at, loss_fn=loss_fn, output_dir=cfg.output_dir,
                   meta=meta, evaluate=evaluate, tracker=tracker, desc=stage, extra_meta=extra_meta)
    plot = plot_curves(result.history, Path(cfg.output_dir) / f"{stage}_curves.png", stage.upper(), curves)
    if plot:
        tracker.log_artifact(plot)
    return result
