"""The model registry on a temporary SQLite store with real tiny Hugging Face checkpoints."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from registry.gate import GateSpec, GateVerdict, paired_verdict
from registry.models import (
    FLAGGED,
    ChampionChanged,
    GateNotPassed,
    ModelNotFound,
    NothingToRollBack,
    ReasonRequired,
    VersionNotFound,
    champion_history,
    champion_version,
    download,
    download_version,
    list_versions,
    promote,
    promote_if_passed,
    record_gate,
    recorded_verdicts,
    register_checkpoint,
    resolve,
    rollback,
    set_champion,
    sync_history,
)

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

METRIC = "eval/arithmetic/accuracy"


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



def _first(value: float = 0.5) -> GateVerdict:
    """The verdict of a version with no champion to face: only the floor (0.3) applies."""
    return paired_verdict(GateSpec(METRIC, floor=0.3), value, None, None)


def _vs(champion: str, wins: int, losses: int, n: int = 400) -> GateVerdict:
    """Challenger vs champion on n paired items: `wins` items only the challenger gets right, `losses`
    only the champion, the rest both right. At n=400, (10, 0) passes, (0, 40) fails, and even (10, 10)
    fails: a mean difference of 0 with an interval of +-0.022 cannot rule out a 0.02 regression."""
    ties = n - wins - losses
    challenger = [1.0] * wins + [0.0] * losses + [1.0] * ties
    champ = [0.0] * wins + [1.0] * losses + [1.0] * ties
    items = lambda xs: {f"q{i}": x for i, x in enumerate(xs)}  # noqa: E731
    return paired_verdict(GateSpec(METRIC, floor=0.3), sum(challenger) / n, items(challenger), items(champ),
                          champion_version=champion)


def test_gate_moves_champion_only_on_a_pass_against_the_expected_champion(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    assert champion_version(client, name) is None
    assert not promote_if_passed(client, name, v1, [_first(0.2)], expected=None)  # below the floor
    assert champion_version(client, name) is None and champion_history(client, name) == []
    assert promote_if_passed(client, name, v1, [_first()], expected=None)
    assert str(resolve(client, name).version) == v1

    worse = _vs(v1, wins=5, losses=45)
    assert not worse.passed
    assert not promote_if_passed(client, name, v2, [worse], expected=v1)
    assert str(resolve(client, name).version) == v1  # champion unchanged
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.passed"] == "false" and tags["gate.reason"] == worse.reason
    assert tags["gate.champion_version"] == v1 and tags[f"gate.{METRIC}.n"] == "400"
    assert float(tags[f"gate.{METRIC}.diff"]) == -0.1 and tags[f"gate.{METRIC}.passed"] == "false"
    assert recorded_verdicts(tags) == [worse]

    # Verdicts must have been computed against the champion given as expected.
    with pytest.raises(ValueError, match="expected champion is v1"):
        promote_if_passed(client, name, v3, [_first()], expected=v1)
    with pytest.raises(ValueError, match="against v2"):
        promote_if_passed(client, name, v3, [_vs(v2, 20, 0)], expected=v1)
    assert not promote_if_passed(client, name, v3, [], expected=v1)  # no gates: fail closed
    assert client.get_model_version(name, v3).tags["gate.passed"] == "false"

    assert promote_if_passed(client, name, v3, [_vs(v1, wins=20, losses=10)], expected=v1)
    assert str(resolve(client, name).version) == v3
    history = champion_history(client, name)
    assert [(e.action, e.by, e.from_version, e.to_version, e.gate) for e in history] == [
        ("promote", "gate", None, v1, "passed"), ("promote", "gate", v1, v3, "passed")]
    assert [e.seq for e in history] == [1, 2] and "vs v1 on 400 paired items" in history[1].reason
    assert client.get_registered_model(name).tags["champion.history.000002"] == history[1].as_json()


def test_record_gate_round_trip_lower_is_better(store, name):
    _, client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts[0])
    nll = paired_verdict(GateSpec("eval/heldout/nll", higher_is_better=False, margin=0.05, floor=3.0), 2.875,
                         {"a": 2.0, "b": 3.0, "c": 2.5, "d": 4.0}, {"a": 2.1, "b": 2.9, "c": 2.7, "d": 4.1},
                         champion_version="9")
    acc = _vs("9", 3, 1, n=10)
    record_gate(client, name, v1, [nll, acc], "9")
    tags = client.get_model_version(name, v1).tags
    assert recorded_verdicts(tags) == [nll, acc]
    assert tags["gate.passed"] == str(nll.passed and acc.passed).lower() == "false"  # 10 items: too wide


def test_set_champion_is_compare_and_set_and_refuses_failed_gates(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    promote_if_passed(client, name, v1, [_first()], expected=None)
    record_gate(client, name, v2, [_vs(v1, 10, 0)], v1)
    record_gate(client, name, v3, [_vs(v1, 0, 40)], v1)

    with pytest.raises(ChampionChanged) as err:  # decided when there was no champion
        set_champion(client, name, v2, by="test", expected=None)
    assert str(err.value) == (f"champion of {name!r} changed since the decision: expected no champion, "
                              f"found v{v1}; nothing moved, decide again against v{v1}")
    assert err.value.actual == v1 and str(resolve(client, name).version) == v1
    assert len(champion_history(client, name)) == 1

    with pytest.raises(GateNotPassed, match=rf"v{v3} of .* failed its gate: {METRIC}: -0.100 .* fails \(lower bound"):
        set_champion(client, name, v3, by="test", expected=v1)
    with pytest.raises(ReasonRequired):
        set_champion(client, name, v3, by="test", expected=v1, forced=True)
    event = set_champion(client, name, v3, by="test", reason="  hotfix\nfor INC-7 ", expected=v1, forced=True)
    assert (event.action, event.from_version, event.to_version, event.gate) == ("forced", v1, v3, "failed")
    assert event.reason == "hotfix for INC-7" and event.user  # one line in the history
    tags = client.get_model_version(name, v3).tags
    assert tags["champion.forced"] == "true" and tags["champion.forced_reason"] == "hotfix\nfor INC-7"
    assert "forced" in tags[FLAGGED] and "failed gate" in tags[FLAGGED]
    assert set_champion(client, name, v3, by="test", expected=v3) is None  # already champion: no entry
    assert len(champion_history(client, name)) == 2


def test_two_concurrent_promotions_against_one_champion_exactly_one_wins(store, name, monkeypatch):
    uri, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    promote_if_passed(client, name, v1, [_first()], expected=None)
    for v in (v2, v3):
        record_gate(client, name, v, [_vs(v1, 10, 0)], v1)

    # Widen the race: each writer pauses between its read of the champion and its alias write.
    # Without the lock both would read v1 and both "win".
    original = MlflowClient.set_registered_model_alias

    def slow_alias(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", slow_alias)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def decide(version: str) -> None:
        own = MlflowClient(tracking_uri=uri, registry_uri=uri)
        barrier.wait()
        try:
            outcomes[version] = set_champion(own, name, version, by="gate", expected=v1)
        except ChampionChanged as e:
            outcomes[version] = e

    threads = [threading.Thread(target=decide, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [v for v, o in outcomes.items() if not isinstance(o, Exception)]
    lost = [o for o in outcomes.values() if isinstance(o, ChampionChanged)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].expected == v1 and lost[0].actual == won[0]
    assert str(resolve(client, name).version) == won[0]
    history = champion_history(client, name)
    assert [(e.from_version, e.to_version) for e in history] == [(None, v1), (v1, won[0])]


def test_hand_move_is_recorded_flagged_and_rolled_back_through_history(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    promote_if_passed(client, name, v1, [_first()], expected=None)
    promote_if_passed(client, name, v2, [_vs(v1, 10, 0)], expected=v1)
    assert not promote_if_passed(client, name, v3, [_vs(v2, 0, 40)], expected=v2)

    client.set_registered_model_alias(name, "champion", v3)  # by hand, as the MLflow UI does
    event = sync_history(client, name)
    assert (event.action, event.by, event.from_version, event.to_version, event.gate) == (
        "outside", "outside flywheel", v2, v3, "failed")
    assert sync_history(client, name) is None  # recorded once
    flag = {r["version"]: r["flag"] for r in list_versions(client, name)}
    assert flag[v3] == "moved by hand outside flywheel over a failed gate" and flag[v2] == flag[v1] == ""

    assert rollback(client, name) == v2  # the champion before the hand move
    assert rollback(client, name) == v1  # two rollbacks: two steps back, not back and forth
    with pytest.raises(NothingToRollBack, match=rf"no earlier champion .* \(champion: v{v1}\)"):
        rollback(client, name)
    assert str(resolve(client, name).version) == v1
    assert [(e.action, e.to_version) for e in champion_history(client, name)] == [
        ("promote", v1), ("promote", v2), ("outside", v3), ("rollback", v2), ("rollback", v1)]
    assert client.get_model_version(name, v3).tags["rolled_back"] == "true"
    assert client.get_model_version(name, v2).tags["rolled_back"] == "true"


def test_alias_removed_by_hand_rolls_back_to_last_champion(store, name):
    _, client, exp, ckpts = store
    v1, v2 = (_register(client, exp, name, c) for c in ckpts[:2])
    promote_if_passed(client, name, v1, [_first()], expected=None)
    promote_if_passed(client, name, v2, [_vs(v1, 10, 0)], expected=v1)
    client.delete_registered_model_alias(name, "champion")
    assert champion_version(client, name) is None
    assert champion_history(client, name)[-1].to_version is None
    assert rollback(client, name) == v2
    assert rollback(client, name) == v1


def test_person_promotes_only_passed_versions_unless_forced(store, name):
    _, client, exp, ckpts = store
    v1, v2, v3 = (_register(client, exp, name, c) for c in ckpts)
    with pytest.raises(GateNotPassed, match=f"v{v1} of .* has no recorded gate result"):
        promote(client, name, v1)
    promote_if_passed(client, name, v1, [_first()], expected=None)
    record_gate(client, name, v2, [_vs(v1, 0, 40)], v1)
    with pytest.raises(GateNotPassed, match=rf"{METRIC}: -0.100 \[.*\] vs v{v1} on 400 paired items.*below -0.02"):
        promote(client, name, v2)
    with pytest.raises(ReasonRequired, match="needs a reason"):
        promote(client, name, v2, force=True)
    event = promote(client, name, v2, force=True, reason="customer demo needs the new format")
    assert (event.action, event.by, event.from_version, event.to_version) == ("forced", "flywheel models promote",
                                                                             v1, v2)
    assert str(resolve(client, name).version) == v2
    with pytest.raises(VersionNotFound, match=f"{name!r} has no version '99'"):
        promote(client, name, "99")
    with pytest.raises(ModelNotFound, match="'no-such-model' is not registered"):
        promote(client, "no-such-model", "1")
    with pytest.raises(ModelNotFound):
        rollback(client, "no-such-model")
    assert str(resolve(client, name).version) == v2


def test_rollback_needs_history_and_download_loads(store, name, tmp_path):
    uri, client, exp, ckpts = store
    v1, v2 = (_register(client, exp, name, c) for c in ckpts[:2])
    with pytest.raises(NothingToRollBack, match="no champion"):
        rollback(client, name)
    promote_if_passed(client, name, v1, [_first()], expected=None)
    with pytest.raises(LookupError, match=f"no earlier champion"):  # NothingToRollBack is a LookupError
        rollback(client, name)
    promote_if_passed(client, name, v2, [_vs(v1, 5, 0)], expected=v1)

    local = download(uri, name, dst=tmp_path / "champion")
    assert (local / "config.json").is_file() and (local / "meta.json").is_file()
    assert torch.equal(_first_weight(local), _first_weight(ckpts[1]))

    assert rollback(uri, name) == v1
    assert str(resolve(client, name).version) == v1

    local = download(client, name, dst=tmp_path / "after-rollback")
    assert torch.equal(_first_weight(local), _first_weight(ckpts[0]))
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()
    assert out.shape == (1, 7)

    assert (download(uri, name, alias="challenger") / "model.safetensors").is_file()  # dst=None
    one = download_version(client, name, v2, dst=tmp_path / "v2")
    assert torch.equal(_first_weight(one), _first_weight(ckpts[1]))
    with pytest.raises(VersionNotFound):
        download_version(client, name, "42")

    with pytest.raises(LookupError, match="nope"):
        download(uri, name, alias="nope")


def test_list_versions(store, name):
    _, client, exp, ckpts = store
    v1, v2 = (_register(client, exp, name, c) for c in ckpts[:2])
    promote_if_passed(client, name, v1, [_first()], expected=None)
    promote_if_passed(client, name, v2, [_vs(v1, 0, 40)], expected=v1)
    rows = list_versions(client, name)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["aliases"] == ["challenger"] and rows[1]["aliases"] == ["champion"]
    assert rows[0]["gate_passed"] == "false" and "fails (lower bound" in rows[0]["gate_reason"]
    assert rows[0]["gate_champion_version"] == v1 and rows[0]["gates"][0].n == 400
    assert rows[1]["gate_metric"] == METRIC and float(rows[1]["gate_value"]) == 0.5
    assert rows[1]["metrics"] == {"train/loss": "2.5"} and rows[1]["stage"] == "sft"
    assert rows[0]["run_id"] and rows[0]["created"].endswith("+00:00")
    assert rows[0]["flag"] == rows[1]["flag"] == "" and not rows[0]["forced"]
    with pytest.raises(ModelNotFound):
        list_versions(client, "no-such-model")
