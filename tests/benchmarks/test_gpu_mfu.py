"""`benchmarks/gpu_mfu.py` is what a session lent a GPU runs first: it must not find a typo there.

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
