"""`flywheel deploy` and the worker against the real Prefect and MLflow servers of the session.

The fast tests check what a deploy would register (schedules, parameters, refusals) without a
server. The slow ones register everything for real, read it back through the Prefect API, run the
lifecycle once from its deployment (as the UI's Run button does) and stop the worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time

import psutil
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.deployments import run_deployment

from flows import cli, deploy
from infra import services as infra_services
from infra.settings import load_settings
from tests.flows.test_lifecycle import FAST, workspace  # noqa: F401 (workspace is a fixture)

MODEL = "flywheel-chat"
OVERRIDES = [*FAST, "schedule.enabled=false"]
# deployment -> the parameters it defaults to (beyond preset/overrides, which every one but serve takes)
MODEL_PARAMETER = {"evaluate-version/evaluate": "model_name", "phase-serve/serve": "model_name",
                   "queue-fill/queue-fill": "name", "feedback/feedback": "name",
                   "feedback-check/feedback-check": "name"}
EVERY = ["lifecycle/lifecycle", "phase-data/data", "phase-tokenizer/tokenizer", "phase-pretrain/pretrain",
         "phase-align/align", "evaluate-version/evaluate", "phase-promote/promote", "phase-serve/serve",
         "queue-fill/queue-fill", "feedback/feedback", "feedback-check/feedback-check"]


def by_name(deployments) -> dict:
    return {deploy.full_name(d): d for d in deployments}


# ----------------------------------------------------------------------------- no server needed


def test_schedules_come_from_config_and_only_when_enabled():
    on = by_name(deploy.build_deployments(deploy.DeployRecord("tiny", [
        "schedule.retrain_cron=0 4 * * 1", "schedule.timezone=Europe/Berlin", "feedback.check_every_s=90"])))
    (retrain,) = on["lifecycle/lifecycle"].schedules
    assert (retrain.schedule.cron, retrain.schedule.timezone, retrain.active) == ("0 4 * * 1", "Europe/Berlin", True)
    (nightly,) = on["evaluate-version/evaluate"].schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    (check,) = on["feedback-check/feedback-check"].schedules
    assert check.schedule.interval.total_seconds() == 90
    scheduled = {"lifecycle/lifecycle", "evaluate-version/evaluate", "feedback-check/feedback-check"}
    assert all(not d.schedules for name, d in on.items() if name not in scheduled)

    off = deploy.build_deployments(deploy.DeployRecord("tiny", ["schedule.enabled=false"]))
    assert sorted(by_name(off)) == sorted(on) == sorted(EVERY) and all(not d.schedules for d in off)
    # Flow runs start from the installed code by module path: no file paths, no storage to pull.
    assert on["lifecycle/lifecycle"].entrypoint == "flows.lifecycle.lifecycle"
    assert all(d.storage is None for d in off)


def test_bad_schedule_config_is_one_line_and_records_nothing(capsys):
    record = deploy.record_path()
    for override, field in [("schedule.retrain_cron=not a cron", "schedule.retrain_cron"),
                            ("schedule.timezone=Mars/Olympus", "schedule.timezone"),
                            ("feedback.check_every_s=1", "check_every_s")]:
        assert cli.main(["deploy", override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flywheel: config error:") and field in err and "\n" not in err, err
        assert not record.exists()


def test_record_defaults_and_refuses_garbage(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    assert deploy.read_record() == deploy.DeployRecord("tiny", [])  # no deploy yet: the tiny preset
    deploy.write_record(deploy.DeployRecord("small", ["sft.batch_size=4"]))
    assert deploy.read_record() == deploy.DeployRecord("small", ["sft.batch_size=4"])
    (tmp_path / "deploy.json").write_text("{not json")
    with pytest.raises(deploy.ConfigError, match=r"deploy\.json: not a deploy record"):
        deploy.read_record()


# ----------------------------------------------------------------------------- against the servers


@pytest.fixture(scope="module")
def deployed(services, workspace):  # noqa: F811 (the imported fixture)
    """Schedules registered beforehand (paused, so nothing fires), then `flywheel deploy` with them off."""
    scheduled = deploy.build_deployments(deploy.DeployRecord("tiny", [*FAST, "schedule.enabled=true"]))
    for d in scheduled:
        d.paused = True  # the scheduler creates no runs for a paused deployment
        d.apply()
    with get_client(sync_client=True) as client:
        before = {deploy.full_name(d): client.read_deployment_by_name(deploy.full_name(d)) for d in scheduled}

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["deploy", "--preset", "tiny", *OVERRIDES])
    try:
        yield rc, out.getvalue(), before
    finally:
        infra_services.down(names=("worker",))
        deploy.record_path().unlink(missing_ok=True)


@pytest.mark.slow
def test_deploy_registers_every_deployment_with_parameters(deployed):
    rc, out, before = deployed
    assert rc == 0, out
    # With schedules on, the API held the cron and interval schedules from the config...
    assert [s.schedule.cron for s in before["lifecycle/lifecycle"].schedules] == ["0 3 * * 0"]
    assert [s.schedule.cron for s in before["evaluate-version/evaluate"].schedules] == ["0 2 * * *"]
    assert [s.schedule.interval.total_seconds() for s in before["feedback-check/feedback-check"].schedules] == [60]

    ui = load_settings()
    record = json.loads(deploy.record_path(ui).read_text())
    assert (record["preset"], record["overrides"]) == ("tiny", OVERRIDES)
    with get_client(sync_client=True) as client:
        for name in EVERY:
            d = client.read_deployment_by_name(name)
            expected = {} if name == "phase-serve/serve" else {"preset": "tiny", "overrides": OVERRIDES}
            if name in MODEL_PARAMETER:
                expected[MODEL_PARAMETER[name]] = MODEL
            assert d.parameters == expected, name
            # ...and the redeploy with schedule.enabled=false removed them and resumed the deployment.
            assert d.schedules == [] and not d.paused, name
            assert re.search(rf"^  {re.escape(name)} +manual +http://127\.0\.0\.1:\d+/deployments/deployment/{d.id}$",
                             out, re.M), f"{name} not listed with its UI URL:\n{out}"
    status = infra_services.status()["worker"]
    assert status["healthy"] and f"pid {status['pid']}" in out
    assert "Run > Quick run" in out and "PREFECT_API_URL" in out


@pytest.mark.slow
def test_lifecycle_run_from_its_deployment_completes_and_stopping_the_worker_stops_everything(deployed):
    rc, out, _ = deployed
    assert rc == 0, out
    started = time.time()
    # As the UI's Run button: a flow run of the deployment, with its default parameters, through the API.
    flow_run = run_deployment("lifecycle/lifecycle", timeout=1200)
    assert flow_run.state.is_completed(), flow_run.state
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{MODEL}'")
    mine = [v for v in versions if v.creation_timestamp / 1000 >= started]
    assert len(mine) == 1, versions
    parent = client.get_run(mine[0].tags["lifecycle.run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id)

    worker = psutil.Process(infra_services.status()["worker"]["pid"])
    tree = [worker, *worker.children(recursive=True)]
    assert infra_services.down(names=("worker",)) == ["worker"]
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with get_client(sync_client=True) as prefect:  # a stopped worker pauses what it served
        assert prefect.read_deployment_by_name("lifecycle/lifecycle").paused
