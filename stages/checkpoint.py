"""One checkpoint format for every stage: a Hugging Face directory plus `meta.json`.

    <output_dir>/checkpoints/step-000200/   resumable: HF files + meta.json + trainer_state.pt
    <output_dir>/final/                      the stage's product: HF files + meta.json

Any of them loads with `AutoModelForCausalLM.from_pretrained(dir)`. Directories are written under a
temporary name and renamed last, so a crash mid-save never leaves a checkpoint that looks complete.

An FSDP run (every rank holds a shard of the weights and of the optimizer) writes its trainer state
sharded instead, through `torch.distributed.checkpoint`: each rank writes its own shards into
`sharded/` of the shared temporary directory, the coordinator writes `sharded/.metadata` once all
have, rank 0 adds the HF files (gathered to a full state dict), meta.json and trainer_state.pt (the
scheduler, RNG and step: no weights), and renames the directory last. Resume needs both markers.

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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from stages import lora
from stages.dataset import atomic_dir, commit_dir

hf_logging.disable_progress_bar()  # no "Writing model shards" bar on every checkpoint

META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
SHARDED = "sharded"  # torch.distributed.checkpoint's files: one per rank, plus .metadata written last
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
                    trainer_state: dict[str, Any] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an HF directory + meta.json (+ trainer state) atomically at `path`; a peft model is written
    merged, plus its adapter under `adapter/`. `state_dict` (a sharded model's, gathered) replaces the
    model's own tensors."""
    path = Path(path)
    tmp = atomic_dir(path)
    _write(tmp, model, tokenizer, meta, trainer_state, state_dict)
    commit_dir(tmp, path)
    return path


def _write(tmp: Path, model, tokenizer, meta: dict[str, Any], trainer_state: dict[str, Any] | None,
           state_dict: dict[str, torch.Tensor] | None) -> None:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    plain = lora.merged(model)
    plain.generation_config = generation_config(tokenizer)
    if state_dict is not None:
        # A gathered state dict holds tied weights (lm_head = embeddings) as separate copies, which
        # save_pretrained cannot recognise as one: keep the name it would keep.
        aliases = ({n for n, _ in plain.named_parameters(remove_duplicate=False)}
                   - {n for n, _ in plain.named_parameters()})
        state_dict = {k: v for k, v in state_dict.items() if k not in aliases}
    plain.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if plain is not model:
        model.save_pretrained(tmp / ADAPTER, safe_serialization=True)
        meta = {**meta, "adapter": ADAPTER}
    tokenizer.save_pretrained(tmp)
    meta = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(), **meta}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's weights gathered whole onto rank 0's CPU (other ranks get {}). Every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, model: torch.nn.Module, tokenizer, meta: dict[str, Any],
                 optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]) -> Path:
    """A resumable checkpoint of an FSDP run (every rank calls it): model and optimizer as each rank's
    shards, plus the HF files of the whole model. `path` must be on storage every rank writes to."""
    rank = dist.get_rank()
    holder = [str(atomic_dir(path)) if rank == 0 else None]  # one temporary directory for all ranks
    dist.broadcast_object_list(holder, src=0)
    tmp = Path(holder[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED)
    full = full_state_dict(model)
    if rank == 0:
        _write(tmp, model, tokenizer, meta, trainer_state, full)
        commit_dir(tmp, path)
    dist.barrier()  # no rank goes on (and maybe prunes or resumes) before the checkpoint is in place
    return path


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer from `save_sharded`'s shards (every rank calls it). DCP can reshard to
    another world size; only the same world size is tested here."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=Path(path) / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def _is_resumable(path: Path) -> bool:
    """Both completion markers: trainer_state.pt (written last before the rename) and, for a sharded
    checkpoint, DCP's .metadata (written once every rank's shards are)."""
    return (path / TRAINER_STATE).exists() and (not is_sharded(path) or (path / SHARDED / ".metadata").exists())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest complete resumable checkpoint (temporary directories never match the pattern)."""
    found = sorted((Path(output_dir) / "checkpoints").glob("step-[0-9]*"))
    found = [p for p in found if _is_resumable(p)]
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    # Counted among complete checkpoints only: a stray incomplete one must not push a good one out.
    found = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-[0-9]*") if _is_resumable(p))
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
