"""`flywheel`: the command line.

    flywheel run [--preset tiny] [section.key=value ...]     the whole lifecycle (services started if needed)
    flywheel stage NAME [--preset tiny] [key=value ...]      one stage, no orchestration, no services
    flywheel services up|status|down                         the embedded Prefect and MLflow servers
    flywheel models list|rollback [--name flywheel-chat]     the registry
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from infra.settings import apply_offline_env, load_settings

STAGES = ("collect", "clean", "validate", "tokenizer", "pretrain", "sft", "dpo", "grpo", "evaluate")


def _setup_logging(name: str) -> Path:
    s = load_settings()
    s.logs_dir.mkdir(parents=True, exist_ok=True)
    log_file = s.logs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # Our own story at INFO; libraries (httpx, GX, alembic...) only when they warn.
    for ours in ("stages", "flows", "infra", "registry", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(ours).setLevel(logging.INFO)
    return log_file


def cmd_services(args: argparse.Namespace) -> int:
    from infra import services

    if args.action == "up":
        urls = services.up()
        print(f"Prefect UI:  {urls['prefect_ui']}\nMLflow UI:   {urls['mlflow_ui']}")
        print(f"export PREFECT_API_URL={urls['prefect']} MLFLOW_TRACKING_URI={urls['mlflow']}")
    elif args.action == "status":
        for name, st in services.status().items():
            state = "external" if st.get("external") else ("healthy" if st.get("healthy") else
                                                           "running, unhealthy" if st.get("alive") else "stopped")
            print(f"{name:8s} {state:18s} {st.get('url') or '-'}  pid={st.get('pid') or '-'}")
    else:
        stopped = services.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.lifecycle_config import LifecycleConfig

    cfg = LifecycleConfig.load(args.preset, args.overrides)  # a typo fails before any server starts
    log_file = _setup_logging("run")
    from infra import ray_executor, services

    urls = services.up()
    services.export_env(urls)
    from flows.lifecycle import lifecycle
    from registry import models

    try:
        summary = lifecycle(preset=args.preset, overrides=args.overrides)
    finally:
        ray_executor.shutdown()
    name = cfg.build("promote").model_name
    champion = models.resolve(urls["mlflow"], name)
    local = models.download(urls["mlflow"], name, dst=load_settings().home / "champion" / name)
    gate = summary["gate"]
    print("\n" + "=" * 72)
    print(f"Registered {name} v{summary['version']}: gate {'passed' if gate.passed else 'failed'} ({gate.reason})")
    print(f"Champion:    {name} v{champion.version}  (models:/{name}@champion)")
    print(f"  files:     {local}")
    print(f"  load:      AutoModelForCausalLM.from_pretrained('{local}')")
    for stage, m in summary["scores"].items():
        print(f"  {stage:9s} perplexity {m.get('eval/heldout/perplexity', float('nan')):8.2f}   arithmetic accuracy "
              f"{m.get('eval/arithmetic/accuracy', 0):.3f}   format {m.get('eval/arithmetic/format_rate', 0):.3f}")
    print(f"Prefect UI:  {urls['prefect_ui']}")
    print(f"MLflow UI:   {urls['mlflow_ui']}")
    print(f"Run outputs: {summary['run_dir']}\nLog:         {log_file}")
    print("Servers stay up for browsing; stop them with `flywheel services down` (or `make services-down`).")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from stages.config import deep_merge, from_dict, load_preset, parse_overrides

    _setup_logging(f"stage-{args.name}")
    module = importlib.import_module(f"stages.{args.name}")
    klass = next(v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__)
    preset = load_preset(args.preset)
    section = dict(preset.get(args.name, {}))
    if args.name == "pretrain":
        section["model"] = preset.get("model", {})
    cfg = from_dict(klass, deep_merge(section, parse_overrides(args.overrides)))
    result = module.run(cfg)
    print(result)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from infra import services
    from registry import models

    urls = services.up()
    if args.action == "rollback":
        version = models.rollback(urls["mlflow"], args.name)
        print(f"{args.name}: champion is now v{version}")
        return 0
    rows = models.list_versions(urls["mlflow"], args.name)
    if not rows:
        print(f"no versions of {args.name}")
        return 0
    print(f"{'version':>7}  {'aliases':22s} {'gate':6s} {'gate metric':28s} {'value':>8}  created")
    for r in rows:
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':22s} {r['gate_passed'] or '-':6s} "
              f"{r['gate_metric'] or '-':28s} {r['gate_value'] or '-':>8}  {r['created']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole lifecycle")
    run.add_argument("--preset", default="tiny")
    run.add_argument("overrides", nargs="*", metavar="section.key=value")
    run.set_defaults(fn=cmd_run)
    stage = sub.add_parser("stage", help="run one stage, no orchestration")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--preset", default="tiny")
    stage.add_argument("overrides", nargs="*", metavar="key=value")
    stage.set_defaults(fn=cmd_stage)
    svc = sub.add_parser("services", help="embedded Prefect + MLflow servers")
    svc.add_argument("action", choices=("up", "status", "down"))
    svc.set_defaults(fn=cmd_services)
    mdl = sub.add_parser("models", help="the MLflow model registry")
    mdl.add_argument("action", choices=("list", "rollback"))
    mdl.add_argument("--name", default="flywheel-chat")
    mdl.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    args = parser().parse_args(argv)
    from stages.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"flywheel: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
