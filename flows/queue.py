"""Fill the annotation queue: prompts answered by the champion and a challenger, one item per prompt.

    flywheel queue fill                          # queue.n prompts: serving logs first, then test questions
    flywheel queue fill --prompts mine.jsonl --n 50

The two sides: the champion, and the newest other registered version (the "challenger" alias when
it points elsewhere). With only one version there is nothing else to compare, so both sides are
two samples of the champion at `queue.temperature`; their difference is still a preference DPO can
learn from. The champion answers through serving when serving is up (the same path users hit, so
labels judge what they actually get), otherwise in-process, as the challenger always does. Items
whose two answers are identical carry no preference and are not queued; twice as many prompts as
items are answered (a file's prompts are all used) so that a fill still queues `n`. A share of items
(`queue.overlap_share`) asks for `queue.overlap` labels: agreement is measured on those.
Which side is which is stored with the item and never shown; the page shows them in random order.
"""

from __future__ import annotations

import argparse
from collections import Counter
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.lifecycle_config import LifecycleConfig
from flows.prompts import (SOURCE_FILE, Prompt, SourcedPrompt, as_messages, default_prompts, load_prompts_file,
                           logged_prompts, model_answers, serving_log_files)
from infra.router import CLIENT_HEADER
from infra.settings import load_settings
from registry import models
from ui.store import add_items, item_count, open_store

# Two samples of one small model often agree (8 of 20 arithmetic answers on the tiny preset): answer
# this many prompts per wanted item.
OVERSAMPLE = 2


def _overlaps(index: int, share: float) -> bool:
    """Spread the overlapping share evenly: with 0.25, items 3, 7, 11, ... (every fill, however small)."""
    return int((index + 1) * share) > int(index * share)


def sides(client: MlflowClient, name: str) -> tuple[str, str | None]:
    """(champion, challenger): the challenger is None when the champion is the only version."""
    champion = models.champion_version(client, name)
    if champion is None:
        raise LookupError(f"{name} has no champion yet: run `flywheel run` first")
    try:
        challenger = models.resolve_version(client, name, models.CHALLENGER)
    except LookupError:
        challenger = None
    if challenger in (None, champion):
        others = [v.version for v in client.search_model_versions(f"name='{name}'") if v.version != champion]
        challenger = max(others, key=int) if others else None
    return champion, challenger


def served_answers(base_url: str, name: str, version: str, prompts: list[Prompt], max_new_tokens: int,
                   temperature: float) -> list[str] | None:
    """Answers through the serving router, or None if it is down or serves another version."""
    answers = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=60.0, headers={CLIENT_HEADER: "queue-fill"}) as http:
        for prompt in prompts:
            try:
                response = http.post("/chat/completions", json={
                    "model": name, "messages": as_messages(prompt), "max_tokens": max_new_tokens,
                    "temperature": temperature})
            except httpx.HTTPError:
                return None
            if response.status_code != 200 or response.headers.get("X-Model-Version") != version:
                return None
            answers.append(response.json()["choices"][0]["message"]["content"])
    return answers


def _serving_url() -> str | None:
    from infra import services

    state = services.status().get("serving", {})
    return state.get("url") if state.get("healthy") else None


@flow(name="queue-fill", log_prints=True, validate_parameters=False)
def queue_fill_flow(name: str = "flywheel-chat", prompts_file: str | None = None, n: int | None = None,
                    preset: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """Queue up to `n` items (default queue.n); returns what was queued and where answers came from."""
    cfg = LifecycleConfig.load(preset, overrides).build("queue")
    n = n or cfg.n
    s = load_settings()
    uri = s.required_mlflow_uri()
    logger = get_run_logger()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion, challenger = sides(client, name)

    store = open_store()
    if prompts_file:
        chosen = [SourcedPrompt(p, SOURCE_FILE) for p in load_prompts_file(Path(prompts_file))[: OVERSAMPLE * n]]
    else:
        data = s.repo_root / client.get_model_version(name, champion).tags.get("data.path", "data/clean")
        # Seeded by the queue's size: a rerun of the same fill is reproducible, the next fill samples anew.
        chosen = default_prompts(OVERSAMPLE * n, logged_prompts(serving_log_files(s.home)), data, seed=cfg.seed + item_count(store))
    prompts = [c.prompt for c in chosen]

    out = s.home / "queue" / time.strftime("%Y%m%d-%H%M%S")

    def local(version: str, seed: int) -> list[str]:
        checkpoint = models.download_version(client, name, version, dst=out / f"v{version}")
        return model_answers(checkpoint, prompts, cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)

    serving = _serving_url()
    first = served_answers(serving, name, champion, prompts, cfg.max_new_tokens, cfg.temperature) if serving else None
    champion_via = "serving" if first is not None else "in-process"
    if first is None:
        first = local(champion, cfg.seed)
    second = local(challenger or champion, cfg.seed + 1)
    side_b = f"v{challenger}" if challenger else f"v{champion} (second sample)"

    items, identical = [], 0
    for c, a, b in zip(chosen, first, second, strict=True):
        if a.strip() == b.strip():
            identical += 1
            continue
        if len(items) == n:
            break
        items.append({"prompt": c.prompt, "response_a": a, "response_b": b, "model_a": f"v{champion}",
                      "model_b": side_b, "source": c.source,
                      "overlap": cfg.overlap if _overlaps(len(items), cfg.overlap_share) else None})
    ids = add_items(store, items)
    sources = dict(Counter(it["source"] for it in items))
    logger.info("queued %d items: v%s (%s) vs %s; %d identical answers left out; prompts %s", len(ids), champion,
                champion_via, side_b, identical, sources)
    return {"queued": len(ids), "item_ids": ids, "identical": identical, "answered": len(chosen),
            "champion": champion,
            "challenger": challenger, "champion_via": champion_via, "sources": sources,
            "overlapping": sum(it["overlap"] is not None for it in items)}


def cmd_queue(args: argparse.Namespace) -> int:
    from flows.cli import _setup_logging
    from flows.compare import one_line_errors
    from flows.prompts import PromptsFileError
    from infra import services

    LifecycleConfig.load(args.preset, args.overrides)  # a typo fails before any server starts
    services.export_env(services.up())
    _setup_logging("queue")
    try:
        with one_line_errors():
            result = queue_fill_flow(name=args.name, prompts_file=args.prompts, n=args.n, preset=args.preset,
                                     overrides=args.overrides)
    except (LookupError, FileNotFoundError, PromptsFileError, ValueError) as err:
        print(f"flywheel queue fill: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    versus = f"v{result['challenger']}" if result["challenger"] else "a second sample of itself"
    print(f"queued {result['queued']} items: {args.name} v{result['champion']} ({result['champion_via']}) vs {versus}; "
          f"{result['overlapping']} want several labels; {result['identical']} identical answer pairs left out")
    print("prompts: " + ", ".join(f"{v} from {k}" for k, v in result["sources"].items()))
    print("label them: flywheel annotate (add people first: flywheel annotators add NAME)")
    return 0
