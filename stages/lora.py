"""LoRA and QLoRA through `peft`, for any stage that tunes a policy (SFT today; DPO, GRPO, PPO alike).

    flywheel stage sft ... lora.r=64 lora.alpha=16                  # the course's recipe, on q_proj/v_proj
    flywheel stage sft ... lora.r=64 lora.quantize=4bit             # QLoRA: NF4 base on CUDA

A stage nests `lora: LoraConfig` in its config and loads its policy with `checkpoint.load_policy`
(which calls `load_4bit` and `apply` here); `r=0`, the default, is full fine-tuning and leaves the model
untouched. The training loop needs nothing special: only the adapter's parameters require grad, so
the optimizer, the gradient clip and the resumable trainer state hold the adapter alone.

Checkpoints stay plain Hugging Face directories: `checkpoint.save_checkpoint` writes `merged(model)`
(base + scale * B @ A, dequantized when the base is 4-bit) plus the adapter itself under `adapter/`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

QUANTIZE = ("none", "4bit")

# peft imports bitsandbytes when it is installed; on a CPU with AVX512-BF16 its CPU backend then warns
# that an optional hub-downloaded kernel is missing. Nothing here uses bitsandbytes on a CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 0  # adapter rank; 0 = full fine-tuning (no adapter)
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    quantize: str = "none"  # "4bit": load the frozen base in NF4 through bitsandbytes (CUDA only)

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0 (0 = full fine-tuning), got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"lora.target_modules must name at least one module, got {self.target_modules!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"lora.quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize == "4bit" and self.r == 0:
            raise ValueError("lora.quantize=4bit needs lora.r > 0: QLoRA trains an adapter over a frozen 4-bit base")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def is_adapted(model: torch.nn.Module) -> bool:
    """True for a peft model (an adapter over a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def check_device(cfg: LoraConfig, device: torch.device, where: str = "lora") -> None:
    """Refuse 4-bit off CUDA before any work starts; `where` is the config path, e.g. "sft.lora"."""
    if cfg.quantize == "4bit" and torch.device(device).type != "cuda":
        raise ValueError(f"{where}.quantize=4bit (QLoRA) needs a CUDA GPU: bitsandbytes' NF4 kernels do not run "
                         f"on {torch.device(device).type}; use {where}.quantize=none (plain LoRA) here")


def load_4bit(path, device: torch.device) -> PreTrainedModel:
    """The base in 4-bit NF4 (double-quantized, bf16 compute) on `device`, frozen and prepared for
    k-bit training: norms upcast to fp32, gradient checkpointing on (memory is QLoRA's point)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device.index or 0})
    model.config._attn_implementation = "sdpa"
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def apply(model: PreTrainedModel, cfg: LoraConfig, seed: int = 0) -> torch.nn.Module:
    """Wrap `model` in a LoRA adapter (peft.get_peft_model); `r=0` returns `model` itself.

    The adapter's A matrices are initialised from `seed` (B starts at zero, so the adapted model
    starts equal to its base), without touching the caller's RNG streams.
    """
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none")
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def _dense_weight(module: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain fp32 CPU tensor; a bitsandbytes 4-bit weight is dequantized first."""
    if name == "weight" and type(param).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        param = dequantize_module_weight(module)
    return param.detach().to("cpu", torch.float32)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under their plain names, each adapted layer as W + scale * B @ A.

    Computed in fp32 from the dense (dequantized) base weights: merging into 4-bit weights and then
    dequantizing would round the small LoRA update away in the NF4 grid.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in adapted):
            continue  # inside an adapted layer: lora_A, lora_B, base_layer were handled with it
        if isinstance(module, LoraLayer):
            adapted.append(name)
            layer = module.get_base_layer()
            weight = _dense_weight(layer, "weight", layer.weight)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
            state[f"{name}.weight"] = weight
            if getattr(layer, "bias", None) is not None:
                state[f"{name}.bias"] = _dense_weight(layer, "bias", layer.bias)
            continue
        # remove_duplicate=False: a tied lm_head still names its (shared) weight.
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            state[f"{name}.{pname}" if name else pname] = _dense_weight(module, pname, param)
    return state


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """A plain fp32 CPU model equal to the adapted one (base + scale * B @ A); the live model is untouched.

    Works for 4-bit bases too (dequantized). A model without an adapter is returned as it is.
    """
    if not is_adapted(model):
        return model
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged model is full precision
    # Building the model initialises weights it is about to overwrite: keep that off the RNG streams a
    # training run resumes from (a merge happens at every checkpoint).
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    plain.config._attn_implementation = "sdpa"
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


@contextlib.contextmanager
def reference_view(model: torch.nn.Module, frozen: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference policy to score with: `frozen` (full fine-tuning's frozen copy) when there is one,
    else the LoRA `model` itself with its adapter disabled (= the starting policy, since B starts at 0),
    in eval mode for the pass so adapter dropout cannot touch it."""
    if frozen is not None:
        yield frozen
        return
    if not is_adapted(model):
        raise ValueError("a reference needs a frozen copy or a LoRA model whose adapter can be disabled")
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)
