"""Model cards: rendered from tags, meta.json and history; logged as an artifact and a description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from registry.gate import GateSpec, paired_verdict
from registry.model_card import CARD_FILE, MAX_DESCRIPTION, build_model_card, description_summary, log_model_card
from registry.models import promote_if_passed, record_gate, register_checkpoint

ACC = "eval/arithmetic/accuracy"


def _checkpoint(root: Path) -> Path:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    out = root / "grpo-final"
    LlamaForCausalLM(cfg).save_pretrained(out)
    pretrain = {"stage": "pretrain", "lineage": {"tokenizer.run_id": "tok1"}, "parent": None, "parent_meta": None}
    sft = {"stage": "sft", "lineage": {"pretrain.run_id": "pt1"}, "parent": "/runs/pretrain/final",
           "parent_meta": pretrain}
    (out / "meta.json").write_text(json.dumps({
        "stage": "grpo", "step": 40, "git_commit": "cafe123", "saved_at": "2026-12-01T10:00:00Z",
        "lineage": {"sft.run_id": "sft1"}, "parent": "/runs/sft/final", "parent_meta": sft,
        "metrics": {"train/loss": 0.5}}))
    return out


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("card", artifact_location=(root / "artifacts").as_uri())
    ckpt = _checkpoint(root)
    lineage = {"data.dvc_md5": "3f2a.dir", "tokenizer.run_id": "tok1", "git.commit": "cafe123",
               "eval." + ACC: "0.75", f"eval.{ACC}_stderr": "0.0217", "eval.eval/heldout/nll": "3.2"}
    versions = [register_checkpoint(client, "card-lm", ckpt, client.create_run(exp).info.run_id, lineage)
                for _ in range(2)]
    promote_if_passed(client, "card-lm", versions[0], [paired_verdict(GateSpec(ACC, floor=0.3), 0.7, None, None)],
                      expected=None)
    items = {f"q{i}": 1.0 for i in range(400)}
    worse = dict(items, **{f"q{i}": 0.0 for i in range(60)})
    record_gate(client, "card-lm", versions[1],
                [paired_verdict(GateSpec(ACC, floor=0.3), 0.85, worse, items, champion_version=versions[0])],
                versions[0])
    return client, versions


def test_card_shows_lineage_stages_evaluation_gate_and_limitations(registered):
    client, (v1, v2) = registered
    card = build_model_card(client, "card-lm", v2)
    assert card.startswith(f"# card-lm v{v2}\n\nAliases: challenger. Gate: failed.")
    assert "- `data.dvc_md5`: `3f2a.dir`" in card and "- `git.commit`: `cafe123`" in card
    stages = card.split("## Training stages")[1].split("##")[0]
    assert stages.index("**pretrain**") < stages.index("**sft**") < stages.index("**grpo**, step 40")
    assert "sft.run_id=sft1" in stages and "commit `cafe123`" in stages
    assert f"| `{ACC}` | 0.75 | 0.0217 | -0.15 [" in card  # value ± stderr, then the paired diff
    assert f"vs v{v1}, n=400 |" in card and "| `eval/heldout/nll` | 3.2 | - | - |" in card
    assert "**failed** against v1" in card and "| FAIL |" in card and "fails (lower bound" in card
    assert "2 layers, hidden size 64, vocabulary 128" in card
    assert "standard-library docstrings" in card and "Never champion." in card

    champion = build_model_card(client, "card-lm", v1)
    assert "Gate: passed." in champion and "promote by gate: no champion → v1" in champion


def test_log_model_card_writes_artifact_and_description(registered, tmp_path):
    client, (v1, _) = registered
    card = build_model_card(client, "card-lm", v1)
    log_model_card(client, "card-lm", v1, card)
    mv = client.get_model_version("card-lm", v1)
    assert mv.description == card
    local = client.download_artifacts(mv.run_id, CARD_FILE, str(tmp_path))
    assert Path(local).read_text() == card


def test_long_card_is_cut_at_a_section_and_says_where_the_rest_is():
    card = "# x\n\n## A\n" + "a" * 3000 + "\n## B\n" + "b" * 3000 + "\n"
    short = description_summary(card, "artifact model_card.md of run r1")
    assert len(short) <= MAX_DESCRIPTION and "## A" in short and "## B" not in short
    assert short.endswith("the full card is artifact model_card.md of run r1)")
    assert description_summary("# small\n", "x") == "# small\n"
