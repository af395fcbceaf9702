"""Datasets for people: the data report in MLflow and Prefect, and `flywheel data`.

    flywheel data list                                      every version: the current ones and every one a run read
    flywheel data checkout MD5 [--name clean]               that version back into data/<name>, from the DVC remote
    flywheel data checkout --model flywheel-chat@champion   the data a registered model was trained on

The catalogue is MLflow: every stage run logs the DVC versions it read as dataset inputs (name,
md5, remote location), so the list and a checkout work on a fresh clone too, given the tracking
server and the DVC remote (the settings `MLFLOW_TRACKING_URI` and `FLYWHEEL_DVC_REMOTE`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from infra.settings import load_settings
from registry import data_versions, models
from registry.tracking import MLflowTracker


def publish_report(mlflow_uri: str, run_id: str, stage_dirs: dict[str, Path], out_dir: Path) -> Path:
    """The data report (plots + table) as artifacts of run `run_id` and as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from stages import data_report

    report = data_report.build({name: d for name, d in stage_dirs.items() if Path(d).exists()}, Path(out_dir))
    tracker = MLflowTracker(mlflow_uri, run_id)
    tracker.log_artifact(report.png, "data")
    for name, folder in stage_dirs.items():
        if (Path(folder) / "report.json").is_file():
            tracker.log_artifact(Path(folder) / "report.json", f"data/{name}")
    docs = Path(stage_dirs.get("validate", out_dir)) / "data_docs"
    if docs.is_dir():
        tracker.log_artifact(docs, "data/data_docs")
    link = ""
    if mlflow_uri.startswith("http"):
        base = mlflow_uri.rstrip("/")
        link = (f"\n\n![data report]({base}/get-artifact?path=data/{report.png.name}&run_uuid={run_id})\n\n"
                f"[GX data docs and stage reports in MLflow]({base}/#/experiments/runs/{run_id}/artifacts)")
    create_markdown_artifact(markdown=report.markdown + link, key="data-report",
                             description="the data phase: sources, drops per filter, dedup, mixture, quality gate")
    return report.png


# --------------------------------------------------------------------------- the catalogue


def dataset_inputs(client: MlflowClient) -> Iterator[dict[str, Any]]:
    """Every dataset input of every run, newest run first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return
    token = None
    while True:
        page = client.search_runs(experiments, max_results=1000, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        for run in page:
            for di in run.inputs.dataset_inputs if run.inputs else ():
                context = next((t.value for t in di.tags if t.key == "mlflow.data.context"), "")
                yield {"name": di.dataset.name, "md5": di.dataset.digest, "source": di.dataset.source,
                       "run_id": run.info.run_id, "run_name": run.info.run_name, "context": context,
                       "start_time": run.info.start_time}
        token = page.token
        if not token:
            break


def catalogue(client: MlflowClient, repo_root: Path) -> list[dict[str, Any]]:
    """One row per (dataset, md5): the current versions of data/ and every version a run read."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for di in dataset_inputs(client):
        row = rows.setdefault((di["name"], di["md5"]), {"name": di["name"], "md5": di["md5"], "runs": 0,
                                                       "last_used": di["start_time"], "current": False,
                                                       "source": di["source"]})
        row["runs"] += 1
    for version in data_versions.current_versions(repo_root):
        key = (f"data/{version.name}", version.md5)
        rows.setdefault(key, {"name": key[0], "md5": version.md5, "runs": 0, "last_used": None,
                              "source": data_versions.remote_location(version)})["current"] = True
    return sorted(rows.values(), key=lambda r: (r["name"], -(r["last_used"] or 0)))


def model_datasets(client: MlflowClient, name: str, version_or_alias: str) -> dict[str, str]:
    """data/<name> -> md5 of every DVC version in a registered version's lineage tags."""
    version = models.resolve_version(client, name, version_or_alias)
    tags = client.get_model_version(name, version).tags
    found = {}
    for key, md5 in tags.items():
        if key.endswith(".dvc_md5"):
            path = tags.get(key.removesuffix(".dvc_md5") + ".path", "")
            if path.startswith("data/"):
                found[path.split("/")[1]] = md5
    if not found:
        raise LookupError(f"{name} v{version} has no data lineage tags (*.dvc_md5): was it registered by a flywheel run?")
    return found


def _name_of(client: MlflowClient, md5: str) -> str:
    names = sorted({di["name"] for di in dataset_inputs(client) if di["md5"] == md5})
    if len(names) == 1:
        return names[0].removeprefix("data/")
    if not names:
        raise LookupError(f"no run read a dataset with md5 {md5} (see `flywheel data list`); pass --name to check "
                          "it out anyway")
    raise LookupError(f"md5 {md5} was read as {', '.join(names)}: pass --name")


def cmd_data(args: argparse.Namespace) -> int:
    from flows.feedback import _services

    _services()
    s = load_settings()
    client = MlflowClient(tracking_uri=s.required_mlflow_uri(), registry_uri=s.required_mlflow_uri())
    if args.action == "list":
        rows = catalogue(client, s.repo_root)
        if not rows:
            print("no dataset versions yet: `flywheel run` writes them")
            return 0
        print(f"{'dataset':24s} {'md5':38s} {'current':7s} {'runs':>4}  {'last used':16s} remote")
        for r in rows:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"] / 1000)) if r["last_used"] else "-"
            print(f"{r['name']:24s} {r['md5']:38s} {'yes' if r['current'] else '':7s} {r['runs']:>4}  {used:16s} "
                  f"{r['source']}")
        return 0
    try:
        if args.model:
            name, _, which = args.model.partition("@")
            wanted = model_datasets(client, name, which or models.CHAMPION)
        elif args.md5:
            wanted = {args.name or _name_of(client, args.md5): args.md5}
        else:
            print("flywheel data checkout: give an MD5 or --model NAME@ALIAS", file=sys.stderr)
            return 2
    except (LookupError, models.ModelNotFound) as err:
        print(f"flywheel data checkout: {err}", file=sys.stderr)
        return 1
    for name, md5 in sorted(wanted.items()):
        version = data_versions.checkout_version(s.repo_root, name, md5, s.dvc_remote)
        files = sum(1 for p in version.path.rglob("*") if p.is_file())
        print(f"data/{name}: md5 {version.md5} ({files} files, from {version.remote})")
    return 0
