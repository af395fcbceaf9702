"""`flywheel stage` runs one stage with no services; bad keys fail with the valid ones named."""

from __future__ import annotations

from pathlib import Path

from flows import cli
from stages.dataset import read_dataset


def test_stage_command_runs_collect_then_tokenizer(tmp_path: Path, capsys) -> None:
    assert cli.main(["stage", "collect", f"output_dir={tmp_path / 'raw'}", "max_builtin_chars=20000",
                     "arithmetic_problems=50"]) == 0
    rows = read_dataset(tmp_path / "raw" / "dataset")
    assert {"stdlib-docstrings", "arithmetic"} <= set(rows["source"])
    assert cli.main(["stage", "tokenizer", f"dataset={tmp_path / 'raw' / 'dataset'}",
                     f"output_dir={tmp_path / 'tok'}", "vocab_size=512"]) == 0
    assert (tmp_path / "tok" / "tokenizer" / "tokenizer.json").exists()
    assert "TokenizerResult" in capsys.readouterr().out


def test_stage_command_names_an_unknown_key(tmp_path: Path, capsys) -> None:
    assert cli.main(["stage", "tokenizer", f"dataset={tmp_path}", f"output_dir={tmp_path}", "vocab_sise=512"]) == 2
    err = capsys.readouterr().err
    assert "vocab_sise" in err and "vocab_size" in err
