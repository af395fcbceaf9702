"""GPU throughput and MFU: the platform's training loop vs a bare PyTorch loop, same model and batches.

    python benchmarks/gpu_mfu.py --preset gpt2-124m --steps 60 [--out results.json]
    python benchmarks/gpu_mfu.py --preset tiny --steps 6 --warmup 2 --device cpu --compile off   # smoke run

Both loops use what a careful researcher would: bf16 autocast, torch.compile, SDPA attention and a
fused AdamW. The platform loop adds what the platform adds (scheduler, clipping, metrics, progress,
a final checkpoint). Tokens are random ids: throughput does not depend on what the tokens say, and
no data or tokenizer is needed. Steps after `--warmup` are timed; the ratio is platform / bare.
On CPU (no bf16, compile off by default) it runs the same code paths in fp32, so the script is tested
without a GPU (tests/benchmarks/test_gpu_scripts.py) and a GPU session spends its time measuring.
MFU's denominator is `train_loop.peak_flops`: the data-sheet bf16 peak on CUDA, a measured matmul
peak on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root, installed or not
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from stages import planner  # noqa: E402
from stages.config import from_dict, load_preset  # noqa: E402
from stages.model import ModelConfig, build_model, count_parameters  # noqa: E402
from stages.tokenizer import train_tokenizer  # noqa: E402
from stages.tracking import RecordingTracker  # noqa: E402
from stages.train_loop import TrainConfig, peak_flops, pick_device, train  # noqa: E402


def preset_shape(name: str) -> dict[str, int]:
    """What a side-by-side builds at, for every contender alike: depth, width, head size, sequence
    length and vocabulary of a preset."""
    preset = load_preset(name)
    m = from_dict(ModelConfig, preset["model"])
    return {"depth": m.num_layers, "hidden": m.hidden_size, "head_dim": m.hidden_size // m.num_heads,
            "seq_len": preset.get("pretrain", {}).get("seq_len", m.max_seq_len),
            "vocab": preset.get("tokenizer", {}).get("vocab_size", 32768)}


def flops_per_token(model, cfg: ModelConfig, seq_len: int) -> float:
    return planner.flops_per_token(count_parameters(model), cfg.num_layers, cfg.hidden_size, seq_len)


def bare_loop(model, batches, steps: int, warmup: int, device: torch.device, compile_model: bool) -> list[float]:
    """Seconds per step after warm-up, for the plainest fast loop."""
    cuda = device.type == "cuda"
    model.to(device).train()
    compiled = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda)
    times = []
    for step in range(steps):
        x = batches[step % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on with CUDA")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = pick_device() if args.device == "auto" else torch.device(args.device)
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")

    mcfg = from_dict(ModelConfig, load_preset(args.preset)["model"])
    shape = preset_shape(args.preset)
    seq_len, vocab = shape["seq_len"], shape["vocab"]
    # A tokenizer only fixes the vocabulary size here; train one on a tiny text so no file is read.
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(vocab))] * 2, vocab_size=vocab, min_frequency=1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tok), (args.batch, seq_len), generator=gen).to(device) for _ in range(8)]
    peak, peak_source = peak_flops(device)

    model = build_model(mcfg, tok, seed=0)
    fpt = flops_per_token(model, mcfg, seq_len)
    bare = bare_loop(model, batches, args.steps, args.warmup, device, compile_model)
    tokens = args.batch * seq_len
    bare_tps = tokens / statistics.median(bare)

    model = build_model(mcfg, tok, seed=0)
    tracker = RecordingTracker()
    with tempfile.TemporaryDirectory() as out:
        train(model, tok, cfg=TrainConfig(max_steps=args.steps, lr=3e-4, warmup_steps=5, log_every=5,
                                          checkpoint_every=10 * args.steps, progress=False,
                                          compile="on" if compile_model else "off"),
              batch_at=lambda s: {"input_ids": batches[s % len(batches)].cpu(),
                                  "labels": batches[s % len(batches)].cpu()},
              loss_fn=lambda m, b: (m(input_ids=b["input_ids"], labels=b["labels"]).loss, {}),
              output_dir=Path(out), meta={"stage": "benchmark"}, tracker=tracker, flops_per_token=fpt)
    windows = tracker.series("train/tokens_per_s")[args.warmup // 5 + 1:]  # skip compile/warm-up windows
    platform_tps = statistics.median(windows)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": compile_model, "peak_flops": peak, "peak_source": peak_source,
        "preset": args.preset, "parameters": count_parameters(model),
        "seq_len": seq_len, "batch": args.batch, "steps": args.steps,
        "bare_tokens_per_s": bare_tps, "platform_tokens_per_s": platform_tps,
        "ratio": platform_tps / bare_tps,
        "bare_mfu": bare_tps * fpt / peak if peak else None,
        "platform_mfu": platform_tps * fpt / peak if peak else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
