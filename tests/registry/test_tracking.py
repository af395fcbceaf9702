"""MLflowTracker against a local SQLite store (fast) and against the real embedded server."""

from __future__ import annotations

import pickle

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from registry.tracking import MLflowTracker, end_run, flatten_params, run_context, start_run
from stages.tracking import Tracker


def _exercise(tracker: Tracker, tmp_path) -> None:
    tracker.log_params({"lr": 1e-3, "model": {"hidden": 64, "heads": 2}, "note": "x" * 7000})
    for step in range(3):
        tracker.log_metrics({"train/loss": 2.0 - step, "eval/arith/acc": 0.1 * step}, step=step)
    (tmp_path / "meta.json").write_text('{"stage": "sft"}')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    tracker.log_artifact(tmp_path / "meta.json")
    tracker.log_artifact(ckpt, artifact_path="hf_model")


def _check(uri: str, run_id: str) -> None:
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["model.hidden"] == "64"
    assert len(run.data.params["note"]) == 6000  # MLflow's limit
    assert run.data.metrics == {"train/loss": 0.0, "eval/arith/acc": pytest.approx(0.2)}
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"meta.json", "hf_model"}
    assert [a.path for a in client.list_artifacts(run_id, "hf_model")] == ["hf_model/config.json"]
    assert run.info.status == "FINISHED"


def test_logs_to_sqlite_store(mlflow_uri, tmp_path):
    with run_context(mlflow_uri, "unit", "sqlite-run", tags={"stage": "sft"}) as tracker:
        _exercise(tracker, tmp_path)
    _check(mlflow_uri, tracker.run_id)
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).data.tags["stage"] == "sft"
    # artifacts sit next to the database, not in ./mlruns of whatever the cwd is
    assert (tmp_path / "mlartifacts" / "unit").is_dir()


def test_logs_to_real_server(services, tmp_path):
    with run_context(services["mlflow"], "server", "server-run") as tracker:
        _exercise(tracker, tmp_path)
    _check(services["mlflow"], tracker.run_id)
    artifact_uri = MlflowClient(services["mlflow"]).get_run(tracker.run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path


def test_pickle_round_trip_keeps_logging(mlflow_uri):
    tracker = start_run(mlflow_uri, "unit", "pickled")
    tracker.log_metrics({"a": 1.0}, step=0)  # the client now exists ...
    clone = pickle.loads(pickle.dumps(tracker))  # ... and is not what travels
    assert (clone.tracking_uri, clone.run_id) == (tracker.tracking_uri, tracker.run_id)
    assert clone._client is None
    clone.log_metrics({"a": 2.0}, step=1)
    end_run(clone)
    history = MlflowClient(mlflow_uri).get_metric_history(tracker.run_id, "a")
    assert [m.value for m in history] == [1.0, 2.0]


def test_nested_run_carries_parent(mlflow_uri):
    with run_context(mlflow_uri, "unit", "lifecycle") as parent:
        with run_context(mlflow_uri, "unit", "sft", parent_run_id=parent.run_id) as child:
            pass
    run = MlflowClient(mlflow_uri).get_run(child.run_id)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent.run_id
    assert run.info.run_name == "sft"


def test_run_context_marks_failed(mlflow_uri):
    with pytest.raises(ValueError, match="boom"):
        with run_context(mlflow_uri, "unit", "broken") as tracker:
            raise ValueError("boom")
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_many_params_are_batched(mlflow_uri):
    with run_context(mlflow_uri, "unit", "wide") as tracker:
        tracker.log_params({f"p{i}": i for i in range(250)})  # > 100 per log_batch
    assert len(MlflowClient(mlflow_uri).get_run(tracker.run_id).data.params) == 250


def test_flatten_params():
    assert flatten_params({"a": {"b": {"c": 1}}, "d": [1]}) == {"a.b.c": 1, "d": [1]}


def test_end_run_rejects_unknown_status(mlflow_uri):
    tracker = MLflowTracker(mlflow_uri, "no-such-run")
    with pytest.raises(Exception, match="Valid run status strings"):
        end_run(tracker, "DONE")
