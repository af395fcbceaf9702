"""The whole lifecycle against real Prefect and MLflow servers, a real Ray and a real DVC remote.

Runs are shrunk by overrides (few steps, a slice of the built-in text) but every stage and every
service is the real one. Asserted afterwards: the registry, the lineage, the Prefect run and the
gate's behaviour across runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows import cli
from flows.lifecycle import lifecycle
from infra import ray_executor
from infra.settings import load_settings
from registry import models
from stages.evaluate import read_items
from stages.validate import DataValidationError

pytestmark = pytest.mark.slow

MODEL = "flywheel-chat"
# Held-out NLL is the gate here: unlike arithmetic accuracy, it separates a trained tiny model from an
# untrained one after a handful of steps. Every run trains the same tokenizer on the same data, so the
# champion's held-out windows are the challenger's, and the paired gate can compare them item by item.
FAST = [
    "collect.max_builtin_chars=150000", "collect.arithmetic_problems=600",
    "tokenizer.vocab_size=1024",
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=128",
    "pretrain.batch_size=8", "pretrain.train.max_steps=16", "pretrain.train.log_every=4",
    "pretrain.train.checkpoint_every=8",
    "sft.batch_size=8", "sft.train.max_steps=6", "dpo.batch_size=4", "dpo.train.max_steps=3",
    "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=8", "grpo.train.max_steps=2",
    # min_score 0: keep every prompt's best answer (a 2-step policy is never right, and 1.0 would keep none)
    "rejection.n=2", "rejection.max_prompts=8", "rejection.max_new_tokens=8", "rejection.min_score=0",
    "rejection_sft.batch_size=4", "rejection_sft.train.max_steps=2",
    "evaluate.arithmetic_problems=10", "evaluate.perplexity_windows=16",
    "promote.gates.eval/heldout/nll.higher_is_better=false", "promote.gates.eval/heldout/nll.margin=0",
    "promote.gates.eval/arithmetic/accuracy.floor=0", "serve.enabled=false",
    "schedule.enabled=false", "queue.after_run=false",
]


@pytest.fixture(scope="module")
def workspace(services, tmp_path_factory):
    """A git repository standing in for the user's clone: DVC versions land in its data/ folder."""
    repo = tmp_path_factory.mktemp("repo")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_REPO", str(repo))
        yield repo
    ray_executor.shutdown()


@pytest.fixture(scope="module")
def first_run(workspace):
    """`flywheel run` itself, in process: services already up (the session's), so none are started."""
    assert cli.main(["run", "--preset", "tiny", *FAST]) == 0
    client = MlflowClient()
    return client, models.resolve(client, MODEL)


def test_first_run_registers_a_loadable_champion_with_lineage(first_run, workspace, tmp_path):
    client, champion = first_run
    assert models.resolve(client, MODEL, "champion").version == champion.version
    tags = champion.tags
    dvc = yaml.safe_load((workspace / "data" / "clean.dvc").read_text())
    assert tags["data.dvc_md5"] == dvc["outs"][0]["md5"]
    for key in ("tokenizer.run_id", "pretrain.run_id", "sft.run_id", "dpo.run_id", "grpo.run_id",
                "rejection.run_id", "rejection.dvc_md5", "rejection_sft.run_id", "lifecycle.run_id", "git.commit",
                "gate.passed"):
        assert tags.get(key), f"missing lineage tag {key}"
    assert tags["gate.passed"] == "true"
    # every stage's MLflow run is nested under the lifecycle's parent run
    for key in ("tokenizer.run_id", "pretrain.run_id", "grpo.run_id"):
        run = client.get_run(tags[key])
        assert run.data.tags["mlflow.parentRunId"] == tags["lifecycle.run_id"]
        assert run.info.status == "FINISHED"
    pretrain_metrics = client.get_run(tags["pretrain.run_id"]).data.metrics
    assert pretrain_metrics["train/tokens_per_s"] > 0

    local = models.download(client, MODEL, dst=tmp_path / "champion")
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    meta = json.loads((local / "meta.json").read_text())
    # recipe r1: ... -> GRPO -> rejection sampling -> SFT on the kept answers, which is the candidate
    assert meta["stage"] == "sft" and meta["lineage"]["data.dvc_md5"] == tags["data.dvc_md5"]
    assert meta["parent_meta"]["stage"] == "grpo" and meta["parent_meta"]["parent_meta"]["stage"] == "dpo"
    assert meta["lineage"]["rejection.dvc_md5"] == tags["rejection.dvc_md5"]
    rejection_dvc = yaml.safe_load((workspace / "data" / "rejection-sft.dvc").read_text())
    assert tags["rejection.dvc_md5"] == rejection_dvc["outs"][0]["md5"]


def test_every_data_version_is_a_run_input_and_a_fresh_clone_checks_out_the_champions_data(
        first_run, workspace, tmp_path, capsys, monkeypatch):
    client, champion = first_run
    md5 = champion.tags["data.dvc_md5"]
    tokens = yaml.safe_load((workspace / "data" / "tokens.dvc").read_text())["outs"][0]["md5"]
    assert champion.tags["tokens.dvc_md5"] == tokens and champion.tags["tokens.path"] == "data/tokens"
    inputs = {d.dataset.name: d.dataset.digest
              for d in client.get_run(champion.tags["pretrain.run_id"]).inputs.dataset_inputs}
    assert inputs == {"data/tokens": tokens}  # the MLflow UI's Dataset column: what pretraining read
    names = {r.info.run_name: {d.dataset.name for d in r.inputs.dataset_inputs}
             for r in client.search_runs([client.get_experiment_by_name("flywheel").experiment_id],
                                         filter_string=f"tags.`lifecycle.run_id` = '{champion.tags['lifecycle.run_id']}'")}
    assert names["clean"] == {"data/raw"} and names["dedup"] == {"data/filtered"} and names["mix"] == {"data/decontaminated"}
    assert names["tokenize"] == {"data/clean"}  # the token shards were cut from the validated corpus
    parent = champion.tags["lifecycle.run_id"]
    shown = {a.path for a in client.list_artifacts(parent, "data")}
    assert {"data/data_report.png", "data/data_docs"} <= shown

    assert cli.main(["data", "list"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["data/clean", md5, "yes"] in [row[:3] for row in listed]

    fresh = tmp_path / "fresh-clone"
    subprocess.run(["git", "init", "-q", str(fresh)], check=True)
    monkeypatch.setenv("FLYWHEEL_REPO", str(fresh))
    assert cli.main(["data", "checkout", "--model", f"{MODEL}@champion"]) == 0
    assert f"data/clean: md5 {md5}" in capsys.readouterr().out
    restored = sorted(p.relative_to(fresh / "data" / "clean") for p in (fresh / "data" / "clean").rglob("*.parquet"))
    original = sorted(p.relative_to(workspace / "data" / "clean") for p in (workspace / "data" / "clean").rglob("*.parquet"))
    assert restored == original and restored
    assert all((fresh / "data" / "clean" / p).read_bytes() == (workspace / "data" / "clean" / p).read_bytes()
               for p in restored)


def test_evaluate_any_version_on_any_tasks(first_run, capsys):
    client, champion = first_run
    args = ["evaluate", "--version", str(champion.version), "evaluate.tasks=[heldout,arithmetic_mc]",
            "evaluate.perplexity_windows=8", "evaluate.arithmetic_problems=10", "evaluate.progress=false"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "eval/arithmetic_mc/accuracy" in out and "eval/heldout/perplexity" in out and "±" in out
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id],
                              filter_string=f"tags.`model.version` = '{champion.version}'")
    assert runs and "eval/arithmetic_mc/ece" in runs[0].data.metrics

    assert cli.main(["evaluate", "--version", "999"]) == 1
    err = capsys.readouterr().err
    # One line and no traceback (log lines of the earlier in-process call may precede it).
    said = [line for line in err.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert said == [f"flywheel evaluate: model 'flywheel-chat' has no version '999' in {client.tracking_uri}"]
    assert "Traceback" not in err


def test_failing_data_stops_before_tokenizer_and_keeps_champion_and_data(first_run, workspace):
    client, champion = first_run
    dvc_before = (workspace / "data" / "clean.dvc").read_text()
    with pytest.raises(DataValidationError, match="expect_table_row_count_to_be_between"):
        lifecycle(preset="tiny", overrides=[*FAST, "validate.min_rows=10000000"])
    runs = sorted(load_settings().runs_dir.iterdir())
    assert (runs[-1] / "validate").exists() and not (runs[-1] / "tokenizer").exists()
    assert models.resolve(client, MODEL).version == champion.version
    assert (workspace / "data" / "clean.dvc").read_text() == dvc_before  # last good version intact


def test_second_run_adds_a_version_and_the_gate_decides(first_run):
    client, champion = first_run
    # An untrained model (lr 0 everywhere) has far worse perplexity: registered, not promoted.
    worse = lifecycle(preset="tiny", overrides=[*FAST, "pretrain.train.lr=0", "sft.train.lr=0",
                                                "dpo.train.lr=0", "grpo.train.lr=0"])
    assert int(worse["version"]) > int(champion.version)
    assert not worse["gate"].passed
    assert models.resolve(client, MODEL).version == champion.version
    rejected = client.get_model_version(MODEL, worse["version"])
    assert rejected.tags["gate.passed"] == "false" and "challenger" in rejected.aliases
    # Paired: the champion was re-scored in this run, on the very windows the challenger saw.
    assert rejected.tags["gate.champion_version"] == str(champion.version)
    # Every held-out window of the challenger's, up to evaluate.perplexity_windows=16 (the sliced
    # built-in corpus may hold fewer), is one pair.
    windows = read_items(Path(worse["run_dir"]) / f"evaluate-{list(worse['scores'])[-1]}" / "items.jsonl")
    assert int(rejected.tags["gate.eval/heldout/nll.n"]) == len(windows["eval/heldout/nll"]) >= 8
    assert float(rejected.tags["gate.eval/heldout/nll.ci_high"]) < 0  # clearly worse, not just noisy
    assert (Path(worse["run_dir"]) / f"evaluate-champion-v{champion.version}" / "items.jsonl").is_file()

    # Promotion within tolerance and rollback are covered against the registry in tests/registry.


def test_prefect_recorded_the_flow_and_its_summary(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lifecycle-summary"])))
        assert artifacts and "Gate" in artifacts[0].data
        data = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-report"])))
        assert data and "| dedup |" in data[0].data and "Source mix" in data[0].data
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lifecycle"])))
        assert any(r.state and r.state.is_completed() for r in runs)
        phases = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pretrain", "align", "promote"])))
        assert {r.state.name for r in phases} >= {"Completed"}


def test_instructgpt_recipe_aligns_a_foreign_base_model(first_run, tmp_path):
    # A user's own Qwen2 (built from config, never downloaded): no tokenizer or pretraining phase;
    # SFT -> reward model -> PPO; the registered version is still a Qwen2 in Qwen2's format.
    from tests.stages.foreign import build

    client, champion = first_run
    source = build("qwen2", tmp_path / "qwen2")
    fast = [o for o in FAST if "heldout/nll" not in o]  # a given base has no pretraining held-out split
    summary = lifecycle(preset="tiny", overrides=[
        *fast, "recipe=instructgpt", f"base_model={source}", "reward.batch_size=4", "reward.train.max_steps=3",
        "ppo.prompts_per_rollout=4", "ppo.max_new_tokens=8", "ppo.train.max_steps=4", "ppo.train.checkpoint_every=4",
        "promote.model_name=byo-qwen2"])  # its own registered model: flywheel-chat's champion stays as it is
    version = client.get_model_version("byo-qwen2", summary["version"])
    tags = version.tags
    for key in ("base_model.run_id", "sft.run_id", "reward.run_id", "ppo.run_id"):
        assert tags.get(key), f"missing lineage tag {key}"
    assert tags["base_model.source"] == str(source)
    assert "pretrain.run_id" not in tags and "tokenizer.run_id" not in tags and "grpo.run_id" not in tags
    assert list(summary["scores"]) == ["base_model", "sft", "ppo"]
    assert models.resolve(client, MODEL).version == champion.version
    local = models.download_version(client, "byo-qwen2", summary["version"], dst=tmp_path / "registered")
    config = json.loads((local / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    meta = json.loads((local / "meta.json").read_text())
    assert meta["stage"] == "ppo" and meta["parent_meta"]["stage"] == "sft"


def test_config_typo_fails_before_anything_starts(capsys):
    assert cli.main(["run", "pretrain.train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.train.lrr" in err or "lrr" in err
    assert "valid keys" in err
