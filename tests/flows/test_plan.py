"""`flywheel plan` through argparse as flows/plan.py registers it: the printed lines."""

from __future__ import annotations

import argparse

import pytest

from flows.plan import add_parser
from stages.config import ConfigError


def _plan(argv: list[str], capsys) -> list[str]:
    p = argparse.ArgumentParser(prog="flywheel")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["plan", *argv])
    assert args.fn(args) == 0
    return capsys.readouterr().out.splitlines()


def _line(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_124m_on_8_h100(capsys) -> None:
    lines = _plan(["--params", "124M", "--gpus", "8", "--gpu", "h100", "--mfu", "0.4"], capsys)
    assert lines[0] == "flywheel plan: 124M parameters on 8 × H100 at MFU 0.4"
    assert _line(lines, "tokens").split(None, 1)[1] == "2.48B, compute-optimal (20 per parameter)"
    assert "7.440e+08 = 6·N (attention left out" in _line(lines, "FLOPs/token")
    assert "1.845e+18" in _line(lines, "train FLOPs")
    # 1.84512e18 / (8 · 989e12 · 0.4) = 583.0 s
    assert _line(lines, "wall time").split(None, 2)[2].startswith("9.7 min (583 s) = FLOPs / (8 × H100 989 TFLOP/s")
    table = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["DDP"], ["ZeRO-1"],
                                                                                         ["ZeRO-2"], ["ZeRO-3"], ["FSDP"])}
    assert table == {  # GiB: 124e6 · bytes / 2^30
        "DDP": ["0.23", "0.23", "1.39", "-", "1.85"],
        "ZeRO-1": ["0.23", "0.23", "0.17", "-", "0.64"],
        "ZeRO-2": ["0.23", "0.03", "0.17", "-", "0.43"],
        "ZeRO-3": ["0.03", "0.03", "0.17", "-", "0.23"],
        "FSDP": ["0.06", "0.06", "0.12", "-", "0.23"],
    }
    assert lines[-1] == "activations: give --layers, --hidden and --micro-batch"


def test_preset_counts_its_model_and_adds_attention_and_activations(capsys) -> None:
    lines = _plan(["--preset", "gpt2-124m", "--gpus", "8", "--gpu", "H200", "--tokens", "10B"], capsys)
    assert _line(lines, "model").endswith("110M parameters (preset gpt2-124m: 12 layers, hidden 768, 12 heads, vocab 32,772)")
    assert _line(lines, "tokens").endswith("10.0B, given")
    # 6 · 110,122,752 + 12 · 12 · 768 · 1024 (the preset's seq_len)
    assert f"{6 * 110_122_752 + 12 * 12 * 768 * 1024:.3e} = 6·N + 12·L·h·s (s = 1024)" in _line(lines, "FLOPs/token")
    assert _line(lines, "strategy").split() == ["strategy", "weights", "grads", "optimizer", "gathered", "total",
                                                "+", "act", "+", "act", "ckpt"]  # totals with activations
    fsdp = _line(lines, "FSDP").split()
    assert fsdp[4] == "0.03"  # two bf16 blocks of 7,079,424 parameters
    assert any(line.split()[:3] == ["activations", "per", "GPU,"] and "micro-batch 8 × 1024" in line for line in lines)
    assert _line(lines, "  flash attention").split()[2] == "2.39"  # 12 · 34 · 1024 · 8 · 768 B
    assert _line(lines, "  checkpointed").split()[1] == "0.34"


def test_bad_gpu_and_bad_size_are_one_clear_error(capsys) -> None:
    p = argparse.ArgumentParser(prog="flywheel")
    add_parser(p.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        p.parse_args(["plan", "--params", "124M", "--gpus", "8", "--gpu", "h800"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "flywheel plan: error: argument --gpu: unknown accelerator 'h800' (known: A100, H100, H200, L4)"
    with pytest.raises(SystemExit):
        p.parse_args(["plan", "--params", "12X", "--gpus", "8", "--gpu", "h100"])
    assert "argument --params: size '12X': expected a number" in capsys.readouterr().err


def test_preset_refuses_shape_flags(capsys) -> None:
    with pytest.raises(ConfigError, match="--preset fixes the model's shape; drop --layers"):
        _plan(["--preset", "tiny", "--gpus", "1", "--gpu", "l4", "--layers", "3"], capsys)
