"""Prefect deployments and schedules: `flywheel deploy` registers them, `flywheel worker` runs them.

    flywheel deploy [--preset tiny] [section.key=value ...]   # record the config, restart the worker, list them
    flywheel worker [--port P]                                # what `flywheel services up` starts

Design: one machine needs no Docker image and no remote code storage. The worker is a Prefect
runner (`prefect.serve`): as it starts it registers every deployment below with the Prefect API, then
polls for their flow runs and runs each as a local subprocess of its own, from the installed code
(entrypoints are module paths such as `flows.lifecycle.lifecycle`). So the Prefect UI's Run button
works as soon as the worker is up: no work pool, no `prefect worker`. At scale the same flows go to
a process or Kubernetes work pool (infra/k8s/), and PREFECT_API_URL points a worker at a Prefect
server elsewhere.

What the worker serves comes from `<state root>/deploy.json` (`preset`, `overrides`), written by
`flywheel deploy` once the config has validated; without it, the tiny preset's defaults. That
config gives every deployment its default `preset`/`overrides` parameters (each run can change
them in the UI) and the schedules, only when `schedule.enabled`: the lifecycle on
`schedule.retrain_cron`, the champion's evaluation on `schedule.evaluate_cron`, and the feedback
check every `feedback.check_every_s` seconds (a frequent scheduled check rather than an event
automation: Prefect's event triggers count events in a time window, not labels since the last
export, and the check reads the count from the labels store itself).

Health: Prefect's runner webserver (PREFECT_RUNNER_SERVER_ENABLE/HOST/PORT) answers GET /health with
200 while the runner polls (503 after two missed polls). It starts only after every deployment is
registered, so `services.up(worker=True)` returning means they are all visible.

Stopping: on SIGTERM the runner cancels its flow runs, pauses its deployments (Prefect then deletes
their not-yet-started scheduled runs, so a worker that was down does not come back to a pile of late
runs) and exits. That needs the Prefect API, which is why `services.down` stops the worker before
Prefect; flow runs start sessions of their own, and `services.down` kills whatever of the worker's
process tree outlives its timeout (e.g. a worker whose Prefect server went away first).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import logging
import os
import sys
import time
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.lifecycle_config import LifecycleConfig
from infra import services
from infra.settings import Settings, load_settings
from stages.config import ConfigError

log = logging.getLogger(__name__)

RECORD_FILE = "deploy.json"
TAG = "flywheel"
POLL_S = 5  # how often the worker asks for runs: the UI's Run button starts one within ~5 s
VISIBLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Spec:
    """One deployment: `name` (the UI shows `<flow name>/<name>`), the flow's `module.function`, when it runs."""

    name: str
    entrypoint: str
    schedule: str | None = None  # "retrain", "evaluate" or "feedback-check": which config field times it
    # At most one run at a time (the rest wait), or with "CANCEL_NEW" a run that finds one running is cancelled.
    one_at_a_time: str | None = None


SPECS = (
    Spec("lifecycle", "flows.lifecycle.lifecycle", schedule="retrain", one_at_a_time="ENQUEUE"),
    Spec("data", "flows.phases.data"),
    Spec("tokenizer", "flows.phases.tokenizer"),
    Spec("pretrain", "flows.phases.pretrain"),
    Spec("align", "flows.phases.align"),
    Spec("evaluate", "flows.evaluation.evaluate_version", schedule="evaluate"),
    Spec("promote", "flows.phases.promote"),
    Spec("serve", "flows.phases.serve"),
    Spec("queue-fill", "flows.queue.queue_fill_flow"),
    Spec("feedback", "flows.feedback.feedback_flow", one_at_a_time="ENQUEUE"),
    # A check that finds the previous one (or its feedback round) still running steps aside:
    # two checks must never start two rounds on the same labels.
    Spec("feedback-check", "flows.feedback.feedback_check", schedule="feedback-check", one_at_a_time="CANCEL_NEW"),
)


# ----------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class DeployRecord:
    """What the worker serves: the config its deployments default to."""

    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)

    def config(self) -> LifecycleConfig:
        return LifecycleConfig.load(self.preset, self.overrides)


def record_path(settings: Settings | None = None) -> Path:
    return (settings or load_settings()).home / RECORD_FILE


def read_record(settings: Settings | None = None) -> DeployRecord:
    path = record_path(settings)
    if not path.is_file():
        return DeployRecord()
    try:
        raw = json.loads(path.read_text())
        return DeployRecord(preset=str(raw["preset"]), overrides=[str(o) for o in raw.get("overrides") or []])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a deploy record ({err}); run `flywheel deploy` again") from None


def write_record(record: DeployRecord, settings: Settings | None = None) -> Path:
    path = record_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"preset": record.preset, "overrides": list(record.overrides),
                               "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- building deployments


def load_flow(spec: Spec):
    """The flow object behind a spec (an import error is a real error: no deployment silently disappears)."""
    module, _, function = spec.entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), function)


def default_parameters(flow_obj, record: DeployRecord, cfg: LifecycleConfig) -> dict[str, Any]:
    """The record's preset/overrides and the configured model name, for the flow parameters that take them."""
    model = cfg.build("promote").model_name
    known = {"preset": record.preset, "overrides": list(record.overrides), "model_name": model, "name": model}
    accepted = inspect.signature(flow_obj.fn).parameters
    return {key: value for key, value in known.items() if key in accepted}


def schedules(spec: Spec, cfg: LifecycleConfig) -> list:
    """The spec's schedules under this config (none unless schedule.enabled); slugs keep them stable."""
    from prefect.schedules import Cron, Interval

    timing = cfg.build("schedule")
    if spec.schedule is None or not timing.enabled:
        return []
    try:
        zoneinfo.ZoneInfo(timing.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: unknown time zone {timing.timezone!r} "
                          "(an IANA name such as UTC or Europe/Berlin)") from None
    if spec.schedule == "feedback-check":
        return [Interval(datetime.timedelta(seconds=cfg.build("feedback").check_every_s), slug="feedback-check")]
    key, slug = {"retrain": ("retrain_cron", "retrain"),
                 "evaluate": ("evaluate_cron", "nightly-evaluate")}[spec.schedule]
    try:
        return [Cron(getattr(timing, key), timezone=timing.timezone, slug=slug)]
    except ValueError as err:
        raise ConfigError(f"schedule.{key}: {' '.join(str(err).split())}") from None


def build_deployments(record: DeployRecord) -> list:
    """A RunnerDeployment for every spec; raises ConfigError on a bad config."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    cfg = record.config()
    built = []
    for spec in SPECS:
        flow_obj = load_flow(spec)
        limit = None if spec.one_at_a_time is None else ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy(spec.one_at_a_time))
        doc = inspect.getdoc(flow_obj.fn) or ""
        built.append(flow_obj.to_deployment(
            name=spec.name, parameters=default_parameters(flow_obj, record, cfg), schedules=schedules(spec, cfg),
            paused=False,  # a worker that stopped paused them; serving them again resumes them
            concurrency_limit=limit, description=doc.split("\n\n")[0], tags=[TAG, f"preset:{record.preset}"],
            entrypoint_type=EntrypointType.MODULE_PATH))
    return built


def full_name(deployment) -> str:
    return f"{deployment.flow_name}/{deployment.name}"


def _drop_stale_schedules(deployments: list) -> None:
    """Delete schedules a deployment no longer has (schedule.enabled=false, or a renamed slug).

    Re-registering a deployment with no schedules keeps its old ones when they carry slugs, so a
    redeploy with schedules off would otherwise leave the last ones running.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for deployment in deployments:
            wanted = {s.slug for s in deployment.schedules or []}
            try:
                existing = client.read_deployment_by_name(full_name(deployment))
            except ObjectNotFound:
                continue
            for schedule in existing.schedules:
                if schedule.slug not in wanted:
                    client.delete_deployment_schedule(existing.id, schedule.id)


# ----------------------------------------------------------------------------- the worker


def _runner_settings(port: int) -> None:
    """Prefect's runner webserver on our loopback port; settings are read when Prefect loads them."""
    os.environ.update({"PREFECT_RUNNER_SERVER_ENABLE": "true", "PREFECT_RUNNER_SERVER_HOST": services.HOST,
                       "PREFECT_RUNNER_SERVER_PORT": str(port), "PREFECT_RUNNER_POLL_FREQUENCY": str(POLL_S)})
    if "prefect.context" in sys.modules:
        import prefect.context

        prefect.context.refresh_global_settings_context()


def cmd_worker(args: argparse.Namespace) -> int:
    """Register the recorded deployments and run their flow runs until SIGTERM."""
    # Ours at INFO; Prefect's runner logs through its own handlers; httpx would log every poll.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flows").setLevel(logging.INFO)
    if not os.environ.get("PREFECT_API_URL"):
        print("flywheel worker: PREFECT_API_URL is not set: start it with `flywheel services up`", file=sys.stderr)
        return 1
    _runner_settings(args.port or services.free_port())
    from prefect import serve

    try:
        deployments = build_deployments(read_record())
        _drop_stale_schedules(deployments)
        log.info("serving %d deployments: %s", len(deployments), ", ".join(full_name(d) for d in deployments))
        serve(*deployments, pause_on_shutdown=True, print_starting_message=False)
    except ConfigError:
        raise
    except Exception as err:  # an unreachable API, a refused deployment: one line, the log has the rest
        log.exception("worker stopped")
        print(f"flywheel worker: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- flywheel deploy


def describe_schedules(deployment) -> str:
    """`cron 0 3 * * 0 (UTC)`, `every 60 s`, or `manual` for one deployment read from the API."""
    said = []
    for entry in deployment.schedules:
        schedule = entry.schedule
        if getattr(schedule, "cron", None):
            said.append(f"cron {schedule.cron} ({schedule.timezone or 'UTC'})")
        elif getattr(schedule, "interval", None):
            said.append(f"every {schedule.interval.total_seconds():.0f} s")
        else:
            said.append(type(schedule).__name__)
        if not entry.active:
            said[-1] += " (inactive)"
    return ", ".join(said) or "manual"


def wait_until_visible(expected: dict[str, dict[str, Any]], timeout: float = VISIBLE_TIMEOUT_S) -> dict[str, Any]:
    """Deployments read back from the Prefect API once each exists with the parameters just deployed."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline, seen = time.monotonic() + timeout, {}
    with get_client(sync_client=True) as client:
        while True:
            for name, parameters in expected.items():
                if name in seen:
                    continue
                try:
                    found = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    continue
                if found.parameters == parameters:
                    seen[name] = found
            if len(seen) == len(expected):
                return {name: seen[name] for name in expected}
            if time.monotonic() > deadline:
                missing = sorted(set(expected) - set(seen))
                raise TimeoutError(f"deployments {', '.join(missing)} not visible through the Prefect API after "
                                   f"{timeout:.0f} s; see {load_settings().logs_dir / 'worker.log'}")
            time.sleep(0.5)


def deploy(record: DeployRecord, settings: Settings | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate, record, restart the worker, wait for the deployments; returns (service URLs, deployments)."""
    s = settings or load_settings()
    expected = {full_name(d): d.parameters for d in build_deployments(record)}  # validates config and schedules
    write_record(record, s)
    services.down(s, names=("worker",))  # the worker reads the record as it starts
    urls = services.up(s, worker=True)
    services.export_env(urls)
    return urls, wait_until_visible(expected)


def cmd_deploy(args: argparse.Namespace) -> int:
    record = DeployRecord(preset=args.preset, overrides=list(args.overrides or []))
    try:
        urls, deployed = deploy(record)
    except ConfigError:
        raise  # the CLI prints config errors as one line itself
    except (ImportError, OSError, RuntimeError, TimeoutError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"flywheel deploy: {first}", file=sys.stderr)
        return 1
    worker = services.status().get("worker", {})
    overrides = " ".join(record.overrides) or "none"
    print(f"Deployed {len(deployed)} deployments of preset {record.preset} (overrides: {overrides}) to "
          f"{urls['prefect']}")
    print(f"Worker: pid {worker.get('pid') or '-'}, health {urls['worker']}/health; it runs every flow run "
          "as a local process")
    width = max(len(name) for name in deployed)
    for name, d in deployed.items():
        print(f"  {name:{width}s}  {describe_schedules(d):22s}  {urls['prefect_ui']}/deployments/deployment/{d.id}")
    print("Run one from the Prefect UI: open its URL, then Run > Quick run (the defaults above) or "
          "Run > Custom run (edit preset, overrides, inputs).")
    print(f"From a shell: PREFECT_API_URL={urls['prefect']} prefect deployment run 'lifecycle/lifecycle'")
    print("A Prefect server elsewhere: export PREFECT_API_URL=https://HOST/api (and MLFLOW_TRACKING_URI) "
          "before `flywheel deploy`; this machine's worker then registers and runs them there.")
    return 0
