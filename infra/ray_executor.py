"""Run a stage as a data-parallel group of Ray Train workers (DDP over gloo on CPU, NCCL on GPU).

The stage itself knows nothing of Ray: Ray Train starts the workers and initialises
`torch.distributed`; the stage's training loop sees an initialised process group and wraps its model
in DDP. Rank 0 pickles the stage's result next to its outputs for the driver to pick up. A worker
that dies makes Ray restart the group (`max_failures`), and the stage resumes from its newest
checkpoint on disk, losing at most the steps since then.

`RAY_ADDRESS` points at an existing cluster; without it a local Ray is started with loopback-only,
no-dashboard settings measured to keep memory and start-up low on small machines.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from infra.settings import OFFLINE_ENV, Settings, load_settings

log = logging.getLogger(__name__)

RESULT_FILE = "stage_result.pkl"


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    num_workers: int = 2
    use_gpu: str = "auto"  # auto: one GPU per worker when the cluster has GPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # restarts of the worker group; each resumes from the last checkpoint

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.use_gpu not in ("auto", "on", "off"):
            raise ValueError(f"ray.use_gpu must be auto, on or off, got {self.use_gpu!r}")


def ensure_ray(settings: Settings | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray once per process (call from the main thread)."""
    if ray.is_initialized():
        return
    s = settings or load_settings()
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    runtime_env = {"env_vars": {k: os.environ[k] for k in OFFLINE_ENV} | _passthrough_env(),
                   "worker_process_setup_hook": "infra.ray_executor.quiet_worker_logs"}
    if s.ray_address:
        ray.init(address=s.ray_address, runtime_env=runtime_env, log_to_driver=True)
    else:
        s.ray_temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(s.ray_temp_dir),
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False)


def _passthrough_env() -> dict[str, str]:
    keys = ("FLYWHEEL_HOME", "FLYWHEEL_REPO", "MLFLOW_TRACKING_URI", "PYTHONPATH")
    return {k: os.environ[k] for k in keys if k in os.environ}


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process at start-up (runtime_env worker_process_setup_hook)."""
    # Without the dashboard there is no State API, and Ray Train's placement-group cleaner warns
    # about that every second; the cleanup it guards still happens on controller exit.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker: the stage's own `run`, unchanged."""
    if not torch.cuda.is_available():
        # Ray does not cap intra-op threads: two workers with torch's default of one thread per core
        # each would oversubscribe the cores they share.
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    module = importlib.import_module(f"stages.{config['stage']}")
    started = time.perf_counter()
    result = module.run(config["cfg"], config["tracker"])
    # The stage's own time, so that worker start-up and hand-back count as platform overhead.
    result.metrics["time/stage_s"] = time.perf_counter() - started
    if torch.distributed.get_rank() == 0:
        path = Path(config["cfg"].output_dir) / RESULT_FILE
        path.write_bytes(pickle.dumps(result))


def run_distributed(stage: str, cfg: Any, tracker: Any = None, ray_cfg: RayConfig | None = None,
                    settings: Settings | None = None) -> Any:
    """Run `stages.<stage>.run(cfg, tracker)` on `ray_cfg.num_workers` workers; returns its result."""
    ray_cfg = ray_cfg or RayConfig()
    s = settings or load_settings()
    ensure_ray(s)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = ray_cfg.use_gpu == "on" or (ray_cfg.use_gpu == "auto" and gpus >= ray_cfg.num_workers)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "cfg": cfg, "tracker": tracker, "cpus_per_worker": ray_cfg.cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"{stage}-{out.parent.name}-{out.name}", storage_path=str(s.home / "ray-results"),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures)),
    )
    log.info("%s: %d Ray worker(s), %s", stage, ray_cfg.num_workers, "GPU" if use_gpu else "CPU/gloo")
    trainer.fit()
    return pickle.loads((out / RESULT_FILE).read_bytes())
