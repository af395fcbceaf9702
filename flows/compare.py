"""Two registered versions answer the same prompts; a judge model picks the better answer, in both orders.

    flywheel compare --judge-url http://127.0.0.1:8000/v1 --judge-model judge     # challenger vs champion
    flywheel compare --challenger 5 --champion 3 --prompts prompts.jsonl --judge-url ... --judge-model ...

Prompts (flows/prompts.py): a file when one is given, otherwise up to half real user prompts sampled
from the serving logs and the rest from the arithmetic test split of the challenger's training data. Every answer is
greedy (temperature 0) through the version's own chat template, so a rerun asks the judge the same
questions. The judging itself is `stages.pairwise.compare` (both orders, Wilson interval).

Recorded: an MLflow run (stage=pairwise) with the `eval/pairwise/*` metrics and `comparisons.jsonl`
(one row per prompt: prompt, source, both answers, both verdicts, score); a version tag
`pairwise.win_rate.vs_v<champion>` on the challenger; and Bradley-Terry ratings over every pairwise
run of the model so far, as registered-model tags `rating.v<version>` and a bar plot on the run.

Ratings are rebuilt from compact run tags (`pairwise.score_sum`, `pairwise.prompts`), not from the
`comparisons.jsonl` artifacts: Bradley-Terry's likelihood depends on the comparisons only through
each pair's number of games and summed score, so those two numbers per run give exactly the same
fit as the rows, from one `search_runs` query instead of one artifact download per run ever made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.lifecycle import EXPERIMENT
from flows.prompts import (SOURCE_FILE, SOURCE_LOGS, SOURCE_TEST, SourcedPrompt, default_prompts, judge_text,
                           load_prompts_file, logged_prompts, model_answers, serving_log_files)
from infra.settings import load_settings
from registry import models
from registry.tracking import run_context
from stages import pairwise

STAGE = "pairwise"
JUDGE_CONCURRENCY = 4  # judge calls in flight (a vLLM judge batches them)
# One half-won game per version against an average player: an unbeaten version stays finite, and
# against the 50 prompts of one comparison it moves ratings by a few points only.
RATING_PRIOR = 1.0
SCORE_SUM_TAG, PROMPTS_TAG = "pairwise.score_sum", "pairwise.prompts"
RATING_TAG_PREFIX = "rating.v"


class FailFastJudge:
    """Wraps a judge so that once one call failed, the calls still queued fail at once.

    `pairwise.compare` maps its 2n calls over a thread pool, and leaving the pool waits for every
    queued call: against an unreachable judge that is 2n timeouts (50 prompts, 30 s: 25 minutes)
    before the first error surfaces.
    """

    def __init__(self, judge: pairwise.Judge) -> None:
        self.judge, self.failed = judge, threading.Event()

    def __call__(self, prompt: str, answer_a: str, answer_b: str) -> str:
        if self.failed.is_set():
            raise pairwise.JudgeError("an earlier judge call failed")
        try:
            return self.judge(prompt, answer_a, answer_b)
        except Exception:
            self.failed.set()
            raise


# ----------------------------------------------------------------------------- ratings


def earlier_comparisons(client: MlflowClient, model_name: str, exclude_run: str) -> list[tuple[str, str, float, int]]:
    """(challenger, champion, score sum, prompts) of every finished pairwise run of `model_name`."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    escaped = model_name.replace("'", "\\'")
    query = (f"tags.stage = '{STAGE}' and tags.`model.name` = '{escaped}' and attributes.status = 'FINISHED'")
    found, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if run.info.run_id == exclude_run or SCORE_SUM_TAG not in tags:
                continue
            found.append((tags["challenger.version"], tags["champion.version"], float(tags[SCORE_SUM_TAG]),
                          int(tags[PROMPTS_TAG])))
        token = page.token
        if not token:
            return found


def ratings_of(pairs: Sequence[tuple[str, str, float, int]]) -> dict[str, float]:
    """Bradley-Terry ratings by version from per-run (challenger, champion, score sum, prompts).

    A run's prompts enter as that many games at its mean score: the same wins and game counts,
    hence the same ratings, as feeding the per-prompt rows.
    """
    games = [(ch, cp, total / count) for ch, cp, total, count in pairs for _ in range(count)]
    return pairwise.bradley_terry(games, prior=RATING_PRIOR)


def plot_ratings(ratings: dict[str, float], path: Path, title: str, highlight: Sequence[str]) -> Path:
    from stages.plots import plt  # sets the headless backend

    versions = sorted(ratings, key=int)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(versions) + 2), 3))
    colours = ["tab:orange" if v in highlight else "tab:blue" for v in versions]
    bars = ax.bar([f"v{v}" for v in versions], [ratings[v] for v in versions], color=colours)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(1000, color="grey", linewidth=0.8, linestyle="--")  # the mean rating, by construction
    low, high = min(ratings.values()), max(ratings.values())
    ax.set_ylim(min(low, 1000) - 50, max(high, 1000) + 50)
    ax.set_ylabel("Bradley-Terry rating (Elo scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the flow


@flow(name="compare", log_prints=True, validate_parameters=False)
def compare_versions(model_name: str = "flywheel-chat", challenger: str = "challenger", champion: str = "champion",
                     judge_url: str = "", judge_model: str = "", prompts_file: str | None = None, n: int = 50,
                     max_new_tokens: int = 48, timeout_s: float = 30, dataset: str | None = None) -> dict:
    """`challenger` and `champion` are version numbers or aliases; `dataset` defaults to the challenger's lineage."""
    logger = get_run_logger()
    if n < 1:
        raise ValueError(f"n={n}: compare needs at least one prompt")
    if not judge_url or not judge_model:
        raise ValueError("compare needs a judge: judge_url (e.g. http://127.0.0.1:8000/v1) and judge_model")
    s = load_settings()
    uri = s.required_mlflow_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ch, cp = models.resolve_version(client, model_name, challenger), models.resolve_version(client, model_name, champion)
    if ch == cp:
        raise ValueError(f"challenger {challenger!r} and champion {champion!r} are both v{ch} of {model_name!r}: "
                         "nothing to compare")

    if prompts_file:
        chosen = [SourcedPrompt(p, SOURCE_FILE) for p in load_prompts_file(Path(prompts_file))[:n]]
    else:
        tags = client.get_model_version(model_name, ch).tags
        data = Path(dataset) if dataset else s.repo_root / tags.get("data.path", "data/clean")
        chosen = default_prompts(n, logged_prompts(serving_log_files(s.home)), data)
    sources = {src: sum(p.source == src for p in chosen) for src in (SOURCE_FILE, SOURCE_LOGS, SOURCE_TEST)}
    sources = {k: v for k, v in sources.items() if v}
    prompts = [p.prompt for p in chosen]
    logger.info("%s v%s vs v%s on %d prompts (%s)", model_name, ch, cp, len(prompts),
                ", ".join(f"{v} from {k}" for k, v in sources.items()))

    out = s.home / "comparisons" / f"{model_name}-v{ch}-vs-v{cp}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    judge = pairwise.OpenAIJudge(judge_url, judge_model, timeout_s=float(timeout_s))
    run_tags = {"stage": STAGE, "model.name": model_name, "challenger.version": ch, "champion.version": cp,
                "judge.url": judge.url, "judge.model": judge_model,
                **{f"prompts.{k}": v for k, v in sources.items()}}
    with run_context(uri, EXPERIMENT, f"compare-{model_name}-v{ch}-vs-v{cp}", tags=run_tags) as tracker:
        answers = {v: model_answers(models.download_version(client, model_name, v, dst=out / f"v{v}"), prompts,
                                    max_new_tokens) for v in (ch, cp)}
        result = pairwise.compare([judge_text(p) for p in prompts], answers[ch], answers[cp], FailFastJudge(judge),
                                  max_workers=JUDGE_CONCURRENCY)

        rows = [{"item": r["item"], "source": c.source, "prompt": c.prompt, "challenger_version": ch,
                 "champion_version": cp, "challenger_answer": a, "champion_answer": b,
                 "challenger_as_a": r["challenger_as_a"], "challenger_as_b": r["challenger_as_b"],
                 "score": r["value"], "consistent": r["consistent"]}
                for r, c, a, b in zip(result.rows, chosen, answers[ch], answers[cp], strict=True)]
        comparisons = out / "comparisons.jsonl"
        comparisons.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tracker.log_metrics(result.metrics(STAGE))
        tracker.log_artifact(comparisons)
        score_sum = sum(r["value"] for r in result.rows)  # multiples of 0.25: exact as a decimal string
        tracker.set_tags({SCORE_SUM_TAG: repr(score_sum), PROMPTS_TAG: result.n})

        pairs = [*earlier_comparisons(client, model_name, tracker.run_id), (ch, cp, score_sum, result.n)]
        ratings = ratings_of(pairs)
        plot = plot_ratings(ratings, out / "ratings.png", f"{model_name}: Bradley-Terry over {len(pairs)} "
                            f"pairwise runs, {sum(p[3] for p in pairs)} prompts", highlight=(ch, cp))
        tracker.log_artifact(plot)
        client.set_model_version_tag(model_name, ch, f"pairwise.win_rate.vs_v{cp}", repr(result.win_rate))
        for version, rating in ratings.items():
            client.set_registered_model_tag(model_name, f"{RATING_TAG_PREFIX}{version}", f"{rating:.1f}")

    low, high = result.interval
    logger.info("v%s vs v%s: win rate %.3f [%.3f, %.3f], consistency %.3f, n=%d", ch, cp, result.win_rate, low,
                high, result.consistency, result.n)
    return {"challenger": ch, "champion": cp, "win_rate": result.win_rate, "interval": (low, high),
            "consistency": result.consistency, "n": result.n, "sources": sources, "ratings": ratings,
            "run_id": tracker.run_id}



# ----------------------------------------------------------------------------- for the command line


def _not_a_run_failure(record: logging.LogRecord) -> bool:
    if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
        return True
    failed_state = record.getMessage().startswith(("Finished in state Failed", "Finished in state Crashed"))
    return not (record.exc_info or record.levelno >= logging.ERROR or failed_state)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Keep Prefect's report of a failed run off the terminal while the command line runs the flow.

    The command prints the error as one line; Prefect would print it twice more, as a traceback and
    as "Finished in state Failed(...)". The log file and the Prefect UI still receive both.
    """
    consoles = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(_not_a_run_failure)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(_not_a_run_failure)
