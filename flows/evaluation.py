"""Evaluate any registered version (or alias) on any task list, outside the lifecycle.

    flywheel evaluate                                          # the champion, the preset's tasks
    flywheel evaluate --version 3 evaluate.tasks=[heldout,arithmetic_mc] evaluate.harness_tasks=[flywheel_arithmetic]

Results land in an MLflow run of their own (tagged with the model name and version), as metrics
`eval/<task>/<metric>` with their standard errors, plus the stage's report and per-item scores.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.lifecycle import EXPERIMENT, _finite
from flows.lifecycle_config import LifecycleConfig
from infra.settings import load_settings
from registry import models
from registry.tracking import run_context
from stages import evaluate


@flow(name="evaluate-version", log_prints=True, validate_parameters=False)
def evaluate_version(model_name: str = "flywheel-chat", version: str = "champion", dataset: str | None = None,
                     preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, float]:
    """`version` is a number or an alias; `dataset` defaults to the version's own training data (its lineage)."""
    cfg = LifecycleConfig.load(preset, overrides)
    s = load_settings()
    uri = s.required_mlflow_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    number = models.resolve_version(client, model_name, version)
    tags = client.get_model_version(model_name, number).tags
    data = Path(dataset) if dataset else s.repo_root / tags.get("data.path", "data/clean")
    if not data.exists():
        raise FileNotFoundError(f"evaluation data {data} does not exist (v{number}'s lineage names "
                                f"{tags.get('data.path', '-')}); pass dataset=<dir>, or `dvc pull` it")
    out = s.home / "evaluations" / f"{model_name}-v{number}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = models.download_version(client, model_name, number, dst=out / "model")
    # The held-out split of the shards the version's lineage names (data/tokens), else of the shards its
    # pretraining read (the stage finds them in meta.json).
    tokens = s.repo_root / tags["tokens.path"] if tags.get("tokens.path") else None
    stage_cfg = cfg.build("evaluate", checkpoint=checkpoint, dataset=data, tokens=tokens if tokens and tokens.exists()
                          else None, output_dir=out / "evaluate")
    with run_context(uri, EXPERIMENT, f"evaluate-{model_name}-v{number}",
                     tags={"stage": "evaluate", "model.name": model_name, "model.version": number}) as tracker:
        result = evaluate.run(stage_cfg, tracker)
    metrics = _finite(result.metrics)
    get_run_logger().info("%s v%s: %s", model_name, number,
                          ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_stderr")))
    return metrics
