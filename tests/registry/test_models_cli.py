"""`flywheel models ...` through cli.main on a temporary SQLite store: output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from flows import cli
from registry.gate import GateSpec, paired_verdict
from registry.models import promote_if_passed, record_gate, register_checkpoint

ACC = "eval/arithmetic/accuracy"
NAME = "cli-lm"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 champion (gate), v2 champion (gate, vs v1), v3 failed its gate vs v2."""
    root = tmp_path_factory.mktemp("cli")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("cli", artifact_location=(root / "artifacts").as_uri())
    ckpt = root / "ckpt"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"stage": "grpo", "parent": None, "metrics": {}}))
    v1, v2, v3 = (register_checkpoint(client, NAME, ckpt, client.create_run(exp).info.run_id, {"git.commit": "abc"})
                  for _ in range(3))
    same = {f"q{i}": 1.0 for i in range(400)}
    better = dict(same)
    worse = dict(same, **{f"q{i}": 0.0 for i in range(40)})
    spec = GateSpec(ACC, floor=0.3)
    promote_if_passed(client, NAME, v1, [paired_verdict(spec, 0.9, None, None)], expected=None)
    promote_if_passed(client, NAME, v2, [paired_verdict(spec, 1.0, better, same, champion_version=v1)], expected=v1)
    record_gate(client, NAME, v3, [paired_verdict(spec, 0.9, worse, same, champion_version=v2)], v2)
    return uri, client


@pytest.fixture
def env(registry, monkeypatch):
    uri, client = registry
    # services.up() starts nothing when both URLs are set: the CLI talks to this store only.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    return client


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["models", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _champion(client) -> str:
    return str(client.get_registered_model(NAME).aliases["champion"])


def test_bad_requests_are_one_line_on_stderr(env, capsys):
    cases = {
        ("show", "99", "--name", NAME): (1, f"flywheel models show: model '{NAME}' has no version '99' in sqlite:"),
        ("list", "--name", "nope"): (1, "flywheel models list: model 'nope' is not registered in sqlite:"),
        ("promote", "3", "--name", NAME): (1, "flywheel models promote: v3 of 'cli-lm' failed its gate: "
                                              f"{ACC}: -0.100 ["),
        ("promote", "3", "--force", "--name", NAME): (2, "flywheel models promote: forcing v3 of 'cli-lm' past its "
                                                         "gate needs a reason"),
        ("rollback", "--name", "nope"): (1, "flywheel models rollback: model 'nope' is not registered"),
    }
    for argv, (code, start) in cases.items():
        rc, out, err = _run(capsys, *argv)
        assert rc == code, argv
        assert err.startswith(start), (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err and out == "", argv
    assert _champion(env) == "2"  # nothing moved
    rc, _, err = _run(capsys, "promote", "3", "--name", NAME)
    assert "lower bound -0.129 is 0.109 below -0.02" in err and "--force --reason TEXT" in err


def test_list_show_and_rollback_after_a_hand_move(env, capsys):
    rc, out, _ = _run(capsys, "list", "--name", NAME)
    assert rc == 0 and "FLAGGED" not in out
    env.set_registered_model_alias(NAME, "champion", "3")  # by hand, as in the MLflow UI

    rc, out, _ = _run(capsys, "list", "--name", NAME)
    v3 = next(line for line in out.splitlines() if line.split()[0] == "3")
    assert rc == 0 and "champion" in v3 and "false" in v3 and "-0.100" in v3
    assert v3.endswith("FLAGGED: moved by hand outside flywheel over a failed gate")

    rc, out, _ = _run(capsys, "show", "3", "--name", NAME)
    assert rc == 0 and out.startswith(f"# {NAME} v3\n") and "**FLAGGED: moved by hand" in out
    assert "## Lineage" in out and "`git.commit`: `abc`" in out and "## Promotion gate" in out
    assert "outside by outside flywheel: v2 → v3" in out

    rc, out, _ = _run(capsys, "rollback", "--name", NAME)
    assert (rc, out) == (0, f"{NAME}: champion is now v2\n") and _champion(env) == "2"  # before the hand move
    rc, out, _ = _run(capsys, "rollback", "--name", NAME)
    assert (rc, out) == (0, f"{NAME}: champion is now v1\n")
    rc, out, err = _run(capsys, "rollback", "--name", NAME)
    assert rc == 1 and err == (f"flywheel models rollback: '{NAME}' has no earlier champion in its history to "
                               "roll back to (champion: v1)\n")

    rc, out, _ = _run(capsys, "promote", "2", "--name", NAME)
    assert (rc, out) == (0, f"{NAME}: champion is now v2, was v1\n")
    rc, out, _ = _run(capsys, "promote", "3", "--force", "--reason", "demo needs it", "--name", NAME)
    assert (rc, out) == (0, f"{NAME}: champion is now v3, was v2 (forced: demo needs it)\n")
    assert _champion(env) == "3"
