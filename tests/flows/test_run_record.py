"""Which run `flywheel run --resume` picks, what it refuses, and what it takes as already decided."""

from __future__ import annotations

import json
from dataclasses import replace

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
    with run_record.hold(old.run_dir):
        assert cli.main(["run", "--resume", old.name]) == 1
    assert "is being run by another process" in capsys.readouterr().err
    assert json.loads((old.run_dir / run_record.RUN_FILE).read_text())["status"] == "running"


def test_a_gate_record_cut_short_by_a_kill_is_not_taken_for_the_decision(mlflow_uri):
    """A resumed promote phase reuses its gate's decision only if `record_gate` wrote all of it."""
    from mlflow import MlflowClient

    from flows.lifecycle import _gate_decided
    from registry import models
    from registry.gate import GateVerdict

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("x"))
    version = client.create_model_version("m", source=f"runs:/{run.info.run_id}/hf_model", run_id=run.info.run_id).version
    assert not _gate_decided(client.get_model_version("m", version).tags)  # never gated
    verdict = GateVerdict(metric="eval/heldout/nll", passed=True, value=5.0, higher_is_better=False, margin=0.0,
                          floor=None, confidence=0.95, champion_version=None, n=0, diff=None, stderr=None,
                          ci_low=None, ci_high=None, reason="no champion to compare: passes")
    models.record_gate(client, "m", version, [verdict], None)
    tags = client.get_model_version("m", version).tags
    assert _gate_decided(tags) and tags["gate.passed"] == "true"
    assert not _gate_decided({**tags, "gate.passed": "false"})  # killed before its last write
    assert not _gate_decided({k: v for k, v in tags.items() if not k.endswith(".reason")})  # killed mid-way
    failed = client.create_model_version("m", source=f"runs:/{run.info.run_id}/hf_model", run_id=run.info.run_id).version
    models.record_gate(client, "m", failed, [replace(verdict, passed=False)], None)
    assert _gate_decided(client.get_model_version("m", failed).tags)  # a failed gate is a decision too
