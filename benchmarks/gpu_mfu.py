"""GPU throughput and MFU: the platform's training loop vs a bare PyTorch loop, same model and batches.

    python benchmarks/gpu_mfu.py --preset gpt2-124m --steps 60 [--out results.json]

Both loops use what a careful researcher would: bf16 autocast, torch.compile, SDPA attention and a
fused AdamW. The platform loop adds what the platform adds (scheduler, clipping, metrics, progress,
a final checkpoint). Tokens are random ids: throughput does not depend on what the tokens say, and
no data or tokenizer is needed. Steps after `--warmup` are timed; the ratio is platform / bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stages import planner
from stages.config import from_dict, load_preset
from stages.model import ModelConfig, build_model, count_parameters
from stages.tokenizer import train_tokenizer
from stages.tracking import RecordingTracker
from stages.train_loop import PEAK_FLOPS, TrainConfig, train


def flops_per_token(model, cfg: ModelConfig, seq_len: int) -> float:
    return planner.flops_per_token(count_parameters(model), cfg.num_layers, cfg.hidden_size, seq_len)


def bare_loop(model, batches, steps: int, warmup: int) -> list[float]:
    """Seconds per step after warm-up, for the plainest fast loop."""
    model.cuda().train()
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    times = []
    for step in range(steps):
        x = batches[step % len(batches)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    preset = load_preset(args.preset)
    mcfg = from_dict(ModelConfig, preset["model"])
    seq_len = preset.get("pretrain", {}).get("seq_len", 1024)
    vocab = preset.get("tokenizer", {}).get("vocab_size", 32768)
    # A tokenizer only fixes the vocabulary size here; train one on a tiny text so no file is read.
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(vocab))] * 2, vocab_size=vocab, min_frequency=1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tok), (args.batch, seq_len), generator=gen).cuda() for _ in range(8)]
    peak = next(v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name())

    model = build_model(mcfg, tok, seed=0)
    fpt = flops_per_token(model, mcfg, seq_len)
    bare = bare_loop(model, batches, args.steps, args.warmup)
    tokens = args.batch * seq_len
    bare_tps = tokens / statistics.median(bare)

    model = build_model(mcfg, tok, seed=0)
    tracker = RecordingTracker()
    with tempfile.TemporaryDirectory() as out:
        train(model, tok, cfg=TrainConfig(max_steps=args.steps, lr=3e-4, warmup_steps=5, log_every=5,
                                          checkpoint_every=10 * args.steps, progress=False),
              batch_at=lambda s: {"input_ids": batches[s % len(batches)].cpu(),
                                  "labels": batches[s % len(batches)].cpu()},
              loss_fn=lambda m, b: (m(input_ids=b["input_ids"], labels=b["labels"]).loss, {}),
              output_dir=Path(out), meta={"stage": "benchmark"}, tracker=tracker, flops_per_token=fpt)
    windows = tracker.series("train/tokens_per_s")[args.warmup // 5 + 1:]  # skip compile/warm-up windows
    platform_tps = statistics.median(windows)
    result = {
        "device": torch.cuda.get_device_name(), "preset": args.preset, "parameters": count_parameters(model),
        "seq_len": seq_len, "batch": args.batch, "steps": args.steps,
        "bare_tokens_per_s": bare_tps, "platform_tokens_per_s": platform_tps,
        "ratio": platform_tps / bare_tps,
        "bare_mfu": bare_tps * fpt / peak, "platform_mfu": platform_tps * fpt / peak,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
