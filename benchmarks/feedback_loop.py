"""Loop latency: from the label that crosses `feedback.min_new_labels` to the new model answering.

    make run                                     # a champion, served, and the worker with its schedules
    .venv/bin/python benchmarks/feedback_loop.py                 # the real loop: the worker's scheduled check
    .venv/bin/python benchmarks/feedback_loop.py --inline        # the check run here, no waiting for the schedule

It uses the running services of the state root (`flywheel services up`): fills the queue with
`min_new_labels` items, labels all but one through the store (the page's own code path) the way
the guidelines ask (truthful first: the answer with the right number wins, a tie when both or
neither have it), then stores the crossing label and starts the clock. The clock stops when serving answers with
`X-Model-Version` = the new champion. Phases come from the feedback round's MLflow run (`time/*_s`):
export, DPO, evaluate (challenger and the champion re-scored), promote, serve; "wait for the check" is
the rest (at most `feedback.check_every_s` with the worker). If the gate refuses the new version the
clock stops at that decision and the result says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results  # noqa: E402
from flows.lifecycle_config import LifecycleConfig  # noqa: E402
from infra import services  # noqa: E402
from infra.router import CLIENT_HEADER  # noqa: E402
from infra.settings import apply_offline_env  # noqa: E402

ANNOTATOR, PASSWORD = "bench-annotator", "bench-password"


def served_version(base_url: str, name: str) -> str | None:
    try:
        r = httpx.post(f"{base_url.rstrip('/')}/chat/completions", timeout=30, headers={CLIENT_HEADER: "benchmark"}, json={
            "model": name, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4})
    except httpx.HTTPError:
        return None
    return r.headers.get("X-Model-Version") if r.status_code == 200 else None


def truthful_choice(answers: dict[str, int], prompt, a: str, b: str) -> str:
    """What an annotator following the guidelines picks on an arithmetic question."""
    from stages.tasks.arithmetic import extract_answer

    question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    right = answers.get(question)
    good = [extract_answer(x) == str(right) for x in (a, b)]
    return "A" if good == [True, False] else "B" if good == [False, True] else "tie" if all(good) else "both_bad"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="flywheel-chat")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--inline", action="store_true", help="run the check in this process instead of the worker's")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    apply_offline_env()
    services.export_env(services.up(worker=not args.inline))
    from mlflow import MlflowClient

    from flows import feedback, queue
    from registry import models
    from ui import store as st

    cfg = LifecycleConfig.load(args.preset, args.overrides)
    need = cfg.build("feedback").min_new_labels
    client = MlflowClient()
    before = models.champion_version(client, args.name)
    base_url = services.up_serving(args.name)
    store = st.open_store()
    if ANNOTATOR not in {a.name for a in st.list_annotators(store)}:
        st.add_annotator(store, ANNOTATOR, PASSWORD)
    pending = feedback.new_labels(store)
    if pending >= need:
        raise SystemExit(f"{pending} labels are already waiting for a round; export them first (flywheel labels export)")
    to_label = need - pending
    queue.queue_fill_flow(name=args.name, n=to_label + 4, preset=args.preset,
                          overrides=[*args.overrides, "queue.overlap_share=0"])
    from infra.settings import load_settings
    from stages.chat import load_problems

    data = load_settings().repo_root / client.get_model_version(args.name, before).tags.get("data.path", "data/clean")
    answers = {p.question: p.answer for split in ("train", "test") for p in load_problems(data, split)}
    choices = []
    # One at a time, as the page hands them out: next_item returns the annotator's open item until it is labelled.
    while len(choices) < to_label and (pair := st.next_item(store, ANNOTATOR)) is not None:
        choices.append(truthful_choice(answers, pair.prompt, pair.response_a, pair.response_b))
        if len(choices) == to_label:  # the crossing label: the clock starts
            started_at, t0 = time.time(), time.monotonic()
        st.submit_label(store, ANNOTATOR, pair.item_id, choices[-1], idempotency_key=f"bench-{pair.item_id}")
    if len(choices) < to_label:
        raise SystemExit(f"the queue had only {len(choices)} items for {ANNOTATOR}; {to_label} are needed")
    print(f"label {need} of {need} stored; v{before} is champion; waiting for the loop ...", flush=True)
    if args.inline:
        feedback.feedback_check(name=args.name, preset=args.preset, overrides=args.overrides)

    run, champion, answered = None, before, None
    while time.monotonic() - t0 < args.timeout:
        runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id],
                                  filter_string=f"tags.stage = 'feedback' and attributes.start_time >= "
                                                f"{int(started_at * 1000)}", max_results=1)
        run = runs[0] if runs else None
        if run is not None and run.info.status in ("FINISHED", "FAILED"):
            champion = models.champion_version(client, args.name)
            if champion == before or run.info.status == "FAILED":
                break
            if served_version(base_url, args.name) == champion:
                answered = time.monotonic() - t0
                break
        time.sleep(1.0)
    total = time.monotonic() - t0
    run = client.get_run(run.info.run_id) if run else None
    phases = {k.removeprefix("time/").removesuffix("_s"): v for k, v in (run.data.metrics if run else {}).items()
              if k.startswith("time/")}
    outcome = ("new model answering" if answered else "gate refused the new version" if run and champion == before
               else "failed" if run and run.info.status == "FAILED" else "timed out")
    result = {"machine": machine(), "preset": args.preset, "choices": {c: choices.count(c) for c in set(choices)}, "overrides": args.overrides, "inline": args.inline,
              "min_new_labels": need, "check_every_s": cfg.build("feedback").check_every_s, "outcome": outcome,
              "champion_before": before, "champion_after": champion, "loop_s": total, "phases_s": phases,
              "wait_for_check_s": total - sum(phases.values()) if phases else None,
              "feedback_run": run.info.run_id if run else None}
    write_results("feedback_loop" + ("-inline" if args.inline else ""), result)
    print(f"{outcome}: {total:.0f} s from the crossing label (v{before} -> v{champion})")
    for k, v in phases.items():
        print(f"  {k:10s} {v:7.1f} s")
    if phases:
        print(f"  {'wait+rest':10s} {result['wait_for_check_s']:7.1f} s  (the scheduled check, polling, bookkeeping)")


if __name__ == "__main__":
    main()
