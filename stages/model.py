"""The one model family: a Llama-architecture causal LM built from config (RoPE, RMSNorm, SwiGLU, GQA).

No weights are downloaded: presets (stages/presets/*.yaml, section `model`) size the network and the
tokenizer fixes the vocabulary. The result is a plain `transformers.LlamaForCausalLM`, so every
checkpoint loads unchanged in transformers, vLLM and lm-evaluation-harness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1  # < num_heads: grouped-query attention
    intermediate_size: int = 192  # SwiGLU width
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        # vLLM's CPU attention refuses head_dim 16; keep every preset servable.
        if self.hidden_size // self.num_heads < 32:
            raise ValueError(f"model: head_dim = hidden_size/num_heads = {self.hidden_size // self.num_heads} < 32 (vLLM cannot serve it)")


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
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


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the seed makes initial weights identical across ranks and reruns."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    model.config._attn_implementation = "sdpa"  # fused attention kernels (flash on CUDA)
    return model


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n
