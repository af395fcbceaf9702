"""MLflow behind the stages' `Tracker` protocol, small enough to pickle into a Ray worker.

    from registry.tracking import run_context
    with run_context(uri, "sft", "sft-tiny") as tracker:
        result = stages.sft.run(cfg, tracker=tracker)

A `MLflowTracker` is two strings (tracking URI, run id); its `MlflowClient` is built on first use
in whichever process it lands in. It never touches MLflow's global "active run", which does not
cross process boundaries anyway: a Ray worker gets the tracker (or the URI and a parent run id and
opens a child run with `start_run(..., parent_run_id=...)`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)


class MLflowTracker:
    """Logs to one MLflow run. Picklable: only `tracking_uri` and `run_id` travel."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, str]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"])

    def __repr__(self) -> str:
        return f"MLflowTracker(tracking_uri={self.tracking_uri!r}, run_id={self.run_id!r})"

    # -- the Tracker protocol

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dicts become dotted keys; values are stringified and cut to MLflow's limits.

        MLflow params are write-once: logging a key again with a different value is an error.
        """
        items = [
            Param(key[:MAX_ENTITY_KEY_LENGTH], str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in flatten_params(params).items()
        ]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for batch in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a whole directory (e.g. a Hugging Face checkpoint) under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    # -- beyond the protocol

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dataset(self, name: str, digest: str, source: str, source_type: str = "dvc",
                    context: str = "training", profile: Mapping[str, Any] | None = None) -> None:
        """An MLflow dataset input (the UI's Dataset column): metadata only, nothing is loaded or copied.

        For a DVC version, `digest` is its md5 and `source` where the remote keeps it, so the run names
        the exact data it read and where to fetch it.
        """
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=source,
                          profile=json.dumps(dict(profile)) if profile else None)
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"opt": {"lr": 1e-3}} -> {"opt.lr": 1e-3}.

    >>> flatten_params({"a": 1, "opt": {"lr": 0.1, "betas": [0.9, 0.95]}})
    {'a': 1, 'opt.lr': 0.1, 'opt.betas': [0.9, 0.95]}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict | None = None,
) -> MLflowTracker:
    """Create (the experiment if needed and) a run; nested under `parent_run_id` if given."""
    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri, experiment)
    run_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
    tracker = MLflowTracker(tracking_uri, run.info.run_id)
    tracker._client = client
    return tracker


def reopen_run(tracking_uri: str, run_id: str) -> MLflowTracker:
    """An existing run, RUNNING again: a resumed lifecycle logs into the run it started with.

    Its child runs still RUNNING were left by a process that was killed: they become KILLED, so the
    UI shows each attempt's end (the stage's retry opens a run of its own).
    """
    tracker = MLflowTracker(tracking_uri, run_id)
    client = tracker.client
    run = client.get_run(run_id)  # raises if the run is gone
    client.update_run(run_id, status="RUNNING")
    stale = client.search_runs([run.info.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                               filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and attributes.status = 'RUNNING'")
    for child in stale:
        client.set_terminated(child.info.run_id, status="KILLED")
    return tracker


def end_run(tracker: MLflowTracker, status: str = "FINISHED") -> None:
    """Mark the run terminated: FINISHED, FAILED or KILLED."""
    RunStatus.from_string(status)  # raises on a typo rather than storing garbage
    tracker.client.set_terminated(tracker.run_id, status=status)


@contextlib.contextmanager
def run_context(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    run_id: str | None = None,
) -> Iterator[MLflowTracker]:
    """`start_run` ... `end_run`: FINISHED on success, FAILED if the block raises, KILLED on ^C.

    With `run_id`, that existing run is reopened (`reopen_run`) instead of a new one started.
    """
    tracker = start_run(tracking_uri, experiment, run_name, parent_run_id, tags) if run_id is None else \
        reopen_run(tracking_uri, run_id)
    try:
        yield tracker
    except Exception:
        end_run(tracker, "FAILED")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: stopped, not broken
        end_run(tracker, "KILLED")
        raise
    end_run(tracker, "FINISHED")


def _experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts, or None to let the backend decide.

    An HTTP tracking server decides itself (ours serves artifacts, a production one has its own
    --default-artifact-root). A bare SQLite store would default to ./mlruns in the current
    directory: keep artifacts next to the database instead.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
        return (db.parent / "mlartifacts" / folder).as_uri()
    return None


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
