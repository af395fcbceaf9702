"""Shared helpers for the benchmarks: a cached tiny-preset workload, medians, result files.

Benchmarks measure; they never assert. Inputs (the builtin dataset and a tokenizer) are prepared
once under `$FLYWHEEL_HOME/bench/` and reused by later runs, so a rerun times training, not setup.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infra.settings import load_settings
from stages.config import from_dict, load_preset
from stages.dataset import write_atomically
from stages.model import ModelConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    dataset: Path  # cleaned dataset directory
    tokenizer: Path  # trained tokenizer directory
    tokens: Path  # the dataset's token shards (what pretraining reads)
    model: ModelConfig
    pretrain: dict[str, Any]  # the preset's `pretrain` section (seq_len, batch_size, train: {...})


def bench_dir(name: str) -> Path:
    path = load_settings().home / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_workload(root: Path, preset: str = "tiny") -> Workload:
    """Collect + clean the builtin text, train the preset's tokenizer and tokenize, once (cached under root)."""
    from stages import clean, collect, tokenize, tokenizer

    p = load_preset(preset)
    raw, cleaned, tok = root / "collect", root / "clean", root / "tokenizer"
    if not (raw / "dataset").exists():
        collect.run(collect.CollectConfig(output_dir=raw, **p.get("collect", {})))
    if not (cleaned / "dataset").exists():
        clean.run(clean.CleanConfig(input_dir=raw / "dataset", output_dir=cleaned))
    if not (tok / "tokenizer").exists():
        tokenizer.run(tokenizer.TokenizerConfig(dataset=cleaned / "dataset", output_dir=tok,
                                                **p.get("tokenizer", {})))
    tokens = tokenize.run(tokenize.TokenizeConfig(dataset=cleaned / "dataset", tokenizer=tok / "tokenizer",
                                                  output_dir=root / "tokens")).tokens  # a no-op once done
    return Workload(dataset=cleaned / "dataset", tokenizer=tok / "tokenizer", tokens=tokens,
                    model=from_dict(ModelConfig, p["model"], "model."), pretrain=p["pretrain"])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "platform": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n"))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, MB (Ray workers, DataTrove's pool, ...): 0 once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20
