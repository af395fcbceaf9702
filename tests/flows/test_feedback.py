"""The human preference loop under the real servers: queue fill -> labels -> export (a DVC version)
-> DPO from the champion -> paired gate -> a new champion whose lineage names the labels it learnt from.

A tiny pretrained model stands in for the champion (registered and promoted by hand), so the loop
runs in about a minute; `flywheel run` itself is covered by tests/flows/test_lifecycle.py.
"""

from __future__ import annotations

import math
import subprocess

import pytest
from mlflow import MlflowClient

from flows import cli, feedback, queue
from registry import data_versions, models
from registry.tracking import run_context
from stages import collect
from stages.collect import CollectConfig
from tests.conftest import tiny_pretrained_checkpoints
from ui import store as st

pytestmark = pytest.mark.slow

NAME = "feedback-chat"
# Held-out NLL gates here (see tests/flows/test_lifecycle.py for why); a generous margin lets a
# few DPO steps on a dozen labels through, so the test sees the alias move.
FAST = ["dpo.batch_size=4", "dpo.train.checkpoint_every=2",
        "evaluate.arithmetic_problems=10", "evaluate.perplexity_windows=16",
        "promote.gates.eval/arithmetic/accuracy.floor=0", "promote.gates.eval/heldout/nll.higher_is_better=false",
        "promote.gates.eval/heldout/nll.margin=5", "serve.enabled=false",
        "queue.n=12", "queue.overlap_share=0.5", "queue.max_new_tokens=12", "feedback.min_pairs=2"]


@pytest.fixture(scope="module")
def loop(services, tmp_path_factory):
    """A git workspace with a DVC-versioned corpus, a champion trained on it, and a labels DB."""
    root = tmp_path_factory.mktemp("loop")
    repo = root / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_REPO", str(repo))
        mp.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{root / 'labels.db'}")
        from infra.settings import load_settings

        s = load_settings()
        corpus = collect.run(CollectConfig(output_dir=root / "collect", max_builtin_chars=60_000,
                                           arithmetic_problems=200)).dataset
        data_versions.ensure_repo(repo, s.dvc_remote)
        clean = data_versions.version_dataset(repo, corpus, "clean", s.dvc_remote)
        (checkpoint,) = tiny_pretrained_checkpoints(root / "models", corpus=clean.path, seeds=(1,), steps=12)
        client = MlflowClient()
        with run_context(services["mlflow"], "flywheel", "seed-champion") as tracker:
            version = models.register_checkpoint(client, NAME, checkpoint, tracker.run_id,
                                                 tags={"data.path": "data/clean", "data.dvc_md5": clean.md5})
        models.promote(client, NAME, version, force=True, reason="test champion")
        store = st.open_store()
        for who in ("ana", "bo"):
            st.add_annotator(store, who, f"pw-{who}")
        yield {"client": client, "store": store, "champion": version, "repo": repo, "clean": clean}
        store.engine.dispose()


def _label_everything(store, who, choose=lambda pair: "A"):
    stored = []
    while (pair := st.next_item(store, who)) is not None:
        stored.append(st.submit_label(store, who, pair.item_id, choose(pair), idempotency_key=f"{who}-{pair.item_id}"))
    return stored


def test_queue_fill_answers_with_the_champion_and_a_second_sample(loop):
    result = queue.queue_fill_flow(name=NAME, preset="tiny", overrides=FAST)
    assert result["champion"] == loop["champion"] and result["challenger"] is None  # one version only
    assert result["champion_via"] == "in-process"  # serving is not up in this test
    assert 6 <= result["queued"] <= 12 < result["answered"]  # twice the prompts, for the answers that agree
    assert result["queued"] == 12 or result["queued"] + result["identical"] == result["answered"]
    with loop["store"].session() as s:
        items = s.query(st.Item).all()
    assert {it.model_a for it in items} == {f"v{loop['champion']}"}
    assert all(it.response_a.strip() != it.response_b.strip() for it in items)
    assert any(it.overlap == 2 for it in items) and any(it.overlap is None for it in items)


def test_feedback_round_trains_on_the_labels_and_promotes_with_their_lineage(loop):
    client, store = loop["client"], loop["store"]
    if st.item_count(store) == 0:
        queue.queue_fill_flow(name=NAME, preset="tiny", overrides=FAST)
    labelled = _label_everything(store, "ana") + _label_everything(store, "bo", lambda pair: "B")
    assert feedback.new_labels(store) == len(labelled)
    check = feedback.feedback_check(name=NAME, preset="tiny", overrides=[*FAST, f"feedback.min_new_labels={10**6}"])
    assert check == {"new_labels": len(labelled), "ran": False}  # below the threshold: nothing runs

    result = feedback.feedback_check(name=NAME, preset="tiny", overrides=[*FAST, "feedback.min_new_labels=1"])
    assert result["ran"] and result["status"] == "promoted", result
    prefs = data_versions.current_version(loop["repo"], feedback.PREFERENCES)
    assert prefs is not None and prefs.md5 == result["preferences_md5"]
    assert (loop["repo"] / "data" / "preferences.dvc").is_file()
    assert feedback.new_labels(store) == 0  # the round's export is the new starting point

    new = client.get_model_version(NAME, result["version"])
    assert new.tags["preferences.dvc_md5"] == prefs.md5
    assert new.tags["preferences.label_ids"] == f"{min(labelled)}-{max(labelled)}"
    assert new.tags["parent.version"] == loop["champion"]
    assert new.tags["data.dvc_md5"] == loop["clean"].md5  # the champion's data lineage carries over
    assert models.champion_version(client, NAME) == result["version"] != loop["champion"]
    dpo_run = client.get_run(new.tags["dpo.run_id"])
    assert dpo_run.data.params["data/pairs"] == str(result["pairs"])  # DPO read the exported pairs
    # feedback.epochs=2 passes over the pairs at dpo.batch_size=4, not the preset's fixed step count
    assert dpo_run.data.params["train.max_steps"] == str(math.ceil(2 * result["pairs"] / 4))
    assert float(dpo_run.data.params["train.lr"]) == 1e-5  # feedback.lr, not the lifecycle's dpo.train.lr


def test_reward_ppo_round_trains_a_reward_model_on_the_labels_then_ppo(loop):
    # InstructGPT's loop on the people's pairs: the reward model learns from exactly the exported
    # pairs, PPO starts from the champion against it, and the registered version names both runs.
    client, store = loop["client"], loop["store"]
    if st.item_count(store) == 0:  # run alone; otherwise the earlier round's labels are here already
        queue.queue_fill_flow(name=NAME, preset="tiny", overrides=FAST)
        _label_everything(store, "ana")
    result = feedback.feedback_flow(name=NAME, preset="tiny", overrides=[
        *FAST, "feedback.method=reward_ppo", "reward.batch_size=4", "ppo.prompts_per_rollout=4",
        "ppo.max_new_tokens=8", "ppo.train.max_steps=4", "ppo.train.checkpoint_every=4"])
    assert result["status"] in ("promoted", "gate failed") and result["pairs"] >= 2, result
    new = client.get_model_version(NAME, result["version"])
    rm_run, ppo_run = client.get_run(new.tags["reward.run_id"]), client.get_run(new.tags["ppo.run_id"])
    assert rm_run.data.params["data/pairs"] == str(result["pairs"])
    assert rm_run.data.params["train.max_steps"] == str(math.ceil(2 * result["pairs"] / 4))  # feedback.epochs
    assert ppo_run.data.params["reward"] == "model" and "dpo.run_id" not in new.tags
    assert new.tags["stage"] == "ppo" and new.tags["parent.version"] == result["started_from"]
    assert math.isfinite(ppo_run.data.metrics["rl/score_mean"])


def test_feedback_cli_stops_early_without_enough_pairs(loop, capsys):
    assert cli.main(["feedback", "--name", NAME, *FAST, "feedback.min_pairs=1000"]) == 0
    out = capsys.readouterr().out
    assert "not enough pairs to train on yet" in out and "data/preferences.dvc md5" in out


def test_labels_export_cli_prints_the_version_and_agreement(loop, capsys):
    assert cli.main(["labels", "export"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs from" in out and "Krippendorff's alpha" in out and "data/preferences.dvc: md5" in out
