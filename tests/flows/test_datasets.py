"""Dataset versions for people: MLflow dataset inputs, the catalogue, checkout on a fresh clone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import datasets
from flows.lifecycle import log_dataset_inputs
from registry import data_versions
from registry.tracking import start_run
from stages.dataset import read_dataset, write_dataset
from stages.dpo import DPOConfig


def _git_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    for cmd in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> tuple[Path, str]:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "state"))
    repo = _git_repo(tmp_path / "clone-a")
    monkeypatch.setenv("FLYWHEEL_REPO", str(repo))
    return repo, str(tmp_path / "remote")


def _version(repo: Path, remote: str, tmp_path: Path, name: str, texts: list[str]) -> data_versions.DataVersion:
    src = tmp_path / f"src-{name}-{len(texts)}"
    write_dataset(({"id": str(i), "text": t, "source": "s"} for i, t in enumerate(texts)), src)
    return data_versions.version_dataset(repo, src, name, remote)


def test_a_stage_reading_a_versioned_dataset_logs_it_as_an_mlflow_input(workspace, tmp_path, mlflow_uri) -> None:
    repo, remote = workspace
    version = _version(repo, remote, tmp_path, "clean", ["one text", "two texts"])
    cfg = DPOConfig(policy=tmp_path / "not-versioned", dataset=version.path, output_dir=tmp_path / "out")
    tracker = start_run(mlflow_uri, "flywheel", "dpo")
    log_dataset_inputs(tracker, cfg)

    inputs = MlflowClient(mlflow_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.dataset.source_type) for i in inputs] == [
        ("data/clean", version.md5, "dvc")]  # the policy folder is not a DVC version: not an input
    assert inputs[0].dataset.source.startswith(str(Path(remote).resolve()))
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "dataset"
    # The .dvc file is staged in git, no longer left untracked.
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=repo, capture_output=True, text=True).stdout
    assert "data/clean.dvc" in staged.split()


def test_catalogue_lists_current_and_past_versions_and_checkout_restores_one_in_a_fresh_clone(
        workspace, tmp_path, mlflow_uri, monkeypatch) -> None:
    repo, remote = workspace
    old = _version(repo, remote, tmp_path, "clean", ["an old corpus", "of two"])
    tracker = start_run(mlflow_uri, "flywheel", "pretrain-old")
    tracker.log_dataset("data/clean", old.md5, data_versions.remote_location(old))
    new = _version(repo, remote, tmp_path, "clean", ["a new corpus", "of", "three"])
    assert new.md5 != old.md5

    client = MlflowClient(mlflow_uri)
    rows = {(r["name"], r["md5"]): r for r in datasets.catalogue(client, repo)}
    assert rows[("data/clean", old.md5)]["runs"] == 1 and not rows[("data/clean", old.md5)]["current"]
    assert rows[("data/clean", new.md5)]["current"] and rows[("data/clean", new.md5)]["runs"] == 0

    # A fresh clone (no data, no DVC cache of its own) gets the old version back from the remote alone.
    fresh = _git_repo(tmp_path / "clone-b")
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "other-state"))
    restored = data_versions.checkout_version(fresh, datasets._name_of(client, old.md5), old.md5, remote)
    assert restored.md5 == old.md5
    assert sorted(read_dataset(restored.path)["text"]) == ["an old corpus", "of two"]


def test_model_datasets_reads_every_dvc_version_in_a_registered_versions_lineage(mlflow_uri) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("e"))
    client.create_model_version("m", source="/nowhere", run_id=run.info.run_id, tags={
        "data.dvc_md5": "aa.dir", "data.path": "data/clean",
        "rejection.dvc_md5": "bb.dir", "rejection.path": "data/rejection-sft", "sft.run_id": "x"})
    client.set_registered_model_alias("m", "champion", "1")
    assert datasets.model_datasets(client, "m", "champion") == {"clean": "aa.dir", "rejection-sft": "bb.dir"}
    client.create_model_version("m", source="/nowhere", run_id=run.info.run_id, tags={"sft.run_id": "x"})
    with pytest.raises(LookupError, match="no data lineage"):
        datasets.model_datasets(client, "m", "2")
