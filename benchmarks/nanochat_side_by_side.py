"""Pretraining throughput and MFU side by side with nanochat's base training: same model size, same GPU.

    # here, once (pip reaches PyPI for one wheel): nanochat's source and inputs into .nanochat/
    .venv/bin/python benchmarks/nanochat_side_by_side.py prepare --nanochat /path/to/nanochat/checkout
    # on the GPU machine, carrying .nanochat (device `run`, carry=[".nanochat"]):
    python3 benchmarks/nanochat_side_by_side.py run --preset gpt2-124m --steps 60 --out $OUT/nanochat.json

`prepare` works offline from then on: it copies a nanochat checkout (their code: `.nanochat/` is
git-ignored, never committed), writes its pretraining inputs the way nanochat reads them (parquet
shards with a `text` column, the last one its validation split; here Tiny Shakespeare paragraphs
from ../shared/datasets, since throughput does not depend on what the tokens say), trains its
tokenizer with its own `scripts.tok_train` at the preset's vocabulary size, and downloads the one
wheel the device image lacks (rustbpe). nanochat imports wandb at start-up and never calls it with
`--run=dummy`; the device has no wandb, so `run` puts a stub module first on its path.

`run` starts nanochat's `scripts.base_train` at the preset's shape (depth = layers, head_dim =
hidden / heads, full attention, the preset's sequence length, one micro-batch of `--batch` rows per
step) and parses its per-step `tok/sec` and `bf16_mfu`; then `benchmarks/gpu_mfu.py` on the same preset
and batch (ours, bare and platform loops). Medians over the steps after `--warmup`; one JSON.
nanochat keeps its own architecture (untied embeddings, value embeddings, Muon), so "same size" means
the same depth, width, heads, vocabulary and tokens per step, and each side's MFU counts its own FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from the repository root, installed or not
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_mfu import preset_shape  # noqa: E402  (the same shape on both sides, by construction)

HOME = REPO / ".nanochat"  # git-ignored; travels to the device machine with carry=[".nanochat"]
TEXT = REPO.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
STEP_LINE = re.compile(r"step (\d+)/\d+ .*?tok/sec: ([\d,]+) \| bf16_mfu: ([\d.]+)")
WANDB_STUB = '"""Stand-in for wandb, which nanochat imports and, with --run=dummy, never calls."""\n\n\ndef init(*args, **kwargs):\n    raise RuntimeError("wandb is not installed here: run nanochat with --run=dummy")\n'


def prepare(nanochat: Path, preset: str, text: Path) -> None:
    if not (nanochat / "scripts" / "base_train.py").exists():
        raise SystemExit(f"{nanochat}: not a nanochat checkout (no scripts/base_train.py)")
    shutil.rmtree(HOME, ignore_errors=True)
    shutil.copytree(nanochat, HOME / "src", ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = preset_shape(preset)["vocab"]
    docs = [d for d in text.read_text().split("\n\n") if d.strip()]
    # Tiny Shakespeare alone runs out of pairs to merge (21,072 of 32,768 tokens). Documents of distinct
    # made-up four-letter words (letters: nanochat's split pattern cuts digits into pairs), under
    # tok_train's 10,000-character cap and in the training split, let its tokenizer reach the preset's
    # vocabulary size, as gpu_mfu.py's does: the model's shape, not the text, sets the throughput.
    words = ["".join("abcdefghijklmnopqrstuvwxyz"[i // 26**k % 26] for k in range(4)) for i in range(2 * vocab)]
    docs = [" ".join(words[i : i + 1000]) for i in range(0, len(words), 1000)] + docs
    data = HOME / "base" / "base_data_climbmix"
    data.mkdir(parents=True)
    cut = int(len(docs) * 0.9)
    for i, part in enumerate((docs[:cut], docs[cut:])):  # nanochat: the last shard is validation
        pq.write_table(pa.table({"text": part}), data / f"shard_{i:05d}.parquet", row_group_size=256)
    # rustbpe for this interpreter (nanochat's tok_train runs here) and as a wheel for the device's 3.12
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(_site()), "rustbpe", "tiktoken"],
                   check=True)
    wheels = HOME / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels),
                    "rustbpe"], check=True)
    stubs = HOME / "stubs"
    stubs.mkdir()
    (stubs / "wandb.py").write_text(WANDB_STUB)
    # the tokenizer, by nanochat's own trainer (rustbpe must be importable here: pip install rustbpe)
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size", str(vocab)],
                   cwd=HOME / "src", env=_env(), check=True)
    (HOME / "prepared.json").write_text(json.dumps({"preset": preset, "vocab": vocab, "documents": len(docs)}))
    print(f"prepared {HOME} for {preset}: {len(docs)} documents, tokenizer of {vocab} tokens, "
          f"{sorted(p.name for p in wheels.iterdir())}")


def _site() -> Path:
    """Packages nanochat needs beyond the interpreter's own, per Python version (rustbpe is compiled)."""
    return HOME / f"site-py{sys.version_info.major}{sys.version_info.minor}"


def _env() -> dict[str, str]:
    path = [str(HOME / "stubs"), str(_site())] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else [])
    return {**os.environ, "NANOCHAT_BASE_DIR": str(HOME / "base"), "PYTHONPATH": os.pathsep.join(path),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _install_wheels() -> None:
    """On the device machine (no network): the carried wheels, once per interpreter version."""
    if _site().exists():
        return
    wheels = sorted((HOME / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(_site()), *map(str, wheels)], check=True)


def nanochat_steps(log: str, warmup: int) -> tuple[list[float], list[float]]:
    """tok/sec and bf16_mfu (a percentage) of each step after `warmup`, from base_train's output.

    >>> nanochat_steps("step 00003/00010 (30.00%) | loss: 8.3 | lrm: 0.1 | dt: 62.30ms | tok/sec: 16,436 | bf16_mfu: 41.20 | epoch: 1", 2)
    ([16436.0], [41.2])
    """
    tps, mfu = [], []
    for step, tok_s, m in STEP_LINE.findall(log):
        if int(step) >= warmup:
            tps.append(float(tok_s.replace(",", "")))
            mfu.append(float(m))
    return tps, mfu


def run(preset: str, steps: int, warmup: int, batch: int, device: str, out: Path | None) -> dict:
    marker = HOME / "prepared.json"
    if not marker.exists():
        raise SystemExit(f"{HOME} is not prepared: run `benchmarks/nanochat_side_by_side.py prepare` first")
    prepared = json.loads(marker.read_text())["preset"]
    if prepared != preset:  # nanochat's tokenizer fixes the vocabulary: it must be the preset's
        raise SystemExit(f"{HOME} was prepared for --preset {prepared}, not {preset}: prepare again with --preset {preset}")
    _install_wheels()
    shape = preset_shape(preset)
    cmd = [sys.executable, "-m", "scripts.base_train", f"--device-type={device}", f"--depth={shape['depth']}",
           f"--aspect-ratio={shape['hidden'] // shape['depth']}", f"--head-dim={shape['head_dim']}",
           "--window-pattern=L", f"--max-seq-len={shape['seq_len']}", f"--device-batch-size={batch}",
           f"--total-batch-size={batch * shape['seq_len']}", f"--num-iterations={steps}", "--eval-every=-1",
           "--core-metric-every=-1", "--sample-every=-1", "--run=dummy", f"--model-tag=side-by-side-{preset}"]
    nano = subprocess.run(cmd, cwd=HOME / "src", env=_env(), capture_output=True, text=True)
    # its final checkpoint with optimizer state (GBs at gpt2-124m) is not what is measured
    shutil.rmtree(HOME / "base" / "base_checkpoints", ignore_errors=True)
    if nano.returncode != 0:
        raise SystemExit(f"nanochat base_train failed ({nano.returncode}):\n{(nano.stdout + nano.stderr)[-4000:]}")
    tps, mfu = nanochat_steps(nano.stdout, warmup)
    if not tps:
        raise SystemExit(f"no step lines after warm-up {warmup} in nanochat's output:\n{nano.stdout[-3000:]}")
    ours_out = (out.parent if out else Path.cwd()) / "gpu_mfu_side_by_side.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--preset", preset, "--steps", str(steps),
                    "--warmup", str(warmup), "--batch", str(batch), "--device", device, "--out", str(ours_out)],
                   check=True)
    ours = json.loads(ours_out.read_text())
    result = {"preset": preset, "shape": shape, "batch": batch, "steps": steps, "warmup": warmup,
              "nanochat_command": " ".join(cmd[1:]),
              "nanochat_tokens_per_s": statistics.median(tps), "nanochat_mfu": statistics.median(mfu) / 100,
              "ours": ours, "ratio_platform_vs_nanochat": ours["platform_tokens_per_s"] / statistics.median(tps)}
    print(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--text", type=Path, default=TEXT)
    r = sub.add_parser("run")
    r.add_argument("--preset", default="gpt2-124m")
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(args.nanochat, args.preset, args.text)
    else:
        run(args.preset, args.steps, args.warmup, args.batch, args.device, args.out)


if __name__ == "__main__":
    main()
