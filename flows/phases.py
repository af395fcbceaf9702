"""Each lifecycle phase as a flow of its own, with parameters a person can type into the Prefect UI.

    flywheel deploy                                     # registers them (deployments data, tokenizer, ...)
    python -c "from flows.phases import pretrain; print(pretrain())"   # the same flow, by hand

The lifecycle's phase subflows (flows/lifecycle.py) take a LifecycleConfig and a RunContext, which
no form can hold. These wrappers take strings: `preset`, `overrides` and the phase's inputs as paths.
An input left empty defaults to the newest output of the phase before it, so clicking data, then
tokenizer, then pretrain ... in the UI chains like the lifecycle does:

- the dataset: the DVC-tracked `data/clean` of the workspace (what the data phase writes);
- a tokenizer or checkpoint: the newest complete one under `<state root>/runs/*/` (lifecycle runs
  and standalone phases alike).

Each call opens its own MLflow parent run (`<phase>-<stamp>`) and writes a fresh run folder
`<state root>/runs/<stamp>-<phase>`; nothing an earlier run wrote is touched. Lineage is what a
standalone phase can honestly know: its own parent run, the git commit, the preset and, where the
dataset is the versioned one, its DVC md5. The promote phase scores the checkpoint first (the gate
needs per-item scores) and then goes through the same paired gate as the lifecycle.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

from prefect import flow
from prefect.runtime import flow_run

from flows import lifecycle as lc
from flows.lifecycle_config import LifecycleConfig
from flows.serving import serve_flow
from infra.settings import load_settings
from registry import data_versions
from registry.tracking import end_run, start_run
from stages.checkpoint import git_commit
from stages.evaluate import HeldoutSplitUnknown, pretraining_config


@contextlib.contextmanager
def phase_context(phase: str, cfg: LifecycleConfig) -> Iterator[lc.RunContext]:
    """A RunContext like the lifecycle's: an MLflow parent run and a new run folder, closed with a status."""
    s = load_settings()
    uri = s.required_mlflow_uri()
    stamp, commit = time.strftime("%Y%m%d-%H%M%S"), git_commit()
    parent = start_run(uri, lc.EXPERIMENT, f"{phase}-{stamp}",
                       tags={"prefect.flow_run_id": str(flow_run.id or ""), "git.commit": commit,
                             "preset": cfg.preset, "phase": phase})
    parent.log_params({"preset": cfg.preset, **cfg.sections})
    ctx = lc.RunContext(run_dir=s.runs_dir / f"{stamp}-{phase}", mlflow_uri=uri, parent_run_id=parent.run_id,
                        lineage={f"{phase}.phase_run_id": parent.run_id, "git.commit": commit, "preset": cfg.preset})
    try:
        yield ctx
    except Exception:
        end_run(parent, "FAILED")
        raise
    except BaseException:
        end_run(parent, "KILLED")
        raise
    end_run(parent, "FINISHED")


def dataset_path(dataset: str | None) -> Path:
    """The given dataset folder, or the workspace's versioned `data/clean`."""
    path = Path(dataset) if dataset else load_settings().repo_root / "data" / lc.DATASET_NAME
    if not path.exists():
        hint = "" if dataset else ": run the data phase first, or `dvc pull` it"
        raise FileNotFoundError(f"dataset {path} does not exist{hint}")
    return path


# The last policy of each recipe (see flows/lifecycle.align_flow), the one a run puts up for promotion.
CANDIDATES = ("rejection_sft/final", "ppo/final", "grpo/final")


def newest_output(relative: str | tuple[str, ...], complete) -> Path:
    """`<state root>/runs/<newest>/<relative>` among the run folders where `complete(path)` holds; of
    several relatives, the first one complete in the newest such folder."""
    runs = load_settings().runs_dir
    options = (relative,) if isinstance(relative, str) else relative
    folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True) \
        if runs.is_dir() else []
    for folder in folders:  # names start with the %Y%m%d-%H%M%S stamp: newest first
        for option in options:
            if complete(folder / option):
                return folder / option
    raise FileNotFoundError(f"no complete {' or '.join(options)} under {runs}/*/: run the phase that makes it "
                            "first, or pass its path")


def _input(given: str | None, relative: str | tuple[str, ...], complete) -> Path:
    if given:
        path = Path(given)
        if not complete(path):
            name = relative if isinstance(relative, str) else relative[0]
            raise FileNotFoundError(f"{path} is not a complete {name.split('/')[0]} output")
        return path
    return newest_output(relative, complete)


def _is_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file()


def _is_checkpoint(path: Path) -> bool:
    # a stage renames its final/ folder into place last: config.json and meta.json mean complete
    return (path / "config.json").is_file() and (path / "meta.json").is_file()


def _data_lineage(dataset: Path) -> dict[str, str]:
    """The DVC version's md5, when the dataset is the workspace's versioned one."""
    s = load_settings()
    version = data_versions.current_version(s.repo_root, lc.DATASET_NAME)
    if version is None or version.path.resolve() != dataset.resolve():
        return {"data.path": str(dataset)}
    return {"data.dvc_md5": version.md5, "data.path": f"data/{version.name}"}


@flow(name="phase-data", log_prints=True, validate_parameters=False)
def data(preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, str]:
    """collect -> clean -> validate -> a new DVC version of data/clean."""
    cfg = LifecycleConfig.load(preset, overrides)
    with phase_context("data", cfg) as ctx:
        version = lc.data_flow(cfg, ctx)
    return {"path": str(version.path), "dvc_md5": version.md5}


@flow(name="phase-tokenizer", log_prints=True, validate_parameters=False)
def tokenizer(dataset: str | None = None, preset: str = "tiny", overrides: list[str] | None = None) -> str:
    """Train the tokenizer on `dataset` (default: data/clean); returns its folder."""
    cfg = LifecycleConfig.load(preset, overrides)
    data_dir = dataset_path(dataset)
    with phase_context("tokenizer", cfg) as ctx:
        ctx.lineage |= _data_lineage(data_dir)
        tok_dir, _ = lc.tokenizer_flow(cfg, ctx, data_dir)
    return str(tok_dir)


@flow(name="phase-pretrain", log_prints=True, validate_parameters=False)
def pretrain(dataset: str | None = None, tokenizer: str | None = None, preset: str = "tiny",
             overrides: list[str] | None = None) -> str:
    """Tokenize `dataset` into data/tokens, then pretrain on Ray (default tokenizer: the newest one under
    runs/); returns the final checkpoint."""
    cfg = LifecycleConfig.load(preset, overrides)
    data_dir, tok_dir = dataset_path(dataset), _input(tokenizer, "tokenizer/tokenizer", _is_tokenizer)
    with phase_context("pretrain", cfg) as ctx:
        ctx.lineage |= _data_lineage(data_dir) | {"tokenizer.path": str(tok_dir)}
        tokens = lc.tokenize_flow(cfg, ctx, data_dir, tok_dir)
        ctx.lineage |= {"tokens.dvc_md5": tokens.md5, "tokens.path": f"data/{tokens.name}"}
        checkpoint, _ = lc.pretrain_flow(cfg, ctx, tokens.path, tok_dir)
    return str(checkpoint)


@flow(name="phase-align", log_prints=True, validate_parameters=False)
def align(dataset: str | None = None, base: str | None = None, preset: str = "tiny",
          overrides: list[str] | None = None) -> dict[str, str]:
    """SFT -> DPO -> GRPO from `base` (default: the newest pretrained checkpoint); returns each final one.
    SFT's pretraining replay reads the token shards `base` was pretrained on (named in its meta.json)."""
    cfg = LifecycleConfig.load(preset, overrides)
    data_dir, base_dir = dataset_path(dataset), _input(base, "pretrain/final", _is_checkpoint)
    try:
        tokens: Path | None = Path(pretraining_config(base_dir)["tokens"])
    except HeldoutSplitUnknown:  # not pretrained here: a config that replays is refused by the SFT stage
        tokens = None
    with phase_context("align", cfg) as ctx:
        ctx.lineage |= _data_lineage(data_dir) | {"base.path": str(base_dir)}
        produced = lc.align_flow(cfg, ctx, data_dir, base_dir, tokens)
    return {name: str(path) for name, (path, _) in produced.items()}


@flow(name="phase-promote", log_prints=True, validate_parameters=False)
def promote(checkpoint: str | None = None, dataset: str | None = None, preset: str = "tiny",
            overrides: list[str] | None = None) -> dict[str, str | bool | None]:
    """Score `checkpoint` (default: the newest run's candidate, the last policy of its recipe), register it,
    promote it if the paired gate passes."""
    cfg = LifecycleConfig.load(preset, overrides)
    data_dir, ckpt = dataset_path(dataset), _input(checkpoint, CANDIDATES, _is_checkpoint)
    with phase_context("promote", cfg) as ctx:
        ctx.lineage |= _data_lineage(data_dir)
        scored = lc.evaluate_flow(cfg, ctx, data_dir, {"candidate": ckpt})
        promotion = lc.promote_flow(cfg, ctx, ckpt, scored["candidate"], data_dir)
    return {"version": promotion.version, "passed": promotion.passed, "champion": promotion.champion}


@flow(name="phase-serve", log_prints=True, validate_parameters=False)
def serve(model_name: str = "flywheel-chat", timeout_s: float = 900.0) -> dict[str, str]:
    """Make sure the champion of `model_name` is served (vLLM behind the alias-following router)."""
    uri = load_settings().required_mlflow_uri()
    return serve_flow(model_name, uri, timeout_s)
