"""`flywheel stage` runs one stage with no services; bad keys fail with the valid ones named."""

from __future__ import annotations

import random
from pathlib import Path

from flows import cli
from stages.dataset import read_dataset, write_dataset


def test_stage_command_runs_collect_then_tokenizer(tmp_path: Path, capsys) -> None:
    assert cli.main(["stage", "collect", "--local", f"output_dir={tmp_path / 'raw'}", "max_builtin_chars=20000",
                     "arithmetic_problems=50"]) == 0
    rows = read_dataset(tmp_path / "raw" / "dataset")
    assert {"stdlib-docstrings", "arithmetic"} <= set(rows["source"])
    assert cli.main(["stage", "tokenizer", f"dataset={tmp_path / 'raw' / 'dataset'}",
                     f"output_dir={tmp_path / 'tok'}", "vocab_size=512"]) == 0
    assert (tmp_path / "tok" / "tokenizer" / "tokenizer.json").exists()
    assert "TokenizerResult" in capsys.readouterr().out


def test_data_stage_runs_its_shards_as_ray_tasks_with_the_same_result_as_local(tmp_path: Path) -> None:
    from infra import ray_executor

    rng = random.Random(0)
    words = "river bridge town market stone mill harbour road field church wall gate tower bell".split()
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(40)]  # distinct, not near-duplicates
    write_dataset(({"id": f"d{i}", "text": t, "source": "folder:notes"} for i, t in enumerate(texts + texts[:10])),
                  tmp_path / "in", shard_rows=12)  # five shards, duplicates across shards
    try:
        assert cli.main(["stage", "dedup", f"input_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'ray'}"]) == 0
    finally:
        ray_executor.shutdown()
    assert not ray_executor.ray.is_initialized()  # the command stops the Ray it started
    assert cli.main(["stage", "dedup", "--local", f"input_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'local'}"]) == 0
    on_ray, local = read_dataset(tmp_path / "ray" / "dataset"), read_dataset(tmp_path / "local" / "dataset")
    assert len(on_ray) == 40 and list(on_ray["id"]) == list(local["id"])


def test_stage_command_names_an_unknown_key(tmp_path: Path, capsys) -> None:
    assert cli.main(["stage", "tokenizer", f"dataset={tmp_path}", f"output_dir={tmp_path}", "vocab_sise=512"]) == 2
    err = capsys.readouterr().err
    assert "vocab_sise" in err and "vocab_size" in err
