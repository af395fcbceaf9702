"""One checkpoint format for every stage: a Hugging Face directory plus `meta.json`.

    <output_dir>/checkpoints/step-000200/   resumable: HF files + meta.json + trainer_state.pt
    <output_dir>/final/                      the stage's product: HF files + meta.json

Any of them loads with `AutoModelForCausalLM.from_pretrained(dir)`. Directories are written under a
temporary name and renamed last, so a crash mid-save never leaves a checkpoint that looks complete.

A LoRA/QLoRA policy (stages/lora.py) is saved merged (base + scale * B @ A, full precision) so the
directory stays a plain model for every reader, with the adapter itself under `adapter/` (peft's
format, for vLLM's LoRA hot-loading over the parent model).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from stages import lora
from stages.dataset import atomic_dir, commit_dir

hf_logging.disable_progress_bar()  # no "Writing model shards" bar on every checkpoint

META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
ADAPTER = "adapter"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def generation_config(tokenizer) -> GenerationConfig:
    # A chat turn ends with the tokenizer's eos (the template's end-of-turn token: `<|end|>` for ours, and
    # stages/base_model.py makes it so for a foreign base); a pretraining document with the bos token.
    stop = list(dict.fromkeys(t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None))
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop or None,
                            pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)


def save_checkpoint(path: Path, model: PreTrainedModel, tokenizer, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write an HF directory + meta.json (+ trainer state) atomically at `path`; a peft model is written
    merged, plus its adapter under `adapter/`."""
    path = Path(path)
    tmp = atomic_dir(path)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    plain = lora.merged(model)
    plain.generation_config = generation_config(tokenizer)
    plain.save_pretrained(tmp, safe_serialization=True)
    if plain is not model:
        model.save_pretrained(tmp / ADAPTER, safe_serialization=True)
        meta = {**meta, "adapter": ADAPTER}
    tokenizer.save_pretrained(tmp)
    meta = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(), **meta}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    commit_dir(tmp, path)
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest complete resumable checkpoint (temporary directories never match the pattern)."""
    found = sorted((Path(output_dir) / "checkpoints").glob("step-[0-9]*"))
    found = [p for p in found if (p / TRAINER_STATE).exists()]
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = sorted((Path(output_dir) / "checkpoints").glob("step-[0-9]*"))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model(path: Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model.to(device)


def load_policy(path: Path, lora_cfg: lora.LoraConfig | None = None, *, device: str | torch.device = "cpu",
                where: str = "lora", seed: int = 0) -> torch.nn.Module:
    """The policy a tuning stage starts from: the checkpoint, in 4-bit NF4 when `lora_cfg.quantize` says
    so (CUDA only; `where` names the config key in the error), with a LoRA adapter when `lora_cfg.r > 0`."""
    lora_cfg = lora_cfg or lora.LoraConfig()
    lora.check_device(lora_cfg, torch.device(device), where)
    model = lora.load_4bit(path, torch.device(device)) if lora_cfg.quantize == "4bit" else load_model(path, device)
    return lora.apply(model, lora_cfg, seed=seed)


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)


def final_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "final"


def is_complete(output_dir: Path) -> bool:
    """A stage whose final checkpoint exists has finished; a retry can return it as is."""
    return (final_dir(output_dir) / META).exists() and os.path.exists(final_dir(output_dir) / "config.json")


def parent_summary(policy: Path) -> dict[str, Any]:
    """The parent checkpoint's stage, lineage and parent: every checkpoint names its ancestry."""
    try:
        meta = read_meta(policy)
    except FileNotFoundError:
        return {}
    # The config travels too: a checkpoint copied out of the registry, away from its ancestors'
    # folders, still knows e.g. which documents its pretraining held out.
    # Monitor alarms too: a policy that gamed its reward passes that on to what is trained from it.
    return {"stage": meta.get("stage"), "config": meta.get("config", {}), "lineage": meta.get("lineage", {}),
            "parent": meta.get("parent"), "parent_meta": meta.get("parent_meta"),
            **({"monitors": {"alarms": meta["monitors"].get("alarms", [])}} if meta.get("monitors") else {})}


def frozen_copy(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """A frozen copy of the starting policy: the reference that DPO and GRPO measure drift against."""
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)
