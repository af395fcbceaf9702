"""QLoRA and LoRA on a lent GPU: a 4-bit NF4 base (bitsandbytes) under a LoRA adapter trains, and its
checkpoint is a plain full-precision model equal to dequantized base + alpha/r * B @ A.

    pytest -m gpu tests/gpu/test_qlora.py      # skipped where torch.cuda.is_available() is false

Self-contained: collect -> tokenizer -> a short pretraining run build the base here (a minute).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def quick(**overrides):
    from stages.train_loop import TrainConfig

    return TrainConfig(**{"log_every": 1, "progress": False, "weight_decay": 0.0, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from stages import collect, pretrain, tokenize, tokenizer
    from stages.model import ModelConfig

    root = tmp_path_factory.mktemp("qlora")
    data = collect.run(collect.CollectConfig(output_dir=root / "collect", max_builtin_chars=200_000,
                                             arithmetic_problems=1000)).dataset
    tok = tokenizer.run(tokenizer.TokenizerConfig(dataset=data, output_dir=root / "tok", vocab_size=2048)).tokenizer_dir
    model = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                        max_seq_len=256)
    tokens = tokenize.run(tokenize.TokenizeConfig(dataset=data, tokenizer=tok, output_dir=root / "tokens")).tokens
    cfg = pretrain.PretrainConfig(tokens=tokens, tokenizer=tok, output_dir=root / "pretrain", model=model, seq_len=128,
                                  batch_size=32, eval_windows=8,
                                  train=quick(max_steps=100, lr=3e-3, warmup_steps=10, checkpoint_every=100,
                                              log_every=20, compile="off"))
    return root, data, pretrain.run(cfg).checkpoint


@pytest.fixture(scope="module")
def qlora_run(base):
    from stages import sft
    from stages.lora import LoraConfig
    from stages.tracking import RecordingTracker

    root, data, policy = base
    cfg = sft.SFTConfig(dataset=data, policy=policy, output_dir=root / "qlora", batch_size=16, packing=True,
                        seq_len=256, lora=LoraConfig(r=16, alpha=32, quantize="4bit"),
                        train=quick(max_steps=24, lr=5e-3, warmup_steps=2, checkpoint_every=12))
    tracker = RecordingTracker()
    return cfg, sft.run(cfg, tracker=tracker), tracker


def test_qlora_trains_on_a_4bit_base(qlora_run):
    cfg, result, tracker = qlora_run
    losses = tracker.series("train/loss")
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    from stages import checkpoint as ckpt

    state = ckpt.load_trainer_state(ckpt.step_dir(cfg.output_dir, 24))
    assert state["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in state["trainable"])
    print(f"\nQLoRA SFT: loss {losses[0]:.3f} -> {losses[-1]:.3f}, tokens/s {tracker.series('train/tokens_per_s')[-1]:,.0f}, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def test_qlora_checkpoint_is_the_merged_full_precision_model(qlora_run, base):
    from peft import PeftModel
    from peft.utils.integrations import dequantize_module_weight
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages import checkpoint as ckpt
    from stages.lora import load_4bit

    cfg, result, _ = qlora_run
    final = result.checkpoint
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config
    merged = load_file(final / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert not any("lora" in k or "base_layer" in k or "absmax" in k for k in merged)
    adapter = load_file(final / ckpt.ADAPTER / "adapter_model.safetensors")

    # The 4-bit base as training saw it, with the saved adapter: every merged weight is exact.
    _, _, policy = base
    base4 = load_4bit(policy, torch.device("cuda"))
    assert type(base4.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    k = dequantize_module_weight(base4.model.layers[0].self_attn.k_proj).float().cpu()
    torch.testing.assert_close(merged["model.layers.0.self_attn.k_proj.weight"], k, atol=0, rtol=0)
    q = dequantize_module_weight(base4.model.layers[0].self_attn.q_proj).float().cpu()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (32 / 16) * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    assert delta.abs().max() > 0
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], q + delta, atol=1e-5, rtol=0)

    # A plain reader loads it on the CPU and it answers like the adapted 4-bit model.
    plain = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    enc = tok(["Alice has 3 apples. Alice gets 4 more. How many apples does Alice have now?"], return_tensors="pt",
              add_special_tokens=False)
    adapted = PeftModel.from_pretrained(base4, final / ckpt.ADAPTER).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = adapted(**enc.to("cuda")).logits.float().cpu()
    with torch.no_grad():
        cpu = plain(**enc.to("cpu")).logits
    agree = (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert plain.generate(**enc, max_new_tokens=4, do_sample=False).shape[1] > enc["input_ids"].shape[1]


def test_lora_without_quantization_trains_compiled_on_cuda(base):
    # train.compile=auto: torch.compile wraps the peft model on CUDA (QLoRA alone runs eager).
    from stages import checkpoint as ckpt
    from stages import sft
    from stages.lora import LoraConfig
    from stages.tracking import RecordingTracker

    root, data, policy = base
    tracker = RecordingTracker()
    result = sft.run(sft.SFTConfig(dataset=data, policy=policy, output_dir=root / "lora", batch_size=16,
                                   lora=LoraConfig(r=8, alpha=16),
                                   train=quick(max_steps=6, lr=5e-3, warmup_steps=1, checkpoint_every=6)), tracker)
    assert all(math.isfinite(x) for x in tracker.series("train/loss"))
    assert (result.checkpoint / ckpt.ADAPTER / "adapter_config.json").exists()
    assert ckpt.read_meta(result.checkpoint)["adapter"] == ckpt.ADAPTER
