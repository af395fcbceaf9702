"""Progress where no one watches a terminal (a Ray worker, CI, a log file): one line per log window,
not a tqdm refresh per line."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from stages import checkpoint as ckpt, planner, pretrain
from stages.model import active_parameters, build_model
from stages.train_loop import measured_matmul_flops, read_metrics_log
from .conftest import pretrain_config


def test_progress_is_one_line_per_log_window_off_a_terminal(tokens: Path, tokenizer_dir: Path, tmp_path: Path,
                                                            caplog, capsys) -> None:
    cfg = pretrain_config(tokens, tokenizer_dir, tmp_path / "pt", max_steps=6, log_every=2, checkpoint_every=6,
                          progress=True)
    with caplog.at_level(logging.INFO, logger="stages.train_loop"):
        pretrain.run(cfg)  # pytest captures stderr: not a terminal
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain ")]
    assert [line.split(" (")[0] for line in lines] == ["pretrain 2/6", "pretrain 4/6", "pretrain 6/6"]
    for line in lines:
        assert re.fullmatch(r"pretrain \d/6 \(\d+%\) loss \d+\.\d{3} \| [\d,]+ tok/s \| MFU \d+\.\d% \| "
                            r"[\d.]+ steps/s \| ETA \d+:\d\d:\d\d", line), line
    assert lines[-1].endswith("ETA 0:00:00")
    # Each window also records the peak memory so far (what the DDP vs FSDP benchmark reads).
    peaks = [row["memory/peak_rss_mb"] for row in read_metrics_log(tmp_path / "pt")]
    assert len(peaks) == 3 and peaks == sorted(peaks) and peaks[0] > 50
    assert "pretrain:" not in capsys.readouterr().err  # no tqdm bar ("pretrain: 33%|...") beside the lines


def _flops_per_token(cfg) -> float:
    """The count pretrain logs MFU with, by hand from the model it trains."""
    model = build_model(cfg.model, ckpt.load_tokenizer(cfg.tokenizer), seed=0)
    return planner.flops_per_token(active_parameters(model), cfg.model.num_layers, cfg.model.hidden_size, cfg.seq_len)


def test_cpu_mfu_is_measured_against_this_processs_matmul_peak(tokens: Path, tokenizer_dir: Path,
                                                                 tmp_path: Path) -> None:
    # No vendor table covers an arbitrary CPU: the denominator is a timed fp32 matmul, logged beside MFU.
    cfg = pretrain_config(tokens, tokenizer_dir, tmp_path / "pt", max_steps=4, log_every=2, checkpoint_every=4)
    pretrain.run(cfg)
    rows = read_metrics_log(tmp_path / "pt")
    peak = measured_matmul_flops(torch.get_num_threads())  # cached: the very figure the run used
    assert [row["train/peak_flops"] for row in rows] == [peak, peak]
    for row in rows:
        # A 2-layer, hidden-64 model is far from matmul-bound: well under the kernel's ceiling.
        assert 0 < row["train/mfu"] < 1
        assert row["train/mfu"] == pytest.approx(row["train/tokens_per_s"] * _flops_per_token(cfg) / peak)


def test_configured_peak_flops_is_the_mfu_denominator(tokens: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    cfg = pretrain_config(tokens, tokenizer_dir, tmp_path / "pt", max_steps=2, log_every=2, peak_flops=1e9)
    pretrain.run(cfg)
    [row] = read_metrics_log(tmp_path / "pt")
    assert row["train/peak_flops"] == 1e9
    assert row["train/mfu"] == pytest.approx(row["train/tokens_per_s"] * _flops_per_token(cfg) / 1e9)
