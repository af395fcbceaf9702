"""The scripts a session lent a GPU runs first (`benchmarks/gpu_mfu.py`, the nanochat side-by-side) must not
meet a typo there.

On CPU it runs the same code paths in fp32 (no bf16, no compile), as a plain script from another
directory, exactly as it would be started on the device machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_mfu_runs_on_cpu_and_reports_throughput_and_mfu_of_both_loops(tmp_path: Path) -> None:
    out = tmp_path / "gpu_mfu.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--preset", "tiny", "--steps", "10",
                    "--warmup", "2", "--batch", "4", "--device", "cpu", "--compile", "off", "--out", str(out)],
                   cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["compile"] is False and result["preset"] == "tiny"
    assert result["peak_source"].startswith("measured fp32 matmul")
    for loop in ("bare", "platform"):
        assert result[f"{loop}_tokens_per_s"] > 0
        # model FLOPs over a peak this machine's matmul reaches: a fraction, not a data-sheet guess
        assert 0 < result[f"{loop}_mfu"] < 1.5, result
    assert result["ratio"] == result["platform_tokens_per_s"] / result["bare_tokens_per_s"]


def test_nanochat_step_lines_parse_after_warmup() -> None:
    """The side-by-side reads nanochat's throughput from its log: steps before warm-up are left out,
    thousands separators and the MFU percentage are read as numbers, other lines are ignored."""
    import doctest

    from benchmarks import nanochat_side_by_side as side

    log = "\n".join([
        "Vocab size: 4,096",
        "step 00000/00012 (0.00%) | loss: 8.3 | lrm: 0.03 | dt: 39412.49ms | tok/sec: 25 | bf16_mfu: 0.10 | epoch: 1",
        "step 00001/00012 (8.33%) | loss: 8.3 | lrm: 0.05 | dt: 76.89ms | tok/sec: 13,318 | bf16_mfu: 41.50 | epoch: 1",
        "step 00002/00012 (16.67%) | loss: 8.3 | lrm: 0.07 | dt: 60.81ms | tok/sec: 1,216,840 | bf16_mfu: 52.25 | epoch: 1",
    ])
    assert side.nanochat_steps(log, warmup=1) == ([13318.0, 1216840.0], [41.5, 52.25])
    assert side.nanochat_steps(log, warmup=5) == ([], [])
    assert doctest.testmod(side).failed == 0
