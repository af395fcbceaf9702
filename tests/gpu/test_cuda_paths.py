"""The CUDA paths, run on a lent GPU: bf16 autocast, torch.compile, SDPA (flash) attention, MFU.

    pytest -m gpu tests/gpu        # skipped where torch.cuda.is_available() is false

Self-contained (no services, no Ray): these tests prove the stage code itself on the device.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from stages import collect, tokenizer

    root = tmp_path_factory.mktemp("gpu")
    data = collect.run(collect.CollectConfig(output_dir=root / "collect", max_builtin_chars=400_000,
                                             arithmetic_problems=1000)).dataset
    tok = tokenizer.run(tokenizer.TokenizerConfig(dataset=data, output_dir=root / "tok", vocab_size=4096)).tokenizer_dir
    return root, data, tok


@pytest.fixture(scope="module")
def pretrained(corpus):
    from stages import pretrain, tokenize
    from stages.config import from_dict, load_preset
    from stages.model import ModelConfig
    from stages.tracking import RecordingTracker
    from stages.train_loop import TrainConfig

    root, data, tok = corpus
    tracker = RecordingTracker()
    model = from_dict(ModelConfig, load_preset("small")["model"])  # ~20 M parameters, head_dim 64
    tokens = tokenize.run(tokenize.TokenizeConfig(dataset=data, tokenizer=tok, output_dir=root / "tokens")).tokens
    cfg = pretrain.PretrainConfig(tokens=tokens, tokenizer=tok, output_dir=root / "pretrain", model=model,
                                  seq_len=512, batch_size=32, eval_windows=16,
                                  train=TrainConfig(max_steps=60, lr=1e-3, warmup_steps=10, log_every=10,
                                                    checkpoint_every=30, progress=False))
    return pretrain.run(cfg, tracker), tracker


def test_pretrain_uses_bf16_compile_and_reports_mfu(pretrained):
    result, tracker = pretrained
    losses = tracker.series("train/loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    mfu = tracker.series("train/mfu")
    assert mfu and all(0 < m < 1 for m in mfu), mfu
    print(f"\nGPU pretrain (small preset): tokens/s {tracker.series('train/tokens_per_s')}, MFU {mfu}")
    assert math.isfinite(result.metrics["eval/heldout/perplexity"])


def test_checkpoint_from_gpu_is_fp32_and_loads_on_cpu(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = pretrained
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert next(model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights
    tok = AutoTokenizer.from_pretrained(result.checkpoint)
    enc = tok("def main():", return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=4, do_sample=False).shape[1] > enc["input_ids"].shape[1]


def test_sdpa_dispatches_to_flash_attention_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot serve this call
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.shape == q.shape


def test_alignment_stages_run_on_cuda(corpus, pretrained):
    from stages import dpo, grpo, sft
    from stages.tracking import RecordingTracker
    from stages.train_loop import TrainConfig

    root, data, _ = corpus
    base = pretrained[0].checkpoint
    fast = dict(log_every=2, checkpoint_every=100, progress=False)
    s = sft.run(sft.SFTConfig(dataset=data, policy=base, output_dir=root / "sft",
                              train=TrainConfig(max_steps=10, lr=1e-3, warmup_steps=2, **fast)))
    d = dpo.run(dpo.DPOConfig(dataset=data, policy=s.checkpoint, output_dir=root / "dpo",
                              train=TrainConfig(max_steps=4, lr=1e-4, warmup_steps=1, **fast)))
    tracker = RecordingTracker()
    g = grpo.run(grpo.GRPOConfig(dataset=data, policy=d.checkpoint, output_dir=root / "grpo", group_size=4,
                                 prompts_per_step=4, max_new_tokens=16,
                                 train=TrainConfig(max_steps=2, lr=1e-5, warmup_steps=0, **fast)), tracker)
    for r in (s, d, g):
        assert math.isfinite(r.metrics["train/loss"])
    assert tracker.series("rl/kl") and all(math.isfinite(x) for x in tracker.series("rl/kl"))


def test_first_grpo_update_has_ratio_one_and_zero_kl_under_bf16_compile(corpus, pretrained, monkeypatch):
    # On CUDA the loss runs under bf16 autocast and torch.compile. The "old" log-probs are the first
    # update's own, so the ratio is exactly 1; the reference is scored under the same autocast, so
    # k3 is ~0 (not exactly: the compiled and eager kernels round differently).
    from stages import grpo
    from stages.tracking import RecordingTracker
    from stages.train_loop import TrainConfig

    root, data, _ = corpus
    ratios = []
    real = grpo.grpo_loss

    def spy(logp, old, *args, **kwargs):
        ratios.append(torch.exp(logp.detach() - old).masked_select(args[2].bool()))
        return real(logp, old, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    tracker = RecordingTracker()
    grpo.run(grpo.GRPOConfig(dataset=data, policy=pretrained[0].checkpoint, output_dir=root / "grpo-ratio",
                             group_size=4, prompts_per_step=4, max_new_tokens=16, temperature=0.7,
                             updates_per_rollout=2,
                             train=TrainConfig(max_steps=2, lr=1e-5, warmup_steps=0, log_every=1,
                                               checkpoint_every=2, progress=False)), tracker)
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    assert tracker.series("rl/kl")[0] < 1e-3
    assert tracker.series("rl/clip_fraction")[0] == 0.0
