"""Evaluate a checkpoint on chosen tasks, with a standard error beside every number and per-item scores.

    flywheel stage evaluate checkpoint=<dir> dataset=data/clean output_dir=/tmp/eval \
        'tasks=[heldout,arithmetic,arithmetic_mc]' passk_samples=8

Writes under output_dir:
- `evaluation.json`: config, metrics, item counts, timings, sample completions;
- `items.jsonl`: one row `{"metric", "item", "value"}` per scored item, so a promotion gate can pair
  a challenger with the champion item by item (ids depend only on the data and the config, never
  on the checkpoint); every metric with items is exactly the mean of its items;
- `passk_vs_temperature.png` when pass@k is measured.

Every metric `eval/<task>/<metric>` has `eval/<task>/<metric>_stderr` beside it: the standard
error of the mean over items, the delta method for perplexity, a seeded bootstrap for ECE.

Tasks: `heldout` (per-token NLL and perplexity over the first windows of the held-out split of the
token shards pretraining read, `tokens`: by default the path in the checkpoint's lineage, so the
split cannot differ from the one pretraining measured; memory-mapped, nothing is tokenized here),
`arithmetic` (greedy exact match and format rate on the test split, pass@k from
sampled completions), `arithmetic_mc` and `mmlu` (log-likelihood multiple choice, accuracy and
ECE; see stages/tasks/multiple_choice.py), `gsm8k` (generative exact match of the final number).
`harness_tasks` hands lm-evaluation-harness tasks to stages/harness.py.

Best-of-N (`best_of_n=N`, an inference option): for `arithmetic` and `gsm8k`, sample N answers per
problem at `best_of_n_temperature`, keep the one the scorer ranks highest and score that one.
- `eval/<task>/best_of_<N>_accuracy`: the pick of a reward model (`best_of_n_scorer=reward_model`,
  `reward_model=<dir>` from stages/reward.py): what a deployment that reranks N samples would get.
- `eval/<task>/best_of_<N>_oracle_accuracy`: the pick of the task's verifier, which knows the true
  answers. That is an ORACLE, not a deployable method: it equals pass@N (right when any of the N is
  right), the upper bound any reranker of these samples can reach. It is always reported beside the
  reward model's pick (same samples, so the gap is the reward model's selection loss), and alone
  with `best_of_n_scorer=verifier`.

Reward-hacking monitors (stages/monitors.py) run on every generated greedy answer (arithmetic and
gsm8k, pooled; one item per answer): `eval/monitor/polite_share`, `eval/monitor/overconfident_share`,
and, with a reward model for best-of-N, `eval/monitor/rm_verifier_divergence` (per problem: the share
of verifier-ordered pairs among its N samples that the reward model orders the other way; averaged
over problems where the verifier orders any pair). Mean answer length per task is in the report.
Length drift and KL need the reference policy, which evaluation does not have: the RL stages measure
them during training and record their alarms in the checkpoint's meta.json (`monitors.alarms`).
Alarms (thresholds `monitor.*`, a MonitorConfig) go to evaluation.json's `alarms` and the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stages import checkpoint as ckpt
from stages.chat import load_problems, prompt_text
from stages.config import to_dict
from stages.dataset import write_atomically, write_jsonl
from stages.eval_stats import (bootstrap_stderr, expected_calibration_error, mean_stderr, pass_at_k,
                               perplexity_stderr)
from stages.monitors import (MonitorConfig, check, has_overconfident_phrase, has_polite_phrase, monitor_texts,
                             reward_verifier_divergence)
from stages.plots import plt  # the headless backend is chosen there
from stages.pretrain import check_tokenizer
from stages.rewards import correctness, well_formatted
from stages.rollout import sample, token_logprobs
from stages.tasks import gsm8k
from stages.tasks import multiple_choice as mc
from stages.token_shards import TokenShards
from stages.tracking import NullTracker, Tracker
from stages.train_loop import pick_device

log = logging.getLogger(__name__)

TASKS = ("heldout", "arithmetic", "arithmetic_mc", "mmlu", "gsm8k")
GENERATIVE = ("arithmetic", "gsm8k")  # tasks whose answers are generated: best-of-N and the text monitors
SCORERS = ("reward_model", "verifier")
ITEMS = "items.jsonl"


MONITORS_NOT_HERE = ("monitor/kl and monitor/length_drift need the reference policy: the RL stages measure them "
                     "during training and record alarms in the checkpoint's meta.json (monitors.alarms)")


class MissingTokenizer(FileNotFoundError):
    """The checkpoint directory has no tokenizer files."""


class HeldoutSplitUnknown(ValueError):
    """No pretraining checkpoint in the lineage, and no token shards given."""


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    checkpoint: Path
    dataset: Path
    output_dir: Path
    tasks: tuple[str, ...] = ("heldout", "arithmetic")  # any of TASKS
    # heldout: a tokenize stage's output, whose held-out split is read. None: the shards pretraining
    # read, named in the checkpoint's meta.json lineage. Set it for a checkpoint whose lineage has no
    # pretraining (a model from the Hub: shards of its own tokenizer), or where the lineage's path is gone.
    tokens: Path | None = None
    seq_len: int = 128
    perplexity_windows: int = 64
    # arithmetic and arithmetic_mc: the first N problems of the test split (None: all of them)
    arithmetic_problems: int | None = 200
    max_new_tokens: int = 24
    passk_samples: int = 0  # sampled completions per problem for pass@k (0: no pass@k)
    passk_k: tuple[int, ...] = (1, 4)
    passk_temperatures: tuple[float, ...] = (0.7, 1.0)
    # file-based tasks; `limit` caps the items per file (and per harness task)
    mmlu_files: tuple[Path, ...] = ()  # MMLU CSVs: question,A,B,C,D,answer
    gsm8k_files: tuple[Path, ...] = ()  # GSM8K JSONL: {"question", "answer"} with "#### <number>"
    gsm8k_max_new_tokens: int = 256
    limit: int | None = None
    harness_tasks: tuple[str, ...] = ()  # lm-evaluation-harness task names (stages/harness.py)
    harness_include: Path | None = None  # a folder of extra task YAMLs
    ece_bins: int = 10
    # best-of-N for the generative tasks (1: off): N samples per problem, the scorer's favourite is scored
    best_of_n: int = 1
    best_of_n_scorer: str = "reward_model"  # reward_model | verifier (knows the answers: an oracle = pass@N)
    best_of_n_temperature: float = 0.7
    reward_model: Path | None = None  # a stages/reward.py checkpoint, for best_of_n_scorer=reward_model
    reward_batch_size: int = 16
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # alarm thresholds for the text monitors
    batch_size: int = 50  # sequences per forward pass / generate call
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def as_tuple(name: str, kind: Callable = str) -> None:
            value = getattr(self, name)
            if isinstance(value, str | Path):  # `tasks=heldout` or `tasks=heldout,arithmetic` on a command line
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            elif not isinstance(value, list | tuple):  # `passk_k=4`
                value = [value]
            object.__setattr__(self, name, tuple(kind(v) for v in value))

        for name, kind in (("tasks", str), ("mmlu_files", Path), ("gsm8k_files", Path), ("harness_tasks", str),
                           ("passk_k", int), ("passk_temperatures", float)):
            as_tuple(name, kind)
        if not self.tasks and not self.harness_tasks:
            raise ValueError("evaluate: nothing to evaluate (tasks and harness_tasks are both empty)")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"evaluate.tasks: unknown task {unknown[0]!r} (valid tasks: {', '.join(TASKS)})")
        for task, files in (("mmlu", self.mmlu_files), ("gsm8k", self.gsm8k_files)):
            if (task in self.tasks) != bool(files):
                raise ValueError(f"evaluate: task {task!r} needs {task}_files and {task}_files needs {task!r} "
                                 f"in tasks (tasks={list(self.tasks)}, {task}_files={[str(f) for f in files]})")
        if self.passk_samples < 0:
            raise ValueError(f"evaluate.passk_samples must be >= 0 (0: no pass@k), got {self.passk_samples}")
        if self.passk_samples and not all(1 <= k <= self.passk_samples for k in self.passk_k):
            raise ValueError(f"evaluate.passk_k must lie in [1, passk_samples={self.passk_samples}], got {self.passk_k}")
        if self.passk_samples and not all(t > 0 for t in self.passk_temperatures):
            raise ValueError(f"evaluate.passk_temperatures must be > 0 (greedy is accuracy), got {self.passk_temperatures}")
        if self.best_of_n < 1:
            raise ValueError(f"evaluate.best_of_n must be >= 1 (1: off), got {self.best_of_n}")
        if self.best_of_n_scorer not in SCORERS:
            raise ValueError(f"evaluate.best_of_n_scorer must be one of {', '.join(SCORERS)}, "
                             f"got {self.best_of_n_scorer!r}")
        if self.best_of_n > 1:
            if not set(GENERATIVE) & set(self.tasks):
                raise ValueError(f"evaluate.best_of_n={self.best_of_n} needs a generative task "
                                 f"({' or '.join(GENERATIVE)}) in tasks, got {list(self.tasks)}")
            if not self.best_of_n_temperature > 0:
                raise ValueError(f"evaluate.best_of_n_temperature must be > 0 (N greedy answers are one answer), "
                                 f"got {self.best_of_n_temperature}")
            if self.best_of_n_scorer == "reward_model" and self.reward_model is None:
                raise ValueError("evaluate.reward_model must name a reward model checkpoint when "
                                 "best_of_n_scorer=reward_model (or set best_of_n_scorer=verifier for the "
                                 "oracle upper bound)")
        for name in ("arithmetic_problems", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"evaluate.{name} must be >= 1 or null (all), got {getattr(self, name)}")


@dataclass(frozen=True)
class EvaluateResult:
    report: Path  # evaluation.json
    items: Path  # items.jsonl
    metrics: dict[str, float]
    alarms: tuple[dict, ...] = ()  # monitor alarms (stages.monitors.Alarm.to_dict()), also in evaluation.json


@dataclass
class TaskOutput:
    metrics: dict[str, float]
    items: list[dict[str, Any]]  # {"metric", "item", "value"}
    samples: list[dict[str, Any]]


def item_rows(metric: str, values: dict[str, float]) -> list[dict[str, Any]]:
    return [{"metric": metric, "item": item, "value": float(v)} for item, v in values.items()]


def summarize(metric: str, values: dict[str, float]) -> dict[str, float]:
    """`metric` and `metric_stderr` from per-item values: the aggregate is their plain mean."""
    mean, se = mean_stderr(list(values.values()))
    return {metric: mean, f"{metric}_stderr": se}


def read_items(path: Path) -> dict[str, dict[str, float]]:
    """items.jsonl as metric -> item id -> value."""
    out: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                metric, item, value = row["metric"], row["item"], float(row["value"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: not an items row {{metric, item, value}} ({e})") from None
            if item in out.setdefault(metric, {}):
                raise ValueError(f"{path}:{line_no}: item {item!r} of {metric} appears twice")
            out[metric][item] = value
    return out


# --- the held-out split: pretraining's, by construction -----------------------------------


def pretraining_config(checkpoint: Path) -> dict[str, Any]:
    """The config of the pretraining run `checkpoint` descends from.

    Read from the ancestry embedded in meta.json (`parent_meta`, nested), so a checkpoint downloaded
    from the registry needs none of its ancestors' folders; parent paths are the fallback for
    checkpoints written before configs were embedded.
    """
    path, chain = Path(checkpoint), []
    for _ in range(64):  # a lineage is a handful of stages; the cap only guards against a cycle
        meta_file = path / ckpt.META
        if not meta_file.exists():
            chain.append(f"no {ckpt.META} in {path}")
            break
        meta = json.loads(meta_file.read_text())
        node: dict[str, Any] | None = meta
        while node:
            chain.append(f"{node.get('stage')} at {path}")
            if node.get("stage") == "pretrain" and "tokens" in (node.get("config") or {}):
                return node["config"]
            if not node.get("parent_meta") or not (node["parent_meta"].get("config")):
                break
            node = node["parent_meta"]
        if not node or not node.get("parent"):
            break
        path = Path(node["parent"])
    raise HeldoutSplitUnknown(
        f"{checkpoint}: cannot tell which documents pretraining held out: no pretraining checkpoint in its "
        f"lineage ({' -> '.join(chain)}); pass evaluate.tokens=<a tokenize output made with its tokenizer>")


def tokens_of(cfg: EvaluateConfig) -> Path:
    """The token shards whose held-out split the `heldout` task reads: `cfg.tokens`, else pretraining's."""
    try:
        lineage = Path(pretraining_config(cfg.checkpoint)["tokens"])
    except HeldoutSplitUnknown:
        if cfg.tokens is None:
            raise
        return Path(cfg.tokens)
    if cfg.tokens is None:
        if not lineage.exists():
            raise FileNotFoundError(f"{cfg.checkpoint} was pretrained on {lineage}, which is not here: "
                                    f"`dvc pull` it or pass evaluate.tokens=<its copy>")
        return lineage
    if lineage.resolve() != Path(cfg.tokens).resolve():
        # A copy (a DVC checkout, another machine) is fine; shards of other data would hold other documents.
        log.warning("evaluate: pretraining read %s, evaluation reads %s: perplexity is comparable only if "
                    "both hold the same held-out documents", lineage, cfg.tokens)
    return Path(cfg.tokens)


def heldout_tokens(cfg: EvaluateConfig, tokenizer) -> np.ndarray:
    """The first `perplexity_windows` windows' worth of the held-out split: what pretraining measured on."""
    shards = TokenShards(tokens_of(cfg), "heldout")
    check_tokenizer(shards, cfg.checkpoint, tokenizer)
    return shards.read(0, min(len(shards), cfg.perplexity_windows * cfg.seq_len + 1))


@torch.no_grad()
def window_nlls(model, tokens: np.ndarray, seq_len: int, max_windows: int, batch_size: int = 16,
                progress: bool = False) -> dict[str, float]:
    """Mean next-token NLL of each consecutive window, keyed by index and a hash of its tokens."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    windows = tokens[: n * seq_len].reshape(n, seq_len).astype(np.int64)
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for lo in tqdm(range(0, n, batch_size), desc="heldout", unit="batch", disable=not progress, dynamic_ncols=True):
        x = torch.from_numpy(windows[lo : lo + batch_size]).to(device)
        nll = -token_logprobs(model, x, torch.ones_like(x)).mean(dim=1)
        for i, value in enumerate(nll.tolist(), start=lo):
            # The hash keeps windows of a different tokenizer from pairing with these by index alone.
            out[f"w{i:04d}-{hashlib.blake2b(windows[i].tobytes(), digest_size=4).hexdigest()}"] = value
    return out


def heldout_task(cfg: EvaluateConfig, model, tokenizer) -> TaskOutput:
    nlls = window_nlls(model, heldout_tokens(cfg, tokenizer), cfg.seq_len, cfg.perplexity_windows,
                       progress=cfg.progress)
    if not nlls:
        raise ValueError(f"{tokens_of(cfg)}: the held-out split is shorter than one window of "
                         f"seq_len={cfg.seq_len} tokens")
    ppl, ppl_se = perplexity_stderr(list(nlls.values()))
    metrics = {**summarize("eval/heldout/nll", nlls), "eval/heldout/perplexity": ppl,
               "eval/heldout/perplexity_stderr": ppl_se}
    return TaskOutput(metrics, item_rows("eval/heldout/nll", nlls), [])


# --- arithmetic: greedy exact match and pass@k ---------------------------------------------


def arithmetic_scores(model, tokenizer, problems: list, *, max_new_tokens: int, batch_size: int,
                      n: int = 1, temperature: float = 0.0, seed: int = 0, progress: bool = False) -> list[dict]:
    """One row per completion (`n` per problem, in order): id, question, answer, completion, verdicts."""
    rows = []
    per_call = max(1, batch_size // n)
    bar = tqdm(total=len(problems), desc=f"arithmetic T={temperature:g}", unit="problem", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    for lo in range(0, len(problems), per_call):
        chunk = problems[lo : lo + per_call]
        out = sample(model, tokenizer, [prompt_text(tokenizer, p.question) for p in chunk], n=n,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + lo)
        expanded = [p for p in chunk for _ in range(n)]
        for p, text, ids, ok, fmt in zip(expanded, out.texts, out.completions,
                                         correctness(out.texts, answers=[p.answer for p in expanded]),
                                         well_formatted(out.texts), strict=True):
            rows.append({"id": mc.item_id(p.question), "question": p.question, "answer": p.answer,
                         "completion": text, "tokens": len(ids), "correct": ok, "formatted": fmt})
        bar.update(len(chunk))
    bar.close()
    return rows


def passk_name(k: int, temperature: float) -> str:
    """MLflow metric names allow no '@': pass@4 at T=0.7 is eval/arithmetic/pass_at_4_t0.7."""
    return f"eval/arithmetic/pass_at_{k}_t{temperature:g}"


def passk_ks(cfg: EvaluateConfig) -> list[int]:
    """The k values measured: pass@1 always (the sampled accuracy), then the configured ones."""
    return sorted({1, *cfg.passk_k})


def arithmetic_task(cfg: EvaluateConfig, model, tokenizer, problems: list) -> TaskOutput:
    rows = arithmetic_scores(model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size, progress=cfg.progress)
    out = TaskOutput({}, [], rows)
    for name, key in (("eval/arithmetic/accuracy", "correct"), ("eval/arithmetic/format_rate", "formatted")):
        values = {r["id"]: r[key] for r in rows}
        out.metrics |= summarize(name, values)
        out.items += item_rows(name, values)
    for t in cfg.passk_temperatures if cfg.passk_samples else ():
        sampled = arithmetic_scores(model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.batch_size, n=cfg.passk_samples, temperature=t,
                                    seed=cfg.seed, progress=cfg.progress)
        right: dict[str, int] = {}
        for r in sampled:
            right[r["id"]] = right.get(r["id"], 0) + int(r["correct"])
        for k in passk_ks(cfg):
            values = {i: pass_at_k(cfg.passk_samples, c, k) for i, c in right.items()}
            out.metrics |= summarize(passk_name(k, t), values)
            out.items += item_rows(passk_name(k, t), values)
    return out


def plot_passk(cfg: EvaluateConfig, metrics: dict[str, float], path: Path) -> Path:
    """pass@k against sampling temperature, one line per k, error bars one standard error."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    temps = list(cfg.passk_temperatures)
    for k in passk_ks(cfg):
        ys = [metrics[passk_name(k, t)] for t in temps]
        errs = [metrics[f"{passk_name(k, t)}_stderr"] for t in temps]
        ax.errorbar(temps, ys, yerr=[0 if math.isnan(e) else e for e in errs], marker="o", capsize=3,
                    label=f"pass@{k} (n={cfg.passk_samples})")
    if "eval/arithmetic/accuracy" in metrics:
        ax.axhline(metrics["eval/arithmetic/accuracy"], color="gray", linestyle="--", label="greedy accuracy")
    ax.set_xlabel("temperature")
    ax.set_ylabel("fraction of problems solved")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("arithmetic: pass@k vs temperature")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


# --- multiple choice and GSM8K -------------------------------------------------------------


def multiple_choice_task(cfg: EvaluateConfig, model, tokenizer, task: str, questions: list[mc.MCQuestion]
                         ) -> TaskOutput:
    scores = mc.score(model, tokenizer, questions, batch_size=cfg.batch_size, progress=cfg.progress, desc=task)
    correct = {q.id: s.correct for q, s in zip(questions, scores, strict=True)}
    confidence = {q.id: s.confidence for q, s in zip(questions, scores, strict=True)}
    conf, acc = np.array(list(confidence.values())), np.array(list(correct.values()))
    out = TaskOutput({}, [], [{"id": q.id, "prompt": q.prompt, "options": list(q.options), "answer": q.answer,
                               "predicted": s.predicted, "loglikelihoods": list(s.loglikelihoods)}
                              for q, s in zip(questions, scores, strict=True)])
    for name, values in ((f"eval/{task}/accuracy", correct), (f"eval/{task}/confidence", confidence)):
        out.metrics |= summarize(name, values)
        out.items += item_rows(name, values)
    out.metrics[f"eval/{task}/ece"] = expected_calibration_error(conf, acc, cfg.ece_bins)
    out.metrics[f"eval/{task}/ece_stderr"] = bootstrap_stderr(
        lambda idx: expected_calibration_error(conf[idx], acc[idx], cfg.ece_bins), len(conf), seed=cfg.seed)
    return out


def gsm8k_scores(model, tokenizer, problems: list[gsm8k.GSM8KProblem], *, max_new_tokens: int, batch_size: int,
                 n: int = 1, temperature: float = 0.0, seed: int = 0, progress: bool = False) -> list[dict]:
    """One row per completion (`n` per problem, in order): id, question, answer, completion, verdict."""
    rows = []
    per_call = max(1, batch_size // n)
    for lo in tqdm(range(0, len(problems), per_call), desc=f"gsm8k T={temperature:g}", unit="batch",
                   disable=not progress, dynamic_ncols=True):
        chunk = problems[lo : lo + per_call]
        out = sample(model, tokenizer, [prompt_text(tokenizer, p.question) for p in chunk], n=n,
                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + lo)
        expanded = [p for p in chunk for _ in range(n)]
        rows += [{"id": p.id, "question": p.question, "answer": p.answer, "completion": text, "tokens": len(ids),
                  "predicted": gsm8k.extract_prediction(text), "correct": gsm8k.is_correct(text, p.answer)}
                 for p, text, ids in zip(expanded, out.texts, out.completions, strict=True)]
    return rows


def gsm8k_task(cfg: EvaluateConfig, model, tokenizer, problems: list[gsm8k.GSM8KProblem]) -> TaskOutput:
    rows = gsm8k_scores(model, tokenizer, problems, max_new_tokens=cfg.gsm8k_max_new_tokens,
                        batch_size=cfg.batch_size, progress=cfg.progress)
    values = {r["id"]: r["correct"] for r in rows}
    return TaskOutput(summarize("eval/gsm8k/accuracy", values), item_rows("eval/gsm8k/accuracy", values), rows)


# --- best-of-N: an inference option for the generative tasks ------------------------------

# (questions, completions) -> one score per completion, higher = better
Scorer = Callable[[list[str], list[str]], list[float]]


def best_of_n_name(task: str, n: int, *, oracle: bool) -> str:
    """`eval/<task>/best_of_<n>_accuracy` (reward model's pick) or `..._oracle_accuracy` (the verifier's)."""
    return f"eval/{task}/best_of_{n}_{'oracle_' if oracle else ''}accuracy"


def best_of_n_picks(scores: list[float], n: int) -> list[int]:
    """The index (within its group) of the best-scored of each consecutive group of `n`; ties: the first.

    >>> best_of_n_picks([0.1, 0.9, 0.3,  0.5, 0.5, 0.2], 3)
    [1, 0]
    """
    if len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not split into groups of {n}")
    return [int(np.argmax(scores[lo : lo + n])) for lo in range(0, len(scores), n)]


def reward_model_scorer(path: Path, device: torch.device, batch_size: int) -> Scorer:
    """Scores by a stages/reward.py reward model: r(prompt, completion), the prompt being the user's question."""
    from stages import reward  # imported only when asked for: evaluation runs without a reward model

    model, tokenizer = reward.load_reward_model(path, device)
    return lambda questions, completions: list(reward.score(model, tokenizer, questions, completions,
                                                            batch_size=batch_size))


def best_of_n_task(cfg: EvaluateConfig, task: str, rows: list[dict], scorer: Scorer | None) -> TaskOutput:
    """Best-of-N from `rows`: N sampled completions per problem in order, each with its verifier `correct`.

    The verifier's pick is right exactly when any of the N is right (pass@N): it knows the answers, so it
    is an oracle bound, reported as `..._oracle_accuracy`. With a reward-model `scorer`, its pick is the
    deployable best-of-N (`best_of_<N>_accuracy`), and the per-problem agreement of the two rankings feeds
    the `eval/monitor/rm_verifier_divergence` monitor.
    """
    n = cfg.best_of_n
    verifier = [float(r["correct"]) for r in rows]
    problems = [rows[lo : lo + n] for lo in range(0, len(rows), n)]
    out = TaskOutput({}, [], [])
    picks = {True: best_of_n_picks(verifier, n)}
    rm: list[float] | None = None
    if scorer is not None:
        rm = [float(x) for x in scorer([r["question"] for r in rows], [r["completion"] for r in rows])]
        if len(rm) != len(rows) or not all(math.isfinite(x) for x in rm):
            raise ValueError(f"evaluate {task}: the reward model returned {len(rm)} scores for {len(rows)} "
                             "completions, or a non-finite one")
        picks[False] = best_of_n_picks(rm, n)
    for oracle, chosen in picks.items():
        name = best_of_n_name(task, n, oracle=oracle)
        values = {group[0]["id"]: float(group[i]["correct"]) for group, i in zip(problems, chosen, strict=True)}
        out.metrics |= summarize(name, values)
        out.items += item_rows(name, values)
    divergence: dict[str, float] = {}
    for g, group in enumerate(problems):
        sample_row = {"id": group[0]["id"], "question": group[0]["question"], "answer": group[0]["answer"],
                      "completions": [r["completion"] for r in group], "correct": [r["correct"] for r in group],
                      "verifier_pick": picks[True][g]}
        if rm is not None:
            scores = rm[g * n : (g + 1) * n]
            sample_row |= {"rm_scores": scores, "rm_pick": picks[False][g]}
            d = reward_verifier_divergence(scores, verifier[g * n : (g + 1) * n])
            if not math.isnan(d):
                divergence[f"{task}:{group[0]['id']}"] = d
        out.samples.append(sample_row)
    if divergence:
        out.items += item_rows("eval/monitor/rm_verifier_divergence", divergence)
    return out


def arithmetic_best_of_n(cfg: EvaluateConfig, model, tokenizer, problems: list, scorer: Scorer | None) -> TaskOutput:
    rows = arithmetic_scores(model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                             n=cfg.best_of_n, temperature=cfg.best_of_n_temperature, seed=cfg.seed,
                             progress=cfg.progress)
    return best_of_n_task(cfg, "arithmetic", rows, scorer)


def gsm8k_best_of_n(cfg: EvaluateConfig, model, tokenizer, problems: list, scorer: Scorer | None) -> TaskOutput:
    rows = gsm8k_scores(model, tokenizer, problems, max_new_tokens=cfg.gsm8k_max_new_tokens, batch_size=cfg.batch_size,
                        n=cfg.best_of_n, temperature=cfg.best_of_n_temperature, seed=cfg.seed, progress=cfg.progress)
    return best_of_n_task(cfg, "gsm8k", rows, scorer)


# --- reward-hacking monitors on the generated answers --------------------------------------


def monitor_task(cfg: EvaluateConfig, answers: dict[str, list[dict]], divergence_items: list[dict]
                 ) -> tuple[TaskOutput, dict[str, Any]]:
    """`eval/monitor/*` over every greedy answer (`answers`: task -> rows with completion and tokens).

    One item per answer (`<task>:<id>`), so the shares pair item by item with a champion's like any
    other metric. Returns the task output and the report's per-task summary (shares and mean length).
    """
    out = TaskOutput({}, [], [])
    for name, verdict in (("eval/monitor/polite_share", has_polite_phrase),
                          ("eval/monitor/overconfident_share", has_overconfident_phrase)):
        values = {f"{task}:{r['id']}": float(verdict(r["completion"])) for task, rows in answers.items() for r in rows}
        if values:
            out.metrics |= summarize(name, values)
            out.items += item_rows(name, values)
    if divergence_items:
        out.metrics |= summarize("eval/monitor/rm_verifier_divergence",
                                 {r["item"]: r["value"] for r in divergence_items})
    per_task = {task: {**monitor_texts([r["completion"] for r in rows], lengths=[r["tokens"] for r in rows]),
                       "answers": len(rows)} for task, rows in answers.items() if rows}
    return out, per_task


def harness_task(cfg: EvaluateConfig, device: torch.device) -> TaskOutput:
    from stages import harness  # lm-evaluation-harness is heavy; import it only when asked for

    metrics, items = harness.evaluate(cfg.checkpoint, list(cfg.harness_tasks), include_path=cfg.harness_include,
                                      limit=cfg.limit, device=str(device))
    return TaskOutput(dict(metrics), list(items), [])


# --- the stage -----------------------------------------------------------------------------


def load_tokenizer(checkpoint: Path):
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    if not any((checkpoint / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise MissingTokenizer(f"checkpoint {checkpoint} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                               "save it beside the weights, as stages.checkpoint.save_checkpoint does")
    return ckpt.load_tokenizer(checkpoint)


def load_task_data(cfg: EvaluateConfig) -> dict[str, list]:
    """Every task's items, read before the model loads: a bad file fails in a second, not after an hour."""
    data: dict[str, list] = {}
    if {"arithmetic", "arithmetic_mc"} & set(cfg.tasks):
        data["arithmetic"] = load_problems(cfg.dataset, "test")[: cfg.arithmetic_problems]
    if "arithmetic_mc" in cfg.tasks:
        data["arithmetic_mc"] = mc.arithmetic_mc(data["arithmetic"])
    if "mmlu" in cfg.tasks:
        data["mmlu"] = [q for f in cfg.mmlu_files for q in mc.load_mmlu_csv(f, cfg.limit)]
    if "gsm8k" in cfg.tasks:
        data["gsm8k"] = [p for f in cfg.gsm8k_files for p in gsm8k.load_gsm8k(f, cfg.limit)]
    for task, entries in data.items():  # items are keyed by id: a repeat would silently replace a score
        ids = [mc.item_id(e.question) if task == "arithmetic" else e.id for e in entries]
        if len(set(ids)) < len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"evaluate {task}: item {twice!r} appears twice (the same question twice in "
                             f"{cfg.dataset}, or the same file listed twice)")
    return data


def run(cfg: EvaluateConfig, tracker: Tracker | None = None) -> EvaluateResult:
    tracker = tracker or NullTracker()
    log.info("evaluate %s on %s", cfg.checkpoint, ", ".join([*cfg.tasks, *cfg.harness_tasks]))
    tokenizer = load_tokenizer(cfg.checkpoint)
    data = load_task_data(cfg)
    if cfg.best_of_n > 1 and cfg.best_of_n_scorer == "reward_model" and not Path(cfg.reward_model).is_dir():
        raise FileNotFoundError(f"evaluate.reward_model: reward model directory {cfg.reward_model} does not exist")
    device = pick_device()
    model = ckpt.load_model(cfg.checkpoint, device).eval()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    scorer: Scorer | None = None
    if cfg.best_of_n > 1 and cfg.best_of_n_scorer == "reward_model":
        scorer = reward_model_scorer(cfg.reward_model, device, cfg.reward_batch_size)
    runners: dict[str, Callable[[], TaskOutput]] = {
        "heldout": lambda: heldout_task(cfg, model, tokenizer),
        "arithmetic": lambda: arithmetic_task(cfg, model, tokenizer, data["arithmetic"]),
        "arithmetic_mc": lambda: multiple_choice_task(cfg, model, tokenizer, "arithmetic_mc", data["arithmetic_mc"]),
        "mmlu": lambda: multiple_choice_task(cfg, model, tokenizer, "mmlu", data["mmlu"]),
        "gsm8k": lambda: gsm8k_task(cfg, model, tokenizer, data["gsm8k"]),
        "harness": lambda: harness_task(cfg, device),
        "arithmetic_best_of_n": lambda: arithmetic_best_of_n(cfg, model, tokenizer, data["arithmetic"], scorer),
        "gsm8k_best_of_n": lambda: gsm8k_best_of_n(cfg, model, tokenizer, data["gsm8k"], scorer),
    }
    best_of_n = [f"{t}_best_of_n" for t in GENERATIVE if t in cfg.tasks] if cfg.best_of_n > 1 else []
    metrics: dict[str, float] = {}
    items: list[dict[str, Any]] = []
    samples: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    answers: dict[str, list[dict]] = {}  # the greedy answers of the generative tasks, for the monitors
    divergence: list[dict] = []  # eval/monitor/rm_verifier_divergence items, from best-of-N
    for task in [*cfg.tasks, *best_of_n, *(["harness"] if cfg.harness_tasks else [])]:
        started = time.perf_counter()
        result = runners[task]()
        timings[task] = time.perf_counter() - started
        metrics |= result.metrics
        items += result.items
        divergence += [r for r in result.items if r["metric"] == "eval/monitor/rm_verifier_divergence"]
        samples[task] = result.samples[:50]
        if task in GENERATIVE:
            answers[task] = result.samples
        log.info("evaluate %s: %d items in %.1f s", task, len(result.items), timings[task])
    monitored, per_task = monitor_task(cfg, answers, divergence)
    metrics |= monitored.metrics
    items += monitored.items
    alarms = [a.to_dict() for a in check(metrics, cfg.monitor)]
    for a in alarms:
        log.warning("evaluate: monitor alarm: %s", a["message"])

    seen = set()
    for row in items:  # a gate pairs by (metric, item); harness rows are checked here too
        key = (row["metric"], row["item"])
        if key in seen:
            raise ValueError(f"evaluate: item {row['item']!r} of {row['metric']} scored twice (duplicate data?)")
        seen.add(key)
    counts: dict[str, int] = {}
    for row in items:
        counts[row["metric"]] = counts.get(row["metric"], 0) + 1
    plots = [plot_passk(cfg, metrics, out_dir / "passk_vs_temperature.png")] if (
        "arithmetic" in cfg.tasks and cfg.passk_samples) else []

    items_path = write_jsonl(items, out_dir / ITEMS)
    report = write_atomically(out_dir / "evaluation.json", lambda tmp: tmp.write_text(json.dumps(
        {"checkpoint": str(cfg.checkpoint), "config": to_dict(cfg), "metrics": metrics, "items": counts,
         "timings_s": timings, "plots": [p.name for p in plots], "samples": samples,
         "monitors": {"per_task": per_task, "not_measured_here": MONITORS_NOT_HERE}, "alarms": alarms},
        indent=2)))
    tracker.log_metrics(metrics)
    for path in (report, items_path, *plots):
        tracker.log_artifact(path)
    return EvaluateResult(report=report, items=items_path, metrics=metrics, alarms=tuple(alarms))
