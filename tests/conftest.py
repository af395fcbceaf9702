"""Shared fixtures. Keep this file small: fixtures used by one folder belong in that folder.

Before anything is imported, point every piece of state at a throw-away directory and switch off
telemetry and hub downloads, so that no test writes to $HOME or the repository, reaches the
network, or talks to a user's real Prefect/MLflow servers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Must run before prefect/mlflow are imported anywhere: Prefect freezes its settings (PREFECT_HOME,
# PREFECT_API_URL) at import time.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="flywheel-tests-"))
os.environ["FLYWHEEL_HOME"] = str(_SESSION_HOME)
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
    os.environ.pop(_var, None)  # never a user's real servers or cluster

from infra import services as infra_services  # noqa: E402 (the fixture below is `services`)
from infra.settings import apply_offline_env, load_settings  # noqa: E402

apply_offline_env()  # HF_HUB_OFFLINE, DO_NOT_TRACK, PREFECT_HOME under _SESSION_HOME, ...


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def services_home(tmp_path_factory) -> Path:
    """The state root the shared servers live in (their databases, artifacts, logs)."""
    return tmp_path_factory.mktemp("flywheel-home")


@pytest.fixture(scope="session")
def services(services_home):
    """Real Prefect and MLflow servers for the whole session; yields up()'s URL dict.

    Starting them costs ~10 s (Prefect's migrations), so every test that needs a server shares
    them. PREFECT_API_URL / MLFLOW_TRACKING_URI point at them while the session runs.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_HOME", str(services_home))
        settings = load_settings()
        urls = infra_services.up(settings)
        infra_services.export_env(urls)
        try:
            yield urls
        finally:
            infra_services.clear_env()
            infra_services.down(settings)


@pytest.fixture(scope="session")
def _mlflow_empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables created once: migrations cost ~1 s per new DB."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_empty_db) -> str:
    """A fast local MLflow store of this test's own (SQLite file, no server) for unit tests."""
    shutil.copy(_mlflow_empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # gitignored; CI keeps it


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save a screenshot as test-artifacts/<name>.png (look at it) and return its path."""
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (no browser can be downloaded here), for every
    browser test of a service page; each test opens its own context. `make test` installs chromium
    (`make test-deps`), so a missing one is a failed setup, not a reason to skip."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test-deps` installs Debian's chromium")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def tiny_pretrained_checkpoints(root: Path, corpus: Path | None = None, seeds: tuple[int, ...] = (1, 2),
                                steps: int = 12) -> list[Path]:
    """Tiny models (head_dim 32: servable by vLLM) pretrained a few steps from different seeds.

    Real text in, real (if poor) text out, and different answers per seed: what serving and
    comparison tests need, in seconds. Builds its own small corpus unless one is given.
    """
    from stages import collect, pretrain, tokenize, tokenizer
    from stages.collect import CollectConfig
    from stages.model import ModelConfig
    from stages.pretrain import PretrainConfig
    from stages.tokenize import TokenizeConfig
    from stages.tokenizer import TokenizerConfig
    from stages.train_loop import TrainConfig

    if corpus is None:
        corpus = collect.run(CollectConfig(output_dir=root / "collect", max_builtin_chars=60_000,
                                           arithmetic_problems=50)).dataset
    tok_dir = tokenizer.run(TokenizerConfig(dataset=corpus, output_dir=root / "tok", vocab_size=512)).tokenizer_dir
    tokens = tokenize.run(TokenizeConfig(dataset=corpus, tokenizer=tok_dir, output_dir=root / "tokens")).tokens
    model = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                        max_seq_len=128)
    return [pretrain.run(PretrainConfig(
        tokens=tokens, tokenizer=tok_dir, output_dir=root / f"seed{seed}", model=model, seq_len=64, batch_size=8,
        train=TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=1, progress=False, seed=seed))).checkpoint
        for seed in seeds]
