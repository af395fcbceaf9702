"""Which run `flywheel run --resume` picks, and what it refuses, without any server."""

from __future__ import annotations

import json

import pytest

from flows import cli, run_record


def test_resume_picks_the_newest_unfinished_run_that_nobody_runs(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    old = run_record.create(runs, "tiny", ["sft.train.max_steps=2"], "abc")
    done = run_record.finish(run_record.create(runs, "tiny", [], "abc"), version="3", champion="3")
    assert done.run_dir != old.run_dir  # same second: a folder of its own
    assert run_record.resolve(runs, run_record.LATEST) == old  # the finished one is never picked
    assert run_record.read(old.run_dir) == old

    with run_record.hold(old.run_dir):
        assert run_record.busy(old.run_dir)
        with pytest.raises(run_record.RunBusy), run_record.hold(old.run_dir):
            pass
        with pytest.raises(run_record.RunNotFound, match="running right now"):
            run_record.resolve(runs, run_record.LATEST)
    assert not run_record.busy(old.run_dir)

    with pytest.raises(run_record.RunNotFound, match="no run 'nope'"):
        run_record.resolve(runs, "nope")
    (runs / "legacy").mkdir()
    with pytest.raises(run_record.RunNotFound, match="cannot be resumed"):
        run_record.resolve(runs, "legacy")

    # the command line: a finished run is left alone, another config is refused, both before any server
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    assert cli.main(["run", "--resume", done.name]) == 0
    assert f"run {done.name} finished already (registered v3)" in capsys.readouterr().out
    assert cli.main(["run", "--resume", old.name, "--preset", "small"]) == 2
    assert "--preset tiny sft.train.max_steps=2" in capsys.readouterr().err
    assert cli.main(["run", "--resume", "nope"]) == 1
    assert json.loads((old.run_dir / run_record.RUN_FILE).read_text())["status"] == "running"
