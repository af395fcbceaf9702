"""The model registry on a temporary SQLite store with real tiny Hugging Face checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from registry.models import (
    GateResult,
    download,
    list_versions,
    promote_if_better,
    register_checkpoint,
    resolve,
    rollback,
)

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

METRIC = "eval/arith/accuracy"
PREVIOUS = "previous_champion"


def _checkpoint(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    out = root / f"ckpt-{seed}"
    LlamaForCausalLM(cfg).save_pretrained(out)
    (out / "meta.json").write_text(json.dumps({
        "stage": "sft", "config": {"lr": 1e-3}, "data_versions": {"sft": "abc.dir"},
        "parent": None, "git_commit": "deadbeef", "metrics": {"train/loss": 1.5 + seed},
    }))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store per module (creating it runs MLflow's migrations, ~seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
    ckpts = [_checkpoint(root, seed) for seed in (1, 2, 3)]
    return uri, client, exp, ckpts


@pytest.fixture
def name(request) -> str:
    return f"lm-{request.node.name}"


def _register(client: MlflowClient, exp: str, name: str, ckpt: Path) -> str:
    run_id = client.create_run(exp).info.run_id
    tags = {"data.dvc_hash": "abc.dir", "tokenizer.run_id": "tok123", "git.commit": "deadbeef"}
    return register_checkpoint(client, name, ckpt, run_id, tags)


def _first_weight(path: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight.detach()


def test_register_sets_challenger_and_keeps_files_unchanged(store, name):
    uri, client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts[0])
    assert v1 == "1"
    assert str(resolve(uri, name, "challenger").version) == "1"
    with pytest.raises(LookupError, match="champion"):
        resolve(client, name)
    mv = client.get_model_version(name, v1)
    assert mv.tags["data.dvc_hash"] == "abc.dir" and mv.tags["tokenizer.run_id"] == "tok123"
    assert mv.tags["stage"] == "sft" and float(mv.tags["metric.train/loss"]) == 2.5
    assert client.get_registered_model(name).description

    v2 = _register(client, exp, name, ckpts[1])
    assert v2 == "2" and str(resolve(client, name, "challenger").version) == "2"
    # Registered unchanged: the run's hf_model folder holds exactly the checkpoint's files.
    stored = {f.path.split("/")[-1] for f in client.list_artifacts(mv.run_id, "hf_model")}
    assert stored == {p.name for p in ckpts[0].iterdir()}


def test_gate_first_wins_worse_keeps_champion_tolerance_passes(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)

    first = promote_if_better(client, name, v1, METRIC, 0.50)
    assert first.passed and first.champion is None
    assert str(resolve(client, name).version) == v1

    worse = promote_if_better(client, name, v2, METRIC, 0.40, tolerance=0.05)
    assert worse == GateResult(False, METRIC, 0.40, 0.50, 0.05, True, worse.reason)
    assert "regresses" in worse.reason and "v1" in worse.reason
    assert str(resolve(client, name).version) == v1  # champion unchanged
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.passed"] == "false" and tags["gate.reason"] == worse.reason
    assert float(tags["gate.champion_value"]) == 0.50 and tags["gate.champion_version"] == v1
    assert PREVIOUS not in tags

    within = promote_if_better(client, name, v3, METRIC, 0.48, tolerance=0.05)
    assert within.passed and within.champion == 0.50
    assert str(resolve(client, name).version) == v3
    assert client.get_model_version(name, v3).tags[PREVIOUS] == v1


def test_gate_lower_is_better_and_non_finite(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    assert not promote_if_better(client, name, v1, "eval/ppl", float("nan"), higher_is_better=False).passed
    assert promote_if_better(client, name, v1, "eval/ppl", 10.0, higher_is_better=False).passed
    assert not promote_if_better(client, name, v1, "eval/ppl", float("inf"), higher_is_better=False).passed
    assert client.get_model_version(name, v1).tags["gate.eval/ppl"] == "10.0"  # not overwritten
    assert not promote_if_better(client, name, v2, "eval/ppl", 10.5, higher_is_better=False).passed
    assert promote_if_better(client, name, v3, "eval/ppl", 9.0, higher_is_better=False).passed
    # A metric the champion was never gated on: fail closed, say why.
    other = promote_if_better(client, name, v2, "eval/new_task/acc", 0.9)
    assert not other.passed and "no recorded gate.eval/new_task/acc" in other.reason
    assert str(resolve(client, name).version) == v3


def test_rollback_and_download_loads(store, name, tmp_path):
    uri, client, exp, ckpts = store
    v1, v2 = (_register(client, exp, name, c) for c in ckpts[:2])
    with pytest.raises(LookupError, match="no champion"):
        rollback(client, name)
    promote_if_better(client, name, v1, METRIC, 0.5)
    with pytest.raises(LookupError, match="previous_champion"):
        rollback(client, name)
    promote_if_better(client, name, v2, METRIC, 0.6)

    local = download(uri, name, dst=tmp_path / "champion")
    assert (local / "config.json").is_file() and (local / "meta.json").is_file()
    assert torch.equal(_first_weight(local), _first_weight(ckpts[1]))

    assert rollback(uri, name) == v1
    assert str(resolve(client, name).version) == v1
    assert client.get_model_version(name, v2).tags["rolled_back"] == "true"

    local = download(client, name, dst=tmp_path / "after-rollback")
    assert torch.equal(_first_weight(local), _first_weight(ckpts[0]))
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()
    assert out.shape == (1, 7)

    assert (download(uri, name, alias="challenger") / "model.safetensors").is_file()  # dst=None

    with pytest.raises(LookupError, match="nope"):
        download(uri, name, alias="nope")


def test_list_versions(store, name):
    _, client, exp, ckpts = store
    v1, v2 = (_register(client, exp, name, c) for c in ckpts[:2])
    promote_if_better(client, name, v1, METRIC, 0.5)
    promote_if_better(client, name, v2, METRIC, 0.1)
    rows = list_versions(client, name)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["aliases"] == ["challenger"] and rows[1]["aliases"] == ["champion"]
    assert rows[0]["gate_passed"] == "false" and "regresses" in rows[0]["gate_reason"]
    assert rows[1]["gate_metric"] == METRIC and float(rows[1]["gate_value"]) == 0.5
    assert rows[1]["metrics"] == {"train/loss": "2.5"} and rows[1]["stage"] == "sft"
    assert rows[0]["run_id"] and rows[0]["created"].endswith("+00:00")
