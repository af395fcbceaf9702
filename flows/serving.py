"""Serving wired to the registry: the router follows `<model>@champion` in MLflow.

    flywheel serve                       # start (or reuse) the serving stack, print the OpenAI base URL
    flywheel serve --foreground          # the router process itself (what `flywheel serve` launches)

The `serve` phase of the lifecycle only makes sure the stack is up and has caught up with the
champion: after that, serving follows every move of the alias by itself (infra/router.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import httpx
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from infra import services
from infra.router import VERSION_HEADER, Router
from infra.settings import load_settings
from infra.vllm_server import ServingConfig, check_serving_env
from registry import models

log = logging.getLogger(__name__)


class RegistryChampion:
    """The champion as the MLflow registry says, and its files in a local cache (one folder a version)."""

    def __init__(self, tracking_uri: str, name: str, cache: Path) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.name, self.cache = name, Path(cache)

    def champion(self) -> str | None:
        try:  # champion_version records a hand move in the champion history as soon as it sees one
            return models.champion_version(self.client, self.name)
        except models.ModelNotFound:
            return None

    def fetch(self, version: str) -> Path:
        final = self.cache / self.name / f"v{version}"
        if (final / "config.json").is_file():
            return final
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = models.download_version(self.client, self.name, version, dst=tmp)
        local.rename(final)  # the cache only ever holds complete versions
        shutil.rmtree(tmp, ignore_errors=True)
        return final


def run_router(port: int, name: str, cfg: ServingConfig | None = None) -> None:
    """The serving process: a router on `port` that serves `name`@champion until SIGTERM."""
    import uvicorn

    services.check_port_free(port)
    cfg = cfg or ServingConfig()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: serving reads the champion alias from MLflow")
    check_serving_env(cfg.python)
    home = load_settings().home / "serving"
    router = Router(RegistryChampion(uri, name, home / "models"), served_name=name, cfg=cfg, state_dir=home,
                    free_port=services.free_port)
    host = load_settings().bind_host
    log.info("serving %s@champion on http://%s:%s/v1 (registry %s)", name, host, port, uri)
    uvicorn.run(router.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


def served_version(base_url: str) -> str | None:
    """The version the serving stack answers with right now (None while it is starting)."""
    try:
        r = httpx.get(f"{base_url.rstrip('/').removesuffix('/v1')}/health", timeout=5.0)
    except httpx.HTTPError:
        return None
    return r.headers.get(VERSION_HEADER) if r.status_code == 200 else None


def wait_until_serving(base_url: str, version: str, timeout: float = services.SERVING_TIMEOUT_S) -> float:
    """Seconds until the stack answers with `version`; TimeoutError naming what it serves instead."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if served_version(base_url) == str(version):
            return time.monotonic() - t0
        time.sleep(1.0)
    raise TimeoutError(f"serving at {base_url} still answers with v{served_version(base_url)} "
                       f"{timeout:.0f} s after v{version} became champion; see {load_settings().logs_dir}")


@flow(name="serve", validate_parameters=False)
def serve_flow(model_name: str, mlflow_uri: str, timeout_s: float = services.SERVING_TIMEOUT_S) -> dict[str, str]:
    """Make sure the champion is served; returns the OpenAI base URL and the served version."""
    champion = models.champion_version(mlflow_uri, model_name)
    if champion is None:
        raise LookupError(f"{model_name} has no champion to serve")
    base_url = services.up_serving(model_name, timeout=timeout_s)
    waited = wait_until_serving(base_url, champion, timeout_s)
    get_run_logger().info("%s v%s served at %s (caught up in %.1f s)", model_name, champion, base_url, waited)
    return {"base_url": base_url, "version": champion}
