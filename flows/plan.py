"""`flywheel plan`: tokens, FLOPs, wall time and memory per GPU of a pretraining run, before it runs.

    flywheel plan --params 124M --gpus 8 --gpu h100 [--mfu 0.4] [--tokens 5B] [--seq-len 2048]
                  [--layers 12 --hidden 768 [--heads 12] [--vocab 32768] --micro-batch 8]
    flywheel plan --preset gpt2-124m --gpus 8 --gpu h100

The numbers and their formulas come from stages/planner.py; this module parses and prints.
"""

from __future__ import annotations

import argparse

GIB = 2**30


def _size(text: str) -> int:
    from stages.config import ConfigError
    from stages.planner import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:  # argparse then prints the reason, not "invalid _size value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _gpu(text: str) -> str:
    from stages.config import ConfigError
    from stages.planner import peak_flops

    try:
        return peak_flops(text)[0]
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("gpu: ")) from None  # argparse names the option


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan` on the `flywheel` subcommands; its function is `args.fn`."""
    p = subparsers.add_parser("plan", help="size a pretraining run: tokens, FLOPs, wall time, memory per GPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--params", type=_size, metavar="N", help="parameters, e.g. 124M, 1.3B, 350m")
    model.add_argument("--preset", metavar="NAME", help="count them from stages/presets/NAME.yaml's model section")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", type=_gpu, required=True, help="accelerator, e.g. h100 (an unknown one lists the known)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--tokens", type=_size, default=None, help="training tokens (default: 20 per parameter)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's, else 2048)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="hidden size")
    p.add_argument("--heads", type=int, default=None, help="attention heads (for eager attention's activations)")
    p.add_argument("--vocab", type=_size, default=None, help="vocabulary (for the logits' activations)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per GPU per forward (default: a preset's batch over GPUs and grad_accum)")
    p.set_defaults(fn=cmd_plan)
    return p


def _si(n: float) -> str:
    """3 significant digits with K/M/B/T: 110122752 -> 110M, 2.2e9 -> 2.20B."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.{max(0, 3 - len(str(int(v))))}f}{suffix}"
    return f"{n:g}"


def _duration(s: float) -> str:
    for div, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if s >= div:
            return f"{s / div:.1f} {unit}"
    return f"{s:.0f} s"


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def cmd_plan(args: argparse.Namespace) -> int:
    from stages.config import ConfigError
    from stages.planner import TOKENS_PER_PARAM, Shape, default_micro_batch, make_plan, preset_model

    if args.preset:
        given = [f"--{k}" for k in ("layers", "hidden", "heads", "vocab") if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"--preset fixes the model's shape; drop {', '.join(given)}")
        params, shape = preset_model(args.preset)
        about = (f"preset {args.preset}: {shape.num_layers} layers, hidden {shape.hidden_size}, "
                 f"{shape.num_heads} heads, vocab {shape.vocab_size:,}")
    else:
        params = args.params
        shape = Shape(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads, vocab_size=args.vocab)
        about = ", ".join(f"{v} {k}" for k, v in (("layers", args.layers), ("hidden", args.hidden),
                                                  ("heads", args.heads), ("vocab", args.vocab)) if v) or "shape not given"
    seq_len = args.seq_len or shape.seq_len or 2048
    micro = args.micro_batch or default_micro_batch(shape, args.gpus)
    plan = make_plan(params=params, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu, tokens=args.tokens,
                     seq_len=seq_len, micro_batch=micro, shape=shape)

    rows = [
        ("model", f"{_si(plan.params)} parameters ({about})"),
        ("tokens", f"{_si(plan.tokens)}" + (f", compute-optimal ({TOKENS_PER_PARAM} per parameter)"
                                           if plan.tokens_from_params else ", given")),
        ("FLOPs/token", f"{plan.flops_per_token:.3e} = " + (f"6·N + 12·L·h·s (s = {seq_len})" if plan.with_attention
                                                            else "6·N (attention left out: give --layers and --hidden)")),
        ("train FLOPs", f"{plan.train_flops:.3e} = FLOPs/token · tokens"),
        ("wall time", f"{_duration(plan.seconds)} ({plan.seconds:,.0f} s) = FLOPs / ({plan.gpus} × "
                      f"{plan.gpu} {plan.peak_flops / 1e12:g} TFLOP/s bf16 × MFU {plan.mfu:g}); "
                      f"{plan.seconds * plan.gpus / 3600:,.1f} GPU-hours"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    print(f"flywheel plan: {_si(plan.params)} parameters on {plan.gpus} × {plan.gpu} at MFU {plan.mfu:g}\n")
    for k, v in rows:
        print(f"{k:<{width}}{v}")

    acts = plan.activations
    extra = []
    if acts:
        logits = acts.logits or 0
        extra = [("+ act", acts.flash + logits), ("+ act ckpt", acts.checkpointed + logits)]
    head = ["strategy", "weights", "grads", "optimizer", "gathered", "total", *(name for name, _ in extra)]
    table = [[name, _gib(m.weights), _gib(m.grads), _gib(m.optimizer), _gib(m.gathered), _gib(m.total),
              *(_gib(m.total + a) for _, a in extra)] for name, m in plan.memory.items()]
    print("\nmemory per GPU, GiB (bf16 weights and grads, fp32 master weights + Adam m and v: 16 B/parameter;"
          " FSDP keeps fp32 shards)")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    for r in [head, *table]:
        print("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]).rstrip())
    if plan.memory["FSDP"].gathered:
        print("gathered: two transformer blocks unsharded in bf16 (the one computed and the one prefetched)")

    if acts:
        print(f"\nactivations per GPU, micro-batch {plan.micro_batch} × {seq_len} tokens (Korthikanti et al. 2022)")
        lines = [("eager attention", acts.eager, "L·s·b·h·(34 + 5·a·s/h)" if acts.eager else "needs --heads"),
                 ("flash attention", acts.flash, "L·34·s·b·h  (+ act)"),
                 ("checkpointed", acts.checkpointed, "L·2·s·b·h + 34·s·b·h  (+ act ckpt)"),
                 ("logits, fp32", acts.logits, "4·s·b·V, in both totals" if acts.logits else "needs --vocab")]
        for name, b, formula in lines:
            print(f"  {name:<17}{_gib(b):>7} GiB  {formula}" if b is not None else f"  {name:<17}{'-':>7}      {formula}")
    elif plan.shape.num_layers and plan.shape.hidden_size:
        print("\nactivations: give --micro-batch")
    else:
        print("\nactivations: give --layers, --hidden and --micro-batch")
    return 0
