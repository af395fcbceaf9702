"""`flywheel`: the command line.

    flywheel run [--preset tiny] [section.key=value ...]     the whole lifecycle (services started if needed)
    flywheel run --resume [RUN]                              go on with an interrupted run (default: the newest)
    flywheel stage NAME [--preset tiny] [key=value ...]      one stage, no orchestration, no services
    flywheel services up|status|down                         the embedded Prefect and MLflow servers and the worker
                                                             (status/down: also the annotation page and serving)
    flywheel serve [--name flywheel-chat]                    serve the champion (vLLM), following its alias
    flywheel evaluate [--version champion] [evaluate.k=v]    evaluate any version or alias on any tasks
    flywheel compare --judge-url URL --judge-model M [--prompts F]  challenger vs champion by a judge; ratings
    flywheel models list|show V|promote V [--force --reason TEXT]|rollback [--name flywheel-chat]
                                                             the registry: champion, gates, history
    flywheel annotators add NAME [--admin]|list|disable NAME  annotation page logins ($FLYWHEEL_ANNOTATOR_PASSWORD)
    flywheel annotate [--foreground --port P]                  the annotation page (started in the background)
    flywheel queue fill [--prompts FILE] [--n N]             champion vs challenger answers into the label queue
    flywheel labels export                                   labels -> preference pairs, a DVC version
    flywheel feedback [--preset tiny] [section.key=value ...]  export -> DPO from the champion -> gate -> serve
    flywheel deploy [--preset tiny] [section.key=value ...]  Prefect deployments and schedules (the worker runs them)
    flywheel worker [--port P]                               run deployments' flow runs (what services start)
    flywheel plan --params 124M --gpus 8 --gpu h100 [--mfu 0.4]  compute-optimal tokens, FLOPs, wall time, memory/GPU
    flywheel data list|checkout MD5 [--name N]|checkout --model NAME@ALIAS
                                                             dataset versions: list them, bring any back from the remote
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path

from infra.settings import apply_offline_env, load_settings

STAGES = ("collect", "clean", "dedup", "decontaminate", "mix", "validate", "tokenizer", "tokenize", "base_model", "pretrain", "sft", "reward", "dpo", "ppo", "grpo",
          "rejection", "evaluate")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record, not the one at setup.

    `flywheel` commands also run in-process (tests, notebooks), where sys.stderr is swapped and
    closed between calls; a handler holding the old stream would then fail on every log record.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


OUR_LOGGERS = ("stages", "flows", "infra", "registry", "prefect.flow_runs", "prefect.task_runs")
_saved_logging: list[tuple[int, list[logging.Handler], dict[str, int]]] = []


def _setup_logging(name: str) -> Path:
    s = load_settings()
    s.logs_dir.mkdir(parents=True, exist_ok=True)
    log_file = s.logs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = logging.getLogger()
    _saved_logging.append((root.level, list(root.handlers), {n: logging.getLogger(n).level for n in OUR_LOGGERS}))
    handlers = [_CurrentStderr(), logging.FileHandler(log_file)]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # Our own story at INFO; libraries (httpx, GX, alembic...) only when they warn.
    for ours in OUR_LOGGERS:
        logging.getLogger(ours).setLevel(logging.INFO)
    return log_file


def _restore_logging() -> None:
    """Put logging back as it was before the command: `main()` also runs in-process (tests, notebooks)."""
    while _saved_logging:
        level, handlers, levels = _saved_logging.pop()
        root = logging.getLogger()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


def cmd_services(args: argparse.Namespace) -> int:
    from infra import services

    if args.action == "up":
        urls = services.up(worker=True)  # the worker runs deployments: the Prefect UI's Run button works
        print(f"Prefect UI:  {urls['prefect_ui']}\nMLflow UI:   {urls['mlflow_ui']}\nWorker:      {urls['worker']}/health")
        print(f"export PREFECT_API_URL={urls['prefect']} MLFLOW_TRACKING_URI={urls['mlflow']}")
    elif args.action == "status":
        for name, st in services.status().items():
            state = "external" if st.get("external") else ("healthy" if st.get("healthy") else
                                                           "running, unhealthy" if st.get("alive") else "stopped")
            print(f"{name:10s} {state:18s} {st.get('url') or '-'}  pid={st.get('pid') or '-'}")
    else:
        stopped = services.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def openai_example(base_url: str, name: str) -> str:
    return (f"OpenAI base URL: {base_url}\n"
            "  from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{base_url}\", api_key=\"unused\")\n"
            f"  print(client.chat.completions.create(model=\"{name}\", messages=[{{\"role\": \"user\", "
            "\"content\": \"Sam has 3 apples and gets 4 more. How many apples does Sam have now?\"}]"
            ").choices[0].message.content)")


def cmd_serve(args: argparse.Namespace) -> int:
    from infra import services
    from infra.vllm_server import ServingEnvError, ServingConfig, check_serving_env

    if args.foreground:
        _setup_logging("serving")
        from flows.serving import run_router

        try:
            run_router(args.port or services.free_port(), args.name)
        except (OSError, ServingEnvError, RuntimeError) as err:
            print(f"flywheel serve: {err}", file=sys.stderr)
            return 1
        return 0
    external = load_settings().serving_url
    if external:
        print(f"SERVING_URL is set: serving runs elsewhere, starting nothing\n{openai_example(external, args.name)}")
        return 0
    from registry import models

    urls = services.up()
    services.export_env(urls)
    try:
        champion = models.resolve(urls["mlflow"], args.name)
        check_serving_env(ServingConfig().python)
    except (LookupError, ServingEnvError) as err:
        print(f"flywheel serve: {err}", file=sys.stderr)
        return 1
    print(f"starting serving for {args.name}@champion (v{champion.version}); vLLM takes 1-2 min on a laptop CPU ...",
          flush=True)
    base_url = services.up_serving(args.name)
    print(openai_example(base_url, args.name))
    print("Every response carries X-Model-Version; serving follows the champion alias by itself.")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.lifecycle_config import LifecycleConfig

    LifecycleConfig.load(args.preset, args.overrides)  # a typo fails before any server starts
    from infra import services

    urls = services.up()
    services.export_env(urls)
    from flows.evaluation import evaluate_version
    from registry import models

    try:  # bad input gets one line here, before a flow run exists to log a traceback
        version = models.resolve_version(urls["mlflow"], args.name, args.version)
        _setup_logging("evaluate")
        metrics = evaluate_version(model_name=args.name, version=version, dataset=args.dataset,
                                   preset=args.preset, overrides=args.overrides)
    except (LookupError, FileNotFoundError, ValueError) as err:
        print(f"flywheel evaluate: {err}", file=sys.stderr)
        return 1
    for key, value in metrics.items():
        if not key.endswith("_stderr"):
            se = metrics.get(f"{key}_stderr")
            print(f"{key:44s} {value:10.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Challenger against champion through a judge model; a refused request is one line on stderr."""
    if not args.judge_url:
        print("flywheel compare: no judge: pass --judge-url URL or set FLYWHEEL_JUDGE_URL", file=sys.stderr)
        return 2
    _setup_logging("compare")
    from infra import services

    services.export_env(services.up())
    from flows.compare import compare_versions, one_line_errors
    from stages.pairwise import JudgeError

    try:
        with one_line_errors():
            result = compare_versions(model_name=args.name, challenger=args.challenger, champion=args.champion,
                                      judge_url=args.judge_url, judge_model=args.judge_model,
                                      prompts_file=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                                      timeout_s=args.timeout, dataset=args.dataset)
    except (LookupError, FileNotFoundError, ValueError, JudgeError) as err:
        print(f"flywheel compare: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    low, high = result["interval"]
    print(f"{args.name} v{result['challenger']} vs v{result['champion']} on {result['n']} prompts ("
          + ", ".join(f"{count} from {source}" for source, count in result["sources"].items()) + ")")
    print(f"win rate     {result['win_rate']:.3f}  [{low:.3f}, {high:.3f}] (Wilson 95 %, both orders per prompt)")
    print(f"consistency  {result['consistency']:.3f}  (share of prompts whose verdict survived swapping the order)")
    print(f"{'version':>7}  Bradley-Terry rating")
    for version, rating in sorted(result["ratings"].items(), key=lambda kv: -kv[1]):
        mark = {result["challenger"]: "  <- challenger", result["champion"]: "  <- champion"}.get(version, "")
        print(f"{'v' + version:>7}  {rating:8.1f}{mark}")
    return 0


def _resumed(args: argparse.Namespace) -> int | None:
    """`run --resume [RUN]`: the run's saved preset and overrides into `args`, or an exit status when
    there is nothing to run. A different config is refused, never applied to a run half made with the old."""
    from flows import run_record

    try:
        record = run_record.resolve(load_settings().runs_dir, args.resume)
    except run_record.RunNotFound as err:
        print(f"flywheel run --resume: {err}", file=sys.stderr)
        return 1
    if record.finished:
        print(f"run {record.name} finished already (registered v{record.version}): nothing to do")
        return 0
    if run_record.busy(record.run_dir):
        print(f"flywheel run --resume: run {record.name} is being run by another process right now", file=sys.stderr)
        return 1
    given = (args.preset or record.preset, list(args.overrides) or record.overrides)
    if given != (record.preset, record.overrides):
        print(f"flywheel run --resume: run {record.name} was started with --preset {record.preset} "
              f"{' '.join(record.overrides)}; a resume runs that config: leave out --preset and the overrides, "
              "or start a new run", file=sys.stderr)
        return 2
    args.preset, args.overrides, args.resume = record.preset, list(record.overrides), record.name
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from flows.lifecycle_config import LifecycleConfig

    if args.resume is not None and (status := _resumed(args)) is not None:
        return status
    args.preset = args.preset or "tiny"
    cfg = LifecycleConfig.load(args.preset, args.overrides)  # a typo fails before any server starts
    log_file = _setup_logging("run")
    from infra import ray_executor, services

    urls = services.up()
    services.export_env(urls)
    from flows.lifecycle import lifecycle
    from registry import models

    try:
        summary = lifecycle(preset=args.preset, overrides=args.overrides, resume=args.resume)
    finally:
        ray_executor.shutdown()
    name = cfg.build("promote").model_name
    promotion = summary["gate"]
    print("\n" + "=" * 72)
    print(f"Registered {name} v{summary['version']}: gate {'passed' if promotion.passed else 'failed'}")
    for verdict in promotion.verdicts:
        print(f"  {verdict.reason}")
    width = max(map(len, summary["scores"]), default=9)
    for stage, m in summary["scores"].items():
        print(f"  {stage:{width}s} perplexity {m.get('eval/heldout/perplexity', float('nan')):8.2f}   arithmetic accuracy "
              f"{m.get('eval/arithmetic/accuracy', 0):.3f} ± {m.get('eval/arithmetic/accuracy_stderr', 0):.3f}   "
              f"format {m.get('eval/arithmetic/format_rate', 0):.3f}")
    if summary["champion"] is None:
        print(f"Champion:    none yet: no version of {name} has passed the gate")
    else:
        local = models.download(urls["mlflow"], name, dst=load_settings().home / "champion" / name)
        flag = f"  FLAGGED: {summary['champion_flag']}" if summary.get("champion_flag") else ""
        print(f"Champion:    {name} v{summary['champion']}  (models:/{name}@champion){flag}")
        print(f"  files:     {local}")
        print(f"  load:      AutoModelForCausalLM.from_pretrained('{local}')")
    if summary.get("serving"):
        print(f"Serving:     v{summary['serving']['version']}, following the champion alias")
        print(openai_example(summary["serving"]["base_url"], name))
    _after_run(args, cfg, name, summary)
    print(f"Prefect UI:  {urls['prefect_ui']}")
    print(f"MLflow UI:   {urls['mlflow_ui']}")
    print(f"Run outputs: {summary['run_dir']}\nLog:         {log_file}")
    print("Servers stay up for browsing; stop them with `flywheel services down` (or `make services-down`).")
    return 0


def _after_run(args: argparse.Namespace, cfg, name: str, summary: dict) -> None:
    """What turns one run into a flywheel: deployments and schedules, a filled queue, the annotation page."""
    from flows.deploy import DeployRecord, deploy
    from infra import services

    _, deployed = deploy(DeployRecord(preset=args.preset, overrides=list(args.overrides)))
    schedule, feedback = cfg.build("schedule"), cfg.build("feedback")
    when = (f"retraining on cron '{schedule.retrain_cron}', the champion's evaluation on '{schedule.evaluate_cron}'"
            if schedule.enabled else "schedules off (schedule.enabled=false)")
    print(f"Deployments: {len(deployed)} in the Prefect UI (Deployments > Run); {when}")
    if not cfg.build("queue").after_run or summary["champion"] is None:
        return
    from flows.queue import queue_fill_flow

    queued = queue_fill_flow(name=name, preset=args.preset, overrides=args.overrides)
    page = services.up_annotation()
    print(f"Annotation:  {page}  ({queued['queued']} answer pairs queued: v{queued['champion']} vs "
          + (f"v{queued['challenger']})" if queued["challenger"] else "a second sample of itself)"))
    print("  add people: FLYWHEEL_ANNOTATOR_PASSWORD=... .venv/bin/flywheel annotators add NAME [--admin]")
    print(f"  after {feedback.min_new_labels} new labels the feedback round (DPO from the champion -> gate -> "
          f"serve) starts by itself (checked every {feedback.check_every_s} s), or: .venv/bin/flywheel feedback")


def cmd_stage(args: argparse.Namespace) -> int:
    from stages.config import deep_merge, from_dict, load_preset, parse_overrides

    _setup_logging(f"stage-{args.name}")
    module = importlib.import_module(f"stages.{args.name}")
    klass = next(v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__)
    preset = load_preset(args.preset)
    section = dict(preset.get(args.name, {}))
    if args.name == "pretrain":
        section["model"] = preset.get("model", {})
    overrides = parse_overrides(args.overrides)
    ray_keys = overrides.pop("ray", None)
    cfg = from_dict(klass, deep_merge(section, overrides))
    if ray_keys is not None:
        # ray.* keys run the stage on Ray Train workers through the flow's executor, over the preset's
        # ray section: `ray.num_workers=2 ray.strategy=fsdp` means here what it means in `flywheel run`.
        from infra import ray_executor

        ray_cfg = from_dict(ray_executor.RayConfig, deep_merge(preset.get("ray") or {}, ray_keys), prefix="ray.")
        try:
            result = ray_executor.run_distributed(args.name, cfg, ray_cfg=ray_cfg)
        finally:
            ray_executor.shutdown()
    elif "mapper" in inspect.signature(module.run).parameters and not args.local:
        # A shard-wise data stage: its shards run as Ray tasks (RAY_ADDRESS, or a local Ray), as in the flow.
        from infra import ray_executor, ray_map

        ray_executor.ensure_ray()
        try:
            result = module.run(cfg, mapper=ray_map.mapper())
        finally:
            ray_executor.shutdown()
    else:
        result = module.run(cfg)
    print(result)
    return 0


def _print_versions(models, uri: str, name: str) -> None:
    rows = models.list_versions(uri, name)
    if not rows:
        print(f"no versions of {name}")
        return
    print(f"{'version':>7}  {'aliases':20s} {'gate':6s} {'vs':>4}  {'gate metric':28s} {'value':>7} {'diff':>7}  "
          f"{'created':25s} flag")
    for r in rows:
        g = r["gates"][0] if r["gates"] else None
        vs = f"v{r['gate_champion_version']}" if r["gate_champion_version"] else "-"
        diff = f"{g.diff:+.3f}" if g is not None and g.diff is not None else "-"
        value = f"{g.value:.3f}" if g is not None else "-"
        flag = f"FLAGGED: {r['flag']}" if r["flag"] else ""
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':20s} {r['gate_passed'] or '-':6s} {vs:>4}  "
              f"{r['gate_metric'] or '-':28s} {value:>7} {diff:>7}  {r['created']:25s} {flag}".rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    """The registry from the command line; a refused request is one line on stderr, never a traceback."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # `show` downloads meta.json
    from infra import services
    from registry import model_card, models

    uri = services.up()["mlflow"]
    try:
        if args.action == "list":
            _print_versions(models, uri, args.name)
        elif args.action == "show":
            print(model_card.build_model_card(uri, args.name, args.version), end="")
        elif args.action == "promote":
            event = models.promote(uri, args.name, args.version, force=args.force, reason=args.reason)
            if event is None:
                print(f"{args.name}: v{args.version} already is the champion")
            else:
                forced = f" (forced: {args.reason})" if args.force else ""
                print(f"{args.name}: champion is now v{event.to_version}, was "
                      f"{'v' + event.from_version if event.from_version else 'none'}{forced}")
        else:
            version = models.rollback(uri, args.name)
            print(f"{args.name}: champion is now v{version}")
    except models.ReasonRequired as err:
        print(f"flywheel models {args.action}: {err} (--force needs --reason TEXT)", file=sys.stderr)
        return 2
    except models.GateNotPassed as err:
        print(f"flywheel models {args.action}: {err}; to serve it anyway: --force --reason TEXT", file=sys.stderr)
        return 1
    except (models.RegistryError, LookupError) as err:
        print(f"flywheel models {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_annotators(args: argparse.Namespace) -> int:
    """Logins of the annotation page; a refused request is one line on stderr."""
    from sqlalchemy.exc import SQLAlchemyError

    from ui import store as labels

    try:
        st = labels.open_store()
        if args.action == "add":
            password = os.environ.get("FLYWHEEL_ANNOTATOR_PASSWORD")
            if password is None:
                import getpass

                password = getpass.getpass(f"password for {args.name}: ")
            labels.add_annotator(st, args.name, password, admin=args.admin)
            print(f"added annotator {args.name}" + (" (admin)" if args.admin else ""))
        elif args.action == "disable":
            labels.disable_annotator(st, args.name)
            print(f"disabled annotator {args.name}")
        else:
            rows = labels.list_annotators(st)
            if not rows:
                print("no annotators yet: flywheel annotators add NAME")
            for a in rows:
                role = "admin" if a.is_admin else "annotator"
                print(f"{a.name:24s} {role:9s} {'disabled' if a.disabled else 'active':8s} "
                      f"{a.created_at:%Y-%m-%d %H:%M:%S}")
    except labels.StoreError as err:
        print(f"flywheel annotators {args.action}: {err}", file=sys.stderr)
        return 1
    except SQLAlchemyError as err:  # the labels database is unreachable or not a database
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        print(f"flywheel annotators {args.action}: labels database: {reason}", file=sys.stderr)
        return 1
    return 0


def _delegate(module: str, function: str):
    """A command whose code lives with its flow: imported only when that command runs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)
    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole lifecycle")
    run.add_argument("--preset", default=None, help="default: tiny (with --resume: the run's own)")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                     help="go on with an interrupted run (a folder name under the runs dir; default: the newest "
                          "unfinished run), with the preset and overrides it started with")
    run.add_argument("overrides", nargs="*", metavar="section.key=value")
    run.set_defaults(fn=cmd_run)
    stage = sub.add_parser("stage", help="run one stage, no orchestration")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--preset", default="tiny")
    stage.add_argument("--local", action="store_true",
                       help="data stages: process the shards in this process instead of as Ray tasks")
    stage.add_argument("overrides", nargs="*", metavar="key=value")
    stage.set_defaults(fn=cmd_stage)
    svc = sub.add_parser("services", help="embedded Prefect + MLflow servers")
    svc.add_argument("action", choices=("up", "status", "down"))
    svc.set_defaults(fn=cmd_services)
    srv = sub.add_parser("serve", help="serve the champion through vLLM behind an alias-following router")
    srv.add_argument("--name", default="flywheel-chat")
    srv.add_argument("--foreground", action="store_true", help="run the router in this process (what services start)")
    srv.add_argument("--port", type=int, default=0, help="with --foreground: the port to listen on")
    srv.set_defaults(fn=cmd_serve)
    ev = sub.add_parser("evaluate", help="evaluate a registered version (or alias) on any task list")
    ev.add_argument("--name", default="flywheel-chat")
    ev.add_argument("--version", default="champion", help="a version number or an alias")
    ev.add_argument("--dataset", default=None, help="default: the version's training data (its lineage)")
    ev.add_argument("--preset", default="tiny")
    ev.add_argument("overrides", nargs="*", metavar="evaluate.key=value")
    ev.set_defaults(fn=cmd_evaluate)
    cmp = sub.add_parser("compare", help="judge two versions' answers pairwise; Bradley-Terry ratings of all")
    cmp.add_argument("--name", default="flywheel-chat")
    cmp.add_argument("--challenger", default="challenger", help="a version number or an alias")
    cmp.add_argument("--champion", default="champion", help="a version number or an alias")
    cmp.add_argument("--judge-url", default=os.environ.get("FLYWHEEL_JUDGE_URL"),
                     help="OpenAI-compatible API root of the judge, e.g. http://127.0.0.1:8000/v1 "
                          "(default: $FLYWHEEL_JUDGE_URL)")
    cmp.add_argument("--judge-model", required=True, help="the judge's model name at that URL")
    cmp.add_argument("--prompts", default=None, metavar="FILE",
                     help="JSONL with a \"prompt\" per line, or plain text (default: serving logs + test split)")
    cmp.add_argument("--n", type=int, default=50, help="number of prompts")
    cmp.add_argument("--max-new-tokens", type=int, default=48)
    cmp.add_argument("--timeout", type=float, default=30.0, help="seconds per judge call")
    cmp.add_argument("--dataset", default=None, help="default: the challenger's training data (its lineage)")
    cmp.set_defaults(fn=cmd_compare)
    mdl = sub.add_parser("models", help="the MLflow model registry: champion, gates, history")
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default="flywheel-chat", help="registered model name")
    mdl_sub = mdl.add_subparsers(dest="action", required=True)
    mdl_sub.add_parser("list", parents=[named], help="versions, gate results, flags")
    mdl_sub.add_parser("show", parents=[named], help="lineage, gate and model card of a version").add_argument("version")
    prm = mdl_sub.add_parser("promote", parents=[named], help="make a version champion if its gate passed")
    prm.add_argument("version")
    prm.add_argument("--force", action="store_true", help="promote over a failed gate (needs --reason; flagged)")
    prm.add_argument("--reason", default=None, help="why the gate is overridden (recorded in the history)")
    mdl_sub.add_parser("rollback", parents=[named], help="back to the previous champion in the history")
    mdl.set_defaults(fn=cmd_models)
    ann = sub.add_parser("annotators", help="logins of the annotation page")
    ann_sub = ann.add_subparsers(dest="action", required=True)
    ann_add = ann_sub.add_parser("add", help="add an annotator (password: $FLYWHEEL_ANNOTATOR_PASSWORD or a prompt)")
    ann_add.add_argument("name")
    ann_add.add_argument("--admin", action="store_true", help="may see the admin tab and export")
    ann_sub.add_parser("list", help="annotators, roles, whether disabled")
    ann_sub.add_parser("disable", help="refuse this annotator's logins from now on").add_argument("name")
    ann.set_defaults(fn=cmd_annotators)
    page = sub.add_parser("annotate", help="the annotation page: start it (or reuse it) and print its URL")
    page.add_argument("--foreground", action="store_true", help="run the page in this process (what services start)")
    page.add_argument("--port", type=int, default=0, help="with --foreground: the port to listen on")
    page.set_defaults(fn=_delegate("flows.annotation", "cmd_annotate"))
    queue = sub.add_parser("queue", help="the annotation queue")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    fill = queue_sub.add_parser("fill", help="answer prompts with champion and challenger; queue the pairs")
    fill.add_argument("--name", default="flywheel-chat")
    fill.add_argument("--prompts", default=None, metavar="FILE",
                      help="JSONL with a \"prompt\" (text or messages) per line, or plain text, one prompt a line "
                           "(default: serving logs, then the champion's evaluation prompts)")
    fill.add_argument("--n", type=int, default=None, help="number of items (default: queue.n of the preset)")
    fill.add_argument("--preset", default="tiny")
    fill.add_argument("overrides", nargs="*", metavar="queue.key=value")
    queue.set_defaults(fn=_delegate("flows.queue", "cmd_queue"))
    lab = sub.add_parser("labels", help="the labels: export them as a versioned preference dataset")
    lab.add_argument("action", choices=("export",))
    lab.set_defaults(fn=_delegate("flows.feedback", "cmd_labels"))
    fb = sub.add_parser("feedback", help="one alignment round on the human labels, in the foreground")
    fb.add_argument("--name", default="flywheel-chat")
    fb.add_argument("--preset", default="tiny")
    fb.add_argument("overrides", nargs="*", metavar="section.key=value")
    fb.set_defaults(fn=_delegate("flows.feedback", "cmd_feedback"))
    dep = sub.add_parser("deploy", help="register Prefect deployments and schedules; (re)start the worker")
    dep.add_argument("--preset", default="tiny")
    dep.add_argument("overrides", nargs="*", metavar="section.key=value")
    dep.set_defaults(fn=_delegate("flows.deploy", "cmd_deploy"))
    wrk = sub.add_parser("worker", help="execute deployment runs in this process (what services start)")
    wrk.add_argument("--port", type=int, default=0, help="port of its health endpoint")
    wrk.set_defaults(fn=_delegate("flows.deploy", "cmd_worker"))
    dat = sub.add_parser("data", help="dataset versions (DVC): list them, check any out from the remote")
    dat_sub = dat.add_subparsers(dest="action", required=True)
    dat_sub.add_parser("list", help="current versions in data/ and every version a run read (from MLflow)")
    chk = dat_sub.add_parser("checkout", help="bring a version back into data/<name> (from the cache or the remote)")
    chk.add_argument("md5", nargs="?", help="the version's md5 (as `flywheel data list` shows it)")
    chk.add_argument("--name", default=None, help="data/<name> to restore into (default: the name runs read it as)")
    chk.add_argument("--model", default=None, metavar="NAME@ALIAS",
                     help="every dataset in a registered version's lineage, e.g. flywheel-chat@champion or flywheel-chat@3")
    dat.set_defaults(fn=_delegate("flows.datasets", "cmd_data"))
    importlib.import_module("flows.plan").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    p = parser()
    args, extra = p.parse_known_args(argv)
    # `flywheel stage NAME --local k=v`: argparse gives the overrides up once an option follows NAME.
    if extra and args.command == "stage" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from stages.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"flywheel: config error: {e}", file=sys.stderr)
        return 2
    finally:
        _restore_logging()


if __name__ == "__main__":
    sys.exit(main())
