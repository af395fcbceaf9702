"""`flywheel run --resume`: a lifecycle killed during pretraining goes on where it stopped.

The kill is the real thing: SIGKILL to the process group of a `flywheel run` subprocess, Ray's
processes included, once pretraining has a checkpoint on disk. The resumed run must skip what was
finished, resume pretraining from that checkpoint, and register exactly the weights an uninterrupted
run of the same config registers, once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import torch
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.objects import StateType
from safetensors.torch import load_file

from flows import cli
from flows.lifecycle import lifecycle
from infra import ray_executor
from infra.settings import load_settings
from registry import models
from stages.checkpoint import latest_checkpoint
from tests.flows.test_lifecycle import FAST, MODEL, workspace  # noqa: F401 (workspace: a fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOG_EVERY = 4
# Pretraining long enough after its first checkpoint that the kill lands inside it (the tiny test
# model runs ~20 steps/s on 2 cores: 40 steps once finished before the kill landed); r1's align
# stages cut to the bone (the candidate is the last of them, so all of them must run).
CHANGES = ["pretrain.train.max_steps=200", "pretrain.train.checkpoint_every=5", f"pretrain.train.log_every={LOG_EVERY}",
           "sft.train.max_steps=2", "dpo.train.max_steps=1", "grpo.train.max_steps=1", "rejection.max_prompts=4",
           "rejection_sft.train.max_steps=1"]
CONFIG = [o for o in FAST if o.split("=")[0] not in {c.split("=")[0] for c in CHANGES}] + CHANGES


def _weights(client: MlflowClient, version: str, dst: Path) -> dict[str, torch.Tensor]:
    local = models.download_version(client, MODEL, version, dst=dst)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(local.glob("*.safetensors")):
        tensors |= load_file(f)
    assert tensors, f"no safetensors in {local}"
    return tensors


def _flow_run_state(flow_run_id: str) -> StateType:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state.type


def _child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _kill_during_pretraining(runs_dir: Path, before: set[Path], log: Path) -> Path:
    """`flywheel run` in its own process group, SIGKILLed with everything it started once pretraining
    saved a checkpoint; returns the run's folder."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", *CONFIG], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    checkpoint = None
    while checkpoint is None:
        assert proc.poll() is None, f"flywheel run exited ({proc.returncode}) before a pretrain checkpoint:\n" \
                                    + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no pretrain checkpoint in 900 s"
        found = [p for p in runs_dir.glob("*/pretrain/checkpoints/step-*/trainer_state*") if p.parents[3] not in before]
        checkpoint = found[0] if found else None
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    names = set()
    for p in tree:
        try:
            names.add(p.name())
        except psutil.NoSuchProcess:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:  # never left behind, whatever the assertion below says
        p.kill()
    assert "raylet" in names, f"no Ray among the run's processes: {sorted(names)}"
    assert not alive, f"processes of the killed run outlived its process group: {alive}"
    return checkpoint.parents[3]


def test_a_lifecycle_killed_in_pretraining_resumes_and_registers_the_uninterrupted_weights(
        workspace, tmp_path, capsys):  # noqa: F811
    client = MlflowClient()
    runs_dir = load_settings().runs_dir
    try:
        reference = lifecycle(preset="tiny", overrides=CONFIG)  # uninterrupted, same config
    finally:
        ray_executor.shutdown()

    # every run folder already there (the reference's, and other tests' runs in this session's state
    # root, with pretrain checkpoints of their own) is not the killed run's
    before = set(runs_dir.iterdir())
    assert Path(reference["run_dir"]) in before
    run_dir = _kill_during_pretraining(runs_dir, before, tmp_path / "killed.log")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "running" and record["overrides"] == CONFIG
    [killed_flow_run] = record["prefect_flow_run_ids"]
    assert _flow_run_state(killed_flow_run) == StateType.RUNNING  # what the kill leaves in the Prefect UI
    assert not (run_dir / "pretrain" / "final").exists(), "the kill came after pretraining finished"
    newest = int(latest_checkpoint(run_dir / "pretrain").name.removeprefix("step-"))
    data_files = {p: p.stat().st_mtime_ns for p in (run_dir / "collect").rglob("*") if p.is_file()}
    assert data_files

    # a resume with another config is refused before anything runs
    assert cli.main(["run", "--resume", run_dir.name, "pretrain.train.max_steps=3"]) == 2
    assert "leave out --preset and the overrides" in capsys.readouterr().err

    assert cli.main(["run", "--resume"]) == 0  # the newest unfinished run: the killed one
    resumed_record = json.loads((run_dir / "run.json").read_text())
    assert resumed_record["status"] == "finished"
    assert resumed_record["prefect_flow_run_ids"][0] == killed_flow_run
    assert len(resumed_record["prefect_flow_run_ids"]) == 2
    assert _flow_run_state(killed_flow_run) == StateType.CRASHED  # the resume ended the abandoned runs
    assert _flow_run_state(resumed_record["prefect_flow_run_ids"][1]) == StateType.COMPLETED

    parent = record["mlflow_run_id"]
    children = _child_runs(client, parent)
    by_name = {}
    for run in children:
        by_name.setdefault(run.info.run_name, []).append(run.info.status)
    # finished phases ran once; the killed attempt's pretraining is marked KILLED, the resumed one finished
    assert all(by_name[name] == ["FINISHED"] for name in ("collect", "mix", "validate", "tokenizer")), by_name
    assert sorted(by_name["pretrain"]) == ["FINISHED", "KILLED"], by_name
    assert {p: p.stat().st_mtime_ns for p in data_files} == data_files  # the data phase wrote nothing again
    assert client.get_run(parent).info.status == "FINISHED"

    # pretraining went on from its newest checkpoint: the resumed attempt's first logged step is the
    # first after it (step 0 is the stage's summary row)
    resumed = next(r for r in children if r.info.run_name == "pretrain" and r.info.status == "FINISHED")
    steps = sorted({m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")} - {0})
    assert steps and newest < steps[0] <= newest + LOG_EVERY, (newest, steps)

    mine = client.search_model_versions(f"name = '{MODEL}' and tags.`lifecycle.run_id` = '{parent}'")
    assert len(mine) == 1, [m.version for m in mine]
    version = mine[0]
    tokenizer_run = next(r.info.run_id for r in children if r.info.run_name == "tokenizer")
    assert version.tags["tokenizer.run_id"] == tokenizer_run
    assert version.tags["pretrain.run_id"] == resumed.info.run_id
    theirs = client.search_model_versions(f"name = '{MODEL}' and tags.`lifecycle.run_id` = "
                                          f"'{reference['mlflow_run_id']}'")[0]
    lineage = {k for k in theirs.tags if k.endswith((".run_id", ".dvc_md5"))}
    assert lineage == {k for k in version.tags if k.endswith((".run_id", ".dvc_md5"))}
    assert version.tags["data.dvc_md5"] == theirs.tags["data.dvc_md5"]

    got, want = _weights(client, version.version, tmp_path / "resumed"), _weights(client, theirs.version,
                                                                                   tmp_path / "reference")
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different}"

    # a finished run is left alone: no version registered (other tests register theirs in this registry too)
    versions = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert cli.main(["run", "--resume", run_dir.name]) == 0
    assert "finished already" in capsys.readouterr().out
    assert {v.version for v in client.search_model_versions(f"name = '{MODEL}'")} == versions
