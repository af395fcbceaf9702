"""Run a stage as a data-parallel group of Ray Train workers (gloo on CPU, NCCL on GPU).

The stage itself knows nothing of Ray: Ray Train starts the workers and initialises
`torch.distributed`; the stage's training loop sees an initialised process group and wraps its model
in DDP, or shards it with FSDP2 under `ray.strategy=fsdp` (handed to the loop as `train.strategy`).
A worker that dies makes Ray restart the group (`max_failures`), and the stage resumes from its
newest checkpoint on disk, losing at most the steps since then; so does the same command re-run
after the whole run (driver and workers) was killed. Under FSDP that checkpoint is written by every
rank into the stage's `output_dir`, which must then be storage all workers share.

The result comes back through Ray Train's own storage, not the workers' disks, which on a cluster the
driver cannot see: rank 0 reports a Ray checkpoint holding the stage's final HF checkpoint and its
pickled result; Ray uploads it to the run's storage path (`FLYWHEEL_RAY_STORAGE`: a shared filesystem
or `s3://...`; default `<state root>/ray-results`), and the driver copies the HF checkpoint into the
stage's `output_dir` on its own machine unless it is there already, so the registry reads it locally.

`RAY_ADDRESS` points at an existing cluster; without it a local Ray is started with loopback-only,
no-dashboard settings measured to keep memory and start-up low on small machines.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from infra.settings import OFFLINE_ENV, Settings, load_settings
from stages.config import ConfigError
from stages.dataset import atomic_dir, commit_dir
from stages.train_loop import TrainingFault

log = logging.getLogger(__name__)

RESULT_FILE = "stage_result.pkl"  # inside the reported Ray checkpoint, beside HF_DIR
HF_DIR = "hf"  # the stage's final Hugging Face checkpoint, inside the reported Ray checkpoint


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    num_workers: int = 2
    use_gpu: str = "auto"  # auto: one GPU per worker when the cluster has GPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # restarts of the worker group; each resumes from the last checkpoint
    strategy: str = "ddp"  # ddp: every worker holds the whole model; fsdp: weights, grads, optimizer sharded

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"ray.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.use_gpu not in ("auto", "on", "off"):
            raise ValueError(f"ray.use_gpu must be auto, on or off, got {self.use_gpu!r}")


def check_world_size(cfg: Any, ray_cfg: RayConfig, section: str = "pretrain") -> None:
    """Refuse a global batch smaller than the world: a rank with no rows skips backward and the others
    hang in all-reduce. Ranks take strided slices and the loss is weighted by rows or tokens, so an
    uneven split is fine; an empty one is not. Configs without a `batch_size` are not checked.

    >>> check_world_size(type("C", (), {"batch_size": 2})(), RayConfig(num_workers=2))
    >>> check_world_size(type("C", (), {"batch_size": 1})(), RayConfig(num_workers=2))
    Traceback (most recent call last):
    ...
    stages.config.ConfigError: pretrain.batch_size=1 is smaller than ray.num_workers=2: every rank needs at least one row per step (raise pretrain.batch_size or lower ray.num_workers)
    """
    batch = getattr(cfg, "batch_size", None)
    if batch is not None and batch < ray_cfg.num_workers:
        raise ConfigError(f"{section}.batch_size={batch} is smaller than ray.num_workers={ray_cfg.num_workers}: "
                          f"every rank needs at least one row per step (raise {section}.batch_size or lower "
                          "ray.num_workers)")


def storage_path(settings: Settings) -> str:
    """Where Ray Train keeps reported checkpoints: a string, since it may be a URI (s3://...).
    On a multi-node cluster it must be storage every node and the driver reach."""
    return settings.ray_storage


def ensure_ray(settings: Settings | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray once per process (call from the main thread)."""
    if ray.is_initialized():
        return
    s = settings or load_settings()
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    runtime_env = {"env_vars": {k: os.environ[k] for k in OFFLINE_ENV} | _passthrough_env(),
                   "worker_process_setup_hook": "infra.ray_setup.quiet_worker_logs"}
    if s.ray_address:
        ray.init(address=s.ray_address, runtime_env=runtime_env, log_to_driver=True)
    else:
        s.ray_temp_dir.mkdir(parents=True, exist_ok=True)
        # address="local": a Ray of this process's own, never "the latest cluster started on this
        # machine" that ray.init() documents for address=None (it dies when its owner exits).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(s.ray_temp_dir),
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False)


def _passthrough_env() -> dict[str, str]:
    keys = ("FLYWHEEL_HOME", "FLYWHEEL_REPO", "MLFLOW_TRACKING_URI", "PYTHONPATH")
    return {k: os.environ[k] for k in keys if k in os.environ}


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker: the stage's own `run`, unchanged, then the hand-back."""
    if not torch.cuda.is_available():
        # Ray's OMP_NUM_THREADS reaches torch only if nothing imported torch before it was set: two
        # workers with torch's default of one thread per core would oversubscribe the cores they share.
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    module = importlib.import_module(f"stages.{config['stage']}")
    started = time.perf_counter()
    try:
        result = module.run(config["cfg"], config["tracker"])
    except TrainingFault as fault:
        # Deterministic: a restarted group would meet the same batch and fault again, so it is handed
        # back like a result (every rank took the same decision) and raised on the driver, not retried.
        result = fault
    if isinstance(result, TrainingFault):
        metrics = {}
    else:
        # The stage's own time, so that worker start-up and hand-back count as platform overhead.
        result.metrics["time/stage_s"] = time.perf_counter() - started
        result.metrics["memory/worker_peak_rss_mb"] = _max_peak_rss_mb()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    if torch.distributed.get_rank() != 0:
        ray.train.report(metrics)  # report() is a barrier: every rank calls it, as often as rank 0
        return
    # Staged beside the outputs so that hard links, not copies, fill it; Ray uploads it synchronously,
    # so it can go once report() returns.
    staging = Path(tempfile.mkdtemp(prefix=".ray-report-", dir=config["cfg"].output_dir))
    try:
        hf = None if isinstance(result, TrainingFault) else getattr(result, "checkpoint", None)
        if hf is not None:
            shutil.copytree(hf, staging / HF_DIR, copy_function=_link_or_copy)
        (staging / RESULT_FILE).write_bytes(pickle.dumps(result))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(staging)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _max_peak_rss_mb() -> float:
    """The largest peak resident memory of any worker process (a collective: every rank calls it)."""
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])  # KiB on Linux
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    return float(mine)


def with_strategy(cfg: Any, ray_cfg: RayConfig) -> Any:
    """The stage config with `ray.strategy` as its training loop's `train.strategy`, the one way the loop
    (which never imports Ray) learns it; a stage without a training loop cannot be sharded."""
    train = getattr(cfg, "train", None)
    if train is None or not hasattr(train, "strategy"):
        if ray_cfg.strategy != "ddp":
            raise ConfigError(f"ray.strategy={ray_cfg.strategy} needs a stage with a training loop (train.*)")
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(train, strategy=ray_cfg.strategy))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _bring_home(src: Path, target: Path) -> None:
    """Make `target` (on the driver) hold the checkpoint at `src`: kept when it is the same checkpoint
    already (workers on this machine wrote it there), else copied in atomically."""
    meta = "meta.json"
    if (target / meta).exists() and (src / meta).exists() and (target / meta).read_bytes() == (src / meta).read_bytes():
        return
    tmp = atomic_dir(target)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    commit_dir(tmp, target)


def _result_from(checkpoint: Checkpoint | None, output_dir: Path) -> Any:
    """The stage's result from rank 0's reported checkpoint, its HF checkpoint brought into `output_dir`."""
    if checkpoint is None:
        raise RuntimeError("the Ray run reported no checkpoint: rank 0 did not finish its hand-back")
    with checkpoint.as_directory() as d:
        result = pickle.loads((Path(d) / RESULT_FILE).read_bytes())
        if isinstance(result, TrainingFault):
            raise result
        hf = getattr(result, "checkpoint", None)
        if hf is None:
            return result
        # The same place under output_dir as on rank 0 (output_dir/final for every training stage).
        hf = Path(hf)
        target = output_dir / (hf.relative_to(output_dir) if hf.is_relative_to(output_dir) else hf.name)
        _bring_home(Path(d) / HF_DIR, target)
    return dataclasses.replace(result, checkpoint=target)


def run_distributed(stage: str, cfg: Any, tracker: Any = None, ray_cfg: RayConfig | None = None,
                    settings: Settings | None = None) -> Any:
    """Run `stages.<stage>.run(cfg, tracker)` on `ray_cfg.num_workers` workers; returns its result, whose
    checkpoint lies in `cfg.output_dir` on this machine wherever the workers ran."""
    ray_cfg = ray_cfg or RayConfig()
    check_world_size(cfg, ray_cfg, section=stage)
    cfg = with_strategy(cfg, ray_cfg)
    s = settings or load_settings()
    ensure_ray(s)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = ray_cfg.use_gpu == "on" or (ray_cfg.use_gpu == "auto" and gpus >= ray_cfg.num_workers)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "cfg": cfg, "tracker": tracker, "cpus_per_worker": ray_cfg.cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"{stage}-{out.parent.name}-{out.name}", storage_path=storage_path(s),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             # the stage keeps its own resumable checkpoints; Ray's holds only the product
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    log.info("%s: %d Ray worker(s), %s, %s", stage, ray_cfg.num_workers, ray_cfg.strategy.upper(),
             "GPU/NCCL" if use_gpu else "CPU/gloo")
    result = trainer.fit()
    return _result_from(result.checkpoint, out)
