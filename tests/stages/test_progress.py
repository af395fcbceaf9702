"""Progress where no one watches a terminal (a Ray worker, CI, a log file): one line per log window,
not a tqdm refresh per line."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from stages import pretrain
from stages.train_loop import read_metrics_log
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
        assert re.fullmatch(r"pretrain \d/6 \(\d+%\) loss \d+\.\d{3} \| [\d,]+ tok/s \| [\d.]+ steps/s \| "
                            r"ETA \d+:\d\d:\d\d", line), line
    assert lines[-1].endswith("ETA 0:00:00")
    # Each window also records the peak memory so far (what the DDP vs FSDP benchmark reads).
    peaks = [row["memory/peak_rss_mb"] for row in read_metrics_log(tmp_path / "pt")]
    assert len(peaks) == 3 and peaks == sorted(peaks) and peaks[0] > 50
    assert "pretrain:" not in capsys.readouterr().err  # no tqdm bar ("pretrain: 33%|...") beside the lines
