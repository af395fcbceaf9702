"""The embedded servers for real: start, reuse, report, stop; and stay out of the way of external ones."""

from __future__ import annotations

import httpx
import psutil
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient

from infra import services
from infra.settings import REPO_ROOT, Settings


@pytest.fixture
def own_settings(tmp_path, monkeypatch) -> Settings:
    """A state root of its own: this test's down() must not stop the session's `services`."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Settings(home=tmp_path / "home", repo_root=REPO_ROOT)


def test_up_reuse_status_down(own_settings):
    # A record left by a server that died (crash, reboot) must be replaced, not trusted.
    own_settings.services_dir.mkdir(parents=True)
    (own_settings.services_dir / "mlflow.json").write_text(
        '{"pid": 999999999, "url": "http://127.0.0.1:9", "port": 9, "started_at": "x"}')
    assert services.status(own_settings)["mlflow"]["alive"] is False

    urls = services.up(own_settings)
    try:
        prefect_url, mlflow_url = urls["prefect"], urls["mlflow"]
        assert mlflow_url != "http://127.0.0.1:9"
        assert prefect_url.startswith("http://127.0.0.1:") and prefect_url.endswith("/api")
        assert urls["prefect_ui"] == prefect_url[: -len("/api")]
        assert httpx.get(f"{prefect_url}/health").json() is True
        assert httpx.get(f"{mlflow_url}/health").status_code == 200

        # The real clients talk to them.
        with SyncPrefectClient(prefect_url) as client:
            assert client.api_version()
            flow_id = client.create_flow_from_name("services-smoke")
            assert client.read_flow(flow_id).name == "services-smoke"
        assert any(e.name == "Default" for e in MlflowClient(mlflow_url).search_experiments())

        # State lives under the state root.
        assert (own_settings.home / "prefect" / "prefect.db").exists()
        assert (own_settings.home / "mlflow" / "mlflow.db").exists()
        assert (own_settings.logs_dir / "prefect.log").exists()

        st = services.status(own_settings)
        pids = {name: st[name]["pid"] for name in ("prefect", "mlflow")}
        for name in pids:
            assert st[name] == {"url": urls[name], "pid": pids[name], "alive": True,
                                "healthy": True, "external": False}

        # A second up() reuses the recorded servers.
        assert services.up(own_settings) == urls
        assert {n: services.status(own_settings)[n]["pid"] for n in pids} == pids
        groups = {name: [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
                  for name, pid in pids.items()}
    finally:
        stopped = services.down(own_settings)

    assert sorted(stopped) == ["mlflow", "prefect"]
    for procs in groups.values():  # the whole process group is gone, workers included
        assert not any(p.is_running() for p in procs)
    st = services.status(own_settings)
    assert not st["prefect"]["alive"] and not st["mlflow"]["alive"]
    assert services.down(own_settings) == []


def test_external_urls_start_nothing(own_settings, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/mlflow.db")
    before = set(psutil.Process().children(recursive=True))

    urls = services.up(own_settings)

    assert urls == {
        "prefect": "http://127.0.0.1:1/api",
        "mlflow": "sqlite:////data/mlflow.db",
        "prefect_ui": "http://127.0.0.1:1",
        "mlflow_ui": "sqlite:////data/mlflow.db",
    }
    assert set(psutil.Process().children(recursive=True)) == before
    assert not own_settings.services_dir.joinpath("prefect.json").exists()
    st = services.status(own_settings)
    assert st["prefect"]["external"] and st["mlflow"]["external"]
    assert st["prefect"]["pid"] is None and not st["prefect"]["healthy"]  # nothing listens on :1
    assert services.down(own_settings) == []  # never touches external services


def test_server_env_is_offline_and_rooted(own_settings, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    env = services.server_env(own_settings)
    assert env["PREFECT_HOME"] == str(own_settings.home / "prefect")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://db/prefect"


def test_session_services_fixture_exports_env(services):
    import os

    import mlflow
    from prefect.settings import get_current_settings

    assert os.environ["PREFECT_API_URL"] == services["prefect"]
    assert get_current_settings().api.url == services["prefect"]
    assert mlflow.get_tracking_uri() == services["mlflow"]


def test_prefect_ui_is_told_its_own_api_url(services):
    """The UI page asks /ui-settings where the API is: it must be this server, not the default :4200."""
    settings = httpx.get(f"{services['prefect_ui']}/ui-settings", timeout=10).json()
    assert settings["api_url"] == services["prefect"]


def test_flows_without_mlflow_are_told_how_to_start_it(own_settings):
    # own_settings has MLFLOW_TRACKING_URI removed: what every flow checks before it starts.
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set: start services with `flywheel services up`"):
        own_settings.required_mlflow_uri()
