"""The feedback round: human labels -> preference pairs (a DVC version) -> DPO from the champion (or, with
`feedback.method=reward_ppo`, a reward model on the pairs and PPO against it) -> evaluation paired
against the champion -> gate -> registry -> serving follows the alias.

    flywheel labels export          # the export alone: a new data/preferences.dvc
    flywheel feedback               # one round now, in the foreground
    deployment "feedback-check"     # every feedback.check_every_s: a round once feedback.min_new_labels are new

Why a scheduled check and not an event automation: the labels database is the truth about what is
new, and "labels since the last export" is a question only it can answer. Prefect's event triggers
count events inside a sliding time window, not since the last run, so a trigger on per-label events
would fire on a window's worth of labels, lose count across a page restart, and fire again for
labels an earlier round already used. A check that runs every minute costs one COUNT query, adds at
most a minute to the loop, and is idempotent: two checks cannot start two rounds (a file lock).

Every model this round registers carries its data in its lineage: `preferences.dvc_md5` (the DVC
version of data/preferences it trained on) and `preferences.label_ids` (the label-id range), next to
the champion's own lineage (base data, tokenizer, pretraining) and `parent.version`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.lifecycle import EXPERIMENT, RunContext, evaluate_flow, promote_flow, run_stage
from flows.lifecycle_config import LifecycleConfig
from flows.serving import serve_flow
from infra.settings import load_settings
from registry import data_versions, models
from registry.tracking import end_run, run_context, start_run
from stages.checkpoint import git_commit
from ui import export
from ui.store import Store, open_store

PREFERENCES = "preferences"  # data/preferences: pairs.jsonl + summary.json, one DVC version per export
# What a feedback model inherits from the champion it starts from: where its weights came from.
INHERITED = ("data.dvc_md5", "data.path", "tokenizer.run_id", "pretrain.run_id", "sft.run_id", "grpo.run_id",
             "lifecycle.run_id", "preset")


class FeedbackBusy(RuntimeError):
    """Another feedback round holds the lock."""


@dataclass(frozen=True)
class ExportedLabels:
    export: export.Export
    version: data_versions.DataVersion

    @property
    def pairs_file(self) -> Path:
        return self.version.path / export.PAIRS_FILE

    @property
    def markdown(self) -> str:
        return f"{self.export.markdown}\n\nDVC version `data/{PREFERENCES}.dvc`: md5 `{self.version.md5}`"


# ----------------------------------------------------------------------------- export


def exported_up_to() -> int:
    """The last label id of the current data/preferences version (0 before the first export)."""
    s = load_settings()
    current = data_versions.current_version(s.repo_root, PREFERENCES)
    summary = current.path / export.SUMMARY_FILE if current else None
    if summary is None or not summary.is_file():
        return 0
    return int(json.loads(summary.read_text(encoding="utf-8")).get("last_label_id", 0))


def new_labels(store: Store | None = None) -> int:
    return export.new_labels_since(store or open_store(), exported_up_to())


def export_labels(store: Store | None = None) -> ExportedLabels:
    """All labels -> pairs -> a new DVC version of data/preferences; logged to MLflow when it is set."""
    s = load_settings()
    result = export.preference_pairs(store or open_store())
    staging = export.write(result, s.home / "exports" / time.strftime("%Y%m%d-%H%M%S"))
    data_versions.ensure_repo(s.repo_root, s.dvc_remote)
    version = data_versions.version_dataset(s.repo_root, staging, PREFERENCES, s.dvc_remote)
    if s.mlflow_tracking_uri:
        tags = {"stage": "export-labels", "preferences.dvc_md5": version.md5,
                "preferences.label_ids": result.label_ids}
        with run_context(s.mlflow_tracking_uri, EXPERIMENT, "export-labels", tags=tags) as tracker:
            alpha = result.summary["agreement"]["krippendorff_alpha"]
            tracker.log_metrics({"labels/count": result.summary["labels"], "labels/pairs": len(result.pairs),
                                 **{f"labels/{k}": v for k, v in result.summary["outcomes"].items()},
                                 **({"labels/krippendorff_alpha": alpha} if alpha is not None else {})})
            tracker.log_artifact(staging / export.SUMMARY_FILE)
            tracker.log_artifact(_plot_outcomes(result, staging / "labels.png"))
    return ExportedLabels(result, version)


def _plot_outcomes(result: export.Export, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = result.summary["outcomes"]
    per_annotator: dict[str, int] = {}
    for pair in result.pairs:
        for name in pair["annotators"]:
            per_annotator[name] = per_annotator.get(name, 0) + 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(list(outcomes), list(outcomes.values()), color="#4c72b0")
    left.set_title("items by outcome")
    right.bar(list(per_annotator) or ["-"], list(per_annotator.values()) or [0], color="#55a868")
    right.set_title("labels in pairs, by annotator")
    fig.suptitle(f"{len(result.pairs)} pairs from {result.summary['labels']} labels (ids {result.label_ids or '-'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@task(cache_policy=NO_CACHE)
def export_task() -> ExportedLabels:
    return export_labels()


# ----------------------------------------------------------------------------- the round


@contextlib.contextmanager
def _round_lock() -> Iterator[None]:
    locks = load_settings().locks_dir
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / "feedback.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeedbackBusy("another feedback round is running (lock held)") from None
        yield


def _for_a_round(stage_cfg, pairs: int, feedback, tune_lr: bool = True) -> Any:
    """A stage that learns from the pairs, as a feedback round runs it: `feedback.epochs` passes over
    them (at least one step), DPO at `feedback.lr` (zero, or a reward model: the section's own value)."""
    train = stage_cfg.train
    if feedback.epochs:
        steps = max(1, math.ceil(feedback.epochs * pairs / stage_cfg.batch_size))
        train = replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, steps // 4),
                        checkpoint_every=min(train.checkpoint_every, steps))
    if feedback.lr and tune_lr:
        train = replace(train, lr=feedback.lr)
    return replace(stage_cfg, train=train)


@flow(name="feedback", log_prints=True, validate_parameters=False)
def feedback_flow(name: str = "flywheel-chat", preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """One round on every label so far, whatever their number; parameters are editable in the Prefect UI."""
    cfg = LifecycleConfig.load(preset, [*(overrides or []), f"promote.model_name={name}"])  # the gate's model
    s = load_settings()
    uri = s.required_mlflow_uri()
    logger = get_run_logger()
    with _round_lock():
        timings: dict[str, float] = {}
        started = time.perf_counter()
        labels = export_task()
        timings["export"] = time.perf_counter() - started
        pairs, need = len(labels.export.pairs), cfg.build("feedback").min_pairs
        logger.info("exported %d pairs from %d labels: data/%s md5 %s", pairs, labels.export.summary["labels"],
                    PREFERENCES, labels.version.md5)
        summary: dict[str, Any] = {"pairs": pairs, "preferences_md5": labels.version.md5,
                                   "label_ids": labels.export.label_ids, "timings": timings}
        if pairs < need:
            logger.warning("only %d usable pairs (feedback.min_pairs=%d): no training this round", pairs, need)
            return {**summary, "status": "too few pairs"}

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        champion = models.champion_version(client, name)
        if champion is None:
            raise LookupError(f"{name} has no champion to start from: run `flywheel run` first")
        tags = client.get_model_version(name, champion).tags
        data = s.repo_root / tags.get("data.path", "data/clean")
        if not data.exists():
            raise FileNotFoundError(f"evaluation data {data} (v{champion}'s lineage) does not exist; `dvc pull` it")
        stamp, commit = time.strftime("%Y%m%d-%H%M%S"), git_commit()
        lineage = {**{k: tags[k] for k in INHERITED if k in tags}, "git.commit": commit, "parent.version": champion,
                   "preferences.dvc_md5": labels.version.md5, "preferences.label_ids": labels.export.label_ids,
                   "preferences.path": f"data/{PREFERENCES}"}
        parent = start_run(uri, EXPERIMENT, f"feedback-{stamp}", tags={"stage": "feedback", **lineage})
        lineage["feedback.run_id"] = parent.run_id
        ctx = RunContext(run_dir=s.runs_dir / f"{stamp}-feedback", mlflow_uri=uri, parent_run_id=parent.run_id,
                         lineage=lineage)
        try:
            def phase(label, fn, *args):
                t0 = time.perf_counter()
                out = fn(*args)
                timings[label] = time.perf_counter() - t0
                return out

            start_from = models.download_version(client, name, champion, dst=ctx.out(f"start-from-v{champion}"))
            fb = cfg.build("feedback")
            if fb.method == "reward_ppo":
                rm_cfg = _for_a_round(cfg.build("reward", dataset=data, policy=start_from, pairs=labels.pairs_file,
                                                output_dir=ctx.out("reward"), lineage=dict(ctx.lineage)),
                                      pairs, fb, tune_lr=False)
                rm, rm_run = phase("reward", run_stage, "reward", rm_cfg, ctx)
                ctx.lineage["reward.run_id"] = rm_run
                ppo_cfg = cfg.build("ppo", dataset=data, policy=start_from, reward_model=rm.checkpoint,
                                    output_dir=ctx.out("ppo"), lineage=dict(ctx.lineage))
                tuned, ppo_run = phase("ppo", run_stage, "ppo", replace(ppo_cfg, reward="model"), ctx)
                ctx.lineage["ppo.run_id"] = ppo_run
            else:
                dpo_cfg = _for_a_round(cfg.build("dpo", dataset=data, policy=start_from, pairs=labels.pairs_file,
                                                 output_dir=ctx.out("dpo"), lineage=dict(ctx.lineage)), pairs, fb)
                tuned, dpo_run = phase("dpo", run_stage, "dpo", dpo_cfg, ctx)
                ctx.lineage["dpo.run_id"] = dpo_run
            scored = phase("evaluate", evaluate_flow, cfg, ctx, data, {"feedback": tuned.checkpoint})
            promotion = phase("promote", promote_flow, cfg, ctx, tuned.checkpoint, scored["feedback"], data)
            serving = None
            serve = cfg.build("serve")
            if serve.enabled and promotion.passed:
                serving = phase("serve", serve_flow, name, uri, serve.timeout_s)
        except Exception:
            end_run(parent, "FAILED")
            raise
        parent.log_metrics({f"time/{k}_s": v for k, v in timings.items()})
        parent.set_tags({"registered.version": promotion.version, "gate.passed": str(promotion.passed).lower()})
        end_run(parent, "FINISHED")
    for verdict in promotion.verdicts:
        logger.info("%s v%s gate: %s", name, promotion.version, verdict.reason)
    return {**summary, "status": "promoted" if promotion.passed else "gate failed", "version": promotion.version,
            "started_from": champion, "champion": promotion.champion, "passed": promotion.passed,
            "verdicts": [v.reason for v in promotion.verdicts], "serving": serving, "run_dir": str(ctx.run_dir)}


@flow(name="feedback-check", validate_parameters=False)
def feedback_check(name: str = "flywheel-chat", preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """Count labels since the last export; start a round once there are feedback.min_new_labels."""
    cfg = LifecycleConfig.load(preset, overrides)
    need = cfg.build("feedback").min_new_labels
    new = new_labels()
    logger = get_run_logger()
    if new < need:
        logger.info("%d new labels since the last export; a round starts at %d", new, need)
        return {"new_labels": new, "ran": False}
    logger.info("%d new labels (>= %d): starting a feedback round", new, need)
    try:
        return {"new_labels": new, "ran": True, **feedback_flow(name, preset, overrides)}
    except FeedbackBusy as err:
        logger.info("%s; checking again later", err)
        return {"new_labels": new, "ran": False}


# ----------------------------------------------------------------------------- command line


def _services() -> None:
    from infra import services

    services.export_env(services.up())


def cmd_labels(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    _services()
    try:
        labels = export_labels()
    except SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        print(f"flywheel labels export: labels database: {reason}", file=sys.stderr)
        return 1
    summary = labels.export.summary
    alpha = summary["agreement"]["krippendorff_alpha"]
    print(f"{len(labels.export.pairs)} preference pairs from {summary['labels']} labels on {summary['items']} items "
          f"(label ids {labels.export.label_ids or '-'})")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()))
    print(f"Krippendorff's alpha: {'-' if alpha is None else f'{alpha:.3f}'} "
          f"({summary['agreement']['items_with_overlap']} items labelled by two or more)")
    print(f"data/{PREFERENCES}.dvc: md5 {labels.version.md5}  ({labels.pairs_file})")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from flows.cli import _setup_logging
    from flows.compare import one_line_errors

    LifecycleConfig.load(args.preset, args.overrides)  # a typo fails before any server starts
    _services()
    log_file = _setup_logging("feedback")
    try:
        with one_line_errors():
            result = feedback_flow(name=args.name, preset=args.preset, overrides=args.overrides)
    except (LookupError, FileNotFoundError, ValueError, FeedbackBusy) as err:
        print(f"flywheel feedback: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"preferences: {result['pairs']} pairs, labels {result['label_ids'] or '-'}, "
          f"data/{PREFERENCES}.dvc md5 {result['preferences_md5']}")
    if result["status"] == "too few pairs":
        print("not enough pairs to train on yet: label more, then run `flywheel feedback` again")
        return 0
    print(f"{args.name} v{result['version']} (DPO from v{result['started_from']}): gate "
          f"{'passed' if result['passed'] else 'failed'}")
    for reason in result["verdicts"]:
        print(f"  {reason}")
    print(f"champion: v{result['champion']}")
    if result.get("serving"):
        print(f"serving v{result['serving']['version']} at {result['serving']['base_url']}")
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items()))
    print(f"log: {log_file}")
    return 0
