"""The model registry: Hugging Face checkpoint directories in MLflow, moved by aliases and tags.

    register_checkpoint(client, "flywheel-lm", ckpt_dir, run_id, lineage_tags)   # -> "3", alias challenger
    promote_if_better(client, "flywheel-lm", "3", "eval/arith/accuracy", 0.42)   # gate -> alias champion
    rollback(client, "flywheel-lm")                                              # champion -> previous one
    download(tracking_uri, "flywheel-lm")                                        # -> local HF dir

A checkpoint is registered unchanged: its files are logged as the run's `hf_model` artifact folder
and a model version points at `runs:/<run_id>/hf_model`. `mlflow.register_model` fails on a plain
directory and `mlflow.transformers.log_model` is broken with transformers 5, so neither is used.
Stages are deprecated in MLflow: the lifecycle is two aliases ("challenger" = newest registered,
"champion" = what serves) plus tags on each version:

- `gate.<metric>`: the version's value of a gate metric (the champion's is what challengers face);
- `gate.passed`, `gate.reason`, `gate.metric`, `gate.champion_version`, `gate.champion_value`,
  `gate.tolerance`, `gate.higher_is_better`: the last gate decision taken for this version;
- `previous_champion`: the champion this version replaced, so `rollback` knows where to go;
- `metric.<name>` and `stage`: copied from the checkpoint's meta.json for the `models list` table.

Every function takes an `MlflowClient` or a tracking URI (which also serves as registry URI).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_PATH = "hf_model"
PREVIOUS_CHAMPION = "previous_champion"


def _client(client_or_uri: MlflowClient | str) -> MlflowClient:
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    return MlflowClient(tracking_uri=client_or_uri, registry_uri=client_or_uri)


def _is(err: MlflowException, code: int) -> bool:
    return err.error_code == ErrorCode.Name(code)


def _meta_tags(checkpoint: Path) -> dict[str, str]:
    """`stage` and numeric `metric.<name>` tags from the checkpoint's meta.json, if it has one."""
    meta_file = checkpoint / "meta.json"
    if not meta_file.is_file():
        return {}
    meta = json.loads(meta_file.read_text())
    tags = {}
    if isinstance(meta.get("stage"), str):
        tags["stage"] = meta["stage"]
    for key, value in (meta.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"metric.{key}"] = repr(float(value))
    return tags


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if not _is(err, RESOURCE_DOES_NOT_EXIST):
            raise
    description = (
        "Hugging Face checkpoint directories (save_pretrained + meta.json) registered by llm-flywheel. "
        f"Alias '{CHAMPION}' is the served model, '{CHALLENGER}' the newest registered version; "
        "gate decisions and lineage are version tags."
    )
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:  # created concurrently by another process: fine
        if not _is(err, RESOURCE_ALREADY_EXISTS):
            raise


def register_checkpoint(
    client: MlflowClient | str, name: str, checkpoint: Path, run_id: str, tags: dict[str, str]
) -> str:
    """Log `checkpoint` unchanged as the run's `hf_model` artifacts, register it, alias it challenger.

    `tags` are the lineage tags (data.dvc_hash, tokenizer.run_id, parent runs, git.commit, ...);
    `stage` and `metric.*` tags from meta.json are added (explicit `tags` win). Returns the version.
    """
    client = _client(client)
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    client.log_artifacts(run_id, str(checkpoint), artifact_path=ARTIFACT_PATH)
    _ensure_registered_model(client, name)
    all_tags = {**_meta_tags(checkpoint), **{k: str(v) for k, v in tags.items()}}
    mv = client.create_model_version(
        name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=all_tags
    )
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


@dataclass
class GateResult:
    passed: bool
    metric: str
    challenger: float
    champion: float | None  # the champion's recorded value; None when there is none to compare
    tolerance: float
    higher_is_better: bool
    reason: str


def _champion_or_none(client: MlflowClient, name: str) -> ModelVersion | None:
    # Read the alias map rather than catching get_model_version_by_alias's error: its error code
    # for a missing alias differs between stores (INVALID_PARAMETER_VALUE on SQL stores).
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def _decide(
    champion: ModelVersion | None, version: str, metric: str, value: float,
    higher_is_better: bool, tolerance: float,
) -> tuple[bool, float | None, str]:
    """(passed, champion value, reason) of the promotion gate."""
    if not math.isfinite(value):
        return False, None, f"{metric}={value} is not finite"
    if champion is None:
        return True, None, "first version with a gate result: no champion to beat"
    if str(champion.version) == str(version):
        return True, value, f"v{version} is already the champion"
    recorded = champion.tags.get(f"gate.{metric}")
    if recorded is None:
        # Fail closed: without the champion's value there is nothing to prove "no regression".
        return False, None, (
            f"champion v{champion.version} has no recorded gate.{metric}; "
            "evaluate it on this metric or promote by hand"
        )
    champ = float(recorded)
    if higher_is_better:
        passed, bound, cmp = value >= champ - tolerance, champ - tolerance, ">="
    else:
        passed, bound, cmp = value <= champ + tolerance, champ + tolerance, "<="
    verdict = "passes" if passed else "regresses"
    need = "" if passed else f", needs {cmp} {bound:.6g}"
    return passed, champ, (
        f"{verdict}: {metric}={value:.6g} vs champion v{champion.version} {champ:.6g} "
        f"({'higher' if higher_is_better else 'lower'} is better, tolerance {tolerance:g}{need})"
    )


def promote_if_better(
    client: MlflowClient | str, name: str, version: str, metric: str, value: float,
    higher_is_better: bool = True, tolerance: float = 0.0,
) -> GateResult:
    """Make `version` the champion unless it regresses `metric` beyond `tolerance` vs the champion.

    The first gated version always becomes champion. The decision is written as `gate.*` tags on
    `version` whether it passes or not; on a pass the old champion is kept in `previous_champion`.
    """
    client = _client(client)
    version = str(version)
    champion = _champion_or_none(client, name)
    passed, champ_value, reason = _decide(champion, version, metric, value, higher_is_better, tolerance)

    tags = {
        "gate.metric": metric,
        "gate.passed": str(passed).lower(),
        "gate.reason": reason,
        "gate.tolerance": repr(float(tolerance)),
        "gate.higher_is_better": str(higher_is_better).lower(),
        "gate.champion_version": str(champion.version) if champion else "",
        "gate.champion_value": repr(champ_value) if champ_value is not None else "",
    }
    if math.isfinite(value):  # a NaN must not become the value future challengers face
        tags[f"gate.{metric}"] = repr(float(value))
    for key, val in tags.items():
        client.set_model_version_tag(name, version, key, val)

    if passed and (champion is None or str(champion.version) != version):
        if champion is not None:
            client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, str(champion.version))
        client.set_registered_model_alias(name, CHAMPION, version)
    return GateResult(passed, metric, float(value), champ_value, float(tolerance), higher_is_better, reason)


def rollback(client: MlflowClient | str, name: str) -> str:
    """Move champion back to the version the current champion replaced; returns that version."""
    client = _client(client)
    current = _champion_or_none(client, name)
    if current is None:
        raise LookupError(f"model {name!r} has no champion to roll back")
    previous = current.tags.get(PREVIOUS_CHAMPION)
    if not previous:
        raise LookupError(
            f"champion v{current.version} of {name!r} has no '{PREVIOUS_CHAMPION}' tag: "
            "nothing to roll back to"
        )
    client.get_model_version(name, previous)  # fails clearly if it was deleted
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    return str(previous)


def resolve(client_or_uri: MlflowClient | str, name: str, alias: str = CHAMPION) -> ModelVersion:
    """The model version an alias points at (LookupError if the alias is not set)."""
    client = _client(client_or_uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise LookupError(f"model {name!r} has no version with alias {alias!r}: {err.message}") from err


def download(
    tracking_uri: MlflowClient | str, name: str, alias: str = CHAMPION, dst: Path | None = None
) -> Path:
    """Download the version `<name>@<alias>` points at; returns the local HF directory.

    With `dst=None` and a local artifact store MLflow may return the stored folder itself:
    treat the result as read-only, or pass `dst`.
    """
    client = _client(tracking_uri)
    mv = resolve(client, name, alias)
    # Not "models:/name@alias": MLflow resolves models:/ URIs against the *global* registry URI
    # (mlflow.get_registry_uri()), ignoring the registry_uri argument, so resolve the version here.
    source = client.get_model_version_download_uri(name, str(mv.version))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source,
        dst_path=str(dst) if dst is not None else None,
        tracking_uri=client.tracking_uri,
    )
    path = Path(local)
    if not (path / "config.json").is_file() and (path / ARTIFACT_PATH / "config.json").is_file():
        path = path / ARTIFACT_PATH
    return path


def list_versions(client: MlflowClient | str, name: str) -> list[dict]:
    """One row per version, newest first: aliases, run, creation time, gate and metric tags."""
    client = _client(client)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)

    versions: list[ModelVersion] = []
    token = None
    escaped = name.replace("'", "\\'")
    while True:
        page = client.search_model_versions(f"name='{escaped}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break

    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        tags = dict(mv.tags)
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat(
                timespec="seconds"
            ),
            "stage": tags.get("stage", ""),
            "gate_metric": tags.get("gate.metric", ""),
            "gate_value": tags.get(f"gate.{tags['gate.metric']}", "") if "gate.metric" in tags else "",
            "gate_passed": tags.get("gate.passed", ""),
            "gate_reason": tags.get("gate.reason", ""),
            "previous_champion": tags.get(PREVIOUS_CHAMPION, ""),
            "metrics": {k.removeprefix("metric."): v for k, v in tags.items() if k.startswith("metric.")},
            "tags": tags,
        })
    return rows
