"""Where state lives and which services to talk to: read from the environment, never hard-coded.

Scale-out is a matter of settings: `PREFECT_API_URL`, `MLFLOW_TRACKING_URI`, `RAY_ADDRESS` point at
real servers/clusters; `FLYWHEEL_HOME` moves the state root; `FLYWHEEL_DVC_REMOTE` names a DVC
remote URL (default: a directory under the state root); `FLYWHEEL_RAY_STORAGE` is where Ray Train keeps
reported checkpoints (storage every node reaches: a shared filesystem or `s3://...`; default under the
state root); `SERVING_URL` is the OpenAI base URL of
serving that runs elsewhere; `FLYWHEEL_BIND_HOST` is the address the page and the router listen on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every process the platform starts gets these: no telemetry, no hub downloads, no state in $HOME.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TQDM_PATCH_PRINT": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Its bar redraws with carriage returns into flow and worker logs; downloads are logged by line.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}


@dataclass(frozen=True)
class Settings:
    home: Path  # the state root: servers' databases, run outputs, DVC remote, logs
    repo_root: Path  # the git + DVC workspace holding data/

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def services_dir(self) -> Path:
        return self.home / "services"

    @property
    def locks_dir(self) -> Path:
        # Cross-process locks (fcntl) of flywheel processes sharing this state root.
        return self.home / "locks"

    @property
    def ray_storage(self) -> str:
        return os.environ.get("FLYWHEEL_RAY_STORAGE") or str(self.home / "ray-results")

    @property
    def dvc_remote(self) -> str:
        return os.environ.get("FLYWHEEL_DVC_REMOTE") or str(self.home / "dvc-remote")

    @property
    def mlflow_tracking_uri(self) -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI") or None

    def required_mlflow_uri(self) -> str:
        """The tracking URI, for code that cannot run without MLflow (every flow)."""
        if not self.mlflow_tracking_uri:
            raise RuntimeError("MLFLOW_TRACKING_URI is not set: start services with `flywheel services up`")
        return self.mlflow_tracking_uri

    @property
    def serving_url(self) -> str | None:
        """The OpenAI base URL of serving that runs elsewhere (then nothing is started here)."""
        return os.environ.get("SERVING_URL") or None

    @property
    def bind_host(self) -> str:
        """Where the annotation page and the serving router listen: loopback unless a container or a
        shared host needs them reachable from outside (`FLYWHEEL_BIND_HOST=0.0.0.0`)."""
        return os.environ.get("FLYWHEEL_BIND_HOST") or "127.0.0.1"

    @property
    def ray_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or None

    @property
    def ray_temp_dir(self) -> Path:
        # Ray's socket paths must stay under ~107 bytes: keep this short, outside a deep state root.
        return Path(os.environ.get("FLYWHEEL_RAY_TMP", "/tmp/flywheel-ray"))


def load_settings() -> Settings:
    home = Path(os.environ.get("FLYWHEEL_HOME", REPO_ROOT / ".flywheel")).resolve()
    repo = Path(os.environ.get("FLYWHEEL_REPO", REPO_ROOT)).resolve()
    return Settings(home=home, repo_root=repo)


def dvc_env(settings: Settings) -> dict[str, str]:
    """DVC's machine-wide state under the state root, not /var/tmp/dvc and ~/.config/dvc."""
    return {
        "DVC_SITE_CACHE_DIR": str(settings.home / "dvc" / "site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(settings.home / "dvc" / "global"),
        "DVC_SYSTEM_CONFIG_DIR": str(settings.home / "dvc" / "system"),
        "DVC_NO_ANALYTICS": "1",
    }


def apply_offline_env(settings: Settings | None = None) -> dict[str, str]:
    """Set the offline/no-telemetry environment in this process (children inherit it); set values win."""
    s = settings or load_settings()
    env = {**OFFLINE_ENV, **dvc_env(s), "PREFECT_HOME": str(s.home / "prefect"),
           "MPLCONFIGDIR": str(s.home / "matplotlib"),
           # lm-eval loads local task data through `datasets`, which caches under ~/.cache otherwise
           "HF_DATASETS_CACHE": str(s.home / "hf" / "datasets")}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return env
