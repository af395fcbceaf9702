"""The lifecycle: data -> tokenizer -> tokenize -> pretrain -> align -> evaluate -> promote -> serve, one Prefect flow.

    flywheel run --preset tiny recipe=instructgpt           # SFT -> reward model -> PPO
    flywheel run --preset tiny base_model=/models/qwen2     # no tokenizer or pretraining: align a given model

    flywheel run --preset tiny                  # services up, then this flow
    python -m flows.lifecycle                   # the same flow, against PREFECT_API_URL

Each phase is a subflow and each stage a task; tasks only wire a stage's `run(cfg, tracker)` to
MLflow (a run nested under the lifecycle's parent run) and hand paths to the next stage. Retries
re-enter the same output directory, so a stage resumes from its newest checkpoint instead of
starting over. The champion changes in one place only, the promote phase, and only through the gate:
a failure anywhere earlier leaves the registry, the last good checkpoint and the last good dataset
version untouched.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from mlflow import MlflowClient

from flows import datasets, run_record
from flows.abandoned import crash_abandoned
from flows.lifecycle_config import LifecycleConfig
from flows.serving import serve_flow
from infra import ray_executor, ray_map
from infra.settings import load_settings
from registry import data_versions, model_card, models
from registry import gate as gates
from registry.tracking import end_run, reopen_run, run_context, start_run
from stages.checkpoint import git_commit
from stages.evaluate import read_items
from stages.sft import SFTConfig
from stages.validate import raise_for_failures

EXPERIMENT = "flywheel"
DATASET_NAME = "clean"  # data/<name>: the validated corpus every later phase trains on
DATA_STAGES = ("collect", "clean", "dedup", "decontaminate", "mix")
# data/<name> of each data stage's output (the mix becomes DATASET_NAME once validated)
STAGE_VERSIONS = {"collect": "raw", "clean": "filtered", "dedup": "deduped", "decontaminate": "decontaminated"}
TOKENS_DATA = "tokens"  # data/<name>: the token shards pretraining reads, one DVC version per tokenization
# data/<name>: in a run from a given base model, the corpus in that model's tokenization, for SFT's replay
BASE_TOKENS_DATA = "tokens-base-model"
REJECTION_DATA = "rejection-sft"  # data/<name>: the SFT data rejection sampling writes, one DVC version per run


@dataclass
class RunContext:
    """What every task needs to know about the lifecycle run it belongs to (plain, serialisable)."""

    run_dir: Path
    mlflow_uri: str
    parent_run_id: str
    lineage: dict[str, str] = field(default_factory=dict)  # grows as phases finish

    def out(self, name: str) -> Path:
        return self.run_dir / name

    def done(self, name: str) -> Path:
        """Where a finished stage leaves its (result, MLflow run id): what a resumed run reuses."""
        return self.run_dir / ".done" / f"{name}.pkl"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, cfg: Any, ctx: RunContext, run_name: str | None = None,
              ray_cfg: ray_executor.RayConfig | None = None) -> tuple[Any, str]:
    """Run one stage under its own MLflow run (nested in the lifecycle's); returns (result, run id).

    A stage this lifecycle run finished before (a resumed run) is not run again: its recorded result
    and run id come back as they were, so the lineage names the runs that made the artifacts.
    """
    logger = get_run_logger()
    done = ctx.done(run_name or name)
    if done.is_file():
        # our own file in our own run folder, written below: trusted like the checkpoints beside it
        result, run_id = pickle.loads(done.read_bytes())
        logger.info("%s finished in an earlier attempt of this run (MLflow run %s): skipped", run_name or name, run_id)
        return result, run_id
    tags = {"stage": name, "prefect.flow_run_id": str(flow_run.id or ""), **ctx.lineage}
    with run_context(ctx.mlflow_uri, EXPERIMENT, run_name or name, parent_run_id=ctx.parent_run_id,
                     tags=tags) as tracker:
        started = time.perf_counter()
        module = importlib.import_module(f"stages.{name}")
        log_dataset_inputs(tracker, cfg)
        if ray_cfg is not None:
            result = ray_executor.run_distributed(name, cfg, tracker, ray_cfg)
        elif "mapper" in inspect.signature(module.run).parameters:  # shard-wise: each shard a Ray task
            result = module.run(cfg, tracker, mapper=ray_map.mapper())
        else:
            result = module.run(cfg, tracker)
        wall = time.perf_counter() - started
        seconds = result.metrics.pop("time/stage_s", wall)  # inside the stage (Ray start-up excluded)
        tracker.log_metrics({**_finite(result.metrics), "time/seconds": seconds, "time/wall_s": wall})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in _finite(result.metrics).items()
                      if k.startswith(("eval/", "data/rows", "train/loss", "rl/")))
    logger.info("%s done in %.1f s: %s", run_name or name, seconds, shown)
    done.parent.mkdir(exist_ok=True)
    done.with_suffix(".tmp").write_bytes(pickle.dumps((result, tracker.run_id)))
    done.with_suffix(".tmp").replace(done)
    return result, tracker.run_id


def log_dataset_inputs(tracker: Any, cfg: Any) -> None:
    """Every DVC-versioned dataset a stage reads becomes an MLflow dataset input of its run (name, md5, remote)."""
    repo_root = load_settings().repo_root
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Path) and (version := data_versions.version_at(repo_root, value)) is not None:
            tracker.log_dataset(f"data/{version.name}", version.md5, data_versions.remote_location(version),
                                context=f.name)


@task(cache_policy=NO_CACHE)
def version_dataset(dataset: Path, name: str = DATASET_NAME) -> data_versions.DataVersion:
    s = load_settings()
    data_versions.ensure_repo(s.repo_root, s.dvc_remote)
    return data_versions.version_dataset(s.repo_root, dataset, name, s.dvc_remote)


def _data_defaults(cfg: LifecycleConfig, name: str) -> dict[str, Any]:
    """What the lifecycle adds to a data stage's own config: a fetch cache shared by runs (each run has a
    new folder, and a re-run must not fetch every URL again), and decontamination against every
    evaluation file the evaluate section names, besides the decontaminate section's own."""
    section = cfg.sections.get(name, {})
    if name == "collect":
        return {"http": {"cache_dir": str(load_settings().home / "http-cache"), **(section.get("http") or {})}}
    if name == "decontaminate":
        evaluate = cfg.sections.get("evaluate", {})
        files = [*_as_list(section.get("eval_files")), *_as_list(evaluate.get("gsm8k_files")),
                 *_as_list(evaluate.get("mmlu_files"))]
        return {"eval_files": tuple(dict.fromkeys(str(f) for f in files))}
    return {}


def _as_list(value: Any) -> list[Any]:
    return [] if not value else [value] if isinstance(value, str | Path) else list(value)


@flow(name="data", validate_parameters=False)
def data_flow(cfg: LifecycleConfig, ctx: RunContext) -> data_versions.DataVersion:
    """collect -> clean -> dedup -> decontaminate -> mix -> validate (the gate) -> data/clean.

    Each stage's dataset becomes a DVC version (data/raw, data/filtered, ...) that the next stage reads,
    so every stage run names its input's md5 in MLflow and any step can be re-run from its exact input.
    Only a mix that passes validation becomes data/clean, what the rest of the lifecycle trains on: a
    failure anywhere leaves the last good data/clean as it was.
    """
    ray_executor.ensure_ray()  # the shard-wise stages run their shards as Ray tasks
    dataset: Path | None = None
    for name in DATA_STAGES:
        wiring = {} if dataset is None else {"input_dir": dataset}
        result, _ = run_stage(name, cfg.build(name, output_dir=ctx.out(name), **wiring, **_data_defaults(cfg, name)), ctx)
        dataset = version_dataset(result.dataset, STAGE_VERSIONS[name]).path if name in STAGE_VERSIONS else result.dataset
    checks = {"dataset": dataset, "output_dir": ctx.out("validate")}
    if result.expected_mixture and "expected_mixture" not in cfg.sections.get("validate", {}):
        checks["expected_mixture"] = result.expected_mixture  # the shares the mix sampled to, checked by GX
    validation, _ = run_stage("validate", cfg.build("validate", **checks), ctx)
    datasets.publish_report(ctx.mlflow_uri, ctx.parent_run_id, {n: ctx.out(n) for n in (*DATA_STAGES, "validate")},
                            ctx.out("data-report"))
    raise_for_failures(validation, dataset)  # stops the lifecycle before the tokenizer
    return version_dataset(dataset)


@flow(name="tokenizer", validate_parameters=False)
def tokenizer_flow(cfg: LifecycleConfig, ctx: RunContext, dataset: Path) -> tuple[Path, str]:
    result, run_id = run_stage("tokenizer", cfg.build("tokenizer", dataset=dataset, output_dir=ctx.out("tokenizer")), ctx)
    return result.tokenizer_dir, run_id


@flow(name="tokenize", validate_parameters=False)
def tokenize_flow(cfg: LifecycleConfig, ctx: RunContext, dataset: Path, tokenizer: Path,
                  name: str = TOKENS_DATA) -> data_versions.DataVersion:
    """The corpus as token shards (each input shard a Ray task), versioned as data/tokens: pretraining
    reads that version (SFT's replay its training split, evaluation its held-out split), so its md5
    pins exactly which tokens a model saw."""
    ray_executor.ensure_ray()
    result, _ = run_stage("tokenize", cfg.build("tokenize", dataset=dataset, tokenizer=tokenizer,
                                                output_dir=ctx.out("tokenize")), ctx)
    return version_dataset(result.tokens, name)


def replays(cfg: LifecycleConfig) -> bool:
    """Whether an SFT stage of the recipe replays pretraining text, and so reads token shards."""
    names = ("sft",) if cfg.build("align").recipe == "instructgpt" else ("sft", "rejection_sft")
    default = SFTConfig.__dataclass_fields__["replay_fraction"].default
    return any(cfg.sections.get(name, {}).get("replay_fraction", default) for name in names)


@flow(name="pretrain", validate_parameters=False)
def pretrain_flow(cfg: LifecycleConfig, ctx: RunContext, tokens: Path, tokenizer: Path) -> tuple[Path, str]:
    """Pretraining on Ray Train: a DDP group of `ray.num_workers` workers, reading the token shards."""
    ray_executor.ensure_ray()  # here, in the flow's main thread, not in a task thread
    stage_cfg = cfg.build("pretrain", tokens=tokens, tokenizer=tokenizer, output_dir=ctx.out("pretrain"),
                          lineage=dict(ctx.lineage))
    result, run_id = run_stage("pretrain", stage_cfg, ctx, ray_cfg=cfg.build("ray"))
    return result.checkpoint, run_id


@flow(name="base-model", validate_parameters=False)
def base_model_flow(cfg: LifecycleConfig, ctx: RunContext, source: Path) -> tuple[Path, str]:
    """A user's Hugging Face model, made ready for the recipes (pad, chat template, reasoning tokens)."""
    result, run_id = run_stage("base_model", cfg.build("base_model", source=source, output_dir=ctx.out("base_model"),
                                                       lineage=dict(ctx.lineage)), ctx)
    return result.checkpoint, run_id


@task(cache_policy=NO_CACHE)
def version_sft_data(path: Path, name: str) -> data_versions.DataVersion:
    """Rejection sampling writes a new SFT dataset: it gets a DVC version like the cleaned corpus."""
    s = load_settings()
    data_versions.ensure_repo(s.repo_root, s.dvc_remote)
    return data_versions.version_dataset(s.repo_root, Path(path), name, s.dvc_remote)


@flow(name="align", validate_parameters=False)
def align_flow(cfg: LifecycleConfig, ctx: RunContext, dataset: Path, base: Path,
               tokens: Path | None = None) -> dict[str, tuple[Path, str]]:
    """The recipe of `align.recipe`, each stage starting from an earlier stage's final checkpoint.

    `tokens` (token shards in the base's tokenization) feed SFT's pretraining replay; without them a
    config with `replay_fraction > 0` is refused by the SFT stage.

    Returns the policies in order (name -> (checkpoint, MLflow run id)); the last one is the candidate.
    The reward model is a product of the phase but not a policy: its run id joins the lineage only.
    """
    produced: dict[str, tuple[Path, str]] = {}
    lineage = dict(ctx.lineage)

    def stage(name: str, **wiring: Any) -> Any:
        module = "sft" if name == "rejection_sft" else name  # a second SFT, with its own config section
        result, run_id = run_stage(module, cfg.build(name, output_dir=ctx.out(name), lineage=dict(lineage), **wiring),
                                   ctx, run_name=name)
        lineage[f"{name}.run_id"] = run_id
        if name not in ("reward", "rejection"):
            produced[name] = (result.checkpoint, run_id)
        return result

    if cfg.build("align").recipe == "instructgpt":
        sft = stage("sft", dataset=dataset, policy=base, tokens=tokens).checkpoint
        reward_model = stage("reward", dataset=dataset, policy=sft).checkpoint
        stage("ppo", dataset=dataset, policy=sft, reward_model=reward_model)
    else:
        policy = stage("sft", dataset=dataset, policy=base, tokens=tokens).checkpoint
        policy = stage("dpo", dataset=dataset, policy=policy).checkpoint
        policy = stage("grpo", dataset=dataset, policy=policy).checkpoint
        kept = stage("rejection", dataset=dataset, policy=policy)
        if kept.metrics.get("rejection/kept", 0) > 0:
            version = version_sft_data(kept.dataset, REJECTION_DATA)
            lineage |= {"rejection.dvc_md5": version.md5, "rejection.path": f"data/{REJECTION_DATA}"}
            stage("rejection_sft", dataset=dataset, messages=version.path / Path(kept.dataset).name, policy=policy,
                  tokens=tokens)
        else:  # nothing good enough to learn from: the RL policy stays the candidate
            get_run_logger().warning("rejection sampling kept no answer (rejection.min_score too high for this "
                                     "policy?): no rejection_sft; the GRPO policy is the candidate")
    ctx.lineage |= {k: v for k, v in lineage.items() if k.startswith(("reward.", "rejection."))}
    return produced


@dataclass
class Scored:
    """One checkpoint's evaluation: aggregate metrics and the per-item scores a paired gate needs."""

    metrics: dict[str, float]
    items: Path
    alarms: tuple[dict, ...] = ()  # reward-hacking monitor alarms on its answers: the gate refuses them


def evaluate_config(cfg: LifecycleConfig, **wiring: Any) -> Any:
    """The evaluate section; a given base model has no pretraining held-out split, so no `heldout` task."""
    ev = cfg.build("evaluate", **wiring)
    if cfg.build("align").base_model is not None:
        ev = replace(ev, tasks=tuple(t for t in ev.tasks if t != "heldout"))
    return ev


@flow(name="evaluate", validate_parameters=False)
def evaluate_flow(cfg: LifecycleConfig, ctx: RunContext, dataset: Path, checkpoints: dict[str, Path],
                  tokens: Path | None = None) -> dict[str, Scored]:
    """Each checkpoint on the same held-out data: the learning curve of the lifecycle.

    `tokens`: the shards whose held-out split gives perplexity (None: each checkpoint's pretraining's,
    from its lineage)."""
    scores = {}
    for label, checkpoint in checkpoints.items():
        stage_cfg = evaluate_config(cfg, checkpoint=checkpoint, dataset=dataset, tokens=tokens,
                                    output_dir=ctx.out(f"evaluate-{label}"))
        result, _ = run_stage("evaluate", stage_cfg, ctx, run_name=f"evaluate-{label}")
        scores[label] = Scored(_finite(result.metrics), result.items, tuple(result.alarms))
    return scores


@dataclass
class Promotion:
    version: str
    passed: bool
    champion: str | None  # the champion after the phase
    verdicts: list[gates.GateVerdict]


@flow(name="promote", validate_parameters=False)
def promote_flow(cfg: LifecycleConfig, ctx: RunContext, checkpoint: Path, scored: Scored, dataset: Path,
                 tokens: Path | None = None) -> Promotion:
    """Register the final checkpoint; it becomes champion only through the paired gate.

    The champion is read first (the decision point) and re-scored now on exactly the challenger's
    items, so both face the same questions and the gate compares paired differences, never a score
    recorded in another run. The alias then moves with compare-and-set: if anyone moved the champion
    meanwhile, nothing is promoted (the verdicts would be against a model that no longer serves).
    """
    promote = cfg.build("promote")
    specs = promote.specs()
    missing = [s.metric for s in specs if s.metric not in scored.metrics]
    if missing:
        raise KeyError(f"gate metrics {missing} were not measured (measured: {', '.join(sorted(scored.metrics))})")
    client = MlflowClient(tracking_uri=ctx.mlflow_uri, registry_uri=ctx.mlflow_uri)
    registered = registered_by(client, promote.model_name, ctx.parent_run_id)  # by an earlier attempt of this run
    if registered is not None and _gate_decided(registered.tags):
        return _decided(client, promote.model_name, registered)
    try:
        expected = models.champion_version(client, promote.model_name)  # also records any hand move
    except models.ModelNotFound:
        expected = None
    mine, theirs = read_items(scored.items), None
    if expected is not None:
        champ_dir = models.download_version(client, promote.model_name, expected, dst=ctx.out(f"champion-v{expected}"))
        champ_cfg = evaluate_config(cfg, checkpoint=champ_dir, dataset=dataset, tokens=tokens,  # the challenger's
                                    output_dir=ctx.out(f"evaluate-champion-v{expected}"))
        champ_result, _ = run_stage("evaluate", champ_cfg, ctx, run_name=f"evaluate-champion-v{expected}")
        theirs = read_items(champ_result.items)
    verdicts = [_verdict(spec, scored, mine, theirs, expected) for spec in specs]

    logger = get_run_logger()
    with run_context(ctx.mlflow_uri, EXPERIMENT, "register", parent_run_id=ctx.parent_run_id,
                     tags={"stage": "register", **ctx.lineage},
                     run_id=None if registered is None else registered.run_id) as tracker:
        metric_tags = {f"eval.{k}": repr(v) for k, v in scored.metrics.items()}
        version = str(registered.version) if registered is not None else models.register_checkpoint(
            tracker.client, promote.model_name, checkpoint, tracker.run_id, tags={**ctx.lineage, **metric_tags})
        if scored.alarms:  # the training stages' alarms came with meta.json; evaluation's are added here
            models.record_alarms(tracker.client, promote.model_name, version, list(scored.alarms))
        try:
            passed = models.promote_if_passed(tracker.client, promote.model_name, version, verdicts, expected=expected)
        except models.ChampionChanged as err:
            logger.warning("not promoted: %s", err)
            passed = False
        alarms = models.monitor_alarms(tracker.client.get_model_version(promote.model_name, version).tags)
        if alarms:  # the gate failed on them too: say so beside the metric verdicts
            verdicts = [*verdicts, gates.monitor_verdict(alarms)]
        card = model_card.build_model_card(tracker.client, promote.model_name, version)
        model_card.log_model_card(tracker.client, promote.model_name, version, card)
        tracker.log_metrics({"gate/passed": float(passed), **{f"gate/{v.metric}/diff": v.diff for v in verdicts
                                                               if v.diff is not None and math.isfinite(v.diff)}})
    champion = models.champion_version(client, promote.model_name)
    for v in verdicts:
        logger.info("%s v%s gate: %s", promote.model_name, version, v.reason)
    return Promotion(version, passed, champion, verdicts)


def registered_by(client: MlflowClient, name: str, lifecycle_run_id: str) -> Any:
    """The version this lifecycle run registered (its `lifecycle.run_id` lineage tag), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`lifecycle.run_id` = '{lifecycle_run_id}'")
    return max(found, key=lambda mv: int(mv.version), default=None)


def _gate_decided(tags: dict[str, str]) -> bool:
    """Whether `models.record_gate` wrote its whole decision; a kill part-way through leaves a record
    the resumed run's gate overwrites (the alias moves only after the record is whole)."""
    try:
        metrics = json.loads(tags.get("gate.metrics") or "")
    except ValueError:
        return False
    whole = "gate.at" in tags and all(f"gate.{m}.reason" in tags for m in metrics)  # the last tags written
    return whole and models.gate_state(tags) == ("passed" if gates.all_passed(models.recorded_verdicts(tags))
                                                 else "failed")


def _decided(client: MlflowClient, name: str, mv: Any) -> Promotion:
    """The promote phase of a resumed run whose gate had already decided: its decision, not a second one.

    Only a kill between the gate's record and the alias move leaves a passed version that is not
    champion: the move is made now, against the champion the gate compared with.
    """
    version, tags = str(mv.version), dict(mv.tags)
    passed = models.gate_state(tags) == "passed"
    if passed and models.champion_version(client, name) != version \
            and not any(e.to_version == version for e in models.champion_history(client, name)):
        try:
            models.set_champion(client, name, version, by="gate", reason=tags.get("gate.reason", ""),
                                expected=tags.get("gate.champion_version") or None)
        except models.ChampionChanged as err:
            get_run_logger().warning("not promoted: %s", err)
    get_run_logger().info("%s v%s was registered and gated by an earlier attempt of this run", name, version)
    return Promotion(version, passed, models.champion_version(client, name), models.recorded_verdicts(tags))


def _verdict(spec: gates.GateSpec, scored: Scored, mine: dict, theirs: dict | None, expected: str | None
             ) -> gates.GateVerdict:
    """The paired verdict; items that cannot be paired (another tokenizer's windows) fail closed."""
    try:
        return gates.paired_verdict(spec, scored.metrics[spec.metric], mine.get(spec.metric, {}),
                                    None if theirs is None else theirs.get(spec.metric, {}), champion_version=expected)
    except ValueError as err:
        return gates.GateVerdict(metric=spec.metric, passed=False, value=scored.metrics[spec.metric],
                                 higher_is_better=spec.higher_is_better, margin=spec.margin, floor=spec.floor,
                                 confidence=spec.confidence, champion_version=expected, n=0, diff=None, stderr=None,
                                 ci_low=None, ci_high=None, reason=f"{spec.metric}: not comparable with v{expected}: {err}")


@flow(name="lifecycle", log_prints=True, validate_parameters=False)
def lifecycle(preset: str = "tiny", overrides: list[str] | None = None, resume: str | None = None) -> dict[str, Any]:
    """The whole loop on one preset. Parameters are editable from the Prefect UI.

    `resume`: a run folder's name, or `latest` for the newest unfinished run: that run goes on where it
    stopped, with its saved config (not `preset`/`overrides`), in its folder and its MLflow parent run.
    Stages it finished come back as they were (`run_stage`), the interrupted one resumes from its newest
    checkpoint, and a version it registered is not registered again (`promote_flow`). A finished run
    is left as it is.
    """
    s = load_settings()
    if resume is None:
        cfg = LifecycleConfig.load(preset, overrides)  # fails fast on any config typo
        record = run_record.create(s.runs_dir, preset, overrides, git_commit())
    else:
        record = run_record.resolve(s.runs_dir, resume)
        if record.finished:
            get_run_logger().info("run %s finished already (registered v%s): nothing to do", record.name,
                                  record.version)
            return {"version": record.version, "champion": record.champion or None, "run_dir": str(record.run_dir),
                    "mlflow_run_id": record.mlflow_run_id, "finished_before": True}
        if (preset, list(overrides or [])) != (record.preset, record.overrides):
            # A deployment passes its own defaults: the saved config is the one that made the run's outputs.
            get_run_logger().warning("resuming %s with its saved config (--preset %s %s), not the one given",
                                     record.name, record.preset, " ".join(record.overrides))
        cfg = LifecycleConfig.load(record.preset, record.overrides)
    with run_record.hold(record.run_dir):
        record, parent = _parent_run(record, cfg, s.required_mlflow_uri())
        return _lifecycle(cfg, record, parent)


def _parent_run(record: run_record.RunRecord, cfg: LifecycleConfig, mlflow_uri: str
                ) -> tuple[run_record.RunRecord, Any]:
    """The run's MLflow parent run: reopened when the record names one, else started (and recorded).

    A reopened run's earlier attempts left their Prefect flow runs unfinished if they were killed:
    those are marked Crashed (the MLflow side is `reopen_run`'s)."""
    this_flow_run = str(flow_run.id or "")
    attempts = [*record.prefect_flow_run_ids, this_flow_run] if this_flow_run else record.prefect_flow_run_ids
    if record.mlflow_run_id:
        if (commit := git_commit()) != record.git_commit:
            get_run_logger().warning("resuming %s, started at commit %s, with the code of %s", record.name,
                                     record.git_commit, commit)
        if crashed := crash_abandoned(record.prefect_flow_run_ids, resumed_by=this_flow_run):
            get_run_logger().info("marked %d flow runs of the killed attempt Crashed", len(crashed))
        parent = reopen_run(mlflow_uri, record.mlflow_run_id)
        parent.set_tags({"prefect.resumed_by_flow_run_id": this_flow_run})
        return run_record.update(record, status="running", prefect_flow_run_ids=attempts), parent
    parent = start_run(mlflow_uri, EXPERIMENT, f"lifecycle-{record.name}",
                       tags={"prefect.flow_run_id": this_flow_run, "git.commit": record.git_commit,
                             "preset": record.preset})
    parent.log_params({"preset": record.preset, **cfg.sections})
    return run_record.update(record, mlflow_run_id=parent.run_id, prefect_flow_run_ids=attempts), parent


def _lifecycle(cfg: LifecycleConfig, record: run_record.RunRecord, parent: Any) -> dict[str, Any]:
    mlflow_uri, stamp, preset = parent.tracking_uri, record.name, record.preset
    ctx = RunContext(run_dir=record.run_dir, mlflow_uri=mlflow_uri, parent_run_id=parent.run_id,
                     lineage={"lifecycle.run_id": parent.run_id, "git.commit": record.git_commit, "preset": preset})
    timings: dict[str, float] = {}

    def phase(name, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - started
        return out

    try:
        data = phase("data", data_flow, cfg, ctx)
        ctx.lineage |= {"data.dvc_md5": data.md5, "data.path": f"data/{data.name}"}
        source = cfg.build("align").base_model
        if source is None:
            tokenizer, tok_run = phase("tokenizer", tokenizer_flow, cfg, ctx, data.path)
            ctx.lineage["tokenizer.run_id"] = tok_run
            tokens = phase("tokenize", tokenize_flow, cfg, ctx, data.path, tokenizer)
            ctx.lineage |= {"tokens.dvc_md5": tokens.md5, "tokens.path": f"data/{tokens.name}"}
            base, pt_run = phase("pretrain", pretrain_flow, cfg, ctx, tokens.path, tokenizer)
            ctx.lineage["pretrain.run_id"] = pt_run
            first, token_dir = "pretrain", tokens.path
        else:
            base, base_run = phase("base_model", base_model_flow, cfg, ctx, Path(source))
            ctx.lineage |= {"base_model.run_id": base_run, "base_model.source": str(source)}
            first, token_dir = "base_model", None
            if replays(cfg):  # SFT replays our corpus, tokenized as the base model reads text
                tokens = phase("tokenize", tokenize_flow, cfg, ctx, data.path, base, BASE_TOKENS_DATA)
                ctx.lineage |= {"tokens.dvc_md5": tokens.md5, "tokens.path": f"data/{tokens.name}"}
                token_dir = tokens.path
        aligned = phase("align", align_flow, cfg, ctx, data.path, base, token_dir)
        ctx.lineage |= {f"{name}.run_id": run_id for name, (_, run_id) in aligned.items()}
        checkpoints = {first: base, **{k: v[0] for k, v in aligned.items()}}
        # A base model's run measures no perplexity (evaluate_config): its tokens only fed the replay.
        scored = phase("evaluate", evaluate_flow, cfg, ctx, data.path, checkpoints, token_dir)
        candidate = list(aligned)[-1]
        final = checkpoints[candidate]
        promotion = phase("promote", promote_flow, cfg, ctx, final, scored[candidate], data.path, token_dir)
        serving = None
        serve = cfg.build("serve")
        if serve.enabled and promotion.champion is not None:
            serving = phase("serve", serve_flow, cfg.build("promote").model_name, mlflow_uri, serve.timeout_s)
    except Exception:
        end_run(parent, "FAILED")
        run_record.update(record, status="failed")
        raise
    except BaseException:  # ^C: stopped, not broken
        end_run(parent, "KILLED")
        run_record.update(record, status="killed")
        raise
    scores = {label: s.metrics for label, s in scored.items()}
    parent.log_metrics({**{f"{k}/{stage}": v for stage, m in scores.items() for k, v in m.items()},
                        **{f"time/{k}_s": v for k, v in timings.items()}})
    parent.set_tags({"registered.version": promotion.version, "gate.passed": str(promotion.passed).lower(),
                     "champion.version": promotion.champion or ""})
    end_run(parent, "FINISHED")
    run_record.finish(record, promotion.version, promotion.champion)
    name = cfg.build("promote").model_name
    champion_tags = (MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
                     .get_model_version(name, promotion.champion).tags if promotion.champion else {})
    summary = {"version": promotion.version, "gate": promotion, "scores": scores, "timings": timings,
               "lineage": ctx.lineage, "run_dir": str(ctx.run_dir), "mlflow_run_id": parent.run_id,
               "checkpoint": str(final), "flow_run_id": str(flow_run.id), "champion": promotion.champion,
               "champion_flag": champion_tags.get("champion.flagged", ""),
               "serving": serving}
    create_markdown_artifact(markdown=summary_markdown(summary, mlflow_uri, cfg), key="lifecycle-summary",
                             description=f"lifecycle {stamp}: {name} v{promotion.version}")
    return summary


def summary_markdown(summary: dict[str, Any], mlflow_uri: str, cfg: LifecycleConfig) -> str:
    promotion: Promotion = summary["gate"]
    name = cfg.build("promote").model_name
    champion = summary["champion"]
    flag = f" (**flagged**: {summary['champion_flag']})" if summary.get("champion_flag") else ""
    lines = [f"# Lifecycle: {name} v{summary['version']}", "",
             f"Gate: **{'passed' if promotion.passed else 'failed'}**", ""]
    lines += [f"- {v.reason}" for v in promotion.verdicts]
    lines += ["", f"Champion: v{champion}{flag}" if champion else "Champion: none", ""]
    if summary.get("serving"):
        lines += [f"Served at `{summary['serving']['base_url']}` (v{summary['serving']['version']})", ""]
    lines += [f"MLflow run: [{summary['mlflow_run_id']}]({mlflow_uri.rstrip('/')}/#/experiments/search?searchFilter="
              f"attributes.run_id%3D%27{summary['mlflow_run_id']}%27)", "",
              "| checkpoint | perplexity | arithmetic accuracy | format rate |", "|---|---|---|---|"]
    for stage, m in summary["scores"].items():
        acc, se = m.get("eval/arithmetic/accuracy", float("nan")), m.get("eval/arithmetic/accuracy_stderr", float("nan"))
        lines.append(f"| {stage} | {m.get('eval/heldout/perplexity', float('nan')):.2f} | {acc:.3f} ± {se:.3f} | "
                     f"{m.get('eval/arithmetic/format_rate', float('nan')):.3f} |")
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings"].items()]
    lines += ["", "Lineage:", ""] + [f"- `{k}`: `{v}`" for k, v in summary["lineage"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    lifecycle()
