"""Sizing a pretraining run before it starts: tokens, FLOPs, wall time and memory per GPU.

Pure functions and one result, `Plan`; `flywheel plan` (flows/plan.py) prints it. Symbols: N
parameters, D tokens, G GPUs, L layers, h hidden size, a attention heads, s sequence length, b
micro-batch per GPU, V vocabulary. Bytes are exact integers; the printer turns them into GiB.

- Compute-optimal tokens (Chinchilla, Hoffmann et al. 2022): D = 20·N, unless given.
- FLOPs per token = 6·N + 12·L·h·s (`flops_per_token`), the count behind `train/mfu` in
  stages/pretrain.py: 6N is forward (2N) plus backward (4N) through every weight matmul, N counting
  each parameter once (a tied embedding is the output projection's matmul); 12·L·h·s is QKᵀ and the
  weighted sum of V, 2·s·h each per layer forward, times three with backward, with no discount for
  the causal mask (PaLM's convention). Without L and h the attention term is left out: 6·N.
- Training FLOPs C = FLOPs per token · D; wall time = C / (G · peak · MFU), the peak being the dense
  bf16 figure of `stages.train_loop.PEAK_FLOPS`.
- Model states per GPU, mixed-precision Adam as in the ZeRO paper (Rajbhandari et al. 2020, §3):
  bf16 weights 2 B, bf16 gradients 2 B, fp32 master weights + Adam m + v 12 B, 16 B per parameter.
      DDP     2N + 2N + 12N             ZeRO-2  2N + 2N/G + 12N/G
      ZeRO-1  2N + 2N + 12N/G           ZeRO-3  2N/G + 2N/G + 12N/G
      FSDP    4N/G + 4N/G + 8N/G        (FSDP2 `fully_shard`, MixedPrecisionPolicy(param_dtype=bf16))
  FSDP shards the same 16 B but splits them otherwise: its sharded parameter *is* the fp32 master,
  its gradient is fp32, Adam adds m and v (8 B); bf16 copies exist only while a unit is computed.
  ZeRO-3 and FSDP also hold the units in flight unsharded: with prefetch, two transformer blocks of
  bf16 weights, 2 · 2·P_block bytes ("gathered"), P_block exact for a preset, else 12·h² (4h²
  attention + 8h² MLP, which the SwiGLU width 8h/3 also gives).
- Activations per GPU (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 2 with no tensor parallelism; 16-bit activations, a GPT block):
      eager attention        L · s·b·h · (34 + 5·a·s/h)    (the 5·a·s²·b are scores, softmax, dropout)
      flash attention        L · 34·s·b·h                  (SDPA/flash never stores the s² scores)
      checkpointed           L · 2·s·b·h + 34·s·b·h        (each block keeps its input; one block is
                                                           recomputed at a time, with flash attention)
      logits                 4·s·b·V                       (fp32, as transformers' loss upcasts them)
  Activations are the same under every strategy here: all of them are data parallel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from stages.config import ConfigError, from_dict, load_preset

TOKENS_PER_PARAM = 20
ADAM_BYTES = {"weights": 2, "grads": 2, "optimizer": 12}  # mixed-precision Adam, per parameter
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)\s*([KMBGT]?)\s*", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """`124M`, `1.3B`, `350m`, `2.5e9`, `7000` -> a whole number.

    >>> parse_size("124M"), parse_size("1.3B"), parse_size("350m"), parse_size("2.5e9")
    (124000000, 1300000000, 350000000, 2500000000)
    """
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"size {text!r}: expected a number with an optional K, M, B or T (e.g. 124M, 1.3B)")
    n = round(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if n <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return n


def peak_flops(gpu: str) -> tuple[str, float]:
    """The table's name and dense bf16 peak FLOP/s of an accelerator, case-insensitive."""
    from stages.train_loop import PEAK_FLOPS  # torch comes with it: only when a plan is made

    name = gpu.strip().upper()
    if name not in PEAK_FLOPS:
        raise ConfigError(f"gpu: unknown accelerator {gpu!r} (known: {', '.join(sorted(PEAK_FLOPS))})")
    return name, PEAK_FLOPS[name]


def flops_per_token(n_params: int, num_layers: int | None = None, hidden_size: int | None = None,
                    seq_len: int | None = None) -> float:
    """6·N, plus 12·L·h·s for attention when the shape is known.

    >>> flops_per_token(124_000_000)
    744000000
    >>> flops_per_token(124_000_000, 12, 768, 1024)
    857246208
    """
    attention = 12 * num_layers * hidden_size * seq_len if num_layers and hidden_size and seq_len else 0
    return 6 * n_params + attention


@dataclass(frozen=True)
class StateMemory:
    """Bytes per GPU of one strategy's model states (and of the units gathered in flight)."""

    weights: int
    grads: int
    optimizer: int
    gathered: int | None = None  # ZeRO-3/FSDP only, when a block's size is known

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.states + (self.gathered or 0)


def state_memory(n_params: int, gpus: int, block_params: int | None = None) -> dict[str, StateMemory]:
    """Per-GPU bytes of weights, gradients and Adam states under each strategy (formulas above)."""
    n, g = n_params, gpus
    w, gr, opt = (ADAM_BYTES[k] * n for k in ("weights", "grads", "optimizer"))

    def shard(x: int) -> int:  # ceil: the largest shard is what a GPU must fit
        return -(-x // g)

    gathered = 2 * 2 * block_params if block_params else None
    return {
        "DDP": StateMemory(weights=w, grads=gr, optimizer=opt),
        "ZeRO-1": StateMemory(weights=w, grads=gr, optimizer=shard(opt)),
        "ZeRO-2": StateMemory(weights=w, grads=shard(gr), optimizer=shard(opt)),
        "ZeRO-3": StateMemory(weights=shard(w), grads=shard(gr), optimizer=shard(opt), gathered=gathered),
        "FSDP": StateMemory(weights=shard(4 * n), grads=shard(4 * n), optimizer=shard(8 * n), gathered=gathered),
    }


@dataclass(frozen=True)
class Activations:
    """Bytes per GPU of the activations kept for backward (formulas above)."""

    eager: int | None  # needs the number of heads
    flash: int
    checkpointed: int
    logits: int | None  # needs the vocabulary


def activation_memory(*, num_layers: int, hidden_size: int, seq_len: int, micro_batch: int,
                      num_heads: int | None = None, vocab_size: int | None = None) -> Activations:
    """Korthikanti et al.'s per-layer estimate, with and without checkpointing.

    >>> activation_memory(num_layers=12, hidden_size=768, seq_len=1024, micro_batch=8).flash
    2566914048
    """
    sbh = seq_len * micro_batch * hidden_size
    eager = num_layers * (34 * sbh + 5 * num_heads * seq_len * seq_len * micro_batch) if num_heads else None
    return Activations(eager=eager, flash=num_layers * 34 * sbh, checkpointed=num_layers * 2 * sbh + 34 * sbh,
                       logits=4 * seq_len * micro_batch * vocab_size if vocab_size else None)


@dataclass(frozen=True)
class Shape:
    """What a plan knows about the network beyond its parameter count."""

    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    vocab_size: int | None = None
    block_params: int | None = None  # exact for a preset; else 12·h²
    seq_len: int | None = None  # a preset's pretrain.seq_len
    batch_size: int | None = None  # a preset's global pretrain.batch_size
    grad_accum: int = 1


class _VocabOnly:
    """What `build_model` reads of a tokenizer: its length and special ids."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def preset_model(name: str) -> tuple[int, Shape]:
    """Parameters and shape of a preset's model, counted on the meta device (no memory, no weights)."""
    import torch

    from stages.model import ModelConfig, build_model, count_parameters
    from stages.tokenizer import REASONING_MARKERS

    preset = load_preset(name)
    if "model" not in preset:
        raise ConfigError(f"preset {name!r} has no model section")
    cfg = from_dict(ModelConfig, preset["model"], prefix="model.")
    # The trained tokenizer has the vocab_size it asked for plus the reasoning markers added after.
    vocab = _preset_vocab(preset) + len(REASONING_MARKERS)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # build_model seeds the global RNG
        model = build_model(cfg, _VocabOnly(vocab))
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    pretrain: dict[str, Any] = preset.get("pretrain", {})
    return count_parameters(model), Shape(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, vocab_size=vocab,
        block_params=block, seq_len=pretrain.get("seq_len"), batch_size=pretrain.get("batch_size"),
        grad_accum=pretrain.get("train", {}).get("grad_accum", 1))


def _preset_vocab(preset: dict[str, Any]) -> int:
    from stages.tokenizer import TokenizerConfig

    # TokenizerConfig needs paths a plan has not got: read its one field, defaulted like the stage.
    default = TokenizerConfig.__dataclass_fields__["vocab_size"].default
    return int(preset.get("tokenizer", {}).get("vocab_size", default))


@dataclass(frozen=True)
class Plan:
    """A run sized: bytes per GPU, FLOPs, seconds; `shape` and `activations` say what was known."""

    params: int
    tokens: int
    tokens_from_params: bool  # True: the compute-optimal count, not given
    flops_per_token: float
    with_attention: bool
    train_flops: float
    gpu: str
    gpus: int
    peak_flops: float
    mfu: float
    seconds: float
    memory: dict[str, StateMemory]
    shape: Shape
    seq_len: int
    micro_batch: int | None
    activations: Activations | None


def make_plan(*, params: int, gpus: int, gpu: str, mfu: float = 0.4, tokens: int | None = None,
              seq_len: int = 2048, micro_batch: int | None = None, shape: Shape = Shape()) -> Plan:
    """Everything `flywheel plan` prints. The shape adds the attention FLOPs, exact gathered units and activations."""
    if params <= 0:
        raise ConfigError(f"params must be positive, got {params}")
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {mfu}")
    if seq_len < 1 or (micro_batch is not None and micro_batch < 1):
        raise ConfigError(f"seq_len and micro_batch must be >= 1, got {seq_len} and {micro_batch}")
    name, peak = peak_flops(gpu)
    d = tokens if tokens is not None else TOKENS_PER_PARAM * params
    L, h = shape.num_layers, shape.hidden_size
    fpt = flops_per_token(params, L, h, seq_len)
    c = fpt * d
    block = shape.block_params or (12 * h * h if h else None)
    acts = None
    if L and h and micro_batch:
        acts = activation_memory(num_layers=L, hidden_size=h, seq_len=seq_len, micro_batch=micro_batch,
                                 num_heads=shape.num_heads, vocab_size=shape.vocab_size)
    return Plan(params=params, tokens=d, tokens_from_params=tokens is None, flops_per_token=fpt,
                with_attention=bool(L and h), train_flops=c, gpu=name, gpus=gpus, peak_flops=peak, mfu=mfu,
                seconds=c / (gpus * peak * mfu), memory=state_memory(params, gpus, block), shape=shape,
                seq_len=seq_len, micro_batch=micro_batch, activations=acts)


def default_micro_batch(shape: Shape, gpus: int) -> int | None:
    """A preset's per-GPU micro-batch on `gpus` GPUs: its global batch over GPUs and accumulation steps."""
    if not shape.batch_size:
        return None
    return max(1, math.ceil(shape.batch_size / (gpus * shape.grad_accum)))
