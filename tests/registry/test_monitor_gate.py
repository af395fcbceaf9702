"""The promotion gate refuses a candidate that tripped a reward-hacking monitor, on a real SQLite MLflow
store with real tiny Hugging Face checkpoints: alarms from meta.json (the RL stages) and from evaluation
become the `monitor.alarms` tag; the gate fails it, a person is refused unless they force it with a
reason (which flags it), and the model card shows the alarms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from registry.gate import MONITOR_METRIC, GateSpec, monitor_verdict, paired_verdict
from registry.model_card import build_model_card
from registry.models import (FLAGGED, MONITOR_ALARMS, GateNotPassed, MonitorAlarmed, ReasonRequired, champion_version,
                             list_versions, meta_alarms, promote, promote_if_passed, record_alarms, record_gate,
                             recorded_verdicts, register_checkpoint, sync_history)
from stages.monitors import Alarm, MonitorConfig, check

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

METRIC = "eval/arithmetic/accuracy"
GRPO_ALARMS = [a.to_dict() for a in check({"monitor/kl": 0.41, "monitor/polite_share": 0.2},
                                          MonitorConfig(kl_max=0.3))]  # the kl alarm only


def _checkpoint(root: Path, name: str, monitors: dict | None, parent_monitors: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    out = root / name
    LlamaForCausalLM(cfg).save_pretrained(out)
    sft = {"stage": "sft", "parent": None, "parent_meta": None, **({"monitors": parent_monitors} if parent_monitors else {})}
    meta = {"stage": "grpo", "parent": "/runs/sft/final", "parent_meta": sft, "metrics": {"rl/kl": 0.41},
            **({"monitors": monitors} if monitors is not None else {})}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("monitor-gate", artifact_location=(root / "artifacts").as_uri())
    ckpts = {"clean": _checkpoint(root, "clean", {"alarms": []}),
             "hacked": _checkpoint(root, "hacked", {"alarms": GRPO_ALARMS},
                                   parent_monitors={"alarms": ["monitor/length_drift=1.7>1"]})}
    return client, exp, ckpts


@pytest.fixture
def name(request) -> str:
    return f"lm-{request.node.name}"


def _register(client: MlflowClient, exp: str, name: str, ckpt: Path) -> str:
    return register_checkpoint(client, name, ckpt, client.create_run(exp).info.run_id, {"git.commit": "deadbeef"})


def _first(value: float = 0.5):
    return paired_verdict(GateSpec(METRIC, floor=0.3), value, None, None)


def test_meta_alarms_walk_the_parent_chain_oldest_first() -> None:
    meta = {"stage": "rs", "monitors": {"alarms": [{"metric": "monitor/kl", "value": 2.0, "threshold": 1.0}]},
            "parent_meta": {"stage": "grpo", "monitors": {"alarms": GRPO_ALARMS},
                            "parent_meta": {"stage": "sft", "parent_meta": None}}}
    assert meta_alarms(meta) == ["grpo:monitor/kl=0.41>0.3", "rs:monitor/kl=2>1"]
    assert meta_alarms({"stage": "sft", "monitors": {"alarms": []}}) == [] == meta_alarms({"stage": "sft"})


def test_register_records_alarms_and_the_gate_refuses_them(store, name) -> None:
    client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts["clean"])
    assert MONITOR_ALARMS not in client.get_model_version(name, v1).tags  # no alarms, no tag
    assert promote_if_passed(client, name, v1, [_first()], expected=None)

    v2 = _register(client, exp, name, ckpts["hacked"])
    tags = client.get_model_version(name, v2).tags
    assert tags[MONITOR_ALARMS] == "sft:monitor/length_drift=1.7>1; grpo:monitor/kl=0.41>0.3"
    better = paired_verdict(GateSpec(METRIC, floor=0.3), 0.6, {f"q{i}": 1.0 for i in range(400)},
                            {f"q{i}": float(i >= 20) for i in range(400)}, champion_version=v1)
    assert better.passed  # on its metrics it would pass ...
    assert not promote_if_passed(client, name, v2, [better], expected=v1)  # ... but it tripped monitors
    assert champion_version(client, name) == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.passed"] == "false"
    assert recorded_verdicts(tags) == [better, monitor_verdict(["sft:monitor/length_drift=1.7>1",
                                                                "grpo:monitor/kl=0.41>0.3"])]
    assert tags["gate.reason"].endswith("monitor/alarms: 2 reward-hacking monitor alarms "
                                        "(sft:monitor/length_drift=1.7>1; grpo:monitor/kl=0.41>0.3): fails")
    assert tags[f"gate.{MONITOR_METRIC}.passed"] == "false" and tags[f"gate.{MONITOR_METRIC}.value"] == "2.0"


def test_a_person_is_refused_unless_forcing_with_a_reason_which_flags(store, name) -> None:
    client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts["clean"])
    promote_if_passed(client, name, v1, [_first()], expected=None)
    v2 = _register(client, exp, name, ckpts["hacked"])
    with pytest.raises(MonitorAlarmed, match=r"no recorded gate result; it carries reward-hacking monitor alarms: "
                                             r"sft:monitor/length_drift=1\.7>1; grpo:monitor/kl=0\.41>0\.3 "
                                             r"\(forcing it needs a reason\)"):
        promote(client, name, v2)
    with pytest.raises(ReasonRequired):
        promote(client, name, v2, force=True)
    assert champion_version(client, name) == v1
    event = promote(client, name, v2, force=True, reason="A/B test of the KL leash")
    assert (event.action, event.to_version, event.gate) == ("forced", v2, "none")
    flag = client.get_model_version(name, v2).tags[FLAGGED]
    assert flag == ("forced by flywheel models promote (A/B test of the KL leash) over no recorded gate and "
                    "monitor alarms (sft:monitor/length_drift=1.7>1; grpo:monitor/kl=0.41>0.3)")
    row = next(r for r in list_versions(client, name) if r["version"] == v2)
    assert row["alarms"] == ["sft:monitor/length_drift=1.7>1", "grpo:monitor/kl=0.41>0.3"] and row["forced"]


def test_evaluation_alarms_refuse_a_version_whose_gate_passed(store, name) -> None:
    """Alarms recorded after a passing gate still stop a promotion (MonitorAlarmed is a GateNotPassed)."""
    client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts["clean"])
    record_gate(client, name, v1, [_first()], None)
    evaluation = [Alarm("eval/monitor/polite_share", 0.75, 0.5, "many answers carry stock polite phrases").to_dict()]
    assert record_alarms(client, name, v1, evaluation) == ["evaluate:eval/monitor/polite_share=0.75>0.5"]
    assert record_alarms(client, name, v1, evaluation) == ["evaluate:eval/monitor/polite_share=0.75>0.5"]  # once
    with pytest.raises(GateNotPassed, match=r"carries reward-hacking monitor alarms: "
                                            r"evaluate:eval/monitor/polite_share=0\.75>0\.5"):
        promote(client, name, v1)
    assert champion_version(client, name) is None
    # the gate run afresh now fails too, and says why
    assert not promote_if_passed(client, name, v1, [_first()], expected=None)
    assert "evaluate:eval/monitor/polite_share=0.75>0.5" in client.get_model_version(name, v1).tags["gate.reason"]
    promote(client, name, v1, force=True, reason="polite on purpose: the customer-facing persona")
    flag = client.get_model_version(name, v1).tags[FLAGGED]
    assert "failed gate and monitor alarms (evaluate:eval/monitor/polite_share=0.75>0.5)" in flag


def test_a_hand_move_of_an_alarmed_version_is_flagged(store, name) -> None:
    client, exp, ckpts = store
    v1 = _register(client, exp, name, ckpts["clean"])
    record_gate(client, name, v1, [_first()], None)
    record_alarms(client, name, v1, ["monitor/kl=3>1"], source="ppo")
    client.set_registered_model_alias(name, "champion", v1)  # the MLflow UI: flywheel cannot stop it
    assert sync_history(client, name).to_version == v1
    assert client.get_model_version(name, v1).tags[FLAGGED] == (
        "moved by hand outside flywheel over monitor alarms (ppo:monitor/kl=3>1)")


def test_model_card_shows_the_alarms(store, name) -> None:
    client, exp, ckpts = store
    clean = _register(client, exp, name, ckpts["clean"])
    hacked = _register(client, exp, name, ckpts["hacked"])
    promote_if_passed(client, name, hacked, [_first()], expected=None)
    card = build_model_card(client, name, hacked)
    assert "**MONITOR ALARMS: sft:monitor/length_drift=1.7>1; grpo:monitor/kl=0.41>0.3.**" in card.splitlines()[2]
    section = card.split("## Reward-hacking monitors")[1].split("##")[0]
    assert "- `grpo:monitor/kl=0.41>0.3`" in section and "refuses it" in section
    assert f"| `{MONITOR_METRIC}` | 2 |" in card and "| FAIL |" in card  # the gate table row
    assert "monitor.alarms" not in card.split("## Lineage")[1].split("##")[0]  # not lineage
    assert "No reward-hacking monitor alarms were recorded" in build_model_card(client, name, clean)
