"""The planner's numbers against hand calculations (formulas: stages/planner.py's docstring)."""

from __future__ import annotations

import pytest
import torch

from stages.config import ConfigError
from stages.planner import (Shape, activation_memory, flops_per_token, make_plan, parse_size, peak_flops,
                            preset_model, state_memory)

N = 124_000_000


def test_124m_on_8_h100_tokens_flops_and_wall_time() -> None:
    plan = make_plan(params=N, gpus=8, gpu="h100", mfu=0.4)
    assert plan.tokens == 2_480_000_000 and plan.tokens_from_params
    assert plan.train_flops == pytest.approx(1.84512e18, rel=1e-12)  # 6 · 124e6 · 2.48e9
    assert plan.seconds == pytest.approx(1.84512e18 / (8 * 989e12 * 0.4), rel=1e-12)  # ≈ 583 s
    assert plan.gpu == "H100" and not plan.with_attention and plan.activations is None


def test_given_tokens_override_and_attention_term_as_in_pretrain() -> None:
    plan = make_plan(params=N, gpus=2, gpu="A100", mfu=0.5, tokens=10**10, seq_len=1024,
                     shape=Shape(num_layers=12, hidden_size=768))
    per_token = 6 * N + 12 * 12 * 768 * 1024  # the count stages/pretrain.py logs train/mfu with
    assert plan.tokens == 10**10 and not plan.tokens_from_params
    assert plan.flops_per_token == per_token == flops_per_token(N, 12, 768, 1024)
    assert plan.seconds == pytest.approx(per_token * 1e10 / (2 * 312e12 * 0.5))


def test_state_memory_per_gpu_of_each_strategy_for_124m_on_8_gpus() -> None:
    m = state_memory(N, 8)
    g = N // 8  # 15.5e6 parameters per shard
    expected = {  # (weights, grads, optimizer) bytes per GPU
        "DDP": (2 * N, 2 * N, 12 * N),  # 1.984e9 B in all
        "ZeRO-1": (2 * N, 2 * N, 12 * g),  # 0.682e9
        "ZeRO-2": (2 * N, 2 * g, 12 * g),  # 0.465e9
        "ZeRO-3": (2 * g, 2 * g, 12 * g),  # 0.248e9
        "FSDP": (4 * g, 4 * g, 8 * g),  # fp32 shards: the same 0.248e9, split otherwise
    }
    assert {k: (v.weights, v.grads, v.optimizer) for k, v in m.items()} == expected
    assert [m[k].total for k in expected] == [1_984_000_000, 682_000_000, 465_000_000, 248_000_000, 248_000_000]
    assert all(v.gathered is None for v in m.values())


def test_shards_round_up_and_gathered_units_count_two_bf16_blocks() -> None:
    m = state_memory(10, 3, block_params=1000)
    assert (m["ZeRO-3"].weights, m["ZeRO-3"].optimizer) == (7, 40)  # ceil(20/3), ceil(120/3)
    assert m["ZeRO-3"].gathered == m["FSDP"].gathered == 4000 and m["DDP"].gathered is None
    assert m["ZeRO-3"].total == 7 + 7 + 40 + 4000
    # Without a preset's exact block, 12·h²: 12 · 768² params → 2 blocks × 2 B.
    assert make_plan(params=N, gpus=8, gpu="h100", shape=Shape(num_layers=12, hidden_size=768)) \
        .memory["FSDP"].gathered == 2 * 2 * 12 * 768**2


def test_activation_memory_with_and_without_checkpointing() -> None:
    L, h, s, b, a, V = 12, 768, 1024, 8, 12, 32768
    sbh = s * b * h
    acts = activation_memory(num_layers=L, hidden_size=h, seq_len=s, micro_batch=b, num_heads=a, vocab_size=V)
    assert acts.eager == L * (34 * sbh + 5 * a * s * s * b) == L * sbh * (34 + 5 * a * s // h) == 8_606_711_808
    assert acts.flash == L * 34 * sbh == 2_566_914_048
    assert acts.checkpointed == L * 2 * sbh + 34 * sbh == 364_904_448
    assert acts.logits == 4 * s * b * V
    bare = activation_memory(num_layers=L, hidden_size=h, seq_len=s, micro_batch=b)
    assert bare.eager is None and bare.logits is None and bare.flash == acts.flash


@pytest.mark.parametrize("text,n", [("124M", 124_000_000), ("1.3B", 1_300_000_000), ("350m", 350_000_000),
                                    ("7b", 7_000_000_000), ("2.5e9", 2_500_000_000), ("800K", 800_000),
                                    ("1T", 10**12), ("123456", 123_456), (" 1.5 B ", 1_500_000_000)])
def test_sizes_parse(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "12X", "1.3BB", "-5M", "0", "abc"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


def test_unknown_gpu_is_one_error_listing_the_known_ones() -> None:
    assert peak_flops("h200") == ("H200", 989e12)
    with pytest.raises(ConfigError, match=r"gpu: unknown accelerator 'h800' \(known: A100, H100, H200, L4\)"):
        make_plan(params=N, gpus=8, gpu="h800")


@pytest.mark.parametrize("kw,field", [({"gpus": 0}, "gpus"), ({"mfu": 0.0}, "mfu"), ({"mfu": 1.5}, "mfu"),
                                      ({"params": 0}, "params"), ({"micro_batch": 0}, "micro_batch")])
def test_bad_inputs_name_their_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make_plan(**{"params": N, "gpus": 8, "gpu": "h100", **kw})


def _llama_params(V: int, h: int, L: int, heads: int, kv: int, inter: int) -> int:
    kv_dim = h // heads * kv
    block = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h  # q, o; k, v; SwiGLU; two RMSNorms
    return V * h + L * block + h  # tied embedding, final norm


def test_presets_count_their_parameters_without_building_weights() -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    n, shape = preset_model("gpt2-124m")
    assert torch.equal(torch.rand(3), expected_draw)  # counting left the caller's RNG alone
    # vocab 32768 + the 4 reasoning markers the tokenizer adds
    assert n == _llama_params(32772, 768, 12, 12, 12, 2048) == 110_122_752
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.vocab_size) == (12, 768, 12, 32772)
    assert shape.block_params == 12 * 768**2 + 2 * 768 and (shape.seq_len, shape.batch_size) == (1024, 64)
    n, shape = preset_model("tiny")  # grouped-query attention: 2 kv heads of 4
    assert n == _llama_params(4100, 128, 4, 4, 2, 384) == 1_312_384


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid presets: .*gpt2-124m"):
        preset_model("gpt5")
