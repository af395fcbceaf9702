"""The model family: Llama-architecture causal LMs built from config (RoPE, RMSNorm, SwiGLU, GQA), dense
or with a mixture of experts in place of each SwiGLU (Mixtral).

No weights are downloaded: presets (stages/presets/*.yaml, section `model`) size the network and the
tokenizer fixes the vocabulary. The result is a plain `transformers.LlamaForCausalLM` or
`MixtralForCausalLM`, so every checkpoint loads unchanged in transformers, vLLM and lm-evaluation-harness.

A Mixtral model is built with `output_router_logits=True`, so its forward with labels returns
`loss = cross-entropy + router_aux_loss_coef * aux_loss` (the Switch-Transformer load-balancing loss)
and `aux_loss` beside it: any objective that optimises `out.loss` trains the router to balance, and
`loss_parts` names the two terms for the logs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

ARCHITECTURES = ("llama", "mixtral")
_MOE_FIELDS = ("num_experts", "experts_per_token", "router_aux_loss_coef")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str = "llama"  # llama: dense SwiGLU; mixtral: each SwiGLU becomes num_experts routed experts
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1  # < num_heads: grouped-query attention
    intermediate_size: int = 192  # SwiGLU width (of each expert under mixtral)
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # mixtral only: a token's MLP output is the router-weighted sum of its top experts_per_token experts.
    num_experts: int = 0
    experts_per_token: int = 2
    # Weight of the load-balancing loss in the training loss: 0.01 as in Switch and Qwen-MoE (Mixtral
    # ships 0.001); without it the router collapses onto a few experts and the rest stop learning.
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        # vLLM's CPU attention refuses head_dim 16; keep every preset servable.
        if self.hidden_size // self.num_heads < 32:
            raise ValueError(f"model: head_dim = hidden_size/num_heads = {self.hidden_size // self.num_heads} < 32 (vLLM cannot serve it)")
        if self.architecture == "llama":
            # A dense model would silently ignore them: say so instead.
            defaults = {f.name: f.default for f in fields(self)}
            for name in _MOE_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"model.{name} is set but model.architecture=llama has no experts "
                                     "(set model.architecture=mixtral)")
            return
        if self.num_experts < 2:
            raise ValueError(f"model.num_experts={self.num_experts}: architecture=mixtral needs at least 2 experts")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"model.experts_per_token={self.experts_per_token} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"model.router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")

    @property
    def is_moe(self) -> bool:
        return self.architecture == "mixtral"


def _common(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(**_common(cfg, tokenizer))


def mixtral_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> MixtralConfig:
    return MixtralConfig(
        **_common(cfg, tokenizer),
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=True,  # the forward then adds the balancing loss to `loss` (see the module doc)
        router_jitter_noise=0.0,  # noise would make a resumed run differ from an uninterrupted one
        sliding_window=None,
    )


def hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    return mixtral_config(cfg, tokenizer) if cfg.is_moe else llama_config(cfg, tokenizer)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model; the seed makes initial weights identical across ranks and reruns."""
    torch.manual_seed(seed)
    model_cls = MixtralForCausalLM if cfg.is_moe else LlamaForCausalLM
    model = model_cls(hf_config(cfg, tokenizer))
    model.config._attn_implementation = "sdpa"  # fused attention kernels (flash on CUDA)
    return model


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token passes through: all of a dense model's, and only experts_per_token of each
    MoE layer's experts. Training FLOPs per token are 6x this, not 6x the total (for MFU)."""
    total = count_parameters(model)
    config = getattr(model, "module", model).config  # a DDP wrapper holds the model as .module
    experts = getattr(config, "num_local_experts", 0)
    if not experts:
        return total
    per_expert = 3 * config.hidden_size * config.intermediate_size  # gate, up and down projections
    return total - config.num_hidden_layers * (experts - config.num_experts_per_tok) * per_expert


def loss_parts(model: torch.nn.Module, out) -> dict[str, float]:
    """The terms inside an MoE forward's `loss`, for the logs: `train/aux_loss` (the load-balancing loss
    before its coefficient, ~experts_per_token when balanced) and `train/lm_loss` (cross-entropy alone).
    A dense model's output has no aux_loss: empty."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or out.loss is None:
        return {}
    coef = getattr(model, "module", model).config.router_aux_loss_coef
    aux = aux.detach().item()
    return {"train/aux_loss": aux, "train/lm_loss": out.loss.detach().item() - coef * aux}
